"""Reading weight files safely: `.safetensors` always, pickles only when the user allows them.

A pickle (`.ckpt`, `.pt`, `.pth`, `.bin`) can run arbitrary code when it is loaded, and model files
come from strangers on the internet. So pickles are refused unless the user passes --allow-pickle,
and even then they are read with `torch.load(weights_only=True)`, which refuses anything but tensors
and plain containers. Every loader (checkpoints, VAEs, LoRAs, embeddings) reads through here.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from .bundle import ModelError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class PickleRefused(ModelError):
    """A pickle weight file met without --allow-pickle."""


def is_pickle(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: str | Path, *, allow_pickle: bool, label: str | None = None) -> None:
    """PickleRefused for a pickle file unless pickles are allowed; `label` names it in the message
    (default: the file name)."""
    path = Path(path)
    if is_pickle(path) and not allow_pickle:
        raise PickleRefused(
            f"{label or path.name} is a pickle ({path.suffix.lower()}), which can run code when loaded; refused. "
            "Use a .safetensors version of it, or start with --allow-pickle if you trust where it came from "
            "(it is then read with torch.load(weights_only=True))")


def read_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a weight file, on the CPU. Raises PickleRefused or ModelError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError, OSError or ValueError
            raise ModelError(f"cannot read {path.name}: {e}") from e
    if suffix in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle=allow_pickle)
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"cannot read {path.name} (weights_only=True): {e}") from e
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]  # original LDM checkpoints nest the weights
        if not isinstance(data, dict):
            raise ModelError(f"{path.name} holds a {type(data).__name__}, not a dictionary of weights")
        return data
    raise ModelError(f"{path.name}: unknown weight file type; expected one of {', '.join(WEIGHT_SUFFIXES)}")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and the metadata of a .safetensors file, read from its header only (cheap:
    no tensor is loaded), for listing models and detecting their architecture."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) != 8:
                raise ModelError(f"{path.name} is not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", size_bytes)
            if size > _MAX_HEADER_BYTES:
                raise ModelError(f"{path.name} is not a safetensors file (header of {size} bytes)")
            header: dict[str, Any] = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"cannot read {path.name}: {e}") from e
    metadata = header.pop("__metadata__", None) or {}
    shapes = {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}
    return shapes, {str(k): str(v) for k, v in metadata.items()}
