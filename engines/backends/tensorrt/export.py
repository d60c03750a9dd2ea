"""Models to ONNX: what each engine's graph is (its inputs, outputs and their shapes), the export itself,
the clean-up TensorRT wants, and which ONNX weights are which torch weights (for refitting LoRAs).

One `Component` per engine: the UNet (with the ControlNet residuals as extra inputs when ControlNets are
in use), the autoencoder's encoder and decoder (full VAE or TAESD: the same four names cover both, the
cache key tells them apart by their weights) and a ControlNet. Each is a small `torch.nn.Module` around
the diffusers model whose forward takes and returns plain tensors, in the order of `inputs` and
`outputs`. The ONNX graph keeps batch, resolution and prompt length dynamic; a TensorRT optimization
profile then fixes them (engines/backends/tensorrt/build.py), so one ONNX file serves every resolution.

Conventions every runtime relies on (engines/backends/tensorrt/runtime.py):
- the timestep is float32 (B,); images are (B, 3, H, W) in [-1, 1]; latents are already multiplied by the
  autoencoder's scaling factor (the graph does it), exactly as engines.autoencoder.Autoencoder gives them;
- every other tensor is in the component's precision: float16 for engines, float32 for the SDXL VAE
  (which overflows in float16) and for CPU tests;
- attention is exported as plain MatMul / Softmax (the exporter decomposes PyTorch's SDPA at these opsets),
  which TensorRT fuses back into its own attention kernels.

It knows nothing of TensorRT, files in the cache or the stream.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger(__name__)

OPSET = 17  # TensorRT 10 parses opsets 9 to 20; 17 is the first with LayerNormalization
UNET, VAE_ENCODER, VAE_DECODER, CONTROLNET = "unet", "vae_encoder", "vae_decoder", "controlnet"


@dataclass(frozen=True)
class Profile:
    """One shape an engine runs at: UNet batch, image size and prompt length in tokens (77 per chunk)."""

    batch: int
    height: int
    width: int
    tokens: int = 77

    def __str__(self) -> str:
        return f"{self.width}x{self.height} batch {self.batch} tokens {self.tokens}"


@dataclass
class Component:
    """One engine's graph: the module to export and the names, shapes and dtypes of its tensors."""

    name: str
    module: torch.nn.Module  # forward(*inputs) -> output or tuple of outputs, plain tensors
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: Callable[[Profile], dict[str, tuple[int, ...]]]  # every input's and output's shape at a profile
    dynamic_axes: dict[str, dict[int, str]]
    dtype: torch.dtype
    float32_inputs: frozenset[str] = field(default_factory=frozenset)  # inputs that stay float32 (timestep)

    def input_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name in self.float32_inputs else self.dtype

    def sample_inputs(self, profile: Profile, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Inputs of the right shapes and dtypes at `profile`, for tracing and for tests."""
        shapes = self.shapes(profile)
        generator = torch.Generator().manual_seed(seed)
        out = []
        for name in self.inputs:
            if name == "timestep":
                value = torch.full(shapes[name], 500.0)
            elif name == "conditioning_scale":
                value = torch.ones(shapes[name])
            else:
                value = torch.randn(shapes[name], generator=generator)
            out.append(value.to(device=device, dtype=self.input_dtype(name)))
        return tuple(out)


# ---------------------------------------------------------------------------------------- the UNet
def residual_shapes(unet_config: Any, batch: int, latent_height: int, latent_width: int
                    ) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """The shapes of the down-block and mid-block residuals a ControlNet adds to this UNet, from its
    config: conv_in's output, then each down block's resnets and its downsampler (all but the last)."""
    channels = list(unet_config.block_out_channels)
    per_block = unet_config.layers_per_block
    per_block = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * len(channels)
    h, w = latent_height, latent_width
    down = [(batch, channels[0], h, w)]
    for i, ch in enumerate(channels):
        down += [(batch, ch, h, w)] * per_block[i]
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            down.append((batch, ch, h, w))
    return down, (batch, channels[-1], h, w)


def residual_names(config: Any) -> tuple[str, ...]:
    """The tensor names of the ControlNet residuals for this UNet (or ControlNet) config, in the order
    of residual_shapes: down_block_res_0 .. n, then mid_block_res."""
    count = len(residual_shapes(config, 1, 8, 8)[0])
    return (*(f"down_block_res_{i}" for i in range(count)), "mid_block_res")


def _residual_axes(names: Sequence[str]) -> dict[str, dict[int, str]]:
    """Dynamic axes of residual tensors: the batch, and a height and width of each one's own."""
    return {name: {0: "batch", 2: f"{name}_height", 3: f"{name}_width"} for name in names}


def _denoiser_inputs(config: Any, latent_factor: int
                     ) -> tuple[bool, tuple[str, ...], Callable[[Profile], dict[str, tuple[int, ...]]], dict]:
    """What a UNet and a ControlNet both take: latents, timestep, text, and SDXL's pooled text and size
    numbers. Returns whether it is SDXL-style, the input names, their shapes at a profile, their axes."""
    xl = getattr(config, "addition_embed_type", None) == "text_time"
    names = ("sample", "timestep", "encoder_hidden_states") + (("text_embeds", "time_ids") if xl else ())
    pooled = int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim) if xl else 0

    def shapes(p: Profile) -> dict[str, tuple[int, ...]]:
        h, w = p.height // latent_factor, p.width // latent_factor
        out = {"sample": (p.batch, int(config.in_channels), h, w), "timestep": (p.batch,),
               "encoder_hidden_states": (p.batch, p.tokens, int(config.cross_attention_dim))}
        if xl:
            out.update(text_embeds=(p.batch, pooled), time_ids=(p.batch, 6))
        return out

    axes: dict[str, dict[int, str]] = {
        "sample": {0: "batch", 2: "latent_height", 3: "latent_width"}, "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "tokens"}}
    if xl:
        axes.update(text_embeds={0: "batch"}, time_ids={0: "batch"})
    return xl, names, shapes, axes


class _UNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, xl: bool, residuals: int):
        super().__init__()
        self.unet, self.xl, self.residuals = unet, xl, residuals

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.xl:
            text_embeds, time_ids, *rest = rest
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
        down = mid = None
        if self.residuals:
            down, mid = list(rest[:-1]), rest[-1]
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]


def unet_component(unet: torch.nn.Module, *, controlnet_inputs: bool = False, latent_factor: int = 8) -> Component:
    """The UNet. With `controlnet_inputs` it takes the ControlNet residuals (`down_block_res_0..n`,
    `mid_block_res`) as inputs: their sum over the active ControlNets, zeros when none is on."""
    config = unet.config
    xl, inputs, base_shapes, axes = _denoiser_inputs(config, latent_factor)
    residuals = residual_names(config) if controlnet_inputs else ()
    inputs += residuals

    def shapes(p: Profile) -> dict[str, tuple[int, ...]]:
        out = base_shapes(p)
        batch, _, h, w = out["sample"]
        out["latent"] = (batch, int(config.out_channels), h, w)
        if residuals:
            down, mid = residual_shapes(config, batch, h, w)
            out.update(zip(residuals, (*down, mid)))
        return out

    axes["latent"] = axes["sample"]
    axes.update(_residual_axes(residuals))
    return Component(UNET, _UNet(unet, xl, len(residuals)), inputs, ("latent",), shapes, axes, unet.dtype,
                     frozenset({"timestep"}))


# ---------------------------------------------------------------------------------------- ControlNet
class _ControlNet(torch.nn.Module):
    def __init__(self, controlnet: torch.nn.Module, xl: bool):
        super().__init__()
        self.controlnet, self.xl = controlnet, xl

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *rest):
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.xl else None
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
        # the scale as a tensor input, so that it stays a live parameter of one engine
        return (*(d * conditioning_scale for d in down), mid * conditioning_scale)


def controlnet_component(controlnet: torch.nn.Module, *, latent_factor: int = 8) -> Component:
    """A ControlNet: latents, timestep, text and the control image (B, 3, H, W) in [0, 1] in; the UNet's
    residual inputs (scaled by the `conditioning_scale` input, shape (1,)) out."""
    config = controlnet.config
    xl, inputs, base_shapes, axes = _denoiser_inputs(config, latent_factor)
    outputs = residual_names(config)
    inputs = (*inputs[:3], "controlnet_cond", "conditioning_scale", *inputs[3:])

    def shapes(p: Profile) -> dict[str, tuple[int, ...]]:
        out = base_shapes(p)
        batch, _, h, w = out["sample"]
        down, mid = residual_shapes(config, batch, h, w)
        out.update(controlnet_cond=(batch, 3, p.height, p.width), conditioning_scale=(1,))
        out.update(zip(outputs, (*down, mid)))
        return out

    axes["controlnet_cond"] = {0: "batch", 2: "height", 3: "width"}
    axes.update(_residual_axes(outputs))
    return Component(CONTROLNET, _ControlNet(controlnet, xl), inputs, outputs, shapes, axes, controlnet.dtype,
                     frozenset({"timestep", "conditioning_scale"}))


# ---------------------------------------------------------------------------------------- autoencoder
class _Encoder(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, tiny: bool, scaling: float):
        super().__init__()
        self.module, self.tiny, self.scaling = module, tiny, scaling

    def forward(self, images):
        if self.tiny:
            latents = self.module.encode(images, return_dict=False)[0]
        else:  # the mean, as engines.autoencoder does: the same frame gives the same latent
            latents = self.module.encode(images).latent_dist.mean
        return latents * self.scaling


class _Decoder(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, scaling: float):
        super().__init__()
        self.module, self.scaling = module, scaling

    def forward(self, latents):
        return self.module.decode(latents / self.scaling, return_dict=False)[0]


def autoencoder_components(autoencoder: Any) -> tuple[Component, Component]:
    """The encoder (images to scaled latents) and decoder (scaled latents to images) of an
    engines.autoencoder.Autoencoder, TAESD or full VAE alike."""
    module, factor, channels = autoencoder.module, autoencoder.spatial_factor, autoencoder.latent_channels
    dtype = torch.float32 if autoencoder.upcast else module.dtype

    def shapes(p: Profile) -> dict[str, tuple[int, ...]]:
        return {"images": (p.batch, 3, p.height, p.width),
                "latents": (p.batch, channels, p.height // factor, p.width // factor)}

    image_axes = {0: "batch", 2: "height", 3: "width"}
    latent_axes = {0: "batch", 2: "latent_height", 3: "latent_width"}
    axes = {"images": image_axes, "latents": latent_axes}
    encoder = Component(VAE_ENCODER, _Encoder(module, autoencoder.tiny, autoencoder.scaling_factor), ("images",),
                        ("latents",), shapes, axes, dtype)
    decoder = Component(VAE_DECODER, _Decoder(module, autoencoder.scaling_factor), ("latents",), ("images",),
                        shapes, axes, dtype)
    return encoder, decoder


# ---------------------------------------------------------------------------------------- export
def export(component: Component, path: Path, profile: Profile, *, opset: int = OPSET) -> None:
    """Trace `component` at `profile` and write its ONNX graph to `path` (weights over 2 GB go to files
    beside it, as ONNX requires). Batch, resolution and prompt length stay dynamic in the graph."""
    module = component.module.eval()
    if component.dtype == torch.float32 and _parameter_dtype(module) != torch.float32:
        module = _float32_copy(module)
    device = next(module.parameters()).device
    args = component.sample_inputs(profile, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter (NVIDIA's diffusion demo uses it too) is deprecated in favour of the
        # torch.export one, which still fails on parts of diffusers' UNet; and tracing warns about every
        # Python branch on a shape, which is what fixes those branches for the profile's shapes.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # TAESD/VAE slices, folded later
        torch.onnx.export(module, args, str(path), input_names=list(component.inputs),
                          output_names=list(component.outputs), dynamic_axes=component.dynamic_axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def _parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _float32_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy
    return copy.deepcopy(module).float()


def clean(source: Path, target: Path) -> list[str]:
    """The graph TensorRT parses best: constants folded, dead nodes removed, sorted, shapes inferred.
    Uses polygraphy and onnx-graphsurgeon where installed (the `tensorrt` extra); without them the graph
    is only shape-inferred. Returns what was done, for the log."""
    import onnx

    model = onnx.load(str(source))
    done = []
    try:
        import onnx_graphsurgeon as gs
        from polygraphy.backend.onnx import fold_constants
    except ImportError:
        gs = None
    if gs is not None:
        from polygraphy.logger import G_LOGGER
        G_LOGGER.module_severity = G_LOGGER.WARNING  # not a line per folding pass
        _quiet_onnxruntime()  # polygraphy folds constants with it, which warns about every node it keeps
        graph = gs.import_onnx(model)
        graph.cleanup().toposort()
        model = gs.export_onnx(graph)
        model = fold_constants(model, allow_onnxruntime_shape_inference=False, error_ok=True)
        graph = gs.import_onnx(model)
        graph.cleanup().toposort()
        model = gs.export_onnx(graph)
        done.append("constants folded, unused nodes removed (onnx-graphsurgeon, polygraphy)")
    large = _has_external_data(model) or model.ByteSize() > _PROTOBUF_LIMIT
    if not large:
        model = onnx.shape_inference.infer_shapes(model)
        done.append("shapes inferred")
    save(model, target)
    return done


def _quiet_onnxruntime() -> None:
    try:
        import onnxruntime
    except ImportError:
        return
    onnxruntime.set_default_logger_severity(3)  # errors only


_PROTOBUF_LIMIT = 2_000_000_000  # ONNX files are protobufs, which stop at 2 GB; larger weights go beside them


def _has_external_data(model: Any) -> bool:
    from onnx.external_data_helper import uses_external_data
    return any(uses_external_data(t) for t in model.graph.initializer)


def save(model: Any, path: Path) -> None:
    """Write an ONNX model, its weights in one file beside it when they pass protobuf's 2 GB limit."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    path.parent.mkdir(parents=True, exist_ok=True)
    if _has_external_data(model):
        load_external_data_for_model(model, str(path.parent))
    big = sum(len(t.raw_data) for t in model.graph.initializer) > _PROTOBUF_LIMIT // 2
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".weights" if big else None)


# ---------------------------------------------------------------------------------------- refit names
def refit_names(module: torch.nn.Module, onnx_path: Path, wanted: Callable[[str], bool] = lambda name: True
                ) -> dict[str, tuple[str, bool]]:
    """Which ONNX initializer holds which torch weight: {onnx name: (torch name, transposed)}.

    The exporter renames what it transforms: a Linear's weight becomes a transposed MatMul constant named
    like `onnx::MatMul_1598`, so names cannot be trusted and the weights are matched by content, as
    themselves or transposed. Only weights of two or more dimensions whose torch name passes `wanted`
    are matched (LoRA changes Linear and Conv weights only); a weight whose content appears twice is
    left out, since a refit could not tell the two apart. Torch names are those of `module` itself.
    """
    import onnx
    from onnx import numpy_helper

    by_content: dict[bytes, tuple[str, bool] | None] = {}
    for name, tensor in module.state_dict().items():
        if tensor.dim() < 2 or not wanted(name):
            continue
        data = tensor.detach().to("cpu")
        for content, transposed in ((data, False), (data.t(), True)) if data.dim() == 2 else ((data, False),):
            content = content.contiguous()
            digest = _digest(content.view(torch.uint8).numpy().tobytes(), tuple(content.shape))
            by_content[digest] = None if digest in by_content else (name, transposed)
    found: dict[str, tuple[str, bool]] = {}
    model = onnx.load(str(onnx_path))
    for initializer in model.graph.initializer:
        if len(initializer.dims) < 2:
            continue
        array = numpy_helper.to_array(initializer, base_dir=str(onnx_path.parent))
        match = by_content.get(_digest(array.tobytes(), tuple(array.shape)))
        if match is not None:
            found[initializer.name] = match
    return found


def _digest(data: bytes, shape: tuple[int, ...]) -> bytes:
    return hashlib.blake2b(data + repr(shape).encode(), digest_size=16).digest()
