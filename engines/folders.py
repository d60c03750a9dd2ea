"""The user's model trees: which checkpoints, LoRAs, VAEs, TAESDs, ControlNets and embeddings they hold,
and where each one is, by name.

A models folder (`--models-dir`, config `models_dir`) is an AUTOMATIC1111 install or its models/ folder,
a ComfyUI install or its models/ folder, or a plain folder of checkpoints; several can be given at once.
Entries are named by their path under their kind's folder, without the suffix and with "/" separators
("sd15/dreamshaper_8"), and can be looked up by that name or by their bare stem when it is unique.

Names can come from the network (an OSC /model or /lora message), so a name is only ever matched
against what a scan found, never joined onto a path, and whatever it leads to must really (symlinks
followed) lie inside one of that kind's folders. Scanning reads directory listings only, never weights.

This module owns the folder layouts and the name rules; it knows nothing of what is inside a file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .bundle import ModelError
from .weights import WEIGHT_SUFFIXES, is_pickle

log = logging.getLogger(__name__)

CHECKPOINTS, LORAS, VAE, TAESD, CONTROLNET, EMBEDDINGS = (
    "checkpoints", "loras", "vae", "taesd", "controlnet", "embeddings")
KINDS = (CHECKPOINTS, LORAS, VAE, TAESD, CONTROLNET, EMBEDDINGS)
# What one entry of a kind is called in messages ("lora 'x' not found").
LABELS = {CHECKPOINTS: "model", LORAS: "lora", VAE: "vae", TAESD: "taesd", CONTROLNET: "controlnet",
          EMBEDDINGS: "embedding"}

# Each layout's folder for each kind, relative to its models/ folder. A1111 keeps embeddings/ at the
# install root (beside models/), ComfyUI under models/.
A1111_FOLDERS = {CHECKPOINTS: ("Stable-diffusion",), LORAS: ("Lora", "LyCORIS"), VAE: ("VAE",),
                 TAESD: ("VAE-approx",), CONTROLNET: ("ControlNet",)}
COMFYUI_FOLDERS = {CHECKPOINTS: ("checkpoints", "diffusers"), LORAS: ("loras",), VAE: ("vae",),
                   TAESD: ("vae_approx",), CONTROLNET: ("controlnet",), EMBEDDINGS: ("embeddings",)}
_A1111_MARKERS = ("Stable-diffusion", "VAE-approx", "LyCORIS")
_COMFYUI_MARKERS = ("checkpoints", "diffusers", "loras", "vae_approx")

# TAESD weights as A1111 and ComfyUI download them: taesd_encoder.pth + taesd_decoder.pth, and the
# same for taesdxl (SDXL), taesd3 (SD3) and taef1 (FLUX).
_TAESD_FILE = re.compile(r"^(taesd|taesdxl|taesd3|taef1)_(encoder|decoder)$", re.IGNORECASE)
_MAX_DEPTH = 8  # deep enough for any tidy tree; bounds a scan of a folder that is not one
_MAX_KNOWN_LISTED = 20
_RESCAN_INTERVAL_S = 1.0  # a lookup that misses rescans, at most this often (bad names may arrive in floods)


@dataclass(frozen=True)
class Entry:
    """One model file or diffusers folder found in a models folder."""

    name: str  # path under its kind's folder, no suffix, "/" separators
    path: Path
    kind: str
    pickle: bool  # a pickle file (.ckpt, .pt, .pth, .bin): loads only with --allow-pickle
    size_bytes: int
    root: Path  # the kind's folder it was found in

    @property
    def stem(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    @property
    def format(self) -> str:
        if self.path.is_dir():
            return "diffusers"
        return "pickle" if self.pickle else "safetensors"


@dataclass(frozen=True)
class Layout:
    """What one configured models folder turned out to be."""

    path: Path
    kind: str  # "a1111", "comfyui" or "plain"
    roots: dict[str, tuple[Path, ...]]  # kind -> its folders in this tree


def check_name(name: str, kind: str = CHECKPOINTS) -> str:
    """`name` if it is a plain relative name that cannot point outside a folder, else ModelError.
    Names are matched against scanned entries and never joined onto a path, so this is the second
    lock, not the only one."""
    label = LABELS.get(kind, kind)
    if not isinstance(name, str) or not name or len(name) > 512:
        raise ModelError(f"{label} name {name!r} is not a name: give a name that `sdbridge models` lists")
    reason = None
    if "\x00" in name:
        reason = "a NUL character"
    elif "\\" in name:
        reason = "a backslash (use / between folders)"
    elif name.startswith("/") or name.startswith("~"):
        reason = "an absolute path"
    elif re.match(r"^[A-Za-z]:", name):
        reason = "a drive letter"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        reason = "an empty, '.' or '..' folder"
    if reason:
        raise ModelError(f"{label} name {name!r} refused: it has {reason}; names are paths inside the models "
                         "folders as `sdbridge models` lists them")
    return name


def _is_within(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _is_diffusers_model(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "unet").is_dir()


def _config_class(folder: Path) -> str | None:
    """The diffusers class named by a component folder's config.json, or None if it has none."""
    try:
        with open(folder / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return str(config.get("_class_name", "")) if isinstance(config, dict) else None


def _strip_suffix(filename: str, suffixes: tuple[str, ...]) -> str | None:
    lowered = filename.lower()
    for suffix in suffixes:
        if lowered.endswith(suffix):
            return filename[: -len(suffix)]
    return None


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size
    except OSError:
        return 0


class ModelFolders:
    """The models folders a daemon may load from, scanned on demand and cached; `refresh` rescans.

    Thread-safe: the network thread checks names while the render thread loads.
    """

    def __init__(self, dirs: Iterable[str | os.PathLike[str]] = ()):
        self.layouts: tuple[Layout, ...] = tuple(self._layout(Path(os.path.expanduser(str(d)))) for d in dirs)
        # Resolved once: a user's symlinked folder counts as where it points to (and is listed once).
        roots: dict[str, dict[Path, Path]] = {kind: {} for kind in KINDS}
        for layout in self.layouts:
            for kind, folders in layout.roots.items():
                for folder in folders:
                    roots[kind].setdefault(folder.resolve(), folder)
        self._roots = {kind: tuple(by_real.values()) for kind, by_real in roots.items()}
        self._real_roots = {kind: tuple(by_real) for kind, by_real in roots.items()}
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, Entry]] = {}
        self._hidden: dict[str, list[Entry]] = {}
        self._scanned_at: dict[str, float] = {}

    @property
    def dirs(self) -> tuple[Path, ...]:
        return tuple(layout.path for layout in self.layouts)

    def __bool__(self) -> bool:
        return bool(self.layouts)

    def roots(self, kind: str) -> tuple[Path, ...]:
        """The folders entries of `kind` come from (TAESDs are also looked for among the VAEs)."""
        self._check_kind(kind)
        if kind == TAESD:
            return self._roots[TAESD] + tuple(r for r in self._roots[VAE] if r not in self._roots[TAESD])
        return self._roots[kind]

    def _real(self, kind: str) -> tuple[Path, ...]:
        if kind == TAESD:
            return self._real_roots[TAESD] + self._real_roots[VAE]
        return self._real_roots[kind]

    # ------------------------------------------------------------------ lookups
    def list(self, kind: str) -> list[Entry]:
        """Every entry of `kind`, by name."""
        with self._lock:
            return sorted(self._entries(kind).values(), key=lambda e: e.name.lower())

    def hidden(self, kind: str) -> list[Entry]:
        """Entries that share their name with an entry listed before them (an earlier folder, or a
        .safetensors beside a pickle) and so cannot be chosen by name."""
        with self._lock:
            self._entries(kind)
            return list(self._hidden.get(kind, ()))

    def find(self, kind: str, name: str) -> Path:
        """The real path of the entry of `kind` called `name` (full name or unique stem); ModelError if
        there is none, the stem is ambiguous, or the name could leave the folders."""
        return self.entry(kind, name).path.resolve()

    def entry(self, kind: str, name: str) -> Entry:
        """The entry of `kind` called `name`; see `find`."""
        check_name(name, kind)
        with self._lock:
            found = self._match(self._entries(kind), name, kind)
            if found is None and time.monotonic() - self._scanned_at.get(kind, 0.0) > _RESCAN_INTERVAL_S:
                self._cache.pop(kind, None)  # a file dropped in since the last scan
                found = self._match(self._entries(kind), name, kind)
            if found is None:
                raise ModelError(self._not_found(kind, name))
        if not _is_within(found.path.resolve(), self._real(kind)):  # replaced by an outside link since the scan
            raise ModelError(f"{LABELS[kind]} {name!r} refused: it leads outside the models folders")
        return found

    def embeddings(self) -> dict[str, Path]:
        """Textual-inversion embeddings by the word that calls them in a prompt (the file's stem)."""
        out: dict[str, Path] = {}
        for entry in self.list(EMBEDDINGS):
            out.setdefault(entry.stem, entry.path)
        return out

    def refresh(self) -> None:
        """Forget what was scanned: the next lookup sees the folders as they are now."""
        with self._lock:
            self._cache.clear()
            self._hidden.clear()
            self._scanned_at.clear()

    def where(self, kind: str) -> str:
        """The folders of `kind`, for messages."""
        roots = self.roots(kind)
        if roots:
            return ", ".join(str(r) for r in roots)
        if not self.layouts:
            return "no models folders (give --models-dir DIR or models_dir in the config)"
        return (f"the models folders ({', '.join(str(d) for d in self.dirs)}), which have no {kind} folder: "
                f"expected {_expected_folders(kind)}")

    # ------------------------------------------------------------------ internals
    def _not_found(self, kind: str, name: str) -> str:
        known = [e.name for e in sorted(self._entries(kind).values(), key=lambda e: e.name.lower())]
        listed = ", ".join(known[:_MAX_KNOWN_LISTED]) + (f" and {len(known) - _MAX_KNOWN_LISTED} more"
                                                         if len(known) > _MAX_KNOWN_LISTED else "")
        return f"{LABELS[kind]} {name!r} not found in {self.where(kind)}; known: {listed or 'none'}"

    @staticmethod
    def _match(entries: dict[str, Entry], name: str, kind: str) -> Entry | None:
        bare = _strip_suffix(name, WEIGHT_SUFFIXES)
        for candidate in (name, bare):
            if candidate and candidate in entries:
                return entries[candidate]
        for key in (lambda s: s, str.casefold):  # then the stem, then either without case
            wanted = {key(n) for n in (name, bare) if n}
            hits = [e for e in entries.values() if key(e.name) in wanted or ("/" not in name and key(e.stem) in wanted)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise ModelError(f"{LABELS[kind]} {name!r} is ambiguous: "
                                 f"{', '.join(sorted(e.name for e in hits))}; give the full name")
        return None

    def _entries(self, kind: str) -> dict[str, Entry]:
        self._check_kind(kind)
        if kind not in self._cache:
            entries: dict[str, Entry] = {}
            hidden: list[Entry] = []
            for root in self.roots(kind):
                for entry in self._scan(kind, root):
                    held = entries.get(entry.name)
                    if held is None or (held.pickle and not entry.pickle):  # prefer safetensors under one name
                        entries[entry.name] = entry
                        if held is not None:
                            hidden.append(held)
                    else:
                        hidden.append(entry)
            for entry in hidden:
                log.debug("%s %s: %s is hidden by %s", kind, entry.name, entry.path, entries[entry.name].path)
            self._cache[kind] = entries
            self._hidden[kind] = hidden
            self._scanned_at[kind] = time.monotonic()
        return self._cache[kind]

    def _scan(self, kind: str, root: Path) -> Iterator[Entry]:
        real_roots = self._real(kind)
        if kind == CHECKPOINTS and _is_diffusers_model(root):  # the folder given is itself one model
            yield Entry(root.name, root, kind, False, _size(root), root)
            return
        pairs: dict[str, list[Path]] = {}
        for path, rel_parent in _walk(root, real_roots):
            if path.is_dir():
                entry = self._folder_entry(kind, root, path, rel_parent)
                if entry is not None:
                    yield entry
                continue
            stem = _strip_suffix(path.name, WEIGHT_SUFFIXES)
            if stem is None:
                continue
            taesd_file = _TAESD_FILE.match(stem)
            if kind in (VAE, TAESD) and taesd_file:
                if kind == TAESD:
                    pairs.setdefault(rel_parent + taesd_file.group(1).lower(), []).append(path)
                continue
            if kind == TAESD:
                continue  # VAE-approx also holds A1111's older approximate decoders (model.pt), not TAESD
            if kind == CHECKPOINTS and stem.lower().endswith(".vae"):
                continue  # A1111's per-checkpoint VAE beside the checkpoint
            if kind == EMBEDDINGS and path.suffix.lower() == ".ckpt":
                continue
            yield Entry(rel_parent + stem, path, kind, is_pickle(path), _size(path), root)
        for name, files in pairs.items():
            # one entry per encoder+decoder pair; safetensors before pickles, the decoder names it
            files.sort(key=lambda f: (is_pickle(f), "encoder" in f.name.lower()))
            best_format = is_pickle(files[0])
            chosen = [f for f in files if is_pickle(f) == best_format]
            yield Entry(name, chosen[0], kind, best_format, sum(_size(f) for f in chosen), root)

    @staticmethod
    def _folder_entry(kind: str, root: Path, folder: Path, rel_parent: str) -> Entry | None:
        """A diffusers folder that is one entry of `kind` (None: not one; _walk does not descend into it)."""
        name = rel_parent + folder.name
        if kind == CHECKPOINTS and _is_diffusers_model(folder):
            return Entry(name, folder, kind, False, _size(folder), root)
        if kind in (VAE, TAESD, CONTROLNET) and (folder / "config.json").is_file():
            cls = _config_class(folder) or ""
            is_tiny = cls == "AutoencoderTiny"
            if (kind == TAESD and is_tiny) or (kind == VAE and not is_tiny and cls.startswith("Autoencoder")) \
                    or (kind == CONTROLNET and "ControlNet" in cls):
                return Entry(name, folder, kind, False, _size(folder), root)
        return None

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")

    @staticmethod
    def _layout(path: Path) -> Layout:
        if not path.exists():
            raise ModelError(f"models folder {path} does not exist; give an A1111 or ComfyUI install (or its "
                             "models/ folder) or a folder of checkpoints")
        if not path.is_dir():
            raise ModelError(f"models folder {path} is a file, not a folder")
        roots: dict[str, list[Path]] = {}
        found = []

        def add(models: Path, folders: dict[str, tuple[str, ...]], present: set[str]) -> None:
            for kind, names in folders.items():
                roots.setdefault(kind, []).extend(models / n for n in names if n in present)

        # Folder names are compared as listed, so that A1111's VAE/ and ComfyUI's vae/ differ on Windows
        # and macOS too. An install's models/ folder is recognised by any folder of its layout; a folder
        # given as the models folder itself only by the unmistakable ones (a plain folder of checkpoints
        # may well have a vae/ or embeddings/ of its own).
        for models, a1111_markers, comfyui_markers in (
                (path / "models", _all_folders(A1111_FOLDERS), _all_folders(COMFYUI_FOLDERS)),
                (path, _A1111_MARKERS, _COMFYUI_MARKERS)):
            try:
                present = {n for n in os.listdir(models) if (models / n).is_dir()}
            except OSError:
                continue
            if present & set(a1111_markers):
                add(models, A1111_FOLDERS, present)
                install = path if models != path else path.parent  # embeddings/ is beside models/
                if (install / "embeddings").is_dir():
                    roots.setdefault(EMBEDDINGS, []).append(install / "embeddings")
                found.append("a1111")
            if present & set(comfyui_markers):
                add(models, COMFYUI_FOLDERS, present)
                found.append("comfyui")
            if found:
                break
        if not found:
            roots[CHECKPOINTS] = [path]
        unique = {kind: tuple(dict.fromkeys(folders)) for kind, folders in roots.items()}
        return Layout(path, "+".join(found) or "plain", unique)


def _walk(root: Path, real_roots: tuple[Path, ...]) -> Iterator[tuple[Path, str]]:
    """Every file and folder under `root` whose real path lies inside `real_roots`, with its parent's
    path under root ("" or "a/b/"). Hidden names are skipped, linked folders are followed once, and a
    folder that is a model or a diffusers component is yielded but not descended into."""
    seen: set[Path] = set()

    def visit(folder: Path, rel: str, depth: int) -> Iterator[tuple[Path, str]]:
        real = folder.resolve()
        if real in seen or depth > _MAX_DEPTH:
            return
        seen.add(real)
        try:
            children = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as e:
            log.warning("cannot list %s: %s", folder, e)
            return
        for child in children:
            if child.name.startswith("."):
                continue
            try:
                child_real = child.resolve()
            except (OSError, RuntimeError):  # a broken or looping link
                continue
            if not _is_within(child_real, real_roots):
                log.debug("%s: skipped, it leads outside the models folders (%s)", child, child_real)
                continue
            yield child, rel
            if child.is_dir() and not _stops_descent(child):
                yield from visit(child, f"{rel}{child.name}/", depth + 1)

    yield from visit(root, "", 0)


def _stops_descent(folder: Path) -> bool:
    """A folder that is a model (or a diffusers component) is one entry, never a tree of entries."""
    return _is_diffusers_model(folder) or (folder / "config.json").is_file()


def _all_folders(layout: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(name for names in layout.values() for name in names)


def _expected_folders(kind: str) -> str:
    a1111 = [f"models/{n}" for n in A1111_FOLDERS.get(kind, ())] or (["embeddings"] if kind == EMBEDDINGS else [])
    comfy = [f"models/{n}" for n in COMFYUI_FOLDERS.get(kind, ())]
    return f"{' or '.join(a1111)} (A1111) or {' or '.join(comfy)} (ComfyUI)"
