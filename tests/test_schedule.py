"""Keyframed schedules, the show clock they run on, and the schedules folder (bridge/schedule)."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from bridge import params
from bridge.schedule import Schedule, ScheduleError, Schedules, ShowClock, ShowTime
from bridge.state import StateStore

ROOT = Path(__file__).resolve().parent.parent


class Clock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def at(frame: float = 0.0, *, seconds: float = 0.0, beat: float = 0.0, bpm: float = 120.0) -> ShowTime:
    return ShowTime(seconds=seconds, beat=beat, frame=frame, bpm=bpm)


def values(schedule: Schedule, time: ShowTime) -> dict:
    result, errors = schedule.at(time)
    assert not errors
    return result


# ============================================================================================ the clock
def test_without_messages_time_counts_from_restart_at_120_bpm_and_30_fps():
    now = Clock()
    clock = ShowClock(now_s=now)
    now.now += 50.0
    clock.restart()
    now.now += 2.0
    assert clock.now() == ShowTime(seconds=2.0, beat=4.0, frame=60.0, bpm=120.0)


def test_a_new_tempo_carries_on_from_the_current_beat_without_a_jump():
    now = Clock()
    clock = ShowClock(now_s=now)
    now.now += 1.0
    clock.set_bpm(60.0)
    assert clock.now().beat == 2.0
    now.now += 1.0
    assert (clock.now().beat, clock.now().bpm) == (3.0, 60.0)


def test_a_beat_position_sets_the_beat_and_it_counts_on_at_the_tempo():
    now = Clock()
    clock = ShowClock(now_s=now)
    clock.beat(16.0)
    assert clock.now().beat == 16.0
    now.now += 0.5
    assert clock.now().beat == 17.0


def test_a_tap_snaps_the_beat_to_the_nearest_whole_beat():
    now = Clock()
    clock = ShowClock(now_s=now)
    now.now += 1.2  # beat 2.4 at 120 bpm
    clock.beat()
    assert clock.now().beat == 2.0
    now.now += 0.4  # 2.8
    clock.beat()
    assert clock.now().beat == 3.0


def test_regular_taps_set_the_tempo_when_no_bpm_was_given():
    now = Clock()
    clock = ShowClock(now_s=now)
    beats = []
    for _ in range(5):
        clock.beat()
        beats.append(clock.now().beat)
        now.now += 0.6
    assert clock.now().bpm == pytest.approx(100.0)
    assert [b - a for a, b in zip(beats, beats[1:])] == [1.0, 1.0, 1.0, 1.0]  # one beat per tap


def test_irregular_taps_leave_the_tempo_alone():
    now = Clock()
    clock = ShowClock(now_s=now)
    for gap in (0.5, 0.9, 0.4, 1.1):
        clock.beat()
        now.now += gap
    assert clock.now().bpm == 120.0


def test_taps_more_than_two_seconds_apart_are_not_a_tempo():
    now = Clock()
    clock = ShowClock(now_s=now)
    for _ in range(5):
        clock.beat()
        now.now += 2.5
    assert clock.now().bpm == 120.0


def test_taps_do_not_override_a_tempo_sent_by_bpm():
    now = Clock()
    clock = ShowClock(now_s=now)
    clock.set_bpm(128.0)
    for _ in range(5):
        clock.beat()
        now.now += 0.6
    assert clock.now().bpm == 128.0


def test_client_frames_are_followed_and_counted_on_at_fps_between_messages():
    now = Clock()
    clock = ShowClock(now_s=now, fps=60.0)
    clock.set_frame(1000)
    assert clock.now().frame == 1000.0 and clock.follows_frames
    now.now += 0.5
    assert clock.now().frame == 1030.0
    clock.set_frame(1020)  # the client's word wins over the count
    assert clock.now().frame == 1020.0


def test_a_restart_keeps_following_client_frames_while_they_come():
    now = Clock()
    clock = ShowClock(now_s=now)
    clock.set_frame(500)
    now.now += 0.2
    clock.restart()
    assert clock.now().frame == pytest.approx(506.0)  # still the client's timeline
    assert clock.now().seconds == 0.0


def test_when_client_frames_stop_the_daemon_clock_goes_on_and_a_restart_counts_from_zero():
    now = Clock()
    clock = ShowClock(now_s=now)
    clock.set_frame(500)
    now.now += 3.0
    assert not clock.follows_frames
    assert clock.now().frame == 590.0  # no jump: it carried on at 30 fps
    clock.restart()
    assert clock.now().frame == 0.0


def test_a_restart_keeps_following_beat_positions_while_they_come_and_not_after():
    now = Clock()
    clock = ShowClock(now_s=now)
    clock.beat(64.0)
    now.now += 0.5
    clock.restart()
    assert clock.now().beat == 65.0
    now.now += 10.0
    clock.restart()
    assert clock.now().beat == 0.0


def test_a_restart_takes_a_schedules_fps_and_bpm():
    now = Clock()
    clock = ShowClock(now_s=now)
    clock.restart(fps=24.0, bpm=90.0)
    now.now += 2.0
    assert clock.now() == ShowTime(seconds=2.0, beat=3.0, frame=48.0, bpm=90.0)


@pytest.mark.parametrize("tapped", [False, True])
def test_a_tempo_a_client_set_outlasts_a_schedules_own_bpm(tapped):
    now = Clock()
    clock = ShowClock(now_s=now)
    if tapped:
        for _ in range(4):  # 0.5 s apart: 120 bpm
            clock.beat()
            now.now += 0.5
    else:
        clock.set_bpm(128.0)
    clock.restart(bpm=90.0)
    assert clock.now().bpm == (120.0 if tapped else 128.0)


@pytest.mark.parametrize("call", [
    lambda c: c.set_bpm(0.0), lambda c: c.set_bpm(math.nan), lambda c: c.set_bpm(5000.0),
    lambda c: c.beat(math.inf), lambda c: c.beat("one"), lambda c: c.set_frame(math.inf),
    lambda c: c.set_frame(True), lambda c: c.set_fps(0.0), lambda c: c.restart(fps=-1.0),
])
def test_clock_values_out_of_reason_are_refused_and_change_nothing(call):
    now = Clock()
    clock = ShowClock(now_s=now)
    now.now += 1.0
    before = clock.now()
    with pytest.raises(ScheduleError):
        call(clock)
    assert clock.now() == before


# ============================================================================================ schedules
def test_numeric_keyframes_hold_before_and_after_and_interpolate_between():
    schedule = Schedule.from_text('[params]\nstrength = "10:(0.2), 20:(0.6)"\n')
    assert [values(schedule, at(f))["strength"] for f in (0, 10, 15, 20, 99)] == \
        pytest.approx([0.2, 0.2, 0.4, 0.6, 0.6])


def test_keyframe_tables_work_like_keyframe_strings():
    table = Schedule.from_text('[params.strength]\n10 = 0.2\n20 = "0.6"\n')
    string = Schedule.from_text('[params]\nstrength = "10:(0.2), 20:(0.6)"\n')
    assert [values(table, at(f)) for f in (0, 15, 30)] == [values(string, at(f)) for f in (0, 15, 30)]


def test_prompts_switch_at_each_keyframe():
    schedule = Schedule.from_text('[prompts]\n0 = "a forest"\n64 = "a city at night"\n')
    assert schedule.keys == {"prompt"}
    assert [values(schedule, at(f))["prompt"] for f in (0, 63.9, 64, 500)] == \
        ["a forest", "a forest", "a city at night", "a city at night"]


def test_a_prompt_blend_crossfades_consecutive_prompts():
    schedule = Schedule.from_text('prompt_blend = true\n[prompts]\n0 = "a forest"\n64 = "a city"\n128 = "the sea"\n')
    assert schedule.keys == {"prompts"}
    assert values(schedule, at(0))["prompts"] == (("a forest", 1.0),)
    assert values(schedule, at(16))["prompts"] == (("a forest", 0.75), ("a city", 0.25))
    assert values(schedule, at(96))["prompts"] == (("a city", 0.5), ("the sea", 0.5))
    assert values(schedule, at(200))["prompts"] == (("the sea", 1.0),)


def test_a_loop_length_wraps_the_position():
    schedule = Schedule.from_text('length = 100\n[prompts]\n0 = "a"\n50 = "b"\n')
    assert [values(schedule, at(f))["prompt"] for f in (49, 50, 99, 100, 149, 150)] == ["a", "b", "b", "a", "a", "b"]


def test_a_keyframe_at_the_loop_length_is_the_value_the_loop_ends_on():
    schedule = Schedule.from_text('length = 100\n[params]\nstrength = "0:(0.2), 50:(0.8), 100:(0.2)"\n')
    assert values(schedule, at(75))["strength"] == pytest.approx(0.5)
    assert values(schedule, at(175))["strength"] == pytest.approx(0.5)


def test_a_beat_schedule_follows_the_tempo():
    now = Clock()
    clock = ShowClock(now_s=now, bpm=60.0)
    schedule = Schedule.from_text('unit = "beat"\n[prompts]\n0 = "verse"\n4 = "chorus"\n')
    now.now += 3.9
    assert values(schedule, clock.now())["prompt"] == "verse"
    clock.set_bpm(240.0)  # the drummer speeds up: the chorus comes sooner
    now.now += 0.1
    assert values(schedule, clock.now())["prompt"] == "chorus"


def test_a_second_schedule_counts_seconds():
    schedule = Schedule.from_text('unit = "second"\n[prompts]\n0 = "a"\n"2.5" = "b"\n')
    assert values(schedule, at(9999, seconds=2.4))["prompt"] == "a"
    assert values(schedule, at(0, seconds=2.5))["prompt"] == "b"


def test_every_variable_is_available_in_every_expression():
    schedule = Schedule.from_text('unit = "beat"\n[params]\nguidance_scale = "t + beat/10 + frame/100 + bpm/1000"\n')
    assert values(schedule, at(300, seconds=1.0, beat=20.0, bpm=100.0))["guidance_scale"] == pytest.approx(6.1)


def test_swings_out_of_range_are_clamped_to_the_parameters_range():
    schedule = Schedule.from_text('unit = "second"\n[params]\nstrength = "0.5 + sin(t)"\n')
    assert values(schedule, at(seconds=math.pi / 2))["strength"] == 1.0
    assert values(schedule, at(seconds=-math.pi / 2))["strength"] == 0.0
    assert values(schedule, at(seconds=0.0))["strength"] == 0.5


def test_whole_number_parameters_round_and_clamp():
    schedule = Schedule.from_text('[params]\nseed = "frame / 2"\nsteps = "frame"\n')
    assert values(schedule, at(5)) == {"seed": 3, "steps": 5}  # 2.5 rounds up
    assert values(schedule, at(1000)) == {"seed": 500, "steps": 50}  # steps stops at its maximum
    assert isinstance(values(schedule, at(5))["seed"], int)


def test_an_expression_failing_at_some_time_is_left_out_and_reported_the_same_way_each_time():
    schedule = Schedule.from_text('unit = "second"\n[params]\nstrength = "1/(t - floor(t))"\nguidance_scale = 2\n')
    first = schedule.at(at(seconds=1.0))
    second = schedule.at(at(seconds=2.0))
    assert first.values == {"guidance_scale": 2.0}  # strength keeps its last good value
    assert len(first.errors) == 1 and "strength" in first.errors[0] and "division by zero" in first.errors[0]
    assert first.errors == second.errors
    assert values(schedule, at(seconds=2.5))["strength"] == 1.0  # 1/0.5 = 2, clamped to 1


def test_nan_and_infinite_results_are_left_out():
    schedule = Schedule.from_text('unit = "second"\n[params]\nstrength = "t*1e308*10 - t*1e308*10"\n')
    result = schedule.at(at(seconds=1.0))
    assert result.values == {} and "nan" in result.errors[0]


def test_lora_controlnet_and_text_parameters_can_be_scheduled():
    schedule = Schedule.from_text('[params]\n"lora/ink wash" = "0:(0), 10:(1)"\n"controlnet/1/scale" = 0.5\n'
                                  '[params.negative_prompt]\n0 = "blurry"\n10 = "dark"\n')
    assert schedule.keys == {"lora/ink wash", "controlnet/1/scale", "negative_prompt"}
    assert values(schedule, at(5)) == {"lora/ink wash": 0.5, "controlnet/1/scale": 0.5, "negative_prompt": "blurry"}
    assert values(schedule, at(10))["negative_prompt"] == "dark"


def test_a_schedules_values_apply_to_a_real_state_store():
    schedule = Schedule.from_text('prompt_blend = true\n[prompts]\n0 = "a"\n10 = "b"\n'
                                  '[params]\nstrength = "0.5 + 0.5*sin(frame)"\nseed = "frame"\n')
    store = StateStore()
    for frame in (0, 3.3, 7, 12):
        store.apply(schedule.at(at(frame)).values)
    assert store.snapshot()["prompts"] == (("b", 1.0),) and store.snapshot()["seed"] == 12


def test_json_and_toml_read_the_same_schedule():
    toml = Schedule.from_text('unit = "beat"\nlength = 8\n[prompts]\n0 = "a"\n4 = "b"\n'
                              '[params]\nstrength = "0:(0.2), 4:(0.6)"\n')
    data = {"unit": "beat", "length": 8, "prompts": {"0": "a", "4": "b"}, "params": {"strength": "0:(0.2), 4:(0.6)"}}
    from_json = Schedule.from_text(json.dumps(data))
    from_mapping = Schedule.from_mapping({**data, "prompts": {0: "a", 4: "b"}})
    for beat in (0, 2, 6, 10):
        time = at(beat=beat)
        assert values(toml, time) == values(from_json, time) == values(from_mapping, time)


@pytest.mark.parametrize("text, says", [
    ('[params]\nstrenght = 0.5\n', "params.strenght: unknown parameter"),
    ('[params]\nstrength = "0:(0.4), x:(0.5)"\n', "params.strength: keyframe 'x'"),
    ('[params.strength]\n"-1" = 0.5\n', "params.strength: keyframe '-1'"),
    ('[params.strength]\n1.5 = 0.5\n', "quote fractional keyframes"),
    ('[params]\nstrength = "sin(t).__class__"\n', "params.strength: 'sin(t).__class__': not allowed: attribute"),
    ('[params]\nstrength = 1.5\n', "params.strength: 1.5 at keyframe 0 is out of range"),
    ('[params]\nstrength = true\n', "params.strength: expected a number"),
    ('[params]\npause = 1\n', "params.pause: a on/off parameter"),
    ('[params]\nseeds = 1\n', "params.seeds: a list parameter"),
    ('[params]\nwidth = 512\n', "params.width: changing width reloads"),
    ('[params]\nprompt = "a"\n', "[prompts] table"),
    ('[params]\nmode = "sideways"\n', "params.mode: keyframe 0: mode: 'sideways' is not one of"),
    ('[params]\nnegative_prompt = 3\n', "params.negative_prompt: keyframe 0: negative_prompt: expected a string"),
    ('unit = "bar"\n[params]\nstrength = 0.5\n', "unit 'bar'"),
    ('length = 0\n[params]\nstrength = 0.5\n', "length"),
    ('length = 10\n[params]\nstrength = "0:(0.1), 20:(0.2)"\n', "params.strength: keyframe 20 is past the loop length"),
    ('fps = 0\n[params]\nstrength = 0.5\n', "fps"),
    ('bpm = "fast"\n[params]\nstrength = 0.5\n', "bpm: expected a number"),
    ('prompt_blend = "yes"\n[prompts]\n0 = "a"\n', "prompt_blend"),
    ('tempo = 3\n[params]\nstrength = 0.5\n', "unknown schedule key(s) 'tempo'"),
    ('[prompts]\n0 = "a"\nunit = "beat"\n', "write the top-level keys before the first [table]"),
    ('[prompts]\n0 = 5\n', "prompts: keyframe 0: prompt: expected a string"),
    ('prompts = "a forest"\n', "prompts: expected a table"),
    ('[prompts]\n', "prompts: expected a table"),
    ('unit = "frame"\n', "drives nothing"),
    ('[params\n', "not valid TOML"),
    ('{"params": ', "not valid JSON"),
    ('[1, 2]', "not valid TOML"),
    pytest.param('{"params": {"strength": ' * 3000, "cannot be read", id="JSON nested 6000 deep"),
])
def test_a_bad_schedule_is_refused_when_read_naming_the_key(text, says):
    with pytest.raises(ScheduleError, match=re.escape(says)):
        Schedule.from_text(text)


def test_the_example_file_and_the_guides_example_are_valid_schedules():
    example = Schedule.from_text((ROOT / "configs" / "schedules" / "example.toml").read_text(encoding="utf-8"))
    guide = (ROOT / "docs" / "schedules.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", guide, re.S)
    assert blocks
    for block in blocks:
        Schedule.from_text(block)
    for schedule in (example, Schedule.from_text(blocks[0])):
        params.validate(schedule.at(at(0)).values)
        assert schedule.keys


# ============================================================================================ the folder
def test_the_schedules_folder_lists_and_loads_toml_and_json_by_name(tmp_path):
    (tmp_path / "pulse.toml").write_text('unit = "beat"\n[params]\nguidance_scale = "2 + sin(beat)"\n')
    (tmp_path / "drift.json").write_text(json.dumps({"prompts": {"0": "a", "10": "b"}}))
    (tmp_path / "notes.txt").write_text("not a schedule")
    folder = Schedules(tmp_path)
    assert folder.names() == ["drift", "pulse"]
    assert folder.load("pulse").unit == "beat"
    assert values(folder.load("drift"), at(10)) == {"prompt": "b"}


def test_a_missing_schedule_names_the_known_ones(tmp_path):
    (tmp_path / "pulse.toml").write_text('[params]\nstrength = 0.5\n')
    with pytest.raises(ScheduleError, match="'nope' not found.*known: pulse"):
        Schedules(tmp_path).load("nope")


def test_a_broken_schedule_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "broken.toml").write_text('[params]\nstrength = "sin("\n')
    with pytest.raises(ScheduleError, match=r"schedule 'broken' \(broken.toml\): params.strength"):
        Schedules(tmp_path).load("broken")


@pytest.mark.parametrize("name", ["../pulse", "/etc/passwd", "a/b", "..", ".hidden", "pulse.", "", "x" * 65, 7])
def test_names_that_could_leave_the_folder_are_refused(tmp_path, name):
    (tmp_path / "inside").mkdir()
    (tmp_path / "pulse.toml").write_text('[params]\nstrength = 0.5\n')
    with pytest.raises(ScheduleError, match="schedule name"):
        Schedules(tmp_path / "inside").load(name)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_a_link_leading_outside_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.toml").write_text('[params]\nstrength = 0.5\n')
    (tmp_path / "schedules").mkdir()
    try:
        (tmp_path / "schedules" / "evil.toml").symlink_to(tmp_path / "secret.toml")
    except OSError:
        pytest.skip("symbolic links not permitted")
    with pytest.raises(ScheduleError, match="leads outside"):
        Schedules(tmp_path / "schedules").load("evil")


def test_a_schedule_of_more_than_a_thousand_keyframes_is_refused_before_it_is_parsed():
    table = {str(i): "0.5 + 0.1*sin(t)" for i in range(600)}
    Schedule.from_mapping({"params": {"strength": table}})
    with pytest.raises(ScheduleError, match="at most 1000"):
        Schedule.from_mapping({"params": {"strength": table, "guidance_scale": table}})
    with pytest.raises(ScheduleError, match="at most 1000"):
        Schedule.from_mapping({"prompts": {str(i): "x" for i in range(1001)}})


def test_every_text_keyframe_is_there_to_check_before_the_schedule_starts():
    schedule = Schedule.from_text('[prompts]\n"0" = "a forest"\n"64" = "a city"\n"96" = "a forest"\n'
                                  '[params.styles]\n"0" = ""\n"32" = "noir"\n')
    changes = list(schedule.text_keyframes())
    assert all(len(c) == 1 for c in changes)  # one at a time: each is checked as the change it will be
    assert sorted(next(iter(c.items())) for c in changes) == [
        ("prompt", "a city"), ("prompt", "a forest"), ("styles", ""), ("styles", "noir")]
