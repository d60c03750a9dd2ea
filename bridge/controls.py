"""Control images for the ControlNets: the newest one per ControlNet, from its ring or any other path,
made ready on the device, with a policy for a writer that went quiet.

ControlNet k reads `sdb_<instance>_cn<k>`, written by the client at its own rate (a depth camera, an
Edge TOP); other paths (the WebSocket's binary kind 3) hand frames to `offer`, and both meet in one
place, `_take`. The newest frame wins. A frame is converted on the device (dtype, channels, order,
origin, resized to the output size) and preprocessed (engines.preprocess) once, when it is new or the
output size changed; every frame in between reuses the result. Each preprocessed image is also written
to `sdb_<instance>_cn<k>_view`, so the performer sees what the ControlNet sees.

A ring is stale when its writer has sent neither a frame nor a heartbeat for `max_age_s`; its
ControlNet then keeps the last good image (`last`) or stops steering (`off`) until a fresh frame comes.
A ControlNet with no image yet does not steer. A bad frame is refused and reported, and the last good
image stays. This module knows nothing of models: the render loop asks it for images and hands them on.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from engines.frames import MAX_INPUT_SIDE, OutputFormat, client_pixels, rgb_image
from engines.preprocess import preprocess, require

from . import shm

log = logging.getLogger(__name__)

LAST, OFF = "last", "off"  # what a stale ControlNet does
# telemetry /sdbridge/controlnet/<k>: no image yet, steering with a fresh image, stale
WAITING, LIVE, STALE = "waiting", "live", "stale"
# A writer whose rate is close to max_age goes stale and fresh again and again: say so once a while.
STALE_REPORT_INTERVAL_S = 30.0


@dataclass(frozen=True)
class ControlPolicy:
    max_age_s: float = 1.0  # 0: never stale
    stale: str = LAST
    canny_low: float = 0.1
    canny_high: float = 0.2


class _Control:
    """One ControlNet's input: its ring, the last good frame (on the device) and what it became."""

    def __init__(self, k: int, ring: shm.Ring, view: shm.Ring | None, preprocessor: str):
        self.k = k
        self.ring = ring
        self.view = view
        self.preprocessor = preprocessor
        self.buffer = np.empty(ring.slot_capacity, np.uint8)  # ring reads land here: no allocation per read
        self.reader = shm.NewestFrames(ring)
        self.frame: shm.Frame | None = None  # the last good frame's fields (pixels: see raw)
        self.raw: torch.Tensor | None = None  # its pixels on the device
        self.taken = 0  # frames taken so far: which raw is which
        self.image: torch.Tensor | None = None  # preprocessed, (1, 3, H, W) in [0, 1]
        self.made: tuple[int, int, int] | None = None  # (taken, width, height) that `image` was made of
        self.tried: tuple[int, int, int] | None = None  # the last one tried: a failure is not retried each frame
        self.stale = False
        self.stale_reported_ns = 0  # when going stale was last reported
        self.stale_unreported = 0  # times it went stale since


class ControlInputs:
    """The control images of every ControlNet (index k), read on the render thread."""

    def __init__(self, rings: Sequence[shm.Ring], preprocessors: Sequence[str], device: torch.device, *,
                 views: Sequence[shm.Ring | None] = (), view_format: OutputFormat = OutputFormat(),
                 policy: ControlPolicy = ControlPolicy(), report_error: Callable[[str], None] = log.warning):
        self.device = device
        self.policy = policy
        self.view_format = view_format
        self.view_flags = shm.frame_flags(bgr=view_format.bgr, bottom_left=view_format.bottom_left)
        self.report_error = report_error
        for name in set(preprocessors):
            require(name)
        self._controls = [_Control(k, ring, views[k] if k < len(views) else None, preprocessors[k])
                          for k, ring in enumerate(rings)]

    def __len__(self) -> int:
        return len(self._controls)

    def offer(self, k: int, frame: shm.Frame) -> None:
        """A control frame for ControlNet k from another path than its ring (any thread); the render
        thread takes the newest at its next frame. `frame.pixels` must not be reused by the caller.
        ValueError for a frame that breaks the rules a ring frame keeps."""
        if not 0 <= k < len(self._controls):
            raise ValueError(f"no ControlNet {k}: {len(self._controls)} configured")
        self._controls[k].reader.offer(frame)

    def poll(self) -> bool:
        """Take the newest control frames and check staleness; True if what the ControlNets see changed
        (a new frame, or a ring going stale or fresh under the `off` policy): the frame must be rendered."""
        changed = False
        now = time.monotonic_ns()
        for c in self._controls:
            newest = self._read(c)
            if newest is not None:
                changed |= self._take(c, newest)
            changed |= self._check_stale(c, now)
        return changed

    def images(self, width: int, height: int) -> list[torch.Tensor | None]:
        """Per ControlNet, its control image for a frame of this size: (1, 3, height, width) in [0, 1] on
        the device, or None where it does not steer (no image yet, or stale under `off`)."""
        out: list[torch.Tensor | None] = []
        for c in self._controls:
            if c.raw is None or (c.stale and self.policy.stale == OFF):
                out.append(None)
                continue
            wanted = (c.taken, width, height)
            if wanted not in (c.made, c.tried):
                c.tried = wanted
                try:
                    self._make_image(c, width, height)
                    c.made = wanted
                except Exception as e:  # a control image must never stop the frames (out of memory, say)
                    keeping = c.made is not None and c.made[1:] == (width, height)
                    self.report_error(f"controlnet {c.k}: control image not usable, "
                                      f"{'keeping the last one' if keeping else 'not steering'}: {type(e).__name__}: {e}")
            out.append(c.image if c.made is not None and c.made[1:] == (width, height) else None)
        return out

    def status(self) -> list[str]:
        """Per ControlNet: waiting (no image yet), live, or stale."""
        return [WAITING if c.raw is None else STALE if c.stale else LIVE for c in self._controls]

    # ------------------------------------------------------------------ internals
    def _read(self, c: _Control) -> shm.Frame | None:
        try:
            return c.reader.take(into=c.buffer)
        except shm.RingError as e:
            self.report_error(f"controlnet {c.k}: control frame refused, keeping the last good one: {e}")
            return None

    def _take(self, c: _Control, frame: shm.Frame) -> bool:
        """The one way in for a control frame, whichever path it came by."""
        if frame.width > MAX_INPUT_SIDE or frame.height > MAX_INPUT_SIDE:
            self.report_error(f"controlnet {c.k}: control frame refused: {frame.width}x{frame.height} has a side "
                              f"over {MAX_INPUT_SIDE}")
            return False
        c.raw = torch.from_numpy(frame.pixels).to(self.device, copy=True)  # the ring buffer is read again
        c.frame = frame
        c.taken += 1  # its image is made at the next images(), at the frame's size
        return True

    def _check_stale(self, c: _Control, now: int) -> bool:
        max_age = self.policy.max_age_s
        if max_age <= 0 or c.raw is None:
            return False
        fresh_ns = max(c.ring.heartbeat_ns, c.reader.offered_ns)
        stale = (now - fresh_ns) / 1e9 > max_age
        if stale == c.stale:
            return False
        c.stale = stale
        if stale and (not c.stale_reported_ns or (now - c.stale_reported_ns) / 1e9 >= STALE_REPORT_INTERVAL_S):
            then = ("keeping its last control image" if self.policy.stale == LAST
                    else "not steering until a fresh control frame arrives")
            again = f" (and {c.stale_unreported} more times since the last report)" if c.stale_unreported else ""
            self.report_error(f"controlnet {c.k}: no control frame or heartbeat on {c.ring.name} for over "
                              f"{max_age:g} s; {then}{again}")
            c.stale_reported_ns, c.stale_unreported = now, 0
        elif stale:
            c.stale_unreported += 1
        else:
            log.debug("controlnet %d: control frames again on %s", c.k, c.ring.name)
        return self.policy.stale == OFF

    def _make_image(self, c: _Control, width: int, height: int) -> None:
        frame = c.frame
        image = rgb_image(c.raw, bgr=frame.bgr, bottom_left=frame.bottom_left, width=width, height=height)
        c.image = preprocess(c.preprocessor, image, canny_low=self.policy.canny_low, canny_high=self.policy.canny_high)
        if c.view is not None:
            pixels = client_pixels(c.image, self.view_format).cpu().numpy()
            try:
                c.view.write(pixels, frame_id=frame.frame_id, flags=self.view_flags, source_ns=frame.source_ns)
            except shm.RingError as e:  # a view that does not fit must not stop the control image
                self.report_error(f"controlnet {c.k}: view not written: {e}")
