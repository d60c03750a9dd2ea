"""Frame rings in shared memory: PROTOCOL.md section 1, and nothing else.

A ring is one named shared-memory segment: a 64-byte segment header, then `slot_count` slots of a
64-byte slot header plus `slot_capacity` bytes of pixels. One writer publishes frames with a seqlock;
any number of readers take the newest complete frame and detect torn copies.

This module is pure protocol code. It imports only the standard library and numpy, because
TouchDesigner's Python embeds it as it is (see touchdesigner/); it knows nothing of the daemon. For the
same reason it does without `from __future__ import annotations`: with string annotations, a dataclass
needs its module in sys.modules, where TouchDesigner may not put a DAT module.
"""
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing import shared_memory

import numpy as np

MAGIC = b"SDBR"
VERSION = 1
HEADER_SIZE = 64
SLOT_HEADER_SIZE = 64
DEFAULT_SLOT_COUNT = 3
MAX_NAME_LENGTH = 30  # macOS limits POSIX shared-memory names

# magic, version, header_size, slot_count, slot_header_size, slot_capacity, write_seq, latest_slot,
# writer_pid, heartbeat_ns, reserved
SEGMENT_HEADER = struct.Struct("<4sHHIIQQIIQ16s")
# seq, width, height, channels, dtype, flags, frame_id, source_ns, written_ns, state_version, seq_end
SLOT_HEADER = struct.Struct("<QIIHHIQQQQQ")
assert SEGMENT_HEADER.size == HEADER_SIZE and SLOT_HEADER.size == SLOT_HEADER_SIZE

# Byte offsets of the header fields that change after creation.
_WRITE_SEQ, _LATEST_SLOT, _WRITER_PID, _HEARTBEAT_NS = 24, 32, 36, 40
_SLOT_SEQ, _SLOT_SEQ_END = 0, 56
_U64, _U32 = struct.Struct("<Q"), struct.Struct("<I")

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.uint16),
    3: np.dtype(np.float16),
    4: np.dtype(np.float32),
}
CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}
CHANNEL_COUNTS = (1, 3, 4)

FLAG_BGR = 1 << 0  # channel order B, G, R(, A); else R, G, B(, A)
FLAG_BOTTOM_LEFT = 1 << 1  # first row is the bottom row (TouchDesigner's order); else the top row

_READ_ATTEMPTS = 64


class RingError(Exception):
    """A segment is missing, malformed, or a frame does not fit the protocol."""


def segment_names(instance: str) -> tuple[str, str]:
    """The input and output segment names of a daemon instance."""
    return ring_name(instance, "in"), ring_name(instance, "out")


def ring_name(instance: str, stream: str) -> str:
    name = f"sdb_{instance}_{stream}"
    if len(name) > MAX_NAME_LENGTH:
        raise RingError(f"segment name {name!r} is longer than {MAX_NAME_LENGTH} characters; "
                        "choose a shorter instance name")
    return name


def slot_capacity_for(width: int, height: int, channels: int = 4, itemsize: int = 4) -> int:
    """Bytes a slot needs for the largest frame, rounded up to a multiple of 64."""
    size = width * height * channels * itemsize
    return (size + 63) // 64 * 64


@dataclass(frozen=True)
class Frame:
    """One frame as read from a ring: the slot fields and a private copy of the pixels."""

    seq: int
    width: int
    height: int
    channels: int
    dtype: int
    flags: int
    frame_id: int
    source_ns: int
    written_ns: int
    state_version: int
    pixels: np.ndarray  # (height, width, channels), dtype DTYPE_CODES[dtype]

    @property
    def bgr(self) -> bool:
        return bool(self.flags & FLAG_BGR)

    @property
    def bottom_left(self) -> bool:
        return bool(self.flags & FLAG_BOTTOM_LEFT)


_TRACKER_LOCK = threading.Lock()


def _open(name: str, create: bool = False, size: int = 0) -> shared_memory.SharedMemory:
    """A segment opened without Python's resource tracker.

    The tracker would unlink the segment when this process exits, and the daemon removes its segments
    itself while a reader must never remove one it merely attached to (PROTOCOL.md, last note). It
    also runs as a helper process started from `sys.executable`, which inside TouchDesigner on macOS
    may be TouchDesigner itself, so it is never started rather than started and unregistered from.
    Python 3.13 has `track=False`; before it, `register` is skipped while the segment opens. Windows
    has no tracker for shared memory.
    """
    if os.name == "nt":
        return shared_memory.SharedMemory(name=name, create=create, size=size)
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)
    from multiprocessing import resource_tracker

    with _TRACKER_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda name, rtype: None
        try:
            return shared_memory.SharedMemory(name=name, create=create, size=size)
        finally:
            resource_tracker.register = register


def _unlink(shm: shared_memory.SharedMemory) -> None:
    """Remove a segment's name. Not `shm.unlink()`: that also unregisters it from the resource tracker,
    which never had it (`_open`). On Windows a segment goes when its last handle closes."""
    if os.name == "nt":
        return
    import _posixshmem  # the module SharedMemory itself uses on POSIX

    try:
        _posixshmem.shm_unlink(shm._name)  # type: ignore[attr-defined]
    except FileNotFoundError:
        pass


def _unlink_name(name: str) -> None:
    """Remove the segment `name` without mapping it (one that cannot be mapped)."""
    if os.name == "nt":
        return
    import _posixshmem

    try:
        _posixshmem.shm_unlink("/" + name.lstrip("/"))
    except FileNotFoundError:
        pass


class Ring:
    """A frame ring in a shared-memory segment.

    `Ring.create` makes (or safely reuses) a segment and owns it; `Ring.attach` opens one that another
    process made. Exactly one process may `write` to a ring; any number may `read_latest`.
    """

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool):
        self._shm = shm
        self._buf = shm.buf
        self.owner = owner
        self.name = shm.name.lstrip("/")
        if shm.size < HEADER_SIZE:
            raise RingError(f"segment {self.name!r} is {shm.size} bytes, too small for a ring header")
        magic, version, header_size, slot_count, slot_header_size, capacity = SEGMENT_HEADER.unpack_from(
            self._buf, 0)[:6]
        problem = _header_problem(magic, version, header_size, slot_count, slot_header_size, capacity, shm.size)
        if problem:
            raise RingError(f"segment {self.name!r} is not an sdbridge ring: {problem}")
        self.slot_count = slot_count
        self.slot_capacity = capacity

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str, slot_capacity: int, slot_count: int = DEFAULT_SLOT_COUNT,
               writer: bool = True) -> "Ring":
        """Create the segment `name`, or reuse one a crashed owner left if its layout fits.

        A leftover segment whose magic, version, slot count and capacity match is reused as it is (its
        frames stay readable); anything else is removed and made anew. `writer=False` is for a ring the
        clients write (the daemon's input): its writer_pid and heartbeat stay the client's.
        """
        if slot_count < 2:
            raise RingError("a ring needs at least 2 slots")
        if slot_capacity <= 0 or slot_capacity % 64:
            raise RingError("slot_capacity must be a positive multiple of 64")
        size = HEADER_SIZE + slot_count * (SLOT_HEADER_SIZE + slot_capacity)
        ring = cls._reuse(name, slot_capacity, slot_count, size)
        if ring is None:
            shm = _open(name, create=True, size=size)
            SEGMENT_HEADER.pack_into(shm.buf, 0, MAGIC, VERSION, HEADER_SIZE, slot_count, SLOT_HEADER_SIZE,
                                     slot_capacity, 0, 0, 0, 0, bytes(16))
            for i in range(slot_count):
                SLOT_HEADER.pack_into(shm.buf, HEADER_SIZE + i * (SLOT_HEADER_SIZE + slot_capacity),
                                      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
            ring = cls(shm, owner=True)
        if writer:
            ring._set_writer()
        return ring

    @classmethod
    def _reuse(cls, name: str, slot_capacity: int, slot_count: int, size: int) -> "Ring | None":
        """The leftover segment `name` if its layout fits; a misfit is removed. None: make a new one."""
        try:
            old = _open(name)
        except FileNotFoundError:
            return None
        except ValueError:  # an empty segment (its maker died before sizing it): cannot even be mapped
            _unlink_name(name)
            return None
        header = SEGMENT_HEADER.unpack_from(old.buf, 0) if old.size >= HEADER_SIZE else None
        if (header is not None and header[0] == MAGIC and header[1] == VERSION
                and header[3] == slot_count and header[5] == slot_capacity and old.size >= size):
            return cls(old, owner=True)
        old.close()
        _unlink(old)
        return None

    @classmethod
    def attach(cls, name: str) -> "Ring":
        """Open an existing ring; raises FileNotFoundError while it does not exist yet, RingError for a
        segment that is not a whole ring (empty, truncated, another program's)."""
        try:
            shm = _open(name)
        except ValueError:  # Python cannot map an empty segment
            raise RingError(f"segment {name!r} is empty, not an sdbridge ring (its maker is creating it, or "
                            "died before sizing it)") from None
        try:
            return cls(shm, owner=False)
        except RingError:
            shm.close()
            raise

    def close(self) -> None:
        """Release this process's mapping (the segment stays)."""
        self._buf = None
        try:
            self._shm.close()
        except BufferError:  # a numpy view is still alive somewhere; the OS frees it at exit
            pass

    def unlink(self) -> None:
        """Remove the segment from the system (owner only, at shutdown)."""
        _unlink(self._shm)

    # ------------------------------------------------------------------ header
    @property
    def write_seq(self) -> int:
        return _U64.unpack_from(self._buf, _WRITE_SEQ)[0]

    @property
    def latest_slot(self) -> int:
        return _U32.unpack_from(self._buf, _LATEST_SLOT)[0]

    @property
    def writer_pid(self) -> int:
        return _U32.unpack_from(self._buf, _WRITER_PID)[0]

    @property
    def heartbeat_ns(self) -> int:
        return _U64.unpack_from(self._buf, _HEARTBEAT_NS)[0]

    def heartbeat(self) -> None:
        """Tell readers the writer is alive while it has no new frame."""
        _U64.pack_into(self._buf, _HEARTBEAT_NS, time.monotonic_ns())

    def _set_writer(self) -> None:
        _U32.pack_into(self._buf, _WRITER_PID, os.getpid())
        self.heartbeat()

    def _slot_offset(self, index: int) -> int:
        return HEADER_SIZE + index * (SLOT_HEADER_SIZE + self.slot_capacity)

    # ------------------------------------------------------------------ frames
    def write(self, pixels: np.ndarray, *, frame_id: int = 0, flags: int = 0, source_ns: int | None = None,
              state_version: int = 0) -> int:
        """Publish `pixels` (height, width, channels) as the newest frame; returns its seq."""
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if pixels.ndim != 3 or pixels.shape[2] not in CHANNEL_COUNTS:
            raise RingError(f"a frame is (height, width, 1|3|4), not {pixels.shape}")
        code = CODE_OF_DTYPE.get(pixels.dtype)
        if code is None:
            raise RingError(f"dtype {pixels.dtype} is not one of uint8, uint16, float16, float32")
        height, width, channels = pixels.shape
        nbytes = pixels.nbytes
        if nbytes > self.slot_capacity:
            raise RingError(f"a {width}x{height}x{channels} {pixels.dtype} frame needs {nbytes} bytes; "
                            f"ring {self.name!r} slots hold {self.slot_capacity} (the daemon sizes them by its "
                            "max_width and max_height: start it with larger --max-width/--max-height, or send "
                            "uint8 or a smaller frame)")
        buf = self._buf
        seq = self.write_seq + 1
        slot = (self.latest_slot + 1) % self.slot_count
        off = self._slot_offset(slot)
        _U64.pack_into(buf, off + _SLOT_SEQ, 0)
        now = time.monotonic_ns()
        SLOT_HEADER.pack_into(buf, off, 0, width, height, channels, code, flags, frame_id,
                              now if source_ns is None else source_ns, 0, state_version, 0)
        dst = np.ndarray((height, width, channels), dtype=pixels.dtype, buffer=buf,
                         offset=off + SLOT_HEADER_SIZE)
        np.copyto(dst, pixels)
        del dst
        now = time.monotonic_ns()
        _U64.pack_into(buf, off + 40, now)  # written_ns
        _U64.pack_into(buf, off + _SLOT_SEQ_END, seq)
        _U64.pack_into(buf, off + _SLOT_SEQ, seq)
        _U32.pack_into(buf, _LATEST_SLOT, slot)
        _U32.pack_into(buf, _WRITER_PID, os.getpid())
        _U64.pack_into(buf, _HEARTBEAT_NS, now)
        _U64.pack_into(buf, _WRITE_SEQ, seq)
        return seq

    def read_latest(self, after_seq: int = 0, into: np.ndarray | None = None) -> Frame | None:
        """The newest complete frame if its seq is above `after_seq`, else None.

        The pixels are a fresh copy, or with `into` (a writable byte array of at least slot_capacity
        bytes) a view on it, so that a reader at full frame rate allocates nothing per frame; `into` is
        written even when the read then fails.

        Raises RingError for a slot whose fields break the protocol (a bad writer); returns None if
        the writer keeps overwriting the slot faster than it can be copied.
        """
        if into is not None and (into.dtype != np.uint8 or into.nbytes < self.slot_capacity):
            raise ValueError(f"into must be a uint8 array of at least {self.slot_capacity} bytes")
        buf = self._buf
        for _ in range(_READ_ATTEMPTS):
            write_seq = _U64.unpack_from(buf, _WRITE_SEQ)[0]
            if write_seq == 0 or write_seq <= after_seq:
                return None
            slot = _U32.unpack_from(buf, _LATEST_SLOT)[0]
            if slot >= self.slot_count:
                raise RingError(f"ring {self.name!r}: latest_slot {slot} is not below slot_count {self.slot_count}")
            off = self._slot_offset(slot)
            fields = SLOT_HEADER.unpack_from(buf, off)
            if fields[0] != write_seq:
                continue  # the writer is between publishing the slot and the header
            seq, width, height, channels, code, flags, frame_id, source_ns, written_ns, state_version, _ = fields
            problem = _slot_problem(width, height, channels, code, self.slot_capacity)
            if problem:
                if _U64.unpack_from(buf, off + _SLOT_SEQ)[0] != write_seq:
                    continue  # a header torn by a concurrent write, not a bad writer: read again
                raise RingError(f"ring {self.name!r}: {problem}")
            dtype = DTYPE_CODES[code]
            source = np.ndarray((height, width, channels), dtype=dtype, buffer=buf, offset=off + SLOT_HEADER_SIZE)
            if into is None:
                pixels = source.copy()
            else:
                pixels = into.reshape(-1)[:source.nbytes].view(dtype).reshape(source.shape)
                np.copyto(pixels, source)
            del source  # no view may outlive the read: the segment could not be closed
            if (_U64.unpack_from(buf, off + _SLOT_SEQ)[0] == write_seq
                    and _U64.unpack_from(buf, off + _SLOT_SEQ_END)[0] == write_seq):
                return Frame(seq, width, height, channels, code, flags, frame_id, source_ns, written_ns,
                             state_version, pixels)
        return None


class NewestFrames:
    """A reader that takes each newest frame of a ring once: it remembers the last seq it took, follows
    a writer that starts counting again (a restarted client), and steps over a frame that breaks the
    protocol, which is raised once rather than at every read.

    Frames may also come by another path than the ring (a network client): `offer` hands one in from
    any thread, and `take` returns the newer of it and the ring's newest: the one that arrived last
    (an offered frame's written_ns is when it was offered)."""

    def __init__(self, ring: Ring):
        self.ring = ring
        self.seq = 0  # the last frame taken (or stepped over)
        self.offered_ns = 0  # `time.monotonic_ns()` when a frame was last offered
        self._offered: Frame | None = None  # the newest offered frame, not taken yet
        self._lock = threading.Lock()

    def offer(self, frame: Frame) -> None:
        """Hand in a frame from another path; `frame.pixels` must not be reused by the caller. ValueError
        for a frame that breaks the rules a ring frame keeps."""
        pixels = frame.pixels
        if (frame.channels not in CHANNEL_COUNTS or pixels.dtype not in CODE_OF_DTYPE
                or pixels.shape != (frame.height, frame.width, frame.channels)):
            raise ValueError(f"a frame is (height, width, 1|3|4) pixels of uint8, uint16, float16 or float32 "
                             f"matching its width, height and channels; got {pixels.shape} {pixels.dtype} for "
                             f"{frame.width}x{frame.height}x{frame.channels}")
        now = time.monotonic_ns()
        with self._lock:
            self._offered = replace(frame, written_ns=now)
            self.offered_ns = now

    def take(self, into: np.ndarray | None = None) -> Frame | None:
        """The newest frame if it is newer than the last one taken, else None (`into`: as read_latest, for
        ring frames). RingError for a bad ring frame, which the next take has left behind (an offered
        frame waits for that take)."""
        offered = self._offered
        ring = self.ring
        if ring.write_seq < self.seq:
            self.seq = 0
        try:
            frame = ring.read_latest(after_seq=self.seq, into=into)
        except RingError:
            self.seq = ring.write_seq
            raise
        if frame is not None:
            self.seq = frame.seq
        if offered is not None:
            with self._lock:
                if self._offered is offered:  # one offered meanwhile waits for the next take
                    self._offered = None
            if frame is None or offered.written_ns > frame.written_ns:
                return offered
        return frame


def frame_flags(*, bgr: bool, bottom_left: bool) -> int:
    """The slot `flags` of a frame in this channel order and row order."""
    return (FLAG_BGR if bgr else 0) | (FLAG_BOTTOM_LEFT if bottom_left else 0)


def _slot_problem(width: int, height: int, channels: int, code: int, capacity: int) -> str | None:
    dtype = DTYPE_CODES.get(code)
    if dtype is None:
        return f"dtype code {code} is not 1, 2, 3 or 4"
    if channels not in CHANNEL_COUNTS:
        return f"{channels} channels; expected 1, 3 or 4"
    if width == 0 or height == 0 or width * height * channels * dtype.itemsize > capacity:
        return f"a {width}x{height}x{channels} {dtype} frame does not fit a {capacity}-byte slot"
    return None


def _header_problem(magic: bytes, version: int, header_size: int, slot_count: int, slot_header_size: int,
                    capacity: int, size: int) -> str | None:
    if magic != MAGIC:
        return f"magic {magic!r}, expected {MAGIC!r}"
    if version != VERSION:
        return f"version {version}, expected {VERSION}"
    if header_size != HEADER_SIZE or slot_header_size != SLOT_HEADER_SIZE:
        return f"header sizes {header_size}/{slot_header_size}, expected 64/64"
    if slot_count < 2 or capacity == 0 or capacity % 64:
        return f"slot_count {slot_count} and slot_capacity {capacity} are not a valid layout"
    if size < HEADER_SIZE + slot_count * (SLOT_HEADER_SIZE + capacity):
        return f"segment is {size} bytes, too small for {slot_count} slots of {capacity}"
    return None
