"""What a loaded model is: the components the stream pipeline runs, whatever file they came from.

Loaders (engines/registry, engines/checkpoints, engines/tiny) produce a `ModelBundle`; the stream,
prompt and LoRA code consume one. This module knows nothing of files or formats.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .autoencoder import Autoencoder


class ModelError(Exception):
    """A model that cannot be found or loaded; the message says what to do about it."""


# Architectures, as detected from the weights. "tiny" and "tiny-xl" are the built-in test models.
SD15, SD21, SDXL, TINY_ARCH, TINY_XL_ARCH = "sd15", "sd21", "sdxl", "tiny", "tiny-xl"
XL_ARCHS = (SDXL, TINY_XL_ARCH)


@dataclass
class ModelBundle:
    """Everything the stream pipeline needs of one model, on one device.

    SDXL-style models have a second text encoder (with projection: its pooled output conditions the
    UNet) and tokenizer; SD 1.x / 2.x models leave those None.
    """

    name: str
    unet: Any  # diffusers UNet2DConditionModel
    autoencoder: Autoencoder
    text_encoder: Any  # transformers CLIPTextModel (or CLIPTextModelWithProjection)
    tokenizer: Any  # transformers CLIPTokenizer
    scheduler: Any  # diffusers LCMScheduler (only its config and alphas_cumprod are used)
    test_model: bool = False  # True: random or toy weights, images mean nothing
    arch: str = SD15
    text_encoder_2: Any = None  # transformers CLIPTextModelWithProjection, SDXL only
    tokenizer_2: Any = None
    source: str = ""  # where it was loaded from: a path, or the built-in name

    @property
    def xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    def to(self, device: torch.device, dtype: torch.dtype) -> "ModelBundle":
        for module in (self.unet, self.autoencoder.module, *self.text_encoders):
            module.to(device)
            if module.dtype != dtype:  # diffusers warns about any dtype cast, even a no-op one
                module.to(dtype=dtype)
            module.requires_grad_(False)
        return self
