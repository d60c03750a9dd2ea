"""OSC packets to change sets, without sockets."""
from __future__ import annotations

import struct

import pytest
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge import osc, osc_codec


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


def read(data: bytes) -> tuple[dict, list]:
    """A datagram's change set and errors (no presets)."""
    packet = osc.read_packet(data)
    assert packet.saves == []
    return packet.changes, packet.errors


def test_one_message_sets_one_parameter():
    assert read(message("/seed", 7).dgram) == ({"seed": 7}, [])
    assert read(message("/strength", 1).dgram) == ({"strength": 1.0}, [])


def test_a_bundle_is_one_change_set():
    changes, errors = read(bundle(message("/seed", 1), message("/prompt", "x")))
    assert changes == {"seed": 1, "prompt": "x"} and errors == []


def test_every_bad_message_in_a_bundle_is_reported():
    _, errors = read(bundle(message("/seed", "a"), message("/nope", 1), message("/steps", 2)))
    assert len(errors) == 2 and "seed" in errors[0] and "/nope" in errors[1]


def test_resolution_sets_width_and_height_together():
    assert read(message("/resolution", 640, 384).dgram) == ({"width": 640, "height": 384}, [])
    _, errors = read(message("/resolution", 640).dgram)
    assert "2 arguments" in errors[0]


def test_norm_scales_a_fader_onto_the_range():
    changes, _ = read(message("/norm/guidance_scale", 0.5).dgram)
    assert changes == {"guidance_scale": 10.0}


def test_osc_true_and_false_play_booleans():
    assert read(message("/pause", True).dgram)[0] == {"pause": True}


@pytest.mark.parametrize("data", [b"", b"\x00garbage\xff", b"/seed\x00\x00\x00,i\x00\x00", b"#bundle\x00" + b"\xff" * 12,
                                  message("/seed", 1).dgram[:-2]])
def test_unreadable_packets_are_errors_not_exceptions(data):
    changes, errors = read(data)
    assert changes == {} and len(errors) == 1


def test_a_message_with_no_argument_is_refused():
    data = b"/seed\x00\x00\x00,\x00\x00\x00"
    _, errors = read(data)
    assert "1 argument" in errors[0]


def test_telemetry_encoding_is_plain_osc():
    data = osc_codec.message("/sdbridge/fps", 29.5)
    assert data == b"/sdbridge/fps\x00\x00\x00,f\x00\x00" + struct.pack(">f", 29.5)
    assert osc.decode(data) == [("/sdbridge/fps", [29.5])]


def test_list_addresses_take_all_their_arguments():
    assert read(message("/prompts", "a fox", 0.75, "a city", 0.25).dgram) == \
        ({"prompts": (("a fox", 0.75), ("a city", 0.25))}, [])
    assert read(message("/seeds", 1, 1.0, 2, 0.5).dgram)[0] == {"seeds": ((1, 1.0), (2, 0.5))}
    assert read(message("/t_index_list", 0, 16, 32).dgram)[0] == {"t_index_list": (0, 16, 32)}
    assert read(message("/t_index_list").dgram)[0] == {"t_index_list": ()}


def test_lora_addresses_name_the_lora_and_take_a_fader_too():
    assert read(message("/lora/film grain", 0.5).dgram)[0] == {"lora/film grain": 0.5}
    assert read(message("/norm/lora/x", 0.5).dgram)[0] == {"lora/x": 0.0}
    assert "unknown OSC address /lora/" in read(message("/lora/", 1.0).dgram)[1][0]


def test_a_recalled_preset_is_a_change_set_merged_in_the_bundles_order():
    presets = {"calm": {"strength": 0.2, "seed": 5}}
    data = bundle(message("/seed", 1), message("/preset/recall", "calm"), message("/strength", 0.75))
    changes, errors, saves, commands = osc.read_packet(data, recall=lambda name: presets[name])
    assert (changes, errors, saves, commands) == ({"seed": 5, "strength": 0.75}, [], [], [])


def test_preset_saves_are_listed_to_run_after_the_changes():
    packet = osc.read_packet(bundle(message("/strength", 0.25), message("/preset/save", "mine")))
    assert packet == ({"strength": 0.25}, [], ["mine"], [])


@pytest.mark.parametrize("args, words", [((), "takes 1 argument"), ((3,), "preset name"), (("a", "b"), "takes 1")])
def test_preset_messages_take_one_name(args, words):
    for address in ("/preset/save", "/preset/recall"):
        errors = osc.read_packet(message(address, *args).dgram, recall=dict).errors
        assert len(errors) == 1 and words in errors[0]


def test_a_preset_that_cannot_be_recalled_refuses_the_datagram():
    def recall(name):
        raise ValueError(f"preset {name!r} not found")

    packet = osc.read_packet(bundle(message("/seed", 1), message("/preset/recall", "nope")), recall=recall)
    assert packet.errors == ["preset 'nope' not found"]
    assert "not available" in osc.read_packet(message("/preset/recall", "x").dgram).errors[0]


def test_the_server_says_a_recall_happened_only_once_it_is_applied():
    applied, recalled, errors = [], [], []
    server = osc.OscServer(apply=applied.append, on_error=errors.append, recall=lambda name: {"strength": 0.2},
                           recalled=lambda: recalled.append(len(applied)))
    server.datagram_received(bundle(message("/preset/recall", "calm"), message("/strength", 5.0)), ("127.0.0.1", 1))
    assert (applied, recalled) == ([], [])  # refused whole: a running morph must go on
    server.datagram_received(message("/preset/recall", "calm").dgram, ("127.0.0.1", 1))
    assert (applied, recalled) == ([{"strength": 0.2}], [1])  # told after the apply
    server.datagram_received(message("/strength", 0.5).dgram, ("127.0.0.1", 1))
    assert recalled == [1]


def test_a_command_number_past_a_floats_range_is_refused_not_raised():
    from bridge.commands import CommandError, lookup
    for value in (10 ** 400, -10 ** 400, 2 ** 60, float("nan")):
        with pytest.raises(CommandError, match="finite number"):
            lookup("/frame").check([value])
    assert lookup("/frame").check([2 ** 40]) == [2 ** 40]
