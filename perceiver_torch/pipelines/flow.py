"""Flow: the optical flow of two frames of any size, computed as DeepMind's optical-flow
colab does, written as ``.flo``/``.npy`` and drawn as a colour picture.

The colab's procedure (:class:`FlowPipeline`):

1. Both frames as RGB uint8 (:func:`~.image.load_rgb`), scaled to [-1, 1] as
   ``x / 255 * 2 - 1`` (float64, as NumPy does in the colab, then float32).
2. Tiles of the training size (the model config's ``image_size``: 368x496 officially)
   on the colab's grid (:func:`perceiver_torch.optical_flow.tile_starts`): origins
   every ``tile - min_overlap`` px (``min_overlap`` 20), the last tile flush with the
   border, the colab's repeated origins kept (they double a tile's weight).
3. Each tile's flow from the model, already in pixels (the network's output / 100
   inside the model, x 20 as the colab: ``OpticalFlow.forward``; no further scale),
   blended with weights min(x+1, W-x, y+1, H-y) in tile coordinates. ``batch_size``
   tiles go through the model at once (:meth:`OpticalFlow.tiled`).

Frames smaller than a tile are refused (:class:`~.base.InputError`) unless
``pad=True``: they are then edge-padded at the bottom and right up to the tile size
and the flow is cropped back (a documented departure; the colab refuses them too).
Results are (H, W, 2) float32 arrays in pixels, u (+x right) then v (+y down).

Order of the checks, and memory: frames given as files to ``perceiver-convert run
flow`` are each read and checked first (a bad one, or a pair of two sizes, is named
before the model runs), keeping only notes and sizes, then read again pair by pair
(:func:`run_task`). A video (:meth:`FlowPipeline.video`, and ``run flow`` of one) is
decoded whole first, one frame held at a time, keeping only its frame count and first
frame's size (a frame that cannot be decoded, a change of size or frames smaller than
a tile are named before the model runs), then decoded again frame by frame for its
pairs, memory holding a frame pair and its flow (a file written to or replaced between
the two reads is refused; a name for an open descriptor such as ``/dev/stdin`` is
decoded once).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..optical_flow import min_overlap_problem, tile_grid
from .base import (
    InputError,
    PipelineError,
    Progress,
    RunOptions,
    TwoReads,
    check_model,
    check_output_paths,
    check_weights,
    eval_mode,
    flag,
    no_progress,
    non_finite_count,
    non_finite_note,
    non_finite_output_note,
    positive_int,
    readable_twice,
    refuse_array_suffix_without_flag,
    require,
    require_existing_files,
    usage_error,
)
from .flow_io import encode_flo, max_magnitude, render_flow
from .image import load_rgb, read_image_file
from .media import (
    MEDIA_SUFFIXES,
    VIDEO_SUFFIXES,
    WRITTEN_VIDEO_SUFFIXES,
    VideoCheck,
    check_video,
    estimated_frame_count,
    is_video_path,
    iter_video_frames,
    missing_frames_note,
    size_change_error,
    video_frame_count,
    video_frame_rate,
    write_video,
)
from .spool import DiskSpool, write_npz

__all__ = ["FlowPipeline", "FlowResult", "frames_to_model_input", "run_task", "demo_task"]

FrameInput = Union[str, Path, np.ndarray, torch.Tensor, Any]  # Any: a PIL image


# The colab's im / 255.0 * 2 - 1 (float64) rounded to float32, for each uint8 value:
# the same numbers without a float64 copy of the frames (8 bytes a channel: a
# 12000 x 12000 pair took 11 GB, a third of it that copy).
_UINT8_TO_MODEL = (np.arange(256, dtype=np.float64) / 255.0 * 2 - 1).astype(np.float32)


def frames_to_model_input(first: np.ndarray, second: np.ndarray) -> torch.Tensor:
    """Two (H, W, 3) RGB frames on the 0..255 scale -> the model's input
    (1, 2, 3, H, W) float32 in [-1, 1], as the colab's ``im / 255.0 * 2 - 1``
    (computed in float64, then rounded to float32; uint8 frames through a table of
    those 256 values)."""
    stacked = np.stack([first, second])
    if stacked.dtype == np.uint8:
        scaled = _UINT8_TO_MODEL[stacked]
    else:
        scaled = (stacked.astype(np.float64) / 255.0 * 2 - 1).astype(np.float32)
    return torch.from_numpy(scaled).permute(0, 3, 1, 2)[None]


@dataclass
class FlowResult:
    """The flow of one frame pair.

    Attributes:
        flow: (H, W, 2) float32 in pixels; u (+x, right) then v (+y, down).
        tiles: model evaluations (distinct tiles of the colab's grid).
        notes: remarks on the frames (a file above Pillow's decompression-bomb
            limit: :func:`~.image.large_image_note`).
    """

    flow: np.ndarray
    tiles: int
    notes: List[str] = field(default_factory=list)

    def flo_bytes(self) -> bytes:
        """The Middlebury ``.flo`` file (:func:`~.flow_io.encode_flo`)."""
        return encode_flo(self.flow)

    def picture(self, style: str = "wheel", max_flow: Optional[float] = None) -> np.ndarray:
        """(H, W, 3) uint8 RGB: ``"wheel"`` (Middlebury) or ``"hsv"`` (the colab's)."""
        return render_flow(self.flow, style, max_flow)

    def as_dict(self) -> Dict[str, Any]:
        """A JSON-able summary, not the flow itself (``flo_bytes`` or ``flow`` hold
        that): ``"size"`` [H, W], ``"tiles"``, ``"max_flow"`` (the largest |flow|,
        px), ``"mean_flow"`` [u, v] (px) and ``"notes"``. ``perceiver-convert run
        flow --json`` prints it for each frame pair, with ``"input"`` (the two
        frames) and ``"files"`` (those written) added."""
        height, width = self.flow.shape[:2]
        return {
            "size": [height, width],
            "tiles": self.tiles,
            "max_flow": _magnitude(self.flow),
            "mean_flow": [float(v) for v in self.flow.reshape(-1, 2).mean(0)],
            "notes": list(self.notes),
        }


class FlowPipeline:
    """Optical flow of frame pairs with an ``optical_flow`` model (see the module doc).

    Args:
        model: a :class:`perceiver_torch.OpticalFlow` (``perceiver_torch.load``/``build``).
        min_overlap: the colab's minimum tile overlap (px); must be below the tile size.
        batch_size: tiles per model call, at least 1 (more is faster where memory
            allows: a full-size tile needs a few GB).
        pad: edge-pad frames smaller than a tile instead of refusing them.
        progress: :data:`~.base.Progress` for the loop over tile batches.

    ``pipeline(frame1, frame2)`` takes file paths, PIL images, numpy (H, W, 3) or torch
    (3, H, W) arrays on the 0..255 scale and returns a :class:`FlowResult`.
    """

    task = "flow"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        min_overlap: int = 20,
        batch_size: int = 4,
        pad: bool = False,
        progress: Progress = no_progress,
    ) -> None:
        check_model(model, "flow", ("optical_flow",))
        check_weights(model, "flow")
        self.model = model  # run in eval mode, call by call (eval_mode)
        self.tile = tuple(int(v) for v in model.config.image_size)
        problem = min_overlap_problem(min_overlap, self.tile)
        if problem is not None:
            raise usage_error(problem)
        self.min_overlap = int(min_overlap)
        self.batch_size = positive_int(batch_size, "batch_size")
        self.pad = flag(pad, "pad")
        self.progress = progress

    def _parameter(self) -> torch.Tensor:
        return next(self.model.parameters())

    def check_size(self, height: int, width: int, name: str = "the frames") -> None:
        """Raises :class:`~.base.InputError` for frames smaller than a tile (unless
        ``pad``)."""
        th, tw = self.tile
        if (height < th or width < tw) and not self.pad:
            raise InputError(
                f"{name} are {width}x{height} px (width x height), smaller than the "
                f"model's {tw}x{th} tile; give larger frames, resize them, or pad them "
                "(--pad; pad=True in Python)"
            )

    def _check_pair(self, first: Tuple[int, ...], second: Tuple[int, ...]) -> None:
        """Raises :class:`~.base.InputError` unless two frames of these shapes (H, W,
        3) can give a flow: one size, not smaller than a tile (unless ``pad``)."""
        if tuple(first) != tuple(second):
            raise InputError(
                f"the two frames differ in size ({first[1]}x{first[0]} and "
                f"{second[1]}x{second[0]} px, width x height); give frames of one size"
            )
        self.check_size(first[0], first[1])

    def flow_of(self, first: np.ndarray, second: np.ndarray, *, progress: Optional[Progress] = None) -> FlowResult:
        """Flow of two (H, W, 3) RGB arrays (uint8, or float on the 0..255 scale) of the
        same size, at least 1x1 px. Their values are taken as ``pipeline(frame1,
        frame2)`` takes them: NaN or infinite values are refused, float values outside
        0..255 clipped to it, and float values all within 0..1 or outside 0..255 get a
        note in the result's ``notes``."""
        for name, frame in (("first", first), ("second", second)):
            _check_frame_array(frame, name)
        notes: List[str] = []
        first, second = _rgb(first, notes), _rgb(second, notes)
        return self._flow_of_rgb(first, second, notes, progress)

    def _flow_of_rgb(
        self,
        first: np.ndarray,
        second: np.ndarray,
        notes: List[str],
        progress: Optional[Progress] = None,
    ) -> FlowResult:
        """Flow of two frames already read by :func:`_rgb` (checked and clipped), with
        the ``notes`` made reading them."""
        self._check_pair(first.shape, second.shape)
        height, width = first.shape[:2]
        th, tw = self.tile
        frames = frames_to_model_input(first, second)
        if height < th or width < tw:
            # pad=True: replicate the last row/column up to the tile size.
            frames = torch.nn.functional.pad(
                frames[0], (0, max(tw - width, 0), 0, max(th - height, 0)), mode="replicate"
            )[None]
        parameter = self._parameter()
        frames = frames.to(device=parameter.device, dtype=parameter.dtype)
        tiles = len(tile_grid(frames.shape[-2], frames.shape[-1], self.tile, self.min_overlap))
        with torch.inference_mode(), eval_mode(self.model):
            flow = self.model.tiled(
                frames,
                min_overlap=self.min_overlap,
                batch_size=self.batch_size,
                progress=self.progress if progress is None else progress,
            )
        flow = flow[0, :, :height, :width].permute(1, 2, 0).float().cpu().numpy()
        note = non_finite_output_note(flow, self.model, "those flow vectors are unknown")
        if note is not None:
            notes = [*notes, note]
        # One note for two frames alike.
        return FlowResult(
            flow=np.ascontiguousarray(flow), tiles=tiles, notes=list(dict.fromkeys(notes))
        )

    def __call__(self, frame1: FrameInput, frame2: FrameInput) -> FlowResult:
        """Flow from ``frame1`` to ``frame2``."""
        notes: List[str] = []
        first, second = _rgb(frame1, notes), _rgb(frame2, notes)
        return self._flow_of_rgb(first, second, notes)

    def video(self, path: Union[str, Path], max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
        """The flow of each consecutive frame pair of a video: an iterator of (H, W, 2)
        arrays (frame i -> i + 1), decoded frame by frame with PyAV as it is consumed.

        The video is decoded whole once at the call, only to check it, one frame held
        at a time, keeping its frame count and first frame's size
        (:func:`~.media.check_video`): a video that cannot be decoded partway through
        (a damaged packet), that changes size, or whose frames are smaller than a
        tile, is named before the model runs on any pair, not after the flows of the
        pairs before it (minutes each at full size on a CPU). The frames are then
        decoded again as the flows are consumed, and a file written to or replaced
        meanwhile is refused. A name for an open descriptor such as ``/dev/stdin``
        (:func:`~.base.readable_twice`) is decoded once, as the flows are consumed.

        max_frames: read at most this many frames (N frames give N - 1 flows), at
        least 1; None reads them all. Checked at the call, before the video is opened.

        Raises:
            InputError: at the call, for an unreadable video (a frame that cannot be
                decoded), one that changes size mid-stream (naming the frame; flow
                needs frames of one size) or frames smaller than a tile (unless
                ``pad``); as the flows are consumed, for a video changed since (or
                the errors above, for a video not checked).
        """
        if max_frames is not None:
            # 0 or less would read no frame and then blame the video ("has no frames").
            max_frames = positive_int(max_frames, "max_frames")
        checked: Optional[VideoCheck] = None
        if readable_twice(path):
            # Decoding a frame is cheap beside a pair's flow, so the second decode
            # costs little; memory stays that of a frame.
            checked = check_video(path, max_frames, one_size=True)
            self.check_size(checked.size[0], checked.size[1], f"the frames of {path}")
        return self._video_flows(path, max_frames, checked)

    def _video_flows(
        self, path: Union[str, Path], max_frames: Optional[int], checked: Optional[VideoCheck]
    ) -> Iterator[np.ndarray]:
        previous = None
        for index, frame in enumerate(iter_video_frames(path, max_frames, checked)):
            if previous is None:
                self.check_size(frame.shape[0], frame.shape[1], f"the frames of {path}")
            else:
                if frame.shape != previous.shape:
                    # A stream may switch resolution (broadcasts, screen recordings):
                    # flow_of's "the two frames differ" names neither frame nor video.
                    # (check_video finds it first, where the video is checked.)
                    raise size_change_error(path, index, previous.shape, frame.shape)
                yield self.flow_of(previous, frame, progress=no_progress).flow
            previous = frame
        if previous is None:
            raise InputError(f"{path} has no frames")


def _check_frame_array(frame: Any, name: str) -> None:
    """Raises InputError unless ``frame`` is what :meth:`FlowPipeline.flow_of` takes:
    an (H, W, 3) numpy array of uint8 or float values on the 0..255 scale (other
    integers, e.g. 16-bit, would be read as if on that scale)."""
    if not isinstance(frame, np.ndarray):
        raise InputError(
            f"flow_of takes numpy arrays; the {name} frame is a {type(frame).__name__} "
            "(call the pipeline itself for paths, PIL images and tensors)"
        )
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError(
            f"the {name} frame has shape {list(frame.shape)}; give (H, W, 3) RGB "
            "(np.stack([grey] * 3, axis=-1) for a grey frame)"
        )
    if frame.dtype != np.uint8 and frame.dtype.kind != "f":
        raise InputError(
            f"the {name} frame is {frame.dtype}; give uint8 or float values on the "
            "0..255 scale (16-bit frames: (frame / 257).astype(np.uint8))"
        )
    if 0 in frame.shape[:2]:
        # Even pad=True cannot pad a frame without pixels (torch's replicate pad
        # failed with "Expected 3D or 4D tensor").
        raise InputError(
            f"the {name} frame is empty ({frame.shape[1]}x{frame.shape[0]} px, width x "
            "height); give frames of at least 1x1 px"
        )


def _rgb(frame: FrameInput, notes: Optional[List[str]] = None) -> np.ndarray:
    return _frame_array(load_rgb(frame, notes))


def _frame_array(rgb: np.ndarray) -> np.ndarray:
    """A frame as the tiling takes it: uint8 as it is, float pixels as float64."""
    return rgb if rgb.dtype == np.uint8 else rgb.astype(np.float64)


# --------------------------------------------------------------------------------------
# perceiver-convert run flow

_SUFFIXES = (".flo", ".png", ".npy", ".npz") + WRITTEN_VIDEO_SUFFIXES


def _output_base(inputs: Sequence[str], options: RunOptions) -> Tuple[Path, str]:
    """(stem path, video suffix) of the files to write."""
    first = Path(inputs[0])
    out = options.output
    if first.is_dir():
        # It was "not a file (a pipe?)" without -o, and "cannot read" with it.
        raise InputError(
            f"{first} is a folder; give the frames (image files, for example "
            f"{first / '*.png'}) or a video"
        )
    if out is None:
        if first.exists() and not first.is_file():
            # <(cat a.png) is /dev/fd/63: "beside the first input" is no place to write.
            raise usage_error(
                f"{first} is not a file (a pipe?): there is no folder beside it to write "
                "the results in; give -o OUT (a name, or a folder)"
            )
        return first.with_name(first.stem + ".flow"), ".mp4"
    if out.is_dir():
        return out / (first.stem + ".flow"), ".mp4"
    suffix = out.suffix.lower()
    if suffix in _SUFFIXES:
        _check_suffix_fits_the_run(out, suffix, _is_video_run(inputs), options)
        return out.with_suffix(""), suffix if suffix in WRITTEN_VIDEO_SUFFIXES else ".mp4"
    if suffix in MEDIA_SUFFIXES:
        # Not a stem: the user asked for that format (out.webm wrote out.webm.mp4).
        raise usage_error(
            f"-o {out}: flow does not write {suffix}; it writes .flo and .png for "
            f"frames, {', '.join(WRITTEN_VIDEO_SUFFIXES[:-1])} or "
            f"{WRITTEN_VIDEO_SUFFIXES[-1]} for a video (--npy/--npz: the arrays): give "
            "-o with one of those suffixes"
        )
    return out, ".mp4"


def _check_suffix_fits_the_run(out: Path, suffix: str, video: bool, options: RunOptions) -> None:
    """-o's suffix names one of flow's formats; refuses (exit 2) one this run would
    not write, where it used to be taken as a stem and swapped silently (frames with
    -o x.mp4 wrote x.flo and x.png; a video with -o x.flo wrote x.mp4)."""
    refuse_array_suffix_without_flag(out, options.arrays)
    videos = ", ".join(WRITTEN_VIDEO_SUFFIXES)
    if video and suffix in (".flo", ".png"):
        raise usage_error(
            f"-o {out}: the flow of a video is written as a video ({videos}), not "
            f"{suffix}; give -o with one of those suffixes (--npy/--npz: the arrays), or "
            "give the frames as pictures for a .flo and a .png per pair"
        )
    if not video and suffix in WRITTEN_VIDEO_SUFFIXES:
        raise usage_error(
            f"-o {out}: frames give a .flo and a .png per pair, not {suffix} (a video "
            "input gives a flow video); give -o with .flo, .png or no suffix"
        )


def _png_bytes(picture: np.ndarray) -> bytes:
    image_module = require("PIL.Image")
    buffer = io.BytesIO()
    image_module.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(options: RunOptions, path: Path, data: bytes, files: List[str]) -> None:
    with options.open_output(path) as handle:
        handle.write(data)
    files.append(str(path))


def _write_arrays(options: RunOptions, flow: np.ndarray, files: List[str]) -> None:
    """--npy/--npz: ``flow`` into the file, with no copy of it in memory."""
    assert options.output is not None  # the CLI requires -o OUT.npy / OUT.npz
    with options.open_output(options.output) as handle:
        if options.arrays == "npy":
            np.save(handle, flow)
        else:
            np.savez(handle, flow=flow)
    files.append(str(options.output))


def run_task(pipeline: FlowPipeline, inputs: List[str], options: RunOptions) -> List[dict]:
    """``perceiver-convert run flow MODEL INPUT...``.

    INPUT is two or more frames (the flow of each consecutive pair) or one video (the
    flow of each consecutive frame pair, drawn as a video). Files (``OUT`` = ``-o``
    without its suffix; default ``<first input>.flow`` next to it; ``-o FOLDER`` puts
    that name in FOLDER):

    * frames: ``OUT.flo`` (Middlebury) and ``OUT.png`` (colour picture, ``--render``);
      several pairs: ``OUT_0000.flo``, ``OUT_0000.png``, ... (index of the pair's
      first frame);
    * a video: ``OUT.mp4`` (H.264; ``-o X.mov``/``X.mkv`` in QuickTime/Matroska,
      ``-o X.gif`` for a GIF; another picture, sound or video suffix such as
      ``X.webm`` is refused before any work, exit 2) of the colour pictures at
      the input's frame rate, the wheel's saturation scaled to the largest flow of
      the whole video so that colours compare across frames;
    * ``--npy``/``--npz``: only the raw flow in pixels, [H, W, 2] for one pair,
      [N, H, W, 2] for several pairs or a video (``--npz``: key ``flow``).

    Every frame is read and checked first (an unreadable frame, or a pair of two
    sizes, among thousands fails before the model runs), keeping only its notes and
    its size; the frames are then read again, each once (two frames, one pair, are
    read once and kept: they are held for its flow anyway), and each pair's files are
    written (staged by the CLI) as soon as its flow is computed, so that memory
    holds two frames and one flow, not all of them (``--npy``/``--npz`` of several
    pairs: each flow goes to disk as it is computed, :class:`~.spool.DiskSpool`, then into
    the output). A frame that cannot be read twice (a pipe:
    :func:`~.base.readable_twice`) keeps its first read. The lines are printed when
    every pair has its flow, as when all were computed at once. A video is likewise
    decoded whole first (:meth:`FlowPipeline.video`: a frame that cannot be decoded or
    a change of size is named before the model runs), then again for its pairs
    (:func:`_run_video`).
    """
    # Every output's path (its folder, writable; not a folder itself, not an input:
    # one read after it was written would be this run's output) before any work, as
    # the CLI's.
    check_output_paths(planned_outputs(inputs, options), inputs)
    render = options.extra.get("render") or "wheel"
    pipeline.pad = bool(options.extra.get("pad", pipeline.pad))
    pipeline.progress = options.progress
    if _is_video_run(inputs):
        return [_run_video(pipeline, inputs[0], options, render)]
    # Notes on each frame (a very large file) go with the first pair it is in.
    notes: List[List[str]] = [[] for _ in inputs]
    reads: TwoReads[np.ndarray] = TwoReads()
    # One pair's two frames are held for its flow anyway: reading them again would
    # only double the decoding (and refuse a file touched meanwhile).
    one_pair = len(inputs) == 2
    for path, frame_notes in zip(inputs, notes):
        reads.first(lambda: _still_frame(path, frame_notes), path,
                    keep=one_pair or not readable_twice(path))
    pairs = len(inputs) - 1
    for i in range(pairs):
        try:
            pipeline._check_pair(reads.shapes[i], reads.shapes[i + 1])
        except InputError as error:
            # Among many frames, say which pair ("the two frames differ in size").
            raise InputError(f"{inputs[i]} -> {inputs[i + 1]}: {error}") from None
    targets = _pair_targets(inputs, options)
    single: Optional[np.ndarray] = None  # --npy/--npz of one pair: its (H, W, 2)
    files: List[str] = []
    documents = []
    lines: List[str] = []
    # --npy/--npz of several pairs: (N, H, W, 2), each flow kept on disk as it is
    # computed (_flow_spill), not in memory, then copied into the output.
    spilling = bool(options.arrays) and pairs > 1
    with (_flow_spill(Path(options.output).parent) if spilling
          else contextlib.nullcontext()) as spill:
        first = _frame_again(inputs, 0, reads)
        for i in range(pairs):
            second = _frame_again(inputs, i + 1, reads)
            try:
                # Read (and noted) once, by _still_frame.
                result = pipeline._flow_of_rgb(first, second, [])
            except InputError as error:
                raise InputError(f"{inputs[i]} -> {inputs[i + 1]}: {error}") from None
            result.notes.extend(notes[i] + (notes[i + 1] if i == pairs - 1 else []))
            first = second
            written: List[str] = []
            if spilling:
                spill.append(result.flow[None])
            elif options.arrays:
                single = result.flow
            else:
                flo, png = targets[i]
                _write(options, flo, result.flo_bytes(), written)
                _write(options, png, _png_bytes(result.picture(render)), written)
            documents.append(_pair_document(inputs[i], inputs[i + 1], result, written))
            lines.append(_pair_line(inputs[i], inputs[i + 1], result))
            lines.extend(f"  note: {note}" for note in result.notes)
            del result, second
        if spilling:
            _write_spilled_arrays(options, spill)
            files.append(str(options.output))
        elif options.arrays:
            _write_arrays(options, single, files)
    if options.arrays:
        for document in documents:  # every pair's document names the arrays' file
            document["files"] = list(files)
    for line in lines:
        options.echo(line)
    return documents


def _frame_again(inputs: Sequence[str], index: int, reads: TwoReads[np.ndarray]) -> np.ndarray:
    """Frame ``index`` read again for its pairs, or its first read where it was kept
    (a pipe, one pair; :class:`~.base.TwoReads`)."""
    # Noted on its first read.
    return reads.again(index, lambda: _still_frame(inputs[index], []), inputs[index])


def _is_video_run(inputs: Sequence[str]) -> bool:
    """True for one video, False for two or more frames; raises PipelineError (exit 2)
    for anything else (the same check before and during the run).

    A GIF is both a picture format and an animation: alone it is a video (the flow of
    its frames), among other inputs a frame (:func:`_still_frame` refuses an animated
    one there). The answer comes from the names alone: the outputs are planned before
    any input is read."""
    several = len(inputs) > 1
    videos = [
        is_video_path(i) and not (several and Path(i).suffix.lower() == ".gif")
        for i in inputs
    ]
    if any(videos):
        if len(inputs) != 1:
            error = PipelineError(
                "flow takes one video or two or more frames, not a mix or several videos"
            )
            error.exit_code = 2
            raise error
        return True
    if len(inputs) < 2:
        error = PipelineError(
            f"flow needs two frames (or a video); got only {inputs[0]}: give the next "
            "frame too (a video is known by its suffix: "
            f"{', '.join(s for s in VIDEO_SUFFIXES)})"
        )
        error.exit_code = 2
        raise error
    return False


# Formats whose files may hold several pictures: an animated GIF, APNG or WebP, or a
# multi-page TIFF among the frames would be read as its first picture only, silently.
# (Not MPO: a camera JPEG with an embedded preview has two "frames" and is one photo.)
_ANIMATION_FORMATS = {
    "GIF": ("an animated GIF", "frames"),
    "PNG": ("an animated PNG (APNG)", "frames"),
    "WEBP": ("an animated WebP", "frames"),
    "TIFF": ("a multi-page TIFF", "pages"),
}


def _still_frame(path: str, notes: List[str]) -> np.ndarray:
    """One frame INPUT as RGB; a file of an animation format (GIF, APNG, WebP) or a
    TIFF must hold one picture. ``notes`` as :func:`~.image.load_rgb`'s. The file is
    opened once, so that a pipe (``<(cat frame.png)``) can be a frame."""

    def refuse_several_pictures(opened: Any) -> None:
        kind = _ANIMATION_FORMATS.get(str(opened.format or "").upper())
        if kind is None:
            return
        try:
            count = int(getattr(opened, "n_frames", 1))
        except Exception:  # noqa: BLE001 - Pillow raises many types for a bad page list
            count = 1  # a damaged list of pages: its first picture is read
        finally:
            with contextlib.suppress(Exception):
                opened.seek(0)  # counting went through the pages
        if count > 1:
            advice = (
                "give it alone for the flow of its frames, or give still frames"
                if Path(path).suffix.lower() == ".gif"
                else "give its pictures as still frames or as a video (MP4, GIF, ...)"
            )
            error = PipelineError(f"{path} is {kind[0]} ({count} {kind[1]}): {advice}")
            error.exit_code = 2
            raise error

    try:
        rgb = read_image_file(path, notes, check=refuse_several_pictures)
    except InputError as error:
        if str(path) in str(error):
            raise
        raise InputError(f"{path}: {error}") from None  # its pixels (NaN): which frame
    return _frame_array(rgb)


def _pair_targets(inputs: Sequence[str], options: RunOptions) -> List[Tuple[Path, Path]]:
    """(OUT.flo, OUT.png) of each consecutive frame pair (``OUT_0000.flo``, ... for
    several pairs)."""
    base, _ = _output_base(inputs, options)
    pairs = len(inputs) - 1
    targets = []
    for i in range(pairs):
        stem = base if pairs == 1 else base.with_name(f"{base.name}_{i:04d}")
        targets.append((stem.with_name(stem.name + ".flo"), stem.with_name(stem.name + ".png")))
    return targets


def _video_target(inputs: Sequence[str], options: RunOptions) -> Path:
    base, suffix = _output_base(inputs, options)
    return base.with_name(base.name + suffix)


def planned_outputs(inputs: List[str], options: RunOptions) -> List[Path]:
    """``TaskSpec.outputs`` of flow: the files :func:`run_task` writes for ``inputs``
    (worked out from the names alone, before any frame is read)."""
    video = _is_video_run(inputs)
    if options.arrays:
        assert options.output is not None  # the CLI requires -o OUT.npy / OUT.npz
        planned = [options.output]
    elif video:
        planned = [_video_target(inputs, options)]
    else:
        planned = [path for pair in _pair_targets(inputs, options) for path in pair]
    # After the name checks (usage errors first); before the model is loaded, and
    # before a missing first input's folder is refused as the output's.
    require_existing_files(inputs)
    return planned


def _magnitude(flow: np.ndarray) -> float:
    return float(np.sqrt((flow.astype(np.float64) ** 2).sum(-1)).max())


def _pair_document(a: str, b: str, result: FlowResult, files: List[str]) -> Dict[str, Any]:
    """A frame pair's ``run --json`` document: :meth:`FlowResult.as_dict` with the
    pair's ``"input"`` and the ``"files"`` written."""
    return {"input": [a, b], **result.as_dict(), "files": list(files)}


def _pair_line(a: str, b: str, result: FlowResult) -> str:
    height, width = result.flow.shape[:2]
    u, v = result.flow.reshape(-1, 2).mean(0)
    return (
        f"{a} -> {b}: {width}x{height}, {result.tiles} tiles, mean flow ({u:+.2f}, "
        f"{v:+.2f}) px, max |flow| {_magnitude(result.flow):.2f} px"
    )


def _run_video(pipeline: FlowPipeline, path: str, options: RunOptions, render: str) -> Dict[str, Any]:
    """The flow of a video, drawn as a video or (``--npy``/``--npz``) stacked.

    Memory is that of a frame pair or two (frames, flows, a picture), however long
    the video: ``--render hsv`` draws each flow as it is computed and hands the
    picture to the encoder; the wheel (the default), which scales every picture by
    the largest flow of the whole video, and the arrays' output, which is every flow,
    get the flows from disk instead: each is written, as it is computed, to an
    anonymous temporary file in the output's folder (:class:`~.spool.DiskSpool`; as large
    as the ``.npy``, gone when the run ends, however it ends), then read back one at
    a time to be drawn, or copied a flow at a time into the ``.npy`` (the ``.npz``'s
    member). A GIF, which Pillow makes whole, holds every picture
    (:func:`~.media.write_video`). The summary's numbers are gathered flow by flow
    (:class:`_VideoFlowSummary`)."""
    rate = video_frame_rate(path)
    fps = float(rate) if rate else 25.0
    declared = video_frame_count(path)  # for the missing-frames note
    # For the bar only: Matroska, WebM and MPEG-TS declare no count, and their
    # duration gives an estimate.
    frames = declared or estimated_frame_count(path)
    flows: Iterable[np.ndarray] = pipeline.video(path)
    if frames > 1:  # a length known or estimated: show a bar over the pairs
        flows = options.progress(flows, frames - 1, "flow frames")
    summary = _VideoFlowSummary()
    flows = summary.follow(flows)
    first = next(flows, None)  # before any output: a video of one frame writes none
    if first is None:
        raise InputError(f"{path} has a single frame; flow needs at least two")
    flows = _first_then(first, flows)
    del first
    if options.arrays:
        assert options.output is not None  # the CLI requires -o OUT.npy / OUT.npz
        target = options.output
    else:
        target = _video_target([path], options)
    if render == "hsv" and not options.arrays:
        pictures = (render_flow(f, "hsv") for f in flows)  # computed as encoded
        with options.output_path(target) as temp:
            write_video(temp, pictures, fps)
    else:
        with _flow_spill(Path(target).parent) as spill:
            scale = 0.0  # the wheel's: the largest finite length of every flow
            for flow in flows:
                spill.append(flow[None])
                if not options.arrays:
                    scale = max(scale, max_magnitude(flow))
            del flow
            if options.arrays:
                _write_spilled_arrays(options, spill)
            else:
                pictures = (render_flow(f, "wheel", scale) for f in spill)
                with options.output_path(target) as temp:
                    write_video(temp, pictures, fps)
    files = [str(target)]
    height, width = summary.size
    largest = summary.largest()
    options.echo(
        f"{path}: {summary.pairs} frame pairs, {width}x{height}, max |flow| "
        f"{largest:.2f} px"
    )
    missing = missing_frames_note(declared, summary.pairs + 1)
    # pipeline.video yields bare arrays: the note flow_of gives each pair, once here.
    unknown = non_finite_note(summary.non_finite, pipeline.model, "those flow vectors are unknown")
    notes = [note for note in (missing, unknown) if note is not None]
    for note in notes:
        options.echo(f"  note: {note}")
    return {
        "input": path,
        "size": [height, width],
        "pairs": summary.pairs,
        "fps": fps,
        "max_flow": largest,
        "files": files,
        "notes": notes,
    }


def _first_then(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """``first``, then ``rest``, ``first`` held no longer than it is in use
    (``itertools.chain([first], rest)`` keeps its arguments to the end)."""
    yield first
    del first
    yield from rest


class _VideoFlowSummary:
    """What a video's summary line and document say of its flows, gathered as they
    pass (:meth:`follow`), so that no stack of them is needed: their count, size,
    the largest length (:meth:`largest`) and the count of non-finite values."""

    def __init__(self) -> None:
        self.pairs = 0
        self.size: Tuple[int, int] = (0, 0)
        self.non_finite = 0
        self._largest: List[float] = []  # each flow's largest length (NaN if any is)

    def follow(self, flows: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """``flows`` unchanged, each counted as it passes."""
        for flow in flows:
            self.pairs += 1
            self.size = (int(flow.shape[0]), int(flow.shape[1]))
            self._largest.append(_magnitude(flow))
            self.non_finite += non_finite_count(flow)
            yield flow

    def largest(self) -> float:
        """:func:`_magnitude` of all the flows together: NaN where any length is (as
        NumPy's max over them all), else the largest."""
        return float(np.max(self._largest))


def _flow_spill(folder: Path) -> DiskSpool:
    """A :class:`~.spool.DiskSpool` for flows (H, W, 2), one row each (a 1080p flow
    is 16.6 MB: a 10 s clip at 30 fps, 5 GB), in ``folder`` (the output's)."""
    return DiskSpool(
        folder, "the flows",
        "a video's wheel scale and --npy/--npz need every flow, which are kept there "
        "rather than in memory",
    )


def _write_spilled_arrays(options: RunOptions, spill: DiskSpool) -> None:
    """--npy/--npz of a video or of several frame pairs: the flows in ``spill``
    written as :func:`_write_arrays` writes their stack (the same bytes), a flow at a
    time."""
    assert options.output is not None  # the CLI requires -o OUT.npy / OUT.npz
    with options.open_output(options.output) as handle:
        if options.arrays == "npy":
            spill.write_npy(handle)
        else:
            write_npz(handle, flow=spill)


# --------------------------------------------------------------------------------------
# perceiver-convert demo


def textured_pair(height: int, width: int, shift: Tuple[int, int] = (1, 2), seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """A smooth random texture and the same texture moved by ``shift`` = (dy, dx) px
    (the true flow is (dx, dy) everywhere away from the border): (H, W, 3) uint8 each."""
    rng = np.random.default_rng(seed)
    dy, dx = shift
    coarse = rng.random((height // 4 + 3, width // 4 + 3, 3))
    big = np.kron(coarse, np.ones((4, 4, 1)))[: height + abs(dy), : width + abs(dx)]
    big = (big * 255).astype(np.uint8)
    first = big[abs(dy) : abs(dy) + height, abs(dx) : abs(dx) + width]
    second = big[abs(dy) - dy : abs(dy) - dy + height, abs(dx) - dx : abs(dx) - dx + width]
    return np.ascontiguousarray(first), np.ascontiguousarray(second)


def demo_task(model: torch.nn.Module, folder: Path, options: RunOptions) -> Dict[str, str]:
    """Flow of a generated frame pair (a texture moved 2 px right, 1 px down)."""
    image_module = require("PIL.Image")
    th, tw = model.config.image_size
    first, second = textured_pair(th + 16, tw + 24)
    paths = [folder / "frame0.png", folder / "frame1.png"]
    from .media import atomic_path

    # Each file appears whole or not at all (demo --workdir --force replaces them).
    for path, frame in zip(paths, (first, second)):
        with atomic_path(path) as temp:
            image_module.fromarray(frame).save(temp)
    pipeline = FlowPipeline(model)
    result = pipeline(paths[0], paths[1])
    with atomic_path(folder / "flow.flo") as temp:
        temp.write_bytes(result.flo_bytes())
    with atomic_path(folder / "flow.png") as temp:
        temp.write_bytes(_png_bytes(result.picture()))
    u, v = result.flow.reshape(-1, 2).mean(0)
    return {
        "task": "flow",
        "input": f"2 frames {first.shape[1]}x{first.shape[0]} (moved +2, +1 px)",
        "answer": (
            f"mean flow ({u:+.2f}, {v:+.2f}) px (random weights: noise), "
            f"{result.tiles} tiles -> flow.flo, flow.png"
        ),
    }
