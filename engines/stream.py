"""The per-frame pipeline: encode, noise, denoise, decode. Reads top to bottom as the algorithm.

`Stream.prepare(settings)` does everything that depends only on the settings (LoRA weights, prompt
embeddings and their blend, timesteps and their coefficients, the seed's noise and its blend) so that
a frame is pure tensor work with no host synchronisation: `Stream._frame(shape, frame)` takes every
value that can change between frames as a tensor, which is what lets the torch backend replay it as a
CUDA graph (engines/backends/torch_backend.py). `render_pixels` is the whole per-frame call, client
pixels in and out; `render` is the same from a model image, for tests. `slow_to_prepare` and
`precompute` let a worker thread do the slow part of a change (prompt encoding, LoRA files) first.

Timesteps. `strength` picks the first timestep on the model's 1000-step training schedule,
t0 = round(strength * 1000) - 1, continuously, so strength can be played live; `steps` spreads that
many timesteps evenly from t0 towards 0 (t_i = floor(t0 * (steps - i) / steps)). txt2img starts from
pure noise at t0 = 999. Experts may give `t_index_list` instead: indices into a 50-step LCM schedule
(index i is timestep 999 - 20 i), as StreamDiffusion does. Each step predicts x0 and applies the
latent-consistency boundary condition (c_skip, c_out) exactly as diffusers' LCMScheduler does; between
steps the x0 estimate is re-noised to the next timestep with the seed's own noise. One step from
t = 999 is the sd-turbo / SDXL-turbo sampler; 2 to 4 steps is LCM's. The noise of a seed is fixed
(drawn on the CPU from torch.Generator(seed)), so the same settings and frame give the same image.

Blends and transitions. A prompt blend mixes the cached embeddings of its prompts by weight; a seed
blend slerps their noises (and `subseed_strength` slerps in the variation seed's noise, as A1111
does); both are computed once per change. With `transition_frames` > 0 a change eases in over that
many frames from what was on screen (embeddings interpolated, noise slerped).

Guidance (`cfg_type`, when guidance_scale > 1). `full` runs the negative prompt as a second batch
entry: exact classifier-free guidance. `self` is residual CFG (StreamDiffusion's idea): the negative
prediction is estimated as `delta` times the noise that was actually put into the latent, so guidance
costs no extra UNet work. `initialize` runs the real negative prediction at the first step only and
carries its residual (prediction minus injected noise) to the later steps.

ControlNets (`set_controlnets`, `StreamSettings.controls`, the `controls` images of a frame): each
ControlNet with a control image runs beside every UNet call on the same latents, timesteps and text
(the negative-prompt entries included, as diffusers does outside guess mode), and its residuals, scaled
by its weight at each latent's step, are summed into the UNet. A weight is the ControlNet's scale where
the step lies within its [start, end] fraction of the schedule and 0 outside (diffusers' rule), a
device tensor of the plan, so a scale is a live value; a ControlNet at scale 0 or with no image is
skipped.

Stream batch (`stream_batch=True`): with n steps, the n frames in flight (the new one at t0, older
ones at later timesteps) are denoised in ONE UNet call per frame, StreamDiffusion's trick for
throughput; each output then belongs to the input n-1 frames earlier (`output_tag` says which). In
the default exact mode every frame runs all its steps before the next frame: no lag.

Temporal coherence for video input (docs/coherence.md), three live settings, each off at 0 and then
exactly the path without it. `feedback` f: in img2img the new input's clean latent becomes
(1 - f) * clean + f * previous before it is noised, where previous is the last frame's final latent in
exact mode and, in stream batch, the last call's estimate of the newest frame (the output shown is n-1
frames older: feeding that back would make n interleaved chains). `noise_lock` l: with seed -1 each
frame's noise is slerp(fresh, previous noise, l); a fixed seed's noise is locked already. `cached_attention`
w: every UNet self-attention layer also attends to its keys and values of the previous frame
(engines.coherence, StreamV2V's feature bank), torch UNet only. What they carry from frame to frame (the
latent, the noise, the banked keys and values) is held by the stream and reset when the latent size,
the step or batch layout, the autoencoder or the UNet changes; the latent and the bank travel into and
out of `_frame` as tensors like the in-flight latents, so CUDA graphs replay them right.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from . import coherence, prompt_syntax
from .bundle import ModelBundle
from .coherence import AttentionBank
from .frames import OutputFormat, Staging, client_pixels, model_image
from .prompts import Conditioning, PromptEncoder

log = logging.getLogger(__name__)

TXT2IMG = "txt2img"
IMG2IMG = "img2img"
CFG_TYPES = ("none", "full", "self", "initialize")
SCHEDULE_INDICES = 50  # t_index_list indexes a 50-step LCM schedule, as StreamDiffusion's does


@dataclass(frozen=True)
class StreamSettings:
    """What one frame is made with; the bridge fills it from its parameter snapshot."""

    prompt: str = ""
    negative_prompt: str = ""
    prompts: tuple[tuple[str, float], ...] = ()  # blend; empty: `prompt`
    styles: str = ""  # comma-separated style names
    clip_skip: int = 1
    seed: int = 0
    seeds: tuple[tuple[int, float], ...] = ()  # blend; empty: `seed`
    subseed: int = 0
    subseed_strength: float = 0.0
    transition_frames: int = 0
    strength: float = 0.5
    guidance_scale: float = 1.0
    steps: int = 1
    t_index_list: tuple[int, ...] = ()
    cfg_type: str = "full"
    delta: float = 1.0
    mode: str = IMG2IMG
    width: int = 512
    height: int = 512
    loras: tuple[tuple[str, float], ...] = ()  # (name, weight) from /lora/<name>; prompt tags add to these
    # per ControlNet k (Stream.set_controlnets): (scale, start, end), start and end as fractions of the
    # steps where it acts, as diffusers' control_guidance_start/end; a ControlNet left out: (1.0, 0.0, 1.0)
    controls: tuple[tuple[float, float, float], ...] = ()
    # temporal coherence for video input (module docstring, docs/coherence.md); 0 turns each off
    feedback: float = 0.0  # fraction of the previous output's latent blended into the new input's
    noise_lock: float = 0.0  # seed -1: how much of the previous frame's noise each frame keeps (slerp)
    cached_attention: float = 0.0  # weight of the previous frame's keys and values in self-attention


def timesteps_for(strength: float, steps: int, mode: str, train_steps: int = 1000,
                  t_index_list: Sequence[int] = ()) -> tuple[int, ...]:
    """The denoising timesteps for a frame (see the module docstring); empty means no denoising."""
    if t_index_list:
        stride = train_steps // SCHEDULE_INDICES
        out = tuple(train_steps - 1 - i * stride for i in t_index_list)
        if mode == TXT2IMG:  # pure noise is only right at the top of the schedule
            out = (train_steps - 1, *(t for t in out[1:] if t < train_steps - 1))
        return out
    first = train_steps - 1 if mode == TXT2IMG else min(train_steps - 1, round(strength * train_steps) - 1)
    if first < 0:
        return ()
    out: list[int] = []
    for i in range(steps):
        t = first * (steps - i) // steps
        if not out or t < out[-1]:
            out.append(t)
    return tuple(out)


def unet_batches(settings: StreamSettings, stream_batch: bool, train_steps: int = 1000) -> tuple[int, ...]:
    """The batch sizes the UNet is called with under `settings` (what TensorRT profiles must cover): the
    latents of one call (all in-flight steps with stream batch), doubled for the negative prompt with
    cfg full, plus one negative at the first step with cfg initialize."""
    n = len(timesteps_for(settings.strength, settings.steps, settings.mode, train_steps, settings.t_index_list))
    if n == 0:
        return ()
    cfg = settings.cfg_type if settings.guidance_scale > 1.0 else "none"
    latents = n if stream_batch and n > 1 else 1
    if cfg == "full":
        return (2 * latents,)
    if cfg == "initialize":
        first = latents + 1
        return (first,) if latents > 1 or n == 1 else (first, 1)
    return (latents,)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors: keeps the noise's spread where a plain
    mix would shrink it. t = 0 gives `a` and t = 1 gives `b` exactly."""
    if isinstance(t, float) and t <= 0.0:
        return a
    if isinstance(t, float) and t >= 1.0:
        return b
    a32, b32 = a.float(), b.float()
    cos = ((a32 * b32).sum() / (a32.norm() * b32.norm()).clamp_min(1e-12)).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    t = torch.as_tensor(t, dtype=torch.float32, device=a.device)
    # nearly parallel noises: the spherical weights are 0/0, and the linear mix is the same thing
    parallel = sin < 1e-4
    wa = torch.where(parallel, 1 - t, torch.sin((1 - t) * theta) / sin.clamp_min(1e-4))
    wb = torch.where(parallel, t, torch.sin(t * theta) / sin.clamp_min(1e-4))
    return (wa * a32 + wb * b32).to(a.dtype)


def _ease(fraction: float) -> float:
    """Smoothstep: a transition starts and ends gently."""
    fraction = min(1.0, max(0.0, fraction))
    return fraction * fraction * (3 - 2 * fraction)


@dataclass(frozen=True)
class _Step:
    timestep: int
    sqrt_alpha: float  # sqrt(alphas_cumprod[t])
    sqrt_beta: float  # sqrt(1 - alphas_cumprod[t])
    c_skip: float
    c_out: float


class _Batch(NamedTuple):
    """The constants of one UNet call's latents, each at its own step, as device tensors made once per
    plan: the timesteps (b,) and the coefficients (b, 1, 1, 1), so a frame copies nothing to the device."""

    timesteps: torch.Tensor
    sqrt_alpha: torch.Tensor
    sqrt_beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    controls: tuple[torch.Tensor, ...] = ()  # per ControlNet: its conditioning scale at each latent's step


@dataclass(frozen=True)
class _Look:
    """What the prompts and seeds resolve to: the part of a plan that a transition eases between."""

    positive: Conditioning
    negative: Conditioning | None  # None: no negative prompt pass (guidance off, or cfg self)
    noise: tuple[torch.Tensor, ...] | None  # per step; None: seed -1, new noise every frame


@dataclass
class _Plan:
    settings: StreamSettings
    look: _Look
    cfg: str  # "none", "full", "self" or "initialize"
    steps: tuple[_Step, ...]
    single: tuple[_Batch, ...]  # exact mode: one per step
    batched: _Batch | None  # stream batch: all steps in one call
    latent_shape: tuple[int, int, int, int]
    time_ids: torch.Tensor | None  # SDXL size conditioning, (1, 6)
    guidance: torch.Tensor  # guidance_scale and delta as 0-dim device tensors: live values a graph reads
    delta: torch.Tensor
    controls_on: tuple[bool, ...] = ()  # per ControlNet: whether it acts at any step (a scale of 0: it is skipped)
    feedback: torch.Tensor | None = None  # settings.feedback as a 0-dim device tensor
    noise_lock: torch.Tensor | None = None  # settings.noise_lock as a 0-dim device tensor
    attention_weight: torch.Tensor | None = None  # settings.cached_attention as a 0-dim device tensor


@dataclass
class _Transition:
    start: _Look
    frames: int
    done: int = 0


@dataclass
class _InFlight:
    """Stream batch: the latents of frames started earlier, one per later step, oldest last."""

    latents: list[torch.Tensor] = field(default_factory=list)
    noises: list[torch.Tensor] = field(default_factory=list)  # the noise each latent was made with
    tags: list[Any] = field(default_factory=list)


class Stream:
    """One model's real-time img2img / txt2img stream on one device."""

    def __init__(self, model: ModelBundle, device: torch.device, dtype: torch.dtype, prompt_cache_size: int = 64,
                 *, stream_batch: bool = False, styles: Mapping[str, prompt_syntax.Style] | None = None,
                 embeddings: Mapping[str, Path] | None = None,
                 find_lora: Callable[[str], Path] | None = None, allow_pickle: bool = False,
                 report: Callable[[str], None] | None = None):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.stream_batch = stream_batch
        self.styles = dict(styles or {})
        self.find_lora = find_lora
        self.report = report or log.error  # problems that do not stop the stream (a LoRA left out)
        self.allow_pickle = allow_pickle
        self.prompts = PromptEncoder(model, device, dtype, prompt_cache_size, embeddings=embeddings,
                                     allow_pickle=allow_pickle)
        self.loras = None  # engines.lora.LoraSet, made when the first LoRA is asked for
        self._lora_files: dict[str, str | None] = {}  # a LoRA name to its file (None: unusable)
        self._unusable_loras: dict[str, str] = {}  # files that failed to load, with why
        self._lora_reads: dict[str, dict] = {}  # LoRA files read ahead by precompute, not yet loaded
        config = model.scheduler.config
        self.prediction_type = config.prediction_type
        self.timestep_scaling = float(getattr(config, "timestep_scaling", 10.0))
        self.train_steps = int(config.num_train_timesteps)
        self.alphas_cumprod = model.scheduler.alphas_cumprod.to(torch.float64)
        self._plan: _Plan | None = None
        self._noise_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._transition: _Transition | None = None
        self._shown: _Look | None = None  # what the last frame was made with (mid-transition included)
        self._in_flight = _InFlight()
        self._flush = 0  # stream batch: renders until the frames in flight are all of the current plan
        self.output_tag: Any = None  # the tag of the input the last rendered output belongs to
        self.staging = Staging(device)  # client frames to the device and back (pinned buffers on CUDA)
        self.warm_up_s = 0.0  # how long warm_up took
        # The per-frame call as CUDA graphs (engines.backends.torch_backend sets this); None: eager
        self.graphs: Callable[[_Shape, _Frame], tuple] | None = None
        # What runs the UNet: the torch module, or a stand-in called the same way (set_modules)
        self.unet: Callable[..., Any] = model.unet
        self.controlnets: tuple[Any, ...] = ()  # diffusers ControlNetModels, index k (set_controlnets)
        # Temporal coherence state, carried from frame to frame (each reset when what it was made for changes):
        self._attention: AttentionBank | None = None  # installed when cached attention is first asked for
        self._attention_refused = False  # reported once: the UNet in use is not the torch module
        self._previous_latent: tuple[tuple, torch.Tensor] | None = None  # (what it fits, the latent) for feedback
        self._previous_noise: tuple[torch.Tensor, ...] | None = None  # seed -1: the last frame's noise
        self._bank: tuple[tuple, tuple[torch.Tensor, ...]] | None = None  # (what it fits, keys and values)

    @property
    def prompt_tokens(self) -> int:
        """The length in tokens of the prompt embeddings the current plan conditions on (77 per chunk)."""
        return int(self._plan.look.positive.embeddings.shape[1]) if self._plan else self.prompts.max_length

    @property
    def settings(self) -> StreamSettings | None:
        return self._plan.settings if self._plan else None

    @property
    def wants_frame(self) -> bool:
        """True while the stream would show something new even with no new input: a transition is
        easing in, or (stream batch) frames started with older settings are still in flight."""
        return self._transition is not None or (bool(self._in_flight.latents) and self._flush > 0)

    def warm_up(self, settings: StreamSettings, output: OutputFormat) -> None:
        """Render throw-away frames so that the first real one is not slow: the first call of a model
        pays for kernel selection, memory set-up and (with torch.compile) compilation. Two frames go
        through the whole per-frame call, with a grey control image for each ControlNet, so that its
        CUDA graph is captured too. `warm_up_s` says how long it took (torch.compile's compilation is
        most of it when it is on)."""
        started = time.perf_counter()
        self.prepare(settings)
        pixels = np.full((settings.height, settings.width, 4), 128, dtype=np.uint8)
        grey = torch.full((1, 3, settings.height, settings.width), 0.5, device=self.device)
        for _ in range(2):
            self.render_pixels(pixels, output, controls=[grey] * len(self.controlnets))
        self._shown, self._transition, self._in_flight = None, None, _InFlight()
        self._forget_frames()  # the grey frames must not feed into the first real one
        self.warm_up_s = time.perf_counter() - started

    def refresh(self) -> None:
        """Something every frame reads changed outside the settings (a new control image): in stream
        batch, keep wanting frames until those in flight were all made with it."""
        if self._plan is not None:
            self._flush = len(self._plan.steps)

    def set_autoencoder(self, autoencoder) -> None:
        """Swap the autoencoder (a /vae change); the next frame prepares again with it."""
        self.model.autoencoder = autoencoder
        self._forget_graphs()
        self._plan = None
        self._transition = None
        self._shown = None
        self._in_flight = _InFlight()
        self._forget_frames()

    def set_modules(self, *, unet: Callable[..., Any] | None = None, autoencoder: Any = None,
                    controlnets: Sequence[Any] | None = None) -> None:
        """Swap what runs the UNet, the autoencoder and the ControlNets, between frames: stand-ins called
        like the torch modules (the TensorRT backend's engines), or the torch modules back (ControlNet k
        for ControlNet k: as many as set_controlnets set). The LoRAs, the prompt encoders and the plan
        stay; CUDA graphs recorded with the old ones are dropped."""
        if unet is not None:
            self.unet = unet
            self._bank = None  # another UNet's features (or none, from an engine)
        if autoencoder is not None:
            self.model.autoencoder = autoencoder
            self._previous_latent = None  # another autoencoder's latent space
        if controlnets is not None:
            if len(controlnets) != len(self.controlnets):
                raise ValueError(f"{len(controlnets)} ControlNets for the stream's {len(self.controlnets)}")
            self.controlnets = tuple(controlnets)
        self._forget_graphs()

    def set_controlnets(self, controlnets: Sequence[Any]) -> None:
        """The ControlNets frames may be steered by, index k as in StreamSettings.controls and the
        `controls` images of a frame (None: ControlNet k is not there, say one made for another model
        family; it never acts); prepare again after this (their per-step scales are part of a plan)."""
        self.controlnets = tuple(controlnets)
        self._forget_graphs()
        self._plan = None

    def _forget_frames(self) -> None:
        """Drop what temporal coherence carries from earlier frames: the next frame starts afresh."""
        self._previous_latent, self._previous_noise, self._bank = None, None, None

    def _forget_graphs(self) -> None:
        clear = getattr(self.graphs, "clear", None)
        if clear is not None:
            clear()

    # ------------------------------------------------------------------ prepare (slow, per change)
    def slow_to_prepare(self, settings: StreamSettings) -> bool:
        """True if `prepare(settings)` would encode a prompt or read a LoRA file: work to hand to
        `precompute` on a worker thread first, so that the render thread never waits for it."""
        texts = self._texts_to_encode(settings)
        if any(not self.prompts.cached(text, settings.clip_skip) for text in texts):
            return True
        loaded = self.loras.loaded if self.loras is not None else ()
        return any(weight and key not in loaded and key not in self._unusable_loras and key not in self._lora_reads
                   for key, weight in self._lora_weights(settings, texts).items())

    def precompute(self, settings: StreamSettings) -> None:
        """The slow half of `prepare(settings)`, safe on a worker thread while the render thread renders:
        encode the prompts into the cache (on a CUDA stream of its own) and read new LoRA files. It
        changes no module, so the frame being rendered is unaffected; `prepare` then finds all ready."""
        texts = self._texts_to_encode(settings)
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            encoded = [self.prompts.encode(text, settings.clip_skip) for text in texts]
        if side is not None:
            side.synchronize()  # the embeddings are complete before the render thread can use them
            render_stream = torch.cuda.default_stream(self.device)
            for conditioning in encoded:  # and their memory is not reused while that stream may read it
                for tensor in (conditioning.embeddings, conditioning.pooled):
                    if tensor is not None:
                        tensor.record_stream(render_stream)
        from .lora import LoraSet
        loaded = self.loras.loaded if self.loras is not None else ()
        for key, weight in self._lora_weights(settings, texts).items():
            if weight and key not in loaded and key not in self._lora_reads and key not in self._unusable_loras:
                try:
                    self._lora_reads[key] = LoraSet.read(Path(key).name, Path(key), allow_pickle=self.allow_pickle)
                except Exception as e:  # prepare reports it when it tries again on the render thread
                    log.debug("LoRA %s could not be read ahead: %s", key, e)

    def _texts_to_encode(self, settings: StreamSettings) -> list[str]:
        """The prompts `prepare(settings)` encodes: the positive ones, and with a negative pass the
        negative one and the empty prompt that pads the shorter of the two."""
        positive, negative = self._texts(settings)
        texts = [text for text, _ in positive]
        if settings.guidance_scale > 1.0 and settings.cfg_type in ("full", "initialize"):
            texts += [negative, ""]
        return texts

    def prepare(self, settings: StreamSettings) -> None:
        """Precompute everything `render` needs for `settings`; cheap when little changed."""
        factor = self.model.autoencoder.spatial_factor
        if settings.width % factor or settings.height % factor:
            raise ValueError(f"width and height must be multiples of {factor}")
        if settings.cfg_type not in CFG_TYPES:
            raise ValueError(f"cfg_type {settings.cfg_type!r}: expected one of {', '.join(CFG_TYPES)}")
        previous = self._plan
        positive_texts, negative_text = self._texts(settings)
        self._apply_loras(settings, [t for t, _ in positive_texts] + [negative_text])
        cfg = settings.cfg_type if settings.guidance_scale > 1.0 else "none"
        timesteps = timesteps_for(settings.strength, settings.steps, settings.mode, self.train_steps,
                                  settings.t_index_list)
        latent_shape = (1, self.model.autoencoder.latent_channels, settings.height // factor,
                        settings.width // factor)
        look = self._look(settings, positive_texts, negative_text, cfg, latent_shape, max(1, len(timesteps)))
        steps = tuple(self._step(t) for t in timesteps)
        controls = [control_weights(*(settings.controls[k] if k < len(settings.controls) else (1.0, 0.0, 1.0)),
                                    len(steps)) for k in range(len(self.controlnets))]
        plan = _Plan(settings, look, cfg, steps,
                     tuple(self._batch([step], [[w[i]] for w in controls]) for i, step in enumerate(steps)),
                     self._batch(steps, controls) if self.stream_batch and len(steps) > 1 else None, latent_shape,
                     self._time_ids(settings) if self.model.xl else None,
                     self._scalar(settings.guidance_scale), self._scalar(settings.delta),
                     tuple(any(w) and self.controlnets[k] is not None for k, w in enumerate(controls)),
                     self._scalar(settings.feedback), self._scalar(settings.noise_lock),
                     self._scalar(settings.cached_attention))
        if settings.cached_attention > 0:
            self._install_cached_attention()
        self._start_transition(previous, plan)
        if previous is None or (previous.steps, previous.latent_shape, previous.settings.mode) != \
                (plan.steps, plan.latent_shape, plan.settings.mode):
            self._in_flight = _InFlight()  # in-flight latents of another schedule or size are useless
        self._flush = len(plan.steps)
        self._plan = plan

    def _install_cached_attention(self) -> None:
        """Put the cached-attention processors into the torch UNet, the first time it is asked for; with
        a UNet that is not the torch module (a TensorRT engine) it cannot act: said once, and the stream
        goes on without it."""
        if not self._attention_acts():
            if not self._attention_refused:
                self._attention_refused = True
                self.report("cached_attention has no effect with this UNet backend (TensorRT engines run "
                            "their own attention); use the torch backend for it")
            return
        if self._attention is None:
            self._attention = AttentionBank(self.model.unet)

    def _attention_acts(self) -> bool:
        return self.unet is self.model.unet

    def _texts(self, settings: StreamSettings) -> tuple[list[tuple[str, float]], str]:
        """The prompts to encode, with their blend weights, after styles; and the negative prompt."""
        blend = [(text, w) for text, w in settings.prompts if w > 0] or [(settings.prompt, 1.0)]
        chosen = [self._style(name) for name in settings.styles.split(",") if name.strip()]
        negative = settings.negative_prompt
        if chosen:
            styled = [prompt_syntax.apply_styles(text, negative, chosen) for text, _ in blend]
            blend = [(text, w) for (text, _), (_, w) in zip(styled, blend)]
            negative = styled[0][1]
        return blend, negative

    def _style(self, name: str) -> prompt_syntax.Style:
        name = name.strip()
        if name not in self.styles:
            known = ", ".join(sorted(self.styles)) or "none (set styles_file)"
            raise ValueError(f"style {name!r} not found; known: {known}")
        return self.styles[name]

    def _apply_loras(self, settings: StreamSettings, texts: Sequence[str]) -> None:
        """LoRA weights: the /lora/<name> values, overridden by <lora:name:w> tags in the prompts.

        LoRAs are keyed by their file, so two spellings of one name are one LoRA. A LoRA that cannot
        be found or loaded (a typo in a tag, one made for another model family) is reported once and
        left out, as A1111 does; the rest of the change applies."""
        weights = self._lora_weights(settings, texts)
        if self.loras is None:
            if not any(weights.values()):
                return
            from .lora import LoraSet  # peft is imported only when a LoRA is used
            self.loras = LoraSet(self.model)
        for key, weight in weights.items():
            if weight and key not in self.loras.loaded and key not in self._unusable_loras:
                try:
                    self.loras.load(key, Path(key), allow_pickle=self.allow_pickle,
                                    tensors=self._lora_reads.pop(key, None))
                except Exception as e:
                    self._unusable_loras[key] = str(e)
                    self.report(f"LoRA {Path(key).name} left out: {e}")
        before = (self.loras.loaded, self.loras.weights)
        current = {key: weights.get(key, 0.0) for key in self.loras.loaded}
        if self.loras.set_weights(current):
            self.prompts.clear()  # the text encoders changed: cached embeddings are stale
        if (self.loras.loaded, self.loras.weights) != before:
            # new LoRA layers, or scales that are Python numbers inside them: a graph froze the old ones
            self._forget_graphs()
            weights_changed = getattr(self.unet, "weights_changed", None)
            if weights_changed is not None:  # a stand-in with its own copy of the weights (an engine's refit)
                weights_changed()

    def _lora_weights(self, settings: StreamSettings, texts: Sequence[str]) -> dict[str, float]:
        """The weight of each usable LoRA file the settings name, tags in the prompts last."""
        weights: dict[str, float] = {}
        for name, weight in [*settings.loras, *(t for text in texts for t in prompt_syntax.parse(text).loras)]:
            key = self._lora_key(name)
            if key is not None:
                weights[key] = weight
        return weights

    def _lora_key(self, name: str) -> str | None:
        """The file a LoRA name stands for, or None (reported once) if it cannot be used."""
        if name in self._lora_files:
            return self._lora_files[name]
        try:
            if self.find_lora is None:
                raise ValueError("no models folders with LoRAs are configured (--models-dir)")
            key = str(self.find_lora(name))
        except Exception as e:
            self.report(f"LoRA {name!r} left out: {e}")
            key = None
        if key in self._unusable_loras:
            key = None
        self._lora_files[name] = key
        return key

    def _look(self, settings: StreamSettings, positive_texts: list[tuple[str, float]], negative_text: str,
              cfg: str, latent_shape: tuple[int, ...], count: int) -> _Look:
        encode = lambda text: self.prompts.encode(text, settings.clip_skip)  # noqa: E731
        parts = [(encode(text), w) for text, w in positive_texts]
        positive = _blend(parts, self.prompts, settings.clip_skip)
        negative = None
        if cfg in ("full", "initialize"):
            if self.model.xl and not negative_text:
                # SDXL was trained with zeroed conditioning for the empty prompt (diffusers'
                # force_zeros_for_empty_prompt), not with the encoding of ""
                negative = Conditioning(torch.zeros_like(positive.embeddings), torch.zeros_like(positive.pooled))
            else:
                positive, negative = self.prompts.pad_to_match(positive, encode(negative_text), settings.clip_skip)
        if settings.seed < 0 and not settings.seeds:
            noise = None
        else:
            seeds = [(s, w) for s, w in settings.seeds if w > 0] or [(settings.seed, 1.0)]
            noise = self._seed_blend(seeds, latent_shape, count)
            if settings.subseed_strength > 0:
                variation = self._seed_noise(settings.subseed, latent_shape, count)
                noise = tuple(slerp(n, v, settings.subseed_strength) for n, v in zip(noise, variation))
        return _Look(positive, negative, noise)

    def _seed_blend(self, seeds: list[tuple[int, float]], shape: tuple[int, ...], count: int) -> tuple[torch.Tensor, ...]:
        """Slerp the seeds' noises by weight, one seed at a time; a single seed is its noise exactly.

        Independent noises are (nearly) orthogonal, so the mix of weights w_i is sum(w_i n_i) /
        |w|: slerping the next noise in at the angle atan(w / |w so far|) gives exactly that, in
        any order, and keeps the noise's spread."""
        noise = self._seed_noise(seeds[0][0], shape, count)
        norm_sq = seeds[0][1] ** 2
        for seed, weight in seeds[1:]:
            other = self._seed_noise(seed, shape, count)
            t = 2 / math.pi * math.atan2(weight, math.sqrt(norm_sq))
            noise = tuple(slerp(a, b, t) for a, b in zip(noise, other))
            norm_sq += weight ** 2
        return noise

    def _start_transition(self, previous: _Plan | None, plan: _Plan) -> None:
        if previous is not None and _same_look(previous.look, plan.look):
            return  # nothing a transition eases changed (say, strength moved): keep any running one
        frames = plan.settings.transition_frames
        start = self._shown
        if previous is None or frames <= 0 or start is None or not _can_ease(start, plan.look):
            self._transition = None
            return
        self._transition = _Transition(start, frames)

    def _time_ids(self, settings: StreamSettings) -> torch.Tensor:
        # SDXL's micro-conditioning: original size, crop top-left, target size (diffusers' defaults)
        h, w = settings.height, settings.width
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device)

    def _step(self, t: int) -> _Step:
        alpha = float(self.alphas_cumprod[t])
        scaled = t * self.timestep_scaling
        sigma_data = 0.5
        return _Step(
            timestep=t, sqrt_alpha=alpha ** 0.5, sqrt_beta=(1.0 - alpha) ** 0.5,
            c_skip=sigma_data**2 / (scaled**2 + sigma_data**2),
            c_out=scaled / (scaled**2 + sigma_data**2) ** 0.5,
        )

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=self.dtype, device=self.device)

    def _batch(self, steps: Sequence[_Step], controls: Sequence[Sequence[float]] = ()) -> _Batch:
        """`controls`: per ControlNet, its scale at each of `steps`."""
        def column(values: Sequence[float]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=self.dtype, device=self.device).view(-1, 1, 1, 1)
        return _Batch(torch.tensor([s.timestep for s in steps], dtype=torch.long, device=self.device),
                      column([s.sqrt_alpha for s in steps]), column([s.sqrt_beta for s in steps]),
                      column([s.c_skip for s in steps]), column([s.c_out for s in steps]),
                      tuple(column(weights) for weights in controls))

    def _seed_noise(self, seed: int, shape: tuple[int, ...], count: int) -> tuple[torch.Tensor, ...]:
        key = (seed, shape, count)
        hit = self._noise_cache.get(key)
        if hit is None:
            generator = torch.Generator("cpu").manual_seed(seed)
            hit = tuple(torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
                        for _ in range(count))
            if len(self._noise_cache) >= 32:
                self._noise_cache.pop(next(iter(self._noise_cache)))
            self._noise_cache[key] = hit
        return hit

    # ------------------------------------------------------------------ render (per frame)
    def render_pixels(self, pixels: np.ndarray | torch.Tensor | None, output: OutputFormat, *, bgr: bool = False,
                      bottom_left: bool = False, tag: Any = None, controls: Sequence[torch.Tensor | None] = ()
                      ) -> np.ndarray:
        """The whole per-frame call: client pixels (H, W, C, on the host or already staged; None in
        txt2img) to output pixels on the host in the client format `output`. Benchmarks time this as
        the bare engine. The array returned is reused by the call after next: copy it to keep it."""
        return self.staging.download(self.launch(pixels, output, bgr=bgr, bottom_left=bottom_left, tag=tag,
                                                 controls=controls))

    def launch(self, pixels: np.ndarray | torch.Tensor | None, output: OutputFormat, *, bgr: bool = False,
               bottom_left: bool = False, tag: Any = None, controls: Sequence[torch.Tensor | None] = ()
               ) -> torch.Tensor:
        """`render_pixels` without the wait: the output pixels on the device, still being computed on
        CUDA; `staging.download` fetches them. The render loop stages the next input meanwhile."""
        settings = self.settings
        if settings is None:
            raise RuntimeError("Stream.prepare() must run before render_pixels()")
        raw = None
        if pixels is not None and settings.mode != TXT2IMG:
            raw = pixels if isinstance(pixels, torch.Tensor) else self.staging.upload(pixels)
        with torch.inference_mode():
            return self._render(raw, _PIXELS, (bgr, bottom_left), output, tag, controls)

    @torch.inference_mode()
    def render(self, image: torch.Tensor | None, tag: Any = None,
               controls: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """One frame: a (1, 3, H, W) image in [-1, 1] (None for txt2img) to a (1, 3, H, W) image in
        [0, 1]. `tag` travels with the frame; `output_tag` is the tag of the frame the output shows.
        `controls`: per ControlNet k, its control image for this frame, (1, 3, H, W) in [0, 1] at the
        frame's size on the device, or None (that ControlNet does not act)."""
        return self._render(image, _IMAGE, (), None, tag, controls)

    def _render(self, source: torch.Tensor | None, kind: str, pixel_format: tuple, output: OutputFormat | None,
                tag: Any, controls: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """Decide on the host what this frame is (its shape and its tensors), then run the tensor work:
        eagerly, or as a CUDA graph replay when `self.graphs` is set (engines.backends.torch_backend)."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("Stream.prepare() must run before render()")
        look = self._current_look(plan)
        noise = look.noise or self._fresh_noise(plan)
        self._previous_noise = noise
        if plan.settings.mode == TXT2IMG:
            source, kind = None, _NONE
        elif source is None:
            raise ValueError("img2img needs an input image")
        n = len(plan.steps)
        batched = self.stream_batch and n > 1
        flight = self._in_flight
        start_up = batched and not flight.latents
        images = tuple(controls[k] if k < len(controls) and plan.controls_on[k] and n else None
                       for k in range(len(plan.controls_on)))
        previous = self._previous_latent
        feedback = (plan.settings.feedback > 0 and kind != _NONE and previous is not None
                    and previous[0] == plan.latent_shape)
        bank_fits = (plan.latent_shape, n, batched)
        attention, bank = self._attention_mode(plan, bank_fits)
        shape = _Shape(kind, pixel_format, plan.settings.width, plan.settings.height, n, plan.cfg, batched, start_up,
                       output, tuple(image is not None for image in images), feedback, attention)
        negative = look.negative
        frame = _Frame(source, look.positive.embeddings, look.positive.pooled,
                       negative.embeddings if negative is not None else None,
                       negative.pooled if negative is not None else None, noise, plan.single, plan.batched,
                       plan.guidance, plan.delta, plan.time_ids, tuple(flight.latents), tuple(flight.noises), images,
                       previous[1] if feedback else None, plan.feedback if feedback else None,
                       plan.attention_weight if attention else None, bank)
        # Graphs for the whole per-frame call only (client pixels out, consumed before the next replay);
        # the start-up frame of a stream batch happens once per schedule: not worth a graph.
        run = self.graphs if self.graphs is not None and output is not None and not start_up else self._frame
        out, latents, noises, latent, banked = run(shape, frame)
        # What the next frame's coherence reads. Under CUDA graphs these are the graph's output buffers:
        # the next replay copies them into its static inputs before it overwrites them.
        # A frame with no input latent (txt2img) breaks the chain: the next img2img frame starts afresh
        # rather than from a latent shown long ago (and under CUDA graphs, another graph's buffer).
        self._previous_latent = (plan.latent_shape, latent) if latent is not None and kind != _NONE else None
        self._bank = (bank_fits, tuple(banked)) if attention else None
        if batched:
            tags = [tag] * (n - 1) if start_up else flight.tags
            self.output_tag = tags[-1]
            flight.latents, flight.noises, flight.tags = list(latents), list(noises), [tag, *tags[:-1]]
            self._flush = max(0, self._flush - 1)
        else:
            self.output_tag = tag
        return out

    def _fresh_noise(self, plan: _Plan) -> tuple[torch.Tensor, ...]:
        """Seed -1: new noise for each step, slerped `noise_lock` of the way back to the previous frame's
        (1: the same noise every frame; between: a slow drift). Drawn on the device, uncached; the slerp's
        fraction is the plan's device tensor, so no frame copies a number to the device."""
        count, lock, before = max(1, len(plan.steps)), plan.settings.noise_lock, self._previous_noise
        fits = before is not None and len(before) == count and before[0].shape == plan.latent_shape
        if lock >= 1 and fits:
            return before
        fresh = tuple(torch.randn(plan.latent_shape, device=self.device, dtype=self.dtype) for _ in range(count))
        if lock > 0 and fits:
            fresh = tuple(slerp(new, old, plan.noise_lock) for new, old in zip(fresh, before))
        return fresh

    def _attention_mode(self, plan: _Plan, fits: tuple) -> tuple[str, tuple[torch.Tensor, ...]]:
        """How the cached-attention bank acts in this frame, and the keys and values it attends to: off;
        recording only (the first frame, or the bank was made for another latent size or batch layout);
        or attending to the previous frame's."""
        weight = plan.settings.cached_attention
        if weight <= 0 or self._attention is None or not self._attention_acts() or not plan.steps:
            return coherence.OFF, ()
        if self._bank is None or self._bank[0] != fits:
            return coherence.RECORD, ()
        return (coherence.EXTEND if weight >= 1 else coherence.BLEND), self._bank[1]

    def _current_look(self, plan: _Plan) -> _Look:
        transition = self._transition
        if transition is None:
            look = plan.look
        else:
            transition.done += 1
            if transition.done >= transition.frames:  # the last frame of a transition is the target exactly
                look, self._transition = plan.look, None
            else:
                look = _mix_looks(transition.start, plan.look, _ease(transition.done / transition.frames))
        self._shown = look
        return look

    # ------------------------------------------------------------------ the frame's tensor work
    def _frame(self, shape: "_Shape", f: "_Frame") -> "_Result":
        """One frame, source to output, as a pure function of the tensors in `f` given `shape`: nothing
        here reads the plan or the settings, so a CUDA graph of it replays right with new values.
        Returns the output, (stream batch) the latents and noises now in flight, and what temporal
        coherence carries to the next frame."""
        image = f.source
        if shape.source == _PIXELS:
            bgr, bottom_left = shape.pixel_format
            image = model_image(image, bgr=bgr, bottom_left=bottom_left, width=shape.width, height=shape.height,
                                dtype=self.dtype)
        clean = None if image is None else self.model.autoencoder.encode(image)
        if shape.feedback:  # latent feedback: (1 - f) * clean + f * previous
            clean = torch.lerp(clean, f.previous_latent.to(clean.dtype), f.feedback.to(clean.dtype))
        flight: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] = ((), ())
        with self._attention.frame(shape.attention, f.attention_weight, f.bank) if shape.attention \
                else contextlib.nullcontext([]) as banked:
            if shape.steps == 0:  # strength 0: the input through the autoencoder
                latents = previous = clean
            elif shape.batched:
                latents, flight, previous = self._denoise_in_flight(clean, f, shape)
            else:
                latents = previous = self._denoise_frame(clean, f, shape)
        out = (self.model.autoencoder.decode(latents) / 2 + 0.5).clamp(0, 1)
        if shape.output is not None:
            out = client_pixels(out, shape.output)
        return _Result(out, *flight, previous, tuple(banked))

    @staticmethod
    def _noised(clean: torch.Tensor | None, noise: torch.Tensor, step: _Batch) -> torch.Tensor:
        """The latent at `step`'s timestep: the clean latent with the step's noise, or pure noise."""
        if clean is None:
            return noise  # txt2img: the first step is at t = 999, where the latent is all noise
        return step.sqrt_alpha * clean + step.sqrt_beta * noise

    def _denoise_frame(self, clean: torch.Tensor | None, f: "_Frame", shape: "_Shape") -> torch.Tensor:
        """Exact mode: all steps of this frame, one after the other."""
        latents = self._noised(clean, f.noise[0], f.single[0])
        residual = None
        for i in range(shape.steps):
            denoised, residual = self._denoise(latents, f.single[i], [f.noise[i]], f, shape, first=i == 0,
                                               residual=residual)
            if i + 1 < shape.steps:
                latents = self._noised(denoised, f.noise[i + 1], f.single[i + 1])
            else:
                latents = denoised
        return latents

    def _denoise_in_flight(self, clean: torch.Tensor | None, f: "_Frame", shape: "_Shape"
                           ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]],
                                      torch.Tensor]:
        """Stream batch: the new frame at the first step and the older frames at their later steps, in
        one UNet call; returns the oldest frame, now fully denoised, the frames still in flight, and the
        newest frame's estimate (what latent feedback blends into the next input: the output shown is
        n-1 frames older, and feeding that back would make n interleaved chains that flicker against
        each other)."""
        n = shape.steps
        new = self._noised(clean, f.noise[0], f.single[0])
        flight_latents, flight_noises = f.flight_latents, f.flight_noises
        if shape.start_up:
            # Pretend the earlier frames were this one, so the first outputs are real images rather than
            # the noise a zero-filled pipeline would show.
            start = clean if clean is not None else f.noise[0]
            flight_latents = tuple(self._noised(start, f.noise[j], f.single[j]) for j in range(1, n))
            flight_noises = tuple(f.noise[1:n])
        batch = torch.cat([new, *flight_latents])
        denoised, _ = self._denoise(batch, f.batched, [f.noise[0], *flight_noises], f, shape, first=True,
                                    residual=None)
        latents = tuple(self._noised(denoised[j:j + 1], f.noise[j + 1], f.single[j + 1]) for j in range(n - 1))
        # copies: in a CUDA graph f.noise is a static buffer that the next frame overwrites
        noises = tuple(noise.clone() for noise in f.noise[1:n])
        return denoised[n - 1:n], (latents, noises), denoised[0:1]

    def _denoise(self, latents: torch.Tensor, steps: _Batch, injected: list[torch.Tensor], f: "_Frame",
                 shape: "_Shape", *, first: bool, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One consistency step for a batch of latents, each at its own step: the model's x0 estimate
        with LCM's boundary condition. `injected` is the noise each latent was made with (residual CFG
        estimates the negative prediction from it). Returns the estimates and, for cfg `initialize`,
        the residual its negative pass measured."""
        b = latents.shape[0]
        timesteps = steps.timesteps
        cfg = shape.cfg
        run_negative = cfg == "full" or (cfg == "initialize" and first)
        model_input, embeds, pooled, times = latents, _repeat(f.positive, b), _repeat(f.positive_pooled, b), timesteps
        if run_negative:
            negatives = b if cfg == "full" else 1  # initialize: the negative of the newest latent only
            model_input = torch.cat([latents[:negatives], latents])
            embeds = torch.cat([_repeat(f.negative, negatives), embeds])
            if pooled is not None:
                pooled = torch.cat([_repeat(f.negative_pooled, negatives), pooled])
            times = torch.cat([timesteps[:negatives], timesteps])
        added = None
        if f.time_ids is not None:
            added = {"text_embeds": pooled, "time_ids": f.time_ids.expand(model_input.shape[0], -1)}
        negatives = (b if cfg == "full" else 1) if run_negative else 0
        down, mid = self._control(model_input, times, embeds, added, steps, f, shape, negatives=negatives)
        if shape.attention:
            self._attention.call(negatives)
        out = self.unet(model_input, times, encoder_hidden_states=embeds, added_cond_kwargs=added,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        sqrt_alpha, sqrt_beta = steps.sqrt_alpha, steps.sqrt_beta
        prediction = self.prediction_type
        if cfg in ("self", "initialize") and prediction != "epsilon":
            # residual CFG estimates the negative as noise, so guide in noise (epsilon) terms
            noisy = torch.cat([latents[:1], latents]) if run_negative else latents
            alpha_all = torch.cat([sqrt_alpha[:1], sqrt_alpha]) if run_negative else sqrt_alpha
            beta_all = torch.cat([sqrt_beta[:1], sqrt_beta]) if run_negative else sqrt_beta
            out = _to_epsilon(out, noisy, alpha_all, beta_all, prediction)
            prediction = "epsilon"
        noise_in = torch.cat(injected).to(out.dtype)
        if run_negative:
            negatives = b if cfg == "full" else 1
            negative, out = out[:negatives], out[negatives:]
            if cfg == "initialize":
                residual = negative - noise_in[:1]
                negative = torch.cat([negative, f.delta * (noise_in[1:] + residual)])
        elif cfg == "self":
            negative = f.delta * noise_in
        elif cfg == "initialize":
            negative = f.delta * (noise_in + (residual if residual is not None else 0))
        else:
            negative = None
        if negative is not None:
            out = negative + f.guidance * (out - negative)
        if prediction == "epsilon":
            x0 = (latents - sqrt_beta * out) / sqrt_alpha
        elif prediction == "v_prediction":
            x0 = sqrt_alpha * latents - sqrt_beta * out
        else:  # "sample"
            x0 = out
        return steps.c_out * x0 + steps.c_skip * latents, residual


    def _control(self, model_input: torch.Tensor, times: torch.Tensor, embeds: torch.Tensor, added: dict | None,
                 steps: _Batch, f: "_Frame", shape: "_Shape", *, negatives: int
                 ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """The residuals the acting ControlNets add to the UNet, each scaled by its weight at each latent's
        step, summed (diffusers' MultiControlNet); None when none acts. The negative-prompt entries of a
        guided batch are steered too, as diffusers does outside guess mode."""
        down = mid = None
        for k, acting in enumerate(shape.controls):
            if not acting:
                continue
            weight = steps.controls[k]
            if negatives:
                weight = torch.cat([weight[:negatives], weight])
            image = f.controls[k].to(model_input.dtype).expand(model_input.shape[0], -1, -1, -1)
            k_down, k_mid = self.controlnets[k](model_input, times, encoder_hidden_states=embeds, controlnet_cond=image,
                                                conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
            k_down = [residual * weight for residual in k_down]
            k_mid = k_mid * weight
            down = k_down if down is None else [a + b for a, b in zip(down, k_down)]
            mid = k_mid if mid is None else mid + k_mid
        return down, mid


def control_weights(scale: float, start: float, end: float, steps: int) -> list[float]:
    """A ControlNet's scale at each of a frame's steps: `scale` where the step lies inside [start, end]
    of the schedule, 0 outside, by diffusers' rule (step i of n acts unless i/n < start or (i+1)/n > end)."""
    return [0.0 if i / steps < start or (i + 1) / steps > end else float(scale) for i in range(steps)]


# What a frame's source is: nothing (txt2img), a model image (1, 3, H, W) in [-1, 1], or client pixels.
_NONE, _IMAGE, _PIXELS = "none", "image", "pixels"


@dataclass(frozen=True)
class _Shape:
    """Everything a frame's tensor work depends on besides tensor values: the key of its CUDA graph."""

    source: str  # _NONE, _IMAGE or _PIXELS
    pixel_format: tuple  # _PIXELS: (bgr, bottom_left)
    width: int
    height: int
    steps: int
    cfg: str
    batched: bool  # stream batch
    start_up: bool  # stream batch: nothing in flight yet
    output: OutputFormat | None  # None: the model image in [0, 1]
    controls: tuple[bool, ...] = ()  # per ControlNet: whether it acts in this frame
    feedback: bool = False  # latent feedback blends the previous latent into this frame's
    attention: str = ""  # the cached-attention bank's mode (engines.coherence; "": off)


class _Frame(NamedTuple):
    """The tensors one frame is made from: every value that can change between frames is here."""

    source: torch.Tensor | None
    positive: torch.Tensor
    positive_pooled: torch.Tensor | None
    negative: torch.Tensor | None
    negative_pooled: torch.Tensor | None
    noise: tuple[torch.Tensor, ...]
    single: tuple[_Batch, ...]
    batched: _Batch | None
    guidance: torch.Tensor
    delta: torch.Tensor
    time_ids: torch.Tensor | None
    flight_latents: tuple[torch.Tensor, ...]
    flight_noises: tuple[torch.Tensor, ...]
    controls: tuple[torch.Tensor | None, ...] = ()  # per ControlNet: its control image, (1, 3, H, W) in [0, 1]
    previous_latent: torch.Tensor | None = None  # latent feedback: the previous frame's latent (1, C, h, w)
    feedback: torch.Tensor | None = None  # latent feedback: its fraction, 0-dim
    attention_weight: torch.Tensor | None = None  # cached attention: its weight, 0-dim
    bank: tuple[torch.Tensor, ...] = ()  # cached attention: the previous frame's keys and values


class _Result(NamedTuple):
    """What one frame's tensor work returns: the output, and what the next frame reads."""

    out: torch.Tensor
    flight_latents: tuple[torch.Tensor, ...]  # stream batch: the latents now in flight
    flight_noises: tuple[torch.Tensor, ...]
    latent: torch.Tensor | None  # latent feedback's `previous` for the next frame (None: txt2img at strength 0)
    bank: tuple[torch.Tensor, ...]  # cached attention: this frame's keys and values (empty when off)


def _to_epsilon(out: torch.Tensor, latents: torch.Tensor, sqrt_alpha: torch.Tensor, sqrt_beta: torch.Tensor,
                prediction: str) -> torch.Tensor:
    """A v or sample prediction as the noise prediction it implies, at each latent's timestep."""
    if prediction == "v_prediction":
        return sqrt_alpha * out + sqrt_beta * latents
    return (latents - sqrt_alpha * out) / sqrt_beta  # "sample": out is x0


def _repeat(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if t is None or t.shape[0] == n:
        return t
    return t.expand(n, *t.shape[1:])


def _blend(parts: list[tuple[Conditioning, float]], encoder: PromptEncoder, clip_skip: int) -> Conditioning:
    """Weighted mean of conditionings; a single one (other weights 0) is returned as it is."""
    if len(parts) == 1:
        return parts[0][0]
    longest = max((c for c, _ in parts), key=lambda c: c.embeddings.shape[1])
    padded = [encoder.pad_to_match(c, longest, clip_skip)[0] for c, _ in parts]
    total = sum(w for _, w in parts)
    embeddings = sum(c.embeddings * (w / total) for c, (_, w) in zip(padded, parts))
    pooled = None
    if padded[0].pooled is not None:
        pooled = sum(c.pooled * (w / total) for c, (_, w) in zip(padded, parts))
    return Conditioning(embeddings, pooled)


def _can_ease(a: _Look, b: _Look) -> bool:
    """Only between looks of the same noise shape with fixed seeds (seed -1 has nothing to ease from)."""
    return (a.noise is not None and b.noise is not None and len(a.noise) == len(b.noise)
            and a.noise[0].shape == b.noise[0].shape and (a.negative is None) == (b.negative is None))


def _same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    return x is y or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))


def _same_look(a: _Look, b: _Look) -> bool:
    if (a.noise is None) != (b.noise is None) or (a.negative is None) != (b.negative is None):
        return False
    same_noise = a.noise is None or (len(a.noise) == len(b.noise) and all(_same(x, y) for x, y in zip(a.noise, b.noise)))
    same_negative = a.negative is None or (_same(a.negative.embeddings, b.negative.embeddings)
                                           and _same(a.negative.pooled, b.negative.pooled))
    return (same_noise and same_negative and _same(a.positive.embeddings, b.positive.embeddings)
            and _same(a.positive.pooled, b.positive.pooled))


def _mix_looks(a: _Look, b: _Look, t: float) -> _Look:
    """`t` of the way from look a to look b: embeddings interpolated linearly, noise slerped."""
    def lerp(x, y):
        if x is None or y is None:
            return y
        if x.shape != y.shape:  # prompts of different chunk counts: ease the shared part only
            return y
        return torch.lerp(x, y, t)
    positive = Conditioning(lerp(a.positive.embeddings, b.positive.embeddings), lerp(a.positive.pooled, b.positive.pooled))
    negative = b.negative
    if negative is not None and positive.embeddings.shape != negative.embeddings.shape:
        positive = b.positive  # cannot batch them: skip to the target conditioning
    noise = tuple(slerp(x, y, t) for x, y in zip(a.noise, b.noise))
    return _Look(positive, negative, noise)
