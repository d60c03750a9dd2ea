"""What LoRAs cost: the time to load one, the time of a live weight change, and the UNet's time per frame
with 0, 1 and 2 LoRAs loaded (inactive at weight 0, then active). Prints medians of N runs.

    python benchmarks/lora_cost.py                      # the built-in tiny model, on the CPU
    python benchmarks/lora_cost.py --arch sd15 --size 32  # SD 1.5's UNet and text encoder, random weights

The LoRAs are random, kohya-like in reach (attention, feed-forward and projections of the UNet, attention
and MLP of the text encoder), rank --rank, written with diffusers' save_lora_weights.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines import registry  # noqa: E402
from engines.bundle import SD15, ModelBundle  # noqa: E402
from engines.lora import LoraSet  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def build_model(arch: str, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    tiny = registry.load("tiny", device, dtype)
    if arch == "tiny":
        return tiny
    # Full-size SD 1.5 shapes with random weights: what the layer count and widths cost, not what it draws.
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "sd15" / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(CONFIGS / "sd15" / "text_encoder" / "config.json"))
    bundle = ModelBundle(**{**tiny.__dict__, "name": "random sd15", "arch": SD15, "unet": unet.eval(),
                            "text_encoder": text_encoder.eval()})
    return bundle.to(device, dtype)


def write_lora(model: ModelBundle, folder: Path, seed: int, rank: int) -> Path:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.functional import inject_adapter_in_model
    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
            module = copy.deepcopy(getattr(model, component)).to("cpu")
            if module.dtype != torch.float32:  # diffusers warns about any dtype cast, even a no-op one
                module.to(dtype=torch.float32)
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
            inject_adapter_in_model(config, module, adapter_name="default")
            layers[component] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}
            del module
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                              text_encoder_lora_layers=layers["text_encoder"],
                                              weight_name=f"lora{seed}.safetensors")
    return folder / f"lora{seed}.safetensors"


def timed_ms(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1000


def median_ms(fn, runs: int, sync) -> float:
    return statistics.median(timed_ms(fn, sync) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--size", type=int, default=32, help="latent height and width (image size / 8)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = registry.pick_device(args.device)
    dtype = registry.pick_dtype(args.dtype, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    plain = build_model(args.arch, device, dtype)
    hidden = plain.unet.config.cross_attention_dim
    latents = torch.randn(1, 4, args.size, args.size, device=device, dtype=dtype)
    context = torch.randn(1, 77, hidden, device=device, dtype=dtype)
    tokens = torch.randint(0, 200, (1, 77), device=device)

    def unet(model: ModelBundle):
        @torch.inference_mode()
        def run() -> None:
            model.unet(latents, 500, encoder_hidden_states=context)
        return run

    def text(model: ModelBundle):
        @torch.inference_mode()
        def run() -> None:
            model.text_encoder(tokens)
        return run

    print(f"model {plain.name} ({args.arch}), {device} {dtype}, {torch.get_num_threads()} threads, latents "
          f"{args.size}x{args.size}, LoRA rank {args.rank}, median of {args.runs} runs")
    with tempfile.TemporaryDirectory(prefix="sdbridge-lora-bench-") as tmp:
        paths = [write_lora(plain, Path(tmp), seed, args.rank) for seed in (1, 2)]

        # Loading and weight changes, on a copy of the model
        model = ModelBundle(**{**plain.__dict__, "unet": copy.deepcopy(plain.unet),
                               "text_encoder": copy.deepcopy(plain.text_encoder)})
        lora_set = LoraSet(model)
        load_runs = max(3, args.runs // 4)
        load_ms = [timed_ms(lambda: lora_set.load("a", paths[0]), sync)]
        for _ in range(load_runs - 1):
            lora_set.unload("a")
            load_ms.append(timed_ms(lambda: lora_set.load("a", paths[0]), sync))
        from peft.tuners.tuners_utils import BaseTunerLayer
        n_layers = sum(isinstance(m, BaseTunerLayer) for c in (model.unet, model.text_encoder) for m in c.modules())
        lora_set.load("b", paths[1])
        unload_ms = median_ms(lambda: (lora_set.unload("b"), lora_set.load("b", paths[1])), load_runs, sync)
        small = iter([0.5, 0.6] * args.runs)
        change_ms = median_ms(lambda: lora_set.set_weights({"a": next(small)}), args.runs, sync)
        flips = iter([0.0, 0.7] * args.runs)
        flip_ms = median_ms(lambda: lora_set.set_weights({"a": next(flips)}), args.runs, sync)
        same_ms = median_ms(lambda: lora_set.set_weights({"a": 0.7}), args.runs, sync)

        # Per frame: one model per LoRA count, conditions taken in turn so that load from other processes
        # falls on all of them alike
        one = ModelBundle(**{**plain.__dict__, "unet": copy.deepcopy(plain.unet),
                             "text_encoder": copy.deepcopy(plain.text_encoder)})
        one_set = LoraSet(one)
        one_set.load("a", paths[0])
        conditions = [
            ("UNet, no LoRA loaded", unet(plain), None, {}),
            ("UNet, 1 LoRA loaded at weight 0", unet(one), one_set, {"a": 0.0}),
            ("UNet, 2 LoRAs loaded at weight 0", unet(model), lora_set, {"a": 0.0, "b": 0.0}),
            ("UNet, 1 LoRA active", unet(one), one_set, {"a": 0.7}),
            ("UNet, 2 LoRAs active", unet(model), lora_set, {"a": 0.7, "b": 0.5}),
            ("text encoder, no LoRA", text(plain), None, {}),
            ("text encoder, 2 LoRAs active", text(model), lora_set, {"a": 0.7, "b": 0.5}),
        ]
        for _, fn, _, _ in conditions:
            fn()  # warm-up
        times: dict[str, list[float]] = {label: [] for label, *_ in conditions}
        for _ in range(args.runs):
            for label, fn, which, weights in conditions:
                if which is not None:
                    which.set_weights(weights)
                times[label].append(timed_ms(fn, sync))

    rows = [("load one LoRA (from file, into the model)", statistics.median(load_ms)),
            ("unload + load again", unload_ms),
            ("set_weights, one LoRA 0.5 <-> 0.6", change_ms),
            ("set_weights, one LoRA 0 <-> 0.7 (activation)", flip_ms),
            ("set_weights, nothing changed", same_ms)]
    rows += [(label, statistics.median(values)) for label, values in times.items()]
    print(f"(one LoRA wraps {n_layers} layers of the UNet and text encoder)")
    width = max(len(label) for label, _ in rows)
    for label, ms in rows:
        print(f"  {label:<{width}}  {ms:10.3f} ms")


if __name__ == "__main__":
    main()
