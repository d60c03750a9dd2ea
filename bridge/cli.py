"""The `sdbridge` command: `serve` runs the daemon, `demo` shows it working end to end.

Every setting (bridge/config.py) and every parameter (bridge/params.py) is also a flag, derived from
those declarations: `osc_port` is `--osc-port`, `prompt` is `--prompt`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from typing import Any, Callable, Sequence

from . import __version__, config, params, shm

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


_METAVAR = {int: "N", float: "X", str: "TEXT", bool: "0|1"}


def _add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings and initial parameters "
                        "(see configs/default.toml); flags override it")
    group = parser.add_argument_group("settings")
    for f in dataclasses.fields(config.Settings):
        kind: Callable[[str], Any] = type(f.default)
        choices = f.metadata.get("choices") or None
        group.add_argument(_flag(f.name), dest=f.name, type=kind, choices=choices, default=None,
                           metavar=None if choices else _METAVAR[kind],
                           help=f"{f.metadata['doc']} (default: {f.default})")
    group = parser.add_argument_group("initial parameters (also playable over OSC as /<name>)")
    for p in params.PARAMS:
        kind = _parse_bool if p.kind is bool else p.kind
        group.add_argument(_flag(p.name), dest=p.name, type=kind, default=None, choices=p.choices or None,
                           metavar=None if p.choices else _METAVAR[p.kind], help=f"{p.doc} (default: {p.default!r})")


def _settings_from(args: argparse.Namespace) -> tuple[config.Settings, dict[str, Any]]:
    names = [f.name for f in dataclasses.fields(config.Settings)] + [p.name for p in params.PARAMS]
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings, initial = _settings_from(args)
    except config.ConfigError as e:
        print(f"sdbridge: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # python-osc logs every malformed packet itself; the daemon reports those, rate-limited
    logging.getLogger("pythonosc").setLevel(logging.ERROR)
    from engines.registry import ModelError  # torch loads here, after the arguments are known to be good

    try:
        if args.command == "serve":
            return _serve(settings, initial)
        return _demo(settings, initial, args.seconds, args.out)
    except (ModelError, shm.RingError, config.ConfigError, params.ParamError) as e:
        print(f"sdbridge: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a port in use, a segment we may not create
        print(f"sdbridge: {e}", file=sys.stderr)
        return 2


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


if __name__ == "__main__":
    sys.exit(main())
