"""Pixels in any client format to model images and back, on the device.

Clients send uint8, uint16, float16 or float32 frames with 1, 3 or 4 channels in RGB or BGR order,
top-left or bottom-left origin, at any size. All conversion (dtype, channels, order, flip, resize)
happens on the compute device after one upload, and the output format is made on the device before
one download. The protocol's flag bits are the caller's business: here they are plain booleans.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Rec. 709 luma, for single-channel output.
_LUMA = (0.2126, 0.7152, 0.0722)
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


@dataclass(frozen=True)
class OutputFormat:
    """How output pixels are laid out for the client."""

    dtype: np.dtype = np.dtype(np.uint8)
    channels: int = 4
    bgr: bool = False
    bottom_left: bool = False


def to_model_image(pixels: np.ndarray, *, bgr: bool, bottom_left: bool, width: int, height: int,
                   device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W, C) client pixels to a (1, 3, height, width) image in [-1, 1] on `device`."""
    raw = torch.from_numpy(pixels).to(device, non_blocking=True)
    image = raw.to(torch.float32)
    scale = _SCALE.get(pixels.dtype)
    if scale is not None:
        image = image / scale
    channels = image.shape[2]
    if channels == 1:
        image = image.expand(-1, -1, 3)
    elif channels == 4:
        image = image[:, :, :3]
    if bgr:
        image = image.flip(2)
    if bottom_left:
        image = image.flip(0)
    image = image.permute(2, 0, 1).unsqueeze(0)
    if image.shape[2:] != (height, width):
        downscale = image.shape[2] > height or image.shape[3] > width
        image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False,
                              antialias=downscale)
    image = torch.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
    return (image * 2.0 - 1.0).to(dtype)


def to_client_pixels(image: torch.Tensor, fmt: OutputFormat) -> np.ndarray:
    """A (1, 3, H, W) image in [0, 1] to contiguous (H, W, channels) client pixels on the host."""
    image = torch.nan_to_num(image[0].to(torch.float32), nan=0.0).clamp(0.0, 1.0)
    if fmt.channels == 1:
        luma = torch.tensor(_LUMA, device=image.device).view(3, 1, 1)
        image = (image * luma).sum(0, keepdim=True)
    if fmt.bgr and fmt.channels != 1:
        image = image.flip(0)
    if fmt.channels == 4:
        image = torch.cat([image, torch.ones_like(image[:1])], 0)
    if fmt.bottom_left:
        image = image.flip(1)
    image = image.permute(1, 2, 0)
    scale = _SCALE.get(fmt.dtype)
    if scale is not None:
        image = (image * scale).round_().to(torch.int32 if fmt.dtype == np.uint16 else torch.uint8)
    elif fmt.dtype == np.float16:
        image = image.to(torch.float16)
    out = image.contiguous().cpu().numpy()
    return out.astype(fmt.dtype, copy=False)
