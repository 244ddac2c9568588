"""Reduced precision (bfloat16, float16): bounds from rounding analysis, masks, load.

Every bound here is derived, not measured. The unit roundoff of a format with p
significand bits is u = 2^-p: bfloat16 u = 2^-8 = 3.9e-3, float16 u = 2^-11 = 4.9e-4,
float32 u = 2^-24. The references are float64 runs of the *same* rounded weights and
inputs, so the differences are the computation's rounding alone.

Whole models: along the path from input to output a value is rounded at most
``ROUNDINGS_PER_LAYER`` times per attention layer (the LayerNorm output, the q/k/v
projections, the softmax weights, the weighted sum, the output projection, the
residual sum; the MLP's LayerNorm, fc1, GELU, fc2 and residual sum) plus
``ROUNDINGS_OUTSIDE`` times in the pre- and postprocessing (the input itself, the
preprocessor's ops and position features, the output projection, the head, the
rescaling). With n such roundings the standard first-order bound (Higham, *Accuracy
and Stability of Numerical Algorithms*, ch. 3) is gamma_n = n u / (1 - n u) relative
error, with the errors propagated without amplification: true for these random
weights of std 0.1 (residual branches much smaller than the residual stream, logits
of order 1) and checked by the float32 run meeting the same formula with u = 2^-24.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math

import numpy as np
import pytest
import torch

import perceiver_torch as pt
from perceiver_torch import fast_paths
from perceiver_torch.attention import (
    FLOAT16_MASK_VALUE,
    MASK_VALUE,
    Attention,
    CrossAttentionLayer,
    attend,
    key_mask_bias,
    layer_norm,
)
from perceiver_torch.position_encoding import FourierPositionEncoding
from test_torch_models import randomize, tiny, tiny_inputs

NAMES = list(pt.MODEL_NAMES)
REDUCED = (torch.bfloat16, torch.float16)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
ROUNDINGS_PER_LAYER = 11
ROUNDINGS_OUTSIDE = 6


def attention_layers(name: str) -> int:
    """Attention layers on a tiny model's path: the encoder's cross-attention, its
    self-attention layers (times the blocks) and the decoder's cross-attention."""
    c = pt.TINY_CONFIGS[name]
    if name.startswith("imagenet"):
        self_attends = c.num_self_attends_per_block * c.num_blocks
    else:
        self_attends = c.num_self_attends
    return 1 + self_attends + 1


def gamma(name: str, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u) for the roundings of model ``name`` in ``dtype``."""
    n = ROUNDINGS_PER_LAYER * attention_layers(name) + ROUNDINGS_OUTSIDE
    nu = n * UNIT_ROUNDOFF[dtype]
    assert nu < 1
    return nu / (1 - nu)


def relative(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference| (float64); inf when not finite."""
    actual, reference = actual.detach().double(), reference.detach()
    if not torch.isfinite(actual).all():
        return math.inf
    return float((actual - reference).abs().max() / reference.abs().max())


def outputs(out) -> dict:
    return out if isinstance(out, dict) else {"output": out}


# -- whole models ------------------------------------------------------------------


@pytest.mark.parametrize("attention_kernel", ["onednn", "pytorch"])
@pytest.mark.parametrize("dtype", REDUCED + (torch.float32,), ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_model_within_rounding_bound_of_float64(name, dtype, attention_kernel):
    """The model in ``dtype`` against float64 of its own (rounded) weights and inputs:
    within gamma_n on every output; the output dtype is the model's. Both attention
    kernels a CPU may run: oneDNN's (the suite forces it where the kernel exists) and
    PyTorch's, which Intel CPUs keep (``linear.onednn_attention_preferred``)."""
    off = [pt.fast_paths.FastPath.ONEDNN_ATTENTION] if attention_kernel == "pytorch" else []
    with pt.fast_paths.plain(*off) if off else contextlib.nullcontext():
        assert_within_rounding_bound(name, tiny(name).to(dtype), tiny_inputs(name))


def assert_within_rounding_bound(name, model, inputs, run=None) -> None:
    """``run(*inputs)`` (default ``model(*inputs)``; float32 inputs, which the model
    casts) against float64 of ``model``'s own rounded weights and inputs: within
    gamma_n of ``model``'s dtype on every output, each output in that dtype."""
    dtype = model.dtype
    reference = copy.deepcopy(model).double()
    rounded = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        got = outputs((model if run is None else run)(*inputs))
        expected = outputs(reference(*rounded))
    bound = gamma(name, dtype)
    for key in expected:
        assert got[key].dtype == dtype, key
        assert relative(got[key], expected[key]) <= bound, (key, bound)


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_build_and_to_dtype(dtype):
    model = pt.build("imagenet_conv", pt.TINY_CONFIGS["imagenet_conv"], dtype=dtype)
    assert model.dtype == dtype
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert tensor.dtype == torch.int64  # integer buffers keep their dtype
        else:
            assert tensor.dtype == dtype, key
    with pytest.raises(ValueError, match="unknown dtype"):
        pt.build("imagenet_conv", pt.TINY_CONFIGS["imagenet_conv"], dtype="float8")


# -- blocks ---------------------------------------------------------------------


def _reference_attention(module: Attention, q_in, kv_in, key_mask, query_mask):
    """The reference's attention in float64, spelled out: logits = q.k, scaled,
    masked logits *replaced* by -1e30, softmax, fully-masked rows zeroed, to_out."""
    m = copy.deepcopy(module).double()
    h = m.num_heads
    q = m.to_q(q_in.double())
    k = m.to_k(kv_in.double())
    v = m.to_v(kv_in.double())
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(b, nq, h, -1).transpose(1, 2)
    k = k.view(b, nk, h, -1).transpose(1, 2)
    v = v.view(b, nk, h, -1).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) * m.scale
    mask = (query_mask[:, :, None] != 0) & (key_mask[:, None, :] != 0)
    logits = torch.where(mask[:, None], logits, torch.tensor(-1e30, dtype=torch.float64))
    summed = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(b, nq, -1)
    fully_masked = ~mask.any(-1)
    summed = torch.where(fully_masked[..., None], torch.zeros(()).double(), summed)
    return m.to_out(summed), fully_masked


@pytest.mark.parametrize("dtype", REDUCED + (torch.float32,), ids=str)
@pytest.mark.parametrize(
    "widths",
    [
        dict(num_heads=2, qk_channels=16, v_channels=16),  # fused SDPA kernel
        dict(num_heads=2, qk_channels=16, v_channels=24),  # SDPA, q and k zero-padded
        dict(num_heads=2, qk_channels=16, v_channels=600),  # too wide to pad: explicit
        dict(num_heads=1, qk_channels=24, v_channels=24),  # may fold (absorb_*)
    ],
    ids=["sdpa", "padded", "explicit", "one_head"],
)
def test_masked_attention_in_reduced_precision(dtype, widths):
    """Key and query masks with fully-masked rows (a query masked, and a batch row
    whose keys are all masked): finite outputs, the masked rows are exactly the
    output bias, and the rest is within the roundings of one attention (5: the
    projections, the softmax weights, the weighted sum, to_out; plus the inputs'),
    i.e. gamma_6, of the float64 reference."""
    torch.manual_seed(0)
    module = Attention(q_channels=12, kv_channels=20, output_channels=12, **widths)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.2 * torch.randn(p.shape))
    module = module.to(dtype).eval()
    q_in = torch.randn(2, 5, 12).to(dtype)
    kv_in = torch.randn(2, 7, 20).to(dtype)
    key_mask = torch.ones(2, 7, dtype=torch.int64)
    key_mask[0, 4:] = 0
    key_mask[1] = 0  # every key of batch row 1 masked
    query_mask = torch.ones(2, 5, dtype=torch.int64)
    query_mask[0, 1] = 0
    with torch.no_grad():
        expected, fully_masked = _reference_attention(
            module, q_in, kv_in, key_mask, query_mask
        )
    for mode in (None, "standard", "absorb_kv", "absorb_q"):
        if mode not in (None, "standard") and module.num_heads != 1:
            continue
        # Several heads: the kernel the id names, not oneDNN's (which the suite forces).
        off = [pt.fast_paths.FastPath.ONEDNN_ATTENTION] if module.num_heads > 1 else []
        with torch.no_grad(), pt.fast_paths.plain(*off) if off else contextlib.nullcontext():
            prepared = module.prepare(kv_in, key_mask=key_mask, mode=mode)
            got = module.attend_prepared(q_in, prepared, query_mask=query_mask)
        assert got.dtype == dtype and torch.isfinite(got).all(), mode
        assert torch.equal(
            got[fully_masked], module.to_out.bias.expand(int(fully_masked.sum()), -1)
        ), mode
        n = 6
        u = UNIT_ROUNDOFF[dtype]
        # The kernels accumulate every inner product in float32: a sum of L terms adds
        # up to L float32 roundings (Higham's gamma_L), negligible for short sums but
        # not for to_out's 600 in float32.
        longest = max(module.v_channels, module.to_k.in_features, module.to_q.in_features)
        accumulation = longest * UNIT_ROUNDOFF[torch.float32]
        assert relative(got, expected) <= n * u / (1 - n * u) + accumulation, mode


def test_mask_values_fit_the_dtype():
    for dtype, value in (
        (torch.float32, MASK_VALUE),
        (torch.bfloat16, MASK_VALUE),
        (torch.float16, FLOAT16_MASK_VALUE),
    ):
        bias = key_mask_bias(torch.tensor([[1, 0]]), dtype)
        assert bias.dtype == dtype and torch.isfinite(bias).all()
        assert bias[0, 0, 0, 0] == 0
        # The stored value is the mask value rounded to the dtype, and far below any
        # logit the dtype can hold next to it (float16: |logit| <= 65504 - 1e4).
        assert float(bias[0, 0, 0, 1]) == float(torch.tensor(value, dtype=dtype))


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_layer_norm_statistics_are_float32(dtype):
    """Inputs with a large common offset (mean 64, std 1, all exactly representable
    in the dtype): float32 statistics leave only the rounding of the output (u per
    element, plus the ~2^-24-relative statistics); statistics accumulated in the
    dtype would be off by about u * 64 / 1 = 0.25 (bfloat16) of the output's scale."""
    torch.manual_seed(0)
    norm = layer_norm(256)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(256))
        norm.bias.copy_(0.1 * torch.randn(256))
    x = (64 + torch.randn(4, 256)).to(dtype)
    with torch.no_grad():
        expected = copy.deepcopy(norm).double()(x.double())
        got = norm.to(dtype)(x)
    assert got.dtype == dtype
    u = UNIT_ROUNDOFF[dtype]
    # Output rounding (u) plus the weight's and bias's products and sum (2u).
    assert relative(got, expected) <= 3 * u / (1 - 3 * u)


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_fourier_features_are_rounded_from_float64(dtype):
    """Features in a reduced dtype are the float64 values rounded once: exactly equal
    (computing sin(pi x f) for f up to 15,360 in bfloat16 would be wrong by O(1))."""
    encoding = FourierPositionEncoding(num_bands=64, max_resolution=(30720,))
    got = encoding.grid((1920,), dtype=dtype)
    exact = encoding.grid((1920,), dtype=torch.float64)
    assert got.dtype == dtype
    assert torch.equal(got, exact.to(dtype))


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_flow_tiling_in_reduced_precision(dtype):
    """Tiled flow in ``dtype`` (float32 blending sums) against float64 tiling of the
    same rounded weights and frames: a tile's bound plus the final rounding (the
    blending is a convex combination, which does not amplify errors)."""
    name = "optical_flow"
    model = tiny(name).to(dtype)
    reference = copy.deepcopy(model).double()
    th, tw = pt.TINY_CONFIGS[name].image_size
    gen = torch.Generator().manual_seed(3)
    frames = torch.rand(2, 2, 3, th + 9, tw + 14, generator=gen) * 2 - 1
    with torch.no_grad():
        got = model.tiled(frames, min_overlap=4)
        expected = reference.tiled(frames.to(dtype), min_overlap=4)
    assert got.dtype == dtype and got.shape == (2, 2, th + 9, tw + 14)
    u = UNIT_ROUNDOFF[dtype]
    assert relative(got, expected) <= gamma(name, dtype) + u


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_flow_tiling_sums_are_float32(dtype):
    """Tiles of 300x400 px (blending weights up to 150) whose flow is one constant c
    of the dtype: every blended pixel must be exactly c. In float32 the sums of
    c * weight (an 8- or 11-bit significand times an integer <= 150) and of the
    weights are exact, so their quotient is c; sums kept in bfloat16 (3 significant
    digits: 367 is not representable) would round."""
    model = tiny("optical_flow").to(dtype)
    c = torch.tensor(0.3, dtype=dtype)

    def constant_flow(frames):
        b, _, _, h, w = frames.shape
        return torch.full((b, 2, h, w), float(c), dtype=dtype)

    model.forward = constant_flow
    frames = torch.zeros(1, 2, 3, 340, 470)
    with torch.no_grad():
        out = model.tiled(frames, tile_size=(300, 400), min_overlap=20)
    assert out.dtype == dtype
    assert torch.equal(out, torch.full_like(out, float(c)))


# -- converted files ------------------------------------------------------------------


@pytest.mark.parametrize("file_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_converted_file_loads_in_its_dtype(tmp_path, file_dtype, suffix):
    """A file converted with --dtype loads in that dtype by default (metadata
    "dtype"); dtype= overrides it; the weights are the float32 conversion's, rounded."""
    import converter
    from converter.fixtures import write_fixture

    name = "imagenet_conv"
    source = tmp_path / "fixture.pickle"
    write_fixture(name, source, size="tiny", seed=4)
    full = converter.convert(source, tmp_path / f"f32{suffix}")
    half = converter.convert(source, tmp_path / f"half{suffix}", dtype=file_dtype)
    assert json.loads(json.dumps(half.metadata))["dtype"] == file_dtype
    torch_dtype = getattr(torch, file_dtype)
    reference = pt.load(full.output)
    assert reference.dtype == torch.float32
    loaded = pt.load(half.output)
    assert loaded.dtype == torch_dtype and not loaded.training
    as_float32 = pt.load(half.output, dtype="float32")
    assert as_float32.dtype == torch.float32
    other = "float16" if file_dtype == "bfloat16" else "bfloat16"
    assert pt.load(half.output, dtype=other).dtype == getattr(torch, other)
    expected = reference.state_dict()
    for key, tensor in loaded.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch_dtype, key
            assert torch.equal(tensor, expected[key].to(torch_dtype)), key
            assert torch.equal(as_float32.state_dict()[key], tensor.float()), key
        else:
            assert torch.equal(tensor, expected[key]), key
    # And it runs, on float32 inputs.
    (images,) = tiny_inputs(name, batch=1)
    with torch.no_grad():
        assert loaded(images).dtype == torch_dtype


def test_out_of_range_finds_what_rounds_to_inf():
    """float16's largest value is 65504 = (2 - 2^-10) 2^15; the next step would be
    2^16, so 65520 is the halfway point and rounds to even, i.e. to 2^16 = inf
    (IEEE 754 round-to-nearest-even); everything below it rounds to 65504 or less.
    bfloat16's largest is (2 - 2^-7) 2^127, halfway to 2^128: (2 - 2^-8) 2^127."""
    from perceiver_torch.registry import out_of_range

    below = np.nextafter(np.float32(65520), np.float32(0))
    weights = np.array([[1.0, -below]], np.float32)
    assert out_of_range([("w", weights)], torch.float16) == []
    assert out_of_range([("w", -weights)], torch.float16) == []
    weights[0, 0] = -65520.0
    assert out_of_range([("w", weights), ("b", np.ones(3, np.float32))], torch.float16) == [
        ("w", 65520.0)]
    assert out_of_range([("w", torch.from_numpy(weights))], torch.bfloat16) == []
    halfway = np.float32((2 - 2.0**-8) * 2.0**127)
    bfloat_below = np.nextafter(halfway, np.float32(0))
    assert out_of_range([("w", np.array([bfloat_below]))], torch.bfloat16) == []
    assert out_of_range([("w", np.array([halfway]))], torch.bfloat16) == [
        ("w", float(halfway))]
    # Integer tensors (BatchNorm's counter), empty ones and float16 into float16: none.
    assert out_of_range([("n", np.array(10**6, np.int32)), ("e", np.zeros(0, np.float32)),
                         ("h", torch.full((2,), 65504.0, dtype=torch.float16))],
                        torch.float16) == []


def test_underflow_counts_follow_round_to_nearest_even():
    """float16's subnormal numbers are k 2^-24 (k = 1..1023), its smallest normal
    2^-14. Round to nearest even: 2^-25 is the tie between 0 and 2^-24 and becomes 0,
    anything above it 2^-24 or more; 2^-14 - 2^-25 is the tie between 1023 2^-24 and
    2^-14 and becomes the (even) normal 2^-14, anything below it a subnormal. Exact
    zeros lose nothing and are not counted; bfloat16 (float32's exponent range),
    float32 and float16 into float16 count nothing."""
    from perceiver_torch.registry import TensorUnderflow, scan_for_dtype

    def after(x, toward):
        return float(np.nextafter(np.float32(x), np.float32(toward)))

    flushed = [2.0**-25, -(2.0**-25), 1e-9, after(2.0**-25, 0), 2.0**-149]
    subnormal = [after(2.0**-25, 1), 1e-6, -1e-6, after(2.0**-14 - 2.0**-25, 0)]
    normal = [2.0**-14 - 2.0**-25, 2.0**-14, 1e-3, -1.0]
    weights = np.array(flushed + subnormal + normal + [0.0, -0.0], np.float32)
    second = np.array([3e-5, 1.0], np.float32)
    scan = scan_for_dtype([("w", weights), ("b", second), ("n", np.arange(3))],
                          torch.float16)
    assert scan.out_of_range == []
    underflow = scan.underflow
    assert underflow.tensors == (
        TensorUnderflow("w", len(flushed), len(subnormal), weights.size),
        TensorUnderflow("b", 0, 1, 2),
    )
    assert (underflow.zero, underflow.subnormal) == (len(flushed), len(subnormal) + 1)
    assert underflow.weights == weights.size + second.size
    # bfloat16 sources hold the same tiny magnitudes (1e-9 and 1e-6 to 3 digits).
    in_bfloat16 = torch.tensor([1e-9, 1e-6, 1e-3, 0.0], dtype=torch.bfloat16)
    assert scan_for_dtype([("w", in_bfloat16)], torch.float16).underflow.tensors == (
        TensorUnderflow("w", 1, 1, 4),)
    for dtype in (torch.bfloat16, torch.float32):
        assert scan_for_dtype([("w", weights)], dtype).underflow is None
    already = torch.from_numpy(weights).to(torch.float16)
    assert scan_for_dtype([("w", already)], torch.float16).underflow is None
    assert scan_for_dtype([("w", np.ones(3, np.float32))], torch.float16).underflow is None


def test_float16_reports_the_weights_it_makes_subnormal_or_zero(tmp_path):
    """Weights below float16's smallest normal number became subnormal or 0 without
    a word. convert(dtype="float16") counts them (not refusing); float32 and
    bfloat16 say nothing. load(..., dtype="float16") stays silent: a trained
    checkpoint always has such weights, and a warning on every load would say
    nothing to act on."""
    import warnings

    import converter
    from helpers import checkpoint_with_tiny_weights, expected_float16_underflow

    source = checkpoint_with_tiny_weights(tmp_path)
    expected = expected_float16_underflow()
    half = converter.convert(source, tmp_path / "half.safetensors", dtype="float16")
    assert half.as_dict()["float16_underflow"] == expected
    note = half.underflow_note()
    total = f"{expected['weights']:,}"
    assert f"float16 loses precision in 5 of the {total} weights: 3 become subnormal" in note
    assert "and 2 nonzero ones become 0" in note
    assert f"verify {source} --dtype float16` measures" in note
    # The values written are the ones counted.
    bias = pt.load(half.output).decoder.output_projection.bias[:5].float()
    assert bias[:2].tolist() == [0.0, 0.0] and 0 < bias[2] < 2.0**-14 <= bias[3]
    for dtype in ("float32", "bfloat16"):
        result = converter.convert(source, tmp_path / f"{dtype}.safetensors", dtype=dtype)
        assert result.underflow is None and result.underflow_note() is None
        assert result.as_dict()["float16_underflow"] is None

    # load() rounds them without a word (a trained checkpoint always has some).
    for path, dtype in ((tmp_path / "float32.safetensors", "float16"),
                        (tmp_path / "bfloat16.safetensors", "float16"), (half.output, None)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pt.load(path, dtype=dtype)


def _checkpoint_with_a_large_bias(tmp_path, value: float):
    """A tiny imagenet_conv checkpoint whose classifier bias holds ``value``."""
    import converter
    from converter.fixtures import write_fixture

    source = tmp_path / "fixture.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=4)
    checkpoint = converter.load_haiku_checkpoint(source)
    checkpoint.params["classification_decoder/~/basic_decoder/output"]["b"][3] = value
    large = tmp_path / "large.pickle"
    converter.save_haiku_checkpoint(large, checkpoint.params, checkpoint.state)
    return large


def test_float16_refuses_weights_beyond_its_range(tmp_path):
    """A finite float32 weight of 1e5 became inf in a float16 file, silently (every
    export then refused the file as corrupt). convert, load and run refuse it, naming
    the tensor; bfloat16, which has float32's range, takes it."""
    import converter
    from converter.errors import UsageError
    from helpers import run_cli
    from perceiver_torch.registry import OutOfRangeError

    large = _checkpoint_with_a_large_bias(tmp_path, 1e5)
    with pytest.raises(UsageError) as refused:
        converter.convert(large, tmp_path / "half.safetensors", dtype="float16")
    message = str(refused.value)
    assert "decoder.output_projection.bias (up to 100000)" in message
    assert "float16's range (largest magnitude 65504)" in message
    assert "use bfloat16 (float32's range) or float32" in message
    assert not (tmp_path / "half.safetensors").exists()
    with pytest.raises(UsageError):
        converter.convert(large, None, dtype="float16")
    converted = converter.convert(large, tmp_path / "bf16.safetensors", dtype="bfloat16")
    assert torch.isfinite(converted.build_model().decoder.output_projection.bias).all()

    full = converter.convert(large, tmp_path / "f32.safetensors")
    with pytest.raises(OutOfRangeError, match="decoder.output_projection.bias"):
        pt.load(full.output, dtype="float16")
    assert pt.load(full.output, dtype="bfloat16").dtype == torch.bfloat16

    image = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(image)
    for model in (large, full.output):  # official (converted in memory) and converted
        result = run_cli("run", "classify", model, image, "--dtype", "float16")
        assert result.exit_code == 2, result.stderr  # the option, not the file
        assert "beyond float16's range" in result.stderr and "Traceback" not in result.stderr


def test_in_memory_conversion_builds_in_its_dtype(tmp_path):
    """convert(out=None, dtype=...).build_model() is the model loading the file gives
    (it was a float32 model holding the rounded weights)."""
    import converter
    from converter.fixtures import write_fixture

    source = tmp_path / "fixture.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=4)
    (images,) = tiny_inputs("imagenet_conv", batch=2)
    for dtype in ("bfloat16", "float16", "float32"):
        in_memory = converter.convert(source, None, dtype=dtype).build_model()
        from_file = pt.load(converter.convert(
            source, tmp_path / f"{dtype}.safetensors", dtype=dtype).output)
        assert in_memory.dtype == from_file.dtype == getattr(torch, dtype)
        with torch.no_grad():
            assert torch.equal(in_memory(images), from_file(images))


def packed_layers(model: torch.nn.Module) -> int:
    """How many of ``model``'s linear layers have their weight packed: a copy of their
    own, or a fused one with the other projections of their attention; none twice."""
    fused = {
        id(layer)
        for sub in model.modules()
        if hasattr(sub, "fused_linear_groups")
        for layers, weights in sub.fused_linear_groups()
        if weights.made
        for layer in layers
    }
    own = {
        id(sub)
        for sub in model.modules()
        if isinstance(sub, pt.linear.Linear)
        and (sub._packed is not None or sub._mkl_packed is not None)
    }
    assert not own & fused, "a weight packed twice"
    return len(own | fused)


@pytest.mark.skipif(
    not pt.linear.onednn_kernel_available(torch.bfloat16),
    reason="this torch has no bfloat16 oneDNN kernel",
)
@pytest.mark.parametrize("mkl", [False, True], ids=["onednn", "mkl"])
def test_load_packs_weights_as_asked(tmp_path, monkeypatch, mkl):
    """load() makes the packed copies itself (not the first forward pass): by default
    for bfloat16 on CPUs that multiply it in hardware, in float32 only when asked
    (pack_weights=True), never with pack_weights=False; the outputs stay the same
    model's (within the bfloat16 bound of the whole-model test above). Float32 copies
    that are MKL's (Intel CPUs with AVX-512) are made by the first call instead."""
    import converter
    from converter.fixtures import write_fixture

    if mkl and not pt.linear._mkl_probe():
        pytest.skip("this torch has no MKL packed-weight kernel")
    monkeypatch.setattr(pt.linear, "packs_by_default", lambda dtype: dtype == torch.bfloat16)
    monkeypatch.setattr(pt.linear, "cpu_prefers_mkl_packing", lambda: mkl)
    monkeypatch.setattr(fast_paths, "_environment", None)  # read again, then restored
    monkeypatch.setenv("PERCEIVER_TORCH_ONEDNN", "1")  # the oneDNN path on any CPU
    source = tmp_path / "fixture.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=6)
    path = converter.convert(source, tmp_path / "conv.safetensors").output
    linears = sum(1 for sub in pt.load(path).modules() if isinstance(sub, pt.linear.Linear))
    assert packed_layers(pt.load(path)) == 0  # float32: not by default
    (images,) = tiny_inputs("imagenet_conv", batch=2)
    packed32 = pt.load(path, pack_weights=True)
    assert packed_layers(packed32) == (0 if mkl else linears)
    with torch.no_grad():
        packed32(images)
    # MKL's copies exist where a layer computed a product: not for the cross-attentions'
    # k projections, whose weights the absorbed attentions (one head) multiply directly.
    if not mkl:
        assert packed_layers(packed32) == linears
    else:
        without_copy = {
            name
            for name, sub in packed32.named_modules()
            if isinstance(sub, pt.linear.Linear) and packed_layers(sub) == 0
        }
        assert without_copy == {
            "encoder.cross_attention.attention.to_k",
            "decoder.cross_attention.attention.to_k",
        }
        assert packed_layers(packed32) == linears - 2
    packed = pt.load(path, dtype="bfloat16")
    assert packed_layers(packed) == linears
    plain = pt.load(path, dtype="bfloat16", pack_weights=False)
    assert packed_layers(plain) == 0
    reference = copy.deepcopy(plain).double()
    with torch.no_grad():
        got = packed(images)
        assert packed_layers(plain) == 0  # and none made by the call
        expected = reference(images.to(torch.bfloat16).double())
    assert relative(got, expected) <= gamma("imagenet_conv", torch.bfloat16)


# -- the fidelity report (verify --dtype) -------------------------------------------


def test_psnr_and_end_point_error():
    from converter.precision import end_point_error, psnr

    reference = np.linspace(-1.0, 1.0, 101)  # peak-to-peak 2
    # RMS difference 0.01: 20 log10(2 / 0.01) = 20 log10(200) dB.
    assert psnr(reference, reference + 0.01) == pytest.approx(20 * math.log10(200))
    assert psnr(reference, reference) == math.inf
    flow = np.zeros((1, 2, 2, 2))
    moved = flow.copy()
    moved[0, 0, 0] = (3.0, 4.0)  # one pixel off by 5 px, three exact
    assert end_point_error(flow, moved) == (pytest.approx(5 / 4), pytest.approx(5.0))


def test_structured_inputs_are_not_noise():
    """Neighbouring pixels of the generated images are close (a noise image's are
    not: their mean |difference| would be about 1/3 of the range)."""
    from converter.precision import natural_tokens, structured_images, textured_frame

    images = structured_images(8, 32, 32)
    assert images.shape == (8, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    assert len({images[i].tobytes() for i in range(8)}) == 8  # all different
    step = np.abs(np.diff(images, axis=2)).mean()
    assert step < 0.1
    frame = textured_frame(24, 32)
    assert np.abs(frame).max() == pytest.approx(1.0)
    assert np.abs(np.diff(frame, axis=1)).mean() < 0.1
    ids, mask = natural_tokens(2048)
    assert ids.shape == (1, 2048) and bool(mask.all())
    assert 0.1 < float((ids == pt.BytesTokenizer.MASK).float().mean()) < 0.2


@pytest.fixture(scope="module")
def jax_ready():
    pytest.importorskip("jax")
    pytest.importorskip("haiku")


# The CLI with JAX costs seconds per model: three cases (language, flow in float16,
# video with its whole clip) in the default tier, the other three in the full tier.
_FIDELITY_CASES = [
    pytest.param(name, dtype, marks=[] if default else [pytest.mark.full])
    for name, dtype, default in (
        ("language_perceiver", "bfloat16", True),
        ("optical_flow", "float16", True),
        ("video_autoencoding", "bfloat16", True),
        ("imagenet_learned", "bfloat16", False),
        ("imagenet_fourier", "bfloat16", False),
        ("imagenet_conv", "bfloat16", False),
    )
]


@pytest.mark.jax
@pytest.mark.parametrize("name, dtype", _FIDELITY_CASES)
def test_verify_dtype_reports_fidelity(jax_ready, tmp_path, name, dtype):
    from converter.fixtures import write_fixture
    from helpers import run_cli

    source = tmp_path / f"{name}.pickle"
    write_fixture(name, source, size="tiny", seed=2)
    result = run_cli("verify", source, "--dtype", dtype, "--json", "-q")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["passed"]  # the float32 parity check still runs
    fidelity = document["fidelity"]
    assert fidelity["model"] == name and fidelity["dtype"] == dtype and fidelity["finite"]
    rows = fidelity["rows"]
    runs = {(r["output"], r["run"], r["against"]) for r in rows}
    bound = gamma(name, getattr(torch, dtype))
    for row in rows:
        if row["run"] == dtype and row["against"] == "float32":
            assert 0 < row["relative"] <= bound, row
        if row["run"] == "float32":
            # The converted float32 model against JAX: its parity tolerance (1e-5;
            # 1e-4 for the video audio's Fourier features, see the mapping).
            assert row["relative"] <= (1e-4 if row["output"] == "audio" else 1e-5), row
    outputs_ = {r["output"] for r in rows}
    for output in outputs_ - {"image (clip)", "audio (clip)"}:
        for run, against in (("float32", "jax"), (dtype, "jax"), (dtype, "float32")):
            assert (output, run, against) in runs
    by_output = {r["output"]: r for r in rows if r["run"] == dtype}
    if name == "optical_flow":
        assert by_output["flow"]["epe_mean"] > 0 and by_output["flow"]["epe_max"] > 0
    elif name == "video_autoencoding":
        assert {"image (clip)", "audio (clip)"} <= outputs_
        assert all(by_output[k]["psnr_db"] > 0 for k in ("image", "audio", "image (clip)"))
        assert 0 <= by_output["label"]["argmax_agreement"] <= 1
    else:
        assert 0 <= by_output["logits"]["argmax_agreement"] <= 1
    assert f"fidelity of {name} in {dtype}" in result.stderr


@pytest.mark.jax
def test_verify_dtype_notes_a_cpu_without_its_matrix_instructions(jax_ready, tmp_path, monkeypatch):
    import perceiver_torch.linear as linear
    from converter.fixtures import write_fixture
    from helpers import run_cli

    source = tmp_path / "imagenet_conv.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=2)
    monkeypatch.setattr(linear, "cpu_has_matmul_instructions", lambda d: d == torch.float32)
    result = run_cli("verify", source, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert "no bfloat16 matrix instructions" in result.stderr
    assert "the report holds all the same" in result.stderr
    assert "fidelity of imagenet_conv in bfloat16" in result.stderr


@pytest.mark.jax
def test_verify_dtype_fails_on_non_finite_outputs(jax_ready, tmp_path, monkeypatch):
    from converter import precision
    from converter.fixtures import write_fixture
    from helpers import run_cli

    original = precision._run

    def overflowing(model, case):
        out = original(model, case)
        if next(model.parameters()).dtype != torch.float32:
            out = {k: np.full_like(v, np.inf) for k, v in out.items()}
        return out

    monkeypatch.setattr(precision, "_run", overflowing)
    source = tmp_path / "fixture.pickle"
    write_fixture("imagenet_fourier", source, size="tiny")
    result = run_cli("verify", source, "--dtype", "float16", "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["fidelity"]["finite"] is False
    assert "not all finite" in result.stderr
    # Parity within tolerance, yet exit 1: the document's top-level "passed" (and the
    # fidelity's) give the exit code's verdict (it said true).
    assert all(c["passed"] is not False for c in document["comparisons"])
    assert document["fidelity"]["passed"] is False
    assert document["passed"] is False


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_unequal_head_widths_pad_to_the_fused_kernel_in_reduced_precision(dtype, monkeypatch):
    """bfloat16/float16 heads of unequal qk and v widths up to 256 (up to 512 with the
    qk side at least a quarter of the wider) run the fused kernel on zero-padded
    inputs, and so do equal widths from 128 up that are not a multiple of 32 (padded
    to one; keys that are the values padded once); other ones and float32 keep the
    explicit path or the plain fused kernel. All agree with float64 within the
    roundings of the inputs, the weights and the weighted sum (gamma_4); a padded qk
    side keeps the true width's scale."""
    from perceiver_torch import attention

    monkeypatch.setattr(attention, "cpu_prefers_onednn_attention", lambda: False)  # Intel
    _check_padding_choices(dtype, monkeypatch, [
        ((32, 160), True), ((160, 32), True), ((16, 300), False),
        ((197, 512), True), ((512, 128), True), ((64, 512), False), ((200, 520), False),
        ((130, 130), True), ((322, 322), True), ((160, 160), False), ((100, 100), False),
        ((130, "shared"), True),
    ])


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_unequal_head_widths_stay_explicit_where_the_fused_kernel_is_slow(dtype, monkeypatch):
    """On CPUs that are not Intel's (cpu_prefers_onednn_attention), whose fused kernel
    runs bfloat16 through slower code, heads of unequal widths keep the explicit path
    in every dtype; equal widths that are not a multiple of 32 are still padded to
    one. The same bounds against float64 hold."""
    from perceiver_torch import attention

    monkeypatch.setattr(attention, "cpu_prefers_onednn_attention", lambda: True)  # AMD
    _check_padding_choices(dtype, monkeypatch, [
        ((32, 160), False), ((160, 32), False), ((197, 512), False), ((512, 128), False),
        ((130, 130), True), ((160, 160), False), ((130, "shared"), True),
    ])


def _check_padding_choices(dtype, monkeypatch, cases) -> None:
    """For each ((qk width, v width or "shared"), pads): whether attend pads to the
    fused kernel in ``dtype`` with PyTorch's kernels (never in float32), and that its
    answer agrees with float64 within gamma_4 of ``dtype``."""
    from perceiver_torch import attention

    used = []
    original = attention._attend_padded
    monkeypatch.setattr(
        attention, "_attend_padded", lambda *a, **k: used.append(1) or original(*a, **k)
    )
    torch.manual_seed(0)
    for (dqk, dv), pads in cases:
        q, k, v = (
            torch.randn(2, 3, n, d) for n, d in ((9, dqk), (11, dqk), (11, dqk if dv == "shared" else dv))
        )
        if dv == "shared":
            v = k  # absorb_kv: the keys are the values
        bias = torch.zeros(2, 1, 1, 11)
        bias[0, ..., 7:] = MASK_VALUE
        reference = attention.attend(
            *(t.to(dtype).double() for t in (q, k, v)), bias=bias.double()
        )
        used.clear()
        # PyTorch's kernels (the suite forces oneDNN's where it exists).
        with torch.no_grad(), pt.fast_paths.plain(pt.fast_paths.FastPath.ONEDNN_ATTENTION):
            got = attention.attend(*(t.to(dtype) for t in (q, k, v)), bias=bias.to(dtype))
        assert bool(used) is pads, (dqk, dv)
        assert got.shape == reference.shape and got.dtype == dtype
        u = UNIT_ROUNDOFF[dtype]
        assert relative(got, reference) <= 4 * u / (1 - 4 * u), (dqk, dv)
        used.clear()
        with torch.no_grad():
            attention.attend(q, k, v, bias=bias)
        assert not used  # float32: the explicit path


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_absorbed_keys_are_normalised_into_their_padded_width(dtype, monkeypatch):
    """A one-head cross-attention whose keys are its normalised inputs (ABSORB_KV) and
    whose width the fused kernel pads (bfloat16/float16, 161 -> 192 channels):
    ``prepare`` writes the LayerNorm in chunks into the zero-padded array, so the
    inputs are not held twice, and the layer computes exactly what padding them in
    the kernel's call computed (the same numbers in, the same kernel). float32 keeps
    its width."""
    from perceiver_torch import attention

    monkeypatch.setattr(attention, "_PADDED_NORM_ELEMENTS", 161 * 40)  # 40-row chunks
    torch.manual_seed(3)
    layer = randomize(CrossAttentionLayer(q_channels=24, kv_channels=161, num_heads=1))
    layer = layer.to(dtype).eval()
    inputs_q = torch.randn(2, 5, 24).to(dtype)
    inputs_kv = torch.randn(2, 130, 161).to(dtype)
    key_mask = torch.ones(2, 130, dtype=torch.int64)
    key_mask[0, 100:] = 0
    # PyTorch's kernels, as on Intel CPUs (the suite forces oneDNN's where it exists).
    with torch.no_grad(), pt.fast_paths.plain(pt.fast_paths.FastPath.ONEDNN_ATTENTION):
        prepared = layer.prepare(inputs_kv, key_mask=key_mask, mode="absorb_kv")
        assert prepared.k is prepared.v and prepared.k.shape == (2, 1, 130, 192)
        assert torch.equal(prepared.k[..., :161], layer.kv_norm(inputs_kv)[:, None])
        assert not prepared.k[..., 161:].any()
        got = layer.attend_prepared(inputs_q, prepared)
        monkeypatch.setattr(
            attention.Attention, "absorbed_key_width", lambda self, x, m: x.shape[-1]
        )
        unpadded = layer.prepare(inputs_kv, key_mask=key_mask, mode="absorb_kv")
        assert unpadded.k.shape[-1] == 161  # padded by attend, as before
        assert torch.equal(got, layer.attend_prepared(inputs_q, unpadded))
        monkeypatch.undo()
        float32 = copy.deepcopy(layer).float()
        assert float32.prepare(inputs_kv.float(), mode="absorb_kv").k.shape[-1] == 161


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_masked_key_with_a_large_logit_gets_no_weight(dtype):
    """The reference replaces masked logits (-1e30; -1e4 in float16), so a masked key
    gets no weight whatever its own logit. Here its logit is 120 * 540 / sqrt(16) =
    16,200 (q and k exactly representable in every dtype), the kept keys' 3-27: in
    float16 the added -1e4 left it 6,200, and it took all the weight. Against float64
    with the reference's replacement, the weights are the kept keys' softmax: the
    output's error is the rounding of q, k, v (exact here), of the float32 logits and
    softmax, and of the output to the dtype (u), so within 4u."""
    d, n = 16, 4
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 120.0
    k = torch.zeros(1, 1, n, d)
    k[0, 0, :, 0] = torch.tensor([0.1, 0.25, 0.9, 540.0])  # key 3 is masked
    v = torch.nn.functional.pad(torch.eye(n)[None, None], (0, d - n))
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    replaced = torch.where(mask[:, None, None, :].bool(), logits, torch.tensor(-1e4).double())
    expected = torch.softmax(replaced, -1) @ v.double()
    got = attend(q.to(dtype), k.to(dtype), v.to(dtype), bias=key_mask_bias(mask, dtype))
    assert float(got[0, 0, 0, 3]) == 0.0
    u = UNIT_ROUNDOFF[dtype]
    assert (got.double() - expected).abs().max() <= 4 * u
