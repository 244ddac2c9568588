"""Bounds for float32 computations from a float64 evaluation of the same model.

Two float32 computations of the same function (a fast path and the plain path, a
batched and a per-item run, oneDNN and MKL) differ by rounding, and by how much depends
on the CPU's kernels: a fixed bound between them that one machine satisfies can fail on
another (issue 8: an Intel CPU with AVX-512 rounds the plain video decoder to 1.0e-5 of
the exact value, an AMD one to a few 1e-6). So each candidate is measured against a
float64 evaluation of the same model on the same inputs, and bounded by a multiple of
the *plain float32 path's own* error on this machine, measured in the same test:

    error(candidate, float64) <= FACTOR * max(error(plain, float64), FLOOR)

Why these constants (error = max |x - exact| / max |exact|, over the whole tensor):

* FACTOR = 4. The candidates reassociate the same sums (folded or absorbed
  projections, another blocking of the same matmuls, fewer padded positions). The
  classic bound for a dot product of n terms is gamma_n = n u / (1 - n u) of the sum
  of absolute terms, whatever the order, so both paths obey bounds of the same form;
  folding two projections into one matrix at most doubles the number of chained
  roundings on a path. 4x leaves room for that (2x) and for the error distributions'
  different tails (2x), while a genuinely wrong computation (a wrong fold, a dropped
  bias, a mask off by one) is off by orders of magnitude: 1e-3 or more here.
* FLOOR = 16 u (u = 2^-24, float32's unit roundoff): the plain path can land unusually
  close to the exact value (an output dominated by one bias); every output is at least
  one float32 rounding from exact, and a few chained roundings of the candidate must
  still pass.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Union

import numpy as np
import torch

FLOAT32_UNIT_ROUNDOFF = 2.0**-24
FACTOR = 4.0
FLOOR = 16 * FLOAT32_UNIT_ROUNDOFF

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(actual: ArrayLike, exact: ArrayLike) -> float:
    """max |actual - exact| / max |exact| over the whole tensor."""
    a, e = _as_float64(actual), _as_float64(exact)
    assert a.shape == e.shape, (a.shape, e.shape)
    return float(np.abs(a - e).max() / np.abs(e).max())


def float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (same weights, exactly: float32 -> float64 is exact)."""
    return copy.deepcopy(model).to(torch.float64)


def float64_inputs(inputs: Any) -> Any:
    """Floating tensors (nested in tuples, lists, dicts) cast to float64; the rest kept."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(torch.float64) if inputs.is_floating_point() else inputs
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(float64_inputs(x) for x in inputs)
    if isinstance(inputs, dict):
        return {k: float64_inputs(v) for k, v in inputs.items()}
    return inputs


def check_within_float32_rounding(
    label: str,
    candidate: ArrayLike,
    plain: ArrayLike,
    exact: ArrayLike,
    *,
    factor: float = FACTOR,
) -> Dict[str, float]:
    """Asserts ``candidate`` is as close to ``exact`` (float64) as the plain float32
    path is, up to ``factor`` (see the module docstring); returns both errors."""
    plain_error = relative_error(plain, exact)
    candidate_error = relative_error(candidate, exact)
    bound = factor * max(plain_error, FLOOR)
    assert candidate_error <= bound, (
        f"{label}: {candidate_error:.3g} from float64, the plain float32 path "
        f"{plain_error:.3g} (bound {factor:g} x max(plain, {FLOOR:.2g}) = {bound:.3g})"
    )
    return {"candidate": candidate_error, "plain": plain_error}


def check_outputs_within_float32_rounding(
    label: str,
    candidate: Union[ArrayLike, Mapping[str, ArrayLike]],
    plain: Union[ArrayLike, Mapping[str, ArrayLike]],
    exact: Union[ArrayLike, Mapping[str, ArrayLike]],
    *,
    factor: float = FACTOR,
) -> Dict[str, Dict[str, float]]:
    """:func:`check_within_float32_rounding` for a tensor or each entry of a dict."""
    if isinstance(candidate, Mapping):
        assert set(candidate) == set(plain) == set(exact)
        return {
            key: check_within_float32_rounding(
                f"{label}[{key}]", candidate[key], plain[key], exact[key], factor=factor
            )
            for key in candidate
        }
    return {label: check_within_float32_rounding(label, candidate, plain, exact, factor=factor)}
