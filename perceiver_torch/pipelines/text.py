"""Fill-mask: the masked bytes of a text, predicted by the language Perceiver as
DeepMind's masked-language-modelling colab does.

The colab's procedure (:func:`encode_masked`): the text's UTF-8 bytes through the bytes
tokenizer with **no** special tokens (byte ``b`` is id ``b + 6``), the masked bytes
replaced by the mask id (3), padded with the pad id (0) to the model's maximum length
(2048 for the official model), the input mask (1 for the text's bytes, 0 for the
padding) given to the model as both input and query mask; the logits at the masked
positions are the prediction.

Masked bytes are given in one of two ways (:func:`parse_masked_text`):

* markers in the text: ``[MASK]`` masks one byte, ``[MASK*N]`` masks N bytes. The
  colab's example, " missing." (9 bytes) masked:
  ``"This is an incomplete sentence where some words are[MASK*9]"``.
* byte spans over a plain text: ``spans=[(51, 60)]`` masks bytes 51..59 (byte offsets
  of the UTF-8 encoding, end exclusive; the text is then taken literally).

A text is a ``str`` (read as its UTF-8 bytes; characters that ``surrogateescape``
decoding made of undecodable bytes, as in ``sys.argv``, are those bytes again) or
``bytes``, taken as they are: the model reads bytes, so markers work in bytes that are
not UTF-8 too (a marker is its ASCII bytes ``[MASK]``, ``[MASK*N]``).
"""

from __future__ import annotations

import json
import numbers
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..tokenizer import BytesTokenizer
from .base import (
    InputError,
    PipelineError,
    Progress,
    RunOptions,
    check_model,
    check_output_paths,
    check_weights,
    eval_mode,
    no_progress,
    non_finite_output_note,
    positive_int,
    results_document,
    usage_error,
)

__all__ = [
    "MASK_MARKER",
    "ByteCandidate",
    "FillMaskPipeline",
    "FillMaskResult",
    "MaskedByte",
    "MaskedText",
    "byte_text",
    "encode_masked",
    "parse_masked_text",
    "parse_span",
]

#: One masked byte; ``[MASK*N]`` is N of them.
MASK_MARKER = "[MASK]"
# On bytes: the model reads bytes, and a text need not be UTF-8 (see the module doc).
_MARKER = re.compile(rb"\[MASK(?:\*(\d+))?\]")

_TOKENIZER = BytesTokenizer()

Span = Tuple[int, int]


@dataclass(frozen=True)
class MaskedText:
    """A text to fill: its bytes and which of them are masked.

    ``data``: the text's bytes (UTF-8 for a str; a masked byte given by a marker is 0
    here; by a span, the original byte). ``positions``: the masked byte offsets, ascending.
    ``original``: the bytes under the mask when they are known (spans), else None.
    """

    data: bytes
    positions: Tuple[int, ...]
    original: Optional[bytes]


def parse_span(value: str) -> Span:
    """``"START:END"`` -> ``(START, END)`` (byte offsets, END exclusive)."""
    start, sep, end = str(value).partition(":")
    try:
        if not sep:
            raise ValueError
        span = (int(start), int(end))
    except ValueError:
        error = PipelineError(
            f"span {value!r} is not START:END (byte offsets, end exclusive, e.g. 51:60)"
        )
        error.exit_code = 2
        raise error from None
    return span


def _text_bytes(text: Union[str, bytes]) -> bytes:
    """The bytes of a text: ``bytes`` as they are, a ``str`` in UTF-8 (lone surrogates
    from ``surrogateescape`` decoding back to the bytes they stand for).

    Raises:
        InputError: a str with another lone surrogate (no bytes stand for it), or
            something that is not a text (``bytes(5)`` would be five zero bytes).
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    if not isinstance(text, str):
        raise InputError(
            f"a text is a str or bytes, got {type(text).__name__}; give the text itself"
        )
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError as error:
        raise InputError(
            f"the text has a lone surrogate {text[error.start]!r} at character "
            f"{error.start}, which has no UTF-8 bytes; remove it or give the text as bytes"
        ) from None


def _checked_spans(spans: Any, which: str) -> List[Span]:
    """``spans`` as a list of (START, END) integer pairs, or :class:`PipelineError`
    (exit 2) naming what is wrong: a bare pair ``(51, 60)`` for ``[(51, 60)]``, a
    ``"51:60"`` string (:func:`parse_span` reads those), floats."""
    def bad(detail: str) -> PipelineError:
        return usage_error(
            f"{which}spans must be a list of (START, END) byte offsets, e.g. "
            f"spans=[(51, 60)]; {detail}"
        )

    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise bad(f"got {type(spans).__name__} {spans!r}")
    checked = []
    for span in spans:
        if isinstance(span, numbers.Integral):
            raise bad(f"got {tuple(spans)!r} (a single span goes in a list: [{tuple(spans)!r}])")
        if isinstance(span, (str, bytes)):
            raise bad(f"got {span!r} (parse_span turns 'START:END' into a pair)")
        if not isinstance(span, Sequence) or len(span) != 2:
            raise bad(f"got {span!r}, not a pair")
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in span):
            raise bad(f"got {tuple(span)!r}: the offsets must be integers")
        checked.append((int(span[0]), int(span[1])))
    return checked


def _too_long(length: Optional[int], max_length: int, row: Optional[int]) -> InputError:
    """The error of a text over the model's length (``length`` None: too large to say)."""
    which = "the text" if row is None else f"text {row + 1}"
    size = f"more than {max_length}" if length is None else str(length)
    return InputError(
        f"{which} is {size} bytes long; the model reads at most {max_length} bytes "
        "(its max_seq_len): shorten it or split it"
    )


def parse_masked_text(
    text: Union[str, bytes],
    spans: Optional[Sequence[Span]] = None,
    *,
    max_length: Optional[int] = None,
    row: Optional[int] = None,
) -> MaskedText:
    """The masked bytes of ``text``: its ``[MASK]``/``[MASK*N]`` markers, or, when
    ``spans`` is given, those byte spans of the literal text.

    max_length: the longest text allowed (the model's max_seq_len), checked before
    a marker's bytes are made, so that ``[MASK*99999999999]`` costs no memory; None
    for no limit. row: the text's number from 0, named in every error's message
    (``text 3: ...``; None for a text alone).

    text: a str (its UTF-8 bytes) or bytes, which need not be UTF-8 (see the module
    docstring).

    Raises:
        InputError: no masked byte, a span outside the text or empty, ``[MASK*0]``,
            a text longer than ``max_length``, a str that has no UTF-8 bytes.
    """
    which = "" if row is None else f"text {row + 1}: "
    try:
        data = _text_bytes(text)
    except InputError as error:
        raise InputError(f"{which}{error}") from None
    # Checked before len(): spans=5 or a generator failed with "object of type 'int'
    # has no len()" instead of the spans message.
    checked = None if spans is None else _checked_spans(spans, which)
    if checked:
        masked = set()
        for start, end in checked:
            if not 0 <= start < end <= len(data):
                raise InputError(
                    f"{which}span {start}:{end} is not inside the text's {len(data)} bytes "
                    "(give START:END with 0 <= START < END <= the byte length)"
                )
            masked.update(range(start, end))
        positions = tuple(sorted(masked))
        return MaskedText(data, positions, bytes(data[p] for p in positions))
    # First the literal pieces and the counts, then the length check, and only then
    # the placeholder bytes: N in [MASK*N] is the user's number, and N bytes (and N
    # positions) of a huge one would exhaust the memory before any check.
    literals: List[bytes] = []
    counts: List[int] = []
    cursor = 0
    oversized = False  # a count with more digits than int() converts
    for match in _MARKER.finditer(data):
        literals.append(data[cursor : match.start()])
        try:
            count = 1 if match.group(1) is None else int(match.group(1))
        except ValueError:  # over sys.get_int_max_str_digits() digits
            if max_length is None:
                raise InputError(
                    f"{which}[MASK*N] with an N of {len(match.group(1))} digits masks more "
                    "bytes than any model reads; give a smaller N"
                ) from None
            count, oversized = max_length + 1, True
        if count < 1:
            marker = match.group(0).decode("ascii")
            raise InputError(f"{which}{marker} masks no byte; use [MASK*N] with N >= 1")
        counts.append(count)
        cursor = match.end()
    literals.append(data[cursor:])
    length = sum(len(piece) for piece in literals) + sum(counts)
    if max_length is not None and length > max_length:
        raise _too_long(None if oversized else length, max_length, row)
    pieces: List[bytes] = []
    positions: List[int] = []
    length = 0
    for literal, count in zip(literals, counts):
        pieces.append(literal)
        length += len(literal)
        positions.extend(range(length, length + count))
        pieces.append(bytes(count))
        length += count
    pieces.append(literals[-1])
    if not positions:
        raise InputError(
            f"{which}nothing to fill: mark the bytes to predict with [MASK] (one byte) or "
            "[MASK*N] (N bytes), or give byte spans (--span START:END; spans= in "
            "Python)"
        )
    return MaskedText(b"".join(pieces), tuple(positions), None)


def encode_masked(
    items: Sequence[MaskedText], max_length: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The colab's model inputs: ``(input_ids, input_mask)``, both (B, max_length)
    int64: byte ids (no special tokens), the mask id at the masked bytes, pad ids after
    the text; the mask is 1 on the text's bytes, 0 on the padding.

    Raises:
        InputError: a text longer than ``max_length`` bytes.
    """
    sequences = []
    for row, item in enumerate(items):
        if len(item.data) > max_length:
            raise _too_long(len(item.data), max_length, None if len(items) == 1 else row)
        # BytesTokenizer.encode of the text, without special tokens; from the bytes,
        # since a marker's placeholder bytes are not text.
        ids = [b + BytesTokenizer.NUM_SPECIAL for b in item.data]
        for position in item.positions:
            ids[position] = BytesTokenizer.MASK
        sequences.append(ids)
    return _TOKENIZER.pad(sequences, max_length)


def byte_text(value: int) -> str:
    """A byte as shown: the character for printable ASCII, else ``\\xNN``."""
    return chr(value) if 0x20 <= value < 0x7F else f"\\x{value:02x}"


@dataclass(frozen=True)
class ByteCandidate:
    """One proposed byte: ``value`` 0..255, ``index`` its token id (value + 6) and its
    probability under the model's softmax over the whole vocabulary (262 ids)."""

    value: int
    index: int
    probability: float

    def as_dict(self) -> Dict[str, Any]:
        return {
            "byte": byte_text(self.value),
            "value": self.value,
            "index": self.index,
            "probability": self.probability,
        }


@dataclass(frozen=True)
class MaskedByte:
    """The prediction at one masked byte offset: ``top_k`` candidates, most probable
    first; ``original`` the byte that was masked, when known (spans)."""

    position: int
    top_k: Tuple[ByteCandidate, ...]
    original: Optional[int] = None

    def as_dict(self) -> Dict[str, Any]:
        document: Dict[str, Any] = {"position": self.position}
        if self.original is not None:
            document["original"] = byte_text(self.original)
        document["top_k"] = [c.as_dict() for c in self.top_k]
        return document


@dataclass(frozen=True)
class FillMaskResult:
    """What fill-mask found for one text.

    ``filled``: the text's bytes with each masked byte replaced by its most probable
    byte; ``text``: ``filled`` decoded (invalid UTF-8 shows as U+FFFD). ``masked``:
    per masked byte, in order. ``logits``: (M, 262) float32, the model's logits at the
    M masked positions. ``notes``: remarks on the result (logits that are not finite:
    a float16 model past its range).
    """

    input: str
    text: str
    filled: bytes
    masked: Tuple[MaskedByte, ...]
    logits: torch.Tensor
    notes: Tuple[str, ...] = ()

    def as_dict(self) -> Dict[str, Any]:
        document = {
            "input": self.input,
            "text": self.text,
            "masked": [m.as_dict() for m in self.masked],
        }
        if self.notes:
            document["notes"] = list(self.notes)
        return document


class FillMaskPipeline:
    """Fill-mask with a ``language_perceiver`` model (see the module docstring).

    ``pipeline(text)`` -> :class:`FillMaskResult`; ``pipeline([text, ...])`` -> a list,
    run ``batch_size`` texts per forward pass. Candidates are bytes only: the special
    ids (pad, mask, ...) are never proposed, and the filled text keeps its byte length.
    """

    def __init__(
        self, model: torch.nn.Module, *, batch_size: int = 8, progress: Progress = no_progress
    ) -> None:
        check_model(model, "fill-mask", ("language_perceiver",))
        check_weights(model, "fill-mask")
        self.model = model  # run in eval mode, call by call (eval_mode)
        self.max_length = int(model.config.max_seq_len)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.progress = progress

    @torch.no_grad()
    def logits(self, items: Sequence[MaskedText]) -> List[torch.Tensor]:
        """Per item, the float32 logits (M, 262) at its masked positions.

        Every item's length is checked first (a text too long among many fails
        before any model call, by its number); the model's inputs are then made
        batch by batch (:func:`encode_masked`: two int64 rows of ``max_length``, 32
        KB a text at 2048, were made for every text at once)."""
        for row, item in enumerate(items):
            if len(item.data) > self.max_length:
                raise _too_long(len(item.data), self.max_length,
                                None if len(items) == 1 else row)
        device = next(self.model.parameters()).device
        out: List[torch.Tensor] = []
        starts = range(0, len(items), self.batch_size)
        for start in self.progress(starts, len(starts), "texts"):
            batch = items[start : start + self.batch_size]
            ids, mask = encode_masked(batch, self.max_length)
            with eval_mode(self.model):
                logits = self.model(ids.to(device), mask.to(device))
            for row, item in enumerate(batch):
                out.append(logits[row, list(item.positions)].float().cpu())
        return out

    def __call__(
        self,
        texts: Union[str, bytes, Sequence[Union[str, bytes]]],
        *,
        spans: Optional[Union[Sequence[Span], Sequence[Optional[Sequence[Span]]]]] = None,
        top_k: int = 5,
    ) -> Union[FillMaskResult, List[FillMaskResult]]:
        """texts: one text or a list; spans: for one text, its byte spans; for a list,
        None or one entry (spans or None) per text. Without spans, the texts carry
        ``[MASK]``/``[MASK*N]`` markers. top_k: candidates per masked byte, at least 1
        (more than the 256 bytes gives all 256)."""
        top_k = positive_int(top_k, "top_k")  # before any work, not deep in topk
        # bytes-like texts are one text (a bytearray is not a list of byte values).
        single = isinstance(texts, (str, bytes, bytearray, memoryview))
        try:
            batch = [texts] if single else list(texts)
        except TypeError:
            raise InputError(
                f"fill-mask takes a text (str or bytes) or a list of texts, got "
                f"{type(texts).__name__}"
            ) from None
        if single:
            per_text = [spans]
        elif spans is None:
            per_text = [None] * len(batch)
        else:
            per_text = list(spans)
            if len(per_text) != len(batch):
                raise usage_error(
                    f"{len(batch)} texts but {len(per_text)} span lists: give one entry "
                    "(a list of (START, END) spans, or None) per text"
                )
        # One text is "the text" in an error's message, not "text 1".
        rows: List[Optional[int]] = [None] if len(batch) == 1 else list(range(len(batch)))
        items = [
            parse_masked_text(t, s, max_length=self.max_length, row=row)
            for row, t, s in zip(rows, batch, per_text)
        ]
        results = [
            self._noted(self._result(text, item, logits, top_k))
            for text, item, logits in zip(batch, items, self.logits(items))
        ]
        return results[0] if single else results

    def _noted(self, result: FillMaskResult) -> FillMaskResult:
        """``result`` with a note where its logits are not all finite."""
        note = non_finite_output_note(
            result.logits, self.model, "the filled bytes are not meaningful"
        )
        if note is None:
            return result
        return replace(result, notes=result.notes + (note,))

    @staticmethod
    def _result(
        text: Union[str, bytes], item: MaskedText, logits: torch.Tensor, top_k: int
    ) -> FillMaskResult:
        # The probabilities are the model's softmax over all 262 ids (float64: they do
        # not depend on a float32 summation order); the candidates are the byte ids
        # (6..261) among them.
        full = torch.softmax(logits.to(torch.float64), dim=-1)
        byte_probs = full[:, BytesTokenizer.NUM_SPECIAL :]
        values, indices = byte_probs.topk(min(top_k, byte_probs.shape[-1]), dim=-1)
        filled = bytearray(item.data)
        masked = []
        for row, position in enumerate(item.positions):
            candidates = tuple(
                ByteCandidate(int(b), int(b) + BytesTokenizer.NUM_SPECIAL, float(p))
                for b, p in zip(indices[row].tolist(), values[row].tolist())
            )
            # The best byte, whatever top_k is (argmax over the byte ids).
            filled[position] = int(byte_probs[row].argmax())
            original = None if item.original is None else item.original[row]
            masked.append(MaskedByte(position, candidates, original))
        # The text's bytes shown as text: a str without lone surrogates is itself.
        shown = _text_bytes(text).decode("utf-8", errors="replace")
        return FillMaskResult(
            input=shown,
            text=bytes(filled).decode("utf-8", errors="replace"),
            filled=bytes(filled),
            masked=tuple(masked),
            logits=logits,
        )


# --------------------------------------------------------------------------------------
# perceiver-convert run fill-mask (the contract: perceiver_torch.pipelines)


def _read_input(value: str) -> Union[str, bytes]:
    """A CLI INPUT: ``@FILE``, ``-`` (stdin) or the text itself.

    A file and stdin are read as bytes, as the model reads them: a text need not be
    UTF-8 (see the module docstring), as a command-line text need not be (its
    undecodable bytes arrive as surrogates and are those bytes again); decoding them
    first would refuse such a file, and on stdin would depend on the locale (a Latin-1
    terminal would turn each byte above 127 into two).

    One final line ending (``\n`` or ``\r\n``) of a file or stdin is dropped: editors
    and ``echo`` add one, and the model would otherwise read it as part of the text (a
    2,048-byte text saved by an editor was refused as 2,049 bytes). A second one, or
    other whitespace, stays."""
    if value == "-":
        if sys.stdin is None:  # started with stdin closed (<&-)
            raise InputError(
                "- reads the text from stdin, which is closed; give the text itself "
                "or @FILE"
            )
        stream = getattr(sys.stdin, "buffer", None)
        return _read_at_most(stream if stream is not None else sys.stdin, "stdin (-)")
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            with open(path, "rb") as handle:
                return _read_at_most(handle, f"the text file {path}")
        except OSError as error:
            reason = getattr(error, "strerror", None) or error
            raise InputError(f"cannot read the text file {path}: {reason}") from None
    return value


#: The most bytes a text INPUT read from @FILE or stdin may hold. The model reads
#: max_seq_len bytes (2,048 for the official file; markers such as [MASK*N] make a
#: text longer or shorter than that), so this only guards the memory: an endless
#: stream (@/dev/zero, `yes | ... -`) or a huge file was read whole, until the
#: process was killed for memory.
MAX_INPUT_BYTES = 64 * 2**20


def _read_at_most(stream: Any, what: str) -> Union[str, bytes]:
    """All of ``stream`` less one final line ending (:func:`_drop_final_line_ending`),
    or :class:`~.base.InputError` (exit 3) where that is more than
    :data:`MAX_INPUT_BYTES` (reading stops just past it)."""
    data = _drop_final_line_ending(stream.read(MAX_INPUT_BYTES + 3))  # + "\r\n" + 1
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(
            f"{what} holds more than {MAX_INPUT_BYTES:,} bytes, far more than the model "
            "reads (its max_seq_len); give a shorter text"
        )
    return data


def _drop_final_line_ending(text: Union[str, bytes]) -> Union[str, bytes]:
    """``text`` without one final ``\n`` or ``\r\n`` (see :func:`_read_input`)."""
    endings = (b"\r\n", b"\n") if isinstance(text, bytes) else ("\r\n", "\n")
    for ending in endings:
        if text.endswith(ending):
            return text[: -len(ending)]
    return text


def run_task(pipeline: FillMaskPipeline, inputs: List[str], options: RunOptions) -> List[dict]:
    """``perceiver-convert run fill-mask``: one document per input text."""
    spans = [parse_span(s) for s in options.extra.get("spans") or ()] or None
    if inputs.count("-") > 1:
        # The first read takes all of stdin: the second text was silently empty.
        raise usage_error("- (stdin) can be one of the texts only once")
    # Every output's path (its folder, writable; not a folder itself) before any work,
    # as the CLI's.
    check_output_paths([] if options.output is None else [options.output])
    texts = [_read_input(value) for value in inputs]
    pipeline.progress = options.progress
    results = pipeline(texts, spans=[spans] * len(texts), top_k=options.top_k)
    for result in results:
        options.echo(f"input:  {result.input!r}")
        options.echo(f"filled: {result.text!r}")
        for masked in result.masked:
            shown = "  ".join(
                f"'{byte_text(c.value)}' {c.probability:.3f}" for c in masked.top_k
            )
            options.echo(f"  byte {masked.position:>4}: {shown}")
        for note in result.notes:
            options.echo(f"  note: {note}")
    documents = [result.as_dict() for result in results]
    if options.output is not None:
        _write_output(results, results_document("fill-mask", pipeline.model, documents), options)
    return documents


def _write_output(results: List[FillMaskResult], document: dict, options: RunOptions) -> None:
    if options.arrays is None:
        with options.open_output(options.output) as handle:
            handle.write((json.dumps(document, indent=2) + "\n").encode("utf-8"))
        return
    if options.arrays == "npy":
        counts = {len(r.masked) for r in results}
        if len(counts) != 1:
            error = PipelineError(
                "--npy needs the same number of masked bytes in every text "
                f"(got {sorted(counts)}); use --npz (one array per text)"
            )
            error.exit_code = 2
            raise error
        array = np.stack([r.logits.numpy() for r in results])  # (N, M, 262)
        with options.open_output(options.output) as handle:
            np.save(handle, array)
        return
    arrays: Dict[str, np.ndarray] = {}
    for i, result in enumerate(results):
        arrays[f"logits_{i}"] = result.logits.numpy()
        arrays[f"positions_{i}"] = np.asarray([m.position for m in result.masked], np.int64)
    with options.open_output(options.output) as handle:
        np.savez(handle, **arrays)


COLAB_SENTENCE = "This is an incomplete sentence where some words are missing."
#: The colab masks " missing." (bytes 51..59).
COLAB_SPAN: Span = (51, 60)


def demo_task(model: torch.nn.Module, folder: Path, options: RunOptions) -> Dict[str, str]:
    """``perceiver-convert demo``: the colab's sentence with " missing." masked."""
    from .media import atomic_path

    path = Path(folder) / "sentence.txt"
    with atomic_path(path) as temp:  # --workdir --force: never a half-written file
        temp.write_text(COLAB_SENTENCE, encoding="utf-8")
    pipeline = FillMaskPipeline(model)
    result = pipeline(path.read_text(encoding="utf-8"), spans=[COLAB_SPAN])
    return {
        "task": "fill-mask",
        "input": f"{path.name}, bytes {COLAB_SPAN[0]}..{COLAB_SPAN[1] - 1} masked",
        "answer": repr(result.text),
    }
