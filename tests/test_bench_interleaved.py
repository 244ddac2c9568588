"""The throughput table of ``scripts/bench_interleaved.py --batch``: its arithmetic on a
made-up result (the script itself runs the official sizes, minutes a case)."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_interleaved", SCRIPTS / "bench_interleaved.py"
    )
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_variant_keys_name_batch_one_as_before(bench):
    # batch-1 keys are the JSON's keys of runs without --batch
    assert bench.variant_key("ours", "float32") == "ours/float32"
    assert bench.variant_key("hf", "bfloat16", 1) == "hf/bfloat16"
    assert bench.variant_key("ours", "bfloat16", 8) == "ours/bfloat16/batch8"


def test_throughput_rows_are_items_per_second_and_ratios_to_batch_one(bench):
    result = {
        "case": "imagenet_conv",
        # medians: 1 item in 0.5 s (2 items/s), 8 in 2 s (4 items/s), 32 in 32 s (1)
        "seconds": {"ours/float32": 0.5, "ours/float32/batch8": 2.0,
                    "ours/float32/batch32": 32.0},
        "best_seconds": {"ours/float32": 0.25, "ours/float32/batch8": 1.0,
                         "ours/float32/batch32": 16.0},
    }
    rows = bench.report_batches(result, ["ours", "hf"], ["float32", "bfloat16"], [1, 8, 32])
    # no row for variants that were not run (HF, bfloat16)
    assert rows == ["imagenet_conv | ours | float32 | 2 (4) | 4 (8) | 1 (2) | 2.00 / 0.50"]


def test_a_case_run_at_batch_one_only_has_no_throughput_row(bench):
    result = {"case": "video_clip", "seconds": {"ours/float32": 9.0},
              "best_seconds": {"ours/float32": 8.0}}
    assert bench.report_batches(result, ["ours"], ["float32"], [1, 8]) == []


def test_pack_weights_both_times_our_model_with_and_without_packed_copies(bench, monkeypatch):
    """--pack-weights both: one "ours" variant built as load() leaves it and one
    "ours+packed" built with pack_weights, timed in the same rounds; HF's never packed."""
    built = []

    def fake_build(impl):
        def build(case, options):
            built.append((impl, options.dtype, options.pack_weights))
            return lambda i: None
        return build

    monkeypatch.setattr(bench.bf, "build_ours", fake_build("ours"))
    monkeypatch.setattr(bench.bf, "build_hf", fake_build("hf"))
    monkeypatch.setattr(bench.bf, "import_transformers", lambda: None)
    monkeypatch.setattr(bench, "peak_probe", lambda dtype: lambda: 100.0)
    # main() sets the process's thread count (--threads): not for the tests after this one
    monkeypatch.setattr("torch.set_num_threads", lambda threads: None)
    assert bench.main(["--models", "language_perceiver", "--dtype", "float32",
                       "--pack-weights", "both", "--reps", "1", "--warmup", "0",
                       "--no-flops"]) == 0
    assert sorted(built) == [("hf", "float32", False), ("ours", "float32", False),
                             ("ours", "float32", True)]
    built.clear()
    # the bare flag (the README's older commands) packs the one "ours" variant
    bench.main(["--models", "language_perceiver", "--dtype", "float32", "--impl", "ours",
                "--pack-weights", "--reps", "1", "--warmup", "0", "--no-flops"])
    assert built == [("ours", "float32", True)]


def test_packing_rows_are_the_packed_time_over_the_plain_one(bench):
    result = {
        "case": "language_perceiver",
        "seconds": {"ours/float32": 0.5, "ours+packed/float32": 0.45, "hf/float32": 0.6,
                    "ours/bfloat16": 0.3},
        "best_seconds": {"ours/float32": 0.4, "ours+packed/float32": 0.38,
                         "hf/float32": 0.5, "ours/bfloat16": 0.25},
        "peak_gflops": {"float32": 100.0}, "best_peak_gflops": {"float32": 100.0},
        "work_flops": 30e9,
    }
    # bfloat16 has no packed variant here: no row
    assert bench.report_packing(result, ["float32", "bfloat16"]) == [
        "language_perceiver | float32 | 0.900 (0.950)"
    ]
    # the packed variant's rows compare it with HF, and say which variant they are
    [row] = bench.report(result, ["float32"], "median", bench.PACKED)
    assert row.startswith("language_perceiver | median (ours+packed) | float32 | 0.450 s")
    assert "**0.75**" in row and "67% / 50%" in row
    [plain] = bench.report(result, ["float32"], "median")
    assert "| median | float32 | 0.500 s" in plain and "**0.83**" in plain
