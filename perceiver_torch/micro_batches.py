"""Large CPU batches at inference run in slices of a few items (``MICRO_BATCHES``).

Every Perceiver IO model computes each batch item independently (its BatchNorm, in
the conv preprocessor, uses moving statistics at inference), so a batch can run in
slices whose outputs are concatenated. On the 2-core CPUs this project is measured
on, throughput is level from batch 1 to batch 8 (the models already keep both cores
busy in large matmuls at batch 1) and falls at batch 32, where every array of the
forward pass is 32 items deep and none fits a cache; memory grows with the batch
too (6.6 GB at ImageNet batch 32). A slice holds at most :data:`MICRO_BATCH_TOKENS`
of the encoder's input tokens (at least one item) and at most a model's
``max_items_per_slice``: four 2,048-token sequences, one image (the conv model's
3,136 tokens would allow two, which its bfloat16 kernels run slower), flow tile or
video clip.

Slicing applies where the other CPU fast paths do (no autograd, eval mode, CPU
tensors, not under ``torch.compile``); on GPUs, where large batches are where
throughput comes from, batches run whole. The result is the same function; only the
matmul kernels' blocking, hence float32 rounding, may differ with the row count.
``fast_paths.plain(FastPath.MICRO_BATCHES)`` runs whole batches.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, List, Mapping, Optional, Sequence, TypeVar

import torch
from torch import Tensor

from .fast_paths import FastPath, enabled
from .linear import compiling, intercepted_below

__all__ = ["MICRO_BATCH_TOKENS", "concat_batches", "items_per_slice", "micro_batched"]

# Encoder input tokens per slice. 8,192 keeps the linear layers in the row counts
# where oneDNN runs at its full rate here (it falls by 10-20% from 8,192 rows up).
MICRO_BATCH_TOKENS = 1 << 13

F = TypeVar("F", bound=Callable[..., Any])


def concat_batches(outputs: Sequence[Any]) -> Any:
    """Concatenates per-slice outputs along the batch axis: tensors, and dicts, lists
    and tuples of them (the structure of the first output)."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(list(outputs), dim=0)
    if isinstance(first, Mapping):
        return {key: concat_batches([out[key] for out in outputs]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat_batches(parts) for parts in zip(*outputs))
    raise TypeError(f"cannot concatenate outputs of type {type(first).__name__}")


def micro_batched(*batched: str) -> Callable[[F], F]:
    """Decorates a model method whose arguments named ``batched`` are batch-first
    tensors (or None): at inference on CPU, batches of more than the model's
    ``micro_batch_size(first)`` items (``first``: the first of them given) run in
    slices of that many, outputs concatenated.

    Batches run whole when the arguments' batch sizes disagree (the method then
    raises its own error about the shapes), and wherever slicing does not apply (see
    the module's docstring). Before slicing, the model's ``check_inputs`` (called
    with the ``batched`` arguments by name) checks the whole batch, so that its
    ``InputError`` names the shapes the caller passed.
    """

    def decorate(method: F) -> F:
        signature = inspect.signature(method)

        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(self, *args, **kwargs)
            tensors = [bound.arguments.get(name) for name in batched]
            tensors = [t for t in tensors if t is not None]
            size = _slice_size(self, tensors)
            if size is None:
                return method(self, *args, **kwargs)
            # The door checks see the whole batch, so that an InputError names the
            # caller's shapes, not one slice's (each slice is checked again inside).
            check = getattr(self, "check_inputs", None)
            if check is not None:
                check(**{name: bound.arguments.get(name) for name in batched})
            outputs: List[Any] = []
            for start in range(0, tensors[0].shape[0], size):
                part = bound.arguments.copy()
                for name in batched:
                    if part.get(name) is not None:
                        part[name] = part[name][start : start + size]
                outputs.append(method(**part))
            return concat_batches(outputs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _slice_size(model: Any, tensors: List[Any]) -> Optional[int]:
    """Items per slice for these batched arguments, or None where the batch runs
    whole (the cheap checks first: this runs on every call)."""
    if (
        torch.is_grad_enabled()
        or model.training
        or not tensors
        or not all(isinstance(t, Tensor) and t.dim() >= 2 for t in tensors)
        or compiling()
        or not enabled(FastPath.MICRO_BATCHES)
    ):
        return None
    batch = tensors[0].shape[0]
    if not all(t.shape[0] == batch and t.device.type == "cpu" for t in tensors):
        return None
    size = model.micro_batch_size(tensors[0])
    # Hooked or replaced modules inside see the whole batch, as on the plain path.
    return size if batch > size and not intercepted_below(model) else None


def items_per_slice(tokens_per_item: int) -> int:
    """Items per slice for a model whose encoder reads ``tokens_per_item`` tokens."""
    return max(1, MICRO_BATCH_TOKENS // max(1, tokens_per_item))
