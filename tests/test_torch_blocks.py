"""perceiver_torch building blocks against independent numpy references.

Each reference below is written from the description of the official numerics
(shared/official/NUMERICS.md) with plain numpy and loops, in float64; the torch
blocks run in float32 and are compared on whole tensors with explicit tolerances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from float64_reference import check_within_float32_rounding, float64_model
from perceiver_torch import fast_paths
from perceiver_torch import linear as linear_module
from perceiver_torch.attention import (
    Attention,
    CrossAttentionLayer,
    MLP,
    SelfAttentionLayer,
    gelu_tanh,
    layer_norm,
)
from perceiver_torch.decoders import FoldedDecoder, PerceiverDecoder
from perceiver_torch.perceiver import PerceiverEncoder
from perceiver_torch.position_encoding import FourierPositionEncoding
from perceiver_torch.preprocessors import (
    AudioPatchPreprocessor,
    ConvStemPreprocessor,
    FlowPatchPreprocessor,
    MultimodalPreprocessor,
    OneHotPreprocessor,
    VideoPatchPreprocessor,
    audio_patches,
    channels_last_tokens,
    flow_patches,
    max_pool_same,
    same_padding,
    space_to_depth,
)
from perceiver_torch.queries import FourierQueries, MultimodalQueries, TrainableQueries

# float32 computation against float64 references. The blocks are tiny (widths <= 16,
# at most a few layers) with values of order 1: each dot product of n <= 32 terms is
# within gamma_n = n u ~ 2e-6 (u = 2^-24) of exact, relative to the sum of the terms'
# magnitudes, and that compounds over <= 5 chained layers to about 1e-5; 2e-5 leaves a
# factor 2. A mapping or numerics mistake shows at 1e-3 or more (the tests below that
# check a naive spelling is wrong see 1e-2 to 5).
TOL = dict(rtol=2e-5, atol=2e-5)


def randomize(module: nn.Module, seed: int = 0, scale: float = 0.3) -> nn.Module:
    """Distinct non-zero random values in every parameter (STYLE 13); buffers (the
    conv stem's BatchNorm statistics) are set by the test that has them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            values = torch.randn(p.shape, generator=gen) * scale
            if name.endswith("norm.weight"):
                values = 1.0 + values
            p.copy_(values)
    return module


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def np_linear(x: np.ndarray, lin: nn.Linear) -> np.ndarray:
    return x @ as_np(lin.weight).T + as_np(lin.bias)


def np_layer_norm(x: np.ndarray, ln: nn.LayerNorm) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * as_np(ln.weight) + as_np(ln.bias)


def np_gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_mlp(x: np.ndarray, mlp: MLP) -> np.ndarray:
    return np_linear(np_gelu_tanh(np_linear(x, mlp.fc1)), mlp.fc2)


def np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_attention(xq, xkv, att: Attention, key_mask=None, query_mask=None):
    """The reference's attention: logits = q.k, then scaled; masked logits replaced by
    -1e30; softmax; fully-masked rows zeroed before the output projection."""
    q, k, v = (
        np_linear(xq, att.to_q),
        np_linear(xkv, att.to_k),
        np_linear(xkv, att.to_v),
    )
    heads = att.num_heads
    b, m, _ = q.shape
    n = k.shape[1]
    dq, dv = q.shape[-1] // heads, v.shape[-1] // heads
    out = np.zeros((b, m, heads * dv))
    for i in range(b):
        mask = np.ones((m, n))
        if key_mask is not None:
            mask = mask * key_mask[i][None, :]
        if query_mask is not None:
            mask = mask * query_mask[i][:, None]
        for h in range(heads):
            logits = q[i, :, h * dq : (h + 1) * dq] @ k[i, :, h * dq : (h + 1) * dq].T
            logits = logits * (1.0 / math.sqrt(dq))
            logits = np.where(mask > 0, logits, -1e30)
            summed = np_softmax(logits) @ v[i, :, h * dv : (h + 1) * dv]
            summed[mask.sum(1) == 0] = 0.0
            out[i, :, h * dv : (h + 1) * dv] = summed
    return np_linear(out, att.to_out)


def np_cross_attention(
    xq, xkv, layer: CrossAttentionLayer, key_mask=None, query_mask=None
):
    att = np_attention(
        np_layer_norm(xq, layer.q_norm),
        np_layer_norm(xkv, layer.kv_norm),
        layer.attention,
        key_mask,
        query_mask,
    )
    x = xq + att if layer.use_query_residual else att
    return x + np_mlp(np_layer_norm(x, layer.mlp_norm), layer.mlp)


def np_self_attention(x, layer: SelfAttentionLayer):
    normed = np_layer_norm(x, layer.norm)
    x = x + np_attention(normed, normed, layer.attention)
    return x + np_mlp(np_layer_norm(x, layer.mlp_norm), layer.mlp)


def np_fourier(axes, num_bands, max_resolution):
    """Fourier features straight from the formula: positions of every grid point
    (meshgrid ij, row-major), then sin and cos of pi*pos_d*f_k (d-major)."""
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))
    freqs = np.stack([np.linspace(1.0, r / 2.0, num_bands) for r in max_resolution])
    per_pos = (grid[:, :, None] * freqs[None]).reshape(grid.shape[0], -1)
    return np.concatenate([grid, np.sin(np.pi * per_pos), np.cos(np.pi * per_pos)], -1)


def t32(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float32))


def close(actual: torch.Tensor, expected: np.ndarray, **tol) -> None:
    torch.testing.assert_close(
        actual.detach().double(),
        torch.from_numpy(np.asarray(expected, np.float64)),
        **(tol or TOL),
    )


def exact(actual: torch.Tensor, expected) -> None:
    """Pure data movement: equal to the float32 reference, bit for bit."""
    if isinstance(expected, np.ndarray):
        expected = t32(expected)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# -- core blocks -----------------------------------------------------------------


def test_layer_norm_and_gelu_match_reference():
    ln = randomize(nn.Sequential(layer_norm(12)))[0]
    assert ln.eps == 1e-5
    x = np.random.default_rng(0).normal(size=(3, 5, 12)) * 3 + 1
    close(ln(t32(x)), np_layer_norm(x, ln))
    close(gelu_tanh(t32(x)), np_gelu_tanh(x), rtol=1e-5, atol=1e-6)
    # The exact (erf) GELU is measurably different: the tanh form is deliberate.
    erf = torch.nn.functional.gelu(t32(x))
    assert (erf.double() - torch.from_numpy(np_gelu_tanh(x))).abs().max() > 1e-4


def test_mlp_matches_reference():
    mlp = randomize(MLP(channels=10, widening_factor=2))
    x = np.random.default_rng(1).normal(size=(2, 7, 10))
    close(mlp(t32(x)), np_mlp(x, mlp))


@pytest.mark.parametrize(
    "mode,heads",
    [("standard", 1), ("standard", 4), ("absorb_kv", 1), ("absorb_q", 1)],
)
def test_attention_matches_reference_with_masks(mode, heads):
    att = randomize(
        Attention(
            q_channels=12,
            kv_channels=10,
            qk_channels=16,
            v_channels=8,
            output_channels=12,
            num_heads=heads,
        )
    )
    rng = np.random.default_rng(2)
    xq, xkv = rng.normal(size=(3, 5, 12)), rng.normal(size=(3, 9, 10))
    key_mask = np.ones((3, 9))
    key_mask[0, 4:] = 0  # some keys masked
    key_mask[1, :] = 0  # every key masked: rows become zeros, then the output bias
    query_mask = np.ones((3, 5))
    query_mask[2, [0, 3]] = 0
    prepared = att.prepare(t32(xkv), key_mask=torch.from_numpy(key_mask), mode=mode)
    out = att.attend_prepared(
        t32(xq), prepared, query_mask=torch.from_numpy(query_mask)
    )
    expected = np_attention(xq, xkv, att, key_mask, query_mask)
    close(out, expected)
    # Fully-masked rows are exactly the output bias (no -inf NaN, no uniform average).
    bias = att.to_out.bias.detach()
    torch.testing.assert_close(out[1], bias.expand(5, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[2, [0, 3]], bias.expand(2, -1), rtol=0, atol=1e-6)


def test_attention_defaults_follow_reference():
    att = Attention(q_channels=12, kv_channels=10)
    assert att.to_q.out_features == 12  # qk defaults to the query width
    assert att.to_v.out_features == 12  # v defaults to qk
    assert att.to_out.out_features == 12  # output defaults to v
    layer = CrossAttentionLayer(q_channels=12, kv_channels=10)
    assert layer.attention.to_q.out_features == 10  # shape_for_attn='kv'
    assert layer.attention.to_out.out_features == 12  # output = query width


@pytest.mark.parametrize("residual", [True, False])
def test_cross_attention_layer_matches_reference(residual):
    layer = randomize(
        CrossAttentionLayer(
            q_channels=8,
            kv_channels=6,
            num_heads=2,
            qk_channels=4,
            v_channels=10,
            use_query_residual=residual,
        )
    )
    rng = np.random.default_rng(3)
    xq, xkv = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 11, 6))
    key_mask = np.ones((2, 11))
    key_mask[1, 7:] = 0
    query_mask = np.ones((2, 4))
    query_mask[0, 1] = 0
    out = layer(
        t32(xq),
        t32(xkv),
        key_mask=torch.from_numpy(key_mask),
        query_mask=torch.from_numpy(query_mask),
    )
    close(out, np_cross_attention(xq, xkv, layer, key_mask, query_mask))


@pytest.mark.parametrize("mode", ["standard", "absorb_kv", "absorb_q", "self"])
def test_attention_residual_added_in_to_out_pass(mode, monkeypatch):
    """At inference a self-attention layer's residual and a cross-attention layer's
    query residual are added in to_out's pass (Linear.forward_add; on the oneDNN
    path one memory pass fewer), in every attention mode, within float32 rounding of
    float64; with dropout in training the attention output is dropped out first."""
    if mode == "self":
        layer = randomize(SelfAttentionLayer(channels=8, num_heads=2, dropout=0.5))
        inputs = (torch.randn(2, 6, 8),)
    else:
        layer = randomize(
            CrossAttentionLayer(q_channels=8, kv_channels=6, qk_channels=5, dropout=0.5)
        )
        inputs = (torch.randn(2, 4, 8), torch.randn(2, 11, 6))
    calls = []
    original = type(layer.attention.to_out).forward_add
    monkeypatch.setattr(
        type(layer.attention.to_out),
        "forward_add",
        lambda self, x, r: calls.append(self) or original(self, x, r),
    )
    layer.eval()
    with torch.no_grad():
        if mode == "self":
            got = layer(*inputs)
        else:
            prepared = layer.prepare(inputs[1], mode=mode)
            got = layer.attend_prepared(inputs[0], prepared)
        # absorb_q folds to_out into the values: its residual is a plain addition.
        assert (layer.attention.to_out in calls) is (mode != "absorb_q")
        exact = float64_model(layer)(*(x.double() for x in inputs))
        with fast_paths.plain():
            plain = layer(*inputs)
    check_within_float32_rounding(f"residual in to_out ({mode})", got, plain, exact)
    # Training with dropout: the residual is not fused (the attention output is
    # dropped out before the residual is added).
    calls.clear()
    layer.train()
    torch.manual_seed(0)
    dropped = layer(*inputs)
    assert layer.attention.to_out not in calls
    assert not torch.allclose(dropped, plain)


def test_masked_query_row_is_bias_then_mlp():
    """Language decoder quirk: a masked query gives zeros -> to_out (bias) -> MLP."""
    layer = randomize(
        CrossAttentionLayer(
            q_channels=8, kv_channels=6, num_heads=2, use_query_residual=False
        )
    )
    xq, xkv = torch.randn(1, 3, 8), torch.randn(1, 5, 6)
    out = layer(xq, xkv, query_mask=torch.tensor([[1, 0, 1]]))
    x = as_np(layer.attention.to_out.bias)
    close(out[0, 1], x + np_mlp(np_layer_norm(x, layer.mlp_norm), layer.mlp))


def test_self_attention_layer_matches_reference():
    layer = randomize(SelfAttentionLayer(channels=16, num_heads=4, qk_channels=8))
    x = np.random.default_rng(4).normal(size=(2, 6, 16))
    close(layer(t32(x)), np_self_attention(x, layer))


def test_encoder_shares_block_weights():
    enc = randomize(
        PerceiverEncoder(
            input_channels=5,
            num_latents=3,
            latent_channels=8,
            num_self_attends_per_block=2,
            num_blocks=3,
            num_self_attention_heads=2,
        )
    )
    x = np.random.default_rng(5).normal(size=(2, 7, 5))
    mask = np.ones((2, 7))
    mask[0, 5:] = 0
    z = np.broadcast_to(as_np(enc.latents), (2, 3, 8))
    z = np_cross_attention(z, x, enc.cross_attention, key_mask=mask)
    for _ in range(3):
        for layer in enc.self_attends:
            z = np_self_attention(z, layer)
    close(enc(t32(x), torch.from_numpy(mask)), z, rtol=5e-5, atol=5e-5)
    assert len(enc.self_attends) == 2


def test_decoder_chunks_and_modes_agree():
    dec = randomize(
        PerceiverDecoder(
            query_channels=6, latent_channels=8, output_channels=3, query_chunk_size=4
        )
    )
    queries, latents = torch.randn(2, 11, 6), torch.randn(2, 5, 8)
    expected = np_linear(
        np_cross_attention(as_np(queries), as_np(latents), dec.cross_attention),
        dec.output_projection,
    )
    close(dec(queries, latents), expected)
    for mode in ("standard", "absorb_kv", "absorb_q"):
        prepared = dec.cross_attention.prepare(latents, mode=mode)
        close(dec.decode_prepared(queries, prepared), expected)
    # A query mask is cut along with the queries (3 chunks of 4, 4 and 3).
    query_mask = np.ones((2, 11))
    query_mask[0, [2, 3, 4, 10]] = 0  # on both sides of a chunk boundary, and last
    expected = np_linear(
        np_cross_attention(
            as_np(queries), as_np(latents), dec.cross_attention, query_mask=query_mask
        ),
        dec.output_projection,
    )
    close(dec(queries, latents, query_mask=torch.from_numpy(query_mask)), expected)


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_gram_factor_keeps_lengths(rank_deficient, monkeypatch):
    """gram_factor(a) @ gram_factor(a).T == a @ a.T (so |x @ L| == |x @ a|): by
    Cholesky where it completes, by the eigendecomposition where a row is zero
    (a zero pivot: a value channel that to_out ignores)."""
    from perceiver_torch import decoders

    eigh_calls = []
    original = torch.linalg.eigh
    monkeypatch.setattr(
        torch.linalg, "eigh", lambda g: eigh_calls.append(1) or original(g)
    )
    a = torch.randn(9, 20, dtype=torch.float64)
    if rank_deficient:
        a[4] = 0.0
    factor = decoders.gram_factor(a)
    assert factor.shape == (9, 9) and bool(eigh_calls) is rank_deficient
    gram = a @ a.t()
    # float64 rounding of 20-term sums and of the factorisation: ~1e-14 of |gram|.
    assert (factor @ factor.t() - gram).abs().max() <= 1e-12 * gram.abs().max()
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(
        torch.linalg.vector_norm(x @ factor, dim=-1),
        torch.linalg.vector_norm(x @ a, dim=-1),
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize("query_channels", [14, 7])
def test_folded_decoder_matches_unfused(query_channels):
    """14 query channels against 8 value channels: the MLP LayerNorm's variance from
    the 9-wide orthonormal coordinates of the attention output; 7: from its own 7."""
    dec = randomize(
        PerceiverDecoder(
            query_channels=query_channels, latent_channels=8, output_channels=6
        ),
        scale=0.5,
    )
    head = randomize(nn.Linear(6, 3), seed=1)
    num_pad = query_channels - 5
    padding = torch.randn(num_pad)
    features = torch.randn(2, 13, 5)
    latents = torch.randn(2, 7, 8)
    queries = torch.cat([features, padding.expand(2, 13, num_pad)], dim=-1)
    plain = head(dec(queries, latents))
    exact = float64_model(head)(float64_model(dec)(queries.double(), latents.double()))
    folded = FoldedDecoder(dec, latents, {"m": (5, padding, head)})
    assert folded.norm_w.shape == (min(query_channels, 9), 8)
    check_within_float32_rounding("folded", folded("m", features), plain, exact)


# -- position encodings and queries ------------------------------------------


@pytest.mark.parametrize(
    "index_dims,max_resolution",
    [((7, 5), (7, 5)), ((6, 9), (24, 30)), ((2, 8, 8), (2, 2, 2)), ((40,), (640,))],
)
def test_fourier_features_match_formula(index_dims, max_resolution):
    enc = FourierPositionEncoding(num_bands=6, max_resolution=max_resolution)
    axes = [np.linspace(-1.0, 1.0, n) for n in index_dims]
    expected = np_fourier(axes, 6, max_resolution)
    got = enc.grid(index_dims)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert enc.num_channels == expected.shape[1]
    close(got, expected, rtol=1e-6, atol=1e-6)
    assert enc.grid(index_dims) is got  # cached
    batched = enc(index_dims, 3)
    assert batched.shape == (3,) + expected.shape


def test_fourier_features_high_frequencies_are_float64_accurate():
    """The video audio encoding (30720 samples, bands up to 15360): float32 arithmetic
    is off by ~1e-2; computed in float64 then cast, it is within float32 rounding."""
    enc = FourierPositionEncoding(num_bands=192, max_resolution=(30720,))
    expected = np_fourier([np.linspace(-1.0, 1.0, 1920)], 192, (30720,))
    close(enc.grid((1920,)), expected, rtol=0, atol=1e-6)


def test_subsampled_query_positions():
    dims = (3, 8, 8)
    queries = FourierQueries(
        index_dims=dims, num_bands=4, max_resolution=(3, 2, 2), always_subsampled=True
    )
    idx = np.array([0, 5, 64, 100, 191])
    coords = np.stack(np.unravel_index(idx, dims), axis=-1)
    pos = -1.0 + 2.0 * coords / np.array(dims)
    freqs = np.stack([np.linspace(1.0, r / 2.0, 4) for r in (3, 2, 2)])
    per_pos = (pos[:, :, None] * freqs[None]).reshape(len(idx), -1)
    expected = np.concatenate(
        [pos, np.sin(np.pi * per_pos), np.cos(np.pi * per_pos)], -1
    )
    close(queries.features(torch.from_numpy(idx)), expected, rtol=1e-6, atol=1e-6)
    # Every point, subsampled-style, is the same thing in order.
    full = queries.features()
    close(full[torch.from_numpy(idx)], expected, rtol=1e-6, atol=1e-6)
    # ... and differs from the linspace grid the encoder-side features use.
    linspace = FourierQueries(index_dims=dims, num_bands=4, max_resolution=(3, 2, 2))
    assert (linspace.features() - full).abs().max() > 1e-2


# -- preprocessors -------------------------------------------------------------


def test_same_padding_values():
    assert same_padding(224, 7, 2) == (2, 3)
    assert same_padding(112, 3, 2) == (0, 1)
    assert same_padding(7, 3, 1) == (1, 1)
    assert same_padding(5, 3, 2) == (1, 1)
    assert same_padding(4, 1, 1) == (0, 0)


def np_conv_same(x, w, stride):
    """NHWC x, HWIO w, TF SAME by the documented rule, with loops."""
    b, h, wd, _ = x.shape
    kh, kw, _, o = w.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    top = max((oh - 1) * stride + kh - h, 0) // 2
    left = max((ow - 1) * stride + kw - wd, 0) // 2
    y = np.zeros((b, oh, ow, o))
    for i in range(oh):
        for j in range(ow):
            for di in range(kh):
                for dj in range(kw):
                    r, c = i * stride + di - top, j * stride + dj - left
                    if 0 <= r < h and 0 <= c < wd:
                        y[:, i, j] += x[:, r, c] @ w[di, dj]
    return y


def np_max_pool_same(x, k, stride):
    """NHWC max-pool; out-of-range window positions are -inf (ignored)."""
    b, h, wd, c = x.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    top = max((oh - 1) * stride + k - h, 0) // 2
    left = max((ow - 1) * stride + k - wd, 0) // 2
    y = np.full((b, oh, ow, c), -np.inf)
    for i in range(oh):
        for j in range(ow):
            for di in range(k):
                for dj in range(k):
                    r, cc = i * stride + di - top, j * stride + dj - left
                    if 0 <= r < h and 0 <= cc < wd:
                        y[:, i, j] = np.maximum(y[:, i, j], x[:, r, cc])
    return y


@pytest.mark.parametrize("size", [(16, 16), (15, 13), (18, 22)])
def test_max_pool_same_pads_with_minus_inf(size):
    x = np.random.default_rng(6).normal(size=(2,) + size + (3,)) - 5.0  # all negative
    got = max_pool_same(t32(x).permute(0, 3, 1, 2), 3, 2).permute(0, 2, 3, 1)
    close(got, np_max_pool_same(x, 3, 2))


@pytest.mark.parametrize("size", [(32, 32), (29, 31)])
def test_conv_stem_matches_reference(size):
    stem = ConvStemPreprocessor(max_resolution=(8, 8), num_bands=3, channels=5)
    randomize(stem)
    rng = np.random.default_rng(7)
    with torch.no_grad():
        stem.batchnorm.running_mean.copy_(t32(rng.normal(size=5)))
        stem.batchnorm.running_var.copy_(t32(rng.uniform(0.5, 2.0, size=5)))
    stem.eval()
    hwio = rng.normal(size=(7, 7, 3, 5)) * 0.2
    with torch.no_grad():
        stem.conv.weight.copy_(t32(hwio).permute(3, 2, 0, 1))  # HWIO -> OIHW
    x = rng.normal(size=(2,) + size + (3,))
    y = np_conv_same(x, hwio, 2)
    bn = stem.batchnorm
    y = (y - as_np(bn.running_mean)) / np.sqrt(as_np(bn.running_var) + 1e-5)
    y = y * as_np(bn.weight) + as_np(bn.bias)
    y = np_max_pool_same(np.maximum(y, 0.0), 3, 2)
    b, h, w, c = y.shape
    pos = np_fourier([np.linspace(-1, 1, h), np.linspace(-1, 1, w)], 3, (8, 8))
    expected = np.concatenate(
        [y.reshape(b, h * w, c), np.broadcast_to(pos, (b,) + pos.shape)], -1
    )
    close(stem(t32(x).permute(0, 3, 1, 2)), expected, rtol=1e-4, atol=1e-4)
    assert stem.num_channels == expected.shape[-1]


def test_hwio_kernel_permutation_matters():
    """permute(3, 2, 1, 0) (swapping H and W) would not reproduce the reference."""
    rng = np.random.default_rng(8)
    hwio = rng.normal(size=(7, 7, 3, 4))
    x = rng.normal(size=(1, 12, 12, 3))
    expected = np_conv_same(x, hwio, 2)
    nchw = t32(x).permute(0, 3, 1, 2)
    from perceiver_torch.preprocessors import pad_same

    def conv(weight):
        return torch.nn.functional.conv2d(pad_same(nchw, 7, 2), weight, stride=2)

    good = conv(t32(hwio).permute(3, 2, 0, 1)).permute(0, 2, 3, 1)
    close(good, expected, rtol=1e-5, atol=1e-5)
    bad = conv(t32(hwio).permute(3, 2, 1, 0)).permute(0, 2, 3, 1)
    assert (bad.double() - torch.from_numpy(expected)).abs().max() > 1e-2


def test_channels_last_flattening():
    x = np.random.default_rng(9).normal(size=(2, 4, 3, 5))  # NCHW
    expected = x.transpose(0, 2, 3, 1).reshape(2, 15, 4)
    exact(channels_last_tokens(t32(x)), expected)
    naive = t32(x).reshape(2, 15, 4)
    assert not torch.equal(naive, channels_last_tokens(t32(x)))


def test_flow_patches_order():
    rng = np.random.default_rng(10)
    frames = rng.normal(size=(2, 2, 3, 4, 5))  # B, F, C, H, W
    b, f, c, h, w = frames.shape
    expected = np.zeros((b, h * w, f * 9 * c))
    for y in range(h):
        for x in range(w):
            for fr in range(f):
                for di in range(3):
                    for dj in range(3):
                        for ch in range(c):
                            r, cc = y + di - 1, x + dj - 1
                            value = (
                                frames[:, fr, ch, r, cc]
                                if 0 <= r < h and 0 <= cc < w
                                else 0.0
                            )
                            expected[:, y * w + x, fr * 27 + (di * 3 + dj) * 3 + ch] = (
                                value
                            )
    exact(flow_patches(t32(frames)), expected)
    pre = randomize(
        FlowPatchPreprocessor(max_resolution=(8, 10), num_bands=2, channels=6)
    )
    pos = np_fourier([np.linspace(-1, 1, h), np.linspace(-1, 1, w)], 2, (8, 10))
    full = np.concatenate(
        [np_linear(expected, pre.projection), np.broadcast_to(pos, (b,) + pos.shape)],
        -1,
    )
    close(pre(t32(frames)), full)


def test_space_to_depth_order():
    rng = np.random.default_rng(11)
    video = rng.normal(size=(2, 3, 3, 8, 12))  # B, T, C, H, W
    s = 4
    h, w = 8 // s, 12 // s
    expected = np.zeros((2, 3 * h * w, s * s * 3))
    for t in range(3):
        for i in range(h):
            for j in range(w):
                for dh in range(s):
                    for dw in range(s):
                        for c in range(3):
                            expected[:, (t * h + i) * w + j, (dh * s + dw) * 3 + c] = (
                                video[:, t, c, i * s + dh, j * s + dw]
                            )
    exact(space_to_depth(t32(video), s), expected)
    pre = VideoPatchPreprocessor(
        spatial_downsample=4, max_resolution=(3, 2, 3), num_bands=2
    )
    pos = np_fourier([np.linspace(-1, 1, n) for n in (3, h, w)], 2, (3, 2, 3))
    full = np.concatenate([expected, np.broadcast_to(pos, (2,) + pos.shape)], -1)
    close(pre(t32(video)), full, rtol=1e-6, atol=1e-6)


def test_audio_patches():
    audio = np.random.default_rng(12).normal(size=(2, 64))
    expected = np.stack([audio[:, i * 16 : (i + 1) * 16] for i in range(4)], axis=1)
    exact(audio_patches(t32(audio), 16), expected)
    exact(audio_patches(t32(audio)[..., None], 16), expected)
    pre = AudioPatchPreprocessor(
        samples_per_patch=16, max_resolution=(64,), num_bands=3
    )
    pos = np_fourier([np.linspace(-1, 1, 4)], 3, (64,))
    full = np.concatenate([expected, np.broadcast_to(pos, (2,) + pos.shape)], -1)
    close(pre(t32(audio)), full, rtol=1e-6, atol=1e-6)


def test_multimodal_padding_mask_and_order():
    modalities = {  # deliberately unsorted
        "label": OneHotPreprocessor(num_classes=6),
        "audio": AudioPatchPreprocessor(
            samples_per_patch=4, max_resolution=(16,), num_bands=1
        ),
        "image": OneHotPreprocessor(num_classes=3),
    }
    pre = randomize(
        MultimodalPreprocessor(
            modalities=modalities,
            min_padding=2,
            mask_probs={"audio": 0.0, "image": 0.0, "label": 1.0},
        )
    )
    width = max(4 + 3, 6, 3) + 2  # audio: 4 samples + 1 position + sin + cos
    assert pre.num_channels == width
    assert list(pre.modalities) == ["audio", "image", "label"]
    audio, image, label = torch.randn(2, 16), torch.randn(2, 3), torch.randn(2, 6)
    tokens, sizes = pre({"label": label, "image": image, "audio": audio})
    assert sizes == {"audio": 4, "image": 1, "label": 1}
    assert tokens.shape == (2, 6, width)
    a = modalities["audio"](audio)
    expected_audio = torch.cat([a, pre.padding["audio"].expand(2, 4, -1)], -1)
    expected_image = torch.cat(
        [image[:, None], pre.padding["image"].expand(2, 1, -1)], -1
    )
    exact(tokens[:, :4], expected_audio)
    exact(tokens[:, 4:5], expected_image)
    # The label (mask probability 1) is always the mask token.
    torch.testing.assert_close(
        tokens[:, 5], pre.mask_tokens["label"].detach().expand(2, -1), rtol=0, atol=0
    )


def test_multimodal_mask_sampling_in_training():
    pre = randomize(
        MultimodalPreprocessor(
            modalities={
                "audio": AudioPatchPreprocessor(
                    samples_per_patch=2, max_resolution=(400,), num_bands=1
                )
            },
            min_padding=1,
            mask_probs={"audio": 0.5},
        )
    ).train()
    audio = torch.randn(1, 400)
    torch.manual_seed(0)
    tokens, _ = pre({"audio": audio})
    token = pre.mask_tokens["audio"].detach()
    is_token = (tokens[0] == token).all(-1)
    unmasked = torch.cat(
        [
            pre.modalities["audio"](audio)[0],
            pre.padding["audio"].detach().expand(200, -1),
        ],
        -1,
    )
    is_input = (tokens[0] == unmasked).all(-1)
    assert bool((is_token | is_input).all())
    assert 50 < int(is_token.sum()) < 150


def test_multimodal_queries_padding_and_order():
    queries = randomize(
        MultimodalQueries(
            modalities={
                "label": TrainableQueries(index_dim=1, num_channels=5),
                "image": FourierQueries(
                    index_dims=(2, 4),
                    num_bands=1,
                    max_resolution=(2, 2),
                    always_subsampled=True,
                ),
                "audio": FourierQueries(
                    index_dims=(6,),
                    num_bands=1,
                    max_resolution=(12,),
                    always_subsampled=True,
                ),
            },
            min_padding=2,
        )
    )
    assert queries.num_channels == 8  # image: 2 positions + 2 sin + 2 cos, + 2
    q, sizes = queries(2, {"image": torch.tensor([1, 6]), "audio": torch.tensor([3])})
    assert sizes == {"audio": 1, "image": 2, "label": 1}
    assert q.shape == (2, 4, 8)
    audio_features = queries.modalities["audio"].features(torch.tensor([3]))
    exact(q[0, 0, :3], audio_features[0])
    torch.testing.assert_close(
        q[0, 0, 3:], queries.padding["audio"].detach(), rtol=0, atol=0
    )
    torch.testing.assert_close(
        q[1, 3, :5], queries.modalities["label"].embeddings[0].detach(), rtol=0, atol=0
    )
    torch.testing.assert_close(
        q[1, 3, 5:], queries.padding["label"].detach(), rtol=0, atol=0
    )


@pytest.mark.parametrize("mode", ["standard", "absorb_kv", "absorb_q"])
def test_fully_masked_rows_have_finite_gradients(mode):
    """-1e30 (not -inf) keeps a fully-masked row's softmax finite, also backwards."""
    att = randomize(Attention(q_channels=6, kv_channels=5, qk_channels=8, v_channels=4))
    xq = torch.randn(2, 3, 6, requires_grad=True)
    xkv = torch.randn(2, 4, 5, requires_grad=True)
    key_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    prepared = att.prepare(xkv, key_mask=key_mask, mode=mode)
    att.attend_prepared(xq, prepared).sum().backward()
    for name, p in [("xq", xq), ("xkv", xkv)] + list(att.named_parameters()):
        if p.grad is None:
            # Only the key bias may be folded away: its true gradient is zero (it
            # shifts a whole softmax row).
            assert mode != "standard" and name == "to_k.bias", name
            continue
        assert torch.isfinite(p.grad).all(), name


def test_fourier_image_preprocessor_matches_reference():
    from perceiver_torch.preprocessors import FourierImagePreprocessor

    pre = FourierImagePreprocessor(max_resolution=(16, 12), num_bands=3)
    x = np.random.default_rng(13).normal(size=(2, 3, 5, 7))  # NCHW
    pos = np_fourier([np.linspace(-1, 1, 5), np.linspace(-1, 1, 7)], 3, (16, 12))
    tokens = x.transpose(0, 2, 3, 1).reshape(2, 35, 3)  # channels-last first
    expected = np.concatenate([tokens, np.broadcast_to(pos, (2,) + pos.shape)], -1)
    close(pre(t32(x)), expected, rtol=1e-6, atol=1e-6)


def test_learned_image_preprocessor_matches_reference():
    from perceiver_torch.preprocessors import LearnedImagePreprocessor

    pre = randomize(LearnedImagePreprocessor(image_size=(4, 6), channels=5))
    rng = np.random.default_rng(14)
    hwio = rng.normal(size=(1, 1, 3, 5))
    with torch.no_grad():
        pre.conv1x1.weight.copy_(t32(hwio).permute(3, 2, 0, 1))
    x = rng.normal(size=(2, 3, 4, 6))
    tokens = x.transpose(0, 2, 3, 1).reshape(2, 24, 3)
    features = tokens @ hwio[0, 0] + as_np(pre.conv1x1.bias)
    pos = np_linear(as_np(pre.position_encoding.embeddings), pre.position_projection)
    expected = np.concatenate([features, np.broadcast_to(pos, (2, 24, 5))], -1)
    close(pre(t32(x)), expected)


def test_text_preprocessor_and_embedding_decoder():
    from perceiver_torch.postprocessors import EmbeddingDecoder
    from perceiver_torch.preprocessors import TextPreprocessor

    pre = randomize(TextPreprocessor(vocab_size=11, max_seq_len=9, d_model=4))
    ids = np.array([[3, 0, 10, 7, 7], [1, 2, 3, 4, 5]])
    emb = as_np(pre.embedding.weight)
    pos = as_np(pre.position_encoding.embeddings)
    close(pre(torch.from_numpy(ids)), emb[ids] + pos[None, :5])
    dec = randomize(EmbeddingDecoder(vocab_size=11), seed=3)
    x = np.random.default_rng(15).normal(size=(2, 5, 4))
    close(dec(t32(x), pre.embedding.weight), x @ emb.T + as_np(dec.bias))


def test_postprocessors():
    from perceiver_torch.postprocessors import (
        AudioPostprocessor,
        ClassificationPostprocessor,
        FlowPostprocessor,
        MultimodalPostprocessor,
        ProjectionPostprocessor,
    )

    rng = np.random.default_rng(16)
    audio = randomize(AudioPostprocessor(in_channels=6, samples_per_patch=4))
    x = rng.normal(size=(2, 3, 6))
    y = np_linear(x, audio.projection)  # (B, patches, samples): patch-major flatten
    close(audio(t32(x)), y.reshape(2, 12))
    label = randomize(ClassificationPostprocessor(in_channels=6, num_classes=5))
    close(label(t32(x[:, :1])), np_linear(x[:, 0], label.projection))
    assert ClassificationPostprocessor()(t32(x)).shape == (2, 6)
    flow = FlowPostprocessor(rescale_factor=100.0, flow_scale=20.0)
    net = rng.normal(size=(2, 12, 2))
    expected = (net / 100.0 * 20.0).reshape(2, 3, 4, 2).transpose(0, 3, 1, 2)
    close(flow(t32(net), (3, 4)), expected, rtol=1e-6, atol=1e-7)
    multi = randomize(
        MultimodalPostprocessor(
            modalities={
                "image": ProjectionPostprocessor(in_channels=6, num_outputs=3),
                "audio": AudioPostprocessor(in_channels=6, samples_per_patch=2),
            }
        )
    )
    x = rng.normal(size=(2, 5, 6))
    out = multi(t32(x), {"image": 3, "audio": 2})  # sorted: audio first
    close(
        out["audio"],
        np_linear(x[:, :2], multi.modalities["audio"].projection).reshape(2, 4),
    )
    close(out["image"], np_linear(x[:, 2:], multi.modalities["image"].projection))


def test_fourier_caches_stay_bounded_across_many_sizes():
    # Optical flow accepts any frame size: encoding many sizes must not keep them all.
    enc = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8), cache_size=2)
    for size in range(3, 9):
        grid = enc.grid((size, size + 1))
        points = enc.subsampled(torch.arange(size), (size, size + 1))
        assert grid.shape == (size * (size + 1), enc.num_channels)
        assert points.shape == (size, enc.num_channels)
    assert len(enc._cache) == 2 and len(enc._table_cache) == 2
    assert all(kind == "subsampled" for kind, *_ in enc._table_cache)
    # The most recent sizes are the ones kept, and a cached grid is returned as is.
    assert enc.grid((8, 9)) is enc.grid((8, 9))


@pytest.mark.skipif(
    not linear_module.onednn_kernel_available(), reason="this torch has no oneDNN kernel"
)
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_projections_sharing_an_input_run_as_one_product(kind, monkeypatch):
    """With packed weights, q, k and v of a several-head self-attention (k and v of a
    cross-attention) are one oneDNN product against their fused packed copy, within
    float32 rounding of float64; the copy follows in-place weight changes, is dropped
    by .to() and by copies, and release_packed_weights drops it."""
    import copy
    import pickle

    monkeypatch.setenv("PERCEIVER_TORCH_ONEDNN", "1")  # oneDNN on any CPU
    # oneDNN's packed copies (MKL's, on Intel CPUs with AVX-512, are not fused).
    monkeypatch.setattr(linear_module, "cpu_prefers_mkl_packing", lambda: False)
    if kind == "self":
        layer = randomize(SelfAttentionLayer(channels=12, num_heads=3, qk_channels=6))
        inputs = (torch.randn(2, 7, 12),)
        widths = [(6 + 6 + 6, 12)]  # q, k, v fused (v_channels defaults to qk)
    else:
        layer = randomize(
            CrossAttentionLayer(q_channels=8, kv_channels=10, num_heads=2, qk_channels=4)
        )
        inputs = (torch.randn(2, 5, 8), torch.randn(2, 9, 10))
        widths = [(4 + 4, 10)]  # k and v fused (v_channels defaults to qk)
    layer = linear_module.pack_weights(layer.eval())
    attention = layer.attention
    assert attention._fused.made  # made by pack_weights (prepack), before any call
    shapes = []
    kernel = linear_module._onednn_kernel
    monkeypatch.setattr(
        linear_module, "_onednn_kernel", lambda *a: shapes.append(tuple(a[1].shape)) or kernel(*a)
    )

    def check(label):
        shapes.clear()
        with torch.no_grad():
            got = layer(*inputs)
            assert [s for s in shapes if s in widths] == widths, shapes
            exact = float64_model(layer)(*(x.double() for x in inputs))
            with fast_paths.plain():
                plain = layer(*inputs)
        check_within_float32_rounding(label, got, plain, exact)

    check(f"fused projections ({kind})")
    with torch.no_grad():
        attention.to_v.weight.mul_(-2.0)  # in place: the fused copy is remade
        attention.to_k.bias.add_(0.5)
    check(f"fused projections after an in-place change ({kind})")
    assert copy.deepcopy(layer).attention._fused.made is False
    revived = pickle.loads(pickle.dumps(layer))  # torch.save of a whole module
    assert not revived.attention._fused.made
    with torch.no_grad():
        torch.testing.assert_close(revived(*inputs), layer(*inputs), rtol=0, atol=0)
    assert revived.attention._fused.made
    layer.double().float()
    assert not attention._fused.made
    check(f"fused projections after .to() ({kind})")
    linear_module.release_packed_weights(layer)
    assert not attention._fused.made
    shapes.clear()
    with torch.no_grad():
        layer(*inputs)
    assert not [s for s in shapes if s in widths]  # separate products again
