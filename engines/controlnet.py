"""ControlNets by name: the built-in `tiny` one, diffusers folders, and single `.safetensors` files
from the A1111 / ComfyUI ControlNet folders, checked against the model they steer. A single file may be
in diffusers' layout or in the original (ldm / A1111) one most downloads use, with or without the
`control_model.` prefix; the latter is converted offline by diffusers' own converter, its architecture
taken from the model's UNet (a ControlNet copies the UNet's encoder) and its conditioning embedding's
widths from the weights. Control-LoRAs and "difference" ControlNets are refused with the reason.

How a ControlNet steers a frame is engines/stream.py's business (`Stream.set_controlnets`); this module
only finds and loads them, offline, through engines.weights (pickles refused by default).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import random_models, tiny
from .bundle import TINY_ARCH, TINY_XL_ARCH, ModelBundle, ModelError
from .folders import CONTROLNET, ModelFolders
from .weights import read_state_dict

log = logging.getLogger(__name__)

BUILT_IN = "tiny"  # the tiny model's ControlNet (tiny-xl's for the tiny-xl model)
RANDOM = "random"  # a full-size ControlNet with random weights, for the random:<arch> models (benchmarks)
# Keys of a ControlNet in the original (ldm / A1111) layout, under LDM_PREFIX or bare
LDM_PREFIX = "control_model."
_LDM_MARKERS = (LDM_PREFIX, "input_blocks.0.0.weight", "zero_convs.", "input_hint_block.", "middle_block_out.")


def resolve(name: str, folders: ModelFolders | None) -> Path | None:
    """Where the ControlNet `name` is: its path, or None for the built-in ones; ModelError when it is not
    found (so a typo fails when the daemon starts, not when the model loads)."""
    if name in (BUILT_IN, RANDOM):
        return None
    path = Path(name)
    if path.exists():
        return path
    if folders is None:
        raise ModelError(f"controlnet {name!r} not found: no models folders are configured (--models-dir)")
    return folders.find(CONTROLNET, name)


def load(name: str, model: ModelBundle, folders: ModelFolders | None, device: torch.device, dtype: torch.dtype,
         *, allow_pickle: bool = False) -> Any:
    """The ControlNet `name` (a name in the ControlNet folders, a path, `tiny` or `random`) for `model`, on
    `device` in `dtype`. ModelError says what is wrong: not found, not a ControlNet, made for another
    model family, or a layout that cannot be read offline."""
    if name == BUILT_IN:
        if model.arch not in (TINY_ARCH, TINY_XL_ARCH):
            raise ModelError("controlnet 'tiny' is for the built-in tiny models only")
        module = tiny.build_controlnet(xl=model.arch == TINY_XL_ARCH)
    elif name == RANDOM:
        if not random_models.is_random(model.name):
            raise ModelError("controlnet 'random' is for the random:<arch> benchmark models only")
        module = random_models.build_controlnet(model, device, dtype)
    else:
        path = resolve(name, folders)
        module = _from_folder(path, dtype) if path.is_dir() else _from_file(path, model, allow_pickle)
    _check_fits(name, module, model)
    module.to(device)
    if module.dtype != dtype:  # diffusers warns about any dtype cast, even a no-op one
        module.to(dtype=dtype)
    return module.eval().requires_grad_(False)


def load_each(names: Sequence[str], model: ModelBundle, folders: ModelFolders | None, device: torch.device,
              dtype: torch.dtype, *, allow_pickle: bool = False,
              report: Callable[[str], None] = log.warning) -> list[Any]:
    """The ControlNets `names` (index k) for `model`; one that cannot steer it (made for another model
    family, a file gone since) is reported and None, and the stream runs without it."""
    loaded: list[Any] = []
    for k, name in enumerate(names):
        try:
            loaded.append(load(name, model, folders, device, dtype, allow_pickle=allow_pickle))
        except ModelError as e:
            report(f"controlnet {k} ({name}) not used with model {model.name!r}: {e}")
            loaded.append(None)
    return loaded


def _from_folder(path: Path, dtype: torch.dtype) -> Any:
    from diffusers import ControlNetModel
    try:
        return ControlNetModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load controlnet folder {path}: {e}") from e


def _from_file(path: Path, model: ModelBundle, allow_pickle: bool) -> Any:
    """A single file in diffusers' layout or the original one (converted): the architecture is the
    model's UNet's (a ControlNet copies its encoder), with the conditioning embedding's widths and input
    channels read from the weights."""
    from diffusers import ControlNetModel

    state_dict = read_state_dict(path, allow_pickle=allow_pickle)
    if "lora_controlnet" in state_dict:
        raise ModelError(f"controlnet {path.name} is a Control-LoRA (low-rank ControlNet weights), which sdbridge "
                         "does not read; use a full ControlNet")
    if "difference" in state_dict:
        raise ModelError(f"controlnet {path.name} is a 'difference' ControlNet (weights relative to a base model), "
                         "which sdbridge does not read; use the full version of it")
    original = any(key.startswith(_LDM_MARKERS) for key in state_dict)
    if original:
        state_dict = _strip_prefix(state_dict)
    cond = "input_hint_block." if original else "controlnet_cond_embedding."
    if not any(key.startswith(cond) for key in state_dict):
        raise ModelError(f"{path.name} is not a ControlNet (no {cond.rstrip('.')} weights)")
    text_width = next((int(v.shape[1]) for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")), None)
    if text_width is not None and text_width != int(model.unet.config.cross_attention_dim):
        raise ModelError(_mismatch(path.name, text_width, model))
    if original:
        state_dict = _convert_original(path.name, state_dict, model)
    try:
        widths = _conditioning_widths(state_dict)
        channels = int(state_dict["controlnet_cond_embedding.conv_in.weight"].shape[1])
    except (KeyError, IndexError) as e:
        raise ModelError(f"controlnet {path.name} has an incomplete conditioning embedding (no {e})") from e
    with torch.device("meta"):  # the weights come from the file
        module = ControlNetModel.from_unet(model.unet, conditioning_embedding_out_channels=widths,
                                           conditioning_channels=channels, load_weights_from_unet=False)
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelError(f"controlnet {path.name} does not fit model {model.name!r} ({_family(model)}): "
                         f"{str(e).splitlines()[0]}") from e
    return module


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout ControlNet's own weights, bare: those under `control_model.` where there are any
    (ControlNet 1.0 files also hold the whole SD model beside them), else all of them."""
    if not any(key.startswith(LDM_PREFIX) for key in state_dict):
        return state_dict
    return {key[len(LDM_PREFIX):]: value for key, value in state_dict.items() if key.startswith(LDM_PREFIX)}


def _convert_original(name: str, state_dict: dict[str, torch.Tensor], model: ModelBundle) -> dict[str, torch.Tensor]:
    """Bare original-layout ControlNet weights under diffusers' names, by diffusers' converter, which needs
    only the UNet's layers_per_block. It leaves out the added embedding (SDXL's label_emb), which is
    mapped here from diffusers' own table, and a weight it does not know about, which is refused here
    (the converter would drop it silently)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    config = model.unet.config
    try:
        converted = convert_controlnet_checkpoint(state_dict, {"layers_per_block": config.layers_per_block})
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        raise ModelError(f"controlnet {name} (original layout) could not be converted for model {model.name!r} "
                         f"({_family(model)}): {type(e).__name__}: {e}") from e
    tables = DIFFUSERS_TO_LDM_MAPPING["controlnet"]
    for kind in ("class_embed_type", "addition_embed_type"):
        if getattr(config, kind, None) is not None:
            for new, old in tables[kind].items():
                if new not in converted and old in state_dict:
                    converted[new] = state_dict[old]
    converted = {k: v for k, v in converted.items() if v is not None}  # the converter .get()s missing weights
    used = {id(v) for v in converted.values()}
    unused = sorted(k for k, v in state_dict.items() if id(v) not in used)
    if unused:
        raise ModelError(f"controlnet {name} (original layout) does not fit model {model.name!r} ({_family(model)}): "
                         f"{len(unused)} of its weights have no place in it, e.g. {', '.join(unused[:3])}")
    return converted


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
