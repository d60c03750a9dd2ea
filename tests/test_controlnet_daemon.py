"""ControlNets through the running daemon, as TouchDesigner drives them: control frames written into
sdb_<instance>_cn<k>, /controlnet/<k>/... over OSC, the stale policies, the view ring and telemetry."""
from __future__ import annotations

import time

import numpy as np
import pytest

from bridge import shm

from .conftest import DaemonProcess, gradient

FRAME = gradient()


def _control(width: int = 96, height: int = 96, period: float = 4.0) -> np.ndarray:
    """A control image unlike the input: rings, as a depth map or an edge image might be."""
    y, x = np.mgrid[0:height, 0:width]
    r = np.hypot(x - width / 2, y - height / 2)
    return np.repeat(((np.sin(r / period) > 0) * 255).astype(np.uint8)[:, :, None], 3, axis=2)


class _ControlWriter:
    """The client's side of a ControlNet's ring."""

    def __init__(self, daemon, k: int = 0):
        self.ring = shm.Ring.attach(shm.ring_name(daemon.instance, f"cn{k}"))
        self.frame_id = 0

    def write(self, pixels: np.ndarray) -> int:
        self.frame_id += 1
        self.ring.write(pixels, frame_id=self.frame_id)
        return self.frame_id

    def close(self) -> None:
        self.ring.close()


def _output_of(daemon, frame: np.ndarray = FRAME) -> shm.Frame:
    """The output of an input frame written now (after whatever was sent before)."""
    fid = daemon.write(frame)
    return daemon.output_after(lambda o: o.frame_id >= fid, timeout=30)


def _apply(daemon, *messages: tuple[str, object], txt2img: bool = False) -> shm.Frame:
    """Send OSC messages (one change set each) and return an output made under all of them: of FRAME
    written afterwards, or in txt2img the first output of that state."""
    since = time.monotonic()
    version = daemon.telemetry.wait_for("/sdbridge/state_version", since)[0]  # sent after `since`: current
    for address, value in messages:
        daemon.send(address, value)
    target = version + len(messages)
    if txt2img:
        return daemon.output_after(lambda o: o.state_version >= target, timeout=30)
    return daemon.settled(FRAME, target - 1, timeout=30)


@pytest.fixture(scope="module")
def shared():
    """One daemon for the tests below that need no settings of their own: a tiny ControlNet with canny
    preprocessing, whose ring counts as stale after 0.3 s (kept by the default `last` policy)."""
    daemon = DaemonProcess("--controlnet", "tiny", "--controlnet-preprocess", "canny",
                           "--control-max-age", "0.3").wait_started()
    writer = _ControlWriter(daemon)
    plain = _output_of(daemon)  # before any control frame: the output with no ControlNet steering
    yield daemon, writer, plain
    writer.close()
    daemon.stop()


@pytest.fixture
def controlled(shared):
    """The shared daemon with every parameter a test here plays set back to its default, and its
    output for FRAME before any control frame was written."""
    daemon, writer, plain = shared
    _apply(daemon, ("/steps", 1), ("/mode", "img2img"), ("/controlnet/0/scale", 1.0), ("/controlnet/0/start", 0.0),
           ("/controlnet/0/end", 1.0))
    return daemon, writer, plain


def test_a_control_frame_changes_the_output_and_scale_zero_restores_it(controlled):
    daemon, writer, plain = controlled
    writer.write(_control())
    steered = _output_of(daemon)
    assert not np.array_equal(steered.pixels, plain.pixels)
    off = _apply(daemon, ("/controlnet/0/scale", 0.0))
    np.testing.assert_array_equal(off.pixels, plain.pixels)  # no reload, and nothing of the control left
    again = _apply(daemon, ("/controlnet/0/scale", 1.0))
    np.testing.assert_array_equal(again.pixels, steered.pixels)


def test_a_new_control_frame_alone_renders_the_last_input_again(controlled):
    daemon, writer, _ = controlled
    writer.write(_control(period=4))
    first = _output_of(daemon)
    writer.write(_control(period=7))
    again = daemon.output_after(lambda o: o.seq > first.seq, timeout=30)  # no input written
    assert again.frame_id == first.frame_id and not np.array_equal(again.pixels, first.pixels)


def test_start_and_end_choose_the_steps_a_controlnet_acts_at(controlled):
    daemon, writer, _ = controlled
    writer.write(_control())
    plain = _apply(daemon, ("/steps", 2), ("/controlnet/0/scale", 0.0))
    both = _apply(daemon, ("/controlnet/0/scale", 1.0))
    first_only = _apply(daemon, ("/controlnet/0/end", 0.5))  # the first of two steps only
    none = _apply(daemon, ("/controlnet/0/start", 0.5))  # start at end: no step is left
    assert len({plain.pixels.tobytes(), both.pixels.tobytes(), first_only.pixels.tobytes()}) == 3
    np.testing.assert_array_equal(none.pixels, plain.pixels)


def test_controlnets_steer_txt2img_too(controlled):
    daemon, writer, _ = controlled
    writer.write(_control())
    plain = _apply(daemon, ("/controlnet/0/scale", 0.0), ("/mode", "txt2img"), txt2img=True)
    steered = _apply(daemon, ("/controlnet/0/scale", 1.0), txt2img=True)
    assert plain.frame_id == steered.frame_id == 0
    assert not np.array_equal(steered.pixels, plain.pixels)


def test_a_stale_control_ring_turns_the_controlnet_off_when_configured(daemon_factory):
    daemon = daemon_factory("--controlnet", "tiny", "--control-max-age", "0.5", "--control-stale", "off")
    writer = _ControlWriter(daemon)
    plain = _output_of(daemon)
    written = time.monotonic()
    writer.write(_control())  # once, and then the writer goes quiet
    steered = _output_of(daemon)
    assert not np.array_equal(steered.pixels, plain.pixels)
    assert daemon.telemetry.wait_for("/sdbridge/controlnet/0", written, predicate=lambda a: a == ["live"])
    # with no new input: the daemon renders the last one again without the control
    daemon.output_after(lambda o: np.array_equal(o.pixels, plain.pixels), timeout=30)
    assert daemon.telemetry.wait_for("/sdbridge/controlnet/0", written, predicate=lambda a: a == ["stale"])
    assert daemon.telemetry.wait_for("/sdbridge/error", written, predicate=lambda a: "not steering" in a[0])
    writer.ring.heartbeat()  # the writer is back: its last image steers again
    daemon.output_after(lambda o: np.array_equal(o.pixels, steered.pixels), timeout=30)
    writer.close()


def test_a_stale_control_ring_keeps_its_last_image_by_default(controlled):
    daemon, writer, _ = controlled
    written = time.monotonic()
    writer.write(_control())
    steered = _output_of(daemon)
    assert daemon.telemetry.wait_for("/sdbridge/controlnet/0", written + 0.5, predicate=lambda a: a == ["stale"])
    later = _output_of(daemon)
    np.testing.assert_array_equal(later.pixels, steered.pixels)


def test_the_view_ring_shows_what_the_controlnet_sees(controlled):
    daemon, writer, _ = controlled
    view = shm.Ring.attach(shm.ring_name(daemon.instance, "cn0_view"))
    fid = writer.write(_control(200, 150))
    _output_of(daemon)
    shown = view.read_latest()
    assert shown is not None and shown.frame_id == fid
    assert (shown.width, shown.height, shown.channels) == (128, 128, 4)  # the output's size and format
    edges = shown.pixels[:, :, 0]
    assert set(np.unique(edges)) == {0, 255} and 0.02 < (edges == 255).mean() < 0.5  # edges, not the rings
    view.close()


def test_parameters_of_a_controlnet_that_is_not_configured_are_refused(controlled):
    daemon, _, _ = controlled
    since = time.monotonic()
    daemon.send("/controlnet/1/scale", 0.5)
    error = daemon.telemetry.wait_for("/sdbridge/error", since)
    assert error and "no ControlNet 1" in error[0]
    daemon.send("/controlnet/0/scale", 7.0)
    error = daemon.telemetry.wait_for("/sdbridge/error", since, predicate=lambda a: "out of range" in a[0])
    assert error and "controlnet/0/scale" in error[0]


def test_an_unknown_controlnet_name_stops_serve_at_start(tmp_path):
    import subprocess

    from .conftest import ROOT, SDBRIDGE
    done = subprocess.run([*SDBRIDGE, "serve", "--model", "tiny", "--controlnet", "no_such_controlnet",
                           "--models-dir", str(tmp_path), "--osc-port", "0"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0
    assert "no_such_controlnet" in done.stderr and "Traceback" not in done.stderr
