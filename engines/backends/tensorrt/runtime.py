"""TensorRT engines at run time, standing in for the stream's UNet and autoencoder.

`Engine` runs one deserialized engine: an execution context per optimization profile, created on first
use, whose activation memory is one buffer that every engine shares (`ActivationMemory`: the stream
runs one engine at a time on one CUDA stream, so one buffer the size of the largest need serves all);
output buffers allocated once per input shape, as torch tensors; inputs passed by address, no copy;
`execute_async_v3` on torch's current stream, so it orders with the torch work around it and records
into a CUDA graph like any kernel (the torch backend's FrameGraphs captures the whole frame, engines
included; whatever changes buffers or weights clears those graphs).

`TrtUNet` and `TrtAutoencoder` are called exactly like the modules they replace (the stream does not know
which it has). A call whose shapes no profile of the engine covers (a resolution nobody built, a prompt
longer than the profiles allow) runs the torch module instead, reported once per shape, so the show goes
on while an engine for it is built. LoRA weights stay live: `TrtUNet.weights_changed()` refits the
engine's LoRA layers from the torch UNet's base weights plus each active LoRA's weighted delta
(`lora_weights`), never a rebuild; a LoRA on layers the engine cannot refit runs the UNet on torch.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .cache import EngineCache, EngineRecord

log = logging.getLogger(__name__)


def torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    return {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool,
            trt.DataType.INT8: torch.int8, trt.DataType.UINT8: torch.uint8}[dtype]


class EngineError(RuntimeError):
    """An engine that cannot be loaded or run; the message says which and why."""


# ---------------------------------------------------------------------------------------- LoRA weights
def lora_targets(unet: torch.nn.Module) -> list[str]:
    """The torch weight names (as in the plain UNet's state_dict) of every layer a loaded LoRA wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [f"{name}.weight" for name, module in unet.named_modules() if isinstance(module, BaseTunerLayer)]


def lora_weights(unet: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The weights the UNet computes with now, for each torch weight name in `names`: the base weight
    plus the weighted delta of every LoRA active in that layer (peft's `get_delta_weight` includes the
    scale sdbridge set from the performer's weight). A name with no LoRA layer gets its base weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    out = {}
    for name in names:
        module = unet.get_submodule(name.rsplit(".", 1)[0])
        if not isinstance(module, BaseTunerLayer):
            out[name] = module.weight.detach()
            continue
        weight = module.get_base_layer().weight.detach()
        if not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
        out[name] = weight
    return out


def active_lora_layers(unet: torch.nn.Module) -> set[str]:
    """Torch weight names of the layers where a LoRA is active now."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return {f"{name}.weight" for name, module in unet.named_modules()
            if isinstance(module, BaseTunerLayer) and not module.disable_adapters
            and any(a in module.lora_A for a in module.active_adapters)}


# ---------------------------------------------------------------------------------------- engines
class ActivationMemory:
    """The scratch memory of every execution context, one buffer for all: sized before any context
    exists (a buffer that moved would invalidate every context and every captured CUDA graph)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.in_use = False  # set when the first context points at the buffer

    def reserve(self, size: int) -> None:
        """Make the buffer at least `size` bytes; every engine calls it when it is loaded."""
        if self.buffer is not None and self.buffer.numel() >= size:
            return
        if self.in_use:
            raise EngineError("an engine that needs more activation memory was loaded after others started "
                              "running; load every engine before the first frame")
        self.buffer = torch.empty(max(size, 256), dtype=torch.uint8, device=self.device)

    @property
    def size(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()


def choose_profile(profiles: Sequence[Mapping[str, Sequence[Sequence[int]]]],
                   shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The index of the profile that takes these input shapes: one whose (min, opt, max) is exactly
    them (a static profile, the fastest) before the first whose range holds them; None if none does.
    `profiles` holds, per profile, each input's (min, opt, max) as TensorRT reports them."""
    exact = inside = None
    for index, profile in enumerate(profiles):
        ranges = [(tuple(profile[name][0]), tuple(profile[name][2]), shape) for name, shape in shapes.items()]
        if exact is None and all(low == shape == high for low, high, shape in ranges):
            exact = index
        if inside is None and all(len(shape) == len(low) and all(lo <= s <= hi for lo, s, hi in zip(low, shape, high))
                                  for low, high, shape in ranges):
            inside = index
    return exact if exact is not None else inside


@dataclass
class _Binding:
    context: Any
    outputs: dict[str, torch.Tensor]


class Engine:
    """One TensorRT engine: run it with a dict of input tensors, get a dict of output tensors back
    (buffers this engine owns: the next call with the same shapes overwrites them).

    Each input shape gets an execution context of its own (on the profile that takes it), all on the
    shared activation memory: a CUDA graph captured with one context replays its shapes, and a context
    whose shapes changed for another graph would break it (NVIDIA's advice: one context per graph,
    memory shared). Engines run on a stream of their own, never on CUDA's legacy default stream (where
    TensorRT would add device-wide synchronisations), ordered after and before torch's current stream;
    inside a CUDA graph capture they run on the capturing stream itself."""

    def __init__(self, trt: Any, plan: bytes, record: EngineRecord, memory: ActivationMemory, *, name: str = ""):
        self.trt, self.record, self.memory = trt, record, memory
        self.name = name or record.key.component
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(memory.device):
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"TensorRT could not load the {self.name} engine (built for TensorRT "
                              f"{record.key.tensorrt}, compute capability {record.key.compute_capability}); "
                              "rebuild it with sdbridge build")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profiles = [{n: self.engine.get_tensor_profile_shape(n, i) for n in self.inputs}
                         for i in range(self.engine.num_optimization_profiles)]
        memory.reserve(max(self.engine.get_device_memory_size_for_profile_v2(i) for i in range(len(self.profiles))))
        self._bindings: dict[tuple, _Binding] = {}
        self.stream = torch.cuda.Stream(memory.device)  # the engine's own, off the legacy default stream

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Run after the work already on torch's current CUDA stream (and before what comes next on it);
        None if no profile takes these shapes."""
        shapes = {n: tuple(inputs[n].shape) for n in self.inputs}
        key = tuple(shapes[n] for n in self.inputs)
        binding = self._bindings.get(key)
        if binding is None:
            index = choose_profile(self.profiles, shapes)
            if index is None:
                return None
            binding = self._bindings[key] = self._bind(index, shapes)
        context = binding.context
        kept = []  # converted inputs live until the engine has read them
        for name in self.inputs:
            tensor = inputs[name]
            if tensor.dtype != self.dtypes[name] or not tensor.is_contiguous():
                tensor = tensor.to(self.dtypes[name]).contiguous()
                kept.append(tensor)
            # every call: the tensors differ from call to call (in a capture they are the graph's own)
            context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in binding.outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        current = torch.cuda.current_stream(self.memory.device)
        capturing = torch.cuda.is_current_stream_capturing()
        stream = current if capturing or current.cuda_stream != 0 else self.stream
        if stream is not current:
            stream.wait_stream(current)
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"TensorRT could not run the {self.name} engine at {shapes}")
        if stream is not current:
            current.wait_stream(stream)  # what follows on torch's stream (and reuse of `kept`) waits for it
        return binding.outputs

    def _bind(self, index: int, shapes: Mapping[str, tuple[int, ...]]) -> _Binding:
        if torch.cuda.is_current_stream_capturing():
            raise EngineError(f"the {self.name} engine met new shapes {dict(shapes)} inside a CUDA graph capture; "
                              "a frame shape must run once before it is captured")
        with torch.cuda.device(self.memory.device):
            context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            self.memory.in_use = True
            context.set_device_memory(self.memory.buffer.data_ptr(), self.memory.size)
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            for name in self.inputs:
                if not context.set_input_shape(name, shapes[name]):
                    raise EngineError(f"the {self.name} engine refused shape {shapes[name]} for {name}")
            self.stream.synchronize()
            outputs = {name: torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                         device=self.memory.device) for name in self.outputs}
        return _Binding(context, outputs)


class LoraRefit:
    """Live LoRA weights for a UNet engine: the engine's refittable weights set from the torch UNet.

    A new Refitter per refit (as NVIDIA's diffusion demo does): a Refitter keeps pointers to every weight
    it was given, and those tensors are gone after the refit. Weights TensorRT combined with a changed one
    come back as missing and are supplied too: from the torch UNet when the refit map knows them, else
    from the ONNX graph's own (base) values."""

    def __init__(self, engine: Engine, refit_map: Mapping[str, tuple[str, bool]], onnx_path: Any = None):
        self.engine = engine
        refittable = set(engine.record.refittable)
        self.by_torch = {torch_name: (onnx_name, transposed) for onnx_name, (torch_name, transposed)
                         in refit_map.items() if onnx_name in refittable}
        self.by_onnx = {onnx_name: (torch_name, transposed) for onnx_name, (torch_name, transposed)
                        in refit_map.items()}
        self.onnx_path = onnx_path
        self._graph_weights: dict[str, Any] | None = None  # the ONNX graph's initializers, read when first needed
        self.changed: set[str] = set()  # torch names refit away from their base weights
        self.last_s = 0.0

    def cannot_refit(self, layers: set[str]) -> list[str]:
        return sorted(name for name in layers if name not in self.by_torch)

    def apply(self, unet: torch.nn.Module) -> None:
        """Set every layer a LoRA is active in, and every layer one was active in at the last refit,
        to what the torch UNet computes with now; then refit. Raises EngineError if TensorRT refuses,
        and the engine must not serve then (a failed refit may have changed some weights)."""
        started = time.perf_counter()
        active = active_lora_layers(unet)
        names = sorted((active | self.changed) & set(self.by_torch))
        if not names:
            return
        trt = self.engine.trt
        refitter = trt.Refitter(self.engine.engine, self.engine.logger)
        kept: list[torch.Tensor] = []  # alive until the refit has read them

        def give(onnx_name: str, weight: torch.Tensor) -> None:
            prototype = refitter.get_weights_prototype(onnx_name)
            weight = weight.to(device=self.engine.memory.device, dtype=torch_dtype(trt, prototype.dtype)).contiguous()
            if weight.numel() != prototype.size:
                raise EngineError(f"refit of {onnx_name}: {weight.numel()} values, the engine has {prototype.size}")
            kept.append(weight)
            if not refitter.set_named_weights(onnx_name, trt.Weights(prototype.dtype, weight.data_ptr(), weight.numel()),
                                              trt.TensorLocation.DEVICE):
                raise EngineError(f"TensorRT refused the refit weights of {onnx_name}")

        for onnx_name, weight in refit_tensors(lora_weights(unet, names), self.by_torch).items():
            give(onnx_name, weight)
        for onnx_name in refitter.get_missing_weights():  # partners TensorRT combined with a changed weight
            give(onnx_name, self._base_weight(unet, onnx_name))
        stream = self.engine.stream
        stream.wait_stream(torch.cuda.current_stream(self.engine.memory.device))
        with torch.cuda.device(self.engine.memory.device):
            ok = refitter.refit_cuda_engine_async(stream.cuda_stream)
        stream.synchronize()
        if not ok:
            raise EngineError("TensorRT could not refit the UNet engine")
        self.changed = active
        self.last_s = time.perf_counter() - started

    def _base_weight(self, unet: torch.nn.Module, onnx_name: str) -> torch.Tensor:
        known = self.by_onnx.get(onnx_name)
        if known is not None:
            torch_name, transposed = known
            weight = lora_weights(unet, [torch_name])[torch_name]
            return weight.t() if transposed else weight
        if self.onnx_path is None:
            raise EngineError(f"the refit needs weight {onnx_name}, which no torch weight matches")
        if self._graph_weights is None:  # read once: a graph's base values never change
            import onnx
            self._graph_weights = {initializer.name: initializer
                                   for initializer in onnx.load(str(self.onnx_path)).graph.initializer}
        initializer = self._graph_weights.get(onnx_name)
        if initializer is None:
            raise EngineError(f"the refit needs weight {onnx_name}, which the ONNX graph does not have")
        from onnx import numpy_helper
        return torch.from_numpy(numpy_helper.to_array(initializer, base_dir=str(self.onnx_path.parent)).copy())


def refit_tensors(weights: Mapping[str, torch.Tensor], by_torch: Mapping[str, tuple[str, bool]]
                  ) -> dict[str, torch.Tensor]:
    """Torch weights by torch name to the tensors a refit sets, by ONNX (= TensorRT) weight name,
    transposed where the export transposed them."""
    out = {}
    for name, weight in weights.items():
        onnx_name, transposed = by_torch[name]
        out[onnx_name] = weight.t() if transposed else weight
    return out


# ---------------------------------------------------------------------------------------- stand-ins
@dataclass
class _UNetOutput:
    sample: torch.Tensor


def _denoiser_inputs(sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     added_cond_kwargs: dict | None) -> dict[str, torch.Tensor]:
    """The inputs a UNet and a ControlNet engine both take (export._denoiser_inputs), from a diffusers
    call: the timestep as float32, one per batch entry, and SDXL's pooled text and size numbers."""
    inputs = {"sample": sample, "timestep": timestep.float().reshape(-1).expand(sample.shape[0]),
              "encoder_hidden_states": encoder_hidden_states}
    if added_cond_kwargs is not None:
        inputs.update(text_embeds=added_cond_kwargs["text_embeds"], time_ids=added_cond_kwargs["time_ids"])
    return inputs


def _down_residual_names(names: Iterable[str]) -> list[str]:
    """The down-block residuals among tensor names, in block order (down_block_res_0, 1, ... 10, 11)."""
    return sorted((n for n in names if n.startswith("down_block_res_")), key=lambda n: int(n.rsplit("_", 1)[1]))


class TrtUNet:
    """Called like a diffusers UNet2DConditionModel (the calls engines.stream makes), run by an engine."""

    def __init__(self, engine: Engine, fallback: torch.nn.Module, refit: LoraRefit | None = None,
                 on_missing: Callable[[str], None] | None = None):
        self.engine, self.fallback, self.refit = engine, fallback, refit
        self.on_missing = on_missing or (lambda what: None)
        self.torch_reason: str | None = None  # set: the engine cannot do what the UNet must now
        self._reported: set[tuple] = set()
        self._zeros: dict[tuple, torch.Tensor] = {}
        self.controlnet_inputs = "mid_block_res" in engine.inputs

    @property
    def config(self) -> Any:
        return self.fallback.config

    def weights_changed(self) -> None:
        """A LoRA was loaded, unloaded or changed weight in the torch UNet: refit the engine to match, or
        say why the UNet runs on torch until an engine that can is built."""
        layers = active_lora_layers(self.fallback)
        missing = self.refit.cannot_refit(layers) if self.refit is not None else sorted(layers)
        if missing:
            reason = (f"the LoRAs in use change {len(missing)} layers this UNet engine was not built to refit "
                      f"(such as {missing[0]})")
            if reason != self.torch_reason:
                log.warning("UNet runs on torch: %s; `sdbridge build` with these LoRAs makes an engine that can",
                            reason)
                self.on_missing(reason)
            self.torch_reason = reason
            return
        if self.refit is not None:
            try:
                self.refit.apply(self.fallback)
            except Exception as e:  # a half-done refit must not serve
                self.torch_reason = f"the LoRA refit failed ({e})"
                log.error("UNet runs on torch: %s", self.torch_reason)
                self.on_missing(self.torch_reason)
                return
            log.info("LoRA weights refit into the UNet engine in %.1f ms", self.refit.last_s * 1000)
        self.torch_reason = None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None, down_block_additional_residuals: Sequence | None = None,
                 mid_block_additional_residual: torch.Tensor | None = None, **kwargs: Any) -> Any:
        residuals = down_block_additional_residuals is not None or mid_block_additional_residual is not None
        if residuals and not self.controlnet_inputs:
            # an engine without ControlNet inputs would drop them: that call runs on torch
            self._report_once(("controlnet",), "ControlNet residuals (this UNet engine was built without "
                                               "ControlNet inputs)")
        elif self.torch_reason is None:
            inputs = _denoiser_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
            if self.controlnet_inputs:
                inputs.update(self._residuals(sample, down_block_additional_residuals, mid_block_additional_residual))
            try:
                out = self.engine.run(inputs)
            except EngineError as e:  # torch serves from now on; the show goes on
                self.torch_reason = str(e)
                log.error("UNet runs on torch: %s", e)
                self.on_missing(f"the UNet engine failed ({e})")
                out = None
            else:
                if out is None:
                    self._report(inputs)
            if out is not None:
                return _UNetOutput(out["latent"].clone())  # the buffer is the engine's: the next call reuses it
        return self.fallback(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                             down_block_additional_residuals=down_block_additional_residuals,
                             mid_block_additional_residual=mid_block_additional_residual, **kwargs)

    def _residuals(self, sample: torch.Tensor, down: Sequence | None, mid: torch.Tensor | None) -> dict:
        names = _down_residual_names(self.engine.inputs)
        if down is not None:
            return {**dict(zip(names, down)), "mid_block_res": mid}
        from .export import residual_shapes
        shapes = residual_shapes(self.fallback.config, sample.shape[0], sample.shape[2], sample.shape[3])
        out = {}
        for name, shape in zip([*names, "mid_block_res"], [*shapes[0], shapes[1]]):
            zeros = self._zeros.get(shape)
            if zeros is None:
                zeros = self._zeros[shape] = torch.zeros(shape, dtype=sample.dtype, device=sample.device)
            out[name] = zeros
        return out

    def _report(self, inputs: Mapping[str, torch.Tensor]) -> None:
        self._report_once(tuple(tuple(t.shape) for t in inputs.values()),
                          f"UNet at latent {tuple(inputs['sample'].shape)}, prompt "
                          f"{inputs['encoder_hidden_states'].shape[1]} tokens")

    def _report_once(self, key: tuple, what: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("no UNet engine takes the %s: it runs on torch", what)
            self.on_missing(what)


class TrtAutoencoder:
    """An engines.autoencoder.Autoencoder whose encode and decode run as engines (torch for a shape no
    profile takes); everything else is the torch autoencoder's."""

    def __init__(self, encoder: Engine | None, decoder: Engine | None, fallback: Any,
                 on_missing: Callable[[str], None] | None = None):
        self.encoder, self.decoder, self.fallback = encoder, decoder, fallback
        self.on_missing = on_missing or (lambda what: None)
        self._reported: set[tuple] = set()

    def __getattr__(self, name: str) -> Any:  # scaling_factor, latent_channels, spatial_factor, module, name...
        return getattr(self.fallback, name)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        out = self._run("encoder", {"images": image})
        if out is None:
            return self.fallback.encode(image)
        return out["latents"].to(image.dtype, copy=True)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self._run("decoder", {"latents": latents})
        if out is None:
            return self.fallback.decode(latents)
        return out["images"].to(latents.dtype, copy=True)

    def _run(self, part: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        engine = getattr(self, part)
        if engine is None:
            return None
        tensor = next(iter(inputs.values()))
        try:
            out = engine.run(inputs)
        except EngineError as e:  # torch serves this part from now on
            setattr(self, part, None)
            log.error("the autoencoder %s runs on torch: %s", part, e)
            self.on_missing(f"the autoencoder {part} engine failed ({e})")
            return None
        if out is None:
            self._report(part, tensor)
        return out

    def _report(self, part: str, tensor: torch.Tensor) -> None:
        key = (part, tuple(tensor.shape))
        if key not in self._reported:
            self._reported.add(key)
            what = f"autoencoder {part} at {tuple(tensor.shape)}"
            log.warning("no engine profile takes the %s: it runs on torch", what)
            self.on_missing(what)


class TrtControlNet:
    """Called like a diffusers ControlNetModel (the call engines.stream makes), run by an engine; torch
    runs a shape no profile takes, and everything from the first engine failure on."""

    def __init__(self, engine: Engine, fallback: torch.nn.Module, on_missing: Callable[[str], None] | None = None):
        self.engine: Engine | None = engine
        self.fallback = fallback
        self.on_missing = on_missing or (lambda what: None)
        self._scales: dict[float, torch.Tensor] = {}
        self._reported: set[tuple] = set()

    @property
    def config(self) -> Any:
        return self.fallback.config

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0, added_cond_kwargs: dict | None = None,
                 return_dict: bool = False, **kwargs: Any) -> Any:
        if self.engine is not None:
            inputs = _denoiser_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
            inputs.update(controlnet_cond=controlnet_cond,
                          conditioning_scale=self._scale(float(conditioning_scale), sample.device))
            try:
                out = self.engine.run(inputs)
            except EngineError as e:  # torch serves from now on; the show goes on
                self.engine, out = None, None
                log.error("a ControlNet runs on torch: %s", e)
                self.on_missing(f"the ControlNet engine failed ({e})")
            else:
                if out is None:
                    self._report_once(tuple(sample.shape), f"ControlNet at latent {tuple(sample.shape)}, prompt "
                                                           f"{encoder_hidden_states.shape[1]} tokens")
            if out is not None:
                # The engine's buffers, overwritten by its next call: the stream scales them into new
                # tensors at once, before it calls this ControlNet again.
                return [out[n] for n in _down_residual_names(out)], out["mid_block_res"]
        return self.fallback(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                             added_cond_kwargs=added_cond_kwargs, return_dict=False, **kwargs)

    def _scale(self, value: float, device: torch.device) -> torch.Tensor:
        # made once per value, outside any CUDA graph capture: the stream always passes 1.0 and scales the
        # residuals itself with live device tensors
        scale = self._scales.get(value)
        if scale is None:
            scale = self._scales[value] = torch.full((1,), value, dtype=torch.float32, device=device)
        return scale

    def _report_once(self, key: tuple, what: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("no ControlNet engine profile takes the %s: it runs on torch", what)
            self.on_missing(what)


# ---------------------------------------------------------------------------------------- attach
@dataclass
class Loaded:
    """A stream's engines, read and deserialized (the slow part, done on any thread)."""

    engines: dict[str, Engine]  # by component, ControlNets apart
    memory: ActivationMemory
    refit_map: dict[str, tuple[str, bool]]
    onnx_path: Any
    records: list[EngineRecord]
    controlnets: dict[str, Engine] = field(default_factory=dict)  # by the weights fingerprint of each ControlNet


def load(cache: EngineCache, records: Sequence[EngineRecord], device: torch.device) -> Loaded:
    """Read and deserialize the engines of `records` from `cache` onto `device`, with one activation
    memory for all. Slow (gigabytes from disk): call it off the render thread."""
    from . import load as load_tensorrt
    from .export import CONTROLNET, UNET

    trt = load_tensorrt()
    memory = ActivationMemory(device)
    engines, controlnets = {}, {}
    for record in records:
        engine = Engine(trt, cache.plan(record.key).read_bytes(), record, memory)
        if record.key.component == CONTROLNET:
            controlnets[record.key.weights] = engine
        else:
            engines[record.key.component] = engine
    unet = engines[UNET].record if UNET in engines else None
    refit_map = {}
    if unet is not None and unet.refittable:
        refit_map = {k: tuple(v) for k, v in json.loads(cache.refit_map(unet.key).read_text()).items()}
    return Loaded(engines, memory, refit_map, cache.cleaned(unet.key) if unet is not None else None, list(records),
                  controlnets)


@dataclass
class Attached:
    """What `attach` put into a stream (never the stream itself: the daemon keeps this per stream, in a
    table that must not keep an old stream alive)."""

    unet: TrtUNet
    autoencoder: TrtAutoencoder
    loaded: Loaded


def attach(stream: Any, loaded: Loaded, *, on_missing: Callable[[str], None] | None = None) -> Attached:
    """Make `stream` (engines.stream.Stream) run `loaded`'s engines: its UNet call and its autoencoder
    become TrtUNet and TrtAutoencoder around the torch ones, and the engine takes the LoRA weights in use.
    Between frames, on the render thread (it clears the stream's CUDA graphs); `detach` undoes it, and so
    does a failure here."""
    from .cache import weights_fingerprint
    from .export import UNET

    engines = loaded.engines
    if weights_fingerprint(stream.model.unet) != engines[UNET].record.key.weights:
        raise EngineError(f"the UNet engine was built from other weights than {stream.model.name}'s "
                          f"({engines[UNET].record.model})")
    refit = LoraRefit(engines[UNET], loaded.refit_map, loaded.onnx_path) if loaded.refit_map else None
    unet = TrtUNet(engines[UNET], stream.model.unet, refit, on_missing)
    on_engines = autoencoder(loaded, stream.model.autoencoder, on_missing=on_missing)
    controlnets = [_controlnet_on(loaded, k, module, on_missing) for k, module in enumerate(stream.controlnets)]
    stream.set_modules(unet=unet, autoencoder=on_engines, controlnets=controlnets)
    try:
        if stream.loras is not None:
            unet.weights_changed()
    except Exception:
        detach(stream)
        raise
    log.info("TensorRT engines attached: %s; shared activation memory %.0f MB",
             ", ".join([*engines, *(f"controlnet {k}" for k, c in enumerate(controlnets) if isinstance(c, TrtControlNet))]),
             loaded.memory.size / 2**20)
    return Attached(unet, on_engines, loaded)


def autoencoder(loaded: Loaded, fallback: Any, *, on_missing: Callable[[str], None] | None = None
                ) -> TrtAutoencoder:
    """A TrtAutoencoder on `loaded`'s encoder and decoder engines around the torch autoencoder `fallback`
    (or the one behind a TrtAutoencoder): the stream's at attach, or a /vae switch's. Only engines built
    from this very autoencoder's weights are used: after a /vae switch the engines of a build started
    before it may be of the old one, and those would show the wrong pictures."""
    from .cache import weights_fingerprint
    from .export import VAE_DECODER, VAE_ENCODER

    fallback = torch_module(fallback)
    fingerprint = weights_fingerprint(fallback.module)
    parts = {}
    for part in (VAE_ENCODER, VAE_DECODER):
        engine = loaded.engines.get(part)
        if engine is not None and engine.record.key.weights != fingerprint:
            log.warning("the %s engine is of another autoencoder than %s; that part runs on torch", part, fallback.name)
            if on_missing is not None:
                on_missing(f"the autoencoder {part} (its engine is of another autoencoder)")
            engine = None
        parts[part] = engine
    return TrtAutoencoder(parts[VAE_ENCODER], parts[VAE_DECODER], fallback, on_missing)


def _controlnet_on(loaded: Loaded, k: int, module: Any, on_missing: Callable[[str], None] | None) -> Any:
    """ControlNet k on its engine if one was built from its very weights; else the torch module."""
    from .cache import weights_fingerprint

    module = torch_module(module)
    if module is None:
        return None
    engine = loaded.controlnets.get(weights_fingerprint(module))
    if engine is None:
        log.warning("no engine was built for ControlNet %d: it runs on torch", k)
        if on_missing is not None:
            on_missing(f"ControlNet {k} (no engine of its weights)")
        return module
    return TrtControlNet(engine, module, on_missing)


def torch_module(module: Any) -> Any:
    """The torch module behind a stand-in (TrtUNet, TrtAutoencoder, TrtControlNet), or `module` itself."""
    return module.fallback if isinstance(module, (TrtUNet, TrtAutoencoder, TrtControlNet)) else module


def detach(stream: Any) -> None:
    """Give the stream its torch UNet, autoencoder and ControlNets back (between frames, on the render thread)."""
    stream.set_modules(unet=stream.model.unet, autoencoder=torch_module(stream.model.autoencoder),
                       controlnets=[torch_module(c) for c in stream.controlnets])
