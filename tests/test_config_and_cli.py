"""Settings, config files and command-line flags."""
from __future__ import annotations

import subprocess
import sys

import pytest

from bridge import cli, config

from .conftest import ROOT


def test_configs_default_toml_is_the_generated_one():
    text = (ROOT / "configs" / "default.toml").read_text()
    assert text == config.render_default_toml(), "regenerate: python -m bridge.config > configs/default.toml"


def test_configs_default_toml_loads_to_the_defaults():
    settings, initial = config.load(ROOT / "configs" / "default.toml")
    assert settings == config.Settings()
    from bridge import params
    assert initial == params.defaults()


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
