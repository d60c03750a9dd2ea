"""The random:<arch> benchmark models: the real architectures' shapes, deterministic variance-preserving
weights, accepted from the command line and refused over the network, and one real frame end to end."""
from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from engines import random_models, registry
from engines.bundle import SD15, SD21, SDXL, ModelError
from engines.stream import Stream, StreamSettings

CPU, F32 = torch.device("cpu"), torch.float32

# The published models' parameter counts (diffusers / transformers, as loaded from their hub folders):
# runwayml/stable-diffusion-v1-5, stabilityai/sd-turbo (= SD 2.1 base), stabilityai/sdxl-turbo.
UNET_PARAMETERS = {SD15: 859_520_964, SD21: 865_910_724, SDXL: 2_567_463_684}
TEXT_ENCODER_PARAMETERS = {SD15: (123_060_480,), SD21: (340_387_840,), SDXL: (123_060_480, 694_659_840)}
VAE_PARAMETERS = 83_653_863
TAESD_PARAMETERS = 2_445_063


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sd15():
    """random:sd15 on the CPU in float32, loaded as the daemon loads a model."""
    return registry.load("random:sd15", CPU, F32)


@pytest.mark.parametrize("arch", [SD15, SD21, SDXL])
def test_the_components_have_the_real_models_parameter_counts(arch):
    modules = random_models.empty_components(arch)
    assert count(modules["unet"]) == UNET_PARAMETERS[arch]
    encoders = [modules[name] for name in ("text_encoder", "text_encoder_2") if name in modules]
    assert tuple(count(m) for m in encoders) == TEXT_ENCODER_PARAMETERS[arch]
    assert count(modules["vae"]) == VAE_PARAMETERS
    assert all(p.is_meta for m in modules.values() for p in m.parameters())  # built without memory


@pytest.mark.parametrize("arch, hidden", [(SD15, (768,)), (SD21, (1024,)), (SDXL, (768, 1280))])
def test_the_text_encoders_have_the_real_hidden_sizes(arch, hidden):
    modules = random_models.empty_components(arch)
    encoders = [modules[name] for name in ("text_encoder", "text_encoder_2") if name in modules]
    assert tuple(m.config.hidden_size for m in encoders) == hidden
    assert modules["unet"].config.cross_attention_dim == sum(hidden)


def test_the_taesd_has_taesds_architecture_and_latent_api():
    autoencoder = random_models.build_autoencoder(SDXL, CPU, F32)
    assert isinstance(autoencoder.module, AutoencoderTiny) and count(autoencoder.module) == TAESD_PARAMETERS
    assert (autoencoder.scaling_factor, autoencoder.latent_channels, autoencoder.spatial_factor) == (1.0, 4, 8)


def test_the_same_arch_gives_the_same_weights_and_another_arch_others():
    a, b = (random_models.build_autoencoder(SD15, CPU, F32).module.state_dict() for _ in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    xl = random_models.build_autoencoder(SDXL, CPU, F32).module.state_dict()
    assert not torch.equal(a["encoder.layers.0.weight"], xl["encoder.layers.0.weight"])


def test_weights_are_variance_preserving_and_buffers_are_real(sd15):
    conv = sd15.unet.conv_in.weight  # fan_in 4 x 3 x 3
    assert conv.std().item() == pytest.approx(36 ** -0.5, rel=0.1)
    assert torch.all(sd15.unet.conv_in.bias == 0)
    assert torch.all(sd15.unet.conv_norm_out.weight == 1) and torch.all(sd15.unet.conv_norm_out.bias == 0)
    embeddings = sd15.text_encoder.get_input_embeddings()
    assert embeddings.weight.std().item() == pytest.approx(random_models.EMBEDDING_STD, rel=0.1)
    position_ids = dict(sd15.text_encoder.named_buffers())
    (ids,) = [v for k, v in position_ids.items() if k.endswith("position_ids")]
    assert torch.equal(ids, torch.arange(77).unsqueeze(0))  # not what to_empty left in memory


def test_random_sd15_is_a_test_model_with_the_real_tokenizer_and_an_epsilon_scheduler(sd15):
    assert (sd15.name, sd15.arch, sd15.source, sd15.test_model) == ("random:sd15", SD15, "random:sd15", True)
    assert sd15.scheduler.config.prediction_type == "epsilon"
    assert sd15.tokenizer("a red fox").input_ids == [49406, 320, 736, 3240, 49407]  # OpenAI CLIP's BPE
    assert sd15.autoencoder.tiny and not sd15.xl


def test_random_sd15_renders_a_finite_frame_of_the_right_shape(sd15):
    stream = Stream(sd15, CPU, F32)
    stream.prepare(StreamSettings(prompt="a red fox", seed=1, strength=0.6, steps=1, width=64, height=64))
    torch.manual_seed(0)
    out = stream.render(torch.rand(1, 3, 64, 64) * 2 - 1)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_vae_model_gives_the_architectures_full_vae_and_a_name_loads_from_the_folders(sd15):
    full = registry.load_autoencoder("model", sd15, None, CPU, F32)
    assert isinstance(full.module, AutoencoderKL) and count(full.module) == VAE_PARAMETERS
    assert full.scaling_factor == pytest.approx(0.18215)
    assert registry.load_autoencoder("taesd", sd15, None, CPU, F32).tiny
    with pytest.raises(ModelError, match="no models folders are configured"):
        registry.load_autoencoder("my-vae", sd15, None, CPU, F32)  # a name is looked up, never made up


@pytest.mark.parametrize("name", random_models.NAMES)
def test_resolve_accepts_the_random_models_from_the_command_line(name):
    assert registry.resolve(name) == name


def test_an_unknown_random_model_is_refused_naming_the_known_ones():
    with pytest.raises(ModelError, match="random:sd15, random:sd21, random:sdxl"):
        registry.resolve("random:sd3")


@pytest.mark.parametrize("name", ["random:sdxl", "random:foo"])
def test_random_models_are_refused_over_the_network(name):
    with pytest.raises(ModelError, match="refused over the network"):
        registry.resolve(name, from_network=True)
