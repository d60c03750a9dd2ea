"""Loading models offline: the built-in models, diffusers folders and single files made by the tests,
found by name in A1111 / ComfyUI trees, and the autoencoder each one runs with."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from engines import registry, tiny
from engines.bundle import SD15, SD21, SDXL, TINY_ARCH, TINY_XL_ARCH
from engines.folders import ModelFolders
from engines.stream import Stream, StreamSettings
from engines.weights import PickleRefused

from .conftest import ROOT

CPU, F32 = torch.device("cpu"), torch.float32
NEEDS_CHECKPOINTS = "engines.checkpoints (single-file loading) is not in this checkout yet"


def tiny_vae(seed: int = 5) -> AutoencoderKL:
    """A full KL VAE of the tiny models' shape (configs/models/tiny/vae), as a tiny checkpoint holds."""
    config = json.loads((ROOT / "configs" / "models" / "tiny" / "vae" / "config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(config).eval()


def save_tiny_checkpoint(path: Path, vae: AutoencoderKL | None = None) -> Path:
    """The tiny model as an A1111 user's single-file checkpoint (original LDM layout)."""
    from . import ldm_format

    state = ldm_format.checkpoint("sd15", tiny.build_unet(), vae or tiny_vae(), tiny.build_text_encoder())
    path.parent.mkdir(parents=True, exist_ok=True)
    return ldm_format.save(path, state, None if path.suffix == ".ckpt" else {"modelspec.architecture": "sdbridge-tiny"})


def save_taesd(folder: Path) -> Path:
    """The tiny models' TAESD as a diffusers AutoencoderTiny folder (as madebyollin/taesd is published).
    The original encoder/decoder file pair only holds full-size TAESDs, so the tiny one cannot be one."""
    tiny.build_autoencoder().save_pretrained(folder)
    return folder


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_is_built_the_same_every_time():
    a, b = registry.load("tiny", CPU, F32), registry.load("tiny", CPU, F32)
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(pa, pb)
    assert a.test_model


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """The tiny model written as a diffusers folder, as a user's sd-turbo folder would be laid out."""
    folder = tmp_path_factory.mktemp("model")
    model = registry.load("tiny", CPU, F32)
    model.unet.save_pretrained(folder / "unet")
    model.text_encoder.save_pretrained(folder / "text_encoder")
    model.tokenizer.save_pretrained(folder / "tokenizer")
    model.scheduler.save_pretrained(folder / "scheduler")
    model.autoencoder.module.save_pretrained(folder / "taesd")
    return folder


def test_a_diffusers_folder_loads_and_renders_like_the_model_it_was_saved_from(saved_tiny):
    settings = StreamSettings(prompt="x", seed=3, width=64, height=64, steps=2)
    image = torch.zeros(1, 3, 64, 64)
    outputs = []
    for name in ("tiny", str(saved_tiny)):
        stream = Stream(registry.load(name, CPU, F32), CPU, F32)
        stream.prepare(settings)
        outputs.append(stream.render(image))
    assert torch.equal(outputs[0], outputs[1])
    assert not registry.load(str(saved_tiny), CPU, F32).test_model


def test_a_folder_with_a_full_vae_instead_of_taesd_loads_and_renders(saved_tiny, tmp_path):
    folder = tmp_path / "with-vae"
    shutil.copytree(saved_tiny, folder, ignore=shutil.ignore_patterns("taesd"))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=64,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4
                  ).save_pretrained(folder / "vae")
    model = registry.load(str(folder), CPU, F32)
    assert model.autoencoder.name == "vae" and model.autoencoder.spatial_factor == 8
    stream = Stream(model, CPU, F32)
    stream.prepare(StreamSettings(prompt="x", seed=3, width=64, height=64))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    out = stream.render(image)
    assert out.shape == (1, 3, 64, 64)
    assert torch.equal(out, stream.render(image))  # the latent mean, not a sample: the same frame, the same output


def test_a_missing_path_names_what_is_expected(tmp_path):
    with pytest.raises(registry.ModelError, match="not found: give `tiny` or the path of a diffusers model folder"):
        registry.resolve(str(tmp_path / "nope"))


def test_a_folder_missing_components_names_each_one(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    with pytest.raises(registry.ModelError,
                       match=r"missing text_encoder/, tokenizer/, scheduler/, unet/config.json, vae/ or taesd/"):
        registry.resolve(str(tmp_path))


@pytest.fixture(scope="module")
def saved_tiny_xl(tmp_path_factory):
    """tiny-xl written as a diffusers folder, laid out as sdxl-turbo's is."""
    folder = tmp_path_factory.mktemp("model-xl")
    model = registry.load("tiny-xl", CPU, F32)
    for name in ("unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"):
        getattr(model, name).save_pretrained(folder / name)
    model.autoencoder.module.save_pretrained(folder / "taesd")
    return folder


def test_an_sdxl_folder_loads_with_its_second_text_encoder_and_renders_like_its_source(saved_tiny_xl):
    from transformers import CLIPTextModelWithProjection

    model = registry.load(str(saved_tiny_xl), CPU, F32)
    assert isinstance(model.text_encoder_2, CLIPTextModelWithProjection) and model.tokenizer_2 is not None
    assert model.xl and model.arch == TINY_XL_ARCH
    settings = StreamSettings(prompt="x", seed=3, width=64, height=64)
    outputs = []
    for m in (registry.load("tiny-xl", CPU, F32), model):
        stream = Stream(m, CPU, F32)
        stream.prepare(settings)
        outputs.append(stream.render(torch.zeros(1, 3, 64, 64)))
    # the same weights; diffusers' reloaded UNet differs in float rounding (~1e-6) on the SDXL path only
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)


def test_an_sdxl_folder_without_its_second_tokenizer_names_it(saved_tiny_xl, tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(saved_tiny_xl, folder, ignore=shutil.ignore_patterns("tokenizer_2"))
    with pytest.raises(registry.ModelError, match=r"model folder .* is missing tokenizer_2/;"):
        registry.resolve(str(folder))


@pytest.mark.parametrize("unet_config, arch", [
    ({"cross_attention_dim": 768}, SD15),
    ({"cross_attention_dim": 1024}, SD21),
    ({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, SDXL),
    ({"cross_attention_dim": 32}, TINY_ARCH),
])
def test_a_folders_architecture_is_read_from_its_unet_config(tmp_path, unet_config, arch):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet_config))
    assert registry.folder_arch(tmp_path) == arch


# ---------------------------------------------------------------- names in the models folders

@pytest.fixture
def webui(saved_tiny, tmp_path):
    """An A1111 install with the saved tiny model as a diffusers folder and a pickle checkpoint."""
    models = tmp_path / "webui" / "models"
    shutil.copytree(saved_tiny, models / "Stable-diffusion" / "sd15" / "toy")
    (models / "Stable-diffusion" / "old.ckpt").write_bytes(b"never read")
    (models / "Lora").mkdir()
    return tmp_path / "webui"


def test_a_model_in_an_a1111_tree_is_resolved_and_loaded_by_its_name(webui):
    folders = ModelFolders([webui])
    folder = webui / "models" / "Stable-diffusion" / "sd15" / "toy"
    for name in ("sd15/toy", "toy"):
        assert registry.resolve(name, folders) == str(folder.resolve())
        assert registry.resolve(name, folders, from_network=True) == str(folder.resolve())
    model = registry.load("toy", CPU, F32, folders=folders)
    assert model.name == "sd15/toy" and model.autoencoder.name == "taesd"


def test_over_the_network_only_built_in_models_and_folder_names_are_accepted(webui, saved_tiny):
    folders = ModelFolders([webui])
    assert registry.resolve("tiny-xl", folders, from_network=True) == "tiny-xl"
    assert registry.resolve(str(saved_tiny), folders) == str(saved_tiny.resolve())  # config: the user's own path
    for name in (str(saved_tiny), "../../" + saved_tiny.name, "sd15/../sd15/toy"):
        with pytest.raises(registry.ModelError, match="refused|not found"):
            registry.resolve(name, folders, from_network=True)
    with pytest.raises(registry.ModelError, match="no models folders are configured"):
        registry.resolve(str(saved_tiny), None, from_network=True)


def test_a_model_not_in_the_folders_names_them_and_lists_what_is_there(webui):
    with pytest.raises(registry.ModelError,
                       match=r"model 'nope' not found in .*Stable-diffusion; known: old, sd15/toy$"):
        registry.resolve("nope", ModelFolders([webui]))


def test_a_pickle_is_refused_unless_allowed(webui):
    folders = ModelFolders([webui])
    assert [(e.name, e.pickle) for e in folders.list("checkpoints")] == [("old", True), ("sd15/toy", False)]
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        registry.resolve("old", folders)
    with pytest.raises(PickleRefused):
        registry.load("old", CPU, F32, folders=folders)
    assert registry.resolve("old", folders, allow_pickle=True).endswith("old.ckpt")


# ---------------------------------------------------------------- autoencoders

def test_built_in_models_use_their_own_taesd_whatever_is_asked(saved_tiny):
    model = registry.load("tiny", CPU, F32)
    for vae in registry.VAE_CHOICES:
        autoencoder = registry.load_autoencoder(vae, model, None, CPU, F32)
        assert autoencoder.tiny and same_weights(autoencoder.module, model.autoencoder.module)


def test_a_diffusers_folder_uses_its_taesd_by_default_and_its_own_vae_on_request(saved_tiny, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(saved_tiny, folder)
    vae = tiny_vae()
    vae.save_pretrained(folder / "vae")
    model = registry.load(str(folder), CPU, F32)
    assert model.autoencoder.name == "taesd"
    own = registry.load_autoencoder("model", model, None, CPU, F32)
    assert own.name == "vae" and same_weights(own.module, vae)
    assert registry.load(str(folder), CPU, F32, vae="model").autoencoder.name == "vae"


def test_a_folder_with_only_taesd_has_no_own_vae_to_switch_to(saved_tiny):
    with pytest.raises(registry.ModelError, match="has no vae/ folder"):
        registry.load(str(saved_tiny), CPU, F32, vae="model")


@pytest.fixture
def comfy_checkpoint(tmp_path):
    """A ComfyUI install with the tiny model as a single .safetensors file and a TAESD pair in vae_approx."""
    pytest.importorskip("engines.checkpoints", reason=NEEDS_CHECKPOINTS)
    models = tmp_path / "ComfyUI" / "models"
    vae = tiny_vae()
    save_tiny_checkpoint(models / "checkpoints" / "toy.safetensors", vae)
    save_taesd(models / "vae_approx" / "taesd")
    return tmp_path / "ComfyUI", vae


def test_a_single_file_uses_the_folders_taesd_by_default_and_its_own_vae_on_request(comfy_checkpoint):
    root, vae = comfy_checkpoint
    folders = ModelFolders([root])
    model = registry.load("toy", CPU, F32, folders=folders)
    assert model.name == "toy" and model.arch == TINY_ARCH
    assert model.autoencoder.tiny and same_weights(model.autoencoder.module, tiny.build_autoencoder())
    own = registry.load_autoencoder("model", model, folders, CPU, F32)  # re-read from the checkpoint
    assert own.name == "vae" and same_weights(own.module, vae)
    assert registry.load("toy", CPU, F32, folders=folders, vae="model").autoencoder.name == "vae"
    assert registry.load_autoencoder("taesd", model, folders, CPU, F32).tiny


def test_taesd_asked_for_where_there_is_none_says_where_to_put_it(comfy_checkpoint):
    root, _ = comfy_checkpoint
    shutil.rmtree(root / "models" / "vae_approx")
    folders = ModelFolders([root])
    assert registry.load("toy", CPU, F32, folders=folders).autoencoder.name == "vae"  # auto falls back
    with pytest.raises(registry.ModelError, match=r"put taesd_encoder.safetensors and taesd_decoder.safetensors .*"
                                                  r"models/VAE-approx \(A1111\) or models/vae_approx \(ComfyUI\)"):
        registry.load("toy", CPU, F32, folders=folders, vae="taesd")


def test_a_vae_file_from_the_folders_is_loaded_by_name(comfy_checkpoint):
    from . import ldm_format

    root, _ = comfy_checkpoint
    other = tiny_vae(seed=9)
    (root / "models" / "vae").mkdir()
    ldm_format.save(root / "models" / "vae" / "other_vae.safetensors", ldm_format.vae_to_ldm(other, prefix=""))
    folders = ModelFolders([root])
    model = registry.load("tiny", CPU, F32)
    autoencoder = registry.load_autoencoder("other_vae", model, folders, CPU, F32)
    assert autoencoder.name == "vae" and same_weights(autoencoder.module, other)


def test_an_sdxl_vae_on_an_sd1_model_is_refused(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "sdxl_vae.safetensors").write_bytes(b"never read")
    xl_folder = models / "vae" / "xl-diffusers"
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)
    vae.save_pretrained(xl_folder)
    folders = ModelFolders([tmp_path / "ComfyUI"])
    model = registry.load("tiny", CPU, F32)
    for name in ("sdxl_vae", "xl-diffusers"):
        with pytest.raises(registry.ModelError, match="is an SDXL VAE .* but the model is tiny"):
            registry.load_autoencoder(name, model, folders, CPU, F32)


def test_an_unknown_vae_name_lists_the_vaes_and_taesds(comfy_checkpoint):
    root, _ = comfy_checkpoint
    with pytest.raises(registry.ModelError, match=r"vae 'nope' not found .*; taesd 'nope' not found .*known: taesd; "
                                                  r"or one of auto, model, taesd"):
        registry.find_autoencoder("nope", ModelFolders([root]))


def test_a_corrupt_weights_file_is_a_model_error(saved_tiny, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(saved_tiny, folder)
    for f in (folder / "unet").glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    with pytest.raises(registry.ModelError, match="could not load"):
        registry.load(str(folder), CPU, F32)


def test_cuda_asked_for_without_a_gpu_says_how_to_fix_it():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(registry.ModelError, match="--device cpu"):
        registry.pick_device("cuda")
