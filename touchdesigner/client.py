"""The client side of the wire protocol, as TouchDesigner's Python runs it: frames into and out of the
daemon's rings, parameter changes out over OSC, telemetry back, and the daemon launched and watched.

It imports only the standard library, numpy and the pure protocol modules bridge/shm and
bridge/osc_codec, which the .tox embeds as the Text DATs sdb_shm and sdb_osc_codec (DESIGN.md: never a
second implementation). Nothing here touches a TouchDesigner object, so plain Python tests run it
against a real daemon; touchdesigner/extension.py connects it to the component's operators.
"""
import collections
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

try:  # inside TouchDesigner: the component's own Text DATs, even where sdbridge is on TD's module path
    import sdb_osc_codec as osc_codec
    import sdb_shm as shm
except ImportError:  # anywhere else: the installed package
    from bridge import osc_codec, shm

RETRY_S = 1.0  # how often a missing ring is looked for again
STALE_S = 2.0  # an output ring without a frame or heartbeat for this long: the daemon is gone
TELEMETRY_STALE_S = 3.0  # the daemon sends telemetry every 0.5 s by default
LOG_LINES = 500
MAX_DATAGRAM = 8192  # bytes; macOS refuses UDP datagrams over 9216 by default
ATTACH_ERRORS = (OSError, ValueError, shm.RingError)  # missing, not made yet (empty), refused, not a ring


@dataclass(frozen=True)
class Endpoints:
    """Where one daemon instance is: its shared-memory instance name and its ports (PROTOCOL.md)."""

    instance: str = "default"
    host: str = "127.0.0.1"
    osc_port: int = 9100
    telemetry_port: int = 9101
    http_port: int = 9102

    def ring(self, stream: str) -> str:
        return shm.ring_name(self.instance, stream)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.http_port}{path}"


# ---------------------------------------------------------------------------- frames
class _Attachment:
    """A ring the daemon made: attached on first use, and looked for again every `retry_s` while the
    daemon has not made it (or is not there). A segment under the ring's name that is not a ring (left
    truncated, another program's) is never used: `problem` says why, until a daemon replaces it."""

    def __init__(self, name: str, retry_s: float = RETRY_S):
        self.name = name
        self.retry_s = retry_s
        self.ring: shm.Ring | None = None
        self.problem = ""  # why the segment under this name cannot be used; "" while none is, or it can
        self._next_try = 0.0

    def attached(self) -> shm.Ring | None:
        """The ring, attached now if it has become available; None while it is not."""
        if self.ring is None and time.monotonic() >= self._next_try:
            try:
                self.ring = shm.Ring.attach(self.name)
                self.problem = ""
            except FileNotFoundError:  # no daemon made it yet: nothing wrong
                self.problem = ""
                self._next_try = time.monotonic() + self.retry_s
            except ATTACH_ERRORS as e:
                self.problem = str(e) if isinstance(e, shm.RingError) else f"segment {self.name!r}: {e}"
                self._next_try = time.monotonic() + self.retry_s
        return self.ring

    def detach(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        self._next_try = 0.0


class InputRing(_Attachment):
    """Writes frames into a ring the daemon reads (`in`, or `cn<k>` for ControlNet k)."""

    def write(self, pixels: np.ndarray, frame_id: int = 0, flags: int = shm.FLAG_BOTTOM_LEFT) -> bool:
        """Publish `pixels` (height, width, channels); False while the ring does not exist. RingError
        for a frame the ring cannot hold, with what to do about it."""
        ring = self.attached()
        if ring is None:
            return False
        ring.write(pixels, frame_id=frame_id, flags=flags)
        return True

    def heartbeat(self) -> None:
        """Tell the daemon this writer is alive while it sends no frames (a still control image)."""
        ring = self.attached()
        if ring is not None:
            ring.heartbeat()


class OutputRing(_Attachment):
    """Reads each newest output frame of the daemon once, into buffers allocated when the ring is
    attached: at full frame rate nothing but the frame's small record is allocated per frame.

    With `for_td`, frames come as TouchDesigner's `copyNumpyArray` takes them: RGB(A), the bottom row
    first, uint8, uint16 or float32. A top-left, BGR or float16 frame is converted into a second buffer;
    a daemon started with `--output-origin bottom-left` (and RGB uint8 or float32 outputs, the default)
    needs no conversion.
    A ring whose writer stopped (no frame or heartbeat for `stale_s`) is let go and attached again,
    so that a restarted daemon, which may have made a new segment under the same name, is followed."""

    def __init__(self, name: str, for_td: bool = True, retry_s: float = RETRY_S, stale_s: float = STALE_S):
        super().__init__(name, retry_s)
        self.for_td = for_td
        self.stale_s = stale_s
        self._reader: shm.NewestFrames | None = None
        self._buffer: np.ndarray | None = None
        self._converted: np.ndarray | None = None

    @property
    def alive(self) -> bool:
        """A daemon writes this ring (a frame or a heartbeat within `stale_s`)."""
        ring = self.ring
        return ring is not None and ring.writer_pid != 0 and not self._stale(ring)

    def follow(self) -> int:
        """Attach the ring, or let go of one whose writer stopped; the pid of the live daemon writing it,
        0 while there is none."""
        ring = self.ring
        if ring is not None and self._stale(ring) and time.monotonic() >= self._next_try:
            self.detach()  # the daemon stopped, or a new one made a new segment under the same name
            self._next_try = time.monotonic() + self.retry_s
        ring = self.attached()
        if ring is None:
            return 0
        if self._reader is None:  # attached just now
            self._reader = shm.NewestFrames(ring)
            if self._buffer is None or self._buffer.nbytes < ring.slot_capacity:
                self._buffer = np.empty(ring.slot_capacity, np.uint8)
                self._converted = np.empty(ring.slot_capacity * 2, np.uint8)  # float16 becomes float32
        return 0 if self._stale(ring) else ring.writer_pid

    def read(self) -> shm.Frame | None:
        """The newest frame not read yet, or None. Its pixels are a view on this reader's buffer, valid
        until the next read. RingError for a frame that breaks the protocol (raised once)."""
        self.follow()
        if self._reader is None:
            return None
        frame = self._reader.take(into=self._buffer)
        if frame is None or not self.for_td or (frame.flags == shm.FLAG_BOTTOM_LEFT and frame.pixels.dtype != np.float16):
            return frame
        pixels = frame.pixels
        dtype = np.dtype(np.float32) if pixels.dtype == np.float16 else pixels.dtype
        converted = self._converted.reshape(-1)[:pixels.size * dtype.itemsize].view(dtype).reshape(pixels.shape)
        source = pixels if frame.bottom_left else pixels[::-1]
        if frame.bgr and frame.channels >= 3:  # B, G, R(, A) -> R, G, B(, A)
            np.copyto(converted[:, :, :3], source[:, :, 2::-1])
            np.copyto(converted[:, :, 3:], source[:, :, 3:])
        else:
            np.copyto(converted, source)
        return replace(frame, pixels=converted, flags=shm.FLAG_BOTTOM_LEFT, dtype=shm.CODE_OF_DTYPE[dtype])

    def detach(self) -> None:
        super().detach()
        self._reader = None

    def _stale(self, ring: shm.Ring) -> bool:
        return time.monotonic_ns() - ring.heartbeat_ns > self.stale_s * 1e9


class DaemonLink:
    """Everything a TouchDesigner component needs of one daemon instance: its input ring, a ring per
    ControlNet, its output ring, the OSC sender and the telemetry receiver.

    Call `tick()` once a frame, first: it follows the daemon and says when a new one appeared (the
    first, or one restarted under the same instance), which then needs every parameter sent again."""

    def __init__(self, endpoints: Endpoints, controlnets: int = 0, for_td: bool = True):
        self.endpoints = endpoints
        self.input = InputRing(endpoints.ring("in"))
        self.controls = [InputRing(endpoints.ring(f"cn{k}")) for k in range(controlnets)]
        self.output = OutputRing(endpoints.ring("out"), for_td=for_td)
        self.sender = OscSender(endpoints.host, endpoints.osc_port)
        self.telemetry = TelemetryReceiver("127.0.0.1", endpoints.telemetry_port)  # rings are local anyway
        self.daemon_pid = 0  # the daemon last seen writing the output ring

    @property
    def connected(self) -> bool:
        return self.output.alive

    @property
    def problem(self) -> str:
        """What keeps this link from working, for the component's status: a ring's segment that is not
        a ring, or a telemetry port held by another program; "" when nothing does."""
        for part in (self.output, self.input, *self.controls, self.telemetry):
            if part.problem:
                return part.problem
        return ""

    def tick(self) -> bool:
        """Follow the daemon; True when a new one has appeared since the last tick."""
        pid = self.output.follow()
        if not pid:
            # let go of the rings a stopped daemon made: on Windows a segment lives while any process
            # holds it, and a new daemon with another layout could not make its own
            self._release_inputs()
            return False
        if pid == self.daemon_pid:
            return False
        self._release_inputs()  # a restarted daemon may have made new segments: attach them afresh
        self.daemon_pid = pid
        self.telemetry.telemetry.values.clear()  # the last daemon's fps and status are not this one's
        return True

    def close(self) -> None:
        self._release_inputs()
        self.output.detach()
        self.sender.close()
        self.telemetry.close()

    def _release_inputs(self) -> None:
        for ring in (self.input, *self.controls):
            if ring.ring is not None:
                ring.detach()


# ---------------------------------------------------------------------------- control
def osc_arguments(value: Any) -> list[Any]:
    """A parameter value as OSC arguments: a list parameter's entries flattened (/prompts s f s f),
    a switch as the int PROTOCOL.md gives /pause."""
    if isinstance(value, bool):
        return [int(value)]
    if isinstance(value, (list, tuple)):
        return [item for entry in value for item in (entry if isinstance(entry, (list, tuple)) else (entry,))]
    return [value]


def change_packets(changes: Mapping[str, Any], max_bytes: int = MAX_DATAGRAM) -> list[bytes]:
    """The datagrams setting every parameter in `changes`: one bundle, which the daemon applies
    atomically (every change reaches the same frame, or none does), or, beyond `max_bytes` (a whole
    look with long prompts), as few bundles as fit. ValueError for a value OSC cannot carry."""
    packets: list[bytes] = []
    group: list[bytes] = []
    size = 16  # "#bundle", the time tag
    for name, value in changes.items():
        message = osc_codec.message("/" + name, *osc_arguments(value))
        if group and size + 4 + len(message) > max_bytes:
            packets.append(_packet(group))
            group, size = [], 16
        group.append(message)
        size += 4 + len(message)
    if group:
        packets.append(_packet(group))
    return packets


def _packet(messages: list[bytes]) -> bytes:
    return messages[0] if len(messages) == 1 else osc_codec.bundle(messages)


class OscSender:
    """Sends parameter changes and preset commands to the daemon's OSC port."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, changes: Mapping[str, Any]) -> None:
        """Set every parameter in `changes` at once; OSError if a datagram cannot be sent, ValueError
        for a value OSC cannot carry (then nothing is sent)."""
        for packet in change_packets(changes):
            self._sock.sendto(packet, self.target)

    def save_preset(self, name: str) -> None:
        self._sock.sendto(osc_codec.message("/preset/save", name), self.target)

    def recall_preset(self, name: str) -> None:
        self._sock.sendto(osc_codec.message("/preset/recall", name), self.target)

    def command(self, address: str, *args: Any) -> None:
        """A show command (the daemon's bridge/commands: /preset/morph, /record/start, /snapshot, ...)."""
        self._sock.sendto(osc_codec.message(address, *args), self.target)

    def close(self) -> None:
        self._sock.close()


# ---------------------------------------------------------------------------- telemetry
@dataclass
class Telemetry:
    """The daemon's latest /sdbridge/... values and its recent errors, as the receiver last saw them."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))  # (monotonic s, text)
    received_at: float = 0.0  # time.monotonic() of the last message; 0: none yet

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def fresh(self, now: float | None = None, stale_s: float = TELEMETRY_STALE_S) -> bool:
        return self.received_at > 0 and (time.monotonic() if now is None else now) - self.received_at < stale_s

    def update(self, address: str, args: Sequence[Any], now: float) -> None:
        name = address[len("/sdbridge/"):]
        if not address.startswith("/sdbridge/") or not name:
            return
        value = args[0] if len(args) == 1 else list(args)
        if name == "error":
            self.errors.append((now, str(value)))
        else:
            self.values[name] = value
        self.received_at = now


class TelemetryReceiver:
    """Listens for the daemon's telemetry on a UDP port and is polled once a frame; it never blocks. A
    port another program holds is reported in `problem` and tried again every `retry_s`."""

    def __init__(self, host: str, port: int, retry_s: float = RETRY_S):
        self.address = (host, port)
        self.retry_s = retry_s
        self.telemetry = Telemetry()
        self.problem = ""
        self._sock: socket.socket | None = None
        self._next_try = 0.0

    def poll(self, max_messages: int = 256) -> Telemetry:
        """Take every datagram waiting (up to `max_messages`) and return the updated telemetry."""
        sock = self._bound()
        now = time.monotonic()
        for _ in range(max_messages if sock else 0):
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # Windows reports an earlier send's ICMP error here; the socket still works
                continue
            try:
                messages = osc_codec.decode(data)
            except osc_codec.OscCodecError:
                continue  # not the daemon's
            for address, args in messages:
                self.telemetry.update(address, args, now)
        return self.telemetry

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _bound(self) -> socket.socket | None:
        if self._sock is None and time.monotonic() >= self._next_try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind(self.address)
            except OSError as e:
                sock.close()
                self._next_try = time.monotonic() + self.retry_s
                self.problem = (f"cannot listen for telemetry on udp {self.address[0]}:{self.address[1]} ({e}); "
                                "another program (an OSC In, a second component) may hold the port")
                return None
            sock.setblocking(False)
            self._sock, self.problem = sock, ""
        return self._sock


# ---------------------------------------------------------------------------- HTTP
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the daemon is here: no proxy


def fetch_json(url: str, timeout: float = 2.0) -> Any:
    """GET a JSON document from the daemon's HTTP server (/api/schema, /api/state); OSError or
    ValueError if it cannot be had."""
    with _DIRECT.open(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


class Fetches:
    """HTTP requests run on a thread of their own, so that the caller's frame never waits on them;
    `poll()` hands back the finished ones as (tag, document or None, error text)."""

    def __init__(self) -> None:
        self._done: collections.deque = collections.deque()

    def start(self, tag: str, url: str, timeout: float = 2.0, delay_s: float = 0.0) -> None:
        def run() -> None:
            time.sleep(delay_s)
            try:
                self._done.append((tag, fetch_json(url, timeout), ""))
            except (OSError, ValueError) as e:
                self._done.append((tag, None, f"{url}: {e}"))

        threading.Thread(target=run, name=f"sdbridge-fetch-{tag}", daemon=True).start()

    def poll(self) -> list[tuple[str, Any, str]]:
        done = []
        while self._done:
            done.append(self._done.popleft())
        return done


# ---------------------------------------------------------------------------- launching the daemon
def serve_command(executable: str, *, model: str, endpoints: Endpoints, config: str = "",
                  extra: Sequence[str] = ()) -> list[str]:
    """The argument list that starts `sdbridge serve` for these endpoints, outputs in TouchDesigner's
    row order. `executable` is the `sdbridge` program, or a Python that has sdbridge installed (then
    it runs `python -m bridge.cli`). Never a shell: nothing a parameter holds is interpreted."""
    program = [executable]
    if os.path.basename(executable).lower().startswith("python"):
        program += ["-m", "bridge.cli"]
    command = [*program, "serve", "--instance", endpoints.instance, "--host", endpoints.host,
               "--osc-port", str(endpoints.osc_port), "--telemetry-port", str(endpoints.telemetry_port),
               "--http-port", str(endpoints.http_port), "--output-origin", "bottom-left"]
    if model:
        command += ["--model", model]
    if config:
        command += ["--config", config]
    return command + list(extra)


class Launcher:
    """Runs one daemon process and keeps the last lines of its log. Nothing here blocks the caller:
    `stop` asks the daemon to end and `reap`, called once a frame, kills it if it has not ended in
    time."""

    def __init__(self, max_lines: int = LOG_LINES):
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)
        self.written = 0  # lines ever added: a caller showing the log redraws when this grows
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self._reader: threading.Thread | None = None
        self._kill_at = 0.0  # time.monotonic() after which a daemon asked to stop is killed

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start `command` (a list, run without a shell); OSError if it cannot be started, RuntimeError
        while one started here still runs."""
        if self.running:
            raise RuntimeError(f"the daemon started here still runs (pid {self.process.pid}); stop it first")
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # Windows: no console window pops up
        self.command = list(command)
        self._add("$ " + " ".join(self.command))
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", **(env or {})},
            creationflags=flags,
            text=True, encoding="utf-8", errors="replace", bufsize=1)
        self._reader = threading.Thread(target=self._read, args=(self.process,), name="sdbridge-log", daemon=True)
        self._reader.start()
        self._kill_at = 0.0

    def stop(self, wait: bool = False, timeout: float = 10.0) -> int | None:
        """Ask the daemon to stop (SIGTERM: it removes its segments and ends; on Windows
        TerminateProcess, after which the system frees the segments), and kill it if it has not ended
        `timeout` seconds later: at once with `wait`, else through `reap`. Its exit code, if it ended."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None and not self._kill_at:
            process.terminate()
            self._kill_at = time.monotonic() + timeout
        if wait:
            try:
                process.wait(max(0.0, self._kill_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if self._reader is not None:
                self._reader.join(2.0)
        return process.poll()

    def reap(self) -> None:
        """Once a frame: kill a daemon that was asked to stop and has not ended in time."""
        process = self.process
        if self._kill_at and process is not None and process.poll() is None and time.monotonic() > self._kill_at:
            process.kill()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self._add(line.rstrip("\n"))
        self._add(f"[exited with code {process.wait()}]")

    def _add(self, line: str) -> None:
        self.lines.append(line)
        self.written += 1
