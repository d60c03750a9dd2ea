"""Control images for ControlNets: the newest frame of a control ring (or of another path) made ready on
the device, the stale policies, the view ring, and the canny preprocessor. Real shared-memory rings, no
daemon; tests/test_controlnet_daemon.py drives the whole path through a running daemon."""
from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import torch

from bridge import shm
from bridge.controls import LAST, LIVE, OFF, STALE, WAITING, ControlInputs, ControlPolicy
from engines.frames import OutputFormat
from engines.preprocess import PASSTHROUGH, canny, preprocess

from .conftest import unique_instance

CPU = torch.device("cpu")


@pytest.fixture
def rings():
    made = []

    def make(count: int = 1, view: bool = False):
        instance = unique_instance("c")
        controls = [shm.Ring.create(shm.ring_name(instance, f"cn{k}"), shm.slot_capacity_for(64, 64), writer=False)
                    for k in range(count)]
        views = [shm.Ring.create(shm.ring_name(instance, f"cn{k}_view"), shm.slot_capacity_for(64, 64))
                 for k in range(count)] if view else []
        made.extend(controls + views)
        return controls, views

    yield make
    for ring in made:
        ring.close()
        ring.unlink()


@pytest.fixture
def control(rings):
    """One ControlNet on a ring of its own: (its ControlInputs, the errors they reported, the client's
    writer of the ring), made by control(**ControlInputs keywords)."""
    writers = []

    def make(**kw):
        (ring,), _ = rings()
        inputs, errors = _inputs([ring], **kw)
        writers.append(_writer(ring))
        return inputs, errors, writers[-1]

    yield make
    for writer in writers:
        writer.close()


def _writer(ring: shm.Ring) -> shm.Ring:
    """The client's side of a control ring."""
    return shm.Ring.attach(ring.name)


def _picture(value: int, height: int = 32, width: int = 48) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2] = value  # top half lit: shows whether the origin is undone
    return pixels


def _inputs(controls, preprocessors=None, **kw) -> tuple[ControlInputs, list[str]]:
    errors: list[str] = []
    inputs = ControlInputs(controls, preprocessors or [PASSTHROUGH] * len(controls), CPU,
                           report_error=errors.append, **kw)
    return inputs, errors


def test_the_newest_control_frame_is_used_at_the_frame_size_in_0_to_1(control):
    inputs, _, writer = control()
    writer.write(_picture(50))
    writer.write(_picture(200))
    assert inputs.poll()
    (image,) = inputs.images(24, 16)
    assert image.shape == (1, 3, 16, 24) and image.dtype == torch.float32
    torch.testing.assert_close(image[0, :, :6].mean(), torch.tensor(200 / 255))  # rows away from the blended middle
    assert image[0, :, 10:].max() == 0
    assert not inputs.poll()  # nothing new since


def test_a_controlnet_without_a_control_frame_does_not_steer(control):
    inputs, errors, _ = control(policy=ControlPolicy(max_age_s=0.01))
    time.sleep(0.05)
    assert not inputs.poll()
    assert inputs.images(64, 64) == [None]
    assert inputs.status() == [WAITING]
    assert errors == []  # waiting for a first frame is no error


def test_origin_and_channel_order_flags_of_a_control_frame_are_undone(control):
    inputs, _, writer = control()
    pixels = _picture(255)
    pixels[: 16, :, 1:] = 0  # top half red
    writer.write(pixels[::-1, :, ::-1].copy(), flags=shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT)  # as TD sends it
    inputs.poll()
    (image,) = inputs.images(48, 32)
    assert image[0, 0, :16].min() == 1 and image[0, 1:, :16].max() == 0 and image[0, :, 16:].max() == 0


def test_frames_offered_by_another_path_take_the_same_way_as_ring_frames(rings):
    (ring_a, ring_b), _ = rings(2)
    inputs, _ = _inputs([ring_a, ring_b])
    writer = _writer(ring_a)
    writer.write(_picture(120))
    frame = writer.read_latest()
    inputs.offer(1, frame)
    assert inputs.poll()
    from_ring, offered = inputs.images(32, 32)
    torch.testing.assert_close(from_ring, offered)
    with pytest.raises(ValueError, match="no ControlNet 2"):
        inputs.offer(2, frame)
    writer.close()


def test_a_bad_control_frame_is_refused_and_the_last_good_one_stays(control):
    inputs, errors, writer = control()
    writer.write(_picture(90))
    inputs.poll()
    good = inputs.images(32, 32)[0].clone()
    seq = writer.write(_picture(10))
    slot = writer.latest_slot
    offset = shm.HEADER_SIZE + slot * (shm.SLOT_HEADER_SIZE + writer.slot_capacity)
    struct.pack_into("<H", writer._buf, offset + 16, 2)  # channels = 2: breaks the protocol
    assert not inputs.poll()
    assert len(errors) == 1 and "control frame refused" in errors[0]
    torch.testing.assert_close(inputs.images(32, 32)[0], good)
    assert not inputs.poll()  # the bad frame is reported once
    assert writer.write(_picture(10)) == seq + 1 and inputs.poll()  # the next good one is used


def test_a_stale_ring_keeps_the_last_image_under_last(control):
    inputs, errors, writer = control(policy=ControlPolicy(max_age_s=0.1, stale=LAST))
    writer.write(_picture(90))
    inputs.poll()
    image = inputs.images(32, 32)[0]
    time.sleep(0.2)
    assert not inputs.poll()  # nothing the ControlNet sees changed
    assert inputs.status() == [STALE]
    assert inputs.images(32, 32)[0] is image
    assert len(errors) == 1 and "keeping its last control image" in errors[0]


def test_a_stale_ring_stops_steering_under_off_until_a_fresh_frame(control):
    inputs, errors, writer = control(policy=ControlPolicy(max_age_s=0.1, stale=OFF))
    writer.write(_picture(90))
    inputs.poll()
    time.sleep(0.2)
    assert inputs.poll()  # the frame must be rendered again, without control
    assert inputs.images(32, 32) == [None] and inputs.status() == [STALE]
    assert "not steering" in errors[0]
    writer.heartbeat()  # the writer is alive again, with the same image
    assert inputs.poll()
    assert inputs.images(32, 32)[0] is not None and inputs.status() == [LIVE]


def test_each_preprocessed_image_is_written_to_the_view_ring(rings):
    (ring,), (view,) = rings(view=True)
    inputs, _ = _inputs([ring], ["canny"], views=[view], view_format=OutputFormat(channels=4))
    writer = _writer(ring)
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    writer.write(square, frame_id=7)
    inputs.poll()
    (image,) = inputs.images(64, 64)
    shown = view.read_latest()
    assert (shown.width, shown.height, shown.channels, shown.frame_id) == (64, 64, 4, 7)
    np.testing.assert_array_equal(shown.pixels[:, :, 0], (image[0, 0] * 255).round().byte().numpy())
    inputs.images(64, 64)
    assert view.read_latest(after_seq=shown.seq) is None  # the same image is not written again
    inputs.images(32, 32)
    assert view.read_latest(after_seq=shown.seq).width == 32  # a new output size makes it anew
    writer.close()


def test_canny_finds_the_edges_of_a_square_and_nothing_else():
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, 16:48, 16:48] = 1.0
    edges = canny(image, 0.1, 0.2)
    assert edges.shape == (1, 3, 64, 64) and set(edges.unique().tolist()) == {0.0, 1.0}
    on = edges[0, 0].nonzero()
    assert len(on) > 4 * 28  # the square's outline
    near_border = ((on - 15.5).abs().min(1).values <= 1.5) | ((on - 47.5).abs().min(1).values <= 1.5)
    assert near_border.all()
    assert edges[0, 0, 24:40, 24:40].sum() == 0 and edges[0, 0, :8].sum() == 0


def test_canny_thresholds_are_fractions_of_a_full_black_to_white_step():
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, :, 32:] = 0.15  # a step of 15% of full scale
    assert canny(image, 0.1, 0.2).sum() == 0
    assert canny(image * (1 / 0.15), 0.9, 0.95).sum() > 0  # the full step passes the highest thresholds
    edges = canny(image, 0.05, 0.1)[0, 0]
    assert edges.sum() == 64 and (edges.nonzero()[:, 1] == 31).all()  # one line down the step


def test_passthrough_returns_the_image_and_unknown_preprocessors_are_refused():
    image = torch.rand(1, 3, 8, 8)
    assert preprocess(PASSTHROUGH, image) is image
    with pytest.raises(ValueError, match="unknown preprocessor"):
        preprocess("depth", image)


def test_a_control_image_that_fails_to_make_keeps_the_last_one_and_is_not_retried_every_frame(control, monkeypatch):
    from bridge import controls

    inputs, errors, writer = control()
    writer.write(_picture(90))
    inputs.poll()
    good = inputs.images(32, 32)[0]

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(controls, "preprocess", out_of_memory)
    writer.write(_picture(10))
    inputs.poll()
    assert inputs.images(32, 32)[0] is good and inputs.images(32, 32)[0] is good
    assert len(errors) == 1 and "keeping the last one" in errors[0] and "out of memory" in errors[0]
    assert inputs.images(48, 48) == [None]  # the last good one is of another size: no steering
    assert "not steering" in errors[1]
    monkeypatch.undo()
    writer.write(_picture(200))
    inputs.poll()
    assert inputs.images(32, 32)[0].max() == pytest.approx(200 / 255)  # the next good frame steers again


def test_offered_frames_are_checked_and_the_newer_of_an_offer_and_a_ring_frame_wins(control):
    inputs, _, writer = control()
    writer.write(_picture(50))
    older = writer.read_latest()
    inputs.offer(0, older)
    writer.write(_picture(200))
    inputs.poll()
    assert inputs.images(32, 32)[0].max() == pytest.approx(200 / 255)  # the ring's frame came last
    inputs.offer(0, older)
    inputs.poll()
    assert inputs.images(32, 32)[0].max() == pytest.approx(50 / 255)  # now the offered one did
    bad = shm.Frame(**{**older.__dict__, "width": 7})
    with pytest.raises(ValueError, match="matching its width"):
        inputs.offer(0, bad)


def test_a_writer_that_keeps_going_stale_is_reported_once_in_a_while(control):
    inputs, errors, writer = control(policy=ControlPolicy(max_age_s=0.05, stale=LAST))
    writer.write(_picture(90))
    for _ in range(3):  # a writer slower than max_age: stale, fresh, stale ...
        inputs.poll()
        time.sleep(0.1)
        inputs.poll()
        assert inputs.status() == [STALE]
        writer.heartbeat()
    assert len(errors) == 1
