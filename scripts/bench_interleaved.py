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

Memory is not measured here (the variants share one process): use bench_forward.py.

Examples::

    python scripts/bench_interleaved.py --models language_perceiver imagenet_conv
    python scripts/bench_interleaved.py --models video_autoencoding --impl ours --reps 9
    python scripts/bench_interleaved.py --dtype float32 bfloat16 --json interleaved.json
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

Variant = Tuple[str, str]  # (implementation, dtype)


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
    for impl, dtype in variants:
        options = argparse.Namespace(
            device="cpu", dtype=dtype, batch=1, pack_weights=args.pack_weights,
            compiled=False, hf_clip_calls=1,
        )
        build = bf.build_ours if impl == "ours" else bf.build_hf
        try:
            run = build(case, options)
            with torch.inference_mode():
                for i in range(args.warmup):
                    run(i)
            runs[(impl, dtype)] = run
        except Exception as error:  # HF's video model fails in bfloat16
            failed[f"{impl}/{dtype}"] = f"{type(error).__name__}: {error}"
            print(f"[{case} / {impl} / {dtype}] fails: {failed[f'{impl}/{dtype}']}",
                  file=sys.stderr, flush=True)
    dtypes = sorted({dtype for _, dtype in variants})
    probes = {dtype: peak_probe(dtype) for dtype in dtypes}
    times: Dict[Variant, List[float]] = {v: [] for v in runs}
    peaks: Dict[str, List[float]] = {d: [] for d in dtypes}
    order = list(runs)
    with torch.inference_mode():
        for rep in range(args.reps):
            for dtype in dtypes:
                peaks[dtype].append(probes[dtype]())
            shift = rep % len(order)
            for variant in order[shift:] + order[:shift]:
                start = time.perf_counter()
                runs[variant](rep)
                times[variant].append(time.perf_counter() - start)
            print(f"[{case}] round {rep + 1}/{args.reps}: " + ", ".join(
                f"{i}/{d} {times[(i, d)][-1]:.3f} s" for i, d in order), file=sys.stderr,
                flush=True)
    work: Optional[int] = None
    if args.flops:
        for impl in ("hf", "ours"):
            source = [v for v in runs if v[0] == impl]
            if source:
                work = bf.count_matmul_flops(runs[source[0]])
                break
    medians = {f"{i}/{d}": statistics.median(t) for (i, d), t in times.items()}
    best = {f"{i}/{d}": min(t) for (i, d), t in times.items()}
    peak = {d: statistics.median(p) for d, p in peaks.items()}
    return {
        "case": case, "reps": args.reps, "seconds": medians, "best_seconds": best,
        "best_peak_gflops": {d: max(p) for d, p in peaks.items()},
        "all_seconds": {f"{i}/{d}": [round(x, 4) for x in t] for (i, d), t in times.items()},
        "peak_gflops": peak, "peak_all": {d: [round(x) for x in p] for d, p in peaks.items()},
        "work_flops": work, "failed": failed,
    }


def report(result: Dict[str, Any], dtypes: List[str], statistic: str) -> List[str]:
    """Table rows for one case: per dtype our time, HF's, ours/HF, the shares of the
    peak and our float32 time over this dtype's; ``statistic`` "median" (medians of
    the calls and of the peak probes) or "best" (the fastest call of each variant
    and the fastest probe: a host that only ever slows calls down leaves the best
    ones closest to the code's own speed)."""
    work = result["work_flops"]
    if statistic == "best":
        s, peak = result["best_seconds"], result["best_peak_gflops"]
    else:
        s, peak = result["seconds"], result["peak_gflops"]
    rows = []
    for dtype in dtypes:
        ours, hf = s.get(f"ours/{dtype}"), s.get(f"hf/{dtype}")
        fp32 = s.get("ours/float32")

        def share(t: Optional[float]) -> str:
            if t is None or not work or not peak.get(dtype):
                return "-"
            return f"{100 * work / t / 1e9 / peak[dtype]:.0f}%"

        rows.append(" | ".join([
            result["case"], statistic, dtype,
            "-" if ours is None else f"{ours:.3f} s",
            "-" if hf is None else f"{hf:.3f} s",
            "-" if ours is None or hf is None else f"**{ours / hf:.2f}**",
            f"{share(ours)} / {share(hf)}",
            "-" if dtype == "float32" or ours is None or fp32 is None else f"{fp32 / ours:.2f}x",
            f"{peak.get(dtype, 0):.0f}",
        ]))
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
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pack-weights", action="store_true",
                   help="our models with perceiver_torch.pack_weights (float32 "
                   "weights packed too; bfloat16 ones are by default)")
    p.add_argument("--no-flops", dest="flops", action="store_false",
                   help="skip counting the matmul FLOPs")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    impls = ["ours", "hf"] if args.impl == "both" else ["ours"]
    if "hf" in impls:
        bf.import_transformers()
    dtypes = list(dict.fromkeys(args.dtype))
    variants = [(impl, dtype) for dtype in dtypes for impl in impls]
    results, rows = [], []
    for case in args.models:
        # HF decodes a clip in 128 calls: bench_forward.py estimates that one.
        case_variants = [v for v in variants if v[0] == "ours" or case != "video_clip"]
        result = measure_case(case, case_variants, args)
        results.append(result)
        rows += report(result, dtypes, "median") + report(result, dtypes, "best")
    print("case | statistic | dtype | ours | HF | ours / HF | % of matmul peak, ours / HF"
          " | our float32 / ours | peak GFLOP/s")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": bf.environment(), "reps": args.reps,
                       "threads": args.threads, "results": results}, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
