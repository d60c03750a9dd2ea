"""Diffusers / transformers models -> the original single-file layout, for tests.

Writes what A1111 and ComfyUI users have on disk (the CompVis LDM layout of SD 1.x / 2.x checkpoints,
Stability's SGM layout of SDXL ones, original VAE files, lllyasviel's ControlNet layout) from diffusers
and transformers modules, so that engines/checkpoints and engines/controlnet can be tested without real
weights. It is written from the structure of the
models, independently of diffusers' converters (which the loader uses), so that the two check each
other. Works on meta tensors too: then only the names and shapes mean anything.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPEN_CLIP = "cond_stage_model.model."
XL_CLIP = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP = "conditioner.embedders.1.model."
CONTROLNET = "control_model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_to_ldm(unet: torch.nn.Module, prefix: str = UNET) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel's weights under the original names: input_blocks (a flat list of resnet,
    attention and downsample steps), middle_block, output_blocks, time_embed, label_emb, out."""
    per_block = unet.config.layers_per_block + 1  # resnets per level (down) plus the downsampler's slot
    up_has_attention = {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}
    out = {}
    for key, value in unet.state_dict().items():
        out[prefix + _unet_name(key, per_block, up_has_attention)] = value
    return out


def _unet_name(key: str, per_block: int, up_has_attention: dict[int, bool]) -> str:
    for new, old in _UNET_TOP.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        step = 1 + level * per_block + j
        return f"input_blocks.{step}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{step}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        step = level * per_block + j
        return f"output_blocks.{step}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{step}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        level = int(m[1])
        slot = 2 if up_has_attention[level] else 1  # after the resnet, and the attention if there is one
        return f"output_blocks.{level * per_block + per_block - 1}.{slot}.conv.{m[2]}"
    raise ValueError(f"no original name for UNet weight {key}")


def _resnet(rest: str) -> str:
    name, _, param = rest.partition(".")
    if name not in _RESNET:
        raise ValueError(f"no original name for resnet weight {rest}")
    return f"{_RESNET[name]}.{param}"


def controlnet_to_ldm(controlnet: torch.nn.Module, prefix: str = CONTROLNET) -> dict[str, torch.Tensor]:
    """A ControlNetModel's weights under the original (cldm) names: its copy of the UNet's encoder as the
    UNet's (time_embed, label_emb, input_blocks, middle_block), `zero_convs.i.0` for the zero convolution
    of the i-th down residual, `middle_block_out.0` for the middle one's, and `input_hint_block` for the
    conditioning embedding. cldm's input_hint_block is one Sequential of convolutions with a SiLU after
    each but the last (conv, SiLU, conv, SiLU, ..., conv), so the k-th convolution (conv_in, the blocks in
    order, conv_out) sits at index 2k; zero_convs and middle_block_out hold a single convolution each."""
    per_block = controlnet.config.layers_per_block + 1
    last_conv = 1 + len(controlnet.controlnet_cond_embedding.blocks)  # conv_out, after conv_in and the blocks
    out = {}
    for key, value in controlnet.state_dict().items():
        if m := re.match(r"controlnet_down_blocks\.(\d+)\.(weight|bias)$", key):
            name = f"zero_convs.{m[1]}.0.{m[2]}"
        elif m := re.match(r"controlnet_mid_block\.(weight|bias)$", key):
            name = f"middle_block_out.0.{m[1]}"
        elif m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)$", key):
            conv = {"conv_in": 0, "conv_out": last_conv}.get(m[1]) if m[2] is None else 1 + int(m[2])
            name = f"input_hint_block.{2 * conv}.{m[3]}"
        elif key.startswith("controlnet_"):
            raise ValueError(f"no original name for ControlNet weight {key}")
        else:
            name = _unet_name(key, per_block, {})  # the encoder: a ControlNet has no up blocks
        out[prefix + name] = value
    return out


def vae_to_ldm(vae: torch.nn.Module, prefix: str = VAE) -> dict[str, torch.Tensor]:
    """An AutoencoderKL's weights under the original names: encoder.down.i.block.j, mid.block_1 /
    attn_1 (q, k, v, proj_out as 1x1 convolutions), decoder.up numbered from the bottom, nin_shortcut."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+)(?:\.0)?\.(weight|bias)", key):
            part, layer, param = m[1], m[2], m[3]
            layer = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[layer]
            name = f"{part}.mid.attn_1.{layer}.{param}"
            if param == "weight" and layer != "norm":
                value = value[:, :, None, None]  # the original uses 1x1 convolutions
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            name = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            name = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            name = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            name = f"{m[1]}.norm_out.{m[2]}"
        elif not re.match(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.", key):
            raise ValueError(f"no original name for VAE weight {key}")
        out[prefix + name.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def clip_to_ldm(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP-L text encoder as SD 1.x and SDXL checkpoints hold it: Hugging Face's own names under
    `prefix` + "text_model.", with the position ids buffer old checkpoints carry."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if key == "text_projection.weight":
            raise ValueError("SD checkpoints hold CLIP-L without a projection")
        out[f"{prefix}text_model.{key.removeprefix('text_model.')}"] = value
    positions = text_encoder.config.max_position_embeddings
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(positions, device=value.device)[None]
    return out


def open_clip_to_ldm(text_encoder: torch.nn.Module, prefix: str, unused_layers: int = 0) -> dict[str, torch.Tensor]:
    """A text encoder in OpenCLIP's layout, as SD 2.x (`cond_stage_model.model.`) and SDXL
    (`conditioner.embedders.1.model.`) hold it: transformer.resblocks with fused in_proj q/k/v,
    ln_1 / ln_2, mlp.c_fc / c_proj, positional_embedding, ln_final, text_projection (transposed) and
    logit_scale. `unused_layers` appends layers the model does not use (SD 2.x keeps ViT-H's 24th)."""
    weights = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": weights.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": weights.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": weights.pop("final_layer_norm.bias")}
    width = out[prefix + "ln_final.weight"].shape[0]
    out[prefix + "logit_scale"] = torch.ones((), device=out[prefix + "ln_final.weight"].device)
    if "text_projection.weight" in weights:
        out[prefix + "text_projection"] = weights.pop("text_projection.weight").T
    else:  # SD 2.x: OpenCLIP's projection is in the file, though the UNet never sees it
        out[prefix + "text_projection"] = torch.zeros(width, width, device=out[prefix + "ln_final.weight"].device)
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        p, q = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        attention = p + "self_attn."
        for param in ("weight", "bias"):
            out[f"{q}attn.in_proj_{param}"] = torch.cat(
                [weights.pop(f"{attention}{x}_proj.{param}") for x in "qkv"])
            out[f"{q}attn.out_proj.{param}"] = weights.pop(f"{attention}out_proj.{param}")
            out[f"{q}ln_1.{param}"] = weights.pop(f"{p}layer_norm1.{param}")
            out[f"{q}ln_2.{param}"] = weights.pop(f"{p}layer_norm2.{param}")
            out[f"{q}mlp.c_fc.{param}"] = weights.pop(f"{p}mlp.fc1.{param}")
            out[f"{q}mlp.c_proj.{param}"] = weights.pop(f"{p}mlp.fc2.{param}")
    if weights:
        raise ValueError(f"no OpenCLIP name for {sorted(weights)}")
    last = f"{prefix}transformer.resblocks.{layers - 1}."
    for extra in range(layers, layers + unused_layers):
        for key in [k for k in out if k.startswith(last)]:
            out[key.replace(last, f"{prefix}transformer.resblocks.{extra}.")] = torch.zeros_like(out[key])
    return out


def checkpoint(arch: str, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
               text_encoder_2: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A whole single-file checkpoint of the layout `arch` ("sd15", "sd21" or "sdxl") names."""
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae)}
    if arch == "sd15":
        state.update(clip_to_ldm(text_encoder, SD1_CLIP))
    elif arch == "sd21":
        state.update(open_clip_to_ldm(text_encoder, SD2_OPEN_CLIP, unused_layers=1))
    elif arch == "sdxl":
        assert text_encoder_2 is not None
        state.update(clip_to_ldm(text_encoder, XL_CLIP))
        state.update(open_clip_to_ldm(text_encoder_2, XL_OPEN_CLIP))
    else:
        raise ValueError(f"unknown layout {arch}")
    return state


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def save(path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """As a .safetensors file (or, for a .ckpt / .pt path, a pickle nested under "state_dict" as the
    original training code saved it)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    if path.suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": tensors, "global_step": 1}, path)
    else:
        save_file(tensors, str(path), metadata=metadata)
    return path
