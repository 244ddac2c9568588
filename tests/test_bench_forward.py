"""``scripts/bench_forward.py``'s compile options: what reaches the worker processes
and inductor's configuration (the script itself runs the official sizes, minutes a
case; compiled models are tested in test_devices)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def bench():
    saved = list(sys.path)
    sys.path.insert(0, str(SCRIPTS))  # its helper module proc_memory lies beside it
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_forward", SCRIPTS / "bench_forward.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.mark.parametrize("option", ["--freeze", "--max-autotune"])
def test_compile_options_without_compile_are_refused(bench, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args([option])
    assert exit_info.value.code == 2
    assert "add --compile" in capsys.readouterr().err


def test_compile_options_reach_the_compiled_worker_only(bench, monkeypatch):
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout='{"case": "x"}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    args = bench.parse_args(["--compile", "--freeze", "--max-autotune"])
    bench.run_worker("imagenet_conv", "ours", args, compiled=False)
    bench.run_worker("imagenet_conv", "ours", args, compiled=True)
    eager, compiled = commands
    assert not {"--compiled", "--freeze", "--max-autotune"} & set(eager)
    assert {"--compiled", "--freeze", "--max-autotune"} <= set(compiled)
    # the worker accepts what it is given
    worker_args = bench.parse_args(compiled[2:])
    assert worker_args.compiled and worker_args.freeze and worker_args.max_autotune


def test_compile_model_sets_inductor_options(bench):
    torch = pytest.importorskip("torch")
    import torch._inductor.config as inductor_config

    args = bench.parse_args(["--compile", "--freeze", "--max-autotune"])
    with inductor_config.patch(
        freezing=False, max_autotune=False, max_autotune_gemm_backends="ATEN"
    ):
        bench.compile_model(torch.nn.Linear(2, 2), args)  # compiles at its first call
        assert inductor_config.freezing and inductor_config.max_autotune
        assert inductor_config.max_autotune_gemm_backends == "CPP,ATEN"


def test_flops_are_counted_through_the_cuda_synchronising_wrapper(bench, monkeypatch):
    """On CUDA the worker wraps each model's call in ``synchronized``; the FLOP
    counter finds the model through that wrapper (it raised AttributeError, so every
    CUDA worker failed unless --no-flops)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    run = bench.synchronized(bench.with_model(lambda i: layer(x), layer), "cuda")
    assert run.model is layer
    assert bench.count_matmul_flops(run) == 2 * 3 * 6 * 5


@pytest.mark.parametrize("d_v", [8, 4])  # 8: the fused kernel; 4: torch's math path
def test_flops_count_the_cpu_fused_attention_kernel(bench, d_v):
    """Our models' attentions run ``F.scaled_dot_product_attention``, which on the CPU
    is ``aten._scaled_dot_product_flash_attention_for_cpu``: torch's counter has no
    formula for it, so the work of a case run without HF (--impl ours) left the
    attentions' products out. Counted by hand: a projection and the two products of
    the attention (2 b h q k d_qk + 2 b h q k d_v)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    b, h, q, k, d_qk = 2, 3, 5, 7, 8
    torch.manual_seed(0)
    proj = torch.nn.Linear(d_qk, d_qk)
    query = torch.randn(b, h, q, d_qk)
    key, value = torch.randn(b, h, k, d_qk), torch.randn(b, h, k, d_v)

    def call(i):
        return F.scaled_dot_product_attention(proj(query), key, value)

    expected = 2 * (b * h * q) * d_qk * d_qk + 2 * b * h * q * k * d_qk + 2 * b * h * q * k * d_v
    assert bench.count_matmul_flops(bench.with_model(call, proj)) == expected


def test_synchronized_waits_for_the_device_the_model_runs_on(bench, monkeypatch):
    """``--device cuda:1``: ``torch.cuda.synchronize()`` without a device waits for the
    current device (cuda:0), not for the one whose kernels were queued, so each timed
    call measured only their launch."""
    torch = pytest.importorskip("torch")
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    run = bench.synchronized(lambda i: i, "cuda:1")
    assert run(7) == 7
    assert [None if d is None else str(torch.device(d)) for d in waited] == ["cuda:1"]


def test_worker_reads_the_memory_of_the_device_the_model_runs_on(bench, monkeypatch):
    """The CUDA memory figure (peak allocated during the first call) is read from
    ``--device``'s allocator: without a device torch's counters are the current
    device's (cuda:0), which a model on cuda:1 leaves untouched."""
    torch = pytest.importorskip("torch")
    asked = []

    def counter(name, value=0):
        def read(device=None):
            asked.append((name, None if device is None else str(torch.device(device))))
            return value
        return read

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", counter("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", counter("allocated", 100))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", counter("peak", 100 + 2**20))
    monkeypatch.setattr(bench, "build_ours", lambda case, args: (lambda i: None))
    args = bench.parse_args(
        ["--worker", "--case", "imagenet_conv", "--impl", "ours", "--no-flops",
         "--repeat", "1", "--warmup", "1", "--threads", str(torch.get_num_threads())]
    )
    args.batch, args.dtype, args.device = 1, "float32", "cuda:1"
    record = bench.worker(args)
    assert set(asked) == {("reset", "cuda:1"), ("allocated", "cuda:1"), ("peak", "cuda:1")}
    assert record["extra_peak_mib"] == 1.0


def test_max_autotune_on_a_gpu_keeps_inductor_s_gpu_kernels(bench):
    """``--device cuda --compile --max-autotune``: the CPU's backend list ("CPP,ATEN")
    has no TRITON, so on a GPU inductor had nothing to autotune against PyTorch's
    own products; there inductor's own list stays."""
    torch = pytest.importorskip("torch")
    import torch._inductor.config as inductor_config

    args = bench.parse_args(["--compile", "--max-autotune"])
    args.device = "cuda"
    with inductor_config.patch(max_autotune=False, max_autotune_gemm_backends="ATEN,TRITON"):
        bench.compile_model(torch.nn.Linear(2, 2), args)
        assert inductor_config.max_autotune
        assert "TRITON" in inductor_config.max_autotune_gemm_backends.upper().split(",")
