"""Single-file checkpoints, standalone VAEs and TAESD weights (engines/checkpoints), offline.

Full-size models are checked on the meta device (names and shapes, no memory); loading is checked end
to end on the tiny test models saved in the original single-file layout by tests/ldm_format.
"""
from __future__ import annotations

import inspect
import json
import socket
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from engines import checkpoints, tiny
from engines.bundle import SD15, SD21, SDXL, TINY_ARCH, TINY_XL_ARCH, ModelError
from engines.checkpoints import EPSILON, V_PREDICTION
from engines.weights import PickleRefused

from . import ldm_format

CPU = torch.device("cpu")
F32 = torch.float32
REAL_ARCHS = (SD15, SD21, SDXL)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _assert_same_weights(loaded: nn.Module, original: nn.Module) -> None:
    expected, actual = original.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    different = [k for k in expected if not torch.equal(expected[k], actual[k])]
    assert not different, f"{len(different)} tensors differ, such as {different[:3]}"


# ============================================================================ shipped configs, full size

@pytest.fixture(scope="module")
def empty_models() -> dict[str, dict[str, nn.Module]]:
    """Every real architecture's components, built from the shipped configs on the meta device."""
    return {arch: checkpoints._empty_modules(arch) for arch in REAL_ARCHS}


@pytest.mark.parametrize("arch, unet, text_encoders", [
    (SD15, 859_520_964, [123_060_480]),
    (SD21, 865_910_724, [340_387_840]),
    (SDXL, 2_567_463_684, [123_060_480, 694_659_840]),
])
def test_shipped_configs_build_models_of_the_real_sizes(empty_models, arch, unet, text_encoders):
    models = empty_models[arch]
    assert _count(models["unet"]) == unet
    assert _count(models["vae"]) == 83_653_863
    assert [_count(models[k]) for k in ("text_encoder", "text_encoder_2") if k in models] == text_encoders


@pytest.mark.parametrize("arch", REAL_ARCHS)
def test_original_layout_of_each_shipped_config_is_detected_as_its_arch(empty_models, arch):
    models = empty_models[arch]
    state = ldm_format.checkpoint(arch, models["unet"], models["vae"], models["text_encoder"],
                                  models.get("text_encoder_2"))
    assert checkpoints.detect_architecture(ldm_format.shapes(state)) == arch


@pytest.mark.parametrize("arch", REAL_ARCHS)
def test_original_layout_of_each_shipped_config_converts_onto_it_exactly(empty_models, arch):
    """What load_single_file does with a real checkpoint, on names and shapes only: every converted
    weight fits the model built from the shipped config (ModelError otherwise)."""
    models = empty_models[arch]
    state = ldm_format.checkpoint(arch, models["unet"], models["vae"], models["text_encoder"],
                                  models.get("text_encoder_2"))
    for name, module in models.items():
        weights = checkpoints.component_weights(name, arch, state, module)
        assert ldm_format.shapes(weights) == ldm_format.shapes(module.state_dict()), name


def test_sd_and_sdxl_vae_configs_differ_in_latent_scale_and_upcast():
    sd, sdxl = checkpoints.vae_config("vae-ft-mse-840000.safetensors"), checkpoints.vae_config("sdxl_vae.safetensors")
    default = inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default
    assert sd.get("scaling_factor", default) == 0.18215
    assert (sdxl["scaling_factor"], sdxl["force_upcast"]) == (0.13025, True)
    assert checkpoints.vae_config("sdxl-vae-fp16-fix.safetensors")["force_upcast"] is False
    assert checkpoints.vae_config("anything.safetensors", arch=SDXL)["scaling_factor"] == 0.13025


# ============================================================================ detection

def _sdxl_like_shapes(context: int, added: int, channels: int = 320) -> dict[str, tuple[int, ...]]:
    unet = ldm_format.UNET
    return {unet + "input_blocks.0.0.weight": (channels, 4, 3, 3),
            unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, context),
            unet + "label_emb.0.0.weight": (1280, added)}


def test_sdxl_refiner_is_refused_as_a_refiner():
    shapes = {**_sdxl_like_shapes(1280, 2560, channels=384),
              "conditioner.embedders.0.model.text_projection": (1280, 1280)}
    with pytest.raises(ModelError, match="SDXL refiner.*SDXL base"):
        checkpoints.detect_architecture(shapes)


def test_inpainting_model_is_refused_naming_its_inputs():
    shapes = {ldm_format.UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}
    with pytest.raises(ModelError, match="inpainting model.*9 input channels"):
        checkpoints.detect_architecture(shapes)


@pytest.mark.parametrize("keys, looks_like", [
    (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "Stable Diffusion 3"),
    (["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"], "a VAE"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA"),
    (["1.conv.0.weight", "1.conv.2.weight"], "TAESD"),
    (["down_blocks.0.resnets.0.conv1.weight", "time_embedding.linear_1.weight"], "diffusers layout"),
])
def test_other_kinds_of_file_are_refused_saying_what_they_look_like(keys, looks_like):
    with pytest.raises(ModelError, match=f"{looks_like}.*Supported: SD 1.x, SD 2.x"):
        checkpoints.detect_architecture({k: (4, 4) for k in keys})


def test_metadata_declaring_an_adapter_is_refused_whatever_the_weights():
    shapes = _sdxl_like_shapes(2048, 2816)
    with pytest.raises(ModelError, match="lora for stable-diffusion-xl-v1-base"):
        checkpoints.detect_architecture(shapes, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})


def test_weights_win_over_metadata_that_names_another_model():
    assert checkpoints.detect_architecture(_sdxl_like_shapes(2048, 2816),
                                           {"modelspec.architecture": "stable-diffusion-v1"}) == SDXL


# ============================================================================ the tiny models as single files

def _tiny_vae(arch: str = TINY_ARCH) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return AutoencoderKL.from_config(checkpoints._vae_config(arch)).eval()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> tuple[Path, dict[str, nn.Module]]:
    originals = {"unet": tiny.build_unet(), "vae": _tiny_vae(), "text_encoder": tiny.build_text_encoder()}
    state = ldm_format.checkpoint("sd15", **originals)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # LDM checkpoints carry their noise schedule
    path = tmp_path_factory.mktemp("models") / "tiny_ldm.safetensors"
    ldm_format.save(path, state, {"modelspec.architecture": "sdbridge-tiny"})
    return path, originals


def test_tiny_single_file_loads_every_tensor_exactly(tiny_file):
    path, originals = tiny_file
    bundle = checkpoints.load_single_file(path, CPU, F32)
    assert (bundle.arch, bundle.name, bundle.source, bundle.test_model) == (TINY_ARCH, "tiny_ldm", str(path), True)
    for name, original in originals.items():
        loaded = bundle.autoencoder.module if name == "vae" else getattr(bundle, name)
        _assert_same_weights(loaded, original)
    assert bundle.autoencoder.scaling_factor == 0.18215 and not bundle.autoencoder.tiny
    assert bundle.scheduler.config.prediction_type == EPSILON


def test_tiny_xl_single_file_loads_every_tensor_exactly(tmp_path):
    originals = {"unet": tiny.build_xl_unet(), "vae": _tiny_vae(TINY_XL_ARCH),
                 "text_encoder": tiny.build_text_encoder(), "text_encoder_2": tiny.build_text_encoder_2()}
    path = ldm_format.save(tmp_path / "tiny_xl.safetensors", ldm_format.checkpoint("sdxl", **originals),
                           {"modelspec.architecture": "sdbridge-tiny-xl"})
    bundle = checkpoints.load_single_file(path, CPU, F32)
    assert bundle.arch == TINY_XL_ARCH and bundle.xl and bundle.tokenizer_2 is not None
    for name, original in originals.items():
        loaded = bundle.autoencoder.module if name == "vae" else getattr(bundle, name)
        _assert_same_weights(loaded, original)
    assert bundle.autoencoder.scaling_factor == 0.13025


def test_loading_a_single_file_makes_no_network_access(tiny_file, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while loading: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    bundle = checkpoints.load_single_file(tiny_file[0], CPU, F32)
    assert bundle.unet is not None


def test_load_converts_to_the_asked_dtype(tiny_file):
    bundle = checkpoints.load_single_file(tiny_file[0], CPU, torch.bfloat16)
    assert {m.dtype for m in (bundle.unet, bundle.autoencoder.module, bundle.text_encoder)} == {torch.bfloat16}


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_file) -> Path:
    path = tiny_file[0].with_name("tiny_ldm.ckpt")
    state = ldm_format.checkpoint("sd15", **tiny_file[1])
    return ldm_format.save(path, state)


def test_pickle_checkpoint_is_refused_without_allow_pickle(tiny_ckpt):
    with pytest.raises(PickleRefused, match="allow-pickle"):
        checkpoints.load_single_file(tiny_ckpt, CPU, F32, arch=TINY_ARCH)


def test_pickle_checkpoint_loads_with_allow_pickle(tiny_ckpt, tiny_file):
    bundle = checkpoints.load_single_file(tiny_ckpt, CPU, F32, allow_pickle=True, arch=TINY_ARCH)
    _assert_same_weights(bundle.unet, tiny_file[1]["unet"])


def test_truncated_file_is_a_model_error(tiny_file, tmp_path):
    data = tiny_file[0].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.safetensors"):
        checkpoints.load_single_file(path, CPU, F32)


def test_garbage_file_is_a_model_error(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ModelError, match="garbage.safetensors"):
        checkpoints.load_single_file(path, CPU, F32)


def test_lora_given_as_a_checkpoint_is_refused_as_a_lora(tmp_path):
    base = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = ldm_format.save(tmp_path / "style_lora.safetensors", {
        f"{base}.lora_down.weight": torch.zeros(4, 320), f"{base}.lora_up.weight": torch.zeros(320, 4),
        f"{base}.alpha": torch.tensor(4.0)})
    with pytest.raises(ModelError, match="style_lora.safetensors: this file is a LoRA"):
        checkpoints.load_single_file(path, CPU, F32)


def test_sdxl_refiner_file_is_refused_before_its_weights_are_read(tmp_path):
    shapes = {**_sdxl_like_shapes(1280, 2560, channels=384), "conditioner.embedders.0.model.text_projection": (8, 8)}
    path = ldm_format.save(tmp_path / "sd_xl_refiner_1.0.safetensors",
                           {k: torch.zeros(v, dtype=torch.float16) for k, v in shapes.items()})
    with pytest.raises(ModelError, match="sd_xl_refiner_1.0.safetensors: this checkpoint is an SDXL refiner"):
        checkpoints.load_single_file(path, CPU, F32)


def test_weights_that_do_not_fit_name_what_is_wrong(tiny_file, tmp_path):
    state = ldm_format.checkpoint("sd15", **tiny_file[1])
    del state[ldm_format.UNET + "out.2.weight"]
    path = ldm_format.save(tmp_path / "pruned.safetensors", state, {"modelspec.architecture": "sdbridge-tiny"})
    with pytest.raises(ModelError, match=r"pruned.safetensors: its UNet does not fit .* missing \(such as conv_out"):
        checkpoints.load_single_file(path, CPU, F32)


def test_sd2_open_clip_layout_converts_exactly_leaving_out_the_unused_last_layer():
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu")
    torch.manual_seed(0)
    original, empty = CLIPTextModel(config).eval(), CLIPTextModel(config)
    state = ldm_format.open_clip_to_ldm(original, ldm_format.SD2_OPEN_CLIP, unused_layers=1)
    assert ldm_format.SD2_OPEN_CLIP + "transformer.resblocks.2.attn.in_proj_weight" in state
    weights = checkpoints.open_clip_weights(state, ldm_format.SD2_OPEN_CLIP, empty)
    checkpoints.fill(empty, weights, F32, "test", "SD 2.x")
    _assert_same_weights(empty, original)


# ============================================================================ prediction type

@pytest.mark.parametrize("name, arch, metadata, expected", [
    ("v2-1_768-ema-pruned.safetensors", SD21, {}, V_PREDICTION),
    ("sd_turbo.safetensors", SD21, {}, EPSILON),
    ("v2-1_512-ema-pruned.safetensors", SD21, {}, EPSILON),
    ("v1-5-pruned-emaonly.safetensors", SD15, {}, EPSILON),
    ("sd_xl_base_1.0.safetensors", SDXL, {}, EPSILON),
    ("finetune.safetensors", SD21, {"modelspec.prediction_type": "epsilon"}, EPSILON),
    ("finetune.safetensors", SDXL, {"modelspec.prediction_type": "v"}, V_PREDICTION),
    ("finetune.safetensors", SD21, {"modelspec.architecture": "stable-diffusion-v2-512"}, EPSILON),
])
def test_prediction_type_rule(name, arch, metadata, expected, tmp_path):
    assert checkpoints.prediction_type_for(tmp_path / name, arch, metadata) == expected


def test_v_pred_marker_in_the_weights_means_v_prediction(tmp_path):
    assert checkpoints.prediction_type_for(tmp_path / "noob.safetensors", SDXL, {}, {"v_pred": ()}) == V_PREDICTION


@pytest.mark.parametrize("yaml_text, expected", [
    ('model:\n  params:\n    parameterization: "v"\n', V_PREDICTION),
    ("model:\n  params:\n    linear_start: 0.00085\n", EPSILON),
])
def test_sidecar_yaml_decides_over_everything_else(yaml_text, expected, tmp_path):
    (tmp_path / "sd_turbo.yaml").write_text(yaml_text)
    # a v yaml beats the turbo name, an epsilon yaml beats v metadata
    assert checkpoints.prediction_type_for(tmp_path / "sd_turbo.safetensors", SD21,
                                           {"modelspec.prediction_type": "v"}) == expected


def test_sidecar_yaml_reaches_the_loaded_scheduler(tiny_file, tmp_path):
    path = tmp_path / "tiny_v.safetensors"
    path.write_bytes(tiny_file[0].read_bytes())
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert checkpoints.load_single_file(path, CPU, F32).scheduler.config.prediction_type == V_PREDICTION


def test_explicit_prediction_type_overrides_the_rule(tiny_file):
    bundle = checkpoints.load_single_file(tiny_file[0], CPU, F32, prediction_type="v")
    assert bundle.scheduler.config.prediction_type == V_PREDICTION


def test_shipped_scheduler_has_the_sd_noise_schedule():
    scheduler = checkpoints._scheduler(SD21, EPSILON)
    assert (scheduler.config.num_train_timesteps, scheduler.config.beta_schedule) == (1000, "scaled_linear")
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.alphas_cumprod[-1] == pytest.approx(0.0047, abs=1e-4)


# ============================================================================ CLIP tokenizer

def test_clip_vocabulary_is_openai_clips():
    vocab, merges = checkpoints.clip_vocabulary()
    assert (len(vocab), len(merges)) == (49408, 48894)
    known = {"!": 0, "a</w>": 320, "photo</w>": 1125, "of</w>": 539, "cat</w>": 2368, "dog</w>": 1929,
             "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    assert {token: vocab[token] for token in known} == known


@pytest.mark.parametrize("arch, folder, pad_id", [(SD15, "tokenizer", 49407), (SD21, "tokenizer", 0),
                                                   (SDXL, "tokenizer", 49407), (SDXL, "tokenizer_2", 0)])
def test_shipped_tokenizers_encode_clip_ids_and_pad_as_their_models_did(arch, folder, pad_id):
    tokenizer = checkpoints.clip_tokenizer(checkpoints.MODELS_CONFIG_DIR / checkpoints._arch_folder(arch) / folder)
    ids = tokenizer("A photo of a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert ids[:8] == [49406, 320, 1125, 539, 320, 2368, 49407, pad_id]
    assert len(ids) == 77


def test_tokenizer_files_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "tokenizer_cache_dir", lambda: tmp_path / "cache")
    checkpoints.clip_tokenizer(checkpoints.MODELS_CONFIG_DIR / "sd21" / "tokenizer")
    checkpoints.clip_tokenizer(checkpoints.MODELS_CONFIG_DIR / "sdxl" / "tokenizer_2")  # the same settings
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1
    assert len(json.loads((folders[0] / "vocab.json").read_text(encoding="utf-8"))) == 49408


# ============================================================================ standalone VAE

@pytest.mark.parametrize("layout", ["original", "original with prefix", "diffusers"])
def test_standalone_vae_loads_exactly_in_either_layout(layout, tmp_path):
    original = _tiny_vae()
    if layout == "diffusers":
        state = original.state_dict()
    else:
        state = ldm_format.vae_to_ldm(original, prefix="first_stage_model." if "prefix" in layout else "")
        state["loss.logvar"] = torch.zeros(())  # a training leftover some VAE files carry
    path = ldm_format.save(tmp_path / "my_vae.safetensors", state)
    vae = checkpoints.load_vae_file(path, CPU, F32, arch=TINY_ARCH)
    _assert_same_weights(vae, original)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(vae.encode(image).latent_dist.mean, original.encode(image).latent_dist.mean)


def test_vae_of_a_whole_checkpoint_loads_as_a_standalone_vae(tiny_file):
    path, originals = tiny_file
    _assert_same_weights(checkpoints.load_vae_file(path, CPU, F32, arch=TINY_ARCH), originals["vae"])


def test_vae_file_that_is_a_lora_is_refused(tmp_path):
    path = ldm_format.save(tmp_path / "x.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(ModelError, match="x.safetensors is not a VAE: it is a LoRA"):
        checkpoints.load_vae_file(path, CPU, F32)


# ============================================================================ TAESD

def _original_taesd(latent_channels: int = 4) -> tuple[nn.Sequential, nn.Sequential]:
    """madebyollin/taesd's taesd.py Encoder and Decoder, as published (github.com/madebyollin/taesd)."""
    def conv(n_in, n_out, **kwargs):
        return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)

    class Clamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    class Block(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
            self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
            self.fuse = nn.ReLU()

        def forward(self, x):
            return self.fuse(self.conv(x) + self.skip(x))

    torch.manual_seed(3)
    encoder = nn.Sequential(
        conv(3, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, latent_channels))
    decoder = nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), conv(64, 3))
    return encoder.eval(), decoder.eval()


@pytest.fixture(scope="module")
def original_taesd(tmp_path_factory) -> tuple[Path, nn.Sequential, nn.Sequential]:
    folder = tmp_path_factory.mktemp("vae_approx")
    encoder, decoder = _original_taesd()
    ldm_format.save(folder / "taesd_encoder.safetensors", encoder.state_dict())
    ldm_format.save(folder / "taesd_decoder.safetensors", decoder.state_dict())
    return folder, encoder, decoder


@torch.no_grad()
def test_original_taesd_pair_computes_what_the_original_taesd_does(original_taesd):
    folder, encoder, decoder = original_taesd
    taesd = checkpoints.load_taesd(folder / "taesd_decoder.safetensors", CPU, F32)
    image = torch.rand(1, 3, 64, 64)  # the original takes and gives [0, 1], diffusers [-1, 1]
    torch.testing.assert_close(taesd.encode(image * 2 - 1).latents, encoder(image))
    latents = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(taesd.decode(latents).sample, decoder(latents) * 2 - 1)
    assert taesd.config.scaling_factor == 1.0


def test_taesd_loads_from_either_file_or_the_folder(original_taesd):
    folder = original_taesd[0]
    loaded = [checkpoints.load_taesd(p, CPU, F32) for p in
              (folder, folder / "taesd_encoder.safetensors", folder / "taesd_decoder.safetensors")]
    _assert_same_weights(loaded[1], loaded[0])
    _assert_same_weights(loaded[2], loaded[0])


def test_folder_with_taesd_and_taesdxl_picks_by_arch(original_taesd, tmp_path):
    folder = tmp_path / "vae_approx"
    folder.mkdir()
    for name in ("taesd_encoder", "taesd_decoder"):
        (folder / f"{name}.safetensors").write_bytes((original_taesd[0] / f"{name}.safetensors").read_bytes())
    xl_encoder, xl_decoder = _original_taesd()
    with torch.no_grad():
        xl_decoder[1].bias.fill_(0.5)  # one weight differs, to tell them apart
    ldm_format.save(folder / "taesdxl_encoder.safetensors", xl_encoder.state_dict())
    ldm_format.save(folder / "taesdxl_decoder.safetensors", xl_decoder.state_dict())
    sd, xl = checkpoints.load_taesd(folder, CPU, F32, arch=SD15), checkpoints.load_taesd(folder, CPU, F32, arch=SDXL)
    assert not torch.equal(sd.decoder.layers[0].bias, xl.decoder.layers[0].bias)
    assert torch.equal(xl.decoder.layers[0].bias, torch.full((64,), 0.5))
    assert checkpoints.taesd_arch(folder / "taesdxl_decoder.safetensors") == SDXL
    assert checkpoints.taesd_arch(folder / "taesd_decoder.safetensors") == SD15


def test_folder_without_the_pair_for_the_models_latents_is_refused(tmp_path):
    encoder, decoder = _original_taesd()
    ldm_format.save(tmp_path / "taesdxl_encoder.safetensors", encoder.state_dict())
    ldm_format.save(tmp_path / "taesdxl_decoder.safetensors", decoder.state_dict())
    with pytest.raises(ModelError, match="no taesd_encoder / taesd_decoder pair for SD 1.x models"):
        checkpoints.load_taesd(tmp_path, CPU, F32, arch=SD15)


def test_taesd_decoder_without_its_encoder_is_refused(original_taesd, tmp_path):
    path = tmp_path / "taesd_decoder.safetensors"
    path.write_bytes((original_taesd[0] / "taesd_decoder.safetensors").read_bytes())
    with pytest.raises(ModelError, match="taesd_encoder is missing.*needs both"):
        checkpoints.load_taesd(path, CPU, F32)


def test_taesd_pth_pair_needs_allow_pickle(original_taesd, tmp_path):
    _, encoder, decoder = original_taesd
    torch.save(encoder.state_dict(), tmp_path / "taesd_encoder.pth")
    torch.save(decoder.state_dict(), tmp_path / "taesd_decoder.pth")
    with pytest.raises(PickleRefused):
        checkpoints.load_taesd(tmp_path, CPU, F32)
    taesd = checkpoints.load_taesd(tmp_path, CPU, F32, allow_pickle=True)
    _assert_same_weights(taesd, checkpoints.load_taesd(original_taesd[0], CPU, F32))


def test_taesd_diffusers_folder_loads_exactly(tmp_path):
    original = tiny.build_autoencoder()
    original.save_pretrained(tmp_path / "taesd")
    _assert_same_weights(checkpoints.load_taesd(tmp_path / "taesd", CPU, F32), original)


def test_16_channel_taesd_is_refused_as_taesd3_or_taef1(tmp_path):
    encoder, decoder = _original_taesd(latent_channels=16)
    ldm_format.save(tmp_path / "taef1_encoder.safetensors", encoder.state_dict())
    ldm_format.save(tmp_path / "taef1_decoder.safetensors", decoder.state_dict())
    with pytest.raises(ModelError, match="16-channel latents"):
        checkpoints.load_taesd(tmp_path, CPU, F32)
