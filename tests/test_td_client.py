"""touchdesigner/client.py, the library TouchDesigner's Python runs, against a real daemon process:
frames in the way TD gives them, outputs read the way a Script TOP takes them, parameter changes,
presets and telemetry."""
from __future__ import annotations

import sys
import time
import tracemalloc

import numpy as np
import pytest

from bridge import shm
from bridge.osc import free_udp_port
from bridge.web import free_tcp_port
from touchdesigner import client

from .conftest import ROOT, DaemonProcess, gradient, remove_segment, unique_instance, wait

FRAME = gradient(128, 128)


def td_pixels(rgb_top_left: np.ndarray) -> np.ndarray:
    """What TOP.numpyArray() gives for this picture: float32 RGBA 0..1, the bottom row first."""
    rgba = np.concatenate([rgb_top_left, np.full(rgb_top_left.shape[:2] + (1,), 255, np.uint8)], -1)
    return np.ascontiguousarray(rgba[::-1].astype(np.float32) / 255)


@pytest.fixture(scope="module")
def served():
    """One daemon (top-left outputs, as `sdbridge serve` gives by default) for this module, sending its
    telemetry to a port the tests' DaemonLinks listen on."""
    port = free_udp_port()
    d = DaemonProcess(telemetry_port=port).wait_started()
    yield d, port
    d.stop()
    for name in (d.name_in, d.name_out):
        remove_segment(name)


@pytest.fixture
def linked(served):
    """The module's daemon and a new DaemonLink to it, which receives its telemetry."""
    d, port = served
    link = client.DaemonLink(client.Endpoints(d.instance, osc_port=d.osc_port, telemetry_port=port,
                                              http_port=d.http_port))
    wait(lambda: link.telemetry.poll().get("status") == "ready", 120)
    yield d, link
    link.close()


_frame_ids = iter(range(1, 10**9))


def render(link: client.DaemonLink, pixels: np.ndarray, flags: int = shm.FLAG_BOTTOM_LEFT) -> shm.Frame:
    """Write `pixels` as TD does and return their output, read through the link."""
    frame_id = next(_frame_ids)
    link.input.write(pixels, frame_id=frame_id, flags=flags)
    return wait(lambda: (o := link.output.read()) is not None and o.frame_id == frame_id and o)


def test_a_new_daemon_is_announced_once(linked):
    _, link = linked
    assert link.tick() is True
    assert link.tick() is False and link.connected


def test_td_frames_go_in_and_outputs_come_back_in_td_row_order(linked):
    d, link = linked
    link.tick()
    out = render(link, td_pixels(FRAME))
    assert out.bottom_left and out.pixels.shape == (128, 128, 4) and out.pixels.dtype == np.uint8
    # the same frame, read as it is in the ring (top-left), is the flip of what the reader hands TD
    raw = d.ring_out.read_latest()
    assert raw.seq == out.seq and not raw.bottom_left
    assert np.array_equal(out.pixels, raw.pixels[::-1])


def test_a_frame_sent_as_td_gives_it_renders_like_the_same_picture_top_left(linked):
    d, link = linked
    link.tick()
    from_td = render(link, td_pixels(FRAME)).pixels.copy()
    plain = render(link, FRAME, flags=0).pixels.copy()
    assert np.abs(from_td.astype(int) - plain.astype(int)).max() <= 1
    upside_down = render(link, td_pixels(FRAME), flags=0).pixels
    assert np.abs(upside_down.astype(int) - plain.astype(int)).max() > 8  # the flag is what made them equal


def test_a_bottom_left_daemon_needs_no_flip(daemon_factory):
    d = daemon_factory("--output-origin", "bottom-left")
    ring = client.OutputRing(d.name_out)
    fid = d.write(FRAME)
    out = wait(lambda: (o := ring.read()) is not None and o.frame_id >= fid and o)
    raw = d.ring_out.read_latest()
    assert raw.bottom_left and raw.seq == out.seq and np.array_equal(out.pixels, raw.pixels)
    ring.detach()


def test_reading_outputs_allocates_no_frame_buffers(linked):
    _, link = linked
    link.tick()
    render(link, td_pixels(FRAME))
    tracemalloc.start()
    try:
        reads = 0
        for i in range(40):
            link.input.write(td_pixels(FRAME), frame_id=100 + i)  # allocated by the test, before the snapshot
            time.sleep(0.05)
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            reads += link.output.read() is not None
            grown = tracemalloc.get_traced_memory()[1] - before
            assert grown < 8192, f"a read allocated {grown} bytes; a frame is {128 * 128 * 4}"
    finally:
        tracemalloc.stop()
    assert reads >= 3


def test_parameter_changes_arrive_together_as_one_state(linked):
    d, link = linked
    before = client.fetch_json(d.url + "/api/state")
    link.sender.send({"strength": 0.25, "seed": 77, "prompt": "a tidal wave", "pause": False,
                      "prompts": [["a fox", 0.75], ["a city", 0.25]], "t_index_list": [10, 30]})
    state = wait(lambda: (s := client.fetch_json(d.url + "/api/state"))["state_version"] > before["state_version"] and s)
    assert state["state_version"] == before["state_version"] + 1
    params = state["params"]
    assert (params["strength"], params["seed"], params["prompt"]) == (0.25, 77, "a tidal wave")
    assert params["prompts"] == [["a fox", 0.75], ["a city", 0.25]] and params["t_index_list"] == [10, 30]


def test_telemetry_is_parsed_and_errors_are_kept(linked):
    d, link = linked
    link.tick()
    for _ in range(3):
        render(link, td_pixels(FRAME))
    telemetry = wait(lambda: (t := link.telemetry.poll()).get("fps", 0) > 0 and t.get("frame", 0) > 0 and t)
    assert telemetry.fresh() and telemetry.get("status") == "ready" and telemetry.get("model") == "tiny"
    assert isinstance(telemetry.get("state_version"), int) and telemetry.get("latency_ms") > 0
    link.sender.send({"strength": 7.0})  # out of range: the daemon refuses it and says why
    wait(lambda: any("strength" in text for _, text in link.telemetry.poll().errors))


def test_presets_save_and_recall_over_osc(linked):
    d, link = linked
    link.sender.send({"strength": 0.3, "prompt": "a saved look"})
    wait(lambda: client.fetch_json(d.url + "/api/state")["params"]["prompt"] == "a saved look")
    link.sender.save_preset("td-look")
    wait(lambda: "td-look" in client.fetch_json(d.url + "/api/schema")["presets"])
    link.sender.send({"strength": 0.9, "prompt": "another"})
    wait(lambda: client.fetch_json(d.url + "/api/state")["params"]["prompt"] == "another")
    link.sender.recall_preset("td-look")
    params = wait(lambda: (p := client.fetch_json(d.url + "/api/state")["params"])["prompt"] == "a saved look" and p)
    assert params["strength"] == pytest.approx(0.3)  # OSC carries 32-bit floats


def test_control_images_reach_the_controlnet_ring(daemon_factory):
    d = daemon_factory("--controlnet", "tiny")
    link = client.DaemonLink(client.Endpoints(d.instance, osc_port=d.osc_port, telemetry_port=free_udp_port(),
                                              http_port=d.http_port), controlnets=1)
    view = shm.NewestFrames(shm.Ring.attach(shm.ring_name(d.instance, "cn0_view")))
    try:
        def seen():
            link.controls[0].write(td_pixels(FRAME), frame_id=41)
            d.write(FRAME)
            return view.take()

        frame = wait(seen)
        assert frame.frame_id == 41
    finally:
        view.ring.close()
        link.close()


def test_a_restarted_daemon_is_followed(daemon_factory):
    first = daemon_factory("--output-origin", "bottom-left")
    link = client.DaemonLink(client.Endpoints(first.instance, osc_port=first.osc_port, telemetry_port=free_udp_port()))
    link.output.stale_s, link.output.retry_s = 0.8, 0.1
    link.input.retry_s = 0.1
    assert link.tick()
    render(link, td_pixels(FRAME))
    first.stop()
    second = daemon_factory("--output-origin", "bottom-left", instance=first.instance)
    assert wait(link.tick)
    out = render(link, td_pixels(FRAME))
    assert out.seq >= 1 and link.daemon_pid == second.proc.pid
    link.close()


def test_a_frame_too_large_for_the_ring_says_what_to_do(linked):
    _, link = linked
    with pytest.raises(shm.RingError, match="max-width"):
        link.input.write(np.zeros((1080, 1920, 4), np.float32))


def test_the_launcher_runs_the_daemon_and_keeps_its_log(tmp_path, monkeypatch):
    endpoints = client.Endpoints(unique_instance(), osc_port=free_udp_port(), telemetry_port=free_udp_port(),
                                 http_port=free_tcp_port())
    command = client.serve_command(sys.executable, model="tiny", endpoints=endpoints,
                                   extra=["--no-mdns", "--oscquery-port", "0", "--presets-dir", str(tmp_path)])
    assert command[:3] == [sys.executable, "-m", "bridge.cli"] and "--output-origin" in command
    launcher = client.Launcher()
    monkeypatch.chdir(ROOT)  # `python -m bridge.cli` runs this checkout's code, as the tests do
    launcher.start(command)
    try:  # stopped whatever fails
        link = client.DaemonLink(endpoints)
        wait(lambda: link.telemetry.poll().get("status") == "ready", 120)
        assert link.tick() and launcher.running
        with pytest.raises(RuntimeError, match="still runs"):
            launcher.start(command)
        link.close()
    finally:
        code = launcher.stop(wait=True)
    assert code == 0 and not launcher.running
    log = "\n".join(launcher.lines)
    assert log.startswith("$ ") and "OSC control on udp://" in log and "[exited with code 0]" in log
