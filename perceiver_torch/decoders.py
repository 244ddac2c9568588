"""The Perceiver IO decoder: queries cross-attend to the latents, then an optional
output projection (the reference's ``BasicDecoder``).

Queries are independent of each other, so a long query array (optical flow's 182,528
pixels, a whole video) is decoded in chunks against key/value projections of the
latents computed once: no (M x N) matrix or (M x hidden) intermediate of the whole
query array is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CrossAttentionLayer, PreparedKeys, UnpreparedKeys, attend
from .linear import Linear, intercepted, linear, linear_gelu, recording_graph

# Queries per chunk when decoding long query arrays.
DEFAULT_QUERY_CHUNK = 8192


class PerceiverDecoder(nn.Module):
    """Cross-attention from queries to latents, then ``output_projection``.

    Keys: ``cross_attention.*``, ``output_projection.{weight,bias}`` (absent when
    ``output_channels`` is None: the reference's ``final_project=False``).

    Args (keyword-only):
        query_channels: width of the queries (also the cross-attention's output width).
        latent_channels: width of the latents.
        output_channels: output projection width; None = no projection.
        num_heads: cross-attention heads.
        qk_channels: None = latent_channels (the reference's ``shape_for_attn='kv'``).
        v_channels: None = qk_channels.
        use_query_residual: add the queries back after attention.
        widening_factor: MLP widening.
        dropout, attention_dropout: training-only dropout rates.
        query_chunk_size: queries decoded at once when the query array is long.
    """

    def __init__(
        self,
        *,
        query_channels: int,
        latent_channels: int,
        output_channels: Optional[int],
        num_heads: int = 1,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        use_query_residual: bool = False,
        widening_factor: int = 1,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        query_chunk_size: int = DEFAULT_QUERY_CHUNK,
    ) -> None:
        super().__init__()
        self.query_chunk_size = query_chunk_size
        self.cross_attention = CrossAttentionLayer(
            q_channels=query_channels,
            kv_channels=latent_channels,
            num_heads=num_heads,
            qk_channels=qk_channels,
            v_channels=v_channels,
            widening_factor=widening_factor,
            use_query_residual=use_query_residual,
            dropout=dropout,
            attention_dropout=attention_dropout,
        )
        if output_channels is not None:
            self.output_projection = Linear(query_channels, output_channels)
        else:
            self.output_projection = None

    def prepare(
        self, latents: Tensor, *, num_queries: Optional[int] = None
    ) -> Union[PreparedKeys, UnpreparedKeys]:
        """Key/value projections of the latents (B, N, C), reusable across chunks
        (the latents themselves where the cross-attention layer is hooked or replaced:
        it is called whole for each chunk, :func:`linear.intercepted`)."""
        if intercepted(self.cross_attention):
            return UnpreparedKeys(self.cross_attention, latents, None)
        return self.cross_attention.prepare(latents, num_queries=num_queries)

    def decode_prepared(
        self,
        queries: Tensor,
        prepared: Union[PreparedKeys, UnpreparedKeys],
        *,
        query_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Decodes queries (B, M, C_q) chunk by chunk against prepared latents;
        query_mask: (B, M), nonzero = keep. Returns (B, M, output_channels or C_q)."""
        outputs = []
        # A graph recorded by torch.jit.trace (the ONNX export) would keep the chunks
        # of its example's query count: the video graph, whose query count is an
        # input, decoded only the first 8,192 queries of a longer subsample (and lost
        # its label query, the last). It decodes them in one chunk.
        size = max(1, queries.shape[1]) if recording_graph() else self.query_chunk_size
        for start in range(0, queries.shape[1], size):
            chunk = queries[:, start : start + size]
            mask = None if query_mask is None else query_mask[:, start : start + size]
            if isinstance(prepared, UnpreparedKeys) and prepared.layer is self.cross_attention:
                out = prepared.call(chunk, mask)
            else:  # PreparedKeys, or its attention's UnpreparedKeys
                out = self.cross_attention.attend_prepared(chunk, prepared, query_mask=mask)
            if self.output_projection is not None:
                out = self.output_projection(out)
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def forward(
        self,
        queries: Tensor,
        latents: Tensor,
        *,
        query_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """queries: (B, M, C_q); latents: (B, N, C); query_mask: (B, M), nonzero =
        keep (masked queries attend to nothing: zeros, then the output bias).
        Returns (B, M, output_channels or C_q)."""
        prepared = self.prepare(latents, num_queries=queries.shape[1])
        return self.decode_prepared(queries, prepared, query_mask=query_mask)


@dataclass(frozen=True)
class FoldedModality:
    """One modality's folded query path in a :class:`FoldedDecoder`.

    Query features f (C_f) are padded by a constant vector p (P) to ``width`` = C_f + P.
    """

    width: int  # C_f + P: the query LayerNorm's width
    pad_sum: Tensor  # sum(p), scalar
    pad_mean: Tensor  # mean(p), scalar
    pad_ss: Tensor  # sum((p - mean(p))^2), scalar
    num_pad: int  # P
    k_aug: Tensor  # (B, 1, N, C_f + 2): keys for [(f - mu)/sigma, 1/sigma, -mu/sigma]
    final_o: Tensor  # (v, outputs): attention sum -> outputs (to_out, projection, head)
    final_h: Tensor  # (hidden, outputs): MLP hidden -> outputs (fc2, projection, head)
    final_b: Tensor  # (outputs,): every bias on the way, folded


def gram_factor(a: Tensor) -> Tensor:
    """A square L with ``L @ L.T == a @ a.T`` (float64): for any row x, ``|x @ L|``
    equals ``|x @ a|``. The Cholesky factor (2 ms for 513 rows; backward stable
    wherever it completes), else, where a zero or negative pivot stops it (``a`` of
    deficient row rank, e.g. a zero row), ``V sqrt(Lambda)`` from the
    eigendecomposition (23 ms)."""
    a = a.double()
    gram = a @ a.t()
    factor, info = torch.linalg.cholesky_ex(gram)
    if gram.device.type == "meta" or int(info) == 0:  # (meta tensors hold no values)
        return factor
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt()


class FoldedDecoder:
    """Decodes structured queries ``[features, constant padding]`` through a decoder
    and a final Linear with every linear map folded together (eval-time fast path).

    For one head, no query residual and an output projection followed by a Linear
    head (the video autoencoder), per query (C_q = query width, v = value width):

    - the query LayerNorm and ``to_q`` fold into the keys: the logits only need the
      normalised *features* (the padding is constant) plus two scalars (1/sigma,
      mu/sigma);
    - the attention's weighted sum ``o`` stays at the value width v;
    - ``to_out`` is folded, *centred* (its per-input mean over outputs removed), so
      ``y = o @ W_c + b_c`` is the attention output minus its mean exactly: the MLP's
      LayerNorm variance is ``mean(y^2)`` (no cancellation). ``|y|^2`` is taken as
      ``|[o, 1] @ L|^2`` with ``L L^T = A A^T``, ``A = [W_c; b_c]`` ((v + 1) x C_q):
      ``[o, 1] @ L`` is ``y`` in an orthonormal basis of ``A``'s row space, so it has
      ``y``'s length and is v + 1 wide instead of C_q (video: 513 against 1,026, half
      the product). ``fc1`` of the normalised output is
      ``(o @ (W_c diag(gamma) W_1^T) + h_0) / sigma + e``,
      computed as ``[o / sigma, 1 / sigma] @ [[W_c diag(gamma) W_1^T], [h_0]] + e`` so
      that the product, its bias and the GELU are one oneDNN pass on the CPU
      (bfloat16 clip decoding 32 -> 16 ms a chunk for this step, float32 63 -> 46);
    - ``fc2``, the decoder's ``output_projection`` and the head fold into small
      matrices (3 outputs per pixel).

    About 2.7 instead of 9 MFLOP per video query. The result equals the unfused decoder
    up to float32 rounding (reassociated sums); in bfloat16/float16 the folds are
    formed in float32 and rounded once, and the normalisation statistics stay float32.

    Args:
        decoder: a ``PerceiverDecoder`` with one head, no query residual and an output
            projection.
        latents: (B, N, C).
        modalities: {name: (feature_channels, padding (P,), head Linear or None)}.
    """

    def __init__(self, decoder: PerceiverDecoder, latents: Tensor, modalities: dict):
        layer = decoder.cross_attention
        attention = layer.attention
        if (
            attention.num_heads != 1
            or layer.use_query_residual
            or decoder.output_projection is None
        ):
            raise ValueError(
                "FoldedDecoder needs 1 head, no query residual, a projection"
            )
        self.scale = attention.scale
        self.mlp_eps = layer.mlp_norm.eps
        self.q_eps = layer.q_norm.eps
        dtype = latents.dtype
        self.dtype = dtype
        # The LayerNorm statistics of the queries and of the MLP input stay float32
        # (at least) in a bfloat16/float16 model (see __call__).
        self.stats_dtype = torch.promote_types(dtype, torch.float32)
        # The folded matrices are products of two or three weight matrices. Computed
        # in the working precision, each entry would carry the rounding of a C-term
        # sum relative to |A||B| (not |AB|: random-sign sums shrink by sqrt(C) while
        # their rounding does not), which made the folded outputs up to 5x further
        # from exact than the plain decoder. Computed one precision up (float64 for
        # float32) and rounded once, every folded entry is the correctly rounded
        # product; this costs little (they are made once per set of latents).
        wide = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32

        def up(t: Tensor) -> Tensor:
            return t.detach().to(wide)

        def wide_linear(x: Tensor, module: nn.Linear) -> Tensor:
            return F.linear(x, up(module.weight), up(module.bias))

        kv_norm, q_norm = layer.kv_norm, layer.q_norm
        kv = F.layer_norm(
            up(latents), kv_norm.normalized_shape, up(kv_norm.weight), up(kv_norm.bias),
            kv_norm.eps,
        )
        keys = wide_linear(kv, attention.to_k)  # (B, N, qk)
        folded_keys = torch.matmul(keys, up(attention.to_q.weight))  # (B, N, C_q)
        # Logit terms that do not depend on the query: beta.(K W_q) + b_q.K.
        # (The attention kernel scales q.k only, not this additive bias.)
        self.bias = (
            (
                torch.matmul(folded_keys, up(q_norm.bias))
                + torch.matmul(keys, up(attention.to_q.bias))
            )[:, None, None, :]
            * self.scale
        ).to(dtype)
        self.values = wide_linear(kv, attention.to_v)[:, None].to(dtype)  # (B, 1, N, v)
        # to_out, centred: y = o @ out_w + out_b is the attention output minus its mean.
        out_w = up(attention.to_out.weight).t()  # (v, C_q)
        out_b = up(attention.to_out.bias)
        centred_w = out_w - out_w.mean(dim=1, keepdim=True)
        centred_b = out_b - out_b.mean()
        # |y|^2 for the MLP LayerNorm: y = [o, 1] @ A with A = [W_c; b_c] ((v+1, C_q)).
        # Where A is wider than tall, y's coordinates in an orthonormal basis of its
        # row space, [o, 1] @ L with L L^T = A A^T, have y's length in fewer columns;
        # the sum of their squares has no cancellation either.
        augmented = torch.cat([centred_w, centred_b[None]])  # (v + 1, C_q)
        self.mlp_width = augmented.shape[1]  # C_q, the MLP LayerNorm's width
        if augmented.shape[0] < augmented.shape[1]:
            augmented = gram_factor(augmented)  # float64, rounded once below
        # (width, v): F.linear's layout, for the linear() helper.
        self.norm_w = augmented[:-1].t().contiguous().to(dtype)
        self.norm_b = augmented[-1].to(dtype)
        # fc1 of the normalised output: (o @ hid_w + hid_b) / sigma + hid_e, i.e.
        # [o / sigma, 1 / sigma] @ [hid_w; hid_b] + hid_e: one linear map with a bias,
        # stored as (hidden, v + 1) for F.linear's layout.
        mlp_norm, fc1, fc2 = layer.mlp_norm, layer.mlp.fc1, layer.mlp.fc2
        gamma, fc1_t = up(mlp_norm.weight), up(fc1.weight).t()
        hid_w = torch.matmul(centred_w * gamma, fc1_t)
        hid_b = torch.matmul(centred_b * gamma, fc1_t)
        self.hid_w = torch.cat([hid_w, hid_b[None]]).t().contiguous().to(dtype)
        self.hid_e = (torch.matmul(up(mlp_norm.bias), fc1_t) + up(fc1.bias)).to(dtype)
        self.modalities: Dict[str, FoldedModality] = {}
        width = q_norm.weight.shape[0]
        q_gamma = up(q_norm.weight)
        for name, (num_features, padding, head) in modalities.items():
            padding = up(padding)
            gamma_f, gamma_p = q_gamma[:num_features], q_gamma[num_features:]
            k_f, k_p = folded_keys[..., :num_features], folded_keys[..., num_features:]
            # Keys for q_aug = [(f - mu)/sigma, 1/sigma, -mu/sigma].
            k_aug = torch.cat(
                [
                    k_f * gamma_f,
                    torch.matmul(k_p, padding * gamma_p)[..., None],
                    torch.matmul(k_p, gamma_p)[..., None],
                ],
                dim=-1,
            )[:, None]
            # Final linear map after the MLP residual: out = x2 @ final + final_b,
            # with x2 = (o @ W_out^T + b_out) + gelu(hidden) @ W_2^T + b_2.
            final = up(decoder.output_projection.weight).t()  # (C_q, C_d)
            final_b = up(decoder.output_projection.bias)
            if head is not None:
                final = torch.matmul(final, up(head.weight).t())
                final_b = torch.matmul(final_b, up(head.weight).t()) + up(head.bias)
            pad_mean = padding.mean()
            self.modalities[name] = FoldedModality(
                width=width,
                pad_sum=padding.sum().to(self.stats_dtype),
                pad_mean=pad_mean.to(self.stats_dtype),
                pad_ss=((padding - pad_mean) ** 2).sum().to(self.stats_dtype),
                num_pad=padding.shape[0],
                k_aug=k_aug.to(dtype),
                final_o=torch.matmul(out_w, final).to(dtype),
                final_h=torch.matmul(up(fc2.weight).t(), final).to(dtype),
                final_b=(torch.matmul(out_b + up(fc2.bias), final) + final_b).to(dtype),
            )

    def __call__(self, name: str, features: Tensor) -> Tensor:
        """features: (B, n, C_f) query features of modality ``name`` (its padding is
        implied) -> (B, n, head outputs), in the latents' dtype."""
        m = self.modalities[name]
        # LayerNorm statistics of [features, padding] without materialising it, in
        # float32 (at least) whatever the model's dtype.
        f = features.to(self.stats_dtype)
        mean = (f.sum(-1) + m.pad_sum) / m.width
        var = (
            ((f - mean[..., None]) ** 2).sum(-1)
            + m.pad_ss
            + m.num_pad * (m.pad_mean - mean) ** 2
        ) / m.width
        inv_std = torch.rsqrt(var + self.q_eps)
        q_aug = torch.cat(
            [
                (f - mean[..., None]) * inv_std[..., None],
                inv_std[..., None],
                (-mean * inv_std)[..., None],
            ],
            dim=-1,
        ).to(self.dtype)
        o = attend(
            q_aug[:, None], m.k_aug, self.values, bias=self.bias, scale=self.scale
        )[:, 0]
        batch, n, v = o.shape
        o = o.reshape(batch * n, v)
        # The attention output minus its mean, in coordinates that keep its length.
        centred = linear(o, self.norm_w, self.norm_b)
        # The MLP LayerNorm's variance in float32 (at least) too.
        norm = torch.linalg.vector_norm(
            centred, dim=-1, keepdim=True, dtype=self.stats_dtype
        )
        del centred
        inv_sigma = torch.rsqrt(norm.square() / self.mlp_width + self.mlp_eps)
        # [o / sigma, 1 / sigma], each entry rounded once to the working dtype.
        scaled = o.new_empty(batch * n, v + 1)
        scaled[:, :v] = o * inv_sigma
        scaled[:, v:] = inv_sigma
        hidden = linear_gelu(scaled, self.hid_w, self.hid_e)
        out = torch.addmm(m.final_b, o, m.final_o)
        out = out.addmm_(hidden, m.final_h)
        return out.reshape(batch, n, -1)
