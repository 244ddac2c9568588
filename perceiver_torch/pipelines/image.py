"""Classify: the top-k ImageNet labels of an image, computed as DeepMind's ImageNet
colab does.

The colab's procedure (:func:`preprocess_image`):

1. RGB, 8 bits per channel (:func:`load_rgb`): EXIF orientation applied, greyscale
   repeated to three channels, palette images expanded, alpha and colour keys
   composited over white, 16-bit values reduced to 8 bits.
2. Centre crop (:func:`center_crop_box`): ``side = int((224 / 256) * min(H, W))``,
   ``top = ((H - side) + 1) // 2``, ``left = ((W - side) + 1) // 2``.
3. Resize of the 8-bit crop to the model's size (224x224 for the official models) with
   ``cv2.resize(..., interpolation=cv2.INTER_CUBIC)``, OpenCV's own cubic (not PIL's):
   its rounded 8-bit result is what the colab feeds. Float pixels (a float array or
   tensor, on the 0..255 scale) are clipped to 0..255 when read, resized in float32
   and clipped to 0..255 again (the cubic overshoots at edges, where uint8
   saturates), keeping their fractions (:func:`resize_cubic`).
4. ``(x - mean) / std`` with the ImageNet mean (123.675, 116.28, 103.53) and std
   (58.395, 57.12, 57.375) on the 0..255 scale, computed in float64 (as NumPy does in
   the colab) and given to the model as float32, (B, 3, H, W).

The model's size comes from its config: ``image_size`` (imagenet_learned),
``max_resolution`` (imagenet_fourier) or ``4 * max_resolution`` (imagenet_conv: its
stem downsamples by 4). The Fourier and conv models can also take the crop at its own
size (``resize=False``; the colab notes that the Fourier model generalises to sizes it
never saw); the learned position encoding cannot.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..labels import class_names
from ..registry import catch_warnings
from .base import (
    InputError,
    PipelineError,
    Progress,
    RunOptions,
    TwoReads,
    WrongModelError,
    check_model,
    check_output_paths,
    check_weights,
    eval_mode,
    flag,
    host_tensor,
    no_progress,
    no_such_file,
    non_finite_output_note,
    positive_int,
    readable_twice,
    require,
    results_document,
    softmax_top_k,
)

__all__ = [
    "CROP_FRACTION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassifyPipeline",
    "ClassifyResult",
    "LabelScore",
    "batches",
    "center_crop",
    "center_crop_box",
    "large_image_note",
    "load_rgb",
    "model_image_size",
    "normalize",
    "preprocess_image",
    "resize_cubic",
]

IMAGENET_MODELS = ("imagenet_learned", "imagenet_fourier", "imagenet_conv")
#: The colab's MEAN_RGB and STDDEV_RGB: the ImageNet statistics x 255.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
#: The colab's crop: 224 / (224 + 32) of the shorter side, at every model size.
CROP_FRACTION = 224 / (224 + 32)

ImageInput = Union[str, Path, np.ndarray, torch.Tensor, Any]  # Any: a PIL image


# --------------------------------------------------------------------------------------
# 1. RGB


def _to_uint8_16bit(array: np.ndarray) -> np.ndarray:
    """16-bit values (0..65535) -> 8 bits, rounded: round(x / 257), so 65535 -> 255."""
    wide = np.clip(array.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """8-bit RGB (H, W, 3) with alpha (H, W) composited over white, rounded:
    (c * a + 255 * (255 - a)) / 255."""
    c = rgb.astype(np.int64)
    a = alpha.astype(np.int64)[..., None]
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _float_scale_note(array: np.ndarray, notes: Optional[List[str]]) -> None:
    """Adds a note to ``notes`` for float pixels that are clearly not on the 0..255
    scale: all within 0..1 (torchvision's ``ToTensor``: read as a nearly black
    image) or outside 0..255 (normalised values: clipped)."""
    if notes is None or array.size == 0:
        return
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 255.0:
        notes.append(
            f"the image's float values run from {low:g} to {high:g} and were clipped to "
            "0..255: give pixels on the 0..255 scale (the pipeline normalises them itself)"
        )
    elif 0.0 < high <= 1.0:
        notes.append(
            f"the image's float values are all within 0..1 (the largest is {high:g}) and "
            "were taken on the 0..255 scale, as a nearly black image: multiply them by 255 "
            "if they are on the 0..1 scale (torchvision's ToTensor)"
        )


def _sixteen_bit_scale_note(low: int, high: int, notes: List[str]) -> None:
    """Adds a note to ``notes`` for 16-bit pixels (the smallest ``low``, the largest
    ``high``) all within 0..255: most likely 8-bit values in a 16-bit container
    (``Image.fromarray`` of int32 values, an array cast to uint16), read on the
    0..65535 scale as a nearly black image, silently."""
    if 0 <= low and 0 < high <= 255:
        notes.append(
            f"the image's 16-bit values are all within 0..255 (the largest is {high}) "
            "and were taken on the 0..65535 scale, as a nearly black image: give them "
            "as 8-bit values (uint8, an 8-bit image) if they are on the 0..255 scale"
        )


def _from_array(array: np.ndarray, notes: Optional[List[str]] = None) -> np.ndarray:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> (H, W, 3).

    uint8 stays; uint16 is reduced to 8 bits (:func:`_to_uint8_16bit`; a note where
    all are within 0..255, :func:`_sixteen_bit_scale_note`); floats are
    taken on the 0..255 scale and kept as float32 (clipped to 0..255, with a note in
    ``notes`` when they look like another scale: :func:`_float_scale_note`; NaN and
    infinities refused); RGBA is composited over white (uint8 only: a float alpha's
    scale is ambiguous)."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise InputError(
            f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got "
            f"shape {tuple(array.shape)}"
        )
    if array.dtype == np.uint16:
        if notes is not None:  # not empty: refused above
            _sixteen_bit_scale_note(int(array.min()), int(array.max()), notes)
        array = _to_uint8_16bit(array)
    elif np.issubdtype(array.dtype, np.floating):
        # NaN passes np.clip and would make every probability NaN; an infinity would
        # be clipped to a plausible 0 or 255 and hide a broken input.
        finite = np.isfinite(array)
        if not finite.all():
            y, x = (int(v) for v in np.argwhere(~finite)[0][:2])
            raise InputError(
                f"the image has {int((~finite).sum())} non-finite value(s) (NaN or "
                f"infinity), the first at row {y}, column {x}; give finite pixel values "
                "on the 0..255 scale"
            )
        _float_scale_note(array, notes)
        array = np.clip(array.astype(np.float32), 0.0, 255.0)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise InputError(
            f"image arrays must be uint8, uint16 or float (0..255 scale); got {array.dtype}"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        if array.dtype != np.uint8:
            raise InputError("RGBA arrays must be uint8 (alpha 0..255); drop the alpha first")
        array = _over_white(array[..., :3], array[..., 3])
    return np.ascontiguousarray(array)


def _from_pil(
    image: Any, notes: Optional[List[str]] = None, rawmode: Optional[str] = None
) -> np.ndarray:
    """A PIL image -> (H, W, 3) uint8 (see :func:`load_rgb`). ``rawmode``: how the
    file stores its pixels (``"L;4"``, ``"RGB;16B"``, ...), read before they were
    decoded (:func:`_stored_rawmode`); it says how to read a colour key. None: the
    image's own (:func:`_first_rawmode`)."""
    from PIL import ImageOps

    key = _colour_key(image, rawmode, notes)
    with pillow_warnings_as_notes(notes):
        image = ImageOps.exif_transpose(image)
    rgb = _decoded_rgb(image, notes)
    if key is not None:
        # Fully transparent over white: white (PNG's colour key is all-or-nothing).
        values = np.asarray(image.convert("L") if image.mode == "1" else image)
        keyed = np.all(values == np.asarray(key), axis=-1) if values.ndim == 3 \
            else values == key
        rgb = np.array(rgb)  # writable
        rgb[keyed] = 255
    return rgb


# How a PNG's colour key (tRNS of a greyscale or RGB file) reads against the decoded
# pixels, by the file's raw mode: Pillow keeps the key as stored, but scales 1-, 2- and
# 4-bit greyscale up to 0..255 (1 -> 255, 85, 17). 16-bit greyscale stays 16-bit
# (mode I;16), as its key.
_KEY_SCALE = {"1": 255, "L;2": 85, "L;4": 17, "L": 1, "RGB": 1, "I;16B": 1, "I;16": 1}


def _stored_rawmode(image: Any) -> Optional[str]:
    """The raw mode of an image not decoded yet (its first tile's), else None."""
    tile = getattr(image, "tile", None)
    if not tile:
        return None
    args = tile[0][3] if len(tile[0]) > 3 else None
    return args if isinstance(args, str) else None


# The raw mode of each PIL image with a colour key that a read found not decoded yet,
# by id() (PIL images are not hashable), with a weak reference that tells the image
# from a later object at the same address and drops the entry with the image. The
# read decodes the image, and Pillow then empties its tile: a second read of the same
# image (twice in one list, or in two calls) took the key at the decoded pixels' depth
# where the first had taken it at the file's (4-bit grey: 5, not 85).
_FIRST_RAWMODES: Dict[int, Tuple["weakref.ref[Any]", str]] = {}


def _first_rawmode(image: Any) -> Optional[str]:
    """:func:`_stored_rawmode` of a PIL image, also once a read has decoded it: then
    the raw mode its tile told that read (:data:`_FIRST_RAWMODES`); None for an image
    no read found undecoded (given decoded, or from ``Image.new``)."""
    rawmode = _stored_rawmode(image)
    key = id(image)
    if rawmode is None:
        entry = _FIRST_RAWMODES.get(key)
        return entry[1] if entry is not None and entry[0]() is image else None
    try:
        alive = weakref.ref(image, lambda dead: _forget_rawmode(key, dead))
    except TypeError:  # an image type that takes no weak reference: nothing to keep
        return rawmode
    _FIRST_RAWMODES[key] = (alive, rawmode)
    return rawmode


def _forget_rawmode(key: int, dead: "weakref.ref[Any]") -> None:
    # Only the dead image's own entry (another thread may have put a fresher one).
    entry = _FIRST_RAWMODES.get(key)
    if entry is not None and entry[0] is dead:
        _FIRST_RAWMODES.pop(key, None)


def _colour_key(image: Any, rawmode: Optional[str], notes: Optional[List[str]]) -> Any:
    """The colour key of a greyscale or RGB image in its decoded pixels' values (an int,
    or an (R, G, B) tuple), or None: none, or one that cannot be applied (a 16-bit RGB
    PNG, whose pixels Pillow reduces to 8 bits but not its key; noted). ``rawmode``: as
    :func:`_from_pil`'s."""
    key = image.info.get("transparency")
    if key is None or not (image.mode in ("1", "L", "RGB", "I") or image.mode.startswith("I;16")):
        return None
    rawmode = rawmode or _first_rawmode(image)
    if rawmode is None:
        # Decoded before any read here (a PIL image its caller loaded, or made with
        # Image.new): taken at its mode's plain depth, as Pillow's own
        # convert("RGBA") takes it.
        rawmode = image.mode if image.mode in ("1", "L", "RGB") else "I;16"
    if rawmode in _KEY_SCALE:
        scale = _KEY_SCALE[rawmode]
        return tuple(k * scale for k in key) if isinstance(key, tuple) else key * scale
    if notes is not None:
        notes.append(
            f"the image's colour key (transparency) was not applied: Pillow reads its "
            f"{rawmode} pixels at another depth than the key"
        )
    return None


def _decoded_rgb(image: Any, notes: Optional[List[str]]) -> np.ndarray:
    """A PIL image, oriented, -> (H, W, 3) uint8 (no colour key; see _from_pil)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale (PNG, TIFF): Pillow's own convert("L") would clip at 255.
        # Mode "I" (32-bit integers) is how Pillow opens most 16-bit greyscale files;
        # values outside 0..65535 (a true 32-bit image) are clipped, and said so.
        values = np.asarray(image)
        if notes is not None and values.size:
            low, high = int(values.min()), int(values.max())
            _sixteen_bit_scale_note(low, high, notes)
            if mode == "I" and (low < 0 or high > 65535):
                notes.append(
                    f"the image's 32-bit integer values run from {low} to {high} and were "
                    "clipped to 0..65535, the 16-bit scale read as greyscale; give an "
                    "8- or 16-bit image"
                )
        return _from_array(_to_uint8_16bit(values))
    if mode == "F":
        return _from_array(np.asarray(image, dtype=np.float32), notes)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    elif mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")  # 1, CMYK, YCbCr, LAB, HSV
    return _from_array(np.asarray(image))


# Memory that reading an image takes per pixel, measured for an RGB PNG (Pillow's
# 4-byte pixels, the copy ImageOps.exif_transpose returns, the (H, W, 3) array): 13
# bytes, about 1.2 GB at Pillow's limit of 89 megapixels.
_READ_BYTES_PER_PIXEL = 13


def large_image_note(path: Union[str, Path], size: Tuple[int, int]) -> Optional[str]:
    """The note for an image of ``size`` (W, H) above Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``, 89 megapixels by default), where Pillow warns
    (``DecompressionBombWarning``) and reads it anyway; None below it. (Above twice
    the limit Pillow refuses the image: :func:`load_rgb` raises InputError.)"""
    Image = require("PIL.Image")
    limit = Image.MAX_IMAGE_PIXELS
    width, height = (int(v) for v in size)
    pixels = width * height
    if not limit or pixels <= limit:
        return None
    memory = pixels * _READ_BYTES_PER_PIXEL
    shown = f"{memory / 1e9:.1f} GB" if memory >= 1e9 else f"{memory / 1e6:.3g} MB"
    return (
        f"{path} is {width}x{height} pixels ({pixels / 1e6:.3g} megapixels, over "
        f"Pillow's decompression-bomb limit of {limit / 1e6:.3g}): reading it takes "
        f"about {shown} of memory"
    )


@contextlib.contextmanager
def quiet_bomb_warning(notes: Optional[List[str]]) -> Iterator[None]:
    """A block in which Pillow's ``DecompressionBombWarning`` (an image above
    ``MAX_IMAGE_PIXELS``, which Pillow reads anyway) is not raised when the caller
    collects ``notes`` (it adds a :func:`large_image_note` instead); without a list,
    the warning is Pillow's as usual. Pillow warns when it opens a file and, for some
    formats (ICO, TIFF tiles, GIF frames), when it loads one: the block covers both."""
    if notes is None:
        yield
        return
    Image = require("PIL.Image")
    with catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


@contextlib.contextmanager
def pillow_warnings_as_notes(notes: Optional[List[str]]) -> Iterator[None]:
    """A block in which Pillow's warnings about a damaged part of a file ("Corrupt
    EXIF data", "Tag data larger than file", raised when it opens or orients a JPEG
    or TIFF; it goes on without that part) become one note when the caller collects
    ``notes``, instead of a library's warning on stderr; other warnings pass on as
    usual, and without a list so do Pillow's."""
    if notes is None:
        yield
        return
    with catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield
    from_pillow = [w for w in caught if f"{os.sep}PIL{os.sep}" in str(w.filename)
                   and issubclass(w.category, UserWarning)]
    if from_pillow:
        first = " ".join(str(from_pillow[0].message).split())
        notes.append(
            f"Pillow read past a damaged part of the file ({first}); an EXIF "
            "orientation in it may not have been applied"
        )
    for w in caught:
        if not any(w is p for p in from_pillow):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def is_path(value: Any) -> bool:
    """A file path: a str, or any ``os.PathLike`` naming a str path (``pathlib``
    paths, pure ones included, ``os.DirEntry`` from ``os.scandir``), which were
    refused as "cannot classify a DirEntry" (and taken as frames or samples by
    autoencode). Bytes paths stay refused, as bytes are."""
    if isinstance(value, str):
        return True
    return isinstance(value, os.PathLike) and isinstance(os.fspath(value), str)


def _is_pil(image: Any) -> bool:
    """A PIL image, known by its attributes (Pillow is imported only when needed)."""
    return hasattr(image, "mode") and hasattr(image, "size") and hasattr(image, "convert")


def load_rgb(image: ImageInput, notes: Optional[List[str]] = None) -> np.ndarray:
    """Any supported image -> (H, W, 3) RGB: uint8 (float32 for float inputs).

    * a path: read with Pillow; EXIF orientation applied; greyscale repeated to 3
      channels; palette expanded (with its transparency); alpha and a greyscale or
      RGB file's colour key (PNG's tRNS) composited over white; 16-bit greyscale
      reduced by round(x / 257) (16-bit RGB files: Pillow reduces them itself,
      keeping the high byte).
    * a PIL image: the same, without reading.
    * a numpy array (H, W[, C]) with C in 1, 3, 4: uint8, uint16 (round(x / 257)) or
      float on the 0..255 scale.
    * a torch tensor: (3, H, W) or (1, H, W) (PyTorch's channel-first layout) or
      (H, W); same dtypes as numpy, and bfloat16.

    notes: a list that gets a :func:`large_image_note` for a file above Pillow's
    decompression-bomb limit, in place of Pillow's ``DecompressionBombWarning``
    (which is raised as usual without a list), a note for float pixels all within
    0..1 or outside 0..255 (another scale than 0..255), and one in place of Pillow's
    warnings about a damaged part of a file (:func:`pillow_warnings_as_notes`). The
    pipelines pass one.

    Raises:
        InputError: unreadable file, unsupported shape or dtype, NaN or infinite
            float values.
    """
    if is_path(image):
        return read_image_file(os.fspath(image), notes)
    if isinstance(image, torch.Tensor):
        tensor = host_tensor(image, "image's pixels")
        if tensor.dim() == 3 and tensor.shape[0] in (1, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        elif tensor.dim() != 2:
            raise InputError(
                f"an image tensor must be (C, H, W) with C in 1, 3, 4, or (H, W); got "
                f"shape {tuple(tensor.shape)}"
            )
        if tensor.dtype == torch.uint16:
            return _from_array(tensor.numpy().astype(np.uint16))
        if tensor.is_floating_point() and tensor.dtype not in (torch.float16, torch.float64):
            # NumPy has no bfloat16 (nor float8): float32 holds their values exactly.
            tensor = tensor.float()
        return _from_array(tensor.numpy(), notes)
    if isinstance(image, np.ndarray):
        return _from_array(image, notes)
    if _is_pil(image):
        return _from_pil(image, notes)
    raise InputError(
        f"cannot read an image from a {type(image).__name__}: give a file path, a PIL "
        "image, a numpy array (H, W, 3) or a torch tensor (3, H, W)"
    )


def read_image_file(
    path: Union[str, Path],
    notes: Optional[List[str]] = None,
    check: Optional[Callable[[Any], None]] = None,
) -> np.ndarray:
    """:func:`load_rgb` of the file ``path``, opened once (so a pipe, ``<(cat x.png)``,
    works too); ``check(opened)`` may refuse the opened PIL image (by raising an
    InputError or PipelineError) before its pixels are decoded."""
    Image = require("PIL.Image")
    path = Path(path)
    try:
        with pillow_warnings_as_notes(notes), quiet_bomb_warning(notes), \
                Image.open(path) as opened:
            if check is not None:
                check(opened)
            rawmode = _stored_rawmode(opened)  # gone once the pixels are decoded
            opened.load()
            note = large_image_note(path, opened.size)
            if note is not None and notes is not None:
                notes.append(note)
            return _from_pil(opened, notes, rawmode)
    except PipelineError:
        raise  # the pixels' own problem (NaN), or check's: not "cannot read"
    except FileNotFoundError:
        raise no_such_file(path, f"no such image file: {path}") from None
    except IsADirectoryError:
        raise InputError(
            f"{path} is a folder, not an image; give the image files in it (for "
            f"example {Path(path) / '*.png'})"
        ) from None
    except Image.DecompressionBombError as error:
        # Pillow's guard against images that would decode to gigabytes.
        raise InputError(
            f"{path} is too large to decode safely ({error}); give a copy scaled "
            f"down below {2 * Image.MAX_IMAGE_PIXELS / 1e6:.3g} megapixels"
        ) from None
    except (OSError, ValueError, SyntaxError) as error:
        # Pillow raises UnidentifiedImageError (an OSError) for non-images and
        # OSError/SyntaxError/ValueError for truncated or corrupt ones.
        advice = (
            "Pillow reads 8- and 16-bit TIFFs and float greyscale ones, not float RGB "
            "or every compression: save it as an 8- or 16-bit PNG or TIFF"
            if path.suffix.lower() in (".tif", ".tiff")
            else "give a JPEG, PNG, BMP, GIF, TIFF or WebP file"
        )
        raise InputError(
            f"cannot read {path} as an image ({str(error).splitlines()[0]}); {advice}"
        ) from None


# --------------------------------------------------------------------------------------
# 2.-4. crop, resize, normalise


def center_crop_box(height: int, width: int) -> Tuple[int, int, int]:
    """The colab's centre crop of an H x W image: ``(top, left, side)``.

    side = int((224 / 256) * min(H, W)) (exact in binary floating point: 7/8 of an
    integer below 2**50), top = ((H - side) + 1) // 2, left = ((W - side) + 1) // 2.
    """
    side = int(CROP_FRACTION * min(int(height), int(width)))
    return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side


def center_crop(rgb: np.ndarray) -> np.ndarray:
    """(H, W, C) -> the colab's square centre crop (side, side, C) (a view).

    Raises:
        InputError: the image is too small for a non-empty crop.
    """
    height, width = rgb.shape[:2]
    top, left, side = center_crop_box(height, width)
    if side < 1:
        raise InputError(
            f"the image is {width}x{height} pixels: too small for the centre crop "
            f"({CROP_FRACTION:.3f} of the shorter side); give an image of at least 2x2"
        )
    return rgb[top : top + side, left : left + side]


def resize_cubic(rgb: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, C) on the 0..255 scale -> (size[0], size[1], C) with ``cv2.resize(...,
    INTER_CUBIC)``, in the input's dtype: uint8 in, rounded and saturated uint8 out,
    as in the colab; float in, float out clipped to 0..255, fractions kept.

    The cubic overshoots next to edges, below 0 and above 255: uint8 saturates that
    away, and the clip does the same for floats, so that an image given as uint8 and
    as the same integers in float differs only by uint8's rounding to integers (and
    OpenCV's fixed-point arithmetic for uint8), not by the overshoot."""
    cv2 = require("cv2")
    height, width = size
    # cv2's dsize is (width, height).
    resized = cv2.resize(rgb, (int(width), int(height)), interpolation=cv2.INTER_CUBIC)
    if np.issubdtype(resized.dtype, np.floating):
        resized = np.clip(resized, 0.0, 255.0)
    return resized


def normalize(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) on 0..255 -> float32 (H, W, 3): (x - mean) / std, in float64 first."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float64)
    std = np.asarray(IMAGENET_STD, dtype=np.float64)
    return ((rgb.astype(np.float64) - mean) / std).astype(np.float32)


def preprocess_image(
    image: ImageInput,
    size: Optional[Tuple[int, int]] = (224, 224),
    notes: Optional[List[str]] = None,
) -> torch.Tensor:
    """The colab's preprocessing: -> float32 (3, H, W), normalised.

    size: the model's (H, W); None keeps the crop at its own size (Fourier and conv
    models only, see the module docstring). notes: as :func:`load_rgb`'s.
    """
    crop = center_crop(load_rgb(image, notes))
    if size is not None:
        crop = resize_cubic(crop, size)
    return torch.from_numpy(normalize(crop)).permute(2, 0, 1).contiguous()


def batches(shapes: Sequence[Sequence[int]], batch_size: int) -> List[Tuple[int, int]]:
    """``(start, stop)`` of each model call for images of these preprocessed
    ``shapes``, in order: runs of consecutive images of one shape, at most
    ``batch_size`` each."""
    groups: List[Tuple[int, int]] = []
    start = 0
    while start < len(shapes):
        stop = start + 1
        while (
            stop < len(shapes)
            and stop - start < batch_size
            and tuple(shapes[stop]) == tuple(shapes[start])
        ):
            stop += 1
        groups.append((start, stop))
        start = stop
    return groups


def model_image_size(model: torch.nn.Module) -> Tuple[int, int]:
    """The input size (H, W) an ImageNet model was trained at, from its config."""
    check_model(model, "classify", IMAGENET_MODELS)
    return model.config.training_image_size


# --------------------------------------------------------------------------------------
# The pipeline


@dataclass(frozen=True)
class LabelScore:
    """One predicted class: its name, index (output unit) and softmax probability."""

    label: str
    index: int
    probability: float

    def as_dict(self) -> Dict[str, Any]:
        return {"label": self.label, "index": self.index, "probability": self.probability}


@dataclass(frozen=True)
class ClassifyResult:
    """What classify found for one image: ``top_k`` most probable first; ``logits``
    (num_classes,) float32; ``notes``: remarks on the input (an image above Pillow's
    decompression-bomb limit: :func:`large_image_note`)."""

    input: str
    top_k: Tuple[LabelScore, ...]
    logits: torch.Tensor
    notes: Tuple[str, ...] = ()

    def as_dict(self) -> Dict[str, Any]:
        return {
            "input": self.input,
            "top_k": [s.as_dict() for s in self.top_k],
            "notes": list(self.notes),
        }


def _is_one_image(images: Any) -> bool:
    """True when ``images`` is one image rather than several: a path (str or Path),
    a PIL image, a numpy array or torch tensor of fewer than 4 dimensions (an
    (H, W, C) array is one image, not H rows), and anything that is not iterable
    (:func:`load_rgb` then says what it takes). False for a batch: a 4-dimensional
    array or tensor (B, ...), or any other iterable of images (list, tuple,
    generator). Bytes count as one (unsupported) image, not as their byte values."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return images.ndim != 4
    if isinstance(images, (bytes, bytearray, memoryview)) or is_path(images) or _is_pil(images):
        return True
    return not isinstance(images, Iterable)


def _describe(image: ImageInput) -> str:
    if is_path(image):
        return os.fspath(image)
    shape = getattr(image, "shape", None) or getattr(image, "size", None)
    return f"{type(image).__name__} {tuple(shape) if shape is not None else ''}".strip()


def _reads_the_same_again(image: ImageInput) -> bool:
    """Whether preprocessing ``image`` a second time gives what the first gave, so
    that its pixels need not be held between the two: true of a file that can be read
    twice (:func:`~.base.readable_twice`; not a pipe or ``/dev/stdin``, whose bytes
    come once), of arrays and tensors, and of PIL images, also one that ``Image.open``
    has not decoded yet: the first read decodes it, and the depth its colour key is
    stored at, which only the undecoded image tells, is kept for the next
    (:func:`_first_rawmode`)."""
    if is_path(image):
        return readable_twice(image)
    return True


class ClassifyPipeline:
    """ImageNet classification with an ``imagenet_learned``, ``imagenet_fourier`` or
    ``imagenet_conv`` model (see the module docstring).

    ``pipeline(image)`` -> :class:`ClassifyResult`; ``pipeline([image, ...])`` (any
    iterable of images: a list, a tuple, a generator) or a batch array -> a list, run
    ``batch_size`` images per forward pass. A path, a PIL image and an array or tensor
    of fewer than 4 dimensions are one image (an (H, W, 3) array is not H rows). Labels: the colab's 1000
    ImageNet names when the model has 1000 classes, ``"class N"`` otherwise (tiny test
    models).

    resize: False feeds the centre crop at its own size (Fourier and conv only);
    crops of different sizes then run one at a time.

    Memory holds one batch of preprocessed pixels, not every image's (0.6 MB an
    image at 224x224): every image is preprocessed first, so that a bad one fails
    before any model call, keeping only its notes and size, then again batch by
    batch for its model call (:meth:`logits_by_batch`). A pipe or ``/dev/stdin``
    keeps its first read instead, as do ``batch_size`` images or fewer (one model
    call's worth: one image is read once). A PIL image ``Image.open`` has not decoded
    yet reads the same every time, also given twice (in one list or in two calls),
    though its first read decodes it (:func:`_first_rawmode`). A generator's images
    are taken into a list first (the caller's objects, not pixels).

    Float pixels (0..255 scale) are clipped to 0..255, resized in float32 and clipped
    to 0..255 again, their fractions kept (:func:`resize_cubic`); uint8 pixels are
    resized in uint8, rounded and saturated, as in the colab.
    """

    def __init__(
        self, model: torch.nn.Module, *, resize: bool = True, batch_size: int = 16
    ) -> None:
        name = check_model(model, "classify", IMAGENET_MODELS)
        resize = flag(resize, "resize")
        if not resize and name == "imagenet_learned":
            raise WrongModelError(
                "imagenet_learned has a learned position encoding of its training size "
                "and cannot take the crop at its own size; resize (the default) or use "
                "imagenet_fourier or imagenet_conv"
            )
        check_weights(model, "classify")
        self.model = model  # run in eval mode, call by call (eval_mode)
        self.size: Optional[Tuple[int, int]] = model_image_size(model) if resize else None
        self.labels = class_names(int(model.config.num_classes), "imagenet")
        self.batch_size = positive_int(batch_size, "batch_size")
        self.progress: Progress = no_progress

    def preprocess(self, image: ImageInput, notes: Optional[List[str]] = None) -> torch.Tensor:
        """One image -> the model's input (3, H, W) float32; ``notes`` as
        :func:`load_rgb`'s."""
        return preprocess_image(image, self.size, notes)

    @torch.no_grad()
    def logits(self, pixels: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Preprocessed images (3, H, W) -> per image the float32 logits (C,); images
        of one size are batched together, in order (:func:`batches`)."""
        groups = batches([p.shape for p in pixels], self.batch_size)
        out: List[torch.Tensor] = []
        for start, stop in self.progress(groups, len(groups), "batches"):
            out.extend(self.batch_logits(pixels[start:stop]))
        return out

    @torch.no_grad()
    def batch_logits(self, pixels: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """One model call: preprocessed images of one size (3, H, W) -> per image the
        float32 logits (C,)."""
        parameter = next(self.model.parameters())
        batch = torch.stack(list(pixels)).to(parameter.device, parameter.dtype)
        with eval_mode(self.model):
            return list(self.model(batch).float().cpu())

    def __call__(
        self, images: Union[ImageInput, Iterable[ImageInput]], *, top_k: int = 5
    ) -> Union[ClassifyResult, List[ClassifyResult]]:
        """images: one image, any iterable of images (list, tuple, generator), or a
        batch array: numpy (B, H, W, C) or torch (B, C, H, W). top_k: labels per
        image, at least 1 (more than the model's classes gives them all).

        Raises:
            InputError: an image that cannot be read or used; among several, the
                message starts with its number from 1 (``image 2: ...``).
        """
        top_k = positive_int(top_k, "top_k")  # before any work, not after the model
        single = _is_one_image(images)
        batch = [images] if single else list(images)
        notes: List[List[str]] = [[] for _ in batch]

        def numbered(index: int, message: str) -> str:
            # One image (alone or the only one of a list) is "the image", as one text
            # in fill-mask.
            return message if len(batch) == 1 else f"image {index + 1}: {message}"

        results = [
            ClassifyResult(_describe(batch[index]), self.scores(logits, top_k, notes[index]),
                           logits, tuple(notes[index]))
            for index, logits in self.logits_by_batch(batch, notes, numbered)
        ]
        return results[0] if single else results

    def logits_by_batch(
        self,
        images: Sequence[ImageInput],
        notes: Sequence[List[str]],
        message: Callable[[int, str], str],
    ) -> Iterator[Tuple[int, torch.Tensor]]:
        """``(index, logits)`` of each of ``images``, in order: the float32 logits
        (C,), with memory bounded by the batch rather than by the number of images.

        Every image is preprocessed first, so that a bad one among thousands fails
        before any model call; only its notes (added to ``notes[index]``) and its
        shape are kept. The images of each model call (:func:`batches`) are then
        preprocessed again, and only their logits outlive the call. An image whose
        second read would not be its first (:func:`_reads_the_same_again`: a pipe,
        ``/dev/stdin``) keeps its first read's pixels instead, and so does
        every image where there are no more than ``batch_size`` (one model call's
        worth, which the bound allows: ``pipeline(image)`` reads its file once); a
        file written to or replaced meanwhile (:func:`~.base.file_state`), or whose
        shape has changed, is refused.

        message(index, text): the message of image ``index``'s InputError, given
        the error's own text (``__call__`` numbers the image, ``run`` names the file).
        Progress (:attr:`progress`): ``"preprocessing"``, then ``"batches"``.
        """

        reads: TwoReads[torch.Tensor] = TwoReads()
        rows = list(enumerate(notes))
        # Pixels of one model call are held anyway: reading them again would only
        # double the decoding (and refuse a file touched meanwhile).
        hold_every_image = len(rows) <= self.batch_size
        for index, image_notes in self.progress(rows, len(rows), "preprocessing"):
            image = images[index]
            keep = hold_every_image or not _reads_the_same_again(image)
            try:
                reads.first(lambda: self.preprocess(image, image_notes),
                            image if is_path(image) else None, keep=keep)
            except InputError as error:
                raise InputError(message(index, str(error))) from None

        def again(index: int) -> torch.Tensor:
            # Its notes were taken on the first read; a list (not None) keeps
            # Pillow's warnings quiet on this one too.
            try:
                return reads.again(index, lambda: self.preprocess(images[index], []),
                                   _describe(images[index]))
            except InputError as error:
                raise InputError(message(index, str(error))) from None

        groups = batches(reads.shapes, self.batch_size)
        for start, stop in self.progress(groups, len(groups), "batches"):
            batch = [again(index) for index in range(start, stop)]
            logits = self.batch_logits(batch)
            del batch  # not held while the next batch is read
            yield from zip(range(start, stop), logits)

    def scores(self, logits: torch.Tensor, top_k: int, notes: List[str]) -> Tuple[LabelScore, ...]:
        """An image's ``top_k`` labels from its logits (C,), best first; a note on
        logits that are not finite is added to ``notes``."""
        note = non_finite_output_note(logits, self.model)
        if note is not None:
            notes.append(note)
        probabilities, indices = softmax_top_k(logits, top_k)
        return tuple(
            LabelScore(self.labels[i], int(i), float(p))
            for p, i in zip(probabilities.tolist(), indices.tolist())
        )


# --------------------------------------------------------------------------------------
# perceiver-convert run classify (the contract: perceiver_torch.pipelines)


def run_task(pipeline: ClassifyPipeline, inputs: List[str], options: RunOptions) -> List[dict]:
    """``perceiver-convert run classify``: one document per image.

    Memory is bounded by the batch, not by the number of images
    (:meth:`ClassifyPipeline.logits_by_batch`): every image is read and checked first
    (an unreadable one among thousands fails before any model call, naming the file),
    keeping only its notes and its size; each batch's images are then read again for
    their model call, and only the documents (and with ``--npy``/``--npz`` the
    logits, the output itself) stay. An INPUT that cannot be read twice (a pipe:
    :func:`~.base.readable_twice`) keeps its first read's pixels, as do the images of
    a run of no more than one batch. The lines are
    printed once every image has its answer, as when all were computed at once.
    """
    # Every output's path (its folder, writable; not a folder itself) before any work,
    # as the CLI's.
    check_output_paths([] if options.output is None else [options.output])
    if options.extra.get("native_size") and pipeline.size is not None:
        # The same pipeline at the images' own size: keep the caller's batch size.
        pipeline = ClassifyPipeline(pipeline.model, resize=False, batch_size=pipeline.batch_size)
    pipeline.progress = options.progress
    notes: List[List[str]] = [[] for _ in inputs]

    def named(index: int, message: str) -> str:
        path = inputs[index]
        return message if path in message else f"{path}: {message}"

    documents: List[dict] = []
    lines: List[str] = []
    logits: Optional[np.ndarray] = None  # (N, num_classes): --npy/--npz only
    for index, row in pipeline.logits_by_batch(inputs, notes, named):
        path, image_notes = inputs[index], notes[index]
        scores = pipeline.scores(row, options.top_k, image_notes)
        documents.append(ClassifyResult(path, scores, row, tuple(image_notes)).as_dict())
        lines.append(path)
        lines.extend(f"  note: {note}" for note in image_notes)
        lines.extend(
            f"  {rank}. {score.label} (index {score.index})  {score.probability:.4f}"
            for rank, score in enumerate(scores, 1)
        )
        if options.arrays is not None:
            if logits is None:
                logits = np.empty((len(inputs), *row.shape), dtype=np.float32)
            logits[index] = row.numpy()
    for line in lines:
        options.echo(line)
    if options.output is not None:
        if options.arrays is None:
            with options.open_output(options.output) as handle:
                document = results_document("classify", pipeline.model, documents)
                handle.write((json.dumps(document, indent=2) + "\n").encode("utf-8"))
        else:
            with options.open_output(options.output) as handle:
                if options.arrays == "npy":
                    np.save(handle, logits)
                else:
                    np.savez(handle, logits=logits, inputs=np.asarray(inputs))
    return documents


def demo_task(model: torch.nn.Module, folder: Path, options: RunOptions) -> Dict[str, str]:
    """``perceiver-convert demo``: a generated picture (a colour gradient with a disc,
    saved as PNG) through the colab's preprocessing and the model."""
    Image = require("PIL.Image")
    height, width = 48, 64
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), np.full_like(x, 96)], axis=-1
    ).astype(np.uint8)
    picture[(y - 24) ** 2 + (x - 36) ** 2 < 12**2] = (250, 250, 40)
    from .media import atomic_path

    path = Path(folder) / "picture.png"
    with atomic_path(path) as temp:  # --workdir --force: never a half-written file
        Image.fromarray(picture).save(temp)
    best = ClassifyPipeline(model)(str(path), top_k=1).top_k[0]
    return {
        "task": "classify",
        "input": f"{path.name} ({width}x{height})",
        "answer": f"{best.label} ({best.probability:.2f})",
    }
