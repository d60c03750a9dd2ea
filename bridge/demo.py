"""`sdbridge demo`: the whole product in one command, with no TouchDesigner and no weights.

It starts a daemon in-process (on its own instance name and ports, whatever the flags say), plays the
part of a client exactly as TouchDesigner would (frames into the input ring, outputs read from the
output ring, prompt and seed changes as real OSC packets over UDP), writes a PNG contact sheet of
inputs and outputs, and prints one summary line.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw
from pythonosc.udp_client import SimpleUDPClient

from . import bench_client, osc, shm
from .config import Settings
from .daemon import Daemon
from .web import display_pixels

log = logging.getLogger(__name__)

# (fraction of the run, OSC address, value): the live changes the demo plays.
SCRIPT = (
    (0.0, "/prompt", "a glowing jellyfish in deep blue water"),
    (0.0, "/seed", 3),
    (0.35, "/prompt", "a field of sunflowers under a stormy sky"),
    (0.35, "/seed", 42),
    (0.7, "/strength", 0.8),
    (0.7, "/seed", 7),
)
PATTERN_LOOP = 48  # frames of the moving pattern (bench_client's), played in a loop
PATTERN_SIZE = 512
SHEET_COLUMNS = 6
THUMB = 160


@dataclass(frozen=True)
class DemoResult:
    frames: int
    seconds: float
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    sheet: Path

    def summary(self) -> str:
        return (f"demo: {self.frames} frames in {self.seconds:.1f} s, {self.fps:.1f} fps, latency p50 "
                f"{self.latency_p50_ms:.0f} ms, p95 {self.latency_p95_ms:.0f} ms (source_ns to written_ns); "
                f"contact sheet {self.sheet}")


def run(settings: Settings, initial: Mapping[str, Any] | None = None, seconds: float = 12.0,
        out_dir: str | Path = ".", input_fps: float = 30.0) -> DemoResult:
    """Run the demo against a fresh in-process daemon and return its figures."""
    # A private instance and ports, unadvertised, so that a demo never disturbs a running show.
    settings = replace(settings, instance=f"demo{os.getpid() % 100000}", osc_port=0,
                       telemetry_port=osc.free_udp_port(), http_port=0, oscquery_port=0, mdns=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with Daemon(settings, initial) as daemon:
        if not daemon.wait_ready(timeout=300):
            raise RuntimeError("the model did not load; see the log above")
        ring_in, ring_out = shm.Ring.attach(daemon.name_in), shm.Ring.attach(daemon.name_out)
        osc_client = SimpleUDPClient("127.0.0.1", daemon.osc_port)
        try:
            return _play(ring_in, ring_out, osc_client, seconds, out_dir, input_fps)
        finally:
            ring_in.close()
            ring_out.close()


def _play(ring_in: shm.Ring, ring_out: shm.Ring, osc_client: SimpleUDPClient, seconds: float, out_dir: Path,
          input_fps: float) -> DemoResult:
    sent: dict[int, np.ndarray] = {}  # frame_id -> input, kept only for the frames the sheet may show
    latencies: list[float] = []
    sheet: list[tuple[np.ndarray, np.ndarray]] = []
    script = list(SCRIPT)
    frame_id, last_seq, first_out, last_out = 0, ring_out.write_seq, None, None
    # The pattern is drawn before the clock starts: drawn per frame it took a third of a CPU core and the
    # interpreter lock from the daemon it is showing off (2.0 against 4 fps on a 2-core machine).
    loop = bench_client.pattern_frames(PATTERN_SIZE, PATTERN_SIZE, PATTERN_LOOP)
    start = time.monotonic()
    next_frame = start
    next_sample = start
    while (now := time.monotonic()) - start < seconds:
        while script and now - start >= script[0][0] * seconds:
            _, address, value = script.pop(0)
            osc_client.send_message(address, value)
        if now >= next_frame:
            frame_id += 1
            pixels = loop[frame_id % PATTERN_LOOP]
            ring_in.write(pixels, frame_id=frame_id)
            sent[frame_id] = pixels
            sent.pop(frame_id - 120, None)
            next_frame += 1.0 / input_fps
        out = ring_out.read_latest(after_seq=last_seq)
        if out is not None:
            last_seq = out.seq
            latencies.append((out.written_ns - out.source_ns) / 1e6)
            first_out = first_out or now
            last_out = now
            if now >= next_sample and out.frame_id in sent:
                sheet.append((sent[out.frame_id], display_pixels(out.pixels, out.flags, alpha=False)))
                next_sample = now + seconds / (2 * SHEET_COLUMNS)
        time.sleep(0.002)
    elapsed = time.monotonic() - start
    frames = len(latencies)
    fps = (frames - 1) / (last_out - first_out) if frames > 1 and last_out > first_out else 0.0
    path = out_dir / "sdbridge-demo.png"
    contact_sheet(sheet[-2 * SHEET_COLUMNS:] if len(sheet) > 2 * SHEET_COLUMNS else sheet).save(path)
    p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95)) if latencies else (0.0, 0.0)
    return DemoResult(frames, elapsed, fps, p50, p95, path)


def contact_sheet(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Image.Image:
    """Rows of input-over-output thumbnails, SHEET_COLUMNS pairs per row."""
    rows = max(1, -(-len(pairs) // SHEET_COLUMNS))
    label = 16
    sheet = Image.new("RGB", (SHEET_COLUMNS * THUMB, rows * (2 * THUMB + label)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    for i, (inp, out) in enumerate(pairs):
        x, y = (i % SHEET_COLUMNS) * THUMB, (i // SHEET_COLUMNS) * (2 * THUMB + label)
        draw.text((x + 4, y + 2), f"in / out {i + 1}", fill=(200, 200, 200))
        sheet.paste(_thumb(inp), (x, y + label))
        sheet.paste(_thumb(out), (x, y + label + THUMB))
    return sheet


def _thumb(pixels: np.ndarray) -> Image.Image:
    """A thumbnail of 8-bit pixels, top row first (an input as drawn, an output through display_pixels)."""
    rgb = pixels[:, :, :3] if pixels.shape[2] >= 3 else np.repeat(pixels, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(rgb)).resize((THUMB, THUMB))
