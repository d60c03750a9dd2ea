"""OSC 1.0 messages and bundles as bytes: the encoding every sdbridge OSC sender shares.

The daemon's telemetry and OSCQuery streams and TouchDesigner's client (touchdesigner/client.py)
encode with `message` and `bundle`, and that client reads telemetry with `decode`. TouchDesigner's
Python has no python-osc, so this module embeds into the .tox as it is (DESIGN.md: the TD side reuses
the pure protocol modules, never a second implementation); it imports only the standard library.

The daemon reads the datagrams it is sent with `decode` as well (bridge/osc.decode): strict (a malformed
part refuses the whole datagram), bounded in bundle nesting, and silent (the caller reports). Tests hold
it to python-osc's bytes both ways (tests/test_osc_codec.py) and fuzz it (tests/test_fuzz.py).
"""
import struct
from typing import Any, Iterable

BUNDLE_TAG = b"#bundle\x00"
IMMEDIATELY = 1  # the OSC time tag "now"
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
MAX_BUNDLE_DEPTH = 8

_INT32, _INT64, _FLOAT32, _FLOAT64, _UINT32, _UINT64 = (
    struct.Struct(">i"), struct.Struct(">q"), struct.Struct(">f"), struct.Struct(">d"), struct.Struct(">I"),
    struct.Struct(">Q"))


class OscCodecError(ValueError):
    """Bytes that are not a well-formed OSC packet, or a value OSC cannot carry."""


# ---------------------------------------------------------------------------- encoding
def message(address: str, *args: Any) -> bytes:
    """One OSC message: ints as i (h beyond 32 bits), floats as f (d beyond float32's range), str as s,
    bytes as b, bools as T/F, None as N, lists as arrays."""
    if not address.startswith("/"):
        raise OscCodecError(f"an OSC address starts with '/', not {address!r}")
    tags, data = [","], []
    for arg in args:
        _encode_arg(arg, tags, data)
    return _string("".join(tags)).join((_string(address), b"".join(data)))


def bundle(messages: Iterable[bytes], timetag: int = IMMEDIATELY) -> bytes:
    """An OSC bundle of encoded messages (or bundles): the receiver applies them together."""
    parts = [BUNDLE_TAG, _UINT64.pack(timetag)]
    for element in messages:
        parts += (_INT32.pack(len(element)), element)
    return b"".join(parts)


def _encode_arg(arg: Any, tags: list[str], data: list[bytes]) -> None:
    if arg is True or arg is False:
        tags.append("T" if arg else "F")
    elif arg is None:
        tags.append("N")
    elif isinstance(arg, int):
        if INT32_MIN <= arg <= INT32_MAX:
            tags.append("i")
            data.append(_INT32.pack(arg))
        else:
            tags.append("h")
            try:
                data.append(_INT64.pack(arg))
            except struct.error:
                raise OscCodecError(f"{arg} does not fit OSC's 64-bit integers") from None
    elif isinstance(arg, float):
        try:
            data.append(_FLOAT32.pack(arg))
            tags.append("f")
        except OverflowError:  # beyond float32's range: a 64-bit double keeps it (python-osc raises here)
            data.append(_FLOAT64.pack(arg))
            tags.append("d")
    elif isinstance(arg, str):
        tags.append("s")
        data.append(_string(arg))
    elif isinstance(arg, (bytes, bytearray)):
        tags.append("b")
        data.append(_INT32.pack(len(arg)) + _padded(bytes(arg)))
    elif isinstance(arg, (list, tuple)):
        tags.append("[")
        for item in arg:
            _encode_arg(item, tags, data)
        tags.append("]")
    else:
        raise OscCodecError(f"OSC cannot carry a {type(arg).__name__}")


def _string(text: str) -> bytes:
    return _padded(text.encode("utf-8") + b"\x00")


def _padded(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


# ---------------------------------------------------------------------------- decoding
def decode(data: bytes) -> list[tuple[str, list[Any]]]:
    """Every message in a datagram, bundles flattened in order, as (address, arguments); OscCodecError
    for anything malformed."""
    messages: list[tuple[str, list[Any]]] = []
    _decode_into(bytes(data), 0, len(data), messages, 0)
    return messages


def _decode_into(data: bytes, pos: int, end: int, out: list[tuple[str, list[Any]]], depth: int) -> None:
    if data.startswith(BUNDLE_TAG, pos, end):
        if depth >= MAX_BUNDLE_DEPTH:
            raise OscCodecError(f"bundles nested deeper than {MAX_BUNDLE_DEPTH}")
        pos += 16  # the tag and the time tag; elements are applied at once
        if pos > end:
            raise OscCodecError("a bundle shorter than its time tag")
        while pos < end:
            size = _read(_INT32, data, pos, end)
            pos += 4
            if size <= 0 or size % 4 or pos + size > end:
                raise OscCodecError(f"a bundle element of {size} bytes does not fit the bundle")
            _decode_into(data, pos, pos + size, out, depth + 1)
            pos += size
        return
    address, pos = _read_string(data, pos, end)
    if not address.startswith("/"):
        raise OscCodecError(f"not an OSC address: {address!r}")
    if pos == end:  # OSC 1.0 allows a message without a type tag string
        out.append((address, []))
        return
    tags, pos = _read_string(data, pos, end)
    if not tags.startswith(","):
        raise OscCodecError(f"{address}: type tags {tags!r} do not start with ','")
    stack: list[list[Any]] = [[]]
    for tag in tags[1:]:
        if tag == "[":
            stack.append([])
        elif tag == "]":
            if len(stack) == 1:
                raise OscCodecError(f"{address}: ']' without '['")
            array = stack.pop()
            stack[-1].append(array)
        else:
            value, pos = _read_arg(tag, data, pos, end, address)
            stack[-1].append(value)
    if len(stack) != 1:
        raise OscCodecError(f"{address}: '[' without ']'")
    out.append((address, stack[0]))


_CONSTANTS = {"T": True, "F": False, "N": None, "I": float("inf")}
_FIXED = {"i": _INT32, "f": _FLOAT32, "h": _INT64, "d": _FLOAT64, "t": _UINT64}


def _read_arg(tag: str, data: bytes, pos: int, end: int, address: str) -> tuple[Any, int]:
    if tag in _FIXED:
        fmt = _FIXED[tag]
        return _read(fmt, data, pos, end), pos + fmt.size
    if tag in _CONSTANTS:
        return _CONSTANTS[tag], pos
    if tag in "sS":
        return _read_string(data, pos, end)
    if tag == "b":
        size = _read(_INT32, data, pos, end)
        stop = pos + 4 + size
        if size < 0 or stop > end:
            raise OscCodecError(f"{address}: a blob of {size} bytes runs past the message")
        return data[pos + 4:stop], stop + (-size % 4)
    if tag in "cmr":  # a character, MIDI bytes, an RGBA colour: 4 bytes each
        raw = _read(_UINT32, data, pos, end)
        return (chr(raw) if tag == "c" and raw < 0x110000 else raw.to_bytes(4, "big")), pos + 4
    raise OscCodecError(f"{address}: unknown OSC type tag {tag!r}")


def _read(fmt: struct.Struct, data: bytes, pos: int, end: int) -> Any:
    if pos + fmt.size > end:
        raise OscCodecError("an argument runs past the end of the message")
    return fmt.unpack_from(data, pos)[0]


def _read_string(data: bytes, pos: int, end: int) -> tuple[str, int]:
    stop = data.find(b"\x00", pos, end)
    if stop < 0:
        raise OscCodecError("a string without its terminating zero")
    try:
        text = data[pos:stop].decode("utf-8")
    except UnicodeDecodeError as e:
        raise OscCodecError(f"a string that is not UTF-8: {e}") from None
    return text, pos + (stop - pos + 4) // 4 * 4
