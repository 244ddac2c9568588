"""What the task pipelines share: their errors, the task registry entries, the options
the ``run`` command hands a task, progress reporting and small model helpers.

Nothing here imports a media library (Pillow, PyAV, OpenCV), click or the converter:
``perceiver_torch`` stands alone, and the command line supplies its writers and its
progress bars through :class:`RunOptions`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import math
import numbers
import os
import secrets
import shlex
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    BinaryIO,
    Callable,
    ContextManager,
    Dict,
    Generic,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import numpy as np
import torch

__all__ = [
    "InputError",
    "PipelineError",
    "Progress",
    "RunOptions",
    "TaskOption",
    "TaskSpec",
    "WrongModelError",
    "check_model",
    "check_output_paths",
    "check_weights",
    "eval_mode",
    "import_attribute",
    "mkdir_command",
    "model_name_of",
    "no_progress",
    "output_path_problem",
    "positive_int",
    "require",
    "results_document",
    "softmax_top_k",
    "usage_error",
]

T = TypeVar("T")

# progress(items, total, label) -> the same items, reporting as they are consumed.
Progress = Callable[[Iterable[T], int, str], Iterable[T]]


def no_progress(items: Iterable[T], total: int, label: str) -> Iterable[T]:
    """The default :data:`Progress`: the items unchanged, nothing shown."""
    return items


class PipelineError(ValueError):
    """Base class of the errors a pipeline raises on purpose (message: what is wrong
    and how to fix it). The ``run`` command prints it on one line."""

    #: The ``perceiver-convert`` exit code: 2 usage/config error, 3 bad input.
    exit_code = 3


class InputError(PipelineError):
    """An input the task cannot use: unreadable file, wrong shape, too small or too long."""

    exit_code = 3


class WrongModelError(PipelineError):
    """The model is not one the task runs (e.g. a flow model given to classify)."""

    exit_code = 2


def usage_error(message: str) -> PipelineError:
    """A :class:`PipelineError` with exit code 2: the call or its options are wrong
    (not the input), e.g. ``batch_size=0``."""
    error = PipelineError(message)
    error.exit_code = 2
    return error


def no_such_file(path: Any, message: Optional[str] = None) -> InputError:
    """The :class:`InputError` of an INPUT that does not exist (``message``, default
    ``"PATH: no such file"``); a name holding a shell pattern (``*``, ``?``, ``[``)
    is most likely one that matched no file, which shells pass on as it is: said so."""
    message = message or f"{path}: no such file"
    if any(char in str(path) for char in "*?["):
        message += (" (a shell pattern that matched no file is passed on as it is: "
                    "check the folder and the pattern)")
    return InputError(message)


def require_existing_files(inputs: Sequence[Any]) -> None:
    """Raises :func:`no_such_file`'s error (exit 3) for the first of ``inputs`` that
    does not exist. For the planners of the tasks whose INPUTs are all files (flow,
    autoencode): a typo among many videos is named before the model is loaded and
    before the earlier videos' work, and a missing input's folder is not mistaken
    for the output folder (the default outputs go beside the input)."""
    for path in inputs:
        if not os.path.exists(path):
            raise no_such_file(path)


def readable_twice(path: Any) -> bool:
    """Whether the INPUT ``path`` gives its bytes again to a second reader: a regular
    file does; a pipe (``<(cat frame.png)``, a FIFO) or a device gives them once. The
    runners that read their inputs twice (checked first, then read again batch by
    batch) keep the first read of the others.

    A name for an open descriptor (``/dev/stdin``, ``/dev/fd/N``, ``/proc/self/fd/N``)
    counts as read once even where it leads to a regular file (``< photo.png``): on
    macOS and the BSDs opening it again shares the descriptor's offset, and the
    second read would start where the first ended."""
    try:
        if os.path.abspath(os.fspath(path)).startswith(("/dev/", "/proc/")):
            return False
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, TypeError, ValueError):
        return False


def file_state(path: Any) -> Optional[Tuple[int, int]]:
    """What tells that the file at ``path`` was rewritten or replaced: its size and
    modification time (ns); None where it cannot be asked. The runners that read an
    INPUT twice take it before each read (:func:`rewritten_since`), so that a file
    rewritten with the same size and shape between the reads is refused, not
    answered with the first read's notes.

    Not the inode nor the device: some file systems renumber a file that has not
    changed (FAT and exFAT as their cache forgets it, sshfs without ``use_ino``, CIFS
    with ``noserverino``), and a long run would be refused for nothing. A file
    replaced by one of the same size that keeps its modification time (``cp -p``),
    or rewritten within one tick of a coarse clock (FAT's 2 s), goes unseen."""
    try:
        info = os.stat(path)
    except (OSError, TypeError, ValueError):
        return None
    return (info.st_size, info.st_mtime_ns)


def rewritten_since(path: Any, state: Optional[Tuple[int, int]]) -> bool:
    """Whether the file at ``path``, whose :func:`file_state` was ``state``, has been
    written to or replaced since. False where it is gone or cannot be asked now: its
    second read then says what is wrong ("no such file"), which "written to" is not."""
    now = file_state(path)
    return now is not None and now != state


def modified_input_error(path: Any) -> InputError:
    """The :class:`InputError` of an INPUT :func:`rewritten_since` every input was
    checked."""
    return InputError(
        f"{path} changed during the run: it was written to or replaced after the "
        "inputs were checked (its size or modification time is not what it was); run "
        "again once nothing writes to it"
    )


def changed_input_error(path: Any, before: Sequence[int], after: Sequence[int]) -> InputError:
    """The :class:`InputError` of an INPUT read again for its batch that no longer has
    the shape it had when every input was checked (a file rewritten meanwhile)."""
    return InputError(
        f"{path} changed during the run: read again for the model, its pixels are "
        f"{tuple(after)}, not {tuple(before)} as when the inputs were checked; run again "
        "once nothing writes to it"
    )


class TwoReads(Generic[T]):
    """The inputs of a runner that reads them twice: each read and checked first (a
    bad one among thousands is named before the model runs), keeping only its shape,
    then read again for its model call, so that memory holds a batch, not every
    input (classify's images, flow's frames).

    :meth:`first` keeps the value itself where reading again would not give it
    (a pipe: :func:`readable_twice`) or would gain nothing (every input held
    anyway); :meth:`again` refuses a file written to or replaced between the reads
    (:func:`rewritten_since`), or whose value has another shape.
    """

    def __init__(self) -> None:
        self.shapes: List[Tuple[int, ...]] = []  # each input's, in order
        self._kept: Dict[int, T] = {}  # the values read only once
        self._states: Dict[int, Tuple[Any, Any]] = {}  # files read twice: (path, state)

    def first(self, read: Callable[[], T], path: Any = None, *, keep: bool) -> None:
        """The next input's first read, ``read()`` (a value with a ``shape``); ``path``:
        its file (None: not a file); ``keep``: hold this value for :meth:`again`
        rather than reading it again. The state is taken before the read."""
        index = len(self.shapes)
        if path is not None and not keep:
            self._states[index] = (path, file_state(path))
        value = read()
        self.shapes.append(tuple(value.shape))
        if keep:
            self._kept[index] = value

    def again(self, index: int, read: Callable[[], T], name: Any) -> T:
        """Input ``index`` for its model call: its kept value, or ``read()`` once more.

        Raises:
            InputError: its file was written to or replaced since the first read, or
                the value has another shape (``name``: the input, as the message
                names it).
        """
        if index in self._kept:
            return self._kept.pop(index)
        if index in self._states and rewritten_since(*self._states[index]):
            raise modified_input_error(name)
        value = read()
        if tuple(value.shape) != self.shapes[index]:
            raise changed_input_error(name, self.shapes[index], value.shape)
        return value


def refuse_array_suffix_without_flag(out: Path, arrays: Optional[str]) -> None:
    """-o ending in .npy or .npz without --npy/--npz (``arrays`` None) is refused
    (exit 2) by the tasks that take -o as the stem of other files: flow wrote x.flo
    and x.png for ``-o x.npy``, autoencode x.mp4 and x.wav, neither the arrays asked
    for."""
    suffix = out.suffix.lower()
    if suffix in (".npy", ".npz") and arrays is None:
        raise usage_error(f"-o {out}: add --{suffix[1:]} for the raw arrays")


def host_tensor(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor`` detached on the CPU, for NumPy (inputs on a GPU work as on the
    CPU); :class:`InputError` for a meta tensor, which holds no values (``.cpu()``
    failed with "Cannot copy out of meta tensor", ``np.asarray`` with "can't convert
    meta device type tensor to numpy")."""
    if tensor.device.type == "meta":
        raise InputError(
            f"the {what} are a meta tensor, which holds no values; give a tensor with values"
        )
    return tensor.detach().cpu()


def flag(value: Any, name: str) -> bool:
    """``value`` as a bool, or :class:`PipelineError` (exit 2) unless it is True or
    False (NumPy's too): ``resize="no"`` or ``pad="false"``, truthy strings, were taken
    as True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise usage_error(f"{name} must be True or False, got {value!r}")


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int, or :class:`PipelineError` (exit 2) unless it is an integer
    of at least 1: ``batch_size``, ``top_k`` and the like, where 0 or a negative
    number would otherwise fail deep inside (``range()`` step, ``topk``) or quietly
    do something else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise usage_error(f"{name} must be an integer of at least 1, got {value!r}")
    return int(value)


def require(module: str, extra: str = "media") -> Any:
    """Imports an optional library, or raises :class:`PipelineError` (exit 2): where it
    is missing, saying which extra installs it (``pip install
    'perceiver-convert[media]'``); where it is installed but fails to load (a memory
    limit, a broken install), saying so and how to mend it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = {"cv2": "opencv-python-headless", "PIL": "Pillow", "av": "av"}.get(
            module.split(".")[0], module
        )
        missing = isinstance(error, ModuleNotFoundError) and (
            error.name is None or module == error.name or module.startswith(error.name + ".")
        )
        if missing:
            message = (
                f"this task needs {package} ({error}); install it with "
                f"pip install 'perceiver-convert[{extra}]'"
            )
        else:
            # Installed, but loading it failed: a shared library that could not be
            # mapped (a memory limit, ulimit -v) or a broken install. "Install it"
            # was no help for a package that is there.
            message = (
                f"{package} is installed but could not be loaded ({error}); with a "
                "memory limit (ulimit -v) give it more memory, otherwise reinstall it "
                f"(pip install --force-reinstall 'perceiver-convert[{extra}]')"
            )
        failure = PipelineError(message)
        failure.exit_code = 2
        raise failure from None


def import_attribute(reference: str) -> Any:
    """``"module:attribute"`` (module relative to ``perceiver_torch.pipelines`` when it
    starts with a dot) -> the attribute, imported on first use."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module, "perceiver_torch.pipelines"), attribute)


def model_name_of(model: torch.nn.Module) -> str:
    """The registry name of a perceiver_torch model (``""`` for anything else)."""
    return str(getattr(model, "model_name", "") or "")


def with_article(word: str) -> str:
    """``"an optical_flow"``, ``"a language_perceiver"``: for messages naming models."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def check_model(model: torch.nn.Module, task: str, models: Sequence[str]) -> str:
    """Raises :class:`WrongModelError` unless ``model`` is one of ``models``; returns
    its name."""
    name = model_name_of(model)
    if name not in models:
        shown = name or type(model).__name__
        raise WrongModelError(
            f"{task} needs {with_article(' or '.join(models))} model, got {shown}; give a "
            f"checkpoint of one of those (perceiver-convert models lists them)"
        )
    return name


def check_weights(model: torch.nn.Module, task: str) -> None:
    """Raises :class:`PipelineError` (exit 2) for a model without values: one on the
    meta device (``load(..., map_location="meta")``, ``with torch.device("meta")``)
    would run the whole forward pass on shapes and fail only when the answer is
    copied out."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    if any(tensor.is_meta for tensor in tensors):
        raise usage_error(
            f"{task} needs a model with weights, but this one is on the meta device "
            "(shapes only); load it on cpu or cuda (perceiver_torch.load(path), or "
            "map_location='cuda')"
        )


# Open eval_mode blocks per model (id -> [count, the modes before the first]): the
# training flags are the model's, shared by every thread that runs it.
_eval_blocks: Dict[int, List[Any]] = {}
_eval_blocks_lock = threading.Lock()


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """A block in which ``model`` runs in eval mode (no dropout; BatchNorm uses and
    keeps its running statistics), as the colabs run it, whatever mode the caller left
    it in; each module's own mode is restored afterwards. The pipelines run every
    forward pass in one, so a model switched back to ``train()`` after a pipeline was
    built (a training loop that calls a pipeline to evaluate) is neither computed in
    training mode (other answers, and a batch's items depending on each other) nor
    changed (its BatchNorm statistics updated).

    Blocks of several threads on one model (pipelines serving requests) share it:
    the modes are restored when the last one leaves, not when the first does (which
    ran the others' forward passes in training mode and left the model in eval
    mode)."""
    key = id(model)
    with _eval_blocks_lock:
        entry = _eval_blocks.get(key)
        if entry is None:
            modes = [(module, module.training) for module in model.modules()]
            model.eval()  # first: where it raises, no block is left registered
            entry = _eval_blocks[key] = [0, modes]
        entry[0] += 1
    try:
        yield
    finally:
        with _eval_blocks_lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _eval_blocks[key]
                for module, training in entry[1]:
                    module.training = training


def results_document(task: str, model: torch.nn.Module, results: List[Any]) -> Dict[str, Any]:
    """A run's document: ``{"task", "model", "dtype" (what the model computes in),
    "results"}``. ``perceiver-convert run --json`` prints it and classify's and
    fill-mask's ``-o OUT`` write it, so that a file says what made it (a bfloat16
    run's file records bfloat16). A NaN or infinite number in ``results`` (the
    outputs of a model that overflowed, which the result's notes name) is null:
    JSON has no such numbers, and json.dumps's NaN/Infinity made a document that
    JSON parsers refuse."""
    from ..registry import dtype_name

    return {
        "task": task,
        "model": model_name_of(model) or type(model).__name__,
        "dtype": dtype_name(next(model.parameters()).dtype),
        "results": _finite_or_null(results),
    }


def _finite_or_null(value: Any) -> Any:
    """``value`` (JSON-able: dicts, lists, tuples, scalars) with every NaN or
    infinite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def non_finite_output_note(
    outputs: Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray]]],
    model: torch.nn.Module,
    consequence: str = "the ranking and probabilities are not meaningful",
) -> Optional[str]:
    """A note for outputs of ``model`` (a tensor or array, or a list of them) holding
    NaN or inf, else None; ``consequence`` says what it spoils (classify's default:
    the ranking).

    A float16 model overflows past 65504 (large logits of a trained checkpoint, or
    activations on the way): its inf logits gave NaN probabilities and an arbitrary
    ranking, with no note, where the float32 model was confident (flow and
    autoencode alike: NaN vectors, frames and labels)."""
    return non_finite_note(non_finite_count(outputs), model, consequence)


def non_finite_count(
    outputs: Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray]]],
) -> int:
    """How many values of ``outputs`` (a tensor or array, or a list of them) are NaN
    or inf."""
    parts = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return sum(int((~torch.isfinite(torch.as_tensor(part))).sum()) for part in parts)


def non_finite_note(
    count: int,
    model: torch.nn.Module,
    consequence: str = "the ranking and probabilities are not meaningful",
) -> Optional[str]:
    """:func:`non_finite_output_note` for outputs of which ``count`` values are NaN
    or inf (counted part by part where the outputs are not held together)."""
    if not count:
        return None
    dtype = next(itertools.chain(model.parameters(), model.buffers())).dtype
    why = (
        "float16 overflowed (its range ends at 65504); run in bfloat16 or float32"
        if dtype == torch.float16
        else f"computed in {str(dtype).replace('torch.', '')}"
    )
    return (
        f"the model's output holds {count} non-finite value(s) (NaN or "
        f"inf): {consequence} ({why})"
    )


def softmax_top_k(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits (..., C) -> (probabilities (..., k), indices (..., k)), most probable first.

    The softmax is taken in float64 so that the reported probabilities of a float32
    or bfloat16 model do not depend on the summation order of a float32 softmax.
    A ``k`` above the class count gives every class; ``k < 1`` raises
    :class:`PipelineError` (exit 2).
    """
    k = positive_int(k, "top_k")
    probabilities = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    k = min(k, probabilities.shape[-1])
    values, indices = probabilities.topk(k, dim=-1)
    return values, indices


@dataclass(frozen=True)
class TaskOption:
    """One task-specific option of ``perceiver-convert run``.

    ``flag`` names the option as typed (``"--span"``); ``dest`` is the key of its value
    in :attr:`RunOptions.extra`. ``kind``: ``"flag"`` (bool), ``"str"``, ``"int"``,
    ``"float"``, ``"path"`` (an existing file), or ``"choice"`` (one of ``choices``).
    ``multiple`` options give a tuple of values. ``metavar``/``default`` as in click.
    """

    flag: str
    dest: str
    kind: str
    help: str
    default: Any = None
    multiple: bool = False
    choices: Tuple[str, ...] = ()
    metavar: Optional[str] = None


@dataclass(frozen=True)
class TaskSpec:
    """One task of ``perceiver-convert run`` (see the contract in
    :mod:`perceiver_torch.pipelines`).

    Attributes:
        name: the TASK argument (``"fill-mask"``).
        models: registry names of the models the task runs.
        pipeline: ``"module:Class"`` of the pipeline, built as ``Class(model)``.
        runner: ``"module:function"``; ``function(pipeline, inputs, options) ->
            list of per-input JSON-able dicts`` (see :class:`RunOptions`).
        demo: ``"module:function"`` or None; ``function(model, folder, options) ->
            dict`` runs the task once on media it makes itself in ``folder``.
        summary: one line for ``run --help``.
        input_help: what INPUT means for this task (one short phrase).
        options: the task's own command-line options.
        requires: the optional libraries every run of the task imports (``"PIL"``,
            ``"cv2"``, ``"av"``), checked before the model is loaded.
        outputs: ``"module:function"`` or None; ``function(inputs, options) -> list
            of Path``: every file the runner would write for these inputs and options,
            worked out without reading an input, so that the CLI can refuse existing
            files and inputs before any work (see :meth:`planned_outputs`). None: the
            task writes ``options.output`` only.
    """

    name: str
    models: Tuple[str, ...]
    pipeline: str
    runner: str
    demo: Optional[str]
    summary: str
    input_help: str
    options: Tuple[TaskOption, ...] = ()
    requires: Tuple[str, ...] = ()
    outputs: Optional[str] = None

    def planned_outputs(self, inputs: Sequence[str], options: "RunOptions") -> List[Path]:
        """Every file a run on ``inputs`` with ``options`` would write, in the order
        the runner writes them; ``[]`` when it writes none. Raises
        :class:`PipelineError` for inputs the runner would refuse anyway (wrong count,
        a mix of kinds)."""
        if self.outputs is not None:
            return [Path(path) for path in import_attribute(self.outputs)(list(inputs), options)]
        return [] if options.output is None else [Path(options.output)]

    def check_requirements(self) -> None:
        """Raises :class:`PipelineError` (exit 2) naming the extra to install when a
        library in ``requires`` is missing (found without importing it)."""
        for module in self.requires:
            blocked = module in sys.modules and sys.modules[module] is None
            if blocked or importlib.util.find_spec(module) is None:
                require(module)  # raises, with the install hint

    def available(self) -> bool:
        """Whether the task's module is installed in this version."""
        module = self.runner.partition(":")[0]
        return importlib.util.find_spec(module, "perceiver_torch.pipelines") is not None


def output_path_problem(path: Any) -> Optional[str]:
    """Why the file ``path`` cannot be written, saying how to fix it: its folder does
    not exist, a file stands where it or a folder above it should be, ``path`` is
    itself a folder, or its folder gives no write permission; None where none of
    these is so. The CLI's refusal of such an output
    (``converter.atomic.check_output_path``, exit 2) says this too."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        return (
            f"cannot write {path}: it is a folder; give the name of a file, in it "
            f"({path}{os.sep}NAME) or elsewhere"
        )
    if parent.is_dir():
        if not os.access(parent, os.W_OK | os.X_OK):
            return (
                f"cannot write {path}: no write permission in {parent}; choose a "
                "writable folder"
            )
        return None
    blocking = _file_in_the_way(parent)
    if blocking is not None:
        return (
            f"cannot write {path}: {blocking} is a file, not a folder; choose another "
            "output path"
        )
    home = Path(os.path.expanduser(path))
    if home != path:
        # A "~" that reaches here was not expanded (quoted in a shell, or given from
        # Python), and "mkdir -p ~" would be: it creates nothing.
        return (
            f"cannot write {path}: the folder {parent} does not exist (~ is not "
            f"expanded here); give the full path ({home}) or choose another output path"
        )
    return (
        f"cannot write {path}: the folder {parent} does not exist; create it first "
        f"({mkdir_command(parent)}) or choose another output path"
    )


def mkdir_command(folder: Any) -> str:
    """``mkdir -p FOLDER`` as a shell reads it: a name with spaces or quotes quoted
    (unquoted, ``mkdir -p my dir`` makes two folders, neither the one named)."""
    return f"mkdir -p {shlex.quote(os.fspath(folder))}"


def _file_in_the_way(folder: Path) -> Optional[Path]:
    """The nearest existing ancestor of the missing ``folder`` (itself included) where
    that is not a folder (a file where a folder is needed); None where it is one."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_output_paths(paths: Iterable[Any], inputs: Iterable[Any] = ()) -> None:
    """Raises :func:`output_path_problem`'s message as a :class:`PipelineError`
    (exit 2) for the first of ``paths`` whose folder is missing or gives no write
    permission, or that is a folder, or that is one of ``inputs`` (the same file by
    any path: a link, another spelling; the CLI's words). The runners call it on
    every file they would write before any work, as the CLI checks them before
    loading the model: called from a script with :class:`RunOptions`' defaults, a
    runner failed only at its first write, naming the temporary file
    (:func:`atomic_path`; an output that is a folder: when the run ended), or the
    temporary rows' advice to free disk space (:class:`~.spool.DiskSpool`).

    Flow and autoencode write each input's files before
    the next input is read: an output named as a later input (autoencode's default
    ``v.autoencoded.mp4`` for ``v.mp4``, both given) replaced that input, which was
    lost; autoencode then read its own output in its place, flow failed after the
    work, saying something else had written to it."""
    inputs = [Path(given) for given in inputs if given is not None]
    for path in paths:
        problem = output_path_problem(path) or _input_problem(Path(path), inputs)
        if problem is not None:
            raise usage_error(problem)


def _input_problem(path: Path, inputs: Sequence[Path]) -> Optional[str]:
    """The refusal of an output ``path`` that is one of ``inputs``, in the words of the
    CLI's (``converter.atomic.check_outputs``); None where it is none of them."""
    for given in inputs:
        try:
            same = os.path.samefile(path, given)
        except OSError:  # one of them missing (or unreadable): compare the names
            same = path.resolve() == given.resolve()
        if same:
            return (
                f"refusing to write {path}: it is the input {given}; choose another "
                "output name"
            )
    return None


@contextlib.contextmanager
def atomic_path(path: Any) -> Iterator[Path]:
    """A temporary name next to ``path`` (same suffix) that is renamed to ``path`` when
    the block succeeds and removed when it fails: a plain-library stand-in for the
    CLI's staging, so a failed save never leaves a half-written file."""
    path = Path(path)
    temp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """:attr:`RunOptions.open_output`'s default: the file, written under a temporary
    name and renamed when the block succeeds (:func:`atomic_path`)."""
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        yield handle


@dataclass
class RunOptions:
    """What ``perceiver-convert run`` hands a task's runner (defaults suit a script).

    Attributes:
        output: ``-o OUT`` or None. The runner decides what it means for its task
            (classify/fill-mask: the document or the arrays; flow: a file or folder).
        top_k: ``--top-k`` (entries per prediction).
        arrays: None, ``"npy"`` or ``"npz"`` (``--npy``/``--npz``): write the raw
            arrays to ``output``.
        quiet: ``--quiet``: nothing on stderr but errors.
        progress: a :data:`Progress`; silent unless stderr is a terminal.
        echo: prints one line of human output (stderr in the CLI).
        open_output: ``with open_output(path) as f: f.write(...)``; the file appears
            only when the block succeeds (the default writes a temporary file beside
            it and renames it, :func:`atomic_path`; the CLI's stages every output of
            the run and refuses to overwrite an input). Whatever writes them, the
            runners refuse an output whose folder is missing or gives no write
            permission, or that is a folder (flow and autoencode: or an input),
            before any work (:func:`check_output_paths`).
        output_path: ``with output_path(path) as tmp: library.save(tmp)``; for
            libraries that want a file name: ``tmp`` (same folder, same suffix) is
            renamed to ``path`` when the block succeeds, removed otherwise (the
            default: :func:`atomic_path`).
        extra: the values of the task's own :class:`TaskOption` s, by ``dest``.
    """

    output: Optional[Path] = None
    top_k: int = 5
    arrays: Optional[str] = None
    quiet: bool = False
    progress: Progress = no_progress
    echo: Callable[[str], None] = lambda line: None
    open_output: Callable[[Path], ContextManager[BinaryIO]] = _atomic_file
    output_path: Callable[[Path], ContextManager[Path]] = atomic_path
    extra: Dict[str, Any] = field(default_factory=dict)

