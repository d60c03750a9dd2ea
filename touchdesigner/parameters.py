"""The component's custom parameters, derived from the daemon's schema (/api/schema), and what the
component sends of them: everything the extension decides, kept free of TouchDesigner objects so that
plain Python tests run it.

- `pages(schema)`: every custom parameter the component has, page by page: one per schema parameter
  (TouchDesigner names: `negative_prompt` is `Negativeprompt`, `controlnet/0/scale` is
  `Controlnet0scale`), then the component's own (presets, the daemon's address and launch, status).
- `Sync`: which parameter values the daemon has been sent, so that each frame sends only changes, as
  one atomic bundle, and what the daemon resets when one is set alone.
- `status_line`: the status a performer reads at a glance.

It imports only the standard library (the .tox embeds it as a Text DAT).
"""
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

# Pages in the order the parameter dialog shows them.
PROMPT, STREAM, MODEL, LORA, CONTROLNET, PRESETS, DAEMON, STATUS = (
    "Prompt", "Stream", "Model", "LoRA", "ControlNet", "Presets", "Daemon", "Status")
PAGE_OF = {
    **dict.fromkeys(("prompt", "negative_prompt", "prompts", "styles", "clip_skip", "seed", "seeds", "subseed",
                     "subseed_strength", "transition_frames"), PROMPT),
    **dict.fromkeys(("model", "vae", "width", "height"), MODEL),
}  # lora/<name> on LoRA, controlnet/<k>/<field> on ControlNet, anything else on Stream
SLIDER_SPAN = 1000  # an int range wider than this (a seed) gets a slider over its first 1000 values
LORA_SLIDER = (0.0, 1.5)  # LoRA weights are played in this range; the parameter accepts the schema's


@dataclass(frozen=True)
class ParSpec:
    """One custom parameter of the component. `source` is the schema parameter it plays ("" for the
    component's own); `style` is TouchDesigner's (appendFloat is "Float", appendStrMenu "StrMenu")."""

    name: str
    label: str
    style: str  # Float, Int, Str, StrMenu, Menu, Toggle, Pulse, File
    page: str
    source: str = ""
    default: Any = None
    minimum: float | None = None  # clamped: TouchDesigner refuses values outside
    maximum: float | None = None
    slider: tuple[float, float] | None = None  # normMin, normMax
    menu: tuple[str, ...] = ()
    help: str = ""
    read_only: bool = False
    json_list: bool = False  # a list parameter, typed as JSON text: [["a fox", 0.7], ["a city", 0.3]]
    live: bool = True  # False: changing it reloads or rebuilds (model, vae, width, height)


def td_name(name: str) -> str:
    """A schema name as a TouchDesigner custom parameter name: a capital, then lowercase letters and
    digits (`negative_prompt` -> `Negativeprompt`, `lora/Neon-Style` -> `Loraneonstyle`)."""
    letters = re.sub(r"[^a-z0-9]", "", name.lower())
    if not letters or not letters[0].isalpha():
        letters = "P" + letters
    return letters[0].upper() + letters[1:]


def label(name: str) -> str:
    if name.startswith("lora/"):
        return name[len("lora/"):]
    if name.startswith("controlnet/"):
        k, _, field = name[len("controlnet/"):].partition("/")
        return f"ControlNet {k} {field.capitalize()}"
    return name.replace("_", " ").title()


def schema_specs(schema: Mapping[str, Any]) -> list[ParSpec]:
    """One ParSpec per parameter of the schema, named uniquely (a second `lora/a-b` beside `lora/ab`
    becomes `Loraab2`)."""
    specs: list[ParSpec] = []
    taken: set[str] = set(_OWN_NAMES)
    for entry in schema["params"]:
        name = td_name(entry["name"])
        base, n = name, 2
        while name in taken:
            name, n = f"{base}{n}", n + 1
        taken.add(name)
        specs.append(_spec(name, entry))
    return specs


def _spec(name: str, entry: Mapping[str, Any]) -> ParSpec:
    source, kind = entry["name"], entry["type"]
    page = (LORA if source.startswith("lora/") else CONTROLNET if source.startswith("controlnet/")
            else PAGE_OF.get(source, STREAM))
    common = dict(name=name, label=label(source), page=page, source=source, help=entry.get("doc", ""),
                  live=entry.get("live", True))
    if kind == "list":
        return ParSpec(style="Str", default=json.dumps(entry["default"]), json_list=True, **common)
    if kind == "bool":
        return ParSpec(style="Toggle", default=bool(entry["default"]), **common)
    if kind == "str":
        if entry.get("choices"):
            return ParSpec(style="Menu", default=entry["default"], menu=tuple(entry["choices"]), **common)
        if entry.get("options"):
            return ParSpec(style="StrMenu", default=entry["default"], menu=tuple(entry["options"]), **common)
        return ParSpec(style="Str", default=entry["default"], **common)
    low, high = entry.get("min"), entry.get("max")
    slider = None
    if low is not None and high is not None:
        slider = (low, min(high, low + SLIDER_SPAN)) if kind == "int" else (low, high)
        if source.startswith("lora/"):
            slider = LORA_SLIDER
    return ParSpec(style="Int" if kind == "int" else "Float", default=entry["default"], minimum=low, maximum=high,
                   slider=slider, **common)


LAUNCH_DEFAULTS = {"executable": "", "model": "tiny", "config": "", "instance": "default", "host": "127.0.0.1",
                   "osc_port": 9100, "telemetry_port": 9101, "http_port": 9102}


def own_specs(presets: Iterable[str] = (), launch: Mapping[str, Any] | None = None) -> list[ParSpec]:
    """The component's own parameters, after the schema's: presets, the daemon's address, its launch
    and the status display. `launch` overrides LAUNCH_DEFAULTS (what `sdbridge touchdesigner` was run with)."""
    d = {**LAUNCH_DEFAULTS, **(launch or {})}
    return [
        ParSpec("Preset", "Preset", "StrMenu", PRESETS, default="", menu=tuple(presets),
                help="Name of the preset to save or recall (a plain file name in the daemon's presets folder)."),
        ParSpec("Savepreset", "Save Preset", "Pulse", PRESETS, help="Store the daemon's whole state under Preset."),
        ParSpec("Recallpreset", "Recall Preset", "Pulse", PRESETS,
                help="Restore the state saved under Preset; the parameters here follow it."),
        ParSpec("Morphseconds", "Morph Seconds", "Float", PRESETS, default=4.0, minimum=0.0, maximum=600.0,
                slider=(0.0, 30.0), help="How long Morph to Preset takes."),
        ParSpec("Morphpreset", "Morph to Preset", "Pulse", PRESETS,
                help="Ease from the current look to Preset over Morph Seconds (numbers eased, prompts blended, "
                     "seeds slerped); the parameters here follow it when it ends."),
        ParSpec("Startrecording", "Start Recording", "Pulse", PRESETS,
                help="Record the output to a video file in the daemon's recordings folder."),
        ParSpec("Stoprecording", "Stop Recording", "Pulse", PRESETS, help="End the recording."),
        ParSpec("Snapshot", "Snapshot", "Pulse", PRESETS,
                help="Save the frame on screen as a PNG that holds every parameter, in the recordings folder."),
        ParSpec("Active", "Active", "Toggle", DAEMON, default=True,
                help="Send frames and parameter changes; off leaves the daemon alone."),
        ParSpec("Sendinput", "Send Input", "Toggle", DAEMON, default=True,
                help="Write the first input TOP to the daemon each frame (img2img); off for txt2img."),
        ParSpec("Instance", "Instance", "Str", DAEMON, default=d["instance"],
                help="The daemon's --instance: its shared-memory segments are sdb_<instance>_in/_out."),
        ParSpec("Host", "Host", "Str", DAEMON, default=d["host"],
                help="The daemon's address: this machine (frames travel through its shared memory)."),
        ParSpec("Oscport", "OSC Port", "Int", DAEMON, default=d["osc_port"], minimum=1, maximum=65535,
                help="UDP port the daemon takes OSC on (--osc-port)."),
        ParSpec("Telemetryport", "Telemetry Port", "Int", DAEMON, default=d["telemetry_port"], minimum=1, maximum=65535,
                help="UDP port the daemon sends telemetry to (--telemetry-port); this component listens on it."),
        ParSpec("Httpport", "HTTP Port", "Int", DAEMON, default=d["http_port"], minimum=1, maximum=65535,
                help="The daemon's web and API port (--http-port), for presets and state."),
        ParSpec("Executable", "sdbridge Executable", "File", DAEMON, default=d["executable"],
                help="The sdbridge program of your Python environment (Scripts\\sdbridge.exe on Windows, "
                     "bin/sdbridge elsewhere), or that environment's python."),
        ParSpec("Launchmodel", "Launch Model", "Str", DAEMON, default=d["model"],
                help="The model Launch starts the daemon with (--model): a name from your models folders, "
                     "a path, or tiny (a test model whose images mean nothing)."),
        ParSpec("Config", "Config File", "File", DAEMON, default=d["config"],
                help="A TOML config for Launch (--config): models folders, ControlNets, sizes. Optional."),
        ParSpec("Launchargs", "Extra Arguments", "Str", DAEMON, default="",
                help="More serve flags for Launch, separated by spaces, e.g. --max-width 1920 --max-height 1080."),
        ParSpec("Launch", "Launch Daemon", "Pulse", DAEMON,
                help="Start sdbridge serve with the settings above; its log goes to the log DAT inside."),
        ParSpec("Stop", "Stop Daemon", "Pulse", DAEMON, help="Stop the daemon Launch started."),
        ParSpec("Resend", "Resend All", "Pulse", DAEMON, help="Send every parameter again."),
        ParSpec("Updatepars", "Update Parameters", "Pulse", DAEMON,
                help="Take the running daemon's schema: parameters for LoRAs added since the build, new presets."),
        ParSpec("Pullstate", "Get State", "Pulse", DAEMON,
                help="Set the parameters here to the daemon's current state (after a change from elsewhere)."),
        ParSpec("Status", "Status", "Str", STATUS, read_only=True, help="What the daemon is doing."),
        ParSpec("Fps", "FPS", "Float", STATUS, read_only=True, help="Frames the daemon renders per second."),
        ParSpec("Latencyms", "Latency (ms)", "Float", STATUS, read_only=True,
                help="Input written to output written, milliseconds."),
        ParSpec("Servedmodel", "Model", "Str", STATUS, read_only=True, help="The model the daemon serves."),
        ParSpec("Error", "Last Error", "Str", STATUS, read_only=True,
                help="The last error the daemon or this component reported."),
    ]


_OWN_NAMES = {s.name for s in own_specs()}


def pages(schema: Mapping[str, Any], launch: Mapping[str, Any] | None = None) -> list[tuple[str, list[ParSpec]]]:
    """Every custom parameter, grouped by page in dialog order (empty pages left out)."""
    specs = schema_specs(schema) + own_specs(schema.get("presets", ()), launch)
    order = (PROMPT, STREAM, MODEL, LORA, CONTROLNET, PRESETS, DAEMON, STATUS)
    return [(page, [s for s in specs if s.page == page]) for page in order if any(s.page == page for s in specs)]


# ---------------------------------------------------------------------------- values
def to_daemon(spec: ParSpec, value: Any) -> Any:
    """A parameter's TouchDesigner value as the daemon takes it; ValueError for JSON that is not a list."""
    if spec.json_list:
        try:
            parsed = json.loads(value) if str(value).strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{spec.label}: not JSON ({e.msg} at column {e.colno}); "
                             'write a list such as [["a fox", 0.7], ["a city", 0.3]]') from None
        if not isinstance(parsed, list) or not all(_plain(entry) for entry in parsed):
            raise ValueError(f"{spec.label}: expected a JSON list of texts, numbers or [text, number] pairs, "
                             f"got {str(value)[:60]}")
        return parsed
    if spec.style == "Toggle":
        return bool(value)
    if spec.style == "Int":
        return int(value)
    if spec.style == "Float":
        return float(value)
    return str(value)


def _plain(entry: Any) -> bool:
    """A list parameter's entry OSC can carry: a text, a number, or a list of those."""
    if isinstance(entry, list):
        return all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in entry)
    return isinstance(entry, (str, int, float)) and not isinstance(entry, bool)


def to_td(spec: ParSpec, value: Any) -> Any:
    """A daemon value (as /api/state gives it) as the parameter holds it."""
    if spec.json_list:
        return json.dumps(value)
    if spec.style == "Toggle":
        return bool(value)
    return value


def td_values(specs: Iterable[ParSpec], state: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter values (TouchDesigner names) that show a daemon state (/api/state's params)."""
    by_source = {s.source: s for s in specs if s.source}
    return {by_source[k].name: to_td(by_source[k], v) for k, v in state.items() if k in by_source}


class Sync:
    """Which values of the schema's parameters the daemon has been sent, so that a frame sends only what
    changed. `changes` takes the parameters' values (TouchDesigner names) and returns the change set to
    send (schema names), the parameters to set to what the daemon reset (setting `prompt` alone ends a
    `prompts` blend), and messages for values that cannot be sent (each once).

    A new daemon gets every live parameter (`forget`); the ones that reload or rebuild (model, vae,
    width, height) go out only when they change here, so that opening a project or restarting the
    daemon never switches its model."""

    def __init__(self, specs: Iterable[ParSpec], schema: Mapping[str, Any]):
        self.specs = {s.name: s for s in specs if s.source}
        self.by_source = {s.source: s for s in self.specs.values()}
        self.clears = {e["name"]: tuple(e.get("clears", ())) for e in schema["params"]}
        self.defaults = {e["name"]: e["default"] for e in schema["params"]}
        self.sent: dict[str, Any] = {}  # TouchDesigner name -> the value last sent (or first seen, if not live)
        self._refused: dict[str, Any] = {}

    def changes(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        changes: dict[str, Any] = {}
        errors: list[str] = []
        for name, value in values.items():
            spec = self.specs.get(name)
            if spec is None or (name in self.sent and self.sent[name] == value):
                continue
            if not spec.live and name not in self.sent:
                self.sent[name] = value  # taken as what the daemon has
                continue
            try:
                changes[spec.source] = to_daemon(spec, value)
            except ValueError as e:
                if self._refused.get(name) != value:
                    errors.append(str(e))
                    self._refused[name] = value
                continue
            self.sent[name] = value
        resets = {}
        for source in list(changes):
            for cleared in self.clears.get(source, ()):
                spec = self.by_source.get(cleared)
                if cleared not in changes and spec is not None:
                    resets[spec.name] = self.sent[spec.name] = to_td(spec, self.defaults[cleared])
        return changes, resets, errors

    def forget(self) -> None:
        """Send every live parameter again at the next `changes` (a new daemon, a failed send)."""
        self.sent = {name: value for name, value in self.sent.items() if not self.specs[name].live}

    def adopt(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The parameter values that show the daemon's `state` (/api/state's params), marked as sent."""
        values = td_values(self.specs.values(), state)
        self.sent.update(values)
        return values


# ---------------------------------------------------------------------------- status
def status_line(telemetry: Any, now: float, connected: bool) -> str:
    """What the Status parameter shows: the daemon's status with fps and latency, or why there is none.
    `connected`: a daemon writes the output ring (its heartbeat is fresh), whatever telemetry says."""
    if not connected:
        return "no daemon (Launch one, or start sdbridge serve)"
    if not telemetry.fresh(now):
        return "connected, no telemetry (check the Telemetry Port)"
    status = telemetry.get("status", "?")
    if telemetry.get("loading"):
        status += " (loading)"
    return f"{status} · {telemetry.get('fps', 0.0):.1f} fps · {telemetry.get('latency_ms', 0.0):.0f} ms"
