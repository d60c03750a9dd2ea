"""Hostile inputs for the fuzz tests: corpus files mutated byte by byte, and structured inputs built from
the protocol and the parameter schema (`bridge.params`) with hostile values where byte mutations rarely
reach (a valid bundle of odd type tags, a JSON `set` of NaN, huge ints and deep nesting).

Every mutation is drawn through one `integer(lo, hi)` function, so the same code serves hypothesis
(`mutated`: shrinkable draws) and a plain seeded `random.Random` (`random_mutations`: fixed lists of
inputs for the memory checks, which must not run hypothesis inside the measurement).
"""
from __future__ import annotations

import copy
import io
import json
import math
import random
import struct
from typing import Any, Callable, Sequence

from hypothesis import strategies as st

from bridge import osc_codec, params, shm, web

Integer = Callable[[int, int], int]  # an int from lo to hi, both included

MAX_SIZE = 65_000  # a mutated input never grows past one UDP datagram


def _interesting_ints() -> tuple[bytes, ...]:
    """Integers that break length and size arithmetic, in every width and both byte orders."""
    values = (0, 1, 2, 3, 4, 63, 64, 65, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 4096, 8192, 8193,
              0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1)
    out: list[bytes] = []
    for value in values:
        for size in (1, 2, 4, 8):
            if value < 1 << (8 * size):
                out += [value.to_bytes(size, "little"), value.to_bytes(size, "big")]
    out += [struct.pack(fmt, x) for fmt in (">f", "<f", ">d", "<d")
            for x in (math.nan, math.inf, -math.inf, -0.0, 1e30, 0.5)]
    return tuple(dict.fromkeys(out))


INTERESTING = _interesting_ints()
OSC_TOKENS = (osc_codec.BUNDLE_TAG, b",", b"/", b"[", b"]", b"[[[[", b"]]]]", b"\x00\x00\x00\x00", b"/norm/",
              b"/lora/", b"/controlnet/0/", b"/preset/recall\x00\x00", *(bytes([c]) for c in b"ihfdsSbrmtTFNIc"))
JSON_TOKENS = (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"null", b"true", b"false", b"[]", b"{}",
               b'"', b"\\", b"\\u0000", b"\\ud800", b",", b":", b"[" * 64, b'{"a":' * 16, b"9" * 40, b'"type"',
               b'"set"', b'"get"', b'"subscribe"', b'"preset"', b'"params"', b'"id"', b'"frames"', b'"topics"',
               b'"save"', b'"recall"', b"\xc3\xa9", b"\xf0\x9f\x94\xa5", b"\xff")
BINARY_TOKENS = (b"SDBF", b"SDBR", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"IHDR", b"IDAT", b"IEND", b"\xff\xd9")


# ---------------------------------------------------------------------------- byte mutations
def mutate_once(data: bytes, seeds: Sequence[bytes], tokens: Sequence[bytes], integer: Integer) -> bytes:
    """One mutation of `data`: a bit flip, a byte set, a truncation, an insertion of random or interesting
    bytes, an aligned overwrite with an interesting integer, a deletion, a duplicated chunk, a splice
    with another seed, or a chunk repeated until the input is oversized."""
    n = len(data)
    op = integer(0, 9)
    if op == 0 and n:  # flip one bit
        i = integer(0, n - 1)
        return data[:i] + bytes([data[i] ^ (1 << integer(0, 7))]) + data[i + 1:]
    if op == 1 and n:  # set one byte
        i = integer(0, n - 1)
        return data[:i] + bytes([integer(0, 255)]) + data[i + 1:]
    if op == 2:  # truncate
        return data[:integer(0, n)]
    if op == 3:  # insert random bytes
        i = integer(0, n)
        return data[:i] + bytes(integer(0, 255) for _ in range(integer(1, 8))) + data[i:]
    if op == 4:  # insert an interesting integer or token
        pool = INTERESTING + tuple(tokens)
        i = integer(0, n)
        return data[:i] + pool[integer(0, len(pool) - 1)] + data[i:]
    if op == 5 and n:  # overwrite a field (4-aligned) with an interesting integer
        value = INTERESTING[integer(0, len(INTERESTING) - 1)]
        i = integer(0, (n - 1) // 4) * 4
        return data[:i] + value + data[i + len(value):]
    if op == 6 and n:  # delete a chunk
        i = integer(0, n - 1)
        return data[:i] + data[i + integer(1, min(64, n - i)):]
    if op == 7 and n:  # duplicate a chunk somewhere else
        i = integer(0, n - 1)
        chunk = data[i:i + integer(1, min(256, n - i))]
        j = integer(0, n)
        return data[:j] + chunk + data[j:]
    if op == 8 and seeds:  # splice: the head of this input, the tail of another
        other = seeds[integer(0, len(seeds) - 1)]
        return data[:integer(0, n)] + other[integer(0, len(other)):]
    if op == 9 and n:  # a chunk repeated: oversized inputs, lengths that no longer add up
        i = integer(0, n - 1)
        chunk = data[i:i + integer(1, min(64, n - i))]
        return (data[:i] + chunk * integer(2, 1000) + data[i:])[:MAX_SIZE]
    return data


def mutate(data: bytes, seeds: Sequence[bytes], tokens: Sequence[bytes], integer: Integer, max_ops: int = 6) -> bytes:
    """`data` after one mutation, or (one time in four) up to `max_ops`: one change mostly gets past the
    first check a handler makes, and reaches the next."""
    for _ in range(1 if integer(0, 3) else integer(2, max_ops)):
        data = mutate_once(data, seeds, tokens, integer)
    return data[:MAX_SIZE]


class _Pool(tuple):
    """Seeds or tokens that hypothesis names briefly (it writes a strategy's arguments into its repr)."""

    def __repr__(self) -> str:
        return f"<{len(self)} inputs>"


def mutated(seeds: Sequence[bytes], tokens: Sequence[bytes] = (), max_ops: int = 6) -> st.SearchStrategy[bytes]:
    """A corpus file after 1 to `max_ops` mutations (shrinks towards fewer, smaller changes)."""
    return _mutated(_Pool(seeds), _Pool(tokens), max_ops)


@st.composite
def _mutated(draw: Callable, seeds: Sequence[bytes], tokens: Sequence[bytes], max_ops: int) -> bytes:
    def integer(lo: int, hi: int) -> int:
        return draw(st.integers(lo, hi))
    return mutate(seeds[integer(0, len(seeds) - 1)], seeds, tokens, integer, max_ops)


def random_mutations(seeds: Sequence[bytes], count: int, tokens: Sequence[bytes] = (), seed: int = 0) -> list[bytes]:
    """`count` mutated inputs from a seeded random generator: the same list every run."""
    rng = random.Random(seed)
    return [mutate(seeds[rng.randrange(len(seeds))], seeds, tokens, rng.randint) for _ in range(count)]


# ---------------------------------------------------------------------------- hostile values
HUGE_INTS = (2**31 - 1, 2**31, -2**31 - 1, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**30, -10**30, 10**400)
# Long strings are picked, not generated character by character (which hypothesis does slowly).
LONG_STRINGS = ("x" * 4096, "x" * 4097, "é" * 3000, "\x00" * 100, "a\u0000b\x7f\x1b[31m", "../" * 30 + "etc/passwd",
                "<lora:" + "y" * 300 + ":1>", "\ud800", "(" * 500 + "x" + ")" * 500, " " * 1025)

hostile_scalars = st.one_of(
    st.integers(-2**31, 2**31),
    st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from((math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324, 0.5, 1.0)),
    st.booleans(),
    st.none(),
    st.text(max_size=24),
    st.sampled_from(LONG_STRINGS),
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16)


def _mostly(draw: Callable, valid: st.SearchStrategy, invalid: st.SearchStrategy) -> Any:
    """A valid value four times in five: inputs that pass one check reach the next."""
    return draw(valid) if draw(st.integers(0, 4)) else draw(invalid)


def _schema_names() -> list[str]:
    names = [p.name for p in params.PARAMS]
    names += ["lora/some_style", "lora/", "lora/" + "z" * 300, "controlnet/0/scale", "controlnet/7/end",
              "controlnet/8/start", "controlnet/01/scale", "controlnet/-1/scale", "controlnet/0/gain", "volume"]
    return names


SCHEMA_NAMES = _schema_names()
parameter_names = st.one_of(st.sampled_from(SCHEMA_NAMES), st.text(max_size=20))


def _edges(p: params.Param) -> list[Any]:
    """A parameter's own edge values: its bounds, just past them, its choices, its default."""
    values: list[Any] = [params.json_value(p.default)]
    for bound in (p.minimum, p.maximum):
        if bound is not None:
            values += [bound, bound - 1, bound + 1, bound - 1e-9, bound + 1e-9, float(bound)]
    values += list(p.choices) + [c.upper() for c in p.choices]
    if p.kind is tuple:
        values += [[], [[]], [["a", 1.0]] * (p.max_items + 1), [1, 2, 3], [3, 2, 1], [["a", 0.0]], ["a", 1.0, "b"],
                   [[1, 0.5], [2, 0.5]], [0, 49], [49, 0]]
    return values


EDGES = {p.name: _edges(p) for p in params.PARAMS}


@st.composite
def parameter_changes(draw: Callable) -> dict[str, Any]:
    """A change set of schema names (and a few that are not), each with an edge value of its parameter or
    a hostile one."""
    changes: dict[str, Any] = {}
    for name in draw(st.lists(parameter_names, max_size=5)):
        edges = EDGES.get(name)
        value = draw(st.sampled_from(edges)) if edges and draw(st.booleans()) else draw(hostile_values)
        changes[name] = value
    return changes


# ---------------------------------------------------------------------------- OSC
osc_addresses = st.one_of(
    st.sampled_from([f"/{name}" for name in SCHEMA_NAMES]),
    st.sampled_from([f"/norm/{p.name}" for p in params.PARAMS] + ["/norm/", "/norm/lora/x"]),
    st.sampled_from(["/resolution", "/preset/save", "/preset/recall", "/", "//", "/sdbridge/fps", "/seed/"]),
    st.text(max_size=16).map(lambda s: "/" + s),
)
_OSC_KNOWN_TAGS = "ihfdsSbrmtcTFNI"


def _osc_arguments(draw: Callable, depth: int = 0) -> tuple[str, bytes]:
    tags, data = [], []
    for _ in range(draw(st.integers(0, 5))):
        tag = draw(st.sampled_from(_OSC_KNOWN_TAGS + "[?x"))
        if tag == "[" and depth < 3:
            inner_tags, inner = _osc_arguments(draw, depth + 1)
            tags.append("[" + inner_tags + draw(st.sampled_from(["]", "]", ""])))  # sometimes left open
            data.append(inner)
            continue
        tags.append(tag)
        if tag == "i":
            data.append(struct.pack(">i", draw(st.integers(-2**31, 2**31 - 1))))
        elif tag == "h":
            data.append(struct.pack(">q", draw(st.integers(-2**63, 2**63 - 1))))
        elif tag == "f":
            data.append(struct.pack(">f", draw(st.floats(width=32, allow_nan=True))))
        elif tag == "d":
            data.append(struct.pack(">d", draw(st.floats(allow_nan=True))))
        elif tag in "sS":
            text = draw(st.text(max_size=12) | st.sampled_from(LONG_STRINGS)).encode("utf-8", "surrogatepass")
            data.append(_osc_bytes(text.replace(b"\x00", b"")))
        elif tag == "b":
            blob = draw(st.binary(max_size=16))
            size = draw(st.sampled_from([len(blob)] * 3 + [-1, 0x7FFFFFFF, len(blob) + 4]))
            data.append(struct.pack(">i", size) + blob + b"\x00" * (-len(blob) % 4))
        elif tag in "rmc":
            data.append(draw(st.binary(min_size=4, max_size=4)))
        elif tag == "t":
            data.append(draw(st.binary(min_size=8, max_size=8)))
        elif tag in "?x":  # no such type: whatever bytes
            data.append(draw(st.binary(max_size=4)))
    return "".join(tags), b"".join(data)


@st.composite
def osc_raw_arguments(draw: Callable) -> tuple[str, bytes]:
    """A type tag string and the argument bytes, one argument per tag, of any type python-osc or OSC 1.0
    know (and unknown tags, unbalanced arrays, arguments cut short)."""
    tags, data = _osc_arguments(draw)
    if draw(st.integers(0, 9)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return "," + tags, data


def _osc_bytes(raw: bytes) -> bytes:
    raw += b"\x00"
    return raw + b"\x00" * (-len(raw) % 4)


osc_values = st.recursive(
    st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True), st.booleans(), st.none(),
              st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12),
              st.sampled_from([s for s in LONG_STRINGS if "\x00" not in s and "\ud800" not in s]),
              st.binary(max_size=12)),
    lambda children: st.lists(children, max_size=4), max_leaves=10)


@st.composite
def osc_messages(draw: Callable) -> bytes:
    """One OSC message: hostile values as bridge/osc_codec writes them, or raw type tags and bytes."""
    address = draw(osc_addresses)
    if draw(st.booleans()):
        return osc_codec.message(address, *draw(st.lists(osc_values, max_size=5)))
    tags, data = draw(osc_raw_arguments())
    return _osc_bytes(address.encode("utf-8", "surrogatepass")) + _osc_bytes(tags.encode()) + data


@st.composite
def osc_parameter_messages(draw: Callable) -> bytes:
    """A message to a schema parameter with one of its edge values (lists spread as OSC sends them):
    mostly accepted, so the state store sees the edges."""
    p = draw(st.sampled_from(params.PARAMS))
    value = draw(st.sampled_from(EDGES[p.name]))
    if isinstance(value, list):
        args = [item for entry in value for item in (entry if isinstance(entry, list) else [entry])]
    else:
        args = [value]
    address = draw(st.sampled_from([f"/{p.name}", f"/{p.name}", f"/norm/{p.name}"]))
    if address.startswith("/norm/"):
        args = [draw(st.sampled_from([0.0, 1.0, 0.5, -0.0, 1.0000001, math.nan]))]
    return osc_codec.message(address, *args)


osc_packets = st.recursive(
    osc_messages() | osc_parameter_messages(),
    lambda children: st.builds(lambda elements, timetag: osc_codec.bundle(elements, timetag),
                               st.lists(children, max_size=4),
                               st.sampled_from([osc_codec.IMMEDIATELY, 0, 2**64 - 1, 0xE000000000000000])),
    max_leaves=12)


# ---------------------------------------------------------------------------- WebSocket text
_message_ids = st.one_of(st.none(), st.integers(), st.sampled_from(HUGE_INTS), st.floats(allow_nan=True),
                         st.text(max_size=8), st.sampled_from(["i" * 128, "i" * 129]), st.booleans(),
                         st.lists(st.integers(), max_size=2))
_topics = st.lists(st.sampled_from(list(web.TOPICS) + ["", "STATE", "frames ", "secrets"]) | hostile_scalars,
                   max_size=4)
_frame_options = st.one_of(
    st.fixed_dictionaries({}, optional={"encoding": st.sampled_from(["jpeg", "png", "raw", "JPEG", "gif", 1]),
                                        "max_fps": st.sampled_from([0, -1, 1, 30, 240, 241, math.nan, math.inf, True,
                                                                    "30", 1e-300]),
                                        "quality": st.sampled_from([0, 1, 95, 96, 50.5, True, None, 2**70]),
                                        "extra": hostile_scalars}),
    hostile_values)


@st.composite
def ws_objects(draw: Callable) -> Any:
    """A client message as a JSON value: each type of PROTOCOL.md section 3 and docs/protocol.md with
    hostile fields, or anything else."""
    kind = draw(st.sampled_from(["set", "set", "set", "get", "subscribe", "preset", "other"]))
    message: dict[str, Any] = {}
    if draw(st.booleans()):
        message["id"] = draw(_message_ids)
    if kind == "set":
        message.update(type="set", params=draw(parameter_changes() | hostile_values))
    elif kind == "get":
        message["type"] = "get"
    elif kind == "subscribe":
        message.update(type="subscribe", topics=draw(_topics | hostile_values))
        if draw(st.booleans()):
            message["frames"] = draw(_frame_options)
    elif kind == "preset":
        message["type"] = "preset"
        for action in draw(st.lists(st.sampled_from(["save", "recall"]), min_size=1, max_size=2)):
            message[action] = draw(st.sampled_from(["fuzz", "fuzz 2", "", ".hidden", "a/b", "..", "x" * 65])
                                   | hostile_scalars)
    else:
        message["type"] = draw(hostile_scalars)
    if draw(st.integers(0, 4)) == 0:
        message.update(draw(st.dictionaries(st.text(max_size=8), hostile_values, max_size=2)))
    return message if draw(st.integers(0, 9)) else draw(hostile_values)


def json_mutated(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """A corpus message parsed, changed as JSON (a value replaced by a hostile one or a parameter's edge,
    a key dropped, renamed or added) and written again: it stays JSON, so it reaches the handlers."""
    docs = []
    for seed in seeds:
        try:
            docs.append(json.loads(seed))
        except (ValueError, RecursionError):
            pass
    return _json_mutated(_Pool(docs))


@st.composite
def _json_mutated(draw: Callable, docs: Sequence[Any]) -> bytes:
    doc = json.loads(json.dumps(draw(st.sampled_from(docs))))  # a private copy
    for _ in range(draw(st.integers(1, 3))):
        containers = _containers(doc)
        if not containers:
            doc = copy.deepcopy(draw(hostile_values))
            continue
        node = draw(st.sampled_from(containers))
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = draw(st.integers(0, 3))
        # Values are copied in: an edge value is shared, and a later step may change what it put in.
        if keys and op <= 1:
            key = draw(st.sampled_from(keys))
            edges = EDGES.get(key) if isinstance(key, str) else None
            node[key] = copy.deepcopy(draw(st.sampled_from(edges)) if edges and op == 0 else draw(hostile_values))
        elif keys and op == 2:
            del node[draw(st.sampled_from(keys))]
        elif isinstance(node, dict):
            node[draw(parameter_names)] = copy.deepcopy(draw(hostile_values))
        else:
            node.append(copy.deepcopy(draw(hostile_values)))
    return json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


def _containers(value: Any, depth: int = 0) -> list[Any]:
    if depth > 20 or not isinstance(value, (dict, list)):
        return []
    children = value.values() if isinstance(value, dict) else value
    return [value] + [c for child in children for c in _containers(child, depth + 1)]


@st.composite
def ws_texts(draw: Callable) -> str:
    """One text message: a JSON object as Python writes it (NaN and Infinity included), or deeply
    nested JSON."""
    if draw(st.integers(0, 9)) == 0:
        depth = draw(st.integers(1, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return '{"type": "set", "params": {"prompts": ' + opener * depth + "0" + closer * depth + "}}"
    return json.dumps(draw(ws_objects()), allow_nan=True)


# ---------------------------------------------------------------------------- WebSocket binary
_sizes = st.one_of(st.integers(0, 6), st.sampled_from([8192, 8193, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]))


def _encoded_image(mode: str, fmt: str, width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.frombytes("RGBA", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 4)))
    try:
        converted = image.convert(mode) if mode not in ("I;16", "I;16B") else image.convert("L").convert("I;16")
        out = io.BytesIO()
        converted.save(out, fmt)
        return out.getvalue()
    except (OSError, ValueError, KeyError):  # a mode this format does not store
        return b""


@st.composite
def ws_frames(draw: Callable) -> bytes:
    """A binary message: the SDBF header with hostile fields, and a raw payload of the size the header
    claims (or not), or a tiny JPEG/PNG of any mode."""
    kind = _mostly(draw, st.sampled_from([web.INPUT, web.INPUT, web.CONTROL]), st.sampled_from([web.OUTPUT, 0, 255]))
    index = 0 if kind == web.INPUT and draw(st.integers(0, 4)) else draw(st.sampled_from([0, 1, 7, 8, 255]))
    encoding = _mostly(draw, st.sampled_from([web.RAW, web.RAW, web.JPEG, web.PNG]), st.sampled_from([3, 255]))
    channels = _mostly(draw, st.sampled_from(shm.CHANNEL_COUNTS), st.sampled_from([0, 2, 255]))
    dtype = _mostly(draw, st.sampled_from(list(shm.DTYPE_CODES)), st.sampled_from([0, 5, 255]))
    width, height = _mostly(draw, st.integers(1, 6), _sizes), _mostly(draw, st.integers(1, 6), _sizes)
    flags = draw(st.integers(0, 255))
    frame_id = draw(st.sampled_from([0, 1, 2**64 - 1]))
    if encoding in (web.JPEG, web.PNG) and draw(st.integers(0, 3)):
        mode = draw(st.sampled_from(["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"]))
        w, h = draw(st.integers(1, 5)), draw(st.integers(1, 5))
        payload = _encoded_image(mode, "PNG" if encoding == web.PNG else "JPEG", w, h, draw(st.integers(0, 99)))
        if draw(st.booleans()):
            width, height = w, h
    else:
        itemsize = {1: 1, 2: 2, 3: 2, 4: 4}.get(dtype, 1)
        size = width * height * channels * itemsize
        exact = size if size <= 4096 else 0
        length = draw(st.sampled_from([exact, exact, max(exact - 1, 0), exact + 1, 0]))
        payload = draw(st.binary(min_size=length, max_size=length)) if length <= 64 else \
            random.Random(draw(st.integers(0, 99))).randbytes(length)
    return web.HEADER.pack(web.MAGIC, web.VERSION, kind, index, encoding, channels, dtype, flags, width, height,
                           0, frame_id) + payload


# ---------------------------------------------------------------------------- rings
@st.composite
def ring_segments(draw: Callable) -> bytes:
    """A whole segment: a segment header near the valid layout (or not), slot headers whose fields
    agree or disagree with it, random pixels; at most 32 KiB."""
    valid = draw(st.integers(0, 3)) > 0  # mostly a sane layout, so the slots are reached
    magic = shm.MAGIC if valid or draw(st.booleans()) else draw(st.binary(min_size=4, max_size=4))
    version = shm.VERSION if valid else draw(st.sampled_from([0, 1, 2, 0xFFFF]))
    header_size = shm.HEADER_SIZE if valid else draw(st.sampled_from([0, 32, 64, 0xFFFF]))
    slot_header_size = shm.SLOT_HEADER_SIZE if valid else draw(st.sampled_from([0, 64, 128]))
    slot_count = draw(st.integers(2, 4)) if valid else draw(st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF]))
    capacity = draw(st.sampled_from([64, 128, 256])) if valid else draw(st.sampled_from([0, 60, 64, 1 << 40]))
    layout = shm.HEADER_SIZE + min(slot_count, 8) * (shm.SLOT_HEADER_SIZE + min(capacity, 4096))
    size = min(layout, 32768) if valid else draw(st.integers(0, min(layout, 32768)))
    size += draw(st.sampled_from([0, 0, 0, -1, 1, 64]))
    data = bytearray(max(size, 0))
    write_seq = _mostly(draw, st.integers(1, 10), st.sampled_from([0, 2**64 - 1]))
    latest_slot = _mostly(draw, st.integers(0, min(slot_count, 8) - 1) if slot_count else st.just(0),
                          st.sampled_from([4, 0xFFFFFFFF]))
    header = shm.SEGMENT_HEADER.pack(magic, version, header_size, slot_count, slot_header_size, capacity, write_seq,
                                     latest_slot, 0, 0, bytes(16))
    data[:len(header)] = header[:len(data)]
    for slot in range(min(slot_count, 8)):
        offset = shm.HEADER_SIZE + slot * (shm.SLOT_HEADER_SIZE + min(capacity, 4096))
        if offset + shm.SLOT_HEADER_SIZE > len(data):
            break
        seq = write_seq if draw(st.integers(0, 3)) else draw(st.sampled_from([0, 1, 2**64 - 1]))
        seq_end = seq if draw(st.integers(0, 3)) else draw(st.sampled_from([0, seq + 1 & (2**64 - 1)]))
        fields = (seq, _mostly(draw, st.integers(1, 4), _sizes), _mostly(draw, st.integers(1, 4), _sizes),
                  _mostly(draw, st.sampled_from(shm.CHANNEL_COUNTS), st.sampled_from([0, 2, 0xFFFF])),
                  _mostly(draw, st.sampled_from(list(shm.DTYPE_CODES)), st.sampled_from([0, 5, 0xFFFF])),
                  draw(st.integers(0, 3)), slot, 0, 0, 0, seq_end)
        shm.SLOT_HEADER.pack_into(data, offset, *fields)
        pixels = min(capacity, len(data) - offset - shm.SLOT_HEADER_SIZE, 4096)
        if pixels > 0:
            data[offset + shm.SLOT_HEADER_SIZE:offset + shm.SLOT_HEADER_SIZE + pixels] = \
                random.Random(draw(st.integers(0, 99))).randbytes(pixels)
    return bytes(data)
