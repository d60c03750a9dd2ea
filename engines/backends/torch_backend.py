"""The torch fast path: memory layout, attention, torch.compile and CUDA graphs for a stream.

`accelerate(stream, options)` prepares a loaded stream's modules and installs `FrameGraphs` as the way
its per-frame call runs. Precision is chosen where the model is loaded (float16 on CUDA by default);
attention is PyTorch's scaled_dot_product_attention, which diffusers uses by default on torch 2 (flash
or memory-efficient kernels on CUDA), and `accelerate` makes sure no other processor is installed.

CUDA graphs. A graph records the kernels of one call once and replays them with a single launch: the
CPU cost of launching thousands of small kernels per frame, and any host work between them, is gone.
A graph reads fixed addresses, so each input is copied into a static buffer before every replay, and
its outputs are static buffers that the next replay overwrites (the caller consumes them first). The
function must be pure in its inputs (Stream._frame is): anything read from elsewhere is frozen at
capture. A frame shape runs eagerly the first time and is captured the second time in a row. After
a `clear()` (a LoRA loaded or its weight moved: peft's LoRA scales are Python numbers that a graph
freezes) the shape must hold for SETTLE_FRAMES frames first, so that a fader in motion runs eagerly
instead of paying for a capture at every value it passes. Only one capture runs at a time in the
process (CUDA allows one), whichever thread asks: the render thread, or a worker warming up a model.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)

AUTO = "auto"
SETTLE_FRAMES = 10  # after clear(): frames a shape must hold before it is captured
_CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture at a time in the process


@dataclass(frozen=True)
class TorchOptions:
    """Which fast-path techniques a stream uses; `resolve` turns "auto" into a choice for the device."""

    cuda_graph: bool = False
    compile: bool = False
    channels_last: bool = False

    @classmethod
    def resolve(cls, device: torch.device, *, cuda_graph: str = AUTO, compile: bool = False,
                channels_last: str = AUTO) -> "TorchOptions":
        """auto: on for CUDA, off elsewhere (CUDA graphs exist only there; channels_last helps
        tensor-core convolutions and slows many CPU ones)."""
        cuda = device.type == "cuda"

        def choose(value: str) -> bool:  # auto, on or off (bridge.config allows no other)
            return cuda if value == AUTO else value == "on"
        graph = choose(cuda_graph)
        if graph and not cuda:
            raise ValueError("cuda_graph = on needs a CUDA device")
        return cls(cuda_graph=graph, compile=compile, channels_last=choose(channels_last))

    def describe(self) -> str:
        """For the log: which techniques are on."""
        on = [name for name, used in (("CUDA graphs", self.cuda_graph), ("torch.compile", self.compile),
                                      ("channels_last", self.channels_last)) if used]
        return "eager" if not on else ", ".join(on)


# What the CPU allocator ("DefaultCPUAllocator: can't allocate memory") and MPS ("MPS backend out of
# memory") say in the RuntimeError they raise when an allocation fails.
_OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "out of memory")


def out_of_memory(error: BaseException) -> bool:
    """True if `error` is an allocation that failed on any device: torch's OutOfMemoryError (CUDA),
    Python's MemoryError, or the RuntimeError the CPU and MPS allocators raise."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _OUT_OF_MEMORY_TEXTS)


def release_cached_memory(device: torch.device) -> None:
    """Hand the caching allocator's free blocks back to the device, so that whatever is allocated next
    (the frame that failed to fit, or a smaller one) finds the most room. Call it once the failed
    work's tensors are gone: blocks still referenced (by a traceback, say) stay."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def accelerate(stream: Any, options: TorchOptions) -> None:
    """Apply `options` to a loaded stream (engines.stream.Stream) before its first frame."""
    model = stream.model
    for module in (model.unet, model.autoencoder.module):
        prepare_module(module, options)
    if options.compile:
        # Inductor's default mode: fused pointwise kernels, compiled in a minute or two. Its own CUDA graphs
        # stay off (FrameGraphs captures the whole frame, compiled UNet included), and max-autotune's
        # kernel search, which can take many minutes per shape, is left for a measured reason to use it.
        model.unet.forward = torch.compile(model.unet.forward, mode="default", dynamic=False)
        log.info("UNet compiled with torch.compile; the first frame of each shape compiles it")
    stream.graphs = FrameGraphs(stream._frame) if options.cuda_graph else None


def prepare_module(module: torch.nn.Module, options: TorchOptions) -> None:
    """SDPA attention and the memory layout for one module: the UNet, an autoencoder (also one
    loaded later by a /vae switch)."""
    _use_sdpa(module)
    if options.channels_last:
        module.to(memory_format=torch.channels_last)


def _use_sdpa(module: torch.nn.Module) -> None:
    """PyTorch's fused attention (flash / memory-efficient kernels) for every attention layer."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = getattr(module, "attn_processors", None)
    if processors and any(not isinstance(p, AttnProcessor2_0) for p in processors.values()):
        module.set_attn_processor(AttnProcessor2_0())


class FrameGraphs:
    """A per-frame function run as CUDA graphs, one per input shape (see the module docstring). A shape
    whose capture runs out of memory runs eagerly from then on, and the others keep their graphs; any
    other capture failure turns graphs off.

    `fn(shape, inputs)` takes a hashable `shape` and a pytree of tensors (tuples, named tuples, None)
    and returns a pytree of tensors. `capture=False` keeps everything but the capture: the function runs
    on the static copies each time, which lets the bookkeeping be tested where CUDA is absent."""

    def __init__(self, fn: Callable[[Hashable, Any], Any], *, capture: bool = True, limit: int = 8):
        self.fn = fn
        self.capture = capture
        self.limit = limit  # graphs kept; the least recently used one goes first
        self.captured = 0  # graphs captured so far
        self.failed = ""  # why a capture failed; then every frame runs eagerly
        self._eager_only: set[Hashable] = set()  # keys whose capture ran out of memory: they run eagerly
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._last_key: Hashable = None
        self._streak = 0  # calls in a row with _last_key
        self._needed = 2  # the streak at which a shape is captured; SETTLE_FRAMES after a clear()
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def __call__(self, shape: Hashable, inputs: Any) -> Any:
        leaves, spec = tree_flatten(inputs)
        key = (shape, spec, tuple((t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in leaves))
        self._streak = self._streak + 1 if key == self._last_key else 1
        self._last_key = key
        graph = self._graphs.get(key)
        if graph is None:
            if self.failed or self._streak < self._needed or key in self._eager_only:
                return self.fn(shape, inputs)
            try:
                graph = self._make(key, shape, spec, leaves)
            except Exception as e:  # a show goes on eagerly rather than failing every frame
                if out_of_memory(e):  # no room for this shape's graph beside its frames: the others keep theirs
                    self._eager_only.add(key)
                    log.warning("no memory for a CUDA graph of this frame shape; it runs eagerly: %s", e)
                else:
                    self.failed = f"{type(e).__name__}: {e}"
                    log.warning("CUDA graph capture failed, frames run eagerly from now on: %s", self.failed)
            if graph is None:
                if self.capture and key in self._eager_only:  # here, not in the except: its traceback held
                    torch.cuda.empty_cache()  # the failed capture's tensors
                return self.fn(shape, inputs)
            self._needed = 2
        self._graphs.move_to_end(key)
        return graph.run(leaves)

    def clear(self) -> None:
        """Drop every graph (the function's behaviour changed: new weights, a LoRA scale, a module)."""
        self._graphs.clear()
        self._last_key, self._streak, self._needed = None, 0, SETTLE_FRAMES

    def __len__(self) -> int:
        return len(self._graphs)

    def _make(self, key: Hashable, shape: Hashable, spec: Any, leaves: list[Any]) -> "_Graph":
        started = time.perf_counter()
        graph = _Graph(self.fn, shape, spec, leaves, self._pool if self.capture else None)
        self.captured += 1
        log.debug("frame graph %d made in %.0f ms", self.captured, (time.perf_counter() - started) * 1e3)
        self._graphs[key] = graph
        while len(self._graphs) > self.limit:
            self._graphs.popitem(last=False)
        return graph


class _Graph:
    """One captured call: static inputs, the graph, static outputs."""

    def __init__(self, fn: Callable[[Hashable, Any], Any], shape: Hashable, spec: Any, leaves: list[Any],
                 pool: Any):
        self.fn, self.shape, self.spec = fn, shape, spec
        self.static = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]  # None stays None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        if pool is None:
            return
        inputs = tree_unflatten(self.static, spec)
        # Warm up on a side stream first: lazy set-up (cuBLAS workspaces, kernel selection) must not
        # happen during capture, and capture itself needs a non-default stream.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(shape, inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a model loading on a worker, or the render thread serving while a new model is
        # warmed up on the worker, may use CUDA during this capture; only this thread must not.
        with _CAPTURE_LOCK, torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn(shape, inputs)

    def run(self, leaves: list[Any]) -> Any:
        for static, value in zip(self.static, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(value, non_blocking=True)
        if self.graph is None:
            return self.fn(self.shape, tree_unflatten(self.static, self.spec))
        self.graph.replay()
        return self.outputs
