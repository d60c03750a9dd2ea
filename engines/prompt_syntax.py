"""A1111 prompt syntax and styles: prompt text -> weighted fragments, chunk groups and LoRA tags.

This module owns the grammar that AUTOMATIC1111's web UI made the de-facto standard, so that prompts
copied from a model page or an A1111 session mean the same thing here:

- emphasis: `(x)` multiplies the weight of x by 1.1, `[x]` divides it by 1.1, `(x:1.5)` multiplies it
  by 1.5; nesting multiplies. An unclosed `(` or `[` applies to the rest of the prompt; a closing
  bracket with nothing open is literal text; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal
  characters. `(x:word)` is not a weight: the text is `x:word` and the default 1.1 applies.
- `BREAK` (uppercase, a whole word) ends a chunk group: what follows starts a new 77-token chunk.
- extra-network tags `<lora:name:weight>` (or `<lyco:...>`) are taken out of the text and reported;
  other tags (`<hypernet:...>` and the like) are taken out and listed as ignored.
- styles (A1111's styles.csv): named prompt / negative-prompt templates merged into the user's text.

It is pure Python: it knows nothing of tokenizers or tensors (engines/prompts turns a ParsedPrompt
into embeddings) and is written from the behaviour above, not from A1111's code.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
LORA_TAGS = ("lora", "lyco")  # LyCORIS tags are loaded like LoRAs, as A1111's extension does

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# what may follow the `:` of an explicit weight, up to and including its `)`
_WEIGHT = re.compile(r"\s*([+-]?[0-9.]+)\s*\)")
_ESCAPABLE = "()[]\\"
_SPECIAL = "()[]:\\"


class PromptSyntaxError(ValueError):
    """A prompt that cannot be read (only malformed extra-network tags are errors; emphasis never is)."""


class StyleError(ValueError):
    """A styles file that cannot be read; the message names the file and what is wrong with it."""


class Fragment(NamedTuple):
    """A run of prompt text that shares one emphasis weight."""

    text: str
    weight: float


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt read into its parts.

    `chunks`: one group of fragments per BREAK-separated part, each encoded into its own 77-token
    chunk(s); an empty group (a BREAK at the start, or two in a row) is one chunk of padding, a trailing
    BREAK adds nothing, and the empty prompt is one empty group. Fragments with no text are dropped and
    adjacent fragments of equal weight are merged.
    `loras`: (name, weight) for each `<lora:...>` / `<lyco:...>` tag, in prompt order.
    `ignored`: the other extra-network tags as written, which this project does not support.
    """

    chunks: tuple[tuple[Fragment, ...], ...]
    loras: tuple[tuple[str, float], ...] = ()
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class Style:
    """One row of an A1111 styles.csv."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


# ---------------------------------------------------------------------------------------------- parse
def parse(text: str) -> ParsedPrompt:
    """Read an A1111 prompt (see the module docstring for the grammar)."""
    text, loras, ignored = _take_extra_networks(text)
    return ParsedPrompt(_emphasis(text), loras, ignored)


def _take_extra_networks(text: str) -> tuple[str, tuple[tuple[str, float], ...], tuple[str, ...]]:
    loras: list[tuple[str, float]] = []
    ignored: list[str] = []

    def take(match: re.Match) -> str:
        kind, fields = match.group(1), [f.strip() for f in match.group(2).split(":")]
        if kind.lower() not in LORA_TAGS:
            ignored.append(match.group(0))
            return ""
        name = fields[0]
        if not name:
            raise PromptSyntaxError(f"{match.group(0)}: the LoRA tag has no name; write <lora:name:weight>")
        # A1111 allows further fields (a separate UNet weight, a dimension); the first weight is the one
        # that applies to the whole LoRA here
        weight = 1.0
        if len(fields) > 1 and fields[1]:
            try:
                weight = float(fields[1])
            except ValueError:
                raise PromptSyntaxError(f"{match.group(0)}: the LoRA weight {fields[1]!r} is not a number; "
                                        "write <lora:name:0.8>") from None
        loras.append((name, weight))
        return ""

    return _EXTRA_NETWORK.sub(take, text), tuple(loras), tuple(ignored)


class _Break:
    """Marks a BREAK in the flat list of pieces."""


def _emphasis(text: str) -> tuple[tuple[Fragment, ...], ...]:
    # Weights are multiplied into a flat list of [text, weight] pieces: a bracket remembers where in the
    # list it opened and, when it closes (or the prompt ends with it still open), multiplies everything
    # from there on. Round and square brackets are tracked separately, so they need not nest properly.
    pieces: list[list | _Break] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if isinstance(piece, list):
                piece[1] *= factor

    def add_text(run: str) -> None:
        for i, part in enumerate(_BREAK.split(run)):
            if i:
                pieces.append(_Break())
            if part:
                pieces.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in _ESCAPABLE:
                pieces.append([text[i + 1], 1.0])
                i += 2
            else:  # a backslash that escapes nothing is kept as written
                pieces.append(["\\", 1.0])
                i += 1
        elif c == "(":
            round_open.append(len(pieces))
            i += 1
        elif c == "[":
            square_open.append(len(pieces))
            i += 1
        elif c == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
            i += 1
        elif c == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
            i += 1
        elif c == ":" and round_open and (weight := _explicit_weight(text, i + 1)) is not None:
            value, end = weight
            multiply(round_open.pop(), value)
            i = end
        elif c in _SPECIAL:  # a stray closing bracket, or a colon that is not a weight: literal
            pieces.append([c, 1.0])
            i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _SPECIAL:
                j += 1
            add_text(text[i:j])
            i = j
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)
    return _groups(pieces)


def _explicit_weight(text: str, start: int) -> tuple[float, int] | None:
    """The weight of `:1.5)` starting after the colon, and where its `)` ends; None if it is not one."""
    match = _WEIGHT.match(text, start)
    if match is None:
        return None
    try:
        return float(match.group(1)), match.end()
    except ValueError:  # "1.2.3" or "." look like numbers to the pattern but are not
        return None


def _groups(pieces: list[list | _Break]) -> tuple[tuple[Fragment, ...], ...]:
    groups: list[list[Fragment]] = [[]]
    for piece in pieces:
        if isinstance(piece, _Break):
            groups.append([])
            continue
        text, weight = piece
        group = groups[-1]
        if group and group[-1].weight == weight:
            group[-1] = Fragment(group[-1].text + text, weight)
        else:
            group.append(Fragment(text, weight))
    # a trailing BREAK has nothing after it to start a chunk with (A1111 adds no chunk for it), while an
    # empty group before a BREAK is a deliberate chunk of padding
    if len(groups) > 1 and not "".join(f.text for f in groups[-1]).strip():
        groups.pop()
    return tuple(tuple(group) for group in groups)


# --------------------------------------------------------------------------------------------- styles
def load_styles(path: str | Path) -> dict[str, Style]:
    """Read an A1111 styles.csv (header `name,prompt,negative_prompt`); rows with no name are skipped."""
    path = Path(path)
    try:
        # utf-8-sig: a styles file saved by a spreadsheet often starts with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or ()]
            # very old A1111 versions called the prompt column `text`
            prompt_column = "prompt" if "prompt" in columns else "text" if "text" in columns else None
            if "name" not in columns or prompt_column is None:
                raise StyleError(f"styles file {path} has the header {','.join(columns) or '(none)'}; "
                                 "expected name,prompt,negative_prompt (as A1111 writes it)")
            styles: dict[str, Style] = {}
            for row in reader:
                row = {(k or "").strip(): v or "" for k, v in row.items()}
                name = row.get("name", "").strip()
                if name:
                    styles[name] = Style(name, row.get(prompt_column, ""), row.get("negative_prompt", ""))
            return styles
    except FileNotFoundError:
        raise StyleError(f"styles file {path} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StyleError(f"cannot read styles file {path}: {e}") from e


def apply_styles(prompt: str, negative_prompt: str, styles: Sequence[Style]) -> tuple[str, str]:
    """Merge styles, in order, into a prompt and a negative prompt; returns both."""
    for style in styles:
        prompt = _merge_style(style.prompt, prompt)
        negative_prompt = _merge_style(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def _merge_style(style_text: str, text: str) -> str:
    """A style with `{prompt}` is a template for the user's text; any other is appended to it."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)
