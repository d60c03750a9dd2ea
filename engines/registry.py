"""Find and load models, offline: the built-in test models, names from the user's models folders,
diffusers model folders and single-file checkpoints, and the autoencoder each one runs with.

Nothing is ever downloaded. A model name is `tiny` / `tiny-xl`, a name that engines.folders finds
among the checkpoints, or (from the config or the command line only, which the user controls) the
path of a diffusers folder or a weight file, or `random:<arch>`, a full-size architecture with random
weights for benchmarks. Names that arrive over the network never become paths, nor random models.
A folder that lacks a component, a pickle without --allow-pickle, a VAE for another latent space:
each is refused with a message that says what to do.

This module chooses; the formats are read by engines.checkpoints (single files, VAE and TAESD files)
and by diffusers / transformers (diffusers folders), and engines.random_models builds the random models.
"""
from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import random_models, tiny
from .autoencoder import Autoencoder
from .bundle import SD15, SD21, SDXL, TINY_ARCH, TINY_XL_ARCH, XL_ARCHS, ModelBundle, ModelError
from .folders import CHECKPOINTS, TAESD, VAE, Entry, ModelFolders
from .weights import WEIGHT_SUFFIXES, is_pickle, refuse_pickle

log = logging.getLogger(__name__)

TINY = TINY_ARCH
BUILT_IN = (TINY_ARCH, TINY_XL_ARCH)
REQUIRED_FOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
XL_FOLDERS = ("text_encoder_2", "tokenizer_2")
CONFIG_FILES = {"unet": "config.json", "text_encoder": "config.json", "text_encoder_2": "config.json",
                "scheduler": "scheduler_config.json"}
# TAESD is the real-time default; a full KL VAE is used only where no TAESD is found.
TAESD_FOLDERS = ("taesd", "tiny_vae")
# The /vae values that are not names: auto (TAESD if one is found, else the model's own VAE), the
# model's own full VAE, and TAESD or an error saying where to put it.
AUTO, OWN, TAESD_CHOICE = "auto", "model", "taesd"
VAE_CHOICES = (AUTO, OWN, TAESD_CHOICE)
# The KL VAE latent scaling each architecture was trained with: SD and SDXL VAEs have the same shapes,
# so this (or a name) is all that tells an SDXL VAE from an SD one.
_VAE_SCALING = {SD15: 0.18215, SD21: 0.18215, TINY_ARCH: 0.18215, SDXL: 0.13025, TINY_XL_ARCH: 0.13025}
_ARCH_NAMES = {SD15: "SD 1.x", SD21: "SD 2.x", SDXL: "SDXL", TINY_ARCH: "tiny", TINY_XL_ARCH: "tiny-xl"}
# The autoencoders that are their model's own full VAE. A bundle that holds another one (a TAESD) gets
# its own back by re-reading it from bundle.source, the folder or file it was loaded from.
_OWN_VAES: "weakref.WeakSet[Autoencoder]" = weakref.WeakSet()


@dataclass(frozen=True)
class _Found:
    name: str  # what the model is called: a built-in name, a folders name or the path's stem
    location: str  # the built-in name or an absolute path


# ============================================================================ finding

def resolve(name: str, folders: ModelFolders | None = None, *, from_network: bool = False,
            allow_pickle: bool = False) -> str:
    """Check that `name` can be loaded, without loading it; returns the built-in name or the absolute
    path. `from_network`: only built-in names and names in the folders, never a path."""
    return _find(name, folders, from_network=from_network, allow_pickle=allow_pickle).location


def _find(name: str, folders: ModelFolders | None, *, from_network: bool, allow_pickle: bool) -> _Found:
    if random_models.is_random(name):
        if from_network:  # a fader must not be able to allocate gigabytes of GPU memory for meaningless images
            raise ModelError(f"model {name!r} is refused over the network: random models are full-size benchmarks "
                             f"with random weights; start sdbridge with --model {name} to run one")
        random_models.arch_of(name)  # ModelError naming the random models
        return _Found(name, name)
    if name in BUILT_IN:
        return _Found(name, name)
    if not from_network:
        path = Path(name).expanduser()
        if path.exists():
            return _Found(path.stem if path.is_file() else path.name, _check_path(path, name, allow_pickle))
    if folders:
        entry = folders.entry(CHECKPOINTS, name)  # ModelError: not found, ambiguous, or unsafe
        return _Found(entry.name, _check_path(entry.path.resolve(), name, allow_pickle))
    if from_network:
        raise ModelError(f"model {name!r} not found: over the network a model is {' or '.join(BUILT_IN)} or a "
                         "name in the models folders, and no models folders are configured (--models-dir)")
    raise ModelError(f"model {name!r} not found: give `tiny` or the path of a diffusers model folder "
                     f"(with {', '.join(f + '/' for f in REQUIRED_FOLDERS)} and vae/ or taesd/) or of a "
                     ".safetensors checkpoint, or a model name with --models-dir DIR")


def _check_path(path: Path, name: str, allow_pickle: bool) -> str:
    if path.is_dir():
        _check_folder(path)
    elif is_pickle(path):
        refuse_pickle(path, allow_pickle=allow_pickle, label=f"model {name!r}")
    elif path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelError(f"model {name!r} is a {path.suffix or 'suffix-less'} file; expected a diffusers model "
                         f"folder or a checkpoint file ({', '.join(WEIGHT_SUFFIXES)})")
    return str(path.resolve())


def _check_folder(path: Path) -> None:
    """Refuse a diffusers folder that lacks a component, naming every missing one."""
    unet_config = _read_json(path / "unet" / "config.json")
    xl = unet_config.get("addition_embed_type") == "text_time" or any((path / f).is_dir() for f in XL_FOLDERS)
    required = REQUIRED_FOLDERS + (XL_FOLDERS if xl else ())
    missing = [f + "/" for f in required if not (path / f).is_dir()]
    missing += [f"{f}/{CONFIG_FILES[f]}" for f in required
                if (path / f).is_dir() and f in CONFIG_FILES and not (path / f / CONFIG_FILES[f]).is_file()]
    if not _autoencoder_folder(path):
        missing.append("vae/ or taesd/")
    if missing:
        raise ModelError(f"model folder {path} is missing {', '.join(missing)}; expected a diffusers model "
                         "folder (as saved by save_pretrained)")


def folder_arch(path: str | Path) -> str:
    """The architecture of a diffusers model folder, from its UNet config (nothing else is read)."""
    path = Path(path)
    config = _read_json(path / "unet" / "config.json")
    context = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time" or (path / "text_encoder_2").is_dir():
        return TINY_XL_ARCH if context == 2 * tiny.TEXT_HIDDEN else SDXL
    if context == 1024:
        return SD21
    return TINY_ARCH if context == tiny.TEXT_HIDDEN else SD15


def find_autoencoder(name: str, folders: ModelFolders | None) -> Entry:
    """The folders' VAE or TAESD called `name` (ModelError naming both lists if there is none)."""
    if not folders:
        raise ModelError(f"vae {name!r} not found: no models folders are configured (--models-dir); "
                         f"without them the choices are {', '.join(VAE_CHOICES)}")
    errors = []
    for kind in (VAE, TAESD):
        try:
            return folders.entry(kind, name)
        except ModelError as e:
            errors.append(str(e))
    raise ModelError("; ".join(errors) + f"; or one of {', '.join(VAE_CHOICES)}")


# ============================================================================ loading

def load(name: str, device: torch.device, dtype: torch.dtype, *, folders: ModelFolders | None = None,
         allow_pickle: bool = False, vae: str = AUTO) -> ModelBundle:
    """Load a model onto `device` in `dtype` with the autoencoder `vae` chooses (see load_autoencoder).
    Raises ModelError (PickleRefused for a pickle without allow_pickle) with an actionable message."""
    found = _find(name, folders, from_network=False, allow_pickle=allow_pickle)
    if random_models.is_random(found.location):
        bundle = random_models.build_bundle(random_models.arch_of(found.location), device, dtype,
                                            full_vae=vae == OWN)
        if vae not in VAE_CHOICES:
            bundle.autoencoder = load_autoencoder(vae, bundle, folders, device, dtype, allow_pickle=allow_pickle)
        return bundle
    if found.location in BUILT_IN:
        bundle = _built_in(found.location)
        if vae not in VAE_CHOICES:
            bundle.autoencoder = load_autoencoder(vae, bundle, folders, torch.device("cpu"), torch.float32,
                                                  allow_pickle=allow_pickle)
        return bundle.to(device, dtype)
    path = Path(found.location)
    if path.is_dir():
        arch = folder_arch(path)
        own = lambda: _own_folder_vae(path, device, dtype)  # noqa: E731
        autoencoder = _choose(vae, arch, str(path), folders, device, dtype, allow_pickle, own)
        bundle = _load_folder(path, device, dtype, arch, autoencoder)
    else:
        from . import checkpoints
        bundle = checkpoints.load_single_file(path, device, dtype, allow_pickle=allow_pickle)
        _OWN_VAES.add(bundle.autoencoder)
        if vae != OWN:
            bundle.autoencoder = load_autoencoder(vae, bundle, folders, device, dtype, allow_pickle=allow_pickle)
    bundle.name = found.name
    return bundle


def load_autoencoder(vae: str, model: ModelBundle, folders: ModelFolders | None, device: torch.device,
                     dtype: torch.dtype, *, allow_pickle: bool = False) -> Autoencoder:
    """The autoencoder `vae` names for `model`; the caller puts it into model.autoencoder.

    auto: a TAESD for the model's latent space if one is found (a diffusers model folder's own taesd/,
    else the folders' TAESD named taesd or taesdxl), else the model's own VAE. model: the model's own
    full VAE. taesd: a TAESD, or ModelError saying where to put one. Any other name: a VAE or TAESD from
    the folders. The built-in test models have one autoencoder, their TAESD, for auto / model / taesd; the
    random models get a random TAESD for auto / taesd and their architecture's full VAE, random, for model.
    """
    if model.source in BUILT_IN and vae in VAE_CHOICES:
        return _on(tiny.build_autoencoder(), device, dtype)
    if random_models.is_random(model.source) and vae in VAE_CHOICES:
        return random_models.build_autoencoder(model.arch, device, dtype, full=vae == OWN)
    own = lambda: _own_vae(model, device, dtype, allow_pickle)  # noqa: E731
    return _choose(vae, model.arch, model.source, folders, device, dtype, allow_pickle, own,
                   latent_channels=int(model.unet.config.out_channels))


def _choose(vae: str, arch: str, source: str, folders: ModelFolders | None, device: torch.device,
            dtype: torch.dtype, allow_pickle: bool, own: Callable[[], Autoencoder],
            latent_channels: int = 4) -> Autoencoder:
    if vae == OWN:
        return own()
    if vae in (AUTO, TAESD_CHOICE):
        taesd = _find_taesd(arch, source, folders, device, dtype, allow_pickle, quiet=vae == AUTO)
        if taesd is not None:
            return taesd
        if vae == TAESD_CHOICE:
            raise ModelError(_where_to_put_taesd(arch))
        log.info("no TAESD for this %s model: using its full VAE (slower). %s", _ARCH_NAMES.get(arch, arch),
                 _where_to_put_taesd(arch, short=True))
        return own()
    autoencoder = _named_autoencoder(vae, arch, folders, device, dtype, allow_pickle)
    if autoencoder.latent_channels != latent_channels:
        raise ModelError(f"vae {vae!r} makes {autoencoder.latent_channels}-channel latents; this model's UNet "
                         f"takes {latent_channels}")
    return autoencoder


def _named_autoencoder(name: str, arch: str, folders: ModelFolders | None, device: torch.device,
                       dtype: torch.dtype, allow_pickle: bool) -> Autoencoder:
    from . import checkpoints

    entry = find_autoencoder(name, folders)
    path = entry.path.resolve()
    model_xl = arch in XL_ARCHS
    if entry.kind == TAESD:
        if (checkpoints.taesd_arch(entry.name) == SDXL) != model_xl:
            raise ModelError(f"taesd {entry.name!r} is for {'SDXL' if not model_xl else 'SD 1.x / 2.x'} latents, "
                             f"but the model is {_ARCH_NAMES.get(arch, arch)}; use "
                             f"{'taesdxl' if model_xl else 'taesd'} (or vae auto)")
        return _load_taesd(path, arch, device, dtype, allow_pickle)
    if path.is_dir():
        scaling = _read_json(path / "config.json").get("scaling_factor")
        if scaling is not None and abs(float(scaling) - _VAE_SCALING.get(arch, scaling)) > 1e-4:
            raise ModelError(_vae_mismatch(entry.name, SDXL if abs(float(scaling) - 0.13025) < 1e-4 else SD15, arch))
        try:
            module = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"could not load vae folder {path}: {e}") from e
    else:
        if "xl" in entry.stem.lower() and not model_xl:
            raise ModelError(_vae_mismatch(entry.name, SDXL, arch))
        module = checkpoints.load_vae_file(path, device, dtype, arch=arch, allow_pickle=allow_pickle)
    return _on(module, device, dtype)


def _vae_mismatch(name: str, vae_arch: str, arch: str) -> str:
    return (f"vae {name!r} is an {_ARCH_NAMES[vae_arch]} VAE (latent scaling {_VAE_SCALING[vae_arch]}), but the "
            f"model is {_ARCH_NAMES.get(arch, arch)} (scaling {_VAE_SCALING.get(arch, '?')}): its images would "
            "come out wrong. Choose a VAE made for this model, or vae auto / model")


def _find_taesd(arch: str, source: str, folders: ModelFolders | None, device: torch.device, dtype: torch.dtype,
                allow_pickle: bool, *, quiet: bool) -> Autoencoder | None:
    """A TAESD for `arch`'s latent space: the diffusers model folder's own, else the folders' one named
    taesd (SD 1.x / 2.x) or taesdxl (SDXL). None if there is none (or, when quiet, none that loads
    without --allow-pickle)."""
    folder = Path(source)
    if source and source not in BUILT_IN and folder.is_dir():
        for name in TAESD_FOLDERS:
            if (folder / name / "config.json").is_file():
                return _load_taesd(folder / name, arch, device, dtype, allow_pickle)
    if not folders:
        return None
    wanted = "taesdxl" if arch in XL_ARCHS else "taesd"
    candidates = [e for e in folders.list(TAESD) if e.stem.lower() == wanted]
    candidates.sort(key=lambda e: (e.pickle, e.name != wanted, e.name))
    for entry in candidates:
        if entry.pickle and not allow_pickle and quiet:
            log.warning("TAESD %s is a pickle (%s): not used without --allow-pickle; a .safetensors version of "
                        "it would be", entry.name, entry.path)
            continue
        return _load_taesd(entry.path.resolve(), arch, device, dtype, allow_pickle)
    return None


def _load_taesd(path: Path, arch: str, device: torch.device, dtype: torch.dtype, allow_pickle: bool) -> Autoencoder:
    if path.is_dir():
        try:
            module = AutoencoderTiny.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"could not load TAESD folder {path}: {e}") from e
    else:
        from . import checkpoints
        module = checkpoints.load_taesd(path, device, dtype, arch=arch, allow_pickle=allow_pickle)
    return _on(module, device, dtype)


def _where_to_put_taesd(arch: str, short: bool = False) -> str:
    name = "taesdxl" if arch in XL_ARCHS else "taesd"
    where = (f"put {name}_encoder.safetensors and {name}_decoder.safetensors (github.com/madebyollin/taesd), or "
             f"the diffusers folder madebyollin/{name}, in models/VAE-approx (A1111) or models/vae_approx "
             "(ComfyUI) under a --models-dir folder, or a taesd/ folder inside a diffusers model folder")
    if short:
        return "For TAESD: " + where
    return f"no TAESD found for this {_ARCH_NAMES.get(arch, arch)} model: {where}"


def _own_vae(model: ModelBundle, device: torch.device, dtype: torch.dtype, allow_pickle: bool) -> Autoencoder:
    """The model's own full VAE: the one it holds, or re-read from where the model came from."""
    if model.autoencoder in _OWN_VAES:
        return model.autoencoder
    source = Path(model.source) if model.source and model.source not in BUILT_IN else None
    if source is not None and source.is_dir():
        return _own_folder_vae(source, device, dtype)
    if source is not None and source.is_file():
        from . import checkpoints
        module = checkpoints.load_vae_file(source, device, dtype, arch=model.arch, allow_pickle=allow_pickle)
        autoencoder = _on(module, device, dtype)
        _OWN_VAES.add(autoencoder)
        return autoencoder
    raise ModelError(f"model {model.name!r} has no full VAE of its own to switch to; use vae auto or taesd")


def _own_folder_vae(path: Path, device: torch.device, dtype: torch.dtype) -> Autoencoder:
    ae_folder = _autoencoder_folder(path, taesd=False)
    if ae_folder is None:
        raise ModelError(f"model folder {path} has no vae/ folder: it has no full VAE of its own; use vae auto, "
                         "taesd or a VAE from the models folders")
    try:
        module = AutoencoderKL.from_pretrained(path, subfolder=ae_folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load the VAE of model folder {path}: {e}") from e
    autoencoder = _on(module, device, dtype)
    _OWN_VAES.add(autoencoder)
    return autoencoder


def _on(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Autoencoder:
    module.to(device)
    if module.dtype != dtype:  # diffusers warns about any dtype cast, even a no-op one
        module.to(dtype=dtype)
    module.requires_grad_(False)
    return Autoencoder(module.eval())


def _built_in(name: str) -> ModelBundle:
    if hasattr(tiny, "build_bundle"):
        return tiny.build_bundle(name)
    return ModelBundle(name=TINY, unet=tiny.build_unet(), autoencoder=Autoencoder(tiny.build_autoencoder()),
                       text_encoder=tiny.build_text_encoder(), tokenizer=tiny.build_tokenizer(),
                       scheduler=tiny.build_scheduler(), test_model=True, arch=TINY_ARCH, source=TINY)


def _load_folder(path: Path, device: torch.device, dtype: torch.dtype, arch: str,
                 autoencoder: Autoencoder) -> ModelBundle:
    common: dict[str, Any] = {"local_files_only": True, "torch_dtype": dtype}
    xl = arch in XL_ARCHS
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        text_encoder_2 = (CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **common)
                          if xl else None)
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True) if xl else None
        scheduler = LCMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load model folder {path}: {e}") from e
    return ModelBundle(name=path.name, unet=unet, autoencoder=autoencoder, text_encoder=text_encoder,
                       tokenizer=tokenizer, scheduler=scheduler, arch=arch, text_encoder_2=text_encoder_2,
                       tokenizer_2=tokenizer_2, source=str(path)).to(device, dtype)


def _autoencoder_folder(path: Path, taesd: bool = True) -> str | None:
    for folder in (*(TAESD_FOLDERS if taesd else ()), "vae"):
        if (path / folder / "config.json").is_file():
            return folder
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ============================================================================ devices

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
