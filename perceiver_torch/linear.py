"""``nn.Linear`` with a faster CPU kernel for inference.

PyTorch's CPU ``F.linear`` goes to MKL's sgemm in float32; on the AMD EPYC machines
with AVX-512 this project is measured on, oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, which torch.compile uses for the same layers)
is faster for every shape of these models (15-20% on the machine first measured;
about twice on the 2026-12 one, where MKL ran at 160-190 GFLOP/s and oneDNN at
360-420), and linear layers are most of their time. MKL uses AVX-512 only on Intel
CPUs; where both libraries run the same vectors oneDNN does not pay (on an AMD EPYC
with AVX2 only, the models ran 8-15% faster on MKL: :func:`cpu_prefers_onednn_float32`
says where float32 takes oneDNN). In bfloat16 PyTorch's ``F.linear`` already uses
oneDNN. :class:`Linear` uses it when no gradient is being recorded (``torch.no_grad``
/ ``torch.inference_mode``) on bfloat16 CPU tensors, and float32 ones where this CPU
prefers it, and ``F.linear`` otherwise: training; float16 (CPUs without
native float16 matmuls); CUDA or any other device (the kernel is CPU-only); inside
``torch.compile`` (whose inductor backend cannot lower this op, and picks its own
linear kernels); a torch build without oneDNN (probed once per dtype). Both compute
the same products with float32 accumulation; only the order of the additions differs
(relative differences around 1e-7 in float32; in bfloat16 both round the result to
bfloat16). In bfloat16 the kernel adds the bias in the same pass, where ``F.linear``
first copies the broadcast bias into the output.

On that path the MLP's GELU and residual additions are fused into the same pass, and
``pack_weights(model)`` keeps the weights in oneDNN's blocked layout (``Linear`` says
what that costs).

This is the ``FastPath.ONEDNN_LINEAR`` fast path (:mod:`perceiver_torch.fast_paths`):
``fast_paths.plain()`` or ``PERCEIVER_TORCH_ONEDNN=0`` always use ``F.linear``;
``PERCEIVER_TORCH_ONEDNN=1`` takes oneDNN for float32 on every CPU.
"""

from __future__ import annotations

import functools
import platform
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast_paths import FastPath, enabled, onednn_forced

# The dtypes the oneDNN path takes, and which of them this torch's kernel serves
# (probed at first use, once per dtype).
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_available: Dict[torch.dtype, bool] = {}


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
    """Whether this torch has a working oneDNN linear kernel for ``dtype``."""
    if dtype not in _available:
        _available[dtype] = dtype in ONEDNN_DTYPES and _probe(dtype)
    return _available[dtype]


def _cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; "" if unknown)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()  # e.g. "Intel64 Family 6 ..., GenuineIntel" on Windows


@functools.lru_cache(maxsize=None)
def cpu_prefers_onednn_float32() -> bool:
    """Whether oneDNN's float32 matmul is the faster CPU kernel here: on CPUs with
    AVX-512 that are not Intel's.

    MKL (``F.linear``, ``bmm``, the fused attention kernel in float32) runs its AVX-512
    code on Intel CPUs only; oneDNN uses AVX-512 on every CPU that has it. On AMD EPYC
    with AVX-512 oneDNN ran these models' products at 1.2-2x MKL's rate. Where both
    run the same vectors it does not pay: on an AMD EPYC with AVX2 only (2026-12-02,
    interleaved calls) the models took 8-15% less time on MKL (language 1.00 against
    1.14 s, imagenet_learned 3.32 against 3.84 s, imagenet_fourier 3.12 against
    3.56 s). Intel CPUs with AVX-512 were not measured: they keep PyTorch's own
    kernels. ``PERCEIVER_TORCH_ONEDNN=1`` overrides this answer."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and (
        "intel" not in _cpu_vendor().lower()
    )


def onednn_preferred(dtype: torch.dtype) -> bool:
    """Whether the oneDNN fast paths take ``dtype`` CPU tensors here: where this
    torch's kernel serves the dtype, bfloat16 always (PyTorch's own bfloat16
    ``F.linear`` runs oneDNN), float32 where :func:`cpu_prefers_onednn_float32` or
    ``PERCEIVER_TORCH_ONEDNN=1`` says so."""
    if not onednn_kernel_available(dtype):
        return False
    return dtype != torch.float32 or onednn_forced() or cpu_prefers_onednn_float32()


def _onednn_kernel(*args):
    """oneDNN's linear (x, weight, bias, "none", [], ""): one name tests can watch."""
    return torch.ops.mkldnn._linear_pointwise(*args)


def _onednn_linear_enabled(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the oneDNN path is switched on here and takes ``dtype`` on this CPU."""
    return enabled(FastPath.ONEDNN_LINEAR) and onednn_preferred(dtype)


def compiling() -> bool:
    """Whether torch.compile is tracing this code (False on torch builds without it)."""
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def onednn_eligible(*tensors: Tensor) -> bool:
    """Whether oneDNN's kernels could compute on ``tensors``: no autograd, CPU tensors
    of one dtype the kernels take, not under torch.compile (the oneDNN fast paths add
    whether they are switched on and the kernel exists)."""
    dtype = tensors[0].dtype
    return (
        not torch.is_grad_enabled()
        and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and dtype in ONEDNN_DTYPES
        and not compiling()
    )


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :class:`Linear` takes the oneDNN path for input ``x`` and ``weight``."""
    return onednn_eligible(x, weight) and _onednn_linear_enabled(x.dtype)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation: ``jax.nn.gelu``'s default (erf differs by 5e-4)."""
    return F.gelu(x, approximate="tanh")


def _onednn_add_kernel(x: Tensor, residual: Tensor, weight: Tensor, bias) -> Tensor:
    """oneDNN's linear with the residual added in the same pass: x @ w.T + b + r."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


# Rows the packed layout is chosen for: oneDNN picks the blocking of a packed weight
# for a number of input rows; 256 (the latent count of the language model, the
# smallest of these models' row counts that matters) served every row count from 256
# to 50,176 as well as or better than the unpacked weight when measured.
_PACKING_ROWS = 256


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with the fast inference path.

    After :func:`pack_weights` (opt-in: it doubles the weights' memory), the oneDNN
    path reorders the weight once into oneDNN's blocked layout
    (``_reorder_linear_weight``) and keeps the copy, instead of oneDNN reordering it
    in every call: 3-8% of these models' float32 time on AMD EPYC. The copy is made
    again when the weight changes (in-place updates, ``.to()``, a new tensor), is not
    part of the state dict or of copies and pickles of the module, and
    :func:`release_packed_weights` drops the copies and the opt-in.
    :meth:`forward_gelu` and :meth:`forward_add` fuse the MLP's tanh GELU and a
    residual addition into the same oneDNN pass (elsewhere they run after ``F.linear``).
    """

    packing = False  # set by pack_weights(): keep a packed copy of the weight
    # (the weight's tensor when packed, its version then, the packed copy); holding
    # that tensor keeps its memory from being reused by a later weight at the same
    # address, so equal addresses mean the same storage.
    _packed: Optional[Tuple[Tensor, int, Tensor]] = None

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("_packed") is not None:  # a oneDNN tensor: not copyable
            state = dict(state, _packed=None)
        return state

    def _apply(self, fn, recurse=True):
        self._packed = None  # .to(), .float(), .cuda(), ...: the weight is replaced
        return super()._apply(fn, recurse)

    def packed_weight(self) -> Tensor:
        """The weight for the oneDNN kernel: itself, or after :func:`pack_weights` its
        copy in oneDNN's layout (made at the first call, kept while the weight's
        storage, dtype, shape and version stay the same)."""
        weight = self.weight
        if not self.packing:
            return weight
        packed = self._packed
        if (
            packed is None
            or packed[0].data_ptr() != weight.data_ptr()
            or packed[0].dtype != weight.dtype
            or packed[0].shape != weight.shape
            or packed[1] != weight._version
        ):
            alias = weight.detach()
            packed = (
                alias,
                weight._version,
                torch.ops.mkldnn._reorder_linear_weight(alias, _PACKING_ROWS),
            )
            self._packed = packed
        return packed[2]

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if uses_onednn(x, self.weight):
            return _onednn_kernel(x.contiguous(), self.packed_weight(), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def forward_gelu(self, x: Tensor) -> Tensor:
        """``gelu_tanh(self(x))``; on the oneDNN path the GELU is applied to the
        float32 results before they are stored (the same formula; in bfloat16 the
        result is rounded once instead of twice)."""
        if uses_onednn(x, self.weight):
            return _onednn_kernel(x.contiguous(), self.packed_weight(), self.bias, "gelu", [], "tanh")
        return gelu_tanh(F.linear(x, self.weight, self.bias))

    def forward_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + self(x)``; on the oneDNN path in the same pass (float32 sums
        in the same order; in bfloat16 rounded once instead of twice)."""
        if (
            uses_onednn(x, self.weight)
            and residual.dtype == x.dtype
            and residual.shape == x.shape[:-1] + (self.out_features,)
        ):
            return _onednn_add_kernel(
                x.contiguous(), residual.contiguous(), self.packed_weight(), self.bias
            )
        return residual + F.linear(x, self.weight, self.bias)


def pack_weights(module: nn.Module) -> nn.Module:
    """Lets every :class:`Linear` in ``module`` keep its weight packed in oneDNN's
    layout for CPU inference (made at each layer's first oneDNN call): faster by a
    few percent, for as much memory again as the weights. Returns ``module``."""
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.packing = True
    return module


def release_packed_weights(module: nn.Module) -> nn.Module:
    """Undoes :func:`pack_weights`: drops every packed copy in ``module``."""
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.packing = False
            sub._packed = None
    return module
