"""Task pipelines: from a user's own text, images, frame pairs and videos to answers,
computed as DeepMind's Perceiver IO colabs do.

One class per task, built from a model (``perceiver_torch.load``/``build``)::

    from perceiver_torch import load
    from perceiver_torch.pipelines import ClassifyPipeline, FillMaskPipeline

    fill = FillMaskPipeline(load("language_perceiver.safetensors"))
    result = fill("This is an incomplete sentence where some words are[MASK*9]")
    print(result.text, result.masked[0].top_k)

    classify = ClassifyPipeline(load("imagenet_learned.safetensors"))
    print(classify("photo.jpg").top_k)   # paths, PIL images, numpy or torch arrays

The media libraries (Pillow, OpenCV, PyAV; ``pip install 'perceiver-convert[media]'``)
are imported only when a pipeline needs them: ``import perceiver_torch`` and
``import perceiver_torch.pipelines`` work without them, and the classes below are
imported on first access.

Contract of a task (how ``perceiver-convert run TASK`` finds and runs it)
--------------------------------------------------------------------------
:data:`TASKS` maps each TASK name to a :class:`~.base.TaskSpec`. The ``run`` command
(``converter/run_cli.py``) reads it and never names a task itself:

1. ``spec.models``: the registry names of the models the task accepts; any other model
   is refused before the pipeline is built (exit 2).
2. ``spec.pipeline = "module:Class"``: built as ``Class(model)``; it raises
   :class:`~.base.WrongModelError` for a model it cannot run.
3. ``spec.runner = "module:function"``, called as
   ``function(pipeline, inputs: list[str], options: RunOptions) -> list[dict]``: one
   JSON-able document per input (printed with ``--json``); it prints its human summary
   with ``options.echo`` (nothing when ``options.quiet``), wraps long loops in
   ``options.progress(items, total, label)``, and writes every file through
   ``options.open_output(path)`` or ``options.output_path(path)`` (atomic in the CLI:
   a failed run leaves no partial file, an input is never overwritten). The documents
   of a task that writes files list them under ``"files"``. Its memory is bounded by
   a batch (autoencode: one clip of a video), not by the number of inputs: it writes
   each batch's files as it goes and keeps per input only its document (and an
   ``--npy``/``--npz`` array, which is the output itself; autoencode spools those to
   temporary files and writes them at the end). classify and flow read and
   check every image or frame first (a bad one is named before the model runs),
   keeping only what is small (notes, sizes), then read them again batch by batch (an
   input that cannot be read twice, a pipe: :func:`~.base.readable_twice`, keeps its
   first read, as do classify's images where they are one batch; a file written to
   meanwhile, :func:`~.base.file_state`, is refused: :class:`~.base.TwoReads`);
   fill-mask checks every text's length first; autoencode decodes every video (and
   its sound) whole first, one at a time, keeping only counts and sizes, so that a
   bad one is named before the model runs on the first, then takes the videos in
   turn, each decoded again clip by clip (the videos' existence is checked earlier
   still, by its ``spec.outputs``).
4. ``spec.options``: the task's own CLI options (:class:`~.base.TaskOption`); their
   values arrive in ``options.extra[dest]``. Using one with another task is a usage
   error.
5. ``spec.demo = "module:function"`` or None, called by ``perceiver-convert demo`` as
   ``function(model, folder: Path, options: RunOptions) -> dict`` with a tiny model of
   random weights: it makes its own media in ``folder``, runs the pipeline once and
   returns ``{"task", "input", "answer"}`` (short strings) for the demo's table.
6. ``spec.outputs = "module:function"`` or None, called as ``function(inputs,
   options) -> list[Path]``: every file the runner would write, from the names alone
   (no input read; flow's and autoencode's planners also refuse an INPUT that does
   not exist, :func:`~.base.require_existing_files`, exit 3). The CLI checks them all
   before loading the model: none may be an input, none may exist unless ``--force``;
   the runner may write no other file. None
   means the task writes ``options.output`` only (when given).
   :meth:`~.base.TaskSpec.planned_outputs` calls it. The runner itself refuses
   (exit 2) a file whose folder is missing or gives no write permission, or that is
   a folder (flow and autoencode, which write an input's files before reading the
   next input: or that is an input), before any work
   (:func:`~.base.check_output_paths`), for a script that calls it with
   :class:`~.base.RunOptions`' defaults.
7. ``spec.requires``: the optional libraries every run imports; missing ones are
   reported (exit 2, with the extra to install) before the model is loaded; one that
   is installed but fails to load is reported when it is imported (exit 2, saying so
   and how to mend it, :func:`~.base.require`).
8. Errors: raise :class:`~.base.InputError` (unreadable or unusable input, exit 3),
   :class:`~.base.WrongModelError` (exit 2) or another :class:`~.base.PipelineError`
   with the right ``exit_code``; the message is one line saying what is wrong and how
   to fix it. Optional libraries are imported with :func:`~.base.require`.

A task whose module is not installed yet (``spec.available()`` False) is listed by
``run --help`` as unavailable and refused with exit 2.
"""

from __future__ import annotations

from typing import Any, Dict

from .base import (
    InputError,
    PipelineError,
    RunOptions,
    TaskOption,
    TaskSpec,
    WrongModelError,
)

IMAGENET_MODELS = ("imagenet_learned", "imagenet_fourier", "imagenet_conv")

TASKS: Dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="fill-mask",
            models=("language_perceiver",),
            pipeline=".text:FillMaskPipeline",
            runner=".text:run_task",
            demo=".text:demo_task",
            summary="fill the masked bytes of a text (language_perceiver)",
            input_help="a text with [MASK] / [MASK*N] markers, or @FILE, or - (stdin)",
            options=(
                TaskOption(
                    "--span",
                    "spans",
                    "str",
                    "fill-mask: mask bytes START..END-1 of the text (0-based, byte "
                    "offsets; repeatable; the text then has no markers).",
                    multiple=True,
                    metavar="START:END",
                ),
            ),
        ),
        TaskSpec(
            name="classify",
            models=IMAGENET_MODELS,
            pipeline=".image:ClassifyPipeline",
            runner=".image:run_task",
            demo=".image:demo_task",
            summary="top-k ImageNet labels of images (imagenet_learned/fourier/conv)",
            input_help="image files (JPEG, PNG, ...)",
            requires=("PIL", "cv2"),
            options=(
                TaskOption(
                    "--native-size",
                    "native_size",
                    "flag",
                    "classify: feed the centre crop at its own size instead of "
                    "resizing it (imagenet_fourier and imagenet_conv only).",
                ),
            ),
        ),
        TaskSpec(
            name="flow",
            models=("optical_flow",),
            pipeline=".flow:FlowPipeline",
            runner=".flow:run_task",
            demo=".flow:demo_task",
            outputs=".flow:planned_outputs",
            summary="optical flow of frame pairs or a video (optical_flow)",
            input_help="two or more frames (each consecutive pair), or a video",
            requires=("PIL",),
            options=(
                TaskOption(
                    "--render",
                    "render",
                    "choice",
                    "flow: colour picture style, the Middlebury colour wheel or the "
                    "colab's HSV rendering.",
                    default="wheel",
                    choices=("wheel", "hsv"),
                ),
                TaskOption(
                    "--pad",
                    "pad",
                    "flag",
                    "flow: pad frames smaller than a tile instead of refusing them.",
                ),
            ),
        ),
        TaskSpec(
            name="autoencode",
            models=("video_autoencoding",),
            pipeline=".video:AutoencodePipeline",
            runner=".video:run_task",
            demo=".video:demo_task",
            outputs=".video:planned_outputs",
            summary="autoencode a video with its sound, and its Kinetics-700 labels",
            input_help="a video (with a sound track, or give --audio)",
            requires=("av", "cv2"),
            options=(
                TaskOption(
                    "--audio",
                    "audio",
                    "path",
                    "autoencode: take the sound from this WAV instead of the video.",
                    metavar="WAV",
                ),
            ),
        ),
    )
}

# Public name -> "module:attribute", imported on first access (PEP 562), so that the
# media libraries and the task modules load only when used.
_LAZY = {
    "FillMaskPipeline": ".text:FillMaskPipeline",
    "FillMaskResult": ".text:FillMaskResult",
    "parse_masked_text": ".text:parse_masked_text",
    "ClassifyPipeline": ".image:ClassifyPipeline",
    "ClassifyResult": ".image:ClassifyResult",
    "center_crop_box": ".image:center_crop_box",
    "load_rgb": ".image:load_rgb",
    "preprocess_image": ".image:preprocess_image",
    "imagenet_labels": "perceiver_torch.labels:imagenet_labels",
    "kinetics700_labels": "perceiver_torch.labels:kinetics700_labels",
    "class_names": "perceiver_torch.labels:class_names",
    "FlowPipeline": ".flow:FlowPipeline",
    "AutoencodePipeline": ".video:AutoencodePipeline",
}

__all__ = [
    "IMAGENET_MODELS",
    "InputError",
    "PipelineError",
    "RunOptions",
    "TASKS",
    "TaskOption",
    "TaskSpec",
    "WrongModelError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    reference = _LAZY.get(name)
    if reference is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .base import import_attribute

    value = import_attribute(reference)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
