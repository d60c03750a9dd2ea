"""Real SD architectures end to end on the CPU: full-size SD 1.x, SD 2.x and SDXL with random weights, through
the code users hit.

For each architecture this script
1. builds the full-size components from the shipped configs (configs/models/<arch>, built as
   engines/checkpoints builds them), random weights from a fixed seed, float16 on disk, and writes them as
   ONE original-layout single-file checkpoint (tests/ldm_format.py's `checkpoint(...)` layout) into an
   A1111-shaped tree <workdir>/webui/models/Stable-diffusion/<arch>_random.safetensors, plus a random
   kohya-format LoRA for it in models/Lora (attention layers of the UNet and text encoders, real names);
2. runs `python -m bridge.cli models --models-dir <workdir>/webui --json` and checks the detected arch;
3. starts the real daemon (`python -m bridge.cli serve --model <arch>_random --models-dir ...`) as a
   subprocess, streams frames through the shared-memory rings, and plays /lora/<name>, /prompt and
   /guidance_scale + /cfg_type over OSC, watching /sdbridge/error;
4. prints one line per architecture (and the daemon's log tail when something failed).

    python benchmarks/real_arch_smoke.py --arch all                 # sd15, sd21, sdxl at 256x256
    python benchmarks/real_arch_smoke.py --arch sdxl --size 128     # SDXL smaller (it is slow in fp32)

The checkpoints are written once and reused (delete the workdir, or --regenerate, to rebuild them). They
are written tensor by tensor (same names, shapes and bytes as ldm_format.checkpoint + ldm_format.save
would give) so that SDXL never has more than one component in memory; ldm_format.save would hold the
model three times (the modules, its clones, safetensors' byte copies). A watchdog kills a child process
(generator or daemon) when the machine's available memory drops under --min-free-gb, so that this
script never starts the OOM killer on other work.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

ARCHS = ("sd15", "sd21", "sdxl")
SEED = 1234
LORA_RANK, LORA_ALPHA = 8, 4.0  # alpha != rank so that the alpha matters
PROMPT = "a (red:1.3) fox BREAK in snow"
SDBRIDGE = [sys.executable, "-m", "bridge.cli"]
GIB = 1024 ** 3


# ============================================================================ building the files
# (runs in a child process: `--_generate ARCH`, so that all its memory goes back when it ends)

def _modules(arch: str, device: str) -> dict:
    """The components of `arch` built from the shipped configs as engines/checkpoints builds them, on
    `device` ("meta": shapes only) in the current default dtype."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from engines import checkpoints as ck

    folder = ck.MODELS_CONFIG_DIR / arch
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(ck._read_json(folder / "unet" / "config.json")),
        "vae": lambda: AutoencoderKL.from_config(ck._vae_config(arch)),
        "text_encoder": lambda: CLIPTextModel(ck._clip_config(folder / "text_encoder")),
    }
    if arch == "sdxl":
        builders["text_encoder_2"] = lambda: CLIPTextModelWithProjection(ck._clip_config(folder / "text_encoder_2"))
    out = {}
    with torch.device(device):
        for name, build in builders.items():
            out[name] = build().eval()
    return out


def _ldm_part(arch: str, component: str, module) -> dict:
    """What tests/ldm_format.checkpoint() puts into the file for one component (the same calls)."""
    from tests import ldm_format as lf

    if component == "unet":
        return lf.unet_to_ldm(module)
    if component == "vae":
        return lf.vae_to_ldm(module)
    if component == "text_encoder":
        if arch == "sd15":
            return lf.clip_to_ldm(module, lf.SD1_CLIP)
        if arch == "sd21":
            return lf.open_clip_to_ldm(module, lf.SD2_OPEN_CLIP, unused_layers=1)
        return lf.clip_to_ldm(module, lf.XL_CLIP)
    return lf.open_clip_to_ldm(module, lf.XL_OPEN_CLIP)


_ST_DTYPES = {"float16": "F16", "float32": "F32", "bfloat16": "BF16", "int64": "I64", "int32": "I32"}


def _header(state: dict) -> tuple[bytes, dict]:
    """A safetensors header for `state` (meta tensors are fine): its bytes and {name: (offset, shape, dtype)}."""
    entries, layout, offset = {}, {}, 0
    for key, t in state.items():
        size = t.numel() * t.element_size()
        dtype = str(t.dtype).removeprefix("torch.")
        entries[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        layout[key] = (offset, tuple(t.shape), t.dtype)
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, layout


def generate(arch: str, workdir: Path, regenerate: bool) -> None:
    import gc

    import torch
    from safetensors.torch import save_file

    from engines.weights import read_safetensors_header
    from tests import ldm_format as lf

    models, loras = _tree(workdir)
    path, lora_path = models / f"{arch}_random.safetensors", loras / f"{arch}_random_lora.safetensors"
    torch.set_default_dtype(torch.float16)  # random init straight into float16: half the memory, half the disk
    meta = _modules(arch, "meta")
    expected = lf.checkpoint(arch, meta["unet"], meta["vae"], meta["text_encoder"], meta.get("text_encoder_2"))
    header, layout = _header(expected)

    if not regenerate and path.is_file():
        try:
            shapes, _ = read_safetensors_header(path)
        except Exception:
            shapes = {}
        if shapes == {k: tuple(v.shape) for k, v in expected.items()} and path.stat().st_size == len(header) + sum(
                t.numel() * t.element_size() for t in expected.values()):
            print(f"generate {arch}: reusing {path}", flush=True)
        else:
            regenerate = True
    if regenerate or not path.is_file():
        started = time.monotonic()
        tmp = path.with_suffix(".partial")
        written: set[str] = set()
        with open(tmp, "wb") as f:
            f.write(header)
            base = f.tell()
            for i, component in enumerate(meta):
                torch.manual_seed(SEED * 10 + i)
                module = _build_one(arch, component)
                for key, t in _ldm_part(arch, component, module).items():
                    offset, shape, dtype = layout[key]  # KeyError: not a key of ldm_format.checkpoint()
                    assert tuple(t.shape) == shape and t.dtype == dtype, (key, t.shape, shape, t.dtype, dtype)
                    assert key not in written, key
                    f.seek(base + offset)
                    f.write(memoryview(t.detach().contiguous().numpy()).cast("B"))
                    written.add(key)
                del module
                gc.collect()
                print(f"generate {arch}: wrote {component} ({time.monotonic() - started:.0f} s)", flush=True)
        missing = set(layout) - written
        assert not missing, f"not written: {sorted(missing)[:5]}"
        os.replace(tmp, path)
        print(f"generate {arch}: {path} ({path.stat().st_size / GIB:.2f} GiB, {len(layout)} tensors) in "
              f"{time.monotonic() - started:.0f} s", flush=True)

    # A kohya / A1111 LoRA with the real layer names of this architecture, random weights.
    lora = _kohya_lora(arch, meta)
    save_file(lora, str(lora_path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(LORA_RANK),
                                              "ss_network_alpha": str(LORA_ALPHA)})
    layers = sum(k.endswith(".lora_down.weight") for k in lora)
    print(f"generate {arch}: {lora_path} ({layers} layers, rank {LORA_RANK}, alpha {LORA_ALPHA})", flush=True)


def _build_one(arch: str, component: str):
    """One component with real (random, seeded by the caller) weights on the CPU."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from engines import checkpoints as ck

    folder = ck.MODELS_CONFIG_DIR / arch
    with torch.no_grad():
        if component == "unet":
            return UNet2DConditionModel.from_config(ck._read_json(folder / "unet" / "config.json")).eval()
        if component == "vae":
            return AutoencoderKL.from_config(ck._vae_config(arch)).eval()
        if component == "text_encoder":
            return CLIPTextModel(ck._clip_config(folder / "text_encoder")).eval()
        return CLIPTextModelWithProjection(ck._clip_config(folder / "text_encoder_2")).eval()


def _kohya_lora(arch: str, meta: dict) -> dict:
    """kohya keys (lora_unet_*, lora_te_* / lora_te1_* / lora_te2_*) for the q/k/v/out projections of the
    first transformer block of three UNet attentions (first down, mid, last up) and of two layers of each
    text encoder. SDXL's UNet keys use the SGM names (input_blocks_4_1_...) as kohya's sd-scripts write them."""
    import torch

    from tests import ldm_format as lf

    unet = meta["unet"]
    linear = torch.nn.Linear
    attn = re.compile(r"^(.*\.attentions\.\d+)\.transformer_blocks\.0\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
    found = [(n, m) for n, m in unet.named_modules() if isinstance(m, linear) and attn.match(n)]
    blocks = list(dict.fromkeys(attn.match(n)[1] for n, _ in found))
    chosen = {next(b for b in blocks if b.startswith("down_blocks")),
              next(b for b in blocks if b.startswith("mid_block")),
              [b for b in blocks if b.startswith("up_blocks")][-1]}
    per_block = unet.config.layers_per_block + 1
    up_has_attention = {i: hasattr(b, "attentions") for i, b in enumerate(unet.up_blocks)}
    layers: list[tuple[str, torch.nn.Linear]] = []
    for name, module in found:
        if attn.match(name)[1] not in chosen:
            continue
        if arch == "sdxl":
            name = lf._unet_name(name + ".weight", per_block, up_has_attention).removesuffix(".weight")
        layers.append(("lora_unet_" + name.replace(".", "_"), module))
    te_prefixes = {"text_encoder": "lora_te1_" if arch == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}
    for component, prefix in te_prefixes.items():
        if component not in meta:
            continue
        te = meta[component]
        count = te.config.num_hidden_layers
        for name, module in te.named_modules():
            m = re.search(r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$", name)
            if m and int(m[1]) in (0, count - 1) and isinstance(module, linear):
                kohya = "text_model." + name.removeprefix("text_model.")  # kohya names CLIP as transformers 4 did
                layers.append((prefix + kohya.replace(".", "_"), module))
    generator = torch.Generator().manual_seed(SEED + 7)
    out = {}
    for key, module in layers:
        down = torch.randn(LORA_RANK, module.in_features, generator=generator, dtype=torch.float32)
        up = torch.randn(module.out_features, LORA_RANK, generator=generator, dtype=torch.float32)
        out[f"{key}.lora_down.weight"] = (down / module.in_features ** 0.5).half()
        out[f"{key}.lora_up.weight"] = (up * 0.5).half()
        out[f"{key}.alpha"] = torch.tensor(LORA_ALPHA, dtype=torch.float16)
    return out


def _tree(workdir: Path) -> tuple[Path, Path]:
    models = workdir / "webui" / "models" / "Stable-diffusion"
    loras = workdir / "webui" / "models" / "Lora"
    models.mkdir(parents=True, exist_ok=True)
    loras.mkdir(parents=True, exist_ok=True)
    return models, loras


# ============================================================================ watching memory

def _meminfo(field: str = "MemAvailable") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _proc_status(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Watchdog:
    """Polls a child process: its peak anonymous memory, and kills its process group if the machine's
    available memory falls under `min_free` bytes (before the OOM killer picks someone else's process)."""

    def __init__(self, proc: subprocess.Popen, min_free: int):
        self.proc, self.min_free = proc, min_free
        self.peak_anon = 0
        self.killed = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            self.peak_anon = max(self.peak_anon, _proc_status(self.proc.pid, "RssAnon"))
            available = _meminfo()
            if available and available < self.min_free:
                self.killed = (f"killed by the memory watchdog: MemAvailable {available / GIB:.1f} GiB < "
                               f"{self.min_free / GIB:.1f} GiB with the child at {self.peak_anon / GIB:.1f} GiB anon")
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                return
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1)


# ============================================================================ the daemon, as a client sees it

class Session:
    """One `sdbridge serve` subprocess and a client of it: telemetry listener, OSC sender, the two rings."""

    def __init__(self, arch: str, size: int, workdir: Path, dtype: str, min_free: int):
        from pythonosc.udp_client import SimpleUDPClient

        from bridge import shm
        from bridge.osc import free_udp_port
        from tests.conftest import TelemetryListener, remove_segment

        self.arch, self.size = arch, size
        self.instance = f"smoke{arch}"
        self.name_in, self.name_out = shm.segment_names(self.instance)
        for name in (self.name_in, self.name_out):
            remove_segment(name)  # a leftover of a killed run
        self.osc_port = free_udp_port()
        self.telemetry = TelemetryListener(free_udp_port())
        self.argv = [*SDBRIDGE, "serve", "--model", f"{arch}_random", "--models-dir", str(workdir / "webui"),
                     "--instance", self.instance, "--osc-port", str(self.osc_port),
                     "--telemetry-port", str(self.telemetry.sock.getsockname()[1]), "--telemetry-interval", "0.2",
                     "--width", str(size), "--height", str(size), "--max-width", str(size), "--max-height", str(size),
                     "--dtype", dtype]
        self.log_path = workdir / f"daemon-{arch}.log"
        self._log = open(self.log_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        self.watchdog = Watchdog(self.proc, min_free)
        self.osc = SimpleUDPClient("127.0.0.1", self.osc_port)
        self.ring_in = self.ring_out = None
        self.frame_id = 0

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}"
                               + (f" ({self.watchdog.killed})" if self.watchdog.killed else ""))

    def wait_ready(self, timeout: float) -> float:
        from bridge import shm
        from tests.conftest import segment_exists

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.alive()
            if self.ring_in is None and segment_exists(self.name_in) and segment_exists(self.name_out):
                self.ring_in, self.ring_out = shm.Ring.attach(self.name_in), shm.Ring.attach(self.name_out)
            status = self.telemetry.values("/sdbridge/status")
            if status and status[-1] == ["error"]:
                raise RuntimeError("daemon status is error (model failed to load)")
            if self.ring_in is not None and status and status[-1] == ["ready"]:
                return time.monotonic() - self.started
            time.sleep(0.1)
        raise TimeoutError(f"daemon not ready within {timeout:.0f} s")

    def send(self, address: str, *args) -> None:
        self.osc.send_message(address, list(args) if len(args) != 1 else args[0])

    def send_bundle(self, *messages: tuple[str, object]) -> None:
        from pythonosc import osc_bundle_builder, osc_message_builder

        bundle = osc_bundle_builder.OscBundleBuilder(osc_bundle_builder.IMMEDIATELY)
        for address, value in messages:
            msg = osc_message_builder.OscMessageBuilder(address=address)
            msg.add_arg(value)
            bundle.add_content(msg.build())
        self.osc.send(bundle.build())

    def write(self, frame: np.ndarray) -> int:
        self.frame_id += 1
        self.ring_in.write(frame, frame_id=self.frame_id)
        return self.frame_id

    def output(self, predicate, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.alive()
            out = self.ring_out.read_latest()
            if out is not None and predicate(out):
                return out
            time.sleep(0.02)
        raise TimeoutError(f"no output {what} within {timeout:.0f} s")

    def frame(self, frame: np.ndarray, timeout: float) -> tuple[float, object]:
        """Write a new input frame and wait for its output: (seconds, output)."""
        start = time.monotonic()
        fid = self.write(frame)
        out = self.output(lambda o: o.frame_id >= fid, timeout, f"for frame {fid}")
        return time.monotonic() - start, out

    def after_change(self, send, after_version: int, timeout: float, what: str) -> tuple[float, object]:
        """Send a change (no new input: the daemon renders the last input again) and wait for the first
        output made with a newer state: (seconds, output)."""
        start = time.monotonic()
        send()
        out = self.output(lambda o: o.state_version > after_version, timeout, f"after {what}")
        return time.monotonic() - start, out

    def cpu_s(self) -> float:
        """CPU seconds the daemon has used so far (all its threads): with other work on the cores, wall
        time per frame says little on its own."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def errors(self) -> list[str]:
        return [" ".join(map(str, args)) for args in self.telemetry.values("/sdbridge/error")]

    def stop(self) -> int | None:
        from tests.conftest import remove_segment

        for ring in (self.ring_in, self.ring_out):
            if ring is not None:
                ring.close()
        self.ring_in = self.ring_out = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.watchdog.stop()
        self.telemetry.close()
        self._log.close()
        for name in (self.name_in, self.name_out):
            remove_segment(name)
        return self.proc.returncode


def gradient(size: int, shift: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([(x * 2 + shift) % 256, (y * 2) % 256, ((x + y) // 2 + 3 * shift) % 256], -1).astype(np.uint8)


def _changed(a, b) -> str:
    diff = np.abs(a.pixels.astype(np.int16) - b.pixels.astype(np.int16)).mean()
    return f"{'yes' if diff > 0 else 'NO'} (mean |diff| {diff:.1f})"


# ============================================================================ one architecture

def run_arch(arch: str, args: argparse.Namespace) -> dict:
    r: dict = {"arch": arch, "problems": []}
    workdir, size, min_free = args.workdir, args.size_for[arch], int(args.min_free_gb * GIB)

    # 1. the files, in a child process
    start = time.monotonic()
    cmd = [sys.executable, __file__, "--_generate", arch, "--workdir", str(workdir)]
    if args.regenerate:
        cmd.append("--regenerate")
    gen = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    dog = Watchdog(gen, min_free)
    gen_out, _ = gen.communicate()
    dog.stop()
    r["generate_s"], r["generate_peak_gb"] = time.monotonic() - start, dog.peak_anon / GIB
    if args.verbose:
        print(gen_out.rstrip(), flush=True)
    if gen.returncode != 0:
        r["problems"].append(f"generating the files failed ({dog.killed or gen.returncode}):\n"
                             + "\n".join(gen_out.splitlines()[-15:]))
        return r

    # 2. sdbridge models --json
    listing = subprocess.run([*SDBRIDGE, "models", "--models-dir", str(workdir / "webui"), "--json"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    r["detected"] = "?"
    try:
        data = json.loads(listing.stdout)
        row = next(e for e in data["kinds"]["checkpoints"] if e["name"] == f"{arch}_random")
        r["detected"] = row["arch"] + (f" ({row['arch_reason']})" if row.get("arch_reason") else "")
        r["layout"] = [f["layout"] for f in data["folders"]]
        if not any(e["name"] == f"{arch}_random_lora" for e in data["kinds"]["loras"]):
            r["problems"].append(f"`sdbridge models` does not list the LoRA {arch}_random_lora")
    except (ValueError, KeyError, StopIteration) as e:
        r["problems"].append(f"`sdbridge models --json` (rc {listing.returncode}): {e!r}: "
                             f"{listing.stderr.strip()[-500:]}")
    if not r["detected"].startswith(arch):
        r["problems"].append(f"detected arch {r['detected']!r}, expected {arch!r}")

    # 3. the daemon
    session = Session(arch, size, workdir, args.dtype, min_free)
    try:
        r["ready_s"] = session.wait_ready(args.ready_timeout)
        m = re.search(r"ready in ([\d.]+) s", session.log())
        r["load_s"] = float(m[1]) if m else float("nan")
        r["vae"] = (re.search(r"model \S+ \((\w+), (\w+)\) ready", session.log()) or [None, None, "?"])[2]

        first_s, out = session.frame(gradient(size, 0), args.frame_timeout)
        r["first_frame_s"] = first_s
        if (out.width, out.height) != (size, size):
            r["problems"].append(f"output is {out.width}x{out.height}, expected {size}x{size}")
        limit = max(60.0, 8 * first_s)

        def timed_frames(key: str, shift: int):
            """args.frames new input frames, one at a time: median wall s/frame under r[key], the daemon's
            CPU s/frame under r[key + '_cpu'], the load average meanwhile under r[key + '_load']."""
            times, cpu, load = [], session.cpu_s(), os.getloadavg()[0]
            out = None
            for i in range(args.frames):
                dt, out = session.frame(gradient(size, shift + 16 * i), limit)
                times.append(dt)
            r[key] = statistics.median(times)
            r[key + "_cpu"] = (session.cpu_s() - cpu) / args.frames
            r[key + "_load"] = (load + os.getloadavg()[0]) / 2
            return out

        out = timed_frames("spf", 16)
        r["out_std"] = float(out.pixels.std())
        base, version = out, out.state_version

        # a LoRA from the folders at 0.8: loads it (first use) and renders the last input again
        lora = f"{arch}_random_lora"
        r["lora_s"], out = session.after_change(lambda: session.send(f"/lora/{lora}", 0.8), version, limit * 3,
                                                f"/lora/{lora} 0.8")
        r["lora_changed"] = _changed(base, out)
        m = re.search(r"LoRA .* loaded from .*\((.*)\), weight 0", session.log())
        r["lora_parts"] = m[1] if m else "?"
        out = timed_frames("spf_lora", 300)
        base, version = out, out.state_version
        # A1111 prompt syntax with emphasis and BREAK (two 75-token chunks)
        r["prompt_s"], out = session.after_change(lambda: session.send("/prompt", PROMPT), version, limit,
                                                  "/prompt")
        r["prompt_changed"] = _changed(base, out)
        base, version = out, out.state_version
        # guidance with cfg_type self, atomically
        r["cfg_s"], out = session.after_change(
            lambda: session.send_bundle(("/cfg_type", "self"), ("/guidance_scale", 2.0)), version, limit,
            "/guidance_scale 2.0 + /cfg_type self")
        r["cfg_changed"] = _changed(base, out)
        for what in ("lora", "prompt", "cfg"):
            if not r[f"{what}_changed"].startswith("yes"):
                r["problems"].append(f"the {what} change did not change the output")
        out = timed_frames("spf_cfg", 100)
        r["out_std_end"] = float(out.pixels.std())
        time.sleep(0.5)  # telemetry of the last frames
        status = session.telemetry.values("/sdbridge/status")
        r["status_end"] = status[-1][0] if status else "?"
        if r["status_end"] != "ready":
            r["problems"].append(f"status at the end is {r['status_end']!r}")
    except Exception as e:  # noqa: BLE001 - reported, with the daemon's log
        r["problems"].append(f"{type(e).__name__}: {e}")
    finally:
        r["errors"] = session.errors()
        r["daemon_peak_gb"] = session.watchdog.peak_anon / GIB
        killed = session.watchdog.killed
        rc = session.stop()
        r["exit_code"] = rc
        if killed:
            r["problems"].append(killed)
        elif rc not in (0, -signal.SIGTERM):
            r["problems"].append(f"daemon exit code {rc} after SIGTERM")
        if r["errors"]:
            r["problems"].append(f"{len(r['errors'])} error(s) on /sdbridge/error")
        r["log"] = session.log_path.read_text(errors="replace")
        r["log_warnings"] = [ln.strip() for ln in r["log"].splitlines()
                             if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", ln)]
        if r["log_warnings"]:
            r["problems"].append(f"{len(r['log_warnings'])} warning/error line(s) in the daemon log, first: "
                                 f"{r['log_warnings'][0][:300]}")
    return r


def _fmt(x, spec=".1f", unit=" s") -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else f"{x:{spec}}{unit}"


def _spf(r: dict, key: str) -> str:
    if key not in r:
        return "-"
    return f"{r[key]:.1f}/{r[key + '_cpu']:.1f}/{r[key + '_load']:.1f}"


def line(r: dict, size: int) -> str:
    parts = [
        f"{r['arch']}: detected {r.get('detected', '-')}",
        f"load {_fmt(r.get('load_s'))} (to ready {_fmt(r.get('ready_s'))}; vae {r.get('vae', '-')})",
        f"{size}x{size} s/frame (wall/daemon-cpu/loadavg): plain {_spf(r, 'spf')}, lora {_spf(r, 'spf_lora')}, "
        f"lora+prompt+cfg self {_spf(r, 'spf_cfg')} (first frame {_fmt(r.get('first_frame_s'))})",
        f"lora change->output {_fmt(r.get('lora_s'))} (into {r.get('lora_parts', '-')}; output changed: "
        f"{r.get('lora_changed', '-')})",
        f"prompt->output {_fmt(r.get('prompt_s'))} (changed: {r.get('prompt_changed', '-')[:3]}), "
        f"cfg->output {_fmt(r.get('cfg_s'))} (changed: {r.get('cfg_changed', '-')[:3]})",
        f"errors: {'; '.join(r.get('errors') or []) or 'none'}",
        f"output std {_fmt(r.get('out_std'), '.0f', '')}->{_fmt(r.get('out_std_end'), '.0f', '')}",
        f"peak anon RSS daemon {_fmt(r.get('daemon_peak_gb'), '.1f', ' GiB')}, "
        f"generator {_fmt(r.get('generate_peak_gb'), '.1f', ' GiB')}",
        "OK" if not r["problems"] else "FAILED",
    ]
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=(*ARCHS, "all"), default="all")
    parser.add_argument("--size", type=int, default=256, help="frame width and height (multiple of 8)")
    parser.add_argument("--sdxl-size", type=int, default=None, help="SDXL's size, if other than --size")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "sdbridge-real-arch")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the daemon's --dtype")
    parser.add_argument("--frames", type=int, default=3, help="frames timed per measurement (median)")
    parser.add_argument("--ready-timeout", type=float, default=480.0)
    parser.add_argument("--frame-timeout", type=float, default=300.0, help="for the first frame")
    parser.add_argument("--min-free-gb", type=float, default=1.0,
                        help="kill a child when the machine's available memory drops under this")
    parser.add_argument("--regenerate", action="store_true", help="write the checkpoints again")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--_generate", choices=ARCHS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    if args._generate:
        generate(args._generate, args.workdir, args.regenerate)
        return 0
    archs = ARCHS if args.arch == "all" else (args.arch,)
    args.size_for = {a: (args.sdxl_size if a == "sdxl" and args.sdxl_size else args.size) for a in archs}
    failed = 0
    for arch in archs:
        r = run_arch(arch, args)
        print(line(r, args.size_for[arch]), flush=True)
        if r["problems"]:
            failed += 1
            for problem in r["problems"]:
                print(f"  problem: {problem}")
            if r.get("log"):
                print("  daemon log tail:\n" + "\n".join("    " + s for s in r["log"].splitlines()[-40:]))
        if args.verbose and r.get("log"):
            print("\n".join("    " + s for s in r["log"].splitlines()[-15:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
