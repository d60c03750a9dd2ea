"""Morphs: from the current look to a preset over some seconds, as a pure function of elapsed time.

`Morph(start, target, seconds, easing)` is made once from the whole current state and the change set
that recalls the preset (`Presets.recall`); `morph.at(elapsed)` is the change set to apply at that
moment. A driver thread calls it many times a second and applies the result with compare-and-set; at
`elapsed >= seconds` it is the target's values exactly, so a morph ends where a plain recall would.

How each parameter travels, with the eased fraction a = easing(elapsed / seconds):
- numbers (floats, `lora/<name>`, `controlnet/<k>/<field>`, and ints such as `steps` and
  `transition_frames`, rounded) are interpolated linearly by a; a LoRA the target lacks goes to 0, one
  the start lacks starts at 0;
- the prompt becomes a `prompts` blend whose weights are the start look's share 1 - a and the target
  look's share a, so the engine's weighted mean of cached embeddings is (1 - a) E_start + a E_target;
  `prompt` itself is kept until the end. A blend that would need more than 8 entries switches at a = 0.5;
- the seed becomes a `seeds` blend with shares cos(a pi/2) and sin(a pi/2): the engine mixes noises as
  sum(w n) / |w|, so for independent noises this is the slerp from the start noise to the target's.
  A seed of -1 (new noise every frame) cannot be slerped: the seed switches at once;
- everything else (other strings, switches, choices, sizes, the model, `clip_skip`, `subseed`,
  `t_index_list`, `negative_prompt`, which the parameters cannot blend) switches at a = 0.5;
- `pause` is never driven.

This module knows nothing of threads, clocks, sockets or engines; it knows the parameter schema.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

from . import params

log = logging.getLogger(__name__)


def _linear(x: float) -> float:
    return x


def _smoothstep(x: float) -> float:
    return x * x * (3 - 2 * x)


def _ease_in(x: float) -> float:
    return x * x * x


def _ease_out(x: float) -> float:
    return 1 - (1 - x) ** 3


def _ease_in_out(x: float) -> float:
    return 4 * x * x * x if x < 0.5 else 1 - (2 - 2 * x) ** 3 / 2


# name -> curve from 0..1 onto 0..1, each increasing with f(0) = 0 and f(1) = 1
EASINGS: dict[str, Callable[[float], float]] = {
    "linear": _linear,
    "smoothstep": _smoothstep,
    "ease-in": _ease_in,
    "ease-out": _ease_out,
    "ease-in-out": _ease_in_out,
}
DEFAULT_EASING = "smoothstep"

NOT_DRIVEN = ("pause",)  # a morph changes the look, never whether the show runs
SWITCH_AT = 0.5  # the eased fraction at which parameters that cannot be interpolated switch
# Ints that are names or counts of something discrete: an in-between value means nothing (a seed), or
# costs slow work for a state shown for a moment (clip_skip re-encodes every prompt, a size reallocates).
SWITCHED_INTS = frozenset({"seed", "subseed", "clip_skip", "width", "height"})
MAX_BLEND = 8  # the entries `prompts` and `seeds` hold (params)

_PROMPT_GROUP = ("prompt", "prompts")
_SEED_GROUP = ("seed", "seeds")


class MorphError(ValueError):
    """A morph that cannot be made; the message says what it accepts."""


def linked(name: str) -> tuple[str, ...]:
    """The parameters that stand or fall with `name` in a change set: itself, those it clears and those
    that clear it (prompt and prompts, seed and seeds, model and vae). A driver that lets one go because
    the performer changed it lets all of these go, or its next change set would undo the performer's
    (emitting `prompts` would override a performer's `prompt`; `model` alone would reset `vae`)."""
    param = params.lookup(name)
    clearing = tuple(p.name for p in params.PARAMS if name in p.clears)
    return (name, *param.clears, *clearing)


class Morph:
    """A morph from `start` (the whole current state, snapshot values) to `target` (the change set of a
    recall, validated values) over `seconds` (0: jump), eased by `easing` (one of EASINGS).

    `keys` are the parameters it drives: those whose target differs from the start, with the ones they
    clear; `at(elapsed)` holds a valid value (params.validate leaves it as it is) for each of them."""

    def __init__(self, start: Mapping[str, Any], target: Mapping[str, Any], seconds: float,
                 easing: str = DEFAULT_EASING):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
                or seconds < 0:
            raise MorphError(f"morph time {seconds!r}: expected a number of seconds, 0 or more")
        if easing not in EASINGS:
            raise MorphError(f"easing {easing!r}: expected one of {', '.join(EASINGS)}")
        self.seconds = float(seconds)
        self.easing = easing
        self._curve = EASINGS[easing]
        wanted = params.validate({k: v for k, v in target.items() if k not in NOT_DRIVEN})
        for name in params.lora_weights(start):  # a preset is the whole look: LoRAs it lacks are off
            wanted.setdefault(params.LORA_PREFIX + name, 0.0)
        named = set(wanted)
        for group in (_PROMPT_GROUP, _SEED_GROUP):  # a blend needs the whole start look, driven or not
            if named.intersection(group):
                named.update(group)
        self._start = {name: start[name] if name in start else params.lookup(name).default for name in named}
        self._target = wanted
        driven = {name for name in wanted if self._start[name] != wanted[name]}
        for name in list(driven):  # emitted alone, a parameter would reset the ones it clears
            driven.update(c for c in params.lookup(name).clears if c in wanted)
        self.keys: tuple[str, ...] = tuple(name for name in wanted if name in driven)
        self._prompts = self._prompt_blend()
        self._seeds = self._seed_blend()
        if self._prompts is None and any(k in driven for k in _PROMPT_GROUP):
            log.info("prompt morph needs more than %d blend entries: the prompt switches half-way", MAX_BLEND)

    def __repr__(self) -> str:
        return f"Morph({len(self.keys)} parameters over {self.seconds:g} s, {self.easing})"

    def done(self, elapsed: float) -> bool:
        """True once `elapsed` seconds reach the morph's time: `at` is the target from then on."""
        return elapsed >= self.seconds

    def fraction(self, elapsed: float) -> float:
        """The eased fraction a of the way at `elapsed` seconds, 0 to 1 (for progress displays)."""
        if self.done(elapsed):
            return 1.0
        return self._curve(min(1.0, max(0.0, elapsed / self.seconds)))

    def at(self, elapsed: float) -> dict[str, Any]:
        """The change set at `elapsed` seconds: a value for every name in `keys`. Before the start it is
        the start; at and after the end, exactly the target's values."""
        if self.done(elapsed):
            return {name: self._target[name] for name in self.keys}
        a = self.fraction(elapsed)
        out = {name: self._value(name, a) for name in self.keys}
        for group, blend in ((_PROMPT_GROUP, self._prompts), (_SEED_GROUP, self._seeds)):
            out.update(self._group(group, blend, a))
        return out

    def _value(self, name: str, a: float) -> Any:
        """A parameter outside the prompt and seed groups at eased fraction a (0 <= a < 1)."""
        param = params.lookup(name)
        start, target = self._start[name], self._target[name]
        if param.kind is float:
            value = start + (target - start) * a
            return min(param.maximum, max(param.minimum, value)) if param.ranged else value
        if param.kind is int and name not in SWITCHED_INTS:
            step = param.multiple_of
            value = int(math.floor((start + (target - start) * a) / step + 0.5)) * step
            return min(int(param.maximum), max(int(param.minimum), value)) if param.ranged else value
        return target if a >= SWITCH_AT else start

    def _group(self, group: tuple[str, str], blend: Callable[[float], tuple] | None, a: float) -> dict[str, Any]:
        """prompt and prompts, or seed and seeds, at eased fraction a (0 <= a < 1), for those driven."""
        names = [n for n in group if n in self.keys]
        if not names:
            return {}
        scalar = group[0]
        if blend is None:  # cannot blend: switch at half (or, for seed -1, at once)
            switched = a >= SWITCH_AT or (group == _SEED_GROUP and self._random_seed())
            return {n: (self._target if switched else self._start)[n] for n in names}
        if a <= 0:
            return {n: self._start[n] for n in names}
        # the scalar stays as it was (a set holding both stands: validate's clears do not fire)
        return {n: self._start[n] if n == scalar else blend(a) for n in names}

    def _look_set(self, values: Mapping[str, Any], group: tuple[str, str]) -> list[tuple[Any, float]]:
        """The look's blend: the list parameter's entries with weight, else the scalar at weight 1."""
        scalar, listed = group
        entries = [(key, float(w)) for key, w in values.get(listed, ()) if w > 0]
        return entries or [(values[scalar], 1.0)]

    def _ends(self, group: tuple[str, str]) -> tuple[list[tuple[Any, float]], list[tuple[Any, float]]]:
        """The start look's and the target look's blends of `group`."""
        end = {**self._start, **self._target}
        return self._look_set(self._start, group), self._look_set(end, group)

    def _prompt_blend(self) -> Callable[[float], tuple] | None:
        """The `prompts` value at a: weights normalised per look to sum 1 (the engine divides by the sum),
        then start's times 1 - a and target's times a; None if it would need more than MAX_BLEND entries."""
        if not any(n in self._target for n in _PROMPT_GROUP):
            return None
        first, last = self._ends(_PROMPT_GROUP)
        if len({t for t, _ in first} | {t for t, _ in last}) > MAX_BLEND:
            return None
        first_total, last_total = sum(w for _, w in first), sum(w for _, w in last)
        return lambda a: _merge([(t, w / first_total * (1 - a)) for t, w in first],
                                [(t, w / last_total * a) for t, w in last])

    def _random_seed(self) -> bool:
        """True if either end draws new noise every frame (seed -1 with no blend): nothing to slerp."""
        end = {**self._start, **self._target}
        return any(look.get("seed") == -1 and not look.get("seeds") for look in (self._start, end))

    def _seed_blend(self) -> Callable[[float], tuple] | None:
        """The `seeds` value at a: weights normalised per look to length 1 (the engine divides by the
        length), then start's times cos(a pi/2) and target's times sin(a pi/2); None if it cannot blend."""
        if not any(n in self._target for n in _SEED_GROUP) or self._random_seed():
            return None
        first, last = self._ends(_SEED_GROUP)
        if len({s for s, _ in first} | {s for s, _ in last}) > MAX_BLEND:
            return None
        first_norm = math.sqrt(sum(w * w for _, w in first))
        last_norm = math.sqrt(sum(w * w for _, w in last))
        return lambda a: _merge([(s, w / first_norm * math.cos(a * math.pi / 2)) for s, w in first],
                                [(s, w / last_norm * math.sin(a * math.pi / 2)) for s, w in last])


def _merge(first: list[tuple[Any, float]], last: list[tuple[Any, float]]) -> tuple[tuple[Any, float], ...]:
    """Two weighted sets as one blend value: an entry in both gets the sum of its weights; zero weights go."""
    weights: dict[Any, float] = {}
    for key, weight in [*first, *last]:
        weights[key] = weights.get(key, 0.0) + weight
    return tuple((key, weight) for key, weight in weights.items() if weight > 0)
