#!/usr/bin/env python
"""Forward-pass speed and memory of perceiver_torch against HuggingFace's Perceiver.

Both implementations are built with the official configurations and random weights
and measured in the same run, each (case, implementation) in a fresh subprocess,
alternating over ``--rounds`` pairs of processes (the median round counts):

- time: median of ``--repeat`` forward passes after ``--warmup`` untimed ones
  (``torch.inference_mode``, ``--threads`` threads, 2 by default); batch 1, float32 on
  the CPU unless ``--batch``, ``--dtype``, ``--device`` say otherwise (HF's models are
  cast and placed the same way); throughput is items/s = batch / median time;
- memory: extra peak resident memory of the *first* forward pass of the fresh process
  (peak RSS during it, from ``ru_maxrss`` and a 2 ms /proc sampler, minus the RSS just
  before it, after ``malloc_trim``); on CUDA, the device's peak allocated memory above
  what was allocated before it;
- ``--compile``: our model under ``torch.compile`` as a third variant, reported as
  compiled/eager time (its first call, and so its memory figure, includes compiling);
  ``--freeze`` compiles with inductor's weight freezing
  (``torch._inductor.config.freezing``: the weights folded in as constants, which
  lets inductor keep them in MKL's and oneDNN's packed layouts; later changes to the
  weights are not seen by the compiled model); ``--max-autotune`` lets inductor time
  its own generated matrix-product kernels (C++ ones on the CPU, AMX ones for
  bfloat16 on CPUs that have them; Triton ones on a GPU) against PyTorch's for every
  product shape and keep the faster (compiling takes minutes);
- work and peak: each worker counts the matrix-product FLOPs of one call with
  ``torch.utils.flop_counter``; the *work* of a case is HF's count (the standard
  algorithm; ours where HF is not run), so "% peak" says how fast each side does
  the same job. Each round also measures, in a fresh process, the matmul peak of each
  dtype: a 2048^3 product through ``torch.matmul`` and through oneDNN, the faster
  (on AMD EPYC MKL reaches half of oneDNN's float32 rate); the run's median counts;
- ``--dtype float32 bfloat16``: both dtypes in the same run, alternating, with
  "fp32/ours" = our float32 time over our time in the other dtype.

Cases: the six models (language: 2048 real tokens, the worst case; video: one of the
colab's 128 chunks), ``language_colab`` (the colab's sentence padded to 2048 with
mask 0, which perceiver_torch does not compute) and ``video_clip``, a
whole 16-frame clip: our ``reconstruct`` (encode once, 128 chunks) against HF's 128
calls. HF's 128 calls take minutes; by default they are *estimated* as 128 x the
median of ``--hf-clip-calls`` calls (labelled "estimate" in the table and the JSON);
``--hf-clip-full`` runs all 128.

``transformers`` is needed only for the HF side (``pip install transformers``);
without it, or with ``--impl ours``, only our side is measured.

Examples::

    python scripts/bench_forward.py --models language_perceiver --repeat 1
    python scripts/bench_forward.py --json bench.json            # everything
    python scripts/bench_forward.py --models video_clip --hf-clip-full
    python scripts/bench_forward.py --models imagenet_conv language_perceiver --batch 1 8 32
    python scripts/bench_forward.py --dtype float32 bfloat16 --models imagenet_conv
    python scripts/bench_forward.py --dtype bfloat16 --compile --device cuda
    python scripts/bench_forward.py --models language_perceiver --impl ours --compile --freeze
    python scripts/bench_forward.py --impl ours --dtype bfloat16 --compile --freeze --max-autotune

Timings on shared machines drift: compare the ratios of one run, on a quiet machine.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from proc_memory import current_rss, max_rss  # beside this script
from script_args import device, output_file, positive_int

# Run from a checkout: use its perceiver_torch (also in the worker subprocesses).
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "perceiver_torch" / "__init__.py").is_file():
    sys.path.insert(0, str(_ROOT))

MODEL_CASES = (
    "language_perceiver",
    "language_colab",
    "imagenet_learned",
    "imagenet_fourier",
    "imagenet_conv",
    "optical_flow",
    "video_autoencoding",
)
CASES = MODEL_CASES + ("video_clip",)
NUM_CHUNKS = 128
# Cases that run a model under another name (its other inputs or calls).
_CASE_MODEL = {"language_colab": "language_perceiver", "video_clip": "video_autoencoding"}


def model_of(case: str) -> str:
    """The registry name of the model a case runs."""
    return _CASE_MODEL.get(case, case)


# -- memory ------------------------------------------------------------------------


def trim_heap() -> None:
    """Returns freed heap memory to the OS so the baseline RSS is the live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakSampler:
    """Samples the RSS every ``interval`` seconds in a thread (torch releases the GIL
    in its kernels), to catch a peak below the process's earlier ru_maxrss."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def measure_first_call(fn: Callable[[], Any]) -> Tuple[float, int]:
    """Runs ``fn`` once; returns (seconds, extra peak RSS in bytes)."""
    import gc

    gc.collect()
    trim_heap()
    before = current_rss()
    lifetime_before = max_rss()
    with PeakSampler() as sampler:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    lifetime_after = max_rss()
    peak = sampler.peak
    if lifetime_after > lifetime_before:  # the call set a new lifetime peak: exact
        peak = max(peak, lifetime_after)
    return seconds, max(0, peak - before)


# -- the two implementations ------------------------------------------------------------


def official_inputs(case: str, seed: int = 0, batch: int = 1) -> Dict[str, Any]:
    """Random inputs at the official sizes, in PyTorch layouts; ``batch`` items
    (different random items; the colab's sentence repeated)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if case == "language_colab":
        # The colab's input: one sentence, 9 bytes masked, padded to 2048 (mask 0).
        from perceiver_torch import BytesTokenizer

        tokenizer = BytesTokenizer()
        text = "This is an incomplete sentence where some words are missing."
        ids, mask = tokenizer([text] * batch, length=2048)
        ids[:, 51:60] = tokenizer.MASK
        return {"ids": ids, "mask": mask}
    if case == "language_perceiver":
        return {
            "ids": torch.randint(6, 262, (batch, 2048), generator=gen),
            "mask": torch.ones(batch, 2048, dtype=torch.int64),
        }
    if case.startswith("imagenet"):
        return {"images": torch.randn(batch, 3, 224, 224, generator=gen)}
    if case == "optical_flow":
        # A batch of tiles: ``batch`` frame pairs of the training size.
        return {"frames": torch.rand(batch, 2, 3, 368, 496, generator=gen) * 2 - 1}
    return {
        "images": torch.rand(batch, 16, 3, 224, 224, generator=gen),
        "audio": torch.randn(batch, 30720, generator=gen),
    }


def place(x: Dict[str, Any], device: str, dtype: str) -> Dict[str, Any]:
    """Inputs on ``device``, floating-point ones in ``dtype``."""
    import torch

    out = {}
    for key, value in x.items():
        value = value.to(device)
        if value.is_floating_point():
            value = value.to(getattr(torch, dtype))
        out[key] = value
    return out


def colab_chunks() -> List[Dict[str, Any]]:
    """The colab's NUM_CHUNKS decoding chunks of the official video model: consecutive
    image points and audio patches (made once, outside the timed calls)."""
    import torch

    from perceiver_torch.configs import VideoAutoencodingConfig

    c = VideoAutoencodingConfig()
    points = c.num_frames * c.image_size[0] * c.image_size[1]
    patches = c.num_frames * c.audio_samples_per_frame // c.samples_per_patch
    image = torch.arange(points).tensor_split(NUM_CHUNKS)
    audio = torch.arange(patches).tensor_split(NUM_CHUNKS)
    return [{"image": i, "audio": a} for i, a in zip(image, audio)]


def build_ours(case: str, args: argparse.Namespace) -> Callable[[int], Any]:
    """Returns ``run(call_index)`` for our model (random weights, official config) on
    ``args.device`` in ``args.dtype``, batch ``args.batch``, compiled with
    ``torch.compile`` when ``args.compiled``."""
    import torch

    import perceiver_torch as pt

    torch.manual_seed(0)
    model = pt.build(model_of(case)).eval().to(device=args.device)
    model = model.to(getattr(torch, args.dtype))
    # As perceiver_torch.load does: the packed weights (bfloat16 by default, float32
    # too with --pack-weights) are made before the first call, outside its memory;
    # MKL's float32 copies (Intel CPUs with AVX-512) by the first call, inside it.
    if args.pack_weights:
        pt.pack_weights(model)
    else:
        pt.linear.prepack(model)
    x = place(official_inputs(case, batch=args.batch), args.device, args.dtype)
    if args.compiled:
        # The whole clip's reconstruct is a method, not forward: compile the model
        # all the same (its parts run through the compiled forward's graphs only
        # where called as modules).
        model = compile_model(model, args)
    return with_model(_ours_call(case, model, x, args), model)


def compile_model(model: Any, args: argparse.Namespace) -> Any:
    """``torch.compile(model)``, with inductor's weight freezing where ``--freeze`` and
    its kernel autotuning where ``--max-autotune``."""
    import torch
    import torch._inductor.config as inductor_config

    if getattr(args, "freeze", False):
        inductor_config.freezing = True
    if getattr(args, "max_autotune", False):
        inductor_config.max_autotune = True
        if torch.device(getattr(args, "device", "cpu")).type == "cpu":
            # Inductor's C++ templates against PyTorch's own kernels. Not on a GPU,
            # where this list (no TRITON) left inductor nothing to autotune: there
            # its own list stays (Triton templates against cuBLAS).
            inductor_config.max_autotune_gemm_backends = "CPP,ATEN"
    return torch.compile(model)


def with_model(run: Callable[[int], Any], model: Any) -> Callable[[int], Any]:
    """``run``, remembering the model it calls (to count its FLOPs)."""
    run.model = model  # type: ignore[attr-defined]
    return run


def _ours_call(case: str, model: Any, x: Dict[str, Any], args: argparse.Namespace):
    if case.startswith("language"):
        return lambda i: model(x["ids"], x["mask"])
    if case.startswith("imagenet"):
        return lambda i: model(x["images"])
    if case == "optical_flow":
        return lambda i: model(x["frames"])
    if case == "video_autoencoding":
        chunks = [
            {k: v.to(args.device) for k, v in chunk.items()} for chunk in colab_chunks()
        ]
        return lambda i: model(x["images"], x["audio"], chunks[i % NUM_CHUNKS])
    reconstruct = getattr(model, "_orig_mod", model).reconstruct
    return lambda i: reconstruct(x["images"], x["audio"], num_chunks=NUM_CHUNKS)


def hf_config(case: str) -> Tuple[str, Dict[str, Any]]:
    """HF class name and PerceiverConfig values of the official model a case runs.

    The sizes come from perceiver_torch's configs (whose defaults are the official
    values), so that both sides build the same network; ``d_model`` is HF's name for
    the width of its preprocessor's output, which it does not derive itself.
    """
    from perceiver_torch.configs import CONFIG_CLASSES

    name = model_of(case)
    c = CONFIG_CLASSES[name]()
    values: Dict[str, Any] = dict(
        num_latents=c.num_latents,
        d_latents=c.d_latents,
        num_self_attention_heads=c.num_self_attention_heads,
        num_cross_attention_heads=c.num_cross_attention_heads,
        attention_probs_dropout_prob=0.0,
    )
    if name.startswith("imagenet"):
        values.update(
            num_blocks=c.num_blocks,
            num_self_attends_per_block=c.num_self_attends_per_block,
            num_labels=c.num_classes,
        )
    else:
        values.update(num_blocks=1, num_self_attends_per_block=c.num_self_attends)
    if name == "language_perceiver":
        values.update(
            qk_channels=c.qk_channels,
            v_channels=c.d_latents if c.v_channels is None else c.v_channels,
        )
        return "PerceiverForMaskedLM", values
    if name == "imagenet_learned":
        values.update(d_model=512, image_size=c.image_size[0])
        return "PerceiverForImageClassificationLearned", values
    if name == "imagenet_fourier":
        return "PerceiverForImageClassificationFourier", dict(values, d_model=261)
    if name == "imagenet_conv":
        return "PerceiverForImageClassificationConvProcessing", dict(values, d_model=322)
    if name == "optical_flow":
        values.update(d_model=322, train_size=list(c.image_size))
        return "PerceiverForOpticalFlow", values
    values.update(
        d_model=704,
        num_labels=c.num_classes,
        # HF's image_size: the Fourier resolution of the 4x4-patch grid.
        image_size=c.image_size[0] // 4,
        output_shape=[1, c.num_frames, *c.image_size],
    )
    return "PerceiverForMultimodalAutoencoding", values


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit(
            "the HF side needs transformers: pip install transformers "
            "(or run with --impl ours)"
        ) from None
    return transformers


def flow_patches_for_hf(frames):
    """HF's optical-flow model takes the 3x3 patches (B, 2, 27, H, W) as input, like
    the colab's ``extract_patches``; built here, outside the timed call."""
    import torch.nn.functional as F

    b, f, c, h, w = frames.shape
    patches = F.unfold(frames.reshape(b * f, c, h, w), kernel_size=3, padding=1)
    return patches.reshape(b, f, c * 9, h, w)


def build_hf(case: str, args: argparse.Namespace) -> Callable[[int], Any]:
    """Returns ``run(call_index)`` for HuggingFace's model (random weights), cast and
    placed like ours."""
    import torch

    transformers = import_transformers()
    torch.manual_seed(0)
    cls_name, values = hf_config(case)
    model = getattr(transformers, cls_name)(
        transformers.PerceiverConfig(**values)
    ).eval()
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    x = place(official_inputs(case, batch=args.batch), args.device, args.dtype)
    if args.compiled:
        model = compile_model(model, args)
    return with_model(_hf_call(case, model, x, args), model)


def _hf_call(case: str, model: Any, x: Dict[str, Any], args: argparse.Namespace):
    import torch

    if case.startswith("language"):
        return lambda i: model(inputs=x["ids"], attention_mask=x["mask"])
    if case.startswith("imagenet"):
        return lambda i: model(inputs=x["images"])
    if case == "optical_flow":
        patches = flow_patches_for_hf(x["frames"])
        return lambda i: model(inputs=patches)
    inputs = {
        "image": x["images"],
        "audio": x["audio"][..., None],
        "label": torch.zeros(
            args.batch, 700, device=args.device, dtype=getattr(torch, args.dtype)
        ),
    }
    chunks = colab_chunks()
    return lambda i: model(
        inputs=inputs,
        subsampled_output_points=dict(chunks[i % NUM_CHUNKS], label=None),
    )


# -- the matmul peak and the work --------------------------------------------------------

PEAK_SIZE = 2048


def matmul_peak(dtype: str, device: str, repeat: int = 15) -> Dict[str, Any]:
    """GFLOP/s of a PEAK_SIZE^3 matmul in ``dtype``, the median of ``repeat`` calls,
    through each kernel PyTorch offers here: ``torch.matmul`` (MKL on CPUs, cuBLAS on
    GPUs) and, on CPUs, oneDNN's matmul. The peak is the faster of them: the
    hardware's limit as PyTorch reaches it (on AMD EPYC MKL gets half of it)."""
    import torch

    n = PEAK_SIZE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    kernels: Dict[str, Callable[[], Any]] = {"matmul": lambda: torch.matmul(a, b.t())}
    if device == "cpu":
        try:
            torch.ops.mkldnn._linear_pointwise(a[:2], b[:3], None, "none", [], "")
            kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(
                a, b, None, "none", [], ""
            )
        except (AttributeError, RuntimeError):
            pass
    rates = {}
    with torch.inference_mode():
        for name, fn in kernels.items():
            run = synchronized(lambda i, fn=fn: fn(), device)
            for i in range(3):
                run(i)
            seconds = statistics.median(timed_calls(run, repeat))
            rates[name] = round(2 * n**3 / seconds / 1e9, 1)
    return {"case": "matmul_peak", "dtype": dtype, "device": device,
            "gflops": max(rates.values()), "kernels": rates}


def count_matmul_flops(run: Callable[[int], Any]) -> int:
    """Multiply-add FLOPs (x2) of the matrix products of one ``run(0)``, counted by
    ``torch.utils.flop_counter`` (matmuls, convolutions, attention kernels). It runs
    with autograd on and the parameters frozen (the counter's module tracker needs
    it), so our ``Linear`` takes ``F.linear``. The CPU's fused attention kernel
    (``F.scaled_dot_product_attention``'s flash kernel, which our attentions run), for
    which the counter has no formula, is counted as its two products, as the counter
    counts the kernels of GPUs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def fused_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)  # shapes (B, H, N, C)

    custom = {}
    cpu_kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_kernel is not None:
        custom[cpu_kernel] = fused_attention
    model = getattr(run, "model")
    for p in model.parameters():
        p.requires_grad_(False)
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        run(0)
    return int(counter.get_total_flops())


# -- worker (one fresh process per case and implementation) ---------------------------


def synchronized(run: Callable[[int], Any], device: str) -> Callable[[int], Any]:
    """``run`` that waits for the device's queued work (GPU kernels are asynchronous),
    still naming the model ``run`` calls (``with_model``), for the FLOP count."""
    if not device.startswith("cuda"):
        return run
    import torch

    def call(i: int) -> Any:
        out = run(i)
        # This device's queue: without one torch waits for the current device
        # (cuda:0), not for --device cuda:1's kernels.
        torch.cuda.synchronize(device)
        return out

    if hasattr(run, "model"):
        call.model = run.model  # type: ignore[attr-defined]
    return call


def timed_calls(run: Callable[[int], Any], count: int) -> List[float]:
    """Seconds of each of ``run(0)``, ..., ``run(count - 1)``."""
    times = []
    for i in range(count):
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return times


def worker(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    if args.case == "matmul_peak":
        return matmul_peak(args.dtype, args.device)
    build = build_ours if args.impl == "ours" else build_hf
    start = time.perf_counter()
    run = synchronized(build(args.case, args), args.device)
    build_seconds = time.perf_counter() - start
    record: Dict[str, Any] = {
        "case": args.case,
        "impl": args.impl,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "batch": args.batch,
        "compiled": bool(args.compiled),
        "freezing": bool(args.compiled and args.freeze),
        "max_autotune": bool(args.compiled and args.max_autotune),
        "build_seconds": round(build_seconds, 3),
    }
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():
        # The first call of the fresh process gives the memory figure and is the first
        # warm-up pass (compiled: it includes the compilation, timed separately).
        if cuda:  # --device's counters (without a device: the current one's, cuda:0)
            torch.cuda.reset_peak_memory_stats(args.device)
            before = torch.cuda.memory_allocated(args.device)
        first_seconds, extra = measure_first_call(lambda: run(0))
        record["first_call_seconds"] = round(first_seconds, 4)
        record["extra_peak_mib"] = round(extra / 2**20, 1)
        if cuda:  # the device's memory, not the host's
            record["host_extra_peak_mib"] = record["extra_peak_mib"]
            extra = torch.cuda.max_memory_allocated(args.device) - before
            record["extra_peak_mib"] = round(extra / 2**20, 1)
        # A compiled model may compile again on its second call (dynamic shapes).
        warmup = max(args.warmup, 3) if args.compiled else args.warmup
        for i in range(warmup - 1):
            run(i + 1)
        if args.case == "video_clip" and args.impl == "hf":
            # HF decodes a clip with one call per chunk (re-encoding every time).
            calls = NUM_CHUNKS if args.hf_clip_full else args.hf_clip_calls
            times = timed_calls(run, calls)
            record["calls"] = calls
            record["estimate"] = not args.hf_clip_full
            record["seconds"] = (
                sum(times)
                if args.hf_clip_full
                else statistics.median(times) * NUM_CHUNKS
            )
        else:
            repeat = args.clip_repeat if args.case == "video_clip" else args.repeat
            times = timed_calls(run, repeat)
            record["estimate"] = False
            record["seconds"] = statistics.median(times)
        record["all_seconds"] = [round(t, 4) for t in times]
    record["items_per_second"] = args.batch / record["seconds"]
    if args.flops and not args.compiled:
        flops = count_matmul_flops(run)
        if args.case == "video_clip" and args.impl == "hf":
            flops *= NUM_CHUNKS  # one of its 128 calls was counted
        record["matmul_flops"] = flops
    return record


def run_worker(
    case: str,
    impl: str,
    args: argparse.Namespace,
    batch: int = 1,
    compiled: bool = False,
    dtype: str = "float32",
) -> Dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--case",
        case,
        "--impl",
        impl,
        "--device",
        args.device,
        "--dtype",
        dtype,
        "--batch",
        str(batch),
        "--repeat",
        str(args.repeat),
        "--clip-repeat",
        str(args.clip_repeat),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--hf-clip-calls",
        str(args.hf_clip_calls),
    ]
    if args.hf_clip_full:
        cmd.append("--hf-clip-full")
    if compiled:
        cmd.append("--compiled")
        if args.freeze:
            cmd.append("--freeze")
        if args.max_autotune:
            cmd.append("--max-autotune")
    if not args.flops:
        cmd.append("--no-flops")
    if args.pack_weights:
        cmd.append("--pack-weights")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {
            "case": case,
            "impl": impl,
            "batch": batch,
            "compiled": compiled,
            "dtype": dtype,
            "error": "\n".join(tail),
        }
    return json.loads(lines[-1])


def median_round(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The round with the median time, keeping every round's time and memory."""
    good = [r for r in records if "error" not in r]
    if not good:
        return records[-1]
    ordered = sorted(good, key=lambda r: r["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["rounds"] = [
        {"seconds": r["seconds"], "extra_peak_mib": r["extra_peak_mib"]} for r in good
    ]
    chosen["extra_peak_mib"] = statistics.median(r["extra_peak_mib"] for r in good)
    return chosen


# -- report ---------------------------------------------------------------------


def fmt_seconds(record: Optional[Dict[str, Any]]) -> str:
    if record is None:
        return "-"
    if "error" in record:
        return "error"
    text = f"{record['seconds']:.3f} s"
    if record.get("estimate"):
        text += f" (est. {record['calls']} calls x {NUM_CHUNKS})"
    return text


def fmt_mem(record: Optional[Dict[str, Any]]) -> str:
    if record is None or "error" in record:
        return "-"
    return f"{record['extra_peak_mib']:.0f} MiB"


def ratio(
    a: Optional[Dict[str, Any]], b: Optional[Dict[str, Any]], key: str
) -> Optional[float]:
    if not a or not b or "error" in a or "error" in b or not b.get(key):
        return None
    return a[key] / b[key]


def _rate(record: Optional[Dict[str, Any]]) -> str:
    if record is None or "error" in record:
        return "-"
    return f"{record['items_per_second']:.3g}"


def efficiency(
    record: Optional[Dict[str, Any]], work: Optional[int], peak: Optional[float]
) -> Optional[float]:
    """Fraction of the matmul peak: ``work`` FLOPs in the record's time."""
    if not record or "error" in record or not work or not peak:
        return None
    return work / record["seconds"] / 1e9 / peak


def work_of(by: Dict[tuple, Dict[str, Any]], case: str, batch: int, dtype: str) -> Optional[int]:
    """The work of (case, batch): HF's matmul FLOPs, from this dtype's HF run or
    another dtype's (the count does not depend on it: HF's video model fails in
    bfloat16); ours where HF ran in none."""
    for impl in ("hf", "ours"):
        others = [d for d in {key[4] for key in by} if d != dtype]
        for d in [dtype] + sorted(others):
            record = by.get((case, impl, batch, False, d))
            if record and record.get("matmul_flops"):
                return record["matmul_flops"]
    return None


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(
    results: List[Dict[str, Any]],
    cases: List[str],
    batches: Dict[str, List[int]],
    dtypes: List[str],
    peaks: Dict[str, Optional[float]],
) -> List[Dict[str, Any]]:
    """One row per (case, dtype, batch): times, items/s, the work (the matmul FLOPs
    of HF's forward, the standard algorithm; ours where HF was not run) as a share
    of the same run's matmul peak for the dtype, memory, ours/HF, ours against our
    float32 (when float32 was run too) and, when measured, compiled/eager."""
    by = {
        (r["case"], r["impl"], r.get("batch", 1), r.get("compiled", False), r.get("dtype", "float32")): r
        for r in results
    }
    compiled_any = any(r.get("compiled") for r in results)
    several = len(dtypes) > 1
    rows, summary = [], []
    header = (
        "case", "dtype", "batch", "ours", "HF", "time ours/HF", "items/s ours",
        "work GFLOP", "ours % peak", "HF % peak", "extra mem ours", "extra mem HF",
        "mem ours/HF",
    ) + (("fp32/ours",) if several else ()) + (
        ("ours compiled", "compiled/eager") if compiled_any else ()
    )
    for case in cases:
        for dtype in dtypes:
            for batch in batches[case]:
                key = (case, "ours", batch, False, dtype)
                ours, hf = by.get(key), by.get((case, "hf", batch, False, dtype))
                comp = by.get((case, "ours", batch, True, dtype))
                fp32 = by.get((case, "ours", batch, False, "float32"))
                work = work_of(by, case, batch, dtype)
                t_ratio = ratio(ours, hf, "seconds")
                m_ratio = ratio(ours, hf, "extra_peak_mib")
                c_ratio = ratio(comp, ours, "seconds")
                speedup = ratio(fp32, ours, "seconds") if dtype != "float32" else None
                ours_eff = efficiency(ours, work, peaks.get(dtype))
                hf_eff = efficiency(hf, work, peaks.get(dtype))
                row = (
                    case, dtype, str(batch), fmt_seconds(ours), fmt_seconds(hf),
                    (
                        "-" if t_ratio is None
                        else f"{t_ratio:.3f}" + (" (est.)" if hf and hf.get("estimate") else "")
                    ),
                    _rate(ours),
                    "-" if not work else f"{work / 1e9:.1f}",
                    _pct(ours_eff), _pct(hf_eff), fmt_mem(ours), fmt_mem(hf),
                    _num(m_ratio),
                ) + ((_num(speedup, 2),) if several else ())
                if compiled_any:
                    row += (fmt_seconds(comp), _num(c_ratio))
                rows.append(row)
                summary.append(
                    {
                        "case": case,
                        "dtype": dtype,
                        "batch": batch,
                        "time_ratio": t_ratio,
                        "time_ratio_is_estimate": bool(hf and hf.get("estimate")),
                        "memory_ratio": m_ratio,
                        "items_per_second": None if not ours or "error" in ours else ours["items_per_second"],
                        "work_flops": work,
                        "ours_share_of_peak": ours_eff,
                        "hf_share_of_peak": hf_eff,
                        "speedup_over_float32": speedup,
                        "compiled_over_eager": c_ratio,
                    }
                )
    for dtype in dtypes:
        if peaks.get(dtype):
            print(f"matmul peak, {dtype}, {PEAK_SIZE}^3: {peaks[dtype]:.0f} GFLOP/s "
                  "(median over the run's rounds, best kernel)")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    for r in results:
        if "error" in r:
            print(f"\n{r['case']} / {r['impl']} failed:\n{r['error']}", file=sys.stderr)
    return summary


def environment() -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        with open("/proc/cpuinfo") as f:
            names = [
                l.split(":", 1)[1].strip() for l in f if l.startswith("model name")
            ]
        info["cpu"] = names[0] if names else None
    except OSError:
        pass
    from perceiver_torch import linear

    # What decides our CPU kernels (perceiver_torch.linear.onednn_*_preferred).
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["cpu_vendor"] = linear._cpu_vendor()
    info["onednn_linear_float32"] = linear.onednn_linear_preferred(torch.float32)
    info["onednn_attention_float32"] = linear.onednn_attention_preferred(torch.float32)
    info["onednn_attention_bfloat16"] = linear.onednn_attention_preferred(torch.bfloat16)
    info["native_bfloat16_matmul"] = linear.cpu_has_matmul_instructions(torch.bfloat16)
    return info


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=CASES,
        default=list(CASES),
        metavar="CASE",
        help=f"cases to run (default all): {', '.join(CASES)}",
    )
    p.add_argument("--impl", choices=("both", "ours", "hf"), default="both")
    p.add_argument(
        "--repeat", type=positive_int, default=5, help="timed forward passes (median)"
    )
    p.add_argument(
        "--warmup",
        type=positive_int,
        default=1,
        help="untimed passes first, at least 1 (the first, in a fresh "
        "process, gives the memory figure)",
    )
    p.add_argument(
        "--clip-repeat",
        type=positive_int,
        default=1,
        help="timed reconstructions of the whole clip (ours)",
    )
    p.add_argument(
        "--hf-clip-calls",
        type=positive_int,
        default=3,
        help="HF calls timed to estimate its 128 calls for video_clip",
    )
    p.add_argument(
        "--hf-clip-full",
        action="store_true",
        help="run all 128 HF calls for video_clip instead of estimating",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="alternating (ours, HF) process pairs per case; the median round counts",
    )
    p.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads")
    p.add_argument(
        "--device", type=device, default="cpu",
        help="where the models and inputs are: cpu, cuda, ..."
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        nargs="+",
        default=["float32"],
        help="dtypes (e.g. float32 bfloat16: same run, alternating); both "
        "implementations are cast to each (HF's models with .to(dtype))",
    )
    p.add_argument(
        "--pack-weights",
        action="store_true",
        help="our models with perceiver_torch.pack_weights: float32 weights packed "
        "too (MKL's layout on Intel CPUs with AVX-512, made by the first call; oneDNN's "
        "elsewhere; bfloat16 ones are by default where the CPU has bfloat16 "
        "instructions): faster, for as much memory again as the weights",
    )
    p.add_argument(
        "--no-peak",
        dest="peak",
        action="store_false",
        help="skip measuring the matmul peak (a fresh process per round and dtype)",
    )
    p.add_argument(
        "--no-flops",
        dest="flops",
        action="store_false",
        help="skip counting the matmul FLOPs (one more call per worker)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        nargs="+",
        default=[1],
        help="batch sizes (e.g. 1 8 32): images, sequences, flow tiles or clips per "
        "call; items/s = batch / median time (video_clip: always 1)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile(model) of ours (default inductor backend) and "
        "report compiled/eager; its first call (and memory figure) includes compiling",
    )
    p.add_argument(
        "--freeze",
        action="store_true",
        help="with --compile: inductor's weight freezing (torch._inductor.config."
        "freezing; the weights become constants of the compiled model)",
    )
    p.add_argument(
        "--max-autotune",
        action="store_true",
        help="with --compile: inductor's max-autotune (torch._inductor.config."
        "max_autotune, its C++ matmul templates, on a GPU its Triton ones, timed "
        "against PyTorch's kernels per product shape; compiling takes minutes)",
    )
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", type=output_file, metavar="PATH",
                   help="write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=CASES + ("matmul_peak",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.freeze or args.max_autotune) and not (args.compile or args.compiled):
        p.error("--freeze and --max-autotune apply to the compiled variant: add --compile")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    args.warmup = max(1, args.warmup)
    if args.worker:
        args.batch = args.batch[0]  # one batch size per worker process
        args.dtype = args.dtype[0]  # one dtype too
        print(json.dumps(worker(args)), flush=True)
        return 0
    impls = ["ours", "hf"] if args.impl == "both" else [args.impl]
    if "hf" in impls:
        try:
            import_transformers()
        except SystemExit:
            print(
                "transformers is not installed: measuring perceiver_torch only "
                "(pip install transformers for the comparison)",
                file=sys.stderr,
            )
            impls = ["ours"]
    cases = [c for c in CASES if c in args.models]
    dtypes = list(dict.fromkeys(args.dtype))
    batches = {c: [1] if c == "video_clip" else list(args.batch) for c in cases}
    variants = [
        (impl, False, dtype) for dtype in dtypes for impl in impls
    ] + ([("ours", True, dtype) for dtype in dtypes] if args.compile else [])
    if args.device == "cpu":
        env = environment()
        def kernel(onednn: bool) -> str:
            return "oneDNN" if onednn else "PyTorch's (MKL)"

        print(
            f"[cpu] {env.get('cpu')}, {env['cpu_capability']}; our float32 linear layers "
            f"on {kernel(env['onednn_linear_float32'])}, attentions on "
            f"{kernel(env['onednn_attention_float32'])} (bfloat16: "
            f"{kernel(env['onednn_attention_bfloat16'])}); bfloat16 matmuls "
            + ("native" if env["native_bfloat16_matmul"] else "emulated (slow)"),
            file=sys.stderr,
            flush=True,
        )
    results: List[Dict[str, Any]] = []
    peak_records: Dict[str, List[Dict[str, Any]]] = {d: [] for d in dtypes}
    for case in cases:
        for batch in batches[case]:
            # Alternate the variants over --rounds fresh processes each, so slow drift
            # of the machine's speed affects them alike; keep the median round. Each
            # round measures the matmul peak too (the machine's speed of that moment).
            rounds: Dict[tuple, List[Dict[str, Any]]] = {v: [] for v in variants}
            count = 1 if case == "video_clip" else args.rounds
            for number in range(count):
                if args.peak:
                    for dtype in dtypes:
                        record = run_worker("matmul_peak", "ours", args, 1, False, dtype)
                        print(f"[matmul peak / {dtype}] {record.get('gflops', 'error')} GFLOP/s",
                              file=sys.stderr, flush=True)
                        peak_records[dtype].append(record)
                for impl, compiled, dtype in variants:
                    label = (
                        f"[{case} / {impl}{' compiled' if compiled else ''} / {dtype} / "
                        f"batch {batch}]" + (f" round {number + 1}" if count > 1 else "")
                    )
                    print(f"{label} ...", file=sys.stderr, flush=True)
                    record = run_worker(case, impl, args, batch, compiled, dtype)
                    print(
                        f"    {fmt_seconds(record)}, extra peak {fmt_mem(record)}",
                        file=sys.stderr,
                        flush=True,
                    )
                    rounds[(impl, compiled, dtype)].append(record)
            for variant in variants:
                results.append(median_round(rounds[variant]))
    peaks: Dict[str, Optional[float]] = {}
    for dtype, records in peak_records.items():
        good = [r["gflops"] for r in records if "gflops" in r]
        peaks[dtype] = statistics.median(good) if good else None
    summary = print_table(results, cases, batches, dtypes, peaks)
    if args.json:
        payload = {
            "environment": environment(),
            "settings": {
                "repeat": args.repeat,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "threads": args.threads,
                "clip_repeat": args.clip_repeat,
                "hf_clip_calls": (
                    NUM_CHUNKS if args.hf_clip_full else args.hf_clip_calls
                ),
                "device": args.device,
                "dtype": dtypes,
                "batch": list(args.batch),
                "compile": bool(args.compile),
                "pack_weights": bool(args.pack_weights),
            },
            "matmul_peak_gflops": peaks,
            "matmul_peak_rounds": peak_records,
            "results": results,
            "ratios": summary,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
