"""Keyframed schedules, Deforum style, and the show clock they run on.

A `Schedule` (a TOML or JSON file in the schedules folder, or the same text sent over the network) maps
keyframes (frames, beats or seconds) to prompts, and parameters to numbers, expressions of time
(bridge/expressions) or Deforum keyframe strings. `schedule.at(clock.now())` is the change set for that
moment, every value validated against bridge/params (numbers that swing out of range are clamped to it),
plus the errors of expressions that could not be evaluated then (those parameters are left out, so they
keep their last good value).

`ShowClock` says what time it is for a schedule: seconds since the schedule started on the daemon's
monotonic clock, the beat (counted at the tempo, or following /beat positions and taps and /bpm), and the
frame (counted at fps, or following the frame numbers a client such as TouchDesigner's timeline sends).
`Schedules` is the schedules folder. This module knows nothing of OSC, threads that drive the state, or
the render loop: bridge/show applies `at` to the state store, the daemon wires the OSC addresses.
"""
from __future__ import annotations

import bisect
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from . import params
from .config import user_folder
from .expressions import (ExpressionError, Expression, Keyframe, Keyframes, looks_like_keyframes, parse_keyframes,
                          parse_position, round_half_away)
from .presets import FILE_NAME_RULE, is_file_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

UNITS = ("frame", "beat", "second")
DEFAULT_BPM = 120.0
DEFAULT_FPS = 30.0
BPM_RANGE = (1.0, 999.0)
FPS_RANGE = (1.0, 1000.0)
FRAME_FOLLOW_S = 1.0  # client frame numbers are followed while they come at least this often
BEAT_FOLLOW_S = 2.0  # and beat positions (a bridge may send one per beat: 2 s is one beat at 30 bpm)
TAP_GAP_S = 2.0  # a tap later than this after the previous one starts a new tap-tempo count
TAP_HISTORY = 8  # taps the tempo is averaged over
TAP_TOLERANCE = 0.2  # taps are regular when every interval is within 20% of their median
MAX_TEXT = 1_000_000  # characters of a schedule file or message
# keyframes of a whole schedule: far beyond a show's, and it parses in about 0.2 s at most (on the network
# thread, where a start is checked and answered)
MAX_SCHEDULE_KEYFRAMES = 1000
SUFFIXES = (".toml", ".json")
KEYS = ("unit", "length", "fps", "bpm", "prompt_blend", "prompts", "params", "description")


class ScheduleError(ValueError):
    """A schedule that cannot be read, or a clock value refused; the message names the key and says why."""


# ============================================================================================ the clock
@dataclass(frozen=True)
class ShowTime:
    """One moment on the show clock: seconds since the schedule started, the beat position, the frame
    number (fractional between frames) and the tempo in beats per minute."""

    seconds: float
    beat: float
    frame: float
    bpm: float

    def variables(self) -> dict[str, float]:
        """The expression variables: t (seconds), beat, frame and bpm."""
        return {"t": self.seconds, "beat": self.beat, "frame": self.frame, "bpm": self.bpm}


def _number(what: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleError(f"{what}: expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        bounds = f" from {low:g} to {high:g}" if low is not None and high is not None else ""
        raise ScheduleError(f"{what}: expected a finite number{bounds}, got {value!r:.40}")
    return number


class ShowClock:
    """The time schedules run on. Thread-safe: network handlers set it, the show driver reads it.

    Without any message, `now()` counts from `restart()` on the monotonic clock `now_s`: beat =
    seconds * bpm / 60, frame = seconds * fps. `set_bpm` changes the tempo from the current beat on (no
    jump). `beat()` says a beat happened now: the beat position snaps to the nearest whole beat and, unless
    a tempo came by `set_bpm`, regular taps set the tempo. `beat(position)` says the beat position is
    `position` now (Ableton Link's beat, a timeline's). `set_frame(n)` says the client's frame is n now;
    frames then count on from n at fps until the next one. Beat positions and frame numbers that keep
    coming (within BEAT_FOLLOW_S and FRAME_FOLLOW_S) are followed across a `restart()`, so a schedule
    started during a show follows the client's timeline; once they stop, a restart counts from 0 again.
    """

    def __init__(self, now_s: Callable[[], float] = time.monotonic, bpm: float = DEFAULT_BPM,
                 fps: float = DEFAULT_FPS):
        self._now_s = now_s
        self._lock = threading.Lock()
        self._bpm = _number("bpm", bpm, *BPM_RANGE)
        self._fps = _number("fps", fps, *FPS_RANGE)
        self._bpm_given = False  # a /bpm came: taps only snap the phase from then on
        self._tempo_told = False  # a client set the tempo (/bpm or taps): a schedule's own bpm does not replace it
        self._taps: list[float] = []
        self._beats_at: float | None = None  # when the last beat position arrived
        self._frames_at: float | None = None  # when the last client frame arrived
        now = now_s()
        self._origin = now
        self._beat_anchor = (0.0, now)  # (beat position, when)
        self._frame_anchor = (0.0, now)  # (frame, when)

    # ------------------------------------------------------------------ reading
    def now(self) -> ShowTime:
        """The time now."""
        with self._lock:
            now = self._now_s()
            return ShowTime(now - self._origin, self._beat_at(now), self._frame_at(now), self._bpm)

    @property
    def fps(self) -> float:
        return self._fps

    @property
    def follows_beats(self) -> bool:
        """True while beat positions keep coming from a client (Link, a timeline)."""
        with self._lock:
            return self._fresh(self._beats_at, BEAT_FOLLOW_S, self._now_s())

    @property
    def follows_frames(self) -> bool:
        """True while frame numbers keep coming from a client (TouchDesigner's timeline)."""
        with self._lock:
            return self._fresh(self._frames_at, FRAME_FOLLOW_S, self._now_s())

    def _beat_at(self, now: float) -> float:
        position, at = self._beat_anchor
        return position + (now - at) * self._bpm / 60.0

    def _frame_at(self, now: float) -> float:
        frame, at = self._frame_anchor
        return frame + (now - at) * self._fps

    @staticmethod
    def _fresh(at: float | None, window: float, now: float) -> bool:
        return at is not None and now - at <= window

    # ------------------------------------------------------------------ setting
    def restart(self, fps: float | None = None, bpm: float | None = None) -> None:
        """A schedule starts: seconds count from 0 again, and so do the beat and the frame unless a client
        is sending them. `fps` and `bpm` (a schedule's own) replace the clock's when given; a tempo a client
        set (/bpm, taps) stays."""
        fps = None if fps is None else _number("fps", fps, *FPS_RANGE)
        bpm = None if bpm is None else _number("bpm", bpm, *BPM_RANGE)
        with self._lock:
            now = self._now_s()
            self._origin = now
            if bpm is not None and not self._tempo_told:
                self._beat_anchor, self._bpm = (self._beat_at(now), now), bpm
            if fps is not None:
                self._frame_anchor, self._fps = (self._frame_at(now), now), fps
            if not self._fresh(self._beats_at, BEAT_FOLLOW_S, now):
                self._beat_anchor = (0.0, now)
                self._taps.clear()
            if not self._fresh(self._frames_at, FRAME_FOLLOW_S, now):
                self._frame_anchor = (0.0, now)

    def set_bpm(self, bpm: float) -> None:
        """OSC /bpm: beats advance at `bpm` from the current beat position on. Taps no longer set the tempo."""
        bpm = _number("/bpm", bpm, *BPM_RANGE)
        with self._lock:
            now = self._now_s()
            self._beat_anchor = (self._beat_at(now), now)
            self._bpm = bpm
            self._bpm_given = self._tempo_told = True

    def set_fps(self, fps: float) -> None:
        """Frames count on at `fps` from the current frame on (a schedule's `fps`)."""
        fps = _number("fps", fps, *FPS_RANGE)
        with self._lock:
            now = self._now_s()
            self._frame_anchor = (self._frame_at(now), now)
            self._fps = fps

    def beat(self, position: float | None = None) -> None:
        """OSC /beat. With no position: a beat happened now (a tap, a kick detector); the beat position
        snaps to the nearest whole beat and, when no /bpm was given, three or more regular taps set the
        tempo. With a position: the beat position is that now (Link's beat, a timeline's beat)."""
        if position is not None:
            position = _number("/beat", position)
        with self._lock:
            now = self._now_s()
            if position is not None:
                self._beat_anchor = (position, now)
                self._beats_at = now
                return
            self._tap(now)
            self._beat_anchor = (float(round_half_away(self._beat_at(now))), now)

    def _tap(self, now: float) -> None:
        if self._taps and not 0.0 < now - self._taps[-1] <= TAP_GAP_S:
            self._taps.clear()  # a pause (or a clock that went back): a new count
        self._taps.append(now)
        del self._taps[:-TAP_HISTORY]
        if self._bpm_given or len(self._taps) < 3:
            return
        intervals = [b - a for a, b in zip(self._taps, self._taps[1:])]
        median = sorted(intervals)[len(intervals) // 2]
        if any(abs(i - median) > TAP_TOLERANCE * median for i in intervals):
            del self._taps[:-2]  # irregular: count again from the last two taps
            return
        bpm = 60.0 * len(intervals) / sum(intervals)
        if BPM_RANGE[0] <= bpm <= BPM_RANGE[1]:
            # the snap that follows re-anchors the beat, so the new tempo takes effect from this tap
            self._bpm = bpm
            self._tempo_told = True

    def set_frame(self, frame: float) -> None:
        """OSC /frame: the client's frame number is `frame` now; between messages it counts on at fps."""
        frame = _number("/frame", frame)
        with self._lock:
            now = self._now_s()
            self._frame_anchor = (frame, now)
            self._frames_at = now


# ============================================================================================ schedules
class ScheduleValues(NamedTuple):
    """What a schedule gives for one moment: the change set, and the errors of the expressions that could
    not be evaluated then (their parameters are left out). An error's text does not depend on the time,
    so a driver can report each one once."""

    values: dict[str, Any]
    errors: list[str]


def _fit(param: params.Param, value: float) -> Any:
    """A number from an expression as `param` takes it: rounded for whole-number parameters, clamped to
    the parameter's range, so a swing past a bound holds at the bound instead of stopping the show."""
    if param.kind is int:
        step = param.multiple_of
        value = round_half_away(value / step) * step
    if param.minimum is not None and value < param.minimum:
        value = param.minimum
    if param.maximum is not None and value > param.maximum:
        value = param.maximum
    if param.kind is int:
        value = int(value)
    return param.coerce(value)


@dataclass(frozen=True)
class _NumberTrack:
    """A numeric parameter driven by keyframed expressions."""

    name: str
    param: params.Param
    keyframes: Keyframes

    def at(self, position: float, variables: Mapping[str, float]) -> Any:
        return _fit(self.param, self.keyframes.at(position, variables))


@dataclass(frozen=True)
class _TextTrack:
    """A text parameter (a prompt, a negative prompt, a choice) switched at keyframes: the text of the
    last keyframe at or before the position (the first one's before it)."""

    name: str
    positions: tuple[float, ...]
    texts: tuple[str, ...]

    def index(self, position: float) -> int:
        return max(0, bisect.bisect_right(self.positions, position) - 1)

    def at(self, position: float) -> str:
        return self.texts[self.index(position)]

    def blend(self, position: float) -> tuple[tuple[str, float], ...]:
        """[text, weight] pairs crossfading from each keyframe's text to the next one's."""
        i = self.index(position)
        if position <= self.positions[0] or i + 1 >= len(self.positions):
            return ((self.texts[i], 1.0),)
        a, b = self.positions[i], self.positions[i + 1]
        fraction = (position - a) / (b - a)
        if fraction <= 0.0 or self.texts[i] == self.texts[i + 1]:
            return ((self.texts[i], 1.0),)
        return ((self.texts[i], 1.0 - fraction), (self.texts[i + 1], fraction))


class Schedule:
    """A parsed schedule: what it drives (`keys`), how it counts (`unit`, `length`, `fps`, `bpm`) and its
    values at any moment (`at`). Immutable; build one with `from_mapping` or `from_text`."""

    def __init__(self, unit: str, length: float | None, fps: float | None, bpm: float | None, prompt_blend: bool,
                 numbers: tuple[_NumberTrack, ...], texts: tuple[_TextTrack, ...], prompts: _TextTrack | None,
                 description: str = ""):
        self.unit = unit
        self.length = length
        self.fps = fps
        self.bpm = bpm
        self.prompt_blend = prompt_blend
        self.description = description
        self._numbers = numbers
        self._texts = texts
        self._prompts = prompts
        driven = [t.name for t in numbers] + [t.name for t in texts]
        if prompts is not None:
            driven.append("prompts" if prompt_blend else "prompt")
        self.keys: frozenset[str] = frozenset(driven)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_text(cls, text: str, format: str | None = None) -> "Schedule":
        """A schedule from TOML or JSON text (`format` "toml" or "json"; by default JSON when the text
        starts with `{`, TOML otherwise). ScheduleError naming what is wrong."""
        if not isinstance(text, str):
            raise ScheduleError(f"a schedule is TOML or JSON text, got {type(text).__name__}")
        if len(text) > MAX_TEXT:
            raise ScheduleError(f"schedule of {len(text)} characters; at most {MAX_TEXT}")
        if format is None:
            format = "json" if text.lstrip().startswith("{") else "toml"
        try:
            if format == "json":
                data = json.loads(text)
            elif format == "toml":
                data = tomllib.loads(text)
            else:
                raise ScheduleError(f"schedule format {format!r}: toml or json")
        except json.JSONDecodeError as e:
            raise ScheduleError(f"schedule is not valid JSON: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ScheduleError(f"schedule is not valid TOML: {e}") from None
        except (RecursionError, MemoryError, ValueError) as e:
            raise ScheduleError(f"schedule cannot be read: {type(e).__name__}") from None
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: Any) -> "Schedule":
        """A schedule from its tables (as TOML or JSON reads them). ScheduleError naming the key at fault."""
        if not isinstance(data, Mapping):
            raise ScheduleError(f"a schedule is a table of {', '.join(KEYS)}, got {type(data).__name__}")
        unknown = [str(k) for k in data if k not in KEYS]
        if unknown:
            raise ScheduleError(f"unknown schedule key(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; "
                                f"keys are {', '.join(KEYS)}")
        unit = data.get("unit", "frame")
        if unit not in UNITS:
            raise ScheduleError(f"unit {str(unit)[:40]!r}: one of {', '.join(UNITS)}")
        length = _number("length", data["length"]) if "length" in data else None
        if length is not None and length <= 0:
            raise ScheduleError(f"length: expected a number of {unit}s above 0, got {data['length']!r}")
        fps = _number("fps", data["fps"], *FPS_RANGE) if "fps" in data else None
        bpm = _number("bpm", data["bpm"], *BPM_RANGE) if "bpm" in data else None
        prompt_blend = data.get("prompt_blend", False)
        if not isinstance(prompt_blend, bool):
            raise ScheduleError(f"prompt_blend: true or false, got {prompt_blend!r:.40}")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise ScheduleError("description: expected text")

        count = sum(_keyframe_count(v) for v in (data.get("prompts", {}), *_values(data.get("params"))))
        if count > MAX_SCHEDULE_KEYFRAMES:
            raise ScheduleError(f"about {count} keyframes; a schedule holds at most {MAX_SCHEDULE_KEYFRAMES}")
        prompts = None
        if "prompts" in data:
            prompts = _text_track("prompts", params.BY_NAME["prompt"], data["prompts"], length)
        numbers: list[_NumberTrack] = []
        texts: list[_TextTrack] = []
        table = data.get("params", {})
        if not isinstance(table, Mapping):
            raise ScheduleError(f"params: a table of parameter = value, got {type(table).__name__}")
        for name, value in table.items():
            track = _param_track(name, value, length)
            (numbers if isinstance(track, _NumberTrack) else texts).append(track)
        if prompts is None and not numbers and not texts:
            raise ScheduleError("the schedule drives nothing: give [prompts] or [params]")
        return cls(unit, length, fps, bpm, prompt_blend, tuple(numbers), tuple(texts), prompts, description)

    # ------------------------------------------------------------------ evaluating
    def position(self, time: ShowTime) -> float:
        """Where `time` is in the schedule's unit, wrapped into 0..length when the schedule loops."""
        position = time.frame if self.unit == "frame" else time.beat if self.unit == "beat" else time.seconds
        if self.length is not None:
            position %= self.length
        return position

    def text_keyframes(self) -> Iterator[dict[str, str]]:
        """A change set {name: text} for every text keyframe (prompts included), to check before the
        schedule starts what the state would refuse when it comes (a style that is not there)."""
        tracks = (*self._texts, *((self._prompts,) if self._prompts is not None else ()))
        for track in tracks:
            name = "prompt" if track is self._prompts else track.name
            for text in dict.fromkeys(track.texts):
                yield {name: text}

    def at(self, time: ShowTime) -> ScheduleValues:
        """The change set for `time`, every value valid for its parameter, and the errors of the
        expressions that failed at this time (their parameters are left out of the change set)."""
        position = self.position(time)
        variables = time.variables()
        values: dict[str, Any] = {}
        errors: list[str] = []
        for track in self._numbers:
            try:
                values[track.name] = track.at(position, variables)
            except (ExpressionError, params.ParamError) as e:
                errors.append(f"{track.name}: {e}")
        for text in self._texts:
            values[text.name] = text.at(position)
        if self._prompts is not None:
            if self.prompt_blend:
                values["prompts"] = self._prompts.blend(position)
            else:
                values["prompt"] = self._prompts.at(position)
        return ScheduleValues(values, errors)

    def __repr__(self) -> str:
        return f"Schedule(unit={self.unit!r}, length={self.length}, keys={sorted(self.keys)})"


def _values(table: Any) -> tuple[Any, ...]:
    return tuple(table.values()) if isinstance(table, Mapping) else ()


def _keyframe_count(value: Any) -> int:
    """How many keyframes `value` (a table, a keyframe string, a value) holds at most, before parsing it."""
    if isinstance(value, Mapping):
        return len(value)
    if isinstance(value, str) and looks_like_keyframes(value):
        return value.count(",") + 1
    return 1


def _keyframe_table(where: str, table: Any) -> list[tuple[float, Any]]:
    """(position, value) pairs of a keyframe table, sorted; ScheduleError for a bad key."""
    if not isinstance(table, Mapping) or not table:
        raise ScheduleError(f"{where}: expected a table of keyframe = value, e.g. {{\"0\" = ..., \"64\" = ...}}")
    entries: list[tuple[float, Any]] = []
    for key, value in table.items():
        if key in KEYS:
            raise ScheduleError(f"{where}: {key!r} is a schedule key, not a keyframe; in TOML, write the "
                                "top-level keys before the first [table]")
        if isinstance(value, Mapping):  # TOML reads 1.5 = "x" as the table 1 = {5 = "x"}
            raise ScheduleError(f"{where}: keyframe {str(key)[:40]!r} holds a table; quote fractional "
                                f"keyframes in TOML: \"1.5\" = ...")
        try:
            position = parse_position(key)
        except ExpressionError as e:
            raise ScheduleError(f"{where}: {e}") from None
        entries.append((position, value))
    entries.sort(key=lambda e: e[0])
    for (a, _), (b, _) in zip(entries, entries[1:]):
        if a == b:
            raise ScheduleError(f"{where}: two keyframes at {a:g}")
    return entries


def _check_length(where: str, positions: list[float], length: float | None) -> None:
    if length is not None and positions and positions[-1] > length:
        raise ScheduleError(f"{where}: keyframe {positions[-1]:g} is past the loop length {length:g} (a keyframe "
                            "at the length itself is the value the loop ends on)")


def _text_track(name: str, param: params.Param, table: Any, length: float | None) -> _TextTrack:
    where = "prompts" if name == "prompts" else f"params.{name}"
    entries = _keyframe_table(where, table)
    texts = []
    for position, text in entries:
        try:
            texts.append(param.coerce(text))
        except params.ParamError as e:
            raise ScheduleError(f"{where}: keyframe {position:g}: {e}") from None
    positions = [p for p, _ in entries]
    _check_length(where, positions, length)
    return _TextTrack(param.name if name != "prompts" else "prompt", tuple(positions), tuple(texts))


def _param_track(name: Any, value: Any, length: float | None) -> _NumberTrack | _TextTrack:
    if not isinstance(name, str):
        raise ScheduleError(f"params: parameter names are text, got {name!r:.40}")
    where = f"params.{name[:80]}"
    if name in KEYS:
        raise ScheduleError(f"{where}: {name!r} is a schedule key, not a parameter; in TOML, write the "
                            "top-level keys before the first [table]")
    if name in ("prompt", "prompts"):
        raise ScheduleError(f"{where}: prompts are keyframed in the [prompts] table")
    try:
        param = params.lookup(name)
    except params.ParamError as e:
        raise ScheduleError(f"{where}: {e}") from None
    if not param.live:
        raise ScheduleError(f"{where}: changing {name} reloads or rebuilds the model, so it cannot be scheduled")
    if param.kind in (tuple, bool):
        raise ScheduleError(f"{where}: a {'list' if param.kind is tuple else 'on/off'} parameter cannot be scheduled")
    if param.kind is str:
        table = value if isinstance(value, Mapping) else {"0": value}
        return _text_track(name, param, table, length)
    try:
        if isinstance(value, Mapping):
            entries = _keyframe_table(where, value)
            keyframes = Keyframes([Keyframe(p, Expression.parse(v)) for p, v in entries])
        elif isinstance(value, str) and looks_like_keyframes(value):
            keyframes = parse_keyframes(value)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            keyframes = Keyframes([Keyframe(0.0, Expression.parse(value))])
        else:
            raise ScheduleError(f"{where}: expected a number, an expression or keyframes, got {type(value).__name__}")
    except ExpressionError as e:
        raise ScheduleError(f"{where}: {e}") from None
    _check_length(where, [k.position for k in keyframes.keyframes], length)
    for keyframe in keyframes.keyframes:  # a value out of range whatever the time is a mistake in the file
        constant = keyframe.expression.constant
        if constant is not None and ((param.minimum is not None and constant < param.minimum) or
                                     (param.maximum is not None and constant > param.maximum)):
            raise ScheduleError(f"{where}: {constant:g} at keyframe {keyframe.position:g} is out of range "
                                f"{param.minimum:g}..{param.maximum:g}")
    return _NumberTrack(name, param, keyframes)


# ============================================================================================ the folder
def check_name(name: Any) -> str:
    """`name` if it is a plain schedule name (as preset names: no separators, no leading dot), else
    ScheduleError: a name from the network never reaches outside the folder."""
    if not is_file_name(name):
        raise ScheduleError(f"schedule name {str(name)[:80]!r}: {FILE_NAME_RULE}")
    return name


def default_folder() -> Path:
    """The user's schedules folder: %APPDATA%\\sdbridge\\schedules on Windows, ~/.config/sdbridge/schedules
    elsewhere (the daemon uses it when schedules_dir is empty)."""
    return user_folder() / "schedules"


class Schedules:
    """The schedules folder: NAME.toml or NAME.json files, listed and loaded by name."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(os.path.expanduser(str(folder)))

    def names(self) -> list[str]:
        """Every schedule in the folder, by name."""
        try:
            files = [p for p in self.folder.iterdir() if p.suffix in SUFFIXES and p.is_file()]
        except OSError:  # no folder yet: no schedules
            return []
        return sorted({p.stem for p in files if is_file_name(p.stem)}, key=str.lower)

    def path(self, name: str) -> Path:
        """The file of schedule `name`: NAME.toml, else NAME.json, inside the folder; ScheduleError if none."""
        check_name(name)
        for suffix in SUFFIXES:
            path = self.folder / (name + suffix)
            if path.is_file():
                if not path.resolve().is_relative_to(self.folder.resolve()):
                    raise ScheduleError(f"schedule {name!r} refused: it leads outside {self.folder}")
                return path
        known = ", ".join(self.names()) or "none yet"
        raise ScheduleError(f"schedule {name!r} not found in {self.folder} (NAME.toml or NAME.json); known: {known}")

    def load(self, name: str) -> Schedule:
        """Schedule `name`, parsed; ScheduleError if there is none or it is unusable (the message says why)."""
        path = self.path(name)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_TEXT + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise ScheduleError(f"schedule {name!r}: cannot read {path}: {e}") from None
        try:
            return Schedule.from_text(text, path.suffix[1:])
        except ScheduleError as e:
            raise ScheduleError(f"schedule {name!r} ({path.name}): {e}") from None
