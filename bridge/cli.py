"""The `sdbridge` command: `serve` runs the daemon, `demo` shows it working end to end, `bench` measures
it (throughput, latency, control latency, memory, the bare engine and the device's peak, optionally
diffusers' own pipeline), `soak` floods a daemon for minutes or hours and checks that it held (memory,
fps, every message applied in order), `models` lists what the models folders hold, `touchdesigner` writes the
script that builds the TouchDesigner component and `touchosc` a TouchOSC layout.

Every setting (bridge/config.py) and every scalar parameter (bridge/params.py) is also a flag, derived
from those declarations: `osc_port` is `--osc-port`, `prompt` is `--prompt`, the list `models_dir` is
the repeatable `--models-dir`, the switch `allow_pickle` is `--allow-pickle`. List parameters (`prompts`,
`seeds`, ...) and LoRA weights are set in the config file or live.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
from typing import Any, Callable, Sequence

# torch's OpenMP threads spin while they wait for work, by default: on a show machine they take cores
# from TouchDesigner, and on a CPU the stream's own frames stall for seconds whenever another process
# wants a core (measured with `sdbridge soak`, docs/reliability.md). Set before torch loads (the
# imports below); a setting of the user's own wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__, config, params, shm  # noqa: E402

log = logging.getLogger("sdbridge")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of at least 0, got {text!r}")
    return value


_METAVAR = {int: "N", float: "X", str: "TEXT", bool: "0|1"}
_SCALARS = (int, float, str, bool)


def _flag_params() -> tuple[params.Param, ...]:
    """The parameters that get a flag: scalars only; lists are set in the config file or live."""
    return tuple(p for p in config.initial_params() if p.kind in _SCALARS)


def _add_setting(group: argparse._ActionsContainer, f: dataclasses.Field) -> None:
    kind = type(f.default)
    flag = f.metadata.get("flag") or _flag(f.name)
    help_text = f"{f.metadata['doc']} (default: {f.default!r})".replace("%", "%%")
    if kind is tuple:  # a list: the flag repeats
        group.add_argument(flag, dest=f.name, action="append", default=None,
                           metavar=f.metadata.get("metavar") or "TEXT", help=help_text + "; repeatable")
    elif kind is bool:  # a switch: --allow-pickle / --no-allow-pickle
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
    else:
        choices = f.metadata.get("choices") or None
        group.add_argument(flag, dest=f.name, type=kind, choices=choices, default=None,
                           metavar=None if choices else (f.metadata.get("metavar") or _METAVAR[kind]),
                           help=help_text)


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings and initial parameters "
                        "(see configs/default.toml); flags override it")
    group = parser.add_argument_group("settings")
    for f in dataclasses.fields(config.Settings):
        _add_setting(group, f)
    group = parser.add_argument_group("initial parameters (also playable over OSC as /<name>)")
    for p in _flag_params():
        kind: Callable[[str], Any] = _parse_bool if p.kind is bool else p.kind
        group.add_argument(_flag(p.name), dest=p.name, type=kind, default=None, choices=p.choices or None,
                           metavar=None if p.choices else _METAVAR[p.kind], help=f"{p.doc} (default: {p.default!r})")


def _settings_from(args: argparse.Namespace) -> tuple[config.Settings, dict[str, Any]]:
    names = [f.name for f in dataclasses.fields(config.Settings)] + [p.name for p in _flag_params()]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return config.load(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdbridge", description="Real-time Stable Diffusion bridge for live visuals.")
    parser.add_argument("--version", action="version", version=f"sdbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon until Ctrl-C or SIGTERM",
                           description="Run the daemon: shared-memory rings, OSC control and telemetry.")
    _add_flags(serve)
    demo = sub.add_parser("demo", help="run a daemon in-process, feed it a moving pattern, write a contact sheet",
                          description="Start a daemon in-process, stream a synthetic pattern through shared "
                          "memory, change prompt and seed over OSC, write a PNG contact sheet and print a summary.")
    demo.add_argument("--seconds", type=float, default=12.0, help="how long to stream (default: 12)")
    demo.add_argument("--out", default=".", metavar="DIR", help="folder for sdbridge-demo.png (default: .)")
    _add_flags(demo)
    bench = sub.add_parser("bench", help="measure fps, latency, control latency and memory through the real "
                           "path, beside the bare engine and the device's peak",
                           description="Host a daemon in-process, stream frames from a separate client process "
                           "through the shared-memory rings and report throughput, latency (source_ns to written_ns), "
                           "OSC control latency and memory peak, beside the bare engine's speed, FLOPs per frame "
                           "against the device's peak, and one frame through a ring. Takes serve's flags (instance "
                           "and ports are replaced by private ones). docs/benchmarks.md defines every number.")
    bench.add_argument("--seconds", type=_positive, default=10.0, help="end-to-end measuring window (default: 10)")
    bench.add_argument("--json", action="store_true", help="print JSON (every number with its unit in its key) "
                       "instead of a markdown table")
    bench.add_argument("--compare", choices=("diffusers",), default=None,
                       help="also time diffusers' own img2img pipeline on the same model, resolution and timesteps "
                       "and report the speed-up over it")
    bench.add_argument("--input-fps", type=_non_negative, default=0.0, metavar="X",
                       help="rate the client writes input frames at; 0 (default): 4x the engine's fps as first "
                       "measured, clamped to 30..2000")
    bench.add_argument("--peak-tflops", type=_positive, default=None, metavar="X",
                       help="the device's peak TFLOP/s to compare against (default: the datasheet number for known "
                       "NVIDIA GPUs in float16/bfloat16, else a matmul measured now)")
    _add_flags(bench)
    soak = sub.add_parser("soak", help="flood a real daemon with frames and parameter messages for minutes or hours "
                          "and check that memory stays flat, fps holds and every message is applied in order",
                          description="Start `sdbridge serve` with these flags (instance and ports replaced by "
                          "private ones) as a child process, write frames at full rate, flood it from several OSC "
                          "and WebSocket clients, sample memory, fps and latency, and check that every accepted "
                          "message was applied in order. Exit code 1 on an order violation, a lost message, a "
                          "crash, an fps collapse or memory growth.")
    soak.add_argument("--minutes", type=_positive, default=5.0, help="how long to flood (default: 5)")
    soak.add_argument("--osc-clients", type=int, choices=range(4), default=2, help="OSC clients (default: 2)")
    soak.add_argument("--ws-clients", type=int, choices=range(4), default=2, help="WebSocket clients (default: 2)")
    soak.add_argument("--rate", type=_positive, default=200.0, metavar="X",
                      help="messages a second per client (default: 200; keep it well under max_message_rate)")
    soak.add_argument("--input-fps", type=_positive, default=60.0, metavar="X",
                      help="input frames written a second (default: 60)")
    soak.add_argument("--sample-seconds", type=_positive, default=5.0, metavar="X",
                      help="seconds between samples and printed lines (default: 5)")
    soak.add_argument("--warmup-seconds", type=_non_negative, default=None, metavar="X",
                      help="left out of the fps and memory verdict (default: a fifth of the run, 10 to 60 s)")
    soak.add_argument("--json", metavar="FILE", help="also write every figure and sample to FILE as JSON")
    _add_flags(soak)
    build = sub.add_parser("build", help="export and build the TensorRT engines the configuration needs",
                           description="Export the configured model's UNet and autoencoder (and ControlNets) to "
                           "ONNX, clean the graphs and build TensorRT engines for the configured resolution(s) "
                           "(engine_resolutions, else width x height), UNet batch (from steps, cfg_type and "
                           "stream_batch), precision and LoRAs, into engine_dir. Every stage is cached: a second run "
                           "builds only what is missing, an interrupted one resumes. docs/tensorrt.md.")
    build.add_argument("--onnx-only", action="store_true",
                       help="export and clean the ONNX graphs only (needs no TensorRT and no GPU)")
    build.add_argument("--background", action="store_true",
                       help="build beside a running show (what serve's background builds use): lower process "
                       "priority and a smaller TensorRT workspace, so the show keeps its GPU memory and CPU")
    build.add_argument("--manifest", metavar="FILE", help="write the record files of the engines the configuration "
                       "needs (built or found) to FILE as a JSON list (what serve's background builds read)")
    _add_flags(build)
    doctor = sub.add_parser("doctor", help="say what this machine can run and which built engines are stale",
                            description="Report Python, torch, CUDA, the GPU, TensorRT and the ONNX tools, which "
                            "backend `serve` would use, and every engine in engine_dir with whether it is current "
                            "or stale and why.")
    _add_flags(doctor)
    td = sub.add_parser("touchdesigner", help="write sdbridge_build.py, which builds sdbridge.tox inside TouchDesigner",
                        description="Write a script that, run from a Text DAT inside TouchDesigner, assembles the "
                        "sdbridge component (custom parameters from this configuration's schema, the client code, "
                        "inputs for the configured ControlNets) and saves sdbridge.tox. Takes serve's flags: the "
                        "component's Launch pulse starts the daemon with this Python, model, config, instance and "
                        "ports. docs/touchdesigner.md.")
    td.add_argument("--out", default="sdbridge_build.py", metavar="FILE",
                    help="where to write the script (default: sdbridge_build.py)")
    _add_flags(td)
    tosc = sub.add_parser("touchosc", help="write a TouchOSC layout with a fader for every parameter played live",
                          description="Write a TouchOSC layout (.tosc): a fader sending /norm/<name> for every "
                          "ranged live parameter of this configuration (its LoRAs and ControlNets included), "
                          "buttons for pause and the choices, and the telemetry. Takes serve's flags. docs/osc.md.")
    tosc.add_argument("--out", default="sdbridge.tosc", metavar="FILE",
                      help="where to write the layout (default: sdbridge.tosc)")
    _add_flags(tosc)
    models = sub.add_parser("models", help="list the models, LoRAs, VAEs, TAESDs, ControlNets and embeddings "
                            "in the models folders",
                            description="List what the models folders hold, by the names serve, /model, /vae "
                            "and <lora:...> take; checkpoints with their architecture, read from the file "
                            "header only.")
    for name in ("models_dir", "allow_pickle"):  # the same flags as serve's, from the same declarations
        _add_setting(models, config.SETTING_FIELDS[name])
    models.add_argument("--config", metavar="FILE", help="TOML file whose models_dir and allow_pickle are used")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "models":
        return _models(args)
    try:
        settings, initial = _settings_from(args)
    except config.ConfigError as e:
        print(f"sdbridge: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "soak":  # loads no model: the daemon it drives is a process of its own
        return _soak(settings, initial, args, argv)
    _keep_freed_memory()
    from engines.registry import ModelError  # torch loads here, after the arguments are known to be good

    try:
        if args.command == "serve":
            return _serve(settings, initial)
        if args.command == "bench":
            return _bench(settings, initial, args, argv)
        if args.command == "build":
            return _build(settings, initial, args)
        if args.command == "touchdesigner":
            return _touchdesigner(settings, initial, args)
        if args.command == "touchosc":
            return _touchosc(settings, initial, args)
        if args.command == "doctor":
            from .builds import doctor
            print(doctor(settings))
            return 0
        return _demo(settings, initial, args.seconds, args.out)
    except (ModelError, shm.RingError, config.ConfigError, params.ParamError) as e:
        print(f"sdbridge: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a port in use, a segment we may not create
        print(f"sdbridge: {e}", file=sys.stderr)
        return 2


def _keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of giving it back to the system at once.

    By default glibc serves each allocation over its (adaptive) mmap threshold with a fresh mapping
    and unmaps it at free; a frame on the CPU allocates its large activations anew every frame, so
    every frame pays a page fault per 4 KiB page of them. Measured on a 2-core CPU with the tiny model
    at 512x512: the bare engine 3.2 -> 4.8 fps. Freed memory stays in the process (up to 1 GiB above
    what is in use), which a daemon that renders the same frame shape all night reuses anyway.
    Linux with glibc only; elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave it alone
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 * 2**20)  # blocks up to 32 MiB come from the heap, not their own mapping
    mallopt(m_trim_threshold, 2**30)  # give the heap's top back only beyond 1 GiB free
    mallopt(m_top_pad, 64 * 2**20)  # and grow it in 64 MiB steps


def _serve(settings: config.Settings, initial: dict[str, Any]) -> int:
    from .daemon import Daemon

    stop = threading.Event()
    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGBREAK", None)):
        if sig is not None:
            signal.signal(sig, on_signal)
    daemon = Daemon(settings, initial)
    try:
        daemon.start()
        while not stop.wait(0.2):
            if daemon.loop.ready.is_set() and daemon.loop.stream is None:
                # nothing to serve and, until models can be switched live, nothing to recover to
                print(f"sdbridge: model {settings.model!r} failed to load; see the log above", file=sys.stderr)
                return 1
    finally:
        daemon.stop()
    return 0


def _demo(settings: config.Settings, initial: dict[str, Any], seconds: float, out: str) -> int:
    from . import demo

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the daemon's `with`, which removes the segments

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = demo.run(settings, initial, seconds=seconds, out_dir=out)
    except KeyboardInterrupt:
        print("sdbridge: demo interrupted", file=sys.stderr)
        return 130
    print(result.summary(), flush=True)
    return 0 if result.frames > 0 else 1


def _bench(settings: config.Settings, initial: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> int:
    from . import bench

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the daemon's stop, which removes the segments

    signal.signal(signal.SIGTERM, on_sigterm)
    options = bench.BenchOptions(seconds=args.seconds, input_fps=args.input_fps, compare=args.compare,
                                 peak_tflops=args.peak_tflops, command=shlex.join(["sdbridge", *argv]))
    try:
        result = bench.run(settings, initial, options)
    except bench.BenchError as e:
        print(f"sdbridge: bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdbridge: bench interrupted", file=sys.stderr)
        return 130
    print(json.dumps(result.to_json(), indent=2) if args.json else result.markdown(), flush=True)
    if result.warning:
        print(f"sdbridge: {result.warning}", file=sys.stderr)
    if result.diffusers is not None and result.diffusers.error:
        print(f"sdbridge: bench: the diffusers baseline failed: {result.diffusers.error}", file=sys.stderr)
        return 1
    return 0


def _soak(settings: config.Settings, initial: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> int:
    from . import soak

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the soak's clean-up, which stops its daemon

    signal.signal(signal.SIGTERM, on_sigterm)
    options = soak.SoakOptions(minutes=args.minutes, osc_clients=args.osc_clients, ws_clients=args.ws_clients,
                               rate=args.rate, input_fps=args.input_fps, sample_s=args.sample_seconds,
                               warmup_s=args.warmup_seconds, command=shlex.join(["sdbridge", *argv]))
    try:
        result = soak.run(settings, initial, _serve_flags(args), options,
                          on_sample=lambda sample: print(sample.line(), flush=True))
    except (soak.SoakError, ValueError) as e:
        print(f"sdbridge: soak: {e}", file=sys.stderr)
        return 1 if isinstance(e, soak.SoakError) else 2
    except KeyboardInterrupt:
        print("sdbridge: soak interrupted", file=sys.stderr)
        return 130
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, indent=2)
    print(result.summary(), flush=True)
    return 0 if result.passed else 1


def _serve_flags(args: argparse.Namespace) -> list[str]:
    """The serve flags given in `args` (the config file, settings and initial parameters), written
    out again for `sdbridge serve` in a child process."""
    out = ["--config", args.config] if args.config else []
    for f in dataclasses.fields(config.Settings):
        value = getattr(args, f.name, None)
        flag = f.metadata.get("flag") or _flag(f.name)
        if value is None:
            continue
        if isinstance(f.default, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(f.default, tuple):
            out += [part for item in value for part in (flag, str(item))]
        else:
            out += [flag, str(value)]
    for p in _flag_params():
        value = getattr(args, p.name, None)
        if value is not None:
            out += [_flag(p.name), str(int(value)) if p.kind is bool else str(value)]
    return out


def _build(settings: config.Settings, initial: dict[str, Any], args: argparse.Namespace) -> int:
    from engines.backends.tensorrt import TensorRTUnavailable
    from engines.backends.tensorrt.build import EngineBuildError

    from .builds import run_build
    try:
        return run_build(settings, initial, onnx_only=args.onnx_only, background=args.background,
                         manifest=args.manifest)
    except (TensorRTUnavailable, EngineBuildError) as e:
        print(f"sdbridge build: {e}", file=sys.stderr)
        return 2


def _configured(settings: config.Settings, initial: dict[str, Any]) -> Any:
    """A daemon for this configuration, not started: what it would serve (schema, starting state)."""
    from .daemon import Daemon
    daemon = Daemon(settings, initial)
    daemon.telemetry.close()  # the only thing it holds before `start`
    return daemon


def _touchdesigner(settings: config.Settings, initial: dict[str, Any], args: argparse.Namespace) -> int:
    from pathlib import Path

    from touchdesigner.script import build_script

    from .web import state_body
    daemon = _configured(settings, initial)
    schema, state = daemon.schema(), state_body(daemon.store.snapshot())["params"]
    local = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    launch = {"executable": sys.executable, "model": settings.model,
              "config": str(Path(args.config).resolve()) if args.config else "", "instance": settings.instance,
              "host": local, "osc_port": settings.osc_port, "telemetry_port": settings.telemetry_port,
              "http_port": settings.http_port}
    out = Path(args.out)
    out.write_text(build_script(schema, state, launch), encoding="utf-8")
    print(f"wrote {out.resolve()} ({len(schema['params'])} parameters, {len(schema['controlnets'])} ControlNet "
          "inputs).\nIn TouchDesigner: drag it into a network, right-click it, Run Script; it saves sdbridge.tox "
          "next to your project.")
    return 0


def _touchosc(settings: config.Settings, initial: dict[str, Any], args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import touchosc
    schema = _configured(settings, initial).schema_params()
    out = Path(args.out)
    out.write_bytes(touchosc.layout(schema))
    listed = touchosc.controls(schema)
    print(f"wrote {out.resolve()}: {sum(c.kind == touchosc.FADER for c in listed)} faders, "
          f"{sum(c.kind in (touchosc.TOGGLE, touchosc.BUTTON) for c in listed)} buttons.\nIn TouchOSC: open it; "
          f"Connections > OSC: UDP, host: this machine's network address, send port {settings.osc_port}, receive "
          f"port {settings.telemetry_port}. A tablet reaches the daemon when it runs with --host 0.0.0.0 "
          "--telemetry-host TABLET_ADDRESS (docs/osc.md).")
    return 0


def _models(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in ("models_dir", "allow_pickle") if getattr(args, k) is not None}
    try:
        settings, _ = config.load(args.config, overrides)
    except config.ConfigError as e:
        print(f"sdbridge: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from engines import folders as model_folders  # torch loads here
    from engines.bundle import ModelError

    try:
        found = model_folders.ModelFolders(settings.models_dir)
        listing = _listing(found, settings.allow_pickle)
    except ModelError as e:
        print(f"sdbridge: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(listing, indent=2, ensure_ascii=False))
    elif not found:
        print(NO_FOLDERS)
    else:
        print(_table(listing))
    return 0


NO_FOLDERS = ("no models folders given: sdbridge models --models-dir DIR (an A1111 or ComfyUI install, its "
              "models/ folder, or a folder of checkpoints; repeat it for several), or models_dir = [\"DIR\"] in "
              "a file given with --config")


def _listing(found: Any, allow_pickle: bool) -> dict[str, Any]:
    """Everything the folders hold, as plain data: {"folders": [...], "kinds": {kind: [entry, ...]},
    "hidden": {kind: [entries whose name an earlier one took]}}."""
    from engines import folders as model_folders

    kinds: dict[str, list[dict[str, Any]]] = {}
    hidden: dict[str, list[dict[str, str]]] = {}
    for kind in model_folders.KINDS:
        rows = []
        for entry in found.list(kind):
            row: dict[str, Any] = {"name": entry.name, "path": str(entry.path), "folder": str(entry.root),
                                   "format": entry.format, "pickle": entry.pickle, "size_bytes": entry.size_bytes}
            if entry.pickle:
                row["loadable"] = allow_pickle
            if kind == model_folders.CHECKPOINTS:
                row["arch"], row["arch_reason"] = _architecture(entry)
            rows.append(row)
        kinds[kind] = rows
        hidden[kind] = [{"name": e.name, "path": str(e.path)} for e in found.hidden(kind)]
    return {"folders": [{"path": str(layout.path), "layout": layout.kind,
                         "kinds": {k: [str(r) for r in roots] for k, roots in layout.roots.items()}}
                        for layout in found.layouts],
            "kinds": kinds, "hidden": {k: v for k, v in hidden.items() if v}}


def _architecture(entry: Any) -> tuple[str, str]:
    """A checkpoint's architecture from its header or config (no weights read), or "?" and why not."""
    from engines.bundle import ModelError

    if entry.format == "diffusers":
        from engines import registry
        return registry.folder_arch(entry.path), ""
    if entry.pickle:
        return "?", "pickle: its architecture is only known once it is loaded"
    try:
        from engines import checkpoints
        from engines.weights import read_safetensors_header
    except ImportError as e:
        return "?", f"cannot inspect checkpoints here ({e})"
    try:
        shapes, metadata = read_safetensors_header(entry.path)
        return checkpoints.detect_architecture(shapes, metadata), ""
    except ModelError as e:
        return "?", str(e)


def _table(listing: dict[str, Any]) -> str:
    """For people: one aligned table per kind, with the folder each entry came from."""
    folders = ", ".join(f"{f['path']} ({f['layout']})" for f in listing["folders"])
    lines = [f"models folders: {folders}"]
    for kind, rows in listing["kinds"].items():
        lines += ["", f"{kind} ({len(rows)})"]
        if not rows:
            continue
        checkpoints = kind == "checkpoints"
        table = [["NAME", *(["ARCH"] if checkpoints else []), "FORMAT", "SIZE", "FOLDER"]]
        notes: dict[int, str] = {}
        for row in rows:
            fmt = row["format"]
            if row["pickle"]:
                fmt += " (allowed)" if row.get("loadable") else " (needs --allow-pickle)"
            if checkpoints and row.get("arch_reason"):
                notes[len(table)] = f"? {row['arch_reason']}"
            table.append([row["name"], *([row["arch"]] if checkpoints else []), fmt, _size(row["size_bytes"]),
                          row["folder"]])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        for n, r in enumerate(table):
            cells = [c.rjust(w) if i == len(widths) - 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
            lines.append("  " + "  ".join([*cells, r[-1]]))
            if n in notes:
                lines.append("      " + notes[n])
        for row in listing["hidden"].get(kind, ()):
            lines.append(f"  hidden: {row['path']} (an entry above has the name {row['name']!r})")
    return "\n".join(lines)


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


if __name__ == "__main__":
    sys.exit(main())
