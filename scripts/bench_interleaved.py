#!/usr/bin/env python
"""Speed ratios that hold on a noisy machine: every variant in one process, calls
interleaved.

``bench_forward.py`` runs each (case, implementation, dtype) in a fresh process and
alternates the processes over rounds; that gives clean memory figures, but where the
machine's speed swings within seconds (a shared host: on the 2026-12-06 Intel Xeon the
bfloat16 matmul rate moved between 750 and 2,150 GFLOP/s from one 8-second sample to
the next), two processes can land in different states and their time ratio says more
about the host than about the code. Here each case builds every variant once (ours and
HuggingFace's, in each ``--dtype``) in one process and then times them in turns:
``--reps`` rounds of one call of each variant, in an order that rotates every round,
each round also timing the matmul peak of each dtype (the same 2048^3 product as
``bench_forward.py``). A swing of the host then slows all variants of the round alike,
and the medians and their ratios compare the code; where the host's swings are as
fast as the calls, the fastest call of each variant (and the fastest probe) is the
steadier figure, and both are printed. The work and the share of the peak are
counted as in ``bench_forward.py`` (HF's matmul FLOPs, against the probes
interleaved with the calls).

With ``--batch``, every batch size is a variant too (the ratios above compare batch
1), and a second table gives each implementation's throughput, items/s = batch / time,
per batch size and its ratio to batch 1's, from the same interleaved rounds. Each
round then gives every batch size as many items as the largest batch (batch 1 of
``--batch 1 8 32`` is 32 calls in a row, timed together, and its time is their mean):
a long call averages over the host's swings, and a median of short calls would not.

With ``--pack-weights both`` our model runs twice in the same rounds, as "ours"
(weights as ``perceiver_torch.load`` leaves them) and as "ours+packed"
(``perceiver_torch.pack_weights``: float32 weights packed too), and a last table gives
the packed variant's time over the other's: what the copies gain, measured in one
run. ``--pack-weights`` alone packs the "ours" variant.

Memory is not measured here (the variants share one process): use bench_forward.py.

Examples::

    python scripts/bench_interleaved.py --models language_perceiver imagenet_conv
    python scripts/bench_interleaved.py --models video_autoencoding --impl ours --reps 9
    python scripts/bench_interleaved.py --dtype float32 bfloat16 --json interleaved.json
    python scripts/bench_interleaved.py --impl ours --batch 1 8 32 --reps 3 --warmup 1
    python scripts/bench_interleaved.py --models language_perceiver --dtype float32 \
        --pack-weights both --reps 11
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_forward as bf  # noqa: E402  (beside this script; puts the checkout first)
from script_args import non_negative_int, output_file, positive_int  # noqa: E402

Variant = Tuple[str, str, int]  # (implementation, dtype, batch)

# Our model with perceiver_torch.pack_weights, beside "ours" (--pack-weights both).
PACKED = "ours+packed"


def variant_key(impl: str, dtype: str, batch: int = 1) -> str:
    """The variant's name in the results: "ours/float32", "hf/bfloat16/batch8"."""
    return f"{impl}/{dtype}" + ("" if batch == 1 else f"/batch{batch}")


def packs_weights(impl: str, pack_weights: str) -> bool:
    """Whether variant ``impl`` runs our model with ``perceiver_torch.pack_weights``:
    "ours+packed" always, "ours" with ``--pack-weights on``, HF's never."""
    return impl == PACKED or (impl == "ours" and pack_weights == "on")


def peak_probe(dtype: str) -> Callable[[], float]:
    """A function timing one PEAK_SIZE^3 product in ``dtype`` by the faster of
    ``torch.matmul`` and oneDNN here (chosen once), returning GFLOP/s."""
    import torch

    record = bf.matmul_peak(dtype, "cpu", repeat=3)
    n = bf.PEAK_SIZE
    a = torch.randn(n, n).to(getattr(torch, dtype))
    b = torch.randn(n, n).to(getattr(torch, dtype))
    kernels = record["kernels"]
    if kernels.get("onednn", 0) > kernels.get("matmul", 0):
        product = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    else:
        product = lambda: torch.matmul(a, b.t())

    def probe() -> float:
        start = time.perf_counter()
        product()
        return 2 * n**3 / (time.perf_counter() - start) / 1e9

    return probe


def measure_case(case: str, variants: List[Variant], args: argparse.Namespace) -> Dict[str, Any]:
    """Medians of ``args.reps`` interleaved calls of each variant of ``case``."""
    import torch

    runs: Dict[Variant, Callable[[int], Any]] = {}
    failed: Dict[str, str] = {}
    for impl, dtype, batch in variants:
        options = argparse.Namespace(
            device="cpu", dtype=dtype, batch=batch,
            pack_weights=packs_weights(impl, args.pack_weights), compiled=False,
            hf_clip_calls=1,
        )
        build = bf.build_hf if impl == "hf" else bf.build_ours
        try:
            run = build(case, options)
            with torch.inference_mode():
                for i in range(args.warmup):
                    run(i)
            runs[(impl, dtype, batch)] = run
        except Exception as error:  # HF's video model fails in bfloat16
            key = variant_key(impl, dtype, batch)
            failed[key] = f"{type(error).__name__}: {error}"
            print(f"[{case} / {key}] fails: {failed[key]}", file=sys.stderr, flush=True)
    dtypes = sorted({dtype for _, dtype, _ in variants})
    probes = {dtype: peak_probe(dtype) for dtype in dtypes}
    times: Dict[Variant, List[float]] = {v: [] for v in runs}
    peaks: Dict[str, List[float]] = {d: [] for d in dtypes}
    order = list(runs)
    # Every batch size gets the same items a round (the largest batch's), so a swing
    # of the host within the round weighs on each alike: a batch-32 call spans 32
    # batch-1 calls, and would otherwise be compared with the median of short calls.
    largest = max(batch for _, _, batch in order) if order else 1
    calls_per_round = {v: -(-largest // v[2]) for v in order}
    with torch.inference_mode():
        for rep in range(args.reps):
            for dtype in dtypes:
                peaks[dtype].append(probes[dtype]())
            shift = rep % len(order)
            for variant in order[shift:] + order[:shift]:
                calls = calls_per_round[variant]
                start = time.perf_counter()
                for call in range(calls):
                    runs[variant](rep * calls + call)
                times[variant].append((time.perf_counter() - start) / calls)
            print(f"[{case}] round {rep + 1}/{args.reps}: " + ", ".join(
                f"{variant_key(*v)} {times[v][-1]:.3f} s" for v in order), file=sys.stderr,
                flush=True)
    work: Optional[int] = None
    if args.flops:
        for impl in ("hf", "ours"):
            source = [v for v in runs if v[0] == impl and v[2] == 1]
            if source:
                work = bf.count_matmul_flops(runs[source[0]])
                break
    medians = {variant_key(*v): statistics.median(t) for v, t in times.items()}
    best = {variant_key(*v): min(t) for v, t in times.items()}
    peak = {d: statistics.median(p) for d, p in peaks.items()}
    return {
        "case": case, "reps": args.reps, "seconds": medians, "best_seconds": best,
        "best_peak_gflops": {d: max(p) for d, p in peaks.items()},
        "all_seconds": {variant_key(*v): [round(x, 4) for x in t] for v, t in times.items()},
        "peak_gflops": peak, "peak_all": {d: [round(x) for x in p] for d, p in peaks.items()},
        "work_flops": work, "failed": failed,
    }


def report(
    result: Dict[str, Any], dtypes: List[str], statistic: str, ours_impl: str = "ours"
) -> List[str]:
    """Table rows for one case: per dtype our time, HF's, ours/HF, the shares of the
    peak and our float32 time over this dtype's; ``statistic`` "median" (medians of
    the calls and of the peak probes) or "best" (the fastest call of each variant
    and the fastest probe: a host that only ever slows calls down leaves the best
    ones closest to the code's own speed). ``ours_impl``: which of our variants is
    "ours" (``PACKED``: the rows say so in their statistic column)."""
    work = result["work_flops"]
    if statistic == "best":
        s, peak = result["best_seconds"], result["best_peak_gflops"]
    else:
        s, peak = result["seconds"], result["peak_gflops"]
    label = statistic if ours_impl == "ours" else f"{statistic} ({ours_impl})"
    rows = []
    for dtype in dtypes:
        ours, hf = s.get(variant_key(ours_impl, dtype)), s.get(variant_key("hf", dtype))
        fp32 = s.get(variant_key(ours_impl, "float32"))

        def share(t: Optional[float]) -> str:
            if t is None or not work or not peak.get(dtype):
                return "-"
            return f"{100 * work / t / 1e9 / peak[dtype]:.0f}%"

        rows.append(" | ".join([
            result["case"], label, dtype,
            "-" if ours is None else f"{ours:.3f} s",
            "-" if hf is None else f"{hf:.3f} s",
            "-" if ours is None or hf is None else f"**{ours / hf:.2f}**",
            f"{share(ours)} / {share(hf)}",
            "-" if dtype == "float32" or ours is None or fp32 is None else f"{fp32 / ours:.2f}x",
            f"{peak.get(dtype, 0):.0f}",
        ]))
    return rows


def report_packing(result: Dict[str, Any], dtypes: List[str]) -> List[str]:
    """Rows of our packed variant's time over the plain one's per dtype (``--pack-weights
    both``), from the medians of the calls (the fastest calls in brackets)."""
    rows = []
    for dtype in dtypes:
        ratios = []
        for times in (result["seconds"], result["best_seconds"]):
            plain = times.get(variant_key("ours", dtype))
            packed = times.get(variant_key(PACKED, dtype))
            ratios.append(None if plain is None or packed is None else packed / plain)
        if None not in ratios:
            rows.append(f"{result['case']} | {dtype} | {ratios[0]:.3f} ({ratios[1]:.3f})")
    return rows


def report_batches(
    result: Dict[str, Any], impls: List[str], dtypes: List[str], batches: List[int]
) -> List[str]:
    """Throughput rows for one case: per implementation and dtype, items/s at each of
    ``batches`` (ascending, 1 first) from the median calls (the best calls in
    brackets), and each larger batch's items/s over batch 1's (medians)."""
    rows = []
    for impl in impls:
        for dtype in dtypes:
            medians, best = [], []
            for batch in batches:
                key = variant_key(impl, dtype, batch)
                t, b = result["seconds"].get(key), result["best_seconds"].get(key)
                medians.append(None if t is None else batch / t)
                best.append(None if b is None else batch / b)
            if all(m is None for m in medians[1:]):  # video_clip: batch 1 only
                continue
            cells = [
                "-" if m is None else f"{m:.3g} ({b:.3g})" for m, b in zip(medians, best)
            ]
            ratios = [
                "-" if m is None or medians[0] is None else f"{m / medians[0]:.2f}"
                for m in medians[1:]
            ]
            rows.append(" | ".join([result["case"], impl, dtype] + cells + [" / ".join(ratios)]))
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=bf.CASES,
                   default=[c for c in bf.MODEL_CASES if c != "optical_flow"],
                   metavar="CASE", help="cases (default: all but optical_flow and "
                   "video_clip, the slow ones; video_clip, our whole-clip "
                   "reconstruct, runs ours only): " + ", ".join(bf.CASES))
    p.add_argument("--impl", choices=("both", "ours"), default="both")
    p.add_argument("--dtype", nargs="+", choices=("float32", "bfloat16", "float16"),
                   default=["float32", "bfloat16"])
    p.add_argument("--batch", nargs="+", type=positive_int, default=[1], metavar="N",
                   help="batch sizes, 1 among them, each a variant (e.g. 1 8 32; video_clip: "
                   "1 only); with more than one, a throughput table follows")
    p.add_argument("--reps", type=positive_int, default=7, help="interleaved rounds (median)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed calls per variant")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--pack-weights", nargs="?", const="on", default="off",
                   choices=("off", "on", "both"),
                   help="our models with perceiver_torch.pack_weights (float32 "
                   "weights packed too; bfloat16 ones are by default); 'both': ours "
                   "without and with (an ours+packed variant) in the same rounds, and "
                   "the packed one's time over the other's")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip counting the matmul FLOPs")
    p.add_argument("--json", type=output_file, metavar="PATH",
                   help="write the results as JSON here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    impls = ["ours"] + ([PACKED] if args.pack_weights == "both" else [])
    impls += ["hf"] if args.impl == "both" else []
    if "hf" in impls:
        bf.import_transformers()
    dtypes = list(dict.fromkeys(args.dtype))
    batches = sorted(set(args.batch))
    if batches[0] != 1:
        p.error("--batch: positive sizes, 1 among them (the others are compared with it)")
    variants = [(i, d, b) for b in batches for d in dtypes for i in impls]
    results, rows, batch_rows, packing_rows = [], [], [], []
    for case in args.models:
        # HF decodes a clip in 128 calls: bench_forward.py estimates that one; a
        # clip is one item.
        case_variants = [
            v for v in variants
            if case != "video_clip" or (v[0] != "hf" and v[2] == 1)
        ]
        result = measure_case(case, case_variants, args)
        results.append(result)
        rows += report(result, dtypes, "median") + report(result, dtypes, "best")
        if args.pack_weights == "both":
            rows += report(result, dtypes, "median", PACKED)
            rows += report(result, dtypes, "best", PACKED)
            packing_rows += report_packing(result, dtypes)
        if len(batches) > 1:
            batch_rows += report_batches(result, impls, dtypes, batches)
    print("case | statistic | dtype | ours | HF | ours / HF | % of matmul peak, ours / HF"
          " | our float32 / ours | peak GFLOP/s")
    print("\n".join(rows))
    if batch_rows:
        print("\ncase | implementation | dtype | " + " | ".join(
            f"batch {b} items/s, median (best)" for b in batches
        ) + " | " + " / ".join(f"batch {b}" for b in batches[1:]) + " over batch 1 (medians)")
        print("\n".join(batch_rows))
    if packing_rows:
        print("\ncase | dtype | time with packed weights / without, median (best)")
        print("\n".join(packing_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": bf.environment(), "reps": args.reps,
                       "threads": args.threads, "batches": batches,
                       "pack_weights": args.pack_weights, "results": results},
                      f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
