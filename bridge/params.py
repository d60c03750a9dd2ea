"""THE parameter schema: every value a performer can play, declared once.

OSC addresses (`/<name>`, `/norm/<name>`), validation, defaults, config keys, command-line flags and
documentation all derive from `PARAMS`. Add a parameter here and every surface gets it.
This module knows nothing of sockets, threads or models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

INT32_MAX = 2**31 - 1


class ParamError(ValueError):
    """A value a parameter refuses; the message names the parameter and says what it accepts."""


@dataclass(frozen=True)
class Param:
    """One playable parameter.

    `live` parameters take effect at the next frame; the others trigger slow work (re-allocation,
    rebuild) that the engine does before the next frame that uses them.
    """

    name: str
    kind: type  # float, int, str or bool
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    multiple_of: int = 1
    max_length: int = 4096
    live: bool = True
    # list parameters (kind is tuple): the kinds of one entry, e.g. (str, float) for [text, weight]
    # pairs, (int,) for a list of ints; entries are checked like scalars against minimum/maximum
    # (the number in a pair is checked against item_range instead).
    entry: tuple[type, ...] = ()
    item_range: tuple[float, float] | None = None
    max_items: int = 16
    increasing: bool = False  # list parameters: entries strictly increasing
    clears: tuple[str, ...] = ()  # setting this parameter alone resets these to their defaults

    @property
    def ranged(self) -> bool:
        """True for numbers with both bounds: these can be played as 0..1 faders (/norm/<name>)."""
        return self.kind in (int, float) and self.minimum is not None and self.maximum is not None

    def coerce(self, value: Any) -> Any:
        """`value` as this parameter's type, or ParamError. Ints pass for floats, whole floats for ints."""
        if self.kind is tuple:
            return self._coerce_list(value)
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ParamError(f"{self.name}: expected 0 or 1, got {value!r}")
        if self.kind is str:
            if not isinstance(value, str):
                raise ParamError(f"{self.name}: expected a string, got {_typename(value)}")
            if len(value) > self.max_length:
                raise ParamError(f"{self.name}: {len(value)} characters; at most {self.max_length}")
            if self.choices and value not in self.choices:
                raise ParamError(f"{self.name}: {value!r} is not one of {', '.join(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{self.name}: expected a number, got {_typename(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamError(f"{self.name}: {value} is not a finite number")
        if self.kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ParamError(f"{self.name}: expected a whole number, got {value}")
                value = int(value)
            if value % self.multiple_of:
                raise ParamError(f"{self.name}: {value} is not a multiple of {self.multiple_of}")
        else:
            value = float(value)
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise ParamError(f"{self.name}: {value} is out of range {self._range_text()}")
        return value

    def _coerce_list(self, value: Any) -> tuple:
        """A list parameter: a flat sequence (as OSC sends it: s f s f) or a nested one (JSON, TOML)."""
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ParamError(f"{self.name}: expected a list, got {_typename(value)}")
        width = len(self.entry)
        if width > 1 and all(isinstance(v, (list, tuple)) for v in value):
            entries = [tuple(v) for v in value]
        elif width > 1:
            if len(value) % width:
                raise ParamError(f"{self.name}: expected {self._entry_text()} groups, got {len(value)} values")
            entries = [tuple(value[i:i + width]) for i in range(0, len(value), width)]
        else:
            entries = [(v,) for v in value]
        if len(entries) > self.max_items:
            raise ParamError(f"{self.name}: {len(entries)} entries; at most {self.max_items}")
        out = []
        for entry in entries:
            if len(entry) != width:
                raise ParamError(f"{self.name}: expected {self._entry_text()} groups, got {list(entry)!r}")
            items = []
            for i, (kind, item) in enumerate(zip(self.entry, entry)):
                bounds = self.item_range if (width > 1 and kind is float) else (self.minimum, self.maximum)
                scalar = Param(self.name, kind, None, "", minimum=bounds[0] if bounds else None,
                               maximum=bounds[1] if bounds else None, max_length=self.max_length)
                items.append(scalar.coerce(item))
            out.append(tuple(items) if width > 1 else items[0])
        if width > 1 and out and self.item_range and not any(entry[-1] > 0 for entry in out):
            raise ParamError(f"{self.name}: at least one weight must be above 0 (send an empty list to end the blend)")
        if self.increasing and any(b <= a for a, b in zip(out, out[1:])):
            raise ParamError(f"{self.name}: entries must be strictly increasing, got {out}")
        return tuple(out)

    def _entry_text(self) -> str:
        return "(" + ", ".join(k.__name__ for k in self.entry) + ")"

    def from_norm(self, fraction: Any) -> Any:
        """Map a 0..1 fader value onto this parameter's range (ints snap to the nearest allowed value)."""
        if not self.ranged:
            raise ParamError(f"{self.name} has no numeric range to normalise")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ParamError(f"/norm/{self.name}: expected a number from 0.0 to 1.0, got {fraction!r}")
        value = self.minimum + float(fraction) * (self.maximum - self.minimum)
        if self.kind is int:
            step = self.multiple_of
            value = int(round(value / step) * step)
            value = max(int(self.minimum), min(int(self.maximum), value))
        return self.coerce(value)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for schemas and generated docs."""
        out: dict[str, Any] = {"name": self.name, "type": "list" if self.kind is tuple else self.kind.__name__,
                               "default": json_value(self.default),
                               "doc": self.doc, "live": self.live}
        if self.entry:
            out["entry"] = [k.__name__ for k in self.entry]
        if self.minimum is not None:
            out["min"] = self.minimum
        if self.maximum is not None:
            out["max"] = self.maximum
        if self.choices:
            out["choices"] = list(self.choices)
        if self.multiple_of != 1:
            out["multiple_of"] = self.multiple_of
        if self.clears:
            out["clears"] = list(self.clears)
        return out

    def _range_text(self) -> str:
        return f"{self.minimum}..{self.maximum}"


def _typename(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


PARAMS: tuple[Param, ...] = (
    Param("prompt", str, "a neon city street at night, cinematic, highly detailed",
          "Positive prompt, A1111 syntax: (word), [word], (word:1.3), BREAK, <lora:name:weight>, "
          "textual-inversion embedding names. Setting it alone ends a prompt blend.", clears=("prompts",)),
    Param("negative_prompt", str, "", "Negative prompt, A1111 syntax; used wherever guidance runs."),
    Param("prompts", tuple, (), "Prompt blend: [text, weight] pairs mixed by weight (weights need not sum "
          "to 1); empty uses `prompt`. Over OSC: /prompts s f s f ...", entry=(str, float),
          item_range=(0.0, 100.0), max_items=8),
    Param("styles", str, "", "Comma-separated names of styles from styles_file (A1111 styles.csv) applied "
          "to the prompts; a style with {prompt} wraps the prompt, others are appended.", max_length=1024),
    Param("clip_skip", int, 1, "Text-encoder layers to skip from the end, A1111 numbering: 1 uses the last "
          "layer, 2 the penultimate.", minimum=1, maximum=12),
    Param("seed", int, 2, "Noise seed; -1 draws a new random seed every frame. Setting it alone ends a "
          "seed blend.", minimum=-1, maximum=INT32_MAX, clears=("seeds",)),
    Param("seeds", tuple, (), "Seed blend: [seed, weight] pairs whose noises are slerped by weight; empty "
          "uses `seed`. Over OSC: /seeds i f i f ...", entry=(int, float), minimum=0, maximum=INT32_MAX,
          item_range=(0.0, 100.0), max_items=8),
    Param("subseed", int, 0, "A1111 variation seed, mixed into the seed's noise by subseed_strength.",
          minimum=0, maximum=INT32_MAX),
    Param("subseed_strength", float, 0.0, "How much of the variation seed's noise to slerp in: 0 none, "
          "1 only the variation seed.", minimum=0.0, maximum=1.0),
    Param("transition_frames", int, 0, "Frames over which a new prompt or seed eases in from the old one; "
          "0 switches at once.", minimum=0, maximum=600),
    Param("strength", float, 0.5,
          "img2img denoising strength: 0 returns the input through the autoencoder, 1 ignores it.",
          minimum=0.0, maximum=1.0),
    Param("guidance_scale", float, 1.0,
          "Classifier-free guidance; 1 or below turns it off (turbo and LCM models want it off).",
          minimum=0.0, maximum=20.0),
    Param("steps", int, 1, "Denoising steps per frame; 1 to 4 for turbo and LCM models.",
          minimum=1, maximum=50),
    Param("t_index_list", tuple, (), "Expert override of strength and steps: indices (0 to 49, increasing) "
          "into a 50-step LCM schedule, index i being timestep 999 - 20*i, as StreamDiffusion's "
          "t_index_list; empty uses strength and steps.", entry=(int,), minimum=0, maximum=49, max_items=8,
          increasing=True),
    Param("cfg_type", str, "full", "How guidance gets its negative prediction when guidance_scale is above "
          "1: full (a second UNet pass, exact), self (estimated from the noise itself: no extra pass), "
          "initialize (one negative pass at the first step, then self), none (no guidance).",
          choices=("none", "full", "self", "initialize")),
    Param("delta", float, 1.0, "Residual-CFG delta: scales the estimated negative prediction of cfg_type "
          "self and initialize.", minimum=0.0, maximum=5.0),
    Param("mode", str, "img2img", "img2img diffuses the input frames; txt2img needs no input.",
          choices=("img2img", "txt2img")),
    Param("similarity_threshold", float, 0.0,
          "Skip an input frame whose mean absolute difference from the last rendered one is below "
          "this fraction of full scale; 0 never skips.", minimum=0.0, maximum=1.0),
    Param("feedback", float, 0.0, "Temporal coherence, latent feedback: the fraction of the previous output's "
          "latent blended into each new input frame's latent before it is noised (img2img). Steadies video "
          "input; high values trail behind motion. 0 off.", minimum=0.0, maximum=0.95),
    Param("noise_lock", float, 0.0, "Temporal coherence, noise locking: how much of the previous frame's noise "
          "each frame keeps when the noise is new every frame (seed -1): 1 locks it, 0 draws it afresh, "
          "between lets it drift slowly. A fixed seed's noise is already the same every frame.",
          minimum=0.0, maximum=1.0),
    Param("cached_attention", float, 0.0, "Temporal coherence, cached attention (StreamV2V's feature bank): "
          "the weight with which every UNet self-attention also attends to the previous frame's keys and "
          "values, so textures hold still on moving input. 0 off; costs extra attention work; torch "
          "backend only.", minimum=0.0, maximum=1.0),
    Param("pause", bool, False, "1 holds the last output and stops rendering; 0 runs."),
    Param("model", str, "", "Model to switch to by its name in the models folders (loaded in the background "
          "while the current one keeps serving; a failed load keeps the current one). Setting it alone "
          "sets vae back to auto, since a VAE belongs to a model family.", max_length=512, live=False,
          clears=("vae",)),
    Param("vae", str, "auto", "Autoencoder: auto (a TAESD for the model if one is found, else its own "
          "VAE), model (the model's own VAE), taesd, or a VAE name from the models folders.", max_length=512,
          live=False),
    Param("width", int, 512, "Output width in pixels (a multiple of 8).",
          minimum=64, maximum=4096, multiple_of=8, live=False),
    Param("height", int, 512, "Output height in pixels (a multiple of 8).",
          minimum=64, maximum=4096, multiple_of=8, live=False),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}

# Parameter families: one Param per name under a prefix, made on demand: lora/<name>, controlnet/<k>/<field>.
LORA_PREFIX = "lora/"
LORA_RANGE = (-5.0, 5.0)


def lora_param(name: str) -> Param:
    """The weight of the LoRA `name` (a name in the models folders' LoRA list)."""
    if not name or len(name) > 256:
        raise ParamError(f"bad LoRA name {name!r}")
    return Param(LORA_PREFIX + name, float, 0.0, f"Weight of the LoRA {name}; 0 turns it off.",
                 minimum=LORA_RANGE[0], maximum=LORA_RANGE[1])


CONTROLNET_PREFIX = "controlnet/"
# /controlnet/<k>/<field>: the conditioning scale, and the fractions of the schedule where it acts
CONTROLNET_FIELDS: dict[str, tuple[float, float, float, str]] = {
    "scale": (1.0, 0.0, 5.0, "conditioning scale; 0 turns it off without a reload"),
    "start": (0.0, 0.0, 1.0, "fraction of the steps where it starts acting"),
    "end": (1.0, 0.0, 1.0, "fraction of the steps where it stops acting (at or below start: it never acts)"),
}
MAX_CONTROLNETS = 8


def controlnet_param(k: int, field: str) -> Param:
    """Field `field` (scale, start or end) of ControlNet k (0, 1, ...: the order of the `controlnets` setting)."""
    if field not in CONTROLNET_FIELDS or not 0 <= k < MAX_CONTROLNETS:
        raise ParamError(f"unknown parameter {CONTROLNET_PREFIX}{k}/{field}; ControlNet parameters are "
                         f"controlnet/<k>/{'|'.join(CONTROLNET_FIELDS)} with k from 0")
    default, low, high, doc = CONTROLNET_FIELDS[field]
    return Param(f"{CONTROLNET_PREFIX}{k}/{field}", float, default, f"ControlNet {k}: {doc}.", minimum=low,
                 maximum=high)


def controlnet_params(count: int) -> tuple[Param, ...]:
    """Every parameter of `count` ControlNets, k by k."""
    return tuple(controlnet_param(k, field) for k in range(count) for field in CONTROLNET_FIELDS)


def controlnet_index(name: str) -> int | None:
    """k of a valid parameter name controlnet/<k>/<field>; None for any other parameter."""
    return int(name.split("/")[1]) if name.startswith(CONTROLNET_PREFIX) else None


def controls(values: Mapping[str, Any]) -> tuple[tuple[float, float, float], ...]:
    """(scale, start, end) of ControlNets 0, 1, ... in a parameter state, up to the highest k it holds
    (the daemon's state holds every configured ControlNet's three parameters)."""
    indices = [k for k in map(controlnet_index, values) if k is not None]

    def value(k: int, field: str) -> float:
        return values.get(f"{CONTROLNET_PREFIX}{k}/{field}", CONTROLNET_FIELDS[field][0])
    return tuple((value(k, "scale"), value(k, "start"), value(k, "end")) for k in range(max(indices, default=-1) + 1))


def schema_params(loras: Iterable[str] = (), controlnet_count: int = 0) -> tuple[Param, ...]:
    """Every parameter a daemon serves: the fixed ones, the weight of each LoRA in `loras` and the
    fields of `controlnet_count` ControlNets. The web page, /api/schema and OSCQuery list these."""
    return PARAMS + tuple(lora_param(name) for name in loras) + controlnet_params(controlnet_count)


def json_value(value: Any) -> Any:
    """A parameter value as JSON writes it: list parameters' tuples become lists (of lists)."""
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    return value


def defaults() -> dict[str, Any]:
    return {p.name: p.default for p in PARAMS}


def lookup(name: str) -> Param:
    if name.startswith(LORA_PREFIX):
        return lora_param(name[len(LORA_PREFIX):])
    if name.startswith(CONTROLNET_PREFIX):
        index, _, field = name[len(CONTROLNET_PREFIX):].partition("/")
        if not (index.isascii() and index.isdigit() and str(int(index)) == index):  # one spelling per k: "1", not "01"
            raise ParamError(f"unknown parameter {name!r}; ControlNet parameters are controlnet/<k>/scale|start|end")
        return controlnet_param(int(index), field)
    try:
        return BY_NAME[name]
    except KeyError:
        raise ParamError(f"unknown parameter {name!r}") from None


def lora_weights(values: Mapping[str, Any]) -> dict[str, float]:
    """The LoRA weights in a parameter state: {name: weight} from its lora/<name> entries."""
    return {k[len(LORA_PREFIX):]: v for k, v in values.items() if k.startswith(LORA_PREFIX)}


def validate(changes: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Coerce every change, or raise ParamError for the first bad one (and apply none)."""
    items = changes.items() if isinstance(changes, Mapping) else changes
    out = {name: lookup(name).coerce(value) for name, value in items}
    for name in list(out):  # /prompt alone ends a prompt blend; with /prompts in the same set, both stand
        for cleared in lookup(name).clears:
            out.setdefault(cleared, BY_NAME[cleared].default)
    return out
