"""``nn.Linear`` with a faster CPU kernel for inference.

PyTorch's CPU ``F.linear`` goes to MKL's sgemm; on the AMD EPYC machines this project
is measured on, oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, which
torch.compile uses for the same layers) is 15-20% faster for every shape of these
models, and linear layers are most of their time. :class:`Linear` uses it when no
gradient is being recorded (``torch.no_grad`` / ``torch.inference_mode``) on float32
CPU tensors, and ``F.linear`` otherwise (training, other dtypes or devices, a torch
build without oneDNN). Both compute the same products in float32; only the order of
the additions differs (relative differences around 1e-7).

Set ``PERCEIVER_TORCH_ONEDNN=0`` to always use ``F.linear`` (read once, at the first
call), or use :func:`plain_linear` for a block (e.g. while exporting a graph: the
oneDNN kernel is no ONNX operator).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_enabled: Optional[bool] = None  # None: not probed yet


def _onednn_linear_enabled() -> bool:
    """Whether the oneDNN linear kernel exists here (probed once, on a tiny input)."""
    global _enabled
    if _enabled is None:
        _enabled = False
        if os.environ.get("PERCEIVER_TORCH_ONEDNN", "1") != "0":
            try:
                kernel = torch.ops.mkldnn._linear_pointwise
                probe = kernel(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4), "none", [], "")
                _enabled = bool(torch.equal(probe, torch.full((2, 4), 3.0)))
            except (AttributeError, RuntimeError, NotImplementedError):
                _enabled = False
    return _enabled


@contextlib.contextmanager
def plain_linear() -> Iterator[None]:
    """Within the block :class:`Linear` always uses ``F.linear``."""
    global _enabled
    _onednn_linear_enabled()  # probe first, so that the restored value is the real one
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with the fast inference path."""

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and _onednn_linear_enabled()
        ):
            return torch.ops.mkldnn._linear_pointwise(
                x.contiguous(), self.weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)
