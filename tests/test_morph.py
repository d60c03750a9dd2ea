"""Morphs: from the current look to a preset over some seconds; what each kind of parameter does on the
way, that every step is a valid change set, and that the end is exactly a plain recall."""
from __future__ import annotations

import math

import pytest
import torch

from bridge import params
from bridge.loop import stream_settings
from bridge.morph import EASINGS, Morph, MorphError, linked
from bridge.presets import Presets
from bridge.state import StateStore
from engines import registry
from engines.stream import Stream

START = {"prompt": "a red fox", "seed": 1, "strength": 0.2, "steps": 1, "lora/grain": 0.8, "mode": "img2img"}
TARGET = {"prompt": "a blue whale", "seed": 7, "strength": 0.8, "steps": 4, "lora/glow": 1.0, "mode": "txt2img"}


def state(**changes) -> dict:
    """A whole parameter state, as a snapshot holds it."""
    return dict(StateStore(changes).snapshot().values)


def steps(morph: Morph, count: int = 40) -> list[dict]:
    """The change sets a driver would apply, from before the start to past the end."""
    return [morph.at(morph.seconds * i / count) for i in range(-1, count + 3)]


def test_every_easing_rises_from_0_to_1_without_turning_back():
    for name, curve in EASINGS.items():
        values = [curve(i / 200) for i in range(201)]
        assert values[0] == 0 and values[-1] == 1, name
        assert all(b >= a for a, b in zip(values, values[1:])), name


def test_an_unknown_easing_is_refused_with_the_known_ones():
    with pytest.raises(MorphError, match="linear, smoothstep, ease-in, ease-out, ease-in-out"):
        Morph(state(), {}, 1.0, "bounce")


@pytest.mark.parametrize("seconds", [-1, math.nan, math.inf, "2", True])
def test_a_morph_time_that_is_not_seconds_is_refused(seconds):
    with pytest.raises(MorphError, match="seconds"):
        Morph(state(), {}, seconds)


def test_it_starts_at_the_start_look_and_ends_at_exactly_the_target():
    start = state(**START)
    target = params.validate(TARGET)
    morph = Morph(start, target, 3.0)
    assert morph.at(0.0) == {name: start.get(name, 0.0) for name in morph.keys}
    assert not morph.done(2.99) and morph.done(3.0)
    end = morph.at(3.0)
    assert end == morph.at(10.0) == {name: target.get(name, 0.0) for name in morph.keys}
    assert end["lora/grain"] == 0.0 and end["prompts"] == () and end["seeds"] == ()  # the blends end


def test_it_drives_only_what_changes_and_never_pause():
    morph = Morph(state(strength=0.2, guidance_scale=3.0), {"strength": 0.7, "guidance_scale": 3.0, "pause": True}, 1)
    assert morph.keys == ("strength",)


def test_a_zero_second_morph_is_a_jump():
    morph = Morph(state(**START), params.validate(TARGET), 0)
    assert morph.done(0) and morph.at(0)["strength"] == 0.8 and morph.at(0)["prompt"] == "a blue whale"


def test_every_step_validates_and_applies_to_a_state_store():
    start = state(**START, prompts=(("a red fox", 2.0), ("snow", 1.0)), seeds=((1, 1.0), (2, 0.5)),
                  subseed_strength=0.3, t_index_list=(10, 30), **{"controlnet/0/scale": 0.4})
    target = params.validate({**TARGET, "prompts": (("a blue whale", 1.0), ("snow", 3.0)), "seeds": (),
                              "subseed_strength": 0.9, "t_index_list": (), "controlnet/0/scale": 2.0,
                              "width": 256, "cfg_type": "self"})
    morph = Morph(start, target, 2.0, "ease-in-out")
    store = StateStore(start)
    for change in steps(morph):
        assert set(change) == set(morph.keys)
        assert params.validate(change) == change  # already valid, and nothing cleared behind its back
        store.apply(change)


def test_a_float_passes_strictly_between_its_ends_with_the_eased_fraction():
    morph = Morph(state(strength=0.2), {"strength": 0.8}, 2.0, "ease-in")
    assert morph.at(1.0)["strength"] == pytest.approx(0.2 + 0.6 * 0.5 ** 3)
    values = [change["strength"] for change in steps(morph)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert 0.2 < morph.at(1.0)["strength"] < 0.8


@pytest.mark.parametrize("easing", list(EASINGS))
def test_each_easing_moves_a_float_monotonically_from_start_to_target(easing):
    morph = Morph(state(strength=0.9), {"strength": 0.1}, 1.0, easing)
    values = [change["strength"] for change in steps(morph)]
    assert values[0] == values[1] == 0.9 and values[-1] == 0.1
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_ints_are_interpolated_and_rounded():
    morph = Morph(state(steps=1, transition_frames=0), {"steps": 4, "transition_frames": 10}, 1.0, "linear")
    assert morph.at(0.5) == {"steps": 3, "transition_frames": 5}  # 2.5 rounds up
    assert morph.at(0.4) == {"steps": 2, "transition_frames": 4}
    assert all(isinstance(v, int) for v in morph.at(0.37).values())


def test_a_lora_comes_in_from_zero_and_one_the_target_lacks_goes_out_to_zero():
    morph = Morph(state(**{"lora/grain": 0.8}), {"lora/glow": 1.0}, 1.0, "linear")
    assert set(morph.keys) == {"lora/grain", "lora/glow"}
    assert morph.at(0.25) == {"lora/grain": pytest.approx(0.6), "lora/glow": pytest.approx(0.25)}
    assert morph.at(1.0) == {"lora/grain": 0.0, "lora/glow": 1.0}


def test_the_prompt_becomes_a_blend_of_both_looks_with_the_eased_weights():
    morph = Morph(state(prompt="a red fox"), params.validate({"prompt": "a blue whale"}), 2.0)
    half = morph.at(1.0)
    assert half["prompt"] == "a red fox"  # the prompt itself is kept until the end
    assert half["prompts"] == (("a red fox", 0.5), ("a blue whale", 0.5))
    quarter = dict(morph.at(0.5)["prompts"])
    a = EASINGS["smoothstep"](0.25)
    assert quarter == {"a red fox": pytest.approx(1 - a), "a blue whale": pytest.approx(a)}
    assert morph.at(2.0) == {"prompt": "a blue whale", "prompts": ()}


def test_blends_mix_by_each_looks_share_and_a_text_in_both_adds_its_weights():
    start = state(prompts=(("fox", 3.0), ("snow", 1.0)))
    morph = Morph(start, params.validate({"prompts": (("snow", 2.0), ("whale", 2.0))}), 1.0, "linear")
    blend = dict(morph.at(0.5)["prompts"])
    # the start look is 3:1 fox:snow, the target 1:1 snow:whale; each look holds half the total
    assert blend == {"fox": pytest.approx(0.375), "snow": pytest.approx(0.125 + 0.25), "whale": pytest.approx(0.25)}


def test_a_prompt_blend_of_more_than_8_entries_switches_at_half_instead():
    first = tuple((f"start {i}", 1.0) for i in range(5))
    last = tuple((f"target {i}", 1.0) for i in range(4))
    morph = Morph(state(prompts=first), params.validate({"prompts": last}), 1.0, "linear")
    assert morph.at(0.49)["prompts"] == first
    assert morph.at(0.5)["prompts"] == last
    assert all(params.validate(change) == change for change in steps(morph))


def test_the_seed_becomes_a_slerp_of_both_noises():
    morph = Morph(state(seed=1), params.validate({"seed": 7}), 2.0)
    half = morph.at(1.0)
    assert half["seed"] == 1
    assert half["seeds"] == ((1, pytest.approx(math.sqrt(0.5))), (7, pytest.approx(math.sqrt(0.5))))
    a = EASINGS["smoothstep"](0.25)
    assert dict(morph.at(0.5)["seeds"]) == {1: pytest.approx(math.cos(a * math.pi / 2)),
                                            7: pytest.approx(math.sin(a * math.pi / 2))}
    assert morph.at(2.0) == {"seed": 7, "seeds": ()}


@pytest.mark.parametrize("start, target", [({"seed": -1}, {"seed": 7}), ({"seed": 7}, {"seed": -1}),
                                           ({"seeds": ((3, 1.0), (4, 1.0))}, {"seed": -1})])
def test_a_seed_of_minus_one_on_either_side_switches_at_once(start, target):
    target = params.validate(target)
    morph = Morph(state(**start), target, 4.0)
    for elapsed in (0.0, 0.1, 2.0):
        assert morph.at(elapsed) == {"seed": target["seed"], "seeds": ()}


@pytest.mark.parametrize("name, first, last", [
    ("mode", "img2img", "txt2img"), ("cfg_type", "full", "self"), ("width", 512, 256), ("clip_skip", 1, 2),
    ("subseed", 3, 9), ("negative_prompt", "", "blurry"), ("styles", "", "noir"), ("t_index_list", (10,), (20, 30)),
    ("vae", "auto", "taesd"), ("model", "", "sd-turbo"),
])
def test_what_cannot_be_interpolated_switches_at_half(name, first, last):
    morph = Morph(state(**{name: first}), params.validate({name: last}), 1.0, "linear")
    assert morph.at(0.49)[name] == first
    assert morph.at(0.5)[name] == last


def test_a_model_change_carries_the_vae_it_clears_so_the_target_vae_holds():
    morph = Morph(state(model="", vae="taesd"), params.validate({"model": "sd-turbo", "vae": "taesd"}), 1.0)
    assert set(morph.keys) == {"model", "vae"}
    store = StateStore(state(model="", vae="taesd"))
    store.apply(morph.at(0.7))
    assert store.snapshot()["vae"] == "taesd"


def test_linked_names_are_let_go_together():
    assert set(linked("prompt")) == set(linked("prompts")) == {"prompt", "prompts"}
    assert set(linked("seeds")) == {"seed", "seeds"} and set(linked("vae")) == {"model", "vae"}
    assert linked("strength") == ("strength",)


def drive(store: StateStore, morph: Morph, count: int = 20) -> None:
    """What the daemon's driver does: apply each step with compare-and-set on what it wrote last."""
    written = {name: store.snapshot()[name] if name in store.snapshot().values else None for name in morph.keys}
    for i in range(count + 1):
        change = morph.at(morph.seconds * i / count)
        assert store.apply(change, only_if={k: v for k, v in written.items() if v is not None}) is not None
        written = change


def test_a_preset_round_trip_through_files_ends_at_the_saved_look(tmp_path):
    presets = Presets(tmp_path / "presets")
    store = StateStore({**START, "prompts": (("a red fox", 1.0), ("moss", 0.5)), "seeds": ((1, 1.0), (5, 0.2))})
    saved = dict(store.snapshot().values)
    presets.save("forest", saved)
    store.apply({"prompt": "a city at night", "seed": 99, "strength": 0.9, "steps": 3, "lora/grain": -1.0,
                 "mode": "txt2img", "pause": True})
    current = dict(store.snapshot().values)
    morph = Morph(current, presets.recall("forest", current), 1.5)
    drive(store, morph)
    final = dict(store.snapshot().values)
    assert final == {**saved, "pause": True}  # pause is not part of a look


def test_a_morph_ends_in_the_same_state_as_a_plain_recall(tmp_path):
    presets = Presets(tmp_path)
    presets.save("plain", {"prompt": "a lake", "strength": 0.3})  # a hand-written preset: only some parameters
    recalled, morphed = StateStore({**START}), StateStore({**START})
    current = dict(morphed.snapshot().values)
    recalled.apply(presets.recall("plain", current))
    drive(morphed, Morph(current, presets.recall("plain", current), 2.0))
    assert dict(morphed.snapshot().values) == dict(recalled.snapshot().values)


def test_on_the_tiny_model_half_way_differs_from_both_ends_and_the_end_is_the_target_look():
    cpu = torch.device("cpu")
    stream = Stream(registry.load("tiny", cpu, torch.float32), cpu, torch.float32)
    torch.manual_seed(0)
    frame = torch.rand(1, 3, 64, 64) * 2 - 1
    look = {"width": 64, "height": 64, "strength": 0.7, "steps": 2}
    start = StateStore({**look, "prompt": "a red fox", "seed": 1})
    target = StateStore({**look, "prompt": "a blue whale", "seed": 7})

    def render(store: StateStore) -> torch.Tensor:
        stream.prepare(stream_settings(store.snapshot()))
        return stream.render(frame)

    first, last = render(start), render(target)
    morph = Morph(dict(start.snapshot().values), params.validate({"prompt": "a blue whale", "seed": 7}), 2.0)
    start.apply(morph.at(1.0))
    half = render(start)
    start.apply(morph.at(2.0))
    end = render(start)
    assert not torch.equal(half, first) and not torch.equal(half, last)
    assert (half - first).abs().mean() > 1e-3 and (half - last).abs().mean() > 1e-3
    assert torch.equal(end, last)
