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

    @property
    def ranged(self) -> bool:
        """True for numbers with both bounds: these can be played as 0..1 faders (/norm/<name>)."""
        return self.kind in (int, float) and self.minimum is not None and self.maximum is not None

    def coerce(self, value: Any) -> Any:
        """`value` as this parameter's type, or ParamError. Ints pass for floats, whole floats for ints."""
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
        out: dict[str, Any] = {"name": self.name, "type": self.kind.__name__, "default": self.default,
                               "doc": self.doc, "live": self.live}
        if self.minimum is not None:
            out["min"] = self.minimum
        if self.maximum is not None:
            out["max"] = self.maximum
        if self.choices:
            out["choices"] = list(self.choices)
        if self.multiple_of != 1:
            out["multiple_of"] = self.multiple_of
        return out

    def _range_text(self) -> str:
        return f"{self.minimum}..{self.maximum}"


def _typename(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


PARAMS: tuple[Param, ...] = (
    Param("prompt", str, "a neon city street at night, cinematic, highly detailed",
          "Positive prompt."),
    Param("negative_prompt", str, "", "Negative prompt; used when guidance_scale is above 1."),
    Param("seed", int, 2, "Noise seed; -1 draws a new random seed every frame.",
          minimum=-1, maximum=INT32_MAX),
    Param("strength", float, 0.5,
          "img2img denoising strength: 0 returns the input through the autoencoder, 1 ignores it.",
          minimum=0.0, maximum=1.0),
    Param("guidance_scale", float, 1.0,
          "Classifier-free guidance; 1 or below turns it off (turbo and LCM models want it off).",
          minimum=0.0, maximum=20.0),
    Param("steps", int, 1, "Denoising steps per frame; 1 to 4 for turbo and LCM models.",
          minimum=1, maximum=50),
    Param("mode", str, "img2img", "img2img diffuses the input frames; txt2img needs no input.",
          choices=("img2img", "txt2img")),
    Param("similarity_threshold", float, 0.0,
          "Skip an input frame whose mean absolute difference from the last rendered one is below "
          "this fraction of full scale; 0 never skips.", minimum=0.0, maximum=1.0),
    Param("pause", bool, False, "1 holds the last output and stops rendering; 0 runs."),
    Param("width", int, 512, "Output width in pixels (a multiple of 8).",
          minimum=64, maximum=4096, multiple_of=8, live=False),
    Param("height", int, 512, "Output height in pixels (a multiple of 8).",
          minimum=64, maximum=4096, multiple_of=8, live=False),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}


def defaults() -> dict[str, Any]:
    return {p.name: p.default for p in PARAMS}


def lookup(name: str) -> Param:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ParamError(f"unknown parameter {name!r}") from None


def validate(changes: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Coerce every change, or raise ParamError for the first bad one (and apply none)."""
    items = changes.items() if isinstance(changes, Mapping) else changes
    return {name: lookup(name).coerce(value) for name, value in items}
