"""Writes the fuzzers' seed corpus: tests/fuzz/corpus/<target>/<what it is>.bin.

    python -m tests.fuzz.make_corpus          # from the repository root

Every seed is made here from the project's own encoders (bridge/osc_codec, bridge/web.encode_frame, a real
bridge/shm ring) or written byte by byte where the point is a broken input, so the corpus can be
regenerated and reviewed. A crashing input found by fuzzing is added to `FOUND` below, byte for byte, so it
stays a regression test (tests/test_fuzz.py replays every file). Times and process ids are zeroed: running
this again gives the same bytes (JPEG and PNG bytes may differ across Pillow versions).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bridge import osc_codec, params, shm, web  # noqa: E402

CORPUS = Path(__file__).resolve().with_name("corpus")

# ---------------------------------------------------------------------------- OSC datagrams
_I32, _F32, _F64, _I64, _U64 = struct.Struct(">i"), struct.Struct(">f"), struct.Struct(">d"), struct.Struct(">q"), \
    struct.Struct(">Q")


def osc_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    raw += b"\x00"
    return raw + b"\x00" * (-len(raw) % 4)


def osc_raw(address: str, tags: str, *payloads: bytes) -> bytes:
    """A message with the type tag string and argument bytes exactly as given (for types and breakage
    that bridge/osc_codec.message does not write)."""
    return osc_string(address) + osc_string(tags) + b"".join(payloads)


def osc_bundle(*elements: bytes, timetag: int = osc_codec.IMMEDIATELY) -> bytes:
    return osc_codec.bundle(elements, timetag)


def nested(depth: int, inner: bytes) -> bytes:
    for _ in range(depth):
        inner = osc_bundle(inner)
    return inner


def _osc_seeds() -> dict[str, bytes]:
    m = osc_codec.message
    blob = _I32.pack(3) + b"abc\x00"
    seeds = {
        # one message per kind of parameter, valid
        "msg_strength_float.bin": m("/strength", 0.25),
        "msg_seed_int.bin": m("/seed", 1234),
        "msg_seed_random.bin": m("/seed", -1),
        "msg_prompt_string.bin": m("/prompt", "a (red:1.2) fox, <lora:none:0.5> BREAK night"),
        "msg_negative_prompt.bin": m("/negative_prompt", "blurry"),
        "msg_prompts_blend.bin": m("/prompts", "a cat", 0.7, "a dog", 0.3),
        "msg_prompts_empty.bin": m("/prompts"),
        "msg_seeds_blend.bin": m("/seeds", 1, 0.5, 2, 0.5),
        "msg_t_index_list.bin": m("/t_index_list", 10, 20, 30),
        "msg_mode_txt2img.bin": m("/mode", "txt2img"),
        "msg_pause_int.bin": m("/pause", 1),
        "msg_pause_true.bin": m("/pause", True),
        "msg_steps.bin": m("/steps", 2),
        "msg_guidance_int_for_float.bin": m("/guidance_scale", 2),
        "msg_cfg_type.bin": m("/cfg_type", "self"),
        "msg_resolution.bin": m("/resolution", 128, 96),
        "msg_width.bin": m("/width", 64),
        "msg_norm_strength.bin": m("/norm/strength", 0.75),
        "msg_norm_width.bin": m("/norm/width", 0.0),
        "msg_lora_weight.bin": m("/lora/some_style", 0.8),
        "msg_controlnet_scale.bin": m("/controlnet/0/scale", 0.5),
        "msg_controlnet_end.bin": m("/controlnet/1/end", 0.9),
        "msg_preset_save.bin": m("/preset/save", "fuzz"),
        "msg_preset_recall.bin": m("/preset/recall", "fuzz"),
        "msg_similarity_threshold.bin": m("/similarity_threshold", 0.02),
        "msg_feedback.bin": m("/feedback", 0.3),
        "cmd_morph.bin": m("/preset/morph", "fuzz", 0.5),
        "cmd_morph_easing.bin": m("/preset/morph", "fuzz", 2.0, "ease-in"),
        "cmd_schedule_set.bin": m("/schedule/set", 'unit = "beat"\n[prompts]\n"0" = "a"\n"4" = "b"\n'
                                  '[params]\nstrength = "0.5 + 0.4*sin(beat)"\nseed = "0:(1), 8:(9)"\n'),
        "cmd_schedule_json.bin": m("/schedule/set", '{"params": {"guidance_scale": "1 + t % 3"}}'),
        "cmd_schedule_start.bin": m("/schedule/start", "fuzz"),
        "cmd_schedule_stop.bin": m("/schedule/stop"),
        "cmd_bpm.bin": m("/bpm", 128.0),
        "cmd_beat.bin": m("/beat"),
        "cmd_beat_position.bin": m("/beat", 16.5),
        "cmd_frame.bin": m("/frame", 240),
        "cmd_record.bin": osc_bundle(m("/record/start", "fuzz"), m("/record/stop")),
        "cmd_snapshot.bin": m("/snapshot"),
        "msg_no_typetags.bin": osc_string("/pause"),
        # every type tag python-osc reads (i h f d s b r m t T F N [ ]) and the OSC 1.0 extras (S c I)
        "tag_i_int32.bin": osc_raw("/steps", ",i", _I32.pack(3)),
        "tag_h_int64.bin": osc_raw("/seed", ",h", _I64.pack(2**40)),
        "tag_f_float32.bin": osc_raw("/strength", ",f", _F32.pack(0.5)),
        "tag_d_float64.bin": osc_raw("/strength", ",d", _F64.pack(0.125)),
        "tag_s_string.bin": osc_raw("/mode", ",s", osc_string("img2img")),
        "tag_S_symbol.bin": osc_raw("/mode", ",S", osc_string("img2img")),
        "tag_b_blob.bin": osc_raw("/prompt", ",b", blob),
        "tag_r_rgba.bin": osc_raw("/strength", ",r", b"\x10\x20\x30\xff"),
        "tag_m_midi.bin": osc_raw("/strength", ",m", b"\x00\x90\x40\x7f"),
        "tag_c_char.bin": osc_raw("/mode", ",c", _I32.pack(ord("x"))),
        "tag_t_timetag.bin": osc_raw("/seed", ",t", _U64.pack(osc_codec.IMMEDIATELY)),
        "tag_T_true.bin": osc_raw("/pause", ",T"),
        "tag_F_false.bin": osc_raw("/pause", ",F"),
        "tag_N_nil.bin": osc_raw("/strength", ",N"),
        "tag_I_infinitum.bin": osc_raw("/strength", ",I"),
        "tag_array.bin": osc_raw("/prompts", ",[sf]", osc_string("a"), _F32.pack(1.0)),
        "tag_nested_arrays.bin": osc_raw("/seeds", ",[[if][if]]", _I32.pack(1), _F32.pack(0.5), _I32.pack(2),
                                         _F32.pack(0.5)),
        "tag_every_type.bin": osc_raw("/everything", ",ihfdsbrmtTFNSIc[i]", _I32.pack(1), _I64.pack(-2), _F32.pack(3),
                                      _F64.pack(4), osc_string("five"), blob, b"\x01\x02\x03\x04", b"\x00\x90\x40\x7f",
                                      _U64.pack(1), osc_string("sym"), _I32.pack(65), _I32.pack(7)),
        # bundles
        "bundle_flat.bin": osc_bundle(m("/strength", 0.3), m("/seed", 7), m("/prompt", "bundled")),
        "bundle_nested.bin": osc_bundle(m("/seed", 1), osc_bundle(m("/strength", 0.6), osc_bundle(m("/steps", 2)))),
        "bundle_empty.bin": osc_bundle(),
        "bundle_timetag_future.bin": osc_bundle(m("/seed", 9), timetag=(0xE0000000 << 32) | 0x80000000),
        "bundle_timetag_max.bin": osc_bundle(m("/seed", 9), timetag=2**64 - 1),
        "bundle_prompt_then_prompts.bin": osc_bundle(m("/prompt", "x"), m("/prompts", "y", 1.0)),
        "bundle_save_and_recall.bin": osc_bundle(m("/strength", 0.2), m("/preset/save", "fuzz"),
                                                 m("/preset/recall", "fuzz")),
        "bundle_one_bad_message.bin": osc_bundle(m("/strength", 0.4), m("/strength", 7.0)),
        "bundle_depth_8.bin": nested(8, m("/seed", 8)),
        "bundle_depth_9.bin": nested(9, m("/seed", 9)),
        # found by fuzzing: python-osc (the daemon's parser then) recursed without bound into nested bundles,
        # a RecursionError out of the OSC server
        "bundle_depth_600.bin": nested(600, m("/seed", 600)),
        # broken on purpose
        "empty.bin": b"",
        "not_osc_text.bin": b"hello daemon\n",
        "address_without_slash.bin": osc_raw("strength", ",f", _F32.pack(0.5)),
        "address_unterminated.bin": b"/strength",
        "typetags_without_comma.bin": osc_string("/strength") + osc_string("f") + _F32.pack(0.5),
        "typetags_unterminated.bin": osc_string("/strength") + b",fff",
        # found by fuzzing: python-osc skipped the unknown tag and applied /strength 0.5
        "unknown_type_tag.bin": osc_raw("/strength", ",xf", _F32.pack(0.5)),
        "argument_missing.bin": osc_raw("/strength", ",f"),
        "argument_truncated.bin": osc_raw("/seed", ",i", b"\x00\x01"),
        "string_not_utf8.bin": osc_raw("/prompt", ",s", osc_string(b"\xff\xfe\x80")),
        "string_unterminated.bin": osc_raw("/prompt", ",s", b"abcd"),
        "blob_length_huge.bin": osc_raw("/prompt", ",b", _I32.pack(0x7FFFFFFF), b"abcd"),
        "blob_length_negative.bin": osc_raw("/prompt", ",b", _I32.pack(-4), b"abcd"),
        "array_unclosed.bin": osc_raw("/prompts", ",[sf", osc_string("a"), _F32.pack(1.0)),
        "array_close_without_open.bin": osc_raw("/prompts", ",]"),
        "float_nan.bin": m("/strength", float("nan")),
        "float_inf.bin": m("/guidance_scale", float("inf")),
        "int64_huge_seed.bin": m("/seed", 2**62),
        "resolution_one_arg.bin": m("/resolution", 128),
        "norm_out_of_range.bin": m("/norm/strength", 1.5),
        "norm_unranged.bin": m("/norm/prompt", 0.5),
        "lora_name_too_long.bin": m("/lora/" + "x" * 300, 0.5),
        "controlnet_k_too_big.bin": m("/controlnet/99/scale", 0.5),
        "controlnet_k_zero_padded.bin": m("/controlnet/01/scale", 0.5),
        "preset_name_traversal.bin": m("/preset/save", "../../etc/passwd"),
        "prompt_too_long.bin": m("/prompt", "x" * 5000),
        "bundle_element_oversized.bin": osc_codec.BUNDLE_TAG + _U64.pack(1) + _I32.pack(400) + m("/seed", 1),
        # found by fuzzing: python-osc skipped an element it could not read and applied the rest
        "bundle_element_zero.bin": osc_codec.BUNDLE_TAG + _U64.pack(1) + _I32.pack(0) + m("/seed", 1),
        "bundle_element_garbage.bin": osc_codec.BUNDLE_TAG + _U64.pack(1) + _I32.pack(4) + b"XXXX"
        + _I32.pack(len(m("/seed", 1))) + m("/seed", 1),
        "bundle_element_negative.bin": osc_codec.BUNDLE_TAG + _U64.pack(1) + _I32.pack(-8) + m("/seed", 1),
        "bundle_short_timetag.bin": osc_codec.BUNDLE_TAG + b"\x00\x00",
        "bundle_trailing_bytes.bin": osc_bundle(m("/seed", 1)) + b"\x00\x00",
    }
    return seeds


# ---------------------------------------------------------------------------- WebSocket text
def _ws_text_seeds() -> dict[str, bytes]:
    every = {p.name: params.json_value(p.default) for p in params.PARAMS if p.name not in ("model", "vae")}
    every.update(width=128, height=128)
    j = lambda value: json.dumps(value).encode()  # noqa: E731
    seeds = {
        "set_every_param.bin": j({"type": "set", "id": 1, "params": every}),
        "set_float.bin": j({"type": "set", "id": 2, "params": {"strength": 0.3}}),
        "set_int_as_float.bin": j({"type": "set", "id": 3, "params": {"seed": 42.0}}),
        "set_string.bin": j({"type": "set", "id": "p", "params": {"prompt": "a fox", "negative_prompt": ""}}),
        "set_bool.bin": j({"type": "set", "id": 4, "params": {"pause": False}}),
        "set_prompt_blend.bin": j({"type": "set", "id": 5, "params": {"prompts": [["a", 1.0], ["b", 0.5]]}}),
        "set_seed_blend_flat.bin": j({"type": "set", "id": 6, "params": {"seeds": [1, 0.5, 2, 0.5]}}),
        "set_t_index_list.bin": j({"type": "set", "id": 7, "params": {"t_index_list": [5, 25]}}),
        "set_choice.bin": j({"type": "set", "id": 8, "params": {"mode": "txt2img", "cfg_type": "none"}}),
        "set_resolution.bin": j({"type": "set", "id": 9, "params": {"width": 64, "height": 96}}),
        "set_lora.bin": j({"type": "set", "id": 10, "params": {"lora/some_style": 0.5}}),
        "set_controlnet.bin": j({"type": "set", "id": 11, "params": {"controlnet/0/scale": 0.5}}),
        "set_empty.bin": j({"type": "set", "id": 12, "params": {}}),
        "set_no_params.bin": j({"type": "set", "id": 13}),
        "set_params_not_object.bin": j({"type": "set", "id": 14, "params": [["strength", 0.1]]}),
        "set_out_of_range.bin": j({"type": "set", "id": 15, "params": {"strength": 2.0}}),
        "set_wrong_type.bin": j({"type": "set", "id": 16, "params": {"steps": "four"}}),
        "set_unknown_param.bin": j({"type": "set", "id": 17, "params": {"volume": 11}}),
        "set_half_bad_is_atomic.bin": j({"type": "set", "id": 18, "params": {"strength": 0.1, "steps": 0}}),
        "set_nan.bin": b'{"type": "set", "id": 19, "params": {"strength": NaN}}',
        "set_infinity.bin": b'{"type": "set", "id": 20, "params": {"guidance_scale": Infinity}}',
        "set_huge_int.bin": b'{"type": "set", "id": 21, "params": {"seed": ' + b"9" * 400 + b"}}",
        "set_huge_float.bin": b'{"type": "set", "id": 22, "params": {"seed": 1e308}}',
        "set_long_prompt.bin": j({"type": "set", "id": 23, "params": {"prompt": "x" * 5000}}),
        "set_deep_value.bin": b'{"type": "set", "id": 24, "params": {"prompts": ' + b"[" * 100 + b"]" * 100 + b"}}",
        "set_duplicate_keys.bin": b'{"type": "set", "id": 25, "params": {"strength": 0.2, "strength": 9}}',
        "get.bin": j({"type": "get"}),
        "get_with_id.bin": j({"type": "get", "id": "g"}),
        "subscribe_state.bin": j({"type": "subscribe", "id": 30, "topics": ["state"]}),
        "subscribe_all_jpeg.bin": j({"type": "subscribe", "id": 31, "topics": ["state", "telemetry", "frames"],
                                     "frames": {"encoding": "jpeg", "max_fps": 10, "quality": 50}}),
        "subscribe_raw.bin": j({"type": "subscribe", "id": 32, "topics": ["frames"], "frames": {"encoding": "raw"}}),
        "subscribe_png.bin": j({"type": "subscribe", "id": 33, "topics": ["frames"], "frames": {"encoding": "png",
                                                                                                "max_fps": 1}}),
        "subscribe_nothing.bin": j({"type": "subscribe", "id": 34, "topics": []}),
        "subscribe_unknown_topic.bin": j({"type": "subscribe", "id": 35, "topics": ["secrets"]}),
        "subscribe_bad_fps.bin": j({"type": "subscribe", "id": 36, "topics": ["frames"], "frames": {"max_fps": 0}}),
        # found by fuzzing: TypeError (unhashable list) out of Session.handle_text: the connection died
        "subscribe_encoding_list.bin": j({"type": "subscribe", "id": 38, "topics": ["frames"],
                                          "frames": {"encoding": ["raw"]}}),
        "subscribe_nan_fps.bin": b'{"type": "subscribe", "id": 37, "topics": ["frames"], "frames": {"max_fps": NaN}}',
        "preset_save.bin": j({"type": "preset", "id": 40, "save": "fuzz"}),
        "preset_recall.bin": j({"type": "preset", "id": 41, "recall": "fuzz"}),
        "preset_both.bin": j({"type": "preset", "id": 42, "save": "a", "recall": "b"}),
        "preset_traversal.bin": j({"type": "preset", "id": 43, "save": "../../outside"}),
        "preset_missing.bin": j({"type": "preset", "id": 44, "recall": "never saved"}),
        "command_morph.bin": j({"type": "command", "id": 45, "command": "/preset/morph", "args": ["fuzz", 1]}),
        "command_schedule.bin": j({"type": "command", "id": 46, "command": "/schedule/set",
                                   "args": ['{"unit": "frame", "length": 8, "prompts": {"0": "a", "4": "b"}, '
                                            '"prompt_blend": true, "params": {"delta": "clamp(frame, 0, 5)"}}']}),
        "command_frame.bin": j({"type": "command", "id": 47, "command": "/frame", "args": [12]}),
        "command_unknown.bin": j({"type": "command", "id": 48, "command": "/self/destruct", "args": []}),
        "command_args_not_list.bin": j({"type": "command", "id": 49, "command": "/bpm", "args": 120}),
        "unknown_type.bin": j({"type": "explode", "id": 50}),
        "no_type.bin": j({"id": 51}),
        # found by fuzzing: TypeError (unhashable list) out of Session.handle_text: the connection died
        "type_not_string.bin": j({"type": ["set"], "id": 52}),
        "id_object.bin": j({"type": "get", "id": {"a": 1}}),
        "id_too_long.bin": j({"type": "get", "id": "i" * 200}),
        "id_bool.bin": j({"type": "get", "id": True}),
        # found by fuzzing: the reply echoed NaN / -Infinity, which is not JSON a browser parses
        "id_nan.bin": b'{"type": "get", "id": NaN}',
        "id_infinity.bin": b'{"type": "set", "id": -Infinity, "params": {"strength": 5}}',
        "not_object_array.bin": b"[1, 2, 3]",
        "not_object_string.bin": b'"set"',
        "not_json.bin": b"{not json",
        "empty.bin": b"",
        "deep_nesting.bin": b"[" * 5000 + b"]" * 5000,
        "deep_nesting_objects.bin": b'{"a":' * 2000 + b"1" + b"}" * 2000,
        # found by fuzzing: the lone surrogate went into the state, and a preset save then failed on it
        "unicode_escapes.bin": b'{"type": "set", "id": "\\ud800", "params": {"prompt": "\\u0000\\udfff\\u00e9"}}',
    }
    return seeds


# ---------------------------------------------------------------------------- WebSocket binary
def _image(pixels: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    image.save(out, fmt, **kw)
    return out.getvalue()


def _sdbf(payload: bytes, *, kind: int = web.INPUT, index: int = 0, encoding: int = web.RAW, channels: int = 3,
          dtype: int = 1, flags: int = 0, width: int = 4, height: int = 3, frame_id: int = 7,
          magic: bytes = web.MAGIC, version: int = web.VERSION) -> bytes:
    return web.HEADER.pack(magic, version, kind, index, encoding, channels, dtype, flags, width, height, 0,
                           frame_id) + payload


def _ws_binary_seeds() -> dict[str, bytes]:
    y, x = np.mgrid[0:3, 0:4]
    rgb = np.stack([x * 60, y * 80, (x + y) * 30], -1).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full((3, 4, 1), 200, np.uint8)], -1)
    grey = rgb[:, :, 0]
    enc = web.encode_frame
    seeds = {
        "raw_u8_rgb.bin": enc(rgb, kind=web.INPUT, frame_id=1),
        "raw_u8_grey.bin": enc(grey, kind=web.INPUT, frame_id=2),
        "raw_u8_rgba_bgr_bottom_left.bin": enc(rgba, kind=web.INPUT, flags=shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT),
        "raw_u16_rgb.bin": enc(rgb.astype(np.uint16) * 257, kind=web.INPUT),
        "raw_f16_rgba.bin": enc((rgba / 255).astype(np.float16), kind=web.INPUT),
        "raw_f32_grey.bin": enc((grey / 255).astype(np.float32)[:, :, None], kind=web.INPUT),
        "raw_f32_nan_inf.bin": enc(np.array([[[np.nan], [np.inf]]], np.float32), kind=web.INPUT),
        "control_raw_k0.bin": enc(rgb, kind=web.CONTROL, index=0),
        "control_raw_k1.bin": enc(rgb, kind=web.CONTROL, index=1),
        "control_raw_k255.bin": enc(rgb, kind=web.CONTROL, index=255),
        "jpeg_rgb.bin": _sdbf(_image(rgb, "JPEG", quality=90), encoding=web.JPEG),
        "jpeg_grey.bin": _sdbf(_image(grey, "JPEG"), encoding=web.JPEG, channels=1),
        "jpeg_cmyk.bin": _sdbf(_image(Image.fromarray(rgb).convert("CMYK"), "JPEG"), encoding=web.JPEG),
        "jpeg_progressive.bin": _sdbf(_image(rgb, "JPEG", progressive=True), encoding=web.JPEG, width=0, height=0),
        "jpeg_truncated.bin": _sdbf(_image(rgb, "JPEG")[:200], encoding=web.JPEG),
        "png_rgb.bin": _sdbf(_image(rgb, "PNG"), encoding=web.PNG),
        "png_rgba.bin": _sdbf(_image(rgba, "PNG"), encoding=web.PNG, channels=4),
        "png_grey.bin": _sdbf(_image(grey, "PNG"), encoding=web.PNG, channels=1),
        "png_grey_alpha.bin": _sdbf(_image(Image.fromarray(rgba).convert("LA"), "PNG"), encoding=web.PNG),
        "png_palette.bin": _sdbf(_image(Image.fromarray(rgb).convert("P"), "PNG"), encoding=web.PNG),
        "png_palette_transparency.bin": _sdbf(_image(Image.fromarray(rgb).convert("P"), "PNG", transparency=0),
                                              encoding=web.PNG),
        "png_16bit_grey.bin": _sdbf(_image(Image.fromarray((grey.astype(np.uint16) * 257)), "PNG"),
                                    encoding=web.PNG, channels=1),
        "png_1bit.bin": _sdbf(_image(Image.fromarray(grey > 100), "PNG"), encoding=web.PNG),
        "png_size_zero_in_header.bin": _sdbf(_image(rgb, "PNG"), encoding=web.PNG, width=0, height=0),
        "png_size_mismatch.bin": _sdbf(_image(rgb, "PNG"), encoding=web.PNG, width=5, height=3),
        "png_as_jpeg.bin": _sdbf(_image(rgb, "PNG"), encoding=web.JPEG),
        "png_huge_claimed_size.bin": _sdbf(_png_claiming(60000, 60000), encoding=web.PNG, width=0, height=0),
        "header_only.bin": _sdbf(b""),
        "short_header.bin": _sdbf(b"")[:20],
        "empty.bin": b"",
        "bad_magic.bin": _sdbf(rgb.tobytes(), magic=b"SDBX"),
        "bad_version.bin": _sdbf(rgb.tobytes(), version=2),
        "output_kind_from_client.bin": _sdbf(rgb.tobytes(), kind=web.OUTPUT),
        "input_with_index.bin": _sdbf(rgb.tobytes(), index=1),
        "unknown_encoding.bin": _sdbf(rgb.tobytes(), encoding=3),
        "raw_size_mismatch.bin": _sdbf(rgb.tobytes()[:-1]),
        "raw_bad_channels.bin": _sdbf(rgb.tobytes(), channels=2),
        "raw_bad_dtype.bin": _sdbf(rgb.tobytes(), dtype=5),
        "raw_zero_width.bin": _sdbf(b"", width=0),
        "raw_huge_dimensions.bin": _sdbf(rgb.tobytes(), width=0xFFFFFFFF, height=0xFFFFFFFF),
        "raw_side_over_limit.bin": _sdbf(b"", width=8193, height=1),  # refused before the payload is looked at
    }
    return seeds


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's shape)."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


# ---------------------------------------------------------------------------- rings
# Byte offsets in a segment (PROTOCOL.md section 1).
_SLOT_FIELDS = {"seq": (0, "<Q"), "width": (8, "<I"), "height": (12, "<I"), "channels": (16, "<H"),
                "dtype": (18, "<H"), "flags": (20, "<I"), "source_ns": (32, "<Q"), "written_ns": (40, "<Q"),
                "seq_end": (56, "<Q")}
_HEADER_FIELDS = {"magic": (0, "4s"), "version": (4, "<H"), "header_size": (6, "<H"), "slot_count": (8, "<I"),
                  "slot_header_size": (12, "<I"), "slot_capacity": (16, "<Q"), "write_seq": (24, "<Q"),
                  "latest_slot": (32, "<I"), "writer_pid": (36, "<I"), "heartbeat_ns": (40, "<Q")}


def ring_bytes(capacity: int, slot_count: int, frames: list[tuple[np.ndarray, int]]) -> bytearray:
    """The bytes of a real ring (bridge/shm) after `frames` (pixels, flags) were written, with times and
    the writer's pid zeroed."""
    name = f"sdb_fzc{os.getpid() % 100000}"
    ring = shm.Ring.create(name, capacity, slot_count)
    try:
        for i, (pixels, flags) in enumerate(frames):
            ring.write(pixels, frame_id=100 + i, flags=flags, source_ns=0)
        data = bytearray(ring._shm.buf)
    finally:
        ring.close()
        ring.unlink()
    patch_header(data, writer_pid=0, heartbeat_ns=0)
    for slot in range(slot_count):
        patch_slot(data, capacity, slot, written_ns=0)
    return data


def patch_header(data: bytearray, **fields: int | bytes) -> bytearray:
    for name, value in fields.items():
        offset, fmt = _HEADER_FIELDS[name]
        struct.pack_into(fmt, data, offset, value)
    return data


def patch_slot(data: bytearray, capacity: int, slot: int, **fields: int) -> bytearray:
    base = shm.HEADER_SIZE + slot * (shm.SLOT_HEADER_SIZE + capacity)
    for name, value in fields.items():
        offset, fmt = _SLOT_FIELDS[name]
        struct.pack_into(fmt, data, base + offset, value)
    return data


def _ring_seeds() -> dict[str, bytes]:
    y, x = np.mgrid[0:4, 0:4]
    rgba = np.stack([x * 60, y * 60, x + y, np.full_like(x, 255)], -1).astype(np.uint8)  # 64 bytes
    one = lambda: ring_bytes(64, 2, [(rgba, 0)])  # noqa: E731  (the frame sits in slot 1)
    seeds: dict[str, bytes | bytearray] = {
        "ring_empty.bin": ring_bytes(64, 2, []),
        "ring_rgba_u8_4x4.bin": one(),
        "ring_wrapped_three_slots.bin": ring_bytes(64, 3, [(rgba, 0), (rgba[::-1], 0), (rgba[:, ::-1], 0),
                                                           (rgba // 2, 0)]),
        "ring_grey_u16_4x4.bin": ring_bytes(64, 2, [((x * 1000).astype(np.uint16)[:, :, None], 0)]),
        "ring_rgb_f16_3x2.bin": ring_bytes(64, 2, [((rgba[:2, :3, :3] / 255).astype(np.float16), 0)]),
        "ring_grey_f32_4x4.bin": ring_bytes(64, 2, [((x / 4).astype(np.float32)[:, :, None], 0)]),
        "ring_bgr_bottom_left.bin": ring_bytes(64, 2, [(rgba, shm.FLAG_BGR | shm.FLAG_BOTTOM_LEFT)]),
        "ring_slot_exactly_full.bin": ring_bytes(128, 2, [(np.concatenate([rgba, rgba]), 0)]),
        "ring_small_frame_big_slot.bin": ring_bytes(256, 2, [(rgba[:1, :1], 0)]),
        "ring_torn_seq_end.bin": patch_slot(one(), 64, 1, seq_end=0),
        "ring_slot_being_written.bin": patch_slot(one(), 64, 1, seq=0),
        "ring_latest_slot_out_of_range.bin": patch_header(one(), latest_slot=2),
        "ring_latest_slot_max.bin": patch_header(one(), latest_slot=0xFFFFFFFF),
        "ring_write_seq_ahead.bin": patch_header(one(), write_seq=5),
        "ring_write_seq_max.bin": patch_slot(patch_header(one(), write_seq=2**64 - 1), 64, 1, seq=2**64 - 1,
                                             seq_end=2**64 - 1),
        "ring_bad_dtype.bin": patch_slot(one(), 64, 1, dtype=9),
        "ring_bad_channels.bin": patch_slot(one(), 64, 1, channels=2),
        "ring_frame_over_capacity.bin": patch_slot(one(), 64, 1, width=5),
        "ring_frame_huge_dimensions.bin": patch_slot(one(), 64, 1, width=0xFFFFFFFF, height=0xFFFFFFFF),
        "ring_zero_width.bin": patch_slot(one(), 64, 1, width=0),
        "ring_bad_magic.bin": patch_header(one(), magic=b"SDBX"),
        "ring_bad_version.bin": patch_header(one(), version=2),
        "ring_bad_header_size.bin": patch_header(one(), header_size=32),
        "ring_bad_slot_header_size.bin": patch_header(one(), slot_header_size=128),
        "ring_one_slot.bin": patch_header(one(), slot_count=1),
        "ring_slot_count_huge.bin": patch_header(one(), slot_count=0xFFFFFFFF),
        "ring_capacity_not_multiple_of_64.bin": patch_header(one(), slot_capacity=60),
        "ring_capacity_zero.bin": patch_header(one(), slot_capacity=0),
        "ring_capacity_past_segment.bin": patch_header(one(), slot_capacity=1 << 40),
        "ring_truncated_segment.bin": one()[:250],
        "ring_header_only.bin": one()[:64],
        "ring_too_small_for_header.bin": one()[:10],
    }
    return {name: bytes(data) for name, data in seeds.items()}


MAKERS: dict[str, Callable[[], dict[str, bytes]]] = {
    "osc": _osc_seeds, "ws_text": _ws_text_seeds, "ws_binary": _ws_binary_seeds, "ring": _ring_seeds}

# Inputs fuzzing finds that the makers above cannot write, kept byte for byte: {target: {file name: bytes}}.
# (What fuzzing found so far is written by the makers, marked "found by fuzzing".)
FOUND: dict[str, dict[str, bytes]] = {}


def main() -> None:
    """Rewrite the whole corpus."""
    total = 0
    for target, make in MAKERS.items():
        folder = CORPUS / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        seeds = {**make(), **FOUND.get(target, {})}
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
            total += len(data)
        print(f"{target}: {len(seeds)} files, {sum(map(len, seeds.values()))} bytes")
    print(f"corpus: {total} bytes in {CORPUS}")


if __name__ == "__main__":
    main()
