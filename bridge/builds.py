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
"""
from __future__ import annotations

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


def engine_targets(settings: Settings, stream: Any, values: Mapping[str, Any], *, tensorrt: str | None = None) -> list:
    """The engines (engines.backends.tensorrt.build.Target) a stream needs for these settings and
    parameter values: the UNet per resolution and UNet batch, the autoencoder per resolution."""
    from engines.backends.tensorrt import build, runtime
    from engines.stream import unet_batches

    from .loop import stream_settings
    from .state import Snapshot

    current = stream_settings(Snapshot(0, dict(values)))
    resolutions = [config.parse_resolution(r) for r in settings.engine_resolutions] or [(current.width, current.height)]
    lora_targets = runtime.lora_targets(stream.model.unet) if stream.loras is not None and stream.loras.loaded else ()
    source = Path(stream.model.source)
    stat = source.stat() if stream.model.source and source.exists() else None
    return build.targets(stream.model, resolutions=resolutions,
                         unet_batches=unet_batches(current, settings.stream_batch),
                         precision=str(stream.dtype).replace("torch.", ""), device=stream.device,
                         dynamic=settings.engine_dynamic, lora_targets=lora_targets,
                         source_stat=[stat.st_size, stat.st_mtime_ns] if stat else [], tensorrt=tensorrt)


# ---------------------------------------------------------------------------------------- sdbridge build
def run_build(settings: Settings, initial: Mapping[str, Any], *, onnx_only: bool = False,
              background: bool = False) -> int:
    """`sdbridge build`: load the configured model, then export, clean and build every engine it needs
    that is not cached. Returns the exit status. `background`: beside a running show (lower priority, a
    smaller TensorRT workspace)."""
    import torch

    from engines import registry
    from engines.backends import tensorrt
    from engines.backends.tensorrt import build
    from engines.backends.tensorrt.cache import EngineCache
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
    cache = EngineCache(engine_dir(settings))
    log.info("building %s for %s in %s", "ONNX graphs" if onnx_only else "TensorRT engines", model.name, cache.root)
    started = time.perf_counter()
    made = build.build(targets, cache, onnx_only=onnx_only, device=device,
                       workspace_fraction=build.BACKGROUND_WORKSPACE_FRACTION if background else build.WORKSPACE_FRACTION)
    for path in made:
        log.info("ready: %s", path)
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
        self._wanted: tuple[Any, Any, list] | None = None  # the newest (stream, cache, targets) to build for
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
        from engines.backends.tensorrt import runtime
        from engines.backends.tensorrt.cache import EngineCache

        cache = EngineCache(engine_dir(self.settings))
        targets = engine_targets(self.settings, stream, self._values())
        missing = [t for t in targets if not cache.has_engine(t.key)]
        if not missing:
            return self._attach(stream, lambda: runtime.load(cache, [cache.record(t.key) for t in targets],
                                                            stream.device), f"engines found in {cache.root}")
        labels = ", ".join(t.label for t in missing)
        if self.settings.backend == TENSORRT:
            log.info("building TensorRT engines before serving: %s", labels)
            if self._build(cache, background=False) != 0:
                from engines.bundle import ModelError
                raise ModelError(f"the TensorRT engine build failed; see {cache.root / 'build.log'}")
            return self._attach(stream, lambda: runtime.load(cache, [cache.record(t.key) for t in targets],
                                                            stream.device), "engines built at start")
        if not self.build_in_background:
            self.reason = f"no engines built for this configuration ({labels}; sdbridge build makes them)"
            log.info("backend: %s", self.describe())
            return False
        self.reason = f"building TensorRT engines in the background ({labels}); torch serves meanwhile"
        log.info("backend: %s", self.describe())
        with self._lock:
            self._wanted = (stream, cache, targets)
            if self._builder is None:
                self._builder = threading.Thread(target=self._build_then_attach, daemon=True,
                                                 name="sdbridge-engine-build")
                self._builder.start()
        return False

    def _build_then_attach(self) -> None:
        from engines.backends.tensorrt import runtime

        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
                if wanted is None or self._stopping:
                    self._builder = None
                    return
            stream, cache, targets = wanted
            status = 0 if all(cache.has_engine(t.key) for t in targets) else self._build(cache, background=True)
            with self._lock:
                superseded = self._wanted is not None
            if superseded or self._stopping:
                continue  # another model was asked for meanwhile: that one now
            if status != 0:
                self.reason = (f"the TensorRT engine build failed (exit {status}; see {cache.root / 'build.log'}); "
                               "torch serves")
                log.error("backend: %s", self.describe())
                continue
            if not all(cache.has_engine(t.key) for t in targets):
                self.reason = "the build made engines for other settings (they changed meanwhile); torch serves"
                log.warning("backend: %s", self.describe())
                continue
            try:  # the slow part here, off the render thread; only the swap waits for a frame boundary
                loaded = runtime.load(cache, [cache.record(t.key) for t in targets], stream.device)
            except Exception as e:
                self.reason = f"the TensorRT engines could not be loaded ({e}); torch serves"
                log.error("backend: %s", self.describe())
                continue

            def swap(current: Any, stream=stream, loaded=loaded) -> None:
                if current is stream:  # the model was not switched meanwhile
                    self._attach(current, lambda: loaded,
                                 "engines built in the background, swapped in at a frame boundary")
            self._between_frames(swap)

    def _attach(self, stream: Any, load: Callable[[], Any], why: str) -> bool:
        from engines.backends.tensorrt import runtime

        try:
            self.attached = runtime.attach(stream, load(), on_missing=self._on_missing)
        except Exception as e:  # a corrupt or incompatible engine must not stop the show
            self.backend, self.reason = TORCH, f"the TensorRT engines could not be loaded ({e}); torch serves"
            log.error("backend: %s", self.describe())
            return False
        self.backend, self.reason = TENSORRT, why
        log.info("backend: %s", self.describe())
        return True

    def _on_missing(self, what: str) -> None:
        self.reason = f"engines serve; {what} runs on torch (sdbridge build makes an engine for it)"

    def _build(self, cache: Any, *, background: bool) -> int:
        """Run `sdbridge build` for these settings as a child process; its output goes to build.log."""
        cache.root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(config.to_toml(self.settings, self._values()))
            config_path = f.name
        log_path = cache.root / "build.log"
        started = time.monotonic()
        command = [sys.executable, "-m", "bridge.cli", "build", "--config", config_path]
        if background:
            command.append("--background")
        try:
            with open(log_path, "ab") as log_file:
                log.info("engine build: %s (log: %s)", " ".join(command), log_path)
                with self._lock:
                    if self._stopping:
                        return 1
                    self.build_process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                                          stdin=subprocess.DEVNULL)
                status = self.build_process.wait()
        finally:
            os.unlink(config_path)
        log.info("engine build finished in %.0f s with status %d", time.monotonic() - started, status)
        return status

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
