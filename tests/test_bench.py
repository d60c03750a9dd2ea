"""`sdbridge bench`: run as a user runs it, and its pure helpers. No timing thresholds here: whether the
numbers are good is for the benchmark to say, not for a unit test."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bridge import bench, bench_client, shm

from .conftest import ROOT, SDBRIDGE, segment_exists, unique_instance

TINY = ["--model", "tiny", "--width", "64", "--height", "64"]


def _bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*SDBRIDGE, "bench", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def report() -> dict:
    """One JSON run with the diffusers baseline, shared by the tests that read its figures."""
    result = _bench(*TINY, "--seconds", "2", "--json", "--compare", "diffusers", "--log-level", "warning")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------- the command, end to end

def test_json_reports_end_to_end_throughput_from_the_client_process(report):
    assert report["e2e"]["outputs"] > 0 and report["e2e"]["fps"] > 0
    assert report["e2e"]["input_fps_auto"] and report["e2e"]["input_fps_achieved"] > 0


def test_latency_percentiles_are_ordered(report):
    e2e = report["e2e"]
    assert e2e["latency_samples"] > 0
    assert 0 < e2e["latency_p50_ms"] <= e2e["latency_p95_ms"] <= e2e["latency_p99_ms"] <= e2e["latency_max_ms"]


def test_the_render_loop_accounts_for_its_time_in_the_engine(report):
    e2e = report["e2e"]
    assert e2e["loop_frames"] >= e2e["outputs"] > 0  # the loop also rendered during the client's warm-up
    assert 0 < e2e["loop_engine_ms_per_frame"] and 0 < e2e["loop_busy_percent"] <= 100.5


def test_a_seed_change_over_osc_is_seen_in_an_output(report):
    control = report["control"]
    assert control["address"] == "/seed" and control["changes"] >= 1
    assert 0 < control["latency_p50_ms"] <= control["latency_max_ms"]


def test_bare_engine_flops_and_peak_are_reported_beside_the_end_to_end_figure(report):
    assert report["engine"]["ms_per_frame"] > 0 and report["engine"]["frames"] >= 10
    flops = report["flops"]
    assert flops["flops_per_frame"] > 0 and flops["peak_tflops"] > 0
    assert flops["peak_source"].startswith("measured matmul")  # a CPU: no datasheet number
    assert flops["achieved_tflops"] == pytest.approx(flops["flops_per_frame"] * report["e2e"]["fps"] / 1e12)
    assert report["bridge"]["e2e_fps_percent_of_engine"] > 0


def test_one_frame_through_a_ring_is_timed(report):
    ring = report["ring"]
    assert (ring["width"], ring["height"], ring["frame_bytes"]) == (64, 64, 64 * 64 * 4)
    assert 0 < ring["median_ms"] <= ring["p99_ms"] and ring["iterations"] >= 50


def test_memory_peak_and_run_conditions_are_recorded(report):
    assert report["memory"]["source"] == "rss" and report["memory"]["peak_rss_bytes"] > 0
    assert (report["device"], report["dtype"], report["model"], report["arch"]) == ("cpu", "float32", "tiny", "tiny")
    assert (report["width"], report["height"], report["steps"], report["mode"]) == (64, 64, 1, "img2img")
    assert report["command"].startswith("sdbridge bench --model tiny") and report["date"]
    assert report["daemon_errors"] == 0


def test_a_test_model_says_its_images_are_meaningless(report):
    assert report["test_model"] is True and "meaningless" in report["warning"]


def test_compare_diffusers_times_diffusers_own_pipeline_and_gives_a_speedup(report):
    baseline = report["diffusers"]
    assert baseline["pipeline"] == "StableDiffusionImg2ImgPipeline" and baseline["error"] is None
    assert baseline["fps"] > 0 and baseline["frames"] >= 5
    assert baseline["speedup_e2e"] == pytest.approx(report["e2e"]["fps"] / baseline["fps"])


def test_without_json_it_prints_a_markdown_table_for_people():
    """Also in stream-batch mode, whose frames still in flight from the bare-engine phase reach the
    render loop: it must serve them without a failed frame."""
    result = _bench(*TINY, "--seconds", "1", "--steps", "2", "--stream-batch", "--log-level", "warning")
    assert result.returncode == 0, result.stderr
    assert "frame failed" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("## sdbridge bench: tiny (tiny) 64x64, 2 steps, img2img, stream batch")
    assert "| daemon errors | 0 |" in lines
    assert "| measure | value |" in lines and "|---|---|" in lines
    rows = {line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ")}
    assert {"bare engine (render_pixels, on the render thread)", "end to end (client process, rings)",
            "latency source_ns to written_ns", "render loop during it",
            "bridge overhead", "memory peak", "FLOPs per frame", "device peak"} <= rows
    assert any("meaningless" in line for line in lines)


def test_an_unknown_model_exits_non_zero_with_a_message_and_no_traceback():
    result = _bench("--model", "no-such-model", "--seconds", "1")
    assert result.returncode != 0
    assert "no-such-model" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag,value", [("--seconds", "0"), ("--input-fps", "-1"), ("--peak-tflops", "x"),
                                        ("--compare", "onnx")])
def test_bad_bench_arguments_exit_2(flag, value):
    result = _bench(*TINY, flag, value, timeout=60)
    assert result.returncode == 2 and flag in result.stderr


# ---------------------------------------------------------------------------- pure helpers

def test_percentiles_interpolate_between_order_statistics():
    p = bench.percentiles(list(range(1, 101)))  # 1..100
    assert (p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms, p.count) == pytest.approx((50.5, 95.05, 99.01, 100, 100))


def test_percentiles_of_one_sample_and_of_none():
    assert bench.percentiles([7.0]) == bench.Percentiles(7.0, 7.0, 7.0, 7.0, 1)
    assert bench.percentiles([]) == bench.Percentiles(None, None, None, None, 0)


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0), ("NVIDIA GeForce RTX 4090", 165.0),
])
def test_datasheet_peaks_of_known_gpus(name, tflops):
    assert bench.datasheet_peak_tflops(name)[0] == tflops


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA A10G", "NVIDIA GeForce RTX 4090 D",
                                  "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GeForce RTX 3060", "cpu"])
def test_gpus_without_a_sure_datasheet_number_get_none_and_are_measured(name):
    assert bench.datasheet_peak_tflops(name) is None


def test_automatic_input_rate_is_four_times_the_engine_within_bounds():
    assert bench.auto_input_fps(3.0) == 30.0
    assert bench.auto_input_fps(50.0) == 200.0
    assert bench.auto_input_fps(900.0) == 2000.0


def test_the_client_patterns_all_differ_so_the_similarity_filter_never_skips():
    frames = bench_client.pattern_frames(64, 48, 8)
    assert all(f.shape == (48, 64, 4) and f.dtype == np.uint8 for f in frames)
    for a, b in zip(frames, frames[1:] + frames[:1]):
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() > 10


def test_the_client_process_does_not_import_torch():
    code = "import sys, bridge.bench_client; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_ring_transfer_times_a_frame_and_removes_its_scratch_ring():
    instance = unique_instance("rt")
    ring = bench.measure_ring_transfer(32, 32, instance, iterations=60, max_s=1.0)
    assert ring.iterations == 60 and 0 < ring.median_ms <= ring.p99_ms
    assert not segment_exists(shm.ring_name(instance, "x"))


def test_flops_are_counted_on_the_unets_own_forward_when_torch_compile_replaced_it():
    import torch

    unet = torch.nn.Linear(2, 2)
    compiled = lambda *a, **k: "compiled"  # noqa: E731  (what torch.compile installs, as an instance attribute)
    unet.forward = compiled
    with bench._uncompiled(unet):
        assert unet(torch.ones(1, 2)).shape == (1, 2)  # the class's forward runs
    assert unet.forward is compiled and unet(torch.ones(1, 2)) == "compiled"
