"""`sdbridge soak`: one bounded run through the real runner (a real daemon process flooded by real OSC
and WebSocket clients while frames stream through shared memory), and the runner's pure parts, which
must catch what they are there to catch. No timing thresholds beyond the soak's own verdict: the
figures are for the report (docs/reliability.md)."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from bridge import cli, config, osc, params, soak

from .conftest import ROOT, SDBRIDGE

# About a minute of flood: 12 samples, the first 12 s warm-up. Tiny model at 64x64 on a 2-core machine.
SOAK = ["--model", "tiny", "--width", "64", "--height", "64", "--minutes", "1", "--osc-clients", "2",
        "--ws-clients", "2", "--rate", "200", "--sample-seconds", "5", "--log-level", "warning"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """One soak, shared by the tests that read its verdict and figures."""
    out = tmp_path_factory.mktemp("soak")
    env = dict(os.environ, TMPDIR=str(out))  # the daemon's log goes with the report
    env.pop("OMP_WAIT_POLICY", None)  # the daemon as users run it (bridge/cli.py chooses PASSIVE)
    result = subprocess.run([*SDBRIDGE, "soak", *SOAK, "--json", str(out / "soak.json")], capture_output=True,
                            text=True, timeout=240, cwd=ROOT, env=env)
    assert (out / "soak.json").exists(), result.stdout + result.stderr
    return result, json.loads((out / "soak.json").read_text())


# ---------------------------------------------------------------------------- the bounded run

def test_the_soak_passes_and_says_so(run):
    result, report = run
    assert report["failures"] == [], result.stdout
    assert report["passed"] and result.returncode == 0
    assert result.stdout.rstrip().endswith("PASSED")


def test_every_client_flooded_and_every_message_was_accepted(run):
    _, report = run
    clients = {c["client"]: c for c in report["clients"]}
    assert sorted(clients) == ["osc0", "osc1", "ws0", "ws1"]
    for c in clients.values():
        assert c["sent"] >= 0.5 * report["rate"] * report["duration_s"]  # it really flooded
        if c["kind"] == "ws":
            assert c["acked"] == c["sent"] and c["refused"] == 0
    assert report["osc_lost"] == 0


def test_the_state_version_grew_by_exactly_the_change_sets_accepted(run):
    _, report = run
    clients = report["clients"]
    accepted = sum(c["acked"] for c in clients if c["kind"] == "ws") + sum(c["sent"] for c in clients
                                                                            if c["kind"] == "osc")
    assert report["final_version"] - report["baseline_version"] == report["version_growth"] == accepted


def test_no_value_was_applied_out_of_order_or_torn(run):
    _, report = run
    assert report["order_violations"] == 0, report["violations"]
    assert report["states_checked"] > 100  # the observer saw the flood, not two states


def test_the_final_state_holds_each_clients_last_value_and_reached_the_screen(run):
    _, report = run
    chosen = {c.client: c for c in soak.channels(2, 2)}
    for client in report["clients"]:
        assert report["final_values"][client["client"]] == chosen[client["client"]].values(client["sent"])
    assert report["final_on_screen_s"] is not None


def test_memory_stays_within_the_bound_after_warm_up(run):
    _, report = run
    j = report["judgement"]
    assert j["rss_start_mb"] > 0 and j["rss_max_mb"] >= j["rss_end_mb"]
    assert (j["rss_growth_mb"] <= soak.MEMORY_GROWTH_FLOOR_MB
            or j["rss_slope_mb_per_h"] <= soak.MEMORY_SLOPE_LIMIT_MB_PER_H)


def test_fps_never_collapses(run):
    _, report = run
    windows = [s["fps"] for s in report["samples"] if s["t_s"] >= report["warmup_s"]][1:]
    assert len(windows) >= 5 and min(windows) > 0
    assert min(windows) >= soak.FPS_COLLAPSE_FRACTION * float(np.median(windows))


def test_the_daemon_reported_no_errors_and_stopped_cleanly(run):
    _, report = run
    assert report["crash"] is None and report["daemon_exit_code"] == 0
    assert report["daemon_errors_reported"] == 0 and report["daemon_refused"] == 0
    assert report["daemon_frames"] >= report["output_frames"] > 0


def test_a_line_is_printed_for_every_sample(run):
    result, report = run
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == len(report["samples"]) >= 10
    assert "fps" in lines[0] and "RSS" in lines[0] and "violations 0" in lines[-1]


# ---------------------------------------------------------------------------- the command's options

def test_a_rate_near_the_daemons_limit_is_refused_before_anything_starts():
    result = subprocess.run([*SDBRIDGE, "soak", "--model", "tiny", "--rate", "1500"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "max_message_rate" in result.stderr


def test_the_soaks_daemon_gets_the_serve_flags_it_was_given():
    given = ["--model", "tiny", "--width", "96", "--no-mdns", "--osc-allow", "10.0.0.0/8", "--osc-allow", "10.1.2.3",
             "--pause", "1", "--strength", "0.25", "--prompt", "a b", "--slot-count", "4"]
    soak_args = cli.build_parser().parse_args(["soak", "--minutes", "2", "--rate", "100", *given])
    serve_args = cli.build_parser().parse_args(["serve", *cli._serve_flags(soak_args)])
    assert config.load(None, _overrides(serve_args)) == config.load(None, _overrides(soak_args))


def _overrides(args) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "config")
            and (k in config.SETTING_FIELDS or k in params.BY_NAME)}


# ---------------------------------------------------------------------------- the pure parts

OSC0, OSC1, WS0, WS1 = soak.channels(2, 2)


def _state(*pairs: tuple[soak.Channel, int]) -> dict:
    out: dict = {}
    for channel, n in pairs:
        out.update(channel.values(n))
    return out


def _checker(sent: int = 10**9) -> soak.OrderChecker:
    checker = soak.OrderChecker((OSC0, OSC1, WS1), sent=lambda client: sent)
    checker.baseline = 1
    return checker


def test_the_checker_accepts_values_that_move_forward_with_gaps_and_repeats():
    checker = _checker()
    for version, (a, b, c) in enumerate([(0, 0, 0), (3, 0, 1), (3, 7, 1), (90, 8, 200)], start=1):
        checker.observe(version, _state((OSC0, a), (OSC1, b), (WS1, c)))
    assert checker.count == 0 and checker.states == 4


def test_the_checker_catches_a_value_that_goes_back():
    checker = _checker()
    checker.observe(1, _state((OSC0, 5), (OSC1, 5), (WS1, 5)))
    checker.observe(2, _state((OSC0, 4), (OSC1, 6), (WS1, 6)))
    assert checker.count == 1 and "osc0 went back from n=5 to n=4" in checker.violations[0]


def test_the_checker_catches_a_torn_bundle():
    checker = _checker()
    torn = {**_state((OSC0, 1), (WS1, 1)), **OSC1.values(3), "delta": OSC1.values(2)["delta"]}
    checker.observe(1, torn)
    assert checker.count == 1 and "osc1's parameters torn apart" in checker.violations[0]


def test_the_checker_catches_a_value_nobody_sent():
    ahead = _checker(sent=5)
    ahead.observe(1, _state((OSC0, 6), (OSC1, 1), (WS1, 1)))
    assert ahead.count == 1 and "osc0 shows n=6, but only 5 were sent" in ahead.violations[0]
    foreign = _checker()
    foreign.observe(1, {**_state((OSC0, 1), (OSC1, 1), (WS1, 1)), "prompt": "someone else's prompt"})
    assert foreign.count == 1 and "ws1 holds a value it never sent" in foreign.violations[0]


def test_the_checker_follows_floats_across_their_wrap_and_still_sees_a_step_back():
    checker = soak.OrderChecker((OSC1,))
    checker.baseline = 1
    # one observed step is less than half a cycle: what a subsequence of a flood looks like
    third = soak.FLOAT_STEPS // 3
    steps = [soak.FLOAT_STEPS - 2, soak.FLOAT_STEPS + 3, soak.FLOAT_STEPS + third, soak.FLOAT_STEPS + 2 * third,
             2 * soak.FLOAT_STEPS + 1]
    for version, n in enumerate(steps, start=1):
        checker.observe(version, OSC1.values(n))
    assert checker.count == 0
    checker.observe(6, OSC1.values(2 * soak.FLOAT_STEPS - 5))  # six values back, across the wrap
    assert checker.count == 1 and "went back" in checker.violations[0]


def test_the_final_check_catches_a_lost_last_message():
    checker = _checker()
    final = _state((OSC0, 100), (OSC1, 99), (WS1, 100))  # osc1's 100th never arrived
    checker.finish(final, {"osc0": 100, "osc1": 100, "ws1": 100})
    assert checker.count == 1 and "osc1" in checker.violations[0] and "n=100" in checker.violations[0]


def test_states_older_than_the_baseline_are_not_judged():
    checker = _checker()
    checker.baseline = 10
    checker.observe(9, params.defaults())  # before the preamble: defaults, which no client sent
    assert checker.count == 0 and checker.states == 0


def test_every_value_reads_back_after_osc_float32_and_json():
    for channel in soak.channels(3, 3):
        for n in (0, 1, 12345, soak.FLOAT_STEPS - 1, soak.FLOAT_STEPS + 7):
            values = channel.values(n)
            params.validate(values)  # the daemon takes them
            via_json = json.loads(json.dumps(values))
            expected = n % channel.cycle if channel.cycle else n
            assert channel.positions(via_json) == [expected] * len(channel.fields)
            if channel.kind == "osc":
                received = dict((address[1:], args[0]) for address, args in osc.decode(channel.osc_packet(n)))
                assert channel.positions(received) == [expected] * len(channel.fields)


def test_more_clients_than_parameters_to_own_are_refused():
    with pytest.raises(ValueError, match="each owns"):
        soak.channels(len(soak.OSC_CHANNELS) + 1, 0)


def test_slope_is_the_least_squares_rate_per_hour():
    t = np.arange(0, 600, 5.0)
    assert soak.slope_per_hour(t, 100 + 2.0 * t / 3600) == pytest.approx(2.0)
    noise = np.random.default_rng(0).normal(0, 1, len(t))
    assert abs(soak.slope_per_hour(t, 100 + noise)) < 60  # noise of 1 MB over 10 minutes: no trend to speak of
    assert soak.slope_per_hour([5.0], [1.0]) is None


def _samples(fps: list[float], rss: list[float], step: float = 5.0) -> list[soak.Sample]:
    return [soak.Sample(t_s=step * (i + 1), rss_mb=m, frames=0, fps=f, telemetry_fps=None, frame_age_p50_ms=None,
                        frame_age_p99_ms=None, ack_p50_ms=None, ack_p99_ms=None, sent=0, acked=0, state_version=0,
                        output_version=0, stale_output_s=0.0, daemon_cpu_percent=None, load_average=None,
                        violations=0)
            for i, (f, m) in enumerate(zip(fps, rss))]


def test_judge_fails_a_window_below_half_the_median_fps_after_warm_up():
    steady = [30.0] * 10
    assert soak.judge(_samples(steady, [500.0] * 10), warmup_s=10).failures == ()
    collapsed = soak.judge(_samples(steady[:6] + [12.0] + steady[7:], [500.0] * 10), warmup_s=10)
    assert len(collapsed.failures) == 1 and "fps collapsed: 12.0 fps" in collapsed.failures[0]
    in_warm_up = soak.judge(_samples([1.0] + steady[1:], [500.0] * 10), warmup_s=10)
    assert in_warm_up.failures == ()


def test_judge_fails_a_stream_that_stopped_altogether():
    stopped = soak.judge(_samples([30.0, 30.0] + [0.0] * 8, [500.0] * 10), warmup_s=10)
    assert len(stopped.failures) == 1 and "no output frames" in stopped.failures[0]


def test_judge_fails_steady_memory_growth_but_not_a_short_runs_noise():
    t = 5.0 * np.arange(1, 61)  # five minutes
    leak = soak.judge(_samples([30.0] * 60, list(500 + 40 * t / 300)), warmup_s=10)  # +40 MB in five minutes
    assert any("memory grew" in f for f in leak.failures) and leak.rss_slope_mb_per_h > 400
    noise = soak.judge(_samples([30.0] * 12, [500, 500, 501, 503, 503, 503, 504, 504, 505, 505, 505, 506]),
                       warmup_s=10)  # 5 MB in a minute: a steep slope, far below the floor
    assert noise.failures == () and noise.rss_slope_mb_per_h > soak.MEMORY_SLOPE_LIMIT_MB_PER_H


def test_a_reservoir_keeps_a_bounded_uniform_sample():
    reservoir = soak.Reservoir(size=1000)
    reservoir.add(range(100_000))
    assert len(reservoir.values) == 1000 and reservoir.seen == 100_000
    assert 40_000 < np.median(reservoir.values) < 60_000
