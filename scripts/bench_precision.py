#!/usr/bin/env python
"""Fidelity of bfloat16/float16 for the six models: a table a user can choose by.

For each model, an official-format checkpoint with random weights is written
(``--size full`` by default: the official sizes), converted in memory, and
:func:`converter.precision.fidelity_prepared` runs the JAX reference (float32), the
converted model in float32 and in each ``--dtype`` on the same structured inputs
(natural text, generated images, a shifted frame pair, a moving pattern with tones).
Reported per output: max relative diff against JAX and against float32
perceiver_torch, argmax agreement (language: every position of the text; ImageNet:
``--batch`` images), flow end-point error in pixels, video PSNR (the reference chunk
and, against float32, the whole clip).

Needs the ``[jax]`` extra. Full size takes minutes per model and a few GB of memory
(optical flow's JAX run peaks at about 5 GB); run it in the background::

    nohup python scripts/bench_precision.py --json precision.json > precision.log 2>&1 &
    python scripts/bench_precision.py --size tiny --models optical_flow   # seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "converter" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))

# beside this script
from script_args import non_negative_int, output_file, positive_int  # noqa: E402

MODELS = (
    "language_perceiver",
    "imagenet_learned",
    "imagenet_fourier",
    "imagenet_conv",
    "optical_flow",
    "video_autoencoding",
)


def environment(threads: int) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cpu_count": os.cpu_count(),
    }
    try:
        import jax

        info["jax"] = jax.__version__
    except ImportError:
        info["jax"] = None
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        names = [l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")]
        flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
        info["cpu"] = names[0] if names else None
        info["cpu_bf16_flags"] = sorted(
            f for f in flags if f in ("avx512_bf16", "amx_bf16", "avx512fp16", "amx_tile")
        )
    except OSError:
        pass
    return info


def summary_rows(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One line per (model, output): the reduced run against JAX and float32."""
    rows = {}
    for r in report["rows"]:
        if r["run"] == "float32":
            continue
        row = rows.setdefault(r["output"], {"model": report["model"], "output": r["output"]})
        row[f"rel_vs_{r['against']}"] = r["relative"]
        for key in ("argmax_agreement", "epe_mean", "epe_max", "psnr_db"):
            if r.get(key) is not None:
                row[f"{key}_vs_{r['against']}"] = r[key]
    floor = {r["output"]: r["relative"] for r in report["rows"] if r["run"] == "float32"}
    for output, row in rows.items():
        row["float32_rel_vs_jax"] = floor.get(output)
    return list(rows.values())


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_summary(dtype: str, rows: List[Dict[str, Any]]) -> None:
    header = (
        "model", "output", "max rel vs JAX", "max rel vs fp32", "(fp32 vs JAX)",
        "argmax = fp32", "argmax = JAX", "EPE px mean/max vs fp32", "PSNR dB vs fp32",
    )
    lines = []
    for r in rows:
        epe = "-"
        if r.get("epe_mean_vs_float32") is not None:
            epe = f"{r['epe_mean_vs_float32']:.3g} / {r['epe_max_vs_float32']:.3g}"
        lines.append((
            r["model"], r["output"], fmt(r.get("rel_vs_jax"), ".2e"),
            fmt(r.get("rel_vs_float32"), ".2e"), fmt(r.get("float32_rel_vs_jax"), ".1e"),
            fmt(r.get("argmax_agreement_vs_float32"), ".2%"),
            fmt(r.get("argmax_agreement_vs_jax"), ".2%"), epe,
            fmt(r.get("psnr_db_vs_float32"), ".1f"),
        ))
    widths = [max(len(str(x[i])) for x in lines + [header]) for i in range(len(header))]
    print(f"\n{dtype}:")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(str(v).ljust(w) for v, w in zip(line, widths)) + " |")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--dtype", nargs="+", choices=("bfloat16", "float16"), default=["bfloat16"]
    )
    p.add_argument("--size", choices=("tiny", "full"), default="full")
    p.add_argument("--batch", type=positive_int, default=8, help="ImageNet images (default 8)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="fixture weights' seed")
    p.add_argument("--no-clip", action="store_true", help="skip the whole video clip")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--json", type=output_file, metavar="PATH",
                   help="write the reports as JSON here")
    args = p.parse_args(argv)

    import torch

    from converter.conversion import prepare
    from converter.fixtures import write_fixture
    from converter.precision import fidelity_prepared

    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(f"{env.get('cpu')} ({', '.join(env.get('cpu_bf16_flags') or []) or 'no bf16 flags'}), "
          f"torch {env['torch']}, {args.threads} threads, {args.size} size", file=sys.stderr)
    reports: List[Dict[str, Any]] = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as work:
            source = Path(work) / f"{name}.pickle"
            started = time.perf_counter()
            write_fixture(name, source, size=args.size, seed=args.seed)
            prepared = prepare(source)
            cache: Dict[str, Any] = {}  # one JAX and one float32 run for every dtype
            for dtype in args.dtype:
                print(f"[{name} / {dtype}] ...", file=sys.stderr, flush=True)
                report = fidelity_prepared(
                    prepared,
                    dtype,
                    batch=args.batch if name.startswith("imagenet") else None,
                    whole_clip=not args.no_clip,
                    progress=lambda m: print(f"    {m}", file=sys.stderr, flush=True),
                    cache=cache,
                )
                print(report.format_table(), file=sys.stderr, flush=True)
                reports.append(report.as_dict())
            del prepared, cache
            gc.collect()
            print(f"    {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if args.json:  # after every model, so a long run leaves what it finished
            settings = {**vars(args), "json": str(args.json)}
            payload = {"environment": env, "settings": settings, "reports": reports}
            Path(args.json).write_text(json.dumps(payload, indent=2))
    for dtype in args.dtype:
        rows = [row for r in reports if r["dtype"] == dtype for row in summary_rows(r)]
        print_summary(dtype, rows)
    ok = all(r["finite"] for r in reports)
    if not ok:
        print("\nsome reduced-precision outputs are not finite", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
