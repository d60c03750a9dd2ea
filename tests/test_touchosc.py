"""The TouchOSC layout: a .tosc file shaped as TouchOSC writes them, whose every control the daemon's
own OSC parser accepts, mapped into the parameter's range.

What "shaped as TouchOSC writes them" means is taken from files the TouchOSC editor wrote, read by
the parsers that load them (github.com/shakfu/py2tosc: tests/data/controls.tosc, one control of each
type in lexml 3; tests/data/stoic.tosc; the examples TouchOSC ships; github.com/AlbertoV5/tosclib):
the element order, the property keys and types per control type, the value keys. No TouchOSC runs
here, so these tests check the file against that evidence, not against the application.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge import osc, params, touchosc

COMMITTED = Path(__file__).resolve().parent.parent / "configs" / "touchosc" / "sdbridge.tosc"

# Property keys the editor writes for a fresh control of each type (controls.tosc, lexml 3), and the
# keys it writes on some: `centered` on faders (stoic.tosc), the tab styling on a pager's pages.
COMMON = {"background", "color", "cornerRadius", "frame", "grabFocus", "interactive", "locked", "name",
          "orientation", "outline", "outlineStyle", "pointerPriority", "shape", "visible"}
EDITOR_PROPERTIES = {
    "GROUP": COMMON,
    "PAGER": COMMON | {"tabLabels", "tabbar", "tabbarDoubleTap", "tabbarSize", "textSizeOff", "textSizeOn"},
    "FADER": COMMON | {"bar", "barDisplay", "cursor", "cursorDisplay", "grid", "gridSteps", "response",
                       "responseFactor"},
    "BUTTON": COMMON | {"buttonType", "press", "release", "valuePosition"},
    "LABEL": COMMON | {"font", "textAlignH", "textAlignV", "textClip", "textColor", "textLength", "textSize"},
}
OPTIONAL_PROPERTIES = {"FADER": {"centered"},
                       "GROUP": {"tabColorOff", "tabColorOn", "tabLabel", "textColorOff", "textColorOn"}}
PROPERTY_TYPES = {
    "background": "b", "bar": "b", "barDisplay": "i", "buttonType": "i", "centered": "b", "color": "c",
    "cornerRadius": "f", "cursor": "b", "cursorDisplay": "i", "font": "i", "frame": "r", "grabFocus": "b",
    "grid": "b", "gridSteps": "i", "interactive": "b", "locked": "b", "name": "s", "orientation": "i",
    "outline": "b", "outlineStyle": "i", "pointerPriority": "i", "press": "b", "release": "b", "response": "i",
    "responseFactor": "i", "shape": "i", "tabColorOff": "c", "tabColorOn": "c", "tabLabel": "s",
    "tabLabels": "b", "tabbar": "b", "tabbarDoubleTap": "b", "tabbarSize": "i", "textAlignH": "i",
    "textAlignV": "i", "textClip": "b", "textColor": "c", "textColorOff": "c", "textColorOn": "c",
    "textLength": "i", "textSize": "i", "textSizeOff": "i", "textSizeOn": "i", "valuePosition": "b",
    "visible": "b"}
VALUE_KEYS = {"GROUP": {"touch"}, "PAGER": {"page", "touch"}, "FADER": {"touch", "x"},
              "BUTTON": {"touch", "x"}, "LABEL": {"text", "touch"}}
OSC_ELEMENTS = ["enabled", "send", "receive", "feedback", "connections", "triggers", "path", "arguments"]
PARTIAL_ELEMENTS = ["type", "conversion", "value", "scaleMin", "scaleMax"]
VALUE_ELEMENTS = ["key", "locked", "lockedDefaultCurrent", "default", "defaultPull"]

# The parameters a performer plays on faders (bridge/touchosc.py says why seeds, clip_skip, width and
# height are not among them).
PLAYED_ON_FADERS = {"strength", "guidance_scale", "delta", "steps", "similarity_threshold", "subseed_strength",
                    "transition_frames", "feedback", "noise_lock", "cached_attention"}


def load(data: bytes) -> ET.Element:
    """A .tosc file as tosclib and py2tosc read one."""
    return ET.fromstring(zlib.decompress(data))


def nodes(root: ET.Element) -> list[ET.Element]:
    return list(root.iter("node"))


def prop(node: ET.Element, key: str) -> ET.Element:
    (found,) = [p for p in node.find("properties") if p.findtext("key") == key]
    return found


def sending(root: ET.Element) -> list[tuple[ET.Element, ET.Element]]:
    """(node, osc) for every OSC message a control sends."""
    return [(n, m) for n in nodes(root) for m in n.iterfind("messages/osc") if m.findtext("send") == "1"]


def path_of(message: ET.Element) -> str:
    (partial,) = message.find("path")
    assert (partial.findtext("type"), partial.findtext("conversion")) == ("CONSTANT", "STRING")
    return partial.findtext("value")


def datagram(message: ET.Element, value: float | int | None = None) -> bytes:
    """The OSC message TouchOSC sends for this <osc> element: a VALUE partial carries `value` (x) with
    the conversion's type tag, a CONSTANT partial its constant."""
    builder = OscMessageBuilder(path_of(message))
    for partial in message.find("arguments"):
        kind, conversion, text = (partial.findtext(k) for k in ("type", "conversion", "value"))
        arg_type = {"FLOAT": OscMessageBuilder.ARG_TYPE_FLOAT, "INTEGER": OscMessageBuilder.ARG_TYPE_INT,
                    "STRING": OscMessageBuilder.ARG_TYPE_STRING}[conversion]
        if kind == "VALUE":
            assert text == "x" and value is not None
            builder.add_arg(value, arg_type)
        else:
            assert kind == "CONSTANT"
            builder.add_arg(text, arg_type)
    return builder.build().dgram


def changes(data: bytes) -> dict:
    packet = osc.read_packet(data)
    assert packet.errors == []
    return packet.changes


@pytest.fixture(scope="module")
def full() -> ET.Element:
    """A layout with LoRAs and ControlNets, every section present."""
    return load(touchosc.layout(params.schema_params(["detail", "ink"], 2)))


# ---------------------------------------------------------------------------- the file TouchOSC opens
def test_a_tosc_file_is_zlib_compressed_lexml_holding_one_group_canvas(full):
    assert full.tag == "lexml" and full.get("version") == "3"
    (canvas,) = list(full)
    assert canvas.tag == "node" and canvas.get("type") == "GROUP"
    assert touchosc.layout_xml(params.schema_params()).startswith("<?xml version='1.0' encoding='UTF-8'?>")


def test_every_node_carries_the_properties_and_values_the_editor_writes_for_its_type(full):
    for node in nodes(full):
        kind = node.get("type")
        keys = [p.findtext("key") for p in node.find("properties")]
        assert keys == sorted(keys)
        assert EDITOR_PROPERTIES[kind] <= set(keys) <= EDITOR_PROPERTIES[kind] | OPTIONAL_PROPERTIES.get(kind, set())
        for p in node.find("properties"):
            assert [c.tag for c in p] == ["key", "value"]
            assert p.get("type") == PROPERTY_TYPES[p.findtext("key")]
        values = node.find("values")
        assert {v.findtext("key") for v in values} == VALUE_KEYS[kind]
        assert all([c.tag for c in v] == VALUE_ELEMENTS for v in values)


def test_nodes_are_ordered_properties_values_messages_children(full):
    order = ["properties", "values", "messages", "children"]
    for node in nodes(full):
        tags = [child.tag for child in node]
        assert tags == sorted(tags, key=order.index) and len(tags) == len(set(tags))
        assert tags[:2] == ["properties", "values"]


def test_frames_are_whole_numbers_and_colours_are_fractions(full):
    for node in nodes(full):
        for p in node.find("properties"):
            if p.get("type") == "r":
                assert [c.tag for c in p.find("value")] == ["x", "y", "w", "h"]
                assert all(c.text.lstrip("-").isdigit() for c in p.find("value"))
            if p.get("type") == "c":
                assert [c.tag for c in p.find("value")] == ["r", "g", "b", "a"]
                assert all(0 <= float(c.text) <= 1 for c in p.find("value"))


def test_every_osc_message_has_the_editors_element_order(full):
    messages = list(full.iter("osc"))
    assert messages
    for m in messages:
        assert [c.tag for c in m] == [t for t in OSC_ELEMENTS if m.find(t) is not None]
        assert m.findtext("connections") == "11111"  # lexml 3: five connection slots, all on
        assert all([c.tag for c in partial] == PARTIAL_ELEMENTS for partial in m.iter("partial"))


def test_only_groups_and_pagers_hold_children_and_a_pagers_pages_are_groups(full):
    for node in nodes(full):
        if node.find("children") is not None:
            assert node.get("type") in ("GROUP", "PAGER")
        if node.get("type") == "PAGER":
            assert {page.get("type") for page in node.find("children")} == {"GROUP"}
            assert all(prop(page, "tabLabel") is not None for page in node.find("children"))


def test_node_ids_are_unique_uuids(full):
    ids = [node.get("ID") for node in nodes(full)]
    assert len(ids) == len(set(ids))
    assert all(len(i) == 36 and i.count("-") == 4 for i in ids)


def test_every_control_fits_inside_its_parent(full):
    def check(node: ET.Element) -> None:
        frame = [int(c.text) for c in prop(node, "frame").find("value")]
        for child in node.iterfind("children/node"):
            x, y, w, h = (int(c.text) for c in prop(child, "frame").find("value"))
            assert x >= 0 and y >= 0 and x + w <= frame[2] and y + h <= frame[3], child
            check(child)
    check(full.find("node"))


def test_the_labels_over_the_controls_let_touches_through(full):
    for node in nodes(full):
        if node.get("type") in ("LABEL", "GROUP"):
            assert prop(node, "interactive").findtext("value") == "0"


# ---------------------------------------------------------------------------- what the controls send
def test_every_played_parameter_has_exactly_one_fader_sending_norm_of_its_name(full):
    faders = [n for n in nodes(full) if n.get("type") == "FADER"]
    paths = [path_of(m) for n in faders for m in n.iterfind("messages/osc")]
    expected = PLAYED_ON_FADERS | {"lora/detail", "lora/ink"} | {
        f"controlnet/{k}/{field}" for k in (0, 1) for field in ("scale", "start", "end")}
    assert sorted(paths) == sorted(osc.NORM_PREFIX + name for name in expected)
    assert len(paths) == len(faders)


def test_the_ranged_parameters_without_a_fader_are_the_documented_ones():
    schema = params.schema_params(["detail"], 1)
    faded = {c.label for c in touchosc.controls(schema) if c.kind == touchosc.FADER}
    assert {p.name for p in schema if p.ranged} - faded == {"seed", "subseed", "clip_skip", "width", "height"}


@pytest.mark.parametrize("position", [0.0, 0.25, 1.0])
def test_a_fader_moves_its_parameter_to_that_point_of_its_range(full, position):
    for node, message in sending(full):
        if node.get("type") != "FADER":
            continue
        (argument,) = message.find("arguments")
        assert [argument.findtext(k) for k in ("type", "conversion", "value", "scaleMin", "scaleMax")] == \
            ["VALUE", "FLOAT", "x", "0", "1"]
        assert [(t.findtext("var"), t.findtext("condition")) for t in message.iter("trigger")] == [("x", "ANY")]
        name = path_of(message)[len(osc.NORM_PREFIX):]
        param = params.lookup(name)
        value = param.minimum + position * (param.maximum - param.minimum)
        expected = round(value) if param.kind is int else pytest.approx(value)
        assert changes(datagram(message, position)) == {name: expected}


def test_a_faders_starting_position_is_its_parameters_default(full):
    for node in nodes(full):
        if node.get("type") == "FADER":
            name = path_of(node.find("messages/osc"))[len(osc.NORM_PREFIX):]
            (x,) = [v for v in node.find("values") if v.findtext("key") == "x"]
            assert params.lookup(name).from_norm(float(x.findtext("default"))) == \
                pytest.approx(params.lookup(name).default)


def test_the_pause_toggle_sends_1_and_0_as_ints(full):
    (toggle,) = [n for n in nodes(full) if n.get("type") == "BUTTON" and prop(n, "buttonType").findtext("value") == "1"]
    (message,) = toggle.iterfind("messages/osc")
    assert path_of(message) == "/pause"
    assert message.find("arguments/partial/conversion").text == "INTEGER"
    assert changes(datagram(message, 1)) == {"pause": True}
    assert changes(datagram(message, 0)) == {"pause": False}


def test_a_button_for_every_choice_of_mode_and_cfg_type_sends_it_when_touched(full):
    sent = {}
    for node, message in sending(full):
        if node.get("type") == "BUTTON" and prop(node, "buttonType").findtext("value") == "0":
            assert [(t.findtext("var"), t.findtext("condition")) for t in message.iter("trigger")] == \
                [("touch", "RISE")]
            ((name, value),) = changes(datagram(message)).items()
            sent.setdefault(name, []).append(value)
    assert sent == {"mode": ["img2img", "txt2img"], "cfg_type": ["none", "full", "self", "initialize"]}


def test_nothing_the_layout_sends_is_refused_by_the_daemon(full):
    for _, message in sending(full):
        value = 1 if message.find("arguments/partial/conversion").text == "INTEGER" else 0.5
        assert changes(datagram(message, value))


def test_the_readouts_listen_to_the_telemetry_and_send_nothing(full):
    listening = [(n, m) for n in nodes(full) for m in n.iterfind("messages/osc") if m.findtext("receive") == "1"]
    assert {path_of(m) for _, m in listening} == {"/sdbridge/status", "/sdbridge/fps", "/sdbridge/error"}
    for node, message in listening:
        assert node.get("type") == "LABEL" and message.findtext("send") == "0"
        assert message.find("arguments/partial/value").text == "text"


def test_controls_lists_exactly_what_the_file_holds(full):
    listed = touchosc.controls(params.schema_params(["detail", "ink"], 2))
    in_file = sorted((m.findtext("send") == "1", path_of(m), m.findtext("arguments/partial/value"))
                     for m in full.iter("osc"))
    from_list = sorted((c.kind != touchosc.READOUT, c.address,
                        {touchosc.FADER: "x", touchosc.TOGGLE: "x", touchosc.READOUT: "text"}.get(c.kind, c.argument))
                       for c in listed)
    assert in_file == from_list


# ---------------------------------------------------------------------------- pages and names
def test_a_long_section_continues_on_more_pages():
    schema = params.schema_params([f"l{i}" for i in range(25)], 4)
    pages = {}
    for c in touchosc.controls(schema):
        pages.setdefault(c.page, []).append(c)
    assert [len(pages[t]) for t in ("lora", "lora 2", "lora 3")] == [10, 10, 5]
    assert [len(pages[t]) for t in ("controlnet", "controlnet 2")] == [9, 3]
    assert {c.address.split("/")[3] for c in pages["controlnet 2"]} == {"3"}
    root = load(touchosc.layout(schema))
    tabs = [prop(page, "tabLabel").find("value").text for page in root.find("node/children/node/children")]
    assert tabs == ["play", "play 2", "lora", "lora 2", "lora 3", "controlnet", "controlnet 2"]


def test_a_lora_named_twice_gets_one_fader():
    listed = touchosc.controls(params.schema_params(["ink", "ink"]))
    assert [c.address for c in listed].count("/norm/lora/ink") == 1


def test_a_lora_name_xml_would_misread_survives_the_file():
    name = "a]]>b & <c> 'd'"
    root = load(touchosc.layout(params.schema_params([name])))
    paths = {path_of(m) for _, m in sending(root)}
    assert f"/norm/lora/{name}" in paths
    assert changes(datagram(next(m for _, m in sending(root) if path_of(m).endswith(name)), 1.0)) == \
        {f"lora/{name}": 5.0}


# ---------------------------------------------------------------------------- the committed file and the command
def test_the_committed_layout_is_what_the_generator_makes_now():
    # compared uncompressed: zlib's bytes may differ between builds, the layout may not
    assert zlib.decompress(COMMITTED.read_bytes()).decode("utf-8") == touchosc.layout_xml(params.schema_params()), \
        "regenerate it: python -m bridge.touchosc configs/touchosc/sdbridge.tosc"


def test_the_command_writes_the_layout_for_its_loras_and_controlnets(tmp_path, capsys):
    out = tmp_path / "show.tosc"
    assert touchosc.main([str(out), "--loras", "detail, ink", "--controlnets", "1"]) == 0
    assert zlib.decompress(out.read_bytes()).decode() == \
        touchosc.layout_xml(params.schema_params(["detail", "ink"], 1))
    assert "15 faders, 7 buttons" in capsys.readouterr().out


def test_the_command_refuses_more_controlnets_than_the_daemon_has(tmp_path, capsys):
    with pytest.raises(SystemExit):
        touchosc.main([str(tmp_path / "x.tosc"), "--controlnets", str(params.MAX_CONTROLNETS + 1)])
    assert "--controlnets" in capsys.readouterr().err
    assert not (tmp_path / "x.tosc").exists()


def test_sdbridge_touchosc_writes_the_layout_of_its_configuration(tmp_path):
    import subprocess

    from .conftest import ROOT, SDBRIDGE

    out = tmp_path / "show.tosc"
    done = subprocess.run([*SDBRIDGE, "touchosc", "--out", str(out), "--controlnet", "tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "send port 9100" in done.stdout
    assert zlib.decompress(out.read_bytes()) == zlib.decompress(touchosc.layout(params.schema_params([], 1)))
