"""Client pixel formats to model images and back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.frames import OutputFormat, client_pixels, model_image

CPU = torch.device("cpu")


def _model(pixels, bgr=False, bottom_left=False, size=None):
    h, w = pixels.shape[:2]
    width, height = size or (w, h)
    return model_image(torch.from_numpy(pixels), bgr=bgr, bottom_left=bottom_left, width=width, height=height,
                       dtype=torch.float32)


def to_client_pixels(image, fmt):
    return client_pixels(image, fmt).numpy()


def test_uint8_rgb_maps_to_minus_one_to_one():
    pixels = np.array([[[0, 255, 51]]], np.uint8)
    assert torch.allclose(_model(pixels)[0, :, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))


@pytest.mark.parametrize("dtype,full", [(np.uint8, 255), (np.uint16, 65535), (np.float16, 1.0), (np.float32, 1.0)])
def test_every_dtype_scales_to_the_same_image(dtype, full):
    base = np.random.default_rng(1).integers(0, 256, (8, 8, 3)) / 255.0
    pixels = (base * full).astype(dtype)
    assert torch.allclose(_model(pixels), torch.from_numpy(base).float().permute(2, 0, 1)[None] * 2 - 1, atol=2e-3)


def test_bgr_and_bottom_left_are_undone():
    rgb_top = np.random.default_rng(2).integers(0, 256, (6, 5, 3)).astype(np.uint8)
    bgr_bottom = rgb_top[::-1, :, ::-1].copy()
    assert torch.equal(_model(bgr_bottom, bgr=True, bottom_left=True), _model(rgb_top))


def test_grey_and_alpha_inputs_become_rgb():
    grey = np.full((4, 4, 1), 255, np.uint8)
    assert torch.equal(_model(grey), torch.ones(1, 3, 4, 4))
    rgba = np.concatenate([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 1), 255, np.uint8)], 2)
    assert torch.equal(_model(rgba), -torch.ones(1, 3, 4, 4))


def test_any_size_is_resized_to_the_model_size():
    assert _model(np.zeros((480, 640, 3), np.uint8), size=(128, 96)).shape == (1, 3, 96, 128)
    assert _model(np.zeros((10, 20, 3), np.uint8), size=(64, 64)).shape == (1, 3, 64, 64)


def test_non_finite_float_pixels_are_made_safe():
    pixels = np.array([[[np.nan, np.inf, -np.inf]]], np.float32)
    assert torch.equal(_model(pixels)[0, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_output_formats():
    image = torch.zeros(1, 3, 2, 3)
    image[0, 0] = 1.0  # red
    image[0, :, 1] = 0.5  # bottom row grey
    rgba = to_client_pixels(image, OutputFormat())
    assert rgba.shape == (2, 3, 4) and rgba.dtype == np.uint8
    assert rgba[0, 0].tolist() == [255, 0, 0, 255] and rgba[1, 0].tolist() == [128, 128, 128, 255]
    bgr_bottom = to_client_pixels(image, OutputFormat(channels=3, bgr=True, bottom_left=True))
    assert bgr_bottom[1, 0].tolist() == [0, 0, 255] and bgr_bottom[0, 0].tolist() == [128, 128, 128]
    grey16 = to_client_pixels(image, OutputFormat(dtype=np.dtype(np.uint16), channels=1))
    assert grey16.dtype == np.uint16 and grey16[1, 0, 0] == 32768
    f32 = to_client_pixels(image, OutputFormat(dtype=np.dtype(np.float32)))
    assert f32.dtype == np.float32 and f32[0, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert to_client_pixels(image, OutputFormat(dtype=np.dtype(np.float16))).dtype == np.float16
