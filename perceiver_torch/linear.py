"""``nn.Linear`` with a faster CPU kernel for inference.

PyTorch's CPU ``F.linear`` goes to MKL's sgemm in float32; on the AMD EPYC machines
with AVX-512 this project is measured on, oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, which torch.compile uses for the same layers)
is faster for every shape of these models (15-20% on the machine first measured;
about twice on the 2026-12 one, where MKL ran at 160-190 GFLOP/s and oneDNN at
360-420), and linear layers are most of their time. MKL uses AVX-512 only on Intel
CPUs, and there oneDNN still gains up to 13% (an Intel Xeon with AMX); where both
libraries run AVX2 it does not pay (on an AMD EPYC with AVX2 only, the models ran
8-15% faster on MKL): :func:`cpu_prefers_onednn_float32` says where float32 takes
oneDNN, on CPUs with AVX-512. In bfloat16 PyTorch's ``F.linear`` already uses
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
bfloat16 weights are kept in oneDNN's blocked layout (``pack_weights(model)`` packs
float32 ones too: in MKL's layout on Intel CPUs with AVX-512, oneDNN's elsewhere;
``Linear`` says what that costs).

This is the ``FastPath.ONEDNN_LINEAR`` fast path (:mod:`perceiver_torch.fast_paths`):
``fast_paths.plain()`` or ``PERCEIVER_TORCH_ONEDNN=0`` always use ``F.linear``;
``PERCEIVER_TORCH_ONEDNN=1`` takes oneDNN for float32 on every CPU.
"""

from __future__ import annotations

import functools
import math
import platform
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.autograd import forward_ad as _forward_ad

from .fast_paths import FastPath, dynamo_tracing, enabled, onednn_forced

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


def _cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name`` line's value in /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


# The CPU's vendor once read. A plain global, not functools.lru_cache:
# torch.compile asks for it (attention's padding rule in bfloat16, through
# cpu_prefers_onednn_attention) and reads a global as a constant, where it traces
# through lru_cache wrappers and warns the user that it does. Read at import where
# /proc/cpuinfo names the vendor (its first lines), so that a compiled model never
# traces the file's read; None elsewhere until the first call asks platform (which
# may start a subprocess, not something to do at import).
_VENDOR: Optional[str] = _cpuinfo_field("vendor_id")


def _cpu_vendor() -> str:
    """The CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...; "" if unknown),
    read once."""
    global _VENDOR
    if _VENDOR is None:
        _VENDOR = platform.processor()  # e.g. "Intel64 Family 6 ..., GenuineIntel" on Windows
    return _VENDOR


@functools.lru_cache(maxsize=None)
def cpu_prefers_onednn_float32() -> bool:
    """Whether oneDNN's float32 matmul is the faster kernel for linear layers here: on
    CPUs with AVX-512.

    MKL (``F.linear``) runs its AVX-512 code on Intel CPUs only; oneDNN uses AVX-512 on
    every CPU that has it. On AMD EPYC with AVX-512 oneDNN ran these models' products
    at 1.2-2x MKL's rate; on an Intel Xeon with AVX-512 and AMX (2026-12-02,
    interleaved calls) the models took 0-13% less time with their linear layers on
    oneDNN (language 0.454 against 0.517 s, video chunk 0.874 against 0.875 s). Where
    both libraries run the same vectors it does not pay: on an AMD EPYC with AVX2 only
    the models took 8-15% less time on MKL (language 1.00 against 1.14 s,
    imagenet_learned 3.32 against 3.84 s). ``PERCEIVER_TORCH_ONEDNN=1`` overrides this
    answer."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def cpu_prefers_onednn_attention() -> bool:
    """Whether the attention products pay on oneDNN's matmul here (given that the
    dtype does, :func:`onednn_attention_preferred`): on CPUs that are not Intel's.

    On Intel CPUs PyTorch's own attention kernels (``bmm``, the fused
    ``scaled_dot_product_attention``) run MKL's AVX-512 and AMX code and beat oneDNN's
    matmul, which writes out one head's logits at a time: on a Xeon with AMX
    (2026-12-02, interleaved calls, linear layers on oneDNN either way) the video chunk
    took 0.874 s with PyTorch's kernels against 1.064 s on oneDNN in float32 and 0.325
    against 0.567 s in bfloat16, imagenet_fourier 0.401 against 0.446 s in bfloat16.
    On AMD EPYC with AVX-512 oneDNN's was twice as fast as MKL's."""
    return "intel" not in _cpu_vendor().lower()


def _mkl_probe() -> bool:
    try:
        weight = torch.ones(4, 3)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, 2)
        out = torch.ops.mkl._mkl_linear(torch.ones(2, 3), packed, weight, torch.zeros(4), 2)
        return bool(torch.equal(out, torch.full((2, 4), 3.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_prefers_mkl_packing() -> bool:
    """Whether packed float32 weights (:func:`pack_weights`) are kept in MKL's layout
    (``cblas_sgemm_pack``, computed by ``torch.ops.mkl._mkl_linear``) rather than
    oneDNN's: on Intel CPUs with AVX-512, where MKL runs its AVX-512 code, and where
    this torch has the kernel.

    There MKL's packed product is the fastest of the four kernels for these models'
    row counts: on an Intel Xeon with AMX (2026-12-06, chains of distinct weights,
    interleaved, medians) 256 x 1280 x 1280 products at 367 GFLOP/s against 343 for
    oneDNN's packed weight and 328 for its plain one (the 2048^3 peak 382); 512 x 1024
    x 1024 at 373 against 353 and 343; level at 2,048 rows. The language model in
    float32 took 0.372 s against 0.404 unpacked and 0.397 with oneDNN's packed weights.
    MKL's copy serves one row count (see ``Linear``). On AMD CPUs MKL runs AVX2 code at
    half of oneDNN's rate: there the copies stay oneDNN's."""
    return (
        "intel" in _cpu_vendor().lower()
        and cpu_prefers_onednn_float32()
        and _mkl_probe()
    )


def _cpu_feature(name: str) -> Optional[bool]:
    """torch.cpu's probe ``name`` (``_is_avx512_bf16_supported``, ...), None where this
    torch has none."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else None
    except RuntimeError:
        return None


def cpu_has_matmul_instructions(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in hardware: float32 everywhere;
    bfloat16 with AVX512-BF16 or AMX; float16 with AMX-FP16 or AVX512-FP16 (the flag
    is read from /proc/cpuinfo: torch has no probe for it). Elsewhere PyTorch converts
    every product to float32 and back: on an AMD EPYC with AVX2 only the language model
    took 12.8 s in bfloat16 against 1.0 s in float32 (HF's the same: 13.8 s); on an
    Intel Xeon with AVX-512 but neither (Ice Lake, 2026-12-07) 2.0 against 0.75 s (a
    2048^3 product: 54-65 GFLOP/s against 254-311). On an Intel Xeon with AMX and
    AVX512-FP16 (no AMX-FP16) a 2048^3 product ran at 2079 GFLOP/s in bfloat16, 326 in
    float16 and 319 in float32. True where this torch cannot tell."""
    if dtype == torch.bfloat16:
        found = [_cpu_feature("_is_avx512_bf16_supported"), _cpu_feature("_is_amx_tile_supported")]
    elif dtype == torch.float16:
        flags = _cpuinfo_field("flags")
        found = [
            _cpu_feature("_is_amx_fp16_supported"),
            None if flags is None else "avx512_fp16" in flags.split(),
        ]
    else:
        return True
    return any(found) or all(f is None for f in found)


def onednn_linear_preferred(dtype: torch.dtype) -> bool:
    """Whether the ``ONEDNN_LINEAR`` fast path takes ``dtype`` CPU tensors here: where
    this torch's kernel serves the dtype, bfloat16 always (PyTorch's own bfloat16
    ``F.linear`` runs oneDNN), float32 where :func:`cpu_prefers_onednn_float32` or
    ``PERCEIVER_TORCH_ONEDNN=1`` says so."""
    if not onednn_kernel_available(dtype):
        return False
    return dtype != torch.float32 or onednn_forced() or cpu_prefers_onednn_float32()


def onednn_attention_preferred(dtype: torch.dtype) -> bool:
    """Whether the ``ONEDNN_ATTENTION`` fast path takes ``dtype`` CPU tensors here:
    where the linear layers take the dtype and :func:`cpu_prefers_onednn_attention`
    (not on Intel CPUs), or wherever the kernel exists with ``PERCEIVER_TORCH_ONEDNN=1``."""
    if not onednn_linear_preferred(dtype):
        return False
    return onednn_forced() or cpu_prefers_onednn_attention()


def _onednn_kernel(*args):
    """oneDNN's linear (x, weight, bias, "none", [], ""): one name tests can watch."""
    return torch.ops.mkldnn._linear_pointwise(*args)


def _onednn_linear_enabled(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the oneDNN path is switched on here and takes ``dtype`` on this CPU."""
    return enabled(FastPath.ONEDNN_LINEAR) and onednn_linear_preferred(dtype)


def recording_graph() -> bool:
    """Whether ``torch.jit.trace`` or ``torch.export`` is recording this code into a
    graph that will run on other inputs: there Python branches on tensor values (the
    language model's padding, the folded decoder's factorisation) would be frozen at
    the example's values, or fail (export), and the eager fast paths that decide
    from values step aside."""
    if torch.jit.is_tracing():
        return True
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(is_exporting()) if is_exporting is not None else False


def func_transforming() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...) runs this
    code. Its tensors are wrappers: a vmapped model's weights are batched, one per
    stacked model (``torch.func.stack_module_state``), and so are vmapped inputs.
    oneDNN's kernels have no batching rules (packing a batched weight failed with
    "'memory_format' argument is incompatible with mkldnn tensor", so a bfloat16
    model could not be vmapped on a CPU that packs bfloat16 weights by default; the
    other kernels ran once per batched item, with a warning), and ``vmap`` refuses
    to read a batched tensor's values (``.item()``), which the padding skip, the
    folded decoder and the id and index checks read. False while torch.compile
    traces (:func:`compiling` says so; its graphs hold functorch's own machinery).

    True as well within a ``torch.autograd.forward_ad.dual_level`` (forward-mode
    derivatives with dual tensors, outside torch.func): the fused CPU attention has
    no forward-mode formula, and oneDNN's kernels (packed weights), which run under
    ``torch.no_grad``, dropped the tangents."""
    if dynamo_tracing():
        return False
    if getattr(_forward_ad, "_current_level", -1) >= 0:
        return True
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def compiling() -> bool:
    """Whether torch.compile (or torch.export) is tracing this code, or
    ``torch.jit.trace`` (:func:`recording_graph`) is, or a ``torch.func`` transform
    (:func:`func_transforming`) runs it: the oneDNN kernels, the batch slicing and
    the shortcuts that read tensor values step aside there (False on torch builds
    without them)."""
    return dynamo_tracing() or recording_graph() or func_transforming()


# The torch.nn classes the models are built from (or that compute what the models'
# Linear layers compute), whose work a shortcut may do without calling them.
_TORCH_FORWARDS = frozenset(
    cls.forward
    for cls in (
        nn.Module,  # containers: ModuleList, ModuleDict, ParameterDict
        nn.Linear,
        nn.LayerNorm,
        nn.Dropout,
        nn.Embedding,
        nn.Conv2d,
        nn.BatchNorm2d,
    )
)

# Hooks registered for every module (torch.nn.modules.module.register_module_forward_hook
# and the like).
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def global_hooks() -> bool:
    """Whether hooks registered for every module exist."""
    return any(getattr(nn.modules.module, name, None) for name in _GLOBAL_HOOKS)


def _hooked_or_replaced(module: nn.Module) -> bool:
    """:func:`intercepted` but for the global hooks."""
    if (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    ):
        return True
    forward = type(module).forward
    return forward not in _TORCH_FORWARDS and not getattr(
        forward, "__module__", ""
    ).startswith("perceiver_torch.")


def intercepted(module: nn.Module) -> bool:
    """Whether ``module`` must be called as a module rather than computed around:
    calling it would run hooks (its own forward or backward hooks, or global ones:
    feature extraction, ``torch.nn.utils.prune``), or its ``forward`` is not the one
    it was built with (the module replaced, by a LoRA adapter or another class, or
    its forward overridden or, as accelerate's offloading hooks do, replaced on the
    instance). The shortcuts that read a module's weights instead of calling it
    (fused GELU or residual, fused projections, folded attentions and decoders, a
    padded LayerNorm), or that change what its hooks would see (skipped padding,
    batch slices), step aside for such modules, so that the hooks run on the plain
    path's tensors and a replacement is what computes."""
    return _hooked_or_replaced(module) or global_hooks()


def _any_hooked_or_replaced(roots: Sequence[nn.Module], below_only: bool) -> bool:
    """Whether a module of ``roots``' subtrees (not the roots themselves where
    ``below_only``) is hooked or replaced, leaving out parametrizations
    (``torch.nn.utils.parametrize``: weight_norm, spectral_norm, orthogonal): they
    compute a weight, which the shortcuts read through the parametrized attribute, and
    see the same weight whatever the shortcut (their classes are no replaced layer)."""
    for root in roots:
        parametrizations = set()
        for module in root.modules():  # parents before their children
            if id(module) in parametrizations:
                continue
            # (_modules first: a missing attribute costs nn.Module.__getattr__ a raise)
            if "parametrizations" in module._modules and parametrize.is_parametrized(module):
                parametrizations.update(id(p) for p in module.parametrizations.modules())
            if (module is not root or not below_only) and _hooked_or_replaced(module):
                return True
    return False


def intercepted_below(model: nn.Module) -> bool:
    """Whether any module inside ``model`` (not ``model`` itself, whose hooks see its
    whole call either way) is :func:`intercepted` (parametrizations aside: see
    :func:`_any_hooked_or_replaced`)."""
    return global_hooks() or _any_hooked_or_replaced((model,), below_only=True)


def intercepted_within(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` or a module inside them is :func:`intercepted`
    (parametrizations aside), for a shortcut that computes those modules' work without
    calling them (the folded video decoder: the decoder, queries and postprocessors)."""
    return global_hooks() or _any_hooked_or_replaced(modules, below_only=False)


def linear_as_built(layer: nn.Module) -> bool:
    """Whether ``layer`` is a :class:`Linear` a shortcut may compute without calling
    it (not :func:`intercepted`)."""
    return isinstance(layer, Linear) and not intercepted(layer)


def autocasting(device_type: str = "cpu") -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` here. Autocast does not
    see the oneDNN kernels (``torch.ops.mkldnn``), the in-place products or the
    folded video decoder's own casts: under it those fast paths step aside, so that
    every layer computes in autocast's dtype as on the plain path (the folded decoder
    failed there: a bfloat16 ``addmm_`` into a float32 product). False for device
    types autocast has no mode for (the meta device)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())
    except RuntimeError:  # "unknown device type for autocast" (meta)
        return False


def onednn_eligible(*tensors: Tensor) -> bool:
    """Whether oneDNN's kernels could compute on ``tensors``: no autograd, CPU tensors
    of one dtype the kernels take, not under torch.compile nor CPU autocast
    (:func:`autocasting`; the oneDNN fast paths add whether they are switched on and
    the kernel exists)."""
    dtype = tensors[0].dtype
    return (
        not torch.is_grad_enabled()
        and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and dtype in ONEDNN_DTYPES
        and not compiling()
        and not autocasting("cpu")
    )


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :class:`Linear` takes the oneDNN path for input ``x`` and ``weight``."""
    return onednn_eligible(x, weight) and _onednn_linear_enabled(x.dtype)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation: ``jax.nn.gelu``'s default (erf differs by 5e-4)."""
    return F.gelu(x, approximate="tanh")


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    onednn_weight: Optional[Callable[[], Tensor]] = None,
) -> Tensor:
    """``F.linear(x, weight, bias)`` (weight: (out, in)) through oneDNN where
    :class:`Linear` would take it (``Linear.forward``, and products outside a
    ``Linear`` module: the folded video decoder's). In bfloat16 the bias is added in
    the same pass. ``onednn_weight()`` gives the weight the kernel reads (a packed
    copy, :func:`pack_weights`); called only on the oneDNN path."""
    if uses_onednn(x, weight):
        kernel_weight = weight if onednn_weight is None else onednn_weight()
        return _onednn_kernel(x.contiguous(), kernel_weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_gelu(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    onednn_weight: Optional[Callable[[], Tensor]] = None,
) -> Tensor:
    """``gelu_tanh(F.linear(x, weight, bias))``; through oneDNN where :class:`Linear`
    would take it, with the GELU applied to the float32 results before they are
    stored (one pass instead of two, the same formula; in bfloat16 the result is
    rounded once instead of twice; PyTorch's own tanh-GELU kernel is also 3-5x
    slower than its erf one on the CPUs measured here). ``onednn_weight``: as in
    :func:`linear`."""
    if uses_onednn(x, weight):
        kernel_weight = weight if onednn_weight is None else onednn_weight()
        return _onednn_kernel(x.contiguous(), kernel_weight, bias, "gelu", [], "tanh")
    return gelu_tanh(F.linear(x, weight, bias))


def _onednn_add_kernel(x: Tensor, residual: Tensor, weight: Tensor, bias) -> Tensor:
    """oneDNN's linear with the residual added in the same pass: x @ w.T + b + r."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


def _mkl_kernel(x: Tensor, packed: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """MKL's product against its packed copy of ``weight`` (made for x's row count):
    x @ weight.T + bias, the bias as the sums' starting value."""
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.numel() // x.shape[-1])


# Elements of a tensor other than a matrix or a vector that a packed copy's stamp
# samples (see _sampled_views).
_STAMP_SAMPLES = 64

# (version, views of the sampled elements, their values then)
Stamp = Tuple[int, Tuple[Tensor, ...], Tuple[Tensor, ...]]


def _sampled_views(t: Tensor) -> Tuple[Tensor, ...]:
    """Views of the elements of ``t`` a stamp samples. For a matrix (R, C), of any
    strides, an element of every row and of every column: where R >= C the diagonal
    of each block of C rows and of the last C rows (likewise by columns where R < C),
    R + C elements at most, as two strided views. A vector (a bias, at
    most a few thousand elements) whole. Elsewhere up to ``_STAMP_SAMPLES`` elements
    spread over the tensor."""
    if t.dim() == 1:
        return (t,)
    if t.dim() == 2 and t.numel() > 0:
        rows, cols = t.shape
        row_step, col_step = t.stride()
        start, diagonal = t.storage_offset(), row_step + col_step
        if rows >= cols:  # blocks of cols rows, then the last cols rows
            return (
                t.as_strided((rows // cols, cols), (cols * row_step, diagonal), start),
                t.as_strided((cols,), (diagonal,), start + (rows - cols) * row_step),
            )
        return (  # blocks of rows columns, then the last rows columns
            t.as_strided((cols // rows, rows), (rows * col_step, diagonal), start),
            t.as_strided((rows,), (diagonal,), start + (cols - rows) * col_step),
        )
    if t.is_contiguous():
        flat = t.view(-1)
        return (flat[:: max(1, flat.numel() // _STAMP_SAMPLES)],)
    # Slicing every dimension with a step stays a view (reshape would copy, and a copy
    # does not see later writes).
    per_dim = max(1, math.ceil(_STAMP_SAMPLES ** (1 / t.dim())))
    return (t[tuple(slice(None, None, max(1, n // per_dim)) for n in t.shape)],)


def _stamp(t: Tensor) -> Stamp:
    """What :func:`_same_tensors` checks a kept copy of ``t`` against besides its
    storage, strides, dtype and shape: its version counter, and the values of sampled
    elements (:func:`_sampled_views`: views that follow the storage, and copies).
    Writes through ``p.data`` (``p.data.copy_(...)``, ``p.data.mul_(...)``,
    ``p.data[:, j] = 0``, the usual EMA, re-initialisation and ablation idioms) and
    through numpy do not bump ``p``'s version counter: ``.data`` is a tensor of its
    own for autograd. The samples catch those that change a whole row or column of a
    matrix, or most of any tensor (a few microseconds a check); narrower ones (single
    elements) need ``pack_weights`` again, which remakes every copy."""
    t = t.detach()
    views = _sampled_views(t)
    return t._version, views, tuple(view.clone() for view in views)


def _same_tensors(kept: Sequence[Tuple[Tensor, Stamp]], tensors: Sequence[Tensor]) -> bool:
    """Whether ``tensors`` are still the (alias, stamp) pairs ``kept``: same storage,
    strides, dtype, shape, version and sampled values (a kept alias holds its storage,
    so an equal address cannot be a later tensor's; see ``Linear._packed``; equal
    strides, because ``p.data = p.data.t()`` keeps the address, shape and version of
    a square weight)."""
    return len(kept) == len(tensors) and all(
        alias.data_ptr() == t.data_ptr()
        and alias.dtype == t.dtype
        and alias.shape == t.shape
        and alias.stride() == t.stride()
        and stamp[0] == t._version
        and all(_same_values(view, value) for view, value in zip(stamp[1], stamp[2]))
        for (alias, stamp), t in zip(kept, tensors)
    )


def _same_values(now: Tensor, then: Tensor) -> bool:
    """``torch.equal``, but a NaN equals a NaN: weights holding NaN (a diverged run,
    under inspection) would otherwise have their copy remade on every call."""
    return torch.equal(now, then) or bool(
        ((now == then) | (now.isnan() & then.isnan())).all()
    )


# Rows the packed layout is chosen for: oneDNN picks the blocking of a packed weight
# for a number of input rows; 256 (the latent count of the language model, the
# smallest of these models' row counts that matters) served every row count from 256
# to 50,176 as well as or better than the unpacked weight when measured.
_PACKING_ROWS = 256


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with the fast inference path.

    On the oneDNN path a bfloat16 weight is reordered once into oneDNN's blocked layout
    (``_reorder_linear_weight``) and the copy kept, instead of oneDNN reordering it in
    every call, on CPUs with bfloat16 matmul instructions (:func:`packs_by_default`):
    with AMX, the reorder of each weight in each call cost 4-12% of these models'
    bfloat16 time (2026-12-06, an Intel Xeon, interleaved calls: language model
    0.112 against 0.124 s, imagenet_fourier 0.352 against 0.386, imagenet_conv 0.294
    against 0.305). The copy takes as much memory again as the weight: a bfloat16
    model then holds as much as its float32 weights. :func:`pack_weights` keeps packed
    copies in float32 too (3-8% of the float32 time on AMD EPYC),
    :func:`release_packed_weights` keeps none (``load(..., pack_weights=False)``).
    The copy is made again when the weight changes (in-place updates; ``.to()``; a
    new tensor or view; writes through ``p.data`` or numpy, which bypass the version
    counter, where they change a whole row or column or most of the weight, which
    sampled elements catch: after narrower ones call :func:`pack_weights` again), and
    is not part of the state dict or of copies and pickles of the module.
    :meth:`forward_gelu` and :meth:`forward_add` fuse the MLP's tanh GELU and a
    residual addition into the same oneDNN pass (elsewhere they run after ``F.linear``).

    Packed float32 weights on Intel CPUs with AVX-512 (:func:`cpu_prefers_mkl_packing`)
    are MKL's for :meth:`forward` and :meth:`forward_add` (the residual then added
    after the product): MKL packs a weight for one number of input rows, so the copy
    is made by the first call, for its rows, and calls with other row counts take the
    unpacked oneDNN path rather than a second copy. :meth:`forward_gelu` keeps the
    GELU fused on oneDNN's packed copy (MKL's kernel has no GELU, and PyTorch's
    tanh-GELU pass costs more than MKL gains). Each layer of these models is called one
    way, so it holds one copy either way.
    """

    # Whether to keep a packed copy of the weight: None packs where
    # packs_by_default(dtype); pack_weights() sets True, release_packed_weights() False.
    packing: Optional[bool] = None
    # (the weight's tensor when packed, its stamp then (_stamp), the packed copy); holding
    # that tensor keeps its memory from being reused by a later weight at the same
    # address, so equal addresses mean the same storage.
    _packed: Optional[Tuple[Tensor, Stamp, Tensor]] = None
    # MKL's packed copy where cpu_prefers_mkl_packing(): (the weight's tensor, its
    # stamp then, the row count it is packed for, the copy).
    _mkl_packed: Optional[Tuple[Tensor, Stamp, int, Tensor]] = None

    def __getstate__(self):
        state = super().__getstate__()
        # oneDNN tensors (both copies): not copyable
        return dict(state, _packed=None, _mkl_packed=None)

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .cuda(), ...: the weight is replaced
        self._packed = self._mkl_packed = None
        return super()._apply(fn, recurse)

    def packs(self, dtype: torch.dtype) -> bool:
        """Whether this layer keeps a packed copy of a ``dtype`` weight."""
        return packs_by_default(dtype) if self.packing is None else self.packing

    def packed_weight(self) -> Tensor:
        """The weight for the oneDNN kernel: itself, or where :meth:`packs` its copy in
        oneDNN's layout (made at the first call or by :func:`prepack`, kept while the
        weight's storage, dtype, shape, version and sampled values stay the same)."""
        weight = self.weight
        if not self.packs(weight.dtype):
            return weight
        packed = self._packed
        if packed is None or not _same_tensors((packed[:2],), (weight,)):
            alias = weight.detach()
            packed = (
                alias,
                _stamp(weight),
                torch.ops.mkldnn._reorder_linear_weight(alias, _PACKING_ROWS),
            )
            self._packed = packed
        return packed[2]

    def mkl_weight(self, x: Tensor) -> Optional[Tensor]:
        """MKL's packed copy of the weight for input ``x`` where this layer keeps one
        (:meth:`packs` float32 and :func:`cpu_prefers_mkl_packing`): made for x's row
        count at the first call (and again when the weight changes); None for other
        row counts, and where the layer keeps no MKL copy."""
        weight = self.weight
        rows = x.numel() // max(1, x.shape[-1])
        if not (rows > 0 and self.packs(weight.dtype) and _packs_with_mkl(weight.dtype)):
            return None
        packed = self._mkl_packed
        if packed is None or not _same_tensors((packed[:2],), (weight,)):
            alias = weight.detach()
            copy = torch.ops.mkl._mkl_reorder_linear_weight(alias, rows)
            packed = self._mkl_packed = (alias, _stamp(weight), rows, copy)
        return packed[3] if packed[2] == rows else None

    def _unpacked_or_mkl(self, x: Tensor) -> Tuple[Optional[Tensor], Callable[[], Tensor]]:
        """(MKL's copy for ``x`` or None, the weight for the oneDNN kernel otherwise):
        where the layer keeps an MKL copy, other row counts read the plain weight."""
        mkl = self.mkl_weight(x) if uses_onednn(x, self.weight) else None
        if mkl is None and self._mkl_packed is not None:
            return None, lambda: self.weight
        return mkl, self.packed_weight

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        mkl, onednn_weight = self._unpacked_or_mkl(x)
        if mkl is not None:
            return _mkl_kernel(x, mkl, self.weight, self.bias)
        return linear(x, self.weight, self.bias, onednn_weight)

    def forward_gelu(self, x: Tensor) -> Tensor:
        """``gelu_tanh(self(x))``, the GELU fused on the oneDNN path (:func:`linear_gelu`)."""
        return linear_gelu(x, self.weight, self.bias, self.packed_weight)

    def forward_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """``residual + self(x)``; on the oneDNN path in the same pass (float32 sums
        in the same order; in bfloat16 rounded once instead of twice)."""
        if (
            uses_onednn(x, self.weight)
            and residual.dtype == x.dtype
            and residual.shape == x.shape[:-1] + (self.out_features,)
        ):
            mkl, onednn_weight = self._unpacked_or_mkl(x)
            if mkl is not None:
                return _mkl_kernel(x, mkl, self.weight, self.bias).add_(residual)
            return _onednn_add_kernel(
                x.contiguous(), residual.contiguous(), onednn_weight(), self.bias
            )
        return residual + F.linear(x, self.weight, self.bias)


class FusedWeights:
    """The packed concatenation of several :class:`Linear` layers' weights (and their
    biases), for :func:`linears_on_one_input`: made at the first call (or by
    :func:`prepack`) and remade when any weight or bias changes, by the rules of
    ``Linear``'s packed copy. Not copied: ``copy.deepcopy`` and pickles start empty;
    the owner clears it in ``_apply`` (``.to()`` and the like)."""

    def __init__(self) -> None:
        self._entry: Optional[Tuple[Tuple[Tuple[Tensor, Stamp], ...], Tensor, Tensor]] = None

    def get(self, layers: Sequence["Linear"]) -> Tuple[Tensor, Tensor]:
        """(packed weight (sum of outputs, inputs), bias) of ``layers``."""
        tensors = [t for layer in layers for t in (layer.weight, layer.bias)]
        entry = self._entry
        if entry is None or not _same_tensors(entry[0], tensors):
            weight = torch.cat([layer.weight.detach() for layer in layers])
            entry = (
                tuple((t.detach(), _stamp(t)) for t in tensors),
                torch.ops.mkldnn._reorder_linear_weight(weight, _PACKING_ROWS),
                torch.cat([layer.bias.detach() for layer in layers]),
            )
            self._entry = entry
        return entry[1], entry[2]

    @property
    def made(self) -> bool:
        """Whether the fused copy exists now."""
        return self._entry is not None

    def clear(self) -> None:
        self._entry = None

    def __deepcopy__(self, memo: dict) -> "FusedWeights":
        return FusedWeights()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entry = None


def _packs_with_mkl(dtype: torch.dtype) -> bool:
    """Whether packed ``dtype`` weights are MKL's here (float32 where
    :func:`cpu_prefers_mkl_packing`); their copies are made by the first call."""
    return dtype == torch.float32 and cpu_prefers_mkl_packing()


def fuses(layers: Sequence["Linear"], dtype: torch.dtype) -> bool:
    """Whether :func:`linears_on_one_input` would compute ``layers`` on ``dtype``
    inputs as one product: all CPU layers with biases, of one input width and the
    input's dtype, all keeping oneDNN packed weights (:meth:`Linear.packs`, and not
    MKL's: then the fused packed copy takes the place of theirs, and costs no memory
    more)."""
    first = layers[0].weight
    return not _packs_with_mkl(dtype) and all(
        layer.bias is not None
        and layer.weight.dtype == dtype
        and layer.weight.device == first.device
        and layer.in_features == layers[0].in_features
        and layer.packs(dtype)
        for layer in layers
    )


def linears_on_one_input(
    layers: Sequence["Linear"], x: Tensor, fused: FusedWeights
) -> Tuple[Tensor, ...]:
    """``tuple(layer(x) for layer in layers)``; on the oneDNN path, where the layers
    keep packed weights (:func:`fuses`), as one product against their concatenated
    weights (``fused``), split into views. One product of the summed width keeps the
    matrix units busier than several narrow ones: the language model's q, k and v
    (1,280 -> 256, 256 and 1,280 channels on 256 latents) took 0.54 against 0.78 ms
    in bfloat16 (2026-12-06, an Intel Xeon with AMX, medians of 41 interleaved calls;
    float32 with packed weights 4.11 against 4.20 ms). Each output column is the same
    dot product either way (float32 sums; the kernel may order them differently).
    Layers that are :func:`intercepted` (hooked or replaced) are called one by one."""
    if not all(linear_as_built(layer) for layer in layers):
        return tuple(layer(x) for layer in layers)
    if uses_onednn(x, layers[0].weight) and fuses(layers, x.dtype):
        weight, bias = fused.get(layers)
        out = _onednn_kernel(x.contiguous(), weight, bias, "none", [], "")
        return out.split([layer.out_features for layer in layers], dim=-1)
    return tuple(layer(x) for layer in layers)


@functools.lru_cache(maxsize=None)
def packs_by_default(dtype: torch.dtype) -> bool:
    """Whether :class:`Linear` keeps ``dtype`` weights packed without being asked:
    bfloat16 on CPUs that multiply it in hardware (:func:`cpu_has_matmul_instructions`;
    elsewhere every bfloat16 product is converted to float32 and the reorder is not
    what costs)."""
    return dtype == torch.bfloat16 and cpu_has_matmul_instructions(dtype)


def _fused_groups(module: nn.Module) -> List[Tuple[Sequence["Linear"], FusedWeights]]:
    """``module.fused_linear_groups()`` where it has one (``attention.Attention``)."""
    groups = getattr(module, "fused_linear_groups", None)
    return groups() if groups is not None else []


def packing_takes_effect(dtype: torch.dtype) -> bool:
    """Whether packed ``dtype`` weights change anything for CPU inference here: where
    the linear layers take the oneDNN path (the ``ONEDNN_LINEAR`` fast path switched on,
    and float32 on CPUs with AVX-512, :func:`onednn_linear_preferred`). Elsewhere
    :func:`pack_weights` keeps no copy and the weights stay as they are."""
    return _onednn_linear_enabled(dtype)


def _prepackable(layer: "Linear") -> bool:
    dtype = layer.weight.dtype
    return (
        layer.weight.device.type == "cpu"
        and layer.packs(dtype)
        and not _packs_with_mkl(dtype)
        and packing_takes_effect(dtype)
    )


def prepack(module: nn.Module) -> nn.Module:
    """Makes now the packed copy of every CPU :class:`Linear` in ``module`` that keeps
    one (:meth:`Linear.packs`), so the memory is taken here rather than in the first
    forward pass (``load`` calls it). Layers that a module computes as one product
    (its ``fused_linear_groups()``: ``[(layers, FusedWeights)]``, as
    ``attention.Attention``'s q, k and v) get their fused copy instead of their own.
    Float32 copies that are MKL's (:func:`cpu_prefers_mkl_packing`) are left to the
    first call, which gives the row count MKL packs them for. Returns ``module``."""
    fused_layers = set()
    for sub in module.modules():
        for layers, fused in _fused_groups(sub):
            if all(
                isinstance(layer, Linear) and _prepackable(layer) for layer in layers
            ) and fuses(
                layers, layers[0].weight.dtype
            ):
                fused.get(layers)
                fused_layers.update(id(layer) for layer in layers)
    for sub in module.modules():
        if isinstance(sub, Linear) and id(sub) not in fused_layers and _prepackable(sub):
            sub.packed_weight()
    return module


def pack_weights(module: nn.Module) -> nn.Module:
    """Lets every :class:`Linear` in ``module`` keep its weight packed for CPU
    inference, in float32 too (bfloat16 weights are packed by default where the CPU
    has bfloat16 instructions): faster, for as much memory again as the weights. The
    copies are oneDNN's, made now (:func:`prepack`), except float32 ones on Intel CPUs
    with AVX-512, which are MKL's, made by the first call (:func:`cpu_prefers_mkl_packing`;
    the language model in float32 8% faster there, against 2% with oneDNN's). They
    follow the weights' later changes (``Linear`` says which writes it sees); copies
    that exist already are made again, so that a call after writes it cannot see
    (single elements through ``p.data``) brings them up to date. Returns ``module``."""
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.packing = True
            sub._packed = sub._mkl_packed = None
        for _, fused in _fused_groups(sub):
            fused.clear()
    return prepack(module)


def choose_packing(module: nn.Module, pack: Optional[bool]) -> nn.Module:
    """``pack_weights`` (True), :func:`release_packed_weights` (False) or nothing
    (None, the default: bfloat16 packed where the CPU has its instructions), as
    ``perceiver_torch.load(pack_weights=)`` and ``run --pack-weights`` choose.
    Returns ``module``."""
    if pack is None:
        return module
    return pack_weights(module) if pack else release_packed_weights(module)


def release_packed_weights(module: nn.Module) -> nn.Module:
    """Drops every packed copy in ``module`` (fused ones too) and keeps none from now
    on, in any dtype (the weights' memory, at the cost of oneDNN reordering them in
    every call)."""
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.packing = False
            sub._packed = sub._mkl_packed = None
        for _, fused in _fused_groups(sub):
            fused.clear()
    return module
