"""Masked language model on UTF-8 bytes (``language_perceiver_io_bytes.pickle``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .configs import LanguagePerceiverConfig
from .decoders import PerceiverDecoder
from .fast_paths import FastPath, dynamo_tracing, enabled
from .inputs import expect, fail
from .linear import compiling, intercepted_below, recording_graph
from .micro_batches import micro_batched
from .perceiver import PerceiverIO
from .postprocessors import EmbeddingDecoder
from .preprocessors import TextPreprocessor
from .queries import TrainableQueries


class LanguagePerceiver(PerceiverIO):
    """Byte-level masked language model.

    Tokens are embedded and added to a trainable position encoding; the decoder's
    queries are a second trainable position array; the logits are the decoder output
    against the tied input embedding plus a bias. A sequence shorter than
    ``max_seq_len`` uses the first T positions of both arrays: its outputs at real
    tokens equal the reference run on the sequence padded to ``max_seq_len`` with mask
    0 (padded keys are masked in the encoder; masked queries are zeroed in the decoder).
    """

    model_name = "language_perceiver"

    def __init__(self, config: Optional[LanguagePerceiverConfig] = None) -> None:
        config = config or LanguagePerceiverConfig()
        super().__init__(config)
        c = config
        v_channels = c.d_latents if c.v_channels is None else c.v_channels
        self.input_preprocessor = TextPreprocessor(
            vocab_size=c.vocab_size, max_seq_len=c.max_seq_len, d_model=c.d_model
        )
        self.encoder = self._build_encoder(
            input_channels=c.d_model,
            num_self_attends_per_block=c.num_self_attends,
            qk_channels=c.qk_channels,
            v_channels=v_channels,
        )
        self.output_queries = TrainableQueries(
            index_dim=c.max_seq_len, num_channels=c.d_model
        )
        self.decoder = PerceiverDecoder(
            query_channels=c.d_model,
            latent_channels=c.d_latents,
            output_channels=None,  # final_project=False: logits use the embedding
            num_heads=c.num_cross_attention_heads,
            qk_channels=c.qk_channels,
            v_channels=c.d_model,
            use_query_residual=False,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
        )
        self.output_postprocessor = EmbeddingDecoder(vocab_size=c.vocab_size)

    def tokens_per_item(self, first_input: Tensor) -> int:
        """One token per byte id."""
        return first_input.shape[1]

    @micro_batched("input_ids", "attention_mask")
    def forward(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None
    ) -> Tensor:
        """input_ids: (B, T) int, T <= max_seq_len; attention_mask: (B, T), 1 = real
        token (None = all real). Returns logits (B, T, vocab_size).

        In eval mode, trailing positions masked in every row (the padding up to
        ``max_seq_len`` the official model is fed) are not computed (the
        ``SKIP_PADDING`` fast path of :mod:`perceiver_torch.fast_paths`): masked keys get
        zero attention weight, and a masked query's output does not depend on the
        query or the latents (its attention row is zeroed before ``to_out`` and there
        is no query residual), so it is computed once and repeated. Not under
        ``torch.jit.trace``, ``torch.export`` or ``torch.compile``, whose graphs serve
        other masks (a compiled model recompiled for every new padding length, and
        ran eagerly after eight).
        """
        self.check_inputs(input_ids, attention_mask)
        batch, length = input_ids.shape
        if (
            attention_mask is None
            or self.training
            or not enabled(FastPath.SKIP_PADDING)
            or attention_mask.device.type == "meta"  # no values to find the padding in
            # torch.jit.trace would freeze the example's padding into the graph
            # (other masks then get wrong logits); torch.export cannot branch on it;
            # torch.compile breaks the graph on it and specialises on each length.
            or compiling()
        ):
            return self.logits(input_ids, attention_mask)
        used = (attention_mask != 0).any(dim=0).nonzero()
        real = max(int(used.max()) + 1 if used.numel() else 0, 1)
        # Hooked or replaced modules inside see the plain path's full length.
        if real == length or intercepted_below(self):
            return self.logits(input_ids, attention_mask)
        logits, latents = self.logits(
            input_ids[:, :real], attention_mask[:, :real], return_latents=True
        )
        queries = self.output_queries(batch, length=1)
        masked = self.decoder(
            queries, latents, query_mask=torch.zeros_like(attention_mask[:, :1])
        )
        masked = self.output_postprocessor(
            masked, self.input_preprocessor.embedding.weight
        )
        return torch.cat([logits, masked.expand(-1, length - real, -1)], dim=1)

    def check_inputs(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None
    ) -> None:
        """Raises ``InputError`` unless input_ids is (B, T) int64 or int32 with
        1 <= T <= max_seq_len (on the CPU, outside torch.compile: ids in
        [0, vocab_size)) and attention_mask is None or has input_ids' shape."""
        name, max_len = type(self).__name__, self.config.max_seq_len
        if isinstance(input_ids, Tensor) and input_ids.dim() == 1:
            fail(
                name,
                f"input_ids must have shape (B, T) with T <= {max_len}, got "
                f"{list(input_ids.shape)}; add the batch axis: input_ids.unsqueeze(0)",
            )
        expect(name, "input_ids", input_ids, (("B", None), ("T", None)),
               what="token ids", floating=False)
        if input_ids.dtype not in (torch.int32, torch.int64):
            # The embedding takes int32/int64 only; uint8 could not hold the special
            # ids (256-261) either.
            fail(
                name,
                f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}; "
                "convert them with input_ids.long()",
            )
        if input_ids.shape[1] > max_len:
            fail(
                name,
                f"input_ids holds {input_ids.shape[1]} tokens, more than max_seq_len "
                f"{max_len}; truncate or split the sequence",
            )
        vocab = self.config.vocab_size
        if input_ids.device.type == "cpu" and input_ids.numel() and not compiling():
            # F.embedding's own error ("index out of range in self") names neither the
            # tensor nor the vocabulary. Eager CPU only: a value check syncs a GPU and
            # would be a graph break under torch.compile.
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                fail(
                    name,
                    f"input_ids must be token ids in [0, {vocab}), got "
                    f"{low if low < 0 else high}; make them with "
                    "perceiver_torch.BytesTokenizer",
                )
        elif input_ids.device.type == "cpu" and dynamo_tracing() and not recording_graph():
            # (torch.compile only: not jit traces, nor torch.func transforms, where
            # compiling() holds too and vmap has no rule for the assert.)
            # Under torch.compile an id past the table killed the whole process (the
            # compiled gather's bounds check fires inside OpenMP's threads: "terminate
            # called recursively"); an assert in the graph raises a RuntimeError.
            torch._assert_async(
                ((input_ids >= 0) & (input_ids < vocab)).all(),
                f"{name}: input_ids must be token ids in [0, {vocab}); make them with "
                "perceiver_torch.BytesTokenizer",
            )
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(
                attention_mask.shape
            ) != tuple(input_ids.shape):
                got = (
                    list(attention_mask.shape)
                    if isinstance(attention_mask, Tensor)
                    else type(attention_mask).__name__
                )
                fail(
                    name,
                    f"attention_mask must have input_ids' shape "
                    f"{list(input_ids.shape)} (1 = real token, 0 = padding), got {got}",
                )

    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        *,
        return_latents: bool = False,
    ):
        """The plain forward pass over all T positions (no trimming of padding)."""
        self.check_inputs(input_ids, attention_mask)
        batch, length = input_ids.shape
        preprocessed = self.input_preprocessor(input_ids)
        latents = self.encoder(preprocessed, attention_mask)
        queries = self.output_queries(batch, length=length)
        # The reference decodes with query_mask = input_mask.
        decoded = self.decoder(queries, latents, query_mask=attention_mask)
        logits = self.output_postprocessor(
            decoded, self.input_preprocessor.embedding.weight
        )
        return (logits, latents) if return_latents else logits
