"""ONNX export of the six tiny models, checked with onnxruntime.

The 1e-4 bound is the issue's contract; the graph computes the same float32
operations as perceiver_torch in another order (no fast paths), so the observed
differences are float32 rounding (~1e-6), two orders of magnitude inside it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from converter.registry import MODEL_NAMES
from tests.helpers import assert_kept_the_other_runs_file, run_cli

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in MODEL_NAMES:
        fixture, converted = folder / f"{name}.pickle", folder / f"{name}.safetensors"
        assert run_cli("fixture", name, "-o", fixture, "--seed", "5").exit_code == 0
        assert run_cli("convert", fixture, "-o", converted, "-q").exit_code == 0
        graph = folder / f"{name}.onnx"
        result = run_cli("export", converted, "-o", graph, "--json")
        assert result.exit_code == 0, result.stderr
        out[name] = (converted, graph, json.loads(result.stdout))
    return out


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_matches_perceiver_torch(name, graphs) -> None:
    converted, graph, document = graphs[name]
    assert document["check"]["passed"] and document["check"]["max_rel_diff"] <= 1e-4
    assert document["check"]["batch"] == 2  # traced at batch 1: the batch is dynamic
    model = onnx.load(str(graph))
    onnx.checker.check_model(model)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    # Only standard ONNX operators: no oneDNN kernel or other custom op leaked in.
    assert {node.domain for node in model.graph.node} <= {""}
    props = {p.key: p.value for p in model.metadata_props}
    assert props["perceiver_convert.model"] == name
    assert json.loads(props["perceiver_convert.onnx_check"])["passed"] is True
    assert "perceiver_convert.source_sha256" in props
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"


def test_video_graph_takes_other_chunks(graphs) -> None:
    """The subsample indices are inputs: another chunk, of another length, decodes
    as perceiver_torch does."""
    import perceiver_torch

    converted, graph, _ = graphs["video_autoencoding"]
    model = perceiver_torch.load(converted)
    c = model.config
    gen = torch.Generator().manual_seed(11)
    images = torch.rand(3, c.num_frames, 3, *c.image_size, generator=gen)
    audio = torch.randn(3, c.num_frames * c.audio_samples_per_frame, generator=gen)
    chunk = model.chunk_subsamples(num_chunks=2)[1]  # twice the traced chunk's length
    with torch.no_grad():
        expected = model(images, audio, subsample=chunk)
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "audio": audio.numpy(),
                             "image_index": chunk["image"].numpy(),
                             "audio_index": chunk["audio"].numpy()})
    for key, value in zip(("image", "audio", "label"), got):
        reference = expected[key].numpy()
        assert value.shape == reference.shape
        assert np.abs(value - reference).max() <= 1e-4 * np.abs(reference).max()


@pytest.mark.parametrize("image_index,audio_index", [
    ([0, 1, 512], [0, 1]), ([-1, 1, 2], [0, 1]), ([0, 1, 2], [8, 1]), ([0, 1, 2], [0, -1]),
])
def test_video_graph_refuses_out_of_range_indices(graphs, image_index, audio_index) -> None:
    """The graph cannot raise perceiver_torch's InputError, but an index outside
    [0, n) (512 image points, 8 audio patches in the tiny model) must fail in
    onnxruntime's Gather rather than wrap around to another point (512 decoded
    point 0; -1 the last point)."""
    _, graph, _ = graphs["video_autoencoding"]
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feeds = {item.name: item for item in session.get_inputs()}
    images_shape = [1, *feeds["images"].shape[1:]]
    audio_shape = [1, *feeds["audio"].shape[1:]]
    inputs = {"images": np.random.default_rng(0).random(images_shape, dtype=np.float32),
              "audio": np.zeros(audio_shape, dtype=np.float32),
              "image_index": np.array(image_index, dtype=np.int64),
              "audio_index": np.array(audio_index, dtype=np.int64)}
    with pytest.raises(Exception, match="out of data bounds"):
        session.run(None, inputs)


def test_export_traces_the_plain_computation(graphs, monkeypatch, tmp_path) -> None:
    """The graph is traced with every fast path off (the oneDNN kernel is no ONNX
    operator; a folded attention's choice would be frozen for one input size), and
    they are on again afterwards."""
    from converter import onnx_export
    from perceiver_torch import fast_paths

    seen = []
    original = onnx_export.torch.onnx.export

    def spy(*args, **kwargs):
        seen.append(fast_paths.disabled_paths())
        return original(*args, **kwargs)

    monkeypatch.setattr(onnx_export.torch.onnx, "export", spy)
    out = tmp_path / "flow.onnx"
    result = run_cli("export", graphs["optical_flow"][0], "-o", out, "--format", "onnx")
    assert result.exit_code == 0, result.output
    assert seen and all(paths == frozenset(fast_paths.FastPath) for paths in seen)
    assert fast_paths.disabled_paths() == frozenset()


def test_onnx_export_keeps_a_file_that_appears_while_writing(graphs, monkeypatch, tmp_path) -> None:
    """Another run writes the same new name after the up-front check (both saw no
    file): without --force that file is kept, exit 2 with one line; --force replaces it."""
    out, other = tmp_path / "flow.onnx", b"the other run's graph"
    real = onnx.save

    def racing(graph, path, *args, **kwargs):
        real(graph, path, *args, **kwargs)
        out.write_bytes(other)  # just before the finished graph is put in place

    monkeypatch.setattr(onnx, "save", racing)
    result = run_cli("export", graphs["optical_flow"][0], "-o", out, "-q")
    assert_kept_the_other_runs_file(result, out, other)
    monkeypatch.setattr(onnx, "save", real)
    result = run_cli("export", graphs["optical_flow"][0], "-o", out, "-q", "--force")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(str(out)))
    assert [p.name for p in tmp_path.iterdir()] == ["flow.onnx"]


def test_onnx_export_fsyncs_the_graph_before_publishing(graphs, monkeypatch, tmp_path) -> None:
    """The graph is written by name (torch, onnx.save), so there is no handle to
    fsync; it is fsynced by name before the rename, as atomic_write's files are, or a
    crash could leave flow.onnx naming lost data."""
    import os
    import stat

    from converter import atomic

    synced, published = [], []
    real_fsync, real_publish = os.fsync, atomic.publish

    def fsync(fd):
        synced.append(os.fstat(fd))
        return real_fsync(fd)

    def publish(temp, path, **kwargs):
        published.append(len(synced))
        return real_publish(temp, path, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "publish", publish)
    out = tmp_path / "flow.onnx"
    result = run_cli("export", graphs["optical_flow"][0], "-o", out, "-q")
    assert result.exit_code == 0, result.output
    inode = out.stat().st_ino
    assert published, "the graph was not published through converter.atomic"
    before = synced[: published[0]]
    assert any(stat.S_ISREG(s.st_mode) and s.st_ino == inode for s in before), synced


def test_perceiver_torch_load_names_an_exported_graph(graphs) -> None:
    """perceiver_torch's own header check (it cannot import the converter's) knows
    the graphs export writes."""
    import perceiver_torch
    from converter.haiku_reader import looks_like_onnx

    for name, (_, graph, _) in graphs.items():
        assert looks_like_onnx(graph.read_bytes()[:16]), name
        with pytest.raises(perceiver_torch.LoadError, match="the file is an ONNX model"):
            perceiver_torch.load(graph)


def test_onnx_export_checks_its_output_and_batch_up_front(graphs, monkeypatch, tmp_path) -> None:
    """export_onnx in Python: a converted file named *.onnx (converted files are
    known by their bytes) was replaced by its own graph; an existing output with
    overwrite=False was refused only after the trace and the onnxruntime check, as
    one that "appeared while this output was being written"; batch=-1 was torch's
    "negative dimension"."""
    import shutil

    from converter.errors import OutputError, UsageError
    from converter.onnx_export import export_onnx

    def no_trace(*args, **kwargs):
        raise AssertionError("traced before the output was checked")

    monkeypatch.setattr(torch.onnx, "export", no_trace)
    converted = graphs["imagenet_conv"][0]
    named_onnx = tmp_path / "model.onnx"
    shutil.copy(converted, named_onnx)
    with pytest.raises(OutputError, match="it is the input"):
        export_onnx(named_onnx, named_onnx)
    assert named_onnx.read_bytes() == converted.read_bytes()
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"an older graph")
    with pytest.raises(OutputError, match="the file exists"):
        export_onnx(converted, existing, overwrite=False)
    assert existing.read_bytes() == b"an older graph"
    for batch in (0, -1, True, 1.5):
        with pytest.raises(UsageError, match="batch must be an integer >= 1"):
            export_onnx(converted, tmp_path / "new.onnx", batch=batch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "old.onnx"]



def test_inspect_marks_a_graph_with_nonfinite_weights(graphs, tmp_path) -> None:
    """inspect marks NaN/Inf weights and exits 3 for every kind of file it reads;
    an ONNX graph's initializers were only counted (exit 0)."""
    from onnx import numpy_helper

    model = onnx.load(str(graphs["imagenet_learned"][1]))
    index, init = next((i, t) for i, t in enumerate(model.graph.initializer)
                       if numpy_helper.to_array(t).dtype == np.float32
                       and numpy_helper.to_array(t).size > 1)
    array = numpy_helper.to_array(init).copy()
    array.flat[1] = np.nan
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    result = run_cli("inspect", broken, "--json")
    assert result.exit_code == 3
    document = json.loads(result.stdout)
    assert document["nonfinite_initializers"] == [init.name] and not document["ok"]
    clean = json.loads(run_cli("inspect", graphs["imagenet_learned"][1], "--json").stdout)
    assert clean["nonfinite_initializers"] == [] and "error" not in clean

def test_onnx_export_needs_an_onnx_name(graphs, tmp_path) -> None:
    result = run_cli("export", graphs["optical_flow"][0], "-o", tmp_path / "x.bin", "--format", "onnx")
    assert result.exit_code == 2 and "*.onnx" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_reduced_precision_file_exports_a_float32_graph(dtype, tmp_path) -> None:
    """A file converted with --dtype bfloat16/float16 exports a float32 graph of the
    same weight values, checked against perceiver_torch in float32: the 1e-4 contract
    is float32's (bfloat16's own rounding, u = 2^-8, would exceed it), and
    onnxruntime's CPU kernels lack bfloat16."""
    import perceiver_torch

    fixture, reduced = tmp_path / "conv.pickle", tmp_path / "conv.safetensors"
    assert run_cli("fixture", "imagenet_conv", "-o", fixture, "--seed", "6").exit_code == 0
    assert run_cli("convert", fixture, "-o", reduced, "--dtype", dtype, "-q").exit_code == 0
    graph = tmp_path / "conv.onnx"
    result = run_cli("export", reduced, "-o", graph, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["check"]["passed"]
    assert any(f"stored as {dtype}" in note for note in document["notes"])
    model = onnx.load(str(graph))
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT}
    # The provenance says the float32 weights hold the reduced dtype's values (it
    # named the official file alone, as if they were its values).
    props = {p.key: p.value for p in model.metadata_props}
    assert props["perceiver_convert.dtype"] == dtype
    # Other inputs than the export's check, against the stored values in float32.
    expected_model = perceiver_torch.load(reduced, dtype=torch.float32)
    images = torch.randn(3, 3, *expected_model.config.training_image_size,
                         generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = expected_model(images).numpy()
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy()})
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
