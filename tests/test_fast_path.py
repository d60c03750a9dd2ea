"""The torch fast path: the per-frame call as a pure function of its tensors, CUDA-graph bookkeeping,
staging buffers, and slow preparation (prompt encoding, LoRA files) handed to a worker.

CUDA graphs themselves need a GPU: `test_cuda_graph_replays_match_eager` runs only where torch sees
one. Everywhere else, FrameGraphs runs with capture=False, which keeps every step but the capture
(static input copies, keys per frame shape, eager first sight, clear), so those are tested here.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from engines import registry
from engines.backends.torch_backend import FrameGraphs, TorchOptions, accelerate
from engines.frames import OutputFormat, Staging
from engines.stream import Stream, StreamSettings

from .conftest import record_frames

CPU, F32 = torch.device("cpu"), torch.float32
BASE = StreamSettings(prompt="a red fox", seed=1, strength=0.6, steps=2, width=64, height=64)
RGBA = OutputFormat()
# live changes a performer makes, one after the other; each must reach the frames exactly
CHANGES = (
    {},
    {"seed": 2},
    {"guidance_scale": 2.0, "cfg_type": "full", "negative_prompt": "blurry"},
    {"guidance_scale": 2.5, "cfg_type": "self", "delta": 0.7},
    {"guidance_scale": 1.8, "cfg_type": "initialize", "delta": 0.9, "strength": 0.8},
    {"prompt": "a blue whale, " * 30},  # two chunks: another embedding shape
    {"prompts": (("a red fox", 0.5), ("a blue whale", 0.5))},
    {"seeds": ((3, 0.5), (4, 0.5)), "subseed": 9, "subseed_strength": 0.3},
    {"transition_frames": 3, "seed": 5},
    {"strength": 0.0},
    {"mode": "txt2img"},
    {"steps": 3},
)


def frames(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48, 80, 4), dtype=np.uint8) for _ in range(count)]


def settings_after(step: int) -> StreamSettings:
    values = dataclasses.asdict(BASE)
    for change in CHANGES[:step + 1]:
        values.update(change)
    return StreamSettings(**values)


def play(stream: Stream, script: list[StreamSettings], inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Two frames per settings change, the way the render loop calls the stream."""
    out = []
    for i, settings in enumerate(script):
        stream.prepare(settings)
        for pixels in inputs[2 * i:2 * i + 2]:
            out.append(stream.render_pixels(pixels, RGBA, bottom_left=True).copy())
    return out


@pytest.fixture(scope="module")
def model():
    return registry.load("tiny", CPU, F32)


@pytest.mark.parametrize("stream_batch", [False, True], ids=["exact", "stream-batch"])
def test_static_buffer_replays_give_the_eager_frames_through_every_live_change(model, stream_batch):
    script = [settings_after(i) for i in range(len(CHANGES))]
    inputs = frames(0, 2 * len(script))
    eager = play(Stream(model, CPU, F32, stream_batch=stream_batch), script, inputs)
    graphed_stream = Stream(model, CPU, F32, stream_batch=stream_batch)
    graphed_stream.graphs = graphs = FrameGraphs(graphed_stream._frame, capture=False)
    graphed = play(graphed_stream, script, inputs)
    assert graphs.captured >= 5  # most changes kept the frame's shape and replayed on static copies
    for i, (a, b) in enumerate(zip(eager, graphed)):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {i}")


def test_the_frame_reads_nothing_but_its_inputs(model):
    """A CUDA graph freezes whatever the frame reads from outside its inputs; so: record one frame's
    inputs, change every live setting, and the same inputs must still give the same frame."""
    stream = Stream(model, CPU, F32)
    recorded = record_frames(stream)
    settings = dataclasses.replace(settings_after(4), transition_frames=0)
    stream.prepare(settings)
    pixels = frames(1, 1)[0]
    first = stream.render_pixels(pixels, RGBA).copy()
    shape, inputs = recorded[-1]
    stream.prepare(dataclasses.replace(settings, seed=77, guidance_scale=3.0, delta=0.2, strength=0.9,
                                       prompt="a green field"))
    assert not np.array_equal(stream.render_pixels(pixels, RGBA), first)
    with torch.inference_mode():
        again = stream._frame(shape, inputs)[0]
    np.testing.assert_array_equal(again.numpy(), first)


def test_a_frame_shape_runs_eagerly_first_and_replays_from_its_second_frame_on():
    calls = []

    def double(shape, inputs):
        calls.append(shape)
        return inputs[0] * 2

    graphs = FrameGraphs(double, capture=False, limit=2)
    x = torch.ones(3)
    assert torch.equal(graphs("a", (x,)), 2 * x) and len(graphs) == 0  # first sight: eager, nothing kept
    assert torch.equal(graphs("a", (x + 1,)), 2 * (x + 1)) and len(graphs) == 1
    assert torch.equal(graphs("a", (x + 2,)), 2 * (x + 2)) and graphs.captured == 1  # replayed on new values
    graphs("a", (torch.ones(4),))  # another tensor shape is another graph, again eager at first
    assert len(graphs) == 1
    graphs("b", (x,))
    graphs("b", (x,))
    graphs("c", (x,))
    graphs("c", (x,))
    assert len(graphs) == 2  # the least recently used graph went
    graphs.clear()
    graphs("c", (x,))
    assert len(graphs) == 0 and graphs.captured == 3  # after clear(), eager again at first


def test_staging_on_the_cpu_shares_the_upload_and_returns_the_result():
    staging = Staging(CPU)
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = staging.upload(pixels)
    assert raw.dtype == torch.uint8 and raw.shape == (2, 3, 4) and np.array_equal(raw.numpy(), pixels)
    assert np.array_equal(staging.download(raw), pixels)


def test_fast_path_options_are_off_on_the_cpu_and_cuda_graphs_cannot_be_forced_there():
    assert TorchOptions.resolve(CPU) == TorchOptions(cuda_graph=False, compile=False, channels_last=False)
    assert TorchOptions.resolve(CPU, channels_last="on").channels_last
    assert TorchOptions.resolve(CPU).describe() == "eager"
    with pytest.raises(ValueError, match="CUDA"):
        TorchOptions.resolve(CPU, cuda_graph="on")
    cuda = TorchOptions.resolve(torch.device("cuda"))
    assert cuda.cuda_graph and cuda.channels_last and not cuda.compile


def test_precompute_encodes_new_prompts_so_that_prepare_never_runs_the_text_encoder(model):
    stream = Stream(model, CPU, F32)
    stream.prepare(BASE)
    calls = []
    hook = model.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        new = dataclasses.replace(BASE, prompt="a (glowing:1.2) jellyfish", negative_prompt="dull",
                                  guidance_scale=2.0)
        assert stream.slow_to_prepare(new)
        assert not stream.slow_to_prepare(dataclasses.replace(BASE, seed=9, strength=0.3))
        stream.precompute(new)  # what the worker thread runs
        encoded = len(calls)
        assert encoded > 0 and not stream.slow_to_prepare(new)
        stream.prepare(new)
        assert len(calls) == encoded
    finally:
        hook.remove()


def test_a_cleared_prompt_cache_ignores_an_encoding_that_was_running_during_the_clear(model):
    stream = Stream(model, CPU, F32)
    prompts = stream.prompts
    original = prompts._encode

    def encode_then_clear(text, clip_skip):
        result = original(text, clip_skip)
        prompts.clear()  # a LoRA weight changed while this prompt was being encoded
        return result
    prompts._encode = encode_then_clear
    prompts.encode("a red fox")
    prompts._encode = original
    assert not prompts.cached("a red fox")  # encoded with the old text-encoder weights: not kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replays_match_eager():
    device = torch.device("cuda")
    model = registry.load("tiny", device, torch.float16)
    script = [settings_after(i) for i in range(len(CHANGES))]
    inputs = frames(2, 2 * len(script))
    eager_stream = Stream(model, device, torch.float16)
    accelerate(eager_stream, TorchOptions(cuda_graph=False, channels_last=True))
    eager = play(eager_stream, script, inputs)
    graphed_stream = Stream(model, device, torch.float16)
    accelerate(graphed_stream, TorchOptions(cuda_graph=True, channels_last=True))
    graphed = play(graphed_stream, script, inputs)
    assert graphed_stream.graphs.captured >= 5
    for i, (a, b) in enumerate(zip(eager, graphed)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2, f"frame {i}"


def test_frames_keep_coming_with_the_old_prompt_while_a_new_one_is_encoded():
    """A prompt the cache does not hold is encoded on a worker; the render thread does not wait for
    it: inputs that arrive meanwhile are rendered with what was on screen, stamped with its version."""
    import threading

    from bridge import shm
    from bridge.config import Settings
    from bridge.daemon import Daemon
    from bridge.osc import free_udp_port

    from .conftest import gradient, unique_instance

    settings = Settings(instance=unique_instance("fp"), osc_port=0, telemetry_port=free_udp_port(), http_port=0,
                        oscquery_port=0, mdns=False, max_width=128, max_height=128)
    with Daemon(settings, {"width": 64, "height": 64, "prompt": "a red fox"}) as daemon:
        assert daemon.wait_ready(120)
        stream = daemon.loop.stream
        release = threading.Event()
        precompute = stream.precompute
        stream.precompute = lambda s: (release.wait(60), precompute(s))
        client = shm.Ring.attach(daemon.name_in)

        def render(frame_id: int) -> shm.Frame:
            client.write(gradient(64, 64, shift=frame_id), frame_id=frame_id)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                out = daemon.ring_out.read_latest()
                if out is not None and out.frame_id == frame_id:
                    return out
                time.sleep(0.005)
            raise AssertionError(f"no output for frame {frame_id}")

        try:
            before = render(1)
            version = daemon.apply({"prompt": "a (brand:1.1) new prompt nobody encoded yet"})
            for frame_id in (2, 3, 4):
                assert render(frame_id).state_version == before.state_version  # the old prompt, and says so
            release.set()
            frame_id, end = 5, time.monotonic() + 60
            while render(frame_id).state_version != version:
                assert time.monotonic() < end, "the new prompt never reached the output"
                frame_id += 1
        finally:
            release.set()
            client.close()


class CountingGraphs(FrameGraphs):
    """FrameGraphs without capture that counts its calls and clears."""

    def __init__(self, fn):
        super().__init__(fn, capture=False)
        self.calls = self.clears = 0

    def __call__(self, shape, inputs):
        self.calls += 1
        return super().__call__(shape, inputs)

    def clear(self):
        self.clears += 1
        super().clear()


@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet-only", "unet-and-text"])
def test_loading_or_moving_any_lora_drops_the_frame_graphs(tmp_path, text_encoder):
    """A graph freezes peft's LoRA layers and their Python scales: every LoRA change must drop it."""
    from .test_lora import _peft_lora, write_diffusers

    model = registry.load("tiny", CPU, F32)
    path = write_diffusers(_peft_lora(model, seed=4, text=text_encoder), tmp_path, "style.safetensors")
    stream = Stream(model, CPU, F32, find_lora=lambda name: path)
    stream.graphs = graphs = CountingGraphs(stream._frame)
    pixels = frames(3, 1)[0]
    stream.prepare(BASE)
    for _ in range(3):
        stream.render_pixels(pixels, RGBA)
    assert len(graphs) == 1
    for weight, clears in ((1.0, 1), (0.5, 2), (0.5, 2)):  # load; move; the same weight again changes nothing
        stream.prepare(dataclasses.replace(BASE, loras=(("style", weight),)))
        stream.render_pixels(pixels, RGBA)
        assert graphs.clears == clears and len(graphs) == 0


def test_after_a_clear_a_shape_must_settle_before_it_is_captured():
    from engines.backends.torch_backend import SETTLE_FRAMES

    graphs = FrameGraphs(lambda shape, inputs: inputs[0] + 1, capture=False)
    x = torch.zeros(2)
    graphs("a", (x,))
    graphs("a", (x,))
    assert len(graphs) == 1
    graphs.clear()  # a LoRA fader moved
    for _ in range(SETTLE_FRAMES - 1):
        graphs("a", (x,))
    assert len(graphs) == 0  # still eager: the fader may be moving on
    graphs("a", (x,))
    assert len(graphs) == 1


def test_txt2img_frames_go_through_the_graphs_too(model):
    stream = Stream(model, CPU, F32)
    stream.graphs = graphs = CountingGraphs(stream._frame)
    stream.prepare(dataclasses.replace(BASE, mode="txt2img"))
    for _ in range(3):
        stream.render_pixels(None, RGBA)
    assert graphs.calls == 3 and len(graphs) == 1


def test_work_handed_to_the_render_thread_runs_there_between_frames():
    """Benchmarks time the bare engine on the thread that serves the frames."""
    import threading

    from bridge.config import Settings
    from bridge.daemon import Daemon
    from bridge.osc import free_udp_port

    from .conftest import unique_instance

    settings = Settings(instance=unique_instance("fp"), osc_port=0, telemetry_port=free_udp_port(), http_port=0,
                        oscquery_port=0, mdns=False, max_width=128, max_height=128)
    with Daemon(settings, {"width": 64, "height": 64}) as daemon:
        assert daemon.wait_ready(120)
        where = daemon.loop.call_between_frames(
            lambda stream: (threading.current_thread().name, stream is daemon.loop.stream), timeout=30)
        assert where == ("sdbridge-render", True)
        with pytest.raises(ZeroDivisionError):
            daemon.loop.call_between_frames(lambda stream: 1 / 0, timeout=30)
        assert daemon.loop.call_between_frames(lambda stream: "still serving", timeout=30) == "still serving"


def test_a_failed_capture_leaves_every_frame_eager_instead_of_failing(monkeypatch):
    from engines.backends import torch_backend

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch_backend, "_Graph", refuse)
    graphs = FrameGraphs(lambda shape, inputs: inputs[0] * 3, capture=False)
    x = torch.ones(2)
    for _ in range(4):
        assert torch.equal(graphs("a", (x,)), 3 * x)
    assert "not permitted" in graphs.failed and len(graphs) == 0
