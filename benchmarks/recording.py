"""What recording costs the show (docs/recording.md): the render thread's share (`Recorder.offer`, one frame
copy) and whether the writer keeps up, at a given size and frame rate.

    python benchmarks/recording.py                       # 512x512 RGBA uint8 at 60 fps for 5 s
    python benchmarks/recording.py --fps 120 --size 768  # where does the writer start to drop?

Frames (a moving pattern, made before the run) are written to an output ring and offered to a Recorder
at --fps, as the render loop does, while it records to a temporary folder. Reported: the time of each
offer (p50, p99, max: what the render thread pays per frame), frames written and dropped (the writer
fell behind and the frame was left out of the file, not out of the show), the writer's frames per
second over the take, and the file size. Speeds depend on the host: print, never assert.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge import shm  # noqa: E402
from bridge.loop import Output  # noqa: E402
from bridge.recorder import Recorder  # noqa: E402
from engines.frames import OutputFormat  # noqa: E402
from engines.stream import StreamSettings  # noqa: E402


def pattern(size: int, count: int) -> list[np.ndarray]:
    """`count` RGBA frames of a gradient with a square moving across it: something an encoder must work for."""
    y, x = np.mgrid[0:size, 0:size]
    frames = []
    for i in range(count):
        pixels = np.empty((size, size, 4), np.uint8)
        pixels[..., 0] = (x + 3 * i) % 256
        pixels[..., 1] = (y + i) % 256
        pixels[..., 2] = ((x ^ y) + 5 * i) % 256
        pixels[..., 3] = 255
        s = (4 * i) % (size - size // 4)
        pixels[s:s + size // 4, s:s + size // 4, :3] = 255
        frames.append(pixels)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--fps", type=float, default=60.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    fmt = OutputFormat(np.dtype(np.uint8), 4)
    frames = pattern(args.size, 64)
    name = shm.ring_name(f"bench{os.getpid()}", "out")
    ring = shm.Ring.create(name, shm.slot_capacity_for(args.size, args.size), slot_count=3)
    settings = StreamSettings(prompt="a benchmark", width=args.size, height=args.size)
    errors: list[str] = []
    offers = []
    with tempfile.TemporaryDirectory() as folder:
        recorder = Recorder(folder, latest_frame=ring.read_latest, report_error=errors.append)
        ring.write(frames[0], frame_id=0, state_version=1)  # the frame on show when the take starts
        path = recorder.start("bench")
        interval, count = 1.0 / args.fps, int(args.seconds * args.fps)
        began = next_at = time.perf_counter()
        for i in range(count):
            pixels = frames[i % len(frames)]
            ring.write(pixels, frame_id=i + 1, state_version=1)
            started = time.perf_counter()
            recorder.offer(Output(pixels, i + 1, 1, settings, "bench", fmt))
            offers.append(time.perf_counter() - started)
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
        shown_s = time.perf_counter() - began
        done = recorder.stop()
        finished_s = time.perf_counter() - began
        size_mb = path.stat().st_size / 1e6 if path.exists() else 0.0
    ring.close()
    ring.unlink()

    ms = np.array(offers) * 1000
    print(f"{args.size}x{args.size} RGBA uint8, {count} frames offered at {args.fps:g} fps "
          f"({shown_s:.2f} s), {os.cpu_count()} CPUs")
    print(f"offer (render thread): p50 {np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms, "
          f"max {ms.max():.3f} ms")
    print(f"recorded {done.frames} frames, dropped {done.dropped} (frames + dropped = {done.frames + done.dropped}); "
          f"writer {done.frames / finished_s:.1f} fps over the take and the file's finish ({finished_s:.2f} s)")
    print(f"file {size_mb:.1f} MB{'; error: ' + done.error if done.error else ''}"
          f"{'; reported: ' + '; '.join(errors) if errors else ''}")


if __name__ == "__main__":
    main()
