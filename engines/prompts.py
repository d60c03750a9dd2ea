"""Prompt text to text-encoder embeddings, cached so that recalling a prompt costs nothing.

Text is tokenized to the encoder's context (77 tokens for CLIP) and truncated beyond it; A1111 weight
syntax and longer prompts arrive with the real-models work and slot in behind `encode`.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

log = logging.getLogger(__name__)


class PromptEncoder:
    """Encode prompts with a CLIP text model; an LRU cache keyed by the text."""

    def __init__(self, tokenizer, text_encoder, device: torch.device, dtype: torch.dtype, cache_size: int = 64):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.dtype = dtype
        self.cache_size = max(1, cache_size)
        self.max_length = min(int(tokenizer.model_max_length),
                              int(text_encoder.config.max_position_embeddings))
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.inference_mode()
    def encode(self, text: str) -> torch.Tensor:
        """(1, tokens, hidden) embeddings of `text` on the device."""
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        tokens = self.tokenizer(text, padding="max_length", max_length=self.max_length, truncation=True,
                                return_overflowing_tokens=False, return_tensors="pt")
        if len(self.tokenizer(text).input_ids) > self.max_length:
            log.warning("prompt is longer than %d tokens; the rest is ignored: %.60r", self.max_length, text)
        ids = tokens.input_ids.to(self.device)
        embeddings = self.text_encoder(ids)[0].to(self.dtype)
        self._cache[text] = embeddings
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeddings
