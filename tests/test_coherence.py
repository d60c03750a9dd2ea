"""Temporal coherence for video input on the tiny model: latent feedback, noise locking and cached attention,
each measured by the flicker figure (mean frame-to-frame difference of the outputs) on a synthetic slowly
moving video, and each checked to be exactly absent at 0, to start afresh on a resolution change, to work
in stream batch and to keep the frame a pure function of its inputs (what CUDA graphs need).

The tiny model's attention is weak and its images mean nothing: cached attention is checked by what it
must do exactly (attending to a still frame's own features changes nothing; it acts on moving input and
through LoRA layers), not by a flicker drop, which on tiny is within rounding (docs/coherence.md)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from engines import registry
from engines.backends.torch_backend import FrameGraphs
from engines.coherence import CachedAttentionProcessor
from engines.frames import OutputFormat, flicker
from engines.stream import Stream, StreamSettings

from .conftest import record_frames

CPU, F32 = torch.device("cpu"), torch.float32
RGB = OutputFormat(np.dtype(np.float32), 3)  # float output: the figures are not rounded to 8 bits
BASE = StreamSettings(prompt="a watercolour landscape", seed=7, strength=0.6, steps=2, width=64, height=64)
SETTLE = 4  # frames left out of a flicker figure
MODES = pytest.mark.parametrize("stream_batch", [False, True], ids=["exact", "stream-batch"])


@pytest.fixture(scope="module")
def model():
    return registry.load("tiny", CPU, F32)


def moving_video(frames: int = 16, size: int = 64) -> list[np.ndarray]:
    """A gradient with a bright square moving one pixel a frame, (size, size, 3) uint8."""
    y, x = np.mgrid[0:size, 0:size]
    out = []
    for i in range(frames):
        image = np.stack([(x + y + i) / (2 * size), (x - i) % size / size, 0.5 + 0 * x], -1)
        image[size // 4:size // 2, i:i + size // 4] = (1.0, 0.9, 0.2)
        out.append((image.clip(0, 1) * 255).astype(np.uint8))
    return out


def play(stream: Stream, video: list[np.ndarray], **changes) -> list[np.ndarray]:
    stream.prepare(dataclasses.replace(BASE, **changes))
    return [stream.render_pixels(frame, RGB).copy() for frame in video]


def figure(model, stream_batch: bool, video: list[np.ndarray], **changes) -> float:
    """The flicker of the outputs once settled: feedback starts from an output with nothing blended in
    and takes a few frames to reach its steady look (a stream batch fills first, too)."""
    torch.manual_seed(0)  # seed -1 draws from torch's generator
    return flicker(play(Stream(model, CPU, F32, stream_batch=stream_batch), video, **changes)[SETTLE:])


def test_flicker_is_the_mean_absolute_difference_of_consecutive_frames():
    frames = [np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8), np.full((2, 2, 3), 255, np.uint8)]
    assert flicker(frames) == pytest.approx(0.5)  # pairs: 1.0 and 0.0
    assert flicker(frames[:1]) == 0.0


# ------------------------------------------------------------------ latent feedback
@MODES
def test_feedback_lowers_flicker_on_a_moving_video(model, stream_batch):
    video = moving_video()
    assert figure(model, stream_batch, video, feedback=0.5) < 0.85 * figure(model, stream_batch, video)


def test_feedback_blends_the_previous_latent_into_the_new_clean_latent(model):
    """At strength 0 the output is the clean latent decoded, so the blend shows exactly."""
    stream = Stream(model, CPU, F32)
    first, second = (torch.from_numpy(f).permute(2, 0, 1)[None].float() / 127.5 - 1 for f in moving_video(2))
    stream.prepare(dataclasses.replace(BASE, strength=0.0, feedback=0.3))
    out = [stream.render(first), stream.render(second)]
    ae = model.autoencoder
    expected = (ae.decode(0.7 * ae.encode(second) + 0.3 * ae.encode(first)) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(out[1], expected, atol=1e-5)
    assert torch.allclose(out[0], (ae.decode(ae.encode(first)) / 2 + 0.5).clamp(0, 1), atol=1e-6)  # nothing before


# ------------------------------------------------------------------ noise locking
@MODES
def test_noise_lock_1_with_seed_minus_1_flickers_like_a_fixed_seed(model, stream_batch):
    video = moving_video()
    locked = figure(model, stream_batch, video, seed=-1, noise_lock=1.0)
    assert locked == pytest.approx(figure(model, stream_batch, video), rel=0.25)
    assert locked < 0.2 * figure(model, stream_batch, video, seed=-1)


@MODES
def test_noise_lock_1_on_a_still_input_gives_identical_frames(model, stream_batch):
    still = moving_video(1) * 6
    assert figure(model, stream_batch, still, seed=-1, noise_lock=1.0) == 0.0


def test_noise_lock_between_0_and_1_drifts_between_the_two(model):
    still = moving_video(1) * 8
    free, drifting = (figure(model, False, still, seed=-1, noise_lock=lock) for lock in (0.0, 0.9))
    assert 0.0 < drifting < 0.5 * free


def test_noise_lock_leaves_a_fixed_seed_alone(model):
    video = moving_video(4)
    assert all(np.array_equal(a, b) for a, b in zip(play(Stream(model, CPU, F32), video, noise_lock=1.0),
                                                    play(Stream(model, CPU, F32), video)))


# ------------------------------------------------------------------ cached attention
@pytest.mark.parametrize("stream_batch,changes", [
    (False, {}), (True, {}), (False, {"guidance_scale": 3.0, "cfg_type": "full", "negative_prompt": "grey"}),
    (True, {"guidance_scale": 3.0, "cfg_type": "initialize"})],
    ids=["exact", "stream-batch", "cfg-full", "stream-batch-initialize"])
def test_cached_attention_changes_the_output_on_moving_input(model, stream_batch, changes):
    video = moving_video(5)
    on = play(Stream(model, CPU, F32, stream_batch=stream_batch), video, cached_attention=1.0, **changes)
    off = play(Stream(model, CPU, F32, stream_batch=stream_batch), video, **changes)
    assert np.array_equal(on[0], off[0])  # the first frame has no bank yet
    assert np.abs(on[-1] - off[-1]).mean() > 1e-5


@MODES
@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_cached_attention_on_a_still_input_attends_to_the_same_features_and_changes_nothing(
        model, stream_batch, weight):
    """Attending to [k; k] is attending to k: true only if each step and batch position reads its own
    bank entry from the frame before, so this fails if the bank is misaligned."""
    still = moving_video(1) * 6
    on = play(Stream(model, CPU, F32, stream_batch=stream_batch), still, cached_attention=weight)
    off = play(Stream(model, CPU, F32, stream_batch=stream_batch), still)
    for a, b in zip(on[-2:], off[-2:]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cached_attention_works_through_lora_layers(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.functional import inject_adapter_in_model
    model = registry.load("tiny", CPU, F32)  # its own: LoRA layers go into this UNet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet = copy.deepcopy(model.unet)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["attn1.to_q", "attn1.to_k", "attn1.to_v"],
                            init_lora_weights=False)
        inject_adapter_in_model(config, unet, adapter_name="default")
        StableDiffusionPipeline.save_lora_weights(tmp_path, weight_name="grain.safetensors",
                                                  unet_lora_layers=get_peft_model_state_dict(unet))
    stream = Stream(model, CPU, F32, find_lora=lambda name: tmp_path / f"{name}.safetensors")
    video = moving_video(4)
    with_lora = play(stream, video, cached_attention=1.0, loras=(("grain", 1.0),))
    assert all(isinstance(m.processor, CachedAttentionProcessor) for name, m in model.unet.named_modules()
               if name.endswith("attn1"))
    without = play(stream, video, cached_attention=1.0, loras=(("grain", 0.0),))
    # the LoRA is on the self-attention layers only: it acts through the cached-attention processors
    assert np.abs(with_lora[-1] - without[-1]).mean() > 1e-4


def test_cached_attention_with_a_unet_that_is_not_the_torch_module_is_reported_once_and_left_out(model):
    reports = []
    stream = Stream(model, CPU, F32, report=reports.append)
    stream.set_modules(unet=lambda *args, **kwargs: model.unet(*args, **kwargs))  # as a TensorRT engine stands in
    video = moving_video(3)
    on = play(stream, video, cached_attention=1.0)
    on += play(stream, video, cached_attention=0.5)
    assert len(reports) == 1 and "cached_attention" in reports[0]
    assert all(np.array_equal(a, b) for a, b in zip(on, play(Stream(model, CPU, F32), video) * 2))


# ------------------------------------------------------------------ all three
def test_each_method_at_0_gives_the_output_of_the_method_absent():
    video = moving_video(4)
    model = registry.load("tiny", CPU, F32)  # its own: cached attention installs processors in it
    torch.manual_seed(5)
    absent = play(Stream(model, CPU, F32), video, seed=-1)
    stream = Stream(model, CPU, F32)
    play(stream, video, seed=-1, feedback=0.5, noise_lock=0.8, cached_attention=0.7)
    torch.manual_seed(5)
    zero = play(stream, video, seed=-1)
    assert all(np.array_equal(a, b) for a, b in zip(zero, absent))


@pytest.mark.parametrize("method", [{"feedback": 0.8}, {"noise_lock": 1.0}, {"cached_attention": 1.0}],
                         ids=lambda m: next(iter(m)))
def test_a_method_starts_afresh_after_a_resolution_change(model, method):
    stream = Stream(model, CPU, F32)
    play(stream, moving_video(3), seed=-1, **method)
    big = moving_video(2, size=128)
    torch.manual_seed(9)
    after = play(stream, big, seed=-1, width=128, height=128, **method)
    torch.manual_seed(9)
    fresh = play(Stream(model, CPU, F32), big, seed=-1, width=128, height=128, **method)
    assert all(np.array_equal(a, b) for a, b in zip(after, fresh))


def test_feedback_starts_afresh_after_txt2img_frames(model):
    stream = Stream(model, CPU, F32)
    video = moving_video(4)
    play(stream, video[:3], feedback=0.9)
    play(stream, video[:2], feedback=0.9, mode="txt2img")
    after = play(stream, video[3:], feedback=0.9)[0]
    fresh = play(Stream(model, CPU, F32), video[3:], feedback=0.9)[0]
    np.testing.assert_array_equal(after, fresh)  # not 0.9 parts the latent shown before the txt2img frames


def test_turning_cached_attention_off_leaves_no_bank_behind(model):
    stream = Stream(model, CPU, F32)
    video = moving_video(4)
    play(stream, video[:2], cached_attention=1.0)
    play(stream, video[2:], cached_attention=0.0)
    assert stream._bank is None and stream._attention._new == []


@MODES
def test_static_buffer_replays_give_the_eager_frames_with_every_method(model, stream_batch):
    """FrameGraphs without capture (no CUDA here): every frame runs on static copies of its inputs, so
    anything carried between frames outside them would show as a difference."""
    script = [{"feedback": 0.5}, {"feedback": 0.5, "cached_attention": 0.6}, {"cached_attention": 1.0},
              {"seed": -1, "noise_lock": 0.7, "feedback": 0.3, "cached_attention": 0.6}]
    video = moving_video(4 * len(script))

    def run(graphed: bool) -> list[np.ndarray]:
        stream = Stream(model, CPU, F32, stream_batch=stream_batch)
        if graphed:
            stream.graphs = FrameGraphs(stream._frame, capture=False)
        torch.manual_seed(2)
        return [out for i, changes in enumerate(script) for out in play(stream, video[4 * i:4 * i + 4], **changes)]
    for i, (a, b) in enumerate(zip(run(False), run(True))):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {i}")


def test_the_frame_reads_its_coherence_values_from_its_inputs(model):
    """A CUDA graph freezes whatever the frame reads from elsewhere: the feedback fraction and the cached
    attention weight must come in the frame's inputs."""
    stream = Stream(model, CPU, F32)
    recorded = record_frames(stream)
    video = moving_video(3)
    first = play(stream, video, feedback=0.5, cached_attention=0.5)[-1]
    shape, inputs = recorded[-1]
    assert shape.feedback and shape.attention == "blend"
    assert not np.array_equal(play(stream, video[-1:], feedback=0.9, cached_attention=0.9)[0], first)
    with torch.inference_mode():
        again = stream._frame(shape, inputs).out
    np.testing.assert_array_equal(again.numpy(), first)
