"""Control-image preprocessors: what is done to a control image before a ControlNet sees it.

Each runs on the device, on a (1, 3, H, W) float image in [0, 1] at the frame's size, and returns one
of the same form. None needs downloaded weights: `passthrough` for maps the client already made (a
depth camera's image, an Edge TOP, a pose skeleton rendered in TouchDesigner) and `canny` for edges.
This module knows nothing of rings or of the stream; the caller decides when a control image is new.
"""
from __future__ import annotations

import functools
import importlib

import torch

PASSTHROUGH, CANNY = "passthrough", "canny"
PREPROCESSORS = (PASSTHROUGH, CANNY)


def require(name: str) -> None:
    """Import what the preprocessor `name` needs now (at start, not at the first control frame on
    stage); ImportError says what to install."""
    if name == CANNY:
        try:
            importlib.import_module("kornia.filters")
        except ImportError as e:
            raise ImportError(f"the canny preprocessor needs kornia: pip install kornia ({e})") from e


def preprocess(name: str, image: torch.Tensor, *, canny_low: float = 0.1, canny_high: float = 0.2) -> torch.Tensor:
    """`image` as ControlNet input for the preprocessor `name`."""
    if name == PASSTHROUGH:
        return image
    if name == CANNY:
        return canny(image, canny_low, canny_high)
    raise ValueError(f"unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """White edges on black, as the canny ControlNets were trained on: kornia's Canny (Gaussian blur,
    Sobel gradients, non-maximum suppression, hysteresis) on the image's luma. `low` and `high` are
    fractions of the strongest edge there is, a black-to-white step (so 0.1 and 0.2 keep A1111's 100
    and 200 on 8-bit images): edges above `high` stay, edges below `low` go, and those between stay
    where they touch a strong one. Hysteresis grows edges until nothing changes, a check per step that
    waits for the device: it runs once per new control image, never inside a captured frame."""
    from kornia.filters import canny as kornia_canny  # imported when used: most streams never need it

    strength = _step_strength()
    _, edges = kornia_canny(image.to(torch.float32), low_threshold=low * strength, high_threshold=high * strength)
    return edges.expand(-1, 3, -1, -1)


@functools.cache
def _step_strength() -> float:
    """The gradient magnitude kornia's Canny measures at a black-to-white step (its blur and Sobel
    kernels are not normalised to 1)."""
    from kornia.filters import canny as kornia_canny

    step = torch.zeros(1, 1, 16, 16)
    step[..., 8:] = 1.0
    magnitude, _ = kornia_canny(step)
    return float(magnitude.max())
