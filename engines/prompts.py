"""Prompt text to conditioning: A1111 prompts to weighted, 77-token-chunked embeddings, cached.

This module owns how a parsed prompt (engines/prompt_syntax) becomes what the UNet is conditioned on:
tokenization per fragment with per-token weights, chunking into 75 tokens + BOS/EOS (with A1111's
comma backtracking), the text encoder layer that clip skip selects, emphasis applied to the hidden
states with the mean restored, textual-inversion embeddings, SDXL's two encoders and pooled output,
and padding a positive and a negative conditioning to the same length. It knows nothing of the stream,
its settings or LoRA files; the caller clears the cache when it changes the text encoders' weights.

An unweighted prompt of up to 75 tokens encodes exactly as diffusers' pipelines encode it, so models
behave as they do there; emphasis, BREAK and longer prompts follow AUTOMATIC1111's behaviour.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from . import prompt_syntax
from .bundle import ModelBundle
from .weights import read_state_dict

log = logging.getLogger(__name__)

# A1111: when a chunk fills up, move the words after a comma in its last 20 tokens to the next chunk,
# so that a phrase is not cut in two
COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class Conditioning:
    """What a prompt conditions the UNet with."""

    embeddings: torch.Tensor  # (1, 77 * chunks, D): D is both encoders' widths together for SDXL
    pooled: torch.Tensor | None = None  # (1, P): SDXL-style models' projected pooled text, else None


class EmbeddingError(ValueError):
    """A textual-inversion embedding that does not fit the model; the message names the file."""


@dataclass(frozen=True)
class _TextEncoder:
    """One text encoder with its tokenizer and special tokens."""

    model: Any  # transformers CLIPTextModel / CLIPTextModelWithProjection
    tokenizer: Any  # transformers CLIPTokenizer
    bos: int
    eos: int
    pad: int
    layers: int

    @classmethod
    def of(cls, model: Any, tokenizer: Any) -> "_TextEncoder":
        # the pad token differs between encoders (SD 1.x: the end token; SD 2.x / SDXL's second: "!"),
        # and the padding must be each encoder's own for an exact match with how it was trained
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(model, tokenizer, int(tokenizer.bos_token_id), int(tokenizer.eos_token_id), int(pad),
                   int(model.config.num_hidden_layers))

    @property
    def width(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    def tokenize(self, text: str) -> list[int]:
        # verbose=False: a long prompt is chunked here, the tokenizer's length warning would be noise
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)


@dataclass(frozen=True)
class _Piece:
    """What cannot be split between chunks: one token, or all vectors of an embedding; ids per encoder."""

    ids: tuple[tuple[int, ...], ...]
    weight: float
    comma: bool = False

    def __len__(self) -> int:
        return len(self.ids[0])


class PromptEncoder:
    """Encode A1111 prompts with a model's text encoder(s); an LRU cache keyed by (text, clip_skip)."""

    def __init__(self, model: ModelBundle, device: torch.device, dtype: torch.dtype, cache_size: int = 64,
                 embeddings: Mapping[str, Path] | None = None, allow_pickle: bool = False):
        self.device = device
        self.dtype = dtype
        self.xl = model.text_encoder_2 is not None
        self.encoders = [_TextEncoder.of(model.text_encoder, model.tokenizer)]
        if self.xl:
            tokenizer_2 = model.tokenizer_2 if model.tokenizer_2 is not None else model.tokenizer
            self.encoders.append(_TextEncoder.of(model.text_encoder_2, tokenizer_2))
        first = self.encoders[0]
        self.max_length = min(int(first.tokenizer.model_max_length),
                              int(first.model.config.max_position_embeddings))
        self.chunk_length = self.max_length - 2  # BOS and EOS around each chunk
        self.comma = first.tokenizer.get_vocab().get(",</w>")
        self.cache_size = max(1, cache_size)
        self.allow_pickle = allow_pickle
        self._cache: OrderedDict[tuple[str, int], Conditioning] = OrderedDict()
        self._lock = threading.Lock()  # the cache
        self._encoding = threading.Lock()  # the text encoders
        self._generation = 0  # grows with each clear()
        # the CLIP tokenizer lowercases, so A1111 finds embedding names in any case; so do we
        self._embedding_files = {name.lower(): Path(path) for name, path in (embeddings or {}).items()}
        self._embedding_ids: dict[str, tuple[tuple[int, ...], ...]] = {}  # loaded: name -> ids per encoder
        names = sorted(self._embedding_files, key=len, reverse=True)  # longest first: "bad-hands-5" over "bad"
        self._embedding_words = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w-])", re.IGNORECASE) if names else None

    # -------------------------------------------------------------------------------------- public
    def encode(self, text: str, clip_skip: int = 1) -> Conditioning:
        """The conditioning of an A1111 prompt. clip_skip counts as in A1111: 1 is the last layer.

        Thread-safe: a worker may encode new prompts while the render thread reads cached ones; two
        encodings never run at once (they share the text encoders' embedding tables)."""
        if clip_skip < 1:
            raise ValueError(f"clip_skip {clip_skip}: it counts from 1 (the last layer)")
        key = (text, clip_skip)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            generation = self._generation
        with self._encoding:
            conditioning = self._encode(text, clip_skip)
        with self._lock:
            if generation == self._generation:  # not made stale by a clear() while it was encoded
                self._cache[key] = conditioning
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return conditioning

    def cached(self, text: str, clip_skip: int = 1) -> bool:
        """True if `encode(text, clip_skip)` would return at once."""
        with self._lock:
            return (text, clip_skip) in self._cache

    def clear(self) -> None:
        """Forget every cached encoding (the text encoders' weights changed, e.g. a LoRA weight)."""
        with self._lock:
            self._cache.clear()
            self._generation += 1

    def pad_to_match(self, a: Conditioning, b: Conditioning, clip_skip: int = 1
                     ) -> tuple[Conditioning, Conditioning]:
        """Make two conditionings the same length by appending encodings of the empty prompt to the
        shorter one (as A1111 does), so that a positive and a negative prompt batch together."""
        length_a, length_b = a.embeddings.shape[1], b.embeddings.shape[1]
        if length_a == length_b:
            return a, b
        empty = self.encode("", clip_skip).embeddings
        if abs(length_a - length_b) % empty.shape[1]:
            raise ValueError(f"cannot pad conditionings of {length_a} and {length_b} tokens with chunks of "
                             f"{empty.shape[1]}")

        def padded(c: Conditioning, length: int) -> Conditioning:
            repeats = (length - c.embeddings.shape[1]) // empty.shape[1]
            pad = empty.to(c.embeddings).expand(c.embeddings.shape[0], -1, -1).repeat(1, repeats, 1)
            return Conditioning(torch.cat([c.embeddings, pad], dim=1), c.pooled)

        if length_a < length_b:
            return padded(a, length_b), b
        return a, padded(b, length_a)

    # ------------------------------------------------------------------------------------ encoding
    @torch.no_grad()
    def _encode(self, text: str, clip_skip: int) -> Conditioning:
        parsed = prompt_syntax.parse(text)
        if parsed.ignored:
            log.warning("ignored extra-network tags (only LoRA is supported): %s", " ".join(parsed.ignored))
        chunks = [chunk for group in parsed.chunks for chunk in self._chunks(self._pieces(group))]
        weights = torch.tensor([self._padded([p.weight for p in chunk for _ in range(len(p))], 1.0, 1.0, 1.0)
                                for chunk in chunks], dtype=torch.float32, device=self.device)
        hidden, pooled = [], None
        for e, encoder in enumerate(self.encoders):
            ids = torch.tensor([self._padded([i for p in chunk for i in p.ids[e]], encoder.bos, encoder.eos,
                                             encoder.pad) for chunk in chunks], device=self.device)
            states, last = self._hidden_states(encoder, ids, clip_skip)
            # A1111 weights each encoder's output, and restores its mean, on its own
            hidden.append(_emphasise(states, weights))
            if self.xl and encoder is self.encoders[-1]:
                # the first chunk's pooled output, as A1111 does; its EOS follows BOS and the tokens
                eos = 1 + sum(len(p) for p in chunks[0])
                pooled = self._pooled(encoder, last[:1, eos]).to(self.dtype)
        embeddings = torch.cat(hidden, dim=-1)  # SDXL: both encoders' features side by side
        return Conditioning(embeddings.reshape(1, -1, embeddings.shape[-1]).to(self.dtype), pooled)

    def _pieces(self, group: tuple[prompt_syntax.Fragment, ...]) -> list[_Piece]:
        pieces: list[_Piece] = []
        for fragment in group:
            for text, embedding in self._split_embeddings(fragment.text):
                if embedding is not None:
                    pieces.append(_Piece(self._embedding(embedding), fragment.weight))
                    continue
                if not text:
                    continue
                ids = [encoder.tokenize(text) for encoder in self.encoders]
                if any(len(i) != len(ids[0]) for i in ids):
                    raise ValueError(f"the two tokenizers split {text!r} differently; cannot encode it")
                pieces.extend(_Piece(tuple((i[k],) for i in ids), fragment.weight, ids[0][k] == self.comma)
                              for k in range(len(ids[0])))
        return pieces

    def _chunks(self, pieces: list[_Piece]) -> list[list[_Piece]]:
        """Pieces into chunks of at most `chunk_length` tokens; an empty group is one empty chunk."""
        size = self.chunk_length
        chunks: list[list[_Piece]] = []
        current: list[_Piece] = []
        length, last_comma = 0, -1  # last_comma: index in `current` of its last comma
        for piece in _split_long(pieces, size):
            if length + len(piece) > size and current:
                cut = len(current)
                tokens_after_comma = sum(len(p) for p in current[last_comma + 1:]) if last_comma >= 0 else size
                if not piece.comma and tokens_after_comma < COMMA_BACKTRACK:
                    cut = last_comma + 1
                chunks.append(current[:cut])
                current = current[cut:]
                length, last_comma = sum(len(p) for p in current), -1
                if length + len(piece) > size:  # what moved over and an embedding do not fit together
                    chunks.append(current)
                    current, length = [], 0
            if piece.comma:
                last_comma = len(current)
            current.append(piece)
            length += len(piece)
        if current or not chunks:
            chunks.append(current)
        return chunks

    def _padded(self, values: list, start: Any, end: Any, pad: Any) -> list:
        return [start, *values, end] + [pad] * (self.chunk_length - len(values))

    def _hidden_states(self, encoder: _TextEncoder, ids: torch.Tensor, clip_skip: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer clip skip selects and the last layer, each (chunks, 77, width)."""
        out = encoder.model(ids, output_hidden_states=self.xl or clip_skip > 1)
        if self.xl:
            # diffusers' StableDiffusionXLPipeline: the penultimate layer at clip skip 1, no final norm.
            # A clip skip deeper than the encoder (a small model) stops at its token embeddings
            states = out.hidden_states[-(min(clip_skip, encoder.layers) + 1)]
        elif clip_skip == 1:
            states = out.last_hidden_state
        else:
            # diffusers' StableDiffusionPipeline with clip_skip = ours - 1: an earlier layer, normalised
            layer = out.hidden_states[-min(clip_skip, encoder.layers + 1)]
            states = _final_layer_norm(encoder.model)(layer)
        return states, out.last_hidden_state

    @staticmethod
    def _pooled(encoder: _TextEncoder, eos_states: torch.Tensor) -> torch.Tensor:
        # projected here rather than taken from the model's output: CLIP configs with the old
        # eos_token_id = 2 pool at the highest token id, which an added embedding token would take over
        projection = getattr(encoder.model, "text_projection", None)
        return eos_states if projection is None else projection(eos_states)

    # -------------------------------------------------------------------------- textual inversion
    def _split_embeddings(self, text: str) -> list[tuple[str, str | None]]:
        """`text` as (text, None) and ("", embedding name) parts, in order."""
        if self._embedding_words is None:
            return [(text, None)]
        parts: list[tuple[str, str | None]] = []
        position = 0
        for match in self._embedding_words.finditer(text):
            parts.append((text[position:match.start()], None))
            parts.append(("", match.group(1).lower()))
            position = match.end()
        parts.append((text[position:], None))
        return parts

    def _embedding(self, name: str) -> tuple[tuple[int, ...], ...]:
        """The token ids (per encoder) of an embedding's vectors, loading it into the encoders first."""
        ids = self._embedding_ids.get(name)
        if ids is not None:
            return ids
        path = self._embedding_files[name]
        vectors = _embedding_vectors(read_state_dict(path, allow_pickle=self.allow_pickle), path, self.xl)
        for encoder, v in zip(self.encoders, vectors):
            if v.shape[1] != encoder.width:
                raise EmbeddingError(f"embedding {path.name} has vectors {v.shape[1]} wide; this model's text "
                                     f"encoder expects {encoder.width} (it was made for another model family)")
        if len({v.shape[0] for v in vectors}) != 1:
            raise EmbeddingError(f"embedding {path.name}: clip_l and clip_g have different vector counts")
        ids = tuple(self._add_vectors(encoder, v) for encoder, v in zip(self.encoders, vectors))
        self._embedding_ids[name] = ids
        log.info("loaded embedding %s (%d vectors)", path.name, len(ids[0]))
        return ids

    def _add_vectors(self, encoder: _TextEncoder, vectors: torch.Tensor) -> tuple[int, ...]:
        # New rows at the end of the token embedding, as diffusers' load_textual_inversion adds them; the
        # tokenizer is left alone because this module places the ids itself
        start = encoder.model.get_input_embeddings().num_embeddings
        encoder.model.resize_token_embeddings(start + vectors.shape[0], mean_resizing=False)
        table = encoder.model.get_input_embeddings().weight
        table[start:] = vectors.to(table)
        return tuple(range(start, start + vectors.shape[0]))


def _split_long(pieces: list[_Piece], size: int) -> list[_Piece]:
    """An embedding longer than a chunk cannot stay whole: its vectors become single pieces."""
    out: list[_Piece] = []
    for p in pieces:
        if len(p) <= size:
            out.append(p)
        else:
            out.extend(_Piece(tuple((ids[k],) for ids in p.ids), p.weight) for k in range(len(p)))
    return out


def _emphasise(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's hidden state by its weight, then restore each chunk's mean (A1111's
    "original" emphasis): emphasis shifts the direction of the weighted tokens, not the overall level."""
    if bool((weights == 1.0).all()):
        return states  # exactly the unweighted encoding
    z = states.float()
    weighted = z * weights.unsqueeze(-1)
    original, new = z.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    # a chunk whose weighted mean vanished (weights of 0 everywhere) keeps its weights as they are
    scale = torch.where(new.abs() > 1e-12, original / new, torch.ones_like(new))
    return (weighted * scale).to(states.dtype)


def _embedding_vectors(data: Mapping[str, Any], path: Path, xl: bool) -> tuple[torch.Tensor, ...]:
    """The (N, width) vectors of a textual-inversion file, one tensor per text encoder."""
    if "clip_l" in data or "clip_g" in data:  # SDXL embeddings carry a set of vectors for each encoder
        if not xl:
            raise EmbeddingError(f"embedding {path.name} is an SDXL embedding (clip_l/clip_g); this model "
                                 "has one text encoder")
        if "clip_l" not in data or "clip_g" not in data:
            raise EmbeddingError(f"embedding {path.name} has only one of clip_l and clip_g")
        return _as_matrix(data["clip_l"], path), _as_matrix(data["clip_g"], path)
    if "string_to_param" in data:  # A1111 .pt: {"string_to_param": {"*": tensor}, "name": ..., ...}
        params = data["string_to_param"]
        tensor = params.get("*") if "*" in params else next(iter(params.values()), None)
    elif "emb_params" in data:  # A1111 / kohya .safetensors
        tensor = data["emb_params"]
    else:  # diffusers: {"<token>": tensor}
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise EmbeddingError(f"embedding {path.name}: not a textual-inversion file (keys: "
                                 f"{', '.join(map(str, list(data)[:8]))})")
        tensor = tensors[0]
    if xl:
        raise EmbeddingError(f"embedding {path.name} is for a one-encoder model (SD 1.x / 2.x); this SDXL "
                             "model needs an embedding with clip_l and clip_g vectors")
    return (_as_matrix(tensor, path),)


def _as_matrix(tensor: Any, path: Path) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2):
        raise EmbeddingError(f"embedding {path.name}: expected a (vectors, width) tensor")
    return (tensor.unsqueeze(0) if tensor.dim() == 1 else tensor).detach().float()


def _final_layer_norm(model: Any) -> torch.nn.Module:
    # transformers 5 keeps the text transformer's parts on CLIPTextModel itself; 4.x under .text_model
    return getattr(model, "text_model", model).final_layer_norm
