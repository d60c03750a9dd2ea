"""`sdbridge bench`: the real path measured, with the bare engine, the physical limit and a naive
diffusers baseline beside it, so that every figure comes with what it should be compared to.

Process layout. This process hosts a daemon in-process (a private instance name and ports, as the demo
does) and measures, in order:
1. one WxH RGBA uint8 frame through a scratch ring of its own (write + read_latest), before the daemon
   starts;
2. the bare engine (`Stream.render_pixels`, client pixels to client pixels, the whole per-frame call,
   back to back) on the render thread itself, between two of its frames (RenderLoop.call_between_frames);
3. end to end: `bridge.bench_client` as a separate process (numpy, shm and OSC, no torch) writes frames
   into the input ring at full rate, reads the output ring and plays a control change over OSC every
   half second, while this process only waits: throughput, latency from source_ns to written_ns,
   control latency, and the render loop's own account of its time;
4. the bare engine again, on the render thread: with 2, it brackets the end-to-end phase, so that the
   machine's drift during the run falls on both sides of the comparison;
5. with the daemon stopped, on worker threads: the FLOPs of one frame, the device's peak FLOP/s
   (datasheet, given, or a matmul measured now) and, on request, diffusers' own img2img pipeline on the
   same model, resolution and timesteps.

The numbers are defined for users in docs/benchmarks.md. This module knows the engine only through
`Stream.prepare` / `Stream.render_pixels` and the model bundle's components.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import bench_client, osc, params, shm
from .config import Settings

log = logging.getLogger(__name__)

ENGINE_SHARE = 0.2  # the bare engine is timed for about this share of --seconds
MIN_ENGINE_FRAMES = 10
MAX_TIMED_FRAMES = 5000
BASELINE_MIN_FRAMES = 5
AUTO_INPUT_FPS = (30.0, 2000.0)  # clamp of the automatic input rate, 4 x the engine's fps
RING_ITERATIONS = 1000
RING_MAX_S = 2.0
PATTERN_FRAMES = 8
LOAD_TIMEOUT_S = 900.0  # full-size models in float32 on a CPU take minutes
CLIENT_SLACK_S = 60.0
BASE_TIMEOUT_S = 60.0  # every wait on the engine allows this, plus multiples of the model's load time

TEST_MODEL_WARNING = ("model {name!r} is a test model (toy or random weights): its images are meaningless; "
                      "only the timings count")

# Datasheet dense (no sparsity) fp16/bf16 tensor-core TFLOP/s with fp32 accumulate, matched in order on
# torch.cuda.get_device_name(). None: a name we know but hold no sure number for (the NVL parts run at
# other clocks and powers), so the peak is measured instead. GeForce cards run fp32 accumulate at half
# the fp16-accumulate rate; the number here is the fp32-accumulate one torch uses.
DATASHEET_TFLOPS: tuple[tuple[str, float | None, str], ...] = (
    (r"\bH[12]00\b.*\bNVL\b", None, ""),
    (r"\bH100\b.*\bPCIe\b", 756.0, "H100 PCIe"),
    (r"\bH100\b", 989.0, "H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    (r"\bG?H200\b", 989.0, "H200"),
    (r"\bA100\b", 312.0, "A100"),
    (r"\bL40S\b", 362.0, "L40S"),
    (r"\bL4\b", 121.0, "L4"),
    (r"\bA10\b", 125.0, "A10"),  # not A10G or A100: the word boundary
    (r"\bRTX 4090$", 165.0, "RTX 4090"),  # not the 4090 D or Laptop parts
)


class BenchError(RuntimeError):
    """The benchmark could not measure what it should (model not loaded, no output frame)."""


# ============================================================================ options and results

@dataclass(frozen=True)
class BenchOptions:
    """What `sdbridge bench` adds to the daemon's own settings."""

    seconds: float = 10.0  # the end-to-end measuring window
    input_fps: float = 0.0  # 0: automatic, 4 x the engine's fps as first measured, clamped to AUTO_INPUT_FPS
    compare: str | None = None  # "diffusers": time diffusers' own pipeline on the same model too
    peak_tflops: float | None = None  # the device peak, overriding the datasheet table and measurement
    command: str = ""  # the command line, for the report
    load_timeout_s: float = LOAD_TIMEOUT_S


@dataclass(frozen=True)
class Percentiles:
    """A latency distribution in milliseconds; None where there were no samples."""

    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    count: int


@dataclass(frozen=True)
class RingTransfer:
    """One frame through a ring: write plus read_latest (the copy in and the copy out)."""

    width: int
    height: int
    frame_bytes: int
    iterations: int
    median_ms: float
    p99_ms: float


@dataclass(frozen=True)
class EngineTiming:
    """Stream.render_pixels alone, called back to back on the render thread, before and after the
    end-to-end phase (together in the first four fields)."""

    frames: int
    ms_per_frame: float  # mean
    p50_ms: float
    fps: float
    before_ms_per_frame: float  # the mean of the frames timed before the end-to-end phase
    after_ms_per_frame: float  # and after it: far apart, the machine drifted during the run


@dataclass(frozen=True)
class EndToEnd:
    """What the client process saw through the rings while the daemon served."""

    span_s: float  # from the first to the last output of the window (their written_ns)
    outputs: int
    fps: float
    ms_per_frame: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    latency_samples: int
    input_fps: float  # the rate asked of the client
    input_fps_auto: bool
    input_fps_achieved: float
    client_cpu_percent: float  # of one core
    warmup_s: float
    # The render loop's own account of the same phase: its frames, and the time inside the engine's
    # per-frame call (launch to download) as it ran there, so the bridge's cost is seen without the
    # drift between phases that the bare-engine comparison suffers from.
    loop_frames: int = 0
    loop_engine_ms_per_frame: float | None = None
    loop_busy_percent: float | None = None  # time in the engine's call over the phase's time


@dataclass(frozen=True)
class ControlLatency:
    """An OSC change to the first output stamped with a newer state_version (written_ns - send time)."""

    address: str
    changes: int  # answered changes, the samples below
    latency_p50_ms: float | None
    latency_max_ms: float | None
    unanswered: int


@dataclass(frozen=True)
class MemoryPeak:
    """The memory high-water mark: the device's on CUDA (the end-to-end phase), else this process's RSS."""

    source: str  # "cuda", "rss" or "unavailable"
    scope: str
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None


@dataclass(frozen=True)
class FlopFigures:
    """The physical limit: FLOPs of one frame against the device's peak."""

    flops_per_frame: int | None  # matmul, convolution and attention FLOPs (2 per multiply-add)
    peak_tflops: float
    peak_source: str  # "datasheet (NAME)", "measured matmul" or "given"
    achieved_tflops: float | None  # flops_per_frame x end-to-end fps
    fraction_of_peak: float | None
    limit_fps: float | None  # the fps every FLOP at peak would give
    note: str = ""


@dataclass(frozen=True)
class Baseline:
    """diffusers' own pipeline on the same model, resolution and timesteps, called as a user would."""

    pipeline: str
    frames: int = 0
    ms_per_frame: float | None = None
    fps: float | None = None
    speedup_e2e: float | None = None  # our end-to-end fps / its fps
    speedup_engine: float | None = None  # our bare engine fps / its fps
    error: str | None = None


@dataclass(frozen=True)
class BenchResult:
    """Everything one `sdbridge bench` run measured, and under which conditions."""

    date: str
    command: str
    model: str
    arch: str
    test_model: bool
    autoencoder: str
    device: str
    device_name: str
    dtype: str
    fast_path: str  # the torch fast path in use: "eager", or e.g. "CUDA graphs, channels_last"
    backend: str  # what ran the model and why: "torch (...)" or "tensorrt (...)"
    width: int
    height: int
    steps: int
    mode: str
    stream_batch: bool
    strength: float
    guidance_scale: float
    load_s: float
    warm_up_s: float  # part of load_s: warm-up frames, torch.compile's compilation, CUDA graph capture
    load_average_1m: float | None  # the machine's load when the run started: other work skews every figure
    daemon_errors: int  # frames that failed and messages refused while the daemon ran: should be 0
    ring: RingTransfer
    engine: EngineTiming
    e2e: EndToEnd
    control: ControlLatency
    memory: MemoryPeak
    flops: FlopFigures
    diffusers: Baseline | None = None

    @property
    def warning(self) -> str | None:
        return TEST_MODEL_WARNING.format(name=self.model) if self.test_model else None

    @property
    def e2e_fps_percent_of_engine(self) -> float | None:
        return 100.0 * self.e2e.fps / self.engine.fps if self.engine.fps > 0 else None

    @property
    def overhead_ms_per_frame(self) -> float | None:
        """e2e frame time minus the bare engine's: what the bridge adds per frame."""
        return self.e2e.ms_per_frame - self.engine.ms_per_frame if self.e2e.ms_per_frame else None

    def to_json(self) -> dict[str, Any]:
        """For machines: every number with its unit in its key."""
        out = {"schema": "sdbridge-bench/1", **asdict(self)}
        out["warning"] = self.warning
        out["bridge"] = {"e2e_fps_percent_of_engine": self.e2e_fps_percent_of_engine,
                         "overhead_ms_per_frame": self.overhead_ms_per_frame}
        return out

    def markdown(self) -> str:
        """For people: a heading, the test-model warning, and one table."""
        e, g, f, c, r = self.e2e, self.engine, self.flops, self.control, self.ring
        title = (f"sdbridge bench: {self.model} ({self.arch}) {self.width}x{self.height}, {self.steps} step"
                 f"{'s' if self.steps != 1 else ''}, {self.mode}, {'stream batch' if self.stream_batch else 'exact'}")
        lines = [f"## {title}", ""]
        if self.warning:
            lines += [f"> {self.warning}.", ""]
        rows = [
            ("device", f"{self.device_name} ({self.device}), {self.dtype}"
                       + (f"; load average {self.load_average_1m:.2f} at start" if self.load_average_1m is not None
                          else "")),
            ("model", f"{self.model} ({self.arch}), autoencoder {self.autoencoder}, backend {self.backend}, "
                      f"{self.fast_path}; "
                      f"loaded in {self.load_s:.1f} s (warm-up {self.warm_up_s:.1f} s: compilation and graph capture "
                      "happen there)"),
            ("frame", f"{self.width}x{self.height}, {self.steps} step{'s' if self.steps != 1 else ''}, {self.mode}, "
                      f"strength {self.strength:g}, guidance {self.guidance_scale:g}, "
                      f"stream batch {'on' if self.stream_batch else 'off'}"),
            ("bare engine (render_pixels, on the render thread)",
             f"{g.fps:.2f} fps, {g.ms_per_frame:.2f} ms/frame (p50 {g.p50_ms:.2f} ms, {g.frames} frames; "
             f"{g.before_ms_per_frame:.2f} ms before and {g.after_ms_per_frame:.2f} ms after the end-to-end phase)"),
            ("end to end (client process, rings)", f"**{e.fps:.2f} fps**, {_ms(e.ms_per_frame)}/frame "
                                                   f"({e.outputs} outputs in {e.span_s:.1f} s)"),
            ("render loop during it", f"{e.loop_frames} frames, {_ms(e.loop_engine_ms_per_frame)}/frame inside the "
                                      f"engine's call, busy {_pct(e.loop_busy_percent)} of the time"),
            ("latency source_ns to written_ns", f"p50 {_ms(e.latency_p50_ms)}, p95 {_ms(e.latency_p95_ms)}, "
                                                f"**p99 {_ms(e.latency_p99_ms)}** ({e.latency_samples} frames)"),
            ("bridge overhead", f"e2e fps = {_pct(self.e2e_fps_percent_of_engine)} of bare engine fps; "
                                f"{_signed_ms(self.overhead_ms_per_frame)}/frame"),
            ("input", f"{e.input_fps:.0f} fps asked{' (auto: 4x the engine)' if e.input_fps_auto else ''}, "
                      f"{e.input_fps_achieved:.0f} fps written; client CPU {e.client_cpu_percent:.0f}% of a core"),
            (f"control latency ({c.address} to first output)", f"p50 {_ms(c.latency_p50_ms)}, "
                                                               f"max {_ms(c.latency_max_ms)}"
                                                               f" ({c.changes} change{'s' if c.changes != 1 else ''}, "
                                                               f"{c.unanswered} unanswered)"),
            ("memory peak", _memory(self.memory)),
            ("FLOPs per frame", f"{_flops(f.flops_per_frame)} (encoder + {self.steps} UNet step"
                                f"{'s' if self.steps != 1 else ''} + decoder){'; ' + f.note if f.note else ''}"),
            ("device peak", f"{f.peak_tflops:.3g} TFLOP/s ({f.peak_source})"),
            ("achieved (FLOPs/frame x e2e fps)", "n/a" if f.achieved_tflops is None else
             f"{f.achieved_tflops:.3g} TFLOP/s = {_pct(100 * f.fraction_of_peak, 1)} of peak; "
             f"physical limit {f.limit_fps:.3g} fps"),
            (f"ring transfer {r.width}x{r.height} RGBA uint8", f"median {r.median_ms:.3f} ms, p99 {r.p99_ms:.3f} ms "
                                                               f"({r.iterations} write + read_latest)"),
        ]
        if self.diffusers is not None:
            d = self.diffusers
            value = (f"failed: {d.error}" if d.error else
                     f"{d.fps:.2f} fps, {d.ms_per_frame:.2f} ms/frame ({d.frames} frames); "
                     f"speed-up **{d.speedup_e2e:.2f}x** "
                     f"end to end, {d.speedup_engine:.2f}x bare engine")
            rows.append((f"diffusers {d.pipeline}", value))
        rows += [("daemon errors", f"{self.daemon_errors}" + (" (see the log: figures with failed frames are suspect)"
                                                              if self.daemon_errors else "")),
                 ("date", self.date), ("command", f"`{self.command}`")]
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f} ms" if value >= 100 else f"{value:.2f} ms"


def _signed_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} ms"


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}%"


def _flops(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value} FLOP"


def _memory(m: MemoryPeak) -> str:
    mib = 1024 * 1024
    if m.source == "cuda":
        return (f"{m.peak_allocated_bytes / mib:.0f} MiB allocated, {m.peak_reserved_bytes / mib:.0f} MiB reserved "
                f"({m.scope})")
    if m.source == "rss":
        return f"{m.peak_rss_bytes / mib:.0f} MiB RSS ({m.scope})"
    return f"n/a ({m.scope})"


# ============================================================================ pure helpers

def percentiles(values_ms: Sequence[float]) -> Percentiles:
    """p50 / p95 / p99 / max of a sample (linear interpolation between order statistics, numpy's
    default); None for each when there are no samples."""
    if len(values_ms) == 0:
        return Percentiles(None, None, None, None, 0)
    p50, p95, p99 = (float(v) for v in np.percentile(np.asarray(values_ms, np.float64), (50, 95, 99)))
    return Percentiles(p50, p95, p99, float(max(values_ms)), len(values_ms))


def datasheet_peak_tflops(device_name: str) -> tuple[float, str] | None:
    """The datasheet dense fp16/bf16 tensor-core TFLOP/s of a GPU by its torch name, and the part it
    was matched as; None when the table holds no sure number for it."""
    for pattern, tflops, label in DATASHEET_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return None if tflops is None else (tflops, label)
    return None


def auto_input_fps(engine_fps: float) -> float:
    """The client's rate when none is given: fast enough that the daemon never waits for a frame,
    slow enough that the client does not burn a core."""
    low, high = AUTO_INPUT_FPS
    return min(high, max(low, 4.0 * engine_fps))


def cpu_name() -> str:
    """The CPU's marketing name and core count, as far as the platform tells."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


# ============================================================================ measurements

def measure_ring_transfer(width: int, height: int, instance: str, iterations: int = RING_ITERATIONS,
                          max_s: float = RING_MAX_S) -> RingTransfer:
    """Time one WxH RGBA uint8 frame through a scratch ring `sdb_<instance>_x`: write, then read_latest
    (which copies the pixels out, as every reader does). Stops early after `max_s`."""
    frames = bench_client.pattern_frames(width, height, 2)
    ring = shm.Ring.create(shm.ring_name(instance, "x"), shm.slot_capacity_for(width, height, 4, 1))
    times: list[float] = []
    try:
        for i in range(10):  # first touches of the slots' pages
            ring.read_latest(after_seq=ring.write(frames[i % 2], frame_id=i) - 1)
        deadline = time.perf_counter() + max_s
        for i in range(iterations):
            started = time.perf_counter_ns()
            seq = ring.write(frames[i % 2], frame_id=i)
            frame = ring.read_latest(after_seq=seq - 1)
            times.append((time.perf_counter_ns() - started) / 1e6)
            if frame is None:
                raise BenchError("the scratch ring returned no frame")
            if time.perf_counter() > deadline and len(times) >= 50:
                break
    finally:
        ring.close()
        ring.unlink()
    return RingTransfer(width, height, width * height * 4, len(times), float(np.median(times)),
                        float(np.percentile(times, 99)))


def measure_matmul_tflops(device: Any, dtype: Any, repeats: int = 3) -> float:
    """The device's dense matmul throughput right now in `dtype`: the best of `repeats` timed runs of a
    square matmul large enough to be compute-bound."""
    import torch

    cuda = device.type == "cuda"
    size = 8192 if cuda else (2048 if dtype == torch.float32 else 1024)
    per_run = 10 if cuda else 1  # a GPU matmul is too short to time alone
    with torch.inference_mode():
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # kernel selection, first-touch allocation
        best = math.inf
        for _ in range(repeats):
            sync_device(device)
            started = time.perf_counter()
            for _ in range(per_run):
                a @ b
            sync_device(device)
            best = min(best, (time.perf_counter() - started) / per_run)
    return 2.0 * size**3 / best / 1e12


def sync_device(device: Any) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def device_peak(device: Any, dtype: Any, given: float | None) -> tuple[float, str]:
    """The peak TFLOP/s to compare against and where it came from."""
    import torch

    if given is not None:
        return given, "given"
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        hit = datasheet_peak_tflops(torch.cuda.get_device_name(device))
        if hit is not None:
            return hit[0], f"datasheet ({hit[1]}, dense fp16/bf16 tensor core)"
    return measure_matmul_tflops(device, dtype), f"measured matmul ({str(dtype).replace('torch.', '')})"


def time_engine(stream: Any, output: Any, frames: Sequence[np.ndarray], seconds: float, device: Any) -> list[float]:
    """The times (ms) of `stream.render_pixels` called back to back on the calling thread, for about
    ENGINE_SHARE of `seconds` and at least MIN_ENGINE_FRAMES frames, after a warm-up. The caller keeps
    the render loop away from the stream (call_between_frames runs this on the render thread)."""
    call = _engine_call(stream, output, frames)
    for _ in range(3 + stream.settings.steps):  # kernel choice, caches; stream batch: fill the frames in flight
        call()
    sync_device(device)
    started = time.perf_counter()
    call()
    estimate = time.perf_counter() - started
    count = min(MAX_TIMED_FRAMES, max(MIN_ENGINE_FRAMES, math.ceil(ENGINE_SHARE * seconds / max(estimate, 1e-6))))
    times: list[float] = []
    for _ in range(count):
        t = time.perf_counter()
        call()  # returns host pixels, so the device has finished the frame when it returns
        times.append(1000 * (time.perf_counter() - t))
    return times


def engine_timing(before: Sequence[float], after: Sequence[float]) -> EngineTiming:
    """The bare engine from its frame times (ms) before and after the end-to-end phase, together."""
    times = [*before, *after]
    mean = float(np.mean(times))
    return EngineTiming(len(times), mean, float(np.median(times)), 1000 / mean, float(np.mean(before)),
                        float(np.mean(after)))


def count_flops(stream: Any, output: Any, frames: Sequence[np.ndarray]) -> int | None:
    """FLOPs of one per-frame call. A replayed CUDA graph runs kernels the counter never sees, and a
    compiled UNet may not show its ops either: the count is over one eager call of the UNet's own
    forward (the same FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    call = _engine_call(stream, output, frames)
    graphs, stream.graphs = getattr(stream, "graphs", None), None
    try:
        with _uncompiled(stream.model.unet), FlopCounterMode(display=False) as counter:
            call()
    finally:
        stream.graphs = graphs
    return int(counter.get_total_flops()) or None


def _engine_call(stream: Any, output: Any, frames: Sequence[np.ndarray]) -> Callable[[], np.ndarray]:
    """One bare-engine frame per call, cycling through `frames` (none in txt2img)."""
    from engines.stream import TXT2IMG

    txt2img = stream.settings.mode == TXT2IMG
    index = 0

    def call() -> np.ndarray:
        nonlocal index
        index += 1
        # no tag: in stream batch these frames are still in flight when the render loop takes over, and
        # the loop reads an output's tag as the input ring frame it came from
        return stream.render_pixels(None if txt2img else frames[index % len(frames)], output)
    return call


@contextlib.contextmanager
def _uncompiled(unet: Any) -> Iterator[None]:
    """The UNet's own forward for a while: torch.compile (engines.backends.torch_backend) installs the
    compiled one as an instance attribute, which hides the class's."""
    compiled = vars(unet).pop("forward", None)
    try:
        yield
    finally:
        if compiled is not None:
            unet.forward = compiled


@contextlib.contextmanager
def _default_layout(modules: Sequence[Any], channels_last: bool) -> Iterator[None]:
    """Modules in torch's default memory layout for a while, as a user's pipeline would have them."""
    import torch

    if channels_last:
        for module in modules:
            module.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        if channels_last:
            for module in modules:
                module.to(memory_format=torch.channels_last)


def memory_peak_reset(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def memory_peak(device: Any) -> MemoryPeak:
    """The device's peak since memory_peak_reset on CUDA; else this process's peak RSS over its life."""
    if device.type == "cuda":
        import torch

        return MemoryPeak("cuda", "end-to-end phase, torch allocator", torch.cuda.max_memory_allocated(device),
                          torch.cuda.max_memory_reserved(device))
    try:
        import resource
    except ImportError:  # Windows
        return MemoryPeak("unavailable", "no resource module on this platform")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return MemoryPeak("rss", "bench process peak RSS over the whole run up to the end of the e2e phase, "
                      "model load included; the client process not counted", peak_rss_bytes=rss)


def diffusers_baseline(stream: Any, frames: Sequence[np.ndarray], seconds: float, device: Any, dtype: Any,
                       channels_last: bool = False) -> Baseline:
    """Time diffusers' own pipeline on the stream's model components as a user would call it: the
    prompt text every call, an image tensor in, output_type="np" out, with our exact timesteps (so
    both do the same UNet work) and the guidance as configured. The modules run as loaded: our fast
    path's compiled UNet and channels_last layout (`channels_last`: it is on) are undone meanwhile."""
    import torch
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)

    from engines.stream import TXT2IMG, timesteps_for

    model, settings = stream.model, stream.settings
    txt2img = settings.mode == TXT2IMG
    if model.xl:
        cls = StableDiffusionXLPipeline if txt2img else StableDiffusionXLImg2ImgPipeline
    else:
        cls = StableDiffusionPipeline if txt2img else StableDiffusionImg2ImgPipeline
    timesteps = list(timesteps_for(settings.strength, settings.steps, settings.mode, stream.train_steps,
                                   settings.t_index_list))
    if not timesteps:
        return Baseline(cls.__name__, error="strength 0 runs no denoising step; diffusers' pipeline cannot")
    vae = model.autoencoder.module
    if vae.dtype != dtype:  # our autoencoder may have upcast a force_upcast VAE; the pipeline expects it as loaded
        vae.to(dtype=dtype)
    components: dict[str, Any] = {"vae": vae, "text_encoder": model.text_encoder, "tokenizer": model.tokenizer,
                                  "unet": model.unet, "scheduler": model.scheduler}
    if model.xl:
        components.update(text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                          force_zeros_for_empty_prompt=True)
        if not txt2img:
            components["requires_aesthetics_score"] = False
    else:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = cls(**components)
    except Exception as e:  # a model whose components diffusers' pipeline will not take
        return Baseline(cls.__name__, error=f"{type(e).__name__}: {e}")
    pipe.set_progress_bar_config(disable=True)
    images = [torch.from_numpy(np.ascontiguousarray(f[:, :, :3])).permute(2, 0, 1).unsqueeze(0)
              .to(device=device, dtype=dtype) / 255.0 for f in frames]
    generator = torch.Generator(device=device).manual_seed(max(0, settings.seed))
    kwargs: dict[str, Any] = {"timesteps": timesteps, "guidance_scale": settings.guidance_scale,
                              "generator": generator, "output_type": "np",
                              "clip_skip": settings.clip_skip - 1 or None}  # A1111's 1 is diffusers' None
    if settings.guidance_scale > 1.0:
        kwargs["negative_prompt"] = settings.negative_prompt
    if txt2img:
        kwargs.update(width=settings.width, height=settings.height)
    else:
        kwargs["strength"] = 1.0  # noise at the first of our timesteps, as our strength mapping does
    index = 0

    def call() -> None:
        nonlocal index
        index += 1
        extra = {} if txt2img else {"image": images[index % len(images)]}
        pipe(prompt=settings.prompt, **extra, **kwargs)

    # diffusers warns on every call that our first timestep is not 999: it is, by design, strength's
    try:
        with _diffusers_quiet(), _uncompiled(model.unet), _default_layout([model.unet, vae], channels_last):
            for _ in range(2):
                call()
            started = time.perf_counter()
            call()
            estimate = time.perf_counter() - started
            count = min(MAX_TIMED_FRAMES, max(BASELINE_MIN_FRAMES,
                                              math.ceil(ENGINE_SHARE * seconds / max(estimate, 1e-6))))
            started = time.perf_counter()
            for _ in range(count):
                call()  # output_type="np" returns host arrays: the device is done when it returns
            total = time.perf_counter() - started
    except Exception as e:
        log.warning("diffusers %s failed: %s", cls.__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
        return Baseline(cls.__name__, error=f"{type(e).__name__}: {e}")
    return Baseline(cls.__name__, count, 1000 * total / count, count / total)


@contextlib.contextmanager
def _diffusers_quiet() -> Iterator[None]:
    """diffusers' own log level at error for a while, then back to what it was."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


# ============================================================================ the run

def run(settings: Settings, initial: Mapping[str, Any] | None = None,
        options: BenchOptions = BenchOptions()) -> BenchResult:
    """Load the model into an in-process daemon, measure it (module docstring) and return the figures.

    Raises BenchError when the model fails to load or no output frame arrives, ModelError when it is
    not found at all."""
    import torch

    from engines.stream import timesteps_for

    from .daemon import Daemon
    from .loop import stream_settings

    values = {**params.defaults(), **params.validate(initial or {})}
    initial = dict(initial or {}, pause=False)
    width, height, mode = values["width"], values["height"], values["mode"]
    if mode == "txt2img":
        # txt2img renders a frame only when something changes, unless the seed is -1; and a /seed change
        # would end that, so the control change played is the prompt
        initial["seed"] = -1
        control = ("/prompt", (values["prompt"] + ", at dawn", values["prompt"] + ", at dusk"))
    else:
        control = ("/seed", (1001, 1002))
    instance = f"bench{os.getpid() % 100000}"
    # A private instance and ports, unadvertised, so that a benchmark never disturbs a running show;
    # rings that fit.
    settings = replace(settings, instance=instance, osc_port=0, telemetry_port=osc.free_udp_port(), http_port=0,
                       oscquery_port=0, mdns=False, max_width=max(settings.max_width, width), max_height=max(settings.max_height, height))
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # not on Windows

    daemon = Daemon(settings, initial)  # ModelError here: no such model (nothing is created yet)
    daemon.engines.build_in_background = False  # a build would compete with what is measured, then swap mid-run
    device, dtype = daemon.device, daemon.dtype
    fast_path = getattr(daemon, "fast_path", None)  # engines.backends.torch_backend.TorchOptions
    # on a quiet machine: before the daemon's threads start
    ring = measure_ring_transfer(width, height, instance)
    log.info("ring transfer %dx%d RGBA uint8: median %.3f ms, p99 %.3f ms", width, height, ring.median_ms, ring.p99_ms)
    try:
        started = time.monotonic()
        daemon.start()
        if not daemon.wait_ready(timeout=options.load_timeout_s):
            if not daemon.loop.ready.is_set():
                raise BenchError(f"model {settings.model!r} did not load within {options.load_timeout_s:.0f} s")
            raise BenchError(f"model {settings.model!r} failed to load; see the log above")
        load_s = time.monotonic() - started
        stream = daemon.loop.stream
        backend = daemon.engines.describe(stream)
        frames = bench_client.pattern_frames(width, height, PATTERN_FRAMES)

        # The bare engine runs on the render thread itself, between two of its frames: the thread, torch
        # thread pool and memory arena that serve the frames (a second thread running torch beside an
        # idle render thread measured ~60% slower on a 2-core CPU: libgomp stops spin-waiting when its
        # pools hold more threads than there are cores). It is timed before and after the end-to-end
        # phase, so that drift of the machine over the run falls on both sides of the comparison.
        snap = daemon.store.snapshot()
        engine_timeout = BASE_TIMEOUT_S + (MIN_ENGINE_FRAMES + 8) * load_s + 2 * options.seconds

        def bare_engine(stream: Any) -> list[float]:
            stream.prepare(stream_settings(snap))
            return time_engine(stream, daemon.output, frames, options.seconds / 2, device)

        before = daemon.loop.call_between_frames(bare_engine, engine_timeout)
        estimate_fps = 1000 / float(np.mean(before))

        input_fps = options.input_fps or auto_input_fps(estimate_fps)
        memory_peak_reset(device)
        client_args = bench_client.ClientArgs(
            name_in=daemon.name_in, name_out=daemon.name_out, osc_port=daemon.osc_port, width=width, height=height,
            input_fps=input_fps, seconds=options.seconds, pattern_frames=PATTERN_FRAMES,
            first_output_timeout_s=max(30.0, 20 / estimate_fps), control_address=control[0],
            control_values=control[1])
        log.info("end to end: a client process streams %dx%d at %.0f fps for %.1f s", width, height, input_fps,
                 options.seconds)
        stats = daemon.loop.stats
        loop_before = (time.monotonic(), stats.frames, stats.engine_s)
        seen = run_client(client_args)
        loop_after = (time.monotonic(), stats.frames, stats.engine_s)
        memory = memory_peak(device)
        after = daemon.loop.call_between_frames(bare_engine, engine_timeout)
        engine = engine_timing(before, after)
        warm_up_s = stream.warm_up_s
        graphs = stream.graphs
        arch, autoencoder, test_model = stream.model.arch, stream.model.autoencoder.name, stream.model.test_model
        model_name = daemon.loop.serving[0] or settings.model
        snap = daemon.store.snapshot()
    finally:
        daemon.stop()

    # FLOPs, the peak and the baseline take no part in the timing comparison: on workers, daemon stopped.
    def flops_of_a_frame() -> int | None:
        stream.prepare(stream_settings(snap))
        return count_flops(stream, daemon.output, frames)

    flops = _on_worker_thread(flops_of_a_frame, what="FLOP count", timeout=BASE_TIMEOUT_S + 10 * load_s)
    log.info("bare engine: %.2f ms/frame, %.2f fps over %d frames (%.2f before, %.2f ms after the end-to-end phase); "
             "%s FLOPs per frame", engine.ms_per_frame, engine.fps, engine.frames, engine.before_ms_per_frame,
             engine.after_ms_per_frame, flops)
    if daemon.errors:
        log.warning("the daemon reported %d errors during the benchmark (see above)", daemon.errors)

    latency = percentiles(seen["latencies_ms"])
    e2e = EndToEnd(span_s=seen["span_s"], outputs=seen["outputs"], fps=seen["fps"],
                   ms_per_frame=1000 / seen["fps"] if seen["fps"] > 0 else None,
                   latency_p50_ms=latency.p50_ms, latency_p95_ms=latency.p95_ms, latency_p99_ms=latency.p99_ms,
                   latency_max_ms=latency.max_ms, latency_samples=latency.count, input_fps=input_fps,
                   input_fps_auto=not options.input_fps, input_fps_achieved=seen["input_fps_achieved"],
                   client_cpu_percent=seen["client_cpu_percent"], warmup_s=seen["warmup_s"],
                   **_loop_account(loop_before, loop_after))
    answered = percentiles(seen["control_latencies_ms"])
    control_latency = ControlLatency(control[0], answered.count, answered.p50_ms, answered.max_ms,
                                     seen["control_unanswered"])

    peak, source = _on_worker_thread(lambda: device_peak(device, dtype, options.peak_tflops), timeout=600,
                                     what="peak measurement")
    achieved = flops * e2e.fps / 1e12 if flops else None
    flop_figures = FlopFigures(flops, peak, source, achieved, achieved / peak if achieved is not None else None,
                               peak * 1e12 / flops if flops else None,
                               "" if flops else "not counted: even the eager per-frame call ran no op that "
                               "FlopCounterMode sees")

    baseline = None
    if options.compare == "diffusers":
        log.info("diffusers baseline on the same model, %dx%d, timesteps %s", width, height,
                 list(timesteps_for(stream.settings.strength, stream.settings.steps, stream.settings.mode,
                                    stream.train_steps, stream.settings.t_index_list)))
        channels_last = bool(getattr(fast_path, "channels_last", False))
        baseline = _on_worker_thread(lambda: diffusers_baseline(stream, frames, options.seconds, device, dtype,
                                                                channels_last),
                                     timeout=BASE_TIMEOUT_S + 20 * load_s + 2 * options.seconds,
                                     what="diffusers baseline")
        if baseline.fps:
            baseline = replace(baseline, speedup_e2e=e2e.fps / baseline.fps, speedup_engine=engine.fps / baseline.fps)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return BenchResult(
        date=date, command=options.command, model=model_name, arch=arch, test_model=test_model,
        autoencoder=autoencoder, device=str(device), device_name=device_name,
        dtype=str(dtype).replace("torch.", ""), fast_path=_fast_path(fast_path, graphs),
        backend=backend,
        width=width, height=height, steps=snap["steps"], mode=mode,
        stream_batch=settings.stream_batch, strength=snap["strength"], guidance_scale=snap["guidance_scale"],
        load_s=load_s, warm_up_s=warm_up_s, load_average_1m=load_average, daemon_errors=daemon.errors, ring=ring, engine=engine, e2e=e2e,
        control=control_latency, memory=memory,
        flops=flop_figures, diffusers=baseline)


def _fast_path(options: Any, graphs: Any) -> str:
    """The fast path as it ran: the options, and whether CUDA graphs really replayed."""
    text = options.describe() if options is not None else "eager"
    if graphs is not None and getattr(graphs, "failed", ""):
        text += f" (CUDA graph capture failed, ran eagerly: {graphs.failed})"
    elif graphs is not None:
        text += f" ({graphs.captured} graph{'s' if graphs.captured != 1 else ''} captured)"
    return text


def _loop_account(before: tuple[float, int, float], after: tuple[float, int, float]) -> dict[str, Any]:
    """The render loop's frames and engine time between two (time, frames, engine_s) readings."""
    seconds, frames, engine_s = (a - b for a, b in zip(after, before))
    return {"loop_frames": frames,
            "loop_engine_ms_per_frame": 1000 * engine_s / frames if frames else None,
            "loop_busy_percent": 100 * engine_s / seconds if seconds > 0 else None}


def _on_worker_thread(work: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run `work` on a fresh thread and return its result (or raise its exception)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as e:  # handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name=f"sdbridge-bench-{what.replace(' ', '-')}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise BenchError(f"{what} did not finish within {timeout:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that runs this checkout's bridge package, wherever this
    process was started from, with `extra` variables set (the bench's client, the soak's daemon)."""
    root = str(Path(__file__).resolve().parent.parent)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])), **extra)


def run_client(args: bench_client.ClientArgs) -> dict[str, Any]:
    """Run bridge.bench_client in its own process and return its report; BenchError if it saw nothing."""
    env = child_env(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")  # numpy's copies need no thread pool
    timeout = args.first_output_timeout_s + args.seconds + CLIENT_SLACK_S
    proc = subprocess.Popen([sys.executable, "-m", "bridge.bench_client", json.dumps(asdict(args))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"the bench client did not finish within {timeout:.0f} s") from None
    finally:
        if proc.poll() is None:  # interrupted: never leave the client writing into a removed ring
            proc.kill()
            proc.wait()
    if stderr.strip():
        log.debug("bench client stderr:\n%s", stderr.strip())
    try:
        report = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"the bench client exited with {proc.returncode} and no report:\n"
                         f"{stderr.strip()[-2000:]}") from None
    if report.get("error"):
        raise BenchError(f"end to end: {report['error']}")
    return report
