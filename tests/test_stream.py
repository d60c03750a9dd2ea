"""The stream pipeline on the tiny model: timesteps, determinism, and what each setting changes."""
from __future__ import annotations

import pytest
import torch

from engines import registry
from engines.frames import OutputFormat
from engines.stream import Stream, StreamSettings, timesteps_for

CPU, F32 = torch.device("cpu"), torch.float32
BASE = StreamSettings(prompt="a red fox", seed=1, strength=0.6, steps=2, width=128, height=128)


@pytest.fixture(scope="module")
def stream():
    return Stream(registry.load("tiny", CPU, F32), CPU, F32)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    return torch.rand(1, 3, 128, 128) * 2 - 1


def render(stream, image, **changes):
    settings = StreamSettings(**{**BASE.__dict__, **changes})
    stream.prepare(settings)
    return stream.render(None if settings.mode == "txt2img" else image)


def test_timesteps_follow_strength_continuously_and_spread_over_steps():
    assert timesteps_for(1.0, 1, "img2img") == (999,)
    assert timesteps_for(0.5, 1, "img2img") == (499,)
    assert timesteps_for(0.501, 1, "img2img") == (500,)
    assert timesteps_for(1.0, 4, "img2img") == (999, 749, 499, 249)
    assert timesteps_for(0.3, 2, "txt2img") == (999, 499)  # txt2img ignores strength
    assert timesteps_for(0.0, 4, "img2img") == ()
    assert timesteps_for(0.003, 4, "img2img") == (2, 1, 0)  # never repeats a timestep


def test_the_same_settings_and_frame_give_bit_identical_output(stream, image):
    a = render(stream, image)
    render(stream, image, seed=2)
    b = render(stream, image)
    assert torch.equal(a, b)


@pytest.mark.parametrize("change", [{"seed": 2}, {"prompt": "a blue whale"}, {"strength": 0.9}, {"steps": 3},
                                    {"guidance_scale": 4.0, "negative_prompt": "grey"}])
def test_each_setting_changes_the_output(stream, image, change):
    assert not torch.equal(render(stream, image), render(stream, image, **change))


def test_the_input_frame_changes_the_output(stream, image):
    assert not torch.equal(render(stream, image), render(stream, image.flip(3)))


def test_strength_zero_returns_the_input_through_the_autoencoder(stream, image):
    out = render(stream, image, strength=0.0)
    expected = (stream.model.autoencoder.decode(stream.model.autoencoder.encode(image)) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(out, expected)


def test_seed_minus_one_draws_new_noise_every_frame(stream, image):
    assert not torch.equal(render(stream, image, seed=-1), stream.render(image))


def test_txt2img_ignores_the_frame_and_needs_none(stream):
    out = render(stream, None, mode="txt2img")
    assert out.shape == (1, 3, 128, 128) and 0 <= out.min() and out.max() <= 1


def test_img2img_without_a_frame_is_an_error(stream):
    stream.prepare(BASE)
    with pytest.raises(ValueError, match="input image"):
        stream.render(None)


def test_prompt_embeddings_are_cached(stream):
    first = stream.prompts.encode("cache me")
    assert stream.prompts.encode("cache me") is first


# ---------------------------------------------------------------------------- schedules
def test_t_index_list_picks_timesteps_on_a_50_step_schedule_and_overrides_strength():
    assert timesteps_for(0.3, 1, "img2img", t_index_list=(0,)) == (999,)
    assert timesteps_for(0.3, 1, "img2img", t_index_list=(16, 32, 45)) == (679, 359, 99)


def test_t_index_list_renders_like_the_equivalent_strength(stream, image):
    assert torch.equal(render(stream, image, t_index_list=(0,)), render(stream, image, strength=1.0, steps=1))


# ---------------------------------------------------------------------------- blends
def test_a_prompt_blend_with_zero_other_weights_is_exactly_the_single_prompt(stream, image):
    single = render(stream, image, prompt="a red fox")
    assert torch.equal(render(stream, image, prompt="ignored", prompts=(("a red fox", 1.0), ("a blue whale", 0.0))), single)


def test_a_prompt_blend_lies_between_its_prompts(stream, image):
    fox = render(stream, image, prompt="a red fox")
    whale = render(stream, image, prompt="a blue whale")
    both = render(stream, image, prompts=(("a red fox", 0.5), ("a blue whale", 0.5)))
    assert not torch.equal(both, fox) and not torch.equal(both, whale)
    embeds = lambda text: stream.prompts.encode(text).embeddings  # noqa: E731
    stream.prepare(StreamSettings(**{**BASE.__dict__, "prompts": (("a red fox", 1.0), ("a blue whale", 3.0))}))
    expected = 0.25 * embeds("a red fox") + 0.75 * embeds("a blue whale")
    assert torch.allclose(stream._plan.look.positive.embeddings, expected, atol=1e-6)


def test_a_seed_blend_with_zero_other_weights_is_exactly_the_single_seed(stream, image):
    assert torch.equal(render(stream, image, seed=0, seeds=((5, 1.0), (9, 0.0))), render(stream, image, seed=5))


def test_a_seed_blend_slerps_the_noise_keeping_its_spread(stream, image):
    mixed = render(stream, image, seeds=((5, 1.0), (9, 1.0)))
    assert not torch.equal(mixed, render(stream, image, seed=5)) and not torch.equal(mixed, render(stream, image, seed=9))
    noise = stream._plan.look.noise[0]
    assert 0.9 < float(noise.std()) < 1.1  # a plain average of two noises would have spread 0.71


def test_variation_seed_strength_goes_from_the_seed_to_the_subseed(stream, image):
    seed5 = render(stream, image, seed=5)
    assert torch.equal(render(stream, image, seed=5, subseed=9, subseed_strength=0.0), seed5)
    assert torch.equal(render(stream, image, seed=5, subseed=9, subseed_strength=1.0), render(stream, image, seed=9))
    assert not torch.equal(render(stream, image, seed=5, subseed=9, subseed_strength=0.3), seed5)


def test_slerp_ends_are_exact_and_its_middle_keeps_the_norm():
    from engines.stream import slerp
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    assert abs(float(slerp(a, b, 0.5).norm() / a.norm()) - 1) < 0.1


# ---------------------------------------------------------------------------- transitions
def test_a_transition_eases_to_the_new_prompt_over_the_given_frames(stream, image):
    target = render(stream, image, prompt="a blue whale")
    render(stream, image, prompt="a red fox", transition_frames=3)
    stream.prepare(StreamSettings(**{**BASE.__dict__, "prompt": "a blue whale", "transition_frames": 3}))
    frames = []
    while stream.wants_frame:
        frames.append(stream.render(image))
    assert len(frames) == 3
    assert not torch.equal(frames[0], target) and not torch.equal(frames[1], target)
    assert torch.equal(frames[-1], target)
    assert (frames[0] - target).abs().mean() > (frames[1] - target).abs().mean()


def test_no_transition_by_default(stream, image):
    render(stream, image, prompt="a red fox")
    stream.prepare(StreamSettings(**{**BASE.__dict__, "prompt": "a blue whale"}))
    assert not stream.wants_frame


# ---------------------------------------------------------------------------- guidance
def test_guidance_off_is_the_same_for_every_cfg_type(stream, image):
    plain = render(stream, image, guidance_scale=1.0)
    for cfg in ("full", "self", "initialize"):
        assert torch.equal(render(stream, image, guidance_scale=1.0, cfg_type=cfg), plain)
    assert torch.equal(render(stream, image, guidance_scale=5.0, cfg_type="none"), plain)


def test_each_cfg_type_guides_differently_and_delta_matters(stream, image):
    outs = {cfg: render(stream, image, guidance_scale=3.0, negative_prompt="grey", cfg_type=cfg)
            for cfg in ("none", "full", "self", "initialize")}
    for a in outs:
        for b in outs:
            if a < b:
                assert not torch.equal(outs[a], outs[b]), (a, b)
    assert not torch.equal(render(stream, image, guidance_scale=3.0, cfg_type="self", delta=0.5), outs["self"])


def test_self_cfg_runs_one_unet_pass_per_step(stream, image):
    calls = []
    hook = stream.model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        render(stream, image, guidance_scale=3.0, cfg_type="self", steps=2)
        assert calls == [1, 1]
        calls.clear()
        render(stream, image, guidance_scale=3.0, cfg_type="full", steps=2)
        assert calls == [2, 2]
        calls.clear()
        render(stream, image, guidance_scale=3.0, cfg_type="initialize", steps=2)
        assert calls == [2, 1]
    finally:
        hook.remove()


# ---------------------------------------------------------------------------- stream batch
@pytest.fixture(scope="module")
def batched():
    return Stream(registry.load("tiny", CPU, F32), CPU, F32, stream_batch=True)


def test_stream_batch_runs_all_steps_in_one_unet_call(batched, image):
    calls = []
    hook = batched.model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        render(batched, image, steps=3)
        assert calls == [3]
    finally:
        hook.remove()


def test_stream_batch_settles_on_the_exact_result_for_a_still_input(stream, batched, image):
    exact = render(stream, image, steps=3)
    batched.prepare(StreamSettings(**{**BASE.__dict__, "steps": 3}))
    outs = [batched.render(image) for _ in range(3)]
    assert torch.allclose(outs[-1], exact, atol=1e-4)


def test_stream_batch_outputs_lag_by_steps_minus_one_frames(image):
    fresh = Stream(registry.load("tiny", CPU, F32), CPU, F32, stream_batch=True)
    fresh.prepare(StreamSettings(**{**BASE.__dict__, "steps": 3}))
    tags = []
    for tag in range(1, 6):
        fresh.render(image, tag=tag)
        tags.append(fresh.output_tag)
    assert tags == [1, 1, 1, 2, 3]


def test_stream_batch_keeps_rendering_until_a_change_has_reached_every_frame_in_flight(batched, image):
    render(batched, image, steps=3)
    changed = StreamSettings(**{**BASE.__dict__, "steps": 3, "prompt": "a blue whale"})
    batched.prepare(changed)
    frames = []
    while batched.wants_frame:
        frames.append(batched.render(image))
    settled = Stream(registry.load("tiny", CPU, F32), CPU, F32, stream_batch=True)
    settled.prepare(changed)
    target = [settled.render(image) for _ in range(4)][-1]
    # three frames in flight, so three renders: the last shows a frame made with the change at every step
    assert len(frames) == 3 and torch.equal(frames[-1], target) and not torch.equal(frames[-2], target)


def test_stream_batch_with_one_step_is_the_exact_mode(stream, batched, image):
    assert torch.equal(render(batched, image, steps=1), render(stream, image, steps=1))


# ---------------------------------------------------------------------------- SDXL-shaped models
@pytest.fixture(scope="module")
def xl_stream():
    return Stream(registry.load("tiny-xl", CPU, F32), CPU, F32)


def test_sdxl_models_stream_with_pooled_text_and_size_conditioning(xl_stream, image):
    a = render(xl_stream, image)
    assert a.shape == (1, 3, 128, 128)
    assert not torch.equal(a, render(xl_stream, image, prompt="a blue whale"))
    assert xl_stream._plan.time_ids.tolist() == [[128, 128, 0, 0, 128, 128]]
    assert not torch.equal(render(xl_stream, image, guidance_scale=3.0), a)


# ---------------------------------------------------------------------------- prompts in the stream
def test_clip_skip_and_emphasis_change_the_output(stream, image):
    base = render(stream, image, prompt="a red fox")
    assert not torch.equal(render(stream, image, prompt="a red fox", clip_skip=2), base)
    assert not torch.equal(render(stream, image, prompt="a (red:1.6) fox"), base)


def test_styles_wrap_or_extend_the_prompt(image):
    from engines.prompt_syntax import Style
    styles = {"neon": Style("neon", "{prompt}, neon glow", "daylight"), "film": Style("film", "35mm film")}
    styled = Stream(registry.load("tiny", CPU, F32), CPU, F32, styles=styles)
    plain = Stream(registry.load("tiny", CPU, F32), CPU, F32)
    assert styled._texts(StreamSettings(prompt="a fox", negative_prompt="blur", styles="neon, film")) == \
        ([("a fox, neon glow, 35mm film", 1.0)], "blur, daylight")
    assert torch.equal(render(styled, image, prompt="a fox", styles="neon"), render(plain, image, prompt="a fox, neon glow"))
    with pytest.raises(ValueError, match="style 'nope' not found; known: film, neon"):
        render(styled, image, styles="nope")


# ---------------------------------------------------------------------------- what a performer can get wrong
def test_a_lora_that_cannot_be_found_is_left_out_and_reported_once(image):
    reports = []
    s = Stream(registry.load("tiny", CPU, F32), CPU, F32, report=reports.append,
               find_lora=lambda name: (_ for _ in ()).throw(FileNotFoundError(f"lora {name!r} not found")))
    plain = render(s, image, prompt="a fox")
    assert torch.equal(render(s, image, prompt="a fox <lora:typo:1>"), plain)
    render(s, image, prompt="a fox <lora:typo:0.5>", seed=3)
    assert len(reports) == 1 and "typo" in reports[0]


def test_a_running_transition_keeps_going_while_other_parameters_move(stream, image):
    render(stream, image, prompt="a red fox")
    stream.prepare(StreamSettings(**{**BASE.__dict__, "prompt": "a blue whale", "transition_frames": 4}))
    stream.render(image)
    for strength in (0.61, 0.62, 0.63):
        stream.prepare(StreamSettings(**{**BASE.__dict__, "prompt": "a blue whale", "transition_frames": 4,
                                         "strength": strength}))
        stream.render(image)
    assert not stream.wants_frame  # four frames, although strength moved during them


def test_a_seed_blend_does_not_depend_on_the_order_of_its_seeds(stream, image):
    render(stream, image, seeds=((1, 1.0), (2, 1.0), (3, 1.0)))
    a = stream._plan.look.noise[0]
    render(stream, image, seeds=((3, 1.0), (1, 1.0), (2, 1.0)))
    b = stream._plan.look.noise[0]
    assert (a - b).abs().max() < 0.05 and 0.9 < float(a.std()) < 1.1


def test_txt2img_with_t_index_list_always_starts_from_pure_noise_at_the_top():
    assert timesteps_for(0.5, 1, "txt2img", t_index_list=(32, 45)) == (999, 99)
    assert timesteps_for(0.5, 1, "txt2img", t_index_list=(0, 45)) == (999, 99)


def test_warm_up_leaves_no_trace_in_the_frames_that_follow(stream, image):
    expected = render(stream, image, steps=3)
    fresh = Stream(registry.load("tiny", CPU, F32), CPU, F32, stream_batch=True)
    settings = StreamSettings(**{**BASE.__dict__, "steps": 3})
    fresh.warm_up(settings, OutputFormat())
    outs, tags = [], []
    for tag in (1, 2, 3):
        outs.append(fresh.render(image, tag=tag))
        tags.append(fresh.output_tag)
    assert tags == [1, 1, 1] and torch.allclose(outs[-1], expected, atol=1e-4)


@pytest.mark.parametrize("mode,batch,cfg", [("img2img", False, "full"), ("txt2img", False, "full"),
                                            ("img2img", True, "full"), ("txt2img", True, "initialize"),
                                            ("img2img", False, "initialize")])
def test_the_negative_prompt_steers_wherever_a_negative_pass_runs(stream, batched, image, mode, batch, cfg):
    s = batched if batch else stream
    common = dict(mode=mode, steps=2, guidance_scale=3.0, cfg_type=cfg)
    assert not torch.equal(render(s, image, negative_prompt="grey fog", **common),
                           render(s, image, negative_prompt="bright colours", **common))
