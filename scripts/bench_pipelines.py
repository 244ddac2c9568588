"""Benchmark of the flow and autoencode pipelines' two speed-ups, as ratios measured in
one run, on full-size models with random weights (``perceiver_torch.build``).

* flow: a 436x1024 frame pair (the colab's Sintel size: 2 x 3 = 6 tiles of 368x496)
  through ``OpticalFlow.tiled`` with ``--flow-batch`` tiles per model call vs one tile
  at a time (the colab's loop).
* autoencode: a 64-frame video (4 clips of 16 frames) encoded once per clip and
  decoded in its 128 chunks (``VideoAutoencoder.reconstruct``, what the pipeline does)
  vs the colab's procedure, which runs the encoder again for each of the 128 chunks.
  The colab's 512 encoder passes would take many minutes, so the baseline is measured
  on ``--baseline-chunks`` chunks spread over the clips and interleaved with them
  (encoder + that chunk's decoding each time) and extrapolated linearly to 4 x 128
  chunks; the output says so.

Both sides of each comparison run in this one process after a warm-up, with the same
threads and random weights in every parameter; the flow sides alternate over
``--flow-rounds`` rounds and the best time of each is kept. Usage::

    python scripts/bench_pipelines.py [--json PATH] [--flow-batch 3] [--flow-rounds 2]
        [--baseline-chunks 4] [--skip-flow] [--skip-video]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from typing import Any, Dict

import torch

import perceiver_torch as pt
from perceiver_torch.optical_flow import tile_grid
from script_args import output_file, positive_int  # beside this script


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values in every parameter (the official flow head starts at zero, which
    would make the flow, and the batched-vs-single difference, trivially 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def bench_flow(batch: int, rounds: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = randomize(pt.build("optical_flow")).eval()
    frames = torch.rand(1, 2, 3, 436, 1024) * 2 - 1
    tiles = len(tile_grid(436, 1024, model.config.image_size, 20))
    times: Dict[str, list] = {"batched": [], "single": []}
    with torch.inference_mode():
        model(frames[..., :24, :32])  # warm-up: kernels and allocator, cheap
        # Alternating rounds, the best of each kept: on a shared machine the load
        # changes over minutes, and alternating exposes both sides to it alike.
        for _ in range(rounds):
            start = time.perf_counter()
            batched = model.tiled(frames, batch_size=batch)
            times["batched"].append(time.perf_counter() - start)
            start = time.perf_counter()
            single = model.tiled(frames, batch_size=1)
            times["single"].append(time.perf_counter() - start)
    t_batched, t_single = min(times["batched"]), min(times["single"])
    return {
        "frame": [436, 1024],
        "tiles": tiles,
        "batch_size": batch,
        "rounds": rounds,
        "batched_s": t_batched,
        "one_tile_at_a_time_s": t_single,
        "all_times_s": times,
        "speedup": t_single / t_batched,
        "max_abs_diff_px": float((batched - single).abs().max()),
        "max_abs_flow_px": float(single.abs().max()),
    }


def bench_video(baseline_chunks: int) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = randomize(pt.build("video_autoencoding")).eval()
    c = model.config
    clips, t = 4, c.num_frames
    images = torch.rand(clips, t, 3, *c.image_size)
    audio = (torch.rand(clips, t * c.audio_samples_per_frame, 1) * 2 - 1) * 0.5
    chunks = model.chunk_subsamples(c.num_chunks)
    t_, h, w = model.image_dims
    t_ours = t_part = 0.0
    diff = 0.0
    measured = 0
    with torch.inference_mode():
        model.reconstruct(images[:1], audio[:1], num_chunks=c.num_chunks)  # warm-up
        for i in range(clips):
            start = time.perf_counter()
            ours = model.reconstruct(images[i : i + 1], audio[i : i + 1], num_chunks=c.num_chunks)
            t_ours += time.perf_counter() - start
            # Interleaved with the clips (the load of a shared machine drifts): the
            # colab's step for chunks of this clip, the whole encoder again each time.
            reference = ours["image"][0].permute(0, 2, 3, 1).reshape(t_ * h * w, 3)
            share = [k for k in range(baseline_chunks) if k % clips == i]
            for k in share:
                chunk = chunks[k * (c.num_chunks // max(baseline_chunks, 1))]
                start = time.perf_counter()
                out = model.decode(model.encode(images[i : i + 1], audio[i : i + 1]), chunk)
                t_part += time.perf_counter() - start
                diff = max(diff, float((out["image"][0] - reference[chunk["image"]]).abs().max()))
                measured += 1
    per_chunk = t_part / measured
    t_colab = per_chunk * c.num_chunks * clips
    return {
        "frames": clips * t,
        "clips": clips,
        "chunks_per_clip": c.num_chunks,
        "encode_once_s": t_ours,
        "colab_measured_chunks": measured,
        "colab_measured_s": t_part,
        "colab_per_chunk_s": per_chunk,
        "colab_extrapolated_s": t_colab,
        "speedup": t_colab / t_ours,
        "max_abs_diff_on_measured_chunks": diff,
    }


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--flow-batch", type=positive_int, default=3, help="tiles per model call")
    parser.add_argument("--baseline-chunks", type=positive_int, default=4)
    parser.add_argument("--flow-rounds", type=positive_int, default=2,
                        help="alternating batched/single rounds (best of each)")
    parser.add_argument("--skip-flow", action="store_true")
    parser.add_argument("--skip-video", action="store_true")
    parser.add_argument("--json", type=output_file, metavar="PATH",
                        help="write the report as JSON here")
    args = parser.parse_args(argv)
    report: Dict[str, Any] = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
    }
    if not args.skip_video:
        report["autoencode"] = v = bench_video(args.baseline_chunks)
        print(
            f"autoencode, {v['frames']} frames ({v['clips']} clips x {v['chunks_per_clip']} "
            f"chunks): encode once per clip {v['encode_once_s']:.1f} s; colab (encoder per "
            f"chunk) {v['colab_extrapolated_s']:.0f} s, extrapolated from "
            f"{v['colab_measured_chunks']} chunks "
            f"({v['colab_per_chunk_s']:.2f} s each): {v['speedup']:.0f}x",
            file=sys.stderr,
        )
    if not args.skip_flow:
        report["flow"] = f = bench_flow(args.flow_batch, args.flow_rounds)
        print(
            f"flow, 436x1024 pair ({f['tiles']} tiles): batched ({f['batch_size']} per call) "
            f"{f['batched_s']:.1f} s; one tile at a time {f['one_tile_at_a_time_s']:.1f} s: "
            f"{f['speedup']:.2f}x, best of {f['rounds']} alternating rounds (max diff "
            f"{f['max_abs_diff_px']:.1e} px on flows up to {f['max_abs_flow_px']:.3g} px)",
            file=sys.stderr,
        )
    print(f"cpu: {report['cpu']}, {report['threads']} threads, torch {report['torch']}",
          file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
