"""The built-in `tiny` model: a real SD-shaped pipeline small enough for any CPU.

UNet2DConditionModel, AutoencoderTiny (TAESD's architecture) and CLIPTextModel are built from small
configs with fixed seeds, with a byte-level CLIP tokenizer written out on the fly, so the whole daemon
runs and is tested with no weights and no network. Its images mean nothing; it exists to exercise every
code path exactly as a real model would.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from diffusers import AutoencoderTiny, ControlNetModel, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .autoencoder import Autoencoder
from .bundle import TINY_ARCH, TINY_XL_ARCH, ModelBundle, ModelError

SEED = 20240601
MAX_TOKENS = 77
TEXT_HIDDEN = 32


def build_bundle(arch: str = TINY_ARCH) -> ModelBundle:
    """The built-in test model `tiny` (SD 1.x-shaped) or `tiny-xl` (SDXL-shaped: two text encoders,
    pooled text and size conditioning), on the CPU in float32."""
    if arch not in (TINY_ARCH, TINY_XL_ARCH):
        raise ModelError(f"no built-in model {arch!r}; built-in: {TINY_ARCH}, {TINY_XL_ARCH}")
    xl = arch == TINY_XL_ARCH
    return ModelBundle(
        name=arch, arch=arch, source=arch, test_model=True,
        unet=build_xl_unet() if xl else build_unet(), autoencoder=Autoencoder(build_autoencoder()),
        text_encoder=build_text_encoder(), tokenizer=build_tokenizer(), scheduler=build_scheduler(),
        text_encoder_2=build_text_encoder_2() if xl else None, tokenizer_2=build_tokenizer() if xl else None,
    )


def build_unet() -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8,
        ).eval()


XL_TIME_EMBED = 8


def build_xl_unet() -> UNet2DConditionModel:
    """SDXL's conditioning on a tiny UNet: cross-attention over both encoders' features (32 + 32) and
    the `text_time` added embedding (pooled text + six size/crop numbers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 3)
        return UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=2 * TEXT_HIDDEN, attention_head_dim=8,
            addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_EMBED,
            projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * XL_TIME_EMBED,
        ).eval()


def build_controlnet(xl: bool = False) -> ControlNetModel:
    """A ControlNet of the tiny UNet (`tiny`, or `tiny-xl`'s with xl): its layout, from fixed seeds. A
    trained ControlNet's zero convolutions have grown away from zero; these are given small random
    values, so that a control image really steers the output."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 5)
        controlnet = ControlNetModel.from_unet(build_xl_unet() if xl else build_unet(),
                                               conditioning_embedding_out_channels=(8, 16, 32, 32)).eval()
        with torch.no_grad():
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                         controlnet.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0.0, 0.05)
    return controlnet


def build_autoencoder() -> AutoencoderTiny:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        ae = AutoencoderTiny(
            encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
        ).eval()
        _calibrate(ae)
    return ae


@torch.no_grad()
def _calibrate(ae: AutoencoderTiny) -> None:
    """Rescale the last encoder and decoder convolutions so that, like a trained SD autoencoder, latents
    come out with unit spread and images fill the visible range. Random weights alone give near-zero
    latents (which the noise would drown) and near-black images (which show nothing)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    probe = torch.stack([x, y, torch.rand(128, 128)]).unsqueeze(0) * 2 - 1
    _standardise(ae.encoder.layers[-1], ae.encoder(probe), mean=0.0, std=1.0)
    latents = ae.encoder(probe)
    _standardise(ae.decoder.layers[-1], ae.decoder.layers(torch.tanh(latents / 3) * 3), mean=0.5, std=0.2)


def _standardise(conv: torch.nn.Conv2d, output: torch.Tensor, mean: float, std: float) -> None:
    """Scale and shift `conv` per output channel so that `output` (its current result) gets mean and std."""
    current_mean = output.mean(dim=(0, 2, 3))
    scale = std / output.std(dim=(0, 2, 3)).clamp_min(1e-6)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias.copy_((conv.bias - current_mean) * scale + mean)


def build_text_encoder() -> CLIPTextModel:
    return _text_encoder(CLIPTextModel, SEED + 2)


def build_text_encoder_2() -> CLIPTextModelWithProjection:
    """SDXL's second encoder (OpenCLIP bigG's role): its projected pooled output conditions the UNet."""
    return _text_encoder(CLIPTextModelWithProjection, SEED + 4)


def _text_encoder(cls, seed: int):
    vocab = len(_byte_vocab())
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_HIDDEN,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).eval()


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with single-byte tokens and no merges: every text encodes, offline."""
    with tempfile.TemporaryDirectory(prefix="sdbridge-tiny-tokenizer-") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(_byte_vocab(), f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"model_max_length": MAX_TOKENS}, f)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def build_scheduler() -> LCMScheduler:
    return LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", clip_sample=False, steps_offset=1)


def _byte_vocab() -> dict[str, int]:
    chars = _byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def _byte_characters() -> list[str]:
    """The printable stand-in for each byte that byte-level BPE tokenizers (GPT-2, CLIP) use."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out
