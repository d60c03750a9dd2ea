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
                   autoencoder: Any = None) -> list:
    """The engines (engines.backends.tensorrt.build.Target) a stream needs for these settings and
    parameter values: the UNet per resolution and UNet batch, the autoencoder per resolution (that of
    the stream's model, or `autoencoder`: one a /vae switch is about to put in)."""
    from engines.backends.tensorrt import build, runtime
    from engines.stream import unet_batches

    from .loop import stream_settings
    from .state import Snapshot

    current = stream_settings(Snapshot(0, dict(values)))
    resolutions = [config.parse_resolution(r) for r in settings.engine_resolutions] or [(current.width, current.height)]
    lora_targets = runtime.lora_targets(stream.model.unet) if stream.loras is not None and stream.loras.loaded else ()
    model = stream.model
    if autoencoder is not None:
        model = dataclasses.replace(model, autoencoder=getattr(autoencoder, "fallback", autoencoder))
    elif isinstance(model.autoencoder, runtime.TrtAutoencoder):
        model = dataclasses.replace(model, autoencoder=model.autoencoder.fallback)
    source = Path(model.source)
    stat = source.stat() if model.source and source.exists() else None
    return build.targets(model, resolutions=resolutions,
                         unet_batches=unet_batches(current, settings.stream_batch),
                         precision=str(stream.dtype).replace("torch.", ""), device=stream.device,
                         tokens=(stream.prompts.max_length, stream.prompt_tokens), dynamic=settings.engine_dynamic, lora_targets=lora_targets,
                         source_stat=[stat.st_size, stat.st_mtime_ns] if stat else [], tensorrt=tensorrt)


# ---------------------------------------------------------------------------------------- sdbridge build
def run_build(settings: Settings, initial: Mapping[str, Any], *, onnx_only: bool = False,
              background: bool = False, manifest: str | None = None) -> int:
    """`sdbridge build`: load the configured model, then export, clean and build every engine it needs
    that is not cached. Returns the exit status. `background`: beside a running show (lower priority, a
    smaller TensorRT workspace)."""
    import torch

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
class EngineService:
    """Which backend serves a daemon's stream, and the TensorRT engines' life: found, built, attached.

    One background build runs at a time. A model switched while one runs is remembered, and the build
    thread goes on with it when the running build ends: only the newest stream gets engines."""

    def __init__(self, settings: Settings, initial_values: Callable[[], Mapping[str, Any]],
                 between_frames: Callable[[Callable[[Any], Any]], None], device: Any):
        from engines.backends import tensorrt

        self.settings = settings
        self._values = initial_values
        self._between_frames = between_frames
        self.backend = TORCH
        self.reason = ""
        self.build_in_background = True  # False: missing engines are reported, not built (benchmarks)
        self.build_process: subprocess.Popen | None = None
        self.attached: Any = None  # engines.backends.tensorrt.runtime.Attached, while engines serve
        self._lock = threading.Lock()
        self._wanted: tuple[Any, Any] | None = None  # the newest (stream, cache) to build for
        self._asked: set[str] = set()  # what already asked for a build (never twice: no build loops)
        self._builder: threading.Thread | None = None
        self._stopping = False
        self.wanted = False
        if settings.backend == TORCH:
            self.reason = "backend = torch"
            return
        problem = tensorrt.unusable_reason(device)
        if problem is not None:
            if settings.backend == TENSORRT:
                from engines.bundle import ModelError
                raise ModelError(f"backend = tensorrt: {problem}")
            self.reason = f"TensorRT cannot serve here: {problem}"
            return
        self.wanted = True
        self.reason = "starting"

    def describe(self) -> str:
        return f"{self.backend} ({self.reason})"

    @property
    def refit_ms(self) -> float:
        """How long the last LoRA weight change took to refit into the UNet engine (0: none yet)."""
        refit = self.attached.unet.refit if self.attached is not None else None
        return refit.last_s * 1000 if refit is not None else 0.0

    def serve(self, stream: Any) -> bool:
        """After a model is loaded (on the thread that loads it): attach its engines if they are built,
        else build them (waiting for the build with backend tensorrt, in the background with auto).
        True if engines serve from now on."""
        self.attached = None
        self.backend = TORCH
        if not self.wanted:
            log.info("backend: %s", self.describe())
            return False
        cache = engine_cache(self.settings)
        targets = engine_targets(self.settings, stream, self._values())
        missing = [t for t in targets if not cache.has_engine(t.key)]
        if not missing:
            return self._attach(stream, self._load(stream, cache, [cache.record_path(t.key) for t in targets]),
                                f"engines found in {cache.root}")
        labels = ", ".join(t.label for t in missing)
        if self.settings.backend == TENSORRT:
            log.info("building TensorRT engines before serving: %s", labels)
            built = self._build(cache, background=False)
            if built is None:
                from engines.bundle import ModelError
                raise ModelError(f"the TensorRT engine build failed; see {cache.root / 'build.log'}")
            return self._attach(stream, self._load(stream, cache, built), "engines built at start")
        if not self.build_in_background:
            self.reason = f"no engines built for this configuration ({labels}; sdbridge build makes them)"
            log.info("backend: %s", self.describe())
            return False
        self.reason = f"building TensorRT engines in the background ({labels}); torch serves meanwhile"
        log.info("backend: %s", self.describe())
        self._queue_build(stream, cache)
        return False

    def autoencoder_for(self, stream: Any, autoencoder: Any) -> Any:
        """A /vae switch while engines serve (on the worker that loaded `autoencoder`): the autoencoder
        on its engines if they are built, else the torch one while they build in the background (the
        build then swaps the stream's engines in again, this autoencoder's included)."""
        if self.attached is None or self.attached.unet.fallback is not stream.model.unet:
            return autoencoder
        from engines.backends.tensorrt import export, runtime

        cache = engine_cache(self.settings)
        targets = engine_targets(self.settings, stream, self._values(), autoencoder=autoencoder)
        parts = [t for t in targets if t.key.component in (export.VAE_ENCODER, export.VAE_DECODER)]
        if all(cache.has_engine(t.key) for t in parts):
            try:
                loaded = runtime.load(cache, [cache.record(t.key) for t in parts], stream.device)
                return runtime.autoencoder(loaded, autoencoder, on_missing=self._on_missing)
            except Exception as e:
                log.error("the autoencoder's TensorRT engines could not be loaded (%s); it runs on torch", e)
                return autoencoder
        if self.build_in_background:
            self.reason = (f"engines serve the UNet; the new autoencoder runs on torch while its engines build "
                           f"in the background ({', '.join(t.label for t in parts)})")
            log.info("backend: %s", self.describe())
            self._queue_build(stream, cache)
        return autoencoder

    def _on_missing(self, what: str) -> None:
        """Engines serve, but part of the work runs on torch (a new resolution, a LoRA on layers the engine
        cannot refit, a longer prompt): build what covers the current state, once per cause."""
        self.reason = f"engines serve; {what} runs on torch"
        attached = self.attached
        if attached is None or not self.build_in_background or what in self._asked:
            log.info("backend: %s", self.describe())
            return
        self._asked.add(what)
        self.reason += "; building engines for it in the background"
        log.info("backend: %s", self.describe())
        self._queue_build(attached.stream, engine_cache(self.settings))

    def _queue_build(self, stream: Any, cache: Any) -> None:
        """Build, in the background, the engines the current state needs; only the newest request waits."""
        with self._lock:
            self._wanted = (stream, cache)
            if self._builder is None:
                self._builder = threading.Thread(target=self._build_then_attach, daemon=True,
                                                 name="sdbridge-engine-build")
                self._builder.start()

    def _build_then_attach(self) -> None:
        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
                if wanted is None or self._stopping:
                    self._builder = None
                    return
            stream, cache = wanted
            built = self._build(cache, background=True)
            with self._lock:
                superseded = self._wanted is not None
            if superseded or self._stopping:
                continue  # another model or state was asked for meanwhile: that one now
            if built is None:
                self.reason = f"the TensorRT engine build failed (see {cache.root / 'build.log'}); " + (
                    "torch serves" if self.attached is None else "the engines serve what they cover")
                log.error("backend: %s", self.describe())
                continue
            try:  # the slow part here, off the render thread; only the swap waits for a frame boundary
                loaded = self._load(stream, cache, built)()
            except Exception as e:
                self.reason = f"the TensorRT engines could not be loaded ({e})"
                log.error("backend: %s", self.describe())
                continue

            def swap(current: Any, stream=stream, loaded=loaded) -> None:
                if current is stream:  # the model was not switched meanwhile
                    self._attach(current, lambda: loaded,
                                 "engines built in the background, swapped in at a frame boundary")
            self._between_frames(swap)

    @staticmethod
    def _load(stream: Any, cache: Any, record_paths: list) -> Callable[[], Any]:
        from engines.backends.tensorrt import runtime
        from engines.backends.tensorrt.cache import EngineRecord

        def load() -> Any:
            records = [EngineRecord.from_json(json.loads(Path(p).read_text())) for p in record_paths]
            return runtime.load(cache, records, stream.device)
        return load

    def _attach(self, stream: Any, load: Callable[[], Any], why: str) -> bool:
        from engines.backends.tensorrt import runtime

        try:
            attached = runtime.attach(stream, load(), on_missing=self._on_missing)
        except Exception as e:  # a corrupt or incompatible engine must not stop the show
            self.attached = None
            self.backend, self.reason = TORCH, f"the TensorRT engines could not be loaded ({e}); torch serves"
            log.error("backend: %s", self.describe())
            return False
        self.attached = attached
        self.backend, self.reason = TENSORRT, why
        log.info("backend: %s", self.describe())
        return True

    def _build(self, cache: Any, *, background: bool) -> list[str] | None:
        """Run `sdbridge build` for the current settings and state as a child process (its output goes to
        build.log); returns the record files of the engines it made or found, None if it failed."""
        cache.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sdbridge-build-") as folder:
            config_path, manifest = Path(folder) / "config.toml", Path(folder) / "engines.json"
            config_path.write_text(config.to_toml(self.settings, self._values()))
            command = [sys.executable, "-m", "bridge.cli", "build", "--config", str(config_path),
                       "--manifest", str(manifest)] + (["--background"] if background else [])
            log_path = cache.root / "build.log"
            started = time.monotonic()
            with open(log_path, "ab") as log_file:
                log.info("engine build: %s (log: %s)", " ".join(command), log_path)
                with self._lock:
                    if self._stopping:
                        return None
                    self.build_process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                                          stdin=subprocess.DEVNULL)
                status = self.build_process.wait()
            log.info("engine build finished in %.0f s with status %d", time.monotonic() - started, status)
            if status != 0 or not manifest.is_file():
                return None
            return json.loads(manifest.read_text())

    def stop(self) -> None:
        """Stop a running build (the daemon is stopping); its finished stages stay cached."""
        with self._lock:
            self._stopping = True
            self._wanted = None
            process = self.build_process
        if process is not None and process.poll() is None:
            process.terminate()


# ---------------------------------------------------------------------------------------- doctor
def doctor(settings: Settings) -> str:
    """What this machine can run and which built engines are stale, for `sdbridge doctor`."""
    import platform

    import torch

    from engines.backends import tensorrt
    from engines.backends.tensorrt import build
    from engines.backends.tensorrt.cache import EngineCache

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
    cache = EngineCache(engine_dir(settings))
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
