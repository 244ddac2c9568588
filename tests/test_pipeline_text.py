"""Fill-mask pipeline: the colab's procedure (bytes, no special tokens, mask ids,
padding to the model's length with the input mask as query mask) on the colab's
sentence, checked against a direct model call; the two ways of marking bytes; the
top-k arithmetic on known logits; the errors.

The tiny model has random weights: these tests check the mechanics, not the words.
"""

from __future__ import annotations

import math

import pytest
import torch

import perceiver_torch as pt
from perceiver_torch import BytesTokenizer
from perceiver_torch.pipelines import InputError, PipelineError, WrongModelError
from perceiver_torch.pipelines.text import (
    COLAB_SENTENCE,
    COLAB_SPAN,
    FillMaskPipeline,
    MaskedText,
    encode_masked,
    parse_masked_text,
    parse_span,
)

MARKED = "This is an incomplete sentence where some words are[MASK*9]"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return pt.build("language_perceiver", pt.TINY_CONFIGS["language_perceiver"]).eval()


def test_colab_sentence_and_span():
    # The colab masks " missing." with input_tokens[51:60].
    assert COLAB_SENTENCE.encode()[51:60] == b" missing."
    assert COLAB_SPAN == (51, 60)


def test_markers():
    item = parse_masked_text("ab[MASK]c[MASK*3]d")
    assert item.positions == (2, 4, 5, 6)
    assert len(item.data) == 8 and item.original is None
    # Positions are byte offsets: "é" is two bytes in UTF-8.
    assert parse_masked_text("é[MASK]").positions == (2,)
    assert parse_masked_text("[MASK][MASK]x").positions == (0, 1)
    assert parse_masked_text(MARKED).positions == tuple(range(51, 60))


def test_spans():
    item = parse_masked_text(COLAB_SENTENCE, [COLAB_SPAN])
    assert item.positions == tuple(range(51, 60))
    assert item.original == b" missing."
    assert item.data == COLAB_SENTENCE.encode()
    # Overlapping spans are one set of bytes; the text is literal ([MASK] is text here).
    item = parse_masked_text("[MASK] text", [(0, 3), (2, 5)])
    assert item.positions == (0, 1, 2, 3, 4) and item.original == b"[MASK"
    assert parse_span("51:60") == (51, 60)


@pytest.mark.parametrize("bad", ["51", "a:b", "5-9", ""])
def test_bad_span_syntax(bad):
    with pytest.raises(PipelineError, match="START:END") as info:
        parse_span(bad)
    assert info.value.exit_code == 2


def test_bad_masks():
    with pytest.raises(InputError, match=r"nothing to fill.*spans= in Python"):
        parse_masked_text("no markers here")
    with pytest.raises(InputError, match="masks no byte"):
        parse_masked_text("x[MASK*0]")
    with pytest.raises(InputError, match="inside"):
        parse_masked_text("short", [(3, 9)])
    with pytest.raises(InputError, match="inside"):
        parse_masked_text("short", [(2, 2)])


def test_encoding_is_the_colabs():
    ids, mask = encode_masked([parse_masked_text(COLAB_SENTENCE, [COLAB_SPAN])], 64)
    data = COLAB_SENTENCE.encode()
    # Independent: the colab's to_int (bytes + 6), the mask token (3) at 51..59, pad
    # (0) to the length, mask 1 on the text.
    expected = [b + 6 for b in data]
    expected[51:60] = [3] * 9
    expected += [0] * (64 - len(data))
    assert ids.tolist() == [expected]
    assert mask.tolist() == [[1] * len(data) + [0] * (64 - len(data))]
    # The marker form encodes to the same ids.
    marked_ids, marked_mask = encode_masked([parse_masked_text(MARKED)], 64)
    assert torch.equal(marked_ids, ids) and torch.equal(marked_mask, mask)


def test_official_length():
    # The official model reads 2048 bytes (LanguagePerceiverConfig().max_seq_len): the
    # colab's sentence is padded to it, one byte more is refused.
    limit = pt.LanguagePerceiverConfig().max_seq_len
    assert limit == 2048
    ids, mask = encode_masked([parse_masked_text(COLAB_SENTENCE, [COLAB_SPAN])], limit)
    assert ids.shape == mask.shape == (1, 2048)
    assert int(mask.sum()) == 60 and int((ids[0, 60:] != 0).sum()) == 0
    encode_masked([parse_masked_text("x" * 2047 + "[MASK]")], limit)
    with pytest.raises(InputError, match="2049 bytes long.*at most 2048"):
        encode_masked([parse_masked_text("x" * 2048 + "[MASK]")], limit)


def test_fill_mask_equals_a_direct_model_call(model):
    tokenizer = BytesTokenizer()
    max_length = model.config.max_seq_len
    ids, mask = tokenizer(COLAB_SENTENCE, length=max_length)
    ids[0, 51:60] = tokenizer.MASK
    with torch.no_grad():
        direct = model(ids, mask)[0, 51:60]
    pipeline = FillMaskPipeline(model)
    result = pipeline(COLAB_SENTENCE, spans=[COLAB_SPAN], top_k=4)
    assert torch.equal(result.logits, direct)
    assert [m.position for m in result.masked] == list(range(51, 60))
    assert bytes(m.original for m in result.masked) == b" missing."
    probabilities = torch.softmax(direct.double(), -1)
    for row, masked in enumerate(result.masked):
        order = probabilities[row, 6:].argsort(descending=True)[:4]
        assert [c.value for c in masked.top_k] == order.tolist()
        assert [c.index for c in masked.top_k] == (order + 6).tolist()
        assert [c.probability for c in masked.top_k] == pytest.approx(
            probabilities[row, 6:][order].tolist(), rel=1e-12
        )
    filled = bytes(int(probabilities[row, 6:].argmax()) for row in range(9))
    assert result.filled == COLAB_SENTENCE.encode()[:51] + filled
    assert result.text == result.filled.decode("utf-8", errors="replace")
    # The marker form gives the same prediction.
    marked = pipeline(MARKED, top_k=4)
    assert torch.equal(marked.logits, result.logits) and marked.filled == result.filled


def test_batch_equals_single_texts(model):
    # float64 weights: batching and the padding trim only reorder sums, which moves a
    # float64 result by ~1e-15 relative; the float32 logits the pipeline returns then
    # differ by at most one float32 rounding step (one ulp <= 2**-23 |x|; 2**-22 leaves
    # room for the two values lying on either side of a power of two).
    model64 = pt.build("language_perceiver", pt.TINY_CONFIGS["language_perceiver"])
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    pipeline = FillMaskPipeline(model64, batch_size=2)
    texts = [MARKED, "ab[MASK]", "[MASK*3] and more text " * 2]
    batched = pipeline(texts)
    for text, result in zip(texts, batched):
        alone = pipeline(text)
        torch.testing.assert_close(result.logits, alone.logits, rtol=2**-22, atol=0)
        assert result.input == text


def test_model_inputs_are_made_batch_by_batch(model, monkeypatch):
    """logits() made the (N, max_length) int64 ids and mask of every text at once (32
    KB a text at the official 2048); they are now made for each batch: the same rows
    to the same model calls, the same logits."""
    import perceiver_torch.pipelines.text as text_module

    made = []
    real = text_module.encode_masked

    def counted(items, max_length):
        made.append(len(items))
        return real(items, max_length)

    monkeypatch.setattr(text_module, "encode_masked", counted)
    items = [parse_masked_text(f"text {i} is[MASK*{i % 3 + 1}] here") for i in range(7)]
    logits = FillMaskPipeline(model, batch_size=2).logits(items)
    assert made == [2, 2, 2, 1]  # was [7]
    expected = []
    with torch.no_grad():
        for start in range(0, 7, 2):
            ids, mask = real(items[start : start + 2], model.config.max_seq_len)
            out = model(ids, mask)
            expected.extend(out[row, list(item.positions)].float()
                            for row, item in enumerate(items[start : start + 2]))
    assert all(torch.equal(a, b) for a, b in zip(logits, expected))
    assert len(logits) == 7


def test_a_text_too_long_is_refused_before_the_model_by_its_number(model):
    limit = model.config.max_seq_len
    items = [MaskedText(b"ab", (1,), None)] * 3 + [MaskedText(b"a" * (limit + 1), (0,), None)]
    calls = []
    hook = model.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        with pytest.raises(InputError, match=f"^text 4 is {limit + 1} bytes long"):
            FillMaskPipeline(model, batch_size=2).logits(items)
    finally:
        hook.remove()
    assert calls == []


def test_candidates_are_bytes_only():
    # Known logits: the mask id (3) is the most likely id, then bytes 'b', 'a'.
    logits = torch.full((1, 262), -5.0)
    logits[0, 3] = 4.0
    logits[0, 6 + ord("b")] = 3.0
    logits[0, 6 + ord("a")] = 2.0
    item = MaskedText(b"x\x00", (1,), None)
    result = FillMaskPipeline._result("x[MASK]", item, logits, top_k=2)
    top = result.masked[0].top_k
    assert [c.value for c in top] == [ord("b"), ord("a")]
    total = math.exp(4.0) + math.exp(3.0) + math.exp(2.0) + 259 * math.exp(-5.0)
    assert top[0].probability == pytest.approx(math.exp(3.0) / total, rel=1e-12)
    assert top[1].probability == pytest.approx(math.exp(2.0) / total, rel=1e-12)
    assert result.text == "xb" and result.filled == b"xb"
    assert result.as_dict()["masked"][0]["top_k"][0] == {
        "byte": "b", "value": 98, "index": 104, "probability": top[0].probability
    }


def test_text_longer_than_the_model(model):
    pipeline = FillMaskPipeline(model)
    limit = model.config.max_seq_len  # 64 for the tiny model, 2048 for the official one
    pipeline("x" * (limit - 1) + "[MASK]")  # exactly the limit: fine
    with pytest.raises(InputError, match=f"the text is {limit + 1} bytes long.*at most {limit}"):
        pipeline("x" * limit + "[MASK]")


def test_one_text_is_the_text_in_the_length_error(model):
    # One text (alone, or the only one of a list) is "the text", not "text 1"; among
    # several, its number.
    pipeline = FillMaskPipeline(model)
    limit = model.config.max_seq_len
    long = "a" * limit + "[MASK]"
    for texts in (long, [long]):
        with pytest.raises(InputError, match=f"^the text is {limit + 1} bytes long"):
            pipeline(texts)
    with pytest.raises(InputError, match=f"^the text is {limit + 1} bytes long"):
        encode_masked([MaskedText(b"a" * (limit + 1), (0,), None)], limit)
    with pytest.raises(InputError, match=f"^text 2 is {limit + 1} bytes long"):
        encode_masked(
            [MaskedText(b"a", (0,), None), MaskedText(b"a" * (limit + 1), (0,), None)], limit
        )


def test_a_huge_mask_count_is_refused_before_its_bytes_are_made(model):
    # [MASK*N] is checked against the model's length before N placeholder bytes (and
    # N positions) are made: a huge N is the clean "too long" error at once, not an
    # OverflowError, a MemoryError or gigabytes of memory and seconds of work.
    import time

    pipeline = FillMaskPipeline(model)
    limit = model.config.max_seq_len
    start = time.perf_counter()
    for count, length in [
        ("99999999999999999999", "100000000000000000001"),
        ("10000000000", "10000000002"),
        ("50000000", "50000002"),
        ("9" * 5000, f"more than {limit}"),  # more digits than int() converts
    ]:
        text = f"ab[MASK*{count}]"
        with pytest.raises(InputError, match=f"the text is {length} bytes long.*at most {limit}"):
            pipeline(text)
        with pytest.raises(InputError, match=f"the text is {length} bytes long"):
            parse_masked_text(text, max_length=limit)
    assert time.perf_counter() - start < 2
    # The second text is the long one; the limit itself is fine.
    with pytest.raises(InputError, match=f"text 2 is {limit + 1} bytes long"):
        pipeline(["ab[MASK]", f"[MASK*{limit + 1}]"])
    assert len(parse_masked_text(f"[MASK*{limit}]", max_length=limit).data) == limit


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_batch_size_below_one_is_refused(model, batch_size):
    # It was "range() arg 3 must not be zero", [] for two texts or an IndexError.
    message = f"batch_size must be an integer of at least 1, got {batch_size}"
    with pytest.raises(PipelineError, match=message) as info:
        FillMaskPipeline(model, batch_size=batch_size)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_below_one_is_refused(model, top_k):
    pipeline = FillMaskPipeline(model)
    message = f"top_k must be an integer of at least 1, got {top_k}"
    with pytest.raises(PipelineError, match=message) as info:
        pipeline("a[MASK]", top_k=top_k)
    assert info.value.exit_code == 2
    # Above the 256 bytes: all of them, as before.
    assert len(pipeline("a[MASK]", top_k=1000).masked[0].top_k) == 256


def test_markers_in_bytes_that_are_not_utf8(model):
    # The model reads bytes: markers work in any bytes (this was a UnicodeDecodeError).
    item = parse_masked_text(b"\xff[MASK]\xfe[MASK*2]")
    assert item.data == b"\xff\x00\xfe\x00\x00" and item.positions == (1, 3, 4)
    # The same bytes as spans give the same positions and ids.
    spans = parse_masked_text(b"\xff?\xfe??", [(1, 2), (3, 5)])
    assert spans.positions == item.positions
    assert torch.equal(encode_masked([item], 64)[0], encode_masked([spans], 64)[0])
    result = FillMaskPipeline(model)(b"\xff[MASK]")
    assert result.input == "\ufffd[MASK]" and result.filled[0] == 0xFF
    assert [m.position for m in result.masked] == [1]
    # A str from surrogateescape decoding (sys.argv with such bytes) is those bytes.
    assert parse_masked_text("\udcff[MASK]").data == b"\xff\x00"
    with pytest.raises(InputError, match="lone surrogate '\\\\ud800' at character 1"):
        parse_masked_text("a\ud800[MASK]")


def test_a_model_without_weights_is_refused():
    with torch.device("meta"):
        meta = pt.build("language_perceiver", pt.TINY_CONFIGS["language_perceiver"])
    with pytest.raises(PipelineError, match="meta device.*load it on cpu or cuda") as info:
        FillMaskPipeline(meta)
    assert info.value.exit_code == 2


def test_wrong_model():
    with pytest.raises(WrongModelError, match="language_perceiver"):
        FillMaskPipeline(pt.build("imagenet_conv", pt.TINY_CONFIGS["imagenet_conv"]))


def test_lazy_names():
    import perceiver_torch.pipelines as pipelines

    assert pipelines.FillMaskPipeline is FillMaskPipeline
    assert pipelines.parse_masked_text is parse_masked_text
    with pytest.raises(AttributeError):
        pipelines.NoSuchPipeline  # noqa: B018


@pytest.mark.parametrize(
    "texts, spans, message",
    [
        (["a[MASK]", "b[MASK]", "no marker here"], None, r"^text 3: nothing to fill"),
        (["a[MASK]", "b[MASK*0]"], None, r"^text 2: \[MASK\*0\] masks no byte"),
        (["abcdef", "ab"], [[(1, 4)], [(1, 4)]], r"^text 2: span 1:4 is not inside"),
    ],
)
def test_an_error_in_one_of_several_texts_names_the_text(model, texts, spans, message):
    # With many texts (the CLI's INPUT...), an error must say which text it is about,
    # as the too-long error does ("text 2 is ... bytes long").
    with pytest.raises(InputError, match=message):
        FillMaskPipeline(model)(texts, spans=spans)
    # A text alone is "the text": no number.
    with pytest.raises(InputError, match=message.replace(r"^text 3: ", "^").replace(
            r"^text 2: ", "^")):
        FillMaskPipeline(model)(texts[-1], spans=None if spans is None else spans[-1])


def test_a_model_in_training_mode_is_run_in_eval_mode_and_left_so():
    # Dropout was active when the model was put back in train() mode after the
    # pipeline was built.
    from perceiver_torch.pipelines import FillMaskPipeline

    config = pt.TINY_CONFIGS["language_perceiver"]
    config = pt.config_from_dict(
        "language_perceiver", {**pt.config_to_dict(config), "dropout": 0.5}
    )
    torch.manual_seed(0)
    model = pt.build("language_perceiver", config)
    pipeline = FillMaskPipeline(model)
    expected = pipeline("hello [MASK*3]").logits
    model.train()
    assert torch.equal(pipeline("hello [MASK*3]").logits, expected)
    assert model.training


def test_bytes_like_texts_non_texts_and_malformed_spans():
    from perceiver_torch.pipelines import FillMaskPipeline

    torch.manual_seed(0)
    model = pt.build("language_perceiver", pt.TINY_CONFIGS["language_perceiver"])
    pipeline = FillMaskPipeline(model)
    expected = pipeline(b"ab[MASK]c")
    # A bytearray or memoryview is one text, not a list of byte values (each of which
    # bytes() turned into that many zero bytes: "text 1 is 97 bytes long").
    for text in (bytearray(b"ab[MASK]c"), memoryview(b"ab[MASK]c")):
        assert torch.equal(pipeline(text).logits, expected.logits)
    for texts in (None, 5, [5], [[97, 98]]):
        with pytest.raises(InputError, match="str or bytes"):
            pipeline(texts)
    # TypeError / ValueError from tuple unpacking or range() before.
    for spans, message in (
        ((0, 2), r"a single span goes in a list: \[\(0, 2\)\]"),
        ([(0.5, 2)], "must be integers"),
        (["0:2"], "parse_span"),
        ([(0, 2, 3)], "not a pair"),
    ):
        with pytest.raises(PipelineError, match=message) as info:
            pipeline("hello", spans=spans)
        assert info.value.exit_code == 2
    with pytest.raises(PipelineError, match="2 texts but 1 span lists") as info:
        pipeline(["hello", "world"], spans=[[(0, 2)]])
    assert info.value.exit_code == 2
    assert pipeline("hello", spans=[(0, 2)]).filled[2:] == b"llo"


def test_a_text_input_is_read_only_up_to_a_bound(tmp_path, monkeypatch):
    """@FILE and stdin were read whole: @/dev/zero or an endless pipe into `-` ran
    until the process was killed for memory. Reading stops past MAX_INPUT_BYTES."""
    import io
    import sys

    from perceiver_torch.pipelines import text

    monkeypatch.setattr(text, "MAX_INPUT_BYTES", 1000)
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 5000)
    with pytest.raises(InputError, match="more than 1,000 bytes"):
        text._read_input(f"@{big}")
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 1000 + b"\n")
    assert text._read_input(f"@{small}") == b"x" * 1000

    class Endless(io.RawIOBase):
        asked: list = []

        def readable(self):
            return True

        def read(self, size=-1):
            self.asked.append(size)
            if size is None or size < 0:
                raise AssertionError("stdin was read without a bound")
            return b"y" * size

    class Stdin:
        buffer = Endless()

    monkeypatch.setattr(sys, "stdin", Stdin())
    with pytest.raises(InputError, match="stdin"):
        text._read_input("-")
    assert Endless.asked and all(0 <= n <= 1003 for n in Endless.asked)


def test_spans_that_are_no_list_are_named():
    """spans=5, a generator or a number per text failed with Python's "object of type
    'int' has no len()" before the spans were checked."""
    from perceiver_torch.pipelines import FillMaskPipeline

    torch.manual_seed(0)
    model = pt.build("language_perceiver", pt.TINY_CONFIGS["language_perceiver"])
    pipeline = FillMaskPipeline(model)
    for call in (
        lambda: pipeline("hello", spans=5),
        lambda: pipeline("hello", spans=((0, 2) for _ in range(1))),
        lambda: pipeline(["hello", "world"], spans=[[(0, 2)], 3]),
    ):
        with pytest.raises(PipelineError, match="spans must be a list of") as info:
            call()
        assert info.value.exit_code == 2
    # An empty list is still "no spans": the markers are read.
    assert pipeline("he[MASK]lo", spans=[]).masked[0].position == 2


def test_non_finite_logits_are_noted(model, monkeypatch):
    """A float16 language model past 65504 gave NaN probabilities and arbitrary bytes
    with no word; the result (and the JSON document) notes it, as classify does."""
    pipeline = FillMaskPipeline(model)
    clean = pipeline("ab[MASK]")
    assert clean.notes == () and "notes" not in clean.as_dict()
    original = FillMaskPipeline.logits

    def logits(self, items):
        out = original(self, items)
        out[0][0, 10] = float("inf")
        return out

    monkeypatch.setattr(FillMaskPipeline, "logits", logits)
    result = pipeline("ab[MASK]")
    (note,) = result.notes
    assert "non-finite" in note and "the filled bytes are not meaningful" in note
    assert result.as_dict()["notes"] == [note]
