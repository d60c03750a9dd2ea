"""Daemon settings: what is fixed while a daemon runs (ports, names, devices, output format).

Settings and playable parameters share one namespace: a config file (TOML) or the command line may
give either, and the parameter values become the initial state. `Settings` is the single source of
the settings' names, defaults and docs; configs/default.toml restates them for people, and a test
keeps the two equal.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from engines.preprocess import PASSTHROUGH, PREPROCESSORS

from . import access, params

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file or flag the daemon cannot use; the message says which and why."""


def _setting(default: Any, doc: str, choices: tuple[str, ...] = (), metavar: str | None = None,
             flag: str | None = None, secret: bool = False) -> Any:
    """A setting; `flag` names its command-line flag where --<name> reads badly (a list's flag repeats, one
    item each: --controlnet NAME for `controlnets`); a `secret` one is left out of the settings' repr."""
    return field(default=default, repr=not secret,
                 metadata={"doc": doc, "choices": choices, "metavar": metavar, "flag": flag})


@dataclass(frozen=True)
class Settings:
    model: str = _setting("tiny", "Model: `tiny` or `tiny-xl` (built-in test models), a name from the models "
                          "folders (`sdbridge models` lists them), the path of a diffusers model folder or a "
                          ".safetensors checkpoint, or `random:sd15`, `random:sd21` or `random:sdxl` (full-size "
                          "architectures with random weights, for benchmarks: their images mean nothing).")
    models_dir: tuple[str, ...] = _setting(
        (), "Models folders: AUTOMATIC1111 or ComfyUI installs (or their models/ folders) or plain folders of "
        "checkpoints; several may be given (the flag repeats). Models, LoRAs, VAEs, TAESDs and embeddings are "
        "found there by name.", metavar="DIR")
    allow_pickle: bool = _setting(
        False, "Load pickle weight files (.ckpt, .pt, .pth, .bin). A pickle can run code when it is loaded, "
        "so they are refused unless you trust where they came from; even then they are read with "
        "torch.load(weights_only=True). Prefer .safetensors.")
    styles_file: str = _setting("", "A1111 styles.csv whose styles the `styles` parameter applies; empty: none.",
                                metavar="FILE")
    stream_batch: bool = _setting(
        False, "true runs all denoising steps of in-flight frames in one UNet call (StreamDiffusion's stream "
        "batch): higher fps with several steps, but each output is steps-1 frames behind its input; false "
        "renders each frame completely before the next (no lag).")
    presets_dir: str = _setting("", "Folder of presets (/preset/save NAME writes NAME.toml there, /preset/recall NAME "
                                "reads it back); empty: the user's (~/.config/sdbridge/presets, "
                                "%APPDATA%\\sdbridge\\presets).", metavar="DIR")
    preset: str = _setting("", "A preset recalled at start; parameters given in the config file or on the command "
                           "line override its values. Empty: none.", metavar="NAME")
    schedules_dir: str = _setting("", "Folder of keyframed schedules (/schedule/start NAME plays NAME.toml or NAME.json "
                                  "from there); empty: the user's (~/.config/sdbridge/schedules, "
                                  "%APPDATA%\\sdbridge\\schedules).", metavar="DIR")
    recordings_dir: str = _setting("", "Folder of recordings and snapshots (/record/start NAME writes NAME.mp4 there, "
                                   "/snapshot NAME writes NAME.png); empty: the user's "
                                   "(~/.config/sdbridge/recordings, %APPDATA%\\sdbridge\\recordings).", metavar="DIR")
    instance: str = _setting("default", "Instance name; shared-memory segments are sdb_<instance>_in/_out.")
    host: str = _setting("127.0.0.1", "Address the OSC, HTTP/WebSocket and OSCQuery servers bind to: 127.0.0.1 serves "
                         "this machine only; 0.0.0.0 every network (a phone as a controller, a tablet running "
                         "TouchOSC). Then other machines need the token for the web page and the WebSocket, and "
                         "must be in osc_allow to send OSC or use OSCQuery; this machine's clients need neither.")
    token: str = _setting("", "Password other machines give the web page, its API and the WebSocket when host is not "
                          "127.0.0.1 (the page's link carries it: http://HOST:PORT/?token=...; scripts may send "
                          "`Authorization: Bearer TOKEN`). At least 16 characters. Empty: one is made and kept in "
                          "~/.config/sdbridge/token (%APPDATA%\\sdbridge\\token), and the log shows the link.",
                          secret=True)
    osc_allow: tuple[str, ...] = _setting(
        (), "Other machines allowed to send OSC (and to use OSCQuery) when host is not 127.0.0.1: addresses or "
        "networks, such as 192.168.1.20 or 192.168.1.0/24 (the flag repeats). This machine always may. Empty: "
        "no other machine.", metavar="ADDRESS", flag="--osc-allow")
    max_message_rate: float = _setting(
        2000.0, "Messages a second one client may send (an OSC source, a WebSocket or OSCQuery connection, a web "
        "page's requests), after a burst of as many again; beyond it they are dropped, counted (telemetry "
        "`dropped`) and reported once a second. 0: no limit.")
    osc_port: int = _setting(9100, "UDP port for OSC control (0 picks a free port).")
    telemetry_host: str = _setting("127.0.0.1", "Where OSC telemetry (/sdbridge/...) is sent.")
    telemetry_port: int = _setting(9101, "UDP port telemetry is sent to.")
    telemetry_interval: float = _setting(0.5, "Seconds between telemetry updates.")
    http_port: int = _setting(9102, "TCP port of the web control page (http://HOST:PORT/), its JSON API (/api/schema, "
                              "/api/state) and the WebSocket (/ws) for control and frames (0 picks a free port).")
    oscquery_port: int = _setting(9103, "TCP port of the OSCQuery server: the parameter tree as JSON over HTTP, for "
                                  "VDMX, MadMapper, Chataigne, ossia score (0 picks a free port).")
    mdns: bool = _setting(True, "Advertise the OSCQuery server (_oscjson._tcp) and the OSC port (_osc._udp) over mDNS "
                          "(Bonjour, zeroconf), so that OSCQuery clients find the daemon by themselves; only when "
                          "host is not 127.0.0.1, since mDNS listens on every network (OSCQuery apps on this machine: "
                          "http://127.0.0.1:9103/).")
    max_width: int = _setting(1024, "Largest frame width the rings hold.")
    max_height: int = _setting(1024, "Largest frame height the rings hold.")
    slot_count: int = _setting(3, "Slots per ring (at least 2).")
    output_dtype: str = _setting("uint8", "Output pixel type.", ("uint8", "uint16", "float16", "float32"))
    output_channels: int = _setting(4, "Output channels: 1, 3 or 4 (RGBA, alpha 1).")
    output_order: str = _setting("rgb", "Output channel order.", ("rgb", "bgr"))
    output_origin: str = _setting("top-left", "Output row order; bottom-left is TouchDesigner's.",
                                  ("top-left", "bottom-left"))
    device: str = _setting("auto", "Torch device: auto (cuda if present, else cpu), cpu, cuda or cuda:N.")
    dtype: str = _setting("auto", "Compute precision: auto (float16 on CUDA, float32 on CPU), float16, bfloat16, float32.",
                          ("auto", "float16", "bfloat16", "float32"))
    cuda_graph: str = _setting(
        "auto", "Capture each frame's work as a CUDA graph and replay it (removes the CPU cost of launching "
        "thousands of kernels per frame): auto (on with CUDA), on, off.", ("auto", "on", "off"))
    compile: bool = _setting(
        False, "Compile the UNet with torch.compile (inductor, default mode). The first frame of each shape then takes "
        "a minute or more; the log says how long.")
    channels_last: str = _setting(
        "auto", "channels_last memory layout for the UNet and autoencoder (faster tensor-core convolutions): "
        "auto (on with CUDA), on, off.", ("auto", "on", "off"))
    backend: str = _setting(
        "auto", "What runs the UNet and autoencoder: torch, tensorrt (TensorRT engines; the daemon refuses to start "
        "without TensorRT and builds missing engines before serving), or auto (TensorRT engines when TensorRT is "
        "installed and the device is an NVIDIA GPU: engines already built serve at once, missing ones are built in "
        "the background while torch serves, then swapped in; torch otherwise). docs/tensorrt.md.",
        ("auto", "tensorrt", "torch"))
    engine_dir: str = _setting("", "Folder of built TensorRT engines (and their ONNX files); empty: the user's cache "
                               "folder (~/.cache/sdbridge/engines, %LOCALAPPDATA%\\sdbridge\\engines).", metavar="DIR")
    engine_resolutions: tuple[str, ...] = _setting(
        (), "Resolutions to build TensorRT engines for, as WIDTHxHEIGHT (the flag repeats); empty: the width and "
        "height parameters.", metavar="WxH")
    engine_dynamic: bool = _setting(
        False, "Also give each TensorRT engine a dynamic profile (any size from 256x256 to 1024x1024, prompts up to "
        "4 chunks), so a /resolution change runs on the engine at once; static profiles stay the fastest.")
    controlnets: tuple[str, ...] = _setting(
        (), "ControlNets to load beside the model, k = 0, 1, ... in this order: names in the models folders' "
        "ControlNet folders, paths, `tiny` (for the tiny models) or `random` (for random:<arch> models). Each reads "
        "its control images from the ring sdb_<instance>_cn<k> and is played live as /controlnet/<k>/scale, "
        "/start and /end.", metavar="NAME", flag="--controlnet")
    controlnet_preprocess: tuple[str, ...] = _setting(
        (), "What is done to ControlNet k's control images before it sees them, k by k as in controlnets: "
        "passthrough (the image is already the map the ControlNet wants: depth, pose, edges made in TouchDesigner) "
        "or canny (edges found on the GPU); ControlNets without an entry: passthrough.", metavar="NAME",
        flag="--controlnet-preprocess")
    canny_low: float = _setting(0.1, "Canny preprocessing: the lower hysteresis threshold, as a fraction of the "
                                "strongest edge (a black-to-white step; 0.1 is A1111's 100 on 8-bit images). Weaker "
                                "edges are dropped; edges between canny_low and canny_high stay where they touch a "
                                "strong one.")
    canny_high: float = _setting(0.2, "Canny preprocessing: the upper threshold, likewise (0.2 is A1111's 200); "
                                 "edges this strong always stay.")
    control_max_age: float = _setting(
        1.0, "Seconds after which a control ring counts as stale: its writer has sent neither a frame nor a "
        "heartbeat for that long (a writer that stopped or died). 0: never stale.")
    control_stale: str = _setting(
        "last", "What a ControlNet does while its control ring is stale: last (keeps steering with the last good "
        "control image) or off (stops steering until a fresh frame arrives). A ControlNet that has had no "
        "control image yet does not steer.", ("last", "off"))
    control_view: bool = _setting(
        True, "Write each preprocessed control image into the ring sdb_<instance>_cn<k>_view (in the output "
        "format), so the performer sees what the ControlNet sees.")
    prompt_cache_size: int = _setting(64, "Prompt embeddings kept for instant recall.")
    log_level: str = _setting("info", "Log level.", ("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        # lists from TOML or the command line become tuples (the settings are a frozen snapshot); ~ expands
        object.__setattr__(self, "models_dir", tuple(os.path.expanduser(str(d)) for d in self.models_dir))
        for name in ("styles_file", "engine_dir", "presets_dir", "schedules_dir", "recordings_dir"):
            if getattr(self, name):  # empty: the default, left empty
                object.__setattr__(self, name, os.path.expanduser(getattr(self, name)))
        object.__setattr__(self, "engine_resolutions", tuple(str(r) for r in self.engine_resolutions))
        object.__setattr__(self, "controlnets", tuple(self.controlnets))
        object.__setattr__(self, "controlnet_preprocess", tuple(self.controlnet_preprocess))
        for text in self.engine_resolutions:
            parse_resolution(text)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{f.name} = {value!r}: expected one of {', '.join(choices)}")
        if self.output_channels not in (1, 3, 4):
            raise ConfigError(f"output_channels = {self.output_channels}: expected 1, 3 or 4")
        if self.slot_count < 2:
            raise ConfigError("slot_count must be at least 2")
        if not self.telemetry_interval > 0:
            raise ConfigError("telemetry_interval must be above 0 seconds")
        object.__setattr__(self, "osc_allow", tuple(str(a) for a in self.osc_allow))
        try:
            access.Access(self.host, self.token, self.osc_allow)
        except access.AccessError as e:
            raise ConfigError(str(e)) from None
        if not self.max_message_rate >= 0 or math.isinf(self.max_message_rate):
            raise ConfigError("max_message_rate must be a number of messages a second, at least 0")
        for name in ("max_width", "max_height"):
            if getattr(self, name) < 64:
                raise ConfigError(f"{name} must be at least 64")
        self._check_controlnets()

    def _check_controlnets(self) -> None:
        if len(self.controlnets) > params.MAX_CONTROLNETS:
            raise ConfigError(f"{len(self.controlnets)} controlnets; at most {params.MAX_CONTROLNETS}")
        if len(self.controlnet_preprocess) > len(self.controlnets):
            raise ConfigError(f"controlnet_preprocess has {len(self.controlnet_preprocess)} entries for "
                              f"{len(self.controlnets)} controlnets: one entry per ControlNet, in their order")
        for name in self.controlnet_preprocess:
            if name not in PREPROCESSORS:
                raise ConfigError(f"controlnet_preprocess {name!r}: expected one of {', '.join(PREPROCESSORS)}")
        if not 0.0 <= self.canny_low <= self.canny_high <= 1.0:
            raise ConfigError(f"canny_low = {self.canny_low}, canny_high = {self.canny_high}: expected "
                              "0 <= canny_low <= canny_high <= 1")
        if not self.control_max_age >= 0 or math.isinf(self.control_max_age):
            raise ConfigError("control_max_age must be a number of seconds, at least 0")

    def preprocess(self, k: int) -> str:
        """ControlNet k's preprocessor."""
        return self.controlnet_preprocess[k] if k < len(self.controlnet_preprocess) else PASSTHROUGH


def user_folder() -> Path:
    """The user's sdbridge folder (presets, the kept token): %APPDATA%\\sdbridge on Windows,
    ~/.config/sdbridge elsewhere ($XDG_CONFIG_HOME honoured)."""
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming") / "sdbridge"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "sdbridge"


def parse_resolution(text: str) -> tuple[int, int]:
    """"768x512" to (768, 512); ConfigError for anything else."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"resolution {text!r}: expected WIDTHxHEIGHT, such as 768x512") from None
    if width < 64 or height < 64 or width % 8 or height % 8:
        raise ConfigError(f"resolution {text!r}: width and height must be multiples of 8, at least 64")
    return width, height


SETTING_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def split(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate settings from initial parameter values; unknown keys are an error.

    A TOML table is a parameter family: `[lora]` with `detail = 0.6` is the parameter `lora/detail`."""
    settings, initial = {}, {}
    for key, value in values.items():
        if key in SETTING_FIELDS:
            settings[key] = _setting_value(key, value)
        elif isinstance(value, Mapping):
            for name, item in value.items():
                initial.update(split({f"{key}/{name}": item})[1])
        else:
            try:
                param = params.lookup(key)
            except params.ParamError:
                raise ConfigError(f"unknown setting {key!r}") from None
            try:
                initial[key] = param.coerce(value)
            except params.ParamError as e:
                raise ConfigError(str(e)) from None
    return settings, initial


def _setting_value(key: str, value: Any) -> Any:
    expected = type(SETTING_FIELDS[key].default)
    if expected is tuple:  # a list of strings (folders)
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} = {value!r}: expected a list of strings, e.g. {key} = [\"D:/models\"]")
        return tuple(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
        raise ConfigError(f"{key} = {value!r}: expected {expected.__name__}")
    return value


def initial_params() -> tuple[params.Param, ...]:
    """The parameters a config file or flag sets; one that is also a setting (`model`) is set through
    the setting, which the daemon makes its initial value."""
    return tuple(p for p in params.PARAMS if p.name not in SETTING_FIELDS)


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> tuple[Settings, dict[str, Any]]:
    """Settings and initial parameters from an optional TOML file, then `overrides` (the command line)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    values.update(overrides or {})
    settings, initial = split(values)
    return Settings(**settings), initial


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # a JSON string is a TOML basic string, once DEL is escaped too (JSON leaves it, TOML forbids it raw)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    return repr(value)


def to_toml(settings: Settings, initial: Mapping[str, Any]) -> str:
    """A config file that `load` turns back into these settings and initial parameters (for a child
    process that must see what this one sees, such as a background engine build)."""
    lines = [f"{f.name} = {_toml_value(getattr(settings, f.name))}" for f in dataclasses.fields(Settings)]
    return "\n".join(lines) + "\n" + parameters_toml({k: v for k, v in initial.items() if k not in SETTING_FIELDS})


def parameters_toml(values: Mapping[str, Any]) -> str:
    """Parameter values as config-file lines: plain keys first, then a table per family ([lora],
    [controlnet.0] is written ["controlnet"] with "0/scale" keys), since a table ends the top level."""
    lines = []
    families: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        family, _, member = name.partition("/")
        if member:
            families.setdefault(family, {})[member] = value
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    for family, members in families.items():
        lines.append(f"[{family}]")
        lines += [f"{json.dumps(member)} = {_toml_value(value)}" for member, value in members.items()]
    return "\n".join(lines) + "\n"


def load_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters of a file of parameters only (a preset), validated. ConfigError for a file that
    is missing or unreadable, or holds a setting, an unknown key or a bad value."""
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    parameters = {k: v for k, v in values.items() if k in params.BY_NAME}  # `model` is also a setting
    settings, initial = split({k: v for k, v in values.items() if k not in parameters})
    if settings:
        raise ConfigError(f"{path} holds settings ({', '.join(settings)}), which a preset cannot change")
    try:
        initial.update(params.validate(parameters))
    except params.ParamError as e:
        raise ConfigError(str(e)) from None
    return initial


def render_default_toml() -> str:
    """configs/default.toml, generated from the declarations so that it cannot drift from them."""
    lines = [
        "# sdbridge settings and initial parameters, with their defaults.",
        "# Use: sdbridge serve --config FILE. Any key may be left out; command-line flags override the file.",
        "# Generated from bridge/config.py and bridge/params.py: python -m bridge.config > configs/default.toml",
        "",
        "# ---- settings: fixed while the daemon runs",
    ]
    for f in dataclasses.fields(Settings):
        choices = f.metadata.get("choices")
        doc = f.metadata["doc"] + (f" One of: {', '.join(choices)}." if choices else "")
        lines += [f"# {doc}", f"{f.name} = {_toml_value(f.default)}", ""]
    lines.append("# ---- parameters: initial values; play them live over OSC as /<name>")
    for p in initial_params():
        extra = []
        if p.ranged:
            extra.append(f"Range {p.minimum} to {p.maximum}.")
        if p.choices:
            extra.append(f"One of: {', '.join(p.choices)}.")
        lines += [f"# {' '.join([p.doc, *extra])}", f"{p.name} = {_toml_value(p.default)}", ""]
    lines += [
        "# ---- ControlNet k's scale, start and end (k as in controlnets): a table per ControlNet, played",
        "# live over OSC as /controlnet/<k>/scale, /start and /end. After every key above, like [lora].",
        "# [controlnet.0]",
        "# scale = 0.8",
        "# end = 0.75",
        "",
        "# ---- LoRA weights: a table of LoRA names (as `sdbridge models` lists them) and initial weights,",
        "# played live over OSC as /lora/<name>. Must come after every key above (a TOML table ends the top level).",
        "# [lora]",
        "# \"sd15/detail_tweaker\" = 0.6",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_default_toml(), end="")
