"""The TensorRT backend: the UNet, the autoencoder and ControlNets as TensorRT engines, built once per
model, resolution and GPU, cached, and run on torch's CUDA stream behind the same stream as torch.

    export.py    models to ONNX graphs (and which ONNX weights are which torch weights)
    cache.py     the engine key and the cache folder
    build.py     `sdbridge build`: export, clean, build, resumable, with progress
    runtime.py   engines at run time: buffers, shared activation memory, LoRA refit, the stream's wrappers

The export half needs only torch and onnx and is tested on any CPU against onnxruntime; the engine half
needs the `tensorrt` package and an NVIDIA GPU. This module says whether TensorRT is usable here and,
when it is not, how to install it.
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch

TENSORRT_PACKAGES = {12: "tensorrt-cu12", 13: "tensorrt-cu13"}
# 10.2: weights marked refittable one by one (REFIT_INDIVIDUAL, mark_weights_refittable), which LoRA refit
# uses; 10.1 brought the memory calls the runtime uses (set_device_memory, *_size_v2).
MINIMUM_VERSION = (10, 2)


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot run here; the message says why and how to install it."""


def installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def load() -> Any:
    """The tensorrt module, or TensorRTUnavailable saying how to install it for this CUDA."""
    if not installed():
        raise TensorRTUnavailable(f"TensorRT is not installed. {install_hint()}")
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # the package is there but its libraries are not
        raise TensorRTUnavailable(f"TensorRT is installed but does not load ({e}). {install_hint()}") from e
    version = tuple(int(part) for part in str(tensorrt.__version__).split(".")[:2])
    if version < MINIMUM_VERSION:
        raise TensorRTUnavailable(f"TensorRT {tensorrt.__version__} is too old: sdbridge needs "
                                  f"{'.'.join(map(str, MINIMUM_VERSION))} or later. {install_hint()}")
    return tensorrt


def install_hint() -> str:
    """How to install TensorRT for the CUDA this torch was built with."""
    cuda = torch.version.cuda
    if cuda is None:
        return ("This torch has no CUDA: TensorRT needs an NVIDIA GPU and a CUDA build of torch "
                "(pytorch.org, 'Get started'); then pip install \"sdbridge[tensorrt]\".")
    major = int(cuda.split(".")[0])
    package = TENSORRT_PACKAGES.get(major)
    if package is None:
        return f"This torch uses CUDA {cuda}, for which no TensorRT wheel is known; see docs/tensorrt.md."
    return (f"This torch uses CUDA {cuda}: pip install {package} onnx onnx-graphsurgeon polygraphy "
            "(or pip install \"sdbridge[tensorrt]\" for CUDA 12). See docs/tensorrt.md.")


def unusable_reason(device: torch.device) -> str | None:
    """Why TensorRT cannot serve on `device` (None: it can)."""
    if device.type != "cuda":
        return f"TensorRT needs an NVIDIA GPU; the device is {device}"
    try:
        load()
    except TensorRTUnavailable as e:
        return str(e)
    return None
