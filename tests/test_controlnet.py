"""ControlNets, engine side: in the stream (parity with diffusers' ControlNet img2img pipelines, SD and
SDXL, on the tiny models and their tiny ControlNets, live scales, the start/end rule, several at once,
stream batch) and loading them by name from model folders, in diffusers' layout and the original one."""
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionXLControlNetImg2ImgPipeline

from safetensors.torch import save_file

from engines import controlnet as controlnets
from engines import registry, tiny
from engines.bundle import ModelError
from engines.folders import ModelFolders
from engines.stream import Stream, StreamSettings, control_weights, timesteps_for
from tests.ldm_format import controlnet_to_ldm

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def model():
    return registry.load("tiny", CPU, F32)


@pytest.fixture(scope="module")
def controlnet():
    return tiny.build_controlnet()


@pytest.fixture(scope="module")
def xl_model():
    return registry.load("tiny-xl", CPU, F32)


@pytest.fixture(scope="module")
def xl_controlnet():
    return tiny.build_controlnet(xl=True)


def _images(size=512):
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([x, y, (x * y) ** 0.5]).unsqueeze(0)  # (1, 3, H, W) in [0, 1]
    control = torch.stack([y, x, 1 - x]).unsqueeze(0)
    return image, control


class _Timesteps(LCMScheduler):
    """LCMScheduler on our timesteps: the ControlNet pipeline has no `timesteps` argument of its own."""

    fixed: tuple[int, ...] = ()

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        super().set_timesteps(device=device, timesteps=list(self.fixed))


def _scheduler(model, strength: float, steps: int) -> _Timesteps:
    """The model's LCM scheduler on the timesteps the stream takes for this strength and step count."""
    scheduler = _Timesteps.from_config(model.scheduler.config)
    scheduler.fixed = timesteps_for(strength, steps, "img2img")
    return scheduler


def _prepared(model, controlnets, settings, *, stream_batch: bool = False) -> Stream:
    """A stream of `model` steered by `controlnets`, prepared for `settings`."""
    stream = Stream(model, CPU, F32, stream_batch=stream_batch)
    stream.set_controlnets(controlnets)
    stream.prepare(settings)
    return stream


@pytest.mark.parametrize("strength,steps,guidance,scale,start,end",
                         [(0.6, 2, 1.0, 0.8, 0.0, 1.0), (0.9, 4, 3.0, 1.3, 0.25, 0.75), (0.7, 3, 1.0, 1.0, 0.0, 0.5)])
def test_controlnet_img2img_matches_diffusers_pipeline(model, controlnet, strength, steps, guidance, scale, start, end):
    image, control = _images()
    settings = StreamSettings(prompt="a red fox in snow", negative_prompt="blurry", seed=7, strength=strength,
                              steps=steps, guidance_scale=guidance, controls=((scale, start, end),))
    stream = _prepared(model, [controlnet], settings)
    ours = stream.render(image * 2 - 1, controls=[control])

    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=model.autoencoder.module, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        controlnet=controlnet, scheduler=_scheduler(model, strength, steps), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=stream.prompts.encode(settings.prompt).embeddings,
                  negative_prompt_embeds=stream.prompts.encode(settings.negative_prompt).embeddings,
                  image=image, control_image=control, strength=1.0, num_inference_steps=steps,
                  guidance_scale=guidance, controlnet_conditioning_scale=scale, control_guidance_start=start,
                  control_guidance_end=end, generator=torch.Generator("cpu").manual_seed(settings.seed),
                  output_type="pt").images
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("strength,steps,guidance,scale,start,end",
                         [(0.8, 2, 1.0, 0.8, 0.0, 1.0), (0.9, 4, 3.0, 1.3, 0.25, 0.75)])
def test_sdxl_controlnet_img2img_matches_diffusers_pipeline(xl_model, xl_controlnet, strength, steps, guidance,
                                                            scale, start, end):
    """SDXL: the ControlNet gets the pooled text and size conditioning (time ids) the UNet gets."""
    model = xl_model
    image, control = _images(256)
    settings = StreamSettings(prompt="a red fox in snow", negative_prompt="blurry", seed=3, strength=strength,
                              steps=steps, guidance_scale=guidance, width=256, height=256,
                              controls=((scale, start, end),))
    stream = _prepared(model, [xl_controlnet], settings)
    ours = stream.render(image * 2 - 1, controls=[control])

    pipe = StableDiffusionXLControlNetImg2ImgPipeline(
        vae=model.autoencoder.module, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, controlnet=xl_controlnet,
        scheduler=_scheduler(model, strength, steps), requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    positive, negative = stream.prompts.encode(settings.prompt), stream.prompts.encode(settings.negative_prompt)
    theirs = pipe(prompt_embeds=positive.embeddings, pooled_prompt_embeds=positive.pooled,
                  negative_prompt_embeds=negative.embeddings, negative_pooled_prompt_embeds=negative.pooled,
                  image=image, control_image=control, strength=1.0, num_inference_steps=steps,
                  guidance_scale=guidance, controlnet_conditioning_scale=scale, control_guidance_start=start,
                  control_guidance_end=end, original_size=(256, 256), target_size=(256, 256),
                  generator=torch.Generator("cpu").manual_seed(settings.seed), output_type="pt").images
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def _render(model, controlnets, settings, image, controls):
    return _prepared(model, controlnets, settings).render(image, controls=controls)


def test_a_control_image_steers_the_output_and_scale_zero_restores_it(model, controlnet):
    image, control = _images(128)
    image = image * 2 - 1
    base = StreamSettings(prompt="a red fox", seed=3, strength=0.7, steps=2, width=128, height=128)
    plain = _render(model, [], base, image, [])
    steered = _render(model, [controlnet], StreamSettings(**{**base.__dict__, "controls": ((1.0, 0.0, 1.0),)}),
                      image, [control])
    off = _render(model, [controlnet], StreamSettings(**{**base.__dict__, "controls": ((0.0, 0.0, 1.0),)}),
                  image, [control])
    no_image = _render(model, [controlnet], StreamSettings(**{**base.__dict__, "controls": ((1.0, 0.0, 1.0),)}),
                       image, [None])
    assert (steered - plain).abs().max().item() > 1e-2
    assert torch.equal(off, plain) and torch.equal(no_image, plain)


def test_the_scale_is_a_live_value_of_one_prepared_stream(model, controlnet):
    image, control = _images(128)
    image = image * 2 - 1
    stream = Stream(model, CPU, F32)
    stream.set_controlnets([controlnet])
    outputs = []
    for scale in (0.5, 1.5, 0.5):
        stream.prepare(StreamSettings(prompt="a red fox", seed=3, strength=0.7, width=128, height=128,
                                      controls=((scale, 0.0, 1.0),)))
        outputs.append(stream.render(image, controls=[control]))
    assert (outputs[0] - outputs[1]).abs().max().item() > 1e-3
    assert torch.equal(outputs[0], outputs[2])


def test_two_controlnets_add_their_residuals(model, controlnet):
    image, control = _images(128)
    image = image * 2 - 1
    settings = StreamSettings(prompt="a red fox", seed=3, strength=0.7, width=128, height=128,
                              controls=((0.6, 0.0, 1.0), (0.4, 0.0, 1.0)))
    both = _render(model, [controlnet, controlnet], settings, image, [control, control])
    # the same ControlNet twice at 0.6 and 0.4 is that ControlNet once at 1.0
    once = _render(model, [controlnet], StreamSettings(**{**settings.__dict__, "controls": ((1.0, 0.0, 1.0),)}),
                   image, [control])
    torch.testing.assert_close(both, once, rtol=1e-4, atol=1e-4)


def test_stream_batch_runs_with_a_controlnet(model, controlnet):
    image, control = _images(128)
    image = image * 2 - 1
    settings = StreamSettings(prompt="a red fox", seed=3, strength=0.9, steps=3, width=128, height=128,
                              controls=((1.0, 0.0, 1.0),))
    stream = _prepared(model, [controlnet], settings, stream_batch=True)
    steered = [stream.render(image, controls=[control]) for _ in range(3)]
    plain = _prepared(model, [], settings, stream_batch=True)
    unsteered = [plain.render(image) for _ in range(3)]
    assert all(torch.isfinite(frame).all() for frame in steered)
    assert (steered[-1] - unsteered[-1]).abs().max().item() > 1e-2


def test_in_stream_batch_a_new_control_image_is_rendered_until_every_frame_in_flight_has_it(model, controlnet):
    image, control = _images(64)
    image = image * 2 - 1
    settings = StreamSettings(prompt="a red fox", seed=3, strength=0.9, steps=3, width=64, height=64,
                              controls=((1.0, 0.0, 1.0),))
    new_control = control.flip(2)
    stream = _prepared(model, [controlnet], settings, stream_batch=True)
    for _ in range(4):
        stream.render(image, controls=[control])
    assert not stream.wants_frame
    stream.refresh()  # what the render loop does when a control frame arrives
    frames = []
    while stream.wants_frame:
        frames.append(stream.render(image, controls=[new_control]))
    settled = _prepared(model, [controlnet], settings, stream_batch=True)
    target = [settled.render(image, controls=[new_control]) for _ in range(4)][-1]
    assert len(frames) == 3 and torch.equal(frames[-1], target)


def test_control_weights_follow_diffusers_start_and_end_rule():
    assert control_weights(0.8, 0.0, 1.0, 4) == [0.8] * 4
    assert control_weights(1.0, 0.25, 0.75, 4) == [0.0, 1.0, 1.0, 0.0]
    assert control_weights(1.0, 0.0, 0.5, 3) == [1.0, 0.0, 0.0]
    assert control_weights(2.0, 0.0, 1.0, 1) == [2.0]


# ---------------------------------------------------------------------------------------- loading

def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_controlnets_load_by_name_from_a1111_and_comfyui_trees(model, controlnet, tmp_path):
    a1111 = tmp_path / "webui" / "models"
    (a1111 / "Stable-diffusion").mkdir(parents=True)
    (a1111 / "ControlNet").mkdir()
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, a1111 / "ControlNet" / "depth.safetensors")
    comfy = tmp_path / "ComfyUI" / "models"
    (comfy / "checkpoints").mkdir(parents=True)
    controlnet.save_pretrained(comfy / "controlnet" / "canny")
    folders = ModelFolders([str(tmp_path / "webui"), str(tmp_path / "ComfyUI")])
    for name in ("depth", "canny"):
        loaded = controlnets.load(name, model, folders, CPU, F32)
        assert _same(loaded, controlnet), name
    assert _same(controlnets.load("tiny", model, None, CPU, F32), controlnet)


def test_a_controlnet_for_another_model_family_is_refused_with_the_reason(controlnet, tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, path)
    xl = registry.load("tiny-xl", CPU, F32)
    with pytest.raises(ModelError, match="another model family"):
        controlnets.load(str(path), xl, None, CPU, F32)


def _residuals(module, seed=0):
    """A ControlNet's down and mid residuals for fixed random inputs (with SDXL's added conditioning
    where the module takes it)."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    embeds = torch.randn(2, 9, int(module.config.cross_attention_dim), generator=g)
    cond = torch.rand(2, 3, 128, 128, generator=g)
    added = None
    if module.config.addition_embed_type == "text_time":
        pooled = module.config.projection_class_embeddings_input_dim - 6 * module.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(2, pooled, generator=g),
                 "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]]).expand(2, -1)}
    with torch.no_grad():
        down, mid = module(sample, torch.tensor([999, 321]), encoder_hidden_states=embeds, controlnet_cond=cond,
                           conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
    return [*down, mid]


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["control_model", "bare"])
def test_an_original_layout_controlnet_loads_by_name_and_steers_as_the_original(
        model, controlnet, xl_model, xl_controlnet, tmp_path, xl, prefix):
    """lllyasviel's layout (A1111 / ComfyUI downloads), written from the structure by tests/ldm_format and
    converted back by diffusers' converter: the same weights, the same residuals."""
    model, controlnet = (xl_model, xl_controlnet) if xl else (model, controlnet)
    # the zero convolutions are not zero, so residuals (and a wrong conversion) show
    assert all(conv.weight.abs().max() > 0 for conv in [*controlnet.controlnet_down_blocks,
                                                         controlnet.controlnet_mid_block])
    state = controlnet_to_ldm(controlnet, prefix=prefix)
    assert any(k.startswith(prefix + "input_hint_block.14.") for k in state)
    a1111 = tmp_path / "webui" / "models"
    (a1111 / "Stable-diffusion").mkdir(parents=True)
    (a1111 / "ControlNet").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, a1111 / "ControlNet" / "control_v11p_canny.safetensors")
    loaded = controlnets.load("control_v11p_canny", model, ModelFolders([str(tmp_path / "webui")]), CPU, F32)
    assert _same(loaded, controlnet)
    theirs, ours = _residuals(controlnet), _residuals(loaded)
    assert len(ours) == len(theirs) == len(controlnet.controlnet_down_blocks) + 1
    assert all(r.abs().max() > 1e-3 for r in theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("into_xl", [False, True], ids=["sd-file-for-sdxl", "sdxl-file-for-sd"])
def test_an_original_layout_controlnet_for_another_model_family_is_refused(
        model, controlnet, xl_model, xl_controlnet, tmp_path, into_xl):
    target, other = (xl_model, controlnet) if into_xl else (model, xl_controlnet)
    path = tmp_path / "control_other.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet_to_ldm(other).items()}, path)
    with pytest.raises(ModelError, match="another model family") as raised:
        controlnets.load(str(path), target, None, CPU, F32)
    assert f"model {target.name!r} ({target.arch})" in str(raised.value)


def test_an_original_layout_file_that_does_not_fit_says_so(model, controlnet, tmp_path):
    state = controlnet_to_ldm(controlnet)
    cases = {
        "missing": {k: v for k, v in state.items() if not k.startswith("control_model.zero_convs.3.")},
        "extra": {**state, "control_model.output_blocks.0.0.in_layers.0.weight": torch.ones(32)},
        "deeper": {**state, "control_model.input_blocks.4.0.in_layers.0.weight": torch.ones(64)},
    }
    for name, broken in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in broken.items()}, path)
        with pytest.raises(ModelError, match="does not fit model 'tiny'"):
            controlnets.load(str(path), model, None, CPU, F32)


def test_what_cannot_be_read_as_a_controlnet_says_so(model, controlnet, tmp_path):
    unet_part = tmp_path / "control_sd15_unet_only.safetensors"  # original layout, but no hint block
    save_file({"control_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, unet_part)
    with pytest.raises(ModelError, match="not a ControlNet .no input_hint_block"):
        controlnets.load(str(unet_part), model, None, CPU, F32)
    state = {k: v.contiguous() for k, v in controlnet_to_ldm(controlnet).items()}
    difference = tmp_path / "diff_control_sd15_canny.safetensors"
    save_file({**state, "difference": torch.zeros(1)}, difference)
    with pytest.raises(ModelError, match="'difference' ControlNet"):
        controlnets.load(str(difference), model, None, CPU, F32)
    control_lora = tmp_path / "control-lora-canny-rank128.safetensors"
    save_file({"lora_controlnet": torch.zeros(1), "input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, control_lora)
    with pytest.raises(ModelError, match="Control-LoRA"):
        controlnets.load(str(control_lora), model, None, CPU, F32)
    other = tmp_path / "lora.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ModelError, match="not a ControlNet"):
        controlnets.load(str(other), model, None, CPU, F32)
    with pytest.raises(ModelError, match="not found"):
        controlnets.load("nope", model, ModelFolders([str(tmp_path)]), CPU, F32)
