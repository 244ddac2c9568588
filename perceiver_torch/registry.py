"""Building the six task models by name and loading converted files."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import threading
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Tuple,
    Union,
)

import torch

from . import configs, linear
from .imagenet_conv import ImageNetConv
from .imagenet_fourier import ImageNetFourier
from .imagenet_learned import ImageNetLearned
from .language_perceiver import LanguagePerceiver
from .optical_flow import OpticalFlow
from .perceiver import PerceiverIO
from .video_autoencoding import VideoAutoencoder

# Registry name -> class, in the official order; each class states its own name.
# Read-only (like configs.TINY_CONFIGS): build() and load() look classes up here, so an
# entry changed by any caller would change every later build.
MODEL_CLASSES: Mapping[str, type] = types.MappingProxyType({
    cls.model_name: cls
    for cls in (
        LanguagePerceiver,
        ImageNetLearned,
        ImageNetFourier,
        ImageNetConv,
        OpticalFlow,
        VideoAutoencoder,
    )
})


class LoadError(ValueError):
    """A file that cannot be turned into a model (metadata, name, keys)."""


class OutOfRangeError(LoadError):
    """The weights hold values the dtype asked for cannot (``load(dtype="float16")``
    of a file with magnitudes over 65504): a wrong choice of dtype, not a bad file."""


class EmptyFileError(LoadError):
    """The file holds no bytes at all (an interrupted download or copy)."""


def _model_class(name: str) -> type:
    # Every model has a config class of the same name: config_class refuses another
    # name with the message config_from_dict gives.
    configs.config_class(name)
    return MODEL_CLASSES[name]


# The dtypes the models run in, by the names converted files record.
DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

DTypeLike = Union[str, torch.dtype, None]


def resolve_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    """``"bfloat16"``/``torch.bfloat16``/... -> the torch dtype (None stays None).

    Only float32, bfloat16 and float16 are accepted: the models keep what precision
    needs in float32 themselves (see ``attention.py``), and float64 is not a dtype
    they are meant to run in (it works with ``model.double()``, for tests).
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.replace("torch.", "")
        if key not in DTYPES:
            raise ValueError(
                f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}"
            )
        return DTYPES[key]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def safetensors_name(path: Union[str, Path]) -> Iterator[str]:
    """A name the safetensors library opens ``path`` by: the path itself, or, where
    the name is not valid UTF-8 (which it cannot take: a converted file of such a
    name read as "a truncated or corrupt copy"), ``/proc/self/fd/N`` of the file
    opened here (Linux, where such names occur); elsewhere a LoadError saying to
    rename the file."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise LoadError(
                f"{path}: the safetensors library opens only names that are valid "
                "UTF-8; rename the file"
            ) from None
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield text


# warnings.catch_warnings saves the process-wide warning filters and handler when it
# opens and puts them back when it closes: blocks of two threads that close out of
# order left the other thread's state in place for good (every later warning of the
# process ignored, or recorded into a finished block's list). This package's blocks
# take this lock (reentrant: they nest), so that they close in the order they open.
_warnings_lock = threading.RLock()


def _new_warnings_lock() -> None:
    global _warnings_lock
    _warnings_lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # a child forked during a block must not wait on it
    os.register_at_fork(after_in_child=_new_warnings_lock)


@contextlib.contextmanager
def catch_warnings(**kwargs: Any) -> Iterator[Any]:
    """``warnings.catch_warnings(**kwargs)`` that threads may enter at once: the
    package's blocks run one at a time (see ``_warnings_lock``), so that each
    restores the state it found. Blocks of other code are not covered."""
    with _warnings_lock, warnings.catch_warnings(**kwargs) as caught:
        yield caught


def torch_load_weights(path: Union[str, Path]) -> Any:
    """``torch.load(..., map_location="cpu", weights_only=True)`` of the file at
    ``path``, given as an open file: torch.load sends a path ending in .safetensors
    to safetensors whatever the file holds, so a torch.save file of that name (read
    by content everywhere else) failed with safetensors' "header too large". torch's
    own warnings about files it then reads or refuses (a pickle protocol other than
    its own, ...) are silenced: the callers' errors say what matters, in one line."""
    with open(path, "rb") as handle, catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(handle, map_location="cpu", weights_only=True)


class TensorUnderflow(NamedTuple):
    """One tensor's share of an :class:`Underflow`: of its ``values`` weights, the
    nonzero ones rounding made 0 and the ones it made subnormal."""

    name: str
    zero: int
    subnormal: int
    values: int


@dataclass(frozen=True)
class Underflow:
    """Nonzero weights that rounding to ``dtype`` (float16: the only storage dtype
    whose exponent range is narrower than float32's) made subnormal or 0, of
    ``weights`` scanned; ``tensors``: the tensors holding them, worst first (most made
    0, then most made subnormal, then by name).

    The analysis, for float16 (p = 11 significant bits, smallest normal number 2**-14
    = 6.1e-5, unit roundoff u = 2**-11): a normal float16 number is off from the
    weight it rounds by at most u |w| (round to nearest even). Below 2**-14 float16
    has only the subnormal numbers k 2**-24 (k = 1..1023), a fixed 2**-24 apart, so a
    weight w with 2**-25 < |w| < 2**-14 - 2**-25 rounds to one of them, keeping
    bit_length(k) < 11 significant bits, off by at most half a step: |error| <= 2**-25,
    relative error up to 2**-25 / |w| = u (2**-14 / |w|), i.e. 2**-14/|w| times the
    normal bound (3% at |w| = 1e-6, nearly 100% just above 2**-25), reached at the
    midpoints between two subnormals. A weight with 0 < |w| <= 2**-25 = 3.0e-8 becomes
    0 (2**-25 itself is the tie between 0 and 2**-24 and rounds to the even one, 0):
    all of it is lost. From 2**-14 - 2**-25 (the tie, rounding to the even 2**-14)
    up, weights round to normal numbers.

    What it means: each of these weights moves by at most 2**-25 in absolute terms,
    which is no more than rounding can move any normal weight of magnitude 2**-14 or
    more (up to u |w| >= 2**-25). Where the tiny weights sit among weights of
    ordinary size (|w| of 1e-3 and more), their loss adds less to each dot product
    than the rounding of the others; it matters where a tensor, or the weights that
    act together, are small throughout (a scale or an embedding trained near 0), whose
    relative error then grows as 2**-14/|w|. ``perceiver-convert verify CHECKPOINT
    --dtype float16`` measures the effect on the outputs.
    """

    dtype: torch.dtype
    weights: int
    tensors: Tuple[TensorUnderflow, ...]

    @property
    def zero(self) -> int:
        """Nonzero weights that became 0."""
        return sum(entry.zero for entry in self.tensors)

    @property
    def subnormal(self) -> int:
        """Weights that became subnormal (fewer significant bits)."""
        return sum(entry.subnormal for entry in self.tensors)

    def as_dict(self, worst: int = 5) -> Dict[str, Any]:
        """The counts, in total and for the ``worst`` tensors (``--json``)."""
        return {
            "dtype": dtype_name(self.dtype),
            "smallest_normal": torch.finfo(self.dtype).smallest_normal,
            "weights": self.weights,
            "subnormal": self.subnormal,
            "zero": self.zero,
            "tensors": len(self.tensors),
            "worst": [entry._asdict() for entry in self.tensors[:worst]],
        }

    def message(self, advice: str, worst: int = 3) -> str:
        """How many weights lost precision and how many became 0, the ``worst``
        tensors, the bound on the change, then ``advice`` (how to measure the
        effect: ``verify --dtype``)."""
        name = dtype_name(self.dtype)
        smallest_normal = torch.finfo(self.dtype).smallest_normal
        # Half the spacing of the subnormal numbers, smallest_normal * eps: the most a
        # subnormal or flushed weight moves, and the largest magnitude that becomes 0.
        half_step = smallest_normal * torch.finfo(self.dtype).eps / 2
        listed = ", ".join(
            f"{entry.name} ({entry.values:,} weights: {entry.zero:,} to zero, "
            f"{entry.subnormal:,} subnormal)"
            for entry in self.tensors[:worst]
        )
        extra = len(self.tensors) - worst
        more = f" and {extra} more" if extra > 0 else ""
        return (
            f"{name} loses precision in {self.zero + self.subnormal:,} of the "
            f"{self.weights:,} weights: {self.subnormal:,} become subnormal "
            f"(magnitudes below {name}'s smallest normal number, "
            f"{_power_of_two(smallest_normal)}: fewer significant bits, relative "
            f"error up to {_power_of_two(half_step, decimal=False)}/|w|) and "
            f"{self.zero:,} nonzero ones become 0 (magnitudes up to "
            f"{_power_of_two(half_step)}), in {len(self.tensors)} tensor(s), worst "
            f"first: {listed}{more}; each moves by at "
            f"most {_power_of_two(half_step, decimal=False)}, no more than rounding "
            f"can move a weight of {_power_of_two(smallest_normal, decimal=False)} or "
            f"more; {advice}"
        )


def _power_of_two(value: float, decimal: bool = True) -> str:
    """2.0**-14 -> "2**-14 = 6.1e-05" (without ``decimal``: "2**-14")."""
    text = f"2**{round(math.log2(value))}"
    return f"{text} = {value:.1e}" if decimal else text


class DtypeScan(NamedTuple):
    """What rounding tensors to a dtype loses (:func:`scan_for_dtype`)."""

    out_of_range: List[Tuple[str, float]]
    underflow: Optional[Underflow]


def _underflow_counts(
    tensor: torch.Tensor, magnitudes: torch.Tensor, dtype: torch.dtype
) -> Tuple[int, int]:
    """``(became 0, became subnormal)`` of ``tensor``'s nonzero values rounded to
    ``dtype``. Only the values below its smallest normal number (a power of two,
    exact in every floating dtype) are cast, which few are; the cast is torch's, as
    the writer's and load_state_dict's: the counts are what the file and model get."""
    smallest_normal = torch.finfo(dtype).smallest_normal
    small = magnitudes < smallest_normal
    if not bool(small.any()):
        return 0, 0
    values = tensor[small]
    rounded = values.to(dtype)
    zero = int(((rounded == 0) & (values != 0)).sum())
    subnormal = int(((rounded != 0) & (rounded.abs() < smallest_normal)).sum())
    return zero, subnormal


def scan_for_dtype(
    tensors: Iterable[Tuple[str, Any]], dtype: torch.dtype, *, count_underflow: bool = True
) -> DtypeScan:
    """One pass over the floating tensors (torch or numpy) ``(name, tensor)`` for
    what rounding them to ``dtype`` loses: the tensors it would make infinite
    (:func:`out_of_range`) and, unless not ``count_underflow``, the nonzero weights
    it makes subnormal or 0 (:class:`Underflow`; None when there are none)."""
    found: List[Tuple[str, float]] = []
    lost: List[TensorUnderflow] = []
    scanned = 0
    target = torch.finfo(dtype)
    for name, tensor in tensors:
        tensor = torch.as_tensor(tensor)
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        source = torch.finfo(tensor.dtype)
        overflows = source.max > target.max  # no wider than dtype: nothing to overflow
        # Only float16 (5 exponent bits, normal from 2**-14) has a narrower exponent
        # range than float32; bfloat16 has float32's 8 exponent bits and its smallest
        # normal number 2**-126, so every normal float32 weight stays normal in it and
        # nothing is counted for bfloat16 (nor for float32, nor float16 into float16).
        underflows = count_underflow and source.smallest_normal < target.smallest_normal
        if not (overflows or underflows):
            continue
        tensor = tensor.detach()
        magnitudes = tensor.abs()
        if overflows:
            # Rounding is monotonic: the largest magnitude decides for the tensor.
            largest = magnitudes.max()
            if torch.isinf(largest.to(dtype)) and torch.isfinite(largest):
                found.append((name, float(largest)))
        if underflows:
            scanned += tensor.numel()
            zero, subnormal = _underflow_counts(tensor, magnitudes, dtype)
            if zero or subnormal:
                lost.append(TensorUnderflow(name, zero, subnormal, tensor.numel()))
    lost.sort(key=lambda entry: (-entry.zero, -entry.subnormal, entry.name))
    underflow = Underflow(dtype, scanned, tuple(lost)) if lost else None
    return DtypeScan(found, underflow)


def out_of_range(
    tensors: Iterable[Tuple[str, Any]], dtype: torch.dtype
) -> List[Tuple[str, float]]:
    """``(name, largest magnitude)`` of each floating tensor (torch or numpy) holding
    values that rounding to ``dtype`` would make infinite: float16 ends at 65504
    (magnitudes from 65520 round to inf), bfloat16 near float32's end. A finite
    float32 weight of 1e5 became inf in a float16 file, silently. (The part of
    :func:`scan_for_dtype` that refuses, without its count of the weights made
    subnormal, which load() does not report.)"""
    return scan_for_dtype(tensors, dtype, count_underflow=False).out_of_range


def out_of_range_message(found: List[Tuple[str, float]], dtype: torch.dtype) -> str:
    """What :func:`out_of_range` found, and the dtypes that hold it."""
    listed = ", ".join(f"{name} (up to {largest:.6g})" for name, largest in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    wider = "bfloat16 (float32's range) or float32" if dtype == torch.float16 else "float32"
    return (
        f"{len(found)} tensor(s) hold values beyond {dtype_name(dtype)}'s range "
        f"(largest magnitude {torch.finfo(dtype).max:.6g}), which would become inf: "
        f"{listed}{more}; use {wider} instead"
    )


def build(name: str, config: Any = None, *, dtype: DTypeLike = None) -> PerceiverIO:
    """Builds model ``name`` with random weights.

    config: None = the official configuration; a mapping is turned into the config
    dataclass (``configs.config_from_dict``); otherwise the dataclass instance itself.
    An invalid configuration raises ``configs.ConfigError`` (a ``ValueError``) naming
    the key; no model is built.
    dtype: "float32", "bfloat16", "float16" (or the torch dtype); None = float32,
    also under ``torch.set_default_dtype(torch.float64)``.
    Floating-point inputs are cast to the model's dtype by the model. Builds on the
    current default device (``with torch.device("meta"):`` works).
    """
    torch_dtype = resolve_dtype(dtype)
    cls = _model_class(name)
    if config is None:
        config = configs.CONFIG_CLASSES[name]()
    elif isinstance(config, Mapping):
        config = configs.config_from_dict(name, config)
    elif not isinstance(config, configs.CONFIG_CLASSES[name]):
        raise TypeError(
            f"config for {name} must be a {configs.CONFIG_CLASSES[name].__name__} or a "
            f"mapping, got {type(config).__name__}"
        )
    else:
        config.validate()  # a config edited with dataclasses.replace is checked too
    try:
        model = cls(config)
    except (ValueError, ZeroDivisionError, RuntimeError) as error:
        # validate() should have caught it; never hand out a half-built model.
        raise configs.ConfigError(
            f"cannot build {name} with this configuration: {error}"
        ) from error
    # Initialised in the default dtype (the reference's initialisers; float32 unless
    # torch.set_default_dtype says otherwise), then cast once: None and "float32"
    # give a float32 model under a float64 default too, as load() asks (a float64
    # model would hold twice the memory and take none of the fast paths).
    return model.to(torch.float32 if torch_dtype is None else torch_dtype)


# A torch.save file is a zip archive; the legacy (pre-1.6) format is a pickle that
# starts with protocol 2 and a 10-byte magic number (LONG1 of length 10).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"


def folder_refusal(path: Path) -> str:
    """Why a folder is not a converted file, and what to give instead: a folder with
    a ``config.json`` is most likely a HuggingFace transformers checkpoint, which
    ``perceiver-convert convert`` imports."""
    if (path / "config.json").is_file():
        return (
            f"{path}: a folder, not a converted file; with its config.json it looks "
            f"like a HuggingFace transformers checkpoint: {_convert_hf_first(path)}"
        )
    return (
        f"{path}: a folder, not a converted file; give the .safetensors (or .pt) file "
        "`perceiver-convert convert` wrote"
    )


def _convert_hf_first(folder: Path) -> str:
    """The advice for a HuggingFace transformers folder (or its weights): the command
    that converts it. The output is named after the folder, so that it is never the
    folder's own model.safetensors (the CLI refuses to overwrite an input), even when
    run from inside it."""
    target = f"{folder.resolve().name or 'model'}.safetensors"
    return (
        f"convert it first with `perceiver-convert convert {folder} -o {target}`, then "
        "give the .safetensors file"
    )


def transformers_weights_advice(
    path: Path, metadata: Optional[Mapping[str, str]] = None, names: Iterable[str] = ()
) -> Optional[str]:
    """What to do with a file of a HuggingFace Perceiver checkpoint's weights (an
    ``export --format hf``'s, or the hub's) given where a converted file belongs, or
    None for other files. Known by its export ``metadata``, its folder's config.json
    (model_type "perceiver") or transformers' ``perceiver.`` tensor ``names``."""
    is_hf = "perceiver_convert.model" in (metadata or {})
    if not is_hf:
        try:
            config = json.loads((path.parent / "config.json").read_text(encoding="utf-8"))
            is_hf = isinstance(config, dict) and config.get("model_type") == "perceiver"
        except (OSError, UnicodeDecodeError, ValueError):
            pass
    if not (is_hf or any(str(name).startswith("perceiver.") for name in names)):
        return None
    return (
        "a HuggingFace transformers checkpoint's weights, not a converted file; "
        + _convert_hf_first(path.parent)
    )


def _refuse_pickles(path: Path) -> bytes:
    """A plain pickle (an official Haiku checkpoint, or anything else that is not a
    converted file) is refused from its first bytes, before ``torch.load`` could
    suggest unsafe ways of reading it, and an empty file is named as such (not as
    an unknown format); so is a folder (see :func:`folder_refusal`). Returns the
    first bytes (up to 4 KiB)."""
    if path.is_dir():  # open() would say only "Is a directory" (Windows: "Permission denied")
        raise LoadError(folder_refusal(path))
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as err:
        raise LoadError(f"{path}: cannot read it ({err.strerror or err})") from None
    if not head:
        raise EmptyFileError(
            f"{path}: the file is empty (0 bytes), e.g. an interrupted download or "
            "copy; download or convert it again"
        )
    if file_kind(head) == "pickle":
        # The official files name Haiku's FlatMapping in their first opcodes.
        command = f"`perceiver-convert convert {path} -o {path.with_suffix('.safetensors').name}`"
        if b"FlatMapping" in head or b"haiku" in head:
            advice = f"this is an official Haiku checkpoint; convert it first with {command}"
        else:
            # Nothing here says what the pickle holds (it is not unpickled: it could
            # run code); convert reads it without running anything and says.
            advice = (
                "this is a pickle, not a converted perceiver_torch file; if it is an "
                f"official Haiku checkpoint, convert it first with {command}, which "
                "reads it without running anything and refuses any other pickle"
            )
        raise LoadError(f"{path}: {advice}, then give the .safetensors file")
    return head


def file_kind(head: bytes) -> str:
    """What a file's first bytes (16 are enough) say it is: ``"safetensors"`` (its
    header's length, 8 bytes little-endian whose first may be 0x80, then the JSON
    header), ``"torch"`` (torch.save's zip archive or its legacy pickle), ``"pickle"``
    (any other pickle of protocol 2 to 5: an official checkpoint, or anything) or
    ``"other"``."""
    if head[8:9] == b"{":
        return "safetensors"
    if head.startswith(_ZIP_MAGIC) or head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "other"


def _looks_like_onnx(head: bytes) -> bool:
    # Mirrors converter.haiku_reader.looks_like_onnx (perceiver_torch cannot import the
    # converter): no magic number, so a ModelProto's ir_version (tag 0x08, a one-byte
    # varint) followed by the tag of field 2, 3, 4, 5, 6, 7 or 8.
    return (
        len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F
        and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42)
    )


# Storage dtypes a converted file may hold for the model's floating tensors.
FLOAT_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def state_dict_problems(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> Dict[str, list]:
    """What keeps ``state`` from loading into a model whose state dict is
    ``expected``: ``{"missing", "unexpected", "shape", "dtype"}`` lists of text.

    Floating tensors may be stored as float32, float16 or bfloat16 (``convert
    --dtype``); integer buffers must keep their dtype.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape, dtype = [], []
    for k in sorted(set(expected) & set(state)):
        want, got = expected[k], state[k]
        if tuple(want.shape) != tuple(got.shape):
            shape.append(f"{k}: expected {tuple(want.shape)}, got {tuple(got.shape)}")
        elif want.is_floating_point():
            if got.dtype not in FLOAT_STORAGE_DTYPES:
                dtype.append(
                    f"{k}: expected float32 (or float16/bfloat16), got "
                    f"{str(got.dtype).replace('torch.', '')}"
                )
        elif got.dtype != want.dtype:
            dtype.append(
                f"{k}: expected {str(want.dtype).replace('torch.', '')}, got "
                f"{str(got.dtype).replace('torch.', '')}"
            )
    return {"missing": missing, "unexpected": unexpected, "shape": shape, "dtype": dtype}


def format_state_problems(prefix: str, problems: Mapping[str, list]) -> Optional[str]:
    """The message of :func:`state_dict_problems` (None when there are none)."""
    if not any(problems.values()):
        return None
    lines = [prefix]
    if problems["missing"]:
        lines.append(
            f"  missing keys ({len(problems['missing'])}): "
            f"{', '.join(problems['missing'][:10])}"
        )
    if problems["unexpected"]:
        lines.append(
            f"  unexpected keys ({len(problems['unexpected'])}): "
            f"{', '.join(problems['unexpected'][:10])}"
        )
    if problems["shape"]:
        lines.append(f"  shape mismatches: {'; '.join(problems['shape'][:10])}")
    if problems["dtype"]:
        lines.append(
            f"  dtype mismatches: {'; '.join(problems['dtype'][:10])}; cast those "
            "tensors back (floating: tensor.float(); integer buffers: "
            "tensor.long()) and save the file again, or convert the official "
            "checkpoint again"
        )
    return "\n".join(lines)


def refused_global(error: BaseException) -> Optional[str]:
    """The global ``torch.load(weights_only=True)`` refused, from its error (None when
    it refused something else)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    return found.group(1) if found else None


def weights_only_refusal(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` (torch's safe loader) refused a file,
    from its error, as words that follow "the file": the global it asked for, a
    pickle protocol its unpickler does not read, or objects that are not tensors.
    torch's own text is not passed on: it advises retrying with the unsafe loader,
    which runs the file."""
    name = refused_global(error)
    if name:
        return f"asks for the global {name!r}, which torch's safe loader does not allow"
    opcode = re.search(r"Unsupported operand (\d+)", str(error))
    if opcode:
        return (
            f"was pickled with a protocol torch's safe loader does not read (opcode "
            f"{opcode.group(1)}: torch.save(..., pickle_protocol=4 or 5)); save it again "
            "with torch.save's default protocol, or as safetensors"
        )
    return (
        "holds objects other than tensors and plain containers, which torch's safe "
        "loader does not load"
    )


def read_checkpoint(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The tensors and the metadata of a converted file: ``(state_dict, metadata)``.

    ``.safetensors``: the metadata must hold "model" (the name) and "config" (JSON of
    ``configs.config_to_dict``); other files: ``torch.load(weights_only=True)`` of
    ``{"model": name, "config": {...}, "state_dict": {...}, "metadata": {...}}``.
    The returned metadata always has "model" and "config" (as JSON text).
    """
    path = Path(path)
    head = _refuse_pickles(path)
    # By content, not by name: a converted file renamed keeps loading, and anything
    # else is named here instead of by torch.load (whose message suggests unsafe ways).
    kind = file_kind(head)
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            with safetensors_name(path) as name, safe_open(name, framework="pt") as f:
                metadata = dict(f.metadata() or {})
                state = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types
            raise LoadError(
                f"{path}: not a readable safetensors file ({err}); a truncated or "
                "corrupt copy: convert or download it again"
            ) from None
        missing = [k for k in ("model", "config") if k not in metadata]
        advice = transformers_weights_advice(path, metadata, state) if missing else None
        if advice is not None:
            raise LoadError(f"{path}: {advice}")
        if missing:
            raise LoadError(
                f"{path}: safetensors metadata lacks {', '.join(missing)}; a converted "
                "file stores the model name under 'model' and the JSON config "
                "(configs.config_to_dict) under 'config'"
            )
        _parse(path, metadata)  # a bad config is the file's problem, named here
        return state, metadata
    if kind == "other" and _looks_like_onnx(head):
        raise LoadError(
            f"{path}: the file is an ONNX model (`perceiver-convert export` writes them "
            "for onnxruntime), not read back here; perceiver_torch.load takes the "
            ".safetensors (or .pt) file `perceiver-convert convert` wrote"
        )
    if kind != "torch":
        raise LoadError(
            f"{path}: neither a safetensors file nor a torch.save file; a converted "
            "model is the .safetensors (or .pt) file `perceiver-convert convert` wrote"
        )
    try:
        payload = torch_load_weights(path)
    except pickle.UnpicklingError as error:
        raise LoadError(
            f"{path}: the torch.save file {weights_only_refusal(error)} (nothing in it "
            "was run); a converted model holds only its name, config, tensors and "
            "metadata"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise LoadError(
            f"{path}: not a readable torch.save file ({str(err).split('. ')[0]}); a "
            "truncated or corrupt copy: convert it again"
        ) from None
    if not isinstance(payload, Mapping) or not {"model", "config", "state_dict"} <= set(
        payload
    ):
        raise LoadError(
            f"{path}: expected a dict with 'model', 'config' and 'state_dict' (got "
            f"{type(payload).__name__}"
            + (f" with keys {sorted(payload)}" if isinstance(payload, Mapping) else "")
            + "); a bare state dict needs build(name, config).load_state_dict()"
        )
    state = payload["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise LoadError(
            f"{path}: 'state_dict' is not a dict of tensors by name (got "
            f"{type(state).__name__}); a converted model maps parameter names to tensors"
        )
    raw_metadata = payload.get("metadata") or {}
    if not isinstance(raw_metadata, Mapping):
        raise LoadError(
            f"{path}: 'metadata' is a {type(raw_metadata).__name__}, not a dict of text"
        )
    metadata = {str(k): str(v) for k, v in raw_metadata.items()}
    metadata["model"] = str(payload["model"])
    try:
        metadata["config"] = json.dumps(dict(payload["config"]))
    except (TypeError, ValueError, RecursionError):
        raise LoadError(
            f"{path}: 'config' is not a dict of plain config values (JSON-able)"
        ) from None
    _parse(path, metadata)
    return dict(state), metadata


def _parse(path: Path, metadata: Mapping[str, str]) -> Tuple[str, Dict[str, Any]]:
    """The model name and the config dict of a file's metadata: a JSON object, or
    ``LoadError`` (also for JSON nested deeper than the parser's recursion limit,
    which would otherwise escape as a RecursionError)."""
    try:
        config = json.loads(metadata["config"])
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise LoadError(f"{path}: metadata 'config' is not JSON: {reason}") from None
    if not isinstance(config, dict):
        raise LoadError(
            f"{path}: metadata 'config' is JSON {type(config).__name__}, not an object "
            "of config fields"
        )
    return metadata["model"], config


def available_devices() -> Tuple[str, ...]:
    """The devices a model can be placed on here: ``("cpu", "cuda:0", ...)``, with
    every CUDA, XPU or MPS device torch sees (meta, which holds no data, is not
    listed)."""
    names = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None)
        if backend is None or not backend.is_available():
            continue
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        names += [f"{kind}:{index}" for index in range(count)]
    return tuple(names)


def check_device(device: torch.device, given: Any = None) -> None:
    """Raises ``ValueError`` when ``device`` is an accelerator this machine lacks
    (``"cuda"`` on a CPU-only machine, ``"cuda:3"`` with two GPUs), naming the devices
    there are; torch would fail only once tensors are moved, with an AssertionError
    ("Torch not compiled with CUDA enabled") or a RuntimeError. ``given``: the value
    the caller passed, for the message."""
    backend = getattr(torch, device.type, None)
    if device.type in ("cpu", "meta") or not hasattr(backend, "is_available"):
        return  # another device type: torch's own checks stand
    available = available_devices()
    kind = device.type.upper()
    if not backend.is_available():
        problem = f"no {kind} device is available (torch.{device.type}.is_available() is False)"
    elif device.index is not None and f"{device.type}:{device.index}" not in available:
        problem = f"there is no {kind} device {device.index}"
    else:
        return
    raise ValueError(
        f"map_location {given if given is not None else str(device)!r}: {problem}; "
        f"available devices: {', '.join(available)}"
    )


def load(
    path: Union[str, Path],
    *,
    map_location: Union[str, torch.device, None] = None,
    dtype: DTypeLike = None,
    pack_weights: Optional[bool] = None,
) -> PerceiverIO:
    """Rebuilds a model from a converted file and loads its weights (strict).

    ``.safetensors``: metadata "model" (name) and "config" (JSON of
    ``configs.config_to_dict``); other files: ``torch.load(weights_only=True)`` of
    ``{"model": name, "config": {...}, "state_dict": {...}}``. Raises ``LoadError`` for
    a plain pickle (an official Haiku checkpoint: convert it first), missing
    metadata, an unknown model or missing/unexpected/misshapen keys or wrong dtypes,
    weights beyond the range of ``dtype`` (a float32 file with magnitudes over 65504
    loaded as float16), and for a folder (a HuggingFace folder: convert it first).
    Loading float32 or bfloat16 weights as float16 makes the nonzero ones below
    2**-14 subnormal or 0 (:class:`Underflow`) without a word: on a trained
    checkpoint some always are (about 0.2% of weights of spread 0.02), each moved by
    no more than rounding moves a weight of 2**-14, so a warning would fire on every
    such load and say nothing to act on; ``convert --dtype float16`` reports them
    with the file it writes.

    map_location: device of the model (default "cpu"); a value torch.device()
    refuses, or an accelerator this machine lacks (``"cuda"`` without a GPU), raises
    ``ValueError`` before the file is read.
    dtype: the model's floating-point dtype; None = the dtype the file was converted
    to (metadata "dtype", as ``convert --dtype`` records it; float32 when absent).
    Integer buffers (BatchNorm's counter) keep their dtype.
    pack_weights: whether the linear layers keep a copy of their weights in oneDNN's
    layout for CPU inference (``perceiver_torch.linear.Linear``), made here: None =
    in bfloat16 on CPUs with bfloat16 instructions (4-12% faster, as much memory again
    as the weights), True = in float32 as well (in MKL's layout on Intel CPUs with
    AVX-512, made by the first call), False = never.
    """
    # Only None means the default: a falsy device such as 0 (cuda:0) or "" must not
    # silently become the CPU; an unknown device is a ValueError before any reading.
    try:
        device = torch.device("cpu" if map_location is None else map_location)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"invalid map_location {map_location!r}: {err}") from None
    check_device(device, map_location)
    if pack_weights is not None and not isinstance(pack_weights, bool):
        # "no" or "false" would otherwise be truthy and pack.
        raise TypeError(
            f"pack_weights must be True, False or None, got {pack_weights!r}"
        )
    path = Path(path)
    state, metadata = read_checkpoint(path)
    name, config_dict = _parse(path, metadata)
    if dtype is None:
        try:
            dtype = resolve_dtype(metadata.get("dtype") or "float32")
        except ValueError as err:
            raise LoadError(f"{path}: metadata 'dtype': {err}") from None
    torch_dtype = resolve_dtype(dtype)
    if name not in MODEL_CLASSES:
        raise LoadError(
            f"{path}: unknown model {name!r}; known models: {', '.join(MODEL_CLASSES)}"
        )
    try:
        config = configs.config_from_dict(name, config_dict)
    except (TypeError, ValueError) as err:
        raise LoadError(f"{path}: bad config for {name}: {err}") from None
    with torch.device("meta"):  # no memory yet; to_empty allocates it in the dtype
        model = build(name, config, dtype=torch_dtype)
    message = format_state_problems(
        f"{path}: the weights do not match {name} with this config:",
        state_dict_problems(model.state_dict(), state),
    )
    if message is not None:
        raise LoadError(message)
    found = out_of_range(state.items(), torch_dtype)
    if found:
        raise OutOfRangeError(f"{path}: {out_of_range_message(found, torch_dtype)}")
    # Floating-point tensors in the model's dtype; load_state_dict copies (and casts)
    # the file's tensors into them, so a bfloat16 file can also load as float32.
    model = model.to_empty(device=device)
    if device.type != "meta":
        # On the meta device there is nothing to copy into (the keys and shapes were
        # checked above); torch would warn that every copy is a no-op.
        model.load_state_dict(state, strict=True)
    linear.choose_packing(model, pack_weights)
    return linear.prepack(model.eval())
