"""``scripts/count_flops.py``: the dispatcher-level FLOP count behind the README's
table of how much matrix-product work our inference does (the script itself runs the
official sizes; here, small products with FLOPs known by hand and tiny models)."""

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from test_torch_models import tiny, tiny_inputs  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def count_flops():
    saved = list(sys.path)
    sys.path.insert(0, str(SCRIPTS))  # it imports bench_forward, beside it
    try:
        spec = importlib.util.spec_from_file_location("count_flops", SCRIPTS / "count_flops.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_products_are_counted_by_their_multiply_adds(count_flops):
    x, w, b = torch.randn(4, 8), torch.randn(3, 8), torch.randn(3)
    left, right = torch.randn(2, 4, 8), torch.randn(8, 5)
    out = torch.zeros(4, 3)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 5)

    def call():
        F.linear(x, w, b)  # 4 x 8 x 3
        torch.matmul(left, right)  # 2 x 4 x 8 x 5
        out.addmm_(x, w.t())  # in place, 4 x 8 x 3: the video decoder's form
        F.scaled_dot_product_attention(q, k, v)  # 2 heads: 6 x 7 x 8, then 6 x 7 x 5

    expected = 2 * (4 * 8 * 3 + 2 * 4 * 8 * 5 + 4 * 8 * 3 + 2 * (6 * 7 * 8 + 6 * 7 * 5))
    with torch.no_grad():
        assert count_flops.count_dispatched_flops(call) == expected


def test_a_product_without_a_formula_stops_the_count(count_flops):
    # Under inference mode the dispatcher is handed aten.linear whole, whose products
    # the registry has no formula for: a silent count would be too low.
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"aten\.linear x1"):
        count_flops.count_dispatched_flops(lambda: F.linear(x, w))


@pytest.mark.parametrize("name", ["optical_flow", "video_autoencoding"])
def test_the_fast_paths_work_is_seen_and_the_plain_path_is_the_standard_algorithm(count_flops, name):
    """The plain path's count equals bench_forward's (torch's FlopCounterMode: the
    work); with the fast paths on, the folds do less, and the count sees it
    (FlopCounterMode's module hooks would switch them off)."""
    from perceiver_torch.fast_paths import FastPath, plain

    model, inputs = tiny(name), tiny_inputs(name, batch=1)
    bench = count_flops.bench
    with plain():
        work = bench.count_matmul_flops(bench.with_model(lambda _: model(*inputs), model))
    with torch.no_grad():
        with plain():
            standard = count_flops.count_dispatched_flops(lambda: model(*inputs))
        with plain(FastPath.ONEDNN_LINEAR, FastPath.ONEDNN_ATTENTION):
            ours = count_flops.count_dispatched_flops(lambda: model(*inputs))
    assert standard == work
    assert 0 < ours < standard
