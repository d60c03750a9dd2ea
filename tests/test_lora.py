"""LoraSet on the tiny models: LoRA files in the diffusers/peft, kohya/A1111 and older diffusers formats,
live weights, several at once, parity with diffusers' own pipelines, and refusals that leave the model
untouched.

The LoRAs are made here: peft adapters with seeded random non-zero weights (rank 4, alpha 8, so the
alpha matters) on fresh copies of the tiny components, written with diffusers' save_lora_weights and, by
hand, in the other formats.
"""
import copy
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, get_peft_model_state_dict
from peft.functional import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from engines import registry
from engines.bundle import ModelBundle
from engines.lora import LoraError, LoraSet
from engines.weights import PickleRefused

CPU, F32 = torch.device("cpu"), torch.float32
RANK, ALPHA = 4, 8.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


# The models and what they compute

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's operations are too small to gain from threads, and with other processes on the
    cores torch's OpenMP threads spin and slow this file several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return registry.load("tiny", CPU, F32)


@pytest.fixture(scope="module")
def tiny_xl():
    return registry.load("tiny-xl", CPU, F32)


def _fresh(bundle: ModelBundle) -> ModelBundle:
    """A copy whose modules no other test has touched (cheaper than building the model again)."""
    return ModelBundle(**{**bundle.__dict__, "unet": copy.deepcopy(bundle.unet),
                          "text_encoder": copy.deepcopy(bundle.text_encoder),
                          "text_encoder_2": copy.deepcopy(bundle.text_encoder_2)})


@pytest.fixture
def model(tiny):
    return _fresh(tiny)


def _seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


LATENTS, TOKENS = _seeded((1, 4, 16, 16), 1), torch.randint(0, 200, (1, 77), generator=torch.Generator().manual_seed(3))


@torch.inference_mode()
def unet_out(model) -> torch.Tensor:
    """The UNet's output for fixed inputs; `model` is a ModelBundle or a diffusers pipeline."""
    if model.unet.config.addition_embed_type == "text_time":
        context, extra = _seeded((1, 77, 64), 2), {"added_cond_kwargs": {
            "text_embeds": _seeded((1, 32), 4), "time_ids": torch.tensor([[512.0, 512, 0, 0, 512, 512]])}}
    else:
        context, extra = _seeded((1, 77, 32), 2), {}
    return model.unet(LATENTS, 500, encoder_hidden_states=context, **extra).sample


@torch.inference_mode()
def text_out(model) -> torch.Tensor:
    return model.text_encoder(TOKENS).last_hidden_state


@torch.inference_mode()
def text_2_out(model) -> torch.Tensor:
    return model.text_encoder_2(TOKENS).text_embeds


@pytest.fixture(scope="module")
def base(tiny):
    return unet_out(tiny), text_out(tiny)


def assert_pristine(model: ModelBundle, base) -> None:
    """No LoRA layer anywhere and exactly the base model's outputs."""
    for module in model.text_encoders + (model.unet,):
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules())
    assert torch.equal(unet_out(model), base[0]) and torch.equal(text_out(model), base[1])


# LoRA files

def _peft_lora(bundle: ModelBundle, seed: int, text: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded random LoRA weights (lora_B non-zero) under peft's keys, per component."""
    out = {}
    parts = [("unet", UNET_TARGETS)] + ([("text_encoder", TEXT_TARGETS)] if text else [])
    if text and bundle.text_encoder_2 is not None:
        parts.append(("text_encoder_2", TEXT_TARGETS))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component, targets in parts:
            module = copy.deepcopy(getattr(bundle, component))
            config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
            inject_adapter_in_model(config, module, adapter_name="default")
            out[component] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}
    return out


def _metadata(targets):
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets).to_dict()


def write_diffusers(lora, folder: Path, name: str) -> Path:
    pipeline = StableDiffusionXLPipeline if "text_encoder_2" in lora else StableDiffusionPipeline
    kwargs = {f"{c}_lora_layers": sd for c, sd in lora.items()}
    kwargs.update({f"{c}_lora_adapter_metadata": _metadata(UNET_TARGETS if c == "unet" else TEXT_TARGETS)
                   for c in lora})
    pipeline.save_lora_weights(folder, weight_name=name, **kwargs)
    return folder / name


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def write_kohya(lora, path, te1: bool = False):
    """A1111 / kohya keys: lora_unet_<module path with _>.lora_down.weight / lora_up.weight / alpha."""
    out = {}
    for component, sd in lora.items():
        prefix = "lora_te1_" if te1 and component == "text_encoder" else KOHYA_PREFIX[component]
        for key, down in sd.items():
            if key.endswith(".lora_A.weight"):
                layer = key[: -len(".lora_A.weight")]
                # kohya names text-encoder layers as transformers 4 did, under text_model
                module = layer if component == "unet" or layer.startswith("text_model.") else f"text_model.{layer}"
                name = prefix + module.replace(".", "_")
                out[f"{name}.lora_down.weight"] = down
                out[f"{name}.lora_up.weight"] = sd[f"{layer}.lora_B.weight"]
                out[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(out, str(path))
    return path


def write_diffusers_old(lora, path):
    """Older diffusers keys (lora.down / lora_linear_layer.down), which carry no alpha: it is folded in."""
    out = {}
    for component, sd in lora.items():
        for key, tensor in sd.items():
            layer, _, kind = key.rpartition(".lora_")
            scale = ALPHA / RANK if kind.startswith("B") else 1.0
            end = "up" if kind.startswith("B") else "down"
            if component == "unet":
                out[f"unet.{layer}.lora.{end}.weight"] = tensor * scale
            else:
                module = layer if layer.startswith("text_model.") else f"text_model.{layer}"
                out[f"{component}.{module}.lora_linear_layer.{end}.weight"] = tensor * scale
    save_file(out, str(path))
    return path


def write_attn_procs(lora, path):
    """diffusers' oldest UNet-only format (UNet.save_attn_procs): no prefix, `processor.to_q_lora.down`."""
    out = {}
    for key, tensor in lora["unet"].items():
        layer, _, kind = key.rpartition(".lora_")
        attention, _, projection = layer.rpartition(".attn")
        number, _, target = projection.partition(".")
        target = "to_out" if target == "to_out.0" else target
        end = "up" if kind.startswith("B") else "down"
        scale = ALPHA / RANK if end == "up" else 1.0
        out[f"{attention}.attn{number}.processor.{target}_lora.{end}.weight"] = tensor * scale
    save_file(out, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tiny, tiny_xl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    a, b = _peft_lora(tiny, seed=1), _peft_lora(tiny, seed=2)
    xl = _peft_lora(tiny_xl, seed=3)
    files = {
        "a": write_diffusers(a, folder, "a.safetensors"),
        "b": write_diffusers(b, folder, "b.safetensors"),
        "unet_only": write_diffusers(_peft_lora(tiny, seed=4, text=False), folder, "unet_only.safetensors"),
        "a_kohya": write_kohya(a, folder / "a_kohya.safetensors"),
        "a_diffusers_old": write_diffusers_old(a, folder / "a_diffusers_old.safetensors"),
        "a_attn_procs": write_attn_procs(a, folder / "a_attn_procs.safetensors"),
        "xl": write_diffusers(xl, folder, "xl.safetensors"),
        "xl_kohya": write_kohya(xl, folder / "xl_kohya.safetensors", te1=True),
    }
    torch.save({f"{c}.{k}": v for c, sd in a.items() for k, v in sd.items()}, folder / "a.pt")
    files["a_pickle"] = folder / "a.pt"
    return files


def _pipeline(bundle: ModelBundle):
    parts = dict(vae=bundle.autoencoder.module, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer,
                 unet=bundle.unet, scheduler=bundle.scheduler)
    if bundle.xl:
        return StableDiffusionXLPipeline(**parts, text_encoder_2=bundle.text_encoder_2,
                                         tokenizer_2=bundle.tokenizer_2, add_watermarker=False)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# Behaviour

def test_a_lora_at_weight_0_gives_exactly_the_base_model(model, loras, base):
    lora_set = LoraSet(model)
    lora_set.load("a", loras["a"])
    assert lora_set.loaded == ("a",) and lora_set.weights == {"a": 0.0}
    assert torch.equal(unet_out(model), base[0]) and torch.equal(text_out(model), base[1])


def test_matches_diffusers_pipeline_load_lora_weights_and_set_adapters(model, tiny, loras, base):
    lora_set = LoraSet(model)
    lora_set.load("my.style v2", loras["a"])  # a name peft would refuse as an adapter name
    lora_set.set_weights({"my.style v2": 0.5})

    pipe = _pipeline(_fresh(tiny))
    pipe.load_lora_weights(str(loras["a"]), adapter_name="x")
    pipe.set_adapters(["x"], [0.5])

    assert (unet_out(model) - unet_out(pipe)).abs().max().item() < 1e-5
    assert (text_out(model) - text_out(pipe)).abs().max().item() < 1e-5
    assert (unet_out(model) - base[0]).abs().max().item() > 1e-3  # the LoRA does change the output


@pytest.mark.parametrize("form", ["a_kohya", "a_diffusers_old"])
def test_kohya_and_older_diffusers_files_act_like_the_peft_file(tiny, loras, form):
    reference, other = _fresh(tiny), _fresh(tiny)
    _set(reference, loras["a"], 0.8)
    _set(other, loras[form], 0.8)
    assert (unet_out(other) - unet_out(reference)).abs().max().item() < 1e-5
    assert (text_out(other) - text_out(reference)).abs().max().item() < 1e-5
    assert (unet_out(other) - unet_out(tiny)).abs().max().item() > 1e-3


def test_the_unprefixed_attention_processor_format_loads_into_the_unet(tiny, loras):
    reference, other = _fresh(tiny), _fresh(tiny)
    _set(reference, loras["a"], 0.8)
    lora_set = LoraSet(other)
    lora_set.load("a", loras["a_attn_procs"])
    assert lora_set.set_weights({"a": 0.8}) is False  # UNet layers only
    assert (unet_out(other) - unet_out(reference)).abs().max().item() < 1e-5


def _set(model, path, weight) -> LoraSet:
    """A LoraSet on `model` with the LoRA at `path` loaded at `weight` (for comparisons)."""
    lora_set = LoraSet(model)
    lora_set.load("ref", path)
    lora_set.set_weights({"ref": weight})
    return lora_set


def test_weight_changes_take_effect_without_reloading(model, loras, base):
    lora_set = LoraSet(model)
    lora_set.load("a", loras["a"])
    layers_before = [m for m in model.unet.modules() if isinstance(m, BaseTunerLayer)]
    lora_set.set_weights({"a": 0.5})
    half = unet_out(model)
    lora_set.set_weights({"a": 1.0})
    full = unet_out(model)
    lora_set.set_weights({"a": 0.0})
    off = unet_out(model)
    lora_set.set_weights({"a": 0.5})
    assert not torch.allclose(half, full) and not torch.allclose(half, base[0])
    assert torch.equal(off, base[0])
    assert torch.equal(unet_out(model), half)
    assert [m for m in model.unet.modules() if isinstance(m, BaseTunerLayer)] == layers_before


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # from the diffusers pipeline
def test_two_loras_combine_as_in_diffusers(model, tiny, loras):
    lora_set = LoraSet(model)
    lora_set.load("a", loras["a"])
    lora_set.load("b", loras["b"])
    lora_set.set_weights({"a": 0.5})
    a_alone = _with(tiny, loras, "a", 0.5)  # loading b left a's weights as they were
    assert torch.equal(unet_out(model), unet_out(a_alone)) and torch.equal(text_out(model), text_out(a_alone))
    lora_set.set_weights({"b": 0.7})

    pipe = _pipeline(_fresh(tiny))
    pipe.load_lora_weights(str(loras["a"]), adapter_name="a")
    pipe.load_lora_weights(str(loras["b"]), adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 0.7])
    assert (unet_out(model) - unet_out(pipe)).abs().max().item() < 1e-5
    assert (text_out(model) - text_out(pipe)).abs().max().item() < 1e-5

    assert (unet_out(model) - unet_out(a_alone)).abs().max().item() > 1e-3


def _with(tiny, loras, key, weight):
    bundle = _fresh(tiny)
    _set(bundle, loras[key], weight)
    return bundle


def test_set_weights_says_when_the_text_encoders_changed(model, loras):
    lora_set = LoraSet(model)
    lora_set.load("style", loras["a"])
    lora_set.load("unet only", loras["unet_only"])
    assert lora_set.set_weights({"unet only": 0.7}) is False
    assert lora_set.set_weights({"style": 0.7}) is True
    assert lora_set.set_weights({"style": 0.7, "unet only": 0.7}) is False  # nothing changed
    assert lora_set.set_weights({"style": 0.0}) is True
    assert lora_set.weights == {"style": 0.0, "unet only": 0.7}


def test_inactive_loras_are_switched_off_not_multiplied_by_zero(model, loras):
    lora_set = LoraSet(model)
    lora_set.load("a", loras["a"])
    lora_set.load("b", loras["b"])
    layers = [m for m in model.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(layer.disable_adapters for layer in layers)
    lora_set.set_weights({"b": 0.3})
    assert all(not layer.disable_adapters and layer.active_adapters == [lora_set._loras["b"].adapter]
               for layer in layers)


def test_unloading_a_lora_keeps_the_others_and_the_last_gives_back_the_original_modules(model, tiny, loras,
                                                                                        base):
    original = model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    lora_set = LoraSet(model)
    lora_set.load("a", loras["a"])
    lora_set.load("unet only", loras["unet_only"])
    lora_set.set_weights({"a": 1.0, "unet only": 1.0})
    lora_set.unload("unet only")
    assert lora_set.loaded == ("a",) and lora_set.weights == {"a": 1.0}
    a_alone = _with(tiny, loras, "a", 1.0)
    assert (unet_out(model) - unet_out(a_alone)).abs().max().item() < 1e-5
    assert (text_out(model) - text_out(a_alone)).abs().max().item() < 1e-5
    lora_set.unload("a")
    assert lora_set.loaded == () and lora_set.weights == {}
    assert model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q is original
    assert_pristine(model, base)


def test_sdxl_loras_reach_both_text_encoders_as_in_diffusers(tiny_xl, loras):
    model = _fresh(tiny_xl)
    lora_set = LoraSet(model)
    lora_set.load("xl", loras["xl"])
    for out in (unet_out, text_out, text_2_out):
        assert torch.equal(out(model), out(tiny_xl))
    assert lora_set.set_weights({"xl": 0.5}) is True

    pipe = _pipeline(_fresh(tiny_xl))
    pipe.load_lora_weights(str(loras["xl"]), adapter_name="x")
    pipe.set_adapters(["x"], [0.5])
    for out in (unet_out, text_out, text_2_out):
        assert (out(model) - out(pipe)).abs().max().item() < 1e-5

    kohya = _fresh(tiny_xl)
    kohya_set = LoraSet(kohya)
    kohya_set.load("xl", loras["xl_kohya"])  # lora_te1_ / lora_te2_ keys
    kohya_set.set_weights({"xl": 0.5})
    for out in (unet_out, text_out, text_2_out):
        assert (out(model) - out(kohya)).abs().max().item() < 1e-5
    assert (text_2_out(model) - text_2_out(tiny_xl)).abs().max().item() > 1e-4


# Refusals: each leaves the model exactly as it was, and still usable

def _refuses(model, base, loras, path, error, match, **kwargs):
    lora_set = LoraSet(model)
    with pytest.raises(error, match=match):
        lora_set.load("bad", path, **kwargs)
    assert lora_set.loaded == ()
    assert_pristine(model, base)
    lora_set.load("good", loras["a"])
    lora_set.set_weights({"good": 1.0})
    assert not torch.equal(unet_out(model), base[0])


def test_a_missing_file_is_refused(model, base, loras, tmp_path):
    _refuses(model, base, loras, tmp_path / "nowhere.safetensors", LoraError, "nowhere.safetensors not found")


def test_an_unreadable_file_is_refused(model, base, loras, tmp_path):
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    _refuses(model, base, loras, tmp_path / "broken.safetensors", LoraError, "cannot read broken.safetensors")


def test_a_file_that_is_not_a_lora_is_refused(model, base, loras, tmp_path, tiny):
    save_file({k: v.clone() for k, v in tiny.unet.state_dict().items()}, str(tmp_path / "model.safetensors"))
    _refuses(model, base, loras, tmp_path / "model.safetensors", LoraError, "is not a LoRA but a full model checkpoint")


def test_a_pickle_is_refused_unless_allowed(model, tiny, base, loras):
    _refuses(model, base, loras, loras["a_pickle"], PickleRefused, "allow-pickle")
    allowed = _fresh(tiny)
    lora_set = LoraSet(allowed)
    lora_set.load("a", loras["a_pickle"], allow_pickle=True)
    lora_set.set_weights({"a": 1.0})
    assert not torch.equal(unet_out(allowed), base[0])


def test_a_lora_for_another_architecture_is_refused_naming_both(model, base, loras):
    _refuses(model, base, loras, loras["xl"], LoraError,
             r"LoRA 'bad' is for the built-in tiny-xl model \(SDXL-shaped\), the model is the built-in tiny model")


def test_a_full_size_sd15_lora_on_the_tiny_model_is_refused(model, base, loras, tmp_path):
    layer = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{layer}.lora_down.weight": torch.ones(RANK, 768), f"{layer}.lora_up.weight": torch.ones(64, RANK),
               f"{layer}.alpha": torch.tensor(ALPHA)}, str(tmp_path / "sd15.safetensors"))
    _refuses(model, base, loras, tmp_path / "sd15.safetensors", LoraError,
             "is for SD 1.x, the model is the built-in tiny")


def test_a_lora_with_mismatched_shapes_is_refused_naming_the_layer(model, base, loras, tmp_path):
    layer = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{layer}.lora_down.weight": torch.ones(RANK, 64), f"{layer}.lora_up.weight": torch.ones(48, RANK)},
              str(tmp_path / "odd.safetensors"))
    _refuses(model, base, loras, tmp_path / "odd.safetensors", LoraError,
             r"attn1.to_q \(the model's is 64 -> 64 wide, the LoRA's 64 -> 48\)")


def test_unknown_names_are_refused_and_nothing_changes(model, loras):
    lora_set = LoraSet(model)
    lora_set.load("a", loras["a"])
    with pytest.raises(LoraError, match="no LoRA named 'nope' is loaded; loaded: a"):
        lora_set.set_weights({"a": 1.0, "nope": 1.0})
    assert lora_set.weights == {"a": 0.0}
    with pytest.raises(LoraError, match="no LoRA named 'nope'"):
        lora_set.unload("nope")
    with pytest.raises(LoraError, match="not a finite number"):
        lora_set.set_weights({"a": float("nan")})
    with pytest.raises(LoraError, match="already loaded"):
        lora_set.load("a", loras["b"])
    assert lora_set.loaded == ("a",) and lora_set.weights == {"a": 0.0}
