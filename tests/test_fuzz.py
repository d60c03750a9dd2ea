"""Fuzzing: nothing a network client sends, and nothing a ring's bytes say, stops or corrupts the daemon.

The daemon's real handlers take malformed, truncated, oversized and hostile input: OSC datagrams
(bridge/osc.OscServer.datagram_received, which reads with bridge/osc.read_packet; bridge/osc_codec.decode),
WebSocket text and binary messages (bridge/web.Session.handle_text, decode_frame, Session.handle_frame)
and ring segments (bridge/shm.Ring.attach, read_latest, NewestFrames). For every input:
- only the documented errors come out (OscError/OscCodecError, MessageError with a documented code,
  RingError), never another exception;
- the state changes only through validation: what a handler accepts is applied to a real StateStore,
  every value in it still validates against bridge.params, and a refused input leaves the version as it was;
- a ring read gives nothing or a frame whose size, dtype and channels agree with its pixels, inside its
  slot and inside the segment;
- thousands of inputs leave no memory (tracemalloc) and no file descriptor behind.
Every corpus file is replayed as it is, so an input that once broke something stays a test. Two tests
throw the corpus and mutations of it at a real `sdbridge serve`.

CI runs a fixed number of new random examples per target (tests/fuzz/__init__.py). A manual campaign,
each of the four targets for 150 s (about 10 minutes):

    SDBRIDGE_FUZZ_SECONDS=150 python -m pytest -q -s tests/test_fuzz.py -k survives

A failure prints the shrunk input and a `@reproduce_failure` blob; hypothesis replays it first next time
(.hypothesis/, git-ignored). Fix the code, then add the input to tests/fuzz/make_corpus.py (FOUND) and
run `python -m tests.fuzz.make_corpus`, so it is replayed for good.
"""
from __future__ import annotations

import gc
import json
import os
import socket
import struct
import tempfile
import time
import tracemalloc
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pythonosc.osc_packet import OscPacket
from websockets.sync.client import connect

from bridge import commands, osc, osc_codec, params, shm, web
from bridge.commands import Commands
from bridge.presets import NOT_SAVED, Presets
from bridge.recorder import Recorder
from bridge.schedule import Schedules, ShowClock
from bridge.show import Show
from bridge.state import StateStore
from engines.frames import MAX_INPUT_SIDE

from .conftest import gradient, wait
from .fuzz import CORPUS, EXAMPLES, TARGETS, campaign, corpus, corpus_files, fuzz_settings, mutate

ERROR_CODES = {"invalid_json", "invalid_message", "unknown_type", "invalid_params", "invalid_preset",
               "invalid_command", "unknown_topic", "message_too_large", "invalid_frame"}
FRAME_BYTES = 64 * 64 * 4 * 4  # the frame message limit of these tests: small, so that oversized is reachable
CONTROLNETS = 1
TOKENS = {"osc": mutate.OSC_TOKENS, "ws_text": mutate.JSON_TOKENS, "ws_binary": mutate.BINARY_TOKENS,
          "ring": mutate.BINARY_TOKENS}


# ---------------------------------------------------------------------------- what must hold
def assert_state_valid(values: Mapping[str, Any]) -> None:
    """Every value in a state is one its parameter accepts, as it is (coercing it changes nothing), and
    every string in it is text that a preset file, an OSC message and the tokenizer take (UTF-8)."""
    assert set(params.defaults()) <= set(values)
    for name, value in values.items():
        coerced = params.lookup(name).coerce(value)
        assert coerced == value and type(coerced) is type(value), (name, value)
        for text in _strings(value):
            text.encode("utf-8")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [s for item in value for s in _strings(item)] if isinstance(value, tuple) else []


def _ring_name(tag: str) -> str:
    return shm.ring_name(f"fz{os.getpid() % 100000}{tag}", "in")


class Targets:
    """The daemon's input handlers, wired to real components as the daemon wires them: a StateStore
    with the real schema (and a ControlNet's parameters), presets in a folder of their own, and the
    NewestFrames readers that WebSocket frames are offered to."""

    def __init__(self, folder: Path):
        self.store = StateStore({p.name: p.default for p in params.controlnet_params(CONTROLNETS)})
        self.presets = Presets(folder)
        self.errors = 0  # OscServer's error reports (a count: a list would grow in the memory check)
        self.refused = 0  # change sets the state refused
        # the show commands as the daemon has them: a show driver (ticked by hand after each input) and a
        # recorder with no frames to record
        self.show = Show(self.store, self.store.apply, self._on_error, ShowClock())
        self.recorder = Recorder(folder / "recordings", latest_frame=lambda: None, report_error=self._on_error)
        self.commands = Commands({**self.show.handlers(Schedules(folder / "schedules"), self._recall, params.validate),
                                  **self.recorder.handlers()})
        self.osc = osc.OscServer(self._apply, self._on_error, recall=self._recall, save=self._save,
                                 commands=self.commands)
        self.session = web.Session(self)
        self._ring = shm.Ring.create(_ring_name("t"), 64, 2)
        self.inputs = shm.NewestFrames(self._ring)
        self.controls = [shm.NewestFrames(self._ring) for _ in range(CONTROLNETS)]
        self.segment = _ring_name("s")

    def close(self) -> None:
        self.recorder.close()
        self._ring.close()
        self._ring.unlink()

    def _on_error(self, message: str) -> None:
        assert isinstance(message, str) and message
        self.errors += 1

    def _recall(self, name: str) -> dict[str, Any]:
        return self.presets.recall(name, self.store.snapshot().values)

    def _save(self, name: str) -> None:
        values = self.store.snapshot().values
        self.presets.save(name, values)
        # What was saved reads back as it was: a preset that cannot be recalled is a look lost mid-show.
        assert self.presets.load(name) == {k: v for k, v in values.items() if k not in NOT_SAVED}, name

    def _apply(self, changes: Mapping[str, Any]) -> int:
        try:
            return self.store.apply(changes)
        except params.ParamError:
            self.refused += 1
            raise

    def _tick(self) -> None:
        """What a morph or schedule an input started does to the state: valid values only."""
        self.show.tick()
        assert_state_valid(self.store.snapshot().values)

    # ------------------------------------------------------------------ web.Api, as the daemon has it
    def apply(self, changes: Mapping[str, Any]) -> int:
        return self.store.apply(changes)

    def run_command(self, address: str, args: list[Any]) -> Any:
        return self.commands.run(address, args)

    def snapshot(self):
        return self.store.snapshot()

    def schema(self) -> dict[str, Any]:
        return {"params": [p.describe() for p in params.schema_params((), CONTROLNETS)]}

    def telemetry_values(self) -> dict[str, Any]:
        return {}

    def offer_input(self, frame: shm.Frame) -> None:
        self.inputs.offer(frame)

    def offer_control(self, k: int, frame: shm.Frame) -> None:
        if not 0 <= k < len(self.controls):
            raise ValueError(f"no ControlNet {k}: {len(self.controls)} configured")
        self.controls[k].offer(frame)

    def preset_names(self) -> list[str]:
        return self.presets.names()

    def recall_preset(self, name: str) -> int:
        return self.apply(self._recall(name))

    def save_preset(self, name: str) -> None:
        self._save(name)

    # ------------------------------------------------------------------ one input each
    def osc_datagram(self, data: bytes) -> None:
        """A datagram at the OSC port: the decoders raise only their own errors, and the server applies
        all of a datagram that is good, or nothing and reports why."""
        try:
            assert all(address.startswith("/") for address, _ in osc.decode(data))
        except osc.OscError:
            pass
        try:
            osc_codec.decode(data)
        except osc_codec.OscCodecError:
            pass
        changes, errors, _, _ = osc.read_packet(data, self._recall, self.commands)
        assert all(isinstance(e, str) and e for e in errors)
        params.validate(changes)  # what it reads is validated already: this cannot refuse it
        version, reported, refused = self.store.version, self.errors, self.refused
        self.osc.datagram_received(data, ("127.0.0.1", 50000))
        if errors or self.refused > refused:
            assert self.errors > reported
            assert self.store.version == version, "a refused datagram changed the state"
        else:  # (a show command that fails once the changes are in is reported; the changes stand)
            assert self.store.version == version + (1 if changes else 0)
        assert_state_valid(self.store.snapshot().values)
        self._tick()

    def ws_text(self, data: bytes) -> None:
        """A text message: one or more replies, each strict JSON (what a browser can parse); an error is
        the only reply, has a documented code and changes nothing; a changed state is acknowledged with
        its new version."""
        text = data.decode("utf-8", "replace")  # a WebSocket text message is valid UTF-8
        version = self.store.version
        replies = self.session.handle_text(text)
        assert replies and all(isinstance(r, dict) for r in replies)
        for reply in replies:
            json.dumps(reply, allow_nan=False)
            assert reply["type"] in ("ack", "error", "state", "subscribed"), reply
        if any(r["type"] == "error" for r in replies):
            [reply] = replies
            assert reply["error"]["code"] in ERROR_CODES and reply["error"]["message"], reply
            assert self.store.version == version, "a refused message changed the state"
        if self.store.version != version:
            [reply] = replies
            assert reply["type"] == "ack" and reply["state_version"] == self.store.version
        assert self.session.topics <= set(web.TOPICS)
        options = self.session.frames
        assert options.encoding in web.ENCODINGS.values() and 0 < options.max_fps <= web.MAX_FPS
        assert isinstance(options.quality, int) and 1 <= options.quality <= 95
        assert_state_valid(self.store.snapshot().values)
        self._tick()

    def ws_binary(self, data: bytes) -> None:
        """A binary message: refused with a documented code, or a frame whose fields agree with its
        pixels, within the size limits, which the stream (or ControlNet) takes as it is."""
        try:
            kind, index, frame = web.decode_frame(data, FRAME_BYTES)
        except web.MessageError as e:
            assert e.code in ("invalid_frame", "message_too_large") and str(e)
            return
        assert kind in (web.INPUT, web.CONTROL) and (kind == web.CONTROL or index == 0)
        pixels = frame.pixels
        assert frame.channels in shm.CHANNEL_COUNTS and pixels.dtype == shm.DTYPE_CODES[frame.dtype]
        assert pixels.shape == (frame.height, frame.width, frame.channels)
        assert 0 < frame.width <= MAX_INPUT_SIDE and 0 < frame.height <= MAX_INPUT_SIDE
        assert pixels.nbytes <= FRAME_BYTES and pixels.flags.writeable and pixels.flags.c_contiguous
        try:
            self.session.handle_frame(kind, index, frame)
        except web.MessageError as e:
            assert kind == web.CONTROL and index >= CONTROLNETS and e.code == "invalid_frame"
            return
        reader = self.inputs if kind == web.INPUT else self.controls[index]
        taken = reader.take()
        assert taken is not None and taken.pixels is pixels

    def ring_segment(self, data: bytes) -> None:
        """A segment holding exactly these bytes: attaching refuses a bad layout with RingError; reading
        gives nothing, RingError, or the newest frame, consistent, inside its slot and the segment."""
        segment = shared_memory.SharedMemory(self.segment, create=True, size=max(len(data), 1))
        try:
            segment.buf[:len(data)] = data
            try:
                ring = shm.Ring.attach(self.segment)
            except shm.RingError as e:
                assert str(e)
                return
            try:
                self._read_ring(ring, data)
            finally:
                ring.close()
        finally:
            segment.close()
            segment.unlink()

    def _read_ring(self, ring: shm.Ring, data: bytes) -> None:
        capacity = ring.slot_capacity
        assert ring.slot_count >= 2 and capacity > 0 and capacity % 64 == 0
        assert shm.HEADER_SIZE + ring.slot_count * (shm.SLOT_HEADER_SIZE + capacity) <= len(data)
        into = np.empty(capacity, np.uint8)
        for read in (ring.read_latest, lambda: ring.read_latest(into=into)):
            try:
                frame = read()
            except shm.RingError as e:
                assert str(e)
                continue
            if frame is not None:
                _assert_frame_from(frame, ring, data)
        assert ring.read_latest(after_seq=ring.write_seq) is None
        reader = shm.NewestFrames(ring)
        try:
            frame = reader.take()
        except shm.RingError:
            assert reader.take() is None, "a bad frame is stepped over, raised once"
            return
        if frame is not None:
            _assert_frame_from(frame, ring, data)
            assert reader.take() is None, "a frame is taken once"


def _assert_frame_from(frame: shm.Frame, ring: shm.Ring, data: bytes) -> None:
    write_seq, latest = struct.unpack_from("<QI", data, 24)
    pixels = frame.pixels
    assert frame.seq == write_seq and latest < ring.slot_count
    assert frame.channels in shm.CHANNEL_COUNTS and pixels.dtype == shm.DTYPE_CODES[frame.dtype]
    assert pixels.shape == (frame.height, frame.width, frame.channels)
    assert 0 < pixels.nbytes <= ring.slot_capacity
    start = shm.HEADER_SIZE + latest * (shm.SLOT_HEADER_SIZE + ring.slot_capacity) + shm.SLOT_HEADER_SIZE
    assert start + pixels.nbytes <= len(data)
    assert pixels.tobytes() == data[start:start + pixels.nbytes], "the pixels are the slot's bytes"


@pytest.fixture
def targets():
    with tempfile.TemporaryDirectory(prefix="sdbridge-fuzz-presets-") as folder:
        t = Targets(Path(folder))
        yield t
        t.close()


def _check(targets: Targets, target: str) -> Callable[[bytes], None]:
    return {"osc": targets.osc_datagram, "ws_text": targets.ws_text, "ws_binary": targets.ws_binary,
            "ring": targets.ring_segment}[target]


# ---------------------------------------------------------------------------- corpus replay
@pytest.mark.parametrize("path", [p for t in TARGETS for p in corpus_files(t)],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_corpus_file_is_handled(targets, path):
    _check(targets, path.parent.name)(path.read_bytes())


def test_the_corpus_is_small_and_covers_every_target():
    sizes = {t: sum(p.stat().st_size for p in corpus_files(t)) for t in TARGETS}
    assert all(len(corpus_files(t)) >= 20 for t in TARGETS)
    assert sum(sizes.values()) < 200_000, sizes


# Inputs that once got through in part (tests/fuzz/make_corpus.py says how): refused whole now.
OSC_REFUSED_WHOLE = ("unknown_type_tag", "bundle_element_zero", "bundle_element_garbage", "bundle_element_negative",
                     "bundle_element_oversized", "bundle_depth_9", "bundle_depth_600", "bundle_trailing_bytes",
                     "bundle_one_bad_message", "array_unclosed", "argument_truncated")
WS_REFUSED = ("id_nan", "id_infinity", "type_not_string", "subscribe_encoding_list", "unicode_escapes")


@pytest.mark.parametrize("name", OSC_REFUSED_WHOLE)
def test_a_datagram_with_a_malformed_part_changes_nothing_and_is_reported(targets, name):
    version = targets.store.version
    targets.osc.datagram_received((CORPUS / "osc" / f"{name}.bin").read_bytes(), ("127.0.0.1", 50000))
    assert targets.errors >= 1 and targets.store.version == version


@pytest.mark.parametrize("name", WS_REFUSED)
def test_a_hostile_text_message_gets_one_error_reply_in_strict_json(targets, name):
    replies = targets.session.handle_text((CORPUS / "ws_text" / f"{name}.bin").read_text("utf-8"))
    assert [r["type"] for r in replies] == ["error"]
    assert json.loads(json.dumps(replies[0], allow_nan=False))["error"]["code"] in ERROR_CODES


def test_a_float_beyond_float32_goes_out_as_a_double():
    data = osc_codec.message("/sdbridge/latency_ms", 1e300)  # raised OverflowError before (found by fuzzing)
    assert osc_codec.decode(data) == [("/sdbridge/latency_ms", [1e300])]
    assert list(OscPacket(data).messages[0].message.params) == [1e300]  # python-osc reads it too


CONTROL_CHARACTERS = "".join(map(chr, [*range(0x20), 0x7F, 0x85, 0x2028, 0xFEFF]))


def test_a_prompt_a_client_may_set_is_one_a_preset_can_hold(targets):
    # DEL (U+007F) was written raw, which TOML forbids: the preset saved, then could not be recalled
    for text in [*mutate.LONG_STRINGS, CONTROL_CHARACTERS]:
        if targets.session.handle_text(json.dumps({"type": "set", "params": {"prompt": text}}))[0]["type"] == "ack":
            targets.session.handle_text('{"type": "preset", "save": "look"}')
            assert targets.presets.load("look")["prompt"] == text, repr(text)


# ---------------------------------------------------------------------------- fuzzing
def _fuzz(targets: Targets, target: str, structured: st.SearchStrategy[bytes], ci_examples: int) -> None:
    """Mutated corpus files and structured inputs, half and half, through one target's check."""
    seeds = corpus(target)
    check = _check(targets, target)

    @fuzz_settings(ci_examples)
    @given(st.one_of(mutate.mutated(seeds, TOKENS[target]), structured))
    def run(data: bytes) -> None:
        EXAMPLES[target] += 1
        check(data)

    campaign(target, run)


def test_osc_handling_survives_fuzzing(targets):
    _fuzz(targets, "osc", mutate.osc_packets, 1000)


def test_websocket_text_handling_survives_fuzzing(targets):
    structured = mutate.ws_texts().map(lambda text: text.encode("utf-8", "surrogatepass"))
    _fuzz(targets, "ws_text", structured | mutate.json_mutated(corpus("ws_text")), 1000)


def test_websocket_frame_handling_survives_fuzzing(targets):
    _fuzz(targets, "ws_binary", mutate.ws_frames(), 800)


def test_ring_reading_survives_fuzzing(targets):
    _fuzz(targets, "ring", mutate.ring_segments(), 800)


# ---------------------------------------------------------------------------- no leaks
LEAK_INPUTS = 1500
LEAK_BOUND = 64 * 1024  # bytes still traced after two passes (about 25 KB seen); a leak of 20 bytes an input exceeds it


def _open_descriptors() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: descriptors are not counted
        return None


@pytest.mark.parametrize("target", TARGETS)
def test_thousands_of_inputs_leave_no_memory_or_descriptors_behind(targets, target):
    seeds = corpus(target)
    inputs = seeds + mutate.random_mutations(seeds, LEAK_INPUTS, TOKENS[target], seed=1)
    check = _check(targets, target)

    def run_all() -> None:
        for data in inputs:
            check(data)
    run_all()  # first pass: caches fill, presets are written, names enter the state
    gc.collect()
    descriptors = _open_descriptors()
    tracemalloc.start()
    try:
        run_all()
        run_all()
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < LEAK_BOUND, f"{kept} bytes kept after {2 * len(inputs)} {target} inputs"
    assert _open_descriptors() == descriptors


# ---------------------------------------------------------------------------- a real daemon
FRAME = gradient()
_SENTINEL_SEEDS = iter(range(1_234_567, 1_234_667))


def _assert_served_state_valid(state: dict[str, Any]) -> None:
    """/api/state as JSON: each value one its parameter accepts, written back the same."""
    values = {name: params.lookup(name).coerce(value) for name, value in state["params"].items()}
    assert all(params.json_value(values[name]) == value for name, value in state["params"].items())
    assert_state_valid(values)


def _names_a_model(data: bytes) -> bool:
    # A model or VAE switch loads in the background and may set the state back by itself when it fails:
    # a state change no message made, which the checks here would take for one.
    return b"model" in data or b"vae" in data


def _surely_refused(data: bytes) -> bool:
    """Does the daemon refuse this datagram whatever its presets and models folders hold?"""
    try:
        messages = osc.decode(data)
    except osc.OscError:
        return True
    if any(address in (osc.PRESET_SAVE, osc.PRESET_RECALL) or commands.lookup(address) for address, _ in messages):
        return False
    return bool(osc.read_packet(data).errors)


def _drives_the_show(data: bytes) -> bool:
    """May this message start a morph or a schedule: state changes that go on after it, made by no message?"""
    return b"/schedule/s" in data or b"/preset/morph" in data or b'"command"' in data


def _restore(d) -> None:
    """Defaults again (the daemon's size), so that the stream renders input frames: a fuzzed message may
    have paused it, switched it to txt2img or set a threshold that skips every frame."""
    defaults = {p.name: params.json_value(p.default) for p in params.PARAMS if p.name not in ("model", "vae")}
    defaults.update(width=128, height=128)
    with connect(f"ws://127.0.0.1:{d.http_port}/ws", open_timeout=10) as c:
        c.send(json.dumps({"type": "set", "id": "restore", "params": defaults}))
        reply = _reply(c)
    assert reply["type"] == "ack", reply


def _reply(c, timeout: float = 10.0) -> dict[str, Any]:
    """The answer to the message just sent: pushes (frames, telemetry, state without an id) skipped."""
    end = time.monotonic() + timeout
    while True:
        raw = c.recv(timeout=max(0.01, end - time.monotonic()))
        if isinstance(raw, bytes):
            continue
        message = json.loads(raw)
        if message["type"] in ("ack", "error", "subscribed") or message["type"] == "state" and "id" in message:
            return message


def _assert_still_rendering(d) -> None:
    """The daemon renders a new input frame, serves a valid state, and no handler of it failed: an
    exception out of a handler is logged with its traceback (by asyncio or websockets)."""
    _restore(d)
    fid = d.write(FRAME)
    d.output_after(lambda o: fid <= o.frame_id <= d.frame_id, FRAME, timeout=30)
    _assert_served_state_valid(d.state())
    assert d.proc.poll() is None
    assert "Traceback" not in d.log(), d.log()[-3000:]


def _send_osc(d, datagrams: list[bytes], sentinel: int) -> int:
    """Send the datagrams, then /seed `sentinel`; the state version once the sentinel is applied."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i, data in enumerate(datagrams):
            sock.sendto(data, ("127.0.0.1", d.osc_port))
            if i % 25 == 24:
                time.sleep(0.005)  # a localhost socket buffer drops what floods it
        sock.sendto(osc_codec.message("/seed", sentinel), ("127.0.0.1", d.osc_port))
    return wait(lambda: (s := d.state())["params"]["seed"] == sentinel and s["state_version"], timeout=20)


def test_a_daemon_fed_hostile_osc_keeps_its_state_valid_and_keeps_rendering(daemon):
    d = daemon
    seeds = corpus("osc")
    datagrams = [x for x in seeds + mutate.random_mutations(seeds, 400, mutate.OSC_TOKENS, seed=2)
                 if not _names_a_model(x)]
    driving = [x for x in datagrams if _drives_the_show(x) and not _surely_refused(x)]
    datagrams = [x for x in datagrams if x not in driving]
    refused = [x for x in datagrams if _surely_refused(x)]
    others = [x for x in datagrams if not _surely_refused(x)]
    assert len(refused) > 100 and len(others) > 20
    d.output_after(lambda o: True, FRAME, timeout=60)
    since = time.monotonic()
    version = d.state()["state_version"]

    after_refused = _send_osc(d, refused, next(_SENTINEL_SEEDS))
    assert after_refused == version + 1, "only the sentinel may change the state"
    errors = d.telemetry.values("/sdbridge/error", since)
    assert errors and all(isinstance(e[0], str) and e[0] for e in errors)

    after_others = _send_osc(d, others, next(_SENTINEL_SEEDS))
    assert after_refused < after_others <= after_refused + len(others) + 1
    _assert_served_state_valid(d.state())

    # Morphs and schedules go on changing the state after their message, until a performer's set (the
    # restore below) takes the parameters back.
    assert len(driving) > 5
    _send_osc(d, driving + [osc_codec.message("/schedule/stop")], next(_SENTINEL_SEEDS))
    _assert_served_state_valid(d.state())
    _assert_still_rendering(d)


def test_a_daemon_fed_hostile_websocket_messages_answers_each_and_keeps_rendering(daemon):
    d = daemon
    texts = corpus("ws_text")
    texts = [x for x in texts + mutate.random_mutations(texts, 200, mutate.JSON_TOKENS, seed=3)
             if not _names_a_model(x)]
    driving = [x for x in texts if _drives_the_show(x)]  # answered, but the state moves after them
    texts = [x for x in texts if x not in driving]
    frames = corpus("ws_binary")
    frames += mutate.random_mutations(frames, 200, mutate.BINARY_TOKENS, seed=4)
    d.output_after(lambda o: True, FRAME, timeout=60)
    answers = {"ack": 0, "error": 0, "state": 0, "subscribed": 0}
    with connect(f"ws://127.0.0.1:{d.http_port}/ws", max_size=None, open_timeout=10) as c:
        for data in texts:
            version = d.state()["state_version"]
            c.send(data.decode("utf-8", "replace"))
            reply = _reply(c)
            answers[reply["type"]] += 1
            now = d.state()["state_version"]
            if reply["type"] == "ack":
                assert now == reply["state_version"] >= version, data
            else:
                assert now == version, (data, reply)
        assert len(driving) > 5
        for data in driving:
            c.send(data.decode("utf-8", "replace"))
            reply = _reply(c)
            assert reply["type"] in ("ack", "error"), reply
            answers[reply["type"]] += 1
        for data in frames:
            c.send(data)
        # Frames decode off the I/O thread, the newest per stream (the others are dropped): their errors
        # come when they come. The connection still answers meanwhile.
        c.send(json.dumps({"type": "get", "id": "after the frames"}))
        frame_errors, answered, end = 0, False, time.monotonic() + 10
        while not (answered and frame_errors) and time.monotonic() < end:
            reply = _reply(c)
            answered |= reply["type"] == "state"
            frame_errors += reply["type"] == "error"
        assert answered and frame_errors > 0
    assert answers["error"] > len(texts) // 4 and answers["ack"] > 10, answers
    _assert_still_rendering(d)
