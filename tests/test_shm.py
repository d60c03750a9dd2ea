"""The shared-memory ring protocol (PROTOCOL.md section 1), byte for byte and across processes."""
from __future__ import annotations

import multiprocessing as mp
import struct
import time

import numpy as np
import pytest

from bridge import shm

from .conftest import unique_instance


@pytest.fixture
def ring():
    r = shm.Ring.create(shm.ring_name(unique_instance("r"), "in"), shm.slot_capacity_for(64, 48), slot_count=3)
    yield r
    r.close()
    r.unlink()


def test_segment_header_is_laid_out_as_the_protocol_says(ring):
    raw = bytes(ring._shm.buf[:64])
    assert raw[0:4] == b"SDBR"
    assert struct.unpack_from("<H", raw, 4)[0] == 1
    assert struct.unpack_from("<H", raw, 6)[0] == 64
    assert struct.unpack_from("<I", raw, 8)[0] == 3
    assert struct.unpack_from("<I", raw, 12)[0] == 64
    capacity = struct.unpack_from("<Q", raw, 16)[0]
    assert capacity == ring.slot_capacity and capacity % 64 == 0 and capacity >= 64 * 48 * 16
    assert struct.unpack_from("<Q", raw, 24)[0] == 0  # write_seq: nothing yet
    assert raw[48:64] == bytes(16)
    assert ring._shm.size >= 64 + 3 * (64 + capacity)


def test_slot_header_fields_sit_at_their_offsets(ring):
    pixels = np.arange(48 * 64 * 3, dtype=np.uint16).reshape(48, 64, 3)
    seq = ring.write(pixels, frame_id=77, flags=shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT, source_ns=5, state_version=9)
    raw = bytes(ring._shm.buf)
    assert struct.unpack_from("<Q", raw, 24)[0] == seq == 1
    slot = struct.unpack_from("<I", raw, 32)[0]
    assert slot == 1  # (latest_slot 0 + 1) % 3
    assert struct.unpack_from("<I", raw, 36)[0] > 0  # writer_pid
    assert struct.unpack_from("<Q", raw, 40)[0] > 0  # heartbeat_ns
    off = 64 + slot * (64 + ring.slot_capacity)
    seq_, w, h, c, dt, flags, fid, src, written, sv, seq_end = struct.unpack_from("<QIIHHIQQQQQ", raw, off)
    assert (seq_, w, h, c, dt, flags, fid, src, sv, seq_end) == (1, 64, 48, 3, 2, 3, 77, 5, 9, 1)
    assert written >= src
    body = np.frombuffer(raw, np.uint16, 48 * 64 * 3, off + 64).reshape(48, 64, 3)
    assert np.array_equal(body, pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float16, np.float32])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_round_trip_of_every_dtype_and_channel_count(ring, dtype, channels):
    pixels = (np.random.default_rng(0).random((48, 64, channels)) * 200).astype(dtype)
    ring.write(pixels, frame_id=3)
    frame = ring.read_latest()
    assert frame.pixels.dtype == dtype and np.array_equal(frame.pixels, pixels)
    assert (frame.width, frame.height, frame.channels, frame.frame_id) == (64, 48, channels, 3)


def test_read_latest_returns_only_the_newest_frame_and_none_when_nothing_is_new(ring):
    assert ring.read_latest() is None
    for i in range(5):
        ring.write(np.full((4, 4, 3), i, np.uint8), frame_id=i)
    frame = ring.read_latest()
    assert frame.seq == 5 and frame.frame_id == 4
    assert ring.read_latest(after_seq=5) is None


def test_a_frame_larger_than_a_slot_is_refused(ring):
    with pytest.raises(shm.RingError, match="slots hold"):
        ring.write(np.zeros((480, 640, 4), np.float32))


def test_a_slot_with_protocol_breaking_fields_is_reported(ring):
    ring.write(np.zeros((4, 4, 3), np.uint8))
    off = 64 + ring.latest_slot * (64 + ring.slot_capacity)
    struct.pack_into("<H", ring._shm.buf, off + 18, 9)  # dtype 9
    with pytest.raises(shm.RingError, match="dtype code 9"):
        ring.read_latest()


def test_a_slot_left_mid_write_is_not_read(ring):
    ring.write(np.zeros((4, 4, 3), np.uint8))
    off = 64 + ring.latest_slot * (64 + ring.slot_capacity)
    struct.pack_into("<Q", ring._shm.buf, off, 0)  # a writer that died after zeroing seq
    assert ring.read_latest() is None


@pytest.mark.parametrize("size,message", [(4096, "magic"), (16, "too small")])
def test_attach_refuses_a_segment_that_is_not_a_ring(size, message):
    name = shm.ring_name(unique_instance("j"), "in")
    junk = shm._open(name, create=True, size=size)
    try:
        with pytest.raises(shm.RingError, match=message):
            shm.Ring.attach(name)
    finally:
        junk.close()
        shm._unlink(junk)


def test_create_reuses_a_fitting_leftover_and_recreates_one_that_does_not_fit():
    name = shm.ring_name(unique_instance("l"), "out")
    first = shm.Ring.create(name, 4096)
    first.write(np.full((8, 8, 4), 9, np.uint8), frame_id=1)
    first.close()  # "crash": the segment stays
    reused = shm.Ring.create(name, 4096)
    assert reused.read_latest().frame_id == 1
    reused.close()
    bigger = shm.Ring.create(name, 8192)
    assert bigger.slot_capacity == 8192 and bigger.write_seq == 0
    bigger.close()
    bigger.unlink()


def test_instance_names_that_make_too_long_segment_names_are_refused():
    with pytest.raises(shm.RingError, match="30 characters"):
        shm.segment_names("a" * 30)


def _hammer(name: str, seconds: float) -> None:
    ring = shm.Ring.attach(name)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        size = 16 + (i % 5) * 8  # sizes change too
        ring.write(np.full((size, size, 4), i % 251, np.uint8), frame_id=i)
    ring.close()


def test_a_hammering_writer_in_another_process_never_yields_a_torn_frame():
    name = shm.ring_name(unique_instance("h"), "in")
    ring = shm.Ring.create(name, shm.slot_capacity_for(64, 64), slot_count=2)
    writer = mp.get_context("spawn").Process(target=_hammer, args=(name, 3.0))
    writer.start()
    frames = 0
    last = 0
    try:
        deadline = time.monotonic() + 30
        while writer.is_alive() and time.monotonic() < deadline:
            frame = ring.read_latest(after_seq=last)
            if frame is None:
                continue
            frames += 1
            last = frame.seq
            i = frame.frame_id
            size = 16 + (i % 5) * 8
            assert (frame.width, frame.height) == (size, size)
            assert (frame.pixels == i % 251).all(), f"torn frame {i}"
        writer.join(10)
        assert writer.exitcode == 0
        assert frames > 20
    finally:
        ring.close()
        ring.unlink()


def test_read_latest_into_a_buffer_gives_a_view_on_it_and_allocates_nothing(ring):
    buffer = np.zeros(ring.slot_capacity, np.uint8)
    for dtype, channels in ((np.uint8, 4), (np.float32, 3)):
        pixels = (np.arange(6 * 5 * channels) % 200).astype(dtype).reshape(6, 5, channels)
        ring.write(pixels)
        frame = ring.read_latest(into=buffer)
        assert np.shares_memory(frame.pixels, buffer) and frame.pixels.dtype == dtype
        np.testing.assert_array_equal(frame.pixels, pixels)
    with pytest.raises(ValueError, match="at least"):
        ring.read_latest(into=np.zeros(ring.slot_capacity - 1, np.uint8))


def test_newest_frames_takes_each_frame_once_and_follows_a_restarted_writer(ring):
    reader = shm.NewestFrames(ring)
    assert reader.take() is None
    ring.write(np.zeros((4, 4, 3), np.uint8), frame_id=1)
    ring.write(np.zeros((4, 4, 3), np.uint8), frame_id=2)
    assert reader.take().frame_id == 2 and reader.take() is None
    shm._U64.pack_into(ring._shm.buf, 24, 0)  # a new writer: write_seq starts again
    ring.write(np.zeros((4, 4, 3), np.uint8), frame_id=3)
    assert reader.take().frame_id == 3


def test_newest_frames_raises_a_bad_frame_once_and_steps_over_it(ring):
    reader = shm.NewestFrames(ring)
    ring.write(np.zeros((4, 4, 3), np.uint8))
    off = 64 + ring.latest_slot * (64 + ring.slot_capacity)
    struct.pack_into("<H", ring._shm.buf, off + 18, 9)  # dtype 9
    with pytest.raises(shm.RingError, match="dtype code 9"):
        reader.take()
    assert reader.take() is None
    ring.write(np.zeros((4, 4, 3), np.uint8), frame_id=5)
    assert reader.take().frame_id == 5


def _offered(frame_id: int) -> shm.Frame:
    now = time.monotonic_ns()
    return shm.Frame(0, 4, 4, 3, 1, 0, frame_id, now, now, 0, np.full((4, 4, 3), frame_id, np.uint8))


def test_newest_frames_takes_the_newer_of_an_offered_frame_and_the_rings(ring):
    reader = shm.NewestFrames(ring)
    ring.write(np.zeros((4, 4, 3), np.uint8), frame_id=1)
    reader.offer(_offered(2))  # offered after the ring's frame: newer
    assert reader.take().frame_id == 2 and reader.take() is None
    reader.offer(_offered(3))
    ring.write(np.zeros((4, 4, 3), np.uint8), frame_id=4)  # the ring's is newer now: the offer is dropped
    assert reader.take().frame_id == 4 and reader.take() is None
    reader.offer(_offered(5))
    assert reader.take().frame_id == 5 and reader.offered_ns > 0


def test_an_offered_frame_waits_while_the_ring_raises_a_bad_frame(ring):
    reader = shm.NewestFrames(ring)
    ring.write(np.zeros((4, 4, 3), np.uint8))
    struct.pack_into("<H", ring._shm.buf, 64 + ring.latest_slot * (64 + ring.slot_capacity) + 18, 9)
    reader.offer(_offered(6))
    with pytest.raises(shm.RingError):
        reader.take()
    assert reader.take().frame_id == 6


def test_an_offered_frame_must_be_what_its_fields_say(ring):
    reader = shm.NewestFrames(ring)
    frame = _offered(1)
    for bad in ({"width": 5}, {"channels": 2}, {"pixels": frame.pixels.astype(np.int32)}):
        with pytest.raises(ValueError, match="matching its width"):
            reader.offer(shm.Frame(**{**frame.__dict__, **bad}))


def test_frame_flags_are_the_protocols_bits():
    assert shm.frame_flags(bgr=False, bottom_left=False) == 0
    assert shm.frame_flags(bgr=True, bottom_left=True) == shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT == 3


def test_rings_never_start_pythons_resource_tracker():
    # The tracker is a helper process started from sys.executable, which inside TouchDesigner (macOS)
    # may be TouchDesigner itself; and it would remove segments this process only attached to.
    import subprocess
    import sys

    code = ("from multiprocessing import resource_tracker\n"
            "from bridge import shm\n"
            f"owner = shm.Ring.create({shm.ring_name(unique_instance('rt'), 'out')!r}, 4096)\n"
            "reader = shm.Ring.attach(owner.name)\n"
            "reader.close(); owner.close(); owner.unlink()\n"
            "print(resource_tracker._resource_tracker._pid)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None" and not done.stderr
