"""The engine cache: what an engine is built from (its key), where each stage of it lives, and which
engines in the folder are current.

An engine is only valid for exactly what it was built from, so the key holds all of it: the component,
a fingerprint of its weights, the layers LoRAs may refit, the optimization profiles, the precision,
whether the UNet takes ControlNet residuals, the GPU's compute capability and the TensorRT version (an
engine runs only on the GPU generation and TensorRT version that built it). Two stages come before the
engine, each keyed by only what it depends on, so that changing a resolution rebuilds the engine and
reuses the ONNX files, and a new TensorRT version reuses them too:

    <engine_dir>/onnx/<component>-<onnx digest>/model.onnx   the export
                                                /clean.onnx   after clean-up (engines/.../export.clean)
                                                /refit.json   ONNX weight names of the torch weights
    <engine_dir>/engines/<component>-<engine digest>.plan     the serialized engine
                                                    .json     its key and what the runtime needs to know
    <engine_dir>/timing/<gpu>-trt<version>.cache              TensorRT's timing cache, one per GPU

Every file is written to a temporary name and renamed into place, so an interrupted build leaves no
half file and resumes at the first missing stage.

The LoRA set enters the key as the set of weights its LoRAs change, not as the LoRAs themselves: an
engine whose LoRA layers are refittable takes any LoRA that changes only those layers, at any weight,
by refit (engines/backends/tensorrt/runtime.py). Likewise a UNet's key says whether it has ControlNet
residual inputs; which ControlNets feed them is each ControlNet engine's own key.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import torch

from .export import OPSET, Profile

# Bumped whenever the exported graphs change (names, conventions): every older ONNX file and engine is stale.
EXPORT_VERSION = 1


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine is built from; `digest` names its files."""

    component: str  # export.UNET, VAE_ENCODER, VAE_DECODER or CONTROLNET
    weights: str  # weights_fingerprint() of the module exported
    precision: str  # float16, bfloat16 or float32
    profiles: tuple[Profile, ...]  # static profiles, one per resolution and batch
    dynamic: tuple[Profile, Profile] | None = None  # an optional dynamic profile: (smallest, largest)
    lora_layers: str = ""  # digest of the torch weight names LoRAs may change; empty: not refittable
    controlnet_inputs: bool = False  # UNet: takes ControlNet residuals
    compute_capability: str = ""  # "8.9"
    tensorrt: str = ""  # TensorRT version
    opset: int = OPSET
    export_version: int = EXPORT_VERSION

    def onnx_digest(self) -> str:
        """The export's key: what the ONNX files depend on (not the profiles, the GPU or TensorRT)."""
        return _digest(self.component, self.weights, self.precision, self.controlnet_inputs, self.opset,
                       self.export_version)

    def digest(self) -> str:
        return _digest(*(getattr(self, f.name) for f in fields(self)))

    def differences(self, other: "EngineKey") -> list[str]:
        """What differs from `other`, in words, for `sdbridge doctor`."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{_LABELS.get(f.name, f.name)}: {_show(mine)} (wanted {_show(theirs)})")
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [asdict(p) for p in self.profiles]
        data["dynamic"] = [asdict(p) for p in self.dynamic] if self.dynamic else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EngineKey":
        data = dict(data)
        data["profiles"] = tuple(Profile(**p) for p in data["profiles"])
        data["dynamic"] = tuple(Profile(**p) for p in data["dynamic"]) if data.get("dynamic") else None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_LABELS = {"weights": "weights", "lora_layers": "LoRA layers", "controlnet_inputs": "ControlNet inputs",
           "compute_capability": "GPU compute capability", "tensorrt": "TensorRT", "export_version": "export code"}


def _show(value: Any) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], Profile):
        return ", ".join(map(str, value))
    return str(value) if value != "" else "none"


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_FINGERPRINTS_LOCK = threading.Lock()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A fingerprint of every weight of `module`: per tensor its name, shape and two float64 sums
    (plain and position-weighted), computed where the weights are. A full byte hash of a 5 GB SDXL UNet
    would cost seconds at every start; two sums change with any real edit of the weights (a fine-tune,
    a merged LoRA) and cost milliseconds on a GPU. Remembered per module object: sdbridge never edits a
    loaded model's own weights (LoRAs live in peft's layers beside them), so the render thread can ask
    again for free."""
    with _FINGERPRINTS_LOCK:
        known = _FINGERPRINTS.get(module)
    if known is None:
        known = _fingerprint(module)
        with _FINGERPRINTS_LOCK:
            _FINGERPRINTS[module] = known
    return known


def _fingerprint(module: torch.nn.Module) -> str:
    parts = []
    with torch.no_grad():
        for name, tensor in base_state_dict(module).items():
            # no dtype: the same weights in float32 (an SDXL VAE upcast on its first frame) are the same
            # model, and the key's precision says what the engine computes in
            if not tensor.is_floating_point():
                parts.append((name, tuple(tensor.shape), tensor.sum().item()))
                continue
            flat = tensor.detach().reshape(-1).double()
            ramp = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder_(9973).add_(1)
            parts.append((name, tuple(tensor.shape), f"{flat.sum().item():.12g}", f"{(flat * ramp).sum().item():.12g}"))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def base_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own weights under their own names, also while LoRAs are loaded into it: peft's
    wrappers add `base_layer.` to the names and LoRA tensors of their own, neither of which an export sees."""
    return {name.replace(".base_layer.", "."): tensor for name, tensor in module.state_dict().items()
            if "lora_" not in name}


def lora_layers_digest(weight_names: Iterable[str]) -> str:
    names = sorted(set(weight_names))
    return _digest(*names) if names else ""


@dataclass
class EngineRecord:
    """What the cache knows of one built engine: its key plus what the runtime and `doctor` need."""

    key: EngineKey
    model: str = ""  # the model as the user named it, for people reading the folder
    source_stat: list = field(default_factory=list)  # [size, mtime_ns] of the model file when built
    refittable: list[str] = field(default_factory=list)  # TensorRT weight names a refit may set
    build_s: float = 0.0
    size: int = 0  # bytes of the .plan

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key.to_json(), "model": self.model, "source_stat": self.source_stat,
                "refittable": self.refittable, "build_s": self.build_s, "size": self.size}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EngineRecord":
        return cls(key=EngineKey.from_json(data["key"]), model=data.get("model", ""),
                   source_stat=data.get("source_stat", []), refittable=data.get("refittable", []),
                   build_s=float(data.get("build_s", 0.0)), size=int(data.get("size", 0)))


class EngineCache:
    """The folder of one user's engines; see the module docstring for its layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def onnx_dir(self, key: EngineKey) -> Path:
        return self.root / "onnx" / f"{key.component}-{key.onnx_digest()}"

    def exported(self, key: EngineKey) -> Path:
        return self.onnx_dir(key) / "model.onnx"

    def cleaned(self, key: EngineKey) -> Path:
        return self.onnx_dir(key) / "clean.onnx"

    def refit_map(self, key: EngineKey) -> Path:
        return self.onnx_dir(key) / "refit.json"

    def plan(self, key: EngineKey) -> Path:
        return self.root / "engines" / f"{key.component}-{key.digest()}.plan"

    def record_path(self, key: EngineKey) -> Path:
        return self.plan(key).with_suffix(".json")

    def timing_cache(self, gpu_name: str, tensorrt_version: str) -> Path:
        safe = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-").lower()
        return self.root / "timing" / f"{safe}-trt{tensorrt_version}.cache"

    def has_engine(self, key: EngineKey) -> bool:
        return self.plan(key).is_file() and self.record_path(key).is_file()

    def record(self, key: EngineKey) -> EngineRecord:
        return EngineRecord.from_json(json.loads(self.record_path(key).read_text()))

    def save_record(self, record: EngineRecord) -> None:
        write_atomically(self.record_path(record.key), json.dumps(record.to_json(), indent=1).encode())

    def records(self) -> list[tuple[Path, EngineRecord | None]]:
        """Every engine in the folder with its record (None if the record is unreadable)."""
        out: list[tuple[Path, EngineRecord | None]] = []
        for plan in sorted((self.root / "engines").glob("*.plan")):
            try:
                out.append((plan, EngineRecord.from_json(json.loads(plan.with_suffix(".json").read_text()))))
            except (OSError, ValueError, KeyError, TypeError):
                out.append((plan, None))
        return out


def sweep(root: Path, older_than_s: float = 6 * 3600) -> None:
    """Remove what a killed build left behind: temporary files and partial folders (builds write each
    file whole under a temporary name first), once they are older than any build step takes."""
    import shutil

    cutoff = time.time() - older_than_s
    for leftover in [*root.glob("*/.*.tmp"), *root.glob("*/*/.*.tmp"), *root.glob("*/*/.*.partial")]:
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        except OSError:
            pass


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: readers see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def default_engine_dir() -> Path:
    """Where engines go when engine_dir is not set: the platform's per-user cache folder."""
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sdbridge" / "engines"
