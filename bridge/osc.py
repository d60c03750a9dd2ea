"""OSC control and telemetry: PROTOCOL.md section 2.

The pure half turns datagrams into parameter change sets (`read_packet`); telemetry is encoded with
bridge/osc_codec, the encoding TouchDesigner's client shares. The server half (`OscServer`, an asyncio
datagram protocol) only moves bytes between a socket and the state store. One datagram is one change
set: a bundle is applied atomically, and a refused message or bundle changes nothing. `/preset/recall NAME` becomes the preset's change set
(merged in the bundle's order: later messages override it), and `/preset/save NAME` stores the state
once the datagram's changes are applied; the presets themselves are the caller's. Show commands
(bridge/commands: `/preset/morph`, `/record/start`, `/beat`, ...) are checked with the rest of the datagram
and run, in order, once its changes are applied.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any, Callable, Iterable, NamedTuple

from . import osc_codec, params
from .access import Access, RateLimit, is_loopback
from .commands import COMMANDS, Commands

log = logging.getLogger(__name__)

NORM_PREFIX = "/norm/"
# Addresses that set several parameters at once, with one argument per parameter.
COMPOSITE = {"/resolution": ("width", "height")}
TELEMETRY_PREFIX = "/sdbridge/"
PRESET_SAVE, PRESET_RECALL = "/preset/save", "/preset/recall"


class OscError(ValueError):
    """An OSC packet or message the daemon refuses; the message is sent back as /sdbridge/error."""


# ---------------------------------------------------------------------------- pure: decoding
def decode(data: bytes) -> list[tuple[str, list[Any]]]:
    """Every message in a datagram (bundles flattened, in order) as (address, arguments); OscError for
    anything malformed, which refuses the whole datagram."""
    # bridge/osc_codec, not python-osc: python-osc skips an unknown type tag or a bundle element it cannot
    # read (applying the rest of a malformed datagram), logs a warning on the root logger for each (a flood
    # of bad datagrams floods the log), and recurses without bound into nested bundles (a RecursionError
    # out of the server for one 12 KB datagram). tests/test_fuzz.py holds these cases.
    try:
        return osc_codec.decode(data)
    except osc_codec.OscCodecError as e:
        raise OscError(f"unreadable OSC packet ({len(data)} bytes): {e}") from None


def message_changes(address: str, args: list[Any]) -> dict[str, Any]:
    """The validated parameter changes one OSC message asks for, or OscError / ParamError."""
    if address in COMPOSITE:
        names = COMPOSITE[address]
        if len(args) != len(names):
            raise OscError(f"{address} takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
        return params.validate(zip(names, args))
    if address.startswith(NORM_PREFIX):
        param = _param(address[len(NORM_PREFIX):])
        if param is None or not param.ranged:
            raise OscError(f"unknown OSC address {address}: /norm/ takes a ranged numeric parameter")
        _expect_one(address, args)
        return {param.name: param.from_norm(args[0])}
    param = _param(address[1:]) if address.startswith("/") else None
    if param is None:
        raise OscError(f"unknown OSC address {address}")
    if param.kind is tuple:  # list parameters take all the arguments: /prompts s f s f, /t_index_list i i
        return {param.name: param.coerce(args)}
    _expect_one(address, args)
    return {param.name: param.coerce(args[0])}


def _param(name: str) -> params.Param | None:
    try:
        return params.lookup(name)
    except params.ParamError:
        return None


def _expect_one(address: str, args: list[Any]) -> None:
    if len(args) != 1:
        raise OscError(f"{address} takes 1 argument, got {len(args)}")


class Packet(NamedTuple):
    """What one datagram asks for. With any error, nothing of it is applied."""

    changes: dict[str, Any]
    errors: list[str]
    saves: list[str]  # presets to save once the changes are applied
    commands: list[tuple[str, list[Any]]]  # show commands to run then, with their checked arguments


def read_packet(data: bytes, recall: Callable[[str], dict[str, Any]] | None = None,
                commands: Commands | None = None) -> Packet:
    """The change set of a whole datagram, the presets it saves, the show commands it runs and the errors
    found. `recall(name)` gives a preset's change set (ValueError if it cannot); without it, /preset/recall is
    refused; without `commands`, so are the show commands."""
    changes: dict[str, Any] = {}
    errors: list[str] = []
    saves: list[str] = []
    actions: list[tuple[str, list[Any]]] = []
    try:
        messages = decode(data)
    except OscError as e:
        return Packet({}, [str(e)], [], [])
    for address, args in messages:
        try:
            if commands is not None and address in commands:
                actions.append((address, commands.check(address, args)))
            elif address in (PRESET_SAVE, PRESET_RECALL):
                _expect_one(address, args)
                if not isinstance(args[0], str):
                    raise OscError(f"{address} takes a preset name (s), got {type(args[0]).__name__}")
                if address == PRESET_SAVE:
                    saves.append(args[0])
                elif recall is None:
                    raise OscError(f"{address}: presets are not available here")
                else:
                    changes.update(recall(args[0]))
            else:
                changes.update(message_changes(address, args))
        except ValueError as e:  # OscError, ParamError, CommandError, or a preset that cannot be recalled
            errors.append(str(e))
    return Packet(changes, errors, saves, actions)


# ---------------------------------------------------------------------------- I/O
class Telemetry:
    """Sends /sdbridge/... messages over UDP; safe to call from any thread, never raises."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if is_loopback(host):  # else its first send binds it to every network, open to what others send it
            self._sock.bind(("127.0.0.1", 0))
        self._lock = threading.Lock()

    def send(self, name: str, *args: Any) -> None:
        data = osc_codec.message(TELEMETRY_PREFIX + name, *args)
        with self._lock:
            try:
                self._sock.sendto(data, self.target)
            except OSError as e:  # nobody listening is normal; never let telemetry stop the show
                log.debug("telemetry %s not sent: %s", name, e)

    def close(self) -> None:
        self._sock.close()


class OscServer(asyncio.DatagramProtocol):
    """Feeds each datagram's change set to `apply`; reports refusals through `on_error`. `recall(name)`
    and `save(name)` are the presets' (ValueError when they cannot); without them presets are refused.
    `recalled()` is told once a datagram that recalled a preset has been applied. The show commands a
    datagram holds run through `defer` (by default at once; the daemon hands them to a worker thread: a
    snapshot or the end of a recording takes longer than the network thread may wait)."""

    def __init__(self, apply: Callable[[dict[str, Any]], int], on_error: Callable[[str], None],
                 recall: Callable[[str], dict[str, Any]] | None = None, save: Callable[[str], None] | None = None,
                 access: Access | None = None, limits: RateLimit | None = None, commands: Commands | None = None,
                 recalled: Callable[[], None] = lambda: None,
                 defer: Callable[[Callable[[], None]], Any] = lambda run: run()):
        self._apply = apply
        self._defer = defer
        self._commands = commands
        self._on_error = on_error
        self._recall = recall
        self._recalled = recalled
        self._save = save
        self._access = access  # None: every source may play (tests of the pure handling)
        self._limits = limits

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not self._admitted(addr):
            return
        recalls: list[str] = []

        def recall(name: str) -> dict[str, Any]:
            recalls.append(name)
            return self._recall(name)
        changes, errors, saves, actions = read_packet(data, recall if self._recall else None, self._commands)
        if saves and self._save is None:
            errors.append(f"{PRESET_SAVE}: presets are not available here")
        for error in errors:
            self._on_error(error)
        if errors:
            if changes or saves or actions:
                self._on_error(f"bundle from {addr[0]}:{addr[1]} refused whole: {len(errors)} bad message(s)")
            return
        try:
            if changes:
                self._apply(changes)
            if recalls:
                self._recalled()
            for name in saves:
                self._save(name)
        except ValueError as e:  # a refused change set, or a preset that could not be saved
            self._on_error(str(e))
            return
        if actions:
            self._defer(lambda: self._run(actions))

    def _run(self, actions: list[tuple[str, list[Any]]]) -> None:
        for address, args in actions:
            try:
                self._commands.run(address, args)
            except ValueError as e:  # a preset to morph to that is not there, a recording already running...
                self._on_error(f"{address}: {e}")
            except Exception as e:  # a bug: said, and the next command still runs
                log.exception("%s failed", address)
                self._on_error(f"{address}: {type(e).__name__}: {e}")

    def _admitted(self, addr: tuple) -> bool:
        """Is the datagram from `addr` to be read? Not from a machine outside osc_allow, nor beyond its
        source's rate; either is counted and reported, at most once a second per source."""
        source = f"{addr[0]}:{addr[1]}"
        if self._access is not None and not self._access.osc_allowed(addr[0]):
            if self._access.count_refusal(("osc", addr[0])):
                self._on_error(f"OSC from {addr[0]} refused: not in osc_allow (add --osc-allow {addr[0]} to let "
                               "it play)")
            return False
        if self._limits is not None and not self._limits.allow(("osc", source)):
            dropped = self._limits.report_due(("osc", source))
            if dropped:
                self._on_error(f"OSC from {source}: over {self._limits.rate:g} messages a second; {dropped} "
                               "dropped")
            return False
        return True

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable on some platforms
        log.debug("OSC socket error: %s", exc)


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that is free on `host` right now (for private telemetry targets and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def serve(host: str, port: int, server: OscServer) -> asyncio.DatagramTransport:
    """Bind the OSC server; the transport's `get_extra_info('sockname')` tells the bound port."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=(host, port))
    return transport


def describe_addresses() -> Iterable[str]:
    """Every OSC address the daemon accepts, for help text and docs."""
    for p in params.PARAMS:
        yield f"/{p.name}"
    yield f"/{params.LORA_PREFIX}<name>"
    for field in params.CONTROLNET_FIELDS:
        yield f"/{params.CONTROLNET_PREFIX}<k>/{field}"
    yield from COMPOSITE
    yield PRESET_SAVE
    yield PRESET_RECALL
    yield from (c.address for c in COMMANDS)
    for p in params.PARAMS:
        if p.ranged:
            yield f"{NORM_PREFIX}{p.name}"
