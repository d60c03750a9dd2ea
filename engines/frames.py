"""Pixels in any client format to model images and back, on the device.

Clients send uint8, uint16, float16 or float32 frames with 1, 3 or 4 channels in RGB or BGR order,
top-left or bottom-left origin, at any size. All conversion (dtype, channels, order, flip, resize)
happens on the compute device after one upload, and the output format is made on the device before
one download. The protocol's flag bits are the caller's business: here they are plain booleans.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Rec. 709 luma, for single-channel output.
_LUMA = (0.2126, 0.7152, 0.0722)
_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_TORCH_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0}
# Longest side of a client frame accepted. A frame within a ring slot's bytes can still be absurdly shaped
# (2,000,000 x 1), and resizing that costs seconds and gigabytes; no camera or TOP sends one.
MAX_INPUT_SIDE = 8192


@dataclass(frozen=True)
class OutputFormat:
    """How output pixels are laid out for the client."""

    dtype: np.dtype = np.dtype(np.uint8)
    channels: int = 4
    bgr: bool = False
    bottom_left: bool = False


def model_image(raw: torch.Tensor, *, bgr: bool, bottom_left: bool, width: int, height: int,
                dtype: torch.dtype) -> torch.Tensor:
    """(H, W, C) client pixels already on the device to a (1, 3, height, width) image in [-1, 1]."""
    image = rgb_image(raw, bgr=bgr, bottom_left=bottom_left, width=width, height=height)
    return (image * 2.0 - 1.0).to(dtype)


def rgb_image(raw: torch.Tensor, *, bgr: bool, bottom_left: bool, width: int, height: int) -> torch.Tensor:
    """(H, W, C) client pixels already on the device to a float32 (1, 3, height, width) RGB image in [0, 1],
    top row first: the dtype scaled, grey expanded, alpha dropped, the order and origin undone, resized."""
    image = raw.to(torch.float32)
    scale = _TORCH_SCALE.get(raw.dtype)
    if scale is not None:
        image = image / scale
    else:
        # A float frame may hold NaN or inf (a shader's division by zero): made black and white here,
        # before the resize would spread a NaN over its neighbours and the model over the whole frame.
        image = torch.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
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
    return image.clamp(0.0, 1.0)  # not in place: the image may still be the caller's pixels, or a view of them


def client_pixels(image: torch.Tensor, fmt: OutputFormat) -> torch.Tensor:
    """A (1, 3, H, W) image in [0, 1] to contiguous (H, W, channels) client pixels on its device."""
    image = torch.nan_to_num(image[0].to(torch.float32), nan=0.0).clamp(0.0, 1.0)
    if fmt.channels == 1:
        # weights as Python numbers: a tensor made from host data here could not be captured in a CUDA graph
        image = (image[0] * _LUMA[0] + image[1] * _LUMA[1] + image[2] * _LUMA[2]).unsqueeze(0)
    if fmt.bgr and fmt.channels != 1:
        image = image.flip(0)
    if fmt.channels == 4:
        image = torch.cat([image, torch.ones_like(image[:1])], 0)
    if fmt.bottom_left:
        image = image.flip(1)
    image = image.permute(1, 2, 0)
    scale = _SCALE.get(fmt.dtype)
    if scale is not None:
        image = (image * scale).round_().to(torch.uint16 if fmt.dtype == np.uint16 else torch.uint8)
    elif fmt.dtype == np.float16:
        image = image.to(torch.float16)
    return image.contiguous()


def frame_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of two client frames on the device, as a fraction of full scale (colour
    channels only; 1.0 for frames of different shapes or types). One host sync: use it only when asked."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return 1.0
    channels = min(3, a.shape[2])
    full_scale = _TORCH_SCALE.get(a.dtype, 1.0)
    diff = (a[:, :, :channels].to(torch.float32) - b[:, :, :channels].to(torch.float32)).abs()
    # NaN and inf pixels (float frames) differ by full scale, rather than making the mean NaN or inf
    diff = torch.nan_to_num(diff, nan=full_scale, posinf=full_scale).mean()
    return float(diff) / full_scale


def flicker(frames: Sequence[torch.Tensor | np.ndarray]) -> float:
    """The flicker figure of a sequence of client frames (H, W, C), as docs/coherence.md reports it: the
    mean absolute difference of consecutive frames as a fraction of full scale (frame_difference),
    averaged over the pairs. 0 for a still sequence; fewer than two frames have none: 0."""
    tensors = [torch.from_numpy(np.ascontiguousarray(f)) if isinstance(f, np.ndarray) else f for f in frames]
    pairs = list(zip(tensors, tensors[1:]))
    return sum(frame_difference(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0


class Staging:
    """Client frames between the host and the device, without per-frame allocation.

    On CUDA, frames go through pinned (page-locked) host buffers with non-blocking copies: pinned memory
    is what lets a copy run asynchronously and at full bus speed. Two buffers each way alternate, so a
    frame can be staged while the one before it is still being computed or read. On the CPU there is
    nothing to copy: uploads share memory with the caller's array and downloads are the result itself.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._cuda = device.type == "cuda"
        self._up: list[tuple[torch.Tensor, torch.Tensor] | None] = [None, None]  # (pinned host, device)
        self._down: list[torch.Tensor | None] = [None, None]  # pinned host
        self._next_up = 0
        self._next_down = 0
        self._copies: torch.cuda.Stream | None = None  # uploads

    @property
    def asynchronous(self) -> bool:
        """True where the device computes while the host goes on (CUDA), so staging the next frame
        during the current one hides its copies."""
        return self._cuda

    def upload(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W, C) host pixels on the device. On CUDA the result is reused by the upload after next."""
        if not self._cuda:
            return torch.from_numpy(pixels).to(self.device)
        i, self._next_up = self._next_up, 1 - self._next_up
        pair = self._up[i]
        dtype = torch.from_numpy(pixels[:0]).dtype
        if pair is None or pair[0].shape != pixels.shape or pair[0].dtype != dtype:
            pair = (torch.empty(pixels.shape, dtype=dtype, pin_memory=True),
                    torch.empty(pixels.shape, dtype=dtype, device=self.device))
            self._up[i] = pair
        host, device = pair
        np.copyto(host.numpy(), pixels)
        # Safe to reuse: the upload from this buffer two frames ago finished before that frame's download.
        # On a copy stream of its own, so that it runs beside the frame being computed rather than behind
        # it; work queued on the compute stream from now on waits for it.
        if self._copies is None:
            self._copies = torch.cuda.Stream(self.device)
        device.record_stream(self._copies)  # when the buffer is freed, the allocator waits for this copy too
        with torch.cuda.stream(self._copies):
            device.copy_(host, non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._copies)
        return device

    def download(self, pixels: torch.Tensor) -> np.ndarray:
        """(H, W, C) device pixels on the host; waits for the device. On CUDA the array returned is
        reused by the download after next: copy it to keep it."""
        if not self._cuda:
            return pixels.cpu().numpy()
        i, self._next_down = self._next_down, 1 - self._next_down
        host = self._down[i]
        if host is None or host.shape != pixels.shape or host.dtype != pixels.dtype:
            host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
            self._down[i] = host
        host.copy_(pixels, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # the frame's one host sync: its pixels are needed
        return host.numpy()
