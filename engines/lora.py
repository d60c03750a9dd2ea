"""LoRAs with live weights: LoRA files from A1111 / ComfyUI / diffusers folders put into a loaded model,
several at once, their weights played every frame without reloading or rebuilding anything.

This module owns reading a LoRA file (through engines.weights, so pickles are refused by default),
recognising its key format, checking that it fits the model, injecting it as a peft adapter through
diffusers' own loaders, and turning the performer's weights into active adapters and scales. Formats:
kohya / A1111 (`lora_unet_…`, `lora_te_…`, SDXL `lora_te1_…` / `lora_te2_…`, with `.alpha`), diffusers /
peft (`unet.….lora_A.weight` / `lora_B`) and the older diffusers ones (`lora.down` / `lora.up`,
`to_q_lora`, `lora_linear_layer`, unprefixed attention-processor files).

A LoRA at weight 0 is deactivated in every layer rather than multiplied by 0, so it costs nothing but
the layer's wrapper; a layer with no active LoRA at all is switched off and runs its base module only.

It knows nothing of where LoRA files live, of parameter names, or of prompts: `set_weights` says when the
text encoders changed and the caller clears whatever it cached from them.

Threading: `load`, `set_weights` and `unload` change the modules a forward pass runs (load and unload
replace layers with peft wrappers and back; set_weights changes the active adapters and the scales read
during the forward), so they must run between frames on the thread that renders, never concurrently with
a UNet or text-encoder forward.

CUDA graphs and compiled models: peft reads each scale as a Python float during the forward, and which
adapters run is Python control flow, so a captured graph or a compiled UNet keeps the weights it was
captured with; and load/unload replace modules. Capture again after any of these.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import delete_adapter_layers, recurse_remove_peft_layers
from peft.tuners.tuners_utils import BaseTunerLayer

from .bundle import SD15, SD21, SDXL, TINY_ARCH, TINY_XL_ARCH, ModelBundle, ModelError
from .weights import PickleRefused, read_safetensors_header, read_state_dict

log = logging.getLogger(__name__)

UNET, TEXT_ENCODER, TEXT_ENCODER_2 = "unet", "text_encoder", "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)  # also the key prefixes of the diffusers format
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
ARCH_LABELS = {SD15: "SD 1.x", SD21: "SD 2.x", SDXL: "SDXL", TINY_ARCH: "the built-in tiny model (SD 1.x-shaped)",
               TINY_XL_ARCH: "the built-in tiny-xl model (SDXL-shaped)"}
# What a LoRA was trained for, told by the width of what it reads: the UNet's cross-attention context
# (text features) and the text encoders' hidden size.
_ARCH_BY_CONTEXT = {768: SD15, 1024: SD21, 2048: SDXL, 32: TINY_ARCH, 64: TINY_XL_ARCH}
_ARCH_BY_TEXT_HIDDEN = {768: SD15, 1024: SD21, 32: TINY_ARCH}
_ARCH_BY_TEXT_2_HIDDEN = {1280: SDXL, 32: TINY_XL_ARCH}
_LYCORIS_MARKERS = (".hada_", ".lokr_", ".oft_", ".ia3_", ".glora_", ".boft_")


class LoraError(ValueError):
    """A LoRA that cannot be loaded, set or unloaded; the message says what to do about it."""


@dataclass
class _Lora:
    name: str  # the performer's name for it
    adapter: str  # peft's name for it: peft refuses some characters, so never the performer's name
    path: Path
    components: tuple[str, ...]  # the parts of the model it changes, of COMPONENTS
    weight: float = 0.0


class LoraSet:
    """The LoRAs loaded into one model, with their live weights.

    A LoRA is loaded at weight 0 (inactive). `set_weights` then changes weights between frames at the cost
    of a walk over the LoRA layers, nothing more: no reload, no rebuild. Not thread-safe: see the module
    docstring.
    """

    def __init__(self, model: ModelBundle):
        self._model = model
        self._loras: dict[str, _Lora] = {}
        self._serial = 0
        # Per component, each peft layer with the adapters it holds: found once per load/unload, so a
        # weight change walks these layers only, not the whole module tree.
        self._layers: dict[str, list[tuple[BaseTunerLayer, frozenset[str]]]] = {}

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._loras)

    @property
    def weights(self) -> dict[str, float]:
        return {name: lora.weight for name, lora in self._loras.items()}

    @staticmethod
    def read(name: str, path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of the LoRA file at `path`: the slow, disk-bound half of `load`, which touches
        no model and so may run on a worker thread. Raises LoraError or PickleRefused."""
        path = Path(path)
        if not path.is_file():
            raise LoraError(f"LoRA {name!r}: file {path} not found")
        try:
            return read_state_dict(path, allow_pickle=allow_pickle)
        except PickleRefused:
            raise
        except ModelError as e:
            raise LoraError(f"LoRA {name!r}: {e}") from e

    def load(self, name: str, path: Path, *, allow_pickle: bool = False,
             tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Read the LoRA file at `path` (unless `tensors` holds what `read` gave) and put it into the
        model as `name`, at weight 0.

        Raises LoraError (file missing or unreadable, not a LoRA, made for another architecture) or
        PickleRefused; either way the model is left as it was.
        """
        if name in self._loras:
            raise LoraError(f"a LoRA named {name!r} is already loaded (from {self._loras[name].path.name}); "
                            "unload it first or give this one another name")
        path = Path(path)
        raw = tensors if tensors is not None else self.read(name, path, allow_pickle=allow_pickle)
        state_dict, alphas = self._to_diffusers_format(name, path, raw)
        parts = self._check_fits(name, state_dict)
        metadata = None if alphas else _adapter_metadata(path)

        self._serial += 1
        lora = _Lora(name=name, adapter=f"sdbridge_lora_{self._serial}", path=path, components=tuple(parts))
        try:
            self._inject(lora, state_dict, alphas, metadata)
        except Exception as e:  # peft and diffusers raise ValueError, RuntimeError, KeyError, TypeError...
            self._remove(lora)
            raise LoraError(f"LoRA {name!r} ({path.name}) could not be put into model {self._model.name!r}: "
                            f"{e}") from e
        self._loras[name] = lora
        self._find_layers(lora.components)
        self._activate(lora.components)
        log.info("LoRA %r loaded from %s (%s), weight 0", name, path, ", ".join(lora.components))

    def set_weights(self, weights: Mapping[str, float]) -> bool:
        """Set the weights of loaded LoRAs; those not mentioned keep theirs. Returns True when what the
        text encoders compute changed (a LoRA with text-encoder layers changed weight): prompt embeddings
        encoded before are then stale. Raises LoraError, changing nothing, for an unknown name or a weight
        that is not a finite number."""
        new: dict[str, float] = {}
        for name, weight in weights.items():
            if name not in self._loras:
                raise LoraError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(self._loras) or 'none'}")
            try:
                value = float(weight)
            except (TypeError, ValueError):
                raise LoraError(f"LoRA {name!r}: weight {weight!r} is not a number") from None
            if not math.isfinite(value):
                raise LoraError(f"LoRA {name!r}: weight {weight!r} is not a finite number")
            new[name] = value
        changed = [self._loras[n] for n, w in new.items() if self._loras[n].weight != w]
        if not changed:
            return False
        touched: set[str] = set()
        for lora in changed:
            lora.weight = new[lora.name]
            touched.update(lora.components)
        self._activate(tuple(c for c in COMPONENTS if c in touched))
        return bool(touched - {UNET})

    def unload(self, name: str) -> None:
        """Take the LoRA out of the model. A model with no LoRA left gets its original modules back.

        If it had text-encoder layers at a non-zero weight, prompts encoded before are stale: set its
        weight to 0 first (set_weights then says so) or clear the prompt cache."""
        if name not in self._loras:
            raise LoraError(f"no LoRA named {name!r} is loaded; loaded: {', '.join(self._loras) or 'none'}")
        lora = self._loras.pop(name)
        self._remove(lora)
        self._find_layers(lora.components)
        self._activate(lora.components)
        log.info("LoRA %r unloaded", name)

    # Reading and checking

    def _to_diffusers_format(self, name: str, path: Path,
                             raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The LoRA's tensors under diffusers' keys (`unet.…`, `text_encoder.…`, `text_encoder_2.…`) and
        its kohya alphas, through diffusers' own converter."""
        keys = list(raw)
        if not keys:
            raise LoraError(f"LoRA {name!r}: {path.name} holds no tensors")
        if any(marker in k for k in keys for marker in _LYCORIS_MARKERS):
            raise LoraError(f"LoRA {name!r}: {path.name} is a LyCORIS file (LoHa, LoKr, OFT or IA3); only plain "
                            "LoRA files (lora_down/lora_up or lora_A/lora_B) are supported")
        if not any("lora" in k.lower() for k in keys):
            raise LoraError(f"LoRA {name!r}: {path.name} is not a LoRA{_what_it_looks_like(keys)}")
        if not any(k.startswith(KOHYA_PREFIXES) or k.split(".", 1)[0] in COMPONENTS for k in keys):
            # diffusers' oldest format (UNet.save_attn_procs) names UNet modules with no prefix
            unet_children = {child for child, _ in self._model.unet.named_children()}
            if all(k.split(".", 1)[0] in unet_children for k in keys):
                raw = {f"{UNET}.{k}": v for k, v in raw.items()}
        mixin = StableDiffusionXLLoraLoaderMixin if self._model.xl else StableDiffusionLoraLoaderMixin
        try:
            # unet_config lets diffusers rename SDXL kohya keys (input_blocks_4_1…) to diffusers blocks
            state_dict, alphas = mixin.lora_state_dict(dict(raw), unet_config=self._model.unet.config)
        except (ValueError, KeyError, IndexError, RuntimeError) as e:
            raise LoraError(f"LoRA {name!r}: {path.name} is not a LoRA in a known format "
                            f"(kohya/A1111, diffusers or peft): {e}") from e
        if not state_dict or not all("lora" in k for k in state_dict):
            odd = next((k for k in state_dict if "lora" not in k), "")
            raise LoraError(f"LoRA {name!r}: {path.name} is not a LoRA in a known format (key {odd!r})")
        return state_dict, dict(alphas or {})

    def _check_fits(self, name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The LoRA's tensors per model component, under peft's keys; raises LoraError, before anything in
        the model is touched, if one targets a layer the model lacks or has the wrong shape."""
        by_component: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            component, _, rest = key.partition(".")
            if component not in COMPONENTS:
                raise LoraError(f"LoRA {name!r}: key {key!r} belongs to no part of a Stable Diffusion model")
            by_component.setdefault(component, {})[rest] = tensor
        parts = {c: self._peft_keys(name, c, sd) for c, sd in by_component.items()}

        problems: list[str] = []
        for component, sd in parts.items():
            module = getattr(self._model, component)
            if module is None:
                problems.append(f"{component} (this model has no second text encoder)")
                continue
            for key, down in sd.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                layer = key[: -len(".lora_A.weight")]
                up = sd.get(f"{layer}.lora_B.weight")
                try:
                    target = module.get_submodule(layer)
                except AttributeError:
                    problems.append(f"{component}.{layer} (not in this model)")
                    continue
                weight = getattr(target.get_base_layer() if isinstance(target, BaseTunerLayer) else target,
                                 "weight", None)
                if up is None:
                    problems.append(f"{component}.{layer} (lora_A without lora_B)")
                elif weight is None or weight.ndim != down.ndim or down.ndim < 2:
                    problems.append(f"{component}.{layer} (a {type(target).__name__}, which LoRA cannot change)")
                elif down.shape[1] != weight.shape[1] or up.shape[0] != weight.shape[0]:
                    problems.append(f"{component}.{layer} (the model's is {weight.shape[1]} -> {weight.shape[0]} "
                                    f"wide, the LoRA's {down.shape[1]} -> {up.shape[0]})")
        if problems:
            made_for, arch = _guess_arch(parts), self._model.arch
            if made_for is not None and made_for != arch:
                raise LoraError(f"LoRA {name!r} is for {ARCH_LABELS[made_for]}, the model is "
                                f"{ARCH_LABELS.get(arch, arch)}: use a LoRA made for the model's architecture")
            more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
            raise LoraError(f"LoRA {name!r} does not fit model {self._model.name!r} "
                            f"({ARCH_LABELS.get(arch, arch)}): {problems[0]}{more}")
        return parts

    def _peft_keys(self, name: str, component: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keys diffusers' loaders end up with for this component (the same conversions they apply),
        so that the check above sees what the injection will target."""
        try:
            if component == UNET:
                return sd if "lora_A" in next(iter(sd)) else convert_unet_state_dict_to_peft(sd)
            sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        except ValueError as e:
            raise LoraError(f"LoRA {name!r}: its {component} keys are in no known format: {e}") from e
        if not hasattr(getattr(self._model, component), "text_model"):  # transformers 5 flattened CLIP
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        return sd

    # Changing the model

    def _inject(self, lora: _Lora, state_dict: dict[str, torch.Tensor], alphas: dict[str, float],
                metadata: dict[str, Any] | None) -> None:
        mixin = StableDiffusionXLLoraLoaderMixin if self._model.xl else StableDiffusionLoraLoaderMixin
        common = dict(network_alphas=alphas or None, adapter_name=lora.adapter, low_cpu_mem_usage=True)
        with warnings.catch_warnings(), _without_adapter_load_reports():
            # peft warns that a second adapter makes "multiple adapters in the model": here that is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for component in lora.components:
                part_metadata = _component_metadata(metadata, component)
                if component == UNET:
                    mixin.load_lora_into_unet(state_dict, unet=self._model.unet, metadata=part_metadata, **common)
                else:
                    mixin.load_lora_into_text_encoder(state_dict, text_encoder=getattr(self._model, component),
                                                      prefix=component, metadata=part_metadata, **common)

    def _remove(self, lora: _Lora) -> None:
        """Delete the adapter everywhere it may be (also after a half-done injection); a component left with
        no adapter gets its original modules back, so the model is exactly as before any LoRA."""
        in_use = {c for other in self._loras.values() if other is not lora for c in other.components}
        for component in COMPONENTS:
            module = getattr(self._model, component)
            if module is None:
                continue
            with warnings.catch_warnings():
                # peft says which adapter it makes active instead of the deleted one; _activate decides that
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                if component == UNET and lora.adapter in (getattr(module, "peft_config", None) or {}):
                    module.delete_adapters(lora.adapter)
                else:
                    delete_adapter_layers(module, lora.adapter)
            if component not in in_use:
                recurse_remove_peft_layers(module)
                if hasattr(module, "peft_config"):
                    del module.peft_config
                if getattr(module, "_hf_peft_config_loaded", None):
                    module._hf_peft_config_loaded = False

    def _find_layers(self, components: tuple[str, ...]) -> None:
        for component in components:
            module = getattr(self._model, component)
            self._layers[component] = [
                (layer, frozenset(a for attr in layer.adapter_layer_names for a in getattr(layer, attr).keys()))
                for layer in module.modules() if isinstance(layer, BaseTunerLayer)]

    def _activate(self, components: tuple[str, ...]) -> None:
        """Give every LoRA layer of these components its active adapters (those at a non-zero weight, in
        load order) and their scales; a layer with none is switched off and runs its base module only."""
        live = [(lora.adapter, lora.weight) for lora in self._loras.values() if lora.weight != 0.0]
        for component in components:
            for layer, held in self._layers.get(component, ()):
                active = [(adapter, weight) for adapter, weight in live if adapter in held]
                if not active:
                    if not layer.disable_adapters:
                        layer.enable_adapters(False)
                    continue
                names = [adapter for adapter, _ in active]
                switched_off = layer.disable_adapters
                if switched_off:
                    layer.enable_adapters(True)
                if switched_off or layer.active_adapters != names:  # a fader move changes scales only
                    layer.set_adapter(names, inference_mode=True)
                for adapter, weight in active:
                    layer.set_scale(adapter, weight)


@contextmanager
def _without_adapter_load_reports() -> Iterator[None]:
    """transformers reports the weights of the text encoder's other adapters, when one more is loaded, as
    "MISSING ... newly initialized": they are not touched (the tests check), so the report would only alarm
    whoever reads the log. Real problems raise instead. Logged at debug level."""
    peft_logger = logging.getLogger("transformers.integrations.peft")

    def demote(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in str(record.msg):
            return True
        log.debug("%s", record.getMessage())
        return False

    peft_logger.addFilter(demote)
    try:
        yield
    finally:
        peft_logger.removeFilter(demote)


def _adapter_metadata(path: Path) -> dict[str, Any] | None:
    """The LoraConfig that diffusers and peft write into a .safetensors header (rank and alpha per layer
    pattern), which the keys alone do not tell; None when there is none."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return None
    try:
        _, metadata = read_safetensors_header(path)
        raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
        return json.loads(raw) if raw else None
    except (ModelError, ValueError):
        return None


def _component_metadata(metadata: dict[str, Any] | None, component: str) -> dict[str, Any] | None:
    # diffusers treats an empty per-component config as "no rank, no alpha": hand it None instead
    if metadata is None or not any(k.startswith(f"{component}.") for k in metadata):
        return None
    return metadata


def _guess_arch(parts: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The architecture a LoRA was made for, from the widths of the layers it reads; None if unsure."""
    def width(sd: dict[str, torch.Tensor], *markers: str) -> int | None:
        for key, tensor in sd.items():
            if key.endswith(".lora_A.weight") and any(m in key for m in markers) and tensor.ndim >= 2:
                return int(tensor.shape[1])
        return None

    if TEXT_ENCODER_2 in parts:
        return _ARCH_BY_TEXT_2_HIDDEN.get(width(parts[TEXT_ENCODER_2], "proj", "fc1") or 0, SDXL)
    context = width(parts.get(UNET, {}), "attn2.to_k.", "attn2.to_v.")
    if context is not None:
        return _ARCH_BY_CONTEXT.get(context)
    return _ARCH_BY_TEXT_HIDDEN.get(width(parts.get(TEXT_ENCODER, {}), "q_proj", "k_proj", "v_proj", "fc1") or 0)


def _what_it_looks_like(keys: list[str]) -> str:
    if any(k.startswith(("model.diffusion_model.", "down_blocks.", "conv_in.")) for k in keys):
        return " but a full model checkpoint (put it with the models, e.g. models/Stable-diffusion)"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        return " but a VAE (autoencoder) file"
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") for k in keys):
        return " but a textual-inversion embedding"
    return f" (its keys look like {keys[0]!r}; a LoRA's contain 'lora')"
