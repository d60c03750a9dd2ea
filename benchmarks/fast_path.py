"""Which fast-path techniques pay, and the issue's targets, in one command for a GPU session.

Runs `sdbridge bench --json` in a fresh process per row (so one variant's compiled kernels, graphs
and memory never flatter the next) and prints one markdown table per part:

    python benchmarks/fast_path.py --targets            # the targets of docs/benchmarks.md
    python benchmarks/fast_path.py --ablation           # eager -> channels_last -> CUDA graphs, bf16, compile
    python benchmarks/fast_path.py --targets --ablation --json-out results.json
    python benchmarks/fast_path.py --ablation --tensorrt  # and a row on TensorRT engines (sdbridge build first)

The ablation switches one technique at a time on sd21 + TAESD, 512x512, 1 step, exact mode (override
with --model/--size/--steps). Each row is a whole bench run: end-to-end fps and p99 latency through
the rings, the bare engine's time per frame, the device memory peak, and the share of the device's
peak FLOP/s. Rows that fail say why and the rest go on. On a CPU the CUDA-graph rows are refused by
the daemon (cuda_graph = on needs CUDA) and say so. With --tensorrt, each configuration also gets a row
on TensorRT engines: `sdbridge build` runs first (its time is reported; engines already in the cache
make it quick), then `sdbridge bench --backend tensorrt`. That needs TensorRT (docs/tensorrt.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDBRIDGE = [sys.executable, "-m", "bridge.cli", "bench", "--json"]
BUILD = [sys.executable, "-m", "bridge.cli", "build"]

# (name, flags): each switches on one more technique than the row above, then the alternatives
ABLATION = (
    ("eager", ["--cuda-graph", "off", "--channels-last", "off"]),
    ("+ channels_last", ["--cuda-graph", "off", "--channels-last", "on"]),
    ("+ CUDA graphs (default)", ["--cuda-graph", "on", "--channels-last", "on"]),
    ("bfloat16 instead of float16", ["--cuda-graph", "on", "--channels-last", "on", "--dtype", "bfloat16"]),
    ("+ torch.compile", ["--cuda-graph", "on", "--channels-last", "on", "--compile"]),  # last: it compiles for minutes
)
# (name, flags, target): the GPU targets
TARGETS = (
    ("sd21 + TAESD 512x512, 1 step, exact", ["--model", "random:sd21", "--width", "512", "--height", "512",
                                             "--steps", "1", "--compare", "diffusers"],
     ">= 200 fps, p99 < 10 ms, >= 5x diffusers"),
    ("sd21 + TAESD 512x512, 2 steps, stream batch", ["--model", "random:sd21", "--width", "512", "--height", "512",
                                                     "--steps", "2", "--stream-batch"], ">= 150 fps"),
    ("sdxl + TAESDXL 1024x1024, 1 step, exact", ["--model", "random:sdxl", "--width", "1024", "--height", "1024",
                                                 "--steps", "1"], ">= 25 fps"),
)


def run(flags: list[str], seconds: float, timeout: float) -> dict:
    command = [*SDBRIDGE, "--seconds", str(seconds), *flags]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "command": " ".join(command)}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {tail}", "command": " ".join(command)}
    result = json.loads(done.stdout)
    result["wall_s"] = time.monotonic() - started
    return result


def run_on_engines(flags: list[str], seconds: float, timeout: float, build_timeout: float) -> dict:
    """Build the engines for this configuration, then bench it on them; the build's time goes with it."""
    started = time.monotonic()
    try:
        done = subprocess.run([*BUILD, *flags], cwd=ROOT, capture_output=True, text=True, timeout=build_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"sdbridge build timed out after {build_timeout:.0f} s"}
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-2:]) or "(no output)"
        return {"error": f"sdbridge build: exit {done.returncode}: {tail}"}
    result = run([*flags, "--backend", "tensorrt"], seconds, timeout)
    result["engine_build_s"] = time.monotonic() - started
    return result


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def row(name: str, result: dict, target: str | None = None) -> str:
    if "engine_build_s" in result:
        name += f" (engines built or found in {result['engine_build_s']:.0f} s)"
    if "error" in result:
        cells = [name, f"failed: {result['error']}", "", "", "", "", ""]
    else:
        e2e, engine, memory, flops = result["e2e"], result["engine"], result["memory"], result["flops"]
        peak = memory.get("peak_allocated_bytes") or memory.get("peak_rss_bytes")
        baseline = result.get("diffusers") or {}
        cells = [name, f"**{e2e['fps']:.1f}**", _num(e2e["latency_p99_ms"], ".2f"), f"{engine['ms_per_frame']:.2f}",
                 _num(peak / 2**30 if peak else None, ".2f"),
                 _num(100 * flops["fraction_of_peak"] if flops.get("fraction_of_peak") is not None else None, ".1f"),
                 _num(baseline.get("speedup_e2e"), ".1f")]
    if target is not None:
        cells.append(target)
    return "| " + " | ".join(cells) + " |"


def table(title: str, rows: list[str], targets: bool) -> str:
    head = ["run", "e2e fps", "p99 ms", "bare engine ms/frame", "memory peak GiB", "% of peak FLOP/s",
            "x diffusers"] + (["target"] if targets else [])
    return "\n".join([f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", action="store_true", help="run the issue's target configurations")
    parser.add_argument("--ablation", action="store_true", help="switch the fast-path techniques one at a time")
    parser.add_argument("--model", default="random:sd21", help="ablation model (default: random:sd21)")
    parser.add_argument("--size", type=int, default=512, help="ablation width and height (default: 512)")
    parser.add_argument("--steps", type=int, default=1, help="ablation steps (default: 1)")
    parser.add_argument("--seconds", type=float, default=8.0, help="end-to-end window per run (default: 8)")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds one run may take (default: 420)")
    parser.add_argument("--json-out", metavar="FILE", help="also write every run's JSON here")
    parser.add_argument("--tensorrt", action="store_true",
                        help="also run each configuration on TensorRT engines (built first; needs TensorRT)")
    parser.add_argument("--build-timeout", type=float, default=3600.0,
                        help="seconds one engine build may take (default: 3600)")
    args = parser.parse_args()
    if not (args.targets or args.ablation):
        parser.error("choose --targets, --ablation or both")
    results: dict[str, dict] = {}
    out = []
    if args.targets:
        rows = []
        for name, flags, target in TARGETS:
            results[name] = run(flags, args.seconds, args.timeout)
            rows.append(row(name, results[name], target))
            print(rows[-1], file=sys.stderr, flush=True)
            save(results, args.json_out)
            if args.tensorrt:
                engine_flags = [f for f in flags if f not in ("--compare", "diffusers")]
                results[f"{name}, TensorRT"] = run_on_engines(engine_flags, args.seconds, args.timeout,
                                                             args.build_timeout)
                rows.append(row(f"{name}, TensorRT", results[f"{name}, TensorRT"], target))
                print(rows[-1], file=sys.stderr, flush=True)
                save(results, args.json_out)
        out.append(table("Targets", rows, targets=True))
    if args.ablation:
        base = ["--model", args.model, "--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps)]
        rows = []
        for name, flags in ABLATION:
            results[f"ablation: {name}"] = run(base + flags, args.seconds, args.timeout)
            rows.append(row(name, results[f"ablation: {name}"]))
            print(rows[-1], file=sys.stderr, flush=True)
            save(results, args.json_out)
        if args.tensorrt:
            name = "TensorRT engines (+ CUDA graphs)"
            results[f"ablation: {name}"] = run_on_engines(base, args.seconds, args.timeout, args.build_timeout)
            rows.append(row(name, results[f"ablation: {name}"]))
            print(rows[-1], file=sys.stderr, flush=True)
            save(results, args.json_out)
        out.append(table(f"Fast path, one technique at a time ({args.model}, {args.size}x{args.size}, "
                         f"{args.steps} step{'s' if args.steps != 1 else ''}, exact)", rows, targets=False))
    print("\n".join(out))
    return 0


def save(results: dict[str, dict], path: str | None) -> None:
    """Every run so far, after each run: a device session cut short keeps what it measured."""
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
