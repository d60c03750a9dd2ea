"""The render thread: newest input frame + one state snapshot -> engine -> output ring.

Latest frame wins: the loop always takes the newest input (from the input ring, or offered by another
path such as the WebSocket: `offer_input`) and drops older ones, so latency never queues up. It renders when a new input frame arrives, when the state changed (the last input is
rendered again with the new state), every frame in txt2img with seed -1, and while the stream itself
wants frames (a transition easing in, stream-batch frames in flight). Nothing that goes wrong inside a
frame stops the loop: the error is reported and the stream carries on with the next frame. A frame that
runs out of memory (a resolution too large for the device, say) sets the parameters that size a frame
back to those of the last frame that fitted, as a new state version, so that the stream goes on at
once rather than failing every frame.

Model and autoencoder switches (/model, /vae) load in the background while the current stream keeps
serving; the new one is swapped in at a frame boundary, and a failed load leaves the current one
serving and the state saying so. Likewise a change that needs a prompt encoded or a LoRA file read is
made ready on a worker (Stream.precompute) while frames keep coming with what is on screen.

Per frame the loop stages the input on the device, launches the frame and, where the device computes
asynchronously (CUDA), takes and uploads the next input before it waits for the output: the copies of
frame N+1 overlap the compute of frame N, and the output's download is the frame's one host sync.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Collection

import numpy as np
import torch

from engines.backends.torch_backend import out_of_memory, release_cached_memory
from engines.frames import MAX_INPUT_SIDE, OutputFormat, frame_difference
from engines.stream import TXT2IMG, Stream, StreamSettings

from . import params, shm
from .background import BackgroundLoad
from .controls import ControlInputs
from .state import Snapshot, StateStore

log = logging.getLogger(__name__)

LOADING, READY, PAUSED, ERROR = "loading", "ready", "paused", "error"
_STREAM_FIELDS = tuple(f.name for f in dataclasses.fields(StreamSettings) if f.name not in ("loras", "controls"))
_ERROR_BACKOFF_S = 0.05
_ASKED_KEPT = 16  # the versions of the settings last handed to the prompt worker that are remembered
# The parameters that decide how much memory a frame takes: its size, and how many latents go through the
# UNet at once (stream batch: one per step; a negative pass per cfg_type). Set back when a frame does not fit.
_MEMORY_PARAMS = ("width", "height", "steps", "t_index_list", "cfg_type")


def stream_settings(snapshot: Snapshot) -> StreamSettings:
    """The engine's view of a parameter snapshot (the names are the same by design)."""
    loras = tuple(sorted(params.lora_weights(snapshot.values).items()))
    return StreamSettings(**{name: snapshot[name] for name in _STREAM_FIELDS}, loras=loras,
                          controls=params.controls(snapshot.values))


@dataclasses.dataclass(frozen=True)
class Output:
    """One output frame as the render loop wrote it, for listeners such as the recorder. `pixels` is the
    staging buffer, reused two frames later: a listener that keeps the frame copies it at once."""

    pixels: np.ndarray  # (H, W, C) in `format`
    frame_id: int
    state_version: int
    settings: StreamSettings  # what the frame was made with
    model: str  # the model that made it
    format: OutputFormat
    vae: str = ""  # the autoencoder that decoded it (the `vae` parameter: auto, model, taesd or a name)


class Stats:
    """Frame counters and rates, written by the render thread and read by telemetry."""

    def __init__(self, window_s: float = 1.0):
        self.window_s = window_s
        self.frames = 0
        self.skipped = 0
        self.engine_s = 0.0  # total seconds in the engine's per-frame call (launch to download), for benchmarks
        self.latency_ms = 0.0
        self.status = LOADING
        self._written: deque[float] = deque()
        self._lock = threading.Lock()

    def record(self, latency_ns: int, engine_s: float = 0.0) -> None:
        now = time.monotonic()
        with self._lock:
            self.frames += 1
            self.engine_s += engine_s
            self.latency_ms = latency_ns / 1e6
            self._written.append(now)
            self._trim(now)

    @property
    def fps(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return len(self._written) / self.window_s

    def _trim(self, now: float) -> None:
        while self._written and now - self._written[0] > self.window_s:
            self._written.popleft()


# Loads a stream for (model name, vae choice); loads an autoencoder for a stream and a vae choice.
LoadStream = Callable[[str, str], Stream]
LoadAutoencoder = Callable[[Stream, str], Any]


class RenderLoop:
    """Owns the render thread. The first model loads on that thread, so slow loading never blocks I/O;
    later switches load on a background worker."""

    def __init__(self, *, load_stream: LoadStream, load_autoencoder: LoadAutoencoder, store: StateStore,
                 ring_in: shm.Ring, ring_out: shm.Ring, output: OutputFormat, report_error: Callable[[str], None],
                 poll_interval: float = 0.001, on_serving: Callable[[Stream], None] | None = None,
                 controls: ControlInputs | None = None, on_output: Callable[[Output], None] | None = None):
        self._load_stream = load_stream
        self._load_autoencoder = load_autoencoder
        self._on_serving = on_serving or (lambda stream: None)  # told on this thread when a stream starts serving
        self._on_output = on_output  # told on this thread of every output written (the recorder); must not block
        self._loads = BackgroundLoad()
        self.serving: tuple[str, str] = ("", "")  # (model, vae) of the stream that serves
        self._failed: tuple[str, str] | None = None  # the last background load that failed
        self._refused_settings: StreamSettings | None = None  # the last settings Stream.prepare refused
        self._fitted: StreamSettings | None = None  # the settings of the last frame written: they fit in memory
        self._trying: StreamSettings | None = None  # the settings being prepared or rendered, should memory run out
        self.store = store
        self.ring_in = ring_in
        self.ring_out = ring_out
        self.controls = controls if controls is not None else ControlInputs([], [], torch.device("cpu"))
        self.output = output
        self.output_flags = shm.frame_flags(bgr=output.bgr, bottom_left=output.bottom_left)
        self.report_error = report_error
        self.poll_interval = poll_interval
        self.stats = Stats()
        self.ready = threading.Event()  # set once the model is loaded (or failed to)
        self.stream: Stream | None = None
        self._stop = threading.Event()
        self._calls: deque[tuple[Callable[[Stream], Any], concurrent.futures.Future]] = deque()  # call_between_frames
        self._calls_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sdbridge-render", daemon=True)
        # what the last output was made of
        self._last_input: shm.Frame | None = None
        self._inputs = shm.NewestFrames(ring_in)
        self._rendered_version = 0
        self._shown_version = 0  # the state version whose settings the stream is prepared with
        self._precompute = BackgroundLoad("sdbridge-prepare")  # prompt encoding and LoRA reads
        self._precomputed: StreamSettings | None = None  # settings the worker has made ready
        self._asked: dict[StreamSettings, int] = {}  # settings handed to the worker -> their state version
        self._rendered_raw: torch.Tensor | None = None  # the last rendered input, for the similarity filter
        # Input frames are read into two buffers in turn, so that reading never allocates and a failed
        # read never spoils the last good frame; one taken while the device computes waits in _staged.
        self._input_buffers = [np.empty(ring_in.slot_capacity, np.uint8) for _ in range(2)]
        self._staged: tuple[shm.Frame, torch.Tensor] | None = None  # (frame, its pixels on the device), not rendered yet

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._calls_lock:  # under the lock: no call_between_frames can slip in after this
            self._stop.set()
        self._cancel_calls()
        self._loads.join(0)  # a load in progress finishes on its own (daemon thread); never wait for it
        if self._thread.ident is None:  # never started (the daemon failed before it got that far)
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("render thread did not stop within %.0f s", timeout)

    def offer_input(self, frame: shm.Frame) -> None:
        """An input frame from another path than the input ring (the WebSocket), from any thread; the
        newer of it and the ring's newest frame is rendered next. ValueError for a malformed frame."""
        self._inputs.offer(frame)

    # ------------------------------------------------------------------ thread
    @property
    def loading(self) -> str:
        """What is being loaded in the background ("model NAME", "vae NAME"), or ""."""
        pending = self._loads.pending
        return f"{pending[0]} {pending[1]}" if pending else ""

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._cancel_calls()  # nobody waits for a call this thread will never run

    def _serve(self) -> None:
        snap = self.store.snapshot()
        try:
            self.stream = self._load_stream(snap["model"], snap["vae"])
            self.serving = (snap["model"], snap["vae"])
        except Exception as e:  # the daemon stays up and says why; a later model switch may succeed
            self.stats.status = ERROR
            self.report_error(f"model failed to load: {e}")
            log.exception("model failed to load")
            self.ready.set()
            return
        self._serving_now(self.stream)
        self._adopt_warm_up(self.stream)
        self.stats.status = READY
        self.ready.set()
        last_error = ""
        while not self._stop.is_set():
            self._run_calls()
            try:
                if not self._step():
                    self._idle()
                continue
            except Exception as e:  # a bad frame or a failed render must never end the stream
                message = f"frame failed: {type(e).__name__}: {e}"
                ran_out = out_of_memory(e)
                # the traceback once per distinct failure, not once per frame of a persistent one (for
                # memory running out only at debug level: no bug, and what is done about it is reported)
                log.log(logging.DEBUG if message == last_error or ran_out else logging.ERROR, "%s", message,
                        exc_info=message != last_error)
                last_error = message
            if ran_out:  # here, not in the except: its traceback holds the failed frame's tensors
                message = self._fit_memory(message)
            self.report_error(message)
            self._stop.wait(_ERROR_BACKOFF_S)

    def call_between_frames(self, work: Callable[[Stream], Any], timeout: float) -> Any:
        """Run `work(stream)` on the render thread between two frames and return what it returns (or
        raise what it raised). The stream is busy meanwhile: for benchmarks, which time the engine on
        the very thread, torch thread pool and memory arena that serve the frames."""
        call: concurrent.futures.Future = concurrent.futures.Future()
        with self._calls_lock:
            if self._stop.is_set() or not self._thread.is_alive():
                raise RuntimeError("the render thread is not running")
            self._calls.append((work, call))
        return call.result(timeout)

    def _cancel_calls(self) -> None:
        with self._calls_lock:
            for _, call in self._calls:
                call.cancel()  # its caller gets CancelledError rather than a wait for its whole timeout
            self._calls.clear()

    def _adopt_warm_up(self, stream: Stream) -> None:
        """A stream arrives prepared by its warm-up frame for the state of its load: until it is prepared
        again, its frames carry that state's version (known when the state has not moved since)."""
        snap = self.store.snapshot()
        if stream.settings is not None and stream.settings == stream_settings(snap):
            self._shown_version = snap.version

    def _tell_output(self, output: Output) -> None:
        try:
            self._on_output(output)
        except Exception:  # a listener (the recorder) must never cost the show a frame
            log.exception("on_output failed")

    def _serving_now(self, stream: Stream) -> None:
        try:
            self._on_serving(stream)
        except Exception:  # whoever listens must not end the stream
            log.exception("on_serving failed")

    def _run_calls(self) -> None:
        while True:
            with self._calls_lock:
                if not self._calls:
                    return
                work, call = self._calls.popleft()
            if call.set_running_or_notify_cancel():
                try:
                    call.set_result(work(self.stream))
                except BaseException as e:  # handed to the caller
                    call.set_exception(e)

    def _idle(self) -> None:
        self.store.wait_for_change(self.store.version, self.poll_interval)

    def _switch(self, snap: Snapshot) -> Snapshot:
        """Swap in a finished background load if it is still wanted, and start the load the state
        asks for. Returns the snapshot to render with (a failed load sets the state back)."""
        finished = self._loads.take()
        if finished is not None:
            snap = self._finish_load(finished, snap)
        model, vae = snap["model"], snap["vae"]
        if (model, vae) == self.serving:
            self._failed = None
            self._loads.cancel()  # the performer went back to what serves: load nothing more
            return snap
        if model != self.serving[0]:
            key, job = ("model", model), (lambda: (self._load_stream(model, vae), vae))
        else:
            stream = self.stream
            key, job = ("vae", vae), (lambda: (stream, self._load_autoencoder(stream, vae)))
        if key != self._failed and self._loads.pending != key:
            self._failed = None
            log.info("loading %s %s in the background", *key)
            self._loads.submit(key, job)
        return snap

    def _finish_load(self, finished: Any, snap: Snapshot) -> Snapshot:
        kind, name = finished.key
        if finished.error is not None:
            serving = self.serving[0] if kind == "model" else self.serving[1]
            self.report_error(f"{kind} {name!r} failed to load, keeping {serving!r}: {finished.error}")
            if out_of_memory(finished.error) and self.stream is not None:
                finished.error.__traceback__ = None  # it holds what was loaded so far
                release_cached_memory(self.stream.device)
            self._failed = finished.key  # not retried until something else is asked for
            # Say in the state what serves, unless the performer has asked for something else since.
            # A /model request reset the vae to auto, so a failed model restores both.
            back = {"model": self.serving[0], "vae": self.serving[1]} if kind == "model" else {"vae": serving}
            try:
                self.store.apply(back, only_if={kind: name})
            except params.ParamError as e:
                log.warning("could not set the state back to what serves: %s", e)
            return self.store.snapshot()
        if snap[kind] != name:
            log.info("%s %s loaded, but %s is asked for now; not used", kind, name, snap[kind])
            return snap
        if kind == "model":
            self.stream, vae = finished.result  # the old stream's memory goes with its last reference
            self.serving = (name, vae)
            self._serving_now(self.stream)
            self._adopt_warm_up(self.stream)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("now serving model %s", name)
        else:
            stream, autoencoder = finished.result
            if stream is not self.stream:
                return snap  # loaded for a model that no longer serves
            stream.set_autoencoder(autoencoder)
            self.serving = (self.serving[0], name)
            log.info("now using autoencoder %s", name)
        self._rendered_version = 0  # render the last input again with the new model or autoencoder
        self._refused_settings = None
        self._precomputed = None
        self._precompute.cancel()  # prompts for the old stream are not wanted
        return snap

    def _step(self) -> bool:
        """Render one frame if there is something new to render; False when idle."""
        snap = self._switch(self.store.snapshot())
        new_control = self.controls.poll()  # also while paused: resuming starts from the newest control image
        if new_control and self.stream is not None:
            self.stream.refresh()  # stream batch: the frames in flight must catch up with it
        if snap["pause"]:
            self.stats.status = PAUSED
            self._take_input()  # keep draining so that resuming starts from the newest frame
            return False
        self.stats.status = READY
        staged, self._staged = self._staged, None  # an input taken while the last frame computed
        new_input = self._take_input() or staged is not None
        txt2img = snap["mode"] == TXT2IMG
        state_changed = snap.version != self._rendered_version
        stream = self.stream
        busy = stream.wants_frame
        every_frame = txt2img and snap["seed"] < 0 and not snap["seeds"]  # new noise each frame
        if txt2img:
            if not (state_changed or busy or every_frame or new_control):
                return False
        elif self._last_input is None or not (new_input or state_changed or busy or new_control):
            return False

        settings = stream_settings(snap)
        if settings != stream.settings and settings != self._refused_settings and not self._prepare(
                stream, settings, snap.version):
            # New prompts or LoRA files are being made ready on a worker: until then frames keep coming
            # with the newest settings that are ready, stamped with the version that made them.
            caught_up = self._show_ready(stream)
            if not (new_input or busy or every_frame or new_control or caught_up) or stream.settings is None:
                return False
        else:
            # Whatever happens below, this state and input count as tried: a failure is retried with the
            # next frame or state change, not in a busy loop.
            self._rendered_version = self._shown_version = snap.version
        if stream.settings is None:
            return True  # nothing usable to render with until the state changes
        self._trying = stream.settings
        frame = None if stream.settings.mode == TXT2IMG else self._last_input
        if frame is None and stream.settings.mode != TXT2IMG:
            return False  # img2img and no input yet
        raw = None
        if frame is not None:
            raw = staged[1] if staged is not None and staged[0] is frame else stream.staging.upload(frame.pixels)
            threshold = snap["similarity_threshold"]
            if not (state_changed or busy or new_control) and self._similar(raw, threshold):
                self.stats.skipped += 1
                return True
            # the filter's reference: a copy, since staging buffers are reused
            self._rendered_raw = raw.clone() if threshold > 0 else None
        started_ns = time.monotonic_ns()
        engine_started = time.perf_counter()
        controls = self.controls.images(stream.settings.width, stream.settings.height) if stream.controlnets else ()
        out = stream.launch(raw, self.output, bgr=frame is not None and frame.bgr,
                            bottom_left=frame is not None and frame.bottom_left, tag=frame, controls=controls)
        frame = stream.output_tag  # stream batch: the output belongs to an earlier input
        if stream.staging.asynchronous and stream.settings.mode != TXT2IMG and self._take_input():
            # the device is still computing: take the next input and start its upload meanwhile
            self._staged = (self._last_input, stream.staging.upload(self._last_input.pixels))
        pixels = stream.staging.download(out)
        engine_s = time.perf_counter() - engine_started
        source_ns = frame.source_ns if frame is not None else started_ns
        self.ring_out.write(pixels, frame_id=frame.frame_id if frame is not None else 0, flags=self.output_flags,
                            source_ns=source_ns, state_version=self._shown_version)
        self._fitted, self._trying = stream.settings, None
        if self._on_output is not None:
            self._tell_output(Output(pixels, frame.frame_id if frame is not None else 0, self._shown_version,
                                     stream.settings, self.serving[0], self.output, self.serving[1]))
        # Telemetry latency: from the frame's source for a new frame; a re-render of an old frame for
        # a state change counts from the change, not from when that frame was first written.
        self.stats.record(time.monotonic_ns() - (source_ns if new_input else started_ns), engine_s)
        return True

    def _prepare(self, stream: Stream, settings: StreamSettings, version: int) -> bool:
        """Prepare the stream for `settings` (of state `version`) now if that is quick, else hand the slow
        part (prompt encoding, LoRA files) to the worker and return False; the next frame after it
        finishes prepares quickly. A refusal is reported and leaves the previous settings on screen."""
        finished = self._precompute.take()
        if finished is not None and finished.key[0] == id(stream):  # an id: a key must not keep a stream alive
            self._precomputed = finished.key[1]
        try:
            slow = settings != self._precomputed and stream.slow_to_prepare(settings)
        except Exception:  # an unknown style, say: prepare below says what is wrong
            slow = False
        if slow:
            if self._precompute.pending != (id(stream), settings):
                self._precompute.submit((id(stream), settings), lambda: stream.precompute(settings))
                self._asked[settings] = version
                while len(self._asked) > _ASKED_KEPT:
                    del self._asked[next(iter(self._asked))]
            return False
        self._precomputed = None
        self._trying = settings
        try:
            stream.prepare(settings)
        except Exception as e:  # a style or LoRA that cannot be used: say so, keep the last look
            self._refused_settings = settings
            if out_of_memory(e):
                raise  # the render thread sets the state back to what fits
            self.report_error(f"settings not usable, still showing the previous ones: {type(e).__name__}: {e}")
        return True

    def _show_ready(self, stream: Stream) -> bool:
        """While the worker makes the newest settings ready, show the newest it has made ready, if newer
        than what shows: under a flood of prompts (a new one each frame, faster than they encode) the
        worker never catches up with the state, and without this the screen would show none of the
        flood's changes, seeds and strengths included, until it ends. True if what shows changed."""
        ready = self._precomputed
        version = self._asked.get(ready) if ready is not None else None
        if version is None or version <= self._shown_version or ready in (stream.settings, self._refused_settings):
            return False
        if not self._prepare(stream, ready, version) or stream.settings != ready:
            return False
        self._shown_version = version
        return True

    def _fit_memory(self, failure: str) -> str:
        """After a frame or a prepare ran out of memory: give the cached memory back, and set the
        parameters that size a frame back to those of the last frame that fitted, as a new state version
        (unless the performer has changed them since). Returns what to report."""
        stream, tried, fitted = self.stream, self._trying, self._fitted
        if stream is not None:
            release_cached_memory(stream.device)
        if tried is None:
            return failure
        back = {name: getattr(fitted, name) for name in _MEMORY_PARAMS
                if fitted is not None and getattr(tried, name) != getattr(fitted, name)}
        if not back:  # nothing to go back to: the first frame, or the same settings fitted before
            return (f"{_frame_size(tried, ())} does not fit in memory: lower the resolution or the steps, or "
                    f"free the device's memory ({failure})")
        try:
            version = self.store.apply(back, only_if={name: getattr(tried, name) for name in back})
        except params.ParamError as e:  # the state's other checks moved on meanwhile
            version = None
            log.warning("could not set the state back to what fits: %s", e)
        if version is None:  # changed again since: the next frame tries that
            return f"{_frame_size(tried, back)} does not fit in memory ({failure})"
        if self._refused_settings == tried:  # asked for again later, it is tried again: memory may be free by then
            self._refused_settings = None
        return f"{_frame_size(tried, back)} does not fit in memory; back to {_frame_size(fitted, back)}"

    def _take_input(self) -> bool:
        """Move the newest input frame, if any is new, into `_last_input`; True if one was taken."""
        last = self._last_input
        busy_buffer = last is not None and np.may_share_memory(last.pixels, self._input_buffers[0])
        try:
            frame = self._inputs.take(into=self._input_buffers[1 if busy_buffer else 0])
        except shm.RingError as e:
            self.report_error(f"input frame refused: {e}")
            return False
        if frame is None:
            return False
        if frame.width > MAX_INPUT_SIDE or frame.height > MAX_INPUT_SIDE:
            self.report_error(f"input frame refused: {frame.width}x{frame.height} has a side over {MAX_INPUT_SIDE}")
            return False
        self._last_input = frame
        return True

    def _similar(self, raw: torch.Tensor, threshold: float) -> bool:
        """True if this frame differs from the last rendered one by less than `threshold` (a fraction of
        full scale, on average); never when the filter is off (threshold 0)."""
        previous = self._rendered_raw
        if threshold <= 0 or previous is None:
            return False
        return frame_difference(raw, previous) < threshold


def _frame_size(settings: StreamSettings, names: Collection[str]) -> str:
    """The memory-sizing parameters `names` of `settings` for a performer: "1536x1536", "512x512, steps 4"."""
    parts = [f"{settings.width}x{settings.height}"]
    parts += [f"{name} {getattr(settings, name)}" for name in _MEMORY_PARAMS[2:] if name in names]
    return ", ".join(parts)


def output_format(dtype: str, channels: int, order: str, origin: str) -> OutputFormat:
    return OutputFormat(dtype=np.dtype(dtype), channels=channels, bgr=order == "bgr", bottom_left=origin == "bottom-left")
