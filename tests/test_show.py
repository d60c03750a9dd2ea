"""The show driver: a morph and a schedule applied to a real state store, and the performer winning."""
from __future__ import annotations

import threading

from bridge import params
from bridge.schedule import Schedule, ShowClock
from bridge.show import Show
from bridge.state import StateStore

from .conftest import wait


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _show(store: StateStore, clock: Clock, errors: list[str] | None = None) -> Show:
    def apply(changes, *, only_if=None):
        return store.apply(changes, only_if=only_if)
    return Show(store, apply, (errors if errors is not None else []).append, ShowClock(now_s=clock), now=clock)


def test_a_morph_passes_through_intermediate_states_and_ends_on_the_target():
    store, clock = StateStore({"strength": 0.2, "guidance_scale": 1.0}), Clock()
    show = _show(store, clock)
    show.morph("bright", {"strength": 0.8, "guidance_scale": 3.0}, seconds=2.0, easing="linear")
    seen = []
    for _ in range(5):
        show.tick()
        seen.append(store.snapshot()["strength"])
        clock.now += 0.5
    assert seen[0] == 0.2 or seen[0] < 0.3
    assert 0.2 < seen[2] < 0.8  # half way: between the two looks
    assert seen == sorted(seen)
    assert (store.snapshot()["strength"], store.snapshot()["guidance_scale"]) == (0.8, 3.0)
    assert show.status()["morph"] == 1.0
    assert not show.tick()  # done: nothing left to drive


def test_a_parameter_set_by_hand_during_a_morph_is_let_go_and_the_rest_goes_on():
    store, clock = StateStore({"strength": 0.2, "guidance_scale": 1.0}), Clock()
    show = _show(store, clock)
    show.morph("bright", {"strength": 0.8, "guidance_scale": 3.0}, seconds=2.0, easing="linear")
    show.tick()
    clock.now += 0.5
    show.tick()
    store.apply({"strength": 0.05})  # the performer grabs the fader
    for _ in range(4):
        clock.now += 0.5
        show.tick()
    assert store.snapshot()["strength"] == 0.05  # the performer wins
    assert store.snapshot()["guidance_scale"] == 3.0  # the rest of the morph still arrived


def test_a_recall_replaces_a_running_morph():
    store, clock = StateStore({"strength": 0.2}), Clock()
    show = _show(store, clock)
    show.morph("bright", {"strength": 0.8}, seconds=2.0, easing="linear")
    clock.now += 1.0
    show.tick()
    half = store.snapshot()["strength"]
    show.cancel_morph()
    clock.now += 2.0
    assert not show.tick()
    assert store.snapshot()["strength"] == half


def test_a_schedule_drives_its_parameters_from_the_show_clock_and_a_morph_wins_where_both_drive():
    store, clock = StateStore(), Clock()
    show = _show(store, clock)
    schedule = Schedule.from_text('unit = "second"\n[params]\nstrength = "0.5 + 0.25 * clamp(t, 0, 1)"\n'
                                  'guidance_scale = "1 + t"\n')
    show.start_schedule("ramp", schedule)
    show.tick()
    assert store.snapshot()["strength"] == 0.5
    clock.now += 1.0
    show.tick()
    assert store.snapshot()["strength"] == 0.75 and store.snapshot()["guidance_scale"] == 2.0
    show.morph("calm", {"strength": 0.1}, seconds=0.0)
    show.tick()
    assert store.snapshot()["strength"] == 0.1  # the morph's value, not the schedule's
    clock.now += 1.0
    show.tick()
    assert store.snapshot()["guidance_scale"] == 3.0  # the schedule still drives the rest
    assert show.status()["schedule"] == "ramp"
    assert show.stop_schedule() == "ramp"
    assert not show.tick()


def test_values_the_state_refuses_are_reported_once_and_not_tried_every_tick():
    errors: list[str] = []

    def too_big(values):
        if values["width"] > 1024:
            raise params.ParamError("does not fit the output ring")
    store, clock = StateStore(check=too_big), Clock()
    show = _show(store, clock, errors)
    show.morph("huge", {"width": 2048, "strength": 0.9}, seconds=0.0)
    for _ in range(3):
        show.tick()
    assert len(errors) == 1 and "does not fit" in errors[0]
    assert store.snapshot()["width"] == 512
    assert store.snapshot()["strength"] == 0.9  # what fits still arrives


def test_the_driver_thread_morphs_in_real_time():
    store = StateStore({"strength": 0.2})

    def apply(changes, *, only_if=None):
        return store.apply(changes, only_if=only_if)
    show = Show(store, apply, lambda message: None)
    show.start()
    try:
        versions = store.version
        show.morph("bright", {"strength": 0.9}, seconds=0.3)
        wait(lambda: store.snapshot()["strength"] == 0.9, timeout=5)
        assert store.version > versions + 2  # it went there in steps, not in one jump
    finally:
        show.stop()
    assert not any(t.name == "sdbridge-show" and t.is_alive() for t in threading.enumerate())
