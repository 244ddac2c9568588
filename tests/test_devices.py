"""Devices, batches and torch.compile: the models run wherever their tensors are.

- The meta device (no data, every CPU machine has it) shows that no forward pass makes
  a tensor on the CPU behind the caller's back: mixing devices would raise.
- CUDA: one forward per model (float32 against the CPU, bfloat16 and float16 against
  float64), skipped without a GPU.
- Batches: every item of a batch equals the item run alone, up to rounding.
- torch.compile: the default tier traces every model with the ``aot_eager`` backend
  (Dynamo and AOTAutograd, as inductor sees them, without its C++ build: seconds
  instead of about a minute per model on 2 cores); the full tier compiles with the
  default inductor backend, with its weight freezing, and in bfloat16 with its
  kernel autotuning (``max_autotune``).

Bounds: two float32 runs of the same function that round differently (other kernels,
blockings or devices) are each within gamma_n (see test_precision) of the exact
result, so within 2 gamma_n of each other.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import perceiver_torch as pt
from perceiver_torch import linear as linear_module
from perceiver_torch.linear import Linear
from test_precision import assert_within_rounding_bound, gamma, outputs, relative
from test_torch_models import tiny, tiny_inputs

NAMES = list(pt.MODEL_NAMES)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _to(inputs: tuple, device) -> tuple:
    return tuple(x.to(device) for x in inputs)


# -- the meta device: nothing is made on the CPU inside --------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_on_the_meta_device(name):
    model = tiny(name).to("meta")
    inputs = _to(tiny_inputs(name), "meta")
    with torch.no_grad():
        for key, value in outputs(model(*inputs)).items():
            assert value.device.type == "meta", key
        if name == "video_autoencoding":
            out = model.reconstruct(*inputs, num_chunks=3)
            assert all(v.device.type == "meta" for v in out.values())
        if name == "optical_flow":
            th, tw = pt.TINY_CONFIGS[name].image_size
            frames = torch.empty(1, 2, 3, th + 5, tw + 7, device="meta")
            assert model.tiled(frames, min_overlap=4).device.type == "meta"
        if name == "language_perceiver":
            # A mask too: skipping the padding reads the mask's values, which a meta
            # tensor does not have, so that fast path stands aside.
            ids = inputs[0]
            mask = torch.ones_like(ids)
            assert model(ids, mask).shape == (*ids.shape, model.config.vocab_size)
            assert model(ids, mask).device.type == "meta"


def test_load_on_the_meta_device_is_quiet(tmp_path):
    """load(map_location="meta") checks the file's keys and shapes and makes a meta
    model without a warning (copying the values into meta tensors would do nothing)."""
    import warnings

    from converter import convert
    from converter.fixtures import write_fixture

    write_fixture("imagenet_conv", tmp_path / "conv.pickle", size="tiny", seed=1)
    path = tmp_path / "conv.safetensors"
    convert(tmp_path / "conv.pickle", path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = pt.load(path, map_location="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_onednn_path_is_cpu_float32_and_bfloat16_only(monkeypatch):
    """The CPU-only oneDNN kernel is never called for other devices or dtypes."""

    def not_expected(*args, **kwargs):
        raise AssertionError("the oneDNN kernel was called")

    monkeypatch.setattr(linear_module, "_onednn_linear_enabled", lambda dtype=None: True)
    layer = Linear(6, 3)
    with torch.no_grad():
        assert linear_module.uses_onednn(torch.randn(2, 6), layer.weight)
        assert linear_module.uses_onednn(
            torch.randn(2, 6).bfloat16(), layer.weight.bfloat16()
        )
        assert not linear_module.uses_onednn(torch.randn(2, 6), layer.weight.bfloat16())
        for device, dtype in (
            ("meta", torch.float32),
            ("cpu", torch.float16),
            ("cpu", torch.float64),
        ):
            moved = copy.deepcopy(layer).to(device=device, dtype=dtype)
            x = torch.randn(2, 6).to(device=device, dtype=dtype)
            assert not linear_module.uses_onednn(x, moved.weight), (device, dtype)
            with monkeypatch.context() as patch:
                patch.setattr(linear_module, "_onednn_kernel", not_expected)
                out = moved(x)
            assert out.device.type == device and out.dtype == dtype
            if device == "cpu":
                assert torch.equal(out, F.linear(x, moved.weight, moved.bias))


def test_onednn_bfloat16_path_matches_f_linear(monkeypatch):
    """In bfloat16 the oneDNN kernel computes F.linear: both accumulate the products
    of the same bfloat16 inputs in float32 and round once to bfloat16, so they differ
    by at most one rounding of each (2u, u = 2^-8) of the largest output, plus the
    float32 accumulation order (~2^-24 K for K = 96 terms: negligible)."""
    if not linear_module._onednn_linear_enabled(torch.bfloat16):
        pytest.skip("no oneDNN bfloat16 linear kernel here: Linear is F.linear in bf16")
    torch.manual_seed(0)
    layer = Linear(96, 40).to(torch.bfloat16)
    x = torch.randn(3, 17, 96).to(torch.bfloat16)
    expected = F.linear(x, layer.weight, layer.bias)

    def not_expected(*args, **kwargs):
        raise AssertionError("the bfloat16 inference path fell back to F.linear")

    monkeypatch.setattr(linear_module.F, "linear", not_expected)
    with torch.inference_mode():
        fast = layer(x)
    assert fast.dtype == torch.bfloat16 and fast.shape == expected.shape
    assert relative(fast, expected.double()) <= 2 * 2.0**-8


# -- CUDA ------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("name", NAMES)
def test_cuda_forward_float32(name, monkeypatch):
    # TF32 would round matmul and conv inputs to 10 bits: off for this comparison.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny(name)
    inputs = tiny_inputs(name)
    with torch.no_grad():
        expected = outputs(model(*inputs))
        got = outputs(model.to("cuda")(*_to(inputs, "cuda")))
    for key in expected:
        assert got[key].device.type == "cuda", key
        assert relative(got[key].cpu(), expected[key].double()) <= 2 * gamma(
            name, torch.float32
        ), key


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_cuda_forward_reduced_precision(name, dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    model = tiny(name).to(dtype)
    reference = copy.deepcopy(model).double()
    inputs = tiny_inputs(name)
    rounded = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        expected = outputs(reference(*rounded))
        got = outputs(model.to("cuda")(*_to(inputs, "cuda")))
    for key in expected:
        assert got[key].device.type == "cuda" and got[key].dtype == dtype, key
        assert relative(got[key].cpu(), expected[key]) <= gamma(name, dtype), key


@CUDA
def test_cuda_tiled_flow_and_video_reconstruct():
    flow = tiny("optical_flow")
    th, tw = pt.TINY_CONFIGS["optical_flow"].image_size
    frames = torch.rand(1, 2, 3, th + 5, tw + 7) * 2 - 1
    video = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding", batch=1)
    with torch.no_grad():
        expected = flow.tiled(frames, min_overlap=4)
        got = flow.to("cuda").tiled(frames.cuda(), min_overlap=4)
        clip = video.reconstruct(images, audio, num_chunks=3)
        clip_cuda = video.to("cuda").reconstruct(images.cuda(), audio.cuda(), num_chunks=3)
    bound = 2 * gamma("optical_flow", torch.float32)
    assert relative(got.cpu(), expected.double()) <= bound
    for key in clip:
        assert relative(clip_cuda[key].cpu(), clip[key].double()) <= 2 * gamma(
            "video_autoencoding", torch.float32
        ), key


def check_value_reading_paths(device: str) -> None:
    """On ``device`` against the CPU: the paths that read tensor values, which the
    meta device steps around (so that only a GPU run shows that they keep to the
    device): the language model's padding skip (``nonzero`` of the mask), the video
    model's subsample check (indices on the CPU and on the device) and its folded
    decoder's factorisation (``decoders.gram_factor``), and the pipelines given a
    model on ``device`` (inputs moved to it, outputs brought back)."""
    from perceiver_torch.pipelines import ClassifyPipeline, FillMaskPipeline

    language = tiny("language_perceiver")
    ids = tiny_inputs("language_perceiver", batch=2, seed=3)[0]
    mask = torch.ones_like(ids)
    mask[0, 40:] = 0
    mask[1, 25:] = 0  # trailing padding in every row: the skip runs
    text = "Some words are [MASK*5]."
    with torch.no_grad():
        expected = language(ids, mask)
        expected_fill = FillMaskPipeline(language)(text).logits
        moved = copy.deepcopy(language).to(device)
        got = moved(ids.to(device), mask.to(device))
        got_fill = FillMaskPipeline(moved)(text).logits
    bound = 2 * gamma("language_perceiver", torch.float32)
    assert got.device.type == torch.device(device).type
    for row, real in enumerate((40, 25)):
        assert relative(got[row, :real].cpu(), expected[row, :real].double()) <= bound
    assert got_fill.device.type == "cpu"
    assert relative(got_fill, expected_fill.double()) <= bound

    video = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding", batch=2, seed=4)
    subsample = {"image": torch.tensor([0, 5, 17]), "audio": torch.tensor([1, 2])}
    with torch.no_grad():
        expected = video(images, audio, subsample=subsample)
        moved = copy.deepcopy(video).to(device)
        for where in ("cpu", device):  # indices on the CPU or beside the model
            got = moved(
                images.to(device),
                audio.to(device),
                subsample={k: v.to(where) for k, v in subsample.items()},
            )
            for key in expected:
                assert relative(got[key].cpu(), expected[key].double()) <= 2 * gamma(
                    "video_autoencoding", torch.float32
                ), (where, key)

    image_model = tiny("imagenet_conv")
    picture = (torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(5)) * 255)
    picture = picture.to(torch.uint8).numpy()
    with torch.no_grad():
        expected = ClassifyPipeline(image_model)(picture).logits
        got = ClassifyPipeline(copy.deepcopy(image_model).to(device))(picture).logits
    assert got.device.type == "cpu"
    assert relative(got, expected.double()) <= 2 * gamma("imagenet_conv", torch.float32)


@CUDA
def test_cuda_value_reading_paths_and_pipelines(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    check_value_reading_paths("cuda")


# -- batches ---------------------------------------------------------------------


def _item(inputs: tuple, i: int) -> tuple:
    return tuple(x[i : i + 1] for x in inputs)


@pytest.mark.parametrize("name", NAMES)
def test_batch_items_equal_single_runs(name):
    model = tiny(name)
    inputs = tiny_inputs(name, batch=3, seed=7)
    if name == "language_perceiver":
        # Rows of different lengths: padding masked per row.
        mask = torch.ones_like(inputs[0])
        mask[1, 40:] = 0
        mask[2, 9:] = 0
        inputs = inputs + (mask,)
    bound = 2 * gamma(name, torch.float32)
    with torch.no_grad():
        batched = outputs(model(*inputs))
        for i in range(3):
            single = outputs(model(*_item(inputs, i)))
            for key in single:
                if name == "language_perceiver":
                    real = int(inputs[1][i].sum())  # padded positions: not compared
                    got, expected = batched[key][i, :real], single[key][0, :real]
                else:
                    got, expected = batched[key][i], single[key][0]
                assert relative(got, expected.double()) <= bound, (i, key)


def test_batched_tiled_flow_and_video_reconstruct():
    flow = tiny("optical_flow")
    th, tw = pt.TINY_CONFIGS["optical_flow"].image_size
    gen = torch.Generator().manual_seed(1)
    frames = torch.rand(2, 2, 3, th + 5, tw + 7, generator=gen) * 2 - 1
    video = tiny("video_autoencoding")
    images, audio = tiny_inputs("video_autoencoding", batch=2, seed=2)
    with torch.no_grad():
        tiled = flow.tiled(frames, min_overlap=4)
        clip = video.reconstruct(images, audio, num_chunks=3)
        for i in range(2):
            single = flow.tiled(frames[i : i + 1], min_overlap=4)
            assert relative(tiled[i], single[0].double()) <= 2 * gamma(
                "optical_flow", torch.float32
            )
            one = video.reconstruct(images[i : i + 1], audio[i : i + 1], num_chunks=3)
            for key in one:
                assert relative(clip[key][i], one[key][0].double()) <= 2 * gamma(
                    "video_autoencoding", torch.float32
                ), key


# -- torch.compile -------------------------------------------------------------------


def _compile_inputs(name: str) -> tuple:
    inputs = tiny_inputs(name)
    if name == "language_perceiver":
        mask = torch.ones_like(inputs[0])
        mask[1, 50:] = 0  # the padding shortcut (a data-dependent length) too
        inputs = inputs + (mask,)
    return inputs


def _check_compiled(name: str, backend: str, freezing: bool = False) -> None:
    torch._dynamo.reset()
    model = tiny(name)
    inputs = _compile_inputs(name)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        expected = outputs(model(*inputs))
        if freezing:  # the weights folded in as constants (inference only)
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=True):
                got = outputs(compiled(*inputs))
        else:
            got = outputs(compiled(*inputs))
    for key in expected:
        assert relative(got[key], expected[key].double()) <= 2 * gamma(
            name, torch.float32
        ), key


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_traces_every_model(name):
    _check_compiled(name, "aot_eager")


def test_torch_compile_video_decoder_has_no_graph_break():
    """Under torch.compile the video model decodes plainly: the folded decoder picks
    its factorisation from the weights' values (``decoders.gram_factor``'s
    ``int(info)``), on which dynamo broke the graph four times (five graphs, the fold
    run eagerly on every call)."""
    torch._dynamo.reset()
    model = tiny("video_autoencoding")
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(*_compile_inputs("video_autoencoding"))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_torch_compile_traces_capture_stages_without_a_graph_break():
    """capture_stages's hooks check the thread that records; dynamo cannot trace
    threading.get_ident, which broke the graph at every hook (8 graphs for the
    ImageNet model); in traced code every pass is recorded."""
    from perceiver_torch.perceiver import capture_stages

    torch._dynamo.reset()
    model = tiny("imagenet_learned")
    with torch.no_grad(), capture_stages(model) as stages:
        explained = torch._dynamo.explain(model)(*_compile_inputs("imagenet_learned"))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    assert set(stages) == {"preprocessed", "latents", "decoder_output"}


def test_torch_compile_language_model_serves_every_padding_in_one_graph():
    """The padding shortcut reads the mask's values: under torch.compile that was a
    graph break and a recompilation for every new padding length (after eight,
    dynamo ran the model eagerly). Compiled, the padding is computed plainly: one
    graph, compiled once, for any mask (the fast-path switches, read when the model
    is built, no longer cost a second compilation either)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny("language_perceiver")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ids = tiny_inputs("language_perceiver")[0]
    with torch.no_grad():
        for real in (40, 30, 20, ids.shape[1]):
            mask = torch.zeros_like(ids)
            mask[:, :real] = 1
            assert relative(compiled(ids, mask), model(ids, mask).double()) <= 2 * gamma(
                "language_perceiver", torch.float32
            ), real
        explained = torch._dynamo.explain(model)(ids, mask)
    assert counter.frame_count == 1
    assert explained.graph_break_count == 0, explained.break_reasons


def test_torch_compile_language_model_refuses_ids_past_the_vocabulary():
    """The eager check of the ids' values steps aside under torch.compile (it would
    break the graph); an id past the table then made inductor's gather abort the
    process ("terminate called recursively"). An assert captured in the graph raises
    a RuntimeError naming the range instead (aot_eager here, which runs the same
    graph's ops; inductor in the full tier)."""
    torch._dynamo.reset()
    model = tiny("language_perceiver")
    compiled = torch.compile(model, backend="aot_eager")
    ids = tiny_inputs("language_perceiver")[0]
    with torch.no_grad():
        compiled(ids)
        for bad in (ids + 300, ids - 300):
            with pytest.raises(RuntimeError, match=r"input_ids must be token ids in \[0, 262\)"):
                compiled(bad)


@pytest.mark.full
def test_torch_compile_inductor_refuses_ids_past_the_vocabulary(tmp_path):
    """As above with inductor, in a child process: the failure was the whole
    process aborting."""
    import subprocess
    import sys

    script = tmp_path / "ids.py"
    script.write_text(
        "import torch, perceiver_torch as pt\n"
        "model = pt.build('language_perceiver', pt.TINY_CONFIGS['language_perceiver']).eval()\n"
        "compiled = torch.compile(model)\n"
        "ids = torch.randint(6, 262, (2, 64))\n"
        "with torch.no_grad():\n"
        "    compiled(ids)\n"
        "    try:\n"
        "        compiled(ids + 300)\n"
        "    except RuntimeError as error:\n"
        "        print('refused:', error)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: LanguagePerceiver: input_ids must be token ids in [0, 262)" in done.stdout


def test_torch_compile_of_a_bfloat16_model_is_quiet():
    """Compiling the language model in bfloat16 reaches the padding rule of its
    unequal head widths, which asks a cached probe of the CPU's vendor: dynamo warned
    the user about tracing through that ``functools.lru_cache`` (and read
    /proc/cpuinfo in the trace). The probe is a constant to it now."""
    import warnings

    from torch._dynamo import utils as dynamo_utils

    torch._dynamo.reset()
    # dynamo shows each warning once a process: forget the ones already shown
    dynamo_utils.warn_once_cache.clear()
    model = tiny("language_perceiver").to(torch.bfloat16)
    inputs = _compile_inputs("language_perceiver")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="aot_eager")(*inputs)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [
        str(w.message) for w in caught
    ]


@pytest.mark.full
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_inductor(name):
    _check_compiled(name, "inductor")


@pytest.mark.full
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_inductor_with_frozen_weights(name):
    """Inductor's weight freezing (``bench_forward.py --compile --freeze``), which
    keeps the weights in MKL's and oneDNN's packed layouts: the same function."""
    _check_compiled(name, "inductor", freezing=True)


@pytest.mark.full
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_max_autotune_bfloat16(name):
    """``bench_forward.py --dtype bfloat16 --compile --freeze --max-autotune``:
    inductor times its own matrix-product kernels (C++ templates, AMX where the CPU
    has it) against PyTorch's for every product and keeps the faster, with the
    weights frozen. Its kernels round in their own order and may fuse what the eager
    model rounds separately, so the bound is test_precision's for bfloat16 models:
    gamma_n against float64 of the same rounded weights and inputs."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = tiny(name).to(torch.bfloat16)
    with inductor_config.patch(
        freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"
    ):
        assert_within_rounding_bound(
            name, model, _compile_inputs(name), run=torch.compile(model)
        )
