"""Loading models offline: the tiny model and diffusers folders made by the tests."""
from __future__ import annotations

import json

import pytest
import torch

from engines import registry
from engines.stream import Stream, StreamSettings

CPU, F32 = torch.device("cpu"), torch.float32


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
    import shutil

    from diffusers import AutoencoderKL

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


def test_sdxl_folders_are_refused_for_now(saved_tiny, tmp_path):
    import shutil

    folder = tmp_path / "sdxl"
    shutil.copytree(saved_tiny, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["addition_embed_type"] = "text_time"
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(registry.ModelError, match="SDXL"):
        registry.resolve(str(folder))


def test_a_corrupt_weights_file_is_a_model_error(saved_tiny, tmp_path):
    import shutil

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
