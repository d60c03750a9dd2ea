"""Presets: the whole parameter state under a name, as a readable TOML file in the presets folder.

`/preset/save NAME` writes `<presets_dir>/NAME.toml` (the same keys and tables as a config file: a
preset is a config file holding only parameters, so one can be written by hand or passed to
`--config`); `/preset/recall NAME` reads it back as one change set, applied atomically like a bundle.
A name is a plain file name (letters, digits, space, `_`, `-`, `.`; no separators, no leading dot),
so no name can reach outside the folder. This module knows nothing of OSC or the daemon.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from . import config, params

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}")
# Windows opens these devices for a file of that name, whatever its suffix ("NUL.toml", "con.png")
WINDOWS_DEVICE = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9]) *(\..*)?", re.IGNORECASE)
SUFFIX = ".toml"
# Not part of a look: recalling a preset saved while paused must not freeze the show.
NOT_SAVED = ("pause",)


class PresetError(ValueError):
    """A preset that cannot be saved or recalled; the message says which and why."""


def default_folder() -> Path:
    """The user's presets folder: %APPDATA%\\sdbridge\\presets on Windows, ~/.config/sdbridge/presets elsewhere."""
    return config.user_folder() / "presets"


# what is_file_name accepts, as refusals say it
FILE_NAME_RULE = ("1 to 64 letters, digits, spaces, _ - or . (not first or last), not a device name such as CON "
                  "or NUL")


def is_file_name(name: Any) -> bool:
    """Is `name` a plain file name for a folder of presets, schedules or recordings: 1 to 64 letters,
    digits, spaces, _ - or . (not first or last), no separators, not a Windows device? A name from the
    network never reaches outside its folder."""
    return isinstance(name, str) and bool(NAME.fullmatch(name)) and not name.endswith(".") \
        and not WINDOWS_DEVICE.fullmatch(name)


def check_name(name: Any) -> str:
    if not is_file_name(name):
        raise PresetError(f"preset name {name!r}: {FILE_NAME_RULE}")
    return name


class Presets:
    """The presets folder: save, recall and list. Thread-safe as far as files are (a save replaces the
    file in one step, so a recall never reads half a file)."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(os.path.expanduser(str(folder)))

    def names(self) -> list[str]:
        """Every preset in the folder, by name."""
        try:
            files = [p for p in self.folder.iterdir() if p.suffix == SUFFIX and p.is_file()]
        except OSError:  # no folder yet: no presets
            return []
        return sorted((p.stem for p in files if NAME.fullmatch(p.stem)), key=str.lower)

    def path(self, name: str) -> Path:
        return self.folder / (check_name(name) + SUFFIX)

    def _inside(self, path: Path, name: str) -> Path:
        """`path` unless it leads outside the folder (a link placed there)."""
        if not path.resolve().is_relative_to(self.folder.resolve()):
            raise PresetError(f"preset {name!r} refused: it leads outside {self.folder}")
        return path

    def save(self, name: str, values: Mapping[str, Any]) -> Path:
        """Write the parameter state `values` as preset `name` (replacing one of that name)."""
        path = self.path(name)
        kept = {k: v for k, v in values.items() if k not in NOT_SAVED}
        text = f"# sdbridge preset {name!r}: every parameter of a look. Recall: /preset/recall \"{name}\"\n" + \
            config.parameters_toml(kept)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.folder, suffix=".tmp", delete=False) as f:
                f.write(text)
            os.replace(f.name, path)
        except OSError as e:
            raise PresetError(f"preset {name!r} not saved to {self.folder}: {e.strerror or e}") from None
        return path

    def load(self, name: str) -> dict[str, Any]:
        """The parameters preset `name` holds, validated; PresetError if there is none or it is unusable."""
        path = self._inside(self.path(name), name)
        try:
            values = config.load_parameters(path)
        except config.ConfigError as e:
            if not path.is_file():
                known = ", ".join(self.names()) or "none yet"
                raise PresetError(f"preset {name!r} not found in {self.folder}; known: {known}") from None
            raise PresetError(f"preset {name!r}: {e}") from None
        return values

    def recall(self, name: str, current: Mapping[str, Any]) -> dict[str, Any]:
        """The change set that recalls preset `name` over the state `current`: its values, and every LoRA
        the state holds but the preset does not back at 0 (a preset is the whole look)."""
        values = self.load(name)
        changes: dict[str, Any] = {params.LORA_PREFIX + k: 0.0 for k in params.lora_weights(current)}
        changes.update(values)
        return changes
