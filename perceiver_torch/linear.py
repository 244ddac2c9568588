"""``nn.Linear`` with a faster CPU kernel for inference.

PyTorch's CPU ``F.linear`` goes to MKL's sgemm; on the AMD EPYC machines this project
is measured on, oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, which
torch.compile uses for the same layers) is 15-20% faster for every shape of these
models, and linear layers are most of their time. :class:`Linear` uses it when no
gradient is being recorded (``torch.no_grad`` / ``torch.inference_mode``) on float32
or bfloat16 CPU tensors, and ``F.linear`` otherwise: training; float16 (CPUs without
native float16 matmuls); CUDA or any other device (the kernel is CPU-only); inside
``torch.compile`` (whose inductor backend cannot lower this op, and picks its own
linear kernels); a torch build without oneDNN (probed once per dtype). Both compute
the same products with float32 accumulation; only the order of the additions differs
(relative differences around 1e-7 in float32; in bfloat16 both round the result to
bfloat16). In bfloat16 the kernel adds the bias in the same pass, where ``F.linear``
first copies the broadcast bias into the output.

This is the ``FastPath.ONEDNN_LINEAR`` fast path (:mod:`perceiver_torch.fast_paths`):
``fast_paths.plain()`` or ``PERCEIVER_TORCH_ONEDNN=0`` always use ``F.linear``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast_paths import FastPath, enabled

_available: Optional[bool] = None  # None: not probed yet


# The dtypes the oneDNN path takes (float32 probed in _available, others here).
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_available_reduced: Dict[torch.dtype, bool] = {}


def _probe(dtype: torch.dtype) -> bool:
    try:
        kernel = torch.ops.mkldnn._linear_pointwise
        ones = dict(dtype=dtype)
        probe = kernel(
            torch.ones(2, 3, **ones), torch.ones(4, 3, **ones), torch.zeros(4, **ones),
            "none", [], "",
        )
        return bool(torch.equal(probe, torch.full((2, 4), 3.0, **ones)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def onednn_kernel_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch has a working oneDNN linear kernel for ``dtype`` (probed
    once per dtype)."""
    global _available
    if dtype != torch.float32:
        if dtype not in _available_reduced:
            _available_reduced[dtype] = dtype in ONEDNN_DTYPES and _probe(dtype)
        return _available_reduced[dtype]
    if _available is None:
        _available = _probe(torch.float32)
    return _available


def _onednn_kernel(*args):
    """oneDNN's linear (x, weight, bias, "none", [], ""): one name tests can watch."""
    return torch.ops.mkldnn._linear_pointwise(*args)


def _onednn_linear_enabled(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the oneDNN path is switched on here and its kernel exists for ``dtype``."""
    return enabled(FastPath.ONEDNN_LINEAR) and onednn_kernel_available(dtype)


def compiling() -> bool:
    """Whether torch.compile is tracing this code (False on torch builds without it)."""
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :class:`Linear` takes the oneDNN path for input ``x`` and ``weight``."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in ONEDNN_DTYPES
        and not compiling()
        and _onednn_linear_enabled(x.dtype)
    )


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with the fast inference path."""

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if uses_onednn(x, self.weight):
            return _onednn_kernel(x.contiguous(), self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
