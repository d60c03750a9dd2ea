"""Building engines: ONNX export, clean-up and the TensorRT build, stage by stage, cached and resumable.

`targets(...)` says which engines a stream needs (the UNet at each resolution and batch, the autoencoder's
encoder and decoder, ControlNets) with their keys; `build(targets, cache)` makes each one that is
missing, skipping every stage whose file is already in the cache, so an interrupted build resumes where it
stopped. Every stage shows a progress bar with an ETA on a terminal and logs its start and its time:
the export counts the modules traced, TensorRT's build reports its own phases through
`IProgressMonitor` (TensorRT 10). The timing cache (TensorRT's measurements of each kernel tactic) is kept
per GPU and TensorRT version, so later builds on that GPU skip most of their measuring.

Engines are strongly typed (the ONNX graph's float16 / float32 types are the engine's: no precision
flags, no implicit casts), with one static optimization profile per resolution and batch (the fastest
engine, and the one a CUDA graph can replay) and optionally one dynamic profile for any shape between
two bounds. An engine whose UNet a LoRA changes is built with those weights refittable: a LoRA weight
change is then a refit of a few hundred weights (runtime.py), never a rebuild.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import export as onnx_export
from . import load as load_tensorrt
from .cache import (EngineCache, EngineKey, EngineRecord, lora_layers_digest, sweep, weights_fingerprint,
                    write_atomically)
from .export import Component, Profile

log = logging.getLogger(__name__)

WORKSPACE_FRACTION = 0.75  # of the GPU's free memory the builder may use for trying tactics
BACKGROUND_WORKSPACE_FRACTION = 0.3  # the same beside a running show, which must keep its memory


@dataclass
class Target:
    """One engine to build: its key, the component to export, and what the record keeps."""

    key: EngineKey
    component: Component
    weights_module: torch.nn.Module  # whose torch weight names the refit map uses
    model: str = ""
    source_stat: list = field(default_factory=list)
    lora_targets: tuple[str, ...] = ()  # torch weight names a LoRA changes: refittable in the engine

    @property
    def label(self) -> str:
        profiles = ", ".join(f"{p.width}x{p.height} b{p.batch}" for p in self.key.profiles)
        return f"{self.key.component} ({profiles})"


# ---------------------------------------------------------------------------------------- what to build
def gpu_identity(device: torch.device) -> tuple[str, str]:
    """The GPU's name and compute capability ("8.9"), as engine keys and timing caches use them."""
    if device.type != "cuda":
        return "", ""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def tensorrt_version() -> str:
    try:
        return str(load_tensorrt().__version__)
    except RuntimeError:
        return ""


def targets(model: Any, *, resolutions: Sequence[tuple[int, int]], unet_batches: Sequence[int],
            precision: str, device: torch.device, tokens: Sequence[int] = (77,), dynamic: bool = False,
            lora_targets: Sequence[str] = (), controlnets: Sequence[torch.nn.Module] = (),
            source_stat: Sequence[int] = (), tensorrt: str | None = None, unet: bool = True) -> list[Target]:
    """The engines a stream of `model` (an engines.bundle.ModelBundle) needs: the UNet with a static
    profile per resolution, batch and prompt length in `tokens` (77 per chunk), the autoencoder's encoder
    and decoder per resolution (batch 1),
    and each ControlNet like the UNet. `dynamic` adds a profile from 256x256 batch 1 to 1024x1024 at the
    largest batch with up to 4 prompt chunks to each. `tensorrt` is the version the keys are for
    (default: the installed one; "" for the ONNX stages alone). `unet` False: the autoencoder alone."""
    _, capability = gpu_identity(device)
    version = tensorrt_version() if tensorrt is None else tensorrt
    factor = model.autoencoder.spatial_factor
    batches = sorted(set(unet_batches)) or [1]
    lengths = sorted(set(t for t in tokens if t > 0)) or [77]
    unet_profiles = tuple(Profile(b, h, w, n) for (w, h) in resolutions for b in batches for n in lengths)
    image_profiles = tuple(Profile(1, h, w) for (w, h) in resolutions)
    span = ((Profile(1, 256, 256, 77), Profile(max(batches), 1024, 1024, 4 * 77)) if dynamic else None)
    common = dict(precision=precision, compute_capability=capability, tensorrt=version)
    out = []
    if unet:
        component = onnx_export.unet_component(model.unet, controlnet_inputs=bool(controlnets), latent_factor=factor)
        out.append(Target(EngineKey(onnx_export.UNET, weights_fingerprint(model.unet), profiles=unet_profiles,
                                    dynamic=span, lora_layers=lora_layers_digest(lora_targets),
                                    controlnet_inputs=bool(controlnets), **common),
                          component, model.unet, model.source or model.name, list(source_stat),
                          tuple(sorted(set(lora_targets)))))
    autoencoder = model.autoencoder
    ae_precision = "float32" if autoencoder.upcast else precision
    ae_span = (Profile(1, 256, 256), Profile(1, 1024, 1024)) if dynamic else None
    for component in onnx_export.autoencoder_components(autoencoder):
        key = EngineKey(component.name, weights_fingerprint(autoencoder.module), profiles=image_profiles,
                        dynamic=ae_span, **{**common, "precision": ae_precision})
        out.append(Target(key, component, autoencoder.module, model.source or model.name, list(source_stat)))
    for controlnet in controlnets:
        component = onnx_export.controlnet_component(controlnet, latent_factor=factor)
        key = EngineKey(onnx_export.CONTROLNET, weights_fingerprint(controlnet), profiles=unet_profiles,
                        dynamic=span, **common)
        out.append(Target(key, component, controlnet, model.source or model.name))
    return out


# ---------------------------------------------------------------------------------------- progress
class Progress:
    """Progress of each stage: a bar with an ETA on a terminal (tqdm), a log line at its start and end."""

    def __init__(self, show_bars: bool | None = None):
        self.show_bars = show_bars  # None: on a terminal only (tqdm's own rule)
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, label: str, total: int | None = None) -> Iterator[Any]:
        """Yields the stage's tqdm bar (`update(n)`; `total` may be set later); `total` None: a stage
        without counted steps, shown with its elapsed time."""
        from tqdm.auto import tqdm

        log.info("%s ...", label)
        started = time.perf_counter()
        bar = tqdm(total=total, desc=label, unit="step", disable=None if self.show_bars is None else not self.show_bars,
                   leave=False, dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()
        self.times[label] = time.perf_counter() - started
        log.info("%s: done in %.1f s", label, self.times[label])


@contextlib.contextmanager
def _counting_modules(module: torch.nn.Module, advance: Callable[[int], None]) -> Iterator[None]:
    """Count the modules that run while tracing: the export's progress."""
    def count(*_: Any) -> None:  # returns None: a forward hook that returns a value replaces the output
        advance(1)

    handles = [m.register_forward_hook(count) for m in module.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------- the stages
def build(build_targets: Sequence[Target], cache: EngineCache, *, onnx_only: bool = False,
          progress: Progress | None = None, device: torch.device | None = None,
          workspace_fraction: float = WORKSPACE_FRACTION) -> list[Path]:
    """Make every target's missing stages; returns the engine plans (or, with `onnx_only`, the cleaned
    ONNX files). Raises TensorRTUnavailable when engines are asked for and TensorRT cannot run, before
    any work, and EngineBuildError when TensorRT refuses a graph."""
    progress = progress or Progress()
    trt = None if onnx_only else load_tensorrt()
    sweep(cache.root)
    made = []
    for target in build_targets:
        key = target.key
        if not onnx_only and cache.has_engine(key):
            log.info("%s: engine cached (%s)", target.label, cache.plan(key).name)
            made.append(cache.plan(key))
            continue
        cleaned = export_stages(target, cache, progress)
        if onnx_only:
            made.append(cleaned)
            continue
        device = device or torch.device("cuda")
        with torch.cuda.device(device):  # TensorRT builds on the current CUDA device
            made.append(build_engine(trt, target, cache, progress, device, workspace_fraction))
    return made


def export_stages(target: Target, cache: EngineCache, progress: Progress) -> Path:
    """The ONNX export, its clean-up and the refit map, each skipped if already cached."""
    key, component = target.key, target.component
    exported, cleaned, refit_map = cache.exported(key), cache.cleaned(key), cache.refit_map(key)
    if cleaned.is_file() and refit_map.is_file():
        log.info("%s: ONNX graph cached (%s)", key.component, cleaned.parent.name)
        return cleaned
    if not exported.is_file() and not cleaned.is_file():
        module_count = sum(1 for _ in component.module.modules())
        with _written(exported) as temporary, \
                progress.stage(f"export {key.component} to ONNX", total=module_count) as bar, \
                _counting_modules(component.module, bar.update):
            onnx_export.export(component, temporary, key.profiles[0])
    if not cleaned.is_file():
        with _written(cleaned) as temporary, progress.stage(f"clean {key.component} ONNX graph"):
            done = onnx_export.clean(exported, temporary)
        log.info("%s: %s", key.component, "; ".join(done))
    if not refit_map.is_file():
        with progress.stage(f"map {key.component} weights for refit"):
            names = onnx_export.refit_names(target.weights_module, cleaned)
        write_atomically(refit_map, json.dumps({k: list(v) for k, v in names.items()}, indent=0).encode())
    return cleaned


@contextlib.contextmanager
def _written(final: Path) -> Iterator[Path]:
    """A path in a private folder to write an ONNX file to; when the block ends without error its files
    move into place, the .onnx last, so an ONNX file in the cache is always whole. The exporter writes
    the weights of a model over 2 GB as one file per tensor: those are gathered into one first."""
    import shutil

    folder = final.parent / f".{final.stem}.{os.getpid()}.partial"  # two builds never share one
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    temporary = folder / final.name
    try:
        yield temporary
        extra = {p.name for p in folder.iterdir()} - {final.name, final.name + ".weights"}
        if extra:
            gathered = folder / "gathered" / final.name
            onnx_export.save(_load_onnx(temporary), gathered)
            temporary = gathered
        weights = temporary.with_name(final.name + ".weights")
        if weights.is_file():
            weights.replace(final.with_name(weights.name))
        temporary.replace(final)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _load_onnx(path: Path) -> Any:
    import onnx
    return onnx.load(str(path))


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message has TensorRT's own words."""


def build_engine(trt: Any, target: Target, cache: EngineCache, progress: Progress, device: torch.device,
                 workspace_fraction: float = WORKSPACE_FRACTION) -> Path:
    """Parse the cleaned ONNX graph, build a strongly typed engine with the key's profiles, save it with
    its record, and keep the timing cache."""
    key = target.key
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(cache.cleaned(key))):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse the {key.component} graph: {errors}")
    config = builder.create_builder_config()
    free, _ = torch.cuda.mem_get_info(device)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(free * workspace_fraction))
    component = target.component
    for profile in (*key.profiles, *((key.dynamic,) if key.dynamic else ())):
        config.add_optimization_profile(_profile(builder, component, profile))
    refittable = _mark_refittable(trt, network, config, target, cache)
    gpu_name, _ = gpu_identity(device)
    timing_path = cache.timing_cache(gpu_name, key.tensorrt)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    if timing is None:  # a cache this TensorRT cannot read: start a new one
        log.warning("timing cache %s is unreadable; starting a new one", timing_path)
        timing = config.create_timing_cache(b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    started = time.perf_counter()
    with progress.stage(f"build {target.label} engine (TensorRT {key.tensorrt})") as bar:
        config.progress_monitor = _progress_monitor(trt, bar)
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build the {key.component} engine; its log above says why")
    _save_timing_cache(config, timing_path)
    data = bytes(plan)
    write_atomically(cache.plan(key), data)
    cache.save_record(EngineRecord(key, model=target.model, source_stat=target.source_stat, refittable=refittable,
                                   build_s=time.perf_counter() - started, size=len(data)))
    log.info("%s engine: %.0f MB in %s", target.label, len(data) / 2**20, cache.plan(key))
    return cache.plan(key)


def _profile(builder: Any, component: Component, profile: Profile | tuple[Profile, Profile]) -> Any:
    """A TensorRT optimization profile: static at one Profile, or dynamic between (smallest, largest)."""
    low, high = (profile, profile) if isinstance(profile, Profile) else profile
    small, large = component.shapes(low), component.shapes(high)
    middle = component.shapes(Profile(high.batch, (low.height + high.height) // 2 // 64 * 64,
                                      (low.width + high.width) // 2 // 64 * 64, low.tokens)) if low != high else small
    trt_profile = builder.create_optimization_profile()
    for name in component.inputs:
        trt_profile.set_shape(name, small[name], middle[name], large[name])
    return trt_profile


def _mark_refittable(trt: Any, network: Any, config: Any, target: Target, cache: EngineCache) -> list[str]:
    """Make the weights LoRAs change refittable, and only those (REFIT_INDIVIDUAL): every other weight
    stays free to fold and fuse. (TensorRT 11.3's notes also say the all-weights REFIT flag can drop a
    GEMM bias.) Returns the names TensorRT accepted."""
    if not target.lora_targets:
        return []
    refit_map = json.loads(cache.refit_map(target.key).read_text())
    wanted = set(target.lora_targets)
    names = sorted(onnx_name for onnx_name, (torch_name, _) in refit_map.items() if torch_name in wanted)
    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    marked = [name for name in names if network.mark_weights_refittable(name)]
    left_out = wanted - {refit_map[n][0] for n in marked}
    if left_out:
        log.warning("%d LoRA layers cannot be refit in this engine (the export fused their weights, or TensorRT "
                    "refused to mark them); a LoRA on them runs the UNet on torch: %s", len(left_out),
                    ", ".join(sorted(left_out)[:5]))
    return marked


def _save_timing_cache(config: Any, path: Path) -> None:
    """Keep what this build measured, merged with what another build may have saved meanwhile."""
    cache = config.get_timing_cache()
    saved = config.create_timing_cache(path.read_bytes()) if path.is_file() else None
    if saved is not None:
        cache.combine(saved, ignore_mismatch=True)
    write_atomically(path, bytes(cache.serialize()))


def _progress_monitor(trt: Any, bar: Any) -> Any:
    """TensorRT's build phases as progress: the steps of its outermost phase fill the bar."""

    import threading

    class Monitor(trt.IProgressMonitor):  # TensorRT calls it from several threads
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.top: str | None = None
            self.lock = threading.Lock()

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                if parent_phase is None and self.top is None:
                    self.top = phase_name
                    bar.reset(total=num_steps)
            log.debug("TensorRT: %s (%d steps)", phase_name, num_steps)

        def step_complete(self, phase_name, step):
            with self.lock:
                if phase_name == self.top:
                    bar.update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self.lock:
                if phase_name == self.top:
                    self.top = None

    return Monitor()
