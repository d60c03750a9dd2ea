"""Control-image preprocessors: what is done to a control image before a ControlNet sees it.

Each runs on the device, on a (1, 3, H, W) float image in [0, 1] at the frame's size, and returns one
of the same form. None needs downloaded weights: `passthrough` for maps the client already made (a
depth camera's image, an Edge TOP, a pose skeleton rendered in TouchDesigner) and `canny` for edges.
This module knows nothing of rings or of the stream; the caller decides when a control image is new.
"""
from __future__ import annotations

import torch

PASSTHROUGH, CANNY = "passthrough", "canny"
PREPROCESSORS = (PASSTHROUGH, CANNY)


def preprocess(name: str, image: torch.Tensor, *, canny_low: float = 0.1, canny_high: float = 0.2) -> torch.Tensor:
    """`image` as ControlNet input for the preprocessor `name`."""
    if name == PASSTHROUGH:
        return image
    if name == CANNY:
        return canny(image, canny_low, canny_high)
    raise ValueError(f"unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """White edges on black, as the canny ControlNets were trained on: kornia's Canny (Gaussian blur,
    Sobel gradients, non-maximum suppression, hysteresis between `low` and `high`, fractions of full
    scale) on the image's luma. Hysteresis grows edges until nothing changes, a check per step that waits
    for the device: it runs once per new control image, never inside a captured frame."""
    from kornia.filters import canny as kornia_canny  # imported when used: most streams never need it

    _, edges = kornia_canny(image.to(torch.float32), low_threshold=low, high_threshold=high)
    return edges.expand(-1, 3, -1, -1)
