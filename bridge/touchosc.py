"""TouchOSC layouts: the .tosc file a performer opens in TouchOSC to play the daemon from a tablet.

Owns which parameters get a control on the surface (derived from the parameter schema, so a new
parameter gets one without touching this file), where the controls sit, and the .tosc file format.
It knows nothing of sockets or the daemon: the addresses it writes are the protocol's (`/norm/<name>`
for faders, `/<name>` for buttons) and tests/test_touchosc.py feeds them to the daemon's own parser.

What the surface holds (`controls` lists it; docs/osc.md and the tests read that list):

- a fader for every ranged numeric parameter a performer plays live, sending `/norm/<name>` with the
  fader's position as a float 0..1, so the layout never copies a range: the daemon maps it;
- a toggle for every boolean parameter (`/pause` 1 or 0, as an int) and a row of buttons for every
  parameter with choices (`/mode img2img`, `/cfg_type self`, ...), each sending its choice as a string;
- readouts of the telemetry (`/sdbridge/status`, `fps`, `error`) below the pages.

Left off, with the reason in `NOT_FADERS`: seeds (2^31 values on one fader: every pixel of travel is
an unrelated seed) and clip_skip (a model setting); and every parameter that is not `live` (width and
height rebuild the engines). List parameters and prompts need text, which a fader cannot give.

The file format, as read from real files and real parsers (where a point is inferred, it says so):

- A .tosc file is UTF-8 XML compressed with zlib (no gzip header): tosclib's `load` is
  `ET.fromstring(zlib.decompress(...))` (github.com/AlbertoV5/tosclib, src/tosclib/tosc.py) and
  py2tosc reads and writes the same (github.com/shakfu/py2tosc, src/py2tosc/codec.py,
  docs/guide/format.md).
- `<?xml version='1.0' encoding='UTF-8'?><lexml version='3'>` holding one `<node ID='uuid'
  type='GROUP'>`, the canvas. A node holds `<properties>`, `<values>`, then `<messages>` and
  `<children>` (both left out when empty). We write lexml version 3, what TouchOSC wrote before 1.5;
  1.5 writes version 6 (adds a root `<includes/>`, a `<noDuplicates>` flag and ten connection slots).
  That 1.5 still reads version 3 is inferred, not tried: its bundled examples carry node IDs minted in
  2021 and were re-saved as 6. Version 3 is the one every TouchOSC since 2021 should read.
- `<property type='s|b|i|f|r|c'><key>K</key><value>V</value></property>`, sorted by key: string,
  boolean 0/1, integer, float, frame `<x><y><w><h>` (integers), colour `<r><g><b><a>` (0..1).
- `<value><key>x</key><locked>0</locked><lockedDefaultCurrent>0</lockedDefaultCurrent>
  <default>0.5</default><defaultPull>0</defaultPull></value>`, sorted by key; booleans spelled
  true/false in `<default>`. Faders and buttons hold `x` (0..1) and `touch`, labels `text` and
  `touch`, pagers `page` and `touch`.
- `<osc><enabled/><send/><receive/><feedback/><connections>11111</connections><triggers>
  <trigger><var>x</var><condition>ANY|RISE|FALL</condition></trigger></triggers><path>...</path>
  <arguments>...</arguments></osc>`, where path and arguments are lists of `<partial><type>CONSTANT|
  VALUE|PROPERTY|INDEX</type><conversion>BOOLEAN|INTEGER|FLOAT|STRING</conversion><value>...</value>
  <scaleMin>0</scaleMin><scaleMax>1</scaleMax></partial>`. A whole fixed address is one CONSTANT
  STRING partial, as in the real layout py2tosc's tests/data/stoic.tosc (`/action/str`), whose
  buttons send a CONSTANT STRING argument on `touch` RISE: our choice buttons do the same. A fader
  sends VALUE x as FLOAT scaled 0..1, as every fader in TouchOSC's own examples does.
- Property sets per control type are those the editor writes for a fresh control in lexml 3
  (py2tosc tests/data/controls.tosc: one control of each type), plus `centered` on faders (written
  by the editor in stoic.tosc); labels that are not `interactive` let touches through (py2tosc
  defaults.py). A wide fader has orientation 1 (every wide fader in TouchOSC's examples); a PAGER's
  pages are GROUPs with tabLabel, 40 points below the pager's top (py2tosc tests/data/pager_example);
  buttonType 0 momentary, 1 toggle on release, 2 toggle on press (the order of
  hexler.net/touchosc/manual/controls; the examples' simple_mk2 has push1 at 0, toggle1 at 1).
- Keys and strings are CDATA sections, attributes single-quoted, all on one line: as TouchOSC saves.
"""
from __future__ import annotations

import argparse
import sys
import uuid
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from . import params
from .osc import NORM_PREFIX, TELEMETRY_PREFIX
from .params import Param

LEXML_VERSION = "3"
CONNECTIONS = "11111"  # lexml 3 has five connection slots; send on all, so any one configured works

# Ranged live parameters that get no fader, and why (docs/osc.md repeats these reasons).
NOT_FADERS: dict[str, str] = {
    "seed": "2^31 seeds on one fader: every pixel of travel is a different, unrelated seed",
    "subseed": "2^31 seeds on one fader: every pixel of travel is a different, unrelated seed",
    "clip_skip": "a setting of the model (which text-encoder layer it was trained on), not played live",
}
# Faders at the top of the play page, in this order; the other faders follow in the schema's order.
LEADING_FADERS: tuple[str, ...] = ("strength", "guidance_scale", "delta", "steps")
# The telemetry shown below the pages (PROTOCOL.md section 2), with the width of each readout.
READOUTS: tuple[tuple[str, int], ...] = (("status", 110), ("fps", 90), ("error", 0))

# Geometry, in TouchOSC's layout coordinates (it scales the canvas to the screen): a 4:3 tablet.
WIDTH, HEIGHT = 1024, 768
TAB_BAR = 40  # the pager's tab bar; its pages start below it
STATUS_HEIGHT = 48
PAD = 12
ROWS_PER_PAGE = 10
CAPTION_WIDTH = 220
BUTTON_COLUMNS = 4  # a row of buttons is cut into at least this many cells
GAP = 8


class Frame(NamedTuple):
    x: int
    y: int
    w: int
    h: int


class Color(NamedTuple):
    r: float
    g: float
    b: float
    a: float = 1.0


BLACK, WHITE, GREY, CLEAR = Color(0, 0, 0), Color(1, 1, 1), Color(0.25, 0.25, 0.25), Color(0, 0, 0, 0)
SECTION_COLORS = {"play": Color(0, 0.77, 0.66), "lora": Color(1, 0.6, 0), "controlnet": Color(0.6, 0.45, 1)}
BUTTON_COLOR, TOGGLE_COLOR = Color(1, 0.93, 0), Color(1, 0.25, 0.25)

FADER, TOGGLE, BUTTON, READOUT = "fader", "toggle", "button", "readout"


@dataclass(frozen=True)
class Control:
    """One control of the layout and the OSC message it sends (a readout: the one it shows).

    `argument` is a button's constant argument; faders and toggles send their own value (a fader
    its position 0..1 as a float, a toggle 1 or 0 as an int). `page` is the tab it sits on; None
    for the readouts, which sit below every page.
    """

    kind: str
    address: str
    label: str
    page: str | None
    argument: str | None = None


@dataclass(frozen=True)
class _Row:
    caption: str
    controls: tuple[Control, ...]


@dataclass(frozen=True)
class _Page:
    title: str
    section: str
    rows: tuple[_Row, ...]


# ---------------------------------------------------------------------------- what goes on the surface
def faded(param: Param) -> bool:
    """True for the parameters that get a fader: ranged, played live, not in NOT_FADERS."""
    return param.ranged and param.live and param.name not in NOT_FADERS


def controls(schema: Iterable[Param]) -> tuple[Control, ...]:
    """Every control of the layout for these parameters (`params.schema_params(...)`), page by page,
    then the readouts."""
    return tuple(c for page in _pages(schema) for row in page.rows for c in row.controls) + _readouts()


def _section(param: Param) -> str:
    if param.name.startswith(params.LORA_PREFIX):
        return "lora"
    if param.name.startswith(params.CONTROLNET_PREFIX):
        return "controlnet"
    return "play"


def _row(param: Param) -> _Row | None:
    """The row that plays one parameter (its controls not yet on a page), or None."""
    address = "/" + param.name
    if param.kind is bool and param.live:
        played = (Control(TOGGLE, address, param.name, None),)
    elif param.kind is str and param.choices and param.live:
        played = tuple(Control(BUTTON, address, choice, None, choice) for choice in param.choices)
    elif faded(param):
        played = (Control(FADER, NORM_PREFIX + param.name, param.name, None),)
    else:
        return None
    return _Row(param.name, played)


def _rank(param: Param) -> int:
    """Rows from the top: toggles (pause within reach), choices, the leading faders, the rest."""
    if param.kind is bool:
        return 0
    if param.choices:
        return 1
    if param.name in LEADING_FADERS:
        return 2 + LEADING_FADERS.index(param.name)
    return 2 + len(LEADING_FADERS)


def _pages(schema: Iterable[Param]) -> list[_Page]:
    """The tabs: play, lora, controlnet, each continued on "<section> 2", ... when longer than a page
    (a ControlNet's three faders stay on one page)."""
    rows: dict[str, list[_Row]] = {section: [] for section in SECTION_COLORS}
    seen: set[str] = set()
    for param in sorted(schema, key=_rank):  # stable: the schema's order within a rank
        row = _row(param)
        if row is not None and param.name not in seen:  # a LoRA named twice gets one fader
            seen.add(param.name)
            rows[_section(param)].append(row)
    pages = []
    for section, section_rows in rows.items():
        per_page = ROWS_PER_PAGE
        if section == "controlnet":
            per_page -= ROWS_PER_PAGE % len(params.CONTROLNET_FIELDS)
        for n, start in enumerate(range(0, len(section_rows), per_page)):
            title = section if n == 0 else f"{section} {n + 1}"
            pages.append(_Page(title, section, tuple(
                _Row(row.caption, tuple(replace(c, page=title) for c in row.controls))
                for row in section_rows[start:start + per_page])))
    return pages


def _readouts() -> tuple[Control, ...]:
    return tuple(Control(READOUT, TELEMETRY_PREFIX + name, name, None) for name, _ in READOUTS)


# ---------------------------------------------------------------------------- the layout as XML nodes
@dataclass(frozen=True)
class _Osc:
    send: bool
    path: str
    argument: tuple[str, str, str]  # (partial type, conversion, value)
    trigger: tuple[str, str] | None  # (value key, condition); None for receive-only messages


@dataclass(frozen=True)
class _Node:
    type: str
    key: str  # unique within the layout; the node's ID is derived from it, so files are reproducible
    properties: dict[str, object]
    values: dict[str, object]
    messages: tuple[_Osc, ...] = ()
    children: tuple["_Node", ...] = ()


def _common(name: str, frame: Frame, color: Color, **extra: object) -> dict[str, object]:
    """The properties every control type carries, as the editor writes them (values: its defaults)."""
    props: dict[str, object] = {"background": True, "color": color, "cornerRadius": 1.0, "frame": frame,
                                "grabFocus": True, "interactive": True, "locked": False, "name": name,
                                "orientation": 0, "outline": True, "outlineStyle": 1, "pointerPriority": 0,
                                "shape": 1, "visible": True}
    props.update(extra)
    return props


def _group(key: str, name: str, frame: Frame, color: Color, children: Sequence[_Node],
           **extra: object) -> _Node:
    return _Node("GROUP", key, _common(name, frame, color, grabFocus=False, interactive=False, outlineStyle=0,
                                       **extra), {"touch": False}, (), tuple(children))


def _label(key: str, name: str, frame: Frame, text: str, *, size: int = 14, receive: str | None = None,
           length: int = 0) -> _Node:
    messages = (_Osc(False, receive, ("VALUE", "STRING", "text"), None),) if receive else ()
    return _Node("LABEL", key, _common(name, frame, CLEAR, background=False, interactive=False, outline=False,
                                       font=0, textAlignH=2, textAlignV=2, textClip=True, textColor=WHITE,
                                       textLength=length, textSize=size),
                 {"text": text, "touch": False}, messages)


def _fader(key: str, control: Control, frame: Frame, color: Color, param: Param) -> _Node:
    low, high = param.minimum, param.maximum
    default = (param.default - low) / (high - low)
    extra: dict[str, object] = {"centered": True} if low < 0 < high else {}
    return _Node("FADER", key, _common(control.label, frame, color, bar=True, barDisplay=0, cursor=True,
                                       cursorDisplay=0, grid=True, gridSteps=10, orientation=1, response=0,
                                       responseFactor=100, **extra),
                 {"touch": False, "x": default},
                 (_Osc(True, control.address, ("VALUE", "FLOAT", "x"), ("x", "ANY")),))


def _button(key: str, control: Control, frame: Frame, toggle: bool) -> _Node:
    if toggle:  # sends 1 when switched on, 0 when off: x as an int
        message = _Osc(True, control.address, ("VALUE", "INTEGER", "x"), ("x", "ANY"))
    else:  # sends its constant when touched
        message = _Osc(True, control.address, ("CONSTANT", "STRING", control.argument or ""), ("touch", "RISE"))
    color = TOGGLE_COLOR if toggle else BUTTON_COLOR
    return _Node("BUTTON", key, _common(control.label, frame, color, buttonType=1 if toggle else 0, press=True,
                                        release=True, valuePosition=False),
                 {"touch": False, "x": 0.0}, (message,))


def _row_nodes(page: _Page, index: int, row: _Row, by_name: dict[str, Param]) -> list[_Node]:
    pitch = (HEIGHT - STATUS_HEIGHT - TAB_BAR - 2 * PAD) // ROWS_PER_PAGE
    y, h = PAD + index * pitch, pitch - GAP
    x0 = PAD + CAPTION_WIDTH + PAD
    width = WIDTH - x0 - PAD
    key = f"{page.title}/{row.caption}"
    nodes = [_label(f"{key}/caption", f"{row.caption} caption", Frame(PAD, y, CAPTION_WIDTH, h), row.caption)]
    first = row.controls[0]
    if first.kind == FADER:
        param = by_name[first.address[len(NORM_PREFIX):]]
        nodes.append(_fader(key, first, Frame(x0, y, width, h), SECTION_COLORS[page.section], param))
        return nodes
    columns = max(len(row.controls), BUTTON_COLUMNS)
    cell = (width - GAP * (columns - 1)) // columns
    for i, control in enumerate(row.controls):
        frame = Frame(x0 + i * (cell + GAP), y, cell, h)
        nodes.append(_button(f"{key}/{control.label}", control, frame, control.kind == TOGGLE))
        if control.kind == BUTTON:  # the choice written on the button; drawn above it, lets touches through
            nodes.append(_label(f"{key}/{control.label}/text", f"{control.label} text", frame, control.label))
    return nodes


def _status_nodes() -> list[_Node]:
    y, h = HEIGHT - STATUS_HEIGHT + 4, STATUS_HEIGHT - GAP
    x, nodes = PAD, []
    for control, (name, width) in zip(_readouts(), READOUTS):
        caption_width = 10 * len(name) + 10
        nodes.append(_label(f"status/{name}/caption", f"{name} caption", Frame(x, y, caption_width, h), name,
                            size=12))
        x += caption_width + 4
        width = width or WIDTH - PAD - x
        nodes.append(_label(f"status/{name}", name, Frame(x, y, width, h), "-", receive=control.address,
                            length=6 if name == "fps" else 0))
        x += width + GAP
    return nodes


def _root(schema: Iterable[Param]) -> _Node:
    schema = tuple(schema)
    by_name = {p.name: p for p in schema}
    page_frame = Frame(0, TAB_BAR, WIDTH, HEIGHT - STATUS_HEIGHT - TAB_BAR)
    pages = [_group(f"page/{page.title}", page.title, page_frame, CLEAR,
                    [node for i, row in enumerate(page.rows) for node in _row_nodes(page, i, row, by_name)],
                    background=True, outline=False, tabColorOff=GREY, tabColorOn=CLEAR, tabLabel=page.title,
                    textColorOff=WHITE, textColorOn=WHITE)
             for page in _pages(schema)]
    pager = _Node("PAGER", "pager", _common("pages", Frame(0, 0, WIDTH, HEIGHT - STATUS_HEIGHT), GREY,
                                            grabFocus=False, outlineStyle=0, tabLabels=True, tabbar=True,
                                            tabbarDoubleTap=False, tabbarSize=TAB_BAR, textSizeOff=14,
                                            textSizeOn=14),
                  {"page": 0, "touch": False}, (), tuple(pages))
    return _group("root", "sdbridge", Frame(0, 0, WIDTH, HEIGHT), BLACK, [pager, *_status_nodes()])


# ---------------------------------------------------------------------------- the file
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "sdbridge/touchosc")


def layout_xml(schema: Iterable[Param]) -> str:
    """The layout for these parameters as TouchOSC's XML (what a .tosc file holds, uncompressed)."""
    out = ["<?xml version='1.0' encoding='UTF-8'?>", f"<lexml version='{LEXML_VERSION}'>"]
    _write_node(_root(schema), out)
    out.append("</lexml>")
    return "".join(out)


def layout(schema: Iterable[Param]) -> bytes:
    """The .tosc file for these parameters: the XML, zlib-compressed."""
    return zlib.compress(layout_xml(schema).encode("utf-8"), 9)


def _write_node(node: _Node, out: list[str]) -> None:
    out.append(f"<node ID='{uuid.uuid5(_ID_NAMESPACE, node.key)}' type='{node.type}'><properties>")
    for key, value in sorted(node.properties.items()):
        out.append(f"<property type='{_property_type(value)}'><key>{_cdata(key)}</key><value>"
                   f"{_property_value(value)}</value></property>")
    out.append("</properties><values>")
    for key, default in sorted(node.values.items()):
        lock = 1 if key == "text" else 0  # the editor locks a label's text default to its current text
        out.append(f"<value><key>{_cdata(key)}</key><locked>0</locked><lockedDefaultCurrent>{lock}"
                   f"</lockedDefaultCurrent><default>{_cdata(_default_text(default))}</default>"
                   f"<defaultPull>0</defaultPull></value>")
    out.append("</values>")
    if node.messages:
        out.append("<messages>")
        for message in node.messages:
            _write_osc(message, out)
        out.append("</messages>")
    if node.children:
        out.append("<children>")
        for child in node.children:
            _write_node(child, out)
        out.append("</children>")
    out.append("</node>")


def _write_osc(message: _Osc, out: list[str]) -> None:
    out.append(f"<osc><enabled>1</enabled><send>{int(message.send)}</send><receive>{int(not message.send)}"
               f"</receive><feedback>0</feedback><connections>{CONNECTIONS}</connections>")
    if message.trigger:
        var, condition = message.trigger
        out.append(f"<triggers><trigger><var>{_cdata(var)}</var><condition>{condition}</condition>"
                   f"</trigger></triggers>")
    out.append(f"<path>{_partial('CONSTANT', 'STRING', message.path)}</path>"
               f"<arguments>{_partial(*message.argument)}</arguments></osc>")


def _partial(kind: str, conversion: str, value: str) -> str:
    return (f"<partial><type>{kind}</type><conversion>{conversion}</conversion><value>{_cdata(value)}</value>"
            f"<scaleMin>0</scaleMin><scaleMax>1</scaleMax></partial>")


def _property_type(value: object) -> str:
    if isinstance(value, Frame):
        return "r"
    if isinstance(value, Color):
        return "c"
    return {bool: "b", int: "i", float: "f", str: "s"}[type(value)]


def _property_value(value: object) -> str:
    if isinstance(value, Frame):
        return "".join(f"<{k}>{int(v)}</{k}>" for k, v in zip("xywh", value))
    if isinstance(value, Color):
        return "".join(f"<{k}>{_number(v)}</{k}>" for k, v in zip("rgba", value))
    if isinstance(value, str):
        return _cdata(value)
    return _number(value)


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else _number(value)


def _number(value: object) -> str:
    """As TouchOSC writes numbers: booleans 0/1, no trailing .0 on whole floats."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _cdata(text: str) -> str:
    # "]]>" would end the section early: split it across two sections
    return "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"


# ---------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.touchosc",
        description="Write a TouchOSC layout (.tosc) with a fader for every parameter sdbridge plays live.")
    parser.add_argument("out", type=Path, help="the .tosc file to write")
    parser.add_argument("--loras", default="", help="comma-separated LoRA names (as `sdbridge models` lists "
                                                    "them), one fader each")
    parser.add_argument("--controlnets", type=int, default=0, help="how many ControlNets the daemon loads "
                                                                   "(its `controlnets` setting)")
    args = parser.parse_args(argv)
    if not 0 <= args.controlnets <= params.MAX_CONTROLNETS:
        parser.error(f"--controlnets: from 0 to {params.MAX_CONTROLNETS}, got {args.controlnets}")
    loras = [name.strip() for name in args.loras.split(",") if name.strip()]
    try:
        schema = params.schema_params(loras, args.controlnets)
    except params.ParamError as e:
        parser.error(str(e))
    args.out.write_bytes(layout(schema))
    listed = controls(schema)
    print(f"wrote {args.out}: {sum(c.kind == FADER for c in listed)} faders, "
          f"{sum(c.kind in (TOGGLE, BUTTON) for c in listed)} buttons")
    return 0


if __name__ == "__main__":
    sys.exit(main())
