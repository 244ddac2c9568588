"""The closed registry of tensor operations a mapping rule may apply.

A rule turns one Haiku array into one PyTorch tensor through an ordered list of ops.
Each op knows three things: how it changes an array, how it changes a shape (so a
whole mapping is checked before any data is copied), and its exact inverse (so every
mapping also runs from PyTorch back to Haiku). Ops work on numpy arrays; the inverse
of every op returns bit-identical data.

In YAML an op is written either as a bare name (``linear``) or as a one-key mapping
with its arguments (``squeeze: {dims: [0, 1, 2]}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Tuple

import numpy as np

from converter.errors import MappingError, ShapeMismatch

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Op:
    """One step of a rule: a registered op name with its (validated) arguments."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, array: np.ndarray, *, contiguous: bool = True) -> np.ndarray:
        return _contiguous(_REGISTRY[self.name].forward(array, self.args), contiguous)

    def invert(self, array: np.ndarray, *, contiguous: bool = True) -> np.ndarray:
        return _contiguous(_REGISTRY[self.name].inverse(array, self.args), contiguous)

    def shape(self, shape: Shape) -> Shape:
        return _REGISTRY[self.name].forward_shape(shape, self.args)

    def inverse_shape(self, shape: Shape) -> Shape:
        return _REGISTRY[self.name].inverse_shape(shape, self.args)

    def describe(self) -> str:
        if not self.args:
            return self.name
        args = ", ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class _OpSpec:
    forward: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
    inverse: Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]
    forward_shape: Callable[[Shape, Mapping[str, Any]], Shape]
    inverse_shape: Callable[[Shape, Mapping[str, Any]], Shape]
    check_args: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    doc: str


def _no_args(args: Mapping[str, Any]) -> Mapping[str, Any]:
    if args:
        raise MappingError(f"takes no arguments, got {dict(args)}")
    return {}


def _require_rank(shape: Shape, rank: int, what: str) -> None:
    if len(shape) != rank:
        raise ShapeMismatch(
            f"{what} expects a rank-{rank} array, got shape {list(shape)}"
        )


# --- linear: Haiku Linear kernels are [in, out]; torch.nn.Linear weights are [out, in].


def _linear_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    _require_rank(shape, 2, "linear")
    return (shape[1], shape[0])


def _transpose(array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
    _require_rank(array.shape, 2, "linear")
    return array.T  # a view; apply_ops makes the result contiguous when asked


# --- conv_hwio_to_oihw: Haiku conv kernels are HWIO; torch Conv2d weights are OIHW.
# permute(3, 2, 0, 1) keeps height and width in place; (3, 2, 1, 0) would swap them.

_HWIO_TO_OIHW = (3, 2, 0, 1)
_OIHW_TO_HWIO = (2, 3, 1, 0)


def _conv_forward_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    _require_rank(shape, 4, "conv_hwio_to_oihw")
    return tuple(shape[i] for i in _HWIO_TO_OIHW)


def _conv_inverse_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    _require_rank(shape, 4, "conv_hwio_to_oihw (inverse)")
    return tuple(shape[i] for i in _OIHW_TO_HWIO)


def _conv_forward(array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
    _require_rank(array.shape, 4, "conv_hwio_to_oihw")
    return array.transpose(_HWIO_TO_OIHW)


def _conv_inverse(array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
    _require_rank(array.shape, 4, "conv_hwio_to_oihw (inverse)")
    return array.transpose(_OIHW_TO_HWIO)


# --- reverse_axes: every axis in reverse order (numpy's np.transpose without axes).
# HuggingFace's Perceiver converter applied it to the 4-D conv kernels too: HWIO
# becomes OIWH, height and width swapped (see docs/OFFICIAL.md); its own inverse.


def _reverse_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    rank = args["rank"]
    _require_rank(shape, rank, "reverse_axes")
    return tuple(reversed(shape))


def _reverse(array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
    _require_rank(array.shape, args["rank"], "reverse_axes")
    return array.transpose(tuple(range(array.ndim - 1, -1, -1)))


def _rank_arg(args: Mapping[str, Any]) -> Mapping[str, Any]:
    extra = set(args) - {"rank"}
    rank = args.get("rank")
    if extra or isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MappingError(f"needs exactly 'rank' (a positive integer), got {dict(args)}")
    return {"rank": rank}


# --- squeeze / unsqueeze of explicit size-1 dimensions (BatchNorm's [1, 1, 1, C]).


def _dims_arg(args: Mapping[str, Any]) -> Mapping[str, Any]:
    dims = args.get("dims")
    extra = set(args) - {"dims"}
    if extra:
        raise MappingError(f"unknown argument(s) {sorted(extra)}; expected 'dims'")
    if (
        not isinstance(dims, (list, tuple))
        or not dims
        or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims
        )
        or len(set(dims)) != len(dims)
    ):
        raise MappingError(
            f"'dims' must be a list of distinct dimensions >= 0, got {dims!r}"
        )
    return {"dims": tuple(sorted(dims))}


def _squeeze_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    dims = args["dims"]
    if max(dims) >= len(shape) or any(shape[d] != 1 for d in dims):
        raise ShapeMismatch(
            f"squeeze(dims={list(dims)}) needs size-1 dimensions, got shape {list(shape)}"
        )
    return tuple(s for i, s in enumerate(shape) if i not in dims)


def _unsqueeze_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    out = list(shape)
    for d in args["dims"]:
        if d > len(out):
            raise ShapeMismatch(f"cannot restore dimension {d} on shape {list(shape)}")
        out.insert(d, 1)
    return tuple(out)


def _squeeze(array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
    return array.reshape(_squeeze_shape(array.shape, args))


def _unsqueeze(array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
    return array.reshape(_unsqueeze_shape(array.shape, args))


# --- reshape between two explicit shapes (one entry of each may be -1).


_MAX_DIM = 2**63 - 1  # numpy's largest dimension (npy_intp)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reshape_args(args: Mapping[str, Any]) -> Mapping[str, Any]:
    extra = set(args) - {"from", "to"}
    if extra or "from" not in args or "to" not in args:
        raise MappingError(f"needs exactly 'from' and 'to' shapes, got {dict(args)}")
    out = {}
    for key in ("from", "to"):
        shape = args[key]
        # A numpy dimension is at most int64: a larger size (2**70) made np.prod
        # overflow (OverflowError) instead of failing to fit any array.
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(s, int)
            and not isinstance(s, bool)
            and (0 < s <= _MAX_DIM or s == -1)
            for s in shape
        ):
            raise MappingError(
                f"'{key}' must be a list of positive sizes (up to 2**63 - 1) or -1, "
                f"got {_short(shape)}"
            )
        if list(shape).count(-1) > 1:
            raise MappingError(f"'{key}' may contain at most one -1, got {list(shape)}")
        out[key] = tuple(shape)
    return out


def _resolve(template: Shape, shape: Shape, what: str) -> Shape:
    """Checks ``shape`` against a template with at most one -1 and returns it filled."""
    # Exact Python integers: np.prod in int64 overflows (or wraps) on large templates.
    size = math.prod(int(s) for s in shape)
    known = math.prod(s for s in template if s != -1)
    if -1 in template:
        if known == 0 or size % known:
            raise ShapeMismatch(
                f"{what}: shape {list(shape)} does not fit {list(template)}"
            )
        return tuple(size // known if s == -1 else s for s in template)
    if known != size:
        raise ShapeMismatch(
            f"{what}: shape {list(shape)} does not fit {list(template)}"
        )
    return tuple(template)


def _reshape_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    source = _resolve(args["from"], shape, "reshape 'from'")
    if source != tuple(shape):
        raise ShapeMismatch(f"reshape expects {list(args['from'])}, got {list(shape)}")
    return _resolve(args["to"], shape, "reshape 'to'")


def _reshape_inverse_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    target = _resolve(args["to"], shape, "reshape 'to'")
    if target != tuple(shape):
        raise ShapeMismatch(
            f"reshape inverse expects {list(args['to'])}, got {list(shape)}"
        )
    return _resolve(args["from"], shape, "reshape 'from'")


def _reshape(array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
    return array.reshape(_reshape_shape(array.shape, args))


def _reshape_inverse(array: np.ndarray, args: Mapping[str, Any]) -> np.ndarray:
    return array.reshape(_reshape_inverse_shape(array.shape, args))


# --- dtype: exact conversions only (BatchNorm's int32 counter <-> int64 num_batches_tracked).

_DTYPES = ("int32", "int64", "float16", "float32", "float64")


def _dtype_args(args: Mapping[str, Any]) -> Mapping[str, Any]:
    extra = set(args) - {"from", "to"}
    if extra or "from" not in args or "to" not in args:
        raise MappingError(f"needs exactly 'from' and 'to' dtypes, got {dict(args)}")
    for key in ("from", "to"):
        if args[key] not in _DTYPES:
            raise MappingError(
                f"'{key}' must be one of {', '.join(_DTYPES)}, got {args[key]!r}"
            )
    return {"from": args["from"], "to": args["to"]}


def _cast_exact(array: np.ndarray, source: str, target: str) -> np.ndarray:
    if array.dtype != np.dtype(source):
        raise ShapeMismatch(f"dtype op expects {source}, got {array.dtype}")
    out = array.astype(target)
    # Refuse a conversion that would lose information: the inverse must give the same bits.
    if not np.array_equal(out.astype(source), array, equal_nan=True):
        raise MappingError(f"converting {source} to {target} would change values")
    return out


def _same_shape(shape: Shape, args: Mapping[str, Any]) -> Shape:
    return tuple(shape)


_REGISTRY: Mapping[str, _OpSpec] = {
    "linear": _OpSpec(
        forward=_transpose,
        inverse=_transpose,
        forward_shape=_linear_shape,
        inverse_shape=_linear_shape,
        check_args=_no_args,
        doc="Haiku Linear kernel [in, out] -> torch Linear weight [out, in] (transpose)",
    ),
    "conv_hwio_to_oihw": _OpSpec(
        forward=_conv_forward,
        inverse=_conv_inverse,
        forward_shape=_conv_forward_shape,
        inverse_shape=_conv_inverse_shape,
        check_args=_no_args,
        doc="Haiku conv kernel HWIO -> torch Conv2d weight OIHW (permute 3, 2, 0, 1)",
    ),
    "reverse_axes": _OpSpec(
        forward=_reverse,
        inverse=_reverse,
        forward_shape=_reverse_shape,
        inverse_shape=_reverse_shape,
        check_args=_rank_arg,
        doc="reverse the order of all 'rank' axes (np.transpose; HWIO -> OIWH for conv "
        "kernels, as HuggingFace's converter wrote them); its own inverse",
    ),
    "squeeze": _OpSpec(
        forward=_squeeze,
        inverse=_unsqueeze,
        forward_shape=_squeeze_shape,
        inverse_shape=_unsqueeze_shape,
        check_args=_dims_arg,
        doc="drop the listed size-1 dimensions (inverse: put them back)",
    ),
    "reshape": _OpSpec(
        forward=_reshape,
        inverse=_reshape_inverse,
        forward_shape=_reshape_shape,
        inverse_shape=_reshape_inverse_shape,
        check_args=_reshape_args,
        doc="reshape between the explicit shapes 'from' and 'to' (one -1 allowed in each)",
    ),
    "dtype": _OpSpec(
        forward=lambda a, args: _cast_exact(a, args["from"], args["to"]),
        inverse=lambda a, args: _cast_exact(a, args["to"], args["from"]),
        forward_shape=_same_shape,
        inverse_shape=_same_shape,
        check_args=_dtype_args,
        doc="exact dtype conversion 'from' -> 'to' (refused if values would change)",
    ),
}

OP_NAMES: Tuple[str, ...] = tuple(_REGISTRY)


def op_docs() -> Mapping[str, str]:
    """One line per registered op, for ``--help`` and error messages."""
    return {name: spec.doc for name, spec in _REGISTRY.items()}


def parse_op(spec: Any) -> Op:
    """Builds an :class:`Op` from its YAML form (``"linear"`` or ``{"squeeze": {...}}``)."""
    if isinstance(spec, str):
        name, args = spec, {}
    elif isinstance(spec, Mapping) and len(spec) == 1:
        name, args = next(iter(spec.items()))
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise MappingError(
                f"arguments of op {name!r} must be a mapping, got {args!r}"
            )
    else:
        raise MappingError(
            f"an op is a name or a one-key mapping {{name: {{args}}}}, got {spec!r}"
        )
    if name not in _REGISTRY:
        raise MappingError(f"unknown op {name!r}; known ops: {', '.join(OP_NAMES)}")
    try:
        checked = _REGISTRY[name].check_args(args)
    except MappingError as error:
        raise MappingError(f"op {name!r}: {error}") from None
    return Op(name, checked)


def _contiguous(array: np.ndarray, wanted: bool) -> np.ndarray:
    # np.asarray copies only a non-contiguous array and keeps a 0-d array 0-d.
    return np.asarray(array, order="C") if wanted else array


def apply_ops(
    array: np.ndarray, ops: Sequence[Op], *, contiguous: bool = True
) -> np.ndarray:
    """Applies ``ops`` in order. With ``contiguous=False`` the result may be a strided
    view of ``array`` (a transposition not yet copied): the caller copies it where it
    wants the data, e.g. into a reusable output buffer."""
    for op in ops:
        array = op.apply(array, contiguous=False)
    return _contiguous(array, contiguous)


def invert_ops(
    array: np.ndarray, ops: Sequence[Op], *, contiguous: bool = True
) -> np.ndarray:
    """Applies the inverses of ``ops`` in reverse order (see :func:`apply_ops`)."""
    for op in reversed(ops):
        array = op.invert(array, contiguous=False)
    return _contiguous(array, contiguous)


def ops_shape(shape: Shape, ops: Sequence[Op]) -> Shape:
    for op in ops:
        shape = op.shape(shape)
    return tuple(shape)


def ops_inverse_shape(shape: Shape, ops: Sequence[Op]) -> Shape:
    for op in reversed(ops):
        shape = op.inverse_shape(shape)
    return tuple(shape)
