"""Settings, config files and command-line flags, and `sdbridge models`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bridge import cli, config, params

from .conftest import ROOT, SDBRIDGE


def test_configs_default_toml_is_the_generated_one():
    text = (ROOT / "configs" / "default.toml").read_text()
    assert text == config.render_default_toml(), "regenerate: python -m bridge.config > configs/default.toml"


def test_configs_default_toml_loads_to_the_defaults():
    settings, initial = config.load(ROOT / "configs" / "default.toml")
    assert settings == config.Settings()
    # a parameter that is also a setting (`model`) is given through the setting
    assert initial == {k: v for k, v in params.defaults().items() if k not in config.SETTING_FIELDS}


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "show.toml"
    path.write_text('osc_port = 9200\nprompt = "from the file"\nseed = 5\n')
    args = cli.build_parser().parse_args(["serve", "--config", str(path), "--seed", "6", "--output-origin", "bottom-left"])
    settings, initial = cli._settings_from(args)
    assert settings.osc_port == 9200 and settings.output_origin == "bottom-left"
    assert initial == {"prompt": "from the file", "seed": 6}


@pytest.mark.parametrize("text,message", [
    ("nonsense = 1", "unknown setting 'nonsense'"),
    ('osc_port = "x"', "expected int"),
    ("strength = 4.0", "out of range"),
    ("output_channels = 2", "1, 3 or 4"),
    ('output_dtype = "int8"', "expected one of"),
    ("osc_port = [", "config file"),
    ("telemetry_interval = 0", "above 0"),
    ('models_dir = "D:/models"', "expected a list of strings"),
    ("allow_pickle = 1", "expected bool"),
    ("[lora]\ndetail = 9.0", "lora/detail: 9.0 is out of range"),
    ("[nonsense]\nx = 1", "unknown setting 'nonsense/x'"),
])
def test_bad_config_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)


def test_the_protocol_flags_exist():
    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--instance", "x", "--osc-port", "1",
                                          "--telemetry-port", "2", "--http-port", "3", "--oscquery-port", "4",
                                          "--config", "c.toml"])
    assert (args.model, args.instance, args.osc_port, args.telemetry_port, args.http_port, args.oscquery_port,
            args.config) == ("tiny", "x", 1, 2, 3, 4, "c.toml")


def test_a_bad_flag_value_exits_2_with_a_message():
    result = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--strength", "2"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "strength: 2.0 is out of range" in result.stderr


def test_models_dir_repeats_and_expands_home(monkeypatch):
    monkeypatch.setenv("HOME", "/home/vj")
    args = cli.build_parser().parse_args(["serve", "--models-dir", "~/ComfyUI", "--models-dir", "/srv/webui"])
    settings, _ = cli._settings_from(args)
    assert settings.models_dir == ("/home/vj/ComfyUI", "/srv/webui")


def test_models_dir_in_a_config_file_is_a_list(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/vj")
    path = tmp_path / "show.toml"
    path.write_text('models_dir = ["D:/stable-diffusion-webui", "~/ComfyUI"]\n')
    settings, _ = config.load(path)
    assert settings.models_dir == ("D:/stable-diffusion-webui", "/home/vj/ComfyUI")
    args = cli.build_parser().parse_args(["serve", "--config", str(path), "--models-dir", "/x"])
    assert cli._settings_from(args)[0].models_dir == ("/x",)  # the flag replaces the file's list


def test_switch_settings_are_flags_and_can_be_turned_back_off(tmp_path):
    parse = cli.build_parser().parse_args
    assert config.Settings().allow_pickle is False and config.Settings().stream_batch is False
    settings, _ = cli._settings_from(parse(["serve", "--allow-pickle", "--stream-batch"]))
    assert settings.allow_pickle and settings.stream_batch
    path = tmp_path / "show.toml"
    path.write_text("allow_pickle = true\nstream_batch = true\n")
    settings, _ = cli._settings_from(parse(["serve", "--config", str(path), "--no-allow-pickle"]))
    assert not settings.allow_pickle and settings.stream_batch


def test_a_lora_table_in_the_config_gives_initial_lora_weights(tmp_path):
    path = tmp_path / "show.toml"
    path.write_text('seed = 4\n\n[lora]\ndetail_tweaker = 0.6\n"sd15/pixel" = -1\n')
    _, initial = config.load(path)
    assert initial == {"seed": 4, "lora/detail_tweaker": 0.6, "lora/sd15/pixel": -1.0}


def test_list_parameters_are_set_in_the_config_file_not_by_flags(tmp_path):
    listed = [p.name for p in params.PARAMS if p.kind is tuple]
    if not listed:
        pytest.skip("no list parameters in bridge/params.py yet")
    flags = cli.build_parser()._subparsers._group_actions[0].choices["serve"]._option_string_actions
    assert not [name for name in listed if cli._flag(name) in flags]
    path = tmp_path / "show.toml"
    path.write_text('prompts = [["a forest", 1.0], ["a city", 0.5]]\n')
    assert config.load(path)[1] == {"prompts": (("a forest", 1.0), ("a city", 0.5))}


# ---------------------------------------------------------------- sdbridge models

def _touch(path: Path, data: bytes = b"\0" * 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _models(capsys, *args: str) -> tuple[int, str, str]:
    """`sdbridge models ARGS` in this process (the JSON test runs the real command)."""
    code = cli.main(["models", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def model_trees(tmp_path):
    """An A1111 install with a real (tiny) checkpoint, a pickle and a LoRA; a ComfyUI one with a
    diffusers folder and TAESD weights."""
    pytest.importorskip("engines.checkpoints", reason="engines.checkpoints (architecture detection) is not here yet")
    from .test_registry import save_tiny_checkpoint

    webui = tmp_path / "webui"
    save_tiny_checkpoint(webui / "models" / "Stable-diffusion" / "sd15" / "toy.safetensors")
    _touch(webui / "models" / "Stable-diffusion" / "old.ckpt")
    _touch(webui / "models" / "Stable-diffusion" / "broken.safetensors", b"not a safetensors file")
    _touch(webui / "models" / "Lora" / "detail.safetensors")
    comfy = tmp_path / "ComfyUI"
    unet = comfy / "models" / "diffusers" / "toy-xl" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}))
    _touch(comfy / "models" / "vae_approx" / "taesd_encoder.safetensors")
    _touch(comfy / "models" / "vae_approx" / "taesd_decoder.safetensors")
    return webui, comfy


def test_models_json_lists_every_kind_with_architectures(model_trees):
    webui, comfy = model_trees
    result = subprocess.run([*SDBRIDGE, "models", "--models-dir", str(webui), "--models-dir", str(comfy), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert [(f["path"], f["layout"]) for f in listing["folders"]] == [(str(webui), "a1111"), (str(comfy), "comfyui")]
    checkpoints = {row["name"]: row for row in listing["kinds"]["checkpoints"]}
    assert sorted(checkpoints) == ["broken", "old", "sd15/toy", "toy-xl"]
    assert checkpoints["sd15/toy"]["arch"] == "tiny" and checkpoints["sd15/toy"]["format"] == "safetensors"
    assert checkpoints["toy-xl"]["arch"] == "sdxl" and checkpoints["toy-xl"]["format"] == "diffusers"
    assert checkpoints["old"]["pickle"] and checkpoints["old"]["arch"] == "?" and not checkpoints["old"]["loadable"]
    assert checkpoints["broken"]["arch"] == "?" and "broken.safetensors" in checkpoints["broken"]["arch_reason"]
    assert checkpoints["sd15/toy"]["folder"] == str(webui / "models" / "Stable-diffusion")
    assert [r["name"] for r in listing["kinds"]["loras"]] == ["detail"]
    assert [r["name"] for r in listing["kinds"]["taesd"]] == ["taesd"]
    assert listing["kinds"]["embeddings"] == [] and listing["kinds"]["controlnet"] == []


def test_models_table_groups_by_kind_and_marks_pickles(model_trees, capsys):
    webui, comfy = model_trees
    code, out, _ = _models(capsys, "--models-dir", str(webui), "--models-dir", str(comfy))
    assert code == 0
    assert "checkpoints (4)" in out and "loras (1)" in out and "taesd (1)" in out
    assert any(line.split()[:3] == ["old", "?", "pickle"] and "needs --allow-pickle" in line for line in out.splitlines())
    assert any(line.split()[:2] == ["sd15/toy", "tiny"] and line.endswith(str(webui / "models" / "Stable-diffusion"))
               for line in out.splitlines())
    assert "pickle (allowed)" in _models(capsys, "--models-dir", str(webui), "--allow-pickle")[1]


def test_models_takes_the_folders_from_the_config_file(tmp_path, capsys):
    _touch(tmp_path / "plain" / "a.safetensors")
    path = tmp_path / "show.toml"
    path.write_text(f"models_dir = [{json.dumps(str(tmp_path / 'plain'))}]\n")
    listing = json.loads(_models(capsys, "--config", str(path), "--json")[1])
    assert [r["name"] for r in listing["kinds"]["checkpoints"]] == ["a"]


def test_models_without_folders_says_how_to_give_them(capsys):
    code, out, _ = _models(capsys)
    assert code == 0 and "--models-dir DIR" in out


def test_models_with_a_missing_folder_exits_2_naming_it(tmp_path, capsys):
    code, _, err = _models(capsys, "--models-dir", str(tmp_path / "nope"))
    assert code == 2
    assert err.strip() == (f"sdbridge: models folder {tmp_path / 'nope'} does not exist; give an A1111 "
                           "or ComfyUI install (or its models/ folder) or a folder of checkpoints")


def test_controlnets_come_from_a_repeated_flag_with_a_preprocessor_each():
    args = cli.build_parser().parse_args(["serve", "--controlnet", "tiny", "--controlnet", "depth",
                                          "--controlnet-preprocess", "canny"])
    settings, _ = cli._settings_from(args)
    assert settings.controlnets == ("tiny", "depth")
    assert [settings.preprocess(k) for k in range(2)] == ["canny", "passthrough"]
    for bad, message in (({"controlnet_preprocess": ["canny"]}, "one entry per ControlNet"),
                         ({"controlnets": ["a"], "controlnet_preprocess": ["depth"]}, "expected one of"),
                         ({"canny_low": 0.5, "canny_high": 0.2}, "canny_low"),
                         ({"control_stale": "freeze"}, "expected one of")):
        with pytest.raises(config.ConfigError, match=message):
            config.Settings(**{key: tuple(v) if isinstance(v, list) else v for key, v in bad.items()})


def test_a_controlnet_table_in_the_config_gives_initial_scales_and_survives_a_round_trip(tmp_path):
    path = tmp_path / "show.toml"
    path.write_text('controlnets = ["tiny"]\n\n[controlnet.0]\nscale = 0.8\nend = 0.75\n')
    settings, initial = config.load(path)
    assert settings.controlnets == ("tiny",)
    assert initial == {"controlnet/0/scale": 0.8, "controlnet/0/end": 0.75}
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml(settings, initial))
    assert config.load(again) == (settings, initial)
