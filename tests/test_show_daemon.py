"""Show control as a client sees it: morphs, schedules, the clock, recordings and snapshots on a real
daemon, over real OSC and WebSocket messages."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect

from .conftest import DaemonProcess, gradient, wait

FRAME = gradient()


@pytest.fixture(scope="module")
def d():
    daemon = DaemonProcess()
    yield daemon.wait_started()
    daemon.stop()
    shutil.rmtree(daemon.folder, ignore_errors=True)


def _command(d, command: str, *args) -> dict:
    """A show command over the WebSocket; its ack or error."""
    with connect(f"ws://127.0.0.1:{d.http_port}/ws", open_timeout=10) as c:
        c.send(json.dumps({"type": "command", "id": 7, "command": command, "args": list(args)}))
        while True:
            reply = json.loads(c.recv(timeout=20))
            if reply.get("id") == 7:
                return reply


def _set(d, **values) -> int:
    """Set parameters over the WebSocket; the new state version."""
    with connect(f"ws://127.0.0.1:{d.http_port}/ws", open_timeout=10) as c:
        c.send(json.dumps({"type": "set", "id": 1, "params": values}))
        ack = json.loads(c.recv(timeout=20))
        assert ack["type"] == "ack"
        return ack["state_version"]


def test_an_osc_morph_eases_to_the_preset_through_blends_and_ends_exactly_on_it(d):
    _set(d, prompt="a quiet forest", strength=0.2, seed=11)
    d.send("/preset/save", "forest")
    wait(lambda: (d.folder / "presets" / "forest.toml").exists(), timeout=10)
    _set(d, prompt="a city at night", strength=0.9, seed=22)
    d.send("/preset/morph", ["forest", 2.0])
    seen = []
    end = time.monotonic() + 15
    while time.monotonic() < end:
        d.write(FRAME)  # the stream keeps rendering meanwhile
        state = d.state()["params"]
        seen.append(state)
        if state["strength"] == 0.2 and not state["prompts"]:
            break
        time.sleep(0.05)
    between = [s for s in seen if 0.2 < s["strength"] < 0.9]
    assert between, "no intermediate strength seen"
    blends = [s["prompts"] for s in seen if len(s["prompts"]) == 2]
    assert blends and {text for text, _ in blends[0]} == {"a quiet forest", "a city at night"}
    assert any(len(s["seeds"]) == 2 for s in seen)  # the noise slerped from seed 22 to seed 11
    final = seen[-1]
    assert (final["prompt"], final["strength"], final["seed"], final["prompts"], final["seeds"]) == \
        ("a quiet forest", 0.2, 11, [], [])


def test_a_fader_moved_during_a_morph_stays_where_the_performer_put_it(d):
    _set(d, strength=0.9, guidance_scale=1.0)
    d.send("/preset/save", "strong")
    wait(lambda: (d.folder / "presets" / "strong.toml").exists(), timeout=10)
    _set(d, strength=0.1, guidance_scale=4.0)
    d.send("/preset/morph", ["strong", 1.5])
    wait(lambda: 0.1 < d.state()["params"]["strength"] < 0.9, timeout=10)
    d.send("/strength", 0.33)
    wait(lambda: d.state()["params"]["guidance_scale"] == 1.0, timeout=10)  # the morph ran to its end
    assert d.state()["params"]["strength"] == pytest.approx(0.33)  # OSC sends float32


def test_bad_commands_are_refused_with_a_reason_and_change_nothing(d):
    version = d.state()["state_version"]
    reply = _command(d, "/preset/morph", "no such look", 1.0)
    assert reply["type"] == "error" and reply["error"]["code"] == "invalid_command"
    assert "no such look" in reply["error"]["message"]
    assert _command(d, "/preset/morph", "forest")["error"]["code"] == "invalid_command"  # SECONDS missing
    assert _command(d, "/preset/morph", "forest", 1.0, "bouncy")["error"]["code"] == "invalid_command"
    assert "unknown command" in _command(d, "/launch/rockets")["error"]["message"]
    since = time.monotonic()
    d.send("/record/start", 5)  # a number where a name goes
    assert d.telemetry.wait_for("/sdbridge/error", since, predicate=lambda a: "/record/start" in a[0])
    assert d.state()["state_version"] == version


def test_a_schedule_sent_as_text_follows_the_frame_number_the_client_sends(d):
    schedule = {"unit": "frame", "prompts": {"0": "a forest", "500": "a city at night"},
                "params": {"strength": "0.5 + 0.25 * sin(frame / 100)"}}
    d.send("/frame", 0)
    reply = _command(d, "/schedule/set", json.dumps(schedule))
    assert reply["type"] == "ack", reply
    wait(lambda: d.state()["params"]["prompt"] == "a forest", timeout=10)
    d.send("/frame", 600)  # TouchDesigner's timeline jumped ahead
    wait(lambda: d.state()["params"]["prompt"] == "a city at night", timeout=10)
    assert 0.25 <= d.state()["params"]["strength"] <= 0.75
    assert _command(d, "/schedule/stop")["result"] == {"stopped": "(sent)"}
    _set(d, prompt="by hand")
    time.sleep(0.3)
    assert d.state()["params"]["prompt"] == "by hand"  # the schedule no longer drives it


def test_a_schedule_file_starts_by_name_and_a_missing_one_is_refused(d):
    folder = d.folder / "schedules"
    folder.mkdir(exist_ok=True)
    (folder / "pulse.toml").write_text('unit = "beat"\n[params]\nguidance_scale = "2 + sin(beat)"\n')
    assert _command(d, "/schedule/start", "pulse")["type"] == "ack"
    d.send("/bpm", 240.0)
    first = d.state()["params"]["guidance_scale"]
    wait(lambda: d.state()["params"]["guidance_scale"] != first, timeout=10)  # it moves with the beat
    assert 1.0 <= d.state()["params"]["guidance_scale"] <= 3.0
    assert _command(d, "/schedule/stop")["result"] == {"stopped": "pulse"}
    assert _command(d, "/schedule/start", "nope")["error"]["code"] == "invalid_command"
    assert _command(d, "/schedule/start", "../pulse")["error"]["code"] == "invalid_command"


def test_a_recording_holds_the_frames_the_show_rendered_and_says_what_it_dropped(d):
    started = _command(d, "/record/start", "take one")
    assert started["type"] == "ack", started
    for shift in range(12):
        fid = d.write(gradient(shift=shift * 4))
        d.output_after(lambda o: o.frame_id >= fid, timeout=20)
    stopped = _command(d, "/record/stop")["result"]
    path = Path(stopped["path"])
    assert path.parent == d.folder / "recordings" and path.stem == "take one"
    assert stopped["frames"] >= 12 and stopped["dropped"] >= 0
    with av.open(str(path)) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == stopped["frames"]
    assert frames[0].shape == (128, 128, 3)
    assert _command(d, "/record/stop")["error"]["code"] == "invalid_command"  # nothing records now


def test_a_snapshot_is_a_png_that_holds_the_frames_parameters(d):
    version = _set(d, prompt="a lighthouse in fog", seed=4242, strength=0.6)
    d.settled(FRAME, version - 1)
    reply = _command(d, "/snapshot", "lighthouse")
    assert reply["type"] == "ack", reply
    path = Path(reply["result"]["path"])
    image = Image.open(path)
    assert image.size == (128, 128)
    text = image.text["parameters"]
    assert text.startswith("a lighthouse in fog\n") and "Seed: 4242" in text and "Size: 128x128" in text
    data = json.loads(image.text["sdbridge"])
    assert data["settings"]["strength"] == 0.6 and (data["model"], data["vae"]) == ("tiny", d.state()["params"]["vae"])
    out = d.ring_out.read_latest()
    assert np.array_equal(np.asarray(image.convert("RGBA")), out.pixels)  # the frame on screen
