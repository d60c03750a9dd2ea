"""The daemon as a client sees it: a real process, real shared memory, real OSC packets."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from bridge import osc_codec, shm

from .conftest import ROOT, SDBRIDGE, gradient, segment_exists

FRAME = gradient()


def _version(daemon) -> int:
    latest = daemon.ring_out.read_latest()
    return latest.state_version if latest else 0


def test_outputs_follow_inputs_with_increasing_seq_and_their_frame_id(daemon):
    seen, written = [], []
    end = time.monotonic() + 30
    while len(seen) < 4 and time.monotonic() < end:
        fid = daemon.write(gradient(shift=len(seen)))
        written.append(fid)
        seen.append(daemon.output_after(lambda o: o.frame_id >= fid, timeout=20))
    assert [o.frame_id for o in seen] == written  # each output is of the frame just written
    assert all(b.seq > a.seq for a, b in zip(seen, seen[1:]))
    first = seen[0]
    assert (first.width, first.height, first.channels, first.dtype) == (128, 128, 4, 1)
    assert first.written_ns >= first.source_ns > 0
    assert (first.pixels[:, :, 3] == 255).all()


def test_output_copies_the_input_source_ns(daemon):
    fid = daemon.write(FRAME, source_ns=123456789)
    out = daemon.output_after(lambda o: o.frame_id == fid, timeout=20)
    assert out.source_ns == 123456789


def test_seed_changes_the_output_and_the_same_state_reproduces_it(daemon):
    daemon.send("/seed", 1234)
    a = daemon.settled(FRAME, _version(daemon))
    daemon.send("/seed", 99)
    b = daemon.settled(FRAME, a.state_version)
    daemon.send("/seed", 1234)
    c = daemon.settled(FRAME, b.state_version)
    assert not np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.pixels, c.pixels)


def test_prompt_changes_the_output(daemon):
    daemon.send("/prompt", "a red fox in snow")
    a = daemon.settled(FRAME, _version(daemon))
    daemon.send("/prompt", "a blue whale in space")
    b = daemon.settled(FRAME, a.state_version)
    assert not np.array_equal(a.pixels, b.pixels)


def test_a_state_change_rerenders_the_last_input_without_a_new_frame(daemon):
    fid = daemon.write(FRAME)
    out = daemon.output_after(lambda o: o.frame_id == fid)
    daemon.send("/seed", 777)
    again = daemon.output_after(lambda o: o.state_version > out.state_version)  # no frames written
    assert again.frame_id == fid and again.seq > out.seq


@pytest.mark.parametrize("dtype,scale", [(np.uint8, 255), (np.uint16, 65535), (np.float16, 1.0), (np.float32, 1.0)])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_every_input_dtype_and_channel_count_is_accepted(daemon, dtype, scale, channels):
    pixels = (gradient(96, 64)[:, :, :1].repeat(channels, 2).astype(np.float32) / 255 * scale).astype(dtype)
    fid = daemon.write(pixels, flags=shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT)
    out = daemon.output_after(lambda o: o.frame_id == fid, timeout=20)
    assert (out.width, out.height) == (128, 128)


def test_bad_osc_is_reported_counted_and_changes_nothing(daemon):
    before = _version(daemon)
    t0 = time.monotonic()
    daemon.send("/no_such_parameter", 1.0)
    daemon.send("/strength", 5.0)
    daemon.send("/seed", "not a number")
    daemon.send("/steps", 1, 2)
    daemon.osc._sock.sendto(b"\x00garbage\xff", ("127.0.0.1", daemon.osc_port))
    fid = daemon.write(FRAME)
    after = daemon.output_after(lambda o: o.frame_id >= fid)
    errors = []
    end = time.monotonic() + 5
    while len(errors) < 5 and time.monotonic() < end:
        errors = daemon.telemetry.values("/sdbridge/error", t0)
        time.sleep(0.05)
    text = " | ".join(e[0] for e in errors)
    assert len(errors) == 5, text
    assert "/no_such_parameter" in text and "out of range" in text and "unreadable OSC packet" in text
    assert after.state_version == before
    assert daemon.proc.poll() is None


def test_a_bundle_with_one_bad_message_is_refused_whole(daemon):
    from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
    from pythonosc.osc_message_builder import OscMessageBuilder

    def message(address, value):
        b = OscMessageBuilder(address)
        b.add_arg(value)
        return b.build()

    before = _version(daemon)
    bundle = OscBundleBuilder(IMMEDIATELY)
    bundle.add_content(message("/seed", 5))
    bundle.add_content(message("/strength", 7.0))
    daemon.osc.send(bundle.build())
    fid = daemon.write(FRAME)
    assert daemon.output_after(lambda o: o.frame_id >= fid).state_version == before

    bundle = OscBundleBuilder(IMMEDIATELY)
    bundle.add_content(message("/seed", 5))
    bundle.add_content(message("/strength", 0.7))
    daemon.osc.send(bundle.build())
    out = daemon.output_after(lambda o: o.state_version > before, FRAME)
    assert out.state_version == before + 1  # one bundle, one new version


def test_norm_addresses_play_ranged_parameters_as_faders(daemon):
    before = _version(daemon)
    t0 = time.monotonic()
    daemon.send("/norm/strength", 0.25)
    daemon.send("/norm/prompt", 0.5)  # not ranged: refused
    out = daemon.output_after(lambda o: o.state_version > before, FRAME)
    assert out.state_version == before + 1
    assert daemon.telemetry.wait_for("/sdbridge/error", t0, predicate=lambda a: "/norm/prompt" in a[0])


def test_telemetry_reports_fps_latency_frame_state_version_status_and_model(daemon):
    t0 = time.monotonic()
    daemon.output_after(lambda o: o.written_ns > 0, FRAME)
    for address in ("fps", "latency_ms", "frame", "state_version", "status", "model"):
        assert daemon.telemetry.wait_for(f"/sdbridge/{address}", t0), address
    assert daemon.telemetry.wait_for("/sdbridge/model", t0) == ["tiny"]
    assert daemon.telemetry.wait_for("/sdbridge/fps", t0, predicate=lambda a: a[0] > 0)
    assert daemon.telemetry.wait_for("/sdbridge/latency_ms", t0, predicate=lambda a: 0 < a[0] < 10_000)
    assert daemon.telemetry.wait_for("/sdbridge/status", t0) == ["ready"]
    # which backend serves, and why: here no CUDA, so torch (docs/tensorrt.md)
    backend, = daemon.telemetry.wait_for("/sdbridge/backend", t0)
    assert backend.startswith("torch (") and "TensorRT" in backend


def test_pause_holds_the_last_output(daemon):
    fid = daemon.write(FRAME)
    daemon.output_after(lambda o: o.frame_id == fid)
    daemon.send("/pause", 1)
    assert daemon.telemetry.wait_for("/sdbridge/status", time.monotonic(), predicate=lambda a: a == ["paused"])
    held = daemon.ring_out.write_seq
    for i in range(10):
        daemon.write(gradient(shift=i * 7))
        time.sleep(0.05)
    assert daemon.ring_out.write_seq == held
    daemon.send("/pause", 0)
    daemon.output_after(lambda o: o.seq > held, FRAME)


def test_txt2img_runs_with_no_input_frames(daemon):
    seq0 = daemon.ring_out.write_seq
    daemon.send("/mode", "txt2img")
    try:
        out = daemon.output_after(lambda o: o.seq > seq0 and o.frame_id == 0)
        assert out.written_ns >= out.source_ns > 0
    finally:
        daemon.send("/mode", "img2img")
        daemon.output_after(lambda o: o.frame_id != 0, FRAME)


@pytest.mark.skipif(shutil.which("oscsend") is None, reason="liblo-tools (oscsend) not installed")
def test_osc_from_liblo_oscsend_is_understood(daemon):
    before = _version(daemon)
    subprocess.run(["oscsend", "localhost", str(daemon.osc_port), "/seed", "i", "4242"], check=True, timeout=10)
    out = daemon.output_after(lambda o: o.state_version > before, FRAME)
    subprocess.run(["oscsend", "localhost", str(daemon.osc_port), "/prompt", "s", "liblo says hello"],
                   check=True, timeout=10)
    daemon.output_after(lambda o: o.state_version > out.state_version, FRAME)
    t0 = time.monotonic()
    subprocess.run(["oscsend", "localhost", str(daemon.osc_port), "/strength", "f", "3.5"], check=True, timeout=10)
    assert daemon.telemetry.wait_for("/sdbridge/error", t0, predicate=lambda a: "strength" in a[0])


# ---------------------------------------------------------------- lifecycle: own daemons
def test_sigterm_and_sigint_shut_down_cleanly_and_remove_the_segments(daemon_factory):
    for sig in (signal.SIGTERM, signal.SIGINT):
        d = daemon_factory()
        assert d.stop(sig) == 0
        assert not segment_exists(d.name_in) and not segment_exists(d.name_out)
        assert "removed" in d.log_path.read_text()


def test_segments_left_by_a_killed_daemon_are_reused(daemon_factory):
    d = daemon_factory()
    fid = d.write(FRAME)
    d.output_after(lambda o: o.frame_id == fid)
    d.stop(signal.SIGKILL)
    assert segment_exists(d.name_in) and segment_exists(d.name_out)
    # a client still attached keeps writing while the daemon is down
    client = shm.Ring.attach(d.name_in)
    try:
        again = daemon_factory(instance=d.instance)
        fid = 10_000
        client.write(FRAME, frame_id=fid)
        out = again.output_after(lambda o: o.frame_id == fid)
        assert out.frame_id == fid  # the old mapping still feeds the new daemon: the segment was reused
    finally:
        client.close()


def test_a_foreign_segment_with_the_daemons_name_is_recreated(daemon_factory, tmp_path):
    from .conftest import unique_instance

    instance = unique_instance("f")
    name_in, _ = shm.segment_names(instance)
    junk = shm._open(name_in, create=True, size=4096)
    junk.buf[:4] = b"JUNK"
    junk.close()
    d = daemon_factory(instance=instance)
    assert d.ring_in.slot_capacity >= 1024 * 1024 * 16
    fid = d.write(FRAME)
    d.output_after(lambda o: o.frame_id == fid)


def test_a_missing_model_folder_fails_at_start_with_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    result = subprocess.run([*SDBRIDGE, "serve", "--model", str(tmp_path), "--instance", "nomodel"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert "missing text_encoder/, tokenizer/, scheduler/, unet/config.json, vae/ or taesd/" in result.stderr
    assert not segment_exists("sdb_nomodel_in")


def test_the_similarity_filter_skips_near_identical_frames_only(daemon):
    before = _version(daemon)
    daemon.send("/similarity_threshold", 0.02)
    version = daemon.output_after(lambda o: o.state_version > before, FRAME).state_version
    try:
        time.sleep(0.5)  # let frames already written drain
        held = daemon.ring_out.write_seq
        nearly = FRAME.copy()
        nearly[0, 0] += 1  # one pixel changed by one level
        for _ in range(15):
            daemon.write(nearly)
            time.sleep(0.03)
        assert daemon.ring_out.write_seq == held
        t0 = time.monotonic()
        assert daemon.telemetry.wait_for("/sdbridge/skipped", t0, predicate=lambda a: a[0] >= 3)  # reported
        fid = daemon.write(255 - FRAME)  # a different picture
        daemon.output_after(lambda o: o.frame_id == fid, timeout=10)
    finally:
        daemon.send("/similarity_threshold", 0.0)
        daemon.output_after(lambda o: o.state_version > version, FRAME)


def test_a_second_daemon_for_a_served_instance_refuses_to_start(daemon):
    result = subprocess.run([*SDBRIDGE, "serve", "--instance", daemon.instance, "--osc-port", "0"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert f"already served by process {daemon.proc.pid}" in result.stderr
    fid = daemon.write(FRAME)
    daemon.output_after(lambda o: o.frame_id == fid)  # the first one is untouched


def test_two_instances_run_side_by_side(daemon, daemon_factory):
    other = daemon_factory()
    ids = {d.instance: d.write(FRAME) for d in (daemon, other)}
    for d in (daemon, other):
        assert d.output_after(lambda o: o.frame_id == ids[d.instance]).frame_id == ids[d.instance]
    other.send("/seed", 31337)
    before = _version(daemon)
    other.output_after(lambda o: o.state_version > 1, FRAME)
    assert _version(daemon) == before  # OSC to one instance leaves the other alone


def test_error_reports_are_all_counted_but_sent_at_a_bounded_rate():
    from bridge.config import Settings
    from bridge.daemon import ERROR_BURST, Daemon

    from .conftest import TelemetryListener, free_udp_port

    listener = TelemetryListener(free_udp_port())
    try:
        d = Daemon(Settings(telemetry_port=listener.sock.getsockname()[1]))
        t0 = time.monotonic()
        for i in range(200):
            d.report_error(f"bad message {i}")
        time.sleep(0.5)
        sent = listener.values("/sdbridge/error", t0)
        assert d.errors == 200
        assert ERROR_BURST <= len(sent) < ERROR_BURST + 15
        assert sent[0] == ["bad message 0"]
        d.telemetry.close()
    finally:
        listener.close()


def test_input_flags_are_honoured(daemon):
    """The same picture sent as RGB top-left and as BGR bottom-left gives the same output."""
    before = _version(daemon)
    daemon.send("/seed", 2024)
    daemon.output_after(lambda o: o.state_version > before, FRAME)
    fid = daemon.write(FRAME)
    plain = daemon.output_after(lambda o: o.frame_id == fid)
    fid = daemon.write(np.ascontiguousarray(FRAME[::-1, :, ::-1]), flags=shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT)
    flipped = daemon.output_after(lambda o: o.frame_id == fid)
    assert plain.state_version == flipped.state_version
    assert np.array_equal(plain.pixels, flipped.pixels)
    fid = daemon.write(np.ascontiguousarray(FRAME[::-1, :, ::-1]))  # the same bytes, no flags: another picture
    assert not np.array_equal(plain.pixels, daemon.output_after(lambda o: o.frame_id == fid).pixels)


def test_output_order_and_origin_settings_shape_the_output(daemon_factory):
    plain = daemon_factory()
    td = daemon_factory("--output-origin", "bottom-left", "--output-order", "bgr", "--output-channels", "3")
    outs = []
    for d in (plain, td):
        fid = d.write(FRAME)
        outs.append(d.output_after(lambda o: o.frame_id == fid))
    a, b = outs
    assert (a.flags, b.flags) == (0, shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT)
    assert b.channels == 3 and np.array_equal(b.pixels, a.pixels[::-1, :, 2::-1])


def test_an_absurdly_shaped_input_frame_is_refused_and_the_stream_goes_on(daemon):
    t0 = time.monotonic()
    daemon.write(np.zeros((1, 200_000, 1), np.float32))
    assert daemon.telemetry.wait_for("/sdbridge/error", t0, predicate=lambda a: "200000x1" in a[0])
    fid = daemon.write(FRAME)
    daemon.output_after(lambda o: o.frame_id == fid, timeout=10)


def test_a_client_that_restarts_its_sequence_numbers_is_followed(daemon):
    fid = daemon.write(FRAME)
    daemon.output_after(lambda o: o.frame_id == fid)
    import struct
    struct.pack_into("<Q", daemon.ring_in._buf, 24, 0)  # a new client writer starting from seq 0
    fid = daemon.write(255 - FRAME)
    assert daemon.ring_in.write_seq == 1
    daemon.output_after(lambda o: o.frame_id == fid, timeout=10)


def test_a_busy_osc_port_is_a_clear_error_and_leaves_no_segments(tmp_path):
    import socket

    from .conftest import unique_instance

    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    instance = unique_instance("p")
    try:
        result = subprocess.run([*SDBRIDGE, "serve", "--instance", instance, "--osc-port",
                                 str(holder.getsockname()[1])], capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        holder.close()
    assert result.returncode == 2
    assert "cannot listen for OSC" in result.stderr and "Traceback" not in result.stderr
    assert not any(segment_exists(n) for n in shm.segment_names(instance))


def test_a_model_that_fails_to_load_makes_serve_exit_with_an_error(tmp_path):
    import torch

    from engines import registry

    from .conftest import unique_instance

    model = registry.load("tiny", torch.device("cpu"), torch.float32)
    for part, module in (("unet", model.unet), ("text_encoder", model.text_encoder), ("tokenizer", model.tokenizer),
                         ("scheduler", model.scheduler), ("taesd", model.autoencoder.module)):
        module.save_pretrained(tmp_path / part)
    for f in (tmp_path / "unet").glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    instance = unique_instance("m")
    result = subprocess.run([*SDBRIDGE, "serve", "--model", str(tmp_path), "--instance", instance, "--osc-port", "0"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 1
    assert "failed to load" in result.stderr
    assert not any(segment_exists(n) for n in shm.segment_names(instance))


def test_a_flood_of_new_prompts_still_shows_its_changes_as_it_goes(daemon_factory):
    """A new prompt with every message, faster than prompts encode: the worker never catches up with
    the state, yet the screen follows it (each frame made by one whole state: its version), and no
    frame carries a version the state never had (0)."""
    d = daemon_factory()
    frame = gradient()
    first = d.write(frame)
    d.output_after(lambda o: o.frame_id >= first, frame)
    shown = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        end, n = time.monotonic() + 4.0, 0
        while time.monotonic() < end:
            n += 1
            bundle = osc_codec.bundle([osc_codec.message("/prompt", f"a flood of prompts, number {n}"),
                                       osc_codec.message("/seed", n)])
            sock.sendto(bundle, ("127.0.0.1", d.osc_port))
            d.write(frame)
            out = d.ring_out.read_latest()
            shown.append(out.state_version)
            time.sleep(0.004)
    assert min(shown) >= 1
    assert len(set(shown)) >= 5, f"{n} prompts sent, the screen showed versions {sorted(set(shown))}"
