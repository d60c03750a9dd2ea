"""Every fault a show meets, played against real `sdbridge serve` processes, in one place.

For each: the stream keeps running or recovers (new input frames give new output frames), the error
reaches /sdbridge/error where the daemon can see it, and what the performer set before the fault is
still there (in /api/state, in the outputs' state_version, and as the same pixels for the same input).

Each fault, how it is injected here, and what the daemon does:
- A client dies mid-write: a writer process leaves a slot with seq 0 and half its pixels (or the slot
  published but write_seq never set) and exits. The daemon keeps the last whole frame, reports nothing,
  and follows the restarted client, which counts from 1 again.
- The daemon is killed (SIGKILL) and started again for its instance while a writer process keeps
  writing at 30 fps: the new daemon reuses the segments and renders the writer's new frames.
- A ring is truncated, has a wrong magic, or is empty, left under the ring's name before the daemon
  starts: clients get a RingError saying why (TouchDesigner's DaemonLink: `problem`), and the daemon
  makes the ring anew and serves.
- A model fails to load (/model to a checkpoint of garbage bytes): the old model keeps serving, the
  error is reported, and the state's model goes back.
- A LoRA file is corrupt (garbage bytes named x.safetensors, then /lora/x): reported and left out; the
  look stays.
- The output reader stops reading (a reader process stopped with SIGSTOP): the daemon never waits for
  readers, and the reader resumes at the newest frame (a WebSocket reader: tests/test_web_daemon.py).
- The device runs out of memory (the daemon's address space limited with RLIMIT_AS, then a resolution
  that cannot fit): reported, and the parameters that size a frame go back to those of the last frame
  that fitted, as a new state version. A CUDA graph that cannot fit (its static copies refused by the
  allocator): that frame shape runs eagerly, the others keep their graphs.
- A frame contains NaN and inf (float32 input frames, through stream batch): NaN is black and inf
  white before the resize and the model, so neither that frame's output nor the frames in flight after
  it are poisoned; the similarity filter still compares such frames.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from bridge import shm
from engines.backends.torch_backend import FrameGraphs
from engines.frames import frame_difference
from touchdesigner import client

from .conftest import ROOT, DaemonProcess, gradient, unique_instance, wait

FRAME = gradient()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """An A1111 models folder with a checkpoint and a LoRA that are garbage bytes."""
    root = tmp_path_factory.mktemp("faults")
    checkpoints, loras = root / "models" / "Stable-diffusion", root / "models" / "Lora"
    checkpoints.mkdir(parents=True)
    loras.mkdir(parents=True)
    garbage = bytes(range(256)) * 64
    (checkpoints / "broken.safetensors").write_bytes(garbage)
    (loras / "x.safetensors").write_bytes(garbage)
    return root


@pytest.fixture(scope="module")
def show(models_dir):
    """One daemon for the faults that leave it running, with stream batch on (it acts from 2 steps), and
    two malloc arenas, so that the address space its threads reserve does not grow with the machine's cores
    (the out-of-memory test limits it)."""
    d = DaemonProcess("--models-dir", str(models_dir), "--stream-batch", env={"MALLOC_ARENA_MAX": "2"})
    d.wait_started()
    yield d
    d.stop()


def _state_where(d, predicate) -> dict:
    """The daemon's state once `predicate(params, state_version)` holds for it."""
    def matching() -> dict | None:
        state = d.state()
        return state if predicate(state["params"], state["state_version"]) else None
    return wait(matching)


def _error(d, since: float, text: str, timeout: float = 20.0) -> list | None:
    return d.telemetry.wait_for("/sdbridge/error", since, timeout, predicate=lambda args: text in args[0])


def _good_state(d, **values) -> tuple[dict, shm.Frame]:
    """Set what the performer cares about before a fault; the state, and FRAME's output under it."""
    for name, value in values.items():
        d.send(f"/{name}", value)
    state = _state_where(d, lambda now, version: all(now[n] == v for n, v in values.items()))
    return state, d.settled(FRAME, state["state_version"] - 1)


def _still_there(d, state: dict, good: shm.Frame) -> shm.Frame:
    """Assert that the state set before the fault holds and that a new input frame renders as it did."""
    now = d.state()
    assert {n: now["params"][n] for n in ("seed", "prompt", "width", "height")} == \
        {n: state["params"][n] for n in ("seed", "prompt", "width", "height")}
    fid = d.write(FRAME)
    out = d.output_after(lambda o: fid <= o.frame_id <= d.frame_id, FRAME)  # one of the frames written here
    assert out.state_version >= state["state_version"]
    assert (out.width, out.height) == (good.width, good.height) and np.array_equal(out.pixels, good.pixels)
    return out


def _python(script: str, *args: str, **kw) -> subprocess.Popen:
    """A client process of its own, running `script` with this checkout's bridge package."""
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, **kw)


# ---------------------------------------------------------------- a client dies mid-write
_DIES_MID_WRITE = r"""
import os, struct, sys, time
import numpy as np
from bridge import shm

ring = shm.Ring.attach(sys.argv[1])
buf, stage = ring._buf, sys.argv[2]
seq, slot = ring.write_seq + 1, (ring.latest_slot + 1) % ring.slot_count
offset = shm.HEADER_SIZE + slot * (shm.SLOT_HEADER_SIZE + ring.slot_capacity)
struct.pack_into("<Q", buf, offset, 0)  # slot.seq = 0: being written
shm.SLOT_HEADER.pack_into(buf, offset, 0, 128, 128, 3, 1, 0, 999999, time.monotonic_ns(), 0, 0, 0)
pixels = np.ndarray((128, 128, 3), np.uint8, buffer=buf, offset=offset + shm.SLOT_HEADER_SIZE)
if stage == "pixels":
    pixels[:64] = 255  # half the frame, then gone
else:  # the whole slot, published and pointed at, but write_seq never set
    pixels[:] = 255
    struct.pack_into("<Q", buf, offset + 56, seq)
    struct.pack_into("<Q", buf, offset, seq)
    struct.pack_into("<I", buf, 32, slot)
os._exit(0)
"""

# A client restarted with its own count: write_seq starts again from 0, its first frame is seq 1.
_RESTARTED_CLIENT = r"""
import struct, sys
import numpy as np
from bridge import shm

ring = shm.Ring.attach(sys.argv[1])
struct.pack_into("<Q", ring._buf, 24, 0)
ring.write(np.full((128, 128, 3), 40, np.uint8), frame_id=int(sys.argv[2]))
"""


@pytest.mark.parametrize("stage", ["pixels", "published"])
def test_a_client_that_dies_mid_write_leaves_the_last_frame_serving_and_its_restart_is_followed(show, stage):
    state, good = _good_state(show, seed=11, prompt=f"a client dies ({stage})")
    last = show.write(FRAME)
    show.output_after(lambda o: o.frame_id == last)
    t0 = time.monotonic()
    assert _python(_DIES_MID_WRITE, show.name_in, stage).wait(60) == 0
    # a state change renders the last input again: the last whole frame, not the half-written one
    show.send("/seed", 11)
    again = show.output_after(lambda o: o.state_version > state["state_version"])
    assert again.frame_id == last and np.array_equal(again.pixels, good.pixels)
    time.sleep(0.5)  # telemetry goes out every 0.2 s: any complaint would be here by now
    assert show.telemetry.values("/sdbridge/error", t0) == []
    restarted_id = 900_000 + (stage == "published")
    assert _python(_RESTARTED_CLIENT, show.name_in, str(restarted_id)).wait(60) == 0
    assert show.output_after(lambda o: o.frame_id == restarted_id, timeout=20).frame_id == restarted_id
    _still_there(show, state, good)


# ---------------------------------------------------------------- the daemon is killed and restarted
# TouchDesigner's side as the component runs it (touchdesigner/client.py), writing about 30 frames a
# second until killed; a write while the ring is not there yet is skipped.
_STEADY_WRITER = r"""
import sys, time
import numpy as np
from touchdesigner import client

ring = client.InputRing(sys.argv[1], retry_s=0.05)
frame_id = 1
while True:
    if ring.write(np.full((128, 128, 3), frame_id % 256, np.uint8), frame_id=frame_id):
        frame_id += 1
    time.sleep(1 / 30)
"""


def test_a_killed_daemon_restarted_for_its_instance_serves_the_writers_new_frames(daemon_factory):
    d = daemon_factory()
    writer = _python(_STEADY_WRITER, d.name_in)
    try:
        d.output_after(lambda o: o.frame_id > 0)
        d.stop(signal.SIGKILL)
        again = daemon_factory(instance=d.instance)  # reuses the segments the killed daemon left
        written = again.ring_in.read_latest().frame_id
        out = again.output_after(lambda o: o.frame_id > written)
        later = again.output_after(lambda o: o.frame_id > out.frame_id)
        assert later.frame_id > out.frame_id > written
        assert writer.poll() is None  # the writer never noticed: its mapping of the input ring still feeds the daemon
        assert again.telemetry.wait_for("/sdbridge/status", time.monotonic(), predicate=lambda a: a == ["ready"])
    finally:
        writer.kill()
        writer.wait()


# ---------------------------------------------------------------- a ring truncated or with a wrong magic
def _truncated_ring(name: str, slot_capacity: int) -> None:
    """A ring's header claiming 3 slots of `slot_capacity` bytes in a segment of 4 KiB."""
    segment = shm._open(name, create=True, size=4096)
    shm.SEGMENT_HEADER.pack_into(segment.buf, 0, shm.MAGIC, shm.VERSION, shm.HEADER_SIZE, 3, shm.SLOT_HEADER_SIZE,
                                 slot_capacity, 0, 0, 0, 0, bytes(16))
    segment.close()


def _foreign_segment(name: str, size: int) -> None:
    """A segment of a ring's size whose magic is not SDBR."""
    segment = shm._open(name, create=True, size=size)
    segment.buf[:4] = b"JUNK"
    segment.close()


def test_a_truncated_or_foreign_ring_is_a_clear_error_for_clients_and_the_daemon_replaces_it(daemon_factory):
    instance = unique_instance("r")
    name_in, name_out = shm.segment_names(instance)
    capacity = shm.slot_capacity_for(1024, 1024)  # the daemon's default max_width x max_height
    _truncated_ring(name_in, capacity)
    _foreign_segment(name_out, shm.HEADER_SIZE + 3 * (shm.SLOT_HEADER_SIZE + capacity))
    with pytest.raises(shm.RingError, match="too small for 3 slots"):
        shm.Ring.attach(name_in)
    with pytest.raises(shm.RingError, match="magic b'JUNK'"):
        shm.Ring.attach(name_out)
    # TouchDesigner's side: no frames in or out, and a status that says why
    ports = {"osc_port": 9, "telemetry_port": 0}
    link = client.DaemonLink(client.Endpoints(instance=instance, **ports))
    link.input.retry_s = link.output.retry_s = 0.1
    try:
        assert not link.tick() and not link.input.write(FRAME) and link.output.read() is None
        assert "magic b'JUNK'" in link.problem and "too small" in link.input.problem
        d = daemon_factory(instance=instance)
        fid = d.write(FRAME)
        d.output_after(lambda o: o.frame_id == fid)
        assert wait(link.tick, timeout=10)  # the daemon's own rings now
        assert wait(lambda: link.input.write(FRAME, frame_id=77_777, flags=0), timeout=10)
        assert wait(lambda: (o := link.output.read()) is not None and o.frame_id == 77_777, timeout=20)
        assert link.problem == ""
    finally:
        link.close()
        for name in (name_in, name_out):  # had the daemon not replaced them
            shm._unlink_name(name)


@pytest.mark.skipif(os.name == "nt", reason="a named segment on Windows always has a size")
def test_an_empty_segment_is_a_clear_error_for_clients_and_is_replaced_by_the_ring_owner():
    import _posixshmem

    name = shm.ring_name(unique_instance("e"), "in")
    os.close(_posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))  # a maker that died here
    try:
        with pytest.raises(shm.RingError, match="is empty"):
            shm.Ring.attach(name)
        ring = shm.Ring.create(name, 64 * 64 * 16, writer=False)  # what the daemon does at start
        ring.close()
        ring = shm.Ring.attach(name)
        assert ring.slot_capacity == 64 * 64 * 16
        ring.close()
    finally:
        shm._unlink_name(name)


# ---------------------------------------------------------------- a model fails to load
def test_a_model_that_fails_to_load_keeps_the_old_one_serving_and_the_state_saying_so(show):
    state, good = _good_state(show, seed=21, prompt="before a broken model")
    t0 = time.monotonic()
    show.send("/model", "broken")
    assert _error(show, t0, "model 'broken' failed to load, keeping 'tiny'"), show.log()[-3000:]
    back = _state_where(show, lambda now, version: now["model"] == "tiny" and version > state["state_version"] + 1)
    assert show.telemetry.wait_for("/sdbridge/model", time.monotonic(), predicate=lambda a: a == ["tiny"])
    assert _still_there(show, state, good).state_version >= back["state_version"]


# ---------------------------------------------------------------- a LoRA file is corrupt
def test_a_corrupt_lora_file_is_reported_and_left_out_and_the_look_stays(show):
    state, good = _good_state(show, seed=31, prompt="before a corrupt LoRA")
    t0 = time.monotonic()
    show.send("/lora/x", 1.0)
    assert _error(show, t0, "LoRA x.safetensors left out"), show.log()[-3000:]
    assert _still_there(show, state, good).state_version > state["state_version"]  # rendered with the LoRA asked


# ---------------------------------------------------------------- the output reader stops reading
_READER = r"""
import sys, time
from bridge import shm

frames = shm.NewestFrames(shm.Ring.attach(sys.argv[1]))
while True:
    frame = frames.take()
    if frame is not None:
        print(frame.frame_id, flush=True)
    time.sleep(0.002)
"""


def test_an_output_reader_that_stops_reading_blocks_nothing_and_resumes_at_the_newest_frame(show):
    reader = _python(_READER, show.name_out, stdout=subprocess.PIPE, text=True)
    seen: list[int] = []
    threading.Thread(target=lambda: seen.extend(int(line) for line in reader.stdout), daemon=True).start()
    try:
        fid = show.write(FRAME)
        show.output_after(lambda o: o.frame_id >= fid)
        wait(lambda: seen, timeout=30)
        reader.send_signal(signal.SIGSTOP)  # frozen wherever it was, mid-copy perhaps
        time.sleep(0.3)  # what it printed before is read by now
        stopped_at, written = len(seen), show.ring_out.write_seq
        for shift in range(1, 6):
            fid = show.write(gradient(shift=shift))
            show.output_after(lambda o: o.frame_id == fid)  # every input still gets its output
        assert show.ring_out.write_seq >= written + 5
        reader.send_signal(signal.SIGCONT)
        wait(lambda: seen[-1] == fid, timeout=10)
        # the newest frame, not a queue of the ones missed (at most one it had taken before it stopped)
        assert len(seen) - stopped_at <= 2
    finally:
        reader.kill()
        reader.wait()


# ---------------------------------------------------------------- the device runs out of memory
HEADROOM = 512 * 2**20  # bytes of address space the daemon may still take: 128x128 frames fit, 2048x2048 ones do not


def _address_space(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


@pytest.mark.skipif(sys.platform != "linux", reason="an address-space limit (RLIMIT_AS) is enforced on Linux only")
def test_a_resolution_that_does_not_fit_in_memory_goes_back_to_the_last_one_that_did(show):
    import resource

    state, good = _good_state(show, seed=41, prompt="before memory runs out")
    unlimited = resource.prlimit(show.proc.pid, resource.RLIMIT_AS)
    limit = _address_space(show.proc.pid) + HEADROOM
    resource.prlimit(show.proc.pid, resource.RLIMIT_AS, (limit, unlimited[1]))  # the soft limit: it can be lifted
    try:
        t0 = time.monotonic()
        show.send("/resolution", 2048, 2048)  # fits the output ring (2048 x 2048 x 4 bytes), not the address space
        assert _error(show, t0, "2048x2048 does not fit in memory; back to 128x128"), show.log()[-3000:]
        back = _state_where(show, lambda now, version: (now["width"], now["height"]) == (128, 128)
                            and version > state["state_version"] + 1)
        assert _still_there(show, state, good).state_version >= back["state_version"]
        fails = len(show.telemetry.values("/sdbridge/error", t0))
        for shift in range(1, 4):  # the stream goes on: no frame fails any more
            fid = show.write(gradient(shift=shift))
            show.output_after(lambda o: o.frame_id == fid)
        assert len(show.telemetry.values("/sdbridge/error", t0)) == fails
    finally:
        resource.prlimit(show.proc.pid, resource.RLIMIT_AS, unlimited)


def test_a_frame_shape_whose_cuda_graph_does_not_fit_runs_eagerly_and_others_are_still_captured():
    graphs = FrameGraphs(lambda shape, x: x[:2] * 2, capture=False)  # no CUDA here: the static copies, no capture
    huge = torch.zeros(1).expand(2**46)  # its static copy would be 256 TiB: the allocator refuses it
    for _ in range(3):
        assert graphs("huge", huge).tolist() == [0.0, 0.0]
    assert graphs.failed == "" and len(graphs) == 0
    for _ in range(2):
        assert graphs("small", torch.ones(4)).tolist() == [2.0, 2.0]
    assert len(graphs) == 1


# ---------------------------------------------------------------- a frame contains NaN and inf
def _float_frame() -> np.ndarray:
    """A float32 frame of another size than the model's, so that it is resized on the way in."""
    return gradient(160, 160).astype(np.float32) / 255


def _poisoned(frame: np.ndarray) -> np.ndarray:
    frame = frame.copy()
    frame[40:48, 40:48] = np.nan
    frame[100:104, 20:24, 0] = np.inf
    frame[100:104, 120:124, 1] = -np.inf
    return frame


def _render_one(d, frame: np.ndarray, timeout: float = 20.0) -> tuple[int, shm.Frame]:
    """Write `frame` once and return its frame_id and the output of the render that takes it: with stream
    batch at 2 steps, the output of the frame written before it."""
    previous, written = d.frame_id, d.ring_out.write_seq
    fid = d.write(frame)
    return fid, d.output_after(lambda o: o.seq > written and o.frame_id == previous, timeout=timeout)


def _steady(d, frame: np.ndarray, version: int) -> shm.Frame:
    """Render `frame` one write at a time until two renders in a row under `version` show the frame
    written before theirs: the switch to stream batch is over, and each write makes one render."""
    in_a_row, end = 0, time.monotonic() + 60
    while in_a_row < 2:
        assert time.monotonic() < end, "the stream never settled into one render per frame"
        try:
            _, out = _render_one(d, frame, timeout=2.0)
        except TimeoutError:  # a render of the switch itself (stream batch's start, its catch-up frame)
            in_a_row = 0
            continue
        in_a_row = in_a_row + 1 if out.state_version >= version else 0
    return out


def test_nan_and_inf_pixels_poison_neither_their_frame_nor_the_frames_in_flight_after_it(show):
    clean = _float_frame()
    poisoned = _poisoned(clean)
    safe = np.nan_to_num(poisoned, nan=0.0, posinf=1.0, neginf=0.0)  # black for NaN, white for inf
    for name, value in {"seed": 51, "prompt": "NaN", "steps": 2}.items():  # stream batch acts from 2 steps
        show.send(f"/{name}", value)
    try:
        version = _state_where(show, lambda now, version: (now["seed"], now["prompt"], now["steps"]) ==
                               (51, "NaN", 2))["state_version"]
        before = _steady(show, clean, version)
        nan_id = _render_one(show, poisoned)[0]
        of_nan = _render_one(show, clean)[1]
        safe_id = _render_one(show, safe)[0]
        of_safe = _render_one(show, clean)[1]
        _render_one(show, clean)
        after = _render_one(show, clean)[1]
        assert (of_nan.frame_id, of_safe.frame_id) == (nan_id, safe_id)
        assert of_nan.pixels[:, :, :3].max() > 0  # not black all over
        assert np.array_equal(of_nan.pixels, of_safe.pixels)  # exactly as black and white pixels would be
        assert np.array_equal(after.pixels, before.pixels)  # nothing of it stayed in flight
    finally:
        show.send("/steps", 1)


def test_the_similarity_filter_compares_frames_with_nan_pixels():
    clean = torch.from_numpy(_float_frame())
    poisoned = torch.from_numpy(_poisoned(_float_frame()))
    same = frame_difference(poisoned, poisoned.clone())
    assert 0 < same < 0.01  # the same frame again: skipped by a threshold of 0.01, as a clean one would be
    assert 0 < frame_difference(clean, poisoned) < 0.01
    assert frame_difference(poisoned, torch.from_numpy(1 - _float_frame())) > 0.2  # another picture is not
