"""One model shared by several threads (a web server's), and processes forked after a
model was used (DataLoader workers).

Outputs are compared bit for bit with the same calls made one at a time: the same
kernels on the same inputs, with one intra-op thread (``one_intra_op_thread``), do
the same operations in the same order, so any difference is another thread's state
leaking into a call.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import OrderedDict
from typing import Callable, Iterator, List, Sequence

import pytest
import torch

from perceiver_torch.position_encoding import FourierPositionEncoding
from test_torch_models import tiny


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch's intra-op threads set to one, and Python's thread switch made frequent
    (interleavings that a loaded server sees now and then, here in every run)."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)


def run_threads(work: Callable[[int], None], count: int = 4) -> List[BaseException]:
    """Runs ``work(k)`` for k < count in as many threads; the exceptions they raised."""
    errors: List[BaseException] = []

    def guarded(k: int) -> None:
        try:
            work(k)
        except BaseException as error:  # noqa: B902 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def same_as_alone(
    model: torch.nn.Module, inputs: Sequence[tuple], calls: int, threads: int = 4
) -> None:
    """``threads`` threads call ``model`` ``calls`` times each, thread k on
    ``inputs[(i + k) % len(inputs)]`` at its call i: every output must equal the
    output of the same input computed alone, and no call may fail."""
    with one_intra_op_thread(), torch.no_grad():
        expected = [model(*args) for args in inputs]
        wrong: List[int] = []

        def work(k: int) -> None:
            with torch.no_grad():
                for i in range(calls):
                    j = (i + k) % len(inputs)
                    if not torch.equal(model(*inputs[j]), expected[j]):
                        wrong.append(j)

        errors = run_threads(work, threads)
    assert not errors, errors
    assert not wrong, f"outputs differ from the same inputs computed alone: {wrong}"


# -- position-encoding caches ------------------------------------------------------


class _EvictedAfterLookup(OrderedDict):
    """A cache that another thread empties right after each lookup: the interleaving
    in which a second thread evicts the entry this one has just found."""

    def get(self, key, default=None):
        value = super().get(key, default)
        self.clear()
        return value


def test_fourier_cache_entry_evicted_by_another_thread_after_its_lookup():
    enc = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8), cache_size=2)
    alone = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8), cache_size=2)
    enc._cache, enc._table_cache = _EvictedAfterLookup(), _EvictedAfterLookup()
    for _ in range(2):  # the second call finds the entry, which is then evicted
        assert torch.equal(enc.grid((3, 4)), alone.grid((3, 4)))
        points = torch.arange(5)
        assert torch.equal(
            enc.subsampled(points, (3, 4)), alone.subsampled(points, (3, 4))
        )


def test_imagenet_fourier_shared_by_threads_with_different_image_sizes():
    """Each image size has its own Fourier grid, two of them cached: with more sizes
    in flight, threads evicted each other's entries between a lookup and its
    move_to_end, and the model raised KeyError((H, W), 'cpu', torch.float32)."""
    model = tiny("imagenet_fourier")
    gen = torch.Generator().manual_seed(1)
    sizes = [(4, 4), (4, 5), (5, 4), (5, 5), (6, 4), (4, 6), (6, 5), (5, 6)]
    inputs = [(torch.randn(1, 3, h, w, generator=gen),) for h, w in sizes]
    same_as_alone(model, inputs, calls=200)


def _scaled_tables(kind: str, size: int, num_bands: int, resolution: int):
    """Axis tables unlike the module's own (positions doubled): a block's override
    is visible in every feature it reaches."""
    from perceiver_torch.position_encoding import (
        axis_table,
        grid_positions,
        subsampled_positions,
    )

    positions = grid_positions(size) if kind == "grid" else subsampled_positions(size)
    return axis_table(2 * positions, num_bands=num_bands, resolution=resolution)


def test_axis_table_override_is_the_opening_threads_alone():
    """converter.verify's last pass of the video model runs inside
    ``axis_tables_from(jax_axis_table)``. The override was process-wide: a model run
    by another thread meanwhile (another verify's own pass, a pipeline) computed with
    the reference's tables, a thread that found it set and then read it again after
    the block closed called None (TypeError), and two blocks closing out of order
    left it set for the rest of the process (every later verify measured the
    injected tables, not the model). Blocks open here A, B, close A, B; thread C
    computes while both are open; afterwards nothing is overridden."""
    from perceiver_torch.position_encoding import axis_tables_from

    alone = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8))
    expected = alone.grid((3, 4)).clone()
    points = torch.arange(7)
    expected_points = alone.subsampled(points, (3, 4)).clone()
    with axis_tables_from(_scaled_tables):
        overridden = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8))
        scaled = overridden.grid((3, 4)).clone()
    assert not torch.equal(scaled, expected)

    a_open, b_open, c_done, a_closed = (threading.Event() for _ in range(4))
    seen = {}

    def block(name: str, opened: threading.Event, close_after: threading.Event,
              closed=None) -> None:
        with axis_tables_from(_scaled_tables):
            opened.set()
            assert close_after.wait(10)
            enc = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8))
            seen[name] = enc.grid((3, 4)).clone()
        if closed is not None:
            closed.set()

    def other() -> None:
        assert a_open.wait(10) and b_open.wait(10)
        enc = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8))
        seen["other"] = enc.grid((3, 4)).clone()
        seen["other_points"] = enc.subsampled(points, (3, 4)).clone()
        c_done.set()

    def work(k: int) -> None:
        if k == 0:
            block("a", a_open, c_done, a_closed)
        elif k == 1:
            assert a_open.wait(10)
            block("b", b_open, a_closed)
        else:
            other()

    errors = run_threads(work, 3)
    assert not errors, errors
    assert torch.equal(seen["a"], scaled) and torch.equal(seen["b"], scaled)
    assert torch.equal(seen["other"], expected), "another thread's block reached this one"
    assert torch.equal(seen["other_points"], expected_points)
    after = FourierPositionEncoding(num_bands=4, max_resolution=(8, 8))
    assert torch.equal(after.grid((3, 4)), expected), "an override outlived its blocks"
    assert torch.equal(after.subsampled(points, (3, 4)), expected_points)


# -- pipelines ---------------------------------------------------------------------


def test_classify_pipelines_share_a_model_left_in_training_mode():
    """build() gives a model in training mode; the pipelines run it in eval mode. With
    threads, the first call to finish put training mode back while others ran: their
    BatchNorm used batch statistics (wrong answers) and updated its running
    statistics, which changed every later answer; the model ended in eval mode."""
    pytest.importorskip("PIL.Image")
    pytest.importorskip("cv2")
    from perceiver_torch.pipelines import ClassifyPipeline

    model = tiny("imagenet_conv").train()
    pipeline = ClassifyPipeline(model, resize=False)
    gen = torch.Generator().manual_seed(2)
    images = [torch.rand(3, 32, 32, generator=gen) for _ in range(4)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with one_intra_op_thread():
        expected = [pipeline(image).logits for image in images]
        wrong: List[int] = []

        def work(k: int) -> None:
            for i in range(100):
                j = (i + k) % len(images)
                if not torch.equal(pipeline(images[j]).logits, expected[j]):
                    wrong.append(j)

        errors = run_threads(work)
    assert not errors, errors
    assert not wrong, f"outputs differ from the same images classified alone: {wrong}"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(module.training for module in model.modules())


def test_threads_reading_images_and_weight_files_leave_warnings_as_they_were(tmp_path):
    """Reading an image file (its Pillow warnings made notes) and a torch weight file
    (torch's warnings silenced) each open a catch_warnings block, which saves the
    process's warning filters and handler and puts them back: threads' blocks closing
    out of order left an "ignore every warning" filter or a finished block's recorder
    in place, and every later warning of the process was lost."""
    import warnings

    Image = pytest.importorskip("PIL.Image")
    pytest.importorskip("cv2")
    import numpy as np

    from perceiver_torch.pipelines import ClassifyPipeline
    from perceiver_torch.registry import torch_load_weights

    pipeline = ClassifyPipeline(tiny("imagenet_fourier"))
    images = []
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.jpg")
        images.append(tmp_path / f"{i}.jpg")
    weights = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(3.0)}, weights)
    handler, filters = warnings._showwarnmsg_impl, list(warnings.filters)

    def work(k: int) -> None:
        for i in range(60):
            if k % 2:
                pipeline.preprocess(images[i % 2], [])
            else:
                assert torch.equal(torch_load_weights(weights)["w"], torch.arange(3.0))

    with one_intra_op_thread():
        errors = run_threads(work)
    assert not errors, errors
    assert warnings._showwarnmsg_impl is handler
    assert warnings.filters == filters


def test_hf_weights_file_mode_found_without_changing_the_umask(tmp_path, monkeypatch):
    """export --format hf gives model.safetensors (which safetensors creates 0600) the
    permissions open() gives, and read the umask by setting it to 0 and back: for
    that instant every file another thread of the process created (a service's
    uploads, another conversion's output) was group- and world-writable. The umask
    is now never changed; the mode is still the umask's."""
    import os

    import numpy as np

    from converter.hf import _write_safetensors

    real_umask = os.umask
    current = real_umask(0o027)
    set_to: List[int] = []

    def spy(mask: int) -> int:
        previous = real_umask(mask)
        if mask != previous:
            set_to.append(mask)
        return previous

    monkeypatch.setattr(os, "umask", spy)
    try:
        out = tmp_path / "model.safetensors"
        _write_safetensors(out, {"w": np.arange(3, dtype=np.float32)}, {"format": "pt"})
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        real_umask(current)
    assert not set_to, f"the process umask was set to {[oct(m) for m in set_to]}"
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "plain"]
