"""The fast paths of perceiver_torch, and the one switch that turns them off.

The models compute what the official Haiku code computes. At inference, six
mechanisms compute the *same function* in another order, for speed; each is exact in
real arithmetic and differs from the plain path only by float32 rounding (the tests
bound both against a float64 evaluation of the same model):

=========================  ============================================================
``ONEDNN_LINEAR``          ``Linear`` runs oneDNN's matmul instead of ``F.linear`` (MKL)
                           for bfloat16 CPU tensors without autograd, and float32
                           ones where the CPU prefers it (``linear.py``)
``ONEDNN_ATTENTION``       ``attend`` multiplies each head's queries, keys and
                           weights by oneDNN's matmul instead of ``bmm`` or the fused
                           attention kernel (MKL), on the same CPU tensors, for one
                           head or unequal qk and v widths, where the CPU
                           prefers it (``attention._attend_onednn``)
``ABSORBED_ATTENTION``     single-head attentions whose sides differ greatly in length
                           fold a projection across the dot product
                           (:class:`AttentionMode`, ``attention.py``)
``FOLDED_DECODER``         the video decoder folds every linear map of a query's path
                           together (``decoders.FoldedDecoder``)
``SKIP_PADDING``           the language model does not compute trailing padding
``MICRO_BATCHES``          large CPU batches run in slices of a few items
                           (``micro_batches.py``)
=========================  ============================================================

With every fast path off, the modules read line for line against ``perceiver_jax``:
when parity breaks, run the plain path first::

    with perceiver_torch.fast_paths.plain():   # all off inside the block
        logits = model(ids, mask)

    with perceiver_torch.fast_paths.plain(FastPath.FOLDED_DECODER):  # just one
        ...

``PERCEIVER_TORCH_FAST_PATHS=0`` turns all of them off for the process and
``PERCEIVER_TORCH_ONEDNN=0`` the two oneDNN paths alone (both read at first use;
``reread_environment()`` reads them again; ``false``/``no``/``off`` mean 0 and
``true``/``yes``/``on`` 1, any other value is a ``ValueError`` naming it).
The fast paths switch themselves off where they do not apply (training, autograd,
dropout, other devices or dtypes for the oneDNN kernel, modules with hooks or
replaced by other ones: ``linear.intercepted``; ``torch.autocast`` for the oneDNN
kernels and the folded decoder, which autocast does not cast); the switch only ever
turns them off, never on where they do not apply.

The two oneDNN paths also step aside on CPUs where oneDNN's matmul is not the faster
kernel: the linear layers for float32 on CPUs without AVX-512
(``linear.onednn_linear_preferred``), the attentions on Intel CPUs in every dtype
(``linear.onednn_attention_preferred``). ``PERCEIVER_TORCH_ONEDNN=1`` takes both on
every CPU whose torch has the kernel (the test suite does, so that they are tested
everywhere).
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import threading
from typing import Dict, FrozenSet, Iterator, Optional, Tuple

__all__ = [
    "ENV_ALL",
    "ENV_ONEDNN",
    "AttentionMode",
    "FastPath",
    "disabled_paths",
    "enabled",
    "onednn_forced",
    "plain",
    "reread_environment",
    "switch",
]

ENV_ALL = "PERCEIVER_TORCH_FAST_PATHS"
ENV_ONEDNN = "PERCEIVER_TORCH_ONEDNN"


class FastPath(str, enum.Enum):
    """The named fast paths (their values are what error messages and docs show)."""

    ONEDNN_LINEAR = "onednn_linear"
    ONEDNN_ATTENTION = "onednn_attention"
    ABSORBED_ATTENTION = "absorbed_attention"
    FOLDED_DECODER = "folded_decoder"
    SKIP_PADDING = "skip_padding"
    MICRO_BATCHES = "micro_batches"


class AttentionMode(str, enum.Enum):
    """How an :class:`~perceiver_torch.attention.Attention` relates keys and values to
    its projections (see ``PreparedKeys``).

    ``STANDARD`` is the reference's computation; the two absorbed modes (one head, no
    attention dropout) are the ``ABSORBED_ATTENTION`` fast path: ``ABSORB_KV`` maps
    the queries by ``to_k``'s weight instead of projecting a long key array,
    ``ABSORB_Q`` folds ``to_q`` into the keys and ``to_out`` into the values for a
    long query array.
    """

    STANDARD = "standard"
    ABSORB_KV = "absorb_kv"
    ABSORB_Q = "absorb_q"


_OFF = frozenset({"0", "false", "no", "off"})
_ON = frozenset({"1", "true", "yes", "on"})


def switch(name: str) -> Optional[bool]:
    """The on/off value of environment variable ``name``: None where it is unset or
    empty; 0/false/no/off and 1/true/yes/on in any case and spacing. Anything else is
    a ``ValueError`` naming the variable: ``=off`` read as "not 0" would silently do
    the opposite of what was meant."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in _OFF or value in _ON:
        return value in _ON
    raise ValueError(
        f"{name}={os.environ[name]!r}: expected 0/false/no/off or 1/true/yes/on"
    )


def _from_environment() -> Tuple[FrozenSet[FastPath], bool]:
    """(the fast paths the environment turns off, whether it forces the oneDNN paths)."""
    onednn = switch(ENV_ONEDNN)
    if switch(ENV_ALL) is False:
        return frozenset(FastPath), False
    if onednn is False:
        return frozenset({FastPath.ONEDNN_LINEAR, FastPath.ONEDNN_ATTENTION}), False
    return frozenset(), onednn is True


# Module globals, not a context variable: torch.compile traces reads of globals (and
# guards on them), while ContextVar.get breaks the graph. ``plain()`` blocks are
# therefore process-wide. Each block counts the paths it turns off (``_blocks``), and
# the paths with a count are off: threads' blocks may overlap in any order, and
# leaving one never turns on what another, still open, turned off (a "previous
# state" saved at the entry and restored at the exit was another thread's, and left
# paths off for good).
_environment: Optional[Tuple[FrozenSet[FastPath], bool]] = None  # read at first use
_disabled_by_blocks: FrozenSet[FastPath] = frozenset()
_blocks: Dict[FastPath, int] = {path: 0 for path in FastPath}
_blocks_lock = threading.Lock()
# The paths that plain() blocks inside code torch.compile traces turn off, apart:
# dynamo traces no lock (fullgraph=True failed on one, "Unsupported context
# manager", and the graph broke around every block otherwise), and it writes the
# globals a traced block sets back as it traced them when the compiled code runs. So
# a traced block saves and restores this one, which only tracing sets (empty
# whenever compiled code runs), and never writes the eager blocks' counts, which
# other threads' blocks may have changed meanwhile.
_traced_blocks: FrozenSet[FastPath] = frozenset()


def reread_environment() -> None:
    """Reads ``PERCEIVER_TORCH_FAST_PATHS`` / ``PERCEIVER_TORCH_ONEDNN`` again (they
    are read once, at first use)."""
    global _environment
    _environment = _from_environment()


def _read_environment() -> Tuple[FrozenSet[FastPath], bool]:
    if _environment is None:
        reread_environment()
    return _environment


def onednn_forced() -> bool:
    """Whether ``PERCEIVER_TORCH_ONEDNN=1`` asks for the oneDNN paths on any CPU
    (unset, they take float32 only where this CPU runs oneDNN's matmul faster)."""
    return _read_environment()[1]


def disabled_paths() -> FrozenSet[FastPath]:
    """The fast paths that are off here: by the environment or a ``plain()`` block."""
    off = _read_environment()[0] | _disabled_by_blocks
    return off | _traced_blocks if _traced_blocks else off


def enabled(path: FastPath) -> bool:
    """Whether fast path ``path`` may be used here (it still checks it applies)."""
    return path not in disabled_paths()


def _count_blocks(paths: FrozenSet[FastPath], step: int) -> None:
    global _disabled_by_blocks
    with _blocks_lock:
        for path in paths:
            _blocks[path] += step
        _disabled_by_blocks = frozenset(path for path, n in _blocks.items() if n > 0)


def dynamo_tracing() -> bool:
    """Whether torch.compile (or torch.export) traces this code (torch is not
    imported for it here: where it traces, torch is loaded)."""
    torch = sys.modules.get("torch")
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return is_compiling is not None and bool(is_compiling())


@contextlib.contextmanager
def plain(*paths: FastPath) -> Iterator[None]:
    """Runs the plain computation of ``paths`` (default: every fast path) inside the
    ``with`` block; nested blocks add up, and leaving a block turns back on only the
    paths that no other open block turns off.

    The blocks are process-wide (module state, which torch.compile can guard on):
    while one is open, every thread computes those paths plainly, the same function
    in the reference's order. Blocks of several threads may open and close in any
    order. A block inside code that torch.compile traces is traced with it (no graph
    break; it turns the paths off for the code it holds)."""
    global _traced_blocks
    off = frozenset(FastPath) if not paths else frozenset(FastPath(p) for p in paths)
    if dynamo_tracing():
        previous = _traced_blocks
        _traced_blocks = previous | off
        try:
            yield
        finally:
            _traced_blocks = previous
        return
    _count_blocks(off, 1)
    try:
        yield
    finally:
        _count_blocks(off, -1)
