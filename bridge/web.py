"""HTTP and WebSocket: PROTOCOL.md section 3.

One server (the `websockets` library) on `http_port`: `GET /` the web control page (plain files in
bridge/static, built in the browser from the schema), `GET /api/schema`, `GET /api/state`, and `WS /ws`
where clients set, get and subscribe in JSON and send and receive frames as binary messages.

The pure half has no I/O: `decode_frame` / `encode_frame` (the 32-byte SDBF header, raw, JPEG and PNG
payloads) and `Session`, one client's JSON conversation (a message in, replies out). The I/O half,
`WebServer`, only moves bytes: it answers HTTP, feeds each connection's messages to its Session, and
pushes state, telemetry and output frames to subscribers. A slow client gets the newest state, the
newest telemetry and the newest frame when it is ready for them, never a growing queue; nothing one
client sends or fails to read reaches another client or the stream.
This module knows nothing of models or the render loop: the daemon hands it an `Api`.
"""
from __future__ import annotations

import asyncio
import email.utils
import functools
import io
import ipaddress
import json
import logging
import math
import socket
import struct
import time
import urllib.parse
from collections import deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engines.frames import MAX_INPUT_SIDE

from . import params, shm
from .access import Access, RateLimit
from .presets import PresetError
from .state import Snapshot

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
# The page's files: the only paths served from disk (a fixed table, so no request can name another file).
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
              "/index.html": ("index.html", "text/html; charset=utf-8"),
              "/app.js": ("app.js", "text/javascript; charset=utf-8"),
              "/style.css": ("style.css", "text/css; charset=utf-8")}
WS_PATH = "/ws"

MAGIC = b"SDBF"
VERSION = 1
HEADER = struct.Struct("<4sHBBBBBBIIIQ")  # magic, version, kind, index, encoding, channels, dtype, flags,
assert HEADER.size == 32                  # width, height, reserved, frame_id
INPUT, OUTPUT, CONTROL = 1, 2, 3  # kinds
RAW, JPEG, PNG = 0, 1, 2  # encodings
ENCODINGS = {"raw": RAW, "jpeg": JPEG, "png": PNG}
_PIL_FORMATS = {JPEG: "JPEG", PNG: "PNG"}

TOPICS = ("state", "telemetry", "frames")
MAX_TEXT_BYTES = 256 * 1024  # a JSON message; the longest prompts with every parameter fit many times over
MAX_ID_LENGTH = 128
DEFAULT_MAX_FPS = 30.0
MAX_FPS = 240.0
DEFAULT_JPEG_QUALITY = 80
EVENTS_KEPT = 32  # errors waiting for a slow client; older ones are dropped
COOKIE_MAX_AGE_S = 30 * 24 * 3600  # a phone that opened the page's link stays in for a month of shows
MAX_CLIENTS = 32  # WebSocket connections at once; more are refused (503)
CLOSE_TIMEOUT_S = 1.0  # a client gets this long to answer the closing handshake; then its connection is cut
_PUMP_INTERVAL_S = 0.004  # how often pushes are looked for while anyone subscribes


class MessageError(ValueError):
    """A message the server refuses; `code` is the reply's error code (invalid_json, invalid_message,
    unknown_type, invalid_params, invalid_preset, invalid_command, unknown_topic, message_too_large,
    invalid_frame)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------- pure: frames
def decode_frame(data: bytes, max_bytes: int) -> tuple[int, int, shm.Frame]:
    """A binary message from a client as (kind, index, frame); MessageError for anything else.

    Raw payloads are checked against the header byte for byte; JPEG and PNG are decoded (the codec
    decides the channels; the header's BGR bit is ignored for them, the bottom-left bit still counts).
    `max_bytes` bounds the decoded pixels. The frame's source_ns and written_ns are its arrival time
    (another machine's clock means nothing here), its pixels a fresh writable array."""
    if len(data) < HEADER.size:
        raise MessageError("invalid_frame", f"a binary message is a {HEADER.size}-byte SDBF header and a payload; "
                           f"got {len(data)} bytes")
    magic, version, kind, index, encoding, channels, code, flags, width, height, _, frame_id = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise MessageError("invalid_frame", f"not an SDBF version {VERSION} frame (magic {magic!r}, version {version})")
    if kind not in (INPUT, CONTROL):
        raise MessageError("invalid_frame", f"kind {kind}: clients send input frames (1) and control images (3)")
    if kind == INPUT and index:
        raise MessageError("invalid_frame", f"an input frame has index 0, not {index}")
    payload = memoryview(data)[HEADER.size:]
    if encoding == RAW:
        pixels = _raw_pixels(payload, width, height, channels, code, max_bytes)
    elif encoding in _PIL_FORMATS:
        pixels = _decoded_pixels(payload, encoding, width, height, max_bytes)
        code = shm.CODE_OF_DTYPE[pixels.dtype]
        flags &= ~shm.FLAG_BGR
    else:
        raise MessageError("invalid_frame", f"encoding {encoding}: expected 0 (raw), 1 (JPEG) or 2 (PNG)")
    now = time.monotonic_ns()
    height, width, channels = pixels.shape
    return kind, index, shm.Frame(0, width, height, channels, code, flags, frame_id, now, now, 0, pixels)


def _raw_pixels(payload: memoryview, width: int, height: int, channels: int, code: int, max_bytes: int) -> np.ndarray:
    if channels not in shm.CHANNEL_COUNTS or code not in shm.DTYPE_CODES:
        raise MessageError("invalid_frame", f"raw frame: channels {channels} (1, 3 or 4), dtype {code} "
                           "(1 uint8, 2 uint16, 3 float16, 4 float32)")
    _check_size(width, height)
    dtype = np.dtype(shm.DTYPE_CODES[code])
    expected = width * height * channels * dtype.itemsize
    if expected > max_bytes:
        raise MessageError("message_too_large", f"a {width}x{height}x{channels} {dtype} frame is {expected} bytes; "
                           f"at most {max_bytes}")
    if len(payload) != expected:
        raise MessageError("invalid_frame", f"a raw {width}x{height}x{channels} {dtype} frame is {expected} bytes, "
                           f"the payload {len(payload)}")
    return np.frombuffer(payload, dtype).reshape(height, width, channels).copy()


def _decoded_pixels(payload: memoryview, encoding: int, width: int, height: int, max_bytes: int) -> np.ndarray:
    from PIL import Image  # imported here: only clients that send encoded frames pay for it

    name = _PIL_FORMATS[encoding]
    try:
        image = Image.open(io.BytesIO(payload), formats=[name])
    except Exception as e:  # Pillow raises several types for a bad file
        raise MessageError("invalid_frame", f"payload is not a readable {name} image: {e}") from None
    with image:
        w, h = image.size
        _check_size(w, h)  # before decoding: a tiny file may claim a huge image
        if (width or height) and (width, height) != (w, h):
            raise MessageError("invalid_frame", f"header says {width}x{height}, the {name} image is {w}x{h}")
        mode = image.mode
        if mode.startswith("I;16"):
            target = "I;16"
        elif mode in ("L", "RGB", "RGBA"):
            target = mode
        else:  # palette, grey + alpha, CMYK, ...: to RGB, keeping alpha where there is any
            target = "RGBA" if "A" in mode or "transparency" in image.info else "RGB"
        channels = 4 if target == "RGBA" else 3 if target == "RGB" else 1
        itemsize = 2 if target == "I;16" else 1
        if w * h * channels * itemsize > max_bytes:
            raise MessageError("message_too_large", f"a {w}x{h} {name} image decodes to more than {max_bytes} bytes")
        try:
            pixels = np.array(image.convert(target) if target != mode else image)
        except Exception as e:
            raise MessageError("invalid_frame", f"{name} image could not be decoded: {e}") from None
    if target == "I;16":
        pixels = pixels.astype(np.uint16)  # native byte order (a big-endian PNG decodes to ">u2")
    return pixels.reshape(h, w, channels)


def _check_size(width: int, height: int) -> None:
    if not (0 < width <= MAX_INPUT_SIDE and 0 < height <= MAX_INPUT_SIDE):
        raise MessageError("invalid_frame", f"frame size {width}x{height}: each side from 1 to {MAX_INPUT_SIDE}")


def encode_frame(pixels: np.ndarray, *, kind: int = OUTPUT, flags: int = 0, frame_id: int = 0, encoding: int = RAW,
                 quality: int = DEFAULT_JPEG_QUALITY, index: int = 0) -> bytes:
    """A frame as a binary message. Raw keeps the pixels as they are (their flags with them); JPEG and
    PNG carry 8-bit RGB(A) (JPEG: RGB or grey) with a top-left origin, as browsers and codecs expect."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    if encoding == RAW:
        code = shm.CODE_OF_DTYPE[pixels.dtype]
        header = HEADER.pack(MAGIC, VERSION, kind, index, RAW, channels, code, flags, width, height, 0, frame_id)
        return header + np.ascontiguousarray(pixels).tobytes()
    from PIL import Image

    image = display_pixels(pixels, flags, alpha=encoding == PNG)
    out = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(
        out, _PIL_FORMATS[encoding], **({"quality": quality} if encoding == JPEG else {"compress_level": 1}))
    header = HEADER.pack(MAGIC, VERSION, kind, index, encoding, image.shape[2], shm.CODE_OF_DTYPE[np.dtype(np.uint8)],
                         0, width, height, 0, frame_id)
    return header + out.getvalue()


def display_pixels(pixels: np.ndarray, flags: int, alpha: bool) -> np.ndarray:
    """Pixels as 8-bit RGB(A) or grey, top row first (what an image file holds)."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    elif pixels.dtype != np.uint8:  # floats in 0..1
        pixels = (np.clip(pixels.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if flags & shm.FLAG_BOTTOM_LEFT:
        pixels = pixels[::-1]
    channels = pixels.shape[2]
    if channels >= 3:
        if flags & shm.FLAG_BGR:
            pixels = pixels[:, :, [2, 1, 0, 3][:channels]]
        if channels == 4 and not alpha:
            pixels = pixels[:, :, :3]
    return np.ascontiguousarray(pixels)


# ---------------------------------------------------------------------------- pure: JSON messages
class Api(Protocol):
    """What the servers need from the daemon."""

    def apply(self, changes: Mapping[str, Any]) -> int: ...  # raises params.ParamError
    def snapshot(self) -> Snapshot: ...
    def schema(self) -> dict[str, Any]: ...
    def telemetry_values(self) -> dict[str, Any]: ...
    def offer_input(self, frame: shm.Frame) -> None: ...
    def offer_control(self, k: int, frame: shm.Frame) -> None: ...  # raises ValueError for an unknown k
    def preset_names(self) -> list[str]: ...
    def report_error(self, message: str) -> None: ...  # counted, logged and sent on telemetry
    def recall_preset(self, name: str) -> int: ...  # raises PresetError, params.ParamError
    def save_preset(self, name: str) -> None: ...  # raises PresetError
    def run_command(self, address: str, args: list[Any]) -> Any: ...  # bridge/commands; raises ValueError


@dataclass
class FrameOptions:
    """How output frames are pushed to one client."""

    encoding: int = JPEG
    max_fps: float = DEFAULT_MAX_FPS
    quality: int = DEFAULT_JPEG_QUALITY


def state_body(snapshot: Snapshot) -> dict[str, Any]:
    """The state as JSON: GET /api/state, and the body of a state message."""
    return {"state_version": snapshot.version,
            "params": {name: params.json_value(value) for name, value in snapshot.values.items()}}


def state_message(snapshot: Snapshot, **extra: Any) -> dict[str, Any]:
    return {"type": "state", **extra, **state_body(snapshot)}


def error_message(code: str, message: str, id: Any = None) -> dict[str, Any]:
    return {"type": "error", "id": id, "error": {"code": code, "message": message}}


class Session:
    """One client's JSON conversation: `handle_text` takes a message and returns the replies. It also
    holds what the client subscribed to, which the server's pushes read."""

    def __init__(self, api: Api):
        self.api = api
        self.topics: frozenset[str] = frozenset()
        self.frames = FrameOptions()

    def handle_text(self, text: str) -> list[dict[str, Any]]:
        """The replies to one text message; a refused message changes nothing and gets one error reply."""
        id = None
        try:
            if len(text) > MAX_TEXT_BYTES:  # characters: at least a quarter of the bytes
                raise MessageError("message_too_large", f"a text message is at most {MAX_TEXT_BYTES} bytes")
            try:
                message = json.loads(text)
            except (ValueError, RecursionError) as e:
                raise MessageError("invalid_json", f"not JSON: {e}"[:200]) from None
            try:  # an escaped lone surrogate ("\ud800") parses, but it is no text: a preset file could not hold it
                json.dumps(message, ensure_ascii=False).encode("utf-8")
            except (UnicodeEncodeError, RecursionError):
                raise MessageError("invalid_json", "a string holds an unpaired surrogate escape (\\ud800 to \\udfff) "
                                   "or the message is nested too deeply") from None
            if not isinstance(message, dict):
                raise MessageError("invalid_message", "a message is a JSON object with a \"type\"")
            id = message.get("id")
            # NaN and Infinity parse (Python's json), but a reply carrying them is not JSON a browser reads
            if not (id is None or isinstance(id, (int, float, str)) and not isinstance(id, bool)) or (
                    isinstance(id, str) and len(id) > MAX_ID_LENGTH) or (
                    isinstance(id, float) and not math.isfinite(id)):
                id = None
                raise MessageError("invalid_message", f"\"id\" is a finite number or a string of at most "
                                   f"{MAX_ID_LENGTH} characters")
            kind = message.get("type")
            handler = {"set": self._set, "get": self._get, "subscribe": self._subscribe,
                       "preset": self._preset, "command": self._command}.get(kind) if isinstance(kind, str) else None
            if handler is None:  # (a list is unhashable: hence the isinstance)
                raise MessageError("unknown_type", f"unknown message type {repr(kind)[:80]}; expected set, get, "
                                   "subscribe, preset or command")
            return handler(message, id)
        except MessageError as e:
            return [error_message(e.code, str(e), id)]

    def _set(self, message: dict[str, Any], id: Any) -> list[dict[str, Any]]:
        changes = message.get("params")
        if not isinstance(changes, dict):
            raise MessageError("invalid_message", "set takes \"params\": an object of parameter names and values")
        if not changes:
            return [{"type": "ack", "id": id, "state_version": self.api.snapshot().version}]
        try:
            version = self.api.apply(changes)
        except params.ParamError as e:
            raise MessageError("invalid_params", str(e)) from None
        return [{"type": "ack", "id": id, "state_version": version}]

    def _preset(self, message: dict[str, Any], id: Any) -> list[dict[str, Any]]:
        """{"type": "preset", "save": NAME} or {"type": "preset", "recall": NAME} (one of them); answered
        with an ack that lists the presets."""
        actions = [key for key in ("save", "recall") if key in message]
        if len(actions) != 1 or not isinstance(message[actions[0]], str):
            raise MessageError("invalid_message", "preset takes \"save\": NAME or \"recall\": NAME")
        name = message[actions[0]]
        try:
            if actions[0] == "recall":
                version = self.api.recall_preset(name)
            else:
                self.api.save_preset(name)
                version = self.api.snapshot().version
        except PresetError as e:
            raise MessageError("invalid_preset", str(e)) from None
        except params.ParamError as e:
            raise MessageError("invalid_params", f"preset {name!r}: {e}") from None
        return [{"type": "ack", "id": id, "state_version": version, "presets": self.api.preset_names()}]

    def _command(self, message: dict[str, Any], id: Any) -> list[dict[str, Any]]:
        """{"type": "command", "command": "/preset/morph", "args": ["night", 4]}: a show command, exactly as
        its OSC message (bridge/commands); answered with an ack carrying what it returned as "result"."""
        address, args = message.get("command"), message.get("args", [])
        if not isinstance(address, str) or not isinstance(args, list):
            raise MessageError("invalid_message", "command takes \"command\": an address such as \"/record/start\" "
                               "and \"args\": a list")
        try:
            result = self.api.run_command(address, args)
        except ValueError as e:  # CommandError, or what the command's handler refused
            raise MessageError("invalid_command", str(e)) from None
        return [{"type": "ack", "id": id, "state_version": self.api.snapshot().version, "result": result}]

    def _get(self, message: dict[str, Any], id: Any) -> list[dict[str, Any]]:
        return [state_message(self.api.snapshot(), id=id)]

    def _subscribe(self, message: dict[str, Any], id: Any) -> list[dict[str, Any]]:
        topics = message.get("topics")
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise MessageError("invalid_message", f"subscribe takes \"topics\": a list of {', '.join(TOPICS)}")
        unknown = [t for t in topics if t not in TOPICS]
        if unknown:
            raise MessageError("unknown_topic", f"unknown topic(s) {', '.join(map(repr, unknown))}; "
                               f"topics are {', '.join(TOPICS)}")
        frames = self._frame_options(message.get("frames", {}))
        self.topics, self.frames = frozenset(topics), frames
        replies: list[dict[str, Any]] = [{"type": "subscribed", "id": id, "topics": [t for t in TOPICS if t in topics]}]
        if "state" in topics:
            replies.append(state_message(self.api.snapshot()))
        return replies

    @staticmethod
    def _frame_options(options: Any) -> FrameOptions:
        if not isinstance(options, dict):
            raise MessageError("invalid_message", "\"frames\" is an object: {\"encoding\": \"jpeg\"|\"png\"|\"raw\", "
                               "\"max_fps\": F, \"quality\": Q}")
        unknown = set(options) - {"encoding", "max_fps", "quality"}
        if unknown:
            raise MessageError("invalid_message", f"unknown frames option(s) {', '.join(sorted(unknown))}")
        encoding = options.get("encoding", "jpeg")
        if not isinstance(encoding, str) or encoding not in ENCODINGS:  # a list or object is unhashable
            raise MessageError("invalid_message", f"frames encoding {repr(encoding)[:80]}: expected jpeg, png or raw")
        max_fps = options.get("max_fps", DEFAULT_MAX_FPS)
        if isinstance(max_fps, bool) or not isinstance(max_fps, (int, float)) or not 0 < max_fps <= MAX_FPS:
            raise MessageError("invalid_message", f"frames max_fps {max_fps!r}: a number above 0, at most {MAX_FPS:g}")
        quality = options.get("quality", DEFAULT_JPEG_QUALITY)
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
            raise MessageError("invalid_message", f"frames quality {quality!r}: a whole number from 1 to 95")
        return FrameOptions(ENCODINGS[encoding], float(max_fps), quality)

    def handle_frame(self, kind: int, index: int, frame: shm.Frame) -> None:
        """Hand a decoded frame on: input frames to the stream, control images to ControlNet `index`."""
        if kind == INPUT:
            self.api.offer_input(frame)
            return
        try:
            self.api.offer_control(index, frame)
        except ValueError as e:
            raise MessageError("invalid_frame", str(e)) from None


# ---------------------------------------------------------------------------- I/O
@dataclass(eq=False)
class _Client:
    """One connection, what waits to be sent to it (the newest of each kind, a few events) and the
    frames it sent that wait to be decoded (the newest per stream)."""

    connection: ServerConnection
    session: Session
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inbox: dict = field(default_factory=dict)  # (kind, index) -> the newest binary message not decoded yet
    inbox_ready: asyncio.Event = field(default_factory=asyncio.Event)
    state: str | None = None
    telemetry: str | None = None
    frame: bytes | None = None
    events: deque = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    frame_seq: int = 0  # the output ring seq of the last frame handed to it
    frame_due: float = 0.0  # monotonic time from which it may take the next frame

    def post(self) -> None:
        self.wake.set()

    def receive_frame(self, data: bytes) -> None:
        """Keep a frame message for the decoder; one of the same stream still waiting is replaced (a
        decoder that falls behind drops stale frames instead of queueing them: latest frame wins)."""
        key = (data[6], data[7]) if len(data) >= 8 else (0, 0)
        self.inbox.pop(key, None)  # re-inserted last: streams are decoded in arrival order
        self.inbox[key] = data
        self.inbox_ready.set()


class WebServer:
    """The HTTP + WebSocket server of one daemon, on the daemon's asyncio loop."""

    def __init__(self, api: Api, output_ring: shm.Ring, *, max_frame_bytes: int, telemetry_interval: float,
                 access: Access | None = None, limits: RateLimit | None = None, commands: Executor | None = None):
        self.api = api
        # Show commands run there (the daemon's one worker, which OSC's commands share), not on the I/O
        # thread: a snapshot's PNG or the end of a recording must not hold up every other client.
        self.commands = commands
        self.output_ring = output_ring
        self.max_frame_bytes = max_frame_bytes
        self.telemetry_interval = telemetry_interval
        self.access = access or Access("127.0.0.1")
        self.limits = limits or RateLimit(0)
        self._server: Server | None = None
        self._clients: set[_Client] = set()
        self._subscribed = asyncio.Event()
        self._pump: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._frame_buffer = np.empty(output_ring.slot_capacity, np.uint8)
        self._encoded: dict[tuple[int, int, int], bytes] = {}  # (seq, encoding, quality) -> message, newest seq only
        # Codec work off the I/O thread, in pools of its own: clients' frames cannot delay the previews.
        self._decoders = ThreadPoolExecutor(2, "sdbridge-web-decode")
        self._encoder = ThreadPoolExecutor(1, "sdbridge-web-encode")

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (0: a free port); OSError with the port named if it cannot."""
        self._loop = asyncio.get_running_loop()
        try:
            self._server = await serve(self._connection, host, port, process_request=self._http,
                                       max_size=self.max_frame_bytes + HEADER.size, max_queue=2,
                                       close_timeout=CLOSE_TIMEOUT_S, logger=QuietLogger(log, {}))
        except OSError as e:
            raise OSError(e.errno, f"cannot listen for HTTP/WebSocket on {host}:{port} ({e.strerror}); is another "
                          "sdbridge running? Choose another --http-port") from e
        self._pump = self._loop.create_task(self._push_forever())

    async def close(self) -> None:
        """Stop serving and close every connection, within about two seconds whatever clients do (one
        that reads nothing cannot even take the closing handshake: its connection is cut)."""
        if self._pump is not None:
            self._pump.cancel()
        if self._server is not None:
            await close_server(self._server, [c.connection for c in self._clients])
        self._decoders.shutdown(wait=False, cancel_futures=True)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def report_error(self, message: str) -> None:
        """Push an error to telemetry subscribers; from any thread, never raises."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        text = json.dumps({"type": "telemetry", "error": message})
        try:
            loop.call_soon_threadsafe(self._post_event, text)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _post_event(self, text: str) -> None:
        for client in self._clients:
            if "telemetry" in client.session.topics:
                client.events.append(text)
                client.post()

    # ------------------------------------------------------------------ HTTP
    async def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        refused = refuse_foreign(request) or self._refuse_stranger(connection, request, path, query)
        if refused is not None:
            return refused
        if path == WS_PATH:
            if len(self._clients) >= MAX_CLIENTS:
                return _text_response(HTTPStatus.SERVICE_UNAVAILABLE, f"at most {MAX_CLIENTS} WebSocket clients\n")
            return None  # the WebSocket handshake goes on
        if path in PAGE_FILES:
            filename, content_type = PAGE_FILES[path]
            try:
                body = (STATIC / filename).read_bytes()
            except OSError as e:
                log.error("web page file missing: %s", e)
                return _text_response(HTTPStatus.INTERNAL_SERVER_ERROR, "web page missing from the install\n")
            return http_response(HTTPStatus.OK, body, content_type)
        if path == "/api/schema":  # lists the models folders: a disk scan, off the I/O thread
            return json_response(await asyncio.to_thread(self.api.schema))
        if path == "/api/state":
            return json_response(state_body(self.api.snapshot()))
        return _text_response(HTTPStatus.NOT_FOUND, f"no such page: {path}\n")

    def _refuse_stranger(self, connection: ServerConnection, request: Request, path: str,
                         query: str) -> Response | None:
        """A 429 for a machine over its request rate; for another machine while the daemon is exposed, a
        401 without the token. The token in a page's link becomes a cookie, and the link loses it."""
        address = peer(connection)
        if not self.limits.allow(("http", address)):
            return _text_response(HTTPStatus.TOO_MANY_REQUESTS, f"over {self.limits.rate:g} requests a second\n")
        if not self.access.needs_token(address):
            return None
        cookie = f"sdbridge_token_{self.port}"
        from_link = urllib.parse.parse_qs(query).get("token", [None])[-1]
        bearer = request.headers.get("Authorization", "").partition("Bearer ")
        offered = [from_link, bearer[2].strip() if bearer[1] and not bearer[0] else None,
                   _cookies(request.headers).get(cookie)]
        if not any(self.access.token_matches(token) for token in offered):
            if self.access.count_refusal(("http", address)):
                log.warning("web request from %s refused: no valid token", address)
            return _text_response(HTTPStatus.UNAUTHORIZED, "this daemon is open to the network and wants its token: "
                                  "open the link its log shows at start (http://ADDRESS:PORT/?token=...)\n")
        if from_link is not None and path in PAGE_FILES:
            # the link opened on a phone: the browser keeps the token, the address bar and history lose it
            return http_response(HTTPStatus.SEE_OTHER, b"", None, ("Location", path),
                                 ("Set-Cookie", f"{cookie}={self.access.token}; Max-Age={COOKIE_MAX_AGE_S}; Path=/; "
                                                "HttpOnly; SameSite=Strict"))
        return None

    # ------------------------------------------------------------------ WebSocket
    async def _connection(self, connection: ServerConnection) -> None:
        client = _Client(connection, Session(self.api))
        self._clients.add(client)
        loop = asyncio.get_running_loop()
        tasks = (loop.create_task(self._send_forever(client)), loop.create_task(self._decode_forever(client)))
        key = ("ws", id(client))
        try:
            async for message in connection:
                if not self.limits.allow(key):
                    await self._over_rate(client, key)
                elif isinstance(message, str) and self.commands is not None and '"command"' in message:
                    # (any message may be handled there; only those that can be a command are sent)
                    replies = await loop.run_in_executor(self.commands, client.session.handle_text, message)
                    await self._reply(connection, self._handled(client, replies))
                elif isinstance(message, str):
                    await self._reply(connection, self._handled(client, client.session.handle_text(message)))
                else:
                    client.receive_frame(message)
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            for task in tasks:
                task.cancel()

    async def _over_rate(self, client: _Client, key: tuple) -> None:
        """A message over the client's rate was dropped: once a second, tell it and the daemon how many."""
        dropped = self.limits.report_due(key)
        if dropped:
            text = f"over {self.limits.rate:g} messages a second: {dropped} dropped"
            self.api.report_error(f"WebSocket client {peer(client.connection)}: {text}")
            await self._reply(client.connection, [error_message("rate_limited", text)])

    def _handled(self, client: _Client, replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """After a text message was handled (on this thread: the events are the loop's)."""
        if any(r["type"] == "subscribed" for r in replies):
            client.frame_seq = 0  # a new subscriber gets the newest frame at once
            if client.session.topics:
                self._subscribed.set()
        return replies

    @staticmethod
    async def _reply(connection: ServerConnection, replies: list[dict[str, Any]]) -> None:
        for reply in replies:
            await connection.send(json.dumps(reply))

    async def _decode_forever(self, client: _Client) -> None:
        """Decode the frames this client sent, the newest per stream, one at a time: a client that sends
        faster than its frames decode loses its stale frames, and costs no one else."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await client.inbox_ready.wait()
                client.inbox_ready.clear()
                while client.inbox:
                    data = client.inbox.pop(next(iter(client.inbox)))
                    try:
                        kind, index, frame = await loop.run_in_executor(self._decoders, decode_frame, data,
                                                                        self.max_frame_bytes)
                        client.session.handle_frame(kind, index, frame)
                    except MessageError as e:
                        await self._reply(client.connection, [error_message(e.code, str(e))])
        except ConnectionClosed:
            pass

    async def _send_forever(self, client: _Client) -> None:
        """Send what waits for this client, newest first within each kind; one at a time, so a slow
        reader holds up only itself and what waits is replaced, never queued."""
        connection = client.connection
        try:
            while True:
                await client.wake.wait()
                client.wake.clear()
                while True:
                    if client.events:
                        message: str | bytes | None = client.events.popleft()
                    elif client.state is not None:
                        message, client.state = client.state, None
                    elif client.telemetry is not None:
                        message, client.telemetry = client.telemetry, None
                    elif client.frame is not None:
                        message, client.frame = client.frame, None
                    else:
                        break
                    await connection.send(message)
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ pushes
    async def _push_forever(self) -> None:
        """Look for a new state, telemetry tick and output frame, and hand each to its subscribers."""
        version = 0
        next_telemetry = 0.0
        while True:
            if not any(c.session.topics for c in self._clients):
                self._subscribed.clear()
                await self._subscribed.wait()
                version = 0  # someone subscribed: whatever they subscribed to starts afresh
            try:
                now = time.monotonic()
                snapshot = self.api.snapshot()
                if snapshot.version != version:
                    version = snapshot.version
                    self._publish("state", json.dumps(state_message(snapshot)))
                if now >= next_telemetry:
                    next_telemetry = now + self.telemetry_interval
                    self._publish("telemetry", json.dumps({"type": "telemetry", **self.api.telemetry_values()}))
                await self._push_frames(now)
            except Exception:  # a push that failed must not end the pushes
                log.exception("web push failed")
            await asyncio.sleep(_PUMP_INTERVAL_S)

    def _publish(self, topic: str, text: str) -> None:
        for client in self._clients:
            if topic in client.session.topics:
                setattr(client, topic, text)
                client.post()

    async def _push_frames(self, now: float) -> None:
        ring = self.output_ring
        newest = ring.write_seq
        due = [c for c in self._clients if "frames" in c.session.topics and c.frame is None
               and c.frame_seq != newest and now >= c.frame_due]
        if not due or newest == 0:
            return
        frame = ring.read_latest(into=self._frame_buffer)
        if frame is None:
            return
        # What each client wants, taken now: a client may subscribe again while the encoding runs.
        wants = [(c, (c.session.frames.encoding, c.session.frames.quality), c.session.frames.max_fps) for c in due]
        encoded = {key: self._encoded[(frame.seq, *key)] for _, key, _ in wants if (frame.seq, *key) in self._encoded}
        missing = list({key for _, key, _ in wants if key not in encoded})
        if missing:
            # Encoding takes milliseconds: off the I/O thread, once per frame and encoding for everyone.
            # The pushes wait for it, so the buffer is not read into meanwhile.
            results = await asyncio.get_running_loop().run_in_executor(self._encoder, self._encode_all, frame, missing)
            encoded.update(zip(missing, results))
            self._encoded = {(frame.seq, *key): message for key, message in encoded.items()}
        for client, key, max_fps in wants:
            client.frame = encoded[key]
            client.frame_seq = frame.seq
            client.frame_due = now + 1.0 / max_fps
            client.post()

    @staticmethod
    def _encode_all(frame: shm.Frame, keys: list[tuple[int, int]]) -> list[bytes]:
        return [encode_frame(frame.pixels, flags=frame.flags, frame_id=frame.frame_id, encoding=encoding,
                             quality=quality) for encoding, quality in keys]


def host_allowed(host: str | None) -> bool:
    """True for a Host header naming this machine the way a performer reaches it: an IP address,
    localhost, this machine's hostname, or an mDNS name (*.local); with or without a port. Anything else
    is a name some website resolved to this machine (DNS rebinding) and is refused."""
    if not host:
        return False
    name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rpartition(":")[0] or host
    name = name.lower().rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name == "localhost" or name.endswith((".localhost", ".local")) or name in _machine_names()


@functools.lru_cache(maxsize=1)
def _machine_names() -> frozenset[str]:
    machine = socket.gethostname().lower()  # no DNS lookup (getfqdn could hang on a show network)
    return frozenset((machine, machine.split(".")[0]))


def refuse_foreign(request: Request) -> Response | None:
    """A 403 for a request a web page from another site could have made (this server's and the OSCQuery
    server's): a Host that is not this machine's (DNS rebinding), or an Origin other than the Host it
    was sent to (a page from the internet open in the show machine's browser). Clients that are not
    browsers send no Origin and pass."""
    hosts, origins = request.headers.get_all("Host"), request.headers.get_all("Origin")
    host = hosts[0] if len(hosts) == 1 else None  # none or several: refused
    if not host_allowed(host):
        return _text_response(HTTPStatus.FORBIDDEN, f"host {', '.join(hosts)!r} refused: reach this daemon by its "
                              "address, localhost, its hostname or its .local name\n")
    if len(origins) > 1 or origins and origins[0].partition("://")[2] != host:
        return _text_response(HTTPStatus.FORBIDDEN, "cross-origin requests are refused\n")
    return None


def peer(connection: ServerConnection) -> str:
    """The address a connection comes from ("" when the socket is already gone)."""
    address = connection.remote_address
    return str(address[0]) if address else ""


def _cookies(headers: Headers) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for line in headers.get_all("Cookie"):
        for pair in line.split(";"):
            name, _, value = pair.strip().partition("=")
            cookies.setdefault(name, value)
    return cookies


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (for private servers in tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_response(status: int, body: bytes = b"", content_type: str | None = None,
                  *fields: tuple[str, str]) -> Response:
    """A plain HTTP response (this server's and the OSCQuery server's): one request per connection,
    never cached, `fields` as extra headers."""
    status = HTTPStatus(status)
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                       ("Cache-Control", "no-store"), *fields])
    if content_type is not None:
        headers["Content-Type"] = content_type
    if status != HTTPStatus.NO_CONTENT:
        headers["Content-Length"] = str(len(body))
    return Response(status.value, status.phrase, headers, body)


def json_response(value: Any, status: int = HTTPStatus.OK, *fields: tuple[str, str]) -> Response:
    return http_response(status, json.dumps(value, allow_nan=False).encode(), "application/json", *fields)


async def close_server(server: Server, connections: Iterable[ServerConnection]) -> None:
    """Close a websockets server and its `connections` (all it has; the server's own list leaves out those
    already closing) within about CLOSE_TIMEOUT_S + 1 s: a client that takes no closing handshake (one
    that stopped reading, so even the close frame cannot be sent) has its connection cut."""
    server.close()
    try:
        await asyncio.wait_for(asyncio.shield(server.wait_closed()), CLOSE_TIMEOUT_S + 0.5)
        return
    except asyncio.TimeoutError:
        pass
    # The close frame waits behind what the client has not read, and close_timeout only counts once the
    # frame is out. (Not server.connections: it leaves out connections that are closing, which these are.)
    for connection in list(connections):
        connection.transport.abort()
    try:
        await asyncio.wait_for(server.wait_closed(), 1.0)
    except asyncio.TimeoutError:  # a connection that never finished its handshake ends at its open_timeout
        log.warning("a server's connections did not close; leaving them to time out")


def _text_response(status: HTTPStatus, text: str) -> Response:
    return http_response(status, text.encode(), "text/plain; charset=utf-8")


class QuietLogger(logging.LoggerAdapter):
    """websockets logs every HTTP response and connection at INFO; for these servers those are DEBUG lines."""

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if level == logging.INFO else level, msg, *args, **kwargs)
