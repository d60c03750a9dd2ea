"""OSC control and telemetry: PROTOCOL.md section 2.

The pure half turns datagrams into parameter change sets (`changes_from_packet`) and telemetry values
into datagrams (`encode`); the server half (`OscServer`, an asyncio datagram protocol) only moves
bytes between a socket and the state store. One datagram is one change set: a bundle is applied
atomically, and a refused message or bundle changes nothing.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any, Callable, Iterable

from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket, ParseError

from . import params

log = logging.getLogger(__name__)

NORM_PREFIX = "/norm/"
# Addresses that set several parameters at once, with one argument per parameter.
COMPOSITE = {"/resolution": ("width", "height")}
TELEMETRY_PREFIX = "/sdbridge/"


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


def changes_from_packet(data: bytes) -> tuple[dict[str, Any], list[str]]:
    """The change set of a whole datagram and the errors found; with any error, apply nothing."""
    changes: dict[str, Any] = {}
    errors: list[str] = []
    try:
        messages = decode(data)
    except OscError as e:
        return {}, [str(e)]
    for address, args in messages:
        try:
            changes.update(message_changes(address, args))
        except (OscError, params.ParamError) as e:
            errors.append(str(e))
    return changes, errors


# ---------------------------------------------------------------------------- pure: encoding
def encode(address: str, *args: Any) -> bytes:
    """One OSC message as bytes."""
    builder = OscMessageBuilder(address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


# ---------------------------------------------------------------------------- I/O
class Telemetry:
    """Sends /sdbridge/... messages over UDP; safe to call from any thread, never raises."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._lock = threading.Lock()

    def send(self, name: str, *args: Any) -> None:
        data = encode(TELEMETRY_PREFIX + name, *args)
        with self._lock:
            try:
                self._sock.sendto(data, self.target)
            except OSError as e:  # nobody listening is normal; never let telemetry stop the show
                log.debug("telemetry %s not sent: %s", name, e)

    def close(self) -> None:
        self._sock.close()


class OscServer(asyncio.DatagramProtocol):
    """Feeds each datagram's change set to `apply`; reports refusals through `on_error`."""

    def __init__(self, apply: Callable[[dict[str, Any]], int], on_error: Callable[[str], None]):
        self._apply = apply
        self._on_error = on_error

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        changes, errors = changes_from_packet(data)
        for error in errors:
            self._on_error(error)
        if errors:
            if changes:
                self._on_error(f"bundle from {addr[0]}:{addr[1]} refused whole: {len(errors)} bad message(s)")
            return
        if not changes:
            return
        try:
            self._apply(changes)
        except params.ParamError as e:
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
    for p in params.PARAMS:
        if p.ranged:
            yield f"{NORM_PREFIX}{p.name}"
