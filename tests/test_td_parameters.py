"""touchdesigner/parameters.py: the component's parameters from the schema, and what it sends of them."""
from __future__ import annotations

import json
import re

from bridge import params
from touchdesigner import client, parameters

SCHEMA = {"params": [p.describe() for p in params.schema_params(["Neon-Style", "neon_style", "film grain"], 2)],
          "controlnets": ["a", "b"], "presets": ["intro", "drop"]}


def all_specs(schema=SCHEMA) -> list[parameters.ParSpec]:
    return [s for _, specs in parameters.pages(schema) for s in specs]


def test_every_schema_parameter_gets_one_validly_named_parameter():
    specs = all_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[A-Z][a-z0-9]*", n) for n in names)
    played = [s.source for s in specs if s.source]
    assert played == [p["name"] for p in SCHEMA["params"]]


def test_names_follow_the_schema_names():
    by_source = {s.source: s.name for s in all_specs()}
    assert by_source["negative_prompt"] == "Negativeprompt"
    assert by_source["guidance_scale"] == "Guidancescale"
    assert by_source["controlnet/1/scale"] == "Controlnet1scale"
    assert (by_source["lora/Neon-Style"], by_source["lora/neon_style"]) == ("Loraneonstyle", "Loraneonstyle2")


def test_parameter_kinds_ranges_and_menus_come_from_the_schema():
    spec = {s.source: s for s in all_specs()}
    assert (spec["strength"].style, spec["strength"].minimum, spec["strength"].maximum) == ("Float", 0.0, 1.0)
    assert spec["steps"].style == "Int" and spec["pause"].style == "Toggle"
    assert spec["mode"].style == "Menu" and spec["mode"].menu == ("img2img", "txt2img")
    assert spec["prompts"].json_list and spec["prompts"].default == "[]"
    assert spec["seed"].slider == (-1, 999) and spec["seed"].maximum == params.INT32_MAX
    assert spec["lora/film grain"].page == parameters.LORA and spec["controlnet/0/end"].page == parameters.CONTROLNET
    assert all(s.help for s in spec.values())


def test_model_and_vae_offer_the_folders_names_and_take_others():
    schema = {**SCHEMA, "params": [dict(p, options=["tiny", "sd15/dream"]) if p["name"] == "model" else p
                                   for p in SCHEMA["params"]]}
    model = next(s for s in all_specs(schema) if s.source == "model")
    assert model.style == "StrMenu" and model.menu == ("tiny", "sd15/dream")


def test_the_components_own_parameters_follow_and_take_the_launch_settings():
    own = {s.name: s for s in all_specs() if not s.source}
    assert own["Preset"].menu == ("intro", "drop")
    assert {"Launch", "Stop", "Savepreset", "Recallpreset", "Status", "Fps", "Error"} <= set(own)
    assert own["Status"].read_only and not own["Launch"].read_only
    pages = parameters.pages(SCHEMA, {"executable": "/venv/bin/sdbridge", "osc_port": 9200, "instance": "stage"})
    own = {s.name: s for _, specs in pages for s in specs if not s.source}
    assert (own["Executable"].default, own["Oscport"].default, own["Instance"].default) == ("/venv/bin/sdbridge", 9200, "stage")
    assert [page for page, _ in pages] == ["Prompt", "Stream", "Model", "LoRA", "ControlNet", "Presets", "Daemon", "Status"]


def values(**changed):
    """The parameters' values as a fresh component holds them, with `changed` set."""
    return {s.name: s.default for s in all_specs() if s.source} | changed


LIVE = {p["name"] for p in SCHEMA["params"] if p["live"]}


def test_a_first_look_sends_every_live_parameter_then_only_changes():
    sync = parameters.Sync(all_specs(), SCHEMA)
    first, _, errors = sync.changes(values())
    assert not errors and set(first) == LIVE
    assert first["prompts"] == [] and first["pause"] is False
    assert sync.changes(values()) == ({}, {}, [])
    changes, resets, _ = sync.changes(values(Strength=0.25, Loraneonstyle=0.5))
    assert changes == {"strength": 0.25, "lora/Neon-Style": 0.5} and resets == {}
    sync.forget()
    assert set(sync.changes(values(Strength=0.25))[0]) == LIVE


def test_model_and_size_go_out_only_when_changed_here():
    assert {"model", "vae", "width", "height"} == {p["name"] for p in SCHEMA["params"]} - LIVE
    sync = parameters.Sync(all_specs(), SCHEMA)
    sync.changes(values(Model="sd15/dream", Width=768))  # a project opened with these: the daemon keeps its own
    changes = sync.changes(values(Model="sdxl/turbo", Width=768))[0]
    assert changes == {"model": "sdxl/turbo"}
    sync.forget()  # a restarted daemon
    assert not {"model", "width"} & set(sync.changes(values(Model="sdxl/turbo", Width=768))[0])


def test_values_are_converted_to_what_the_daemon_takes():
    sync = parameters.Sync(all_specs(), SCHEMA)
    sync.changes(values())
    changes, _, _ = sync.changes(values(Seed=12.0, Pause=1, Prompts='[["a fox", 0.7], ["a city", 0.3]]'))
    assert changes == {"seed": 12, "pause": True, "prompts": [["a fox", 0.7], ["a city", 0.3]]}
    assert type(changes["seed"]) is int
    assert client.osc_arguments(changes["prompts"]) == ["a fox", 0.7, "a city", 0.3]
    assert client.osc_arguments(True) == [1]


def test_a_list_that_is_not_json_is_reported_once_and_not_sent():
    sync = parameters.Sync(all_specs(), SCHEMA)
    sync.changes(values())
    changes, _, errors = sync.changes(values(Prompts='[["a fox", 0.7'))
    assert changes == {} and len(errors) == 1 and "Prompts: not JSON" in errors[0]
    assert sync.changes(values(Prompts='[["a fox", 0.7')) == ({}, {}, [])
    assert "expected a JSON list" in sync.changes(values(Prompts='{"a": 1}'))[2][0]
    assert sync.changes(values(Prompts='[["a fox", 1]]'))[0] == {"prompts": [["a fox", 1]]}


def test_setting_prompt_alone_shows_the_blend_it_ended():
    sync = parameters.Sync(all_specs(), SCHEMA)
    sync.changes(values(Prompts='[["a", 1]]'))
    changes, resets, _ = sync.changes(values(Prompts='[["a", 1]]', Prompt="a storm"))
    assert changes == {"prompt": "a storm"} and resets == {"Prompts": "[]"}
    # the reset value counts as sent: nothing goes out for it
    assert sync.changes(values(Prompt="a storm"))[0] == {}
    both = sync.changes(values(Prompt="rain", Prompts='[["b", 1]]'))
    assert both[0] == {"prompt": "rain", "prompts": [["b", 1]]} and both[1] == {}


def test_adopting_the_daemons_state_sets_parameters_without_sending_them():
    sync = parameters.Sync(all_specs(), SCHEMA)
    sync.changes(values())
    state = {"strength": 0.8, "prompts": [["x", 1.0]], "pause": True, "lora/Neon-Style": 0.3, "unknown": 1}
    adopted = sync.adopt(state)
    assert adopted == {"Strength": 0.8, "Prompts": json.dumps([["x", 1.0]]), "Pause": True, "Loraneonstyle": 0.3}
    assert sync.changes(values(**adopted))[0] == {}




def test_the_status_line_says_what_the_daemon_does_or_why_nothing_shows():
    telemetry = client.Telemetry()
    assert parameters.status_line(telemetry, 100.0, connected=False).startswith("no daemon")
    assert "Telemetry Port" in parameters.status_line(telemetry, 100.0, connected=True)
    for name, value in {"status": "ready", "fps": 29.97, "latency_ms": 41.4, "loading": True}.items():
        telemetry.update(f"/sdbridge/{name}", [value], 100.0)
    assert parameters.status_line(telemetry, 101.0, True) == "ready (loading) · 30.0 fps · 41 ms"
    assert parameters.status_line(telemetry, 110.0, True).startswith("connected, no telemetry")
    # a daemon that just stopped: its last telemetry is fresh, but nothing writes the rings
    assert parameters.status_line(telemetry, 101.0, False).startswith("no daemon")
