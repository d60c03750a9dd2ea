"""The user's model trees: A1111 and ComfyUI layouts and plain folders, names, and names that try to
leave the folders. Small fake files are enough: listing never reads a weight."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from engines.bundle import ModelError
from engines.folders import ModelFolders, check_name


def touch(path: Path, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return path


def diffusers_model(folder: Path) -> Path:
    touch(folder / "model_index.json")
    touch(folder / "unet" / "diffusion_pytorch_model.safetensors", 100)
    return folder


@pytest.fixture
def a1111(tmp_path) -> Path:
    """An AUTOMATIC1111 install as people have it."""
    root = tmp_path / "stable-diffusion-webui"
    models = root / "models"
    touch(models / "Stable-diffusion" / "sd15" / "dreamshaper_8.safetensors", 1000)
    touch(models / "Stable-diffusion" / "sd15" / "dreamshaper_8.vae.safetensors")  # A1111's per-model VAE
    touch(models / "Stable-diffusion" / "sdxl" / "juggernaut.safetensors")
    touch(models / "Stable-diffusion" / "old.ckpt")
    touch(models / "Stable-diffusion" / "Put Stable Diffusion checkpoints here.txt")
    touch(models / "Lora" / "detail_tweaker.safetensors")
    touch(models / "LyCORIS" / "locon_style.safetensors")
    touch(models / "VAE" / "vae-ft-mse.safetensors")
    touch(models / "VAE-approx" / "model.pt")  # A1111's older approximate decoder, not TAESD
    touch(models / "VAE-approx" / "taesd_encoder.pt")
    touch(models / "VAE-approx" / "taesd_decoder.pt")
    touch(models / "ControlNet" / "control_v11p_sd15_canny.safetensors")
    touch(root / "embeddings" / "EasyNegative.safetensors")
    return root


@pytest.fixture
def comfyui(tmp_path) -> Path:
    """A ComfyUI install as people have it."""
    root = tmp_path / "ComfyUI"
    models = root / "models"
    touch(models / "checkpoints" / "sd_turbo.safetensors")
    diffusers_model(models / "diffusers" / "sdxl-turbo")
    touch(models / "loras" / "sdxl" / "pixel.safetensors")
    touch(models / "loras" / "sd15" / "pixel.safetensors")
    touch(models / "vae" / "sdxl_vae.safetensors")
    touch(models / "vae_approx" / "taesdxl_encoder.safetensors")
    touch(models / "vae_approx" / "taesdxl_decoder.safetensors")
    touch(models / "vae_approx" / "taesd_encoder.pth")
    touch(models / "vae_approx" / "taesd_decoder.pth")
    touch(models / "controlnet" / "canny.safetensors")
    touch(models / "embeddings" / "badhands.pt")
    return root


def names(folders: ModelFolders, kind: str) -> list[str]:
    return [e.name for e in folders.list(kind)]


def test_an_a1111_install_is_listed_by_kind(a1111):
    folders = ModelFolders([a1111])
    assert names(folders, "checkpoints") == ["old", "sd15/dreamshaper_8", "sdxl/juggernaut"]
    assert names(folders, "loras") == ["detail_tweaker", "locon_style"]
    assert names(folders, "vae") == ["vae-ft-mse"]
    assert names(folders, "taesd") == ["taesd"]
    assert names(folders, "controlnet") == ["control_v11p_sd15_canny"]
    assert list(folders.embeddings()) == ["EasyNegative"]


def test_an_a1111_models_folder_given_directly_finds_the_embeddings_beside_it(a1111):
    folders = ModelFolders([a1111 / "models"])
    assert names(folders, "checkpoints") == ["old", "sd15/dreamshaper_8", "sdxl/juggernaut"]
    assert folders.embeddings() == {"EasyNegative": a1111 / "embeddings" / "EasyNegative.safetensors"}


def test_a_comfyui_install_is_listed_by_kind(comfyui):
    folders = ModelFolders([comfyui])
    assert names(folders, "checkpoints") == ["sd_turbo", "sdxl-turbo"]
    assert names(folders, "loras") == ["sd15/pixel", "sdxl/pixel"]
    assert names(folders, "vae") == ["sdxl_vae"]
    assert names(folders, "taesd") == ["taesd", "taesdxl"]
    assert names(folders, "controlnet") == ["canny"]
    assert list(folders.embeddings()) == ["badhands"]


def test_entries_say_what_they_are(a1111, comfyui):
    folders = ModelFolders([a1111, comfyui])
    by_name = {e.name: e for e in folders.list("checkpoints")}
    assert by_name["old"].pickle and by_name["old"].format == "pickle"
    assert not by_name["sd15/dreamshaper_8"].pickle and by_name["sd15/dreamshaper_8"].size_bytes == 1000
    assert by_name["sd15/dreamshaper_8"].root == a1111 / "models" / "Stable-diffusion"
    assert by_name["sdxl-turbo"].format == "diffusers" and by_name["sdxl-turbo"].size_bytes == 108
    taesd = {e.name: e for e in folders.list("taesd")}
    assert taesd["taesdxl"].path.name == "taesdxl_decoder.safetensors" and not taesd["taesdxl"].pickle
    assert taesd["taesd"].pickle  # A1111's .pt pair comes first; ComfyUI's .pth pair has the same name


def test_a_plain_folder_is_a_checkpoints_folder_and_diffusers_models_are_one_entry_each(tmp_path):
    touch(tmp_path / "a.safetensors")
    touch(tmp_path / "sub" / "b.sft")
    diffusers_model(tmp_path / "sd-turbo")
    touch(tmp_path / "notes.txt")
    folders = ModelFolders([tmp_path])
    assert names(folders, "checkpoints") == ["a", "sd-turbo", "sub/b"]
    assert names(folders, "loras") == []


def test_a_folder_that_is_itself_a_diffusers_model_is_one_entry(tmp_path):
    model = diffusers_model(tmp_path / "sd-turbo")
    assert names(ModelFolders([model]), "checkpoints") == ["sd-turbo"]


def test_several_folders_together_and_a_missing_one_is_named(a1111, comfyui, tmp_path):
    folders = ModelFolders([a1111, str(comfyui)])
    assert "sd_turbo" in names(folders, "checkpoints") and "old" in names(folders, "checkpoints")
    with pytest.raises(ModelError, match=f"models folder {tmp_path / 'nope'} does not exist"):
        ModelFolders([a1111, tmp_path / "nope"])


def test_find_takes_the_full_name_the_stem_or_the_file_name(a1111):
    folders = ModelFolders([a1111])
    expected = (a1111 / "models" / "Stable-diffusion" / "sd15" / "dreamshaper_8.safetensors").resolve()
    for name in ("sd15/dreamshaper_8", "dreamshaper_8", "dreamshaper_8.safetensors", "DreamShaper_8"):
        assert folders.find("checkpoints", name) == expected


def test_an_ambiguous_stem_lists_the_candidates(comfyui):
    with pytest.raises(ModelError, match=r"lora 'pixel' is ambiguous: sd15/pixel, sdxl/pixel; give the full name"):
        ModelFolders([comfyui]).find("loras", "pixel")


def test_a_name_not_found_lists_the_folders_and_what_is_there(a1111):
    loras = a1111 / "models" / "Lora"
    with pytest.raises(ModelError, match=f"lora 'nope' not found in {loras}, .*LyCORIS; known: detail_tweaker, locon_style$"):
        ModelFolders([a1111]).find("loras", "nope")


def test_a_long_list_of_known_names_is_cut_short(tmp_path):
    for i in range(30):
        touch(tmp_path / f"m{i:02}.safetensors")
    with pytest.raises(ModelError, match=r"known: m00, m01, .*, m19 and 10 more$"):
        ModelFolders([tmp_path]).find("checkpoints", "nope")


def test_a_kind_with_no_folder_says_which_folders_to_make(tmp_path):
    touch(tmp_path / "a.safetensors")
    with pytest.raises(ModelError, match=r"no loras folder: expected models/Lora or models/LyCORIS \(A1111\) or "
                                         r"models/loras \(ComfyUI\)"):
        ModelFolders([tmp_path]).find("loras", "x")


@pytest.mark.parametrize("name", ["../a1111", "sd15/../old", "/etc/passwd", "C:/models/x", "c:x", "sd15\\dreamshaper_8",
                                  "old\x00", "~/x", "./old", "sd15//dreamshaper_8", ""])
def test_names_that_could_leave_the_folders_are_refused(a1111, name):
    with pytest.raises(ModelError, match="refused|not a name"):
        ModelFolders([a1111]).find("checkpoints", name)
    with pytest.raises(ModelError):
        check_name(name)


def test_a_link_pointing_outside_the_folders_is_neither_listed_nor_found(a1111, tmp_path):
    secret = touch(tmp_path / "outside" / "secret.safetensors")
    loras = a1111 / "models" / "Lora"
    os.symlink(secret, loras / "linked.safetensors")
    os.symlink(secret.parent, loras / "linked_folder")
    folders = ModelFolders([a1111])
    assert names(folders, "loras") == ["detail_tweaker", "locon_style"]
    for name in ("linked", "linked_folder/secret", "secret"):
        with pytest.raises(ModelError, match="not found"):
            folders.find("loras", name)


def test_a_link_swapped_to_outside_after_the_scan_is_refused(a1111, tmp_path):
    loras = a1111 / "models" / "Lora"
    os.symlink(loras / "detail_tweaker.safetensors", loras / "alias.safetensors")
    folders = ModelFolders([a1111])
    assert folders.find("loras", "alias") == (loras / "detail_tweaker.safetensors").resolve()
    (loras / "alias.safetensors").unlink()
    os.symlink(touch(tmp_path / "outside.safetensors"), loras / "alias.safetensors")
    with pytest.raises(ModelError, match="refused: it leads outside the models folders"):
        folders.find("loras", "alias")


def test_a_linked_models_folder_and_linked_kind_folders_are_the_users_own_and_work(a1111, tmp_path):
    shared = tmp_path / "shared-loras"
    touch(shared / "style.safetensors")
    (a1111 / "models" / "Lora").rename(tmp_path / "old-lora")
    os.symlink(shared, a1111 / "models" / "Lora")
    os.symlink(a1111, tmp_path / "webui-link")
    folders = ModelFolders([tmp_path / "webui-link"])
    assert folders.find("loras", "style") == (shared / "style.safetensors").resolve()


def test_a_file_dropped_in_after_a_scan_is_found(a1111):
    folders = ModelFolders([a1111])
    assert "new" not in names(folders, "loras")
    touch(a1111 / "models" / "Lora" / "new.safetensors")
    assert "new" not in names(folders, "loras")  # cached until a refresh or a miss
    folders._scanned_at.clear()  # as if the last scan were older than the rescan interval
    assert folders.find("loras", "new").name == "new.safetensors"
    touch(a1111 / "models" / "Lora" / "newer.safetensors")
    folders.refresh()
    assert "newer" in names(folders, "loras")


def test_a_safetensors_file_wins_its_name_over_a_pickle_and_the_pickle_is_reported_hidden(tmp_path):
    touch(tmp_path / "m.ckpt")
    touch(tmp_path / "m.safetensors")
    folders = ModelFolders([tmp_path])
    assert [(e.name, e.pickle) for e in folders.list("checkpoints")] == [("m", False)]
    assert [e.path.name for e in folders.hidden("checkpoints")] == ["m.ckpt"]
