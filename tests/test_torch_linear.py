"""perceiver_torch.linear.Linear: the oneDNN inference path computes F.linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from float64_reference import check_within_float32_rounding
from perceiver_torch import fast_paths, linear as linear_module
from perceiver_torch.linear import Linear


def test_inference_path_matches_f_linear(monkeypatch):
    if not linear_module._onednn_linear_enabled():
        pytest.skip("this torch has no oneDNN linear kernel: Linear is F.linear here")
    torch.manual_seed(0)
    layer = Linear(96, 40)
    x = torch.randn(3, 17, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())

    def not_expected(*args, **kwargs):
        raise AssertionError("the inference path fell back to F.linear")

    # What is compared below must come from the oneDNN kernel, not F.linear itself.
    monkeypatch.setattr(linear_module.F, "linear", not_expected)
    with torch.inference_mode():
        fast = layer(x)
    with torch.no_grad():
        also_fast = layer(x.transpose(0, 1).contiguous().transpose(0, 1))  # strided
    assert fast.shape == expected.shape == (3, 17, 40)
    # Another order of the same 96-term sums: as close to float64 as MKL's.
    check_within_float32_rounding("oneDNN", fast, expected, exact)
    check_within_float32_rounding("oneDNN, strided input", also_fast, expected, exact)


def test_training_uses_autograd_path():
    layer = Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_switch_off_with_the_environment(monkeypatch):
    monkeypatch.setattr(linear_module, "_available", {})
    monkeypatch.setattr(fast_paths, "_environment", None)  # read again, then restored
    monkeypatch.setenv("PERCEIVER_TORCH_ONEDNN", "0")
    assert linear_module._onednn_linear_enabled() is False
    layer = Linear(6, 3)
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_state_dict_keys_are_nn_linears():
    assert set(Linear(3, 2).state_dict()) == {"weight", "bias"}
    assert isinstance(Linear(3, 2), torch.nn.Linear)


needs_onednn = pytest.mark.skipif(
    not linear_module.onednn_kernel_available(), reason="this torch has no oneDNN kernel"
)


@needs_onednn
def test_fused_gelu_and_residual_within_float32_rounding():
    torch.manual_seed(1)
    layer = Linear(80, 48)
    x, residual = torch.randn(4, 9, 80), torch.randn(4, 9, 48)
    x64, w64, b64 = x.double(), layer.weight.double(), layer.bias.double()
    with torch.no_grad():
        gelu = layer.forward_gelu(x)
        added = layer.forward_add(x, residual)
        with fast_paths.plain():
            plain_gelu = layer.forward_gelu(x)
            plain_added = layer.forward_add(x, residual)
    exact_gelu = F.gelu(F.linear(x64, w64, b64), approximate="tanh")
    exact_added = residual.double() + F.linear(x64, w64, b64)
    check_within_float32_rounding("fused tanh GELU", gelu, plain_gelu, exact_gelu)
    check_within_float32_rounding("fused residual", added, plain_added, exact_added)
    # An erf GELU (off by up to 5e-4) would not pass: the fused one is the tanh one.
    erf = F.gelu(F.linear(x64, w64, b64))
    assert (gelu.double() - erf).abs().max() > 1e-4


@needs_onednn
def test_functional_linear_and_gelu_take_onednn_and_compute_f_linear(monkeypatch):
    """linear.linear / linear.linear_gelu (products outside a Linear module, e.g. the
    folded video decoder's): the oneDNN kernel at inference, F.linear elsewhere, both
    within float32 rounding of float64."""
    torch.manual_seed(2)
    x, weight, bias = torch.randn(37, 65), torch.randn(24, 65), torch.randn(24)
    x64, w64, b64 = x.double(), weight.double(), bias.double()
    exact = F.linear(x64, w64, b64)
    calls = []
    kernel = linear_module._onednn_kernel
    monkeypatch.setattr(
        linear_module, "_onednn_kernel", lambda *a: calls.append(a[3]) or kernel(*a)
    )
    with torch.no_grad():
        fast = linear_module.linear(x, weight, bias)
        fast_gelu = linear_module.linear_gelu(x, weight, bias)
        assert calls == ["none", "gelu"]  # both went to oneDNN, the GELU fused
        with fast_paths.plain():
            plain = linear_module.linear(x, weight, bias)
            plain_gelu = linear_module.linear_gelu(x, weight, bias)
    assert calls == ["none", "gelu"]  # and not under plain()
    check_within_float32_rounding("functional linear", fast, plain, exact)
    exact_gelu = F.gelu(exact, approximate="tanh")
    check_within_float32_rounding("functional linear_gelu", fast_gelu, plain_gelu, exact_gelu)


@pytest.fixture
def onednn_packing(monkeypatch):
    """Packed float32 weights are oneDNN's, as on CPUs other than Intel's with AVX-512
    (there they are MKL's: test_mkl_packed_copy_*)."""
    monkeypatch.setattr(linear_module, "cpu_prefers_mkl_packing", lambda: False)


@needs_onednn
def test_packed_weight_follows_the_weight(onednn_packing):
    """The packed copy is remade whenever the weight is: in place, by .to(), by a new
    tensor, by load_state_dict; it is not copied, pickled or saved."""
    torch.manual_seed(2)
    layer = Linear(16, 8)
    x = torch.randn(5, 16)
    assert layer.packed_weight() is layer.weight  # float32: packing is opt-in
    linear_module.pack_weights(torch.nn.Sequential(layer))

    def check():
        with torch.no_grad():
            exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
            check_within_float32_rounding(
                "packed", layer(x), F.linear(x, layer.weight, layer.bias), exact
            )

    check()
    first = layer.packed_weight()
    assert layer.packed_weight() is first  # kept between calls
    with torch.no_grad():
        layer.weight.mul_(-3.0)  # in place
    check()
    layer.half().float()  # rounded to float16 and back: new values, maybe same address
    check()
    layer.weight.data = torch.randn(8, 16)
    check()
    layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
    check()
    import copy
    import io

    assert copy.deepcopy(layer)._packed is None
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # would fail on the oneDNN tensor
    assert set(layer.state_dict()) == {"weight", "bias"}
    linear_module.release_packed_weights(torch.nn.Sequential(layer))
    assert layer._packed is None and layer.packed_weight() is layer.weight


def check_layer_within_float32_rounding(label, layer, x):
    """``layer(x)`` against ``F.linear`` of its weight now, both against float64."""
    with torch.no_grad():
        got = layer(x)
        plain = F.linear(x, layer.weight, layer.bias)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    check_within_float32_rounding(label, got, plain, exact)


@needs_onednn
@pytest.mark.parametrize("shape", [(8, 16), (40, 96), (96, 40), (16, 16)])
def test_packed_weight_follows_row_column_and_view_writes(onednn_packing, shape):
    """Writes through ``p.data`` bypass the version counter: the packed copy sees those
    that change a whole row or column (a neuron's or an input's ablation, which a
    64-element sample missed) and a new view of the same storage (``p.data =
    p.data.t()`` keeps a square weight's address, shape and version); narrower
    writes are brought up to date by ``pack_weights`` again."""
    torch.manual_seed(3)
    out_features, in_features = shape
    layer = linear_module.pack_weights(torch.nn.Sequential(Linear(in_features, out_features)))[0]
    x = torch.randn(5, in_features)

    def check(label):
        check_layer_within_float32_rounding(label, layer, x)

    check("first call")
    for row in range(out_features):
        layer.weight.data[row] = torch.randn(in_features)
        check(f"row {row} written through .data")
    for column in range(in_features):
        layer.weight.data[:, column] = torch.randn(out_features)
        check(f"column {column} written through .data")
    if out_features == in_features:
        layer.weight.data = layer.weight.data.t()  # same storage, other strides
        check("transposed view of the same storage")
    layer.weight.data[1, 2] += 5.0  # one element: not sampled here, but ...
    linear_module.pack_weights(torch.nn.Sequential(layer))  # ... made again
    check("one element written, then pack_weights")


@needs_onednn
def test_packed_weight_with_nan_elements_is_kept_between_calls(onednn_packing):
    """A NaN among the sampled elements (a diverged run's weights, under inspection)
    equals itself for the stamp: the copy is kept, not remade on every call, and a
    write that replaces the NaN is still seen."""
    torch.manual_seed(4)
    layer = linear_module.pack_weights(torch.nn.Sequential(Linear(16, 8)))[0]
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer.weight.data[:, 0] = float("nan")  # column 0: every row's sample
        layer.bias.data[3] = float("nan")
        layer(x)
        first = layer.packed_weight()
        layer(x)
        assert layer.packed_weight() is first
        layer.weight.data[:, 0] = torch.randn(8)
        layer.bias.data[3] = 0.5
    check_layer_within_float32_rounding("NaN written over", layer, x)


@needs_onednn
def test_fused_copy_follows_bias_elements_written_through_data(onednn_packing):
    """The fused q, k, v copy holds the biases concatenated: an element of one
    written through ``p.data`` (no version bump) is seen (a 64-element sample of a
    192-wide bias missed it)."""
    import copy

    from perceiver_torch.attention import Attention

    torch.manual_seed(4)
    attention = Attention(
        q_channels=32, kv_channels=32, qk_channels=192, v_channels=192,
        num_heads=2, self_attention=True,
    ).eval()
    linear_module.pack_weights(attention)
    x = torch.randn(2, 6, 32)

    def check(label):
        with torch.no_grad():
            got = attention(x, x)
            with fast_paths.plain():
                plain = attention(x, x)
                exact = copy.deepcopy(attention).double()(x.double(), x.double())
        check_within_float32_rounding(label, got, plain, exact)

    check("first call")
    assert attention._fused.made
    attention.to_v.bias.data[5] += 1.0
    check("to_v.bias[5] written through .data")
    attention.to_q.bias.data[7] += 1.0
    check("to_q.bias[7] written through .data")


@needs_onednn
def test_packed_weight_is_what_the_kernel_reads(monkeypatch, onednn_packing):
    """After pack_weights, forward and forward_gelu hand oneDNN the packed copy (not
    the plain weight, which it would reorder in every call)."""
    layer = linear_module.pack_weights(torch.nn.Sequential(Linear(16, 8)))[0]
    weights = []
    kernel = linear_module._onednn_kernel
    monkeypatch.setattr(
        linear_module, "_onednn_kernel", lambda *a: weights.append(a[1]) or kernel(*a)
    )
    with torch.no_grad():
        layer(torch.randn(5, 16))
        layer.forward_gelu(torch.randn(5, 16))
    packed = layer.packed_weight()
    assert packed is not layer.weight
    assert len(weights) == 2 and all(w is packed for w in weights)


needs_onednn_bfloat16 = pytest.mark.skipif(
    not linear_module.onednn_kernel_available(torch.bfloat16),
    reason="this torch has no bfloat16 oneDNN kernel",
)


@pytest.mark.parametrize("has_instructions", [True, False])
def test_bfloat16_weights_are_packed_by_default_where_the_cpu_multiplies_them(
    monkeypatch, has_instructions
):
    """Default packing: bfloat16 only, and only on CPUs with bfloat16 instructions
    (elsewhere every product is converted to float32 and the copy would be memory for
    nothing); pack_weights and release_packed_weights override it in any dtype."""
    monkeypatch.setattr(
        linear_module, "cpu_has_matmul_instructions", lambda dtype: has_instructions
    )
    linear_module.packs_by_default.cache_clear()
    try:
        layer = Linear(16, 8)
        assert not layer.packs(torch.float32)
        assert layer.packs(torch.bfloat16) is has_instructions
        assert not layer.packs(torch.float16)
        linear_module.pack_weights(layer)
        assert layer.packs(torch.float32) and layer.packs(torch.bfloat16)
        linear_module.release_packed_weights(layer)
        assert not layer.packs(torch.float32) and not layer.packs(torch.bfloat16)
    finally:
        linear_module.packs_by_default.cache_clear()


@needs_onednn_bfloat16
def test_packed_bfloat16_weight_within_rounding_of_float64(monkeypatch):
    """A bfloat16 layer on its packed copy: the kernel reads the copy (made by prepack,
    before the first call), and each output is within one bfloat16 rounding (2^-8
    relative) of the float64 product of the same bfloat16 numbers, plus float32
    accumulation (n * 2^-24 of the sum of |x w|)."""
    monkeypatch.setattr(linear_module, "packs_by_default", lambda dtype: True)
    torch.manual_seed(5)
    layer = Linear(96, 40).to(torch.bfloat16)
    linear_module.prepack(torch.nn.Sequential(layer))
    packed = layer.packed_weight()
    assert packed is not layer.weight and packed.is_mkldnn
    assert layer._packed is not None and layer._packed[2] is packed  # made by prepack
    weights = []
    kernel = linear_module._onednn_kernel
    monkeypatch.setattr(
        linear_module, "_onednn_kernel", lambda *a: weights.append(a[1]) or kernel(*a)
    )
    x = torch.randn(7, 96).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x).double()
    assert len(weights) == 1 and weights[0] is packed
    x64, w64, b64 = x.double(), layer.weight.double(), layer.bias.double()
    exact = F.linear(x64, w64, b64)
    magnitude = F.linear(x64.abs(), w64.abs(), b64.abs())
    bound = 2.0**-8 * exact.abs() + 97 * 2.0**-24 * magnitude
    assert ((got - exact).abs() <= bound).all()


@pytest.mark.parametrize(
    "capability,prefers",
    [
        ("AVX512", True),  # AMD: MKL runs AVX2 code, oneDNN twice as fast; Intel: up to 13%
        ("AVX2", False),  # same vectors: MKL was the faster
        ("DEFAULT", False),
    ],
)
def test_cpu_preference_for_onednn_float32_linear_layers(monkeypatch, capability, prefers):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    linear_module.cpu_prefers_onednn_float32.cache_clear()
    try:
        assert linear_module.cpu_prefers_onednn_float32() is prefers
    finally:
        linear_module.cpu_prefers_onednn_float32.cache_clear()


@pytest.mark.parametrize(
    "vendor,prefers",
    [
        ("AuthenticAMD", True),
        ("GenuineIntel", False),  # MKL's AVX-512/AMX attention kernels are the faster
        ("Intel64 Family 6 Model 143 Stepping 8, GenuineIntel", False),  # Windows
        ("", True),
    ],
)
def test_cpu_preference_for_onednn_attention(monkeypatch, vendor, prefers):
    monkeypatch.setattr(linear_module, "_cpu_vendor", lambda: vendor)
    assert linear_module.cpu_prefers_onednn_attention() is prefers


@pytest.mark.parametrize(
    "vendor,capability,prefers",
    [
        ("GenuineIntel", "AVX512", True),  # MKL's AVX-512 packed product is the fastest
        ("Intel64 Family 6 Model 143 Stepping 8, GenuineIntel", "AVX512", True),
        ("GenuineIntel", "AVX2", False),  # not measured: F.linear as before
        ("AuthenticAMD", "AVX512", False),  # MKL runs AVX2 code there
        ("", "AVX512", False),
    ],
)
def test_cpu_preference_for_mkl_packing(monkeypatch, vendor, capability, prefers):
    monkeypatch.setattr(linear_module, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(linear_module, "_mkl_probe", lambda: True)
    caches = (linear_module.cpu_prefers_mkl_packing, linear_module.cpu_prefers_onednn_float32)
    for cached in caches:
        cached.cache_clear()
    try:
        assert linear_module.cpu_prefers_mkl_packing() is prefers
    finally:
        for cached in caches:
            cached.cache_clear()


needs_mkl_packing = pytest.mark.skipif(
    not (linear_module.onednn_kernel_available() and linear_module._mkl_probe()),
    reason="this torch has no MKL packed-weight kernel",
)


@pytest.fixture
def mkl_packing(monkeypatch):
    """Packed float32 weights are MKL's (as on Intel CPUs with AVX-512), the oneDNN
    path taken on any CPU; MKL's kernel calls are recorded: [(copy, row count)]."""
    monkeypatch.setattr(linear_module, "cpu_prefers_mkl_packing", lambda: True)
    monkeypatch.setattr(fast_paths, "_environment", None)  # read again, then restored
    monkeypatch.setenv("PERCEIVER_TORCH_ONEDNN", "1")
    calls = []
    kernel = linear_module._mkl_kernel
    monkeypatch.setattr(
        linear_module,
        "_mkl_kernel",
        lambda x, packed, *a: calls.append((packed, x.numel() // x.shape[-1]))
        or kernel(x, packed, *a),
    )
    return calls


@needs_mkl_packing
def test_mkl_packed_copy_serves_the_row_count_of_the_first_call(mkl_packing):
    """pack_weights leaves MKL's float32 copy to the first call, which packs it for its
    row count; forward and forward_add read it there (within float32 rounding of
    float64), other row counts take oneDNN's kernel on the plain weight (no second
    copy), and forward_gelu keeps the GELU fused on oneDNN's packed copy."""
    torch.manual_seed(7)
    layer = linear_module.pack_weights(torch.nn.Sequential(Linear(96, 40)))[0]
    assert layer._mkl_packed is None and layer._packed is None  # left to the first call
    x, residual = torch.randn(3, 7, 96), torch.randn(3, 7, 40)
    x64, w64, b64 = x.double(), layer.weight.double(), layer.bias.double()
    exact = F.linear(x64, w64, b64)
    with torch.no_grad():
        plain = F.linear(x, layer.weight, layer.bias)
        got = layer(x)
        (copy, rows), = mkl_packing
        assert rows == 21 and layer._mkl_packed[2:] == (21, copy)
        check_within_float32_rounding("MKL packed", got, plain, exact)
        added = layer.forward_add(x, residual)
        assert len(mkl_packing) == 2 and mkl_packing[1] == (copy, 21)  # the same copy
        check_within_float32_rounding(
            "MKL packed + residual", added, plain + residual, exact + residual.double()
        )
        other = x[:, :5]
        got = layer(other)
        assert len(mkl_packing) == 2 and layer._packed is None  # oneDNN, plain weight
        check_within_float32_rounding(
            "other rows", got, F.linear(other, layer.weight, layer.bias), exact[:, :5]
        )
        gelu = Linear(96, 40)
        linear_module.pack_weights(gelu)
        gelu.forward_gelu(x)
        assert gelu._mkl_packed is None and gelu._packed is not None
    assert not linear_module.fuses([layer, gelu], torch.float32)  # each its own copy
    assert linear_module.fuses(
        [layer.to(torch.bfloat16), gelu.to(torch.bfloat16)], torch.bfloat16
    )


@needs_mkl_packing
def test_mkl_packed_copy_follows_the_weight(mkl_packing):
    """MKL's copy is remade when the weight changes in place or is replaced, and is
    dropped by .to(), copies, pickles and release_packed_weights."""
    import copy
    import io

    torch.manual_seed(8)
    layer = linear_module.pack_weights(torch.nn.Sequential(Linear(16, 8)))[0]
    x = torch.randn(5, 16)

    def check(label):
        check_layer_within_float32_rounding(label, layer, x)
        assert mkl_packing[-1] == (layer._mkl_packed[3], 5)

    check("first call")
    first = layer._mkl_packed[3]
    check("second call")
    assert layer._mkl_packed[3] is first  # kept between calls
    with torch.no_grad():
        layer.weight.mul_(-3.0)
    check("after an in-place change")
    assert layer._mkl_packed[3] is not first
    layer.weight.data = torch.randn(8, 16)
    check("after a new weight")
    assert copy.deepcopy(layer)._mkl_packed is None
    torch.save(layer, io.BytesIO())  # would fail on the MKL tensor
    layer.double().float()
    assert layer._mkl_packed is None
    check("after .to()")
    linear_module.release_packed_weights(torch.nn.Sequential(layer))
    assert layer._mkl_packed is None
    calls = len(mkl_packing)
    with torch.no_grad():
        layer(x)
    assert len(mkl_packing) == calls and layer._mkl_packed is None


def test_cpu_vendor_is_read_from_this_machine():
    vendor = linear_module._cpu_vendor()
    assert isinstance(vendor, str)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "vendor_id" in cpuinfo.read_text(errors="replace"):
        assert vendor and vendor in cpuinfo.read_text(errors="replace")


@needs_onednn
@pytest.mark.parametrize("setting", [None, "1"])
def test_float32_takes_onednn_where_the_cpu_prefers_it_or_when_forced(monkeypatch, setting):
    """Unset, PERCEIVER_TORCH_ONEDNN leaves float32 to F.linear on a CPU that does not
    prefer oneDNN; =1 takes oneDNN there too. bfloat16 follows the kernel alone."""
    monkeypatch.setattr(fast_paths, "_environment", None)  # read again, then restored
    if setting is None:
        monkeypatch.delenv("PERCEIVER_TORCH_ONEDNN", raising=False)
    else:
        monkeypatch.setenv("PERCEIVER_TORCH_ONEDNN", setting)
    monkeypatch.setattr(linear_module, "cpu_prefers_onednn_float32", lambda: False)
    monkeypatch.setattr(linear_module, "cpu_prefers_onednn_attention", lambda: True)
    calls = []
    original = linear_module._onednn_kernel
    monkeypatch.setattr(
        linear_module, "_onednn_kernel", lambda *a: calls.append(1) or original(*a)
    )
    layer = Linear(6, 3)
    x = torch.randn(2, 6)
    forced = setting == "1"
    with torch.no_grad():
        out = layer(x)
        assert linear_module.uses_onednn(x, layer.weight) is forced
    expected = F.linear(x, layer.weight, layer.bias)
    assert linear_module.onednn_linear_preferred(torch.float32) is forced
    # The attentions never take a dtype the linear layers do not.
    assert linear_module.onednn_attention_preferred(torch.float32) is forced
    assert bool(calls) is forced
    if forced:
        check_within_float32_rounding(
            "oneDNN", out, expected, F.linear(x.double(), layer.weight.double(), layer.bias.double())
        )
    else:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    has_bf16 = linear_module.onednn_kernel_available(torch.bfloat16)
    assert linear_module.onednn_linear_preferred(torch.bfloat16) is has_bf16
    assert linear_module.onednn_attention_preferred(torch.bfloat16) is has_bf16
    monkeypatch.setattr(linear_module, "cpu_prefers_onednn_float32", lambda: True)
    assert linear_module.onednn_linear_preferred(torch.float32)
    assert linear_module.onednn_attention_preferred(torch.float32)


@needs_onednn
@pytest.mark.parametrize("setting", [None, "1"])
def test_attention_leaves_onednn_on_cpus_that_do_not_prefer_it_unless_forced(
    monkeypatch, setting
):
    """On a CPU whose own attention kernels are the faster (Intel's), attend runs
    PyTorch's kernels in every dtype while the linear layers keep oneDNN; =1 takes
    oneDNN for both."""
    from perceiver_torch import attention

    monkeypatch.setattr(fast_paths, "_environment", None)
    if setting is None:
        monkeypatch.delenv("PERCEIVER_TORCH_ONEDNN", raising=False)
    else:
        monkeypatch.setenv("PERCEIVER_TORCH_ONEDNN", setting)
    monkeypatch.setattr(linear_module, "cpu_prefers_onednn_float32", lambda: True)
    monkeypatch.setattr(linear_module, "cpu_prefers_onednn_attention", lambda: False)
    forced = setting == "1"
    q, k, v = (torch.randn(1, 1, n, 8) for n in (5, 7, 7))
    with torch.no_grad():
        assert linear_module.onednn_linear_preferred(torch.float32)
        assert attention.uses_onednn_attention(q, k, v) is forced
        if linear_module.onednn_kernel_available(torch.bfloat16):
            qb, kb, vb = (t.bfloat16() for t in (q, k, v))
            assert attention.uses_onednn_attention(qb, kb, vb) is forced


@pytest.mark.parametrize(
    "features,flags,dtype,native",
    [
        ({}, None, torch.float32, True),
        ({"_is_avx512_bf16_supported": True, "_is_amx_tile_supported": False}, None, torch.bfloat16, True),
        ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": True}, None, torch.bfloat16, True),
        ({"_is_avx512_bf16_supported": False, "_is_amx_tile_supported": False}, None, torch.bfloat16, False),
        ({"_is_avx512_bf16_supported": None, "_is_amx_tile_supported": None}, None, torch.bfloat16, True),
        ({"_is_amx_fp16_supported": False}, "fpu avx2 avx512f", torch.float16, False),
        ({"_is_amx_fp16_supported": False}, "fpu avx512f avx512_fp16", torch.float16, True),
        ({"_is_amx_fp16_supported": True}, "fpu avx2", torch.float16, True),
        ({"_is_amx_fp16_supported": None}, None, torch.float16, True),  # cannot tell
    ],
)
def test_cpu_matmul_instructions_by_dtype(monkeypatch, features, flags, dtype, native):
    """None stands for a probe this torch lacks (or no /proc/cpuinfo flags): where
    nothing can tell, the CPU is not called emulated."""
    for name, present in features.items():
        if present is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda present=present: present, raising=False)
    monkeypatch.setattr(
        linear_module, "_cpuinfo_field", lambda name: flags if name == "flags" else None
    )
    assert linear_module.cpu_has_matmul_instructions(dtype) is native


def test_cpu_matmul_instructions_agree_with_this_machines_flags():
    """The probes read this CPU: where /proc/cpuinfo lists its flags, bfloat16 is
    native exactly when avx512_bf16 or amx_bf16 is among them."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(errors="replace") if cpuinfo.is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None or not hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        pytest.skip("no CPU flags to compare with, or no probe in this torch")
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert linear_module.cpu_has_matmul_instructions(torch.bfloat16) is expected
    if hasattr(torch.cpu, "_is_amx_fp16_supported"):
        expected = "avx512_fp16" in flags or "amx_fp16" in flags
        assert linear_module.cpu_has_matmul_instructions(torch.float16) is expected
