"""The show driver: a morph and a schedule applied to a real state store, and the performer winning."""
from __future__ import annotations

import threading
import time

import pytest

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


def test_a_schedule_started_again_drives_what_the_performer_set_while_nothing_ran():
    store, clock = StateStore({"strength": 0.2}), Clock()
    show = _show(store, clock)
    wobble = Schedule.from_text('unit = "second"\n[params]\nstrength = "0.3 + 0.1*sin(t)"')
    show.start_schedule("wobble", wobble)
    show.tick()
    show.start_schedule("other", Schedule.from_text("[params]\nguidance_scale = 1.5"))  # replaces it
    show.tick()
    show.stop_schedule()
    store.apply({"strength": 0.9})  # while no schedule runs: nobody's to let go
    show.start_schedule("wobble", wobble)
    for _ in range(3):
        clock.now += 0.3
        show.tick()
    assert 0.2 <= store.snapshot()["strength"] <= 0.4


def test_a_seed_blend_set_by_hand_lets_go_of_a_scheduled_seed():
    store, clock = StateStore({"seed": 5}), Clock()
    show = _show(store, clock)
    show.start_schedule("seeds", Schedule.from_text('unit = "second"\n[params]\nseed = "1000 + floor(t)"'))
    show.tick()
    assert store.snapshot()["seed"] == 1000
    store.apply({"seeds": [[1, 1.0], [2, 1.0]]})  # the performer plays a seed blend
    for _ in range(3):
        clock.now += 1.0
        show.tick()
    assert store.snapshot()["seeds"] == ((1, 1.0), (2, 1.0))


def test_a_change_made_between_the_drivers_look_and_its_write_is_never_overwritten():
    store, clock = StateStore({"strength": 0.2}), Clock()

    def apply(changes, *, only_if=None):
        store.apply({"strength": 0.05})  # the performer's fader lands just before the driver's write
        return store.apply(changes, only_if=only_if)
    show = Show(store, apply, [].append, ShowClock(now_s=clock), now=clock)
    show.morph("bright", {"strength": 0.8}, seconds=0.0)
    for _ in range(3):
        show.tick()
    assert store.snapshot()["strength"] == 0.05


def test_a_change_that_fails_other_than_by_refusal_is_let_go_and_said_once():
    store, clock, errors = StateStore({"strength": 0.2}), Clock(), []

    def apply(changes, *, only_if=None):
        raise OSError("the models folder went away")
    show = Show(store, apply, errors.append, ShowClock(now_s=clock), now=clock)
    show.start_schedule("wobble", Schedule.from_text("[params]\nstrength = 0.5"))
    for _ in range(5):
        clock.now += 0.1
        show.tick()
    assert len(errors) == 1 and "strength left where it is" in errors[0]


def test_a_tick_that_fails_stops_the_morph_and_the_schedule_and_says_so_once():
    class Broken(StateStore):
        def snapshot(self):
            raise RuntimeError("broken store")
    store, clock, errors = Broken({"strength": 0.2}), Clock(), []
    show = Show(store, lambda changes, only_if=None: None, errors.append, ShowClock(now_s=clock), rate_hz=1000.0,
                now=clock)
    show.start_schedule("wobble", Schedule.from_text("[params]\nstrength = 0.5"))
    show.start()
    try:
        wait(lambda: errors)
        time.sleep(0.05)  # room for more ticks, which must not come
    finally:
        show.stop()
    assert show.status()["schedule"] == ""
    assert len(errors) == 1 and "broken store" in errors[0] and "stopped" in errors[0]


def test_a_schedule_with_a_text_the_state_would_refuse_later_is_refused_at_its_start():
    store, clock = StateStore({}), Clock()
    show = _show(store, clock)

    def check(changes):
        if changes.get("styles") == "noir":
            raise params.ParamError("style 'noir' not found")
    handlers = show.handlers(schedules=None, preset=dict, check=check)
    text = '[params.styles]\n"0" = ""\n"32" = "noir"\n'
    with pytest.raises(params.ParamError, match="noir"):
        handlers["/schedule/set"](text)
    assert show.status()["schedule"] == ""


def test_a_parameter_set_between_a_morphs_start_and_its_first_step_is_let_go():
    store, clock = StateStore({"strength": 0.2, "seed": 1}), Clock()
    show = _show(store, clock)
    show.morph("bright", {"strength": 0.8, "seed": 2}, seconds=1.0)
    store.apply({"seed": 99})  # before the driver's first tick
    for _ in range(3):
        clock.now += 0.5
        show.tick()
    assert (store.snapshot()["seed"], store.snapshot()["strength"]) == (99, 0.8)
