"""Recording the output stream to a video file, and snapshots of the frame on show as PNGs.

The render loop tells `Recorder.offer` of every output it writes, on the render thread. Offering is
cheap and never waits: when not recording it only remembers what the frame was made with; when
recording it copies the pixels into one of a few preallocated buffers and hands that to a writer
thread, which converts and encodes it (PyAV, H.264 in .mp4). When every buffer is still waiting for
the writer, the frame is left out of the recording and counted as dropped: the show never slows for
the recording. Timestamps are the frames' real times (variable frame rate), so a dropped frame is a
gap in the video, not a speed-up.

A snapshot is a PNG of the newest frame in the output ring, read through the `latest_frame` callable
the daemon passes in (so nothing is copied per frame for it), with the frame's parameters in two text
chunks: `parameters` as AUTOMATIC1111 writes it (its PNG Info tab reads it) and `sdbridge`, JSON of
every setting of the frame, which `read_snapshot` turns back into StreamSettings.

File names come from the network: they are plain file names (presets.NAME) inside the recordings
folder, never an existing file. This module knows nothing of OSC, WebSocket or the daemon; it reads
output frames as numpy arrays and StreamSettings, and knows no model internals.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
from PIL import Image, PngImagePlugin

from engines.frames import OutputFormat
from engines.stream import IMG2IMG, StreamSettings

from . import config, shm
from .loop import Output
from .presets import FILE_NAME_RULE, is_file_name

log = logging.getLogger(__name__)

VIDEO_SUFFIX = ".mp4"
SNAPSHOT_SUFFIX = ".png"
# Video encoders in order of preference; the first that encodes a test frame here is used. NVENC (in
# the PyAV wheels) works where an NVIDIA driver and GPU are: the GPU's video engine encodes, which leaves
# the CPU to the show and the CUDA cores to diffusion. libx264 is in the wheels too; mpeg4 is FFmpeg's
# own and always there.
VIDEO_CODECS = ("h264_nvenc", "libx264", "h264", "mpeg4")
# libx264: `veryfast` keeps up with 512x512 at 60 fps on two CPU cores; crf 18 is visually lossless,
# which a recording meant for editing wants. NVENC: preset p4 (its middle), constant quality 19 (about
# crf 18's look).
X264_OPTIONS = {"preset": "veryfast", "crf": "18"}
CODEC_OPTIONS = {"libx264": X264_OPTIONS, "h264": X264_OPTIONS,
                 "h264_nvenc": {"preset": "p4", "tune": "hq", "rc": "vbr", "cq": "19"}}
TIME_BASE = Fraction(1, 1000)  # pts in milliseconds of the frames' real times (mpeg4 allows no finer than 1/65535)
QUEUE_FRAMES = 4  # frames waiting for the writer at most: ~130 ms at 30 fps, 4 MB at 512x512 RGBA
STOP_TIMEOUT = 5.0  # seconds stop() waits for the writer to finish the file
SNAPSHOT_MATCH_TRIES = 50  # 1 ms apart: the ring can hold a frame the recorder is told of a moment later
A1111_SAMPLER = "LCM"  # the stream's sampler: latent-consistency steps (engines/stream.py)
SNAPSHOT_FORMAT = 1  # version of the `sdbridge` chunk's JSON


class RecordError(ValueError):
    """A recording or snapshot that cannot be made; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Recording:
    """A finished recording. `error` is empty when the file was finished normally, else why it ended
    early or may be incomplete."""

    path: Path
    frames: int  # written to the file
    dropped: int  # offered while recording but left out of the file
    seconds: float  # from start to stop
    error: str = ""


@dataclasses.dataclass(frozen=True)
class RecordStatus:
    """Where recording stands, for telemetry."""

    recording: bool
    path: str  # the file being written, or the last one ("" before the first)
    frames: int
    dropped: int
    error: str = ""  # why the last recording ended on its own, if it did


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot PNG says about its frame."""

    settings: StreamSettings
    model: str
    frame_id: int
    state_version: int
    parameters: str  # the A1111 `parameters` text
    vae: str = ""  # the autoencoder ("" in a snapshot that does not say)


@dataclasses.dataclass(frozen=True)
class _Shown:
    """What an output frame was made with (its pixels are not kept)."""

    frame_id: int
    state_version: int
    settings: StreamSettings
    model: str
    vae: str


def default_folder() -> Path:
    """The user's recordings folder: %APPDATA%\\sdbridge\\recordings on Windows, ~/.config/sdbridge/recordings
    elsewhere (the daemon uses it when recordings_dir is empty)."""
    return config.user_folder() / "recordings"


@functools.lru_cache(maxsize=1)
def video_codec() -> str:
    """The video encoder recordings use: the first of VIDEO_CODECS that encodes here (tried once)."""
    for name in VIDEO_CODECS:
        if encodes(name):
            log.info("recordings use the %s encoder", name)
            return name
    raise RecordError(f"PyAV {av.__version__} has none of the video encoders {', '.join(VIDEO_CODECS)}: "
                      "reinstall it from the PyPI wheels (pip install --force-reinstall av)")


def encodes(codec: str, size: int = 256) -> bool:
    """Does `codec` encode a frame here, with the options recordings use? A name in the PyAV build is
    not enough: NVENC is built in everywhere and needs an NVIDIA driver and GPU to open."""
    if codec not in av.codecs_available:
        return False
    try:
        context = av.CodecContext.create(codec, "w")
        context.width, context.height, context.pix_fmt = size, size, "yuv420p"
        context.time_base = TIME_BASE
        context.options = dict(CODEC_OPTIONS.get(codec, {}))
        frame = av.VideoFrame(size, size, "yuv420p")
        frame.pts, frame.time_base = 0, TIME_BASE
        context.encode(frame)
        context.encode(None)  # flush: an encoder that fails late fails here
        return True
    except Exception as e:  # not built as an encoder, no driver, no GPU, an option it does not take
        log.debug("encoder %s cannot record here: %s", codec, e)
        return False


def rgb8(pixels: np.ndarray, *, bgr: bool, bottom_left: bool) -> np.ndarray:
    """Output pixels (H, W, 1|3|4) of uint8, uint16, float16 or float32 in any order and origin, as
    (H, W, 3) RGB uint8, top row first: the form a video frame or a PNG takes."""
    if pixels.dtype == np.uint8:
        image = pixels
    elif pixels.dtype == np.uint16:
        image = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 65535 -> 255, rounded
    else:
        image = np.nan_to_num(pixels.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    channels = image.shape[2]
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 4:
        image = image[:, :, :3]
    if bgr and channels != 1:
        image = image[:, :, ::-1]
    if bottom_left:
        image = image[::-1]
    return np.ascontiguousarray(image)


def infotext(settings: StreamSettings, model: str, vae: str = "") -> str:
    """The frame's parameters as AUTOMATIC1111 writes them in a PNG's `parameters` chunk: the prompt,
    a `Negative prompt:` line, then one line of `Key: value` pairs separated by ", " (a value holding
    a comma, colon, quote or line break is JSON-quoted). A prompt blend is written in A1111's
    composable form (`a :0.7 AND b :0.3`), live LoRA weights as `<lora:name:weight>` tags."""
    if settings.prompts:
        prompt = " AND ".join(f"{text} :{weight:g}" for text, weight in settings.prompts)
    else:
        prompt = settings.prompt
    prompt += "".join(f" <lora:{name}:{weight:g}>" for name, weight in settings.loras)
    seed = max(settings.seeds, key=lambda pair: pair[1])[0] if settings.seeds else settings.seed
    fields: list[tuple[str, Any]] = [
        ("Steps", len(settings.t_index_list) or settings.steps),
        ("Sampler", A1111_SAMPLER),
        ("CFG scale", f"{settings.guidance_scale:g}"),
        ("Seed", seed),
        ("Size", f"{settings.width}x{settings.height}"),
        ("Model", model),
    ]
    if vae:
        fields.append(("VAE", vae))
    if settings.mode == IMG2IMG:
        fields.append(("Denoising strength", f"{settings.strength:g}"))
    if settings.subseed_strength > 0:
        fields += [("Variation seed", settings.subseed),
                   ("Variation seed strength", f"{settings.subseed_strength:g}")]
    if settings.clip_skip > 1:
        fields.append(("Clip skip", settings.clip_skip))
    lines = [prompt.strip()]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def settings_from_dict(values: dict[str, Any]) -> StreamSettings:
    """StreamSettings from their JSON form (lists back to tuples); keys it does not know are ignored,
    missing ones take their defaults, so a snapshot from another version still reads."""
    def tuples(value: Any) -> Any:
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value
    known = {f.name for f in dataclasses.fields(StreamSettings)}
    return StreamSettings(**{k: tuples(v) for k, v in values.items() if k in known})


def read_snapshot(path: str | os.PathLike[str]) -> SnapshotInfo:
    """The parameters a snapshot PNG holds; RecordError for a PNG without them."""
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}))
    except OSError as e:
        raise RecordError(f"{path}: not a readable PNG ({e})") from None
    try:
        data = json.loads(text["sdbridge"])
        return SnapshotInfo(settings_from_dict(data["settings"]), str(data["model"]), int(data["frame_id"]),
                            int(data["state_version"]), text.get("parameters", ""), str(data.get("vae", "")))
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"{path}: no sdbridge parameters in it ({e})") from None


class _Take:
    """One recording: the reserved file, the buffers, the writer thread and its counts."""

    def __init__(self, path: Path, started_ns: int, buffers: int, codec: str,
                 before_encode: Callable[[], None], failed: Callable[["_Take", str], None],
                 like: np.ndarray | None = None):
        self.path = path
        self.started_ns = started_ns
        self.codec = codec
        self.offered = 0
        self.written = 0
        self.dropped = 0  # left out by the render thread (writer behind, another size)
        self.lost = 0  # left out by the writer thread (after an error)
        self.error = ""
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self._buffers = buffers
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        # Unbounded, so that the end marker always fits; the bound on waiting frames is the buffers.
        self._todo: queue.SimpleQueue[tuple[np.ndarray, int, OutputFormat] | None] = queue.SimpleQueue()
        self._before_encode = before_encode
        self._failed = failed
        self._told_size = False
        self.reported = False  # returned by a stop()
        self.ended_ns = started_ns  # when it stopped or failed
        self._container: Any = None
        self._stream: Any = None
        self._first_ns = 0
        self._last_pts = -1
        self._first = True
        if like is not None:  # the frame on show now: the next ones are most likely its size
            self._make_buffers(like.shape, like.dtype)
        self.thread = threading.Thread(target=self._write_all, name=f"recorder {path.name}", daemon=True)
        self.thread.start()

    # -- render thread (under the recorder's lock)
    def put(self, output: Output, now_ns: int) -> str | None:
        """Copy the frame in for the writer, or count it dropped; a message to report, if any."""
        self.offered += 1
        pixels = output.pixels
        if self._first:  # the take's size is its first frame's
            self._first = False
            if pixels.shape != self.shape or pixels.dtype != self.dtype:  # not made at the start: made now
                self._make_buffers(pixels.shape, pixels.dtype)
        elif pixels.shape != self.shape or pixels.dtype != self.dtype:
            self.dropped += 1
            if not self._told_size:
                self._told_size = True
                return (f"recording {self.path.name} is {self.shape[1]}x{self.shape[0]}: frames of "
                        f"{pixels.shape[1]}x{pixels.shape[0]} are left out of it; /record/stop and "
                        "/record/start to record the new size")
            return None
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:  # the writer is behind: leave the frame out rather than wait
            self.dropped += 1
            return None
        np.copyto(buffer, pixels)
        self._todo.put((buffer, now_ns, output.format))
        return None

    def finish(self) -> None:
        """No more frames: the writer finishes the file after those already handed in."""
        self._todo.put(None)

    def _make_buffers(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """The buffers frames are copied into, written once here so that the render thread's first copies
        into them do not pay for the memory's first touch (tens of ms for large frames)."""
        while not self._free.empty():
            self._free.get_nowait()
        self.shape, self.dtype = shape, dtype
        for _ in range(self._buffers):
            buffer = np.empty(shape, dtype)
            buffer.fill(0)
            self._free.put(buffer)

    # -- writer thread
    def _write_all(self) -> None:
        while (item := self._todo.get()) is not None:
            buffer, now_ns, fmt = item
            try:
                if self.error:
                    self.lost += 1
                    continue
                self._before_encode()
                self._encode(rgb8(buffer, bgr=fmt.bgr, bottom_left=fmt.bottom_left), now_ns)
                self.written += 1
            except Exception as e:  # disk full, codec failure: the recording ends, the show goes on
                self.lost += 1
                self.error = f"recording {self.path.name} stopped after {self.written} frames: {_why(e)}"
                log.error("%s", self.error, exc_info=not isinstance(e, (OSError, av.error.FFmpegError)))
                self._failed(self, self.error)  # no frame is handed in after this returns
            finally:
                self._free.put(buffer)
        self._close()
        while not self._free.empty():  # the take is kept (for its counts) after its end; its frames are not
            self._free.get_nowait()

    def _encode(self, image: np.ndarray, now_ns: int) -> None:
        height, width = image.shape[:2]
        if height % 2 or width % 2:
            # yuv420p halves the chroma planes: an odd side is padded by repeating the last row or column
            image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        if self._container is None:
            self._open(image.shape[1], image.shape[0])
            self._first_ns = now_ns
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        # Real time, strictly increasing (an encoder refuses two frames at one time)
        pts = max(self._last_pts + 1, (now_ns - self._first_ns) // 1_000_000)
        frame.pts, frame.time_base, self._last_pts = pts, TIME_BASE, pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def _open(self, width: int, height: int) -> None:
        self._container = av.open(str(self.path), "w", format="mp4")
        stream = self._container.add_stream(self.codec, options=dict(CODEC_OPTIONS.get(self.codec, {})))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = TIME_BASE
        if self.codec == "mpeg4":
            stream.bit_rate = 8 * width * height * 30  # about 8 bits a pixel at 30 fps: little visible loss
        self._stream = stream

    def _close(self) -> None:
        try:
            if self._container is not None:
                if not self.error:
                    for packet in self._stream.encode():  # frames the encoder still holds
                        self._container.mux(packet)
                self._container.close()
            elif not self.error:
                self.error = "no frame was shown while recording: no file written"
        except Exception as e:
            if not self.error:
                self.error = f"recording {self.path.name} could not be finished: {_why(e)}"
                log.error("%s", self.error)
                self._failed(self, self.error)
        if not self.written:  # nothing shown, or a failure before the first frame: no empty or broken file left
            try:
                self.path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("could not remove %s: %s", self.path, e)


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (" (disk full? free space or choose another recordings_dir)"
                             if e.errno == 28 else "")
    return str(e) or type(e).__name__


class Recorder:
    """Records the output stream and takes snapshots; see the module docstring.

    `offer` is for the render thread only and never blocks for long (one frame copy when recording).
    `start`, `stop`, `snapshot`, `status` and `close` are for any other thread. `latest_frame` returns
    the output ring's newest frame (`ring_out.read_latest()`), or None when there is none;
    `report_error` is told, from the writer thread, when a recording ends on its own (disk full, a
    codec failure) or leaves frames of another size out. `clock` (monotonic nanoseconds) and
    `before_encode` (called on the writer thread before each frame is encoded) are seams for tests.
    """

    def __init__(self, folder: str | os.PathLike[str], *, latest_frame: Callable[[], shm.Frame | None],
                 report_error: Callable[[str], None], queue_frames: int = QUEUE_FRAMES,
                 stop_timeout: float = STOP_TIMEOUT, clock: Callable[[], int] = time.monotonic_ns,
                 before_encode: Callable[[], None] = lambda: None):
        if queue_frames < 1:
            raise ValueError("queue_frames must be at least 1")
        self.folder = Path(os.path.expanduser(str(folder)))
        self._latest_frame = latest_frame
        self._report_error = report_error
        self._queue_frames = queue_frames
        self._stop_timeout = stop_timeout
        self._clock = clock
        self._before_encode = before_encode
        self._shown: deque[_Shown] = deque(maxlen=8)  # the last outputs' parameters, newest last
        self._lock = threading.Lock()  # the take that offers go to: held for one frame copy at most
        self._control = threading.Lock()  # start and stop, one at a time
        self._take: _Take | None = None
        self._ended: _Take | None = None  # the last take, after it stopped or ended on its own
        self._closed = False  # the daemon is shutting down: no new take or snapshot

    # -- render thread
    def offer(self, output: Output) -> None:
        """Tell the recorder of an output just written (render thread). It copies the pixels only
        while recording, and leaves the frame out of the recording rather than wait for the writer."""
        self._shown.append(_Shown(output.frame_id, output.state_version, output.settings, output.model,
                                  output.vae))
        if self._take is None:
            return
        with self._lock:
            take = self._take
            message = take.put(output, self._clock()) if take is not None else None
        if message:
            self._tell(message)

    # -- control
    def start(self, name: str | None = None) -> Path:
        """Start recording into a new file of the recordings folder: `name` (a plain file name; .mp4
        added if it has no suffix) or a timestamped one. RecordError when already recording, for a bad
        name or one that exists, or a folder that cannot be written."""
        codec = video_codec()
        with self._control:
            self._refuse_if_closed()
            if self._take is not None:
                raise RecordError(f"already recording to {self._take.path.name}: /record/stop first")
            path = self._reserve(self._names(name, VIDEO_SUFFIX, "recording"), "recording")
            on_show = self._latest_frame()  # the size its buffers are made for, here and not by the render thread
            take = _Take(path, self._clock(), self._queue_frames, codec, self._before_encode, self._ended_itself,
                         like=on_show.pixels if on_show is not None else None)
            with self._lock:
                self._take, self._ended = take, None
        log.info("recording to %s (%s)", path, codec)
        return path

    def stop(self) -> Recording:
        """Stop recording and finish the file; waits for the writer at most `stop_timeout` seconds
        (past that the file may be incomplete, and Recording.error says so). A recording that ended
        on its own (an error) is returned by the first stop after it. RecordError when not recording."""
        with self._control:
            with self._lock:
                take, self._take = self._take, None
            if take is None:
                ended = self._ended
                if ended is not None and ended.error and not ended.reported:
                    ended.thread.join(self._stop_timeout)  # it is closing the file after its error
                    ended.reported = True
                    return self._recording(ended, ended.ended_ns)
                raise RecordError("not recording: /record/start first")
            stopped_ns = self._clock()
            take.finish()
            take.thread.join(self._stop_timeout)
            if take.thread.is_alive():
                take.error = (f"the writer did not finish {take.path.name} within {self._stop_timeout:g} s: "
                              "the file may be incomplete (a slow or stuck disk?)")
                log.error("%s", take.error)
            take.reported, take.ended_ns, self._ended = True, stopped_ns, take
            recording = self._recording(take, stopped_ns)
        log.info("recorded %s: %d frames, %d dropped, %.1f s%s", recording.path, recording.frames,
                 recording.dropped, recording.seconds, f" ({recording.error})" if recording.error else "")
        return recording

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The handlers of the recording commands (bridge/commands); each returns what the WebSocket's
        ack carries as its result."""
        def stop() -> dict[str, Any]:
            done = self.stop()
            return {"path": str(done.path), "frames": done.frames, "dropped": done.dropped,
                    "seconds": round(done.seconds, 3), "error": done.error}
        return {"/record/start": lambda name=None: {"path": str(self.start(name))},
                "/record/stop": stop,
                "/snapshot": lambda name=None: {"path": str(self.snapshot(name))}}

    def status(self) -> RecordStatus:
        """Recording or not, the file, frames written and dropped so far (the last take's when idle)."""
        take = self._take
        recording = take is not None
        take = take or self._ended
        if take is None:
            return RecordStatus(False, "", 0, 0)
        return RecordStatus(recording, str(take.path), take.written, take.dropped + take.lost,
                            "" if recording else take.error)

    def close(self) -> None:
        """Stop a recording in progress and start no other (the daemon is shutting down)."""
        with self._control:
            self._closed = True
        if self._take is not None:
            try:
                self.stop()
            except RecordError:
                pass

    def snapshot(self, name: str | None = None) -> Path:
        """Write the frame on show now as a PNG in the recordings folder, with its parameters (see the
        module docstring): `name` (a plain file name; .png added if it has no suffix) or a timestamped
        one. RecordError when no frame has been shown yet, for a bad name or one that exists."""
        self._refuse_if_closed()
        candidates = self._names(name, SNAPSHOT_SUFFIX, "snapshot")
        frame, shown = self._frame_on_show()
        image = Image.fromarray(rgb8(frame.pixels, bgr=frame.bgr, bottom_left=frame.bottom_left))
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext(shown.settings, shown.model, shown.vae))
        info.add_text("sdbridge", json.dumps({
            "format": SNAPSHOT_FORMAT, "model": shown.model, "vae": shown.vae, "frame_id": shown.frame_id,
            "state_version": shown.state_version, "settings": dataclasses.asdict(shown.settings)}))
        path = self._reserve(candidates, "snapshot")
        try:
            with open(path, "wb") as f:
                image.save(f, "PNG", pnginfo=info, compress_level=4)  # 4: most of 9's size at a third the time
        except OSError as e:
            path.unlink(missing_ok=True)
            raise RecordError(f"snapshot {path.name} not written to {self.folder}: {_why(e)}") from None
        log.info("snapshot %s (frame %d)", path, shown.frame_id)
        return path

    # -- inside
    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise RecordError("the daemon is shutting down")

    def _frame_on_show(self) -> tuple[shm.Frame, _Shown]:
        """The output ring's newest frame and what it was made with. The ring is written just before the
        recorder is told of the frame, so a frame not told of yet is read again a moment later."""
        for _ in range(SNAPSHOT_MATCH_TRIES):
            frame = self._latest_frame()
            if frame is None:
                break
            # a copy: the render thread appends meanwhile (deque.copy is one step for other threads)
            for shown in reversed(self._shown.copy()):
                if (shown.frame_id, shown.state_version) == (frame.frame_id, frame.state_version):
                    return frame, shown
            time.sleep(0.001)
        raise RecordError("no frame on show to snapshot yet: wait for the stream to show one")

    @staticmethod
    def _names(name: str | None, suffix: str, what: str) -> list[str]:
        """The file names to try, first choice first: `name` alone, or a timestamped one and its -2, -3..."""
        if name is None:
            stem = "sdbridge-" + datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
            candidates = [stem + suffix] + [f"{stem}-{n}{suffix}" for n in range(2, 100)]
        else:
            if not is_file_name(name):
                raise RecordError(f"{what} name {name!r}: {FILE_NAME_RULE}; no folders")
            candidates = [name if Path(name).suffix.lower() == suffix else name + suffix]
        return candidates

    def _reserve(self, candidates: list[str], what: str) -> Path:
        """The first of `candidates` that is a new file in the folder, created empty so that no other take
        or snapshot gets its name."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RecordError(f"recordings folder {self.folder} cannot be made: {_why(e)} "
                              "(set recordings_dir to a folder you can write)") from None
        for candidate in candidates:
            path = self.folder / candidate
            if not path.parent.resolve() == self.folder.resolve():
                raise RecordError(f"{what} {candidate!r} refused: it leads outside {self.folder}")
            try:
                with open(path, "x"):
                    pass
            except FileExistsError:
                continue
            except OSError as e:
                raise RecordError(f"{what} {candidate!r} not written to {self.folder}: {_why(e)}") from None
            return path
        raise RecordError(f"{what} {candidates[0]!r} exists in {self.folder}: choose another name")

    def _ended_itself(self, take: _Take, message: str) -> None:
        """Writer thread: the take failed; no frame goes to it from now on."""
        with self._lock:
            if self._take is take:
                take.ended_ns = self._clock()
                self._take, self._ended = None, take
        take.finish()  # the writer drains what was handed in (counted as dropped) and closes the file
        self._tell(message)

    def _tell(self, message: str) -> None:
        try:
            self._report_error(message)
        except Exception:
            log.exception("report_error failed")

    @staticmethod
    def _recording(take: _Take, stopped_ns: int) -> Recording:
        # a writer still running (stuck) may not write what it holds: only what it wrote counts as written
        written = take.written
        dropped = take.offered - written if take.thread.is_alive() else take.dropped + take.lost
        return Recording(take.path, written, dropped, max(0, stopped_ns - take.started_ns) / 1e9, take.error)
