"""bridge/osc_codec: OSC bytes as python-osc (an implementation we did not write) makes and reads them."""
from __future__ import annotations

import ast
import math
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

from bridge import osc, osc_codec

scalars = st.one_of(
    st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.floats(width=32, allow_nan=False),
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40),
    st.binary(min_size=1, max_size=40),  # python-osc refuses empty blobs, which OSC allows
    st.booleans(),
    st.none(),
)
addresses = st.from_regex(r"/[a-z_]{1,12}(/[a-z0-9_]{1,8}){0,2}", fullmatch=True)


def theirs(address: str, *args) -> bytes:
    builder = OscMessageBuilder(address)
    for arg in args:
        builder.add_arg(arg)
    return builder.build().dgram


def parsed_by_them(data: bytes) -> list[tuple[str, list]]:
    return [(m.message.address, list(m.message.params)) for m in OscPacket(data).messages]


@settings(max_examples=300, deadline=None)
@given(addresses, st.lists(scalars, max_size=6))
def test_messages_are_byte_equal_to_python_osc_and_read_back(address, args):
    ours = osc_codec.message(address, *args)
    assert ours == theirs(address, *args)
    assert osc_codec.decode(ours) == [(address, args)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(addresses, st.lists(scalars, max_size=4)), min_size=1, max_size=5))
def test_bundles_read_the_same_by_python_osc_and_by_us(messages):
    data = osc_codec.bundle(osc_codec.message(a, *args) for a, args in messages)
    assert parsed_by_them(data) == messages
    assert osc_codec.decode(data) == messages


def test_python_osc_bundles_with_nesting_and_arrays_decode_in_order():
    inner = OscBundleBuilder(IMMEDIATELY)
    inner.add_content(OscMessageBuilder("/b").build())
    outer = OscBundleBuilder(IMMEDIATELY)
    m = OscMessageBuilder("/a")
    m.add_arg([1, [2.5, "x"]])
    m.add_arg(3.25, "d")
    outer.add_content(m.build())
    outer.add_content(inner.build())
    outer.add_content(OscMessageBuilder("/c").build())
    assert osc_codec.decode(outer.build().dgram) == [("/a", [[1, [2.5, "x"]], 3.25]), ("/b", []), ("/c", [])]


def test_the_daemons_telemetry_decodes_to_what_was_sent():
    values = {"fps": 29.5, "frame": 1200, "status": "ready", "loading": False, "model": "sd15/ö"}
    for name, value in values.items():
        [(address, args)] = osc_codec.decode(osc_codec.message(osc.TELEMETRY_PREFIX + name, value))
        assert (address, args) == (f"/sdbridge/{name}", [value])


@pytest.mark.parametrize("data", [
    b"", b"/a", b"/a\x00", b"/a\x00\x00,i\x00\x00\x00\x00", b"a\x00\x00\x00,\x00\x00\x00",
    b"/a\x00\x00i\x00\x00\x00", b"/a\x00\x00,q\x00\x00", b"/a\x00\x00,[\x00\x00", b"/a\x00\x00,]\x00\x00",
    b"/a\x00\x00,b\x00\x00\x00\x00\x00\x10", b"/a\x00\x00,b\x00\x00\xff\xff\xff\xff",
    b"#bundle\x00\x00\x00", b"#bundle\x00" + bytes(8) + struct.pack(">i", 64) + b"/a\x00\x00",
    b"#bundle\x00" + bytes(8) + struct.pack(">i", -4), b"/\xff\x00\x00",
])
def test_malformed_packets_raise_a_codec_error(data):
    with pytest.raises(osc_codec.OscCodecError):
        osc_codec.decode(data)


def test_a_message_without_type_tags_has_no_arguments():
    assert osc_codec.decode(b"/pause\x00\x00") == [("/pause", [])]


def test_bundles_nested_too_deep_are_refused():
    data = osc_codec.message("/a")
    for _ in range(osc_codec.MAX_BUNDLE_DEPTH + 1):
        data = osc_codec.bundle([data])
    with pytest.raises(osc_codec.OscCodecError, match="nested"):
        osc_codec.decode(data)


def test_values_osc_cannot_carry_are_refused():
    with pytest.raises(osc_codec.OscCodecError):
        osc_codec.message("/a", object())
    with pytest.raises(osc_codec.OscCodecError):
        osc_codec.message("/a", 2**64)
    with pytest.raises(osc_codec.OscCodecError):
        osc_codec.message("a", 1)


def test_floats_travel_as_32_bit():
    [(_, [value])] = osc_codec.decode(osc_codec.message("/strength", 0.1))
    assert value != 0.1 and math.isclose(value, 0.1, rel_tol=1e-7)


def test_the_codec_imports_only_the_standard_library():
    # TouchDesigner embeds this module as it is (DESIGN.md); shm.py is held to the same rule in test_shm.
    tree = ast.parse(Path(osc_codec.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "struct", "typing"}
