"""The flicker figure of each temporal-coherence method, before and after: a synthetic slowly moving video
and a still one go through a Stream with each method off and on, and the mean absolute frame-to-frame
difference of the outputs (engines.frames.flicker, in [0, 1] of full scale) is printed with the mean
frame time. The input's own flicker is printed too: a perfect method on the moving video would come close
to it, not to 0.

    python benchmarks/flicker.py                            # the built-in tiny model, on the CPU
    python benchmarks/flicker.py --model random:sd15 --size 512 --device cuda

With `tiny` (or any random-weights model) the images mean nothing: the figures show that each mechanism
acts and in which direction, not how a real model looks with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import registry  # noqa: E402
from engines.frames import OutputFormat, flicker  # noqa: E402
from engines.stream import Stream, StreamSettings  # noqa: E402

RGB = OutputFormat(np.dtype(np.uint8), 3)
METHODS: tuple[tuple[str, dict], ...] = (
    ("off (fixed seed)", {}),
    ("off (seed -1)", {"seed": -1}),
    ("noise_lock 1 (seed -1)", {"seed": -1, "noise_lock": 1.0}),
    ("noise_lock 0.9 (seed -1)", {"seed": -1, "noise_lock": 0.9}),
    ("feedback 0.5", {"feedback": 0.5}),
    ("feedback 0.8", {"feedback": 0.8}),
    ("cached_attention 0.5", {"cached_attention": 0.5}),
    ("cached_attention 1", {"cached_attention": 1.0}),
    ("all (seed -1)", {"seed": -1, "noise_lock": 1.0, "feedback": 0.5, "cached_attention": 1.0}),
)


def moving_video(frames: int, size: int, speed: int = 1) -> list[np.ndarray]:
    """A diagonal gradient with a bright square and a dark bar that shift `speed` pixels a frame:
    slowly moving input, (size, size, 3) uint8."""
    y, x = np.mgrid[0:size, 0:size]
    out = []
    for i in range(frames):
        shift = i * speed
        image = np.stack([(x + y + shift) / (2 * size), (x - shift) % size / size, 0.5 + 0 * x], -1)
        side = size // 4
        image[size // 4:size // 4 + side, shift % size:shift % size + side] = (1.0, 0.9, 0.2)
        image[size // 2 + 4:size // 2 + 8, :] = ((x[:4] + 2 * shift) % size / size * 0.3)[..., None]
        out.append((image.clip(0, 1) * 255).astype(np.uint8))
    return out


def measure(stream: Stream, base: StreamSettings, changes: dict, video: list[np.ndarray], settle: int
            ) -> tuple[float, float]:
    """(flicker of the outputs, median frame time in ms) for `video` with `changes`. The stream starts
    afresh (warm_up carries nothing over) and the first `settle` outputs are left out of the figure:
    feedback starts from a frame with nothing blended in and takes a few frames to reach its steady
    look, and a stream batch fills first."""
    settings = dataclasses.replace(base, **changes)
    stream.warm_up(settings, RGB)
    outputs, times = [], []
    for frame in video:
        started = time.perf_counter()
        outputs.append(stream.render_pixels(frame, RGB).copy())
        times.append(time.perf_counter() - started)
    return flicker(outputs[settle:]), statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="a model name engines.registry loads (tiny, random:sd15, ...)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--stream-batch", action="store_true")
    parser.add_argument("--settle", type=int, default=4, help="first outputs left out of each figure")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = registry.load(args.model, device, dtype)
    stream = Stream(model, device, dtype, stream_batch=args.stream_batch)
    base = StreamSettings(prompt="a watercolour landscape", seed=7, strength=args.strength, steps=args.steps,
                          width=args.size, height=args.size)
    moving = moving_video(args.frames, args.size)
    still = [moving[0]] * args.frames
    measure(stream, base, {}, moving[:4], 0)  # first calls of a model pay for set-up: not in the table
    print(f"model {args.model}, {args.size}x{args.size}, {args.steps} steps, strength {args.strength}, "
          f"{'stream batch' if args.stream_batch else 'exact'} mode, {args.frames} frames "
          f"(first {args.settle} left out), {device}")
    print(f"input flicker: moving {flicker(moving[args.settle:]):.4f}, still 0")
    print(f"{'method':28} {'moving':>8} {'still':>8} {'ms/frame':>9}")
    for name, changes in METHODS:
        moving_figure, ms = measure(stream, base, changes, moving, args.settle)
        still_figure, _ = measure(stream, base, changes, still, args.settle)
        print(f"{name:28} {moving_figure:8.4f} {still_figure:8.4f} {ms:9.1f}")


if __name__ == "__main__":
    main()
