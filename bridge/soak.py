"""`sdbridge soak`: a show's worth of load in minutes (or hours, by hand), and whether the daemon held.

Process layout. This process starts a real `sdbridge serve` as a child process (a private instance
name and ports, like the bench's), so that the memory it samples is the daemon's alone and a crash is
seen as one, and then, all at once, until the time is up:
- a frame writer that writes a new input frame every 1/`input_fps` s and reads the newest output;
- OSC clients (UDP, one socket each) and WebSocket clients (`set` messages with ids, reading the
  acks), each flooding the parameters it owns at `rate` messages a second;
- an observer: a WebSocket client subscribed to `state`, and the telemetry on its UDP port;
- every `sample_s`: the daemon's RSS, the output fps, frame and ack latencies, printed as one line.

"Every accepted message is applied in order" is checked without trusting the daemon's own account:
each client owns its parameters (OSC_CHANNELS, WS_CHANNELS) and plays a numbered sequence of values
n = 1, 2, 3, ... that can be read back from a state (`Channel.positions`). Then:
- every state the observer sees must show each client's n no lower than the last one it saw (a
  later value overtaken by an earlier one is an order violation), and a client's two parameters
  (an OSC bundle, a two-parameter WS `set`) must show the same n (a torn bundle);
- each WS client's acks must come back in send order with strictly increasing state versions;
- each accepted change set raises the state version by exactly one (bridge/state.py), so the growth
  of the version over the run must equal the change sets accepted: every WS ack plus every OSC
  message sent (OSC has no acks: one lost or refused shows as a shortfall);
- the final state must hold each client's last value, and the output frames' state_version must
  never go back and must reach the final version once the flood stops (the state reached the screen).

This module knows the daemon only through the protocol (rings, OSC, WebSocket, telemetry) and its
process; it uses nothing of torch or the engines.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import bench, bench_client, osc, osc_codec, params, shm
from .config import Settings
from .web import free_tcp_port

log = logging.getLogger(__name__)

# --- the flood
DEFAULT_RATE = 200.0  # messages a second per client: a busy TouchOSC page is ~50, well under max_message_rate
DEFAULT_INPUT_FPS = 60.0  # TouchDesigner's default cook rate
DEFAULT_SAMPLE_S = 5.0
# The first part of a run is warm-up, left out of the fps windows and the memory baseline: allocator
# arenas, torch's caches and the prompt cache (prompt_cache_size entries) fill there, then stay flat.
WARMUP_SHARE, WARMUP_MIN_S, WARMUP_MAX_S = 0.2, 10.0, 60.0
FLOAT_STEPS = 2**20  # float values are low + span * k / 2**20: exact in float32 (OSC's f) and in JSON
SEED_BASE = 1000  # seeds played start here, far from -1 (a new random seed every frame)

# --- the verdict
# An fps window (between two samples, after warm-up) below this fraction of the median window is a
# collapse. Half: what a performer sees as a stutter, and well below the 10-20% by which other work on
# a shared machine moves a healthy daemon's windows.
FPS_COLLAPSE_FRACTION = 0.5
# Memory grows "too much" when, after warm-up, BOTH the least-squares slope of RSS is above
# MEMORY_SLOPE_LIMIT and RSS grew by more than MEMORY_GROWTH_FLOOR. The slope alone cannot judge a
# short run (2 MB of allocator noise over a minute extrapolates to 120 MB/h); the floor alone cannot
# judge a long one. 64 MB/h is ~0.5 GB over an eight-hour show, which a show machine survives but a
# leak would pass quickly: a leak of 1 KB per message at this flood's 800 messages/s is ~2.9 GB/h,
# 100 bytes per frame at 30 fps ~11 MB/h (below the limit, and below what a 20-minute run resolves).
MEMORY_SLOPE_LIMIT_MB_PER_H = 64.0
MEMORY_GROWTH_FLOOR_MB = 32.0

# --- timing of the run's edges
READY_POLL_S = 0.1
DRAIN_TIMEOUT_S = 15.0  # after the flood: every WS ack must be in by then
SETTLE_S = 1.0  # after the flood: OSC datagrams in flight are applied by then
SCREEN_TIMEOUT_S = 30.0  # after the flood: the final state is in an output frame by then (a prompt to encode)
STOP_TIMEOUT_S = 20.0
LISTED = 20  # violations and errors listed in the report; all are counted
MIB = 1024 * 1024

_STOP_LINE = re.compile(r"served (\d+) frames, skipped (\d+) similar inputs, refused (\d+) messages or frames")


class SoakError(RuntimeError):
    """The soak could not run (the daemon did not start, a client could not connect)."""


@dataclass(frozen=True)
class SoakOptions:
    """What `sdbridge soak` adds to the daemon's own settings."""

    minutes: float = 5.0
    osc_clients: int = 2
    ws_clients: int = 2
    rate: float = DEFAULT_RATE  # messages a second, per client
    input_fps: float = DEFAULT_INPUT_FPS
    sample_s: float = DEFAULT_SAMPLE_S
    warmup_s: float | None = None  # None: WARMUP_SHARE of the run, clamped to WARMUP_MIN_S..WARMUP_MAX_S
    command: str = ""  # the command line, for the report
    load_timeout_s: float = bench.LOAD_TIMEOUT_S
    log_path: str | None = None  # the daemon's log; None: sdbridge-soak-<instance>.log in the temp folder

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(WARMUP_MAX_S, max(WARMUP_MIN_S, WARMUP_SHARE * self.seconds))


# ============================================================================ pure: what each client plays

@dataclass(frozen=True)
class Field:
    """One parameter a client owns, and how its n-th value is written and read back. `cycle`: values
    repeat every `cycle` steps (None: never within a run)."""

    name: str
    kind: str  # "int", "float" or "text"
    base: float = 0.0  # int: the value of n = 0; float: the low end of its range
    span: float = 1.0  # float: the width of its range
    prefix: str = ""  # text: the value is prefix + str(n)

    @property
    def cycle(self) -> int | None:
        return FLOAT_STEPS if self.kind == "float" else None

    def encode(self, n: int) -> Any:
        if self.kind == "int":
            return int(self.base) + n
        if self.kind == "float":
            return self.base + self.span * (n % FLOAT_STEPS) / FLOAT_STEPS
        return f"{self.prefix}{n}"

    def decode(self, value: Any) -> int | None:
        """n (modulo `cycle`) of a value this field wrote; None for any other value."""
        if self.kind == "int":
            return value - int(self.base) if isinstance(value, int) and value >= self.base else None
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            k = (value - self.base) / self.span * FLOAT_STEPS
            nearest = round(k)
            return nearest if abs(k - nearest) < 1e-6 and 0 <= nearest < FLOAT_STEPS else None
        if isinstance(value, str) and value.startswith(self.prefix) and value[len(self.prefix):].isdigit():
            return int(value[len(self.prefix):])
        return None


@dataclass(frozen=True)
class Channel:
    """One client's parameters: all set together in each message (a bundle over OSC, one `set` over
    the WebSocket), all to the same n."""

    client: str  # "osc0", "ws1", ...
    kind: str  # "osc" or "ws"
    fields: tuple[Field, ...]

    @property
    def cycle(self) -> int | None:
        return self.fields[0].cycle

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def values(self, n: int) -> dict[str, Any]:
        """The change set of this client's n-th message."""
        return {f.name: f.encode(n) for f in self.fields}

    def osc_packet(self, n: int) -> bytes:
        """The n-th message as one datagram: a message, or a bundle for several parameters."""
        messages = [osc_codec.message(f"/{f.name}", f.encode(n)) for f in self.fields]
        return messages[0] if len(messages) == 1 else osc_codec.bundle(messages)

    def positions(self, state: Mapping[str, Any]) -> list[int | None]:
        """n (modulo the cycle) as each of this client's parameters shows it in `state`."""
        return [f.decode(state.get(f.name)) for f in self.fields]


# Each parameter has one owner, so that its values form one client's sequence. Chosen among the live
# parameters that cost the same per frame whatever their value: guidance stays at or below 1 (no
# guidance pass), strength within 0.25..0.75 (one denoising step either way). A parameter that clears
# another (prompt clears prompts, seed clears seeds) has no owner of the one it clears.
OSC_CHANNELS: tuple[Channel, ...] = (
    Channel("osc0", "osc", (Field("seed", "int", base=SEED_BASE),)),
    Channel("osc1", "osc", (Field("strength", "float", 0.25, 0.5), Field("delta", "float", 1.0, 1.0))),  # bundles
    Channel("osc2", "osc", (Field("subseed", "int"),)),
)
WS_CHANNELS: tuple[Channel, ...] = (
    Channel("ws0", "ws", (Field("guidance_scale", "float", 0.0, 1.0),)),
    Channel("ws1", "ws", (Field("prompt", "text", prefix="soak ws1 "),
                          Field("negative_prompt", "text", prefix="soak ws1 neg "))),  # a two-parameter set
    Channel("ws2", "ws", (Field("subseed_strength", "float", 0.0, 1.0),)),
)


def channels(osc_clients: int, ws_clients: int) -> tuple[Channel, ...]:
    """The channels of `osc_clients` OSC and `ws_clients` WebSocket clients; ValueError beyond the
    parameters there are to own."""
    if not 0 <= osc_clients <= len(OSC_CHANNELS) or not 0 <= ws_clients <= len(WS_CHANNELS):
        raise ValueError(f"at most {len(OSC_CHANNELS)} OSC and {len(WS_CHANNELS)} WebSocket clients: each owns "
                         "parameters of its own, so that the order of its values can be checked")
    return OSC_CHANNELS[:osc_clients] + WS_CHANNELS[:ws_clients]


def preamble(chosen: Sequence[Channel]) -> dict[str, Any]:
    """One change set that puts every channel at n = 0 before the flood: from then on every value the
    observer sees is one a client sent (a default such as strength 0.5 would read as some n)."""
    out: dict[str, Any] = {}
    for channel in chosen:
        out.update(channel.values(0))
    params.validate(out)  # a bad table is refused here, not by the daemon
    return out


# ============================================================================ pure: the checks

class OrderChecker:
    """Reads the states an observer sees (a subsequence of all of them: the daemon pushes the newest)
    and records every sign that a message was applied out of order or torn: for each channel, n may
    only stay or grow from one seen state to the next, and its parameters must agree on n.

    `sent(client)`: how many messages that client has sent so far; a state showing a higher n shows a
    value nobody sent. Floats repeat every FLOAT_STEPS values: n is followed across the wrap (a step
    of more than half a cycle back is read as backwards, which no run of hours makes by going forward)."""

    def __init__(self, chosen: Sequence[Channel], sent: Callable[[str], int] | None = None):
        self.channels = tuple(chosen)
        self.sent = sent
        self.baseline: int | None = None  # states older than this version are not looked at
        self.violations: list[str] = []
        self.count = 0
        self.states = 0  # states checked
        self.version = 0
        self._last: dict[str, tuple[int, int]] = {}  # client -> (n modulo the cycle, n followed across wraps)
        self._lock = threading.Lock()  # the observer, the ack readers and the frame reader all report here

    def violation(self, text: str) -> None:
        """Count one violation; the first LISTED are kept for the report."""
        with self._lock:
            self.count += 1
            if len(self.violations) < LISTED:
                self.violations.append(text)

    def observe(self, version: int, state: Mapping[str, Any]) -> None:
        """Check one state the observer was sent."""
        if self.baseline is None or version < self.baseline:
            return
        if version < self.version:  # the same version twice is fine: subscribing answers with the state too
            self.violation(f"state version {version} pushed after version {self.version}")
        self.version = max(self.version, version)
        self.states += 1
        for channel in self.channels:
            positions = channel.positions(state)
            if any(p is None for p in positions):
                bad = [f"{name}={state.get(name)!r}" for name, p in zip(channel.names, positions) if p is None]
                self.violation(f"version {version}: {channel.client} holds a value it never sent ({', '.join(bad)})")
                continue
            if len(set(positions)) > 1:
                shown = ", ".join(f"{name} n={p}" for name, p in zip(channel.names, positions))
                self.violation(f"version {version}: {channel.client}'s parameters torn apart ({shown})")
                continue
            self._advance(channel, positions[0], version)

    def _advance(self, channel: Channel, position: int, version: int) -> None:
        last = self._last.get(channel.client)
        if last is None:
            n = position
        else:
            step = position - last[0]
            if channel.cycle is not None:
                step %= channel.cycle
                if step > channel.cycle // 2:
                    step -= channel.cycle
            if step < 0:
                self.violation(f"version {version}: {channel.client} went back from n={last[1]} to "
                               f"n={last[1] + step}")
                return  # keep the furthest n seen: what follows must not go below it either
            n = last[1] + step
        if self.sent is not None and n > self.sent(channel.client):
            self.violation(f"version {version}: {channel.client} shows n={n}, but only {self.sent(channel.client)} "
                           "were sent")
        self._last[channel.client] = (position, n)

    def finish(self, state: Mapping[str, Any], last_sent: Mapping[str, int]) -> None:
        """The final state must hold each client's last value (n = its messages sent)."""
        for channel in self.channels:
            last = last_sent[channel.client]
            wanted = channel.values(last)
            if any(state.get(name) != value for name, value in wanted.items()):
                held = {name: state.get(name) for name in channel.names}
                self.violation(f"final state: {channel.client} holds {held}, its last message (n={last}) set "
                               f"{wanted}")


class Reservoir:
    """A uniform random sample of at most `size` of all the values added (Vitter's algorithm R): the
    percentiles of hours of latencies in bounded memory."""

    def __init__(self, size: int = 100_000, seed: int = 0):
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self._random = random.Random(seed)

    def add(self, values: Sequence[float]) -> None:
        for value in values:
            self.seen += 1
            if len(self.values) < self.size:
                self.values.append(value)
            else:
                j = self._random.randrange(self.seen)
                if j < self.size:
                    self.values[j] = value


def slope_per_hour(times_s: Sequence[float], values: Sequence[float]) -> float | None:
    """The least-squares slope of `values` over `times_s`, per hour; None with fewer than two distinct
    times."""
    t = np.asarray(times_s, np.float64)
    v = np.asarray(values, np.float64)
    if len(t) < 2 or np.ptp(t) == 0:
        return None
    t = t - t.mean()
    return float((t * (v - v.mean())).sum() / (t * t).sum() * 3600.0)


@dataclass(frozen=True)
class Sample:
    """What was seen at one sampling time, and over the window since the previous one."""

    t_s: float  # since the flood started
    rss_mb: float | None
    frames: int  # the output ring's write_seq
    fps: float | None  # output frames written over the window, per second
    telemetry_fps: float | None  # the daemon's own one-second figure, newest
    frame_age_p50_ms: float | None  # written_ns - source_ns of the outputs read in the window
    frame_age_p99_ms: float | None
    ack_p50_ms: float | None  # a WS set to its ack, over the window
    ack_p99_ms: float | None
    sent: int  # messages sent so far, every client
    acked: int
    state_version: int  # the newest state the observer saw
    output_version: int  # the state_version of the newest output read
    stale_output_s: float  # the longest time in the window that outputs kept an old state while a newer one existed
    daemon_cpu_percent: float | None  # of one core, over the window
    load_average: float | None
    violations: int

    def line(self) -> str:
        """The live line printed while the soak runs."""
        return (f"[{self.t_s:7.1f} s] fps {_num(self.fps, 1)} (telemetry {_num(self.telemetry_fps, 1)}) | "
                f"frame age p50 {_num(self.frame_age_p50_ms, 0)} p99 {_num(self.frame_age_p99_ms, 0)} ms | "
                f"ack p50 {_num(self.ack_p50_ms, 1)} p99 {_num(self.ack_p99_ms, 1)} ms | "
                f"RSS {_num(self.rss_mb, 1)} MB | sent {self.sent} acked {self.acked} | state v{self.state_version} "
                f"output v{self.output_version} (stale up to {self.stale_output_s:.2f} s) | "
                f"daemon CPU {_num(self.daemon_cpu_percent, 0)}% | load {_num(self.load_average, 2)} | "
                f"violations {self.violations}")


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


@dataclass(frozen=True)
class Judgement:
    """The fps and memory figures after warm-up, and what in them fails the soak."""

    windows: int
    fps_mean: float | None
    fps_median: float | None
    fps_min: float | None
    fps_min_at_s: float | None
    rss_start_mb: float | None  # the first sample after warm-up
    rss_end_mb: float | None
    rss_max_mb: float | None
    rss_growth_mb: float | None
    rss_slope_mb_per_h: float | None
    failures: tuple[str, ...]


def judge(samples: Sequence[Sample], warmup_s: float) -> Judgement:
    """Judge fps and memory over the samples taken after `warmup_s`: a window below
    FPS_COLLAPSE_FRACTION of the median window fails, and so does memory growth over both bounds
    (MEMORY_SLOPE_LIMIT_MB_PER_H and MEMORY_GROWTH_FLOOR_MB)."""
    after = [s for s in samples if s.t_s >= warmup_s]
    failures: list[str] = []
    fps = [s for s in after[1:] if s.fps is not None]  # the first window straddles the warm-up's end
    fps_values = [s.fps for s in fps]
    median = float(np.median(fps_values)) if fps_values else None
    low = min(fps, key=lambda s: s.fps, default=None)
    if median is not None and median <= 0:
        failures.append("no output frames after warm-up: the stream stopped (or the daemon is paused)")
    elif median is not None and low is not None and low.fps < FPS_COLLAPSE_FRACTION * median:
        failures.append(f"fps collapsed: {low.fps:.1f} fps in the window ending at {low.t_s:.0f} s, below "
                        f"{FPS_COLLAPSE_FRACTION:g} x the median window ({median:.1f} fps)")
    if not fps_values:
        failures.append(f"no fps window after the {warmup_s:.0f} s warm-up: run longer than warm-up + two samples")
    memory = [s for s in after if s.rss_mb is not None]
    rss = [s.rss_mb for s in memory]
    growth = rss[-1] - rss[0] if rss else None
    slope = slope_per_hour([s.t_s for s in memory], rss)
    if growth is not None and slope is not None and growth > MEMORY_GROWTH_FLOOR_MB and \
            slope > MEMORY_SLOPE_LIMIT_MB_PER_H:
        failures.append(f"memory grew: RSS +{growth:.1f} MB after warm-up, {slope:.0f} MB/h (limits: "
                        f"{MEMORY_GROWTH_FLOOR_MB:g} MB and {MEMORY_SLOPE_LIMIT_MB_PER_H:g} MB/h together)")
    return Judgement(len(fps_values), float(np.mean(fps_values)) if fps_values else None, median,
                     low.fps if low else None, low.t_s if low else None, rss[0] if rss else None,
                     rss[-1] if rss else None, max(rss) if rss else None, growth, slope, tuple(failures))


# ============================================================================ the daemon's process

def process_rss_bytes(pid: int) -> int | None:
    """A process's resident memory: VmRSS from /proc on Linux; elsewhere psutil's, if it is installed
    (it is no dependency: the soak's figures are for the Linux CI and show machines' by-hand runs)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # not installed, or the process is gone
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used (Linux /proc; None elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def udp_receive_errors() -> int | None:
    """Datagrams this machine's kernel dropped for a full receive buffer, all sockets together
    (Linux /proc/net/snmp RcvbufErrors; None elsewhere): how a lost OSC message is told from a refused one."""
    try:
        with open("/proc/net/snmp", encoding="ascii") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return None


class _Telemetry:
    """The daemon's OSC telemetry (/sdbridge/...), newest value by name, and every error message."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.values: dict[str, Any] = {}
        self.errors: list[str] = []
        self.error_count = 0
        self._running = True
        self._thread = threading.Thread(target=self._run, name="soak-telemetry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            try:
                data = self.sock.recv(65536)
                messages = osc_codec.decode(data)
            except (OSError, ValueError):
                continue
            for address, args in messages:
                name = address[len(osc.TELEMETRY_PREFIX):]
                if name == "error":
                    self.error_count += 1
                    if len(self.errors) < LISTED:
                        self.errors.append(str(args[0]) if args else "")
                elif args:
                    self.values[name] = args[0]

    def close(self) -> None:
        self._running = False
        self._thread.join(1)
        self.sock.close()


class _DaemonProcess:
    """`sdbridge serve` as a child process on private ports, logging to a file."""

    def __init__(self, serve_flags: Sequence[str], instance: str, telemetry_port: int, log_path: Path,
                 log_level: str = "info"):
        self.instance = instance
        self.osc_port, self.http_port, self.oscquery_port = osc.free_udp_port(), free_tcp_port(), free_tcp_port()
        self.name_in, self.name_out = shm.segment_names(instance)
        # The user's flags first, the soak's after them: argparse keeps the last, so these win.
        self.argv = [sys.executable, "-m", "bridge.cli", "serve", *serve_flags, "--instance", instance,
                     "--host", "127.0.0.1", "--osc-port", str(self.osc_port), "--telemetry-host", "127.0.0.1",
                     "--telemetry-port", str(telemetry_port), "--http-port", str(self.http_port),
                     "--oscquery-port", str(self.oscquery_port), "--no-mdns", "--log-level", log_level]
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=bench.child_env())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        if not self._log.closed:
            self._log.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM, as a show's operator stops it; SIGKILL if it does not stop in time. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("the daemon did not stop within %.0f s of SIGTERM; killing it", STOP_TIMEOUT_S)
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def stop_counts(self) -> dict[str, int] | None:
        """The frames served and the messages or frames refused, from the daemon's last log line."""
        found = _STOP_LINE.findall(self.log_tail(20000))
        if not found:
            return None
        served, skipped, refused = map(int, found[-1])
        return {"frames": served, "skipped": skipped, "refused": refused}


def _wait_ready(daemon: _DaemonProcess, telemetry: _Telemetry, timeout: float) -> float:
    """Wait for the daemon's model to load (telemetry status ready); the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not daemon.alive():
            raise SoakError(f"the daemon exited with {daemon.proc.returncode} before it served:\n{daemon.log_tail()}")
        if telemetry.values.get("status") in ("ready", "paused"):
            return time.monotonic() - started
        if telemetry.values.get("status") == "error":
            raise SoakError(f"the daemon's model failed to load:\n{daemon.log_tail()}")
        time.sleep(READY_POLL_S)
    raise SoakError(f"the daemon did not serve within {timeout:.0f} s:\n{daemon.log_tail()}")


# ============================================================================ the clients

class _Paced:
    """Calls at a steady rate: `wait()` sleeps until the next one is due. A client held up for more than
    a quarter of a second does not burst to catch up: it drops the lost time."""

    def __init__(self, rate: float):
        self.period = 1.0 / rate
        self.next = time.monotonic()

    def wait(self, stop: threading.Event) -> bool:
        """False once `stop` is set."""
        delay = self.next - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return False
        self.next += self.period
        if time.monotonic() - self.next > 0.25:
            self.next = time.monotonic()
        return not stop.is_set()


class _OscClient:
    """Plays one channel over OSC: its own UDP socket (a source of its own for the rate limit)."""

    def __init__(self, channel: Channel, port: int, rate: float, stop: threading.Event):
        self.channel, self.port, self.rate, self.stop = channel, port, rate, stop
        self.sent = 0
        self.send_errors = 0
        self.thread = threading.Thread(target=self._run, name=f"soak-{channel.client}", daemon=True)

    def _run(self) -> None:
        pace = _Paced(self.rate)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            while pace.wait(self.stop):
                n = self.sent + 1
                data = self.channel.osc_packet(n)
                self.sent = n  # before it leaves: the observer may see it applied before sendto returns
                try:
                    sock.sendto(data, ("127.0.0.1", self.port))
                except OSError:  # a full send buffer: it never left; the same n goes next time
                    self.sent = n - 1
                    self.send_errors += 1


class _WsClient:
    """Plays one channel over the WebSocket: `set` messages with ids 1, 2, 3, ... from one thread, the
    acks read on another. Acks must come in send order, with growing state versions."""

    def __init__(self, channel: Channel, url: str, rate: float, stop: threading.Event, checker: OrderChecker):
        from websockets.sync.client import connect

        self.channel, self.rate, self.stop, self.checker = channel, rate, stop, checker
        self.connection = connect(url, open_timeout=10, max_size=None)
        self.sent = 0
        self.acked = 0
        self.refused = 0
        self.errors: list[str] = []
        self.last_version = 0
        self.rtts_ms: list[float] = []  # since the sampler last took them
        self.all_rtts = Reservoir()
        self._send_ns: deque[int] = deque()
        self._lock = threading.Lock()
        self.sender = threading.Thread(target=self._send, name=f"soak-{channel.client}", daemon=True)
        self.receiver = threading.Thread(target=self._receive, name=f"soak-{channel.client}-acks", daemon=True)

    def start(self) -> None:
        self.receiver.start()
        self.sender.start()

    def _send(self) -> None:
        pace = _Paced(self.rate)
        try:
            while pace.wait(self.stop):
                n = self.sent + 1
                text = json.dumps({"type": "set", "id": n, "params": self.channel.values(n)})
                with self._lock:
                    self._send_ns.append(time.monotonic_ns())
                self.sent = n  # before it leaves: the observer may see it applied before send returns
                self.connection.send(text)
        except Exception as e:  # the connection went: the run's checks say what was lost
            self._error(f"send failed: {type(e).__name__}: {e}")

    def _receive(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for text in self.connection:
                self._reply(json.loads(text))
        except ConnectionClosed:
            pass
        except Exception as e:
            self._error(f"receive failed: {type(e).__name__}: {e}")

    def _reply(self, reply: dict[str, Any]) -> None:
        expected = self.acked + self.refused + 1
        if reply.get("type") not in ("ack", "error"):
            return
        if reply.get("id") != expected:
            self.checker.violation(f"{self.channel.client}: reply for id {reply.get('id')!r} where id {expected} "
                                   f"was next ({reply})"[:300])
            return
        with self._lock:
            sent_ns = self._send_ns.popleft() if self._send_ns else None
            if sent_ns is not None:
                self.rtts_ms.append((time.monotonic_ns() - sent_ns) / 1e6)
        if reply["type"] == "error":
            self.refused += 1
            self._error(f"id {expected} refused: {reply.get('error')}")
            return
        version = reply.get("state_version", 0)
        if version <= self.last_version:
            self.checker.violation(f"{self.channel.client}: id {expected} acked with state version {version}, "
                                   f"not above the previous ack's {self.last_version}")
        self.last_version = max(self.last_version, version)
        self.acked += 1

    def _error(self, text: str) -> None:
        if len(self.errors) < LISTED:
            self.errors.append(text)

    def take_rtts(self) -> list[float]:
        """The ack times (ms) since the last call; kept in `all_rtts` too."""
        with self._lock:
            taken, self.rtts_ms = self.rtts_ms, []
        self.all_rtts.add(taken)
        return taken

    def drained(self) -> bool:
        return self.acked + self.refused >= self.sent

    def close(self) -> None:
        self.connection.close()
        self.receiver.join(5)


class _Observer:
    """A WebSocket client subscribed to `state`: feeds every state it is sent to the checker, and
    answers `get` for the final state."""

    def __init__(self, url: str, checker: OrderChecker, first: Mapping[str, Any]):
        from websockets.sync.client import connect

        self.checker = checker
        self.connection = connect(url, open_timeout=10, max_size=None)
        self.version = 0
        self.closed_early: str | None = None
        self._final: dict[str, Any] | None = None
        self._final_ready = threading.Event()
        # Before the flood: every channel at n = 0, as one set; its version is the baseline of the counts.
        self.connection.send(json.dumps({"type": "set", "id": "soak-preamble", "params": dict(first)}))
        reply = json.loads(self.connection.recv(timeout=10))
        if reply.get("type") != "ack":
            raise SoakError(f"the daemon refused the soak's first values: {reply}")
        self.baseline = checker.baseline = self.version = reply["state_version"]
        self.connection.send(json.dumps({"type": "subscribe", "topics": ["state"]}))
        self.thread = threading.Thread(target=self._run, name="soak-observer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for text in self.connection:
                message = json.loads(text)
                if message.get("type") != "state":
                    continue
                if message.get("id") == "soak-final":
                    self._final = message
                    self._final_ready.set()
                    continue
                self.checker.observe(message["state_version"], message["params"])
                self.version = max(self.version, message["state_version"])
        except ConnectionClosed as e:
            self.closed_early = f"the observer's WebSocket closed: {e}"
        except Exception as e:
            self.closed_early = f"the observer failed: {type(e).__name__}: {e}"

    def final_state(self, timeout: float = 10.0) -> dict[str, Any]:
        self.connection.send(json.dumps({"type": "get", "id": "soak-final"}))
        if not self._final_ready.wait(timeout):
            raise SoakError(f"no answer to get within {timeout:.0f} s")
        return self._final

    def close(self) -> None:
        self.connection.close()
        self.thread.join(5)


class _Frames:
    """Plays TouchDesigner's part: a new input frame every 1/`fps` s, and the newest output read back
    (its age, and its state_version, which may never go back)."""

    def __init__(self, ring_in: shm.Ring, ring_out: shm.Ring, width: int, height: int, fps: float,
                 checker: OrderChecker, state_version: Callable[[], int]):
        self.ring_in, self.ring_out, self.fps = ring_in, ring_out, fps
        self.checker, self.state_version = checker, state_version
        self.frames = bench_client.pattern_frames(width, height)
        self.buffer = np.empty(ring_out.slot_capacity, np.uint8)
        self.written = 0
        self.outputs = 0
        self.output_version = 0
        self.ages_ms: list[float] = []  # since the sampler last took them
        self.all_ages = Reservoir()
        self.stale_s = 0.0  # the longest stale spell since the sampler last took it
        self.version_since = time.monotonic()  # when outputs began to show output_version
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-frames", daemon=True)

    def _run(self) -> None:
        pace = _Paced(self.fps)
        last_seq = self.ring_out.write_seq
        while pace.wait(self.stop):
            self.written += 1
            self.ring_in.write(self.frames[self.written % len(self.frames)], frame_id=self.written)
            if self.ring_out.write_seq == last_seq:
                continue
            try:
                out = self.ring_out.read_latest(after_seq=last_seq, into=self.buffer)
            except shm.RingError:
                continue
            if out is None:
                continue
            last_seq = out.seq
            self.outputs += 1
            now = time.monotonic()
            with self._lock:
                self.ages_ms.append((out.written_ns - out.source_ns) / 1e6)
                if out.state_version < self.output_version:
                    self.checker.violation(f"output frame {out.seq} made with state version {out.state_version} "
                                           f"after one made with {self.output_version}")
                elif out.state_version != self.output_version:
                    self.output_version, self.version_since = out.state_version, now
                elif self.state_version() > out.state_version:
                    self.stale_s = max(self.stale_s, now - self.version_since)

    def take(self) -> tuple[list[float], float]:
        """The output ages and the longest stale spell since the last call."""
        with self._lock:
            ages, self.ages_ms = self.ages_ms, []
            stale, self.stale_s = self.stale_s, 0.0
        self.all_ages.add(ages)
        return ages, stale


# ============================================================================ the result

@dataclass(frozen=True)
class ClientFigures:
    client: str
    kind: str
    params: tuple[str, ...]
    sent: int
    acked: int | None  # WS only: OSC has no acks
    refused: int | None
    ack_p50_ms: float | None = None
    ack_p99_ms: float | None = None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class SoakResult:
    """Everything one soak measured and checked."""

    date: str
    command: str
    machine: str
    python: str
    torch: str
    model: str
    width: int
    height: int
    rate: float
    input_fps: float
    duration_s: float  # of the flood
    warmup_s: float
    load_s: float
    daemon_log: str
    samples: tuple[Sample, ...]
    judgement: Judgement
    clients: tuple[ClientFigures, ...]
    baseline_version: int
    final_version: int
    version_growth: int  # final - baseline: change sets applied during the flood
    accepted_expected: int  # WS acks + OSC messages sent: what the growth must equal
    osc_lost: int  # OSC messages sent and not applied (lost on the way or refused)
    states_checked: int
    order_violations: int
    violations: tuple[str, ...]
    frames_written: int  # input frames
    outputs_read: int
    output_frames: int  # the output ring's frames over the whole flood
    frame_age_p50_ms: float | None  # written_ns - source_ns of the outputs read, the whole flood (sampled)
    frame_age_p99_ms: float | None
    stale_output_max_s: float  # the longest time outputs kept an old state while a newer one existed
    final_on_screen_s: float | None  # from the flood's end until an output carried the final state
    final_values: dict[str, dict[str, Any]]  # each client's parameters in the final state
    daemon_errors_reported: int  # /sdbridge/error messages seen (the daemon sends at most 20 a second)
    daemon_errors: tuple[str, ...]
    daemon_refused: int | None  # messages or frames the daemon refused in its life, from its last log line
    daemon_frames: int | None
    daemon_dropped: int | None  # telemetry `dropped`: over a client's rate, or refused by access rules
    udp_receive_errors: int | None  # the kernel's UDP receive-buffer drops during the flood, whole machine
    daemon_exit_code: int | None
    crash: str | None
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        out = {"schema": "sdbridge-soak/1", **asdict(self), "passed": self.passed,
               "limits": {"fps_collapse_fraction": FPS_COLLAPSE_FRACTION,
                          "memory_slope_limit_mb_per_h": MEMORY_SLOPE_LIMIT_MB_PER_H,
                          "memory_growth_floor_mb": MEMORY_GROWTH_FLOOR_MB}}
        return out

    def summary(self) -> str:
        """For people: what ran, the figures, and the verdict."""
        j = self.judgement
        osc_sent = sum(c.sent for c in self.clients if c.kind == "osc")
        ws = [c for c in self.clients if c.kind == "ws"]
        lines = [
            f"## sdbridge soak: {self.model} {self.width}x{self.height}, {len(self.clients)} clients at "
            f"{self.rate:g} messages/s each, input {self.input_fps:g} fps",
            "",
            "| measure | value |", "|---|---|",
            f"| flood | {self.duration_s:.0f} s (warm-up {self.warmup_s:.0f} s left out of fps and memory); model "
            f"loaded in {self.load_s:.1f} s |",
            f"| output frames | {self.output_frames} ({self.outputs_read} read by the client; {self.frames_written} "
            "inputs written) |",
            f"| output fps per window after warm-up | mean {_num(j.fps_mean, 1)}, median "
            f"{_num(j.fps_median, 1)}, min {_num(j.fps_min, 1)}"
            f"{f' (window ending at {j.fps_min_at_s:.0f} s)' if j.fps_min_at_s is not None else ''}, {j.windows} "
            "windows |",
            f"| daemon RSS after warm-up | start {_num(j.rss_start_mb, 1)} MB, end {_num(j.rss_end_mb, 1)} MB, max "
            f"{_num(j.rss_max_mb, 1)} MB; growth {_num(j.rss_growth_mb, 1)} MB, slope "
            f"{_num(j.rss_slope_mb_per_h, 1)} MB/h |",
            f"| OSC messages | {osc_sent} sent, {osc_sent - self.osc_lost} applied, {self.osc_lost} lost or refused |",
            f"| WebSocket sets | {sum(c.sent for c in ws)} sent, {sum(c.acked or 0 for c in ws)} acked, "
            f"{sum(c.refused or 0 for c in ws)} refused |",
        ]
        for c in self.clients:
            extra = (f", {c.acked} acked, {c.refused} refused, ack p50 {_num(c.ack_p50_ms, 1)} ms p99 "
                     f"{_num(c.ack_p99_ms, 1)} ms" if c.kind == "ws" else "")
            lines.append(f"| {c.client} ({', '.join(c.params)}) | {c.sent} sent{extra} |")
        lines += [
            f"| output frame age (source_ns to written_ns) | p50 {_num(self.frame_age_p50_ms, 1)} ms, p99 "
            f"{_num(self.frame_age_p99_ms, 1)} ms |",
            f"| outputs behind the state | at most {self.stale_output_max_s:.2f} s showing an older state while a "
            "newer one existed |",
            f"| state versions | {self.baseline_version} -> {self.final_version}: +{self.version_growth}, "
            f"accepted {self.accepted_expected} |",
            f"| order | {self.states_checked} states checked, {self.order_violations} violations |",
            f"| final state on screen | {_num(self.final_on_screen_s, 2)} s after the flood |",
            f"| daemon errors | {self.daemon_errors_reported} reported on telemetry; refused over its life: "
            f"{self.daemon_refused if self.daemon_refused is not None else 'n/a'}; dropped "
            f"{self.daemon_dropped if self.daemon_dropped is not None else 'n/a'}; kernel UDP receive-buffer drops "
            f"{self.udp_receive_errors if self.udp_receive_errors is not None else 'n/a'} |",
            f"| machine | {self.machine}; Python {self.python}; torch {self.torch} |",
            f"| date | {self.date} |",
            f"| command | `{self.command}` |",
            f"| daemon log | {self.daemon_log} |",
            "",
            "PASSED" if self.passed else "FAILED:\n" + "\n".join(f"- {f}" for f in self.failures),
        ]
        return "\n".join(lines)


# ============================================================================ the run

def _sample(daemon: _DaemonProcess, telemetry: _Telemetry, observer: _Observer, frames: _Frames, ring_out: shm.Ring,
            osc_clients: Sequence[_OscClient], ws_clients: Sequence[_WsClient], checker: OrderChecker,
            started: float, options: SoakOptions,
            on_sample: Callable[[Sample], None] | None) -> tuple[list[Sample], str | None]:
    """Sample every `options.sample_s` until the run's time is up; stop early if the daemon dies or
    the observer loses it. The samples, and what ended the run early (None: nothing)."""
    samples: list[Sample] = []
    count = max(1, round(options.seconds / options.sample_s))
    last_t, last_seq, last_cpu = started, ring_out.write_seq, process_cpu_seconds(daemon.pid)
    for i in range(1, count + 1):
        due = started + i * options.sample_s
        while (now := time.monotonic()) < due:
            if not daemon.alive():
                return samples, (f"the daemon crashed: it exited with {daemon.proc.returncode} {now - started:.0f} s "
                                 f"into the flood; the end of its log:\n{daemon.log_tail()}")
            if observer.closed_early:
                return samples, f"{observer.closed_early} {now - started:.0f} s into the flood"
            time.sleep(min(0.2, due - now))
        seq, cpu = ring_out.write_seq, process_cpu_seconds(daemon.pid)
        ages, stale = frames.take()
        rtts = [rtt for client in ws_clients for rtt in client.take_rtts()]
        age, ack = bench.percentiles(ages), bench.percentiles(rtts)
        rss = process_rss_bytes(daemon.pid)
        telemetry_fps = telemetry.values.get("fps")
        sample = Sample(
            t_s=now - started, rss_mb=rss / MIB if rss is not None else None, frames=seq,
            fps=(seq - last_seq) / (now - last_t),
            telemetry_fps=float(telemetry_fps) if telemetry_fps is not None else None,
            frame_age_p50_ms=age.p50_ms, frame_age_p99_ms=age.p99_ms, ack_p50_ms=ack.p50_ms, ack_p99_ms=ack.p99_ms,
            sent=sum(c.sent for c in (*osc_clients, *ws_clients)), acked=sum(c.acked for c in ws_clients),
            state_version=observer.version, output_version=frames.output_version, stale_output_s=stale,
            daemon_cpu_percent=(100.0 * (cpu - last_cpu) / (now - last_t)
                                if cpu is not None and last_cpu is not None else None),
            load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None, violations=checker.count)
        samples.append(sample)
        if on_sample is not None:
            on_sample(sample)
        last_t, last_seq, last_cpu = now, seq, cpu
    return samples, None


def _drain(daemon: _DaemonProcess, observer: _Observer, frames: _Frames, ws_clients: Sequence[_WsClient],
           flood_end: float) -> tuple[dict[str, Any] | None, float | None, str | None]:
    """After the flood: wait for the acks and the OSC in flight, read the final state, and wait for an
    output frame made with it (the frame writer keeps writing). The final state, the seconds from the
    flood's end until it was on screen (None: never), and what went wrong (None: nothing)."""
    for client in ws_clients:
        client.sender.join(5)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not all(c.drained() for c in ws_clients) and time.monotonic() < deadline and daemon.alive():
        time.sleep(0.05)
    time.sleep(SETTLE_S)
    if not daemon.alive():
        return None, None, (f"the daemon crashed: it exited with {daemon.proc.returncode} after the flood; the end "
                            f"of its log:\n{daemon.log_tail()}")
    final = observer.final_state()
    deadline = time.monotonic() + SCREEN_TIMEOUT_S
    while frames.output_version < final["state_version"] and time.monotonic() < deadline:
        time.sleep(0.01)
    if frames.output_version < final["state_version"]:
        return final, None, None
    return final, max(0.0, frames.version_since - flood_end), None


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def run(settings: Settings, initial: Mapping[str, Any] | None, serve_flags: Sequence[str],
        options: SoakOptions = SoakOptions(), on_sample: Callable[[Sample], None] | None = None) -> SoakResult:
    """Start a daemon with `serve_flags` (plus a private instance and ports), flood it as the module
    docstring says for `options.minutes`, and return the figures and the verdict. `settings` and
    `initial` are those flags read: the frame size and the rate limit come from them.

    Raises SoakError when the daemon does not start or a client cannot connect, ValueError for
    options that cannot make a fair soak."""
    values = {**params.defaults(), **params.validate(initial or {})}
    width, height = values["width"], values["height"]
    chosen = channels(options.osc_clients, options.ws_clients)
    limit = getattr(settings, "max_message_rate", 0.0)
    if limit and options.rate >= 0.5 * limit:
        raise ValueError(f"--rate {options.rate:g} is not well under max_message_rate ({limit:g} a second per "
                         "client): the daemon may drop messages by design and the counts would not add up. Choose "
                         "a lower rate or raise --max-message-rate")
    first = preamble(chosen)
    instance = f"soak{os.getpid() % 100000}"
    log_path = Path(options.log_path or Path(tempfile.gettempdir()) / f"sdbridge-soak-{instance}.log")
    date = datetime.now().astimezone().isoformat(timespec="seconds")
    telemetry = _Telemetry()
    # at least info: the daemon's last line says how many frames it served and messages it refused
    daemon = _DaemonProcess(serve_flags, instance, telemetry.port, log_path,
                            "debug" if settings.log_level.lower() == "debug" else "info")
    log.info("daemon %s started (pid %d, log %s)", instance, daemon.pid, log_path)
    stop = threading.Event()
    rings: list[shm.Ring] = []
    closers: list[Callable[[], None]] = []
    exit_code: int | None = None
    try:
        load_s = _wait_ready(daemon, telemetry, options.load_timeout_s)
        log.info("model ready in %.1f s; flooding for %.0f s", load_s, options.seconds)
        ring_in, ring_out = shm.Ring.attach(daemon.name_in), shm.Ring.attach(daemon.name_out)
        rings += [ring_in, ring_out]
        url = f"ws://127.0.0.1:{daemon.http_port}/ws"
        sent_by: dict[str, _OscClient | _WsClient] = {}
        checker = OrderChecker(chosen, sent=lambda client: sent_by[client].sent)
        osc_clients = [_OscClient(c, daemon.osc_port, options.rate, stop) for c in chosen if c.kind == "osc"]
        ws_clients = []
        for channel in chosen:
            if channel.kind == "ws":
                ws_clients.append(_WsClient(channel, url, options.rate, stop, checker))
                closers.append(ws_clients[-1].close)
        sent_by.update({c.channel.client: c for c in (*osc_clients, *ws_clients)})
        observer = _Observer(url, checker, first)  # its thread feeds the checker from here on
        closers.append(observer.close)
        frames = _Frames(ring_in, ring_out, width, height, options.input_fps, checker, lambda: observer.version)
        frames.thread.start()
        closers.append(lambda: (frames.stop.set(), frames.thread.join(5)))

        udp_errors_before = udp_receive_errors()
        started = time.monotonic()
        frames_before = ring_out.write_seq
        for client in osc_clients:
            client.thread.start()
        for client in ws_clients:
            client.start()
        samples, crash = _sample(daemon, telemetry, observer, frames, ring_out, osc_clients, ws_clients, checker,
                                 started, options, on_sample)
        stop.set()
        flood_end = time.monotonic()
        duration_s = flood_end - started
        output_frames = ring_out.write_seq - frames_before
        final, on_screen = None, None
        if crash is None:
            final, on_screen, crash = _drain(daemon, observer, frames, ws_clients, flood_end)
        udp_errors_after = udp_receive_errors()
        dropped = telemetry.values.get("dropped")
        for client in osc_clients:
            client.thread.join(5)
    finally:
        stop.set()
        for close in reversed(closers):
            try:
                close()
            except Exception as e:  # closing regardless
                log.debug("closing: %s", e)
        for ring in rings:
            ring.close()
        exit_code = daemon.stop()
        telemetry.close()
    counts = daemon.stop_counts()

    last_sent = {client: c.sent for client, c in sent_by.items()}
    ws_acked = sum(c.acked for c in ws_clients)
    osc_sent = sum(c.sent for c in osc_clients)
    failures: list[str] = []
    if crash is not None:
        failures.append(crash)
    if final is not None:
        checker.finish(final["params"], last_sent)
        final_version = final["state_version"]
    else:
        final_version = observer.version
    growth = final_version - observer.baseline
    expected = ws_acked + osc_sent
    osc_lost = max(0, expected - growth)
    if final is not None and growth != expected:
        if growth < expected:
            failures.append(f"lost messages: the state version grew by {growth}, but {expected} change sets were "
                            f"accepted ({ws_acked} WS acks + {osc_sent} OSC messages sent): {expected - growth} OSC "
                            "messages lost or refused")
        else:
            failures.append(f"unexplained state changes: the state version grew by {growth}, only {expected} change "
                            "sets were sent")
    if final is not None and on_screen is None:
        failures.append(f"the final state (version {final_version}) reached no output frame within "
                        f"{SCREEN_TIMEOUT_S:.0f} s of the flood's end (the newest output: version "
                        f"{frames.output_version})")
    if checker.count:
        failures.append(f"{checker.count} order violations (first: {checker.violations[0]})")
    for c in ws_clients:
        if c.refused or c.acked != c.sent:
            failures.append(f"{c.channel.client}: {c.sent} sent, {c.acked} acked, {c.refused} refused"
                            + (f" ({c.errors[0]})" if c.errors else ""))
    if telemetry.error_count:
        failures.append(f"the daemon reported {telemetry.error_count} errors (first: {telemetry.errors[0]})")
    if crash is None and exit_code != 0:
        failures.append(f"the daemon exited with {exit_code} at SIGTERM; see {log_path}")
    judgement = judge(samples, options.warmup)
    failures += judgement.failures

    ages = bench.percentiles(frames.all_ages.values)
    clients = []
    for channel in chosen:
        c = sent_by[channel.client]
        if channel.kind == "ws":
            rtt = bench.percentiles(c.all_rtts.values)
            clients.append(ClientFigures(channel.client, "ws", channel.names, c.sent, c.acked, c.refused,
                                         rtt.p50_ms, rtt.p99_ms, tuple(c.errors)))
        else:
            clients.append(ClientFigures(channel.client, "osc", channel.names, c.sent, None, None))
    return SoakResult(
        date=date, command=options.command, machine=f"{bench.cpu_name()}, {platform.system()} {platform.release()}",
        python=platform.python_version(), torch=_version("torch"), model=settings.model, width=width, height=height,
        rate=options.rate, input_fps=options.input_fps, duration_s=duration_s, warmup_s=options.warmup, load_s=load_s,
        daemon_log=str(log_path), samples=tuple(samples), judgement=judgement, clients=tuple(clients),
        baseline_version=observer.baseline, final_version=final_version, version_growth=growth,
        accepted_expected=expected, osc_lost=osc_lost, states_checked=checker.states,
        order_violations=checker.count, violations=tuple(checker.violations), frames_written=frames.written,
        outputs_read=frames.outputs, output_frames=output_frames, frame_age_p50_ms=ages.p50_ms,
        frame_age_p99_ms=ages.p99_ms, stale_output_max_s=max((x.stale_output_s for x in samples), default=0.0),
        final_on_screen_s=on_screen,
        final_values={c.client: {name: final["params"].get(name) for name in c.names} for c in chosen} if final else {},
        daemon_errors_reported=telemetry.error_count, daemon_errors=tuple(telemetry.errors),
        daemon_refused=counts["refused"] if counts else None, daemon_frames=counts["frames"] if counts else None,
        daemon_dropped=int(dropped) if isinstance(dropped, (int, float)) else None,
        udp_receive_errors=(udp_errors_after - udp_errors_before
                            if udp_errors_after is not None and udp_errors_before is not None else None),
        daemon_exit_code=exit_code, crash=crash, failures=tuple(failures))
