"""Autoencode: a video and its sound through the Kinetics-700 autoencoder in 16-frame
clips, as DeepMind's video autoencoding colab does, with the reconstruction, its sound
and the top-k Kinetics-700 labels of each clip.

The colab's procedure (:class:`AutoencodePipeline`):

1. Frames decoded in order (PyAV; the colab uses OpenCV's reader, both FFmpeg) and
   converted to 8-bit RGB as that reader converts them (bicubic libswscale to BGR,
   channels swapped: the same pixels for 10-bit video too; the BT.601 matrix and the
   range the pixel format implies, whatever colour tags the video carries, as OpenCV 4
   reads BT.709 and full-range clips), each centre-square-cropped
   as the colab's ``crop_center_square`` (side = min(H, W), origin ``(W // 2) -
   (side // 2)``, the same for H) and resized to the model's size
   (224x224) with ``cv2.resize``'s default INTER_LINEAR, then RGB / 255 (float64,
   given to the model as float32) (:func:`preprocess_frame`).
2. Sound from the video's first sound track or from a separate file (``audio=``),
   first channel, resampled with FFmpeg's libswresample to the model's rate when it
   differs, as 16-bit samples / 32768, as the colab's 16-bit WAV holds them
   (:func:`~.media.read_audio`; sound given as an array is taken as it is). The rate is the model's
   samples per frame x 25 frames/s: 1920 x 25 = 48 kHz officially (the colab's
   ``48000 // 25``); tiny test models with 64 samples per frame run at 1600 Hz.
3. Consecutive clips of ``num_frames`` frames (16) and ``num_frames x 1920`` samples,
   the remaining frames dropped (reported in :attr:`AutoencodeResult.dropped_frames`);
   a sound track shorter than the clips is padded with silence (reported too; the
   colab would fail). The frames are taken as 25 frames/s whatever the video's rate,
   as the colab (it never reads the rate): a 50 fps video gets 1920 samples (1/25 s)
   per frame, so its reconstruction plays at half speed and out of step with its
   sound. Frames are not resampled; a video more than 1% off 25 fps gets a note.
4. Each clip encoded once and decoded in the colab's chunks
   (:meth:`perceiver_torch.VideoAutoencoder.reconstruct`, ``num_chunks`` 128 by
   default; the colab re-encodes for every chunk, with the same result).

Outputs: the reconstructed frames (T, H, W, 3) in [0, 1] (unclipped), the
reconstructed sound, the label logits per clip (the label input is always masked, so
they are the model's guess of the clip's class), and the PSNR of each clip's frames
(clipped to [0, 1], as the colab's ``to_gif``) against the model's input frames:
``10 log10(1 / MSE)`` over all pixels and channels.

Memory: the clips are independent, so :meth:`AutoencodePipeline.clips` goes clip by
clip: a video file is decoded, and a sound file read, as the clips need them (each is
decoded once before, only to check it, one frame or piece held at a time, keeping the
video's frame count and first frame size and the sound's length: their decoding
errors come before the model runs, and a file changed between the two reads is
refused; not a name for an open descriptor such as ``/dev/stdin``, decoded once), and
each clip's frames are preprocessed (9.6 MB of float32 for 16 frames of 224x224) and
autoencoded in turn, with nothing of the earlier clips kept but their PSNR and
labels; the pipeline call gathers every clip into one :class:`AutoencodeResult` (a
one-minute 25 fps video: 0.9 GB of input frames and as much of reconstructed ones),
and ``perceiver-convert run autoencode`` writes each clip's reconstruction away as it
comes (:func:`run_task`; with several videos, each is checked so before the first
one's first clip, keeping only the counts of each). Frames or sound given as arrays
are the caller's, held as given.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union,
)

import numpy as np
import torch

from ..inputs import InputError as ModelInputError
from ..labels import class_names
from .image import is_path
from .base import (
    InputError,
    PipelineError,
    Progress,
    RunOptions,
    check_model,
    check_output_paths,
    check_weights,
    eval_mode,
    host_tensor,
    no_progress,
    non_finite_count,
    non_finite_note,
    positive_int,
    readable_twice,
    refuse_array_suffix_without_flag,
    require,
    require_existing_files,
    softmax_top_k,
    usage_error,
)
from .media import (
    MEDIA_SUFFIXES,
    WRITTEN_VIDEO_SUFFIXES,
    SoundReader,
    VideoCheck,
    VideoWriter,
    check_video,
    encode_wav,
    estimated_frame_count,
    iter_video_frames,
    missing_frames_note,
    video_frame_count,
    video_frame_rate,
    wav_header,
    write_video,
)
from .spool import DiskSpool, write_npz

__all__ = [
    "AutoencodeClips",
    "AutoencodePipeline",
    "AutoencodeResult",
    "ClipReconstruction",
    "ClipResult",
    "MODEL_FPS",
    "crop_center_square",
    "demo_task",
    "preprocess_frame",
    "psnr",
    "run_task",
]

#: The frame rate the colab assumes (``AUDIO_SAMPLES_PER_FRAME = 48000 // 25``).
MODEL_FPS = 25

VideoInput = Union[str, Path, np.ndarray, Iterable[np.ndarray]]
AudioInput = Union[str, Path, np.ndarray, torch.Tensor, Iterable[float], None]


def crop_center_square(frame: np.ndarray) -> np.ndarray:
    """The colab's ``crop_center_square``: the largest centred square of (H, W, C)."""
    y, x = frame.shape[0:2]
    side = min(y, x)
    start_x = (x // 2) - (side // 2)
    start_y = (y // 2) - (side // 2)
    return frame[start_y : start_y + side, start_x : start_x + side]


def preprocess_frame(frame: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """One (H, W, 3) uint8 RGB frame -> (size[0], size[1], 3) float32 in [0, 1]:
    centre square, ``cv2.resize`` (INTER_LINEAR, OpenCV's default, on the uint8
    pixels as the colab), / 255 in float64."""
    cv2 = require("cv2")
    square = np.ascontiguousarray(crop_center_square(np.asarray(frame, dtype=np.uint8)))
    resized = cv2.resize(square, (int(size[1]), int(size[0])))  # dsize is (W, H)
    return (resized.astype(np.float64) / 255.0).astype(np.float32)


def psnr(reconstruction: np.ndarray, reference: np.ndarray) -> float:
    """``10 log10(1 / MSE)`` in dB of images in [0, 1] (``reconstruction`` clipped to
    [0, 1] first); ``inf`` when they are equal."""
    recon = np.clip(reconstruction.astype(np.float64), 0.0, 1.0)
    mse = float(np.mean((recon - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


@dataclass
class ClipResult:
    """One clip: frames [start, stop), its PSNR (dB), its top-k labels
    ``[(label, index, probability)]``."""

    start: int
    stop: int
    psnr: float
    top_k: List[Tuple[str, int, float]]

    def as_dict(self) -> Dict[str, Any]:
        return {
            "frames": [self.start, self.stop],
            "psnr": None if math.isinf(self.psnr) else self.psnr,
            "top_k": [
                {"label": label, "index": index, "probability": p}
                for label, index, p in self.top_k
            ],
        }


@dataclass
class AutoencodeResult:
    """The autoencoding of a video.

    Attributes:
        frames: reconstructed frames (T, H, W, 3) float32, nominally [0, 1], unclipped.
        audio: reconstructed sound (T * samples_per_frame,) float32.
        label_logits: (clips, classes) float32.
        clips: per clip, its PSNR and top-k labels.
        inputs: the model's input frames (T, H, W, 3) float32 in [0, 1].
        input_audio: the model's input sound (same length as ``audio``).
        sample_rate: of both sounds (Hz); ``fps``: the model's frame rate (25).
        dropped_frames: frames after the last whole clip, not autoencoded.
        padded_samples: silence added where the sound track was shorter than the clips.
        notes: human-readable remarks (dropped frames, padding, resampling).
    """

    frames: np.ndarray
    audio: np.ndarray
    label_logits: np.ndarray
    clips: List[ClipResult]
    inputs: np.ndarray
    input_audio: np.ndarray
    sample_rate: int
    fps: int
    dropped_frames: int = 0
    padded_samples: int = 0
    notes: List[str] = field(default_factory=list)

    def video_uint8(self) -> np.ndarray:
        """The frames as the colab's ``to_gif`` shows them: clip(x * 255, 0, 255),
        truncated to uint8. (T, H, W, 3). A NaN value (outputs that are not finite,
        which the notes name) is 0, black (NumPy's cast of NaN is undefined)."""
        return _video_uint8(self.frames)

    def as_dict(self) -> Dict[str, Any]:
        """A JSON-able summary, not the arrays (``frames``, ``audio`` and
        ``label_logits`` hold those): ``"clips"`` (:meth:`ClipResult.as_dict` each:
        frames [start, stop), PSNR (null when infinite), top-k labels), ``"frames"``
        (the count of reconstructed frames), ``"size"`` [H, W] (of each frame),
        ``"dropped_frames"``,
        ``"padded_samples"``, ``"sample_rate"``, ``"fps"`` and ``"notes"``.
        ``perceiver-convert run autoencode --json`` prints it for each video, with
        ``"input"``, ``"audio"`` (the --audio file or null) and ``"files"`` added."""
        return _summary(self, int(self.frames.shape[0]), self.frames.shape[1:3])


def _video_uint8(frames: np.ndarray) -> np.ndarray:
    """:meth:`AutoencodeResult.video_uint8` of ``frames`` (any number of them)."""
    return np.clip(np.nan_to_num(frames * 255, nan=0.0), 0, 255).astype(np.uint8)


def _summary(result: Any, frames: int, size: Sequence[int]) -> Dict[str, Any]:
    """:meth:`AutoencodeResult.as_dict` of ``result`` (an AutoencodeResult or a
    finished :class:`AutoencodeClips`) with ``frames`` reconstructed frames of
    ``size`` (H, W)."""
    return {
        "clips": [clip.as_dict() for clip in result.clips],
        "frames": frames,
        "size": [int(v) for v in size],
        "dropped_frames": result.dropped_frames,
        "padded_samples": result.padded_samples,
        "sample_rate": result.sample_rate,
        "fps": result.fps,
        "notes": list(result.notes),
    }


@dataclass
class ClipReconstruction:
    """One clip's autoencoding, as :meth:`AutoencodePipeline.clips` yields them.

    Attributes:
        clip: its frames [start, stop), PSNR and top-k labels.
        frames: reconstructed frames (t, H, W, 3) float32, nominally [0, 1], unclipped
            (t: the model's ``num_frames``, 16).
        audio: reconstructed sound (t * samples_per_frame,) float32.
        label_logits: (classes,) float32.
        inputs: the model's input frames (t, H, W, 3) float32 in [0, 1].
        input_audio: the model's input sound (same length as ``audio``; silence where
            the sound track had ended).
    """

    clip: ClipResult
    frames: np.ndarray
    audio: np.ndarray
    label_logits: np.ndarray
    inputs: np.ndarray
    input_audio: np.ndarray

    def video_uint8(self) -> np.ndarray:
        """The frames as :meth:`AutoencodeResult.video_uint8` gives them (t, H, W, 3)."""
        return _video_uint8(self.frames)


class AutoencodePipeline:
    """Autoencodes videos with a ``video_autoencoding`` model (see the module doc).

    Args:
        model: a :class:`perceiver_torch.VideoAutoencoder`.
        num_chunks: decoder chunks per clip, from 1 to the smaller of the clip's
            audio patches and image points (None: the config's, 128 officially; any
            count gives the same values up to float rounding).
        top_k: labels reported per clip, at least 1 (more than the classes gives
            them all).
        progress: :data:`~.base.Progress` for the loop over clips; its total is
            the clips of the frame count a video file declares or, where it declares
            none (Matroska, WebM, MPEG-TS), of an estimate from its duration
            (:func:`~.media.estimated_frame_count`: the clips that come may be
            more or fewer); none is given, and no bar drawn, for a video of
            unknown length.

    ``pipeline(video, audio=None)``: ``video`` a file path or uint8 frames
    (T, H, W, 3) RGB (an array, or any iterable of (H, W, 3) frames of one size: a
    list, a tuple, a generator); ``audio`` None (the
    video's sound track), a sound file path, or samples (S,) or (S, channels) at
    :attr:`sample_rate`: floats in [-1, 1], or integer PCM of 8 to 32 bits (int16,
    int32, uint8, ...) scaled to [-1, 1] by its type's range as WAV files are (int16:
    x / 32768; unsigned: centred on half the range, uint8: (x - 128) / 128), as a
    numpy array, a torch tensor or any iterable of samples (a list, a tuple, a
    generator of floats). 64-bit integers, NaN and infinite samples,
    non-numbers and (channels, S) arrays (torchaudio's layout: more channels than
    samples; give ``audio.T``) are refused. Returns an
    :class:`AutoencodeResult`, which holds the whole video's input and reconstructed
    frames and sound; ``pipeline.clips(video, audio=None)`` (same arguments) yields
    each clip's instead, holding one clip at a time (:class:`AutoencodeClips`).
    """

    task = "autoencode"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_chunks: Optional[int] = None,
        top_k: int = 5,
        progress: Progress = no_progress,
    ) -> None:
        check_model(model, "autoencode", ("video_autoencoding",))
        check_weights(model, "autoencode")
        self.model = model  # run in eval mode, call by call (eval_mode)
        config = model.config
        self.num_frames = int(config.num_frames)
        self.size = tuple(int(v) for v in config.image_size)
        self.samples_per_frame = int(config.audio_samples_per_frame)
        self.sample_rate = self.samples_per_frame * MODEL_FPS
        # Only None means the default (0 is an error, not "the default"), checked now
        # by the model's own rule rather than after a video has been decoded.
        chunks = config.num_chunks if num_chunks is None else num_chunks
        if isinstance(chunks, numbers.Integral) and not isinstance(chunks, bool):
            chunks = int(chunks)
        try:
            model.chunk_subsamples(chunks, torch.device("meta"))  # shapes only, no memory
        except ModelInputError as error:
            raise usage_error(str(error)) from None
        self.num_chunks = chunks
        self.labels = class_names(int(config.num_classes), "kinetics700")
        self.top_k = positive_int(top_k, "top_k")
        self.progress = progress

    # -- inputs ------------------------------------------------------------------------

    def load_frames(self, video: VideoInput) -> np.ndarray:
        """Every frame preprocessed: (T, H, W, 3) float32 in [0, 1] (the whole video:
        :meth:`clips` preprocesses a clip's frames at a time).

        No frames (an empty array, list or generator) give (0, H, W, 3), which
        the pipeline call refuses as a video of 0 frames.

        Raises:
            InputError: frames that are not uint8 (T, H, W, 3), frames of width or
                height 0, or frames of different sizes (the first odd one named by
                its number from 0).
        """
        if is_path(video):
            raw: Iterable[np.ndarray] = iter_video_frames(os.fspath(video))
        else:
            raw = self._frame_array(video)
        frames = [preprocess_frame(f, self.size) for f in raw]
        return np.stack(frames) if frames else np.zeros((0, *self.size, 3), np.float32)

    def _frame_array(self, video: VideoInput) -> np.ndarray:
        """Frames given as an array, tensor or iterable, checked (:meth:`load_frames`'
        errors): (T, H, W, 3) uint8, not yet preprocessed."""
        if not isinstance(video, (np.ndarray, torch.Tensor)) and isinstance(video, Iterable):
            # A generator of frames as a list; np.asarray would make it a 0-d
            # object array, refused as "got object ()".
            video = list(video)
            if not video:
                # np.asarray([]) is float64 (0,): refused as "must be uint8
                # (T, H, W, 3)" where an empty array says it has 0 frames.
                return np.zeros((0, *self.size, 3), np.uint8)
            # np.asarray would fail with NumPy's "inhomogeneous shape" message.
            shapes = [np.shape(frame) for frame in video]
            odd = next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)
            if odd is not None:
                raise InputError(
                    f"the frames differ in size: frame 0 is {shapes[0]}, frame {odd} "
                    f"is {shapes[odd]}; give frames of one size (T, H, W, 3)"
                )
        if isinstance(video, torch.Tensor):
            video = host_tensor(video, "video frames")
        elif isinstance(video, list):
            video = [
                host_tensor(f, "video frames") if isinstance(f, torch.Tensor) else f
                for f in video
            ]
        array = np.asarray(video)
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            hint = (
                " (PyTorch's (T, 3, H, W) layout: .permute(0, 2, 3, 1) gives it)"
                if array.ndim == 4 and array.shape[1] == 3
                else ""
            )
            raise InputError(
                f"video frames must be uint8 (T, H, W, 3) RGB, got {array.dtype} "
                f"{array.shape}{hint}"
            )
        if len(array) and 0 in array.shape[1:3]:
            # cv2.resize fails on them with an assertion on "!ssize.empty()".
            raise InputError(
                f"the video frames are empty ({array.shape[2]}x{array.shape[1]} px, "
                "width x height); give frames of at least 1x1 px"
            )
        return array

    def load_audio(self, video: VideoInput, audio: AudioInput, notes: List[str]) -> np.ndarray:
        """The sound at :attr:`sample_rate`, first channel, (S,) float32 (integer
        samples scaled to [-1, 1], see the class docstring); the whole of it (a sound
        file is read piece by piece by :meth:`clips`).

        Raises:
            InputError: no sound, a wrong shape, NaN or infinite samples.
        """
        source = self._sound_source(video, audio, notes)
        if isinstance(source, SoundReader):
            with source:
                pieces = list(source)
            return _finite_sound(np.concatenate(pieces) if pieces else np.zeros(0, np.float32))
        return source

    def _sound_source(
        self, video: VideoInput, audio: AudioInput, notes: List[str]
    ) -> Union[SoundReader, np.ndarray]:
        """The sound of ``video``/``audio`` (:meth:`load_audio`'s checks): a file's as
        a :class:`~.media.SoundReader` at :attr:`sample_rate`, not yet decoded (its
        notes added to ``notes``; its samples are 16-bit ones scaled, so finite), or
        the samples given, checked and scaled, whole."""
        separate = audio is not None  # a sound file of its own (--audio), not the video's
        if audio is None:
            if not is_path(video):
                raise InputError("frames given as an array need their sound: pass audio=")
            audio = video
        if not is_path(audio):
            return self._samples(audio)
        audio = os.fspath(audio)
        try:
            sound = SoundReader(audio, self.sample_rate)
        except InputError as error:
            if not separate or "no sound track" not in str(error):
                raise
            # SoundReader's advice ("give the sound ... with --audio") is for a video
            # without sound; this file was given as the sound.
            raise InputError(
                f"{audio}, given as the sound (--audio; audio= in Python), has no sound "
                "track; give a sound file (WAV, FLAC, MP3, ...) or a video with sound"
            ) from None
        if sound.source_rate != self.sample_rate:
            notes.append(f"sound resampled from {sound.source_rate} Hz to {self.sample_rate} Hz")
        if sound.channels > 1:
            notes.append(f"first of {sound.channels} sound channels used")
        return sound

    def _samples(self, audio: Any) -> np.ndarray:
        """Sound given as samples (an array, tensor or iterable): checked, first
        channel, float32 in [-1, 1] (:meth:`load_audio`)."""
        if isinstance(audio, (bytes, bytearray, memoryview)):
            # A file's contents, most likely: NumPy would read a bytearray or
            # memoryview as uint8 samples (a WAV header played as sound) and bytes as
            # strings. Raw PCM goes in as an array of its type.
            raise InputError(
                f"audio samples must be numbers (float in [-1, 1] or integer PCM), got "
                f"{type(audio).__name__} of {len(audio)} bytes; a sound file goes in as "
                "its path, raw PCM as an array (np.frombuffer(data, np.int16))"
            )
        if isinstance(audio, torch.Tensor):
            audio = host_tensor(audio, "audio samples")
            if audio.is_floating_point() and audio.dtype != torch.float64:
                audio = audio.float()  # NumPy has no bfloat16
            audio = audio.numpy()
        elif isinstance(audio, Iterable) and not isinstance(audio, np.ndarray):
            # A generator of samples as a list, as load_frames does (np.asarray would
            # make it a 0-d object array, "not numbers").
            audio = list(audio)
        raw = np.asarray(audio)
        if raw.dtype == np.bool_ or not (
            np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)
        ):
            raise InputError(
                f"audio samples must be numbers (float in [-1, 1] or integer PCM), got "
                f"{raw.dtype}; a sound file goes in as its path"
            )
        if np.issubdtype(raw.dtype, np.integer):
            if raw.dtype.itemsize > 4:
                # No PCM is 64-bit: such arrays are mostly Python ints (np.asarray's
                # default), whose scale no type says.
                raise InputError(
                    f"audio samples of {raw.dtype} are not PCM; give float samples in "
                    "[-1, 1] or integer PCM (int16, int32, uint8)"
                )
            # PCM: full scale is 2**(bits - 1); unsigned PCM (8-bit WAV) is offset by
            # that much. Unscaled, int16 sound would reach the model at +-32767.
            half = 2.0 ** (8 * raw.dtype.itemsize - 1)
            offset = half if np.issubdtype(raw.dtype, np.unsignedinteger) else 0.0
            samples = ((raw.astype(np.float64) - offset) / half).astype(np.float32)
        else:
            samples = raw.astype(np.float32)
        if samples.ndim == 2 and samples.shape[1] > samples.shape[0]:
            # torchaudio.load's and librosa's (channels, S): its first column is one
            # sample per channel, and the rest of the clip would be silence.
            raise InputError(
                f"audio of shape {samples.shape} has more channels than samples: it looks "
                "like (channels, S); give (S,) or (S, channels), e.g. audio.T"
            )
        if samples.ndim == 2:  # (S, channels): the first, as the colab's [..., 0:1]
            samples = samples[:, 0]
        if samples.ndim != 1:
            raise InputError(f"audio must be (S,) or (S, channels), got {samples.shape}")
        return _finite_sound(samples)

    def frame_rate_note(self, video: VideoInput) -> Tuple[Optional[float], Optional[str]]:
        """(the video's frame rate, a note) when ``video`` is a file whose rate is more
        than 1% off :data:`MODEL_FPS`: the model (and the colab) takes every video's
        frames as 25 per second, each with ``samples_per_frame`` sound samples, so the
        sound is matched to the frames at that rate. (None, None) otherwise (arrays
        have no rate; a container that does not say is taken at its word)."""
        if not is_path(video):
            return None, None
        rate = video_frame_rate(os.fspath(video))
        if not rate or abs(float(rate) / MODEL_FPS - 1.0) <= 0.01:
            return None, None
        fps = float(rate)
        return fps, (
            f"the video is {_fps(fps)} fps; the model takes its frames as {MODEL_FPS} fps "
            f"({self.samples_per_frame} sound samples each, as the colab), so the sound "
            f"is matched to frames at that rate: the reconstruction plays at "
            f"{MODEL_FPS / fps:.3g}x speed, out of step with the sound; give a "
            f"{MODEL_FPS} fps copy for real time (ffmpeg -i IN -r {MODEL_FPS} OUT.mp4)"
        )

    # -- the model ----------------------------------------------------------------------

    def __call__(self, video: VideoInput, audio: AudioInput = None) -> AutoencodeResult:
        """The whole video's :class:`AutoencodeResult`: :meth:`clips` gathered (every
        frame and sample held; :meth:`clips` itself holds one clip at a time)."""
        names = ("frames", "audio", "label_logits", "inputs", "input_audio")
        gathered: Dict[str, List[np.ndarray]] = {name: [] for name in names}
        # Its files closed however the loop ends (an interrupt between two clips).
        with self.clips(video, audio) as stream:
            for part in stream:
                for name in names:
                    gathered[name].append(getattr(part, name))
        joined = {
            name: (np.stack if name == "label_logits" else np.concatenate)(gathered.pop(name))
            for name in names
        }
        return AutoencodeResult(
            **joined,
            clips=stream.clips,
            sample_rate=stream.sample_rate,
            fps=stream.fps,
            dropped_frames=stream.dropped_frames,
            padded_samples=stream.padded_samples,
            notes=stream.notes,
        )

    def clips(self, video: VideoInput, audio: AudioInput = None) -> "AutoencodeClips":
        """The clips of ``video`` (with its sound, or ``audio``: as the pipeline call
        takes them) autoencoded one at a time as they are iterated: an
        :class:`AutoencodeClips`, whose iteration yields each clip's
        :class:`ClipReconstruction` and holds no other clip's frames (a video file is
        decoded, and a sound file read, as the clips need them). These checks are made
        now: the frames given as an array, the sound, a file's frame rate and sound
        track, then a video file and a sound file decoded whole, only to check them
        (:func:`~.media.check_video`, :meth:`~.media.SoundReader.check`; not
        ``/dev/stdin`` and the like, see :func:`~.base.readable_twice`), and a video
        file of fewer frames than a clip; the rest as the clips come (fewer frames
        than a clip given as an array, a video or sound file that decodes to other
        frames or another length the second time). It is iterated once (a second
        loop raises RuntimeError: call this again). A loop left early leaves the
        files open until :meth:`AutoencodeClips.close` (``with pipeline.clips(video)
        as clips:`` closes them)."""
        return AutoencodeClips(self, video, audio)

    def _autoencode(
        self, inputs: np.ndarray, samples: np.ndarray, start: int
    ) -> ClipReconstruction:
        """One clip through the model: ``inputs`` (t, H, W, 3) float32 frames, the
        first being frame ``start`` of the video, with ``samples`` (t *
        samples_per_frame,) float32."""
        parameter = next(self.model.parameters())
        images = torch.from_numpy(inputs).permute(0, 3, 1, 2)[None]
        sound = torch.from_numpy(samples)[None, :, None]
        with torch.inference_mode(), eval_mode(self.model):
            out = self.model.reconstruct(
                images.to(parameter.device, parameter.dtype),
                sound.to(parameter.device, parameter.dtype),
                num_chunks=self.num_chunks,
            )
        recon = out["image"][0].permute(0, 2, 3, 1).float().cpu().numpy()
        values, indices = softmax_top_k(out["label"][0], self.top_k)
        top = [
            (self.labels[int(i)], int(i), float(p))
            for p, i in zip(values.tolist(), indices.tolist())
        ]
        return ClipReconstruction(
            clip=ClipResult(start, start + len(inputs), psnr(recon, inputs), top),
            frames=recon,
            audio=out["audio"][0].float().cpu().numpy(),
            label_logits=out["label"][0].float().cpu().numpy(),
            inputs=inputs,
            input_audio=samples,
        )


class AutoencodeClips:
    """A video's clips, autoencoded one at a time as they are iterated
    (:meth:`AutoencodePipeline.clips`): each step decodes and preprocesses the next
    clip's frames (``num_frames``, 16) and takes its sound, runs the model and yields
    the clip's :class:`ClipReconstruction`; memory holds that clip's frames and sound
    (and what the caller keeps), not the video's.

    It is iterated once: a second ``iter()`` (a second ``for`` loop, whether the first
    ended, failed or was left with ``break``), or one after :meth:`close`, raises
    RuntimeError; call ``pipeline.clips(video)`` again for a new pass. (A second loop
    was silently empty after a whole pass, and after a ``break`` went on from the next
    clip, a pass that looked whole but lacked the first clips.) To go on after a
    ``break`` on purpose, loop over one iterator: ``parts = iter(clips)``, then ``for
    part in parts:`` as often as needed, each going on where the last stopped.

    A finished or failed iteration has closed the video and sound files; one left
    early (``break``) keeps them open, and the decoders, until :meth:`close` or
    until this object is garbage: ``with pipeline.clips(video) as clips: for part
    in clips: ...`` closes them at the end of the block.

    What concerns the whole video is known when the iteration has ended
    (:attr:`finished`), as :class:`AutoencodeResult` has it: :attr:`dropped_frames`
    (the frames after the last whole clip, known when the video ends),
    :attr:`padded_samples`, :attr:`notes`, and :meth:`as_dict`. :attr:`clips` (each
    clip's frames, PSNR and labels) grows as the clips come.

    Attributes:
        sample_rate: of the sound (Hz); ``fps``: the model's frame rate (25).
        clips: the :class:`ClipResult` of each clip so far.
        dropped_frames, padded_samples, notes: as :class:`AutoencodeResult`'s, once
            finished (0, 0 and [] before).
        finished: whether every clip has been yielded.

    Raises: :class:`~.base.InputError` when made for a video or sound that cannot be
    decoded, or a video file shorter than one clip (a video file is decoded whole
    first, keeping only its frame count and first frame size, and a sound file,
    keeping only its length, unless :func:`~.base.readable_twice` says it gives its
    bytes once); while iterated, for fewer frames than a clip or a frame that
    cannot be decoded (an array, a video not checked), or a video or sound file
    written to or replaced since it was checked (it decodes to other frames or
    another length, or its size or modification time changed).
    """

    def __init__(self, pipeline: AutoencodePipeline, video: VideoInput, audio: AudioInput,
                 _checks: Optional["_FileChecks"] = None) -> None:
        # _checks: what _check_files found of these files before (run_task checks
        # every video first); None: checked now.
        checks = _checks
        self.sample_rate = pipeline.sample_rate
        self.fps = MODEL_FPS
        self.clips: List[ClipResult] = []
        self.dropped_frames = 0
        self.padded_samples = 0
        self.notes: List[str] = []
        self.finished = False
        self._pipeline = pipeline
        self._size: Tuple[int, ...] = pipeline.size
        self._decoded = 0  # frames decoded so far, the dropped ones included
        # The checks of the pipeline call in its order: the frames given as an array,
        # the frame rate, the sound; then a video file and a sound file are decoded
        # whole, only to check them; a file's frames are decoded again as the clips go.
        frames: Iterable[np.ndarray] = ()
        declared: Optional[int] = None  # the frame count a video file declares
        path = os.fspath(video) if is_path(video) else None
        if path is None:
            array = pipeline._frame_array(video)
            frames, expected = array, len(array)
        self._video_fps, rate_note = pipeline.frame_rate_note(video)
        if path is not None:
            declared = video_frame_count(path)  # for the missing-frames note
            # For the progress bar only: Matroska, WebM and MPEG-TS declare no count,
            # and their duration gives an estimate.
            expected = declared or estimated_frame_count(path)
        sound_notes: List[str] = []
        sound = pipeline._sound_source(video, audio, sound_notes)
        self._sound = sound  # a sound file is open from here: close() closes it
        try:
            if checks is None:
                checks = _check_files(pipeline, path, sound)
            elif checks.sound is not None and isinstance(sound, SoundReader):
                sound.expect(checks.sound)  # checked before (run_task), not again
        except BaseException:
            if isinstance(sound, SoundReader):
                sound.close()  # no object is made: nothing else would close it
            raise
        if path is not None:
            frames = iter_video_frames(path, checked=checks.video)
        self._iterator = self._run(frames, declared, expected, sound, rate_note, sound_notes)
        self._iterated = False  # whether iter() has been called (once only: __iter__)
        self._closed = False

    def __iter__(self) -> Iterator[ClipReconstruction]:
        """The one pass over the clips (see the class doc); RuntimeError for a second
        one, or one after :meth:`close`."""
        if self._iterated or self._closed:
            state = (
                "every clip has been yielded" if self.finished
                else "a loop over them has begun" if self._iterated
                else "they were closed"
            )
            raise RuntimeError(
                f"AutoencodeClips is iterated once ({state}): call pipeline.clips(video) "
                "again for a new pass (to go on after a break, loop again over the "
                "iterator that iter(clips) gave)"
            )
        self._iterated = True
        return self._iterator

    def close(self) -> None:
        """Ends the iteration (no more clips come: the iterator already taken ends, a
        new ``iter()`` raises RuntimeError; :attr:`finished` stays False unless it was
        True) and closes the video and sound files."""
        self._closed = True
        self._iterator.close()  # its own cleanup, where it has begun
        if isinstance(self._sound, SoundReader):
            self._sound.close()  # opened when this object was made

    def __enter__(self) -> "AutoencodeClips":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def as_dict(self) -> Dict[str, Any]:
        """:meth:`AutoencodeResult.as_dict` of the finished iteration."""
        if not self.finished:
            raise RuntimeError("as_dict() needs every clip: iterate the clips first")
        return _summary(self, len(self.clips) * self._pipeline.num_frames, self._size[:2])

    def _run(
        self,
        frames: Iterable[np.ndarray],
        declared: Optional[int],
        expected: int,
        sound: Union[SoundReader, np.ndarray],
        rate_note: Optional[str],
        sound_notes: List[str],
    ) -> Iterator[ClipReconstruction]:
        pipeline = self._pipeline
        t = pipeline.num_frames
        per_clip = t * pipeline.samples_per_frame
        samples = _ClipSound(iter(sound) if isinstance(sound, SoundReader) else iter([sound]))
        non_finite = {"frames": 0, "sound": 0, "labels": 0}
        inputs: Iterable[np.ndarray] = self._input_clips(frames)
        try:
            if expected >= t:  # a video of unknown length gets no bar
                inputs = pipeline.progress(inputs, expected // t, "clips")
            for clip_inputs in inputs:
                start = len(self.clips) * t
                part = pipeline._autoencode(clip_inputs, samples.take(per_clip), start)
                del clip_inputs
                self.clips.append(part.clip)
                self._size = part.frames.shape[1:3]
                non_finite["frames"] += non_finite_count(part.frames)
                non_finite["sound"] += non_finite_count(part.audio)
                non_finite["labels"] += non_finite_count(part.label_logits)
                yield part
                del part  # not held while the next clip is decoded
            # The rest of the sound is decoded, unused, as the whole sound was (an
            # error in it stops the run as before).
            samples.drain()
        finally:
            # Now, not when this generator's frame goes: an exception's traceback
            # holds that frame, and with it the video's decoder, while the exception
            # is kept (a REPL keeps the last one).
            for opened in (inputs, frames):
                close = getattr(opened, "close", None)  # generators; arrays have none
                if close is not None:
                    close()
            if isinstance(sound, SoundReader):
                sound.close()
        clips = len(self.clips)
        if clips == 0:
            raise InputError(
                f"the video has {self._decoded} frame(s); the model autoencodes clips of "
                f"{t} frames: give a longer video"
            )
        notes: List[str] = []
        missing = None if declared is None else missing_frames_note(declared, self._decoded)
        if missing is not None:
            notes.append(missing)
        if rate_note is not None:
            notes.append(rate_note)
        notes.extend(sound_notes)
        dropped = self._decoded - clips * t
        if dropped:
            notes.append(f"last {dropped} frame(s) dropped (not a whole {t}-frame clip)")
        padded = samples.padded
        if padded:
            rate, video_fps = self.sample_rate, self._video_fps
            shortfall = f"sound {padded / rate:.3f} s shorter than the frames"
            if video_fps is not None:
                # The frames last longer at 25 fps than at the video's own rate: say
                # so rather than blame the sound (it may cover the video at its rate).
                kept = clips * t
                shortfall = (
                    f"sound {padded / rate:.3f} s shorter than the {kept} "
                    f"frames taken as {MODEL_FPS} fps ({kept / MODEL_FPS:.3f} s; "
                    f"{kept / video_fps:.3f} s at the video's {_fps(video_fps)} fps)"
                )
            notes.append(f"{shortfall}; padded with silence")
        for name, count in zip(("frames", "sound", "labels"), non_finite.values()):
            note = non_finite_note(
                count, pipeline.model, f"the reconstructed {name} there are not meaningful"
            )
            if note is not None:
                notes.append(note)
        self.dropped_frames, self.padded_samples, self.notes = dropped, padded, notes
        self.finished = True

    def _input_clips(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The frames preprocessed into clips (t, H, W, 3) float32, each filled as its
        frames are decoded; the frames after the last whole clip are counted (in
        ``_decoded``, as all) and let go."""
        t, size = self._pipeline.num_frames, self._pipeline.size
        clip: Optional[np.ndarray] = None
        filled = 0
        for frame in frames:
            if clip is None:
                clip = np.empty((t, *size, 3), np.float32)
            clip[filled] = preprocess_frame(frame, size)
            filled += 1
            self._decoded += 1
            if filled == t:
                full, clip, filled = clip, None, 0
                yield full
                del full


@dataclass(frozen=True)
class _FileChecks:
    """What :func:`_check_files` keeps of a video file and its sound file for their
    second read: the video's :class:`~.media.VideoCheck` and the sound's length
    (samples at the model's rate); None for what was not checked (frames or sound
    given as arrays, a name for an open descriptor)."""

    video: Optional[VideoCheck] = None
    sound: Optional[int] = None


def _check_files(
    pipeline: AutoencodePipeline,
    path: Optional[str],
    sound: Union[SoundReader, np.ndarray, None],
) -> _FileChecks:
    """Decodes the video file ``path`` (None: frames given as an array) and the sound
    file of ``sound`` (a reader: :meth:`~.media.SoundReader.check` makes it expect
    the length found; an array or None: nothing to check) once, now, only to check
    them, keeping their counts, one frame or piece held at a time; a video of fewer
    frames than a clip is refused here. Not a name for an open descriptor
    (:func:`~.base.readable_twice`).

    Raises:
        InputError: a video or sound that cannot be decoded, or a video too short.
    """
    video: Optional[VideoCheck] = None
    if path is not None and readable_twice(path):
        # The whole video decoded once now, keeping only its frame count and first
        # size, so that a video that cannot be decoded partway through (a damaged
        # packet) is named before the model runs, not after the clips before the
        # damage (minutes each at full size); the clips then decode it again frame
        # by frame, and a file changed meanwhile is refused (iter_video_frames'
        # checked). Decoding is cheap beside the model, so the second decode costs
        # little, and memory stays that of a frame. A name for an open descriptor is
        # decoded once, as the sound below.
        video = check_video(path)
        t = pipeline.num_frames
        if video.frames < t:
            # Known now: among several videos, before the earlier ones' work.
            raise InputError(
                f"{path} has {video.frames} frame(s); the model autoencodes clips of "
                f"{t} frames: give a longer video"
            )
    length: Optional[int] = None
    if isinstance(sound, SoundReader) and readable_twice(sound.path):
        # The whole sound decoded once now, keeping only its length, so that a track
        # that cannot be decoded partway through is named before the model runs, not
        # after minutes of clips; the clips then decode it again piece by piece.
        # Decoding sound is cheap beside the model (an AAC track decodes at hundreds
        # of times real time), so the second decode costs little, and memory stays
        # that of a piece. A name for an open descriptor (/dev/stdin redirected from
        # a file) is decoded once, for the clips only: on macOS and the BSDs a second
        # open would share its offset and find the sound already read.
        length = sound.check()
    return _FileChecks(video, length)


class _ClipSound:
    """Sound pieces handed out clip by clip: :meth:`take` gives the next ``n``
    samples, silence past the end of the sound (counted in :attr:`padded`). Only the
    part of a piece not yet taken is held (a sound given as an array is one piece,
    the caller's)."""

    def __init__(self, pieces: Iterator[np.ndarray]) -> None:
        self._pieces = pieces
        self._left = np.zeros(0, np.float32)
        self._ended = False
        self.padded = 0

    def take(self, n: int) -> np.ndarray:
        parts = [self._left[:n]]
        have = len(parts[0])
        self._left = self._left[n:]
        while have < n and not self._ended:
            piece = next(self._pieces, None)
            if piece is None:
                self._ended = True
                break
            parts.append(piece[: n - have])
            self._left = piece[n - have :]
            have += len(parts[-1])
        if have < n:
            self.padded += n - have
            parts.append(np.zeros(n - have, np.float32))
        # A new array (a copy where it is one piece's part): a clip's sound does not
        # keep a larger piece (or a whole sound given as an array) alive.
        return np.concatenate(parts)

    def drain(self) -> None:
        """Decodes the rest of the sound, unused."""
        if not self._ended:
            for _ in self._pieces:
                pass
            self._ended = True
        self._left = np.zeros(0, np.float32)


def _fps(rate: float) -> str:
    """A frame rate as people write it: 50, 29.97, 23.976."""
    return f"{rate:.3f}".rstrip("0").rstrip(".")


def _finite_sound(samples: np.ndarray) -> np.ndarray:
    """``samples``, or :class:`InputError` if one is NaN or infinite (they would make
    the whole clip's reconstruction, labels and PSNR NaN without a word)."""
    finite = np.isfinite(samples)
    if not finite.all():
        first = int(np.argmin(finite))
        raise InputError(
            f"the sound has {int((~finite).sum())} NaN or infinite sample(s), the first "
            f"at sample {first}; give finite samples in [-1, 1]"
        )
    return samples


# --------------------------------------------------------------------------------------
# perceiver-convert run autoencode


def _spool(folder: Path, what: str) -> DiskSpool:
    """A :class:`~.spool.DiskSpool` of a video's ``what`` in ``folder`` (the output's)."""
    return DiskSpool(
        folder, what,
        "the .wav and --npy/--npz need the whole video's, which are kept there rather "
        "than in memory",
    )


def _base(path: str, options: RunOptions, several: bool) -> Tuple[Path, str]:
    source = Path(path)
    out = options.output
    if out is None or several:
        folder = out if (out is not None and out.is_dir()) else source.parent
        return folder / (source.stem + ".autoencoded"), ".mp4"
    if out.is_dir():
        return out / (source.stem + ".autoencoded"), ".mp4"
    suffix = out.suffix.lower()
    if suffix in WRITTEN_VIDEO_SUFFIXES:
        return out.with_suffix(""), suffix
    refuse_array_suffix_without_flag(out, options.arrays)  # x.npy wrote x.mp4, x.wav
    if suffix == ".wav":
        return out.with_suffix(""), ".mp4"
    if suffix in MEDIA_SUFFIXES:
        # Not a stem: the user asked for that format (out.webm wrote out.webm.mp4).
        raise usage_error(
            f"-o {out}: autoencode does not write {suffix}; it writes the video as "
            f"{', '.join(WRITTEN_VIDEO_SUFFIXES[:-1])} or {WRITTEN_VIDEO_SUFFIXES[-1]} "
            "with the sound beside it as .wav (--npz/--npy: the arrays): give -o with "
            "one of those suffixes"
        )
    return out, ".mp4"


def _check_inputs(inputs: Sequence[str], options: RunOptions) -> None:
    """Refuses (PipelineError, exit 2) what no run can do: one -o file for several
    videos, one --audio for several videos."""
    several = len(inputs) > 1
    if several and options.output is not None and not options.output.is_dir():
        error = PipelineError(
            "-o names one output but several videos were given; give one video, or -o "
            "an existing folder"
        )
        error.exit_code = 2
        raise error
    if several and options.extra.get("audio") is not None:
        error = PipelineError("--audio goes with one video; give one video with it")
        error.exit_code = 2
        raise error


def _targets(path: str, options: RunOptions, several: bool) -> List[Path]:
    """The files written for the video ``path``, in order: ``--npz``: [OUT.npz];
    ``--npy``: [OUT.npy, OUT.audio.npy, OUT.label_logits.npy]; else [OUT.mp4 (or the
    -o video suffix), OUT.wav]."""
    if options.arrays is not None:
        assert options.output is not None  # the CLI requires -o OUT.npy / OUT.npz
        if options.arrays == "npz":
            return [options.output]
        stem = options.output.with_suffix("")
        return [options.output, stem.with_name(stem.name + ".audio.npy"),
                stem.with_name(stem.name + ".label_logits.npy")]
    base, video_suffix = _base(path, options, several)
    return [base.with_name(base.name + video_suffix), base.with_name(base.name + ".wav")]


def planned_outputs(inputs: List[str], options: RunOptions) -> List[Path]:
    """``TaskSpec.outputs`` of autoencode: every file :func:`run_task` writes for
    ``inputs`` (from the names alone, before any video is read)."""
    _check_inputs(inputs, options)
    several = len(inputs) > 1
    planned = [target for path in inputs for target in _targets(path, options, several)]
    # After the name checks (usage errors first); before the model is loaded, so that
    # a typo among many videos does not wait for the earlier videos' work.
    require_existing_files(inputs)
    return planned


def run_task(pipeline: AutoencodePipeline, inputs: List[str], options: RunOptions) -> List[dict]:
    """``perceiver-convert run autoencode MODEL VIDEO... [--audio WAV]``.

    Files (``OUT`` = ``-o`` without its suffix; default ``<video>.autoencoded`` next
    to the video; ``-o FOLDER`` puts that name in FOLDER):

    * ``OUT.mp4`` (H.264 with the reconstructed sound as AAC; ``-o X.mov``/``X.mkv``:
      the same in QuickTime/Matroska; ``-o X.gif``: a GIF, which has no sound) at 25
      frames/s, and ``OUT.wav`` (float32, the model's rate). Another picture, sound or
      video suffix (``-o X.webm``, ``X.avi``), or ``.npy``/``.npz`` without
      ``--npy``/``--npz``, is refused before any work (exit 2);
    * ``--npz``: only ``OUT.npz`` with ``frames`` [T, H, W, 3], ``audio`` [S] and
      ``label_logits`` [clips, classes]; ``--npy``: ``OUT.npy`` (the frames),
      ``OUT.audio.npy`` and ``OUT.label_logits.npy``.

    The JSON document of each video lists the files, the clips with their PSNR and
    top-k labels, and the dropped frames. Every video, and its sound, is first decoded
    once, one after the other, only to check it (a frame held at a time, keeping its
    frame count: a video or sound that cannot be decoded, or a video shorter than a
    clip, is named before the model runs on the first video). The videos are then
    autoencoded one at a time, each decoded again clip by clip (:func:`_run_video`; a
    file changed since its check is refused): memory holds one clip's frames and
    sound, not a video's; the files are written as the clips come (staged by the CLI:
    a run that fails leaves none).
    """
    # Every output's path (its folder, writable; not a folder itself, not an input:
    # one read after it was written would be this run's output) before any work, as
    # the CLI's.
    audio = options.extra.get("audio")
    check_output_paths(planned_outputs(inputs, options), [*inputs, audio])
    pipeline.top_k = options.top_k
    pipeline.progress = options.progress
    several = len(inputs) > 1
    # Every video and its sound decoded once before the first clip of the first
    # video, one at a time, keeping only their counts: a damaged or too short third
    # video is named before the first two have gone through the model (a run that
    # fails writes nothing, so their work would be lost); each is then decoded again
    # at its turn, and refused if it changed meanwhile. Only the counts are held.
    checks = [_check_video_files(pipeline, path, audio) for path in inputs]
    return [_run_video(pipeline, path, audio, options, several, check)
            for path, check in zip(inputs, checks)]


def _check_video_files(
    pipeline: AutoencodePipeline, path: str, audio: Optional[str]
) -> _FileChecks:
    """:func:`_check_files` of the video ``path`` and its sound (``audio``, else its
    own track), whose files are closed again: only the counts are kept."""
    if not readable_twice(path if audio is None else audio):
        # A sound named by an open descriptor (--audio /dev/stdin) is opened once, by
        # the clips (_check_files says why).
        return _check_files(pipeline, path, None)
    sound = pipeline._sound_source(path, audio, [])  # its errors as the clips' own
    try:
        return _check_files(pipeline, path, sound)
    finally:
        if isinstance(sound, SoundReader):
            sound.close()


def _run_video(
    pipeline: AutoencodePipeline, path: str, audio: Optional[str], options: RunOptions,
    several: bool, checks: _FileChecks,
) -> Dict[str, Any]:
    """One video of :func:`run_task`: its files written, its lines printed, its
    document returned.

    Memory is bounded by a clip (:meth:`AutoencodePipeline.clips`): each clip's
    reconstruction goes to the video encoder (:class:`~.media.VideoWriter`; a GIF is
    made whole at the end: Pillow holds every picture) and its sound to the encoder
    and to a temporary file, which becomes the .wav when the video ends (its header
    needs the length); ``--npy``/``--npz`` spool the frames, sound and logits to
    temporary files likewise and write the arrays from them (:class:`~.spool.DiskSpool`). Only
    each clip's PSNR, labels and the notes are kept. The files are written through
    ``options`` (staged in the CLI: a run that fails leaves none). ``checks``: what
    the checks before every video's work found (not made again)."""
    clips = AutoencodeClips(pipeline, path, audio, checks)
    # Its files closed however this ends (a failed write, an interrupt between clips).
    with clips:
        files: List[str] = []
        targets = _targets(path, options, several)
        folder = targets[0].parent
        notes: List[str] = []
        with _spool(folder, "the reconstructed sound's samples") as sound:
            if options.arrays:
                with contextlib.ExitStack() as outputs, \
                        _spool(folder, "the reconstructed frames") as frames, \
                        _spool(folder, "the label logits") as logits:
                    # Open while the clips are spooled, so that a failed write there (disk
                    # full) is the output's; opened last first, so that they close, and are
                    # staged, in order.
                    handles = [outputs.enter_context(options.open_output(target))
                               for target in reversed(targets)][::-1]
                    for part in clips:
                        frames.append(part.frames)
                        sound.append(part.audio)
                        logits.append(part.label_logits[None])
                        del part  # not held while the next clip is computed
                    if options.arrays == "npz":
                        write_npz(handles[0], frames=frames, audio=sound, label_logits=logits)
                    else:
                        for handle, spool in zip(handles, (frames, sound, logits)):
                            spool.write_npy(handle)
                files.extend(str(target) for target in targets)
            else:
                video, wav = targets
                gif = video.suffix == ".gif"
                rate = None if gif else clips.sample_rate
                with options.output_path(video) as temp:
                    with VideoWriter(temp, clips.fps, rate) as writer:
                        for part in clips:
                            writer.add_frames(part.video_uint8())
                            writer.add_sound(part.audio)
                            sound.append(part.audio)
                            del part
                files.append(str(video))
                if gif:
                    notes.append("a GIF has no sound: the sound is in the .wav")
                with options.open_output(wav) as handle:
                    handle.write(wav_header(sound.rows, clips.sample_rate))
                    sound.copy_to(handle)
                files.append(str(wav))
    clips.notes.extend(notes)
    options.echo(
        f"{path}: {len(clips.clips)} clip(s) of {pipeline.num_frames} frames, "
        f"{clips.sample_rate} Hz sound"
    )
    for note in clips.notes:
        options.echo(f"  note: {note}")
    for clip in clips.clips:
        labels = ", ".join(f"{label} ({p:.3f})" for label, _, p in clip.top_k)
        options.echo(
            f"  frames {clip.start}-{clip.stop - 1}: PSNR {clip.psnr:.2f} dB; {labels}"
        )
    return {
        "input": path,
        "audio": str(audio) if audio is not None else None,
        "files": files,
        **clips.as_dict(),
    }


# --------------------------------------------------------------------------------------
# test media and perceiver-convert demo


def make_test_video(
    path: Union[str, Path],
    frames: int,
    size: Tuple[int, int] = (48, 64),
    fps: int = MODEL_FPS,
    sample_rate: Optional[int] = 44100,
    seed: int = 0,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Writes a small video (a moving colour gradient, H.264) with a two-tone sound
    track (AAC; none with ``sample_rate=None``); returns (frames (T, H, W, 3) uint8,
    sound (S,) float or None). For tests and the demo."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.random(3) * 2 * np.pi
    video = np.stack([
        np.stack([
            127.5 + 127.5 * np.sin(2 * np.pi * (x + 3 * t) / w + phase[c] + y / h)
            for c in range(3)
        ], axis=-1)
        for t in range(frames)
    ]).astype(np.uint8)
    sound = None
    if sample_rate is not None:
        s = np.arange(int(round(frames / fps * sample_rate))) / sample_rate
        sound = 0.4 * np.sin(2 * np.pi * 440 * s) + 0.2 * np.sin(2 * np.pi * 1250 * s)
    write_video(path, video, fps, sound, sample_rate)
    return video, sound


def demo_task(model: torch.nn.Module, folder: Path, options: RunOptions) -> Dict[str, str]:
    """Autoencodes a generated video with sound (two clips and one extra frame)."""
    from .media import atomic_path

    # Each file appears whole or not at all (demo --workdir --force replaces them).
    pipeline = AutoencodePipeline(model)
    source = folder / "input.mp4"
    with atomic_path(source) as temp:
        make_test_video(temp, 2 * pipeline.num_frames + 1)
    result = pipeline(source)
    with atomic_path(folder / "reconstruction.wav") as temp:
        temp.write_bytes(encode_wav(result.audio, result.sample_rate))
    with atomic_path(folder / "reconstruction.mp4") as temp:
        write_video(temp, result.video_uint8(), result.fps, result.audio, result.sample_rate)
    first = result.clips[0]
    return {
        "task": "autoencode",
        "input": f"{2 * pipeline.num_frames + 1} generated frames with sound",
        "answer": (
            f"{len(result.clips)} clips, PSNR {first.psnr:.1f} dB, top label "
            f"{first.top_k[0][0]!r} -> reconstruction.mp4, .wav"
        ),
    }
