"""OSC packets to change sets, without sockets."""
from __future__ import annotations

import struct

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge import osc


def message(address, *args):
    b = OscMessageBuilder(address)
    for a in args:
        b.add_arg(a)
    return b.build()


def bundle(*messages):
    b = OscBundleBuilder(IMMEDIATELY)
    for m in messages:
        b.add_content(m)
    return b.build().dgram


def test_one_message_sets_one_parameter():
    assert osc.changes_from_packet(message("/seed", 7).dgram) == ({"seed": 7}, [])
    assert osc.changes_from_packet(message("/strength", 1).dgram) == ({"strength": 1.0}, [])


def test_a_bundle_is_one_change_set():
    changes, errors = osc.changes_from_packet(bundle(message("/seed", 1), message("/prompt", "x")))
    assert changes == {"seed": 1, "prompt": "x"} and errors == []


def test_every_bad_message_in_a_bundle_is_reported():
    _, errors = osc.changes_from_packet(bundle(message("/seed", "a"), message("/nope", 1), message("/steps", 2)))
    assert len(errors) == 2 and "seed" in errors[0] and "/nope" in errors[1]


def test_resolution_sets_width_and_height_together():
    assert osc.changes_from_packet(message("/resolution", 640, 384).dgram) == ({"width": 640, "height": 384}, [])
    _, errors = osc.changes_from_packet(message("/resolution", 640).dgram)
    assert "2 arguments" in errors[0]


def test_norm_scales_a_fader_onto_the_range():
    changes, _ = osc.changes_from_packet(message("/norm/guidance_scale", 0.5).dgram)
    assert changes == {"guidance_scale": 10.0}


def test_osc_true_and_false_play_booleans():
    assert osc.changes_from_packet(message("/pause", True).dgram)[0] == {"pause": True}


@pytest.mark.parametrize("data", [b"", b"\x00garbage\xff", b"/seed\x00\x00\x00,i\x00\x00", b"#bundle\x00" + b"\xff" * 12,
                                  message("/seed", 1).dgram[:-2]])
def test_unreadable_packets_are_errors_not_exceptions(data):
    changes, errors = osc.changes_from_packet(data)
    assert changes == {} and len(errors) == 1


def test_a_message_with_no_argument_is_refused():
    data = b"/seed\x00\x00\x00,\x00\x00\x00"
    _, errors = osc.changes_from_packet(data)
    assert "1 argument" in errors[0]


def test_telemetry_encoding_is_plain_osc():
    data = osc.encode("/sdbridge/fps", 29.5)
    assert data == b"/sdbridge/fps\x00\x00\x00,f\x00\x00" + struct.pack(">f", 29.5)
    assert osc.decode(data) == [("/sdbridge/fps", [29.5])]


def test_list_addresses_take_all_their_arguments():
    assert osc.changes_from_packet(message("/prompts", "a fox", 0.75, "a city", 0.25).dgram) == \
        ({"prompts": (("a fox", 0.75), ("a city", 0.25))}, [])
    assert osc.changes_from_packet(message("/seeds", 1, 1.0, 2, 0.5).dgram)[0] == {"seeds": ((1, 1.0), (2, 0.5))}
    assert osc.changes_from_packet(message("/t_index_list", 0, 16, 32).dgram)[0] == {"t_index_list": (0, 16, 32)}
    assert osc.changes_from_packet(message("/t_index_list").dgram)[0] == {"t_index_list": ()}


def test_lora_addresses_name_the_lora_and_take_a_fader_too():
    assert osc.changes_from_packet(message("/lora/film grain", 0.5).dgram)[0] == {"lora/film grain": 0.5}
    assert osc.changes_from_packet(message("/norm/lora/x", 0.5).dgram)[0] == {"lora/x": 0.0}
    assert "unknown OSC address /lora/" in osc.changes_from_packet(message("/lora/", 1.0).dgram)[1][0]
