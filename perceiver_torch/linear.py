"""``nn.Linear`` with a faster CPU kernel for inference.

PyTorch's CPU ``F.linear`` goes to MKL's sgemm; on the AMD EPYC machines this project
is measured on, oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, which
torch.compile uses for the same layers) is 15-20% faster for every shape of these
models, and linear layers are most of their time. :class:`Linear` uses it when no
gradient is being recorded (``torch.no_grad`` / ``torch.inference_mode``) on float32
CPU tensors, and ``F.linear`` otherwise: training; bfloat16/float16 (``F.linear``
already runs oneDNN's reduced-precision matmul on CPU, with float32 accumulation);
CUDA or any other device (the kernel is CPU-only); inside ``torch.compile`` (whose
inductor backend cannot lower this op, and picks its own linear kernels); a torch build
without oneDNN. Both compute the same products in float32; only the order of the
additions differs (relative differences around 1e-7).

This is the ``FastPath.ONEDNN_LINEAR`` fast path (:mod:`perceiver_torch.fast_paths`):
``fast_paths.plain()`` or ``PERCEIVER_TORCH_ONEDNN=0`` always use ``F.linear``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast_paths import FastPath, enabled

_available: Optional[bool] = None  # None: not probed yet


def _onednn_kernel_available() -> bool:
    """Whether this torch has a working oneDNN linear kernel (probed once)."""
    global _available
    if _available is None:
        try:
            kernel = torch.ops.mkldnn._linear_pointwise
            probe = kernel(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4), "none", [], "")
            _available = bool(torch.equal(probe, torch.full((2, 4), 3.0)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _available = False
    return _available


def _onednn_kernel(*args):
    """oneDNN's linear (x, weight, bias, "none", [], ""): one name tests can watch."""
    return torch.ops.mkldnn._linear_pointwise(*args)


def _onednn_linear_enabled() -> bool:
    """Whether the oneDNN path is switched on here and its kernel exists."""
    return enabled(FastPath.ONEDNN_LINEAR) and _onednn_kernel_available()


def _compiling() -> bool:
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
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not _compiling()
        and _onednn_linear_enabled()
    )


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with the fast inference path."""

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if uses_onednn(x, self.weight):
            return _onednn_kernel(x.contiguous(), self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
