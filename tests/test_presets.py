"""Presets: the whole parameter state under a name, in a readable TOML file; saved and recalled over
OSC and WebSocket, and recalled at start."""
from __future__ import annotations

import json
import os
import time
import tomllib
import urllib.request

import pytest
from websockets.sync.client import connect

from bridge import params
from bridge.presets import PresetError, Presets

from .conftest import DaemonProcess


@pytest.fixture
def presets(tmp_path):
    return Presets(tmp_path / "presets")


def _state(**changes):
    values = {**params.defaults(), "controlnet/0/scale": 0.5, "lora/film grain": 0.7}
    values.update(changes)
    return values


def test_a_preset_is_a_readable_toml_file_of_every_parameter(presets):
    path = presets.save("Night drive", _state(prompt='a "neon" city', seeds=((3, 1.0), (4, 0.5)), pause=True))
    assert path == presets.folder / "Night drive.toml"
    text = path.read_text()
    assert text.startswith("# sdbridge preset") and '[lora]\n"film grain" = 0.7' in text
    data = tomllib.loads(text)
    assert data["prompt"] == 'a "neon" city' and data["seeds"] == [[3, 1.0], [4, 0.5]]
    assert data["controlnet"]["0/scale"] == 0.5
    assert "pause" not in data  # a preset saved while paused must not freeze the show when recalled


def test_a_saved_preset_loads_back_as_the_same_values(presets):
    state = _state(strength=0.3, prompts=(("a", 1.0), ("b", 2.0)), t_index_list=(10, 20))
    presets.save("look", state)
    assert presets.load("look") == {k: v for k, v in state.items() if k != "pause"}
    assert presets.names() == ["look"]


def test_recalling_sets_loras_the_preset_does_not_hold_back_to_zero(presets):
    presets.save("plain", {"strength": 0.4})
    assert presets.recall("plain", _state()) == {"lora/film grain": 0.0, "strength": 0.4}


@pytest.mark.parametrize("name", ["", "../evil", "/etc/passwd", "a/b", "a\\b", ".hidden", "dot.", "x" * 65, 3, None,
                                  "CON", "nul.toml", "LPT1"])  # Windows opens a device for these
def test_names_that_are_not_plain_file_names_are_refused(presets, name):
    with pytest.raises(PresetError, match="preset name"):
        presets.save(name, {})
    with pytest.raises(PresetError, match="preset name"):
        presets.load(name)


def test_a_link_leading_out_of_the_folder_is_refused(presets, tmp_path):
    outside = tmp_path / "outside.toml"
    outside.write_text("strength = 0.1\n")
    presets.folder.mkdir()
    os.symlink(outside, presets.folder / "sneaky.toml")
    with pytest.raises(PresetError, match="leads outside"):
        presets.load("sneaky")


def test_missing_broken_and_setting_holding_presets_are_refused_with_the_reason(presets):
    presets.save("good", {"seed": 1})
    with pytest.raises(PresetError, match="'nope' not found.*known: good"):
        presets.load("nope")
    (presets.folder / "broken.toml").write_text("strength = = 1\n")
    with pytest.raises(PresetError, match="broken"):
        presets.load("broken")
    (presets.folder / "bad.toml").write_text("strength = 7.0\n")
    with pytest.raises(PresetError, match="strength: 7.0 is out of range"):
        presets.load("bad")
    (presets.folder / "settings.toml").write_text("osc_port = 1\n")
    with pytest.raises(PresetError, match="settings"):
        presets.load("settings")


# ---------------------------------------------------------------------------- through the daemon
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    (folder / "opening.toml").write_text('prompt = "the opening look"\nstrength = 0.35\n[controlnet]\n"3/scale" = 2.0\n')
    return folder


@pytest.fixture(scope="module")
def d(folder):
    daemon = DaemonProcess("--presets-dir", str(folder), "--preset", "opening", "--seed", "77")
    yield daemon.wait_started()
    daemon.stop()


def _wait_state(d, predicate, timeout=10.0) -> dict:
    end = time.monotonic() + timeout
    while not predicate(state := d.state()["params"]) and time.monotonic() < end:
        time.sleep(0.05)
    return state


def test_the_preset_named_at_start_is_recalled_under_the_command_lines_values(d):
    state = d.state()["params"]
    assert (state["prompt"], state["strength"], state["seed"]) == ("the opening look", 0.35, 77)


def test_a_preset_saved_over_osc_is_recalled_over_osc(d, folder):
    d.send("/strength", 0.8125)
    d.send("/prompt", "saved look")
    _wait_state(d, lambda p: p["prompt"] == "saved look")
    d.send("/preset/save", "osc look")
    end = time.monotonic() + 10
    while not (folder / "osc look.toml").exists() and time.monotonic() < end:
        time.sleep(0.05)
    d.send("/strength", 0.25)
    d.send("/prompt", "something else")
    _wait_state(d, lambda p: p["prompt"] == "something else")
    version = d.state()["state_version"]
    d.send("/preset/recall", "osc look")
    state = _wait_state(d, lambda p: p["prompt"] == "saved look")
    assert (state["prompt"], state["strength"]) == ("saved look", 0.8125)
    assert d.state()["state_version"] == version + 1  # one change set


def test_presets_over_websocket_answer_with_the_list_and_errors(d):
    with connect(f"ws://127.0.0.1:{d.http_port}/ws") as c:
        c.send(json.dumps({"type": "set", "params": {"guidance_scale": 3.5}}))
        c.recv(timeout=10)
        c.send(json.dumps({"type": "preset", "id": 1, "save": "ws look"}))
        ack = json.loads(c.recv(timeout=10))
        assert ack["type"] == "ack" and ack["id"] == 1 and "ws look" in ack["presets"] and "opening" in ack["presets"]
        c.send(json.dumps({"type": "set", "params": {"guidance_scale": 1.0}}))
        c.recv(timeout=10)
        c.send(json.dumps({"type": "preset", "id": 2, "recall": "ws look"}))
        ack = json.loads(c.recv(timeout=10))
        assert ack["type"] == "ack" and d.state()["params"]["guidance_scale"] == 3.5
        for message, code in (({"recall": "nope"}, "invalid_preset"), ({"save": "../x"}, "invalid_preset"),
                              ({"save": "a", "recall": "b"}, "invalid_message"), ({}, "invalid_message")):
            c.send(json.dumps({"type": "preset", "id": 3, **message}))
            reply = json.loads(c.recv(timeout=10))
            assert reply["type"] == "error" and reply["error"]["code"] == code
    with urllib.request.urlopen(d.url + "/api/schema", timeout=10) as r:
        assert "ws look" in json.load(r)["presets"]


def test_a_preset_that_cannot_be_recalled_is_reported_and_changes_nothing(d):
    version = d.state()["state_version"]
    since = time.monotonic()
    d.send("/preset/recall", "no such look")
    error = d.telemetry.wait_for("/sdbridge/error", since)
    assert error and "no such look" in error[0] and "not found" in error[0]
    assert d.state()["state_version"] == version


def test_a_missing_start_preset_stops_serve_with_the_reason(tmp_path, folder):
    daemon = DaemonProcess("--presets-dir", str(folder), "--preset", "missing")
    try:
        assert daemon.proc.wait(60) == 2
        assert "preset 'missing' not found" in daemon.log()
    finally:
        daemon.stop()
