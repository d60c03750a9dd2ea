"""The HTTP/WebSocket protocol (PROTOCOL.md section 3) without sockets: binary frame messages and one
client's JSON conversation, against a real state store."""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bridge import params, shm, web
from bridge.state import StateStore

LIMIT = 1 << 20


def _picture(width: int = 40, height: int = 30, channels: int = 3) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 6 % 256, y * 8 % 256, (x + y) * 3 % 256, np.full_like(x, 200)][:channels]
    return np.stack(planes, -1).astype(np.uint8)


def _header(kind=web.INPUT, index=0, encoding=web.RAW, channels=3, dtype=1, flags=0, width=40, height=30,
            frame_id=7, magic=web.MAGIC, version=web.VERSION) -> bytes:
    return web.HEADER.pack(magic, version, kind, index, encoding, channels, dtype, flags, width, height, 0, frame_id)


def _file(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **kw)
    return out.getvalue()


def _refused(data: bytes, code: str = "invalid_frame", limit: int = LIMIT) -> str:
    with pytest.raises(web.MessageError) as e:
        web.decode_frame(data, limit)
    assert e.value.code == code
    return str(e.value)


# ---------------------------------------------------------------------------- frames
def test_the_frame_header_is_32_bytes_laid_out_as_the_protocol_says():
    data = _header(kind=3, index=2, encoding=1, channels=4, dtype=4, flags=3, width=0x01020304, height=5,
                   frame_id=2**64 - 1)
    assert len(data) == 32
    assert data[:4] == b"SDBF" and struct.unpack_from("<H", data, 4)[0] == 1
    assert tuple(data[6:12]) == (3, 2, 1, 4, 4, 3)
    assert struct.unpack_from("<IIIQ", data, 12) == (0x01020304, 5, 0, 2**64 - 1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float16, np.float32])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_raw_frame_arrives_exactly_as_sent(dtype, channels):
    pixels = (_picture(channels=channels) / 255).astype(dtype) if np.dtype(dtype).kind == "f" else \
        _picture(channels=channels).astype(dtype) * (257 if dtype == np.uint16 else 1)
    message = web.encode_frame(pixels, kind=web.INPUT, flags=shm.FLAG_BOTTOM_LEFT | shm.FLAG_BGR, frame_id=99)
    kind, index, frame = web.decode_frame(message, LIMIT)
    assert (kind, index, frame.frame_id, frame.flags) == (web.INPUT, 0, 99, shm.FLAG_BOTTOM_LEFT | shm.FLAG_BGR)
    assert (frame.width, frame.height, frame.channels) == (40, 30, channels)
    np.testing.assert_array_equal(frame.pixels, pixels)
    assert frame.pixels.flags.writeable and frame.source_ns == frame.written_ns > 0


def test_a_jpeg_frame_is_decoded_to_rgb_keeping_its_origin_and_dropping_the_bgr_bit():
    pixels = _picture()
    data = _header(encoding=web.JPEG, flags=shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT) + _file(pixels, "JPEG", quality=95)
    kind, _, frame = web.decode_frame(data, LIMIT)
    assert frame.pixels.shape == (30, 40, 3) and frame.pixels.dtype == np.uint8
    assert np.abs(frame.pixels.astype(int) - pixels).mean() < 4
    assert frame.flags == shm.FLAG_BOTTOM_LEFT and frame.frame_id == 7


def test_png_frames_keep_alpha_grey_and_16_bits():
    rgba = _picture(channels=4)
    _, _, frame = web.decode_frame(_header(encoding=web.PNG, channels=0, width=0, height=0) + _file(rgba, "PNG"), LIMIT)
    np.testing.assert_array_equal(frame.pixels, rgba)
    grey16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    _, _, frame = web.decode_frame(_header(encoding=web.PNG) + _file(grey16, "PNG"), LIMIT)
    assert frame.pixels.dtype == np.uint16 and frame.channels == 1
    np.testing.assert_array_equal(frame.pixels[:, :, 0], grey16)


@pytest.mark.parametrize("data, words", [
    (b"SDBF", "32-byte"),
    (_header(magic=b"XXXX") + bytes(3600), "not an SDBF"),
    (_header(version=2) + bytes(3600), "not an SDBF"),
    (_header(kind=web.OUTPUT) + bytes(3600), "kind 2"),
    (_header(kind=web.INPUT, index=1) + bytes(3600), "index 0"),
    (_header(encoding=7) + bytes(3600), "encoding 7"),
    (_header(channels=2) + bytes(3600), "channels 2"),
    (_header(dtype=9) + bytes(3600), "dtype 9"),
    (_header() + bytes(3599), "3600 bytes, the payload 3599"),
    (_header(width=9000, height=1) + bytes(27000), "each side"),
    (_header(width=0) + bytes(0), "each side"),
    (_header(encoding=web.JPEG) + b"\xff\xd8garbage", "not a readable JPEG"),
    (_header(encoding=web.JPEG) + _file(_picture(), "PNG"), "not a readable JPEG"),
    (_header(encoding=web.PNG, width=41) + _file(_picture(), "PNG"), "header says 41x30"),
])
def test_malformed_frames_are_refused_with_a_reason(data, words):
    assert words in _refused(data)


def test_an_image_file_claiming_a_huge_size_is_refused_before_it_is_decoded():
    small = _file(np.zeros((1, 1, 3), np.uint8), "PNG")
    for width, height, code, words in ((9000, 100, "invalid_frame", "each side"),
                                       (8000, 8000, "message_too_large", "decodes to more than")):
        # the PNG's header chunk says 1x1; make it say width x height, with its checksum
        ihdr = b"IHDR" + struct.pack(">II", width, height) + small[24:29]
        huge = small[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + small[33:]
        assert words in _refused(_header(encoding=web.PNG, width=0, height=0) + huge, code)


def test_frames_bigger_than_the_limit_are_refused_as_too_large():
    _refused(_header() + bytes(3600), "message_too_large", limit=3599)
    _refused(_header(encoding=web.PNG) + _file(_picture(), "PNG"), "message_too_large", limit=3599)


def test_output_frames_as_jpeg_are_top_left_rgb_whatever_the_output_format():
    pixels = _picture(channels=4).astype(np.float32) / 255
    stored = pixels[::-1, :, [2, 1, 0, 3]]  # bottom-left BGRA, as an output ring may hold it
    message = web.encode_frame(np.ascontiguousarray(stored), flags=shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT, frame_id=5,
                               encoding=web.JPEG, quality=95)
    _, version, kind, index, encoding, channels, dtype, flags, width, height, _, frame_id = web.HEADER.unpack_from(message)
    assert (kind, encoding, channels, dtype, flags, width, height, frame_id) == (web.OUTPUT, web.JPEG, 3, 1, 0, 40, 30, 5)
    decoded = np.asarray(Image.open(io.BytesIO(message[32:])))
    assert np.abs(decoded.astype(int) - _picture()).mean() < 4


# ---------------------------------------------------------------------------- JSON conversation
class StoreApi:
    """The daemon's side of a Session: a real state store, and the frames handed on."""

    def __init__(self, controlnets: int = 1):
        self.store = StateStore({p.name: p.default for p in params.controlnet_params(controlnets)})
        self.inputs: list[shm.Frame] = []
        self.controls: list[tuple[int, shm.Frame]] = []
        self.controlnets = controlnets

    def apply(self, changes):
        return self.store.apply(changes)

    def snapshot(self):
        return self.store.snapshot()

    def offer_input(self, frame):
        self.inputs.append(frame)

    def offer_control(self, k, frame):
        if not 0 <= k < self.controlnets:
            raise ValueError(f"no ControlNet {k}: {self.controlnets} configured")
        self.controls.append((k, frame))


@pytest.fixture
def session():
    return web.Session(StoreApi())


def _one(session: web.Session, message) -> dict:
    replies = session.handle_text(message if isinstance(message, str) else json.dumps(message))
    assert len(replies) == 1
    return replies[0]


def test_a_set_is_acknowledged_with_the_new_state_version(session):
    before = session.api.snapshot().version
    reply = _one(session, {"type": "set", "id": 3, "params": {"strength": 0.7, "prompt": "a forest"}})
    assert reply == {"type": "ack", "id": 3, "state_version": before + 1}
    assert session.api.snapshot()["strength"] == 0.7 and session.api.snapshot()["prompt"] == "a forest"


def test_a_set_is_atomic_one_bad_value_changes_nothing(session):
    before = session.api.snapshot()
    reply = _one(session, {"type": "set", "id": "a", "params": {"strength": 0.2, "steps": 500}})
    assert reply["type"] == "error" and reply["id"] == "a" and reply["error"]["code"] == "invalid_params"
    assert "steps" in reply["error"]["message"]
    assert session.api.snapshot() is before


@pytest.mark.parametrize("changes, words", [
    ({"no_such_param": 1}, "unknown parameter"),
    ({"seed": "12"}, "expected a number"),
    ({"seed": 1.5}, "whole number"),
    ({"mode": "video"}, "not one of"),
    ({"prompts": "a cat"}, "expected a list"),
    ({"controlnet/0/scale": 9}, "out of range"),
    ({"controlnet/01/scale": 1}, "unknown parameter"),
])
def test_unknown_keys_and_wrong_types_are_refused(session, changes, words):
    reply = _one(session, {"type": "set", "id": 1, "params": changes})
    assert reply["error"]["code"] == "invalid_params" and words in reply["error"]["message"]


def test_list_parameters_take_json_lists(session):
    assert _one(session, {"type": "set", "params": {"prompts": [["a cat", 1], ["a dog", 0.5]]}})["type"] == "ack"
    assert session.api.snapshot()["prompts"] == (("a cat", 1.0), ("a dog", 0.5))


def test_an_empty_set_changes_nothing_and_is_acknowledged(session):
    version = session.api.snapshot().version
    assert _one(session, {"type": "set", "id": 1, "params": {}}) == {"type": "ack", "id": 1, "state_version": version}


def test_get_answers_the_whole_state_with_its_version(session):
    session.api.apply({"seeds": ((5, 1.0),)})
    reply = _one(session, {"type": "get", "id": 9})
    snapshot = session.api.snapshot()
    assert reply["type"] == "state" and reply["id"] == 9 and reply["state_version"] == snapshot.version
    assert reply["params"]["seeds"] == [[5, 1.0]] and reply["params"]["strength"] == snapshot["strength"]
    assert set(reply["params"]) == set(snapshot.values)
    json.dumps(reply, allow_nan=False)


@pytest.mark.parametrize("text, code", [
    ("{not json", "invalid_json"),
    ("[" * 100000 + "]" * 100000, "invalid_json"),  # deep nesting: refused, not a crash
    ('"set"', "invalid_message"),
    ('{"id": 1}', "unknown_type"),
    ('{"type": "delete"}', "unknown_type"),
    ('{"type": "set"}', "invalid_message"),
    ('{"type": "set", "params": [1]}', "invalid_message"),
    ('{"type": "set", "id": {"a": 1}, "params": {}}', "invalid_message"),
    ('{"type": "set", "id": true, "params": {}}', "invalid_message"),
    ('{"type": "subscribe", "topics": "state"}', "invalid_message"),
    ('{"type": "subscribe", "topics": ["state", "video"]}', "unknown_topic"),
    ('{"type": "subscribe", "topics": ["frames"], "frames": {"encoding": "webp"}}', "invalid_message"),
    ('{"type": "subscribe", "topics": ["frames"], "frames": {"max_fps": 0}}', "invalid_message"),
    ('{"type": "subscribe", "topics": ["frames"], "frames": {"max_fps": 1e9}}', "invalid_message"),
    ('{"type": "subscribe", "topics": ["frames"], "frames": {"quality": 100}}', "invalid_message"),
    ('{"type": "subscribe", "topics": ["frames"], "frames": {"size": 3}}', "invalid_message"),
    ('{"type": "set", "params": {"strength": NaN}}', "invalid_params"),
    (json.dumps({"type": "set", "params": {"prompt": "x" * web.MAX_TEXT_BYTES}}), "message_too_large"),
])
def test_bad_messages_get_a_structured_error_and_change_nothing(session, text, code):
    before = session.api.snapshot()
    reply = _one(session, text)
    assert reply["type"] == "error" and reply["error"]["code"] == code and reply["error"]["message"]
    assert session.api.snapshot() is before and session.topics == frozenset()
    json.dumps(reply)


def test_subscribe_sets_the_topics_and_answers_with_the_state(session):
    replies = session.handle_text(json.dumps({"type": "subscribe", "id": 2, "topics": ["frames", "state"],
                                              "frames": {"encoding": "raw", "max_fps": 12.5}}))
    assert replies[0] == {"type": "subscribed", "id": 2, "topics": ["state", "frames"]}
    assert replies[1]["type"] == "state" and replies[1]["state_version"] == session.api.snapshot().version
    assert session.topics == {"state", "frames"}
    assert session.frames == web.FrameOptions(web.RAW, 12.5, web.DEFAULT_JPEG_QUALITY)
    assert _one(session, {"type": "subscribe", "topics": []})["topics"] == []  # an empty list ends them all
    assert session.topics == frozenset()


def test_frames_are_handed_to_the_stream_or_to_their_controlnet(session):
    _, _, frame = web.decode_frame(web.encode_frame(_picture(), kind=web.INPUT), LIMIT)
    session.handle_frame(web.INPUT, 0, frame)
    session.handle_frame(web.CONTROL, 0, frame)
    assert session.api.inputs == [frame] and session.api.controls == [(0, frame)]
    with pytest.raises(web.MessageError, match="no ControlNet 3"):
        session.handle_frame(web.CONTROL, 3, frame)


def test_a_client_that_sends_faster_than_its_frames_decode_keeps_only_the_newest_per_stream():
    client = web._Client(connection=None, session=None)
    messages = [web.encode_frame(_picture(), kind=kind, index=index, frame_id=n)
                for n, (kind, index) in enumerate([(1, 0), (3, 0), (1, 0), (3, 1), (3, 0)])]
    for message in messages:
        client.receive_frame(message)
    assert list(client.inbox.values()) == [messages[2], messages[3], messages[4]]  # arrival order of the newest
    assert client.inbox_ready.is_set()


@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:9102", True), ("localhost:9102", True), ("[::1]:9102", True), ("192.168.1.20", True),
    ("studio-pc.local:9102", True), ("rebind.attacker.example:9102", False), ("attacker.example", False),
    (None, False), ("", False),
])
def test_only_hosts_naming_this_machine_are_served(host, allowed):
    assert web.host_allowed(host) is allowed
