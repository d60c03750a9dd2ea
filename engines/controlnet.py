"""ControlNets by name: the built-in `tiny` one, diffusers folders, and single `.safetensors` files in
diffusers' layout, from the A1111 / ComfyUI ControlNet folders, checked against the model they steer.

How a ControlNet steers a frame is engines/stream.py's business (`Stream.set_controlnets`); this module
only finds and loads them, offline, through engines.weights (pickles refused by default).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import tiny
from .bundle import TINY_ARCH, TINY_XL_ARCH, ModelBundle, ModelError
from .folders import CONTROLNET, ModelFolders
from .weights import read_state_dict

log = logging.getLogger(__name__)

BUILT_IN = "tiny"  # the tiny model's ControlNet (tiny-xl's for the tiny-xl model)
# Keys of a ControlNet in the original (ldm / A1111) layout, which needs its architecture's yaml to convert
_LDM_MARKERS = ("control_model.", "input_blocks.0.0.weight")


def load(name: str, model: ModelBundle, folders: ModelFolders | None, device: torch.device, dtype: torch.dtype,
         *, allow_pickle: bool = False) -> Any:
    """The ControlNet `name` (a name in the ControlNet folders, a path, or `tiny`) for `model`, on
    `device` in `dtype`. ModelError says what is wrong: not found, not a ControlNet, made for another
    model family, or a layout that cannot be read offline."""
    if name == BUILT_IN:
        if model.arch not in (TINY_ARCH, TINY_XL_ARCH):
            raise ModelError("controlnet 'tiny' is for the built-in tiny models only")
        module = tiny.build_controlnet(xl=model.arch == TINY_XL_ARCH)
    else:
        path = Path(name)
        if not path.exists():
            if folders is None:
                raise ModelError(f"controlnet {name!r} not found: no models folders are configured (--models-dir)")
            path = folders.find(CONTROLNET, name)
        module = _from_folder(path, dtype) if path.is_dir() else _from_file(path, model, allow_pickle)
    _check_fits(name, module, model)
    module.to(device)
    if module.dtype != dtype:  # diffusers warns about any dtype cast, even a no-op one
        module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def _from_folder(path: Path, dtype: torch.dtype) -> Any:
    from diffusers import ControlNetModel
    try:
        return ControlNetModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load controlnet folder {path}: {e}") from e


def _from_file(path: Path, model: ModelBundle, allow_pickle: bool) -> Any:
    """A single file in diffusers' layout: the architecture is the model's UNet's (a ControlNet copies
    its encoder), with the conditioning embedding's widths read from the weights."""
    from diffusers import ControlNetModel

    state_dict = read_state_dict(path, allow_pickle=allow_pickle)
    if any(key.startswith(_LDM_MARKERS) for key in state_dict):
        raise ModelError(f"controlnet {path.name} is in the original (A1111 / ldm) layout, which sdbridge cannot "
                         "convert offline yet; use the diffusers version of it (a folder with config.json and "
                         "diffusion_pytorch_model.safetensors, as on its Hugging Face page)")
    if not any(key.startswith("controlnet_cond_embedding.") for key in state_dict):
        raise ModelError(f"{path.name} is not a ControlNet (no controlnet_cond_embedding weights)")
    text_width = next((int(v.shape[1]) for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")), None)
    if text_width is not None and text_width != int(model.unet.config.cross_attention_dim):
        raise ModelError(_mismatch(path.name, text_width, model))
    widths = _conditioning_widths(state_dict)
    with torch.device("meta"):  # the weights come from the file
        module = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=widths,
                                           load_weights_from_unet=False)
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"controlnet {path.name} does not fit model {model.name!r} ({_family(model)}): "
                         f"{str(e).splitlines()[0]}") from e
    return module


def _conditioning_widths(state_dict: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The conditioning embedding's channel widths: conv_in's, then each second block's."""
    first = state_dict["controlnet_cond_embedding.conv_in.weight"].shape[0]
    blocks = sorted({int(key.split(".")[2]) for key in state_dict if key.startswith("controlnet_cond_embedding.blocks.")})
    outs = [state_dict[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0] for i in blocks[1::2]]
    return (first, *outs)


def _check_fits(name: str, module: Any, model: ModelBundle) -> None:
    if int(module.config.cross_attention_dim) != int(model.unet.config.cross_attention_dim):
        raise ModelError(_mismatch(name, int(module.config.cross_attention_dim), model))


def _mismatch(name: str, text_width: int, model: ModelBundle) -> str:
    return (f"controlnet {name!r} reads {text_width}-wide text features, but model {model.name!r} "
            f"({_family(model)}) gives {int(model.unet.config.cross_attention_dim)}: it is made for another "
            "model family")


def _family(model: ModelBundle) -> str:
    return {"sd15": "SD 1.x", "sd21": "SD 2.x", "sdxl": "SDXL"}.get(model.arch, model.arch)
