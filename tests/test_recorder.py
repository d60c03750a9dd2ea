"""Recording and snapshots: the output stream to a video file that decodes back frame for frame at its
real times, frames dropped from the recording (never from the show) and counted, and snapshot PNGs
whose metadata AUTOMATIC1111 reads and sdbridge turns back into the exact settings."""
from __future__ import annotations

import json
import re
import threading

import av
import numpy as np
import pytest
import torch
from PIL import Image

from bridge import shm
from bridge.loop import Output
from bridge.recorder import Recorder, RecordError, read_snapshot
from engines.frames import OutputFormat, client_pixels
from engines.stream import StreamSettings

from .conftest import unique_instance

SETTINGS = StreamSettings(prompt="a forest, at night", negative_prompt="blurry", seed=1234, steps=2, strength=0.6,
                          guidance_scale=1.5, width=64, height=64, loras=(("film grain", 0.7),))
RGBA = OutputFormat()
FRAME_MS = 40


class Clock:
    """Monotonic nanoseconds that the test moves."""

    def __init__(self):
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, ms: int) -> None:
        self.ns += ms * 1_000_000


@pytest.fixture
def ring():
    ring = shm.Ring.create(shm.ring_name(unique_instance("rec"), "out"), shm.slot_capacity_for(64, 64), slot_count=3)
    yield ring
    ring.close()
    ring.unlink()


@pytest.fixture
def errors():
    return []


@pytest.fixture
def clock():
    return Clock()


def make_recorder(tmp_path, ring, errors, clock, **kwargs) -> Recorder:
    return Recorder(tmp_path / "recordings", latest_frame=lambda: ring.read_latest(), report_error=errors.append,
                    clock=clock, **kwargs)


@pytest.fixture
def recorder(tmp_path, ring, errors, clock):
    recorder = make_recorder(tmp_path, ring, errors, clock)
    yield recorder
    recorder.close()


def solid(level: int, width: int = 64, height: int = 64) -> np.ndarray:
    """An RGBA frame of one colour that says its number: red `level`, green 255 - level."""
    pixels = np.full((height, width, 4), 255, np.uint8)
    pixels[:, :, 0], pixels[:, :, 1], pixels[:, :, 2] = level, 255 - level, 40
    return pixels


def show(recorder: Recorder, ring: shm.Ring, pixels: np.ndarray, fmt: OutputFormat = RGBA, frame_id: int = 1,
         version: int = 1, settings: StreamSettings = SETTINGS) -> None:
    """What the render loop does with an output: write it to the ring, then tell the recorder."""
    ring.write(pixels, frame_id=frame_id, state_version=version,
               flags=shm.frame_flags(bgr=fmt.bgr, bottom_left=fmt.bottom_left))
    recorder.offer(Output(pixels, frame_id, version, settings, "tiny", fmt, "taesd"))


def decode(path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as container:
        return [(float(frame.time), frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


def test_a_recording_of_n_frames_decodes_back_to_n_frames_at_their_real_times(tmp_path, ring, errors, clock):
    recorder = make_recorder(tmp_path, ring, errors, clock, queue_frames=12)  # room for all: none dropped
    path = recorder.start("take one")
    assert path == recorder.folder / "take one.mp4"
    times = []
    for i in range(12):
        clock.advance(400 if i == 6 else FRAME_MS)  # a gap: the stream stalled for 400 ms
        times.append(clock.ns)
        show(recorder, ring, solid(i * 20), frame_id=i)
    recording = recorder.stop()
    assert (recording.path, recording.frames, recording.dropped, recording.error) == (path, 12, 0, "")
    frames = decode(path)
    assert len(frames) == 12
    for i, (t, image) in enumerate(frames):
        assert image.shape == (64, 64, 3)
        assert t == pytest.approx((times[i] - times[0]) / 1e9, abs=0.002)  # the gap stays a gap
        assert np.abs(image.astype(int).mean((0, 1)) - (i * 20, 255 - i * 20, 40)).max() < 6


def test_a_slow_writer_drops_frames_from_the_recording_and_counts_them(tmp_path, ring, errors, clock):
    held = threading.Event()
    recorder = make_recorder(tmp_path, ring, errors, clock, queue_frames=2, before_encode=lambda: held.wait(20))
    recorder.start()
    for i in range(30):  # the writer is held: were offer to wait for it, this loop would never end
        clock.advance(FRAME_MS)
        show(recorder, ring, solid(i), frame_id=i)
    status = recorder.status()
    assert status.recording and status.dropped == 28  # only the two buffers' frames were taken
    held.set()
    recording = recorder.stop()
    assert (recording.frames, recording.dropped) == (2, 28)
    assert recording.frames + recording.dropped == 30
    assert len(decode(recording.path)) == 2


def test_a_writer_that_fails_ends_the_recording_and_reports_it_without_touching_the_show(
        tmp_path, ring, errors, clock):
    encoded = []

    def disk_fills_up():
        if len(encoded) == 3:
            raise OSError(28, "No space left on device")
        encoded.append(1)

    recorder = make_recorder(tmp_path, ring, errors, clock, queue_frames=1, before_encode=disk_fills_up)
    recorder.start("full")
    offered = 0
    while not errors and offered < 10_000:  # the show goes on, whatever the writer does
        clock.advance(FRAME_MS)
        show(recorder, ring, solid(offered % 256))
        offered += 1
    assert errors and "No space left on device" in errors[0] and "disk full" in errors[0]
    show(recorder, ring, solid(0))  # a frame after the failure is simply not recorded
    offered += 1
    assert not recorder.status().recording
    recording = recorder.stop()  # the performer's stop gets the ended recording, with why
    assert recording.frames == 3 and "No space left" in recording.error
    assert recording.frames + recording.dropped <= offered  # a frame after the end is not counted: never offered to it
    with pytest.raises(RecordError, match="not recording"):
        recorder.stop()


def test_a_take_that_fails_before_its_first_frame_leaves_no_file(tmp_path, ring, errors, clock):
    def broken():
        raise OSError(5, "Input/output error")
    recorder = make_recorder(tmp_path, ring, errors, clock, before_encode=broken)
    path = recorder.start("broken")
    show(recorder, ring, solid(10))
    recording = recorder.stop()
    assert recording.frames == 0 and "Input/output error" in recording.error
    assert not path.exists()


def test_the_buffers_are_made_at_the_start_for_the_frame_on_show_and_let_go_after_the_end(recorder, ring, clock):
    show(recorder, ring, solid(10))  # on show before the start: the take's buffers are made for its size
    recorder.start("sized")
    take = recorder._take
    assert take.shape == (64, 64, 4) and take._free.qsize() == 4  # before the render thread offers a frame
    for level in (20, 30):
        clock.advance(FRAME_MS)
        show(recorder, ring, solid(level))
    assert recorder.stop().frames == 2
    assert take._free.empty()  # the ended take is kept for its counts, not its frames


def test_a_take_started_before_a_size_change_records_the_new_size(recorder, ring, clock):
    show(recorder, ring, solid(10))
    recorder.start("resized")
    for _ in range(2):
        clock.advance(FRAME_MS)
        show(recorder, ring, solid(20, 32, 48))
    recording = recorder.stop()
    assert (recording.frames, recording.dropped) == (2, 0)
    assert decode(recording.path)[0][1].shape == (48, 32, 3)


def test_snapshots_taken_while_frames_arrive_never_fail(recorder, ring):
    show(recorder, ring, solid(10), frame_id=1)
    stop = threading.Event()

    def render():
        frame_id = 2
        while not stop.is_set():
            show(recorder, ring, solid(10), frame_id=frame_id)  # the deque of shown frames turns over
            frame_id += 1
    thread = threading.Thread(target=render)
    thread.start()
    try:
        for _ in range(200):
            recorder._frame_on_show()  # the lookup a snapshot makes; it raised when the deque moved under it
    finally:
        stop.set()
        thread.join()


def test_after_close_nothing_new_starts(recorder, ring):
    show(recorder, ring, solid(10))
    recorder.close()
    with pytest.raises(RecordError, match="shutting down"):
        recorder.start("late")
    with pytest.raises(RecordError, match="shutting down"):
        recorder.snapshot("late")
    assert not any(recorder.folder.glob("late*"))


def test_stop_without_start_is_refused(recorder):
    with pytest.raises(RecordError, match="not recording"):
        recorder.stop()


def test_start_while_recording_is_refused(recorder):
    recorder.start("a")
    with pytest.raises(RecordError, match="already recording"):
        recorder.start("b")


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "sub/escape", ".hidden", "", "x" * 65, 7,
                                  "CON", "nul.mp4", "com1.png", "Aux"])  # Windows devices
def test_names_that_could_leave_the_folder_are_refused(recorder, name):
    with pytest.raises(RecordError, match="name"):
        recorder.start(name)
    with pytest.raises(RecordError, match="name"):
        recorder.snapshot(name)
    assert not recorder.status().recording


def test_an_existing_file_or_link_is_never_overwritten(recorder, tmp_path, ring):
    recorder.folder.mkdir(parents=True)
    (recorder.folder / "kept.mp4").write_bytes(b"a take from last night")
    (recorder.folder / "link.png").symlink_to(tmp_path / "outside.png")
    show(recorder, ring, solid(10))
    with pytest.raises(RecordError, match="exists"):
        recorder.start("kept")
    with pytest.raises(RecordError, match="exists"):
        recorder.snapshot("link")
    assert (recorder.folder / "kept.mp4").read_bytes() == b"a take from last night"
    assert not (tmp_path / "outside.png").exists()


def test_default_names_are_timestamped_and_do_not_collide(recorder, ring):
    show(recorder, ring, solid(10))
    first, second = recorder.snapshot(), recorder.snapshot()
    assert re.fullmatch(r"sdbridge-\d{4}-\d\d-\d\d-\d{6}(-\d+)?\.png", first.name)
    assert first != second and first.parent == second.parent == recorder.folder


def test_frames_of_another_size_are_left_out_of_the_recording_and_counted(recorder, ring, errors, clock):
    recorder.start()
    for pixels in (solid(10), solid(20), solid(30, 32, 32), solid(40)):
        clock.advance(FRAME_MS)
        recorder.offer(Output(pixels, 1, 1, SETTINGS, "tiny", RGBA))
    recording = recorder.stop()
    assert (recording.frames, recording.dropped) == (3, 1)
    assert "32x32" in errors[0] and "/record/start" in errors[0]


def test_an_odd_size_is_padded_to_even_for_the_video(recorder, ring, clock):
    recorder.start()
    for i in range(3):
        clock.advance(FRAME_MS)
        recorder.offer(Output(solid(100, 63, 49), i, 1, SETTINGS, "tiny", RGBA))
    recording = recorder.stop()
    frames = decode(recording.path)
    assert len(frames) == 3 and frames[0][1].shape == (50, 64, 3)


def a1111_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """The infotext format A1111's PNG Info reads: prompt lines, a `Negative prompt:` line, then a last
    line of `Key: value` pairs (values JSON-quoted where they hold a comma, colon or quote)."""
    *lines, last = text.split("\n")
    pairs = re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last)
    fields = {key: json.loads(value) if value.startswith('"') else value for key, value in pairs}
    negative = [line for line in lines if line.startswith("Negative prompt: ")]
    prompt = "\n".join(line for line in lines if not line.startswith("Negative prompt: "))
    return prompt, negative[0].removeprefix("Negative prompt: ") if negative else "", fields


def test_a_snapshot_holds_the_parameters_as_a1111_writes_them(recorder, ring):
    show(recorder, ring, solid(10))
    path = recorder.snapshot("look")
    assert path == recorder.folder / "look.png"
    with Image.open(path) as image:
        text = image.text["parameters"]
    prompt, negative, fields = a1111_parameters(text)
    assert prompt == "a forest, at night <lora:film grain:0.7>"
    assert negative == "blurry"
    assert fields["Seed"] == "1234" and fields["Steps"] == "2" and fields["Size"] == "64x64"
    assert fields["Model"] == "tiny" and fields["CFG scale"] == "1.5" and fields["Denoising strength"] == "0.6"
    assert fields["VAE"] == "taesd"


def test_a_snapshot_json_chunk_gives_back_every_setting_of_the_frame(recorder, ring):
    settings = StreamSettings(prompt="x", prompts=(("a city", 0.7), ("rain: heavy", 0.3)),
                              seeds=((3, 1.0), (9, 0.5)), subseed=5, subseed_strength=0.2, t_index_list=(10, 30),
                              controls=((0.8, 0.0, 0.75),), loras=(("grain", 0.5),), mode="txt2img",
                              width=64, height=64)
    show(recorder, ring, solid(10), frame_id=77, version=12, settings=settings)
    info = read_snapshot(recorder.snapshot())
    assert info.settings == settings
    assert (info.model, info.vae, info.frame_id, info.state_version) == ("tiny", "taesd", 77, 12)
    _, _, fields = a1111_parameters(info.parameters)
    assert info.parameters.startswith("a city :0.7 AND rain: heavy :0.3 <lora:grain:0.5>")
    assert (fields["Seed"], fields["Variation seed"], fields["Steps"]) == ("3", "5", "2")


def test_a_snapshot_is_of_the_frame_on_show_with_that_frames_parameters(recorder, ring):
    show(recorder, ring, solid(10), frame_id=1, version=1, settings=SETTINGS)
    later = StreamSettings(prompt="a desert", seed=99, width=64, height=64)
    show(recorder, ring, solid(200), frame_id=2, version=2, settings=later)
    path = recorder.snapshot()
    assert read_snapshot(path).settings == later
    with Image.open(path) as image:
        assert np.asarray(image)[0, 0].tolist() == [200, 55, 40]


def test_a_snapshot_before_any_frame_is_refused(recorder):
    with pytest.raises(RecordError, match="no frame"):
        recorder.snapshot()


# A picture that shows both its orientation and its colour order: red top half, blue bottom half.
UPRIGHT = torch.zeros(1, 3, 64, 64)
UPRIGHT[0, 0, :32], UPRIGHT[0, 2, 32:] = 1.0, 1.0


@pytest.mark.parametrize("fmt", [
    OutputFormat(np.dtype(np.uint8), 4, bgr=True, bottom_left=True),
    OutputFormat(np.dtype(np.float32), 3, bgr=False, bottom_left=True),
    OutputFormat(np.dtype(np.uint16), 4, bgr=True, bottom_left=False),
    OutputFormat(np.dtype(np.float16), 1, bgr=False, bottom_left=True),
], ids=["uint8-bgra-bottom-left", "float32-rgb-bottom-left", "uint16-bgra", "float16-grey-bottom-left"])
def test_outputs_of_any_format_are_recorded_and_snapshot_upright_in_rgb(recorder, ring, clock, fmt):
    pixels = client_pixels(UPRIGHT, fmt).numpy()  # what the render loop writes for this output format
    top, bottom = ([54, 54, 54], [18, 18, 18]) if fmt.channels == 1 else ([255, 0, 0], [0, 0, 255])
    recorder.start()
    for i in range(2):
        clock.advance(FRAME_MS)
        show(recorder, ring, pixels, fmt, frame_id=i)
    (_, video), _ = decode(recorder.stop().path)
    assert np.abs(video[8, 32].astype(int) - top).max() < 12
    assert np.abs(video[56, 32].astype(int) - bottom).max() < 12
    with Image.open(recorder.snapshot()) as image:
        png = np.asarray(image)
    assert png[0, 0].tolist() == top and png[-1, -1].tolist() == bottom


def test_the_encoder_is_the_first_that_encodes_a_frame_here():
    from bridge.recorder import VIDEO_CODECS, encodes, video_codec
    assert encodes("libx264")  # in the PyAV wheels
    assert not encodes("no_such_encoder")
    chosen = video_codec()
    assert chosen in VIDEO_CODECS and encodes(chosen)
    assert not any(encodes(name) for name in VIDEO_CODECS[:VIDEO_CODECS.index(chosen)])  # e.g. NVENC with no GPU
