"""Cached attention: a UNet's self-attention layers that also attend to the previous frame's features.

This is StreamV2V's feature bank, reduced to what fits a real-time stream: every self-attention layer
(diffusers' `attn1` of a BasicTransformerBlock) computes its keys and values as usual, and, with weight w,
also attends to the keys and values the same layer computed for the previous frame at the same step:

    output = (1 - w) * attention(q, k, v) + w * attention(q, [k; k_prev], [v; v_prev])

so what the previous frame drew is there to be copied where the new frame looks alike, and textures hold
still on slowly moving input. w = 1 skips the plain term.

This module owns the attention processor and the bank's bookkeeping for one frame; it knows nothing of
settings, plans or CUDA graphs. engines.stream decides when the bank acts and carries the banked tensors
from frame to frame as inputs and outputs of its pure per-frame function (`Stream._frame`), which is what
lets a CUDA graph of that function replay right: the processors read the previous frame's tensors and the
weight from whatever `frame` handed them and return the new ones, nothing is kept here between frames.

Which bank entry serves which batch entry. Each UNet call of a frame has its own bank (exact mode calls
the UNet once per step, so step i attends to step i of the previous frame), and within a call each
latent position j has its own (stream batch: position j is the frame at step j, so it attends to the
previous call's position j, the frame before it at the same step). Only the conditional (positive-prompt)
entries are banked; a negative-prompt entry of a guided batch (cfg full, or initialize's first step),
which stands for latent j, attends to latent j's positive bank, so that both halves of the guidance see
the same previous frame.

The processors are installed only when cached attention is first asked for (`AttentionBank(unet)`),
and while the bank is off (`mode` OFF) they hand every call to diffusers' own AttnProcessor2_0: the
default path is unchanged. They call the layer's to_q / to_k / to_v / to_out modules, so LoRA (peft)
layers wrapping them keep working. Cost while on: the extended attention reads twice the keys (and the
blend runs the plain attention too), and the bank holds each self-attention layer's keys and values of
one frame per UNet call (docs/coherence.md has figures).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

log = logging.getLogger(__name__)

OFF = ""  # the processors act as AttnProcessor2_0
RECORD = "record"  # plain attention, keys and values banked: the first frame, with nothing to attend to
BLEND = "blend"  # 0 < w < 1: both terms
EXTEND = "extend"  # w = 1: the extended term only
MODES = (OFF, RECORD, BLEND, EXTEND)


class AttentionBank:
    """The cached-attention processors of one UNet and the state of the frame being computed.

    Contract: made once per UNet (making it installs the processors); then, around the tensor work of one
    frame, `frame(mode, weight, previous)` and, before each UNet call in it, `call(negatives)`. The
    processors consume `previous` (what the last frame's `frame` yielded: keys and values per UNet call
    and layer, in call order) in order, and the context manager yields the list the new ones are appended
    to. Outside `frame` the processors act as AttnProcessor2_0."""

    def __init__(self, unet: torch.nn.Module):
        self.layers = 0  # self-attention layers with a processor
        self.mode = OFF
        self.weight: torch.Tensor | None = None
        self.negatives = 0  # leading negative-prompt entries in the batch of the current UNet call
        self._previous: Sequence[torch.Tensor] = ()
        self._cursor = 0
        self._new: list[torch.Tensor] = []
        for module in unet.modules():
            if isinstance(module, BasicTransformerBlock) and not module.only_cross_attention:
                attn = module.attn1
                if isinstance(attn, Attention) and attn.spatial_norm is None and attn.group_norm is None:
                    attn.set_processor(CachedAttentionProcessor(self))
                    self.layers += 1
        log.info("cached attention installed on %d self-attention layers", self.layers)

    @contextlib.contextmanager
    def frame(self, mode: str, weight: torch.Tensor | None, previous: Sequence[torch.Tensor]
              ) -> Iterator[list[torch.Tensor]]:
        """One frame's UNet calls with the bank in `mode`, attending to `previous` with `weight` (a 0-dim
        tensor: a live value, read by the tensor work, never by the host). Yields the list that fills with
        this frame's keys and values (2 tensors per layer per UNet call, the positive entries only)."""
        if mode not in MODES:
            raise ValueError(f"cached attention mode {mode!r}: expected one of {MODES}")
        self.mode, self.weight, self._previous, self._cursor, self._new = mode, weight, previous, 0, []
        try:
            yield self._new
        finally:  # the caller holds the new entries; the bank keeps nothing of the frame
            self.mode, self.weight, self._previous, self.negatives, self._new = OFF, None, (), 0, []

    def call(self, negatives: int) -> None:
        """The next UNet call's batch begins with `negatives` negative-prompt entries (0: none)."""
        self.negatives = negatives

    def _take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cursor + 2 > len(self._previous):
            raise RuntimeError("the cached-attention bank does not match this frame's UNet calls")
        k, v = self._previous[self._cursor], self._previous[self._cursor + 1]
        self._cursor += 2
        return k, v


class CachedAttentionProcessor(AttnProcessor2_0):
    """A diffusers attention processor for a self-attention layer that reads and fills an AttentionBank;
    called as AttnProcessor2_0 is (the layer, hidden states, optional encoder states, mask, temb), and
    exactly that while the bank is off. A subclass of it, so that code making sure a UNet runs SDPA
    attention (engines.backends.torch_backend) leaves it in place."""

    def __init__(self, bank: AttentionBank):
        super().__init__()
        self.bank = bank

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        bank = self.bank
        if bank.mode == OFF or encoder_hidden_states is not None or attention_mask is not None \
                or hidden_states.ndim != 3:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        query, key, value = heads(query), heads(key), heads(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        negatives = bank.negatives
        if bank.mode == RECORD:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        else:
            key_before, value_before = bank._take()
            if negatives:  # a negative entry stands for latent j: it reads latent j's (positive) bank
                key_before = torch.cat([key_before[:negatives], key_before])
                value_before = torch.cat([value_before[:negatives], value_before])
            out = F.scaled_dot_product_attention(query, torch.cat([key, key_before], 2),
                                                 torch.cat([value, value_before], 2), dropout_p=0.0, is_causal=False)
            if bank.mode == BLEND:
                plain = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
                out = torch.lerp(plain, out, bank.weight.to(out.dtype))
        bank._new += [key[negatives:], value[negatives:]]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
