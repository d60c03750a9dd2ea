"""OSC control and telemetry: PROTOCOL.md section 2.

The pure half turns datagrams into parameter change sets (`read_packet`); telemetry is encoded with
bridge/osc_codec, the encoding TouchDesigner's client shares. The server half (`OscServer`, an asyncio
datagram protocol) only moves bytes between a socket and the state store. One datagram is one change
set: a bundle is applied atomically, and a refused message or bundle changes nothing. `/preset/recall NAME` becomes the preset's change set
(merged in the bundle's order: later messages override it), and `/preset/save NAME` stores the state
once the datagram's changes are applied; the presets themselves are the caller's.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any, Callable, Iterable, NamedTuple

from pythonosc.osc_packet import OscPacket, ParseError

from . import osc_codec, params

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
    """Every message in a datagram (bundles flattened, in order) as (address, arguments)."""
    try:
        packet = OscPacket(data)
    except (ParseError, ValueError, IndexError, TypeError) as e:  # python-osc raises more than ParseError
        raise OscError(f"unreadable OSC packet ({len(data)} bytes): {e}") from None
    return [(m.message.address, list(m.message.params)) for m in packet.messages]


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


def read_packet(data: bytes, recall: Callable[[str], dict[str, Any]] | None = None) -> Packet:
    """The change set of a whole datagram, the presets it saves and the errors found. `recall(name)`
    gives a preset's change set (ValueError if it cannot); without it, /preset/recall is refused."""
    changes: dict[str, Any] = {}
    errors: list[str] = []
    saves: list[str] = []
    try:
        messages = decode(data)
    except OscError as e:
        return Packet({}, [str(e)], [])
    for address, args in messages:
        try:
            if address in (PRESET_SAVE, PRESET_RECALL):
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
        except ValueError as e:  # OscError, ParamError, or a preset that cannot be recalled
            errors.append(str(e))
    return Packet(changes, errors, saves)


# ---------------------------------------------------------------------------- I/O
class Telemetry:
    """Sends /sdbridge/... messages over UDP; safe to call from any thread, never raises."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
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
    and `save(name)` are the presets' (ValueError when they cannot); without them presets are refused."""

    def __init__(self, apply: Callable[[dict[str, Any]], int], on_error: Callable[[str], None],
                 recall: Callable[[str], dict[str, Any]] | None = None, save: Callable[[str], None] | None = None):
        self._apply = apply
        self._on_error = on_error
        self._recall = recall
        self._save = save

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        changes, errors, saves = read_packet(data, self._recall)
        if saves and self._save is None:
            errors.append(f"{PRESET_SAVE}: presets are not available here")
        for error in errors:
            self._on_error(error)
        if errors:
            if changes or saves:
                self._on_error(f"bundle from {addr[0]}:{addr[1]} refused whole: {len(errors)} bad message(s)")
            return
        try:
            if changes:
                self._apply(changes)
            for name in saves:
                self._save(name)
        except ValueError as e:  # a refused change set, or a preset that could not be saved
            self._on_error(str(e))

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
    for p in params.PARAMS:
        if p.ranged:
            yield f"{NORM_PREFIX}{p.name}"
