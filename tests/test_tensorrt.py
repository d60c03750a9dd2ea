"""The TensorRT backend.

On any CPU: every tiny model's ONNX export against torch in onnxruntime (float32, tight tolerances, at
shapes other than the traced ones), the names, shapes and profiles the builder is given, the cache key,
the LoRA refit's weights (put into the ONNX graph, they give what the torch UNet with the LoRA gives), the
runtime's stand-ins inside a real stream (with onnxruntime doing an engine's work), `sdbridge build
--onnx-only`, `doctor`, and the backend choice without TensorRT.

With TensorRT and an NVIDIA GPU (`pytest -m tensorrt`; skipped otherwise): engines built from the tiny
model against torch, a LoRA refit against torch, and a stream served by engines.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from diffusers import AutoencoderKL  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from bridge import config  # noqa: E402
from engines import tiny  # noqa: E402
from engines.autoencoder import Autoencoder  # noqa: E402
from engines.backends import tensorrt  # noqa: E402
from engines.backends.tensorrt import build, cache, export, runtime  # noqa: E402
from engines.backends.tensorrt.export import Profile  # noqa: E402
from engines.stream import Stream, StreamSettings, unet_batches  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle():
    return tiny.build_bundle()


def tiny_kl_vae() -> Autoencoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        return Autoencoder(AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                         norm_num_groups=8, sample_size=64).eval())


def components(bundle):
    xl = tiny.build_bundle("tiny-xl")
    return {
        "unet": export.unet_component(bundle.unet),
        "unet-controlnet-inputs": export.unet_component(bundle.unet, controlnet_inputs=True),
        "unet-xl": export.unet_component(xl.unet),
        "taesd-encoder": export.autoencoder_components(bundle.autoencoder)[0],
        "taesd-decoder": export.autoencoder_components(bundle.autoencoder)[1],
        "vae-encoder": export.autoencoder_components(tiny_kl_vae())[0],
        "vae-decoder": export.autoencoder_components(tiny_kl_vae())[1],
        "controlnet": export.controlnet_component(tiny.build_controlnet()),
    }


def exported(component, folder: Path) -> Path:
    """Export at one shape and clean the graph, as `sdbridge build` does."""
    raw, cleaned = folder / "model.onnx", folder / "clean.onnx"
    export.export(component, raw, Profile(1, 64, 64))
    export.clean(raw, cleaned)
    return cleaned


def run_onnx(path: Path, component, inputs) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(list(component.outputs), {n: t.numpy() for n, t in zip(component.inputs, inputs)})


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["unet", "unet-controlnet-inputs", "unet-xl", "taesd-encoder", "taesd-decoder",
                                  "vae-encoder", "vae-decoder", "controlnet"])
def test_each_exported_graph_computes_what_torch_computes_at_other_shapes(bundle, name, tmp_path):
    component = components(bundle)[name]
    path = exported(component, tmp_path)
    # traced at 64x64 batch 1 with 77 tokens; run at another batch, size and prompt length
    profile = Profile(2, 96, 128, 154)
    inputs = component.sample_inputs(profile, CPU, seed=3)
    with torch.no_grad():
        expected = component.module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = run_onnx(path, component, inputs)
    shapes = component.shapes(profile)
    for output_name, value, reference in zip(component.outputs, got, expected):
        assert value.shape == shapes[output_name]
        assert float(np.abs(reference.numpy()).max()) > 1e-3  # a real signal, not zeros
        np.testing.assert_allclose(value, reference.numpy(), rtol=1e-4, atol=1e-4)


def test_graph_inputs_and_outputs_are_named_and_typed_as_the_runtime_expects(bundle, tmp_path):
    component = export.unet_component(bundle.unet, controlnet_inputs=True)
    model = onnx.load(str(exported(component, tmp_path)))
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == list(component.inputs)
    assert [o.name for o in model.graph.output] == ["latent"]
    assert inputs["timestep"].elem_type == onnx.TensorProto.FLOAT
    # batch, resolution and prompt length stay dynamic: one graph serves every profile
    dims = [d.dim_param for d in inputs["encoder_hidden_states"].shape.dim]
    assert dims[:2] == ["batch", "tokens"]
    assert model.opset_import[0].version >= 17
    assert not any(node.op_type == "Attention" for node in model.graph.node)  # attention as plain ops


def test_a_float16_export_keeps_float16_tensors_for_strongly_typed_engines(tmp_path):
    """Engines take the graph's types (TensorRT 11 has no other mode), so the export is made in float16;
    the timestep stays float32. The graph still computes the float32 model's result within float16's
    precision, and the refit map finds the float16 weights."""
    half = tiny.build_unet().half()
    component = export.unet_component(half)
    path = exported(component, tmp_path)
    model = onnx.load(str(path))
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert types == {"sample": onnx.TensorProto.FLOAT16, "timestep": onnx.TensorProto.FLOAT,
                     "encoder_hidden_states": onnx.TensorProto.FLOAT16}
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    inputs = component.sample_inputs(Profile(1, 64, 64), CPU, seed=1)
    got = run_onnx(path, component, inputs)[0].astype(np.float32)
    with torch.no_grad():
        expected = export.unet_component(tiny.build_unet()).module(*(t.float() for t in inputs)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-2)
    names = export.refit_names(half, path)
    assert sum(transposed for _, transposed in names.values()) >= 40  # the attention projections, transposed


def test_residual_shapes_are_the_shapes_a_controlnet_produces(bundle):
    controlnet = tiny.build_controlnet()  # the tiny UNet's layout, zero convolutions given values
    component = export.controlnet_component(controlnet)
    inputs = component.sample_inputs(Profile(2, 96, 64), CPU)
    with torch.no_grad():
        outputs = component.module(*inputs)
    down, mid = export.residual_shapes(bundle.unet.config, 2, 12, 8)
    assert [tuple(o.shape) for o in outputs] == [*down, mid]


def test_unet_with_zero_residual_inputs_is_the_plain_unet(bundle, tmp_path):
    plain = export.unet_component(bundle.unet)
    with_inputs = export.unet_component(bundle.unet, controlnet_inputs=True)
    path = exported(with_inputs, tmp_path)
    profile = Profile(1, 64, 64)
    inputs = plain.sample_inputs(profile, CPU, seed=5)
    shapes = with_inputs.shapes(profile)
    zeros = [torch.zeros(shapes[n]) for n in with_inputs.inputs[len(plain.inputs):]]
    got = run_onnx(path, with_inputs, [*inputs, *zeros])[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, plain.module(*inputs).numpy(), rtol=1e-4, atol=1e-4)


def test_builder_profiles_are_static_per_resolution_and_batch_and_span_the_dynamic_range(bundle):
    targets = build.targets(bundle, resolutions=[(512, 512), (768, 512)], unet_batches=[2, 1], precision="float32",
                            device=CPU, dynamic=True, tensorrt="")
    unet, encoder, decoder = targets
    assert [(p.width, p.height, p.batch) for p in unet.key.profiles] == [(512, 512, 1), (512, 512, 2),
                                                                         (768, 512, 1), (768, 512, 2)]
    assert [(p.width, p.height, p.batch) for p in encoder.key.profiles] == [(512, 512, 1), (768, 512, 1)]
    assert (encoder.key.component, decoder.key.component) == ("vae_encoder", "vae_decoder")

    class RecordingProfile:  # records what TensorRT's IOptimizationProfile would be given
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (low, opt, high)

    class Builder:
        def create_optimization_profile(self):
            return RecordingProfile()

    static = build._profile(Builder(), unet.component, unet.key.profiles[3])
    assert static.shapes["sample"] == ((2, 4, 64, 96),) * 3
    assert static.shapes["encoder_hidden_states"] == ((2, 77, 32),) * 3
    assert set(static.shapes) == set(unet.component.inputs)
    low, _, high = build._profile(Builder(), unet.component, unet.key.dynamic).shapes["sample"]
    assert low == (1, 4, 32, 32) and high == (2, 4, 128, 128)


def test_unet_batches_follow_steps_guidance_and_stream_batch():
    base = StreamSettings(strength=0.5, steps=1)
    assert unet_batches(base, stream_batch=False) == (1,)
    assert unet_batches(dataclasses.replace(base, guidance_scale=2.0, cfg_type="full"), False) == (2,)
    assert unet_batches(dataclasses.replace(base, steps=3), stream_batch=True) == (3,)
    assert unet_batches(dataclasses.replace(base, steps=3, guidance_scale=2.0, cfg_type="full"), True) == (6,)
    assert unet_batches(dataclasses.replace(base, steps=2, guidance_scale=2.0, cfg_type="initialize"), False) == (2, 1)
    assert unet_batches(dataclasses.replace(base, guidance_scale=2.0, cfg_type="self"), False) == (1,)


# ---------------------------------------------------------------------------------------- cache key
def test_the_engine_key_changes_with_each_of_its_parts():
    key = cache.EngineKey("unet", "w1", "float16", (Profile(1, 512, 512),), None, "", False, "8.9", "10.13.0")
    changed = {
        "component": "vae_decoder", "weights": "w2", "precision": "float32", "profiles": (Profile(1, 768, 512),),
        "dynamic": (Profile(1, 256, 256), Profile(2, 1024, 1024)), "lora_layers": "abc", "controlnet_inputs": True,
        "compute_capability": "8.6", "tensorrt": "10.14.1", "opset": 18, "export_version": 0}
    assert set(changed) == {f.name for f in dataclasses.fields(cache.EngineKey)}
    digests = {key.digest()}
    for name, value in changed.items():
        other = dataclasses.replace(key, **{name: value})
        assert other.digest() not in digests, name
        digests.add(other.digest())
        assert key.differences(other)
    # the ONNX stage depends on what the graph is, not on the GPU, TensorRT or the profiles
    for name in ("profiles", "dynamic", "compute_capability", "tensorrt", "lora_layers"):
        assert dataclasses.replace(key, **{name: changed[name]}).onnx_digest() == key.onnx_digest()
    for name in ("weights", "precision", "controlnet_inputs", "component"):
        assert dataclasses.replace(key, **{name: changed[name]}).onnx_digest() != key.onnx_digest()
    assert cache.EngineKey.from_json(json.loads(json.dumps(key.to_json()))) == key


def test_weights_fingerprint_sees_any_change_of_one_weight(bundle):
    before = cache.weights_fingerprint(tiny.build_unet())
    assert cache.weights_fingerprint(tiny.build_unet()) == before
    edited = tiny.build_unet()
    with torch.no_grad():
        edited.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight[3, 5] += 1e-3
    assert cache.weights_fingerprint(edited) != before
    # an SDXL VAE is upcast to float32 in place on its first frame: the same weights, the same fingerprint
    half = tiny.build_autoencoder().half()
    assert cache._fingerprint(half) == cache._fingerprint(half.float())


def test_weights_fingerprint_ignores_loaded_loras(bundle, lora_file):
    from engines.lora import LoraSet

    model = tiny.build_bundle()
    plain = cache._fingerprint(model.unet)
    LoraSet(model).load("style", lora_file)  # peft wraps layers: names change, base weights do not
    assert cache._fingerprint(model.unet) == plain


def test_lora_layers_enter_the_key_of_the_unet(bundle):
    plain, = build.targets(bundle, resolutions=[(64, 64)], unet_batches=[1], precision="float32", device=CPU,
                           tensorrt="")[:1]
    with_lora = build.targets(bundle, resolutions=[(64, 64)], unet_batches=[1], precision="float32", device=CPU,
                              tensorrt="", lora_targets=["down_blocks.1.attentions.0.proj_in.weight"])[0]
    assert plain.key.lora_layers == "" and with_lora.key.lora_layers
    assert plain.key.digest() != with_lora.key.digest()
    assert plain.key.onnx_digest() == with_lora.key.onnx_digest()  # the same graph, refittable or not


# ---------------------------------------------------------------------------------------- LoRA refit
@pytest.fixture
def lora_file(bundle, tmp_path):
    from tests.test_lora import _peft_lora, write_diffusers
    return write_diffusers({"unet": _peft_lora(bundle, seed=4, text=False)["unet"]}, tmp_path, "style.safetensors")


def test_refit_weights_put_into_the_graph_give_the_unet_with_its_lora(bundle, lora_file, tmp_path):
    from engines.lora import LoraSet

    model = tiny.build_bundle()
    component = export.unet_component(model.unet)
    path = exported(component, tmp_path)
    names = export.refit_names(model.unet, path)
    loras = LoraSet(model)
    loras.load("style", lora_file)
    targets = runtime.lora_targets(model.unet)
    by_torch = {torch_name: (onnx_name, transposed) for onnx_name, (torch_name, transposed) in names.items()}
    assert targets and set(targets) <= set(by_torch)  # every LoRA layer has an ONNX weight to refit
    inputs = component.sample_inputs(Profile(1, 64, 64), CPU, seed=9)
    graph = onnx.load(str(path))
    for weight in (0.8, 0.0):
        loras.set_weights({"style": weight})
        with torch.no_grad():
            expected = component.module(*inputs).numpy()
        refit = runtime.refit_tensors(runtime.lora_weights(model.unet, targets), by_torch)
        for initializer in graph.graph.initializer:
            if initializer.name in refit:
                initializer.CopyFrom(numpy_helper.from_array(refit[initializer.name].numpy(), initializer.name))
        session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(["latent"], {n: t.numpy() for n, t in zip(component.inputs, inputs)})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        loras.set_weights({"style": 1.0})
        with_lora = component.module(*inputs).numpy()
    assert np.abs(with_lora - got).max() > 1e-3  # the LoRA changes the output: the check above could fail


def test_a_call_takes_the_static_profile_of_its_shape_before_a_dynamic_one():
    def static(batch, size):
        shape = (batch, 4, size, size)
        return {"sample": (shape, shape, shape), "timestep": ((batch,),) * 3}
    dynamic = {"sample": ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 128, 128)), "timestep": ((1,), (2,), (4,))}
    profiles = [dynamic, static(1, 64), static(2, 64)]
    assert runtime.choose_profile(profiles, {"sample": (2, 4, 64, 64), "timestep": (2,)}) == 2
    assert runtime.choose_profile(profiles, {"sample": (1, 4, 64, 64), "timestep": (1,)}) == 1
    assert runtime.choose_profile(profiles, {"sample": (3, 4, 96, 48), "timestep": (3,)}) == 0
    assert runtime.choose_profile(profiles, {"sample": (1, 4, 256, 256), "timestep": (1,)}) is None
    assert runtime.choose_profile(profiles[1:], {"sample": (1, 4, 96, 96), "timestep": (1,)}) is None


# ---------------------------------------------------------------------------------------- the stand-ins
class OnnxEngine:
    """An engine's contract (`inputs`, `run`) kept by onnxruntime on a cleaned graph: lets the stand-ins
    that the stream calls be tested on a CPU. Shapes outside `covers` are refused, as a profile would."""

    def __init__(self, path: Path, covers=lambda shapes: True):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.covers = covers
        self.calls = 0

    def run(self, inputs):
        if not self.covers({n: tuple(t.shape) for n, t in inputs.items()}):
            return None
        self.calls += 1
        out = self.session.run(self.outputs, {n: inputs[n].detach().float().numpy() for n in self.inputs})
        return {n: torch.from_numpy(v) for n, v in zip(self.outputs, out)}


STAND_IN_CASES = {
    # name: (model, stream batch, controlnet inputs, settings, UNet calls per frame)
    "sd, 2 steps, cfg full": ("tiny", False, False, dict(steps=2, guidance_scale=2.0, cfg_type="full"), 2),
    "sdxl-shaped, cfg initialize": ("tiny-xl", False, False, dict(steps=2, guidance_scale=2.0, cfg_type="initialize"), 2),
    "stream batch, 3 steps": ("tiny", True, False, dict(steps=3, strength=0.9), 1),
    "UNet with ControlNet inputs, none on": ("tiny", False, True, dict(steps=1), 1),
}


@pytest.mark.parametrize("case", list(STAND_IN_CASES))
def test_a_stream_renders_the_same_frames_through_the_stand_ins(case, tmp_path):
    """TrtUNet and TrtAutoencoder give the stream exactly what the torch modules give: the inputs an
    engine takes (float32 timesteps per batch entry, SDXL's pooled text and size numbers, zero ControlNet
    residuals) are assembled right, whatever the batch."""
    arch, stream_batch, controlnet_inputs, extra, calls = STAND_IN_CASES[case]
    model = tiny.build_bundle(arch)
    stream = Stream(model, CPU, torch.float32, stream_batch=stream_batch)
    settings = StreamSettings(**{"prompt": "a cat", "seed": 3, "strength": 0.6, "width": 64, "height": 64, **extra})
    images = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)]
    stream.prepare(settings)
    expected = [stream.render(image) for image in images]
    encoder, decoder = export.autoencoder_components(model.autoencoder)
    unet_engine = OnnxEngine(exported(export.unet_component(model.unet, controlnet_inputs=controlnet_inputs),
                                      tmp_path / "unet"))
    engines = [OnnxEngine(exported(c, tmp_path / c.name)) for c in (encoder, decoder)]
    missing = []
    stream = Stream(model, CPU, torch.float32, stream_batch=stream_batch)
    stream.set_modules(unet=runtime.TrtUNet(unet_engine, model.unet, on_missing=missing.append),
                       autoencoder=runtime.TrtAutoencoder(*engines, model.autoencoder))
    stream.prepare(settings)
    got = [stream.render(image) for image in images]
    assert unet_engine.calls == calls * len(images) and all(e.calls == len(images) for e in engines)
    for frame, reference in zip(got, expected):
        torch.testing.assert_close(frame, reference, rtol=1e-4, atol=1e-4)
    assert not missing


def test_a_shape_no_profile_takes_runs_on_torch_and_is_reported_once(bundle, tmp_path):
    model = tiny.build_bundle()
    stream = Stream(model, CPU, torch.float32)
    settings = StreamSettings(prompt="a cat", seed=3, strength=0.6, width=64, height=64)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    stream.prepare(settings)
    expected = stream.render(image)
    engine = OnnxEngine(exported(export.unet_component(model.unet), tmp_path), covers=lambda shapes: False)
    missing = []
    stream.set_modules(unet=runtime.TrtUNet(engine, model.unet, on_missing=missing.append))
    stream.prepare(settings)
    for _ in range(3):
        got = stream.render(image)
    assert engine.calls == 0 and len(missing) == 1 and "torch" not in missing[0]
    torch.testing.assert_close(got, expected)


def _steered_stream(arch: str = "tiny"):
    """A guided two-step stream of `arch` steered by its tiny ControlNet, with a frame's inputs and the
    frame torch renders from them."""
    model = tiny.build_bundle(arch)
    controlnet = tiny.build_controlnet(xl=arch == "tiny-xl")
    settings = StreamSettings(prompt="a cat", seed=3, strength=0.7, steps=2, width=64, height=64,
                              guidance_scale=2.0, cfg_type="full", controls=((0.9, 0.0, 1.0),))
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    stream = Stream(model, CPU, torch.float32)
    stream.set_controlnets([controlnet])
    stream.prepare(settings)
    return stream, controlnet, image, control, stream.render(image, controls=[control])


def test_a_unet_engine_takes_the_controlnet_residuals_of_a_steered_stream(tmp_path):
    stream, _, image, control, expected = _steered_stream()
    unet = stream.model.unet
    engine = OnnxEngine(exported(export.unet_component(unet, controlnet_inputs=True), tmp_path))
    missing = []
    stream.set_modules(unet=runtime.TrtUNet(engine, unet, on_missing=missing.append))
    got = stream.render(image, controls=[control])
    assert engine.calls == 2 and not missing
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_controlnet_residuals_for_an_engine_without_their_inputs_run_on_torch(bundle, tmp_path):
    model = tiny.build_bundle()
    engine = OnnxEngine(exported(export.unet_component(model.unet), tmp_path))
    missing = []
    unet = runtime.TrtUNet(engine, model.unet, on_missing=missing.append)
    inputs = export.unet_component(model.unet).sample_inputs(Profile(1, 64, 64), CPU, seed=2)
    down, mid = export.residual_shapes(model.unet.config, 1, 8, 8)
    residuals = dict(down_block_additional_residuals=[torch.randn(s) for s in down],
                     mid_block_additional_residual=torch.randn(mid))
    with torch.no_grad():
        got = unet(*inputs, **residuals).sample
        expected = model.unet(*inputs, **residuals).sample
    torch.testing.assert_close(got, expected)  # the residuals count: the engine would have dropped them
    assert engine.calls == 0 and len(missing) == 1 and "ControlNet" in missing[0]
    unet(*inputs)
    assert engine.calls == 1  # without residuals the engine serves


def test_a_lora_on_layers_the_engine_cannot_refit_runs_the_unet_on_torch(bundle, lora_file, tmp_path):
    model = tiny.build_bundle()
    engine = OnnxEngine(exported(export.unet_component(model.unet), tmp_path))
    stream = Stream(model, CPU, torch.float32, find_lora=lambda name: lora_file)
    unet = runtime.TrtUNet(engine, model.unet)  # not refittable: built with no LoRA
    stream.set_modules(unet=unet)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    stream.prepare(StreamSettings(prompt="a cat", seed=3, width=64, height=64, loras=(("style", 0.7),)))
    stream.render(image)
    assert unet.torch_reason is not None and engine.calls == 0
    stream.prepare(StreamSettings(prompt="a cat", seed=3, width=64, height=64, loras=(("style", 0.0),)))
    stream.render(image)
    assert unet.torch_reason is None and engine.calls == 1  # the LoRA is off: the engine serves again


# ---------------------------------------------------------------------------------------- commands
def sdbridge(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_export_progress_bar_counts_modules_without_changing_what_they_compute(bundle, tmp_path):
    target = build.targets(bundle, resolutions=[(64, 64)], unet_batches=[1], precision="float32", device=CPU,
                           tensorrt="")[0]
    progress = build.Progress(show_bars=True)  # as on a terminal
    path = build.export_stages(target, cache.EngineCache(tmp_path), progress)
    inputs = target.component.sample_inputs(Profile(1, 64, 64), CPU)
    with torch.no_grad():
        expected = target.component.module(*inputs).numpy()
    np.testing.assert_allclose(run_onnx(path, target.component, inputs)[0], expected, rtol=1e-4, atol=1e-4)
    assert "export unet to ONNX" in progress.times


def test_build_onnx_only_makes_every_stage_and_a_second_run_reuses_them(tmp_path):
    first = sdbridge("build", "--model", "tiny", "--onnx-only", "--engine-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    folders = sorted(p.name.split("-")[0] for p in (tmp_path / "onnx").iterdir())
    assert folders == ["unet", "vae_decoder", "vae_encoder"]
    for folder in (tmp_path / "onnx").iterdir():
        assert {p.name for p in folder.iterdir()} == {"model.onnx", "clean.onnx", "refit.json"}
        onnx.checker.check_model(str(folder / "clean.onnx"))
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.onnx")}
    second = sdbridge("build", "--model", "tiny", "--onnx-only", "--engine-dir", str(tmp_path))
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("ONNX graph cached") == 3 and "export" not in second.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.onnx")} == stamps


@pytest.mark.skipif(tensorrt.installed(), reason="TensorRT is installed here")
def test_build_without_tensorrt_says_how_to_install_it(tmp_path):
    result = sdbridge("build", "--model", "tiny", "--engine-dir", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "TensorRT" in result.stderr and "--onnx-only" in result.stderr
    assert not (tmp_path / "onnx").exists()  # refused before any work


@pytest.mark.skipif(tensorrt.installed(), reason="TensorRT is installed here")
def test_serve_with_backend_tensorrt_refuses_to_start_without_it():
    result = sdbridge("serve", "--model", "tiny", "--backend", "tensorrt", "--osc-port", "0", timeout=120)
    assert result.returncode == 2
    assert "backend = tensorrt" in result.stderr and "TensorRT" in result.stderr


def test_install_hint_names_the_wheel_for_the_cuda_of_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "pip install tensorrt-cu12" in tensorrt.install_hint()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "pip install tensorrt-cu13" in tensorrt.install_hint()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "NVIDIA GPU" in tensorrt.install_hint()


def test_doctor_lists_engines_and_says_which_are_stale_and_why(tmp_path):
    root = cache.EngineCache(tmp_path)
    key = cache.EngineKey("unet", "w", "float16", (Profile(1, 512, 512),), compute_capability="8.6",
                          tensorrt="10.0.1")
    cache.write_atomically(root.plan(key), b"not an engine")
    root.save_record(cache.EngineRecord(key, model="tiny"))
    result = sdbridge("doctor", "--engine-dir", str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith("unet of tiny"))
    assert "STALE" in line and "TensorRT 10.0.1" in line and "compute capability 8.6" in line
    assert "engines in" in result.stdout and "torch" in result.stdout


def test_a_background_build_that_fails_leaves_torch_serving_and_says_why(tmp_path):
    from bridge.builds import EngineService

    settings = config.Settings(model="tiny", engine_dir=str(tmp_path))
    values = {**{p.name: p.default for p in config.initial_params()}, "width": 64, "height": 64}
    service = EngineService(settings, lambda: values, lambda work: None, CPU)
    assert not service.wanted and service.describe().startswith("torch (TensorRT cannot serve here")
    # As on a machine with TensorRT, the engines are missing and auto builds them in a child process;
    # here that child finds no GPU and fails, which is the path under test.
    service.wanted = True
    stream = Stream(tiny.build_bundle(), CPU, torch.float32)
    assert service.serve(stream) is False
    builder = service._builder
    service.activate(stream)
    assert "in the background" in service.describe() and service.describe().startswith("torch (")
    builder.join(180)
    assert not builder.is_alive() and service._builder is None
    assert "build failed" in service.describe() and service.attached is None
    assert "TensorRT needs an NVIDIA GPU" in (tmp_path / "build.log").read_text()
    assert not list(tmp_path.glob("onnx"))  # the child stopped before any work


def test_the_engine_service_keeps_no_stream_alive_after_it_stops_serving(tmp_path):
    import gc
    import weakref

    from bridge.builds import EngineService

    service = EngineService(config.Settings(model="tiny", engine_dir=str(tmp_path)), dict, lambda work: None, CPU)
    model = tiny.build_bundle()
    stream = Stream(model, CPU, torch.float32)
    engine = OnnxEngine(exported(export.unet_component(model.unet), tmp_path))
    unet = runtime.TrtUNet(engine, model.unet, on_missing=service._missing_for(stream))
    service._state(stream).attached = runtime.Attached(unet, runtime.TrtAutoencoder(None, None, model.autoencoder),
                                                       loaded=None)
    service.activate(stream)
    assert service.attached is not None
    gone = weakref.ref(stream)
    del stream, unet
    gc.collect()
    assert gone() is None and len(service._streams) == 0 and service.attached is None


def test_settings_for_a_child_build_round_trip_through_toml(tmp_path):
    settings, initial = config.load(None, {"model": "tiny", "engine_resolutions": ["768x512"], "prompt": 'say "hi"',
                                           "lora/de tail": 0.5, "seeds": [[1, 0.5]], "backend": "auto"})
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(settings, initial))
    assert config.load(path) == (settings, initial)
    with pytest.raises(config.ConfigError, match="WIDTHxHEIGHT"):
        config.load(None, {"engine_resolutions": ["768"]})


# ---------------------------------------------------------------------------------------- ControlNet engines
@pytest.mark.parametrize("arch", ["tiny", "tiny-xl"])
def test_controlnet_engines_steer_a_stream_as_the_torch_controlnets_do(arch, tmp_path):
    """TrtControlNet gives the stream what the torch ControlNet gives (SD- and SDXL-shaped, guided), and
    its residuals go into a UNet engine's residual inputs."""
    stream, controlnet, image, control, expected = _steered_stream(arch)
    model = stream.model
    unet_engine = OnnxEngine(exported(export.unet_component(model.unet, controlnet_inputs=True), tmp_path / "unet"))
    controlnet_engine = OnnxEngine(exported(export.controlnet_component(controlnet), tmp_path / "controlnet"))
    missing = []
    stream.set_modules(unet=runtime.TrtUNet(unet_engine, model.unet, on_missing=missing.append),
                       controlnets=[runtime.TrtControlNet(controlnet_engine, controlnet, on_missing=missing.append)])
    got = stream.render(image, controls=[control])
    assert controlnet_engine.calls == 2 and unet_engine.calls == 2 and not missing
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    runtime.detach(stream)
    assert stream.controlnets == (controlnet,) and stream.unet is model.unet


def test_a_controlnet_shape_no_profile_takes_runs_on_torch_and_is_reported_once(tmp_path):
    controlnet = tiny.build_controlnet()
    engine = OnnxEngine(exported(export.controlnet_component(controlnet), tmp_path), covers=lambda shapes: False)
    missing = []
    stand_in = runtime.TrtControlNet(engine, controlnet, on_missing=missing.append)
    inputs = export.controlnet_component(controlnet).sample_inputs(Profile(1, 64, 64), CPU, seed=2)
    for _ in range(2):
        down, mid = stand_in(*inputs[:4], conditioning_scale=1.0)
    with torch.no_grad():
        expected_down, expected_mid = controlnet(*inputs[:4], conditioning_scale=1.0, return_dict=False)
    torch.testing.assert_close(mid, expected_mid)
    for got, expected in zip(down, expected_down, strict=True):
        torch.testing.assert_close(got, expected)
    assert engine.calls == 0 and len(missing) == 1 and "ControlNet" in missing[0]


def test_controlnets_take_only_engines_built_from_their_own_weights(tmp_path):
    controlnet, other = tiny.build_controlnet(), tiny.build_controlnet()
    with torch.no_grad():
        other.controlnet_mid_block.weight.add_(0.1)
    engine = OnnxEngine(exported(export.controlnet_component(controlnet), tmp_path))
    loaded = runtime.Loaded({}, None, {}, None, [], {cache.weights_fingerprint(controlnet): engine})
    missing = []
    assert isinstance(runtime._controlnet_on(loaded, 0, controlnet, missing.append), runtime.TrtControlNet)
    assert runtime._controlnet_on(loaded, 1, other, missing.append) is other
    assert runtime._controlnet_on(loaded, 2, None, missing.append) is None
    assert missing == ["ControlNet 1 (no engine of its weights)"]


def test_a_build_with_controlnets_gives_the_unet_residual_inputs_and_each_controlnet_a_graph(tmp_path):
    result = sdbridge("build", "--model", "tiny", "--controlnet", "tiny", "--onnx-only", "--engine-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    folders = {p.name.split("-")[0]: p for p in (tmp_path / "onnx").iterdir()}
    assert sorted(folders) == ["controlnet", "unet", "vae_decoder", "vae_encoder"]
    unet_inputs = [i.name for i in onnx.load(str(folders["unet"] / "clean.onnx")).graph.input]
    assert "mid_block_res" in unet_inputs and "down_block_res_0" in unet_inputs


# ---------------------------------------------------------------------------------------- on a GPU
def _gpu_with_tensorrt() -> bool:
    return tensorrt.installed() and torch.cuda.is_available()


gpu = pytest.mark.skipif(not _gpu_with_tensorrt(), reason="needs the tensorrt package and an NVIDIA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny model's engines at 64x64, batch 1 and 2, UNet refittable for a LoRA's layers."""
    from tests.test_lora import _peft_lora, write_diffusers
    from engines.lora import LoraSet

    folder = tmp_path_factory.mktemp("engines")
    model = tiny.build_bundle().to(CUDA, torch.float16)
    lora = write_diffusers({"unet": _peft_lora(tiny.build_bundle(), seed=4, text=False)["unet"]}, folder, "style.safetensors")
    loras = LoraSet(model)
    loras.load("style", lora)
    targets_ = build.targets(model, resolutions=[(64, 64)], unet_batches=[1, 2], precision="float16", device=CUDA,
                             lora_targets=runtime.lora_targets(model.unet))
    loras.unload("style")
    engine_cache = cache.EngineCache(folder)
    build.build(targets_, engine_cache, device=CUDA)
    return model, engine_cache, targets_, lora


@pytest.mark.tensorrt
@gpu
def test_engines_compute_what_torch_computes(built):
    model, engine_cache, targets_, _ = built
    trt = tensorrt.load()
    memory = runtime.ActivationMemory(CUDA)
    for target in targets_:
        engine = runtime.Engine(trt, engine_cache.plan(target.key).read_bytes(), engine_cache.record(target.key), memory)
        inputs = target.component.sample_inputs(target.key.profiles[-1], CUDA, seed=2)
        got = engine.run(dict(zip(target.component.inputs, inputs)))
        with torch.no_grad():
            expected = target.component.module(*inputs)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for name, reference in zip(target.component.outputs, expected):
            torch.testing.assert_close(got[name].float(), reference.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.tensorrt
@gpu
def test_a_lora_weight_change_refits_the_unet_engine_to_match_torch(built):
    model, engine_cache, targets_, lora = built
    unet_target = targets_[0]
    stream = Stream(model, CUDA, torch.float16, find_lora=lambda name: lora)
    loaded = runtime.load(engine_cache, [engine_cache.record(t.key) for t in targets_], CUDA)
    attached = runtime.attach(stream, loaded)
    assert attached.unet.refit is not None
    inputs = unet_target.component.sample_inputs(Profile(1, 64, 64), CUDA, seed=3)
    image = torch.rand(1, 3, 64, 64, device=CUDA, dtype=torch.float16) * 2 - 1
    for weight in (0.8, 0.0):
        stream.prepare(StreamSettings(prompt="a cat", seed=3, width=64, height=64, loras=(("style", weight),)))
        stream.render(image)
        assert attached.unet.torch_reason is None
        got = attached.unet(*inputs[:3]).sample
        with torch.no_grad():
            expected = model.unet(*inputs[:3]).sample
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    runtime.detach(stream)


@pytest.mark.tensorrt
@gpu
def test_a_stream_on_engines_and_cuda_graphs_renders_what_torch_renders(built):
    from engines.backends import torch_backend
    from engines.frames import OutputFormat

    model, engine_cache, targets_, _ = built
    stream = Stream(model, CUDA, torch.float16)
    torch_backend.accelerate(stream, torch_backend.TorchOptions.resolve(CUDA))
    settings = StreamSettings(prompt="a cat", seed=3, strength=0.6, width=64, height=64)
    pixels = np.random.default_rng(1).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    output = OutputFormat()
    stream.prepare(settings)
    expected = [stream.render_pixels(pixels, output).copy() for _ in range(3)][-1]
    runtime.attach(stream, runtime.load(engine_cache, [engine_cache.record(t.key) for t in targets_], CUDA))
    stream.prepare(settings)
    # eager while the swap settles (torch_backend.SETTLE_FRAMES), then captured and replayed
    frames = [stream.render_pixels(pixels, output).copy() for _ in range(torch_backend.SETTLE_FRAMES + 4)]
    assert stream.graphs.captured >= 1 and not stream.graphs.failed
    for frame in frames:
        assert np.abs(frame.astype(int) - expected.astype(int)).mean() < 3  # 8-bit levels, float16 engines
    runtime.detach(stream)
