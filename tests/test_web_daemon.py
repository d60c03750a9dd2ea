"""HTTP and WebSocket through the running daemon (PROTOCOL.md section 3): real `sdbridge serve`
processes, real WebSocket clients, frames both ways, and every kind of bad message."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from bridge import params, shm, web

from .conftest import ROOT, DaemonProcess, gradient

FRAME = gradient()
MAX_SIDE = 256  # the daemon's rings: 256 x 256 x 16 bytes a slot, which is also its frame message limit


@pytest.fixture(scope="module")
def d():
    # float32 output: raw frames of 256 KiB, so that a client left unread would show in memory at once
    daemon = DaemonProcess("--controlnet", "tiny", "--max-width", str(MAX_SIDE), "--max-height", str(MAX_SIDE),
                           "--output-dtype", "float32")
    yield daemon.wait_started()
    daemon.stop()


def _client(d, **kw):
    return connect(f"ws://127.0.0.1:{d.http_port}/ws", max_size=None, open_timeout=10, **kw)


def _get_json(d, path: str):
    with urllib.request.urlopen(d.url + path, timeout=10) as r:
        assert r.headers["Content-Type"] == "application/json"
        return json.load(r)


def _ask(c, message: dict) -> dict:
    """Send a JSON message; the first JSON reply (pushes of other types are skipped)."""
    c.send(json.dumps(message))
    return _next(c, lambda m: m.get("id", None) == message.get("id") and m["type"] in ("ack", "error", "state",
                                                                                         "subscribed"))


def _next(c, predicate=lambda m: True, timeout: float = 20.0):
    """The next message that satisfies `predicate` (JSON messages as dicts, binary as bytes)."""
    end = time.monotonic() + timeout
    while True:
        raw = c.recv(timeout=max(0.01, end - time.monotonic()))
        message = raw if isinstance(raw, bytes) else json.loads(raw)
        if predicate(message):
            return message


def _is_frame(m) -> bool:
    return isinstance(m, bytes)


def _header(message: bytes) -> dict:
    names = ("magic", "version", "kind", "index", "encoding", "channels", "dtype", "flags", "width", "height",
             "reserved", "frame_id")
    return dict(zip(names, web.HEADER.unpack_from(message)))


class _Pump:
    """Writes input frames into the ring at about 30 fps, in the background, so that outputs keep coming."""

    def __init__(self, d):
        self.d, self.running = d, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            self.d.write(FRAME)
            time.sleep(0.033)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


# ---------------------------------------------------------------------------- HTTP
def test_the_schema_lists_every_parameter_the_daemon_serves(d):
    schema = _get_json(d, "/api/schema")
    assert [p["name"] for p in schema["params"]] == [p.name for p in params.schema_params((), 1)]
    assert schema["osc_port"] == d.osc_port and schema["instance"] == d.instance and schema["controlnets"] == ["tiny"]
    by_name = {p["name"]: p for p in schema["params"]}
    assert by_name["strength"] == {**params.BY_NAME["strength"].describe()}
    assert "tiny" in by_name["model"]["options"] and "taesd" in by_name["vae"]["options"]
    assert by_name["controlnet/0/scale"]["max"] == 5.0


def test_state_over_http_and_websocket_agree_and_follow_osc(d):
    since = time.monotonic()
    d.send("/strength", 0.61)
    d.telemetry.wait_for("/sdbridge/state_version", since, predicate=lambda a: True)
    end = time.monotonic() + 10
    while _get_json(d, "/api/state")["params"]["strength"] != pytest.approx(0.61) and time.monotonic() < end:
        time.sleep(0.05)
    state = _get_json(d, "/api/state")
    assert state["params"]["strength"] == pytest.approx(0.61)
    with _client(d) as c:
        reply = _ask(c, {"type": "get", "id": 1})
    assert reply["state_version"] >= state["state_version"] and reply["params"]["strength"] == pytest.approx(0.61)


def test_the_page_and_its_files_are_served_and_nothing_else(d):
    with urllib.request.urlopen(d.url + "/", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/html")
        assert b"app.js" in r.read()
    for path in ("/app.js", "/style.css"):
        with urllib.request.urlopen(d.url + path, timeout=10) as r:
            assert r.status == 200 and r.read()
    for path in ("/nope", "/../bridge/daemon.py", "/static/../web.py", "/api/other"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(d.url + path, timeout=10)
        assert e.value.code == 404


def test_a_name_that_is_not_this_machines_is_refused_against_dns_rebinding(d):
    request = urllib.request.Request(d.url + "/api/state", headers={"Host": f"rebind.attacker.example:{d.http_port}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 403
    with pytest.raises(InvalidStatus) as e:
        connect(f"ws://127.0.0.1:{d.http_port}/ws", additional_headers={"Host": "rebind.attacker.example"},
                origin="http://rebind.attacker.example", open_timeout=10)
    assert e.value.response.status_code == 403


def test_websocket_clients_are_capped(d):
    clients = []
    try:
        for _ in range(web.MAX_CLIENTS):
            clients.append(_client(d))
        with pytest.raises(InvalidStatus) as e:
            _client(d)
        assert e.value.response.status_code == 503
    finally:
        for c in clients:
            c.close()


def test_a_page_from_another_site_cannot_open_the_websocket(d):
    with pytest.raises(InvalidStatus) as e:
        _client(d, origin="http://evil.example")
    assert e.value.response.status_code == 403
    with _client(d, origin=f"http://127.0.0.1:{d.http_port}") as c:  # the daemon's own page may
        assert _ask(c, {"type": "get", "id": 1})["type"] == "state"


# ---------------------------------------------------------------------------- control
def test_a_set_reaches_the_stream_atomically(d):
    with _client(d) as c:
        reply = _ask(c, {"type": "set", "id": "s1", "params": {"seed": 4321, "strength": 0.55}})
        assert reply["type"] == "ack" and reply["id"] == "s1"
        out = d.output_after(lambda o: o.state_version >= reply["state_version"], FRAME, timeout=30)
        assert out.state_version >= reply["state_version"]
        state = _ask(c, {"type": "get", "id": 2})["params"]
    assert (state["seed"], state["strength"]) == (4321, 0.55)


def test_a_refused_set_changes_nothing_and_the_connection_stays_open(d):
    with _client(d) as c:
        before = _ask(c, {"type": "get", "id": 1})
        reply = _ask(c, {"type": "set", "id": 2, "params": {"strength": 0.9, "steps": -3}})
        assert reply["error"]["code"] == "invalid_params" and "steps" in reply["error"]["message"]
        reply = _ask(c, {"type": "set", "id": 3, "params": {"controlnet/1/scale": 1.0}})
        assert reply["error"]["code"] == "invalid_params" and "no ControlNet 1" in reply["error"]["message"]
        after = _ask(c, {"type": "get", "id": 4})
    assert after["state_version"] == before["state_version"] and after["params"] == before["params"]


def test_subscribers_get_every_state_change_from_any_surface(d):
    with _client(d) as c:
        replies = [_ask(c, {"type": "subscribe", "id": 1, "topics": ["state"]})]
        assert replies[0]["topics"] == ["state"]
        _next(c, lambda m: m.get("type") == "state")  # the state at once
        d.send("/seed", 777)
        pushed = _next(c, lambda m: m.get("type") == "state" and m["params"]["seed"] == 777)
    assert pushed["state_version"] >= 2


def test_telemetry_is_pushed_with_errors_as_they_happen(d):
    with _client(d) as c:
        _ask(c, {"type": "subscribe", "id": 1, "topics": ["telemetry"]})
        values = _next(c, lambda m: m.get("type") == "telemetry" and "fps" in m)
        assert values["status"] in ("ready", "paused") and values["model"] == "tiny"
        assert values["controlnet/0"] in ("waiting", "live", "stale") and isinstance(values["latency_ms"], float)
        d.send("/no_such_thing", 1)
        error = _next(c, lambda m: m.get("type") == "telemetry" and "error" in m)
    assert "/no_such_thing" in error["error"]


# ---------------------------------------------------------------------------- frames out
def test_raw_output_frames_are_the_output_rings_frames(d):
    with _client(d) as c:
        _ask(c, {"type": "subscribe", "id": 1, "topics": ["frames"], "frames": {"encoding": "raw", "max_fps": 60}})
        fid = d.write(FRAME)
        message = _next(c, lambda m: _is_frame(m) and _header(m)["frame_id"] >= fid)
    header = _header(message)
    out = d.ring_out.read_latest()
    assert out.frame_id == header["frame_id"]  # no input since: the ring's newest is this frame
    assert (header["magic"], header["version"], header["kind"], header["encoding"]) == (b"SDBF", 1, web.OUTPUT, web.RAW)
    assert (header["width"], header["height"], header["channels"], header["dtype"], header["flags"]) == (
        out.width, out.height, out.channels, out.dtype, out.flags)
    np.testing.assert_array_equal(np.frombuffer(message[32:], out.pixels.dtype).reshape(out.pixels.shape), out.pixels)


def test_jpeg_output_frames_come_at_no_more_than_the_requested_rate(d):
    with _client(d) as c, _Pump(d):
        _ask(c, {"type": "subscribe", "id": 1, "topics": ["frames"], "frames": {"encoding": "jpeg", "max_fps": 4}})
        _next(c, _is_frame)
        start, frames = time.monotonic(), []
        while time.monotonic() - start < 3.0:
            try:
                frames.append(_next(c, _is_frame, timeout=max(0.01, 3.0 - (time.monotonic() - start))))
            except TimeoutError:
                break
    assert 2 <= len(frames) <= 3.0 * 4 + 1
    image = Image.open(io.BytesIO(frames[-1][32:]))
    assert image.format == "JPEG" and image.size == (128, 128) and _header(frames[-1])["encoding"] == web.JPEG


def test_a_client_that_stops_reading_gets_the_newest_frame_never_a_queue(d):
    """A client that reads nothing for seconds while raw frames pour out costs the daemon no memory,
    and holds up no one: another client keeps getting frames."""
    rss = lambda: int(next(line for line in open(f"/proc/{d.proc.pid}/status") if line.startswith("VmRSS")).split()[1])
    if not os.path.exists(f"/proc/{d.proc.pid}/status"):
        pytest.skip("reads the daemon's memory from /proc")
    with _client(d) as slow, _client(d) as other, _Pump(d):
        for c in (slow, other):
            _ask(c, {"type": "subscribe", "id": 1, "topics": ["frames"], "frames": {"encoding": "raw", "max_fps": 240}})
        _next(other, _is_frame)
        before, frames_before = rss(), d.ring_out.write_seq
        produced_bytes = received = 0
        end = time.monotonic() + 60
        while produced_bytes < 24 * 2**20 and time.monotonic() < end:  # `slow` reads nothing meanwhile
            _next(other, _is_frame)
            received += 1
            produced_bytes = (d.ring_out.write_seq - frames_before) * 128 * 128 * 4 * 4
        grown_kib = rss() - before
    print(f"{produced_bytes / 2**20:.1f} MiB of frames went out; the daemon grew by {grown_kib} KiB")
    assert received >= 10, "the other client was held up"
    assert produced_bytes >= 24 * 2**20, "too few frames to tell"  # what a queue would have kept
    assert grown_kib < 6 * 1024, f"the daemon grew by {grown_kib} KiB while {produced_bytes} bytes of frames went out"


# ---------------------------------------------------------------------------- frames in
def test_input_frames_over_websocket_are_rendered_raw_and_jpeg(d):
    with _client(d) as c:
        c.send(web.encode_frame(FRAME, kind=web.INPUT, frame_id=4242))
        out = d.output_after(lambda o: o.frame_id == 4242, timeout=30)
        assert (out.width, out.height) == (128, 128)
        jpeg = io.BytesIO()
        Image.fromarray(FRAME).save(jpeg, "JPEG")
        c.send(web.HEADER.pack(web.MAGIC, 1, web.INPUT, 0, web.JPEG, 3, 1, 0, 128, 128, 0, 4243) + jpeg.getvalue())
        d.output_after(lambda o: o.frame_id == 4243, timeout=30)


def test_control_images_over_websocket_reach_their_controlnet(d):
    view = shm.Ring.attach(shm.ring_name(d.instance, "cn0_view"))
    try:
        with _client(d) as c:
            c.send(web.encode_frame(FRAME[:, ::-1].copy(), kind=web.CONTROL, index=0, frame_id=515))
            d.output_after(lambda o: (view.read_latest() or o).frame_id == 515, FRAME, timeout=30)
            c.send(web.encode_frame(FRAME, kind=web.CONTROL, index=5, frame_id=516))
            reply = _next(c, lambda m: isinstance(m, dict) and m["type"] == "error")
    finally:
        view.close()
    assert reply["error"]["code"] == "invalid_frame" and "no ControlNet 5" in reply["error"]["message"]


# ---------------------------------------------------------------------------- bad clients
BAD_MESSAGES = [
    "{not json", "[1, 2]", '{"type": "explode"}', '{"type": "set", "params": {"strength": "loud"}}',
    '{"type": "subscribe", "topics": ["nothing"]}', "x" * (web.MAX_TEXT_BYTES + 1),
    b"", b"SDBF", b"\x00" * 64, web.HEADER.pack(web.MAGIC, 1, web.OUTPUT, 0, 0, 3, 1, 0, 2, 2, 0, 0) + bytes(12),
    web.HEADER.pack(web.MAGIC, 1, web.INPUT, 0, web.JPEG, 3, 1, 0, 2, 2, 0, 0) + b"not a jpeg",
    web.HEADER.pack(web.MAGIC, 1, web.INPUT, 0, web.RAW, 3, 1, 0, 100, 100, 0, 0) + bytes(10),
]


def test_every_kind_of_bad_message_gets_an_error_and_the_stream_goes_on(d):
    with _client(d) as bad, _client(d) as watcher, _Pump(d):
        _ask(watcher, {"type": "subscribe", "id": 1, "topics": ["frames"], "frames": {"max_fps": 30}})
        for message in BAD_MESSAGES:
            bad.send(message)
            reply = _next(bad, lambda m: isinstance(m, dict))
            assert reply["type"] == "error" and reply["error"]["code"] and reply["error"]["message"], message
        assert _ask(bad, {"type": "get", "id": "still"})["type"] == "state"
        # the output of a frame the pump writes from now on: frame ids are not in order across sources (a
        # WebSocket frame of an earlier test has id 4243), so only the pump's own ids tell
        since = d.frame_id
        _next(watcher, lambda m: _is_frame(m) and since < _header(m)["frame_id"] <= d.frame_id)


def test_a_message_over_the_size_limit_closes_only_its_own_connection(d):
    limit = MAX_SIDE * MAX_SIDE * 16 + 32
    with _client(d) as big, _client(d) as other:
        big.send(bytes(limit + 1))
        with pytest.raises(ConnectionClosed) as e:
            big.recv(timeout=10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009  # message too big
        assert _ask(other, {"type": "get", "id": 1})["type"] == "state"
    d.output_after(lambda o: True, FRAME, timeout=30)


def test_the_daemon_stops_at_once_with_a_client_that_reads_nothing(daemon_factory):
    """A frozen remote machine must not keep a daemon from stopping (and removing its rings)."""
    d = daemon_factory("--output-dtype", "float32")
    c = _client(d)
    _ask(c, {"type": "subscribe", "id": 1, "topics": ["frames", "state", "telemetry"],
             "frames": {"encoding": "raw", "max_fps": 240}})
    with _Pump(d):
        time.sleep(3)  # frames pile up in its socket buffers: it reads none of them
    started = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - started < 8
    log = d.log_path.read_text()  # the daemon's whole log: it has stopped
    assert "Task was destroyed" not in log and "did not stop" not in log and "did not close" not in log


def test_the_websocket_benchmark_runs_and_reports_round_trips():
    """benchmarks/websocket_frames.py end to end on a small frame (its numbers are printed, not checked)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "websocket_frames.py"), "--width", "64",
                             "--height", "64", "--seconds", "2", "--input-fps", "10", "--json"],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert figures["outputs_per_s"] > 0 and figures["round_trip_ms"]["n"] > 0
    assert figures["round_trip_ms"]["p50"] > 0 and figures["decode_ms"] > 0 and figures["encoding"] == "jpeg"
