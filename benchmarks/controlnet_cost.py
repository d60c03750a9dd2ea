"""What ControlNets cost per frame, at the engine level: the whole per-frame call (Stream.render_pixels,
client pixels in, client pixels out on the host) with 0, 1 and 2 ControlNets acting, one loaded at scale 0
(skipped: it should cost nothing), and with cfg full at guidance 2 (the negative entries are steered too).

    python benchmarks/controlnet_cost.py                    # CPU: tiny model + tiny ControlNet, 256x256
    python benchmarks/controlnet_cost.py --seconds 10 --json-out cn.json   # CUDA: random:sd15 + random, 512x512
    python benchmarks/controlnet_cost.py --steps 1 2 --stream-batch        # a table per step count
    python benchmarks/controlnet_cost.py --model random:sdxl --size 1024  # SDXL + a random SDXL ControlNet
    python benchmarks/controlnet_cost.py --model tiny --controlnet tiny --size 64 --seconds 1  # a quick check

Defaults: on CUDA --model random:sd15 --controlnet random at 512x512 in float16 with the torch fast path
(CUDA graphs, channels_last: engines/backends/torch_backend.py, applied to each ControlNet too); on the
CPU --model tiny --controlnet tiny at 256x256 in float32, eager. `--controlnet random` is a full-size
ControlNet with random weights for a random:<arch> model (its real cost, meaningless images); a name from
--models-dir or a path loads a real one. The input image and the control images are fixed random images
(seeded); each ControlNet gets its own control image, different from the input.

Each row gets a stream of its own (sharing the model and the ControlNets) with its settings, warms up
(--warmup frames, and on CUDA until its CUDA graph is captured: after set_controlnets a shape must hold
for SETTLE_FRAMES frames before capture), then calls render_pixels in a loop for --seconds. render_pixels
waits for the result on the host, so the wall time of a call is the frame time. --rounds 1 (the CUDA
default) times the rows one after the other, each with only its own ControlNets loaded; --rounds N (the
CPU default, 5) starts every row first and then times them in turn, N slices of --seconds / N each, so
that other processes' load on a shared host falls on all rows alike (no memory peaks then). Reported: ms per frame (mean, p50, p99), fps (frames / wall time), the ms
and % added over the row without a ControlNet at the same guidance (mean, and p50, which a busy host's
stalls move less), how many ControlNets the plan says act, the parameters of the ControlNets set, and on
CUDA the peak of torch's allocator during the row (reset between rows; the model's and the row's
ControlNets' weights included, no other ControlNet is held) and whether the frame ran as a CUDA graph. The header has what is needed to paste a table into the docs:
device, torch and diffusers versions, model, dtype, fast path, date, git commit and the command line.
"""
from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bridge.bench import cpu_name, percentiles, sync_device  # noqa: E402
from engines import controlnet, random_models, registry  # noqa: E402
from engines.backends.torch_backend import TorchOptions, accelerate, prepare_module  # noqa: E402
from engines.folders import ModelFolders  # noqa: E402
from engines.frames import OutputFormat  # noqa: E402
from engines.stream import Stream, StreamSettings  # noqa: E402

PROMPT = "a photo of a cat sitting on a wooden table, detailed"
NEGATIVE = "blurry, low quality"
MAX_EXTRA_WARMUP = 40  # CUDA: frames beyond --warmup to wait for a graph capture before timing anyway


@dataclass(frozen=True)
class Row:
    name: str
    controlnets: int  # how many ControlNets are set on the stream (loaded)
    scale: float  # each one's conditioning scale
    guidance: float  # > 1: cfg full


ROWS = (
    Row("no ControlNet", 0, 1.0, 1.0),
    Row("1 ControlNet acting (scale 1)", 1, 1.0, 1.0),
    Row("2 ControlNets acting (scale 1 each)", 2, 1.0, 1.0),
    Row("1 ControlNet loaded, scale 0 (skipped)", 1, 0.0, 1.0),
)
CFG_ROWS = (
    Row("cfg full, guidance 2, no ControlNet", 0, 1.0, 2.0),
    Row("cfg full, guidance 2, 1 ControlNet acting", 1, 1.0, 2.0),
)


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + (" (with uncommitted changes)" if dirty else "")) if head else "unknown"


def parameters(modules: Any) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@dataclass
class Run:
    """One row being measured: its own stream (so that, interleaved, each keeps its CUDA graph)."""

    row: Row
    steps: int
    stream: Stream | None = None
    controls: tuple[torch.Tensor, ...] = ()
    acting: int | None = None
    warmup_frames: int = 0
    graph: str | None = None
    times: list[float] = field(default_factory=list)
    wall: float = 0.0
    peak: int | None = None
    error: str | None = None


class Bench:
    def __init__(self, args: argparse.Namespace, model: Any, folders: ModelFolders | None, device: torch.device,
                 dtype: torch.dtype, options: TorchOptions):
        self.args, self.model, self.folders = args, model, folders
        self.device, self.dtype, self.options = device, dtype, options
        self.cuda = device.type == "cuda"
        self.loaded: list[Any] = []  # the ControlNets held, index k
        size = args.size
        rng = np.random.default_rng(0)
        self.pixels = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
        generator = torch.Generator("cpu")
        self.control_images = tuple(torch.rand(1, 3, size, size, generator=generator.manual_seed(100 + k)).to(device)
                                    for k in range(2))
        self.output = OutputFormat()

    def hold(self, count: int) -> None:
        """Exactly `count` ControlNets loaded: memory peaks of a row hold no other row's ControlNets."""
        if len(self.loaded) > count:
            del self.loaded[count:]
            self.free()
        while len(self.loaded) < count:
            module = controlnet.load(self.args.controlnet, self.model, self.folders, self.device, self.dtype)
            prepare_module(module, self.options)
            self.loaded.append(module)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def start(self, run: Run, *, measure_memory: bool) -> None:
        """A stream for the row with its ControlNets and settings, warmed up (and on CUDA its graph captured)."""
        row = run.row
        if measure_memory:
            sync_device(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        stream = Stream(self.model, self.device, self.dtype, stream_batch=self.args.stream_batch)
        accelerate(stream, self.options)
        stream.set_controlnets(self.loaded[:row.controlnets])
        stream.prepare(StreamSettings(
            prompt=PROMPT, negative_prompt=NEGATIVE, seed=1, strength=self.args.strength, steps=run.steps,
            width=self.args.size, height=self.args.size, guidance_scale=row.guidance, cfg_type="full",
            controls=tuple((row.scale, 0.0, 1.0) for _ in range(row.controlnets))))
        plan = getattr(stream, "_plan", None)  # what the stream decided: which ControlNets act
        run.acting = sum(getattr(plan, "controls_on", ())) if plan is not None else None
        run.stream, run.controls = stream, self.control_images[:row.controlnets]
        graphs = stream.graphs
        for _ in range(self.args.warmup):
            self.frame(run)
        run.warmup_frames = self.args.warmup
        while graphs is not None and not graphs.failed and not graphs.captured \
                and run.warmup_frames < self.args.warmup + MAX_EXTRA_WARMUP:
            self.frame(run)
            run.warmup_frames += 1
        if graphs is not None:
            run.graph = f"failed: {graphs.failed}" if graphs.failed else "captured" if graphs.captured else "not captured"

    def frame(self, run: Run) -> None:
        run.stream.render_pixels(self.pixels, self.output, controls=run.controls)

    def time(self, run: Run, seconds: float, min_frames: int) -> None:
        """render_pixels in a loop for `seconds` (and `min_frames` at least); each call's wall time."""
        done = 0
        sync_device(self.device)
        started = time.perf_counter()
        while True:
            t = time.perf_counter()
            self.frame(run)
            run.times.append(time.perf_counter() - t)
            done += 1
            if time.perf_counter() - started >= seconds and done >= min_frames:
                break
        sync_device(self.device)
        run.wall += time.perf_counter() - started

    def finish(self, run: Run) -> dict[str, Any]:
        row, times = run.row, run.times
        result: dict[str, Any] = {
            "row": row.name, "steps": run.steps, "controlnets_set": row.controlnets,
            "controlnets_acting": run.acting, "scale": row.scale, "guidance_scale": row.guidance,
            "cfg": "full" if row.guidance > 1 else "none",
            "controlnet_parameters": parameters(self.loaded[:row.controlnets]),
        }
        ms = percentiles([1e3 * t for t in times])
        if run.error is not None or not times:
            result["error"] = run.error or "no frames timed"
        else:
            result.update({
                "frames": len(times), "wall_s": run.wall, "warmup_frames": run.warmup_frames,
                "ms_mean": 1e3 * statistics.fmean(times), "ms_p50": ms.p50_ms, "ms_p99": ms.p99_ms,
                "fps": len(times) / run.wall,
                "peak_allocated_bytes": run.peak, "cuda_graph": run.graph,
            })
        run.stream = None  # its graphs and buffers go
        return result


def measure(bench: Bench, runs: list[Run], rounds: int, on_result: Any) -> list[dict[str, Any]]:
    """One row after the other (rounds 1: memory peaks per row), or all rows started, then timed in turn
    for `rounds` slices each, so that load from other processes falls on every row alike."""
    args = bench.args

    def attempt(run: Run, fn: Any) -> None:
        if run.error is None:
            try:
                fn()
            except Exception as e:  # a row that fails (out of memory, say) says why; the rest go on
                run.error = f"{type(e).__name__}: {e}".splitlines()[0]
                run.stream = None

    results = []
    if rounds <= 1:
        for run in runs:
            attempt(run, lambda: bench.hold(run.row.controlnets))
            attempt(run, lambda: bench.start(run, measure_memory=bench.cuda))
            attempt(run, lambda: bench.time(run, args.seconds, args.min_frames))
            if bench.cuda and run.error is None:
                run.peak = torch.cuda.max_memory_allocated(bench.device)
            results.append(bench.finish(run))
            bench.free()
            on_result(results[-1])
        return results
    bench.hold(max(run.row.controlnets for run in runs))
    for run in runs:
        attempt(run, lambda: bench.start(run, measure_memory=False))
    for _ in range(rounds):
        for run in runs:
            attempt(run, lambda: bench.time(run, args.seconds / rounds, -(-args.min_frames // rounds)))
    for run in runs:
        results.append(bench.finish(run))
        on_result(results[-1])
    bench.free()
    return results


def header(args: argparse.Namespace, model: Any, device: torch.device, dtype: torch.dtype, options: TorchOptions,
           controlnet_params: int) -> dict[str, Any]:
    import diffusers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "git": git_commit(),
        "device": str(device), "device_name": name,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "threads": torch.get_num_threads() if device.type != "cuda" else None,
        "model": model.name, "arch": model.arch, "dtype": str(dtype).replace("torch.", ""),
        "unet_parameters": parameters([model.unet]),
        "controlnet": args.controlnet, "controlnet_parameters": controlnet_params,
        "size": f"{args.size}x{args.size}", "strength": args.strength, "stream_batch": args.stream_batch,
        "fast_path": options.describe(),
        "seconds_per_row": args.seconds, "rounds": args.rounds,
    }


def print_header(h: dict[str, Any]) -> None:
    lines = [
        f"- device: {h['device_name']} ({h['device']}" + (f", CUDA {h['cuda']}" if h["cuda"] else "")
        + (f", {h['threads']} torch threads" if h["threads"] else "") + ")",
        f"- torch {h['torch']}, diffusers {h['diffusers']}",
        f"- model: {h['model']} ({h['arch']}, UNet {h['unet_parameters'] / 1e6:.1f} M parameters), "
        f"ControlNet: {h['controlnet']} ({h['controlnet_parameters'] / 1e6:.1f} M parameters each), {h['dtype']}",
        f"- {h['size']}, img2img strength {h['strength']}, "
        f"{'stream batch' if h['stream_batch'] else 'exact mode'}, fast path: {h['fast_path']}",
        f"- {h['seconds_per_row']} s timed per row"
        + (f" in {h['rounds']} interleaved slices" if h["rounds"] > 1 else ", rows one after the other")
        + f"; date {h['date']}; git {h['git']}",
        f"- command: `{h['command']}`",
    ]
    print("\n".join(lines), flush=True)


def table(steps: int, results: list[dict[str, Any]], cuda: bool, stream_batch: bool) -> str:
    head = ["row", "acting", "ms/frame mean", "p50", "p99", "fps", "added ms mean", "added ms p50", "added % mean",
            "ControlNet params"]
    if cuda:
        head += ["peak GiB", "CUDA graph"]
    baselines = {r["guidance_scale"]: r for r in results if r.get("controlnets_set") == 0 and "error" not in r}
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["row"], f"failed: {r['error']}"] + [""] * (len(head) - 2))
            continue
        base = baselines.get(r["guidance_scale"])
        added = r["ms_mean"] - base["ms_mean"] if base is not None and base is not r else None
        added_p50 = r["ms_p50"] - base["ms_p50"] if added is not None else None
        r["added_ms_mean"], r["added_ms_p50"] = added, added_p50
        cells = [r["row"], "n/a" if r["controlnets_acting"] is None else str(r["controlnets_acting"]),
                 f"**{r['ms_mean']:.2f}**", f"{r['ms_p50']:.2f}", f"{r['ms_p99']:.2f}", f"{r['fps']:.1f}",
                 "-" if added is None else f"{added:+.2f}", "-" if added_p50 is None else f"{added_p50:+.2f}",
                 "-" if added is None else f"{100 * added / base['ms_mean']:+.0f}%",
                 f"{r['controlnet_parameters'] / 1e6:.1f} M"]
        if cuda:
            peak = r.get("peak_allocated_bytes")
            cells += ["n/a" if peak is None else f"{peak / 2**30:.2f}", r.get("cuda_graph") or "off"]
        rows.append(cells)
    title = f"### {steps} step{'s' if steps != 1 else ''}, {'stream batch' if stream_batch else 'exact mode'}"
    return "\n".join([title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(c) + " |" for c in rows), ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model name (default: random:sd15 on CUDA, tiny on the CPU)")
    parser.add_argument("--controlnet", help="ControlNet name or path (default: random for a random:<arch> "
                        "model, tiny for the tiny models)")
    parser.add_argument("--models-dir", action="append", default=[], help="models folders for real names")
    parser.add_argument("--size", type=int, help="width and height (default: 512 on CUDA, 256 on the CPU)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="step counts, a table each (default: 1)")
    parser.add_argument("--strength", type=float, default=0.5, help="img2img strength (default: 0.5)")
    parser.add_argument("--stream-batch", action="store_true", help="stream batch instead of exact mode")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per row (default: 5)")
    parser.add_argument("--warmup", type=int, help="untimed frames per row first (default: 12 on CUDA, where the "
                        "CUDA graph is captured on the SETTLE_FRAMES-th, 3 on the CPU)")
    parser.add_argument("--rounds", type=int, help="1: the rows one after the other (memory peaks per row); "
                        "N > 1: all rows started, then timed in turn, N slices of --seconds / N each, so that load "
                        "from other processes falls on every row alike (default: 1 on CUDA, 5 on the CPU)")
    parser.add_argument("--min-frames", type=int, default=3, help="frames timed per row at least (default: 3)")
    parser.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                        help="also the cfg full rows, guidance 2 (default: on)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))
    parser.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json-out", metavar="FILE", help="also write the header and every row as JSON here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = registry.pick_device(args.device)
    dtype = registry.pick_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    args.model = args.model or ("random:sd15" if cuda else "tiny")
    args.controlnet = args.controlnet or (controlnet.RANDOM if random_models.is_random(args.model)
                                          else controlnet.BUILT_IN)
    args.size = args.size or (512 if cuda else 256)
    args.rounds = args.rounds or (1 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (12 if cuda else 3)
    options = TorchOptions.resolve(device, cuda_graph=args.cuda_graph, channels_last=args.channels_last)
    folders = ModelFolders(args.models_dir) if args.models_dir else None

    started = time.monotonic()
    model = registry.load(args.model, device, dtype, folders=folders)
    bench = Bench(args, model, folders, device, dtype, options)
    bench.hold(1)  # for its parameter count, and to fail early on a ControlNet that does not fit
    h = header(args, model, device, dtype, options, parameters(bench.loaded))
    print_header(h)
    print(f"- loaded in {time.monotonic() - started:.1f} s", flush=True)

    rows = ROWS + (CFG_ROWS if args.cfg else ())
    out: dict[str, Any] = {"header": h, "tables": []}
    for steps in args.steps:
        results: list[dict[str, Any]] = []
        out["tables"].append({"steps": steps, "rows": results})

        def on_result(result: dict[str, Any]) -> None:
            results.append(result)
            ms = f"{result['ms_mean']:.2f} ms/frame" if "ms_mean" in result else result["error"]
            print(f"  {steps} step(s), {result['row']}: {ms}", file=sys.stderr, flush=True)
            if args.json_out:  # after each row: a session cut short keeps what it measured
                Path(args.json_out).write_text(json.dumps(out, indent=1))
        measure(bench, [Run(row, steps) for row in rows], args.rounds, on_result)
        print()
        print(table(steps, results, cuda, args.stream_batch), flush=True)
        if args.json_out:  # now with the added ms the table worked out
            Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
