#!/usr/bin/env python
"""How much matrix-product work perceiver_torch's inference does, against the standard
algorithm's (HuggingFace's forward, and our own plain path).

``bench_forward.py`` counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode``,
whose module tracker hooks every module: our fast paths that read the weights (the
folded attentions, the folded video decoder) step aside for modules with hooks, so
that count is the standard algorithm's, which is what "% of matmul peak" divides by.
This script counts below the modules instead (a ``TorchDispatchMode`` seeing every
aten operation, no hooks) in three ways, per case:

- ``ours``: inference as it runs (every fast path that changes the algorithm on),
  under ``torch.no_grad`` (the fast paths take it as they take inference mode;
  inference mode would hand the counter ``aten.linear`` and ``aten.matmul`` whole,
  without their products). The two oneDNN paths are switched off while counting:
  they compute the same products on another kernel, whose operations the counter
  has no formula for;
- ``plain``: ours with every fast path off (``fast_paths.plain()``);
- ``hf``: HuggingFace's forward, through ``bench_forward.count_matmul_flops``
  (needs ``transformers``; skipped without it or with ``--no-hf``).

A matrix-product operation the counter has no formula for stops the script (a count
missing it would be too low) rather than being left out.

    python scripts/count_flops.py
    python scripts/count_flops.py --models imagenet_learned optical_flow --no-hf
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Any, Callable, Dict, List, Optional

import bench_forward as bench  # beside this script; puts the checkout on sys.path
from script_args import output_file

CASES = bench.MODEL_CASES
# Names of aten operations that multiply matrices; one of these without a formula in
# torch's flop registry would be missed by the count.
_PRODUCT_WORDS = ("mm", "linear", "conv", "matmul", "mkl", "attention", "einsum")


def count_dispatched_flops(call: Callable[[], Any]) -> int:
    """FLOPs (2 x multiply-adds) of the matrix products ``call()`` runs, counted at
    the dispatcher with torch's own formulas (``flop_registry``); the CPU's fused
    attention kernel counts as its two products. Raises RuntimeError naming any
    product-like operation that has no formula."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, sdpa_flop_count

    aten = torch.ops.aten
    formulas = dict(flop_registry)
    # In-place forms multiply as their out-of-place ones do (the video decoder's
    # addmm_); the registry lists only the latter.
    for inplace, plain in ((aten.addmm_, aten.addmm), (aten.baddbmm_, aten.baddbmm)):
        if plain in formulas:
            formulas.setdefault(inplace, formulas[plain])
    fused = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.total = 0
            self.unknown: Dict[str, int] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in formulas:
                self.total += formulas[packet](*args, **kwargs, out_val=out)
            elif fused is not None and packet == fused:
                self.total += sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape)
            elif any(word in str(packet) for word in _PRODUCT_WORDS):
                self.unknown[str(packet)] += 1
            return out

    with Counter() as counter:
        call()
    if counter.unknown:
        raise RuntimeError(
            "matrix products with no FLOP formula (the count would miss them): "
            + ", ".join(f"{name} x{n}" for name, n in sorted(counter.unknown.items()))
        )
    return int(counter.total)


def count_ours(case: str) -> Dict[str, int]:
    """``{"ours": ..., "plain": ...}`` for one case (float32, CPU, batch 1)."""
    import torch

    from perceiver_torch.fast_paths import FastPath, plain

    run = bench.build_ours(case, _bench_args())
    with torch.no_grad():
        with plain(FastPath.ONEDNN_LINEAR, FastPath.ONEDNN_ATTENTION):
            ours = count_dispatched_flops(lambda: run(0))
        with plain():
            standard = count_dispatched_flops(lambda: run(0))
    return {"ours": ours, "plain": standard}


def count_hf(case: str) -> Optional[int]:
    """HF's count (``bench_forward``'s work), or None without transformers."""
    try:
        bench.import_transformers()
    except SystemExit as missing:
        print(f"note: {missing}; HF's column left empty", file=sys.stderr)
        return None
    return bench.count_matmul_flops(bench.build_hf(case, _bench_args()))


def _bench_args() -> argparse.Namespace:
    args = bench.parse_args([])
    args.dtype, args.batch, args.device = "float32", 1, "cpu"
    args.compiled, args.pack_weights = False, False
    return args


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=CASES, default=list(CASES), metavar="CASE",
                   help=f"cases to count (default all): {', '.join(CASES)}")
    p.add_argument("--no-hf", action="store_true", help="do not count HuggingFace's forward")
    p.add_argument("--json", type=output_file, metavar="PATH", help="also write the counts here")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(2)
    rows = []
    print(f"{'case':<20} {'ours GFLOP':>11} {'plain GFLOP':>12} {'HF GFLOP':>9} {'ours/HF':>8}")
    for case in args.models:
        row = {"case": case, **count_ours(case)}
        row["hf"] = None if args.no_hf else count_hf(case)
        rows.append(row)
        hf = row["hf"]
        print(
            f"{case:<20} {row['ours'] / 1e9:11.1f} {row['plain'] / 1e9:12.1f} "
            + (f"{hf / 1e9:9.1f} {row['ours'] / hf:8.2f}" if hf else f"{'-':>9} {'-':>8}"),
            flush=True,
        )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
