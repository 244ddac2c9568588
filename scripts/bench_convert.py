"""Time and peak memory of converting the full-size language checkpoint, against a floor.

The floor is the least any converter must do: read the checkpoint's bytes and write
the same number of bytes (then fsync, as the converter does). Each measurement runs in
a fresh Python process (so peak memory is its own), floor and conversion alternate,
and the medians are compared in this one run:

    python scripts/bench_convert.py [--checkpoint PATH] [--repeat 3] [--json out.json]

Without --checkpoint, an official-format language checkpoint with random weights
(804 MB) is written to a temporary folder first. Targets: conversion within 2x the
floor's time, and peak memory under 2x the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from script_args import existing_file, output_file, positive_int  # beside this script

_SCRIPTS = Path(__file__).resolve().parent

# Runs in the child process: measure one operation, print a JSON line.
_CHILD = r"""
import json, os, sys, time

mode, source, target, scripts = sys.argv[1:5]
sys.path.insert(0, scripts)
from proc_memory import current_rss, max_rss

if mode == "convert":
    import converter, perceiver_torch, torch  # imports are not part of the measurement
    import converter.conversion
baseline = current_rss()
started = time.perf_counter()
if mode == "floor":
    with open(source, "rb") as f:
        data = f.read()
    with open(target, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
else:
    converter.convert(source, target)
seconds = time.perf_counter() - started
peak = max_rss()
print(json.dumps({"seconds": seconds, "peak": peak, "baseline": baseline}))
"""


def measure(mode: str, source: Path, target: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(source), str(target), str(_SCRIPTS)],
        capture_output=True,
        text=True,
    )
    target.unlink(missing_ok=True)
    if result.returncode != 0:
        # The conversion's own error (a checkpoint that is no official file, ...), not
        # a traceback of this script quoting the child's source.
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        sys.exit(f"bench_convert.py: {mode} of {source} failed: {lines[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=existing_file, help="official language checkpoint")
    parser.add_argument("--repeat", type=positive_int, default=3)
    parser.add_argument("--json", type=output_file, help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as folder:
        folder = Path(folder)
        source = args.checkpoint
        if source is None:
            from converter.fixtures import write_fixture

            source = folder / "language_perceiver_io_bytes.pickle"
            print(f"writing a full-size language checkpoint to {source} ...", flush=True)
            write_fixture("language_perceiver", source, size="full", seed=0,
                          protocol=3, container="flatmapping")
        size = source.stat().st_size
        # One untimed read so both start from a warm page cache.
        with open(source, "rb") as f:
            while f.read(1 << 24):
                pass
        floors, converts = [], []
        for i in range(args.repeat):
            floors.append(measure("floor", source, folder / "floor.bin"))
            converts.append(measure("convert", source, folder / "converted.safetensors"))
            print(f"  run {i + 1}: floor {floors[-1]['seconds']:.2f} s, "
                  f"convert {converts[-1]['seconds']:.2f} s", flush=True)

    def median(runs, key):
        return statistics.median(run[key] for run in runs)

    floor_s, convert_s = median(floors, "seconds"), median(converts, "seconds")
    convert_peak = median(converts, "peak")
    convert_extra = statistics.median(r["peak"] - r["baseline"] for r in converts)
    floor_extra = statistics.median(r["peak"] - r["baseline"] for r in floors)
    results = {
        "checkpoint_bytes": size,
        "repeat": args.repeat,
        "floor_seconds": floor_s,
        "convert_seconds": convert_s,
        "time_ratio": convert_s / floor_s,
        "floor_extra_peak_bytes": floor_extra,
        "convert_extra_peak_bytes": convert_extra,
        "convert_peak_rss_bytes": convert_peak,
        "memory_ratio_extra": convert_extra / size,
        "memory_ratio_process": convert_peak / size,
    }
    mib = 1 << 20
    print()
    print(f"checkpoint: {size / mib:,.0f} MiB ({size:,} bytes), median of {args.repeat} runs")
    print(f"  floor (read + write the same bytes): {floor_s:6.2f} s, "
          f"extra peak {floor_extra / mib:6.0f} MiB")
    print(f"  convert to safetensors:              {convert_s:6.2f} s, "
          f"extra peak {convert_extra / mib:6.0f} MiB, process peak {convert_peak / mib:,.0f} MiB")
    print(f"  time ratio convert / floor:          {results['time_ratio']:.2f}x  (target <= 2x)")
    print(f"  peak memory / checkpoint size:       {results['memory_ratio_extra']:.2f}x extra, "
          f"{results['memory_ratio_process']:.2f}x whole process  (target < 2x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
