"""The per-frame pipeline: encode, noise, denoise, decode. Reads top to bottom as the algorithm.

`Stream.prepare(settings)` does everything that depends only on the settings (prompt embeddings,
timesteps and their coefficients, the seed's noise) so that `Stream.render(image)` is pure tensor work
with no host synchronisation.

Timesteps. `strength` picks the first timestep on the model's 1000-step training schedule,
t0 = round(strength * 1000) - 1, continuously, so strength can be played live; `steps` spreads that
many timesteps evenly from t0 towards 0 (t_i = floor(t0 * (steps - i) / steps)). txt2img starts from
pure noise at t0 = 999. Each step predicts x0 and applies the latent-consistency boundary condition
(c_skip, c_out) exactly as diffusers' LCMScheduler does; between steps the x0 estimate is re-noised to
the next timestep with the seed's own noise. One step from t = 999 is the sd-turbo / SDXL-turbo sampler;
2 to 4 steps is LCM's. The noise of a seed is fixed (drawn on the CPU from torch.Generator(seed)), so
the same seed, prompt and frame give the same image on every run.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from .prompts import PromptEncoder
from .bundle import ModelBundle

log = logging.getLogger(__name__)

TXT2IMG = "txt2img"
IMG2IMG = "img2img"


@dataclass(frozen=True)
class StreamSettings:
    """What one frame is made with; the bridge fills it from its parameter snapshot."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    strength: float = 0.5
    guidance_scale: float = 1.0
    steps: int = 1
    mode: str = IMG2IMG
    width: int = 512
    height: int = 512


def timesteps_for(strength: float, steps: int, mode: str, train_steps: int = 1000) -> tuple[int, ...]:
    """The denoising timesteps for a frame (see the module docstring); empty means no denoising."""
    first = train_steps - 1 if mode == TXT2IMG else min(train_steps - 1, round(strength * train_steps) - 1)
    if first < 0:
        return ()
    out: list[int] = []
    for i in range(steps):
        t = first * (steps - i) // steps
        if not out or t < out[-1]:
            out.append(t)
    return tuple(out)


@dataclass(frozen=True)
class _Step:
    timestep: torch.Tensor  # long scalar on the device
    sqrt_alpha: float  # sqrt(alphas_cumprod[t])
    sqrt_beta: float  # sqrt(1 - alphas_cumprod[t])
    c_skip: float
    c_out: float


@dataclass(frozen=True)
class _Plan:
    settings: StreamSettings
    embeddings: torch.Tensor  # (1, T, D), or (2, T, D) = [negative, positive] with guidance
    guidance: bool
    steps: tuple[_Step, ...]
    latent_shape: tuple[int, int, int, int]
    noise: tuple[torch.Tensor, ...] | None  # None: seed -1, new noise every frame


class Stream:
    """One model's real-time img2img / txt2img stream on one device."""

    def __init__(self, model: ModelBundle, device: torch.device, dtype: torch.dtype, prompt_cache_size: int = 64):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.prompts = PromptEncoder(model.tokenizer, model.text_encoder, device, dtype, prompt_cache_size)
        config = model.scheduler.config
        self.prediction_type = config.prediction_type
        self.timestep_scaling = float(getattr(config, "timestep_scaling", 10.0))
        self.train_steps = int(config.num_train_timesteps)
        self.alphas_cumprod = model.scheduler.alphas_cumprod.to(torch.float64)
        self._plan: _Plan | None = None
        self._noise_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}

    @property
    def settings(self) -> StreamSettings | None:
        return self._plan.settings if self._plan else None

    # ------------------------------------------------------------------ prepare (slow, per change)
    def prepare(self, settings: StreamSettings) -> None:
        """Precompute everything `render` needs for `settings`; cheap when little changed."""
        factor = self.model.autoencoder.spatial_factor
        if settings.width % factor or settings.height % factor:
            raise ValueError(f"width and height must be multiples of {factor}")
        guidance = settings.guidance_scale > 1.0
        positive = self.prompts.encode(settings.prompt)
        embeddings = torch.cat([self.prompts.encode(settings.negative_prompt), positive]) if guidance else positive
        timesteps = timesteps_for(settings.strength, settings.steps, settings.mode, self.train_steps)
        latent_shape = (1, self.model.autoencoder.latent_channels, settings.height // factor, settings.width // factor)
        noise = None if settings.seed < 0 else self._seed_noise(settings.seed, latent_shape, max(1, len(timesteps)))
        self._plan = _Plan(settings, embeddings, guidance, tuple(self._step(t) for t in timesteps), latent_shape, noise)

    def _step(self, t: int) -> _Step:
        alpha = float(self.alphas_cumprod[t])
        scaled = t * self.timestep_scaling
        sigma_data = 0.5
        return _Step(
            timestep=torch.tensor(t, dtype=torch.long, device=self.device),
            sqrt_alpha=alpha ** 0.5, sqrt_beta=(1.0 - alpha) ** 0.5,
            c_skip=sigma_data**2 / (scaled**2 + sigma_data**2),
            c_out=scaled / (scaled**2 + sigma_data**2) ** 0.5,
        )

    def _seed_noise(self, seed: int, shape: tuple[int, ...], count: int) -> tuple[torch.Tensor, ...]:
        key = (seed, shape, count)
        hit = self._noise_cache.get(key)
        if hit is None:
            generator = torch.Generator("cpu").manual_seed(seed)
            hit = tuple(torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
                        for _ in range(count))
            if len(self._noise_cache) >= 16:
                self._noise_cache.pop(next(iter(self._noise_cache)))
            self._noise_cache[key] = hit
        return hit

    # ------------------------------------------------------------------ render (per frame)
    @torch.inference_mode()
    def render(self, image: torch.Tensor | None) -> torch.Tensor:
        """One frame: a (1, 3, H, W) image in [-1, 1] (None for txt2img) to a (1, 3, H, W) image in [0, 1]."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("Stream.prepare() must run before render()")
        noise = plan.noise or self._seed_noise(random.randrange(2**31), plan.latent_shape, max(1, len(plan.steps)))
        if plan.settings.mode == TXT2IMG:
            latents = noise[0]
        else:
            if image is None:
                raise ValueError("img2img needs an input image")
            latents = self.model.autoencoder.encode(image)
            if plan.steps:
                first = plan.steps[0]
                latents = first.sqrt_alpha * latents + first.sqrt_beta * noise[0]
        for i, step in enumerate(plan.steps):
            denoised = self._denoise(latents, step, plan)
            if i + 1 < len(plan.steps):
                nxt = plan.steps[i + 1]
                latents = nxt.sqrt_alpha * denoised + nxt.sqrt_beta * noise[i + 1]
            else:
                latents = denoised
        decoded = self.model.autoencoder.decode(latents)
        return (decoded / 2 + 0.5).clamp(0, 1)

    def _denoise(self, latents: torch.Tensor, step: _Step, plan: _Plan) -> torch.Tensor:
        """One consistency step: the model's x0 estimate at `step`, with LCM's boundary condition."""
        model_input = torch.cat([latents, latents]) if plan.guidance else latents
        out = self.model.unet(model_input, step.timestep, encoder_hidden_states=plan.embeddings).sample
        if plan.guidance:
            negative, positive = out.chunk(2)
            out = negative + plan.settings.guidance_scale * (positive - negative)
        if self.prediction_type == "epsilon":
            x0 = (latents - step.sqrt_beta * out) / step.sqrt_alpha
        elif self.prediction_type == "v_prediction":
            x0 = step.sqrt_alpha * latents - step.sqrt_beta * out
        else:  # "sample"
            x0 = out
        return step.c_out * x0 + step.c_skip * latents
