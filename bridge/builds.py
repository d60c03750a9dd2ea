"""TensorRT engines for a daemon's configuration: which engines its settings and parameters need,
`sdbridge build`, the build in the background while torch serves, and `sdbridge doctor`'s listing.

Which backend serves, and why, is decided here once per model (`EngineService.serve`):
- backend torch, or auto where TensorRT cannot run (not installed, no NVIDIA GPU): torch, with the reason;
- the engines for the model, resolution(s), batch, precision, LoRA layers, GPU and TensorRT version are in
  the cache: they are loaded and swapped in before the first frame;
- they are not: auto serves on torch and runs `sdbridge build` as a child process (a crash or an
  out-of-memory in TensorRT's builder cannot take the show down with it; its log goes to build.log in the
  engine folder), then swaps the engines in at a frame boundary when it succeeds; backend tensorrt waits
  for that build before serving its first frame.
While engines serve, what they cannot do (a new resolution, a longer prompt, a LoRA on layers the UNet
engine cannot refit, a /vae switch) runs on torch, and the same background build makes engines for the
current state, once per cause. The child says which engines the state needs in a manifest; those are
the ones loaded (off the render thread) and swapped in.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import config
from .config import Settings

log = logging.getLogger(__name__)

TORCH, TENSORRT = "torch", "tensorrt"


def engine_dir(settings: Settings) -> Path:
    from engines.backends.tensorrt.cache import default_engine_dir
    return Path(settings.engine_dir) if settings.engine_dir else default_engine_dir()


def engine_cache(settings: Settings) -> Any:
    from engines.backends.tensorrt.cache import EngineCache
    return EngineCache(engine_dir(settings))


def engine_targets(settings: Settings, stream: Any, values: Mapping[str, Any], *, tensorrt: str | None = None,
                   autoencoder: Any = None, unet: bool = True) -> list:
    """The engines (engines.backends.tensorrt.build.Target) a stream needs for these settings and
    parameter values: the UNet per resolution and UNet batch, the autoencoder per resolution (that of
    the stream's model, or `autoencoder`: one a /vae switch is about to put in; `unet` False: the
    autoencoder's alone, which reads nothing the render thread may be changing)."""
    from engines.backends.tensorrt import build, runtime
    from engines.stream import unet_batches

    from .loop import stream_settings
    from .state import Snapshot

    current = stream_settings(Snapshot(0, dict(values)))
    resolutions = [config.parse_resolution(r) for r in settings.engine_resolutions] or [(current.width, current.height)]
    lora_targets = runtime.lora_targets(stream.model.unet) if unet and stream.loras is not None and stream.loras.loaded else ()
    model = dataclasses.replace(stream.model, autoencoder=runtime.torch_module(
        autoencoder if autoencoder is not None else stream.model.autoencoder))
    source = Path(model.source)
    stat = source.stat() if model.source and source.exists() else None
    controlnets = [runtime.torch_module(c) for c in stream.controlnets if c is not None] if unet else []
    return build.targets(model, resolutions=resolutions, controlnets=controlnets,
                         unet_batches=unet_batches(current, settings.stream_batch),
                         precision=str(stream.dtype).replace("torch.", ""), device=stream.device,
                         tokens=(stream.prompts.max_length, stream.prompt_tokens if unet else 0), dynamic=settings.engine_dynamic, lora_targets=lora_targets,
                         source_stat=[stat.st_size, stat.st_mtime_ns] if stat else [], tensorrt=tensorrt, unet=unet)


# ---------------------------------------------------------------------------------------- sdbridge build
def run_build(settings: Settings, initial: Mapping[str, Any], *, onnx_only: bool = False,
              background: bool = False, manifest: str | None = None) -> int:
    """`sdbridge build`: load the configured model, then export, clean and build every engine it needs
    that is not cached. Returns the exit status. `background`: beside a running show (lower priority, a
    smaller TensorRT workspace)."""
    import torch

    from engines import controlnet as controlnets
    from engines import registry
    from engines.backends import tensorrt
    from engines.backends.tensorrt import build
    from engines.folders import ModelFolders
    from engines.stream import Stream

    from .loop import stream_settings
    from .state import Snapshot

    device = registry.pick_device(settings.device)
    if background and hasattr(os, "nice"):
        os.nice(10)
    if not onnx_only:
        reason = tensorrt.unusable_reason(device)
        if reason is not None:
            print(f"sdbridge build: {reason}\n(--onnx-only exports and cleans the ONNX graphs without TensorRT)",
                  file=sys.stderr)
            return 2
    dtype = registry.pick_dtype(settings.dtype, device)
    folders = ModelFolders(settings.models_dir)
    values = {**{p.name: p.default for p in config.initial_params()}, **initial, "model": settings.model}
    model = registry.load(settings.model, device, dtype, folders=folders, allow_pickle=settings.allow_pickle,
                          vae=values.get("vae", "auto"))
    stream = Stream(model, device, dtype, stream_batch=settings.stream_batch,
                    find_lora=lambda name: folders.find("loras", name), allow_pickle=settings.allow_pickle)
    stream.set_controlnets(controlnets.load_each(settings.controlnets, model, folders, device, dtype,
                                                 allow_pickle=settings.allow_pickle))
    with torch.inference_mode():
        stream.prepare(stream_settings(Snapshot(0, values)))  # loads the configured LoRAs: their layers go in the key
    targets = engine_targets(settings, stream, values, tensorrt="" if onnx_only else None)
    if stream.loras is not None:  # the export must see the plain UNet
        for name in stream.loras.loaded:
            stream.loras.unload(name)
    cache = engine_cache(settings)
    log.info("building %s for %s in %s", "ONNX graphs" if onnx_only else "TensorRT engines", model.name, cache.root)
    started = time.perf_counter()
    made = build.build(targets, cache, onnx_only=onnx_only, device=device,
                       workspace_fraction=build.BACKGROUND_WORKSPACE_FRACTION if background else build.WORKSPACE_FRACTION)
    for path in made:
        log.info("ready: %s", path)
    if manifest and not onnx_only:  # for the daemon that asked: exactly which engines to load
        Path(manifest).write_text(json.dumps([str(cache.record_path(t.key)) for t in targets]))
    print(f"sdbridge build: {len(made)} {'ONNX graphs' if onnx_only else 'engines'} ready in {cache.root} "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    return 0


# ---------------------------------------------------------------------------------------- serving
@dataclass
class _Serving:
    """What the engines do for one stream."""

    backend: str = TORCH
    reason: str = ""
    attached: Any = None  # engines.backends.tensorrt.runtime.Attached
    asked: set[str] = field(default_factory=set)  # what asked for a build since the last attach (never twice)


class EngineService:
    """Which backend serves a daemon's stream, and the TensorRT engines' life: found, built, attached.

    State is kept per stream: a model switch loads a new stream on a worker while the old one serves, and
    the loop says which one serves (`activate`, on the render thread). One build runs at a time, for the
    newest request; a request for another stream stops a running build (its finished stages stay cached).
    Engines are swapped in only on the render thread, between frames, into the stream they were built for,
    and `runtime.attach` uses only engines built from that stream's very weights."""

    def __init__(self, settings: Settings, values: Callable[[], Mapping[str, Any]],
                 between_frames: Callable[[Callable[[Any], Any]], Any], device: Any):
        from engines.backends import tensorrt

        self.settings = settings
        self._values = values  # the parameter state now
        self._between_frames = between_frames
        self.build_in_background = True  # False: missing engines are reported, not built (benchmarks)
        self._streams: weakref.WeakKeyDictionary[Any, _Serving] = weakref.WeakKeyDictionary()
        self._current: Callable[[], Any] = lambda: None  # weak reference to the stream that serves
        self._lock = threading.Lock()
        self._wanted: tuple[Callable[[], Any], list | None] | None = None  # (stream ref, targets or None)
        self._building_for: Callable[[], Any] = lambda: None
        self._builder: threading.Thread | None = None
        self._build_lock = threading.Lock()  # one child build at a time
        self._processes: set[subprocess.Popen] = set()
        self._stopping = False
        self.wanted = False
        if settings.backend == TORCH:
            self._reason = "backend = torch"
            return
        problem = tensorrt.unusable_reason(device)
        if problem is not None:
            if settings.backend == TENSORRT:
                from engines.bundle import ModelError
                raise ModelError(f"backend = tensorrt: {problem}")
            self._reason = f"TensorRT cannot serve here: {problem}"
            return
        self.wanted = True
        self._reason = "no model loaded yet"

    # ------------------------------------------------------------------ what serves
    def _state(self, stream: Any) -> _Serving:
        state = self._streams.get(stream)
        if state is None:
            state = self._streams[stream] = _Serving(reason=self._reason)
        return state

    def describe(self, stream: Any = None) -> str:
        """What serves the stream (default: the one serving now) and why, for the log and /sdbridge/backend."""
        stream = stream if stream is not None else self._current()
        state = self._streams.get(stream) if stream is not None else None
        return f"{state.backend} ({state.reason})" if state is not None else f"{TORCH} ({self._reason})"

    @property
    def attached(self) -> Any:
        """The current stream's engines (engines.backends.tensorrt.runtime.Attached), or None."""
        stream = self._current()
        state = self._streams.get(stream) if stream is not None else None
        return state.attached if state is not None else None

    @property
    def refit_ms(self) -> float:
        """How long the last LoRA weight change took to refit into the UNet engine (0: none yet)."""
        attached = self.attached
        refit = attached.unet.refit if attached is not None else None
        return refit.last_s * 1000 if refit is not None else 0.0

    def activate(self, stream: Any) -> None:
        """`stream` serves from now on (the render thread says so): builds for any other stream stop."""
        with self._lock:
            self._current = weakref.ref(stream)
            wanted = self._wanted[0]() if self._wanted is not None else None
            if wanted is not None and wanted is not stream:
                self._wanted = None
            building = self._building_for()
        if building is not None and building is not stream:
            self._terminate_builds()
        log.info("backend: %s", self.describe())

    # ------------------------------------------------------------------ a model is loaded
    def serve(self, stream: Any) -> bool:
        """After a model is loaded, before it serves (on the thread that loads it): attach its engines if
        they are built, else build them (before serving with backend tensorrt, in the background with
        auto). True if engines serve it."""
        state = self._state(stream)
        if not self.wanted:
            return False
        try:
            cache = engine_cache(self.settings)
            targets = engine_targets(self.settings, stream, self._values())
            missing = [t for t in targets if not cache.has_engine(t.key)]
            if not missing:
                return self._attach(stream, self._loader(stream.device, cache, [cache.record_path(t.key) for t in targets]),
                                    f"engines found in {cache.root}")
            labels = ", ".join(t.label for t in missing)
            if self.settings.backend == TENSORRT:
                log.info("building TensorRT engines before serving: %s", labels)
                built = self._build(cache, stream.model.source, background=self._current() is not None)
                if built is None:
                    from engines.bundle import ModelError
                    raise ModelError(f"the TensorRT engine build failed; see {cache.root / 'build.log'}")
                return self._attach(stream, self._loader(stream.device, cache, built), "engines built at start")
        except Exception as e:
            from engines.bundle import ModelError
            if isinstance(e, ModelError):
                raise
            state.reason = f"the TensorRT engines could not be prepared ({type(e).__name__}: {e}); torch serves"
            log.exception("TensorRT engines could not be prepared")
            return False
        if not self.build_in_background:
            state.reason = f"no engines built for this configuration ({labels}; sdbridge build makes them)"
            return False
        state.reason = f"building TensorRT engines in the background ({labels}); torch serves meanwhile"
        self._queue_build(stream, targets)
        return False

    def autoencoder_for(self, stream: Any, autoencoder: Any) -> Any:
        """A /vae switch (on the worker that loaded `autoencoder`): the autoencoder on its engines if they
        are built, else the torch one while they build in the background."""
        if not self.wanted or self._current() is not stream:
            return autoencoder
        state = self._state(stream)
        from engines.backends.tensorrt import runtime

        cache = engine_cache(self.settings)
        try:
            parts = engine_targets(self.settings, stream, self._values(), autoencoder=autoencoder, unet=False)
            if all(cache.has_engine(t.key) for t in parts):
                loaded = runtime.load(cache, [cache.record(t.key) for t in parts], stream.device)
                return runtime.autoencoder(loaded, autoencoder, on_missing=self._missing_for(stream))
        except Exception as e:
            log.error("the autoencoder's TensorRT engines could not be used (%s); it runs on torch", e)
            return autoencoder
        if self.build_in_background:
            state.reason = (f"the new autoencoder runs on torch while its engines build in the background "
                            f"({', '.join(t.label for t in parts)})")
            self._queue_build(stream, None)  # the targets, once the new autoencoder serves
        return autoencoder

    def _missing_for(self, stream: Any) -> Callable[[str], None]:
        ref = weakref.ref(stream)

        def on_missing(what: str) -> None:
            current = ref()
            if current is not None:
                self._on_missing(current, what)
        return on_missing

    def _on_missing(self, stream: Any, what: str) -> None:
        """Engines serve, but part of the work runs on torch (a new resolution, a longer prompt, a LoRA on
        layers the engine cannot refit, a failed engine): build what covers the current state, once per
        cause until engines are attached again. Called on the render thread."""
        state = self._state(stream)
        state.reason = f"engines serve; {what} runs on torch"
        if not self.build_in_background or what in state.asked or self._current() is not stream:
            return
        state.asked.add(what)
        state.reason += "; building engines for it in the background"
        log.info("backend: %s", state.reason)
        self._queue_build(stream, None)

    # ------------------------------------------------------------------ background builds
    def _queue_build(self, stream: Any, targets: list | None) -> None:
        """Build in the background what the state needs; only the newest request waits. `targets`: what
        serve computed; None: computed on the render thread when the build starts."""
        with self._lock:
            if self._stopping:
                return
            self._wanted = (weakref.ref(stream), targets)
            building = self._building_for()
            if self._builder is None:
                self._builder = threading.Thread(target=self._builds, daemon=True, name="sdbridge-engine-build")
                self._builder.start()
        if building is not None and building is not stream:
            self._terminate_builds()  # a build for a stream nobody wants any more

    def _builds(self) -> None:
        """The build thread: one request after the other until none waits."""
        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
                if wanted is None or self._stopping:
                    self._builder = None
                    return
            try:
                self._build_then_attach(*wanted)
            except Exception:  # the thread must live on for the next request
                log.exception("background engine build failed")
            finally:
                self._building_for = lambda: None

    def _build_then_attach(self, ref: Callable[[], Any], targets: list | None) -> None:
        stream = ref()
        if stream is None:
            return
        self._building_for = ref
        state, device, source = self._state(stream), stream.device, stream.model.source
        stream = None  # only weak references from here: a model switched meanwhile can go during the build
        cache = engine_cache(self.settings)
        if targets is None:  # the stream serves: read its state on the render thread, between frames
            targets = self._between_frames(
                lambda current: engine_targets(self.settings, current, self._values()) if current is ref() else None)
            if targets is None:
                return
        if all(cache.has_engine(t.key) for t in targets):
            records = [str(cache.record_path(t.key)) for t in targets]
        else:
            records = self._build(cache, source, background=True)
        with self._lock:
            superseded = self._wanted is not None or self._stopping
        if superseded or ref() is None:
            return  # another request came meanwhile: that one now
        if records is None:
            state.reason = f"the TensorRT engine build failed (see {cache.root / 'build.log'}); " + (
                "torch serves" if state.attached is None else "the engines serve what they cover")
            log.error("backend: %s", state.reason)
            return
        attached = state.attached
        if attached is not None and sorted(r.key.digest() for r in attached.loaded.records) == \
                sorted(Path(r).stem.split("-", 1)[1] for r in records):
            return  # the engines that serve are what the state needs: nothing new (and no build loop)
        loaded = self._loader(device, cache, records)()

        def swap(current: Any) -> None:
            if current is ref():  # the stream still serves
                self._attach(current, lambda: loaded, "engines built in the background, swapped in at a frame boundary")
        self._between_frames(swap)

    @staticmethod
    def _loader(device: Any, cache: Any, record_paths: list) -> Callable[[], Any]:
        from engines.backends.tensorrt import runtime
        from engines.backends.tensorrt.cache import EngineRecord

        def load() -> Any:
            records = [EngineRecord.from_json(json.loads(Path(p).read_text())) for p in record_paths]
            return runtime.load(cache, records, device)
        return load

    def _attach(self, stream: Any, load: Callable[[], Any], why: str) -> bool:
        from engines.backends.tensorrt import runtime

        state = self._state(stream)
        try:
            attached = runtime.attach(stream, load(), on_missing=self._missing_for(stream))
        except Exception as e:  # a corrupt, incompatible or mismatched engine must not stop the show
            state.reason = f"the TensorRT engines could not be used ({e}); " + (
                "torch serves" if state.attached is None else "the engines before serve on")
            log.error("backend: %s", state.reason)
            return False
        state.attached, state.backend, state.reason = attached, TENSORRT, why
        state.asked.clear()
        log.info("backend: %s (%s)", TENSORRT, why)
        return True

    def _build(self, cache: Any, source: str, *, background: bool) -> list[str] | None:
        """Run `sdbridge build` as a child process for the model asked for now (else the one loaded from
        `source`) and the current state; its output goes to build.log. Returns the record files of the
        engines it made or found, None if it failed."""
        values = dict(self._values())
        settings = dataclasses.replace(self.settings, model=values.get("model") or source or self.settings.model)
        with self._build_lock, tempfile.TemporaryDirectory(prefix="sdbridge-build-", ignore_cleanup_errors=True) as folder:
            config_path, manifest = Path(folder) / "config.toml", Path(folder) / "engines.json"
            config_path.write_text(config.to_toml(settings, values))
            command = [sys.executable, "-m", "bridge.cli", "build", "--config", str(config_path),
                       "--manifest", str(manifest)] + (["--background"] if background else [])
            cache.root.mkdir(parents=True, exist_ok=True)
            log_path = cache.root / "build.log"
            started = time.monotonic()
            flags = 0
            if os.name == "nt" and background:  # os.nice is POSIX's; Windows takes a priority class
                flags = subprocess.BELOW_NORMAL_PRIORITY_CLASS | subprocess.CREATE_NO_WINDOW
            with open(log_path, "ab") as log_file:
                log.info("engine build: %s (log: %s)", " ".join(command), log_path)
                with self._lock:
                    if self._stopping:
                        return None
                    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, creationflags=flags)
                    self._processes.add(process)
                try:
                    status = process.wait()
                finally:
                    with self._lock:
                        self._processes.discard(process)
            log.info("engine build finished in %.0f s with status %d", time.monotonic() - started, status)
            if status != 0 or not manifest.is_file():
                return None
            return json.loads(manifest.read_text())

    def _terminate_builds(self) -> None:
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            if process.poll() is None:
                log.info("stopping the engine build (pid %d): it is for a model that no longer serves", process.pid)
                process.terminate()

    def stop(self) -> None:
        """Stop every running build (the daemon is stopping); their finished stages stay cached."""
        with self._lock:
            self._stopping = True
            self._wanted = None
            processes = list(self._processes)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()


# ---------------------------------------------------------------------------------------- doctor
def doctor(settings: Settings) -> str:
    """What this machine can run and which built engines are stale, for `sdbridge doctor`."""
    import platform

    import torch

    from engines.backends import tensorrt
    from engines.backends.tensorrt import build

    lines = [f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    gpu, capability = build.gpu_identity(device)
    lines.append(f"GPU: {gpu} (compute capability {capability})" if cuda else "GPU: none (torch sees no CUDA device)")
    version = ""
    try:
        version = str(tensorrt.load().__version__)
        lines.append(f"TensorRT {version}")
    except tensorrt.TensorRTUnavailable as e:
        lines.append(f"TensorRT: not usable: {e}")
    for module in ("onnx", "onnxruntime", "onnx_graphsurgeon", "polygraphy"):
        try:
            found = __import__(module)
            lines.append(f"{module} {getattr(found, '__version__', '')}".rstrip())
        except ImportError:
            lines.append(f"{module}: not installed (pip install \"sdbridge[tensorrt]\")")
    lines.append(f"backend = {settings.backend}: " + (
        "torch" if settings.backend == TORCH else
        ("TensorRT engines where built, else torch while they build" if version and cuda else
         "torch (TensorRT cannot run here)" if settings.backend == "auto" else "refused: TensorRT cannot run here")))
    cache = engine_cache(settings)
    records = cache.records()
    lines.append(f"engines in {cache.root}: {len(records) or 'none'}")
    for plan, record in records:
        lines.append("  " + _engine_line(plan, record, version, capability))
    return "\n".join(lines)


def _engine_line(plan: Path, record: Any, version: str, capability: str) -> str:
    if record is None:
        return f"{plan.name}: unreadable record (delete it; sdbridge build remakes it)"
    key = record.key
    size = plan.stat().st_size / 2**20
    what = f"{key.component} of {record.model or '?'} at {', '.join(map(str, key.profiles))} ({key.precision}, {size:.0f} MB)"
    stale = []
    if key.tensorrt != version:
        stale.append(f"built with TensorRT {key.tensorrt}, installed: {version or 'none'}")
    if key.compute_capability != capability:
        stale.append(f"built for compute capability {key.compute_capability}, this GPU: {capability or 'none'}")
    source = Path(record.model) if record.model else None
    if record.source_stat and source is not None and source.exists():
        stat = source.stat()
        if [stat.st_size, stat.st_mtime_ns] != list(record.source_stat):
            stale.append("the model file changed since")
    from engines.backends.tensorrt.cache import EXPORT_VERSION
    if key.export_version != EXPORT_VERSION:
        stale.append("made by an older sdbridge export")
    return f"{what}: " + ("STALE: " + "; ".join(stale) if stale else "current")
