"""The versioned parameter store.

Network handlers `apply` validated change sets; the render loop takes one immutable `Snapshot` per
frame, so a frame never sees half of a bundle. Every accepted change set raises the version by one;
a refused one changes nothing. This module knows nothing of OSC or engines.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from . import params


@dataclass(frozen=True)
class Snapshot:
    """The whole parameter state at one version. Read it like a mapping: `snap["seed"]`."""

    version: int
    values: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


# A cross-parameter or runtime check (say, "the output must fit the output ring"); raises ParamError.
Check = Callable[[Mapping[str, Any]], None]


class StateStore:
    """Thread-safe parameter state with a version that grows with every accepted change set."""

    def __init__(self, initial: Mapping[str, Any] | None = None, check: Check | None = None):
        values = params.defaults()
        values.update(params.validate(initial or {}))
        self._check = check
        if check:
            check(values)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._snapshot = Snapshot(1, MappingProxyType(values))

    def snapshot(self) -> Snapshot:
        return self._snapshot  # replaced whole, never mutated: reading it needs no lock

    @property
    def version(self) -> int:
        return self._snapshot.version

    def apply(self, changes: Mapping[str, Any], *, only_if: Mapping[str, Any] | None = None) -> int | None:
        """Apply all of `changes` atomically and return the new version, or raise ParamError.
        With `only_if`, apply only while the state still holds those values (checked under the lock)
        and return None otherwise: a compare-and-set for corrections made behind the user's back."""
        coerced = params.validate(changes)
        with self._lock:
            if only_if is not None and any(self._snapshot.values.get(k) != v for k, v in only_if.items()):
                return None
            values = dict(self._snapshot.values)
            values.update(coerced)
            if self._check:
                self._check(values)
            self._snapshot = Snapshot(self._snapshot.version + 1, MappingProxyType(values))
            self._changed.notify_all()
            return self._snapshot.version

    def wait_for_change(self, version: int, timeout: float) -> bool:
        """Block until the version differs from `version` or `timeout` passes; True if it changed."""
        with self._lock:
            return self._changed.wait_for(lambda: self._snapshot.version != version, timeout)
