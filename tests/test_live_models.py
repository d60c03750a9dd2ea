"""Models, LoRAs, blends and model switches played live through a running daemon, as a performer
would: an A1111-shaped models folder, real OSC packets, frames through shared memory."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engines import tiny
from tests import ldm_format
from tests.conftest import DaemonProcess, gradient
from tests.test_lora import _peft_lora, write_diffusers

FRAME = gradient()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """An A1111 install with a single-file checkpoint, a LoRA, a broken checkpoint and a pickle."""
    from diffusers import AutoencoderKL

    from engines import checkpoints

    root = tmp_path_factory.mktemp("webui")
    sd, lora = root / "models" / "Stable-diffusion", root / "models" / "Lora"
    sd.mkdir(parents=True)
    lora.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        vae = AutoencoderKL.from_config(checkpoints._vae_config("tiny")).eval()
    state = ldm_format.checkpoint("sd15", tiny.build_unet(), vae, tiny.build_text_encoder())
    ldm_format.save(sd / "tinyfile.safetensors", state, {"modelspec.architecture": "sdbridge-tiny"})
    (sd / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    ldm_format.save(sd / "old.ckpt", {"w": torch.zeros(1)})
    write_diffusers(_peft_lora(tiny.build_bundle(), seed=5), lora, "fox style.safetensors")
    return root


@pytest.fixture(scope="module")
def live(models_dir):
    d = DaemonProcess("--models-dir", str(models_dir)).wait_started()
    yield d
    d.stop()


def _version(d) -> int:
    latest = d.ring_out.read_latest()
    return latest.state_version if latest else 0


def _current(d):
    """The output of FRAME under the current state."""
    return d.settled(FRAME, _version(d) - 1)


def _changed(d, address, *args):
    """The settled output before and after one OSC message."""
    before = _current(d)
    d.send(address, *args)
    after = d.settled(FRAME, before.state_version)
    return before, after


def _error_after(d, since, text, timeout=15.0):
    return d.telemetry.wait_for("/sdbridge/error", since, timeout, predicate=lambda a: text in a[0])


def test_a_lora_weight_changes_the_output_and_zero_restores_it_exactly(live):
    before, with_lora = _changed(live, "/lora/fox style", 0.8)
    assert not np.array_equal(before.pixels, with_lora.pixels)
    live.send("/lora/fox style", 0.0)
    off = live.settled(FRAME, with_lora.state_version)
    assert np.array_equal(off.pixels, before.pixels)


def test_a_lora_tag_in_the_prompt_acts_like_the_lora_address(live):
    live.send("/prompt", "a fox")
    live.send("/lora/fox style", 0.6)
    by_address = live.settled(FRAME, _version(live))
    live.send("/lora/fox style", 0.0)
    live.send("/prompt", "a fox <lora:fox style:0.6>")
    by_tag = live.settled(FRAME, by_address.state_version + 1)
    assert np.array_equal(by_tag.pixels, by_address.pixels)
    live.send("/prompt", "a fox")


def test_a_prompt_blend_changes_the_output(live):
    live.send("/prompt", "a red fox")
    single = live.settled(FRAME, _version(live))
    live.send("/prompts", "a red fox", 0.5, "a blue whale", 0.5)
    blended = live.settled(FRAME, single.state_version)
    assert not np.array_equal(single.pixels, blended.pixels)
    live.send("/prompts", "a red fox", 1.0, "a blue whale", 0.0)
    same = live.settled(FRAME, blended.state_version)
    assert np.array_equal(same.pixels, single.pixels)


def test_a_seed_blend_changes_the_output(live):
    live.send("/seed", 5)
    single = live.settled(FRAME, _version(live))
    live.send("/seeds", 5, 0.5, 77, 0.5)
    blended = live.settled(FRAME, single.state_version)
    assert not np.array_equal(single.pixels, blended.pixels)


def test_an_unknown_lora_is_refused_and_changes_nothing(live):
    before = _version(live)
    t0 = time.monotonic()
    live.send("/lora/nope", 1.0)
    assert _error_after(live, t0, "lora 'nope' not found"), live.log()[-2000:]
    assert _version(live) == before


@pytest.mark.parametrize("name,message", [("nope", "model 'nope' not found in"), ("old", "is a pickle (.ckpt)"),
                                          ("../../etc/passwd", "refused: it has an empty, '.' or '..' folder")])
def test_a_bad_model_name_is_refused_and_the_stream_keeps_running(live, name, message):
    before = _version(live)
    t0 = time.monotonic()
    live.send("/model", name)
    error = _error_after(live, t0, message)
    assert error is not None, live.log()[-2000:]
    fid = live.write(FRAME)
    out = live.output_after(lambda o: o.frame_id >= fid)
    assert out.state_version == before and live.proc.poll() is None


def test_a_model_that_fails_to_load_keeps_the_old_one_serving(live):
    t0 = time.monotonic()
    live.send("/model", "broken")
    assert _error_after(live, t0, "failed to load, keeping 'tiny'"), live.log()[-3000:]
    assert live.telemetry.wait_for("/sdbridge/model", time.monotonic(), predicate=lambda a: a == ["tiny"])
    fid = live.write(FRAME)
    assert live.output_after(lambda o: o.frame_id >= fid) is not None


def test_model_switch_happens_in_the_background_while_the_old_model_serves(live):
    before = _current(live)
    t0 = time.monotonic()
    live.send("/model", "tinyfile")
    frames_during = 0
    end = time.monotonic() + 60
    while time.monotonic() < end:
        fid = live.write(FRAME)
        live.output_after(lambda o: o.frame_id >= fid)
        frames_during += 1
        if live.telemetry.values("/sdbridge/model", t0) and live.telemetry.values("/sdbridge/model", t0)[-1] == ["tinyfile"]:
            break
    assert live.telemetry.values("/sdbridge/model", t0)[-1] == ["tinyfile"], live.log()[-3000:]
    after = live.settled(FRAME, before.state_version)
    assert not np.array_equal(before.pixels, after.pixels)  # another model (its own VAE), another picture
    assert frames_during >= 1
    live.send("/model", "tiny")
    assert live.telemetry.wait_for("/sdbridge/model", time.monotonic(), timeout=60, predicate=lambda a: a == ["tiny"])


def test_an_unknown_style_is_refused_at_once(live):
    before = _version(live)
    t0 = time.monotonic()
    live.send("/styles", "nope")
    assert _error_after(live, t0, "style 'nope' not found")
    assert _version(live) == before


def test_going_back_to_the_serving_model_while_another_loads_keeps_it(live):
    log_before = len(live.log())
    t0 = time.monotonic()
    live.send("/model", "tinyfile")
    live.send("/model", "tiny")
    time.sleep(3)
    fid = live.write(FRAME)
    live.output_after(lambda o: o.frame_id >= fid)
    assert live.telemetry.wait_for("/sdbridge/loading", time.monotonic(), predicate=lambda a: a == [""])
    assert all(v == ["tiny"] for v in live.telemetry.values("/sdbridge/model", t0))
    assert "now serving model tinyfile" not in live.log()[log_before:]
