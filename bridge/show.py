"""The show driver: parameters played by time rather than by hand, a morph to a preset and a keyframed
schedule, applied to the state store from a thread of its own.

Many times a second the driver asks the running morph (bridge/morph) and schedule (bridge/schedule, on the
show clock) for their values now and applies them as one change set, so that every client sees the
state move and the render loop renders it like any other change. The performer wins: a parameter that
someone else sets while the show drives it is let go (the state no longer holds what the driver last
put there), and the driver stops driving it until the next morph or schedule. Each change set is applied
with a compare-and-set on the values the driver last put there, so a change made between the driver's
look and its write is never overwritten. Where a morph and a schedule drive the same parameter, the
morph wins until it ends. This module knows nothing of OSC, presets' files or the render loop.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Mapping

from . import params
from .morph import Morph, linked
from .schedule import Schedule, Schedules, ShowClock
from .state import StateStore

log = logging.getLogger(__name__)

SENT = "(sent)"  # the name of a schedule sent as text (/schedule/set)
RATE_HZ = 60.0  # how often the driver applies: as often as a fast stream shows frames

# Apply a change set unless the state no longer holds `only_if`; the new version, or None if it did not.
Apply = Callable[..., "int | None"]


class Show:
    """Drives the parameter state from a morph and a schedule; `start` its thread, `stop` it at the end."""

    def __init__(self, store: StateStore, apply: Apply, report_error: Callable[[str], None],
                 clock: ShowClock | None = None, rate_hz: float = RATE_HZ,
                 now: Callable[[], float] = time.monotonic):
        self.store = store
        self._apply = apply  # apply(changes, only_if=...) as the daemon checks names from the network
        self.report_error = report_error
        self.clock = clock or ShowClock()
        self.interval = 1.0 / rate_hz
        self._now = now
        self._lock = threading.Lock()
        self._morph: Morph | None = None
        self._morph_started = 0.0
        self._morph_name = ""
        self._schedule: Schedule | None = None
        self._schedule_name = ""
        self._driven: dict[str, Any] = {}  # what the driver last put into the state, by parameter
        self._released: set[str] = set()  # let go to the performer until the next morph or schedule
        self._reported: set[str] = set()  # schedule errors said once each
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdbridge-show", daemon=True)

    # ------------------------------------------------------------------ control (any thread)
    def morph(self, name: str, target: Mapping[str, Any], seconds: float, easing: str = "smoothstep") -> None:
        """Start easing from the current state to `target` (a preset's recall change set) over `seconds`;
        replaces a running morph. MorphError (a ValueError) for a bad easing or duration."""
        with self._lock:  # no tick between the look at the start and the claim on it below
            start = self.store.snapshot().values
            morph = Morph(start, target, seconds, easing)
            if self._morph is not None:  # what the old one drove and the new one does not is left alone
                self._forget(self._morph.keys, self._schedule)
            self._morph, self._morph_started, self._morph_name = morph, self._now(), name
            self._released -= set(morph.keys)
            # it starts from these values: one the performer changes before its first step is let go
            self._driven.update({k: start.get(k) for k in morph.keys})
        log.info("morphing to preset %s over %.2f s (%s)", name, seconds, easing)
        self._wake.set()

    def cancel_morph(self) -> None:
        """A recall replaces a running morph: the parameters stay where the morph left them."""
        with self._lock:
            if self._morph is not None:
                self._forget(self._morph.keys, self._schedule)
            self._morph = None

    def start_schedule(self, name: str, schedule: Schedule) -> None:
        """Play `schedule` from time 0 on the show clock; replaces a running one."""
        with self._lock:
            if self._schedule is not None:
                self._forget(self._schedule.keys, self._morph)
            self._schedule, self._schedule_name = schedule, name
            self._released -= set(schedule.keys)
            self._reported.clear()
            self.clock.restart(fps=schedule.fps, bpm=schedule.bpm)
        log.info("schedule %s started", name)
        self._wake.set()

    def stop_schedule(self) -> str:
        """Stop the schedule (its parameters keep their last values); the name of the one stopped, or ""."""
        with self._lock:
            if self._schedule is not None:
                self._forget(self._schedule.keys, self._morph)
            name, self._schedule, self._schedule_name = self._schedule_name, None, ""
        return name

    def _forget(self, keys: Any, still: Morph | Schedule | None) -> None:
        """Stop watching `keys` for hands once nothing drives them any more (unless `still` does)."""
        for name in keys:
            if still is None or name not in still.keys:
                self._driven.pop(name, None)

    def handlers(self, schedules: Schedules, preset: Callable[[str], dict[str, Any]],
                 check: Callable[[Mapping[str, Any]], None]) -> dict[str, Callable[..., Any]]:
        """The handlers of the show commands this driver serves (bridge/commands): morphs to presets
        (`preset(name)` gives a preset's recall change set), schedules from `schedules` or sent as text,
        and the clock. `check(changes)` refuses, before anything moves, what the state would refuse
        later (a model name not in the models folders, say)."""
        def morph(name: str, seconds: float, easing: str = "smoothstep") -> dict[str, Any]:
            target = preset(name)
            try:
                check(target)
            except params.ParamError as e:
                raise params.ParamError(f"preset {name!r}: {e}") from None
            self.morph(name, target, seconds, easing)
            return {"preset": name, "seconds": seconds}

        def play(name: str, schedule: Schedule) -> dict[str, Any]:
            check(schedule.at(self.clock.now()).values)  # the numbers (LoRA names) and the texts of now
            for changes in schedule.text_keyframes():  # and every text to come (a style that is not there)
                check(changes)
            self.start_schedule(name, schedule)
            return {"schedule": name}
        clock = self.clock
        return {
            "/preset/morph": morph,
            "/schedule/start": lambda name: play(name, schedules.load(name)),
            "/schedule/set": lambda text: play(SENT, Schedule.from_text(text)),
            "/schedule/stop": lambda: {"stopped": self.stop_schedule()},
            "/bpm": clock.set_bpm,
            "/beat": clock.beat,
            "/frame": clock.set_frame,
        }

    def status(self) -> dict[str, Any]:
        """For telemetry: `morph` the progress of a running morph from 0 to 1 (1 when none runs),
        `schedule` the name of the running schedule ("" when none) and the clock's beat and bpm."""
        with self._lock:
            morph, started, schedule = self._morph, self._morph_started, self._schedule_name
        progress = 1.0 if morph is None or morph.seconds <= 0 else min(1.0, (self._now() - started) / morph.seconds)
        time_now = self.clock.now()
        return {"morph": float(progress), "schedule": schedule, "beat": float(time_now.beat), "bpm": float(time_now.bpm)}

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                active = self.tick()
            except Exception as e:  # nothing the show asks for may end the driver, nor fail 60 times a second
                log.exception("show tick failed")
                with self._lock:
                    self._morph, self._schedule, self._schedule_name = None, None, ""
                    self._driven.clear()
                self.report_error(f"show: {type(e).__name__}: {e}; morph and schedule stopped")
                active = False
            if active:
                self._stop.wait(self.interval)
            else:  # nothing to drive: sleep until a morph or a schedule starts
                self._wake.wait()
                self._wake.clear()

    def tick(self) -> bool:
        """Apply the morph's and the schedule's values for now; False when neither runs. The thread calls
        this; tests call it directly."""
        with self._lock:  # the whole tick: a morph started meanwhile waits for one apply at most
            return self._tick()

    def _tick(self) -> bool:
        morph, started, schedule = self._morph, self._morph_started, self._schedule
        if morph is None and schedule is None:
            return False
        current = self.store.snapshot().values
        self._let_go(current)
        wanted: dict[str, Any] = {}
        if schedule is not None:
            values, errors = schedule.at(self.clock.now())
            wanted.update(values)
            for error in errors:
                if error not in self._reported:  # once each: an expression failing at every frame is one problem
                    self._reported.add(error)
                    self.report_error(f"schedule {self._schedule_name}: {error}")
        finished = False
        if morph is not None:
            elapsed = self._now() - started
            wanted.update(morph.at(elapsed))
            finished = morph.done(elapsed)
        self._drive(current, wanted)
        if finished:
            self._forget(morph.keys, schedule)
            self._morph = None
            log.info("morph to preset %s done", self._morph_name)
        return True

    def _let_go(self, current: Mapping[str, Any]) -> None:
        """Stop driving what someone else has set since the driver last did."""
        for name, value in list(self._driven.items()):
            if name in self._driven and current.get(name) != value:
                # with the parameters it goes with: a prompt set by hand must not be cleared by the
                # morph's end setting `prompt` alone, nor a vae set by hand by its `model`
                for each in linked(name):
                    self._driven.pop(each, None)
                    self._released.add(each)
                log.info("show: %s was set by hand, let go", name)

    def _drive(self, current: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
        try:
            changes = params.validate({k: v for k, v in wanted.items() if k not in self._released})
        except params.ParamError as e:
            self.report_error(f"show: {e}")
            return
        changes = {k: v for k, v in changes.items() if current.get(k) != v}
        if not changes:
            return
        try:
            self._apply_driven(changes, current)
        except Exception:  # a preset's model that cannot be found, a size that does not fit: find which
            for name, value in changes.items():
                try:
                    self._apply_driven({name: value}, current)
                except Exception as e:  # a folder that cannot be read, too: never retried every tick
                    for each in linked(name):
                        self._released.add(each)
                        self._driven.pop(each, None)
                    self.report_error(f"show: {name} left where it is: {e}")

    def _apply_driven(self, changes: Mapping[str, Any], current: Mapping[str, Any]) -> None:
        """Apply `changes` unless the state moved since `current` was read, in any parameter they set or
        clear (a `seed` clears `seeds`). Either way the driver watches those parameters from now on: a
        change someone made meanwhile is found by the next tick's _let_go, and the performer wins."""
        seen = {k: current.get(k) for k in params.validate(changes)}
        if self._apply(changes, only_if=seen) is None:
            self._driven.update(seen)
        else:
            self._driven.update(params.validate(changes))
