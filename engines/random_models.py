"""The `random:<arch>` models: full-size SD 1.5, SD 2.1 (sd-turbo's architecture: SD 2.x UNet, OpenCLIP-H
text encoder, 512x512) and SDXL with random weights, so that benchmarks measure the real architectures'
cost on machines where no weights exist. Their images mean nothing.

Owns: the names (random:sd15, random:sd21, random:sdxl), and building their components from the configs
shipped in configs/models exactly as engines/checkpoints builds a single-file checkpoint's, with weights
drawn from fixed seeds. Each component is built on the meta device (shapes only), allocated once on the
target device in the target dtype and filled there, so that SDXL takes seconds on a GPU and never needs a
float32 copy on the CPU. The same architecture gives the same weights on the same device.

Whether a name is allowed (never from the network) and which autoencoder a model gets is
engines/registry's choice; this module only builds.
"""
from __future__ import annotations

import logging
import math
import time
import zlib

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from . import checkpoints
from .autoencoder import Autoencoder
from .bundle import SD15, SD21, SDXL, XL_ARCHS, ModelBundle, ModelError

log = logging.getLogger(__name__)

PREFIX = "random:"
ARCHS = (SD15, SD21, SDXL)
NAMES = tuple(PREFIX + arch for arch in ARCHS)
# What each architecture's real model predicts, so that a random model takes its real counterpart's path
# through the scheduler. SD 1.5 and SDXL base predict noise. random:sd21 stands for sd-turbo, the SD 2.x
# model people stream with, which predicts noise too (unlike SD 2.1 768, whose shipped scheduler config
# says v_prediction).
PREDICTION_TYPES = {SD15: checkpoints.EPSILON, SD21: checkpoints.EPSILON, SDXL: checkpoints.EPSILON}
# CLIP's own initializer_range: token and position embeddings small, as in a trained CLIP.
EMBEDDING_STD = 0.02


def is_random(name: str) -> bool:
    """True for a name that asks for a random model (a known architecture or not)."""
    return name.startswith(PREFIX)


def arch_of(name: str) -> str:
    """SD15, SD21 or SDXL for random:sd15, random:sd21, random:sdxl; ModelError naming them otherwise."""
    arch = name[len(PREFIX):] if is_random(name) else ""
    if arch not in ARCHS:
        raise ModelError(f"no random model {name!r}; the random models are {', '.join(NAMES)}")
    return arch


def build_bundle(arch: str, device: torch.device, dtype: torch.dtype, *, full_vae: bool = False) -> ModelBundle:
    """The random `arch` model on `device` in `dtype`, named random:<arch> and marked test_model, with a
    random TAESD (TAESDXL for SDXL), or its full KL VAE when `full_vae`."""
    started = time.monotonic()
    modules = empty_components(arch)
    del modules["vae"]  # build_autoencoder makes the one asked for
    modules = {name: _materialise(module, device, dtype, _seed(arch, name)) for name, module in modules.items()}
    autoencoder = build_autoencoder(arch, device, dtype, full=full_vae)
    xl = arch in XL_ARCHS
    bundle = ModelBundle(
        name=PREFIX + arch, arch=arch, source=PREFIX + arch, test_model=True,
        unet=modules["unet"], autoencoder=autoencoder,
        text_encoder=modules["text_encoder"], tokenizer=checkpoints._tokenizer(arch, "tokenizer"),
        text_encoder_2=modules.get("text_encoder_2"),
        tokenizer_2=checkpoints._tokenizer(arch, "tokenizer_2") if xl else None,
        scheduler=checkpoints._scheduler(arch, PREDICTION_TYPES[arch]),
    )
    modules_built = (bundle.unet, autoencoder.module, *bundle.text_encoders)
    parameters = sum(p.numel() for m in modules_built for p in m.parameters())
    log.info("built %s%s (%.2f G parameters, random weights) on %s in %.1f s", PREFIX, arch, parameters / 1e9,
             device, time.monotonic() - started)
    return bundle


def build_autoencoder(arch: str, device: torch.device, dtype: torch.dtype, *, full: bool = False) -> Autoencoder:
    """A random TAESD for `arch`'s latents (AutoencoderTiny; for SDXL it stands for TAESDXL), or with `full`
    the arch's full AutoencoderKL from its shipped config, on `device` in `dtype`."""
    _check_arch(arch)
    with torch.device("meta"):
        # TAESD and TAESDXL share one architecture and config (madebyollin/taesd and taesdxl both publish
        # diffusers' defaults: scaling_factor 1.0, latent_magnitude 3, latent_shift 0.5); only their trained
        # weights differ, which here are random anyway.
        module = AutoencoderKL.from_config(checkpoints._vae_config(arch)) if full else AutoencoderTiny()
    return Autoencoder(_materialise(module, device, dtype, _seed(arch, "vae" if full else "taesd")))


def build_controlnet(model: ModelBundle, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random ControlNet for a random model: the full-size architecture a real ControlNet of its family
    has (a copy of its UNet's encoder, diffusers' default conditioning embedding), for benchmarks."""
    from diffusers import ControlNetModel

    _check_arch(model.arch)
    with torch.device("meta"):
        module = ControlNetModel.from_unet(model.unet, load_weights_from_unet=False)
    return _materialise(module, device, dtype, _seed(model.arch, "controlnet"))


def empty_components(arch: str) -> dict[str, torch.nn.Module]:
    """The components of `arch` on the meta device (structure and shapes, no memory): "unet", "vae" (the
    full AutoencoderKL), "text_encoder" and, for SDXL, "text_encoder_2"."""
    _check_arch(arch)
    # The context puts buffers on the meta device too (checkpoints' own empty build keeps them real), so
    # nothing is allocated, whether or not accelerate is installed; randomise fills the buffers.
    with torch.device("meta"):
        return checkpoints._empty_modules(arch)


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter and buffer of `module` in place, deterministically from `seed`, on the device
    they are on: Linear and Conv2d weights ~ N(0, 1/fan_in) (LeCun normal: each layer keeps its input's
    spread, so activations stay O(1) and float16 stays finite), biases 0, GroupNorm / LayerNorm weights 1
    and biases 0, embeddings ~ N(0, 0.02), CLIP's position ids 0, 1, 2 ...

    A parameter or buffer of any other kind is a ModelError: a newer diffusers or transformers added a
    layer this module does not know how to fill, and garbage weights would make benchmarks lie."""
    tensors = [*module.parameters(), *module.buffers()]
    if not tensors:
        return
    generator = _generator(tensors[0].device, seed)
    for owner_name, owner in module.named_modules():
        for name, param in owner.named_parameters(recurse=False):
            if isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                param.fill_(1.0 if name == "weight" else 0.0)
            elif isinstance(owner, torch.nn.Embedding):
                _normal(param, EMBEDDING_STD, generator)
            elif isinstance(owner, (torch.nn.Linear, torch.nn.Conv2d)) and name in ("weight", "bias"):
                if name == "bias":
                    param.zero_()
                else:
                    _normal(param, 1.0 / math.sqrt(param[0].numel()), generator)  # fan_in: one output's inputs
            else:
                raise ModelError(_unknown("parameter", owner_name, owner, name))
        for name, buffer in owner.named_buffers(recurse=False):
            if name == "position_ids":  # CLIP's token positions, which to_empty left as whatever was in memory
                buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))
            else:
                raise ModelError(_unknown("buffer", owner_name, owner, name))


def _materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """Allocate a meta-device `module` on `device` in `dtype` (once, uninitialised) and randomise it."""
    # torch's own Module.to: on the meta device it only records the dtype to_empty allocates (floating point
    # tensors only; position ids stay int64). diffusers' override would warn about casting.
    torch.nn.Module.to(module, dtype=dtype)
    module.to_empty(device=device)
    randomise(module, seed)
    return module.eval().requires_grad_(False)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:  # a device without a generator of its own: draw on the CPU and copy over
        generator = torch.Generator()
    return generator.manual_seed(seed)


def _normal(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    if generator.device.type == tensor.device.type:
        tensor.normal_(0.0, std, generator=generator)
    else:
        tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype).normal_(0.0, std, generator=generator))


def _seed(arch: str, component: str) -> int:
    """A fixed seed per component (crc32, not hash(): the same in every process), so that each component's
    weights are the same whichever others are built with it."""
    return zlib.crc32(f"{PREFIX}{arch}/{component}".encode())


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ModelError(f"no random model for architecture {arch!r}; the random models are {', '.join(NAMES)}")


def _unknown(kind: str, owner_name: str, owner: torch.nn.Module, name: str) -> str:
    return (f"random weights: no rule for the {kind} {owner_name}.{name} of a {type(owner).__name__} (a diffusers "
            "or transformers version newer than this sdbridge knows?); random:<arch> models need sdbridge updated")
