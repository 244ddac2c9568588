"""Attention blocks, encoder and decoders of the official Perceiver IO, in Haiku.

Module scopes reproduce the official ones because the checkpoint keys are Haiku
paths. Haiku derives a path from *where* a module is constructed:

* in a parent's ``__init__``: ``parent/~/child``;
* in a parent's ``__call__``: ``parent/child``;
* in another method ``m`` of the parent: ``parent/~m/child``;

and numbers repeated names ``x``, ``x_1``, ``x_2`` in creation order. So, for
example, :class:`Attention` builds its four Linears inside ``__call__`` in the order
Q, K, V, output (``linear`` .. ``linear_3``), and :class:`CrossAttention` calls the
query norm before the key/value norm (``layer_norm``, ``layer_norm_1``) and the MLP
norm last (``layer_norm_2``).

Inference only: dropout is the identity at rate 0 (the official code calls
``hk.dropout`` with rate 0, which returns its input unchanged), so it is left out.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import haiku as hk
import jax
import jax.numpy as jnp

from perceiver_jax import position_encoding as pe

# -------------------------------------------------------------------------------------
# Primitives
# -------------------------------------------------------------------------------------


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    attention_mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Multi-head scaled dot-product attention with the official masking rules.

    Args:
      q: [B, T, H, Dqk] queries.
      k: [B, S, H, Dqk] keys.
      v: [B, S, H, Dv] values.
      attention_mask: optional [B, T, S]; nonzero = may attend.

    Returns:
      [B, T, H * Dv]. Query rows whose mask is all zero are exactly zero.
    """
    batch, q_len, heads, qk_per_head = q.shape
    v_per_head = v.shape[-1]
    logits = jnp.einsum("bthd,bThd->bhtT", q, k)
    # Official order: raw dot product first, then the 1/sqrt(d) factor.
    logits = logits * (1.0 / math.sqrt(qk_per_head))
    if attention_mask is not None:
        # A large finite value instead of -inf (which would give NaN on fully masked
        # rows); 1e4 keeps float16 finite. Same constants as the official code.
        large = jnp.array(
            1e4 if logits.dtype == jnp.float16 else 1e30, dtype=logits.dtype
        )
        logits = jnp.where(attention_mask[:, None, :, :], logits, -large)
    weights = jax.nn.softmax(logits)
    out = jnp.einsum("bhtT,bThd->bthd", weights, v)
    out = jnp.reshape(out, [batch, q_len, heads * v_per_head])
    if attention_mask is not None:
        # A fully masked row has uniform softmax weights, i.e. a mean of the values;
        # the official code replaces it with zeros here, before the output projection
        # (whose bias therefore still shows in those rows).
        dead = jnp.all(attention_mask == 0, axis=2, keepdims=True)  # [B, T, 1]
        out = jnp.where(dead, jnp.zeros_like(out), out)
    return out


def cross_attention_mask(query_mask: jax.Array, kv_mask: jax.Array) -> jax.Array:
    """[B, T] x [B, S] -> [B, T, S]: per-example outer product of the two masks."""
    return jax.vmap(jnp.outer)(query_mask, kv_mask)


def layer_norm(x: jax.Array, name: Optional[str] = None) -> jax.Array:
    """Haiku LayerNorm over the last axis with scale and offset (eps 1e-5)."""
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)(x)


def _linear(
    size: int,
    init_scale: float = 1.0,
    with_bias: bool = True,
    name: Optional[str] = None,
) -> hk.Linear:
    # The official "conv_1d": a Linear with a variance-scaling initialiser.
    return hk.Linear(
        output_size=size,
        with_bias=with_bias,
        w_init=hk.initializers.VarianceScaling(init_scale),
        name=name,
    )


# -------------------------------------------------------------------------------------
# Blocks
# -------------------------------------------------------------------------------------


class Attention(hk.Module):
    """Multi-head attention: Linears Q (``linear``), K (``linear_1``), V (``linear_2``),
    output (``linear_3``).

    Widths default like the official module: qk = query input width, v = qk,
    output = v.
    """

    def __init__(
        self,
        num_heads: int = 8,
        init_scale: float = 1.0,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        output_channels: Optional[int] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._num_heads = num_heads
        self._init_scale = init_scale
        self._qk_channels = qk_channels
        self._v_channels = v_channels
        self._output_channels = output_channels

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        attention_mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        """[B, T, Cq] queries, [B, S, Ckv] keys/values -> [B, T, output_channels]."""
        qk = self._qk_channels or inputs_q.shape[-1]
        vc = self._v_channels or qk
        out_channels = self._output_channels or vc
        for what, width in (("qk_channels", qk), ("v_channels", vc)):
            if width % self._num_heads:
                raise ValueError(
                    f"{what} ({width}) must be divisible by num_heads "
                    f"({self._num_heads})"
                )
        h = self._num_heads
        q = _linear(qk, self._init_scale)(inputs_q)
        k = _linear(qk, self._init_scale)(inputs_kv)
        v = _linear(vc, self._init_scale)(inputs_kv)
        b, t, _ = q.shape
        s = k.shape[1]
        q = jnp.reshape(q, [b, t, h, qk // h])
        k = jnp.reshape(k, [b, s, h, qk // h])
        v = jnp.reshape(v, [b, s, h, vc // h])
        out = attend(q, k, v, attention_mask=attention_mask)
        return _linear(out_channels, self._init_scale)(out)


class MLP(hk.Module):
    """Linear (``linear``) -> tanh-approximate GELU -> Linear (``linear_1``)."""

    def __init__(
        self,
        widening_factor: int = 1,
        init_scale: float = 1.0,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._widening_factor = widening_factor
        self._init_scale = init_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., C] -> [..., C]."""
        width = x.shape[-1]
        x = _linear(self._widening_factor * width, self._init_scale)(x)
        # jax.nn.gelu defaults to the tanh approximation; the official models were
        # trained with it (the exact erf GELU is off by up to 5e-4 per activation).
        x = jax.nn.gelu(x)
        return _linear(width, self._init_scale)(x)


class SelfAttention(hk.Module):
    """Pre-norm self-attention block: x += Attn(LN(x)); x += MLP(LN(x)).

    Norms: ``layer_norm`` (attention), ``layer_norm_1`` (MLP).
    """

    def __init__(
        self,
        num_heads: int = 8,
        widening_factor: int = 1,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._num_heads = num_heads
        self._widening_factor = widening_factor
        self._qk_channels = qk_channels
        self._v_channels = v_channels

    def __call__(
        self, inputs: jax.Array, attention_mask: Optional[jax.Array] = None
    ) -> jax.Array:
        """[B, N, C] -> [B, N, C]."""
        normed = layer_norm(inputs)
        attn = Attention(
            num_heads=self._num_heads,
            qk_channels=self._qk_channels,
            v_channels=self._v_channels,
        )(normed, normed, attention_mask=attention_mask)
        x = inputs + attn
        x = x + MLP(widening_factor=self._widening_factor)(layer_norm(x))
        return x


class CrossAttention(hk.Module):
    """Pre-norm cross-attention block.

    out = [q +] Attn(LN_q(q), LN_kv(kv)); out += MLP(LN(out)). Norms: ``layer_norm``
    (query), ``layer_norm_1`` (key/value), ``layer_norm_2`` (MLP). qk width defaults
    to the key/value input's width (official ``shape_for_attn='kv'``), the output
    width is always the query's.
    """

    def __init__(
        self,
        num_heads: int = 8,
        widening_factor: int = 1,
        use_query_residual: bool = True,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._num_heads = num_heads
        self._widening_factor = widening_factor
        self._use_query_residual = use_query_residual
        self._qk_channels = qk_channels
        self._v_channels = v_channels

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array,
        attention_mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        """[B, T, Cq], [B, S, Ckv] -> [B, T, Cq]."""
        attention = Attention(
            num_heads=self._num_heads,
            qk_channels=self._qk_channels or inputs_kv.shape[-1],
            v_channels=self._v_channels,
            output_channels=inputs_q.shape[-1],
        )
        # The query norm is created before the key/value norm: layer_norm, _1.
        normed_q = layer_norm(inputs_q)
        normed_kv = layer_norm(inputs_kv)
        attn = attention(normed_q, normed_kv, attention_mask=attention_mask)
        x = inputs_q + attn if self._use_query_residual else attn
        x = x + MLP(widening_factor=self._widening_factor)(layer_norm(x))
        return x


# -------------------------------------------------------------------------------------
# Encoder
# -------------------------------------------------------------------------------------


class PerceiverEncoder(hk.Module):
    """Latent array, one cross-attend, then a block of self-attends applied
    ``num_blocks`` times with shared weights.

    Parameters: ``~/trainable_position_encoding`` (latents), ``~/cross_attention``,
    ``~/self_attention``, ``~/self_attention_1``, ...
    """

    def __init__(
        self,
        num_self_attends_per_block: int = 6,
        num_blocks: int = 8,
        z_index_dim: int = 512,
        num_z_channels: int = 1024,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        num_cross_attend_heads: int = 1,
        num_self_attend_heads: int = 8,
        cross_attend_widening_factor: int = 1,
        self_attend_widening_factor: int = 1,
        z_pos_enc_init_scale: float = 0.02,
        use_query_residual: bool = True,
        name: str = "perceiver_encoder",
    ):
        super().__init__(name=name)
        for what, heads in (
            ("num_self_attend_heads", num_self_attend_heads),
            ("num_cross_attend_heads", num_cross_attend_heads),
        ):
            if num_z_channels % heads:
                raise ValueError(
                    f"num_z_channels ({num_z_channels}) must be divisible by "
                    f"{what} ({heads})"
                )
        self._num_blocks = num_blocks
        self.z_pos_enc = pe.TrainablePositionEncoding(
            index_dim=z_index_dim,
            num_channels=num_z_channels,
            init_scale=z_pos_enc_init_scale,
            name="trainable_position_encoding",
        )
        self.cross_attend = CrossAttention(
            num_heads=num_cross_attend_heads,
            widening_factor=cross_attend_widening_factor,
            use_query_residual=use_query_residual,
            qk_channels=qk_channels,
            v_channels=v_channels,
            name="cross_attention",
        )
        # Haiku numbers the repeated name: self_attention, self_attention_1, ...
        self.self_attends = [
            SelfAttention(
                num_heads=num_self_attend_heads,
                widening_factor=self_attend_widening_factor,
                qk_channels=qk_channels,
                v_channels=v_channels,
                name="self_attention",
            )
            for _ in range(num_self_attends_per_block)
        ]

    def latents(self, batch_size: int) -> jax.Array:
        """The initial latent array [batch_size, N_z, C_z]."""
        return self.z_pos_enc(batch_size=batch_size)

    def __call__(
        self,
        inputs: jax.Array,
        z: jax.Array,
        input_mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        """[B, N, C] inputs and [B, N_z, C_z] latents -> [B, N_z, C_z].

        ``input_mask`` [B, N] (nonzero = valid) masks the cross-attend's keys.
        """
        mask = None
        if input_mask is not None:
            mask = cross_attention_mask(
                jnp.ones(z.shape[:2], dtype=jnp.int32), input_mask
            )
        z = self.cross_attend(z, inputs, attention_mask=mask)
        for _ in range(self._num_blocks):
            for block in self.self_attends:
                z = block(z)
        return z


# -------------------------------------------------------------------------------------
# Decoders
# -------------------------------------------------------------------------------------


class BasicDecoder(hk.Module):
    """Cross-attention decoder: queries attend to the latents, then an optional Linear
    (``output``).

    The query comes from :meth:`decoder_query`: a trainable table
    (``~/trainable_position_encoding``), Fourier features of the output grid (or of
    subsampled points of it), or nothing (``query_encoding=None``: the caller builds
    the queries). Cross-attention (``cross_attention``) and ``output``
    are created in ``__call__``.
    """

    def __init__(
        self,
        output_num_channels: int,
        query_encoding: Optional[pe.PositionEncodingSpec] = None,
        output_index_dims: Optional[Sequence[int]] = None,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        use_query_residual: bool = False,
        output_w_init: Any = None,
        num_heads: int = 1,
        final_project: bool = True,
        name: str = "basic_decoder",
    ):
        super().__init__(name=name)
        self._output_index_dims = (
            None if output_index_dims is None else tuple(output_index_dims)
        )
        self._output_num_channels = output_num_channels
        self._qk_channels = qk_channels
        self._v_channels = v_channels
        self._use_query_residual = use_query_residual
        self._output_w_init = output_w_init
        self._num_heads = num_heads
        self._final_project = final_project
        # Built here, in __init__: ``basic_decoder/~/trainable_position_encoding``.
        self.output_pos_enc = None
        if query_encoding is not None:
            self.output_pos_enc = query_encoding.build(self._output_index_dims)

    def decoder_query(
        self, batch_size: int, subsampled_points: Optional[jax.Array] = None
    ) -> jax.Array:
        """Queries [B, M, C] for the whole output grid, or for the flat indices
        ``subsampled_points`` [P] of it (positions ``-1 + 2 i / n``)."""
        if self.output_pos_enc is None:
            raise ValueError("this decoder has no query encoding of its own")
        if subsampled_points is None:
            return self.output_pos_enc(batch_size=batch_size)
        pos = pe.subsampled_positions(subsampled_points, self._output_index_dims)
        pos = jnp.broadcast_to(pos[None], (batch_size,) + pos.shape)
        emb = self.output_pos_enc(batch_size=batch_size, pos=pos)
        return jnp.reshape(emb, [emb.shape[0], -1, emb.shape[-1]])

    def __call__(
        self,
        query: jax.Array,
        z: jax.Array,
        query_mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        """[B, M, Cq] queries, [B, N_z, C_z] latents -> [B, M, output_num_channels]
        ([B, M, Cq] when ``final_project`` is False).

        ``query_mask`` [B, M] (nonzero = valid): masked query rows get a zero attention
        result (the official decoder masks queries, not keys).
        """
        mask = None
        if query_mask is not None:
            mask = cross_attention_mask(
                query_mask, jnp.ones(z.shape[:2], dtype=jnp.int32)
            )
        cross_attend = CrossAttention(
            num_heads=self._num_heads,
            widening_factor=1,
            use_query_residual=self._use_query_residual,
            qk_channels=self._qk_channels,
            v_channels=self._v_channels,
            name="cross_attention",
        )
        # Constructed (hence named) even when unused, like the official decoder.
        project = hk.Linear(
            self._output_num_channels, w_init=self._output_w_init, name="output"
        )
        out = cross_attend(query, z, attention_mask=mask)
        if self._final_project:
            out = project(out)
        return out


class ClassificationDecoder(hk.Module):
    """One trainable query [1, C] decoded to logits; wraps ``~/basic_decoder``."""

    def __init__(
        self,
        num_classes: int,
        query_channels: int = 1024,
        use_query_residual: bool = False,
        num_heads: int = 1,
        name: str = "classification_decoder",
    ):
        super().__init__(name=name)
        self.decoder = BasicDecoder(
            output_num_channels=num_classes,
            query_encoding=pe.PositionEncodingSpec(
                "trainable", num_channels=query_channels, init_scale=0.02
            ),
            output_index_dims=(1,),
            use_query_residual=use_query_residual,
            num_heads=num_heads,
            name="basic_decoder",
        )

    def decoder_query(
        self, batch_size: int, subsampled_points: Optional[jax.Array] = None
    ) -> jax.Array:
        """[B, 1, query_channels]."""
        return self.decoder.decoder_query(batch_size, subsampled_points)

    def __call__(self, query: jax.Array, z: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Returns (logits [B, classes], raw decoder output [B, 1, classes])."""
        # No query mask, as in the official classification decoder.
        out = self.decoder(query, z)
        return out[:, 0, :], out


class FlowDecoder(hk.Module):
    """Decodes flow at every input pixel, using the preprocessed inputs as queries.

    Output: the decoder's 2 channels / ``rescale_factor``, reshaped to the image.
    """

    def __init__(
        self,
        output_image_shape: Sequence[int],
        output_num_channels: int = 2,
        rescale_factor: float = 100.0,
        num_heads: int = 1,
        name: str = "flow_decoder",
    ):
        super().__init__(name=name)
        self._output_image_shape = tuple(output_image_shape)
        self._rescale_factor = rescale_factor
        # The official flow decoder also configures a Fourier query encoding that is
        # never used (its queries are the inputs); it has no parameters, so it is
        # omitted. The output Linear starts at zero, as in the official model.
        self.decoder = BasicDecoder(
            output_num_channels=output_num_channels,
            use_query_residual=False,
            output_w_init=jnp.zeros,
            num_heads=num_heads,
            name="basic_decoder",
        )

    def decoder_query(self, inputs: jax.Array) -> jax.Array:
        """The queries are the preprocessed inputs themselves [B, H*W, C]."""
        return inputs

    def __call__(self, query: jax.Array, z: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Returns (flow [B, H, W, 2] in network units, raw output [B, H*W, 2])."""
        raw = self.decoder(query, z)
        flow = raw / self._rescale_factor
        flow = flow.reshape(
            [flow.shape[0]] + list(self._output_image_shape) + [flow.shape[-1]]
        )
        return flow, raw


class MultimodalDecoder(hk.Module):
    """One shared decoder (``~/basic_decoder``) over the concatenated queries of
    several modalities.

    Each modality's query is padded to a common width with a trainable vector
    ``~decoder_query/{modality}_padding`` [1, pad]; the modalities are concatenated
    in sorted order.
    """

    def __init__(
        self,
        modalities: Mapping[str, Any],
        output_num_channels: int,
        min_padding_size: int = 2,
        num_heads: int = 1,
        name: str = "multimodal_decoder",
    ):
        super().__init__(name=name)
        self._modalities = dict(modalities)
        self._min_padding_size = min_padding_size
        self._decoder = BasicDecoder(
            output_num_channels=output_num_channels,
            use_query_residual=False,
            num_heads=num_heads,
            name="basic_decoder",
        )

    def decoder_query(
        self,
        batch_size: int,
        subsampled_points: Optional[Mapping[str, Optional[jax.Array]]] = None,
    ) -> Tuple[jax.Array, Dict[str, int]]:
        """Returns (queries [B, M, C], number of query tokens per modality).

        Must stay named ``decoder_query``: the paddings are created here, and their
        official paths carry the method name (``multimodal_decoder/~decoder_query``).
        """
        subsampled_points = subsampled_points or {}
        queries = {
            modality: decoder.decoder_query(batch_size, subsampled_points.get(modality))
            for modality, decoder in self._modalities.items()
        }
        width = max(q.shape[2] for q in queries.values()) + self._min_padding_size
        # Every modality's decoder_query is already [B, M_m, C_m] (subsampled points
        # come flat), so no reshape is needed before padding.
        padded = [
            pe.pad_to_width(queries[m], width, name=f"{m}_padding")
            for m in sorted(queries)
        ]
        sizes = {m: queries[m].shape[1] for m in sorted(queries)}
        return jnp.concatenate(padded, axis=1), sizes

    def __call__(self, query: jax.Array, z: jax.Array) -> jax.Array:
        """[B, M, C] queries, latents -> [B, M, output_num_channels] (no query mask)."""
        return self._decoder(query, z)


def restructure(sizes: Mapping[str, int], x: jax.Array) -> Dict[str, jax.Array]:
    """Splits [B, N, C] along N into modalities, taken in sorted order."""
    out, start = {}, 0
    for modality in sorted(sizes):
        out[modality] = x[:, start : start + sizes[modality]]
        start += sizes[modality]
    return out
