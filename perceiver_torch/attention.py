"""Attention blocks of Perceiver IO: attention, MLP, self- and cross-attention layers.

Read side by side with the official Haiku ``perceiver.py``: the same pre-norm layers,
the same defaults for channel sizes, the same masking rule. Where the numerics of the
reference differ from "usual PyTorch", a named helper says so (``gelu_tanh``,
``MASK_VALUE`` / ``zero_fully_masked_rows``, ``layer_norm``).

Attention is computed without materialising large logit matrices: queries are
processed with :func:`torch.nn.functional.scaled_dot_product_attention` (a blocked,
memory-efficient kernel on CPU) and, when the heads' qk and v widths differ (which
the fused kernel does not support), with an explicit softmax over bounded chunks of
queries; in bfloat16/float16 on Intel CPUs, heads of unequal widths up to 256 (up to
512 where the qk side is not much narrower) take the fused kernel with the narrower
side zero-padded (:func:`_attend_padded`), and on every CPU so do heads of equal
widths from 128 up that are not a multiple of 32 (padded to one). With a single
head, :class:`Attention` may also fold the key or query projection into the other
side of the dot product (``absorb_kv`` / ``absorb_q``): the same function, fewer
multiply-adds when one side is much longer than the other
(optical flow: 182,528 queries or inputs against 2,048 latents). That is the
``ABSORBED_ATTENTION`` fast path (:mod:`perceiver_torch.fast_paths`); under
``fast_paths.plain()`` every attention runs ``AttentionMode.STANDARD``, the reference's
computation. On CPUs without autograd, both products of one head (or of heads with
unequal qk and v widths and enough work each) run through oneDNN's matmul
(``ONEDNN_ATTENTION``, :func:`_attend_onednn`) where
``linear.onednn_attention_preferred`` says so: on AMD EPYC with AVX-512 it is twice
as fast as the MKL kernels behind ``bmm`` and the fused attention; on Intel CPUs,
whose MKL runs AVX-512 and AMX code, PyTorch's kernels are the faster and keep the
attentions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast_paths import AttentionMode, FastPath, enabled
from .linear import (  # gelu_tanh lives there (fused into Linear.forward_gelu)
    FusedWeights,
    Linear,
    compiling,
    cpu_prefers_onednn_attention,
    func_transforming,
    gelu_tanh,
    intercepted,
    linear_as_built,
    linears_on_one_input,
    onednn_eligible,
    onednn_kernel_available,
    onednn_attention_preferred,
)

# LayerNorm epsilon of Haiku's hk.LayerNorm as the reference configures it.
LAYER_NORM_EPS = 1e-5

# The reference *replaces* masked logits by -1e30 (not -inf, which turns a fully
# masked row into NaN). Adding -1e30 to a float32 logit gives exactly -1e30 too.
MASK_VALUE = -1e30
# float16 cannot hold 1e30 (its largest finite value is 65504); the reference uses
# -1e4 there, but it *replaces* masked logits (jnp.where) where this port *adds* the
# value: a masked key whose own logit l exceeded 1e4 plus the row's largest kept
# logit got weight from l - 1e4 (the logits are float32 in every kernel, and q, k of
# a few hundred reach l = 1e4), and all of it past that. -3e4 gives masked keys
# weight exp(-3e4 + ...) = 0 for l up to 3e4 (three times the old room) and still
# leaves l - 3e4 finite in float16 for l > -35504, should any kernel add in float16.
FLOAT16_MASK_VALUE = -3e4

# Largest logits block (elements) the explicit-softmax path materialises at once:
# 4 MiB of float32 logits, which the softmax and the weighted sum read back from the
# cache. Measured on an Intel Xeon with AMX (float32, medians of 15 interleaved
# forward passes): the language model's worst case 0.471 s against 0.485 s with
# 16M-element blocks (its decoder's 8 heads x 2,048 queries x 256 latents in 4
# chunks, not 1); the encoder's 256 latents against 2,048 inputs are level.
_MAX_LOGITS_ELEMENTS = 1 << 20
# The same for one head's chunk of queries on the oneDNN path (16 MiB of float32
# logits, and as much for their softmax): the ImageNet models' 512 latents against
# 50,176 pixels then go in 7 chunks of 83 rows, which keeps the products' speed and
# the forward pass's extra memory below the fused kernel's.
_ONEDNN_LOGITS_ELEMENTS = 1 << 22

# Unequal qk and v head widths in bfloat16/float16 on the CPU go to the fused kernel
# with the narrower side zero-padded to the wider (see attend) when both are at most
# _PADDED_FUSED_MAX_WIDTH wide (the language model's 8 heads: qk 32 against v 160 or
# 96), or at most _PADDED_FUSED_WIDE_MAX_WIDTH with a qk side at least a quarter of
# the wider (the video decoder's single head: qk 197 or 387 against v 512).
_PADDED_FUSED_MAX_WIDTH = 256
_PADDED_FUSED_WIDE_MAX_WIDTH = 512
# In bfloat16/float16 on the CPU the fused kernel's speed swings with a head width
# that is not a multiple of 32 (the width of a row of AMX's bfloat16 tiles). Measured
# on an Intel Xeon with AMX (2026-12-06, medians of 7 interleaved calls, one head, 512
# queries against 50,176 keys): widths 256, 260, 264, 288 took 33-36 ms; 258 47 ms,
# 261 86 ms, 262 75 ms. Optical flow's 322-wide head (8,192 queries against 2,048
# latents): 23 ms, zero-padded to 352 14 ms. Wider heads are therefore padded to the
# next multiple, which costs at most a quarter more work (narrower heads are left as
# they are: padding would add more than that).
_FUSED_WIDTH_MULTIPLE = 32
_FUSED_ALIGN_MIN_WIDTH = 128


def layer_norm(num_channels: int) -> nn.LayerNorm:
    """LayerNorm over the last axis with the reference's eps 1e-5, scale and offset.

    In bfloat16/float16 the statistics stay float32: PyTorch's LayerNorm kernels
    (CPU and CUDA) accumulate the mean and variance of reduced-precision inputs in
    float32 and only round the normalised output (tests/test_precision.py checks it
    against float64).
    """
    return nn.LayerNorm(num_channels, eps=LAYER_NORM_EPS)


# Rows a chunk of layer_norm_padded normalises at a time (about 2 MB in bfloat16 for
# the widths it serves).
_PADDED_NORM_ELEMENTS = 1 << 20


def layer_norm_padded(norm: nn.LayerNorm, x: Tensor, width: int) -> Tensor:
    """``F.pad(norm(x), (0, width - C))`` for x (B, N, C) without holding both: the
    normalised rows are written in chunks into a (B, N, width) array whose last
    channels are zero (the same per-row computation as ``norm(x)``)."""
    b, n, c = x.shape
    out = x.new_empty(b, n, width)
    out[..., c:].zero_()
    rows = max(1, _PADDED_NORM_ELEMENTS // c)
    for i in range(b):
        for start in range(0, n, rows):
            out[i, start : start + rows, :c] = norm(x[i, start : start + rows])
    return out


def mask_value(dtype: torch.dtype) -> float:
    """The masked-logit value for logits of ``dtype``: -1e30, or -3e4 in float16
    (1e30 overflows float16; the reference's -1e4 replaces logits, this is added). bfloat16 has float32's
    exponent range, so -1e30 is representable there (as -1.0000e30 rounded)."""
    return FLOAT16_MASK_VALUE if dtype == torch.float16 else MASK_VALUE


def key_mask_bias(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive logits bias: 0 for kept keys, ``mask_value(dtype)`` (-1e30; -3e4 in
    float16) for masked keys.

    key_mask: (B, N), nonzero = keep. Returns (B, 1, 1, N) for (B, H, M, N) logits.
    """
    value = mask_value(dtype)
    bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device)
    bias = bias.masked_fill(key_mask == 0, value)
    return bias[:, None, None, :]


def rows_to_keep(
    batch: int,
    num_queries: int,
    *,
    key_mask: Optional[Tensor],
    query_mask: Optional[Tensor],
    device: torch.device,
) -> Optional[Tensor]:
    """Which query rows have at least one unmasked key: (B, M) bool, or None for all.

    The reference's mask is ``query_mask[:, :, None] * key_mask[:, None, :]``; a row is
    fully masked when its query is masked or when every key is.
    """
    if key_mask is None and query_mask is None:
        return None
    keep = torch.ones(batch, num_queries, dtype=torch.bool, device=device)
    if query_mask is not None:
        keep = keep & (query_mask != 0)
    if key_mask is not None:
        keep = keep & (key_mask != 0).any(dim=-1, keepdim=True)
    return keep


def zero_fully_masked_rows(summed: Tensor, keep: Optional[Tensor]) -> Tensor:
    """Zeroes attention outputs of fully-masked rows, as the reference does.

    A fully-masked row's softmax is uniform (all logits -1e30), so the weighted sum is
    not zero; the reference forces zeros *before* the output projection, so the
    output bias still comes through. summed: (B, M, C); keep: (B, M) bool or None.
    """
    if keep is None:
        return summed
    # where (not a multiplication by the mask): a NaN or inf in a masked row, which
    # a reduced-precision overflow could produce, is dropped too.
    return torch.where(keep[..., None], summed, summed.new_zeros(()))


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """softmax(q.k * scale + bias) v per head, without materialising big matrices.

    q: (B, H, M, Dqk); k: (B, H, N, Dqk); v: (B, H, N, Dv); bias: broadcastable to
    (B, H, M, N) (the key mask). Returns (B, H, M, Dv). ``scale`` defaults to
    1/sqrt(Dqk), the reference's scaling (applied to the logits after the dot product).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    width = fused_kernel_width(q, k, v, dropout_p=dropout_p)
    if width == _ONEDNN_PATH:
        return _attend_onednn(q, k, v, bias=bias, scale=scale)
    if width == _EXPLICIT_PATH:
        # The fused kernels need equal qk and v head widths; otherwise PyTorch would
        # fall back to a kernel that materialises every logit: do it explicitly.
        return _attend_explicit(q, k, v, bias=bias, scale=scale, dropout_p=dropout_p)
    if q.shape[-1] == v.shape[-1] == width:
        # Blocked, memory-efficient kernel (flash attention on CPU; flash or
        # memory-efficient kernels on GPUs). In bfloat16/float16 its logits, softmax
        # and running sums are float32 (the kernels' accumulation type); the mask
        # bias has the inputs' dtype, hence mask_value(dtype).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
        )
    return _attend_padded(
        q, k, v, width=width, bias=bias, scale=scale, dropout_p=dropout_p
    )


# fused_kernel_width's answers where attend does not run the fused kernel.
_ONEDNN_PATH = -1
_EXPLICIT_PATH = 0


def fused_kernel_width(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0) -> int:
    """The head width :func:`attend` runs PyTorch's fused kernel at for these inputs
    (q, k and v zero-padded to it where they are narrower: unequal widths, or widths
    the kernel runs slowly, :func:`_aligned_fused_width`), or ``_ONEDNN_PATH`` /
    ``_EXPLICIT_PATH`` where it computes with oneDNN's products or materialised
    logits instead. Only shapes, dtypes and devices are read."""
    if func_transforming():
        # Under torch.func transforms the fused kernel has no batching rule (vmap
        # runs it once per item, with a warning) and no forward-mode derivative
        # (jvp failed on every model); the explicit path's products and softmax have
        # both.
        return _EXPLICIT_PATH
    if dropout_p == 0.0 and uses_onednn_attention(q, k, v) and _onednn_attention_pays(q, k, v):
        return _ONEDNN_PATH
    if q.shape[-1] == v.shape[-1] or _pads_to_fused_kernel(q, v):
        return _aligned_fused_width(q, v)
    return _EXPLICIT_PATH


def _attend_explicit(
    q: Tensor, k: Tensor, v: Tensor, *, bias: Optional[Tensor], scale: float, dropout_p: float
) -> Tensor:
    """:func:`attend` with the logits materialised, in chunks of queries of at most
    ``_MAX_LOGITS_ELEMENTS`` logits, the scaling and the bias fused into the logits'
    matmul."""
    b, h, m, d = q.shape
    n = k.shape[2]
    # Logits, mask bias and softmax in float32 whatever the inputs' dtype (as the
    # fused kernels do): rounding logits of size ~10 to bfloat16 would move them by
    # ~0.04, and the softmax amplifies absolute logit errors. q.k is a small part of
    # the work (qk widths are the narrow ones); the weighted sum of the (wider)
    # values runs in the inputs' dtype.
    logits_dtype = torch.promote_types(q.dtype, torch.float32)
    keys_t = k.reshape(b * h, n, d).transpose(1, 2).to(logits_dtype)  # (BH, D, N)
    values = v.reshape(b * h, n, v.shape[-1])
    # A recorded graph (torch.jit.trace for ONNX, torch.export, torch.compile) keeps
    # the chunking of its example's batch: there it depends on one item only, so that
    # the graph serves other batches (at batch 2 the language model's ONNX graph
    # failed in onnxruntime, its chunks cut for batch 1).
    items = 1 if compiling() else b
    rows = max(1, _MAX_LOGITS_ELEMENTS // max(1, items * h * n))
    outputs = []
    for start in range(0, m, rows):
        q_chunk = q[:, :, start : start + rows].reshape(b * h, -1, d).to(logits_dtype)
        if bias is None:
            logits = torch.bmm(q_chunk, keys_t).mul_(scale)
        else:
            chunk_bias = (
                bias if bias.shape[2] == 1 else bias[:, :, start : start + rows]
            )
            chunk_bias = chunk_bias.expand(b, h, chunk_bias.shape[2], n).reshape(
                b * h, chunk_bias.shape[2], n
            )
            logits = torch.baddbmm(
                chunk_bias.to(logits_dtype), q_chunk, keys_t, alpha=scale
            )
        weights = torch.softmax(logits, dim=-1).to(values.dtype)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p, training=True)
        outputs.append(torch.bmm(weights, values).view(b, h, -1, v.shape[-1]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _pads_to_fused_kernel(q: Tensor, v: Tensor) -> bool:
    """Whether :func:`attend` pads unequal qk and v widths to run the fused kernel:
    bfloat16/float16 tensors on an Intel CPU whose wider side is at most
    ``_PADDED_FUSED_MAX_WIDTH``, or at most ``_PADDED_FUSED_WIDE_MAX_WIDTH`` with a qk
    side at least a quarter of it.

    In those dtypes the explicit path computes its float32 logits with float32
    products (no bfloat16 matrix instructions) and weights the values with a slow
    reduced-precision ``bmm``; the fused kernel multiplies in the inputs' dtype with
    float32 sums. Measured on an Intel Xeon with AMX (bfloat16, medians of 30 calls,
    the language model's shapes): 2,048 queries by 8 heads against 256 latents (qk 32,
    v 96) 2.0 against 13.0 ms, 256 latents against 2,048 inputs (qk 32, v 160, masked)
    3.1 against 4.3 ms, latents against latents 0.40 against 0.64 ms. One head of
    wider widths (2026-12-06, medians of 7 calls): the video decoder's 6,272 queries
    against 784 latents (qk 197, v 512) 7.9 against 26 ms, qk 387 0.33 of the
    explicit path's time; 256 queries against 2,048 keys 0.64 of it for qk 256 and v
    512, but 1.47 for qk 64 and v 512 (padding the logits' side eightfold costs more
    than the explicit path's float32 logits); one head of 256 against 1,280 channels
    1.33 of it. In float32 the explicit path is the faster (5.4 against 7.0 ms on the
    first shape).

    Not on CPUs where the oneDNN path takes the attentions
    (:func:`~perceiver_torch.linear.cpu_prefers_onednn_attention`: not Intel's),
    whose fused kernel runs bfloat16 through slower code: on AMD EPYC with AVX-512
    (2026-12-06, the language model's shapes as above, bfloat16) padded against
    explicit took 10.2 against 7.0 ms, 18.0 against 11.7, and 2.2 against 0.9."""
    dqk, wider = q.shape[-1], max(q.shape[-1], v.shape[-1])
    return (
        q.dtype in (torch.bfloat16, torch.float16)
        and q.device.type == "cpu"
        and not cpu_prefers_onednn_attention()
        and (
            wider <= _PADDED_FUSED_MAX_WIDTH
            or (wider <= _PADDED_FUSED_WIDE_MAX_WIDTH and 4 * dqk >= wider)
        )
    )


def _aligned_fused_width(q: Tensor, v: Tensor) -> int:
    """The head width the fused kernel gets: the wider of qk and v, rounded up to a
    multiple of ``_FUSED_WIDTH_MULTIPLE`` for bfloat16/float16 CPU tensors at least
    ``_FUSED_ALIGN_MIN_WIDTH`` wide (see there)."""
    wider = max(q.shape[-1], v.shape[-1])
    if (
        q.dtype in (torch.bfloat16, torch.float16)
        and q.device.type == "cpu"
        and wider >= _FUSED_ALIGN_MIN_WIDTH
    ):
        return -(-wider // _FUSED_WIDTH_MULTIPLE) * _FUSED_WIDTH_MULTIPLE
    return wider


def _attend_padded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    width: int,
    bias: Optional[Tensor],
    scale: float,
    dropout_p: float,
) -> Tensor:
    """:func:`attend` by the fused kernel with q, k and v zero-padded to ``width``
    channels (unequal qk and v widths, or a width the kernel runs slowly): zero
    channels add exact zeros to every q.k (the scale stays 1/sqrt of the true qk
    width) and zero value channels give zero outputs, which are cut off. The kernel
    keeps logits, softmax and running sums in float32, as the explicit path does.
    Keys that are the values (``absorb_kv``) are padded once."""
    dqk, dv = q.shape[-1], v.shape[-1]
    shared = k is v
    if dqk < width:
        q, k = F.pad(q, (0, width - dqk)), F.pad(k, (0, width - dqk))
    if dv < width:
        v = k if shared else F.pad(v, (0, width - dv))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
    )
    return out if dv == width else out[..., :dv]


def uses_onednn_attention(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`attend` may compute ``q``, ``k``, ``v`` with oneDNN's matmuls
    (the ``ONEDNN_ATTENTION`` fast path; the logits need the float32 kernel too)."""
    return (
        onednn_eligible(q, k, v)
        and enabled(FastPath.ONEDNN_ATTENTION)
        and onednn_attention_preferred(q.dtype)
        and onednn_kernel_available(torch.float32)
    )


def _onednn_chunk_rows(num_keys: int) -> int:
    """Query rows per chunk on the oneDNN path (at most _ONEDNN_LOGITS_ELEMENTS logits)."""
    return max(1, _ONEDNN_LOGITS_ELEMENTS // max(1, num_keys))


# Several heads of equal qk and v widths (every latent self-attention) go to the
# fused kernel: it blocks over queries and keys, where the oneDNN path writes out one
# head's logits at a time and loops over heads in Python. Measured on AMD EPYC
# (medians of interleaved calls), fused kernel / oneDNN path in float32: the flow
# latents' 16 heads of 32 channels (2,048 x 2,048 logits each) 0.40, video's 8 of 64
# 0.56, the language latents' 8 of 160 0.72, ImageNet's 8 of 128 0.76; in bfloat16
# 0.64, 1.04, 0.88 and 1.14.
#
# Below this many query rows per chunk, the oneDNN path reads each head's keys and
# values once per chunk for too little work (a 2*rows multiply-adds per element
# read): it then runs only when they fit in the cache (at most _CACHED_KV_BYTES), as
# the flow decoder's 2,048 latents do; the flow encoder's 182,528 inputs (470 MB for
# 22 rows a chunk) go to the fused kernel, which blocks over the keys itself.
_MIN_CHUNK_ROWS = 64
_CACHED_KV_BYTES = 8 << 20

# Several heads that each hold fewer multiply-adds than this (queries x keys x (qk +
# v widths)) go to the explicit path's batched products: the oneDNN path calls some
# six kernels a head from Python, and for small heads those calls cost more than
# its faster products gain. Measured on AMD EPYC with AVX-512 (2026-12-06, medians):
# the language model's latent self-attention (8 heads, 256 x 256 logits, qk 32, v
# 160: 12.6 million a head) took 1.39 ms against 2.37 ms in float32, 0.92 against
# 1.75 in bfloat16; its decoder's heads (2,048 x 256, qk 32, v 96: 67 million) and
# encoder's (256 x 2,048, qk 32, v 160: 101 million) stay faster on oneDNN.
_ONEDNN_MIN_HEAD_WORK = 1 << 25


def _onednn_attention_pays(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the oneDNN path beats the fused kernel (or the explicit path) here:
    not for several heads of equal qk and v widths or of little work each
    (``_ONEDNN_MIN_HEAD_WORK``), and only where its chunks of queries are big enough
    for their keys."""
    if q.shape[1] > 1 and q.shape[-1] == v.shape[-1]:
        return False
    m, n = q.shape[2], k.shape[2]
    if q.shape[1] > 1 and m * n * (q.shape[-1] + v.shape[-1]) < _ONEDNN_MIN_HEAD_WORK:
        return False
    rows = _onednn_chunk_rows(n)
    kv_bytes = n * (k.shape[-1] + v.shape[-1]) * k.element_size()
    return rows >= min(m, _MIN_CHUNK_ROWS) or kv_bytes <= _CACHED_KV_BYTES


def _onednn_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for 2-D ``a`` (M, K) and ``b`` (N, K) by oneDNN's matmul, which
    takes ``b`` strided (a head's slice, or a transposed view) without a copy."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _attend_onednn(
    q: Tensor, k: Tensor, v: Tensor, *, bias: Optional[Tensor], scale: float
) -> Tensor:
    """:func:`attend` with both products of every head by oneDNN's matmul.

    On CPUs PyTorch's ``bmm`` and its fused attention kernel multiply through MKL,
    which on AMD EPYC with AVX-512 runs at half of oneDNN's float32 speed for these shapes; one
    oneDNN matmul per head (and chunk of queries) computes the same sums in another
    order. As on the explicit path, logits, bias and softmax are float32 and only the
    weighted sum of the values runs in the inputs' dtype. The logits of one head's
    chunk of queries (at most ``_ONEDNN_LOGITS_ELEMENTS``) exist at a time.
    """
    b, h, m, _ = q.shape
    n = k.shape[2]
    logits_dtype = torch.promote_types(q.dtype, torch.float32)
    # The second operand of each product must be a contiguous matrix or the plain
    # transpose of one: for one whose rows are strided (a head's slice of the
    # (B, N, H, D) projections) oneDNN falls back to a reference kernel some thousand
    # times slower. The first operand may be strided; so may the output, written
    # straight into the (B, M, H, Dv) layout the caller merges the heads from.
    k, v = k.contiguous(), v.contiguous()
    out = q.new_empty(b, m, h, v.shape[-1], dtype=v.dtype)
    rows = _onednn_chunk_rows(n)
    for i in range(b):
        for j in range(h):
            keys = k[i, j].to(logits_dtype)  # (N, Dqk): the "weight" of q @ k.T
            values_t = v[i, j].transpose(0, 1)  # (Dv, N): weights @ v
            head_bias = None
            if bias is not None:
                head_bias = bias[i if bias.shape[0] > 1 else 0, j if bias.shape[1] > 1 else 0]
            for start in range(0, m, rows):
                stop = min(m, start + rows)
                logits = _onednn_product(q[i, j, start:stop].to(logits_dtype), keys)
                logits.mul_(scale)  # after the dot product, as the reference scales
                if head_bias is not None:
                    logits += (
                        head_bias if head_bias.shape[0] == 1 else head_bias[start:stop]
                    ).to(logits_dtype)
                weights = torch.softmax(logits, dim=-1).to(v.dtype)
                out[i, start:stop, j] = _onednn_product(weights, values_t)
    return out.transpose(1, 2)


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H*D) with channels ordered (head, d) as the reference."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@dataclass
class PreparedKeys:
    """Key/value side of an attention, computed once and reused for chunks of queries.

    ``mode`` says how ``k`` and ``v`` relate to the module's projections:
    - ``STANDARD``: k = to_k(kv) (B, H, N, qk/H), v = to_v(kv) (B, H, N, v/H);
    - ``ABSORB_KV`` (one head): k = v = kv (B, 1, N, C_kv); queries are mapped by
      to_k's weight and outputs by to_v afterwards;
    - ``ABSORB_Q`` (one head): k = to_k(kv) @ W_q (B, 1, N, C_q), v = to_v(kv) @ W_out^T
      (B, 1, N, C_out); ``bias`` also holds to_q's bias dotted with the keys.
    ``bias``: (B, 1, 1, N) additive logits bias or None; ``key_mask``: (B, N) key mask
    (or None), kept to find fully-masked rows.
    """

    mode: AttentionMode
    k: Tensor
    v: Tensor
    bias: Optional[Tensor]
    key_mask: Optional[Tensor]


@dataclass
class UnpreparedKeys:
    """In place of :class:`PreparedKeys`, the key/value inputs of ``layer``, which
    must be called whole for each chunk of queries (:func:`linear.intercepted`:
    hooked or replaced): ``inputs_kv`` (B, N, C), ``key_mask`` (B, N) or None."""

    layer: nn.Module
    inputs_kv: Tensor
    key_mask: Optional[Tensor]

    def call(self, inputs_q: Tensor, query_mask: Optional[Tensor]) -> Tensor:
        """``layer(inputs_q, inputs_kv, key_mask=..., query_mask=...)``."""
        return self.layer(
            inputs_q, self.inputs_kv, key_mask=self.key_mask, query_mask=query_mask
        )


class Attention(nn.Module):
    """Multi-head QKV attention with separate qk, v and output widths.

    Projections ``to_q`` (q_channels -> qk), ``to_k`` (kv_channels -> qk), ``to_v``
    (kv_channels -> v) and ``to_out`` (v -> output), all with bias.

    Args (keyword-only):
        q_channels: width of the query inputs.
        kv_channels: width of the key/value inputs.
        qk_channels: width of queries and keys; None = q_channels (reference default).
        v_channels: width of the values; None = qk_channels.
        output_channels: width of the output; None = v_channels.
        num_heads: heads; qk and v widths must be divisible by it.
        attention_dropout: dropout on the attention weights in training.
        self_attention: queries, keys and values come from one input (a
            :class:`SelfAttentionLayer`'s).

    With several heads, the projections that share an input (q, k and v of a
    self-attention; k and v otherwise) run as one product where their weights are
    packed (``linear.linears_on_one_input``).
    """

    def __init__(
        self,
        *,
        q_channels: int,
        kv_channels: int,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        output_channels: Optional[int] = None,
        num_heads: int = 1,
        attention_dropout: float = 0.0,
        self_attention: bool = False,
    ) -> None:
        super().__init__()
        qk_channels = q_channels if qk_channels is None else qk_channels
        v_channels = qk_channels if v_channels is None else v_channels
        output_channels = v_channels if output_channels is None else output_channels
        if qk_channels % num_heads or v_channels % num_heads:
            raise ValueError(
                f"qk_channels ({qk_channels}) and v_channels ({v_channels}) must be "
                f"divisible by num_heads ({num_heads})"
            )
        self.num_heads = num_heads
        self.qk_channels = qk_channels
        self.v_channels = v_channels
        self.attention_dropout = attention_dropout
        self.to_q = Linear(q_channels, qk_channels)
        self.to_k = Linear(kv_channels, qk_channels)
        self.to_v = Linear(kv_channels, v_channels)
        self.to_out = Linear(v_channels, output_channels)
        self.self_attention = self_attention
        self._fused = FusedWeights()  # of the projections fused_linear_groups() names

    def fused_linear_groups(self) -> List[Tuple[Tuple[Linear, ...], FusedWeights]]:
        """The projections computed as one product (``linear.prepack`` packs them
        together): q, k and v of a self-attention, k and v otherwise; only with
        several heads (one head may fold the projections instead, ``choose_mode``)."""
        if self.num_heads == 1:
            return []
        if self.self_attention:
            return [((self.to_q, self.to_k, self.to_v), self._fused)]
        return [((self.to_k, self.to_v), self._fused)]

    def _apply(self, fn, recurse=True):
        self._fused.clear()  # .to(), .float(), ...: the weights are replaced
        return super()._apply(fn, recurse)

    @property
    def scale(self) -> float:
        """1/sqrt(qk channels per head), applied to the logits after the dot product."""
        return 1.0 / math.sqrt(self.qk_channels // self.num_heads)

    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def projections_as_built(self) -> bool:
        """Whether no projection is hooked or replaced (:func:`linear.intercepted`)."""
        return all(
            linear_as_built(layer) for layer in (self.to_q, self.to_k, self.to_v, self.to_out)
        )

    def choose_mode(self, num_queries: int, num_keys: int) -> AttentionMode:
        """Cheapest exact formulation for M queries against N keys (by multiply-adds).

        Folding projections across the dot product is exact in real arithmetic (the
        folded-away bias q.b_k is constant along a softmax row; rows of softmax weights
        sum to one, so b_v passes through) and differs from the reference only by
        float32 rounding. It needs one head, no attention dropout, no training with
        autograd (a folded-away key projection's bias would get no gradient, where the
        plain path gives it zeros up to rounding: optimizers treat the two differently)
        and the ``ABSORBED_ATTENTION`` fast path switched on, and projections that
        are not :func:`linear.intercepted` (the folds read their weights).
        """
        if (
            self.num_heads != 1
            or self._dropout_p() > 0.0
            or (self.training and torch.is_grad_enabled())
            or not enabled(FastPath.ABSORBED_ATTENTION)
            or not self.projections_as_built()
        ):
            return AttentionMode.STANDARD
        m, n = num_queries, num_keys
        c_q, c_kv = self.to_q.in_features, self.to_k.in_features
        qk, v, c_out = self.qk_channels, self.v_channels, self.to_out.out_features
        kv_proj = n * c_kv * (qk + v)
        cost = {
            AttentionMode.STANDARD: m * c_q * qk
            + kv_proj
            + m * n * (qk + v)
            + m * v * c_out,
            AttentionMode.ABSORB_KV: m * c_q * qk
            + m * qk * c_kv
            + 2 * m * n * c_kv
            + m * c_kv * v
            + m * v * c_out,
            AttentionMode.ABSORB_Q: kv_proj + n * qk * c_q + n * v * c_out + m * n * (c_q + c_out),
        }
        return min(cost, key=cost.get)

    def prepare(
        self,
        inputs_kv: Tensor,
        *,
        key_mask: Optional[Tensor] = None,
        num_queries: Optional[int] = None,
        mode: Optional[AttentionMode] = None,
    ) -> PreparedKeys:
        """Projects the key/value inputs once.

        inputs_kv: (B, N, C_kv); key_mask: (B, N) with nonzero = keep;
        num_queries: how many queries will be attended in total (chooses the mode);
        mode: force an :class:`AttentionMode` (or its value, e.g. ``"absorb_q"``).
        """
        mode = self.resolve_mode(mode, num_queries, inputs_kv.shape[1])
        if mode is AttentionMode.STANDARD:
            if self.num_heads > 1 and not self.self_attention:
                k, v = linears_on_one_input((self.to_k, self.to_v), inputs_kv, self._fused)
            else:
                k, v = self.to_k(inputs_kv), self.to_v(inputs_kv)
            return self._standard_keys(k, v, key_mask)
        bias = None if key_mask is None else key_mask_bias(key_mask, inputs_kv.dtype)
        if mode is AttentionMode.ABSORB_KV:
            # Inputs wider than to_k's are zero-padded (absorbed_key_width): the
            # queries are padded alike in attend_prepared.
            k = v = inputs_kv[:, None]
        else:  # AttentionMode.ABSORB_Q
            keys = self.to_k(inputs_kv)  # (B, N, qk)
            k = torch.matmul(keys, self.to_q.weight)[:, None]  # (B, 1, N, C_q)
            # The attention kernels scale q.k only, not the additive bias.
            q_bias = torch.matmul(keys, self.to_q.bias * self.scale)[:, None, None, :]
            bias = q_bias if bias is None else bias + q_bias
            v = torch.matmul(self.to_v(inputs_kv), self.to_out.weight.t())[:, None]
        return PreparedKeys(mode, k, v, bias, key_mask)

    def resolve_mode(
        self, mode: Optional[AttentionMode], num_queries: Optional[int], num_keys: int
    ) -> AttentionMode:
        """``mode`` as an :class:`AttentionMode` (or its value, e.g. ``"absorb_q"``), or
        where None the cheapest for ``num_queries`` (None: as many as the keys).
        STANDARD where a projection is hooked or replaced, whatever was asked."""
        if mode is None:
            mode = self.choose_mode(
                num_queries if num_queries is not None else num_keys, num_keys
            )
        try:
            mode = AttentionMode(mode)
        except ValueError:
            raise ValueError(
                f"unknown attention mode {mode!r}; expected one of "
                f"{[m.value for m in AttentionMode]}"
            ) from None
        if mode is not AttentionMode.STANDARD and not self.projections_as_built():
            return AttentionMode.STANDARD
        return mode

    def absorbed_key_width(self, inputs_kv: Tensor, num_queries: int) -> int:
        """The width :func:`attend` will pad ABSORB_KV's keys and values (the inputs
        themselves) to, for ``num_queries`` queries: wider than the inputs where the
        fused kernel runs them zero-padded (bfloat16/float16 CPU tensors of widths
        that are not a multiple of 32). ``CrossAttentionLayer.prepare`` then writes
        its LayerNorm into the padded array, instead of keeping the inputs twice (the
        optical flow encoder's 182,528 x 322: 117 MB in bfloat16)."""
        b, n, c = inputs_kv.shape
        keys = inputs_kv[:, None]
        queries = inputs_kv.new_empty(()).expand(b, 1, num_queries, c)  # shape only
        width = fused_kernel_width(queries, keys, keys, dropout_p=self._dropout_p())
        return max(width, c)

    def _standard_keys(self, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> PreparedKeys:
        """STANDARD mode's prepared keys from the projected keys and values (B, N, .)."""
        bias = None if key_mask is None else key_mask_bias(key_mask, k.dtype)
        heads = self.num_heads
        return PreparedKeys(
            AttentionMode.STANDARD, _split_heads(k, heads), _split_heads(v, heads), bias,
            key_mask,
        )

    def attend_prepared(
        self,
        inputs_q: Tensor,
        prepared: PreparedKeys,
        *,
        query_mask: Optional[Tensor] = None,
        residual: Optional[Tensor] = None,
    ) -> Tensor:
        """Attends queries (B, M, C_q) to prepared keys; returns (B, M, C_out), plus
        ``residual`` (B, M, C_out) when given: added in ``to_out``'s pass on the oneDNN
        path (:meth:`Linear.forward_add`), one memory pass fewer."""
        if prepared.mode is AttentionMode.STANDARD:
            q = _split_heads(self.to_q(inputs_q), self.num_heads)
            return self._attend_heads(q, prepared, query_mask, residual)
        keep = rows_to_keep(
            inputs_q.shape[0],
            inputs_q.shape[1],
            key_mask=prepared.key_mask,
            query_mask=query_mask,
            device=inputs_q.device,
        )
        if prepared.mode is AttentionMode.ABSORB_KV:
            q = torch.matmul(self.to_q(inputs_q), self.to_k.weight)[:, None]
            width = prepared.k.shape[-1]  # zero-padded keys (absorbed_key_width)
            if width > q.shape[-1]:
                q = F.pad(q, (0, width - q.shape[-1]))
            mixed = attend(
                q, prepared.k, prepared.v, bias=prepared.bias, scale=self.scale
            )[:, 0, :, : self.to_k.in_features]
            summed = zero_fully_masked_rows(self.to_v(mixed), keep)
            return self._project_out(summed, residual)
        # absorb_q: to_q is folded into the keys and to_out into the values.
        mixed = attend(
            inputs_q[:, None],
            prepared.k,
            prepared.v,
            bias=prepared.bias,
            scale=self.scale,
        )
        out = zero_fully_masked_rows(mixed[:, 0], keep) + self.to_out.bias
        return out if residual is None else residual + out

    def _attend_heads(
        self,
        q: Tensor,
        prepared: PreparedKeys,
        query_mask: Optional[Tensor],
        residual: Optional[Tensor],
    ) -> Tensor:
        """The STANDARD mode's attention of queries split in heads (B, H, M, qk/H),
        then to_out (plus ``residual``)."""
        keep = rows_to_keep(
            q.shape[0],
            q.shape[2],
            key_mask=prepared.key_mask,
            query_mask=query_mask,
            device=q.device,
        )
        summed = attend(
            q,
            prepared.k,
            prepared.v,
            bias=prepared.bias,
            scale=self.scale,
            dropout_p=self._dropout_p(),
        )
        summed = zero_fully_masked_rows(_merge_heads(summed), keep)
        return self._project_out(summed, residual)

    def _project_out(self, summed: Tensor, residual: Optional[Tensor]) -> Tensor:
        """to_out(summed), plus ``residual`` in the same pass where it is given (and
        to_out is not hooked or replaced)."""
        if residual is None:
            return self.to_out(summed)
        if not linear_as_built(self.to_out):
            return residual + self.to_out(summed)
        return self.to_out.forward_add(summed, residual)

    def forward(
        self,
        inputs_q: Tensor,
        inputs_kv: Tensor,
        *,
        key_mask: Optional[Tensor] = None,
        query_mask: Optional[Tensor] = None,
        residual: Optional[Tensor] = None,
    ) -> Tensor:
        """inputs_q: (B, M, C_q); inputs_kv: (B, N, C_kv); masks (B, N) / (B, M),
        nonzero = keep. Returns (B, M, output_channels), plus ``residual`` when given
        (see :meth:`attend_prepared`)."""
        if self.self_attention and inputs_q is inputs_kv and self.num_heads > 1:
            # Several heads: STANDARD mode (choose_mode), q, k and v in one product.
            q, k, v = linears_on_one_input(
                (self.to_q, self.to_k, self.to_v), inputs_kv, self._fused
            )
            prepared = self._standard_keys(k, v, key_mask)
            q = _split_heads(q, self.num_heads)
            return self._attend_heads(q, prepared, query_mask, residual)
        prepared = self.prepare(
            inputs_kv, key_mask=key_mask, num_queries=inputs_q.shape[1]
        )
        return self.attend_prepared(
            inputs_q, prepared, query_mask=query_mask, residual=residual
        )


def _mlp_block(mlp: nn.Module, normed: Tensor, residual: Tensor) -> Tensor:
    """``residual + mlp(normed)``: the addition in the MLP's last pass, unless the MLP
    is hooked or replaced (:func:`linear.intercepted`)."""
    if intercepted(mlp):
        return residual + mlp(normed)
    return mlp(normed, residual=residual)


def _dropout_active(dropout: nn.Dropout) -> bool:
    """Whether ``dropout`` changes its input (training with p > 0)."""
    return dropout.training and dropout.p > 0


class MLP(nn.Module):
    """Two Linear layers with tanh GELU between: C -> widening_factor*C -> C.

    Args (keyword-only):
        channels: input and output width.
        widening_factor: hidden width multiplier (1 in every official model).
        dropout: dropout on the output in training.
    """

    def __init__(
        self, *, channels: int, widening_factor: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = Linear(channels, widening_factor * channels)
        self.fc2 = Linear(widening_factor * channels, channels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """x: (..., C) -> (..., C); plus ``residual`` when given (in the last linear
        layer's pass on the oneDNN path, without dropout). A hooked or replaced layer
        (:func:`linear.intercepted`) is called instead of fused."""
        if linear_as_built(self.fc1):
            hidden = self.fc1.forward_gelu(x)
        else:
            hidden = gelu_tanh(self.fc1(x))
        if (
            residual is not None
            and not _dropout_active(self.dropout)
            and linear_as_built(self.fc2)
        ):
            return self.fc2.forward_add(hidden, residual)
        out = self.dropout(self.fc2(hidden))
        return out if residual is None else residual + out


class SelfAttentionLayer(nn.Module):
    """Pre-norm self-attention block: x += attn(norm(x)); x += mlp(mlp_norm(x)).

    Args (keyword-only):
        channels: width of the latents.
        num_heads: attention heads.
        qk_channels: None = channels (reference default).
        v_channels: None = qk_channels.
        widening_factor: MLP widening.
        dropout: dropout after the attention and the MLP (training only).
        attention_dropout: dropout on attention weights (training only).
    """

    def __init__(
        self,
        *,
        channels: int,
        num_heads: int = 8,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        widening_factor: int = 1,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm = layer_norm(channels)
        self.attention = Attention(
            q_channels=channels,
            kv_channels=channels,
            qk_channels=qk_channels,
            v_channels=v_channels,
            # The reference leaves this at v_channels; the residual needs channels.
            output_channels=channels,
            num_heads=num_heads,
            attention_dropout=attention_dropout,
            self_attention=True,
        )
        self.dropout = nn.Dropout(dropout)
        self.mlp_norm = layer_norm(channels)
        self.mlp = MLP(
            channels=channels, widening_factor=widening_factor, dropout=dropout
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        normed = self.norm(x)
        # The residuals are added in the attention's and the MLP's last passes, unless
        # they are hooked or replaced: their hooks see their own outputs then.
        if _dropout_active(self.dropout) or intercepted(self.attention):
            x = x + self.dropout(self.attention(normed, normed))
        else:
            x = self.attention(normed, normed, residual=x)
        return _mlp_block(self.mlp, self.mlp_norm(x), x)


class CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention block with separate query and key/value norms.

    ``x = attn(q_norm(q), kv_norm(kv))`` (plus ``q`` if ``use_query_residual``), then
    ``x += mlp(mlp_norm(x))``. The output keeps the query width.

    Args (keyword-only):
        q_channels: query width (also the output width).
        kv_channels: key/value input width.
        num_heads: attention heads.
        qk_channels: None = kv_channels (the reference's ``shape_for_attn='kv'``).
        v_channels: None = qk_channels.
        widening_factor: MLP widening.
        use_query_residual: add the query back after attention.
        dropout: dropout after the attention and the MLP (training only).
        attention_dropout: dropout on attention weights (training only).
    """

    def __init__(
        self,
        *,
        q_channels: int,
        kv_channels: int,
        num_heads: int = 1,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        widening_factor: int = 1,
        use_query_residual: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.use_query_residual = use_query_residual
        self.q_norm = layer_norm(q_channels)
        self.kv_norm = layer_norm(kv_channels)
        self.attention = Attention(
            q_channels=q_channels,
            kv_channels=kv_channels,
            qk_channels=kv_channels if qk_channels is None else qk_channels,
            v_channels=v_channels,
            output_channels=q_channels,
            num_heads=num_heads,
            attention_dropout=attention_dropout,
        )
        self.dropout = nn.Dropout(dropout)
        self.mlp_norm = layer_norm(q_channels)
        self.mlp = MLP(
            channels=q_channels, widening_factor=widening_factor, dropout=dropout
        )

    def prepare(
        self,
        inputs_kv: Tensor,
        *,
        key_mask: Optional[Tensor] = None,
        num_queries: Optional[int] = None,
        mode: Optional[AttentionMode] = None,
    ) -> Union[PreparedKeys, UnpreparedKeys]:
        """Normalises and projects the key/value inputs (B, N, C_kv) once (where the
        attention is hooked or replaced, only normalises them: it is called whole)."""
        attention = self.attention
        if intercepted(attention):
            return UnpreparedKeys(attention, self.kv_norm(inputs_kv), key_mask)
        num_keys = inputs_kv.shape[1]
        num_queries = num_keys if num_queries is None else num_queries
        mode = attention.resolve_mode(mode, num_queries, num_keys)
        normed = None
        if (
            mode is AttentionMode.ABSORB_KV
            and not torch.is_grad_enabled()
            and not intercepted(self.kv_norm)
        ):
            width = attention.absorbed_key_width(inputs_kv, num_queries)
            if width > inputs_kv.shape[-1]:
                normed = layer_norm_padded(self.kv_norm, inputs_kv, width)
        if normed is None:
            normed = self.kv_norm(inputs_kv)
        return attention.prepare(normed, key_mask=key_mask, mode=mode)

    def attend_prepared(
        self,
        inputs_q: Tensor,
        prepared: Union[PreparedKeys, UnpreparedKeys],
        *,
        query_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """inputs_q: (B, M, C_q) against prepared keys -> (B, M, C_q)."""
        normed = self.q_norm(inputs_q)
        if (
            isinstance(prepared, PreparedKeys)
            and self.use_query_residual
            and not _dropout_active(self.dropout)
        ):
            # The query residual added in to_out's pass.
            x = self.attention.attend_prepared(
                normed, prepared, query_mask=query_mask, residual=inputs_q
            )
        else:
            if isinstance(prepared, UnpreparedKeys):  # the attention called whole
                assert prepared.layer is self.attention
                attended = prepared.call(normed, query_mask)
            else:
                attended = self.attention.attend_prepared(
                    normed, prepared, query_mask=query_mask
                )
            attended = self.dropout(attended)
            x = inputs_q + attended if self.use_query_residual else attended
        return _mlp_block(self.mlp, self.mlp_norm(x), x)

    def forward(
        self,
        inputs_q: Tensor,
        inputs_kv: Tensor,
        *,
        key_mask: Optional[Tensor] = None,
        query_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """inputs_q: (B, M, C_q); inputs_kv: (B, N, C_kv); masks nonzero = keep.
        Returns (B, M, C_q)."""
        prepared = self.prepare(
            inputs_kv, key_mask=key_mask, num_queries=inputs_q.shape[1]
        )
        return self.attend_prepared(inputs_q, prepared, query_mask=query_mask)
