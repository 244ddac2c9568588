"""The mapping op registry: each op's effect on arange fixtures, its shape rule and its inverse."""

from __future__ import annotations

import numpy as np
import pytest

from converter.errors import MappingError, ShapeMismatch
from converter.ops import (
    OP_NAMES,
    apply_ops,
    invert_ops,
    op_docs,
    ops_inverse_shape,
    ops_shape,
    parse_op,
)


def arange(*shape: int, dtype: str = "float32") -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


def assert_round_trip(op_spec, array: np.ndarray) -> np.ndarray:
    op = parse_op(op_spec)
    out = op.apply(array)
    assert tuple(out.shape) == op.shape(array.shape)
    back = op.invert(out)
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    assert back.tobytes() == array.tobytes()
    assert op.inverse_shape(out.shape) == array.shape
    return out


def test_registry_is_closed_and_documented():
    assert set(OP_NAMES) == {
        "linear",
        "conv_hwio_to_oihw",
        "reverse_axes",
        "squeeze",
        "reshape",
        "dtype",
    }
    assert all(op_docs()[name] for name in OP_NAMES)


def test_linear_transposes_in_out_to_out_in():
    w = arange(3, 5)  # Haiku [in, out]
    out = assert_round_trip("linear", w)
    assert out.shape == (5, 3)
    for i in range(3):
        for o in range(5):
            assert out[o, i] == w[i, o]
    assert out.flags.c_contiguous


def test_conv_hwio_to_oihw_keeps_height_and_width():
    hwio = arange(2, 3, 4, 5)  # H=2, W=3, I=4, O=5: all distinct sizes
    out = assert_round_trip("conv_hwio_to_oihw", hwio)
    assert out.shape == (5, 4, 2, 3)
    for h in range(2):
        for w in range(3):
            for i in range(4):
                for o in range(5):
                    assert out[o, i, h, w] == hwio[h, w, i, o]
    # The permutation HuggingFace used, (3, 2, 1, 0), swaps H and W: different data.
    assert not np.array_equal(out.reshape(-1), hwio.transpose(3, 2, 1, 0).reshape(-1))


def test_reverse_axes_is_numpys_transpose_and_its_own_inverse():
    hwio = arange(2, 3, 4, 5)
    out = assert_round_trip({"reverse_axes": {"rank": 4}}, hwio)
    assert out.shape == (5, 4, 3, 2)  # OIWH: height and width swapped
    np.testing.assert_array_equal(out, np.transpose(hwio))
    assert out.flags.c_contiguous
    with pytest.raises(ShapeMismatch, match="rank-4"):
        parse_op({"reverse_axes": {"rank": 4}}).apply(arange(2, 3))
    with pytest.raises(MappingError, match="rank"):
        parse_op({"reverse_axes": {}})


def test_squeeze_drops_only_listed_unit_dims():
    bn = arange(1, 1, 1, 7)
    out = assert_round_trip({"squeeze": {"dims": [0, 1, 2]}}, bn)
    assert out.shape == (7,)
    np.testing.assert_array_equal(out, bn.reshape(7))
    with pytest.raises(ShapeMismatch, match="size-1"):
        parse_op({"squeeze": {"dims": [0]}}).apply(arange(2, 3))


def test_reshape_between_explicit_shapes():
    out = assert_round_trip({"reshape": {"from": [1, -1], "to": [-1]}}, arange(1, 6))
    assert out.shape == (6,)
    with pytest.raises(ShapeMismatch):
        parse_op({"reshape": {"from": [2, 3], "to": [6]}}).apply(arange(3, 2))


def test_dtype_is_exact_both_ways():
    counter = np.array(123456, dtype=np.int32)
    out = assert_round_trip({"dtype": {"from": "int32", "to": "int64"}}, counter)
    assert out.dtype == np.int64 and out.shape == ()
    # The inverse refuses values that int32 cannot hold instead of wrapping them.
    with pytest.raises(MappingError, match="change values"):
        parse_op({"dtype": {"from": "int32", "to": "int64"}}).invert(np.array(2**40))
    with pytest.raises(ShapeMismatch, match="expects int32"):
        parse_op({"dtype": {"from": "int32", "to": "int64"}}).apply(
            np.zeros(2, np.float32)
        )


def test_sequences_invert_in_reverse_order():
    ops = [parse_op({"squeeze": {"dims": [0]}}), parse_op("linear")]
    array = arange(1, 3, 4)
    out = apply_ops(array, ops)
    assert out.shape == (4, 3)
    assert ops_shape(array.shape, ops) == (4, 3)
    assert ops_inverse_shape((4, 3), ops) == (1, 3, 4)
    assert invert_ops(out, ops).tobytes() == array.tobytes()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("transpose", "unknown op 'transpose'"),
        ({"linear": {"axis": 1}}, "takes no arguments"),
        ({"squeeze": {"dims": []}}, "dims"),
        ({"squeeze": {"dims": [0, 0]}}, "distinct"),
        ({"reshape": {"to": [3]}}, "'from' and 'to'"),
        ({"reshape": {"from": [-1, -1], "to": [3]}}, "at most one -1"),
        ({"dtype": {"from": "int32", "to": "object"}}, "must be one of"),
        (["linear"], "one-key mapping"),
        ({"linear": None, "squeeze": None}, "one-key mapping"),
    ],
)
def test_bad_op_specs_are_explained(spec, message):
    with pytest.raises(MappingError, match=message):
        parse_op(spec)


def test_rank_errors_name_the_op():
    with pytest.raises(ShapeMismatch, match="linear expects a rank-2"):
        parse_op("linear").shape((3,))
    with pytest.raises(ShapeMismatch, match="conv_hwio_to_oihw expects a rank-4"):
        parse_op("conv_hwio_to_oihw").apply(arange(3, 3))


def test_reshape_sizes_are_bounded_and_multiplied_exactly():
    # Past numpy's largest dimension: refused where the op is read (np.prod raised
    # OverflowError when the shape was checked).
    with pytest.raises(MappingError, match="'to' must be a list of positive sizes"):
        parse_op({"reshape": {"from": [-1, 64], "to": [2**70, -1]}})
    with pytest.raises(MappingError, match="'from' must be a list of positive sizes"):
        parse_op({"reshape": {"from": [True, 64], "to": [64]}})
    # Sizes that fit int64 one by one, but not their product: np.prod wrapped to -2
    # and the "shape" came out as [2**63 - 1, 2, -32].
    op = parse_op({"reshape": {"from": [-1], "to": [2**63 - 1, 2, -1]}})
    with pytest.raises(ShapeMismatch, match="does not fit"):
        op.shape((64,))


def test_squeeze_dims_are_not_booleans():
    with pytest.raises(MappingError, match="'dims' must be a list"):
        parse_op({"squeeze": {"dims": [True]}})
