"""Single-file Stable Diffusion checkpoints, standalone VAEs and TAESD weights, loaded offline.

Owns: recognising a checkpoint's architecture from its weight names and shapes (SD 1.x, SD 2.x with
sd-turbo, SDXL base with sdxl-turbo, and the built-in `tiny` / `tiny-xl` test models), converting the
original LDM / SGM layout that A1111 and ComfyUI users have onto diffusers and transformers models with
diffusers' own converters, choosing the prediction type a checkpoint was trained for, and the CLIP
tokenizers built from the BPE data shipped in configs/models.

Every component config comes from configs/models and every model is built empty and filled from the
file, which is read once; nothing here can reach a hub. Finding files in model folders and choosing
between a checkpoint's VAE and a TAESD is engines/registry's job, not this module's.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Container, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import tiny
from .autoencoder import Autoencoder
from .bundle import SD15, SD21, SDXL, TINY_ARCH, TINY_XL_ARCH, XL_ARCHS, ModelBundle, ModelError
from .weights import SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES, read_safetensors_header, read_state_dict

log = logging.getLogger(__name__)

MODELS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
ARCH_NAMES = {SD15: "SD 1.x", SD21: "SD 2.x", SDXL: "SDXL", TINY_ARCH: "tiny", TINY_XL_ARCH: "tiny-xl"}
SUPPORTED = "SD 1.x, SD 2.x (and sd-turbo) and SDXL base (and sdxl-turbo) checkpoints"

# `modelspec.architecture` values (the safetensors metadata standard, github.com/Stability-AI/ModelSpec).
# Ours mark the built-in test models saved as single files.
TINY_MODELSPEC = {"sdbridge-tiny": TINY_ARCH, "sdbridge-tiny-xl": TINY_XL_ARCH}
MODELSPEC_ARCHS = {
    "stable-diffusion-v1": SD15, "stable-diffusion-v2-512": SD21, "stable-diffusion-v2-768-v": SD21,
    "stable-diffusion-xl-v1-base": SDXL,
}

EPSILON, V_PREDICTION = "epsilon", "v_prediction"

# Where each component lives in an original-layout checkpoint.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {SD15: "cond_stage_model.transformer.", SDXL: "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = {SD21: "cond_stage_model.model.", SDXL: "conditioner.embedders.1.model."}
_LAYOUT = {SD15: SD15, SD21: SD21, SDXL: SDXL, TINY_ARCH: SD15, TINY_XL_ARCH: SDXL}  # tiny mirrors these

_CLIP_VOCAB_SIZE = 49408
_BPE_FILE = MODELS_CONFIG_DIR / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"


# ============================================================================ architecture

def detect_architecture(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> str:
    """SD15, SD21, SDXL (or TINY_ARCH / TINY_XL_ARCH for our test models) from a checkpoint's weight names
    and shapes, as `engines.weights.read_safetensors_header` gives them (no tensor is loaded).

    The weights decide; a `modelspec.architecture` in the metadata marks our test models, refuses
    adapters (LoRA, embeddings) outright, and is otherwise only checked against the weights. Anything
    else raises ModelError saying what the file looks like and what is supported.
    """
    declared = (metadata or {}).get("modelspec.architecture", "").strip().lower()
    if declared in TINY_MODELSPEC:
        return TINY_MODELSPEC[declared]
    if "/" in declared:  # "<base>/lora", "<base>/textual-inversion", ...: an adapter, not a model
        base, adapter = declared.split("/", 1)
        raise ModelError(f"this file is a {adapter} for {base} (its metadata says so), not a model: use it as "
                         f"a {adapter} on top of a model. Supported models: {SUPPORTED}")
    arch = _arch_from_shapes(shapes)
    if declared and MODELSPEC_ARCHS.get(declared) != arch:
        log.warning("metadata says modelspec.architecture=%r, but the weights are %s; going by the weights",
                    declared, ARCH_NAMES[arch])
    return arch


def _arch_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ModelError(f"this file is {_describe(shapes)}. Supported: {SUPPORTED}")
    if len(conv_in) != 4 or conv_in[1] != 4:
        inputs = conv_in[1] if len(conv_in) == 4 else 0
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(inputs, "a UNet with unusual inputs")
        raise ModelError(f"this checkpoint is {kind} ({inputs} input channels); the stream needs a "
                         f"plain text-to-image model with 4. Supported: {SUPPORTED}")
    context = next((shape[-1] for key, shape in shapes.items()
                    if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight")), None)
    label = shapes.get(UNET_PREFIX + "label_emb.0.0.weight")
    if label is not None:
        if context == 1280 or any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
            raise ModelError("this checkpoint is an SDXL refiner, which only refines an SDXL base model's "
                             f"output and cannot run on its own; use an SDXL base model. Supported: {SUPPORTED}")
        if context == 2048 and label[-1] == 2816:
            arch = SDXL
        else:
            raise ModelError(f"this checkpoint's UNet takes {label[-1]} extra conditioning inputs and {context}-wide "
                             "text conditioning (an SDXL variant, or SD 2 unCLIP?), which is no model sdbridge knows. "
                             f"Supported: {SUPPORTED}")
    elif context == 768:
        arch = SD15
    elif context == 1024:
        arch = SD21
    else:
        raise ModelError(f"this checkpoint has a UNet with {context}-wide text conditioning, which is no model "
                         f"sdbridge knows. Supported: {SUPPORTED}")
    if conv_in[0] != 320:
        raise ModelError(f"this checkpoint looks like a {ARCH_NAMES[arch]} model with {conv_in[0]} base channels "
                         f"where {ARCH_NAMES[arch]} has 320: a pruned or distilled variant, which the shipped "
                         f"{ARCH_NAMES[arch]} configs do not fit. Supported: {SUPPORTED}")
    return arch


def _describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """What a weight file that is not a supported checkpoint looks like, in a performer's words."""
    keys = list(shapes)
    if not keys:
        return "empty (it holds no weights)"

    def has(*parts: str) -> bool:
        return any(part in key for key in keys for part in parts)

    if has("lora_down", "lora_up", "lora_A.", "lora_B.", "lora.down", "lora.up", "hada_w1", "lokr_w1", ".lora_"):
        return "a LoRA (or LyCORIS) adapter, not a model: load it as a LoRA on top of a model"
    if has("string_to_param", "emb_params") or set(keys) <= {"clip_l", "clip_g"}:
        return "a textual-inversion embedding, not a model: put it in the embeddings folder"
    if has("control_model.", "input_hint_block", "controlnet_cond_embedding"):
        return "a ControlNet, not a model: load it as a ControlNet"
    if has("joint_blocks."):
        return "a Stable Diffusion 3 / 3.5 model, which sdbridge does not run"
    if has("double_blocks.", "single_blocks."):
        return "a Flux model, which sdbridge does not run"
    if has(".layers.0.attention.", "cap_embedder", "blocks.0.cross_attn.", "adaLN_modulation"):
        return "a diffusion-transformer model (not a Stable Diffusion UNet), which sdbridge does not run"
    if has("conditioner.embedders.0.model.") and not has(UNET_PREFIX):
        return "the text encoder of an SDXL refiner, not a whole model"
    if has("down_blocks.0.resnets.0.conv1.weight") and has("time_embedding.linear_1.weight"):
        return ("a UNet in diffusers layout (one component of a diffusers model folder); give the whole "
                "diffusers folder instead")
    if _looks_like_taesd(keys):
        return "TAESD (tiny autoencoder) weights, not a model: put them in the VAE-approx folder"
    if has("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.") and not has(UNET_PREFIX):
        return "a VAE, not a model: put it in the VAE folder and choose it as the model's VAE"
    if has("text_model.encoder.layers.", "transformer.resblocks.") and not has(UNET_PREFIX):
        return "a text encoder on its own, not a whole model"
    if has(UNET_PREFIX):
        return "a diffusion model of an unknown kind"
    return f"no Stable Diffusion checkpoint (it holds {len(keys)} tensors such as {', '.join(sorted(keys)[:3])})"


# ============================================================================ prediction type

def prediction_type_for(path: str | Path, arch: str, metadata: Mapping[str, str] | None = None,
                        keys: Container[str] = ()) -> str:
    """EPSILON or V_PREDICTION: what a checkpoint's UNet predicts. The weights cannot tell, so, first hit wins:

    1. A sidecar `<stem>.yaml` next to the checkpoint (A1111's convention): v if it says
       `parameterization: "v"` (or uses SGM's VScaling), epsilon otherwise.
    2. A `v_pred` tensor in the file (ComfyUI's marker, used by v-prediction SDXL models): v.
    3. Metadata: `modelspec.prediction_type` ("v" / "epsilon"), else `modelspec.architecture`
       "stable-diffusion-v2-768-v" (v) or "stable-diffusion-v2-512" (epsilon).
    4. SD 2.x: epsilon if the file name says "turbo" (sd-turbo) or "512" (the SD 2.x 512 base models,
       v2-1_512-ema-pruned); otherwise v, as diffusers' from_single_file does for SD 2 checkpoints,
       because SD 2.0-v / 2.1 768 and most SD 2 fine-tunes predict v.
    5. Everything else (SD 1.x, SDXL, the test models): epsilon.

    `load_single_file(prediction_type=...)` overrides all of this.
    """
    path = Path(path)
    kind, reason = _prediction_type(path, arch, metadata or {}, keys)
    log.info("%s: %s prediction (%s)", path.name, "v" if kind == V_PREDICTION else "epsilon", reason)
    return kind


def _prediction_type(path: Path, arch: str, metadata: Mapping[str, str], keys: Container[str]) -> tuple[str, str]:
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():
        return (V_PREDICTION if _yaml_says_v(sidecar) else EPSILON), f"from {sidecar.name}"
    if "v_pred" in keys:
        return V_PREDICTION, "the file has a v_pred marker"
    declared = metadata.get("modelspec.prediction_type", "").strip().lower()
    if declared:
        try:
            return normalise_prediction_type(declared), "from modelspec.prediction_type"
        except ModelError:
            raise ModelError(f"{path.name} says it predicts {declared!r} (modelspec.prediction_type); sdbridge "
                             "runs epsilon and v-prediction models only") from None
    declared_arch = metadata.get("modelspec.architecture", "").strip().lower()
    if declared_arch == "stable-diffusion-v2-768-v":
        return V_PREDICTION, "modelspec.architecture is stable-diffusion-v2-768-v"
    if declared_arch == "stable-diffusion-v2-512":
        return EPSILON, "modelspec.architecture is stable-diffusion-v2-512"
    if arch == SD21:
        name = path.stem.lower()
        if "turbo" in name:
            return EPSILON, "an SD 2.x model named turbo (sd-turbo)"
        if "512" in name:
            return EPSILON, "an SD 2.x 512 base model"
        return V_PREDICTION, (f"the SD 2.x default; for an epsilon model put a {path.stem}.yaml next to it, such "
                              "as A1111's v2-inference.yaml, or set its prediction type")
    return EPSILON, f"the {ARCH_NAMES.get(arch, arch)} default"


def normalise_prediction_type(value: str) -> str:
    """EPSILON or V_PREDICTION from the names people and tools use ("v", "v-prediction", "eps", ...)."""
    value = value.strip().lower().replace("-", "_")
    if value in ("v", "v_prediction", "v_pred", "vpred", "velocity"):
        return V_PREDICTION
    if value in ("epsilon", "eps", "noise"):
        return EPSILON
    raise ModelError(f"unknown prediction type {value!r}; use 'epsilon' or 'v_prediction'")


def _yaml_says_v(path: Path) -> bool:
    import yaml  # diffusers depends on PyYAML

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ModelError(f"cannot read {path.name} (the checkpoint's config next to it): {e}") from e

    def walk(node: Any) -> Iterator[tuple[Any, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield key, value
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    return any((key == "parameterization" and str(value).strip().lower() == "v")
               or (isinstance(value, str) and value.endswith("VScaling")) for key, value in walk(config))


# ============================================================================ whole checkpoints

def load_single_file(path: str | Path, device: torch.device, dtype: torch.dtype, *, allow_pickle: bool = False,
                     prediction_type: str | None = None, arch: str | None = None) -> ModelBundle:
    """A single-file checkpoint (`.safetensors`; a pickle only with allow_pickle) as a ModelBundle on `device`.

    The architecture comes from the weights (detect_architecture) unless `arch` names it (the weights
    must fit it all the same); the prediction type comes from prediction_type_for unless
    `prediction_type` is given. Raises ModelError (PickleRefused for a pickle without allow_pickle) with
    a message that says what to do.
    """
    if arch is not None and arch not in ARCH_NAMES:
        raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(ARCH_NAMES)}")
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} not found")
    metadata: dict[str, str] = {}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        shapes, metadata = read_safetensors_header(path)
        arch = arch or _detect(path, shapes, metadata)  # before reading gigabytes of a file we cannot use
        state = read_state_dict(path)
    else:
        state = _tensors(read_state_dict(path, allow_pickle=allow_pickle))
        arch = arch or _detect(path, {k: tuple(v.shape) for k, v in state.items()}, metadata)
    kind = (normalise_prediction_type(prediction_type) if prediction_type
            else prediction_type_for(path, arch, metadata, state))
    log.info("loading %s as %s", path.name, ARCH_NAMES[arch])
    try:
        components = _components(arch, state, path.name, dtype)
    finally:
        state.clear()  # the components hold what they need; let the rest go now
    bundle = ModelBundle(
        name=path.stem, arch=arch, source=str(path), test_model=arch in (TINY_ARCH, TINY_XL_ARCH),
        unet=components["unet"], autoencoder=Autoencoder(components["vae"]),
        text_encoder=components["text_encoder"], tokenizer=_tokenizer(arch, "tokenizer"),
        text_encoder_2=components.get("text_encoder_2"),
        tokenizer_2=_tokenizer(arch, "tokenizer_2") if arch in XL_ARCHS else None,
        scheduler=_scheduler(arch, kind),
    )
    return bundle.to(device, dtype)


def _detect(path: Path, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str:
    try:
        return detect_architecture(shapes, metadata)
    except ModelError as e:
        raise ModelError(f"{path.name}: {e}") from e


def _tensors(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _components(arch: str, state: dict[str, torch.Tensor], filename: str, dtype: torch.dtype) -> dict[str, Any]:
    """The UNet, VAE and text encoder(s), each built empty from its config and filled from `state`."""
    modules = _empty_modules(arch)
    for name, module in modules.items():
        try:
            component = component_weights(name, arch, state, module)
        except ModelError as e:
            raise ModelError(f"{filename}: {e}") from e
        except (KeyError, IndexError, ValueError, RuntimeError) as e:  # diffusers' converters on a broken file
            raise ModelError(f"{filename}: cannot convert its {_COMPONENT_NAMES[name]}: {e}") from e
        fill(module, component, dtype, f"{filename}: its {_COMPONENT_NAMES[name]}", ARCH_NAMES[arch])
    return modules


_COMPONENT_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder",
                    "text_encoder_2": "second text encoder"}


def component_weights(name: str, arch: str, state: Mapping[str, torch.Tensor], module: torch.nn.Module
                      ) -> dict[str, torch.Tensor]:
    """The weights of component `name` ("unet", "vae", "text_encoder", "text_encoder_2") of an `arch`
    checkpoint, converted to the names and shapes of `module`, the diffusers / transformers model."""
    layout = _LAYOUT[arch]
    if name == "unet":
        return unet_weights(state, dict(module.config))
    if name == "vae":
        return vae_weights(_with_prefix(state, VAE_PREFIX), dict(module.config))
    if name == "text_encoder":
        if layout == SD21:
            return open_clip_weights(state, OPEN_CLIP_PREFIX[SD21], module)
        return clip_weights(state, CLIP_PREFIX[layout], module)
    if name == "text_encoder_2":
        return open_clip_weights(state, OPEN_CLIP_PREFIX[SDXL], module)
    raise ValueError(f"no component {name!r}")


def _empty_modules(arch: str) -> dict[str, torch.nn.Module]:
    """The components of `arch` with unallocated weights (allocated small for the test models)."""
    if arch == TINY_ARCH:
        modules: dict[str, torch.nn.Module] = {"unet": tiny.build_unet(), "text_encoder": tiny.build_text_encoder()}
    elif arch == TINY_XL_ARCH:
        modules = {"unet": tiny.build_xl_unet(), "text_encoder": tiny.build_text_encoder(),
                   "text_encoder_2": tiny.build_text_encoder_2()}
    else:
        folder = MODELS_CONFIG_DIR / _arch_folder(arch)
        with _empty_weights():
            modules = {"unet": UNet2DConditionModel.from_config(_read_json(folder / "unet" / "config.json")),
                       "text_encoder": CLIPTextModel(_clip_config(folder / "text_encoder"))}
            if arch == SDXL:
                modules["text_encoder_2"] = CLIPTextModelWithProjection(_clip_config(folder / "text_encoder_2"))
    with _empty_weights():
        modules["vae"] = AutoencoderKL.from_config(_vae_config(arch))
    return modules


@contextlib.contextmanager
def _empty_weights() -> Iterator[None]:
    """Build models without allocating or initialising their weights (they are about to be replaced).

    accelerate's init_empty_weights puts only parameters on the meta device: buffers that no
    checkpoint holds (CLIP's position ids) stay real. Without accelerate the models are built normally."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        yield
        return
    with init_empty_weights():
        yield


def fill(module: torch.nn.Module, weights: dict[str, torch.Tensor], dtype: torch.dtype, what: str,
         layout: str) -> None:
    """Replace every parameter and buffer of `module` with `weights`, which must match it exactly: a
    missing, extra or differently shaped weight is a ModelError naming a few of them."""
    weights = {k: v for k, v in weights.items() if v is not None}  # diffusers' converters .get() what is absent
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(weights[k].shape)} where {layout} has {tuple(v.shape)}"
             for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} weights missing (such as {', '.join(missing[:3])})" if missing else "",
                    f"{len(unexpected)} unknown weights (such as {', '.join(unexpected[:3])})" if unexpected else "",
                    f"{len(wrong)} of another shape ({'; '.join(wrong[:2])})" if wrong else ""]
        raise ModelError(f"{what} does not fit the {layout} layout: {'; '.join(p for p in problems if p)}. It may "
                         "be a pruned, distilled or otherwise modified variant, which sdbridge cannot load")
    converted = {k: (v.to(dtype) if v.is_floating_point() and expected[k].is_floating_point() else v).contiguous()
                 for k, v in weights.items()}
    module.load_state_dict(converted, strict=True, assign=True)
    module.eval()


def _with_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------- per-component converters

def unet_weights(state: Mapping[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel weights from an original checkpoint (`model.diffusion_model.*`)."""
    unet_state = _with_prefix(state, UNET_PREFIX)
    if not unet_state:
        raise ModelError("no UNet weights (model.diffusion_model.*) in it")
    return convert_ldm_unet_checkpoint(unet_state, config)


def vae_weights(state: Mapping[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL weights from original VAE weights, with or without `first_stage_model.`."""
    if not state:
        raise ModelError("no VAE weights (first_stage_model.*) in it; this checkpoint cannot be used on its own")
    return convert_ldm_vae_checkpoint(dict(state), config)


def clip_weights(state: Mapping[str, torch.Tensor], prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """transformers CLIP text model weights from the copy under `prefix` (HF CLIP's own names, nested)."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not inner:
        raise ModelError(f"no text encoder weights ({prefix}*) in it; a checkpoint without its text encoder "
                         "cannot be used on its own")
    return _fit_text_prefix({k.removeprefix("text_model."): v for k, v in inner.items()}, module)


def open_clip_weights(state: Mapping[str, torch.Tensor], prefix: str, module: torch.nn.Module
                      ) -> dict[str, torch.Tensor]:
    """transformers CLIP text model weights from an OpenCLIP text tower under `prefix` (fused q/k/v).

    Layers beyond the model's (SD 2.x keeps OpenCLIP ViT-H's 24th, which it never uses), OpenCLIP's
    logit scale and, for a model without one, the text projection are left out."""
    layers = module.config.num_hidden_layers
    has_projection = "text_projection.weight" in module.state_dict()
    subset: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        block = re.match(r"transformer\.resblocks\.(\d+)\.", key[len(prefix):])
        if block and int(block.group(1)) >= layers:
            continue
        if key.endswith("text_projection") and not has_projection:
            continue
        subset[key] = value
    if not subset:
        raise ModelError(f"no text encoder weights ({prefix}*) in it; a checkpoint without its text encoder "
                         "cannot be used on its own")
    converted = convert_open_clip_checkpoint(module, subset, prefix=prefix)
    return _fit_text_prefix({k.removeprefix("text_model."): v for k, v in converted.items()}, module)


def _fit_text_prefix(weights: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Flat CLIP names (`embeddings.*`, `encoder.*`, `final_layer_norm.*`) nested under `text_model.` where
    the module wants it (transformers 5 flattened CLIPTextModel but not CLIPTextModelWithProjection),
    without the position ids buffer old checkpoints carry."""
    nested = any(k.startswith("text_model.") for k in module.state_dict())
    out = {}
    for key, value in weights.items():
        if key.endswith("position_ids"):
            continue
        out[f"text_model.{key}" if nested and key != "text_projection.weight" else key] = value
    return out


# ============================================================================ configs, scheduler, tokenizers

def _arch_folder(arch: str) -> str:
    return {SD15: "sd15", SD21: "sd21", SDXL: "sdxl", TINY_ARCH: "tiny", TINY_XL_ARCH: "tiny-xl"}[arch]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"sdbridge's shipped config {path} is missing or broken ({e}); reinstall sdbridge") from e


def _clip_config(folder: Path) -> CLIPTextConfig:
    config = {k: v for k, v in _read_json(folder / "config.json").items()
              if k not in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "model_type")}
    return CLIPTextConfig(**config)


def _vae_config(arch: str) -> dict[str, Any]:
    return _read_json(MODELS_CONFIG_DIR / _arch_folder(arch) / "vae" / "config.json")


def _scheduler(arch: str, prediction_type: str) -> LCMScheduler:
    """An LCMScheduler with the training noise schedule of `arch` (only its config is used by the stream)."""
    if arch in (TINY_ARCH, TINY_XL_ARCH):
        config = dict(tiny.build_scheduler().config)
    else:
        config = _read_json(MODELS_CONFIG_DIR / _arch_folder(arch) / "scheduler" / "scheduler_config.json")
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in config.items() if k in accepted}
    config["prediction_type"] = prediction_type
    return LCMScheduler.from_config(config)


def _tokenizer(arch: str, which: str) -> CLIPTokenizer:
    if arch in (TINY_ARCH, TINY_XL_ARCH):
        return tiny.build_tokenizer()
    return clip_tokenizer(MODELS_CONFIG_DIR / _arch_folder(arch) / which)


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """The vocabulary (49408 tokens) and merges (48894) of OpenAI's CLIP tokenizer, derived from the BPE
    file shipped in configs/models/clip-bpe exactly as OpenAI's SimpleTokenizer does: the 256 byte
    characters, the same with `</w>`, every merge joined, then <|startoftext|> and <|endoftext|>."""
    try:
        lines = gzip.decompress(_BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ModelError(f"sdbridge's CLIP tokenizer data {_BPE_FILE} is missing or broken ({e}); "
                         "reinstall sdbridge") from e
    merges = lines[1:1 + _CLIP_VOCAB_SIZE - 2 * 256 - 2]  # line 0 is a header
    characters = _byte_characters()
    tokens = (characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges]
              + ["<|startoftext|>", "<|endoftext|>"])
    return {token: i for i, token in enumerate(tokens)}, merges


def _byte_characters() -> list[str]:
    """OpenAI CLIP's printable stand-ins for the 256 byte values, in its vocabulary's order: the printable
    bytes first, as themselves, then the others as the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_tokenizer(config_folder: Path) -> CLIPTokenizer:
    """A CLIPTokenizer with CLIP's vocabulary and the settings in `config_folder` (tokenizer_config.json,
    special_tokens_map.json), from files written once into a cache folder keyed by their content."""
    config_files = ("tokenizer_config.json", "special_tokens_map.json")
    try:
        configs = {name: (config_folder / name).read_bytes() for name in config_files}
        bpe = _BPE_FILE.read_bytes()
    except OSError as e:
        raise ModelError(f"sdbridge's tokenizer data in {config_folder} is missing ({e}); reinstall sdbridge") from e
    key = hashlib.sha256(bpe + b"".join(configs[name] for name in config_files)).hexdigest()[:20]
    try:
        folder = _cached_tokenizer_folder(key, configs)
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except OSError:
        log.debug("tokenizer cache not writable; building the tokenizer in a temporary folder", exc_info=True)
        with tempfile.TemporaryDirectory(prefix="sdbridge-tokenizer-") as temporary:
            _write_tokenizer_files(Path(temporary), configs)
            return CLIPTokenizer.from_pretrained(temporary, local_files_only=True)


def tokenizer_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "sdbridge-cache" / "clip-tokenizer"


def _cached_tokenizer_folder(key: str, configs: Mapping[str, bytes]) -> Path:
    folder = tokenizer_cache_dir() / key
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        _write_tokenizer_files(staging, configs)
        os.rename(staging, folder)  # atomic: readers see a complete folder or none
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not folder.is_dir():  # not merely another process that finished first
            raise
    return folder


def _write_tokenizer_files(folder: Path, configs: Mapping[str, bytes]) -> None:
    vocab, merges = clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    for name, data in configs.items():
        (folder / name).write_bytes(data)


# ============================================================================ standalone VAEs

def load_vae_file(path: str | Path, device: torch.device, dtype: torch.dtype, *, arch: str | None = None,
                  allow_pickle: bool = False) -> AutoencoderKL:
    """A standalone VAE file (A1111 models/VAE, ComfyUI models/vae), in the original layout or diffusers'.

    SD and SDXL VAEs have the same shapes and differ in their latent scaling (0.18215 / 0.13025) and in
    SDXL's needing float32 (force_upcast), so the config follows `arch`, the model it is for; without
    one, a name with "xl" in it means SDXL. A name saying fp16-fix (madebyollin's sdxl-vae-fp16-fix)
    turns force_upcast off."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"VAE {path} not found")
    arch = _vae_arch(path, arch)
    config = vae_config(path, arch)
    state = _vae_state(_tensors(read_state_dict(path, allow_pickle=allow_pickle)), path.name)
    with _empty_weights():
        vae = AutoencoderKL.from_config(config)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        weights = _diffusers_vae_names(state)
    else:
        try:
            weights = vae_weights(state, config)
        except (KeyError, IndexError, ValueError, RuntimeError) as e:
            raise ModelError(f"{path.name}: cannot convert the VAE: {e}") from e
    fill(vae, weights, dtype, f"VAE {path.name}", f"{ARCH_NAMES[arch]} VAE")
    return vae.to(device)


def vae_config(path: str | Path, arch: str | None = None) -> dict[str, Any]:
    """The AutoencoderKL config load_vae_file gives the VAE file `path` for a model of `arch`."""
    path = Path(path)
    config = _vae_config(_vae_arch(path, arch))
    if "fp16-fix" in path.stem.lower().replace("_", "-"):
        config["force_upcast"] = False
    return config


def _vae_arch(path: Path, arch: str | None) -> str:
    arch = arch or (SDXL if "xl" in path.stem.lower() else SD15)
    if arch not in ARCH_NAMES:
        raise ModelError(f"unknown architecture {arch!r} for VAE {path.name}; known: {', '.join(ARCH_NAMES)}")
    return arch


def _vae_state(state: dict[str, torch.Tensor], filename: str) -> dict[str, torch.Tensor]:
    """The VAE weights of a VAE file (or of a whole checkpoint, whose VAE it takes), without a
    `first_stage_model.` / `vae.` prefix and without the training leftovers (loss, EMA copies) some carry."""
    for prefix in (VAE_PREFIX, "vae."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    vae = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    if not vae:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise ModelError(f"{filename} is not a VAE: it is {_describe(shapes)}")
    return vae


def _diffusers_vae_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers-layout VAE weights with the attention names diffusers used before 0.14 renamed."""
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        if ".attentions." in key and key.endswith("weight") and value.ndim == 4:  # 1x1 convolutions
            value = value[:, :, 0, 0]
        out[key] = value
    return out


# ============================================================================ TAESD

def taesd_arch(path: str | Path) -> str:
    """Which latent space a TAESD file or folder serves, by its name: SDXL for taesdxl, else SD15 (the
    SD 1.x / 2.x latent space). Weights and configs are the same for both, so only the name tells."""
    return SDXL if "taesdxl" in Path(path).name.lower() else SD15


def load_taesd(path: str | Path, device: torch.device, dtype: torch.dtype, *, arch: str | None = None,
               allow_pickle: bool = False) -> AutoencoderTiny:
    """TAESD as diffusers' AutoencoderTiny, from a diffusers folder (config.json + weights) or from the
    original madebyollin encoder/decoder pair (taesd_encoder / taesd_decoder, or taesdxl_*, each
    `.safetensors` or `.pth` / `.pt`), where `path` is either file of the pair or their folder.

    TAESD and TAESDXL share one config (scaling_factor 1.0: TAESD is trained to give the VAE's already
    scaled latents) and differ in their weights. `arch` is the model it is for: in a folder holding
    both pairs (ComfyUI's vae_approx) it picks taesdxl_* for SDXL models and taesd_* otherwise."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _load_taesd_folder(path, dtype, allow_pickle).to(device)
    encoder_file, decoder_file = _taesd_pair(path, arch)
    if arch is not None and (arch in XL_ARCHS) != (taesd_arch(encoder_file) == SDXL):
        log.warning("%s is named for %s latents but is loaded for a %s model", encoder_file.name,
                    ARCH_NAMES[taesd_arch(encoder_file)], ARCH_NAMES.get(arch, arch))
    encoder = _tensors(read_state_dict(encoder_file, allow_pickle=allow_pickle))
    decoder = _tensors(read_state_dict(decoder_file, allow_pickle=allow_pickle))
    weights = taesd_weights(encoder, decoder)
    latent_channels = _taesd_latent_channels(encoder, encoder_file.name)
    with _empty_weights():
        module = AutoencoderTiny(latent_channels=latent_channels)
    fill(module, weights, dtype, f"TAESD {encoder_file.name} + {decoder_file.name}", "TAESD")
    return module.to(device)


_TAESD_PART = re.compile(r"^(?P<stem>.*)_(?P<part>encoder|decoder)$", re.IGNORECASE)


def _taesd_pair(path: Path, arch: str | None) -> tuple[Path, Path]:
    """The encoder and decoder files of an original TAESD pair, from one of them or their folder."""
    if path.is_file():
        match = _TAESD_PART.match(path.stem)
        if not match:
            raise ModelError(f"{path.name}: TAESD files are named <name>_encoder and <name>_decoder "
                             "(taesd_encoder.pth, taesdxl_decoder.safetensors, ...), or give a diffusers folder")
        stem, folder = match.group("stem"), path.parent
    elif path.is_dir():
        folder = path
        stems = sorted({m.group("stem") for f in path.iterdir() if f.suffix.lower() in WEIGHT_SUFFIXES
                        for m in [_TAESD_PART.match(f.stem)] if m})
        if not stems:
            raise ModelError(f"no TAESD weights in {path}: expected taesd_encoder and taesd_decoder files "
                             "(or taesdxl_*), or a diffusers folder with config.json")
        wanted = "taesdxl" if arch in XL_ARCHS else "taesd"
        found = [s for s in stems if s.lower() == wanted]
        if not found and not (arch is None and len(stems) == 1):
            model = f"{ARCH_NAMES.get(arch, arch)} models" if arch else "this"
            raise ModelError(f"no {wanted}_encoder / {wanted}_decoder pair for {model} in {path} (it has "
                             f"{', '.join(stems)}); TAESD is for SD 1.x / 2.x latents, TAESDXL for SDXL's")
        stem = found[0] if found else stems[0]
    else:
        raise ModelError(f"TAESD {path} not found")
    files = {}
    for part in ("encoder", "decoder"):
        candidates = [folder / f"{stem}_{part}{suffix}" for suffix in WEIGHT_SUFFIXES]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise ModelError(f"{stem}_{part} is missing next to the other TAESD file in {folder}: the stream "
                             f"encodes and decodes, so it needs both {stem}_encoder and {stem}_decoder "
                             "(from github.com/madebyollin/taesd)")
        files[part] = file
    return files["encoder"], files["decoder"]


def _looks_like_taesd(keys: list[str]) -> bool:
    return bool(keys) and all(re.match(r"^\d+\.", k) for k in keys) and any(".conv." in k for k in keys)


def taesd_weights(encoder: Mapping[str, torch.Tensor], decoder: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderTiny weights from the original TAESD encoder and decoder (nn.Sequential indices).

    The encoder's layers are diffusers' encoder.layers one for one. The original decoder starts with a
    parameterless clamp layer, which diffusers applies in DecoderTiny.forward instead, so its indices are
    one higher than diffusers' decoder.layers."""
    out: dict[str, torch.Tensor] = {}
    for part, weights, shift in (("encoder", encoder, 0), ("decoder", decoder, 1)):
        for key, value in weights.items():
            index, _, rest = key.partition(".")
            if not index.isdigit() or int(index) < shift:
                raise ModelError(f"TAESD {part} weight {key!r} is not in the original TAESD layout")
            out[f"{part}.layers.{int(index) - shift}.{rest}"] = value
    return out


def _taesd_latent_channels(encoder: Mapping[str, torch.Tensor], filename: str) -> int:
    biases = {int(k.split(".")[0]): v for k, v in encoder.items() if re.match(r"^\d+\.bias$", k)}
    if not biases:
        raise ModelError(f"{filename} is not a TAESD encoder (no output convolution)")
    channels = int(biases[max(biases)].shape[0])
    if channels != 4:
        raise ModelError(f"{filename} makes {channels}-channel latents (TAESD3 / TAEF1, for SD3 or Flux); "
                         "sdbridge's models need TAESD (SD 1.x / 2.x) or TAESDXL, with 4")
    return channels


def _load_taesd_folder(path: Path, dtype: torch.dtype, allow_pickle: bool) -> AutoencoderTiny:
    config = _read_user_json(path / "config.json")
    files = [f for f in path.iterdir() if f.suffix.lower() in WEIGHT_SUFFIXES]
    # diffusers' own file first, safetensors before pickles, full precision before fp16 variants
    files.sort(key=lambda f: (not f.name.startswith("diffusion_pytorch_model."),
                              f.suffix.lower() not in SAFETENSORS_SUFFIXES, "fp16" in f.name, f.name))
    if not files:
        raise ModelError(f"TAESD folder {path} has a config.json but no weights (diffusion_pytorch_model.safetensors)")
    accepted = set(inspect.signature(AutoencoderTiny.__init__).parameters) - {"self"}
    with _empty_weights():
        module = AutoencoderTiny(**{k: v for k, v in config.items() if k in accepted})
    fill(module, _tensors(read_state_dict(files[0], allow_pickle=allow_pickle)), dtype, f"TAESD {path.name}", "TAESD")
    return module


def _read_user_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a diffusers config (not a JSON object)")
    return data
