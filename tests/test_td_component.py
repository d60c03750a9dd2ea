"""The TouchDesigner component: `sdbridge touchdesigner` writes the build script; the script, run in a
stand-in of TouchDesigner's objects (tests/td_standin.py), assembles the component from the schema;
and the component, its extension and embedded modules loaded as TouchDesigner loads DAT modules,
streams frames and parameters with a real daemon process."""
from __future__ import annotations

import ast
import os
import sys
import time

import numpy as np
import pytest

from bridge import params, shm
from bridge.osc import free_udp_port
from bridge.web import free_tcp_port
from touchdesigner import client, script

from . import td_standin
from .conftest import ROOT, SDBRIDGE, DaemonProcess, gradient, remove_segment, unique_instance, wait

SCHEMA = {"params": [p.describe() for p in params.schema_params(["neon"], 2)], "controlnets": ["a", "b"],
          "presets": [], "instance": "default", "protocol": 1, "osc_port": 9100}
STATE = {name: params.json_value(value) for name, value in params.defaults().items()}


def load_script(text: str) -> dict:
    namespace = {"__name__": "sdbridge_build"}
    exec(compile(text, "sdbridge_build.py", "exec", dont_inherit=True), namespace)
    return namespace


def built(schema=SCHEMA, state=STATE, launch=None, tmp_path=None) -> td_standin.COMP:
    namespace = load_script(script.build_script(schema, state, launch or {}))
    here = td_standin.network()
    comp, path = namespace["build"](here, namespace["SCHEMA"], namespace["STATE"], namespace["SOURCES"],
                                    namespace["LAUNCH"], str(tmp_path or "/tmp") + "/sdbridge.tox")
    assert path.endswith("sdbridge.tox") and comp.saved_to == path
    return comp


def test_the_command_writes_a_python_3_11_script_that_needs_only_the_standard_library(tmp_path):
    import subprocess
    out = tmp_path / "sdbridge_build.py"
    done = subprocess.run([*SDBRIDGE, "touchdesigner", "--out", str(out), "--controlnet", "tiny",
                           "--osc-port", "9200"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Run Script" in done.stdout
    tree = ast.parse(out.read_text(), feature_version=(3, 11))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"json", "sys", "urllib.request"}
    namespace = load_script(out.read_text())
    assert namespace["LAUNCH"]["osc_port"] == 9200 and namespace["LAUNCH"]["executable"] == sys.executable
    assert namespace["SCHEMA"]["controlnets"] == ["tiny"] and namespace["STATE"]["model"] == "tiny"
    assert set(namespace["SOURCES"]) == {"sdb_shm", "sdb_osc_codec", "sdb_client", "sdb_parameters", "sdb_extension"}


def test_every_embedded_module_is_python_3_11_and_imports_only_the_stdlib_numpy_and_its_siblings():
    sources = load_script(script.build_script(SCHEMA, STATE, {}))["SOURCES"]
    allowed = set(sys.stdlib_module_names) | {"numpy"} | set(sources)
    for name, text in sources.items():
        tree = ast.parse(text, feature_version=(3, 11))
        # string annotations make a dataclass look its module up in sys.modules, where TD may not put it
        assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body), name
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module not in ("bridge", "touchdesigner"):
                modules = [node.module.split(".")[0]]  # `from bridge import shm` is tried first, then the DAT
            else:
                continue
            assert set(modules) <= allowed, f"{name} imports {modules}"


def test_the_build_makes_a_parameter_for_every_schema_parameter_and_an_input_per_controlnet(tmp_path):
    comp = built(tmp_path=tmp_path)
    extension = comp.extensions[0]
    sources = {spec.source for spec in extension.sync.specs.values()}
    assert sources == {p["name"] for p in SCHEMA["params"]}
    for spec in extension.sync.specs.values():
        par = getattr(comp.par, spec.name)
        assert par.page.name == spec.page and par.style == spec.style and par.help
    assert comp.par.Strength.eval() == 0.5 and comp.par.Mode.eval() == "img2img" and comp.par.Prompts.eval() == "[]"
    assert comp.par.Strength.min == 0.0 and comp.par.Strength.clampMax
    assert [c.name for c in comp.children.values() if c.type == "inTOP"] == ["in1", "in2", "in3"]
    assert comp.op("input_fit").par.resolutionw.eval() == 512
    assert comp.par.Status.readOnly and comp.par.ext0promote.val is True


def test_a_build_shows_the_state_it_was_given_and_a_rebuild_replaces_the_component(tmp_path):
    namespace = load_script(script.build_script(SCHEMA, {**STATE, "strength": 0.8, "prompts": [["a", 1.0]]}, {}))
    here = td_standin.network()
    for _ in range(2):
        comp, _ = namespace["build"](here, SCHEMA, namespace["STATE"], namespace["SOURCES"], {}, str(tmp_path / "x.tox"))
    assert list(here.children) == ["sdbridge"] and here.op("sdbridge") is comp
    assert comp.par.Strength.eval() == 0.8 and comp.par.Prompts.eval() == '[["a", 1.0]]'


def _serve(*flags: str) -> tuple[DaemonProcess, int]:
    port = free_udp_port()
    d = DaemonProcess(*flags, telemetry_port=port).wait_started()  # the rings are there; the HTTP server follows
    try:
        wait(lambda: _answer(d.url + "/api/schema"), 60)
    except BaseException:
        _stop(d)
        raise
    return d, port


def _stop(d: DaemonProcess) -> None:
    d.stop()
    for name in (d.name_in, d.name_out):
        remove_segment(name)


@pytest.fixture(scope="module")
def served():
    d, port = _serve()
    yield d, port
    _stop(d)


@pytest.fixture
def component(tmp_path, request, served):
    """A daemon and a component built from its live schema and state, pointed at it: the module's
    daemon, or one of the test's own started with the flags of its `daemon_args` mark."""
    mark = request.node.get_closest_marker("daemon_args")
    d, port = _serve(*mark.args) if mark else served
    try:
        schema = client.fetch_json(d.url + "/api/schema")
        state = client.fetch_json(d.url + "/api/state")["params"]
        comp = built(schema, state, {"instance": d.instance, "osc_port": d.osc_port, "telemetry_port": port,
                                     "http_port": d.http_port}, tmp_path)
        yield d, comp
        comp.Shutdown()
    finally:
        if mark:
            _stop(d)


def _answer(url: str):
    try:
        return client.fetch_json(url)
    except OSError:
        return None


def td_frame(shift: int = 0) -> np.ndarray:
    rgb = gradient(128, 128, shift)
    return np.concatenate([rgb, np.full((128, 128, 1), 255, np.uint8)], -1)[::-1].astype(np.float32) / 255


def frames_until(comp, condition, timeout: float = 30.0):
    def step():
        comp.frame()
        return condition()
    return wait(step, timeout)


def test_the_component_streams_the_daemons_frames_into_its_script_top(component):
    d, comp = component
    comp.feed(0, td_frame())
    frames_until(comp, lambda: comp.op("output").pixels is not None)
    pixels = comp.op("output").pixels
    assert pixels.shape == (128, 128, 4) and pixels.dtype == np.uint8
    comp.feed(0, None)  # unwired: the daemon's last output stays
    time.sleep(1.0)
    comp.frame()
    raw = d.ring_out.read_latest()  # the daemon writes top-left; the Script TOP gets TD's bottom row first
    assert comp.extensions[0].frame.seq == raw.seq
    assert np.array_equal(comp.op("output").pixels, raw.pixels[::-1])
    status = frames_until(comp, lambda: comp.par.Status.eval().startswith("ready") and comp.par.Status.eval())
    assert "fps" in status and comp.par.Servedmodel.eval() == "tiny"
    frames_until(comp, lambda: comp.par.Fps.eval() > 0)


def test_changed_parameters_reach_the_daemon_and_only_they_are_sent(component):
    d, comp = component
    comp.frame()  # the first frame sends the whole look
    time.sleep(0.3)
    version = client.fetch_json(d.url + "/api/state")["state_version"]
    comp.par.Strength = 0.3
    comp.par.Prompt = "a lighthouse in a storm"
    comp.frame()
    state = wait(lambda: (s := client.fetch_json(d.url + "/api/state"))["state_version"] > version and s)
    assert state["params"]["strength"] == pytest.approx(0.3) and state["params"]["prompt"] == "a lighthouse in a storm"
    for _ in range(5):
        comp.frame()
    time.sleep(0.3)
    assert client.fetch_json(d.url + "/api/state")["state_version"] == state["state_version"]  # nothing resent


def test_a_list_typed_wrong_shows_an_error_and_sends_nothing(component):
    d, comp = component
    comp.frame()
    time.sleep(0.3)
    version = client.fetch_json(d.url + "/api/state")["state_version"]
    comp.par.Prompts = '[["a fox", 0.7'
    comp.frame()
    assert "Prompts: not JSON" in comp.par.Error.eval()
    time.sleep(0.3)
    assert client.fetch_json(d.url + "/api/state")["state_version"] == version


def test_the_daemons_errors_show_on_the_component(component):
    d, comp = component
    comp.frame()
    comp.par.Width = 132  # within TouchDesigner's range, but not a multiple of 8: the daemon refuses it
    frames_until(comp, lambda: "multiple of 8" in comp.par.Error.eval())


def test_presets_save_and_recall_from_pulses_and_the_parameters_follow(component):
    d, comp = component
    comp.par.Strength, comp.par.Prompt, comp.par.Preset = 0.2, "the saved look", "look-a"
    comp.frame()
    wait(lambda: client.fetch_json(d.url + "/api/state")["params"]["prompt"] == "the saved look")
    comp.pulse("Savepreset")
    frames_until(comp, lambda: "look-a" in comp.par.Preset.menuNames)
    comp.par.Strength, comp.par.Prompt = 0.9, "something else"
    comp.frame()
    wait(lambda: client.fetch_json(d.url + "/api/state")["params"]["prompt"] == "something else")
    comp.pulse("Recallpreset")
    frames_until(comp, lambda: comp.par.Prompt.eval() == "the saved look")
    assert comp.par.Strength.eval() == pytest.approx(0.2)
    comp.par.Preset = ""
    comp.pulse("Recallpreset")
    comp.frame()  # the status parameters show at the next frame
    assert "type a preset name" in comp.par.Error.eval()


def test_a_morph_pulse_eases_to_the_preset_and_the_parameters_follow_when_it_ends(component):
    d, comp = component
    comp.par.Strength, comp.par.Preset = 0.3, "morph-a"
    comp.frame()
    wait(lambda: client.fetch_json(d.url + "/api/state")["params"]["strength"] == pytest.approx(0.3))
    comp.pulse("Savepreset")
    frames_until(comp, lambda: "morph-a" in comp.par.Preset.menuNames)
    comp.par.Strength = 0.8
    comp.frame()
    wait(lambda: client.fetch_json(d.url + "/api/state")["params"]["strength"] == pytest.approx(0.8))
    comp.par.Morphseconds = 1.0
    comp.pulse("Morphpreset")
    wait(lambda: 0.31 < client.fetch_json(d.url + "/api/state")["params"]["strength"] < 0.79)  # on the way
    frames_until(comp, lambda: comp.par.Strength.eval() == pytest.approx(0.3))


def test_record_and_snapshot_pulses_write_their_files(component):
    d, comp = component
    recordings = d.folder / "recordings"
    before = set(recordings.glob("*")) if recordings.exists() else set()
    comp.feed(0, td_frame())
    frames_until(comp, lambda: comp.op("output").pixels is not None)
    comp.pulse("Startrecording")
    for shift in range(1, 6):  # moving input: a frame rendered for each
        comp.feed(0, td_frame(shift))
        comp.frame()
        time.sleep(0.1)
    comp.pulse("Snapshot")
    comp.pulse("Stoprecording")
    frames_until(comp, lambda: {p.suffix for p in set(recordings.glob("*")) - before} == {".mp4", ".png"})
    assert not comp.par.Error.eval()


@pytest.mark.daemon_args("--controlnet", "tiny")
def test_control_images_go_out_when_they_change_and_a_still_one_only_keeps_its_ring_alive(component):
    d, comp = component
    ring = shm.Ring.attach(shm.ring_name(d.instance, "cn0"))
    try:
        comp.feed(1, td_frame(0))
        frames_until(comp, lambda: ring.write_seq > 0)
        for _ in range(5):
            comp.frame()
        still = ring.write_seq  # a still image: sent as its delayed download arrives, then no more
        assert still == 1
        heartbeat = ring.heartbeat_ns
        comp.frame()
        assert ring.write_seq == still and ring.heartbeat_ns > heartbeat
        for shift in range(1, 4):  # a moving control image goes out as it changes
            comp.feed(1, td_frame(shift * 10))
            comp.frame()
        assert ring.write_seq == still + 3
        written = ring.read_latest()
        assert written.bottom_left and written.pixels.dtype == np.float32
        np.testing.assert_array_equal(written.pixels, td_frame(20))  # the download lags one frame
        comp.pulse("Resend")  # what a new daemon gets too: the control image again
        comp.frame()
        comp.frame()
        assert ring.write_seq > still + 3
    finally:
        ring.close()


def test_a_parameter_driven_by_an_expression_keeps_its_driver_when_the_daemon_state_comes_back(component):
    d, comp = component
    comp.par.Strength.expr = "0.35"  # what an audio-reactive CHOP reference looks like to the component
    comp.frame()
    wait(lambda: client.fetch_json(d.url + "/api/state")["params"]["strength"] == pytest.approx(0.35))
    d.send("/prompt", "set elsewhere")  # the web page, say
    d.send("/strength", 0.9)
    wait(lambda: client.fetch_json(d.url + "/api/state")["params"]["prompt"] == "set elsewhere")
    comp.pulse("Pullstate")
    frames_until(comp, lambda: comp.par.Prompt.eval() == "set elsewhere")  # a constant one follows
    assert comp.par.Strength.expr == "0.35" and comp.par.Strength.eval() == 0.35
    # and the expression's value goes out again
    frames_until(comp, lambda: client.fetch_json(d.url + "/api/state")["params"]["strength"] == pytest.approx(0.35))


def test_a_broken_setting_is_reported_and_the_component_keeps_running(component):
    d, comp = component
    comp.par.Instance = "an-instance-name-far-too-long-for-macos"
    comp.frame()
    assert "longer than 30 characters" in comp.par.Error.eval()
    assert comp.par.Status.eval().startswith("not connected")
    comp.par.Instance = d.instance
    comp.feed(0, td_frame())
    frames_until(comp, lambda: comp.op("output").pixels is not None)
    comp.par.Prompts = '[{"text": "a fox", "weight": 0.7}]'
    comp.frame()
    assert "expected a JSON list of texts, numbers or [text, number] pairs" in comp.par.Error.eval()


def test_update_parameters_takes_a_lora_dropped_into_the_folder_since_the_build(tmp_path):
    from engines import tiny
    from tests.test_lora import _peft_lora, write_diffusers

    loras = tmp_path / "models" / "Lora"
    loras.mkdir(parents=True)
    port = free_udp_port()
    d = DaemonProcess("--models-dir", str(tmp_path), telemetry_port=port).wait_started()
    try:
        schema = wait(lambda: _answer(d.url + "/api/schema"), 60)  # the HTTP server follows the rings
        comp = built(schema, client.fetch_json(d.url + "/api/state")["params"],
                     {"instance": d.instance, "osc_port": d.osc_port, "telemetry_port": port, "http_port": d.http_port},
                     tmp_path)
        assert not [p for p in comp.customPars if p.page.name == "LoRA"]
        write_diffusers(_peft_lora(tiny.build_bundle(), seed=5), loras, "late addition.safetensors")
        comp.pulse("Updatepars")
        frames_until(comp, lambda: "Loralateaddition" in comp.par._pars)
        assert comp.par.Loralateaddition.page.name == "LoRA" and comp.par.Loralateaddition.label == "late addition"
        comp.par.Loralateaddition = 0.5
        comp.frame()
        wait(lambda: client.fetch_json(d.url + "/api/state")["params"].get("lora/late addition") == 0.5)
        comp.Shutdown()
    finally:
        _stop(d)


def test_launch_starts_the_daemon_shows_its_log_and_stop_stops_it(tmp_path, monkeypatch):
    instance = unique_instance()
    launch = {"executable": sys.executable, "model": "tiny", "instance": instance, "osc_port": free_udp_port(),
              "telemetry_port": free_udp_port(), "http_port": free_tcp_port()}
    comp = built(launch=launch, tmp_path=tmp_path)
    comp.par.Launchargs = (f"--no-mdns --oscquery-port 0 --width 128 --height 128 --telemetry-interval 0.2 "
                           f"--presets-dir {tmp_path}")
    monkeypatch.chdir(ROOT)  # `python -m bridge.cli` runs this checkout's code, as the tests do
    launchers = []  # every daemon this test starts is stopped, whatever fails
    try:
        comp.pulse("Launch")
        launchers.append(comp.extensions[0].launcher)
        frames_until(comp, lambda: comp.par.Status.eval().startswith("ready"), timeout=120)
        log = comp.op("log").text
        assert log.startswith("$ ") and "--output-origin bottom-left" in log and "OSC control on udp://" in log
        comp.pulse("Launch")
        comp.frame()
        assert "already" in comp.par.Error.eval() or "still runs" in comp.par.Error.eval()
        comp.pulse("Stop")
        frames_until(comp, lambda: "[exited with code 0]" in comp.op("log").text)
        # a daemon launched before the extension was re-initialised (a rebuild, an edit) can still be stopped
        comp.pulse("Launch")
        extension = comp.extensions[0]
        launchers.append(extension.launcher)
        frames_until(comp, lambda: extension.link.daemon_pid == extension.launcher.process.pid, timeout=120)
        pid = extension.launcher.process.pid
        comp.Shutdown()
        comp.initializeExtensions()
        comp.pulse("Stop")
        frames_until(comp, lambda: comp.par.Status.eval().startswith("no daemon"), timeout=30)
        with pytest.raises(ProcessLookupError):
            wait(lambda: os.kill(pid, 0), timeout=10)  # gone (and reaped by the old launcher's reader)
    finally:
        comp.Shutdown(stop_daemon=True)
        for launcher in launchers:
            launcher.stop(wait=True)
        remove_segment(f"sdb_{instance}_in")
        remove_segment(f"sdb_{instance}_out")
