"""Our stream pipeline against diffusers' own StableDiffusionImg2ImgPipeline on the tiny model.

Both get the same model, timesteps, noise (the same CPU generator seed) and prompt embeddings; the
pipeline runs LCMScheduler with our timesteps passed as a custom schedule and strength 1.0, which adds
noise at the first of them exactly as our strength mapping does.
"""
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline

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


@pytest.mark.parametrize("strength,steps,guidance", [(0.5, 1, 1.0), (0.7, 3, 1.0), (0.6, 2, 3.0), (0.9, 4, 1.0),
                                                     (0.9, 4, 3.0), (0.5, 1, 3.0)])
def test_img2img_matches_diffusers_pipeline(model, strength, steps, guidance):
    settings = StreamSettings(prompt="a red fox in snow", negative_prompt="blurry", seed=7, strength=strength,
                              steps=steps, guidance_scale=guidance)
    stream = Stream(model, CPU, F32)
    stream.prepare(settings)
    image = _image()
    ours = stream.render(image * 2 - 1)

    pipe = _pipeline(StableDiffusionImg2ImgPipeline, model)
    timesteps = list(timesteps_for(strength, steps, "img2img"))
    theirs = pipe(prompt_embeds=stream.prompts.encode(settings.prompt).embeddings,
                  negative_prompt_embeds=stream.prompts.encode(settings.negative_prompt).embeddings,
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
        prompt_embeds=stream.prompts.encode(settings.prompt).embeddings, image=image, strength=1.0,
        timesteps=list(timesteps_for(0.8, 2, "img2img")), guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-4


def test_txt2img_matches_diffusers_pipeline(model):
    settings = StreamSettings(prompt="a blue whale", seed=11, steps=2, mode="txt2img")
    stream = Stream(model, CPU, F32)
    stream.prepare(settings)
    ours = stream.render(None)
    pipe = _pipeline(StableDiffusionPipeline, model)
    theirs = pipe(prompt_embeds=stream.prompts.encode(settings.prompt).embeddings, height=512, width=512,
                  timesteps=list(timesteps_for(1.0, 2, "txt2img")), guidance_scale=1.0,
                  generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("steps,guidance", [(1, 1.0), (4, 1.0), (2, 3.0)])
def test_sdxl_img2img_matches_diffusers_pipeline(steps, guidance):
    """SDXL-shaped models: two text encoders, pooled text embeddings and size conditioning (time ids)."""
    model = registry.load("tiny-xl", CPU, F32)
    settings = StreamSettings(prompt="a red fox in snow", negative_prompt="blurry", seed=3, strength=0.8,
                              steps=steps, guidance_scale=guidance, width=256, height=256)
    stream = Stream(model, CPU, F32)
    stream.prepare(settings)
    image = _image(256)
    ours = stream.render(image * 2 - 1)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=model.autoencoder.module, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=model.scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    positive, negative = stream.prompts.encode(settings.prompt), stream.prompts.encode(settings.negative_prompt)
    theirs = pipe(prompt_embeds=positive.embeddings, pooled_prompt_embeds=positive.pooled,
                  negative_prompt_embeds=negative.embeddings, negative_pooled_prompt_embeds=negative.pooled,
                  image=image, strength=1.0, timesteps=list(timesteps_for(0.8, steps, "img2img")),
                  guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(settings.seed),
                  output_type="pt").images
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("steps,guidance", [(1, 1.0), (4, 3.0)])
def test_img2img_with_a_lora_at_half_weight_matches_diffusers_pipeline(tmp_path, steps, guidance):
    import copy

    from engines import tiny
    from tests.test_lora import _peft_lora, write_diffusers

    path = write_diffusers(_peft_lora(tiny.build_bundle(), seed=9), tmp_path, "style.safetensors")
    model = registry.load("tiny", CPU, F32)
    theirs_model = copy.deepcopy(model)  # the pipeline gets its own modules for its own adapter
    settings = StreamSettings(prompt="a red fox in snow", negative_prompt="blurry", seed=7, strength=0.9,
                              steps=steps, guidance_scale=guidance, loras=(("style", 0.5),))
    stream = Stream(model, CPU, F32, find_lora=lambda name: path)
    stream.prepare(settings)
    image = _image()
    ours = stream.render(image * 2 - 1)

    pipe = _pipeline(StableDiffusionImg2ImgPipeline, theirs_model)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], [0.5])
    theirs = pipe(prompt=settings.prompt, negative_prompt=settings.negative_prompt, image=image, strength=1.0,
                  timesteps=list(timesteps_for(0.9, steps, "img2img")), guidance_scale=guidance,
                  generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-4
    stream.prepare(StreamSettings(**{**settings.__dict__, "loras": (("style", 0.0),)}))
    assert (stream.render(image * 2 - 1) - theirs).abs().max().item() > 1e-3  # the LoRA did something
