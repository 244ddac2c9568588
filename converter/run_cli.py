"""``perceiver-convert run TASK MODEL INPUT...``: the task pipelines on the command line.

The command knows no task by name: it reads :data:`perceiver_torch.pipelines.TASKS`
(the contract is in that package's docstring), loads MODEL (a converted
``.safetensors``/``.pt`` file, or an official checkpoint converted in memory), checks
that the model fits the task, builds the task's pipeline and calls its runner with a
:class:`~perceiver_torch.pipelines.base.RunOptions`.

Files the runner writes are staged next to their targets and renamed into place only
when the whole run succeeds (:class:`Staging`), all of them or none (with ``--force``
the files they replace come back should a rename fail): an error or an interrupt
leaves no partial output, and no output may name an input. Every file a run would write
(``TaskSpec.planned_outputs``) is checked before the model is loaded, with the other
commands' rules (:func:`converter.atomic.check_outputs`): none may be an input, none
may exist unless ``--force``; a converted ``.safetensors`` MODEL of another task is
refused before that, by the model name in its header (:func:`recorded_model_name`).
The parameters are built on first use (:class:`RunCommand`), so
``perceiver-convert --help`` and the commands that need no torch do not import it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import (
    Any,
    BinaryIO,
    Dict,
    Iterable,
    Iterator,
    List,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
)

import click

from converter.atomic import fsync_file, raise_write_error, temporary_name
from converter.errors import ConverterError, UsageError
from converter.terminal import echo

__all__ = [
    "RunCommand",
    "Staging",
    "emulated_dtype_note",
    "load_any_model",
    "progress_bar",
    "format_task_demos",
    "run_command",
    "run_task_demos",
]

EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_INTERRUPTED = 130

_RUN_HELP = """Run TASK with MODEL on each INPUT, as DeepMind's colabs do.

\b
TASK is one of:
{tasks}

MODEL is a converted file (.safetensors or .pt from `perceiver-convert convert`) or an
official checkpoint (.pickle/.pystate, converted in memory first); a HuggingFace
folder is converted first (`perceiver-convert convert FOLDER -o NAME.safetensors`;
given here, exit 2). The human summary
goes to stderr; --json prints one document on stdout: {{"task", "model", "dtype" (what
the model computed in), "results": [one per input]}}; each result has "input" and:

\b
  classify    "top_k": [{{"label", "index", "probability"}}], "notes" (e.g. an
              image over Pillow's decompression-bomb limit, a damaged EXIF block,
              pixels that look like another scale)
  fill-mask   "text" (the filled text), "masked": [per masked byte: "position",
              "original" (with --span), "top_k": [{{"byte", "value", "index",
              "probability"}}]], "notes" (where there are any: logits that are
              not finite)
  flow        "files" written, "size", "max_flow" and more
  autoencode  "files" written, "clips": [{{"frames", "psnr", "top_k": [{{"label",
              "index", "probability"}}]}}] and more

A number that is NaN or infinite is null (JSON has neither): the PSNR of a perfect
reconstruction, or outputs that are not finite (the notes say so).

-o OUT writes the results (classify, fill-mask: the document --json prints, to a
name of no other format, e.g. OUT.json; with --npy/--npz the raw arrays: classify
"logits" (N, classes), fill-mask "logits_I" (masked bytes, 262) and "positions_I"
per input I) or, for flow and autoencode, the pictures, videos and sounds.
Files appear only when the whole run succeeds, all or none (should one fail to be put
in place, the files --force replaces are put back); an output never replaces an input.
Every file the run would write (-o and the names derived from it, e.g. flow's .flo and
.png) is checked before the model is loaded: one that exists is refused unless --force;
flow's and autoencode's INPUTs must exist by then too (exit 3). A .safetensors MODEL
that is the wrong model for TASK is refused before both (its header names the model).

Exit codes: 0 ok; 2 usage error (bad option, wrong model for the task, an output that
is an input or exists without --force, a media library missing or failing to load);
3 unreadable or unusable input (bad image, text too long or an @FILE/stdin text over
64 MiB, too-small frame); 130 interrupted; 143 terminated (SIGTERM).
With random weights (fixtures), the answers are noise.
"""


# --------------------------------------------------------------------------------------
# Outputs: staged, renamed into place when the run succeeds.


class Staging:
    """Collects a run's output files as temporary files in their target folders and
    renames them all into place in :meth:`commit`, all or none; on :meth:`discard`
    (error, interrupt) every temporary file is removed.

    ``protected`` paths (the inputs and the model) may not be written; an existing
    file is replaced only with ``force``: without it the commit also refuses a file
    that appeared after the checks (another run), keeps it and removes the files it
    had already put in place. ``planned`` (when given) lists every file
    the task said it would write (``TaskSpec.planned_outputs``, checked before the
    run); writing any other file is an error, so that no file escapes those checks.
    """

    def __init__(
        self,
        protected: Iterable[Path] = (),
        *,
        force: bool = True,
        planned: Optional[Iterable[Path]] = None,
    ) -> None:
        self._protected = [Path(p) for p in protected]
        self._force = force
        self._planned = None if planned is None else [Path(p) for p in planned]
        self._staged: List[Tuple[Path, Path]] = []

    def check(self, path: Path) -> Path:
        """``path`` may be written: its folder exists, it is no input, it does not
        exist (unless ``force``), it was planned, it is not yet staged.

        Raises:
            OutputError: (exit 2) an input, an existing file or a missing folder.
        """
        from converter.atomic import check_output_path, check_outputs

        path = check_output_path(path)
        check_outputs(path, self._protected, force=self._force)
        if self._planned is not None and not any(
            _same_file(path, planned) for planned in self._planned
        ):
            raise ConverterError(
                f"internal error: the task wrote {path}, which its planned outputs do "
                "not list (TaskSpec.outputs); nothing was written"
            )
        if any(_same_file(path, target) for _, target in self._staged):
            raise ConverterError(f"{path} would be written twice in one run")
        return path

    def _temp(self, path: Path) -> Path:
        # Same folder (the rename stays on one filesystem), same suffix (libraries
        # that pick a format from the file name still see it).
        return temporary_name(path, keep_suffix=True)

    @contextlib.contextmanager
    def open_output(self, path: Path) -> Iterator[BinaryIO]:
        """A binary file for ``path``, renamed into place by :meth:`commit`."""
        path = self.check(Path(path))
        temp = self._temp(path)
        try:
            with open(temp, "xb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException as error:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise_write_error(path, error)
        self._staged.append((temp, path))

    @contextlib.contextmanager
    def output_path(self, path: Path) -> Iterator[Path]:
        """A temporary file name for ``path`` (same folder and suffix) for libraries
        that write by name; renamed into place by :meth:`commit`."""
        path = self.check(Path(path))
        temp = self._temp(path)
        try:
            yield temp
            if not temp.is_file():
                raise ConverterError(f"nothing was written for {path}")
            fsync_file(temp)  # as open_output's handle: on disk before the rename
        except BaseException as error:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise_write_error(path, error)
        self._staged.append((temp, path))

    @property
    def targets(self) -> List[Path]:
        return [target for _, target in self._staged]

    def commit(self) -> List[Path]:
        """Renames every staged file into place, all of them or none
        (:func:`~converter.atomic.publish_all`, which also fsyncs their folders so
        that the renames survive a crash); returns the targets. With ``force`` the
        files they replace are set aside first and, should a rename fail, put back.

        Raises:
            ConverterError: a rename failed (exit 3); every old file is as it was
                and the message says so.
            OutputError: without ``force``, a target that appeared since
                :meth:`check` (:func:`~converter.atomic.output_appeared`); the files
                this commit created are removed again, so that the failed run writes
                none.
        """
        from converter.atomic import publish_all

        targets = self.targets
        try:
            publish_all(self._staged, overwrite=self._force)
        except BaseException:
            self.discard()
            raise
        self._staged = []
        return targets

    def discard(self) -> None:
        """Removes every staged file (nothing appears)."""
        for temp, _ in self._staged:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        self._staged = []


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


# --------------------------------------------------------------------------------------
# Progress


def progress_bar(quiet: bool, stream: Any = None):
    """A :data:`~perceiver_torch.pipelines.base.Progress` that draws a click progress
    bar on stderr, or passes the items through silently when ``quiet`` or when stderr
    is not a terminal (logs and pipes get no bar characters)."""
    stream = sys.stderr if stream is None else stream

    def progress(items: Iterable[Any], total: int, label: str) -> Iterable[Any]:
        if quiet or not getattr(stream, "isatty", lambda: False)():
            yield from items
            return
        with click.progressbar(items, length=total, label=label, file=stream) as bar:
            yield from bar

    return progress


# --------------------------------------------------------------------------------------
# Models


_CONVERTED_SUFFIXES = (".safetensors", ".pt", ".pth")


def _sniff(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` (a zip archive, torch.save's format) or
    ``"official"`` (anything else: left to the checkpoint reader's checks). A file
    named as a converted model that is no pickle either, nor anything the checkpoint
    reader names (an ONNX model, an empty file, a .npy, ...), is ``"torch"``: its
    error is then perceiver_torch.load's (not a converted model), not the checkpoint
    reader's advice to download the official file again."""
    from converter.haiku_reader import head_not_pickle, looks_like_onnx
    from perceiver_torch.registry import file_kind

    with open(path, "rb") as handle:
        head = handle.read(64)
    if head[:4] == b"PK\x03\x04":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if (
        path.suffix.lower() in _CONVERTED_SUFFIXES
        and file_kind(head) == "other"  # no pickle (the official files are) nor torch file
        and not looks_like_onnx(head)
        and head_not_pickle(head) is None
    ):
        return "torch"
    return "official"


def load_any_model(
    path: Path,
    progress: Any = None,
    dtype: Optional[str] = None,
    pack_weights: Optional[bool] = None,
) -> Tuple[Any, str]:
    """A model from a converted file or an official checkpoint: ``(model, how)`` where
    ``how`` says what was done (for the summary line).

    dtype: the dtype the model computes in ("float32", "bfloat16", "float16"); None =
    the converted file's own dtype (``convert --dtype``), float32 for an official
    checkpoint.
    pack_weights: whether the linear layers keep a copy of their weights in oneDNN's
    layout (``perceiver_torch.load``'s argument): None = the library's default
    (bfloat16 on CPUs with bfloat16 instructions), True = float32 too, False = never.

    Raises:
        ConverterError: the file is neither a converted file nor a readable official
            checkpoint (the reader's message says what is wrong).
        UsageError: ``dtype`` cannot hold the weights (float16 and magnitudes over
            65504).
    """
    path = Path(path)
    if path.is_dir():  # `run` refuses one first (exit 2); callers in Python reach this
        from perceiver_torch.registry import folder_refusal

        raise ConverterError(folder_refusal(path))
    try:
        kind = _sniff(path)
    except OSError as error:
        raise ConverterError(f"cannot read {path}: {error.strerror or error}") from None
    if kind == "official":
        from converter.conversion import convert

        # In dtype (checked to hold the weights), as a file converted with --dtype.
        result = convert(path, None, dtype=dtype,
                         progress=progress or (lambda message: None))
        model = result.build_model().eval()
        from perceiver_torch.linear import choose_packing

        choose_packing(model, pack_weights)
        return model, f"converted in memory from {path.name}"
    import perceiver_torch

    from perceiver_torch.registry import OutOfRangeError

    try:
        model = perceiver_torch.load(path, dtype=dtype, pack_weights=pack_weights)
    except OutOfRangeError as error:  # --dtype float16 for weights beyond 65504
        raise UsageError(str(error)) from None
    except perceiver_torch.LoadError as error:
        raise ConverterError(str(error)) from None
    except Exception as error:  # torch.load's and safetensors' own errors
        raise ConverterError(
            f"{path} is not a readable converted model ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); give a "
            "file written by perceiver-convert convert, or an official checkpoint"
        ) from None
    return model, f"loaded {path.name}"


def emulated_dtype_note(
    dtype: Any, advice: str = "pass --dtype float32 to run in float32"
) -> Optional[str]:
    """A note for stderr when this CPU has no matrix instructions for ``dtype``
    (``perceiver_torch.linear.cpu_has_matmul_instructions``), ending in ``advice``;
    None where it has them."""
    import torch

    from perceiver_torch.linear import cpu_has_matmul_instructions
    from perceiver_torch.registry import dtype_name, resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    if cpu_has_matmul_instructions(torch_dtype):
        return None
    name = dtype_name(torch_dtype)
    needs = "AVX512-BF16 or AMX" if torch_dtype == torch.bfloat16 else "AMX-FP16 or AVX512-FP16"
    return (
        f"note: this CPU has no {name} matrix instructions ({needs}): PyTorch computes "
        f"every {name} product in float32 and rounds it back, which is slower than "
        f"float32 itself (bfloat16: 3x on an Intel Xeon with AVX-512, 13x on an "
        f"AVX2-only AMD EPYC); {advice}"
    )


def _task_for_model(name: str) -> Optional[str]:
    from perceiver_torch.pipelines import TASKS

    return next((task for task, spec in TASKS.items() if name in spec.models), None)


def recorded_model_name(path: Path) -> Optional[str]:
    """The model a converted ``.safetensors`` file names in its header (read without
    its tensors), or None where that is not known cheaply: an official checkpoint
    (its model is known once its arrays are read and fit a mapping), a ``.pt`` file
    (torch.load of its pickle), or a file that is unreadable, not safetensors or names
    no registered model (loading it says what is wrong)."""
    from converter.hf_import import safetensors_metadata
    from converter.registry import MODEL_NAMES

    try:
        if _sniff(path) != "safetensors":
            return None
    except OSError:
        return None
    name = (safetensors_metadata(path) or {}).get("model")
    return name if name in MODEL_NAMES else None


def _refuse_wrong_model(task: str, spec: Any, model_path: Path, name: str) -> None:
    """A usage error (exit 2) where TASK does not run model ``name``, naming the task
    that does."""
    from perceiver_torch.pipelines.base import with_article

    if name in spec.models:
        return
    hint = _task_for_model(name)
    raise click.UsageError(
        f"{task} needs {with_article(' or '.join(spec.models))} model; "
        f"{model_path} is {with_article(name)} model"
        + (f" (run it with: run {hint})" if hint else "")
    )


# --------------------------------------------------------------------------------------
# The command


def _task_option(option: Any) -> click.Option:
    types = {
        "str": click.STRING,
        "int": click.INT,
        "float": click.FLOAT,
        "path": click.Path(exists=True, dir_okay=False, path_type=Path),
    }
    kwargs: Dict[str, Any] = dict(help=option.help, multiple=option.multiple)
    if option.metavar:
        kwargs["metavar"] = option.metavar
    if option.kind == "flag":
        kwargs.update(is_flag=True, default=bool(option.default))
    elif option.kind == "choice":
        kwargs.update(type=click.Choice(option.choices), default=option.default,
                      show_default=option.default is not None)
    else:
        kwargs.update(type=types[option.kind], default=option.default)
    return click.Option([option.flag, option.dest], **kwargs)


def _output_option(
    ctx: click.Context, param: click.Parameter, value: Optional[str]
) -> Optional[Path]:
    """``-o`` as a Path. A value ending in a path separator names a folder: it must
    exist (``Path("out/")`` is ``Path("out")``, so a missing ``out/`` would otherwise
    become the stem of files written next to it, ``out.mp4``, ``out.wav``, or a
    file named ``out``)."""
    if value is None:
        return None
    if not str(value):  # Path("") is Path("."): the results went where no -o puts them
        raise click.BadParameter(
            "the name is empty; give a file name, or leave -o out", ctx=ctx, param=param
        )
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if str(value).endswith(separators) and not os.path.isdir(value):
        from perceiver_torch.pipelines.base import mkdir_command  # on a refusal only

        raise click.BadParameter(
            f"the folder {value} does not exist; create it first ({mkdir_command(value)}) "
            "or give a file name",
            ctx=ctx,
            param=param,
        )
    from converter.atomic import refuse_bare_suffix, refuse_special_file

    try:
        refuse_bare_suffix(value)
        # Also where -o is only the stem of the names written (flow's /dev/null.flo).
        refuse_special_file(value)
    except ConverterError as error:
        raise click.BadParameter(str(error), ctx=ctx, param=param) from None
    return Path(value)


class _ModelPath(click.Path):
    """MODEL: an existing file. A folder (a HuggingFace download, most often) is a
    usage error (exit 2) saying what perceiver_torch.load says of one
    (``folder_refusal``: convert a transformers folder first), rather than click's
    bare "is a directory"."""

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> Any:
        if os.path.isdir(value):
            from perceiver_torch.registry import folder_refusal

            self.fail(folder_refusal(Path(value)), param, ctx)
        return super().convert(value, param, ctx)


def _build_params() -> List[click.Parameter]:
    from perceiver_torch.pipelines import TASKS

    params: List[click.Parameter] = [
        click.Argument(["task"], type=click.Choice(list(TASKS)), metavar="TASK"),
        click.Argument(
            ["model_path"],
            type=_ModelPath(exists=True, dir_okay=False, path_type=Path),
            metavar="MODEL",
        ),
        click.Argument(["inputs"], nargs=-1, required=True, metavar="INPUT..."),
        click.Option(
            ["-o", "--output"],
            type=click.Path(),  # a str: pathlib would drop a trailing slash
            default=None,
            callback=_output_option,
            help="Where to write the results (see above); its folder must exist.",
        ),
        click.Option(
            ["--top-k", "top_k"],
            type=click.IntRange(min=1),
            default=5,
            show_default=True,
            help="Entries per prediction.",
        ),
        click.Option(["--json", "as_json"], is_flag=True,
                     help="Print one JSON document on stdout."),
        click.Option(["--npy", "npy"], is_flag=True,
                     help="Write the raw array to -o OUT.npy."),
        click.Option(["--npz", "npz"], is_flag=True,
                     help="Write the raw arrays to -o OUT.npz."),
        click.Option(["-q", "--quiet"], is_flag=True,
                     help="Nothing on stderr but errors (no summary, no progress)."),
        click.Option(
            ["--force"],
            is_flag=True,
            help="Replace output files that exist (every file the run writes; never an "
            "input). Without it an existing output is refused before any work.",
        ),
    ]
    params.append(
        click.Option(
            ["--dtype"],
            type=click.Choice(["float32", "bfloat16", "float16"]),
            default=None,
            help="The dtype the model computes in (default: the file's, as convert "
            "--dtype wrote it; float32 for an official checkpoint). bfloat16 costs about "
            "1% of the largest output (README, Reduced precision); against float32 it ran "
            "1.2-2.0x as fast on a CPU with AVX512-BF16, 2.6-4.7x with AMX, and is many "
            "times slower on CPUs with neither.",
        )
    )
    params.append(
        click.Option(
            ["--pack-weights/--no-pack-weights", "pack_weights"],
            default=None,
            help="Keep a copy of the linear layers' weights in the matmul library's "
            "layout, in float32 too (as much memory again as the weights): on CPUs with "
            "AVX-512 the language and ImageNet models then took 3-10% less time an input "
            "(README, Reduced precision), which repays the packing (0.05 s for an ImageNet "
            "model, 0.4 s for the language model) from the first image and after about "
            "ten texts; no gain on autoencode. Default: packed in bfloat16 only, on CPUs "
            "with bfloat16 instructions; --no-pack-weights: never.",
        )
    )
    seen = {
        "--output", "--top-k", "--json", "--npy", "--npz", "--quiet", "--force", "--dtype",
        "--pack-weights",
    }
    for spec in TASKS.values():
        for option in spec.options:
            if option.flag in seen:
                continue  # two tasks may share an option (same meaning)
            seen.add(option.flag)
            params.append(_task_option(option))
    return params


def _help_text() -> str:
    from perceiver_torch.pipelines import TASKS

    lines = []
    for name, spec in TASKS.items():
        note = "" if spec.available() else " [not available in this version]"
        lines.append(f"  {name:<11} {spec.summary}{note}")
        lines.append(f"  {'':<11} INPUT: {spec.input_help}")
    return _RUN_HELP.format(tasks="\n".join(lines))


class RunCommand(click.Command):
    """``run``: its parameters and help come from the task registry, built on first use
    (listing the commands or running another one does not import torch)."""

    def __init__(self) -> None:
        super().__init__(
            "run",
            callback=_run,
            params=[],
            short_help="Run a task (fill-mask, classify, flow, autoencode) on your files.",
            context_settings={"max_content_width": 100},
        )
        self._built = False

    def _ensure(self) -> None:
        if not self._built:
            self.params = _build_params()
            self.help = _help_text()
            self._built = True

    def get_params(self, ctx: click.Context) -> List[click.Parameter]:
        self._ensure()
        return super().get_params(ctx)

    def get_help(self, ctx: click.Context) -> str:
        self._ensure()
        return super().get_help(ctx)


def _task_extra(task: str, kwargs: Dict[str, Any], ctx: click.Context) -> Dict[str, Any]:
    """The values of TASK's own options; an option of another task given explicitly is
    a usage error (it would be silently ignored otherwise)."""
    from perceiver_torch.pipelines import TASKS

    spec = TASKS[task]
    own = {option.dest for option in spec.options}
    for other in TASKS.values():
        for option in other.options:
            if option.dest in own:
                continue
            source = ctx.get_parameter_source(option.dest)
            if source is not None and source.name == "COMMANDLINE":
                raise click.UsageError(
                    f"{option.flag} is an option of {other.name}, not of {task}"
                )
    return {dest: kwargs[dest] for dest in own}


def _existing_paths(inputs: Sequence[str]) -> List[Path]:
    """The INPUTs that name files (``@FILE`` too): outputs may not replace them. A text
    INPUT may be no valid path at all (too long, NUL bytes)."""
    paths = []
    for value in inputs:
        for candidate in {value, value[1:]} if value.startswith("@") else {value}:
            try:
                if candidate and os.path.exists(candidate):
                    paths.append(Path(candidate))
            except (OSError, ValueError):
                pass
    return paths


def _protected_paths(spec: Any, model_path: Path, kwargs: Dict[str, Any]) -> List[Path]:
    """What no output may replace: MODEL, the INPUTs that name files, and the files
    given to the task's path options (autoencode's ``--audio``)."""
    paths = [model_path] + _existing_paths(kwargs["inputs"])
    for option in spec.options:
        if option.kind == "path":
            values = kwargs.get(option.dest)
            values = values if option.multiple else [values]
            paths.extend(Path(value) for value in values or () if value is not None)
    return paths


def _check_planned(
    ctx: click.Context, planned: Sequence[Path], protected: Sequence[Path], force: bool
) -> None:
    """Every planned output, before any work: its folder exists and is writable
    (:func:`~converter.cli.output_path_callback`), it is no input and does not exist
    unless ``force`` (:func:`~converter.atomic.check_outputs`), it is planned once.
    Each refusal exits 2."""
    from converter.atomic import check_output_path, check_outputs
    from converter.cli import output_path_callback
    from converter.errors import OutputError

    option = next(p for p in ctx.command.get_params(ctx) if p.name == "output")
    for i, path in enumerate(planned):
        if ctx.params.get("output") is None:
            # No -o: the task put its files beside the input; "Invalid value for -o"
            # would name an option not given, whose advice only -o can follow.
            try:
                check_output_path(path)
            except ConverterError as error:
                raise click.UsageError(
                    f"{error} (without -o the results go beside the input: give -o "
                    "FOLDER, or -o NAME, to write them elsewhere)"
                ) from None
        output_path_callback(ctx, option, path)
        check_outputs(path, protected, force=force)
        if any(_same_file(path, other) for other in planned[:i]):
            raise OutputError(
                f"{path} would be written twice in one run; give the inputs different "
                "names or run them one at a time"
            )


# Suffixes of formats other than JSON that a task's -o document would be mistaken
# for: arrays (--npy/--npz write those), models, checkpoints and flow fields (pictures,
# sounds and videos: MEDIA_SUFFIXES).
_ARRAY_SUFFIXES = {".npy": "--npy", ".npz": "--npz"}
_OTHER_FORMAT_SUFFIXES = (
    ".safetensors", ".pt", ".pth", ".bin", ".pickle", ".pkl", ".pystate", ".onnx", ".flo",
)


def _check_document_suffix(task: str, output: Path) -> None:
    """A task whose -o is its JSON document (classify, fill-mask) refuses a name of
    another format (exit 2): without this, ``-o logits.npy`` (no --npy) wrote JSON
    that np.load cannot read, and ``-o out.png`` JSON in a .png."""
    from perceiver_torch.pipelines.media import MEDIA_SUFFIXES

    suffix = output.suffix.lower()
    flag = _ARRAY_SUFFIXES.get(suffix)
    if flag is not None:
        raise click.UsageError(
            f"-o {output}: add {flag} for the raw arrays; without it {task} writes its "
            "JSON document (name that *.json)"
        )
    if suffix in MEDIA_SUFFIXES or suffix in _OTHER_FORMAT_SUFFIXES:
        raise click.UsageError(
            f"-o {output}: {task} writes a JSON document (the one --json prints), not "
            f"{suffix}; name it *.json, or add --npy/--npz for the raw arrays"
        )


def _fail(error: BaseException, code: int, line: str, as_json: bool) -> NoReturn:
    """Ends a run that failed: ``line`` on stderr and, with ``--json``, the error
    document on stdout, as :class:`~converter.cli.ConverterGroup` does for the errors
    it catches (these exits bypass it, so it would print nothing)."""
    echo(line, err=True)
    if as_json:
        from converter.cli import echo_json, error_document

        echo_json(error_document(error, code))
    raise click.exceptions.Exit(code) from None


def _run(**kwargs: Any) -> None:
    from perceiver_torch.pipelines import TASKS
    from perceiver_torch.pipelines.base import (
        PipelineError,
        RunOptions,
        import_attribute,
        results_document,
    )

    ctx = click.get_current_context()
    task: str = kwargs["task"]
    spec = TASKS[task]
    model_path: Path = kwargs["model_path"]
    output: Optional[Path] = kwargs["output"]
    quiet: bool = kwargs["quiet"]
    if kwargs["npy"] and kwargs["npz"]:
        raise click.UsageError("give --npy or --npz, not both")
    arrays = "npy" if kwargs["npy"] else "npz" if kwargs["npz"] else None
    if arrays and output is None:
        raise click.UsageError(f"--{arrays} writes to a file: add -o OUT.{arrays}")
    if arrays and output is not None and output.suffix != f".{arrays}":
        raise click.UsageError(f"--{arrays} needs an output ending in .{arrays}, got {output}")
    extra = _task_extra(task, kwargs, ctx)
    if not spec.available():
        raise click.UsageError(f"task {task} is not available in this version")
    # A converted file's header names its model: a wrong one is said before the
    # INPUTs and outputs are checked (fixing those first led only to this error).
    recorded = recorded_model_name(model_path)
    if recorded is not None:
        _refuse_wrong_model(task, spec, model_path, recorded)
    force: bool = kwargs["force"]
    protected = _protected_paths(spec, model_path, kwargs)

    def say(line: str) -> None:
        if not quiet:
            echo(line, err=True)

    staging = Staging(protected, force=force, planned=())  # replaced once planned
    try:
        options = RunOptions(
            output=output,
            top_k=kwargs["top_k"],
            arrays=arrays,
            quiet=quiet,
            progress=progress_bar(quiet),
            echo=say,
            extra=extra,
        )
        # Up front, before minutes of work and before the model is loaded: every file
        # the run would write (-o and the names derived from it) has a folder, is no
        # input and, without --force, does not exist yet.
        planned = spec.planned_outputs(list(kwargs["inputs"]), options)
        _check_planned(ctx, planned, protected, force)
        if arrays is None and output is not None and spec.outputs is None:
            _check_document_suffix(task, output)  # after the input check: its words first
        staging = Staging(protected, force=force, planned=planned)
        options.open_output = staging.open_output
        options.output_path = staging.output_path
        spec.check_requirements()  # before a possibly long conversion
        model, how = load_any_model(
            model_path,
            progress=lambda message: say(f"  {message}"),
            dtype=kwargs["dtype"],
            pack_weights=kwargs["pack_weights"],
        )
        name = getattr(model, "model_name", type(model).__name__)
        _refuse_wrong_model(task, spec, model_path, name)  # an official checkpoint, .pt
        from perceiver_torch.registry import dtype_name

        model_dtype = next(model.parameters()).dtype
        computed_in = dtype_name(model_dtype)
        say(f"{task} with {name} ({how}, {computed_in})")
        # "Leave out --dtype" ran in float32 only for a float32 file: one converted
        # with --dtype bfloat16/float16 computes in its own dtype without it.
        note = emulated_dtype_note(model_dtype)
        if note:
            say(note)
        if kwargs["pack_weights"]:
            from perceiver_torch.linear import packing_takes_effect

            if not packing_takes_effect(model_dtype):
                say(
                    f"note: --pack-weights changes nothing here: the linear layers do not "
                    f"run on oneDNN on this CPU in {computed_in} (float32 needs AVX-512; "
                    "PERCEIVER_TORCH_FAST_PATHS=0 or PERCEIVER_TORCH_ONEDNN=0 turns the "
                    "path off)"
                )
        pipeline = import_attribute(spec.pipeline)(model)
        runner = import_attribute(spec.runner)
        results = runner(pipeline, list(kwargs["inputs"]), options)
        written = staging.commit()
    except PipelineError as error:
        staging.discard()
        _fail(error, error.exit_code, f"error: {error}", kwargs["as_json"])
    except KeyboardInterrupt as error:  # Terminated (SIGTERM: 143) too
        staging.discard()
        code = getattr(error, "exit_code", EXIT_INTERRUPTED)
        what = "terminated (SIGTERM)" if code != EXIT_INTERRUPTED else "interrupted"
        _fail(error, code, f"error: {what}; nothing was written", kwargs["as_json"])
    except BaseException:
        staging.discard()
        raise
    for path in written:
        say(f"wrote {path}")
    if kwargs["as_json"]:
        from converter.cli import echo_json

        # The same document classify's and fill-mask's -o write.
        echo_json(results_document(task, model, results))


run_command = RunCommand()


# --------------------------------------------------------------------------------------
# demo hook


def run_task_demos(
    folder: Path, *, seed: int = 0, progress: Any = None
) -> List[Dict[str, Any]]:
    """Runs every available task's demo once on a tiny model with random weights (the
    answers are noise): ``[{"task", "model", "input", "answer", "error"}]``.

    Each task's model is an official-format checkpoint with random weights
    (``converter.fixtures``, tiny size) converted in memory; its demo function (``TaskSpec.demo``) makes its own media in ``folder``.
    """
    import torch

    from converter.conversion import convert
    from converter.fixtures import write_fixture
    from perceiver_torch.pipelines import TASKS
    from perceiver_torch.pipelines.base import PipelineError, RunOptions, import_attribute

    rows: List[Dict[str, Any]] = []
    for spec in TASKS.values():
        if spec.demo is None or not spec.available():
            continue
        name = spec.models[0]
        row: Dict[str, Any] = {"task": spec.name, "model": name, "input": None,
                               "answer": None, "error": None}
        try:
            if progress:
                progress(f"{spec.name}: running the pipeline on {name} (tiny)")
            task_folder = folder / spec.name
            task_folder.mkdir(parents=True, exist_ok=True)
            # The whole chain: an official-format checkpoint with random weights,
            # converted in memory, then the task.
            checkpoint = task_folder / f"{name}.pickle"
            write_fixture(name, checkpoint, size="tiny", seed=seed)
            model = convert(checkpoint, None).build_model().eval()
            staging = Staging()
            options = RunOptions(top_k=3, quiet=True, open_output=staging.open_output,
                                 output_path=staging.output_path)
            with torch.no_grad():
                row.update(import_attribute(spec.demo)(model.eval(), task_folder, options))
            staging.commit()
        except (PipelineError, ConverterError) as error:
            row["error"] = str(error)
        except OSError as error:  # disk full: the row says so (it was "unexpected")
            row["error"] = (f"writing in {folder / spec.name} failed: "
                            f"{error.strerror or error}; free disk space")
        rows.append(row)
    return rows



def format_task_demos(rows: List[Dict[str, Any]]) -> str:
    """The demo's task table: task, model, input, answer (or the error)."""
    header = ("task", "model", "input", "answer")
    cells = [
        (r["task"], r["model"], r["input"] or "-",
         r["answer"] if r["error"] is None else f"ERROR: {r['error']}")
        for r in rows
    ]
    widths = [max(len(str(c[i])) for c in cells + [header]) for i in range(3)]
    lines = ["tasks (tiny models with random weights: the answers are noise)"]
    for cell in [header] + cells:
        lines.append("  " + "  ".join(str(cell[i]).ljust(widths[i]) for i in range(3))
                     + "  " + str(cell[3]))
    return "\n".join(lines)
