"""The language model's byte tokenizer: UTF-8 bytes shifted by the special ids."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor


class BytesTokenizer:
    """UTF-8 byte tokenizer of the language Perceiver.

    Ids 0-5 are special (pad 0, bos 1, eos 2, mask 3, cls 4, sep 5); byte ``b`` is id
    ``b + 6``; the vocabulary has 262 ids.
    """

    PAD = 0
    BOS = 1
    EOS = 2
    MASK = 3
    CLS = 4
    SEP = 5
    NUM_SPECIAL = 6
    VOCAB_SIZE = 256 + NUM_SPECIAL

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    def encode(
        self,
        text: Union[str, bytes, bytearray, memoryview],
        *,
        add_special_tokens: bool = False,
    ) -> List[int]:
        """Token ids of ``text`` (optionally wrapped in bos ... eos): a ``str`` is
        encoded as UTF-8, ``bytes`` (or a bytearray, memoryview) are the bytes
        themselves, UTF-8 or not (the model reads bytes; fill-mask does the same)."""
        if isinstance(text, str):
            data = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            data = bytes(text)
        else:
            raise TypeError(
                f"BytesTokenizer encodes a str or bytes, got {type(text).__name__}; "
                "pass a text, its bytes, or a list of them"
            )
        ids = [b + self.NUM_SPECIAL for b in data]
        if add_special_tokens:
            ids = [self.BOS] + ids + [self.EOS]
        return ids

    def decode(
        self, ids: Union[Sequence[int], Tensor], *, errors: str = "replace"
    ) -> str:
        """Text of ``ids``, one sequence: a list of ints, a (T,) tensor, or the (1, T)
        ``input_ids`` that calling the tokenizer on one text gives. Special ids are
        skipped; bytes that are not valid UTF-8 become U+FFFD (``errors="replace"``;
        any ``bytes.decode`` policy works). A batch of several sequences raises
        ``ValueError``: decode its rows one by one."""
        if not isinstance(ids, Tensor) and hasattr(ids, "ndim"):
            ids = torch.as_tensor(ids)  # a NumPy array: its shape is checked as a tensor's
        if isinstance(ids, Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes one sequence of ids, (T,) or (1, T), got shape "
                    f"{list(ids.shape)}; decode a batch row by row: "
                    "[tokenizer.decode(row) for row in ids]"
                )
            ids = ids.tolist()
        else:
            ids = list(ids)  # any iterable of ids, a generator too
            if len(ids) == 1 and isinstance(ids[0], (list, tuple)):
                ids = ids[0]  # [[...]]: input_ids.tolist() of one text
        try:
            values = [int(i) for i in ids]
        except TypeError:
            raise ValueError(
                "decode takes one sequence of integer ids; decode a batch row by row: "
                "[tokenizer.decode(row) for row in ids]"
            ) from None
        data = bytes(
            i - self.NUM_SPECIAL for i in values if self.NUM_SPECIAL <= i < self.VOCAB_SIZE
        )
        return data.decode("utf-8", errors=errors)

    def pad(
        self, sequences: Sequence[Sequence[int]], length: Optional[int] = None
    ) -> Tuple[Tensor, Tensor]:
        """Pads token lists to ``length`` (default: the longest) with the pad id.

        Returns ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64 (1 = real
        token). Raises if a sequence is longer than ``length``.
        """
        length = (
            max((len(s) for s in sequences), default=0) if length is None else length
        )
        ids = torch.full((len(sequences), length), self.PAD, dtype=torch.int64)
        mask = torch.zeros((len(sequences), length), dtype=torch.int64)
        for row, seq in enumerate(sequences):
            if len(seq) > length:
                raise ValueError(
                    f"sequence {row} has {len(seq)} tokens > length {length}"
                )
            ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.int64)
            mask[row, : len(seq)] = 1
        return ids, mask

    def __call__(
        self,
        texts: Union[str, bytes, Sequence[Union[str, bytes]]],
        *,
        length: Optional[int] = None,
        add_special_tokens: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """Encodes and pads one text or a batch: (input_ids, attention_mask), (B, L).
        A text is a ``str`` or its ``bytes`` (see :meth:`encode`)."""
        if isinstance(texts, (str, bytes, bytearray, memoryview)):
            texts = [texts]
        elif not isinstance(texts, Iterable):
            raise TypeError(
                f"BytesTokenizer takes a text (str or bytes) or a list of them, got "
                f"{type(texts).__name__}"
            )
        encoded = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        return self.pad(encoded, length)
