"""Slow work off the render thread: loading a model or an autoencoder while the stream keeps serving.

`BackgroundLoad` runs one job at a time on its own thread; the render thread submits a job and, at
a frame boundary, picks up the finished result with `take()`. Only the newest request matters: a
request made while another job runs waits for it and replaces any request still waiting, so a
performer who flips through five models in a second loads the last one, not all five.
This module knows nothing of models; a job is any callable.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    key: Hashable  # what was asked for
    result: Any = None
    error: BaseException | None = None


class BackgroundLoad:
    def __init__(self, name: str = "sdbridge-load"):
        self._name = name
        self._lock = threading.Lock()
        self._waiting: tuple[Hashable, Callable[[], Any]] | None = None
        self._running: Hashable | None = None
        self._finished: Finished | None = None
        self._thread: threading.Thread | None = None

    def submit(self, key: Hashable, job: Callable[[], Any]) -> None:
        """Run `job` soon; replaces a request that has not started yet. Asking again for what is
        running now just drops the waiting request."""
        with self._lock:
            self._waiting = None if key == self._running else (key, job)
            if self._waiting is not None and self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()

    def cancel(self) -> None:
        """Drop the waiting request (a running job finishes; its result can be ignored)."""
        with self._lock:
            self._waiting = None

    @property
    def pending(self) -> Hashable | None:
        """The key being loaded or waiting to be, newest first; None when idle."""
        with self._lock:
            if self._waiting is not None:
                return self._waiting[0]
            return self._running

    def take(self) -> Finished | None:
        """The newest finished job, once; None if nothing finished since the last call."""
        with self._lock:
            finished, self._finished = self._finished, None
            return finished

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._waiting is None:
                    self._running = None
                    self._thread = None  # under the lock: the next submit starts a new worker
                    return
                key, job = self._waiting
                self._waiting, self._running = None, key
            try:
                finished = Finished(key, result=job())
            except Exception as e:  # reported by whoever takes it; the worker lives on
                finished = Finished(key, error=e)
            with self._lock:
                if self._waiting is not None:  # superseded: only the newest request is delivered
                    log.info("%s finished, but %s was asked for since; loading that instead", key, self._waiting[0])
                else:
                    self._finished = finished
