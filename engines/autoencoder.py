"""Images to latents and back, for either autoencoder a model may bring.

TAESD (diffusers' AutoencoderTiny) is the real-time default; the full KL VAE is the quality option.
Both take and give images in [-1, 1] and latents already multiplied by the model's scaling factor,
so the stream pipeline never asks which one it has.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny


class Autoencoder:
    """A uniform face on AutoencoderTiny (TAESD) or AutoencoderKL."""

    def __init__(self, module: AutoencoderTiny | AutoencoderKL):
        self.module = module
        self.tiny = isinstance(module, AutoencoderTiny)
        self.scaling_factor = float(module.config.scaling_factor)
        self.latent_channels = int(module.config.latent_channels)
        self.spatial_factor = 2 ** (len(module.config.encoder_block_out_channels if self.tiny
                                        else module.config.block_out_channels) - 1)
        # SDXL's original VAE overflows in float16 (its config says force_upcast): run it in float32
        self.upcast = not self.tiny and bool(getattr(module.config, "force_upcast", False))

    @property
    def name(self) -> str:
        return "taesd" if self.tiny else "vae"

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] to scaled latents (B, C, H/f, W/f)."""
        dtype = image.dtype
        image = self._prepare(image)
        if self.tiny:
            latents = self.module.encode(image).latents
        else:
            latents = self.module.encode(image).latent_dist.mean  # the mean: the same frame gives the same latent
        return (latents * self.scaling_factor).to(dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to (B, 3, H, W) in about [-1, 1]."""
        dtype = latents.dtype
        return self.module.decode(self._prepare(latents / self.scaling_factor)).sample.to(dtype)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast and x.dtype != torch.float32:
            if self.module.dtype != torch.float32:
                self.module.to(torch.float32)
            return x.float()
        return x
