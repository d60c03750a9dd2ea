"""What the WebSocket path costs a remote client (docs/web.md): frames sent as binary SDBF messages to an
in-process daemon and its outputs pushed back, beside the per-frame codec work the daemon does for it.

    python benchmarks/websocket_frames.py                          # tiny model, 512x512, JPEG both ways
    python benchmarks/websocket_frames.py --encoding raw           # raw RGBA both ways
    python benchmarks/websocket_frames.py --model random:sd15 --seconds 20   # on a GPU

A client thread sends input frames (a moving pattern, encoded once before the run, so the client's own
encoding is not timed) at --input-fps with increasing frame_ids, and subscribes to the output frames in
the same encoding at up to 240 fps. Reported:
- outputs received per second, and the round trip of each output whose input the client sent: from
  the send of its input frame to the arrival of the output that carries its frame_id (p50, p95, p99);
- the daemon's codec work per frame for this size, timed apart in this process: decoding one input
  message (bridge.web.decode_frame) and encoding one output message (bridge.web.encode_frame).
The daemon runs as a `sdbridge serve` process of its own on private ports (the client's work must not
share its interpreter, as it would not on another machine); the client talks to it over loopback TCP, so
the network itself costs nothing here, but on one machine the two share its cores. Compare with the ring
path: `sdbridge bench --model M --width W --height H`. Speeds depend on the host: print, never assert.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bridge import osc, web  # noqa: E402
from bridge.bench import cpu_name, percentiles  # noqa: E402

PATTERNS = 30


def pattern(i: int, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x + 7 * i) % 256, (y * 2) % 256, ((x // 32 + y // 32 + i) % 2) * 200], -1).astype(np.uint8)


def input_messages(width: int, height: int, encoding: int) -> list[bytes]:
    """One SDBF input message per pattern, frame_id to be patched in (bytes 24..32)."""
    out = []
    for i in range(PATTERNS):
        pixels = pattern(i, width, height)
        if encoding == web.RAW:
            out.append(web.encode_frame(pixels, kind=web.INPUT))
            continue
        from PIL import Image

        file = io.BytesIO()
        Image.fromarray(pixels).save(file, "JPEG" if encoding == web.JPEG else "PNG", quality=85)
        out.append(web.HEADER.pack(web.MAGIC, web.VERSION, web.INPUT, 0, encoding, 3, 1, 0, width, height, 0, 0)
                   + file.getvalue())
    return out


def codec_ms(messages: list[bytes], width: int, height: int, encoding: int) -> tuple[float, float]:
    """Median ms to decode one input message and to encode one output frame of this size (the default
    output format, RGBA uint8)."""
    decode, encode = [], []
    output = np.dstack([pattern(1, width, height), np.full((height, width), 255, np.uint8)])
    for i in range(40):
        started = time.perf_counter()
        web.decode_frame(messages[i % len(messages)], 1 << 30)
        decode.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        web.encode_frame(output, encoding=encoding)
        encode.append((time.perf_counter() - started) * 1e3)
    return float(np.median(decode)), float(np.median(encode))


def wait_ready(port: int, daemon: subprocess.Popen, timeout: float = 600.0) -> str:
    """Wait until the daemon serves frames (telemetry says ready); what runs the model (torch, tensorrt)."""
    from websockets.sync.client import connect

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}")
        try:
            with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=2) as ws:
                ws.send(json.dumps({"type": "subscribe", "topics": ["telemetry"]}))
                while time.monotonic() < end:
                    message = json.loads(ws.recv(timeout=5))
                    if message.get("status") == "ready":
                        return message.get("backend", "").split(" ")[0] or "?"
        except (OSError, TimeoutError):
            time.sleep(0.5)
    raise SystemExit("the daemon did not become ready")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--encoding", choices=("jpeg", "png", "raw"), default="jpeg")
    ap.add_argument("--input-fps", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    encoding = web.ENCODINGS[args.encoding]
    from websockets.sync.client import connect

    messages = input_messages(args.width, args.height, encoding)
    decode_ms, encode_ms = codec_ms(messages, args.width, args.height, encoding)
    port = web.free_tcp_port()
    side = str(max(1024, args.width, args.height))
    daemon = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "serve", "--model", args.model, "--width", str(args.width),
         "--height", str(args.height), "--max-width", side, "--max-height", side,
         "--instance", f"wsbench{os.getpid() % 100000}", "--osc-port", "0", "--telemetry-port", str(osc.free_udp_port()),
         "--http-port", str(port), "--oscquery-port", "0", "--no-mdns", "--log-level", "warning"], cwd=ROOT)
    sent: dict[int, float] = {}
    round_trips: list[float] = []
    received = 0
    try:
        backend = wait_ready(port, daemon)
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
            ws.send(json.dumps({"type": "subscribe", "id": 1, "topics": ["frames"],
                                "frames": {"encoding": args.encoding, "max_fps": 240}}))
            stop = threading.Event()

            def send_frames() -> None:
                frame_id, next_at = 0, time.perf_counter()
                while not stop.is_set():
                    frame_id += 1
                    message = bytearray(messages[frame_id % len(messages)])
                    message[24:32] = frame_id.to_bytes(8, "little")
                    sent[frame_id] = time.perf_counter()
                    ws.send(bytes(message))
                    next_at += 1.0 / args.input_fps
                    time.sleep(max(0.0, next_at - time.perf_counter()))

            warm_end = time.perf_counter() + 3.0  # the first frames pay for first calls
            sender = threading.Thread(target=send_frames, daemon=True)
            sender.start()
            end = warm_end + args.seconds
            while time.perf_counter() < end:
                try:
                    message = ws.recv(timeout=1.0)
                except TimeoutError:
                    continue
                now = time.perf_counter()
                if not isinstance(message, bytes) or now < warm_end:
                    continue
                received += 1
                frame_id = web.HEADER.unpack_from(message)[-1]
                if frame_id in sent:
                    round_trips.append((now - sent[frame_id]) * 1e3)
            stop.set()
            sender.join(2)
        inputs = sum(1 for t in sent.values() if warm_end <= t < end)
    finally:
        daemon.terminate()
        daemon.wait(30)

    p = percentiles(round_trips)
    figures = {"model": args.model, "size": f"{args.width}x{args.height}", "encoding": args.encoding,
               "backend": backend, "cpu": cpu_name(), "inputs_per_s": inputs / args.seconds,
               "outputs_per_s": received / args.seconds,
               "round_trip_ms": {"p50": p.p50_ms, "p95": p.p95_ms, "p99": p.p99_ms, "n": p.count},
               "decode_ms": decode_ms, "encode_ms": encode_ms,
               "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/websocket_frames.py " + " ".join(sys.argv[1:])}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        rt = figures["round_trip_ms"]
        fmt = lambda v: "n/a" if v is None else f"{v:.0f}"
        print(f"websocket {args.encoding} {figures['size']} on {figures['backend']} ({figures['cpu']}), {args.model}: "
              f"{figures['inputs_per_s']:.1f} inputs/s sent, {figures['outputs_per_s']:.1f} outputs/s received; "
              f"round trip p50 {fmt(rt['p50'])} ms, p95 {fmt(rt['p95'])} ms, p99 {fmt(rt['p99'])} ms ({rt['n']} frames); "
              f"daemon codec per frame: decode {decode_ms:.2f} ms, encode {encode_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
