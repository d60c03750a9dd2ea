"""Shared test fixtures: a real daemon process, talked to only through the protocol."""
from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pythonosc.udp_client import SimpleUDPClient

from bridge import osc, shm
from bridge.osc import free_udp_port
from bridge.oscquery import reachable_addresses
from bridge.web import free_tcp_port

ROOT = Path(__file__).resolve().parent.parent
SDBRIDGE = [sys.executable, "-m", "bridge.cli"]  # this checkout's code, whatever `sdbridge` is installed
_instances = itertools.count()


_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "")
# This machine's own network addresses: reaching one is still this machine (how tests play a stranger
# on the network to a daemon bound to 0.0.0.0).
MACHINE_ADDRESSES = tuple(a for a in reachable_addresses("0.0.0.0") if a != "127.0.0.1")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with the network off, as a show machine may be: anything that tries to reach a
    host other than this one (a model hub, say) fails loudly instead of quietly downloading."""
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def _local(host) -> bool:
        return isinstance(host, str) and (host in _LOCAL_HOSTS or host.startswith("127.")
                                          or host in MACHINE_ADDRESSES) or host is None

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            raise OSError(f"test tried to reach {address[0]}: the network is off in tests")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            raise socket.gaierror(f"test tried to resolve {host}: the network is off in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def unique_instance(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid() % 100000}x{next(_instances)}"


def segment_exists(name: str) -> bool:
    try:
        ring = shm.Ring.attach(name)
    except (FileNotFoundError, shm.RingError):
        return False
    ring.close()
    return True


def gradient(width: int = 128, height: int = 128, shift: int = 0) -> np.ndarray:
    """An RGB uint8 test frame; `shift` moves it."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 2 + shift) % 256, (y * 2) % 256, ((x + y) // 2) % 256], -1).astype(np.uint8)


def record_frames(stream) -> list:
    """Route `stream`'s frames through a recorder, still run eagerly: the (shape, inputs) of each frame,
    what a CUDA graph would capture and replay."""
    recorded = []

    def record(shape, frame):
        recorded.append((shape, frame))
        return stream._frame(shape, frame)
    stream.graphs = record
    return recorded


def wait(condition, timeout: float = 30.0, interval: float = 0.02):
    """Poll `condition` until it returns something true, and return that; TimeoutError after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"not met within {timeout} s")


class TelemetryListener:
    """Collects /sdbridge/... messages sent to a UDP port."""

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str, list]] = []
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            try:
                data, _ = self.sock.recvfrom(65536)
            except OSError:
                continue
            for address, args in osc.decode(data):
                self.messages.append((time.monotonic(), address, args))

    def values(self, address: str, since: float = 0.0) -> list[list]:
        return [args for t, a, args in list(self.messages) if a == address and t >= since]

    def wait_for(self, address: str, since: float, timeout: float = 10.0, predicate=lambda args: True) -> list | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for args in self.values(address, since):
                if predicate(args):
                    return args
            time.sleep(0.05)
        return None

    def close(self) -> None:
        self._running = False
        self._thread.join(1)
        self.sock.close()


class DaemonProcess:
    """`sdbridge serve` in a subprocess on private ports and a private instance name. With
    `telemetry_port` the test listens for telemetry itself, and `wait_started` waits for the rings only."""

    def __init__(self, *extra: str, instance: str | None = None, width: int = 128, height: int = 128,
                 telemetry_port: int | None = None, env: dict[str, str] | None = None):
        self.instance = instance or unique_instance()
        self.osc_port = free_udp_port()
        self.http_port, self.oscquery_port = free_tcp_port(), free_tcp_port()
        self.telemetry = TelemetryListener(free_udp_port()) if telemetry_port is None else None
        telemetry_port = telemetry_port or self.telemetry.sock.getsockname()[1]
        self.name_in, self.name_out = shm.segment_names(self.instance)
        self.folder = Path(tempfile.gettempdir()) / f"sdbridge-test-{self.instance}"  # its presets, schedules, recordings
        self.argv = [*SDBRIDGE, "serve", "--model", "tiny", "--instance", self.instance,
                     "--osc-port", str(self.osc_port), "--telemetry-port", str(telemetry_port),
                     "--telemetry-interval", "0.2", "--width", str(width), "--height", str(height),
                     "--http-port", str(self.http_port), "--oscquery-port", str(self.oscquery_port), "--no-mdns",
                     "--presets-dir", str(self.folder / "presets"), "--schedules-dir", str(self.folder / "schedules"),
                     "--recordings-dir", str(self.folder / "recordings"), *extra]
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sdbridge-test-{self.instance}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True, env={**os.environ, **(env or {})})
        self.osc = SimpleUDPClient("127.0.0.1", self.osc_port)
        self.ring_in = self.ring_out = None
        self.frame_id = 0

    @property
    def url(self) -> str:
        """The daemon's HTTP server: the web page, /api/... and ws:// at /ws."""
        return f"http://127.0.0.1:{self.http_port}"

    def wait_started(self, timeout: float = 120.0) -> "DaemonProcess":
        """This daemon once it serves; if it does not, it is stopped before the error is raised (a
        fixture that fails here never reaches its teardown)."""
        try:
            return self._wait_started(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_started(self, timeout: float) -> "DaemonProcess":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if segment_exists(self.name_in) and segment_exists(self.name_out):
                self.ring_in, self.ring_out = shm.Ring.attach(self.name_in), shm.Ring.attach(self.name_out)
                if self.telemetry is None:
                    return self
                if self.telemetry.wait_for("/sdbridge/status", 0, timeout=max(1.0, end - time.monotonic()),
                                           predicate=lambda a: a == ["ready"]):
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"daemon did not become ready:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def state(self) -> dict:
        """GET /api/state: {"state_version", "params"}."""
        with urllib.request.urlopen(self.url + "/api/state", timeout=10) as response:
            return json.load(response)

    def send(self, address: str, *args) -> None:
        self.osc.send_message(address, list(args) if len(args) != 1 else args[0])

    def write(self, frame: np.ndarray, **kw) -> int:
        self.frame_id += 1
        self.ring_in.write(frame, frame_id=self.frame_id, **kw)
        return self.frame_id

    def output_after(self, predicate, frame: np.ndarray | None = None, timeout: float = 20.0, **kw) -> shm.Frame:
        """Keep writing `frame` (if given) until an output satisfies `predicate`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if frame is not None:
                self.write(frame, **kw)
            out = self.ring_out.read_latest()
            if out is not None and predicate(out):
                return out
            time.sleep(0.02)
        raise TimeoutError(f"no matching output within {timeout} s:\n{self.log()[-3000:]}")

    def settled(self, frame: np.ndarray, after_version: int, timeout: float = 20.0) -> shm.Frame:
        """The output of `frame` under the first state newer than `after_version`, for a frame written after it."""
        self.output_after(lambda o: o.state_version > after_version, frame, timeout)
        fid = self.write(frame)
        return self.output_after(lambda o: o.frame_id >= fid, frame, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        for ring in (self.ring_in, self.ring_out):
            if ring is not None:
                ring.close()
        self.ring_in = self.ring_out = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.telemetry is not None:
            self.telemetry.close()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def daemon_factory():
    started: list[DaemonProcess] = []

    def start(*extra: str, **kw) -> DaemonProcess:
        d = DaemonProcess(*extra, **kw)
        started.append(d)
        return d.wait_started()

    yield start
    for d in started:
        d.stop()
        for name in (d.name_in, d.name_out):
            remove_segment(name)


@pytest.fixture(scope="module")
def daemon():
    """One running daemon (tiny model, 128x128) shared by a module's tests."""
    d = DaemonProcess().wait_started()
    yield d
    d.stop()


def remove_segment(name: str) -> None:
    """Remove a ring left behind (by a killed daemon, say), if there is one."""
    try:
        ring = shm.Ring.attach(name)
    except (FileNotFoundError, shm.RingError):
        return
    ring.close()
    ring.unlink()
