"""The parameter schema and the versioned state store."""
from __future__ import annotations

import threading

import pytest

from bridge import params
from bridge.params import ParamError
from bridge.state import StateStore


def test_ints_pass_for_floats_and_whole_floats_for_ints():
    assert params.lookup("strength").coerce(1) == 1.0 and isinstance(params.lookup("strength").coerce(1), float)
    assert params.lookup("seed").coerce(42.0) == 42 and isinstance(params.lookup("seed").coerce(42.0), int)
    with pytest.raises(ParamError, match="whole number"):
        params.lookup("seed").coerce(4.5)


@pytest.mark.parametrize("name,value,message", [
    ("strength", 1.5, "out of range"),
    ("strength", float("nan"), "finite"),
    ("seed", "12", "expected a number"),
    ("seed", True, "expected a number"),
    ("prompt", 3, "expected a string"),
    ("prompt", "x" * 5000, "at most"),
    ("mode", "video", "not one of"),
    ("width", 500, "multiple of 8"),
    ("pause", 2, "0 or 1"),
])
def test_bad_values_are_refused_with_a_message_naming_the_parameter(name, value, message):
    with pytest.raises(ParamError, match=message) as e:
        params.lookup(name).coerce(value)
    assert str(e.value).startswith(name)


def test_norm_maps_zero_to_one_onto_the_range():
    assert params.lookup("strength").from_norm(0.25) == 0.25
    assert params.lookup("steps").from_norm(1.0) == params.lookup("steps").maximum
    assert params.lookup("width").from_norm(0.0) == 64
    assert params.lookup("width").from_norm(0.5) % 8 == 0
    with pytest.raises(ParamError):
        params.lookup("strength").from_norm(1.2)
    with pytest.raises(ParamError):
        params.lookup("prompt").from_norm(0.5)


def test_every_default_is_valid():
    for p in params.PARAMS:
        assert p.coerce(p.default) == p.default


def test_unknown_parameters_are_refused():
    with pytest.raises(ParamError, match="unknown parameter"):
        params.validate({"nope": 1})


def test_versions_start_at_one_and_grow_by_one_per_accepted_change_set():
    store = StateStore()
    assert store.version == 1
    assert store.apply({"seed": 5, "strength": 0.2}) == 2
    snap = store.snapshot()
    assert (snap["seed"], snap["strength"], snap.version) == (5, 0.2, 2)


def test_a_refused_change_set_changes_nothing_at_all():
    store = StateStore()
    with pytest.raises(ParamError):
        store.apply({"seed": 9, "strength": 3.0})
    assert store.version == 1 and store.snapshot()["seed"] == params.lookup("seed").default


def test_a_snapshot_never_changes_after_it_is_taken():
    store = StateStore()
    snap = store.snapshot()
    store.apply({"seed": 77})
    assert snap["seed"] == params.lookup("seed").default
    with pytest.raises(TypeError):
        snap.values["seed"] = 1  # read-only


def test_a_runtime_check_can_refuse_a_change():
    def no_big_frames(values):
        if values["width"] > 256:
            raise ParamError("width: too big for this ring")

    store = StateStore({"width": 128}, check=no_big_frames)
    with pytest.raises(ParamError, match="too big"):
        store.apply({"width": 512})
    assert store.snapshot()["width"] == 128


def test_wait_for_change_wakes_on_apply():
    store = StateStore()
    threading.Timer(0.05, store.apply, args=({"seed": 3},)).start()
    assert store.wait_for_change(1, timeout=5)
    assert not store.wait_for_change(store.version, timeout=0.01)


def test_list_parameters_take_flat_or_nested_pairs():
    prompts = params.lookup("prompts")
    assert prompts.coerce(["a", 1, "b", 0.5]) == prompts.coerce([["a", 1.0], ["b", 0.5]]) == (("a", 1.0), ("b", 0.5))
    assert params.lookup("t_index_list").coerce([0, 16.0, 32]) == (0, 16, 32)
    assert prompts.coerce([]) == ()


@pytest.mark.parametrize("name,value,message", [
    ("prompts", ["a", 1.0, "b"], "groups"),
    ("prompts", ["a", "b"], "expected a number"),
    ("prompts", ["a", 0.0, "b", 0.0], "at least one weight"),
    ("prompts", ["a", -1.0], "out of range"),
    ("prompts", "a", "expected a list"),
    ("seeds", [1.5, 1.0], "whole number"),
    ("seeds", [-1, 1.0], "out of range"),
    ("t_index_list", [32, 16], "increasing"),
    ("t_index_list", [50], "out of range"),
    ("t_index_list", list(range(9)), "at most 8"),
])
def test_bad_lists_are_refused(name, value, message):
    with pytest.raises(ParamError, match=message):
        params.lookup(name).coerce(value)


def test_setting_prompt_or_seed_alone_ends_a_blend_but_not_in_the_same_change_set():
    store = StateStore()
    store.apply({"prompts": [["a", 1.0], ["b", 1.0]], "seeds": [[1, 1.0], [2, 1.0]]})
    store.apply({"prompt": "c"})
    assert store.snapshot()["prompts"] == () and store.snapshot()["seeds"] == ((1, 1.0), (2, 1.0))
    store.apply({"seed": 3, "seeds": [[4, 1.0]]})
    assert store.snapshot()["seeds"] == ((4, 1.0),)


def test_lora_weights_are_a_family_of_parameters():
    store = StateStore()
    store.apply({"lora/my style": 0.5, "lora/sub/other": -1})
    assert params.lora_weights(store.snapshot().values) == {"my style": 0.5, "sub/other": -1.0}
    with pytest.raises(ParamError, match="out of range"):
        store.apply({"lora/x": 6.0})
    with pytest.raises(ParamError, match="bad LoRA name"):
        params.lookup("lora/")


def test_controlnet_scale_start_and_end_are_a_family_of_parameters():
    store = StateStore({p.name: p.default for p in params.controlnet_params(2)})
    assert params.controls(store.snapshot().values) == ((1.0, 0.0, 1.0), (1.0, 0.0, 1.0))
    store.apply({"controlnet/1/scale": 0.4, "controlnet/1/end": 0.5})
    assert params.controls(store.snapshot().values) == ((1.0, 0.0, 1.0), (0.4, 0.0, 0.5))
    assert params.controls(params.defaults()) == ()  # no ControlNet configured
    with pytest.raises(ParamError, match="out of range"):
        store.apply({"controlnet/0/start": 1.5})
    for bad in ("controlnet/0/weight", "controlnet/x/scale", "controlnet/0", "controlnet/123/scale",
                "controlnet/01/scale", "controlnet/\u0661/scale",
                f"controlnet/{params.MAX_CONTROLNETS}/scale"):
        with pytest.raises(ParamError, match="unknown parameter"):
            params.lookup(bad)
