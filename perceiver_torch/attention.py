"""Attention blocks of Perceiver IO: attention, MLP, self- and cross-attention layers.

Read side by side with the official Haiku ``perceiver.py``: the same pre-norm layers,
the same defaults for channel sizes, the same masking rule. Where the numerics of the
reference differ from "usual PyTorch", a named helper says so (``gelu_tanh``,
``MASK_VALUE`` / ``zero_fully_masked_rows``, ``layer_norm``).

Attention is computed without materialising large logit matrices: queries are
processed with :func:`torch.nn.functional.scaled_dot_product_attention` (a blocked,
memory-efficient kernel on CPU) and, when the heads' qk and v widths differ (which
the fused kernel does not support), with an explicit softmax over bounded chunks of
queries. With a single head, :class:`Attention` may also fold the key or query
projection into the other side of the dot product (``absorb_kv`` / ``absorb_q``):
the same function, fewer multiply-adds when one side is much longer than the other
(optical flow: 182,528 queries or inputs against 2,048 latents).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import Linear

# LayerNorm epsilon of Haiku's hk.LayerNorm as the reference configures it.
LAYER_NORM_EPS = 1e-5

# The reference *replaces* masked logits by -1e30 (not -inf, which turns a fully
# masked row into NaN). Adding -1e30 to a float32 logit gives exactly -1e30 too.
MASK_VALUE = -1e30

# Largest logits block (elements) the explicit-softmax path materialises at once.
_MAX_LOGITS_ELEMENTS = 1 << 24


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation: ``jax.nn.gelu``'s default (erf differs by 5e-4)."""
    return F.gelu(x, approximate="tanh")


def layer_norm(num_channels: int) -> nn.LayerNorm:
    """LayerNorm over the last axis with the reference's eps 1e-5, scale and offset."""
    return nn.LayerNorm(num_channels, eps=LAYER_NORM_EPS)


def key_mask_bias(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive logits bias: 0 for kept keys, ``MASK_VALUE`` (-1e30) for masked keys.

    key_mask: (B, N), nonzero = keep. Returns (B, 1, 1, N) for (B, H, M, N) logits.
    """
    # float16 cannot hold 1e30; the reference uses 1e4 there.
    value = -1e4 if dtype == torch.float16 else MASK_VALUE
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
    return torch.where(keep[..., None], summed, torch.zeros((), dtype=summed.dtype))


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
    if q.shape[-1] == v.shape[-1]:
        # Blocked, memory-efficient kernel (flash attention on CPU).
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale
        )
    # The fused kernels need equal qk and v head widths; otherwise PyTorch would fall
    # back to a kernel that materialises every logit: do it explicitly, in chunks of
    # queries, with the scaling and the bias fused into the logits' matmul.
    b, h, m, d = q.shape
    n = k.shape[2]
    keys_t = k.reshape(b * h, n, d).transpose(1, 2)  # (BH, D, N)
    values = v.reshape(b * h, n, v.shape[-1])
    rows = max(1, _MAX_LOGITS_ELEMENTS // max(1, b * h * n))
    outputs = []
    for start in range(0, m, rows):
        q_chunk = q[:, :, start : start + rows].reshape(b * h, -1, d)
        if bias is None:
            logits = torch.bmm(q_chunk, keys_t).mul_(scale)
        else:
            chunk_bias = (
                bias if bias.shape[2] == 1 else bias[:, :, start : start + rows]
            )
            chunk_bias = chunk_bias.expand(b, h, chunk_bias.shape[2], n).reshape(
                b * h, chunk_bias.shape[2], n
            )
            logits = torch.baddbmm(chunk_bias, q_chunk, keys_t, alpha=scale)
        weights = torch.softmax(logits, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p, training=True)
        outputs.append(torch.bmm(weights, values).view(b, h, -1, v.shape[-1]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H*D) with channels ordered (head, d) as the reference."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


# Set by standard_attention(): the folded formulations are off (graph export).
_STANDARD_ONLY = False


@contextlib.contextmanager
def standard_attention() -> Iterator[None]:
    """Within the block every attention uses the "standard" formulation (no
    projection folded across the dot product), e.g. while tracing a graph for export,
    where the folding's choice would be frozen for one input size."""
    global _STANDARD_ONLY
    previous, _STANDARD_ONLY = _STANDARD_ONLY, True
    try:
        yield
    finally:
        _STANDARD_ONLY = previous


@dataclass
class PreparedKeys:
    """Key/value side of an attention, computed once and reused for chunks of queries.

    ``mode`` says how ``k`` and ``v`` relate to the module's projections:
    - "standard": k = to_k(kv) (B, H, N, qk/H), v = to_v(kv) (B, H, N, v/H);
    - "absorb_kv" (one head): k = v = kv (B, 1, N, C_kv); queries are mapped by
      to_k's weight and outputs by to_v afterwards;
    - "absorb_q" (one head): k = to_k(kv) @ W_q (B, 1, N, C_q), v = to_v(kv) @ W_out^T
      (B, 1, N, C_out); ``bias`` also holds to_q's bias dotted with the keys.
    ``bias``: (B, 1, 1, N) additive logits bias or None; ``key_mask``: (B, N) key mask
    (or None), kept to find fully-masked rows.
    """

    mode: str
    k: Tensor
    v: Tensor
    bias: Optional[Tensor]
    key_mask: Optional[Tensor]


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

    @property
    def scale(self) -> float:
        """1/sqrt(qk channels per head), applied to the logits after the dot product."""
        return 1.0 / math.sqrt(self.qk_channels // self.num_heads)

    def _dropout_p(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def choose_mode(self, num_queries: int, num_keys: int) -> str:
        """Cheapest exact formulation for M queries against N keys (by multiply-adds).

        Folding projections across the dot product is exact in real arithmetic (the
        folded-away bias q.b_k is constant along a softmax row; rows of softmax weights
        sum to one, so b_v passes through) and differs from the reference only by
        float32 rounding. It needs one head and no attention dropout.
        """
        if _STANDARD_ONLY or self.num_heads != 1 or self._dropout_p() > 0.0:
            return "standard"
        m, n = num_queries, num_keys
        c_q, c_kv = self.to_q.in_features, self.to_k.in_features
        qk, v, c_out = self.qk_channels, self.v_channels, self.to_out.out_features
        kv_proj = n * c_kv * (qk + v)
        cost = {
            "standard": m * c_q * qk + kv_proj + m * n * (qk + v) + m * v * c_out,
            "absorb_kv": m * c_q * qk
            + m * qk * c_kv
            + 2 * m * n * c_kv
            + m * c_kv * v
            + m * v * c_out,
            "absorb_q": kv_proj + n * qk * c_q + n * v * c_out + m * n * (c_q + c_out),
        }
        return min(cost, key=cost.get)

    def prepare(
        self,
        inputs_kv: Tensor,
        *,
        key_mask: Optional[Tensor] = None,
        num_queries: Optional[int] = None,
        mode: Optional[str] = None,
    ) -> PreparedKeys:
        """Projects the key/value inputs once.

        inputs_kv: (B, N, C_kv); key_mask: (B, N) with nonzero = keep;
        num_queries: how many queries will be attended in total (chooses the mode);
        mode: force "standard", "absorb_kv" or "absorb_q".
        """
        if mode is None:
            mode = self.choose_mode(
                num_queries if num_queries is not None else inputs_kv.shape[1],
                inputs_kv.shape[1],
            )
        bias = None if key_mask is None else key_mask_bias(key_mask, inputs_kv.dtype)
        if mode == "standard":
            k = _split_heads(self.to_k(inputs_kv), self.num_heads)
            v = _split_heads(self.to_v(inputs_kv), self.num_heads)
        elif mode == "absorb_kv":
            k = v = inputs_kv[:, None]
        elif mode == "absorb_q":
            keys = self.to_k(inputs_kv)  # (B, N, qk)
            k = torch.matmul(keys, self.to_q.weight)[:, None]  # (B, 1, N, C_q)
            # The attention kernels scale q.k only, not the additive bias.
            q_bias = torch.matmul(keys, self.to_q.bias * self.scale)[:, None, None, :]
            bias = q_bias if bias is None else bias + q_bias
            v = torch.matmul(self.to_v(inputs_kv), self.to_out.weight.t())[:, None]
        else:
            raise ValueError(f"unknown attention mode {mode!r}")
        return PreparedKeys(mode, k, v, bias, key_mask)

    def attend_prepared(
        self,
        inputs_q: Tensor,
        prepared: PreparedKeys,
        *,
        query_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Attends queries (B, M, C_q) to prepared keys; returns (B, M, C_out)."""
        keep = rows_to_keep(
            inputs_q.shape[0],
            inputs_q.shape[1],
            key_mask=prepared.key_mask,
            query_mask=query_mask,
            device=inputs_q.device,
        )
        if prepared.mode == "standard":
            q = _split_heads(self.to_q(inputs_q), self.num_heads)
            summed = attend(
                q,
                prepared.k,
                prepared.v,
                bias=prepared.bias,
                scale=self.scale,
                dropout_p=self._dropout_p(),
            )
            summed = zero_fully_masked_rows(_merge_heads(summed), keep)
            return self.to_out(summed)
        if prepared.mode == "absorb_kv":
            q = torch.matmul(self.to_q(inputs_q), self.to_k.weight)[:, None]
            mixed = attend(
                q, prepared.k, prepared.v, bias=prepared.bias, scale=self.scale
            )
            summed = zero_fully_masked_rows(self.to_v(mixed[:, 0]), keep)
            return self.to_out(summed)
        # absorb_q: to_q is folded into the keys and to_out into the values.
        mixed = attend(
            inputs_q[:, None],
            prepared.k,
            prepared.v,
            bias=prepared.bias,
            scale=self.scale,
        )
        return zero_fully_masked_rows(mixed[:, 0], keep) + self.to_out.bias

    def forward(
        self,
        inputs_q: Tensor,
        inputs_kv: Tensor,
        *,
        key_mask: Optional[Tensor] = None,
        query_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """inputs_q: (B, M, C_q); inputs_kv: (B, N, C_kv); masks (B, N) / (B, M),
        nonzero = keep. Returns (B, M, output_channels)."""
        prepared = self.prepare(
            inputs_kv, key_mask=key_mask, num_queries=inputs_q.shape[1]
        )
        return self.attend_prepared(inputs_q, prepared, query_mask=query_mask)


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

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., C) -> (..., C)."""
        return self.dropout(self.fc2(gelu_tanh(self.fc1(x))))


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
        )
        self.dropout = nn.Dropout(dropout)
        self.mlp_norm = layer_norm(channels)
        self.mlp = MLP(
            channels=channels, widening_factor=widening_factor, dropout=dropout
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, C) -> (B, N, C)."""
        normed = self.norm(x)
        x = x + self.dropout(self.attention(normed, normed))
        return x + self.mlp(self.mlp_norm(x))


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
        mode: Optional[str] = None,
    ) -> PreparedKeys:
        """Normalises and projects the key/value inputs (B, N, C_kv) once."""
        return self.attention.prepare(
            self.kv_norm(inputs_kv),
            key_mask=key_mask,
            num_queries=num_queries,
            mode=mode,
        )

    def attend_prepared(
        self,
        inputs_q: Tensor,
        prepared: PreparedKeys,
        *,
        query_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """inputs_q: (B, M, C_q) against prepared keys -> (B, M, C_q)."""
        attended = self.attention.attend_prepared(
            self.q_norm(inputs_q), prepared, query_mask=query_mask
        )
        attended = self.dropout(attended)
        x = inputs_q + attended if self.use_query_residual else attended
        return x + self.mlp(self.mlp_norm(x))

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
