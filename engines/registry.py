"""Find and load models, offline: the built-in `tiny` model and diffusers-format folders.

Nothing is ever downloaded: a name is either `tiny` or a folder on disk, and a folder that lacks a
component is refused with a message that names what is missing.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from . import tiny
from .autoencoder import Autoencoder
from .bundle import TINY_ARCH, ModelBundle, ModelError

log = logging.getLogger(__name__)

TINY = "tiny"
REQUIRED_FOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
CONFIG_FILES = {"unet": "config.json", "text_encoder": "config.json", "scheduler": "scheduler_config.json"}
# TAESD is the real-time default; a full KL VAE is used only where no TAESD is found.
TAESD_FOLDERS = ("taesd", "tiny_vae")


def resolve(name: str) -> str:
    """Check that `name` can be loaded without loading it; returns the name or the absolute folder."""
    if name == TINY:
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"model {name!r} not found: give `tiny` or the path of a diffusers model folder "
                         f"(with {', '.join(f + '/' for f in REQUIRED_FOLDERS)} and vae/ or taesd/)")
    if not path.is_dir():
        raise ModelError(f"model {name!r} is a file; single-file checkpoints are not supported yet: "
                         "give a diffusers model folder")
    missing = [f + "/" for f in REQUIRED_FOLDERS if not (path / f).is_dir()]
    missing += [f"{f}/{CONFIG_FILES[f]}" for f in REQUIRED_FOLDERS
                if (path / f).is_dir() and f in CONFIG_FILES and not (path / f / CONFIG_FILES[f]).is_file()]
    if not _autoencoder_folder(path):
        missing.append("vae/ or taesd/")
    if missing:
        raise ModelError(f"model folder {path} is missing {', '.join(missing)}; expected a diffusers model "
                         "folder (as saved by save_pretrained)")
    unet_config = _read_json(path / "unet" / "config.json")
    if unet_config.get("addition_embed_type") == "text_time" or (path / "text_encoder_2").is_dir():
        raise ModelError(f"model folder {path} is an SDXL model; SDXL is not supported yet "
                         "(SD 1.x, SD 2.x and sd-turbo are)")
    return str(path.resolve())


def load(name: str, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """Load a model onto `device` in `dtype` (raises ModelError with an actionable message)."""
    resolved = resolve(name)
    if resolved == TINY:
        bundle = ModelBundle(
            name=TINY, unet=tiny.build_unet(), autoencoder=Autoencoder(tiny.build_autoencoder()),
            text_encoder=tiny.build_text_encoder(), tokenizer=tiny.build_tokenizer(),
            scheduler=tiny.build_scheduler(), test_model=True, arch=TINY_ARCH, source=TINY,
        )
        return bundle.to(device, dtype)
    return _load_folder(Path(resolved), device, dtype)


def _load_folder(path: Path, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    common: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        scheduler = LCMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        ae_folder = _autoencoder_folder(path)
        if ae_folder in TAESD_FOLDERS:
            ae = AutoencoderTiny.from_pretrained(path, subfolder=ae_folder, **common)
        else:
            log.info("no taesd/ folder in %s: using the full VAE (slower; put TAESD weights in %s)",
                     path, path / "taesd")
            ae = AutoencoderKL.from_pretrained(path, subfolder=ae_folder, **common)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load model folder {path}: {e}") from e
    return ModelBundle(name=path.name, unet=unet, autoencoder=Autoencoder(ae), text_encoder=text_encoder,
                       tokenizer=tokenizer, scheduler=scheduler).to(device, dtype)


def _autoencoder_folder(path: Path) -> str | None:
    for folder in (*TAESD_FOLDERS, "vae"):
        if (path / folder / "config.json").is_file():
            return folder
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def pick_device(name: str) -> torch.device:
    """`auto` is the first CUDA GPU if torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} asked for, but this torch build sees no CUDA GPU "
                         f"(torch {torch.__version__}); install torch with CUDA or use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA and float32 elsewhere (CPU half precision is slow and inexact)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
