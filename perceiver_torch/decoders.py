"""The Perceiver IO decoder: queries cross-attend to the latents, then an optional
output projection (the reference's ``BasicDecoder``).

Queries are independent of each other, so a long query array (optical flow's 182,528
pixels, a whole video) is decoded in chunks against key/value projections of the
latents computed once: no (M x N) matrix or (M x hidden) intermediate of the whole
query array is ever held.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CrossAttentionLayer, PreparedKeys, attend, gelu_tanh
from .linear import Linear

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
    ) -> PreparedKeys:
        """Key/value projections of the latents (B, N, C), reusable across chunks."""
        return self.cross_attention.prepare(latents, num_queries=num_queries)

    def decode_prepared(
        self,
        queries: Tensor,
        prepared: PreparedKeys,
        *,
        query_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Decodes queries (B, M, C_q) chunk by chunk against prepared latents;
        query_mask: (B, M), nonzero = keep. Returns (B, M, output_channels or C_q)."""
        outputs = []
        size = self.query_chunk_size
        for start in range(0, queries.shape[1], size):
            chunk = queries[:, start : start + size]
            mask = None if query_mask is None else query_mask[:, start : start + size]
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
      LayerNorm variance is ``mean(y^2)`` (no cancellation), and ``fc1`` of the
      normalised output is ``(o @ (W_c diag(gamma) W_1^T) + h_0) / sigma + e``;
    - ``fc2``, the decoder's ``output_projection`` and the head fold into small
      matrices (3 outputs per pixel).

    About 3.2 instead of 9 MFLOP per video query. The result equals the unfused decoder
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
        # The folded matrices are products of several weights: they are formed in
        # float32 (at least) and rounded once to the latents' dtype, in which the
        # per-query matmuls run; the LayerNorm statistics stay float32 (see __call__).
        self.dtype = latents.dtype
        fold = torch.promote_types(latents.dtype, torch.float32)
        self.stats_dtype = fold

        def w(t: Tensor) -> Tensor:
            return t.to(fold)

        self.scale = attention.scale
        self.mlp_eps = layer.mlp_norm.eps
        self.q_eps = layer.q_norm.eps
        kv_norm = layer.kv_norm
        kv = F.layer_norm(
            latents.to(fold), kv_norm.normalized_shape, w(kv_norm.weight),
            w(kv_norm.bias), kv_norm.eps,
        )
        keys = F.linear(kv, w(attention.to_k.weight), w(attention.to_k.bias))
        to_q_w, to_q_b = w(attention.to_q.weight), w(attention.to_q.bias)
        folded_keys = torch.matmul(keys, to_q_w)  # (B, N, C_q)
        q_norm = layer.q_norm
        q_gamma, q_beta = w(q_norm.weight), w(q_norm.bias)
        # Logit terms that do not depend on the query: beta.(K W_q) + b_q.K.
        # (The attention kernel scales q.k only, not this additive bias.)
        self.bias = (
            (torch.matmul(folded_keys, q_beta) + torch.matmul(keys, to_q_b))[
                :, None, None, :
            ]
            * self.scale
        ).to(self.dtype)
        values = F.linear(kv, w(attention.to_v.weight), w(attention.to_v.bias))
        self.values = values[:, None].to(self.dtype)  # (B, 1, N, v)
        # to_out, centred: y = o @ out_w + out_b is the attention output minus its mean.
        out_w = w(attention.to_out.weight).t()  # (v, C_q)
        out_b = w(attention.to_out.bias)
        out_w_c = out_w - out_w.mean(dim=1, keepdim=True)
        out_b_c = out_b - out_b.mean()
        # fc1 of the normalised output: (o @ hid_w + hid_b) / sigma + hid_e.
        mlp_norm, fc1, fc2 = layer.mlp_norm, layer.mlp.fc1, layer.mlp.fc2
        mlp_gamma, fc1_w = w(mlp_norm.weight), w(fc1.weight)
        self.out_w, self.out_b = out_w_c.to(self.dtype), out_b_c.to(self.dtype)
        self.hid_w = torch.matmul(out_w_c * mlp_gamma, fc1_w.t()).to(self.dtype)
        self.hid_b = torch.matmul(out_b_c * mlp_gamma, fc1_w.t()).to(self.dtype)
        self.hid_e = (torch.matmul(w(mlp_norm.bias), fc1_w.t()) + w(fc1.bias)).to(
            self.dtype
        )
        self.modalities = {}
        width = q_gamma.shape[0]
        for name, (num_features, padding, head) in modalities.items():
            padding = w(padding)
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
            final = w(decoder.output_projection.weight).t()  # (C_q, C_d)
            final_b = w(decoder.output_projection.bias)
            if head is not None:
                final = torch.matmul(final, w(head.weight).t())
                final_b = torch.matmul(final_b, w(head.weight).t()) + w(head.bias)
            pad_mean = padding.mean()
            self.modalities[name] = dict(
                width=width,
                # LayerNorm statistics of the padding: float32 (stats_dtype).
                pad_sum=padding.sum(),
                pad_mean=pad_mean,
                pad_ss=((padding - pad_mean) ** 2).sum(),
                num_pad=padding.shape[0],
                k_aug=k_aug.to(self.dtype),
                final_o=torch.matmul(out_w, final).to(self.dtype),
                final_h=torch.matmul(w(fc2.weight).t(), final).to(self.dtype),
                final_b=(torch.matmul(out_b + w(fc2.bias), final) + final_b).to(
                    self.dtype
                ),
            )

    def __call__(self, name: str, features: Tensor) -> Tensor:
        """features: (B, n, C_f) query features of modality ``name`` (its padding is
        implied) -> (B, n, head outputs), in the latents' dtype."""
        m = self.modalities[name]
        width = m["width"]
        # LayerNorm statistics of [features, padding] without materialising it, in
        # float32 (at least) whatever the model's dtype.
        f = features.to(self.stats_dtype)
        mean = (f.sum(-1) + m["pad_sum"]) / width
        var = (
            ((f - mean[..., None]) ** 2).sum(-1)
            + m["pad_ss"]
            + m["num_pad"] * (m["pad_mean"] - mean) ** 2
        ) / width
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
            q_aug[:, None], m["k_aug"], self.values, bias=self.bias, scale=self.scale
        )[:, 0]
        batch, n, v = o.shape
        o = o.reshape(batch * n, v)
        centred = torch.addmm(self.out_b, o, self.out_w)  # attention output - its mean
        # The MLP LayerNorm's variance in float32 too.
        norm = torch.linalg.vector_norm(
            centred, dim=-1, keepdim=True, dtype=self.stats_dtype
        )
        inv_sigma = torch.rsqrt(norm.square() / centred.shape[-1] + self.mlp_eps)
        hidden = torch.addmm(self.hid_b, o, self.hid_w)
        hidden = hidden.mul_(inv_sigma.to(self.dtype)).add_(self.hid_e)
        out = torch.addmm(m["final_b"], o, m["final_o"])
        out = out.addmm_(gelu_tanh(hidden), m["final_h"])
        return out.reshape(batch, n, -1)
