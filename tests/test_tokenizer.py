"""The language model's bytes tokenizer."""

from __future__ import annotations

import numpy as np
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


def test_bytes_are_encoded_as_themselves():
    # tok(b"abc") was AttributeError ('int' object has no attribute 'encode'): a bytes
    # text was taken as a batch of ints. The model reads bytes, so bytes are the text.
    tok = BytesTokenizer()
    assert tok.encode(b"Hi") == tok.encode("Hi")
    assert tok.encode(b"\xff\x00") == [0xFF + 6, 0 + 6]  # not UTF-8: kept as they are
    assert tok.encode(bytearray(b"\xc3\xa9")) == tok.encode("é")
    assert tok.encode(memoryview(b"ab"), add_special_tokens=True) == [1, 97 + 6, 98 + 6, 2]
    for one in (b"abc", bytearray(b"abc")):
        ids, mask = tok(one)
        assert ids.tolist() == [[103, 104, 105]] and mask.tolist() == [[1, 1, 1]]
    ids, _ = tok([b"ab", "c"])
    assert ids.tolist() == [[103, 104], [105, 0]]
    with pytest.raises(TypeError, match="encodes a str or bytes, got int"):
        tok.encode(5)
    with pytest.raises(TypeError, match="encodes a str or bytes, got int"):
        tok([1, 2])
    with pytest.raises(TypeError, match=r"takes a text \(str or bytes\) or a list of them, got int"):
        tok(123)  # was "'int' object is not iterable"


def test_decode_takes_the_tokenizers_own_one_text_output():
    # decode(tok("hello")[0]), the (1, T) input_ids, was int()'s TypeError on a list.
    tok = BytesTokenizer()
    ids, _ = tok("hello", length=8)
    assert ids.shape == (1, 8)
    for one_row in (ids, ids.tolist(), ids.numpy(), ids[0], ids[0].tolist()):
        assert tok.decode(one_row) == "hello"
    batch, _ = tok(["ab", "cd"])
    for rows in (batch, batch.tolist(), batch.numpy(), batch[None], torch.tensor(104)):
        with pytest.raises(ValueError, match=r"decode takes one sequence of .*ids.*row by row"):
            tok.decode(rows)
    assert [tok.decode(row) for row in batch] == ["ab", "cd"]
    assert tok.decode(np.array([104, 105])) == "bc"


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
