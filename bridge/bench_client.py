"""The client half of `sdbridge bench`: a separate process that plays TouchDesigner's part at full rate.

It writes a moving pattern into a daemon's input ring at a fixed rate, reads the newest frame of the
output ring, plays a control change over OSC now and then, and prints what it saw as one JSON object
on stdout. `bridge.bench` starts it as `python -m bridge.bench_client '<json arguments>'`.

Every time it reports is taken from the slot headers (`time.monotonic_ns()` is system-wide), so its
own polling never enters a latency; it wakes once per input frame, looks at the output ring and sleeps.
It imports only numpy, bridge.shm and python-osc, never torch: on a small machine it shares the CPU
with the daemon it measures, and must cost no more than a real client.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pythonosc.udp_client import SimpleUDPClient

from . import shm

ATTACH_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 10.0  # a control change not seen in an output by then counts as unanswered
WARMUP_OUTPUTS = 3  # outputs seen before measuring, besides the warm-up time


@dataclass(frozen=True)
class ClientArgs:
    """What the bench asks of the client (the JSON object on its command line)."""

    name_in: str
    name_out: str
    osc_port: int
    width: int
    height: int
    input_fps: float
    seconds: float
    warmup_s: float = 0.5
    first_output_timeout_s: float = 30.0
    control_interval_s: float = 0.5
    # the OSC address played for control latency and the values it cycles through
    control_address: str = "/seed"
    control_values: tuple = (1001, 1002)
    pattern_frames: int = 8


@dataclass
class ClientReport:
    """What the client saw in its measuring window; times in the names' units."""

    outputs: int = 0  # output frames the daemon wrote in the window (by seq, whether read or not)
    span_s: float = 0.0  # from the window's first output's written_ns to its last one's
    fps: float = 0.0
    latencies_ms: list = field(default_factory=list)  # written_ns - source_ns of each output read
    inputs_written: int = 0
    input_fps_achieved: float = 0.0
    client_cpu_percent: float = 0.0  # of one core, over the window
    control_latencies_ms: list = field(default_factory=list)
    control_sent: int = 0
    control_unanswered: int = 0
    warmup_s: float = 0.0
    error: str | None = None


def pattern_frames(width: int, height: int, count: int = 8) -> list[np.ndarray]:
    """`count` distinct RGBA uint8 frames of one moving picture (gradients, a checker and a disc), made
    once so that writing a frame costs a copy and nothing more. Each differs from the next, so the
    daemon's similarity filter never skips one."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(count):
        t = i / count
        cx, cy = width * (0.5 + 0.3 * np.cos(2 * np.pi * t)), height * (0.5 + 0.3 * np.sin(2 * np.pi * t))
        disc = (x - cx) ** 2 + (y - cy) ** 2 < (min(width, height) * 0.18) ** 2
        checker = ((x // 32 + y // 32 + i) % 2) == 0
        rgba = np.empty((height, width, 4), np.uint8)
        rgba[..., 0] = (x / width * 255 + t * 255) % 256
        rgba[..., 1] = y / height * 255
        rgba[..., 2] = np.where(checker, 40, 200)
        rgba[..., 3] = 255
        rgba[disc, :3] = (250, 240, 60)
        frames.append(rgba)
    return frames


def _attach(name: str) -> shm.Ring:
    end = time.monotonic() + ATTACH_TIMEOUT_S
    while True:
        try:
            return shm.Ring.attach(name)
        except FileNotFoundError:
            if time.monotonic() > end:
                raise RuntimeError(f"ring {name} does not exist (is the daemon running?)") from None
            time.sleep(0.05)


class _Control:
    """One control change in flight at a time: sent, then answered by the first output whose
    state_version is above every version seen before sending."""

    def __init__(self, client: SimpleUDPClient, address: str, values: tuple, interval_s: float):
        self.client, self.address, self.values, self.interval_s = client, address, values, interval_s
        self.sent = 0
        self.latencies_ms: list[float] = []
        self.unanswered = 0
        self._pending: tuple[int, int] | None = None  # (send_ns, highest version seen before sending)
        self._next = 0.0

    def start(self, now: float) -> None:
        self._next = now + self.interval_s / 2

    def tick(self, now: float, seen_version: int) -> None:
        if self._pending is not None:
            if (time.monotonic_ns() - self._pending[0]) / 1e9 > CONTROL_TIMEOUT_S:
                self.unanswered += 1
                self._pending = None
            return
        if now < self._next:
            return
        value = self.values[self.sent % len(self.values)]
        self._pending = (time.monotonic_ns(), seen_version)
        self.client.send_message(self.address, value)
        self.sent += 1
        self._next = now + self.interval_s

    def output(self, frame: shm.Frame) -> None:
        if self._pending is not None and frame.state_version > self._pending[1]:
            self.latencies_ms.append((frame.written_ns - self._pending[0]) / 1e6)
            self._pending = None


def run(args: ClientArgs) -> ClientReport:
    """Stream frames at `args.input_fps` for the warm-up and then `args.seconds`, and report."""
    report = ClientReport()
    frames = pattern_frames(args.width, args.height, args.pattern_frames)
    ring_in, ring_out = _attach(args.name_in), _attach(args.name_out)
    control = _Control(SimpleUDPClient("127.0.0.1", args.osc_port), args.control_address,
                       tuple(args.control_values), args.control_interval_s)
    period = 1.0 / args.input_fps
    try:
        frame_id = 0
        last_seq = ring_out.write_seq
        seen_version = 0
        warm_outputs = 0
        start = time.monotonic()
        next_write = start
        measuring = False
        window: dict[str, Any] = {}
        while True:
            now = time.monotonic()
            if now >= next_write:
                frame_id += 1
                ring_in.write(frames[frame_id % len(frames)], frame_id=frame_id)
                next_write += period
                if now - next_write > 4 * period:  # preempted for a while: do not burst to catch up
                    next_write = now + period
            out = ring_out.read_latest(after_seq=last_seq)
            if out is not None:
                last_seq = out.seq
                seen_version = max(seen_version, out.state_version)
                if measuring:
                    report.latencies_ms.append((out.written_ns - out.source_ns) / 1e6)
                    window["last"] = (out.seq, out.written_ns)
                    control.output(out)
                else:
                    warm_outputs += 1
            if not measuring:
                if now - start > args.first_output_timeout_s:
                    report.error = (f"no output frame arrived within {args.first_output_timeout_s:.0f} s of the "
                                    "first input frame" if warm_outputs == 0 else
                                    f"only {warm_outputs} output frames arrived within "
                                    f"{args.first_output_timeout_s:.0f} s; the daemon stalled")
                    return report
                if warm_outputs >= WARMUP_OUTPUTS and now - start >= args.warmup_s and out is not None:
                    # the window opens at an output, so that outputs / span counts whole frame intervals
                    measuring = True
                    report.warmup_s = now - start
                    window = {"start": now, "first": (out.seq, out.written_ns), "last": (out.seq, out.written_ns),
                              "first_frame_id": frame_id, "cpu": time.process_time()}
                    control.start(now)
            else:
                control.tick(now, seen_version)
                if now - window["start"] >= args.seconds:
                    break
            # Wake once per input frame and no more: every time reported comes from the slot headers, so
            # reading the output ring more often would only take CPU from the daemon being measured.
            time.sleep(max(0.0, next_write - time.monotonic()))
        elapsed = time.monotonic() - window["start"]
        (first_seq, first_ns), (last_seq_w, last_ns) = window["first"], window["last"]
        report.outputs = last_seq_w - first_seq
        report.span_s = (last_ns - first_ns) / 1e9
        report.fps = report.outputs / report.span_s if report.span_s > 0 else 0.0
        report.inputs_written = frame_id - window["first_frame_id"]
        report.input_fps_achieved = report.inputs_written / elapsed
        report.client_cpu_percent = 100.0 * (time.process_time() - window["cpu"]) / elapsed
        report.control_latencies_ms = control.latencies_ms
        report.control_sent = control.sent
        report.control_unanswered = control.unanswered
        if report.outputs == 0:
            report.error = f"no new output frame arrived in the {args.seconds:g} s measuring window"
        return report
    finally:
        ring_in.close()
        ring_out.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bridge.bench_client '<json arguments>' (bridge.bench starts it)", file=sys.stderr)
        return 2
    raw = json.loads(argv[1])
    raw["control_values"] = tuple(raw.get("control_values", ClientArgs.control_values))
    try:
        report = run(ClientArgs(**raw))
    except (RuntimeError, shm.RingError, OSError) as e:
        report = ClientReport(error=str(e))
    print(json.dumps(asdict(report)), flush=True)
    return 1 if report.error else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
