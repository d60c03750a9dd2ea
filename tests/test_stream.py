"""The stream pipeline on the tiny model: timesteps, determinism, and what each setting changes."""
from __future__ import annotations

import pytest
import torch

from engines import registry
from engines.stream import Stream, StreamSettings, timesteps_for

CPU, F32 = torch.device("cpu"), torch.float32
BASE = StreamSettings(prompt="a red fox", seed=1, strength=0.6, steps=2, width=128, height=128)


@pytest.fixture(scope="module")
def stream():
    return Stream(registry.load("tiny", CPU, F32), CPU, F32)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    return torch.rand(1, 3, 128, 128) * 2 - 1


def render(stream, image, **changes):
    settings = StreamSettings(**{**BASE.__dict__, **changes})
    stream.prepare(settings)
    return stream.render(None if settings.mode == "txt2img" else image)


def test_timesteps_follow_strength_continuously_and_spread_over_steps():
    assert timesteps_for(1.0, 1, "img2img") == (999,)
    assert timesteps_for(0.5, 1, "img2img") == (499,)
    assert timesteps_for(0.501, 1, "img2img") == (500,)
    assert timesteps_for(1.0, 4, "img2img") == (999, 749, 499, 249)
    assert timesteps_for(0.3, 2, "txt2img") == (999, 499)  # txt2img ignores strength
    assert timesteps_for(0.0, 4, "img2img") == ()
    assert timesteps_for(0.003, 4, "img2img") == (2, 1, 0)  # never repeats a timestep


def test_the_same_settings_and_frame_give_bit_identical_output(stream, image):
    a = render(stream, image)
    render(stream, image, seed=2)
    b = render(stream, image)
    assert torch.equal(a, b)


@pytest.mark.parametrize("change", [{"seed": 2}, {"prompt": "a blue whale"}, {"strength": 0.9}, {"steps": 3},
                                    {"guidance_scale": 4.0, "negative_prompt": "grey"}])
def test_each_setting_changes_the_output(stream, image, change):
    assert not torch.equal(render(stream, image), render(stream, image, **change))


def test_the_input_frame_changes_the_output(stream, image):
    assert not torch.equal(render(stream, image), render(stream, image.flip(3)))


def test_strength_zero_returns_the_input_through_the_autoencoder(stream, image):
    out = render(stream, image, strength=0.0)
    expected = (stream.model.autoencoder.decode(stream.model.autoencoder.encode(image)) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(out, expected)


def test_seed_minus_one_draws_new_noise_every_frame(stream, image):
    assert not torch.equal(render(stream, image, seed=-1), stream.render(image))


def test_txt2img_ignores_the_frame_and_needs_none(stream):
    out = render(stream, None, mode="txt2img")
    assert out.shape == (1, 3, 128, 128) and 0 <= out.min() and out.max() <= 1


def test_img2img_without_a_frame_is_an_error(stream):
    stream.prepare(BASE)
    with pytest.raises(ValueError, match="input image"):
        stream.render(None)


def test_prompt_embeddings_are_cached(stream):
    first = stream.prompts.encode("cache me")
    assert stream.prompts.encode("cache me") is first
