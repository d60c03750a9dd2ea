"""Show commands: the OSC addresses (and WebSocket `command` messages) that act rather than set a parameter.

`/preset/morph`, `/schedule/*`, the clock (`/beat`, `/bpm`, `/frame`), `/record/*` and `/snapshot` are
declared here once, with their arguments and docs, the way bridge/params declares parameters: OSC and the
WebSocket check arguments against `COMMANDS` and hand them to the same handler, and the docs and the
schema list them from here. This module knows nothing of sockets, presets or the recorder: the daemon
supplies a handler per address.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

MAX_TEXT = 65536  # /schedule/set carries a whole schedule file
MAX_NUMBER = 2.0 ** 53  # larger is no frame, beat, tempo or time a show has (and past 2**1024 no float)


class CommandError(ValueError):
    """A command the daemon refuses; the message says which and what it takes."""


@dataclass(frozen=True)
class Arg:
    name: str
    kind: type  # str, float or int
    optional: bool = False


@dataclass(frozen=True)
class Command:
    """One show command: its OSC address (also its name in a WebSocket `command` message) and arguments."""

    address: str
    args: tuple[Arg, ...]
    doc: str

    @property
    def signature(self) -> str:
        """The arguments as docs write them: `NAME SECONDS [EASING]`."""
        return " ".join(f"[{a.name}]" if a.optional else a.name for a in self.args)

    def check(self, args: list[Any] | tuple[Any, ...]) -> list[Any]:
        """`args` coerced to the declared kinds (ints pass for floats, whole floats for ints), or CommandError."""
        required = sum(not a.optional for a in self.args)
        if not required <= len(args) <= len(self.args):
            count = str(required) if required == len(self.args) else f"{required} to {len(self.args)}"
            raise CommandError(f"{self.address} takes {count} argument(s) ({self.signature or 'none'}), "
                               f"got {len(args)}")
        return [_coerce(self.address, arg, value) for arg, value in zip(self.args, args)]

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for /api/schema and docs."""
        return {"address": self.address, "doc": self.doc,
                "args": [{"name": a.name, "type": a.kind.__name__, "optional": a.optional} for a in self.args]}


def _coerce(address: str, arg: Arg, value: Any) -> Any:
    if arg.kind is str:
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise CommandError(f"{address}: {arg.name} is a string of at most {MAX_TEXT} characters, got "
                               f"{type(value).__name__}")
        return value
    # (an int past a float's range, from JSON, is refused here rather than overflowing in isfinite)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > MAX_NUMBER \
            or not math.isfinite(value):
        raise CommandError(f"{address}: {arg.name} is a finite number (at most 2^53 in size), got "
                           f"{str(value)[:40]!r}")
    if arg.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise CommandError(f"{address}: {arg.name} is a whole number, got {value}")
        return int(value)
    return float(value)


COMMANDS: tuple[Command, ...] = (
    Command("/preset/morph", (Arg("NAME", str), Arg("SECONDS", float), Arg("EASING", str, optional=True)),
            "Ease from the current look to preset NAME over SECONDS: numbers eased, prompts blended, seeds "
            "slerped; EASING is linear, smoothstep (default), ease-in, ease-out or ease-in-out."),
    Command("/schedule/start", (Arg("NAME", str),), "Start the keyframed schedule NAME from the schedules folder, "
            "at time 0 (replaces a running one)."),
    Command("/schedule/set", (Arg("TEXT", str),), "Start a keyframed schedule given as TOML or JSON text."),
    Command("/schedule/stop", (), "Stop the schedule; its parameters keep their last values."),
    Command("/bpm", (Arg("BPM", float),), "The tempo that beats advance at (from the current beat, no jump)."),
    Command("/beat", (Arg("POSITION", float, optional=True),), "A beat happened now (tap tempo), or the beat "
            "position is POSITION now (Ableton Link's beat, TouchDesigner's timeline)."),
    Command("/frame", (Arg("FRAME", int),), "The client's frame number now (TouchDesigner's timeline frame): "
            "schedules follow it."),
    Command("/record/start", (Arg("NAME", str, optional=True),), "Record the output to a video file in the "
            "recordings folder (NAME, or a time-stamped name)."),
    Command("/record/stop", (), "End the recording and close its file."),
    Command("/snapshot", (Arg("NAME", str, optional=True),), "Save the frame on screen as a PNG holding every "
            "parameter of the frame (A1111-style), in the recordings folder."),
)

BY_ADDRESS: dict[str, Command] = {c.address: c for c in COMMANDS}

Handler = Callable[..., Any]


def lookup(address: str) -> Command | None:
    return BY_ADDRESS.get(address)


class Commands:
    """The daemon's handlers, by address. `run` checks the arguments and calls the handler, which returns
    something JSON can carry (sent back in the WebSocket ack) or None, and raises ValueError to refuse."""

    def __init__(self, handlers: Mapping[str, Handler]):
        unknown = set(handlers) - set(BY_ADDRESS)
        if unknown:
            raise ValueError(f"handlers for undeclared commands: {', '.join(sorted(unknown))}")
        self._handlers = dict(handlers)

    def __contains__(self, address: str) -> bool:
        return address in self._handlers

    def check(self, address: str, args: list[Any] | tuple[Any, ...]) -> list[Any]:
        """The checked arguments of a command this daemon runs, or CommandError."""
        command = BY_ADDRESS.get(address)
        if command is None or address not in self._handlers:
            raise CommandError(f"unknown command {address[:80]!r}; commands are {', '.join(self._handlers)}")
        return command.check(args)

    def run(self, address: str, args: list[Any] | tuple[Any, ...]) -> Any:
        checked = self.check(address, args)  # first: it refuses an address with no handler
        return self._handlers[address](*checked)
