"""Checks of a model's inputs at the door: rank, sizes, layout and dtype.

Every task model calls these at the start of ``forward`` (and of its other public
entry points), so that a wrong input fails with one line that names the argument, the
expected layout and sizes, and what was given, instead of an internal error deep in a
LayerNorm or a oneDNN primitive, or worse, a silently wrong output.

The checks read only ``tensor.shape``, ``tensor.dim()`` and ``tensor.dtype``: no
data-dependent operation, nothing on the device, so they cost nothing and trace
(``torch.jit.trace``, ``torch.compile``, ``torch.export``) like any other shape logic.

Every model refuses a batch of size 0 with the same error (:func:`expect`): an
empty batch is almost always a bug upstream, and a clear error is more useful than
an empty result.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, NoReturn, Optional, Sequence, Tuple

from torch import Tensor

__all__ = ["InputError", "expect", "expect_positive_int", "fail", "same_batch"]

Dim = Tuple[str, Optional[int]]  # (label, required size or None for any size >= 1)


class InputError(ValueError):
    """A model input has the wrong rank, size, layout or dtype."""


def fail(model: str, message: str) -> NoReturn:
    """Raises :class:`InputError` with ``"<model>: <message>"``."""
    raise InputError(f"{model}: {message}")


def _layout(dims: Sequence[Dim]) -> str:
    labels = ", ".join(label for label, _ in dims)
    sizes = ", ".join(label if size is None else str(size) for label, size in dims)
    return f"({labels})" if labels == sizes else f"({labels}) = ({sizes})"


def _channels_last_hint(
    dims: Sequence[Dim], shape: Tuple[int, ...], channels_axis: Optional[int]
) -> str:
    """A hint when the tensor looks channels-last (the JAX/NumPy layout)."""
    if channels_axis is None or len(shape) != len(dims):
        return ""
    channels = dims[channels_axis][1]
    if channels is None or shape[channels_axis] == channels or shape[-1] != channels:
        return ""
    order = list(range(len(shape) - 1))
    order.insert(channels_axis, len(shape) - 1)
    return (
        f"; it looks channels-last: pass x.permute({', '.join(map(str, order))}) "
        "(PyTorch layout, channels before the spatial axes)"
    )


def expect(
    model: str,
    name: str,
    tensor: Tensor,
    dims: Sequence[Dim],
    *,
    what: str = "",
    floating: Optional[bool] = None,
    channels_axis: Optional[int] = None,
    note: str = "",
) -> None:
    """Checks ``tensor`` against ``dims`` (one ``(label, size)`` per axis; size None:
    any size >= 1). The first axis labelled ``"B"`` is the batch: 0 is refused.

    what: a few words on the contents ("images, ImageNet-normalised").
    floating: True = a floating dtype is required, False = an integer dtype.
    channels_axis: the axis holding the channels, for a channels-last hint.
    note: said after a wrong shape (why a size is required).
    """
    if not isinstance(tensor, Tensor):
        fail(
            model,
            f"{name} must be a torch.Tensor of shape {_layout(dims)}, got "
            f"{type(tensor).__name__}",
        )
    shape = tuple(tensor.shape)
    described = f"{name} ({what})" if what else name
    if len(shape) != len(dims) or any(
        size is not None and got != size for (_, size), got in zip(dims, shape)
    ):
        fail(
            model,
            f"{described} must have shape {_layout(dims)}, got {list(shape)}"
            + _channels_last_hint(dims, shape, channels_axis)
            + (f"; {note}" if note else ""),
        )
    for (label, _), got in zip(dims, shape):
        if got == 0:
            if label == "B":
                fail(
                    model,
                    f"{name} has batch size 0; pass at least one example (every "
                    "perceiver_torch model refuses an empty batch)",
                )
            fail(model, f"{name} has size 0 along {label}: {list(shape)}")
    if floating is True and not tensor.is_floating_point():
        fail(
            model,
            f"{name} must be a floating-point tensor, got {tensor.dtype}; "
            f"convert it with {name}.float()",
        )
    if floating is False and (tensor.is_floating_point() or tensor.is_complex()):
        fail(
            model,
            f"{name} must be an integer tensor, got {tensor.dtype}; convert it "
            f"with {name}.long()",
        )


def same_batch(model: str, tensors: Mapping[str, Optional[Tensor]]) -> None:
    """The inputs that are given share one batch size."""
    sizes = {name: int(t.shape[0]) for name, t in tensors.items() if t is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        fail(model, f"the inputs have different batch sizes: {listed}")


def expect_positive_int(model: str, name: str, value: Any) -> int:
    """``value`` as an int, or :class:`InputError` unless it is an integer of at least
    1 (not a bool): a count such as ``batch_size``, which ``range()`` would refuse
    with a bare TypeError (2.5) or a ValueError (0). The pipelines' options get the
    same check (``pipelines.base.positive_int``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        fail(model, f"{name} must be an integer of at least 1, got {value!r}")
    return int(value)
