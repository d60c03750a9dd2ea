"""Writes sdbridge_build.py: build.py with everything the component embeds filled in, so that one file
dragged into TouchDesigner builds sdbridge.tox with no path to set and nothing to install there.

What is filled in: the sources of the modules the component imports by name (bridge/shm and
bridge/osc_codec, the pure protocol modules, as they are: DESIGN.md's "never a second
implementation"; and touchdesigner/client, parameters, extension), the daemon's schema, and the launch
settings (this Python, the model, the config, the instance and ports) as the parameters' defaults,
and the configuration's starting parameter values.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from bridge import osc_codec, shm

from . import build, client, extension, parameters

# Text DAT name -> module. The names are how the modules import each other inside TouchDesigner; the
# prefix keeps them apart from any module on TouchDesigner's path (an installed sdbridge included).
EMBEDDED = {"sdb_shm": shm, "sdb_osc_codec": osc_codec, "sdb_client": client, "sdb_parameters": parameters,
            "sdb_extension": extension}
_FILLED = re.compile(r"# ---- filled in by .*?# ---- end of what is filled in ----\n", re.S)


def build_script(schema: Mapping[str, Any], state: Mapping[str, Any], launch: Mapping[str, Any]) -> str:
    """The text of sdbridge_build.py for this schema (GET /api/schema's document), starting parameter
    values (/api/state's params) and launch settings (keys of parameters.LAUNCH_DEFAULTS)."""
    unknown = set(launch) - set(parameters.LAUNCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown launch settings: {', '.join(sorted(unknown))}")
    sources = {name: Path(module.__file__).read_text(encoding="utf-8") for name, module in EMBEDDED.items()}
    filled = (f"# ---- filled in by `sdbridge touchdesigner` ----\n"
              f"SOURCES = {sources!r}\n"
              f"SCHEMA = {dict(schema)!r}\n"
              f"STATE = {dict(state)!r}\n"
              f"LAUNCH = {dict(launch)!r}\n"
              f"# ---- end of what is filled in ----\n")
    template = Path(build.__file__).read_text(encoding="utf-8")
    text, count = _FILLED.subn(lambda _: filled, template)
    if count != 1:
        raise RuntimeError("touchdesigner/build.py lost its filled-in block")
    return text
