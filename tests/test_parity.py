"""Our stream pipeline against diffusers' own StableDiffusionImg2ImgPipeline on the tiny model.

Both get the same model, timesteps, noise (the same CPU generator seed) and prompt embeddings; the
pipeline runs LCMScheduler with our timesteps passed as a custom schedule and strength 1.0, which adds
noise at the first of them exactly as our strength mapping does.
"""
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from engines import registry
from engines.stream import Stream, StreamSettings, timesteps_for

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def model():
    return registry.load("tiny", CPU, F32)


def _image(size=512):
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([x, y, (x * y) ** 0.5]).unsqueeze(0)  # (1, 3, H, W) in [0, 1]


def _pipeline(cls, model):
    return cls(vae=model.autoencoder.module, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
               unet=model.unet, scheduler=model.scheduler, safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)


@pytest.mark.parametrize("strength,steps,guidance", [(0.5, 1, 1.0), (0.7, 3, 1.0), (0.6, 2, 3.0)])
def test_img2img_matches_diffusers_pipeline(model, strength, steps, guidance):
    settings = StreamSettings(prompt="a red fox in snow", negative_prompt="blurry", seed=7, strength=strength,
                              steps=steps, guidance_scale=guidance)
    stream = Stream(model, CPU, F32)
    stream.prepare(settings)
    image = _image()
    ours = stream.render(image * 2 - 1)

    pipe = _pipeline(StableDiffusionImg2ImgPipeline, model)
    timesteps = list(timesteps_for(strength, steps, "img2img"))
    theirs = pipe(prompt_embeds=stream.prompts.encode(settings.prompt),
                  negative_prompt_embeds=stream.prompts.encode(settings.negative_prompt),
                  image=image, strength=1.0, timesteps=timesteps, guidance_scale=guidance,
                  generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="pt").images
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_v_prediction_models_match_diffusers_pipeline(model):
    """SD 2.x (768-v) models predict v, not noise; the scheduler config says which."""
    from diffusers import LCMScheduler

    v_model = registry.ModelBundle(**{**model.__dict__,
                                      "scheduler": LCMScheduler.from_config(model.scheduler.config,
                                                                            prediction_type="v_prediction")})
    settings = StreamSettings(prompt="a lighthouse", seed=5, strength=0.8, steps=2)
    stream = Stream(v_model, CPU, F32)
    stream.prepare(settings)
    image = _image()
    ours = stream.render(image * 2 - 1)
    theirs = _pipeline(StableDiffusionImg2ImgPipeline, v_model)(
        prompt_embeds=stream.prompts.encode(settings.prompt), image=image, strength=1.0,
        timesteps=list(timesteps_for(0.8, 2, "img2img")), guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-4


def test_txt2img_matches_diffusers_pipeline(model):
    settings = StreamSettings(prompt="a blue whale", seed=11, steps=2, mode="txt2img")
    stream = Stream(model, CPU, F32)
    stream.prepare(settings)
    ours = stream.render(None)
    pipe = _pipeline(StableDiffusionPipeline, model)
    theirs = pipe(prompt_embeds=stream.prompts.encode(settings.prompt), height=512, width=512,
                  timesteps=list(timesteps_for(1.0, 2, "txt2img")), guidance_scale=1.0,
                  generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-4
