"""The Perceiver IO encoder and the generic Perceiver IO model.

``PerceiverEncoder`` is the reference's encoder: a trainable latent array
cross-attends to the preprocessed inputs, then a block of self-attention layers is
applied ``num_blocks`` times with shared weights. ``PerceiverIO`` wires the five parts
every task model has (``input_preprocessor``, ``encoder``, ``output_queries``,
``decoder``, ``output_postprocessor``); the task models (one small file each) say how
their inputs, queries and outputs look.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn

from .attention import CrossAttentionLayer, SelfAttentionLayer
from . import fast_paths
from .fast_paths import FastPath, dynamo_tracing, plain
from .micro_batches import items_per_slice
from .position_encoding import truncated_normal_


class PerceiverEncoder(nn.Module):
    """Latents cross-attend to the inputs, then ``num_blocks`` x the shared self-attends.

    Keys: ``latents`` (N, C), ``cross_attention.*``, ``self_attends.{i}.*``.

    Args (keyword-only):
        input_channels: width of the preprocessed inputs.
        num_latents: N.
        latent_channels: C.
        num_self_attends_per_block: self-attention layers in the shared block.
        num_blocks: times the block is applied (shared weights).
        num_cross_attention_heads, num_self_attention_heads: heads.
        qk_channels: qk width of the cross- and self-attentions; None = their defaults
            (the inputs' width for the cross-attention, C for self-attention).
        v_channels: value width of the same; None = qk width.
        cross_attention_widening_factor, self_attention_widening_factor: MLP widening.
        use_query_residual: the cross-attention adds the latents back.
        dropout, attention_dropout: training-only dropout rates.
        latent_init_scale: std of the latents' initialisation (0.02).
    """

    def __init__(
        self,
        *,
        input_channels: int,
        num_latents: int,
        latent_channels: int,
        num_self_attends_per_block: int,
        num_blocks: int = 1,
        num_cross_attention_heads: int = 1,
        num_self_attention_heads: int = 8,
        qk_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cross_attention_widening_factor: int = 1,
        self_attention_widening_factor: int = 1,
        use_query_residual: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        latent_init_scale: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.latents = nn.Parameter(torch.empty(num_latents, latent_channels))
        truncated_normal_(self.latents, latent_init_scale)
        self.cross_attention = CrossAttentionLayer(
            q_channels=latent_channels,
            kv_channels=input_channels,
            num_heads=num_cross_attention_heads,
            qk_channels=qk_channels,
            v_channels=v_channels,
            widening_factor=cross_attention_widening_factor,
            use_query_residual=use_query_residual,
            dropout=dropout,
            attention_dropout=attention_dropout,
        )
        self.self_attends = nn.ModuleList(
            SelfAttentionLayer(
                channels=latent_channels,
                num_heads=num_self_attention_heads,
                qk_channels=qk_channels,
                v_channels=v_channels,
                widening_factor=self_attention_widening_factor,
                dropout=dropout,
                attention_dropout=attention_dropout,
            )
            for _ in range(num_self_attends_per_block)
        )

    def forward(self, inputs: Tensor, input_mask: Optional[Tensor] = None) -> Tensor:
        """inputs: (B, M, C_in) preprocessed tokens; input_mask: (B, M), nonzero = keep.
        Returns the latents (B, N, C)."""
        z = self.latents.unsqueeze(0).expand(inputs.shape[0], -1, -1)
        z = self.cross_attention(z, inputs, key_mask=input_mask)
        for _ in range(self.num_blocks):
            for layer in self.self_attends:
                z = layer(z)
        return z


class PerceiverIO(nn.Module):
    """The five parts of a Perceiver IO model; task models subclass it.

    Subclasses set ``input_preprocessor``, ``encoder``, ``output_queries``, ``decoder``
    and ``output_postprocessor`` (modules without parameters may be absent) and define
    ``forward`` with their own inputs. ``config`` holds the task model's config and
    ``model_name`` its registry name. Eval-time fast paths are switched in
    :mod:`perceiver_torch.fast_paths`.
    """

    model_name: str = ""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        # Floating-point inputs follow the model's dtype (a bfloat16 model takes the
        # same float32 images as a float32 one); integer ids and indices are untouched.
        self.register_forward_pre_hook(_cast_inputs_hook, with_kwargs=True)
        # The fast-path switches are read from the environment at first use: here,
        # eagerly. Read first inside torch.compile, the unread state became a guard
        # and every compiled model was compiled twice.
        fast_paths.disabled_paths()

    def cast_input(self, value: Any) -> Any:
        """``value`` with its floating-point tensors (also inside dicts, lists and
        tuples) cast to the model's dtype; anything else unchanged."""
        return cast_floating(value, self.dtype)

    def _build_encoder(
        self,
        *,
        input_channels: int,
        num_self_attends_per_block: int,
        num_blocks: int = 1,
        **attention_widths: Optional[int],
    ) -> PerceiverEncoder:
        """The encoder from the config fields every task config names alike.

        ``num_latents``, ``d_latents``, the two head counts and the dropout rates
        come from ``self.config``; the layer counts (named differently by the
        ImageNet configs) and any ``qk_channels``/``v_channels`` from the caller.
        """
        c = self.config
        return PerceiverEncoder(
            input_channels=input_channels,
            num_latents=c.num_latents,
            latent_channels=c.d_latents,
            num_self_attends_per_block=num_self_attends_per_block,
            num_blocks=num_blocks,
            num_cross_attention_heads=c.num_cross_attention_heads,
            num_self_attention_heads=c.num_self_attention_heads,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            **attention_widths,
        )

    def tokens_per_item(self, first_input: Tensor) -> int:
        """How many input tokens the encoder reads per batch item of ``first_input``
        (the first batched argument of ``forward``): sizes the micro-batches."""
        raise NotImplementedError

    # At most this many items per CPU inference slice whatever their tokens (None: as
    # many as the token budget allows); a model sets it where its kernels say so.
    max_items_per_slice: Optional[int] = None

    def micro_batch_size(self, first_input: Tensor) -> int:
        """Items per slice when a CPU inference batch runs in slices
        (:mod:`perceiver_torch.micro_batches`)."""
        items = items_per_slice(self.tokens_per_item(first_input))
        cap = self.max_items_per_slice
        return items if cap is None else min(items, cap)

    @property
    def device(self) -> torch.device:
        return self.encoder.latents.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.latents.dtype


def cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """Casts the floating-point tensors in ``value`` (a tensor, or dicts, lists and
    tuples of them) to ``dtype``; integer tensors and other values are returned as
    they are."""
    if isinstance(value, Tensor):
        if value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value
    if isinstance(value, Mapping):
        return {key: cast_floating(item, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floating(item, dtype) for item in value)
    return value


def _cast_inputs_hook(module: "PerceiverIO", args: tuple, kwargs: dict) -> tuple:
    return module.cast_input(args), module.cast_input(kwargs)


@contextlib.contextmanager
def capture_stages(model: PerceiverIO) -> Iterator[Dict[str, Tensor]]:
    """Records the intermediate stages of a forward pass with forward hooks.

    Yields a dict filled during the forward pass with ``"preprocessed"`` (the
    encoder's first input, (B, N, C) channels-last tokens), ``"latents"`` (the
    encoder's output) and ``"decoder_output"`` ((B, M, C), before postprocessing).
    When the decoder runs several times in one pass (chunked video decoding), its
    outputs are concatenated along M. Models with a shortcut (the video model's fused
    decoding, the language model's skipping of padding) run the plain computation
    meanwhile, so that the stages have the reference's shapes.

    Only the forward passes of the thread that opened the block are recorded: other
    threads may run the same model meanwhile (a server's requests), and their passes
    neither enter these stages nor fail in these hooks. (In code torch.compile
    traces, every pass is recorded: it cannot trace the thread check, which broke
    the graph at each hook.)
    """
    stages: Dict[str, Tensor] = {}
    decoder_outputs = []
    owner = threading.get_ident()

    def recorded() -> bool:
        return dynamo_tracing() or threading.get_ident() == owner

    def on_encoder_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if recorded():
            stages["preprocessed"] = (args[0] if args else kwargs["inputs"]).detach()

    def on_encoder_output(module: nn.Module, args: tuple, output: Tensor) -> None:
        if recorded():
            stages["latents"] = output.detach()

    def on_decoder_output(module: nn.Module, args: tuple, output: Tensor) -> None:
        if not recorded():
            return
        decoder_outputs.append(output.detach())
        stages["decoder_output"] = (
            decoder_outputs[0]
            if len(decoder_outputs) == 1
            else torch.cat(decoder_outputs, dim=1)
        )

    handles = [
        model.encoder.register_forward_pre_hook(on_encoder_input, with_kwargs=True),
        model.encoder.register_forward_hook(on_encoder_output),
        model.decoder.register_forward_hook(on_decoder_output),
    ]
    # Fast paths that skip or fold parts of the plain computation (so that the
    # decoder's output has another shape), or slice the batch (so that the hooks
    # would see one slice), are off meanwhile.
    try:
        with plain(FastPath.SKIP_PADDING, FastPath.FOLDED_DECODER, FastPath.MICRO_BATCHES):
            yield stages
    finally:
        for handle in handles:
            handle.remove()
