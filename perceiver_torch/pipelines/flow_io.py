"""Optical-flow files and pictures: Middlebury ``.flo``, the Middlebury colour wheel and
the colab's HSV rendering.

Flow arrays here are numpy ``(H, W, 2)`` float32 in pixels, channel 0 horizontal (u,
+x to the right) and channel 1 vertical (v, +y downwards), as in ``.flo`` files.
Only :func:`flow_to_hsv` needs a media library (OpenCV, as the colab).

Both pictures draw a vector with a NaN or infinite component black, as the Middlebury
tools draw unknown flow; it does not count towards the wheel's ``max_flow``.
"""

from __future__ import annotations

import numbers
import struct
from typing import Optional, Union

import numpy as np

from .base import InputError, positive_int, require, usage_error

__all__ = [
    "FLO_MAGIC",
    "colour_wheel",
    "decode_flo",
    "encode_flo",
    "flow_to_hsv",
    "flow_to_wheel",
    "max_magnitude",
    "render_flow",
    "wheel_legend",
]

# Middlebury .flo: the float32 202021.25 (little-endian bytes b"PIEH") as a sanity tag.
FLO_MAGIC = 202021.25
_FLO_HEADER = struct.Struct("<fii")  # magic, width, height


def encode_flo(flow: np.ndarray) -> bytes:
    """The bytes of a Middlebury ``.flo`` file: float32 202021.25 (b"PIEH"), int32
    width, int32 height, then float32 u, v interleaved row by row; all little-endian.

    flow: (H, W, 2) in pixels.
    """
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2 or 0 in flow.shape:
        # (An empty flow too: no reader, decode_flo included, takes a 0-pixel file.)
        raise ValueError(f"flow must be (H, W, 2) with H, W >= 1, got shape {flow.shape}")
    height, width = flow.shape[:2]
    data = np.ascontiguousarray(flow, dtype="<f4")
    return _FLO_HEADER.pack(FLO_MAGIC, width, height) + data.tobytes()


def decode_flo(data: bytes, name: str = "the .flo data") -> np.ndarray:
    """Reads :func:`encode_flo`'s layout back -> (H, W, 2) float32 (native order).

    Raises:
        InputError: wrong tag, impossible size or a truncated/overlong file.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"decode_flo takes the file's bytes, got a {type(data).__name__} "
            "(Path(path).read_bytes() reads a file)"
        )
    if len(data) < _FLO_HEADER.size:
        raise InputError(f"{name} is not a .flo file: only {len(data)} bytes")
    magic, width, height = _FLO_HEADER.unpack_from(data)
    if magic != FLO_MAGIC:
        raise InputError(
            f"{name} is not a Middlebury .flo file: its tag is {data[:4]!r}, not b'PIEH'"
        )
    if width < 1 or height < 1:
        raise InputError(f"{name} has an impossible size {width}x{height}")
    expected = _FLO_HEADER.size + width * height * 2 * 4
    if len(data) != expected:
        raise InputError(
            f"{name} should be {expected} bytes for {width}x{height}, got {len(data)}"
        )
    values = np.frombuffer(data, dtype="<f4", offset=_FLO_HEADER.size)
    return values.reshape(height, width, 2).astype(np.float32)


# -- the Middlebury colour wheel (Baker et al. 2007, as flow_vis draws it) -------------

# Hue transitions and their number of colours: red-yellow, yellow-green, green-cyan,
# cyan-blue, blue-magenta, magenta-red (55 in all), chosen in the paper for roughly
# perceptually even steps.
_WHEEL_SEGMENTS = (15, 6, 4, 11, 13, 6)


def colour_wheel() -> np.ndarray:
    """The 55 colours of the Middlebury wheel, (55, 3) float64 RGB in 0..255.

    Each segment ramps one channel (up, then down on the next) in ``floor(255 * i / n)``
    steps: red -> yellow -> green -> cyan -> blue -> magenta -> red.
    """
    rows = []
    # (channel held at 255, channel ramped, ramp up?) per segment, in RGB indices.
    plan = ((0, 1, True), (1, 0, False), (1, 2, True), (2, 1, False), (2, 0, True), (0, 2, False))
    for n, (held, ramped, up) in zip(_WHEEL_SEGMENTS, plan):
        for i in range(n):
            colour = [0.0, 0.0, 0.0]
            colour[held] = 255.0
            step = np.floor(255.0 * i / n)
            colour[ramped] = step if up else 255.0 - step
            rows.append(colour)
    return np.array(rows, dtype=np.float64)


def _wheel_colours(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Normalised flow components (|flow| <= 1 inside the wheel) -> (H, W, 3) uint8."""
    wheel = colour_wheel() / 255.0
    n = wheel.shape[0]
    radius = np.sqrt(u * u + v * v)
    # The angle measured from -x so that +x lands on the wheel's first colour (red);
    # "+ 0.0" turns a -0.0 into +0.0 so that exact axis directions are not split.
    angle = np.arctan2(-(v + 0.0), -(u + 0.0)) / np.pi  # in [-1, 1]
    position = (angle + 1.0) / 2.0 * (n - 1)
    k0 = np.floor(position).astype(np.int64)
    k1 = k0 + 1
    k1[k1 == n] = 0
    fraction = (position - k0)[..., None]
    colour = (1.0 - fraction) * wheel[k0] + fraction * wheel[k1]
    inside = radius <= 1.0
    # Saturation grows with the radius (white at zero flow); beyond the unit circle
    # the colour is darkened instead.
    colour[inside] = 1.0 - radius[inside][:, None] * (1.0 - colour[inside])
    colour[~inside] *= 0.75
    return np.floor(255.0 * colour).astype(np.uint8)


def max_magnitude(flow: np.ndarray) -> float:
    """The largest length of the finite vectors of an (..., 2) flow (0.0 when none
    is): the wheel's default ``max_flow``."""
    flow = np.asarray(flow, dtype=np.float64)
    lengths = np.hypot(flow[..., 0], flow[..., 1])  # no overflow for huge components
    lengths = lengths[np.isfinite(lengths)]
    return float(lengths.max()) if lengths.size else 0.0


def _known(flow: np.ndarray) -> np.ndarray:
    """(H, W) bool: the vectors whose two components are finite."""
    return np.isfinite(flow).all(axis=-1)


def flow_to_wheel(flow: np.ndarray, max_flow: Optional[float] = None) -> np.ndarray:
    """Middlebury colour picture of a flow, as ``flow_vis.flow_to_color``.

    flow: (H, W, 2) in pixels; ``max_flow``: the magnitude drawn fully saturated
    (default: the largest magnitude in ``flow``, so the picture uses the whole wheel;
    give one value for every frame of a video so that colours compare across frames).
    Returns (H, W, 3) uint8 RGB: hue = direction (+x red, +y yellow-orange, -x cyan-blue),
    saturation = magnitude / max_flow, white = no motion, black = unknown (a NaN or
    infinite component; not counted in the default ``max_flow``).

    Raises:
        PipelineError: ``max_flow`` negative, NaN or infinite (a negative one turned
            every direction round).
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must be (H, W, 2), got shape {flow.shape}")
    if max_flow is None:
        max_flow = max_magnitude(flow)
    elif (
        isinstance(max_flow, bool)
        or not isinstance(max_flow, numbers.Real)
        or not (np.isfinite(max_flow) and max_flow >= 0)
    ):
        # A string failed in NumPy ("ufunc 'isfinite' not supported").
        raise usage_error(
            f"max_flow must be a finite length of at least 0 px, got {max_flow!r}"
        )
    known = _known(flow)
    flow = np.where(known[..., None], flow, 0.0)
    # flow_vis's epsilon: an all-zero flow is drawn white instead of dividing by 0.
    scale = float(max_flow) + 1e-5
    picture = _wheel_colours(flow[..., 0] / scale, flow[..., 1] / scale)
    picture[~known] = 0
    return picture


def wheel_legend(size: int = 151) -> np.ndarray:
    """The colour key of :func:`flow_to_wheel`: (size, size, 3) uint8, the flow at a
    pixel being its offset from the centre (radius size // 2 fully saturated, +x to the
    right, +y down); outside the unit circle the darkened colours show.

    Raises:
        PipelineError: ``size`` not an integer of at least 1 (NumPy's "negative
            dimensions are not allowed" before).
    """
    r = positive_int(size, "size") // 2
    y, x = np.mgrid[-r : size - r, -r : size - r].astype(np.float64)
    return _wheel_colours(x / max(r, 1), y / max(r, 1))


def flow_to_hsv(flow: np.ndarray, full_scale: float = 24.0) -> np.ndarray:
    """The colab's HSV picture of a flow, without its red/blue swap.

    Hue = direction (OpenCV's ``cartToPolar`` angle / 2, in OpenCV's 0..180 hue
    units), saturation = ``min(|flow| * 255 / full_scale, 255)`` (the colab's 24 px),
    value 255; converted with OpenCV's HSV->RGB. (The colab converts to BGR and shows
    that as RGB, swapping red and blue; this returns true RGB.)

    flow: (H, W, 2) in pixels -> (H, W, 3) uint8 RGB; unknown vectors (a NaN or
    infinite component) black.
    """
    cv2 = require("cv2")
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"flow must be (H, W, 2), got shape {flow.shape}")
    if flow.size == 0:  # OpenCV refuses empty images
        return np.zeros(flow.shape[:2] + (3,), dtype=np.uint8)
    known = _known(flow)
    flow = np.where(known[..., None], flow, np.float32(0))
    hsv = np.zeros(flow.shape[:2] + (3,), dtype=np.uint8)
    hsv[..., 2] = 255
    magnitude, angle = cv2.cartToPolar(
        np.ascontiguousarray(flow[..., 0]), np.ascontiguousarray(flow[..., 1])
    )
    # numpy truncates when a float array is stored in uint8, as in the colab.
    hsv[..., 0] = angle / np.pi / 2 * 180
    hsv[..., 1] = np.clip(magnitude * 255 / full_scale, 0, 255)
    picture = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    picture[~known] = 0
    return picture


def render_flow(
    flow: np.ndarray, style: str = "wheel", max_flow: Optional[Union[float, None]] = None
) -> np.ndarray:
    """``style`` "wheel" (:func:`flow_to_wheel`) or "hsv" (:func:`flow_to_hsv`) ->
    (H, W, 3) uint8 RGB. ``max_flow`` applies to the wheel only."""
    if style == "wheel":
        return flow_to_wheel(flow, max_flow)
    if style == "hsv":
        return flow_to_hsv(flow)
    raise ValueError(f"unknown flow rendering {style!r}; use 'wheel' or 'hsv'")
