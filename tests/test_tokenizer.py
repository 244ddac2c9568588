"""The language model's bytes tokenizer."""

from __future__ import annotations

import pytest
import torch

from perceiver_torch import BytesTokenizer


def test_specials_and_vocab():
    tok = BytesTokenizer()
    assert (tok.PAD, tok.BOS, tok.EOS, tok.MASK, tok.CLS, tok.SEP) == (0, 1, 2, 3, 4, 5)
    assert tok.vocab_size == 262


def test_encode_is_utf8_bytes_plus_six():
    tok = BytesTokenizer()
    assert tok.encode("Hi") == [ord("H") + 6, ord("i") + 6]
    assert tok.encode("é") == [0xC3 + 6, 0xA9 + 6]
    assert tok.encode("a", add_special_tokens=True) == [1, ord("a") + 6, 2]
    assert max(tok.encode("\xff\U0001f600")) <= 261


def test_decode_round_trip_and_skips_specials():
    tok = BytesTokenizer()
    text = "Perceiver IO: ünïcödé ✓ 😀"
    assert tok.decode(tok.encode(text)) == text
    ids = [1, 3] + tok.encode("ab") + [0, 0, 2, 4, 5]
    assert tok.decode(ids) == "ab"
    assert tok.decode(torch.tensor(ids)) == "ab"


def test_decode_invalid_utf8_is_graceful():
    tok = BytesTokenizer()
    broken = tok.encode("ok") + [0xC3 + 6] + tok.encode("!")  # truncated 2-byte char
    assert tok.decode(broken) == "ok\ufffd!"
    assert tok.decode(broken, errors="ignore") == "ok!"
    assert tok.decode([0xFF + 6]) == "\ufffd"


def test_padding_and_attention_mask():
    tok = BytesTokenizer()
    ids, mask = tok(["abc", "d"], length=5)
    assert ids.dtype == torch.int64 and ids.shape == (2, 5)
    assert ids.tolist() == [[103, 104, 105, 0, 0], [106, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    ids, mask = tok("xy")
    assert ids.shape == (1, 2) and mask.tolist() == [[1, 1]]
    with pytest.raises(ValueError, match="length 2"):
        tok(["abc"], length=2)


def test_colab_example_masking():
    """The colab masks bytes 51..59 of its example sentence with the mask id."""
    tok = BytesTokenizer()
    text = "This is an incomplete sentence where some words are missing."
    ids, mask = tok(text, length=2048)
    ids[0, 51:60] = tok.MASK
    assert tok.decode(ids[0]) == text[:51] + text[60:]
    assert int(mask.sum()) == len(text.encode())
