"""``perceiver-convert run``: fill-mask and classify end to end through the CLI (model
from a converted file and from an official checkpoint), the documents it prints and
writes, every error path with its exit code and the promise that a failed run leaves
no file, the progress bars, the registry contract, and the lazy imports.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import perceiver_torch as pt
from converter.conversion import convert
from converter.run_cli import Staging, progress_bar
from perceiver_torch.pipelines import TASKS, InputError
from tests.conftest import golden_checkpoint_path
from tests.helpers import run_cli

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("cv2")

SENTENCE = "This is an incomplete sentence where some words are missing."
MARKED = "This is an incomplete sentence where some words are[MASK*9]"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Converted tiny models (from the golden official-format checkpoints)."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("language_perceiver", "imagenet_conv", "imagenet_learned"):
        out[name] = folder / f"{name}.safetensors"
        convert(golden_checkpoint_path(name), out[name])
    return out


@pytest.fixture
def images(tmp_path) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 50), (33, 60)]):
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def leftovers(folder: Path) -> list:
    """Temporary files a run may have left (there must be none)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------
# fill-mask


def test_fill_mask_json(models):
    result = run_cli("run", "fill-mask", models["language_perceiver"], MARKED,
                     "--json", "--top-k", "3")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)  # stdout holds the JSON document only
    assert document["task"] == "fill-mask" and document["model"] == "language_perceiver"
    (entry,) = document["results"]
    assert entry["input"] == MARKED
    assert [m["position"] for m in entry["masked"]] == list(range(51, 60))
    for masked in entry["masked"]:
        assert len(masked["top_k"]) == 3
        for candidate in masked["top_k"]:
            assert set(candidate) == {"byte", "value", "index", "probability"}
            assert candidate["index"] == candidate["value"] + 6
        probabilities = [c["probability"] for c in masked["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True)
    # The human summary is on stderr.
    assert "filled:" in result.stderr and "filled:" not in result.stdout


def test_fill_mask_matches_the_pipeline_and_the_official_checkpoint(models, tmp_path):
    from perceiver_torch.pipelines import FillMaskPipeline

    expected = FillMaskPipeline(pt.load(models["language_perceiver"]))(MARKED).as_dict()
    converted = run_cli("run", "fill-mask", models["language_perceiver"], MARKED, "--json")
    as_pt = tmp_path / "language.pt"
    convert(golden_checkpoint_path("language_perceiver"), as_pt)
    from_pt = run_cli("run", "fill-mask", as_pt, MARKED, "--json")
    assert from_pt.exit_code == 0, from_pt.stderr
    assert json.loads(from_pt.stdout)["results"] == [expected]
    # An official checkpoint is converted in memory first: the same answer.
    official = run_cli("run", "fill-mask", golden_checkpoint_path("language_perceiver"),
                       MARKED, "--json")
    assert converted.exit_code == official.exit_code == 0, official.stderr
    assert json.loads(converted.stdout)["results"] == [expected]
    assert json.loads(official.stdout)["results"] == [expected]
    assert "converted in memory" in official.stderr


def test_fill_mask_span_file_and_stdin(models, tmp_path):
    text_file = tmp_path / "sentence.txt"
    text_file.write_text(SENTENCE, encoding="utf-8")
    by_span = run_cli("run", "fill-mask", models["language_perceiver"], SENTENCE,
                      "--span", "51:60", "--json")
    by_file = run_cli("run", "fill-mask", models["language_perceiver"], f"@{text_file}",
                      "--span", "51:60", "--json")
    from click.testing import CliRunner

    from converter.cli import main

    by_stdin = CliRunner().invoke(
        main, ["run", "fill-mask", str(models["language_perceiver"]), "-", "--span",
               "51:60", "--json"], input=SENTENCE, catch_exceptions=False)
    marked = run_cli("run", "fill-mask", models["language_perceiver"], MARKED, "--json")
    for result in (by_span, by_file, by_stdin):
        assert result.exit_code == 0, result.stderr
        (entry,) = json.loads(result.stdout)["results"]
        assert [m["original"] for m in entry["masked"]] == list(" missing.")
        # The same prediction as the marker form (the masked bytes are mask ids).
        (reference,) = json.loads(marked.stdout)["results"]
        assert [m["top_k"] for m in entry["masked"]] == [
            m["top_k"] for m in reference["masked"]
        ]


def test_fill_mask_outputs(models, tmp_path):
    model = models["language_perceiver"]
    out = tmp_path / "fill.json"
    assert run_cli("run", "fill-mask", model, MARKED, "-o", out, "-q").exit_code == 0
    # -o OUT holds the --json document (run --help), not a bare list of results.
    document = json.loads(out.read_text())
    assert document == json.loads(run_cli("run", "fill-mask", model, MARKED, "--json").stdout)
    assert (document["task"], document["model"], document["dtype"]) == (
        "fill-mask", "language_perceiver", "float32"
    )
    assert [m["position"] for m in document["results"][0]["masked"]] == list(range(51, 60))
    npz = tmp_path / "fill.npz"
    result = run_cli("run", "fill-mask", model, MARKED, "ab[MASK]", "--npz", "-o", npz)
    assert result.exit_code == 0, result.stderr
    with np.load(npz) as arrays:
        assert arrays["logits_0"].shape == (9, 262) and arrays["logits_1"].shape == (1, 262)
        assert arrays["positions_1"].tolist() == [2]
    npy = tmp_path / "fill.npy"
    assert run_cli("run", "fill-mask", model, MARKED, "--npy", "-o", npy).exit_code == 0
    assert np.load(npy).shape == (1, 9, 262)
    # Different mask counts do not stack: exit 2, nothing written.
    bad = tmp_path / "bad.npy"
    result = run_cli("run", "fill-mask", model, MARKED, "ab[MASK]", "--npy", "-o", bad)
    assert result.exit_code == 2 and "--npz" in result.stderr and not bad.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["no marker here"], 3, "nothing to fill"),
        (["x" * 64 + "[MASK]"], 3, "at most 64 bytes"),
        (["x" * 5000 + "[MASK]"], 3, "at most 64 bytes"),  # no valid file name either
        # Refused before 10**20 placeholder bytes are made (was an OverflowError).
        (["ab[MASK*99999999999999999999]"], 3, "at most 64 bytes"),
        ([SENTENCE, "--span", "51-60"], 2, "START:END"),
        ([SENTENCE, "--span", "51:99"], 3, "inside"),
        (["@/no/such/file.txt"], 3, "cannot read the text file"),
        ([MARKED, "--native-size"], 2, "--native-size is an option of classify"),
    ],
)
def test_fill_mask_errors(models, tmp_path, args, code, message):
    out = tmp_path / "out.json"
    result = run_cli("run", "fill-mask", models["language_perceiver"], *args, "-o", out)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------
# classify


def test_classify_json_and_arrays(models, images, tmp_path):
    from perceiver_torch.pipelines import ClassifyPipeline

    model = models["imagenet_conv"]
    result = run_cli("run", "classify", model, *images, "--json", "--top-k", "3")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["task"] == "classify" and document["model"] == "imagenet_conv"
    expected = ClassifyPipeline(pt.load(model))([str(p) for p in images], top_k=3)
    assert document["results"] == [r.as_dict() for r in expected]
    for entry in document["results"]:
        assert [set(e) for e in entry["top_k"]] == [{"label", "index", "probability"}] * 3
    assert "1. class" in result.stderr
    npy = tmp_path / "logits.npy"
    assert run_cli("run", "classify", model, *images, "--npy", "-o", npy, "-q").exit_code == 0
    logits = np.load(npy)
    assert logits.shape == (2, 10)
    assert np.array_equal(logits, torch.stack([r.logits for r in expected]).numpy())
    npz = tmp_path / "logits.npz"
    assert run_cli("run", "classify", model, *images, "--npz", "-o", npz).exit_code == 0
    with np.load(npz) as arrays:
        assert np.array_equal(arrays["logits"], logits)
        assert arrays["inputs"].tolist() == [str(p) for p in images]
    out = tmp_path / "labels.json"
    assert run_cli("run", "classify", model, *images, "-o", out, "--top-k", "3").exit_code == 0
    assert json.loads(out.read_text()) == document  # the --json document
    # The file says what the model computed in.
    out_bf16 = tmp_path / "labels_bf16.json"
    result = run_cli("run", "classify", model, *images, "-o", out_bf16, "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    assert json.loads(out_bf16.read_text())["dtype"] == "bfloat16"


def test_classify_quiet_and_native_size(models, images):
    quiet = run_cli("run", "classify", models["imagenet_conv"], images[0], "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    native = run_cli("run", "classify", models["imagenet_conv"], *images, "--native-size",
                     "--json")
    assert native.exit_code == 0, native.stderr
    resized = run_cli("run", "classify", models["imagenet_conv"], *images, "--json")
    assert json.loads(native.stdout) != json.loads(resized.stdout)
    refused = run_cli("run", "classify", models["imagenet_learned"], *images, "--native-size")
    assert refused.exit_code == 2 and "learned position encoding" in refused.stderr


def test_classify_errors(models, images, tmp_path):
    out = tmp_path / "out.json"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((1, 40, 3), dtype=np.uint8)).save(small)
    cases = [
        # An unreadable image after a good one: exit 3, nothing written.
        ([images[0], broken], 3, f"cannot read {broken}"),
        ([tmp_path / "missing.png"], 3, "no such image"),
        ([small], 3, "too small"),
    ]
    for inputs, code, message in cases:
        result = run_cli("run", "classify", models["imagenet_conv"], *inputs, "-o", out)
        assert result.exit_code == code, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not out.exists() and leftovers(tmp_path) == []


def test_wrong_model_for_the_task(models, images, tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("run", "classify", models["language_perceiver"], images[0], "-o", out)
    assert result.exit_code == 2
    assert "language_perceiver" in result.stderr and "run fill-mask" in result.stderr
    assert not out.exists()
    result = run_cli("run", "fill-mask", models["imagenet_conv"], MARKED)
    assert result.exit_code == 2 and "run classify" in result.stderr
    assert "is an imagenet_conv model" in result.stderr  # it read "a imagenet_conv"
    result = run_cli("run", "classify", models["language_perceiver"], images[0])
    assert "needs an imagenet_learned or" in result.stderr
    # A folder as -o: the hint named checkpoint.pickle, export's file.
    (tmp_path / "folder").mkdir()
    result = run_cli("run", "classify", models["imagenet_conv"], images[0], "-o",
                     tmp_path / "folder")
    assert result.exit_code == 2 and "it is a folder" in result.stderr
    assert "checkpoint.pickle" not in result.stderr and "NAME" in result.stderr


def test_a_wrong_converted_model_is_named_before_the_inputs_and_outputs(
    models, images, tmp_path, monkeypatch
):
    """`run flow LANGUAGE.safetensors A B` whose default output (beside A) existed was
    told "exists, use --force", and only once that file was gone that the model was
    the wrong one (likewise a missing INPUT, or classify's existing -o). The model
    name in the file's header is read first; the model is not loaded for it."""
    import converter.run_cli
    from perceiver_torch.pipelines.base import RunOptions

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(converter.run_cli, "load_any_model", no_load)
    language = models["language_perceiver"]
    # flow's default output, beside the first frame
    existing = TASKS["flow"].planned_outputs([str(p) for p in images], RunOptions())[0]
    assert existing.parent == images[0].parent
    existing.write_bytes(b"an earlier run's flow")
    runs = [
        ("flow", [*images]),
        ("flow", [images[0], tmp_path / "missing.png"]),
        ("classify", [images[0], "-o", existing]),
    ]
    for task, rest in runs:
        result = run_cli("run", task, language, *rest)
        assert result.exit_code == 2, result.stderr
        assert f"{language} is a language_perceiver model" in result.stderr, result.stderr
        assert "run it with: run fill-mask" in result.stderr
        assert existing.read_bytes() == b"an earlier run's flow"
        assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------
# usage and model errors shared by every task


def test_usage_errors(models, images, tmp_path):
    model = models["imagenet_conv"]
    cases = [
        (["--npy", "--npz", "-o", tmp_path / "x.npy"], "not both"),
        (["--npy"], "-o OUT.npy"),
        (["--npz", "-o", tmp_path / "x.npy"], "ending in .npz"),
        (["-o", tmp_path / "missing" / "out.json"], "does not exist"),
        (["-o", images[0]], "it is the input"),
        (["-o", tmp_path / "out.png"], "writes a JSON document (the one --json prints), not .png"),
        # -o of an array format without its flag wrote JSON that np.load cannot read.
        (["-o", tmp_path / "logits.npy"], "add --npy for the raw arrays"),
        (["-o", tmp_path / "logits.NPZ"], "add --npz for the raw arrays"),
        (["-o", tmp_path / "out.safetensors"], "name it *.json"),
        (["--span", "1:2"], "--span is an option of fill-mask"),
        (["--top-k", "0"], "--top-k"),
    ]
    text_file = tmp_path / "text.txt"
    text_file.write_text(MARKED)
    result = run_cli("run", "fill-mask", models["language_perceiver"], f"@{text_file}",
                     "-o", text_file)
    assert result.exit_code == 2 and "it is the input" in result.stderr
    assert text_file.read_text() == MARKED
    result = run_cli("run", "fill-mask", models["language_perceiver"], MARKED,
                     "-o", tmp_path / "logits.npz")
    assert result.exit_code == 2 and "add --npz" in result.stderr
    for name in ("out.json", "out.txt", "out"):  # JSON, or a name of no other format
        result = run_cli("run", "classify", model, images[0], "-o", tmp_path / name)
        assert result.exit_code == 0, (name, result.stderr)
        assert json.loads((tmp_path / name).read_text())["task"] == "classify"
    before = images[0].read_bytes()
    for extra, message in cases:
        result = run_cli("run", "classify", model, *images, *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
    assert images[0].read_bytes() == before  # an input is never overwritten
    assert run_cli("run", "no-such-task", model, images[0]).exit_code == 2
    assert run_cli("run", "classify", model).exit_code == 2  # no INPUT
    assert run_cli("run", "classify", tmp_path / "none.safetensors", images[0]).exit_code == 2
    assert leftovers(tmp_path) == []


def test_unreadable_models(tmp_path, images):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(16))
    random_bytes = tmp_path / "random.pickle"
    random_bytes.write_bytes(np.random.default_rng(1).bytes(300))
    from safetensors.torch import save_file

    no_metadata = tmp_path / "bare.safetensors"
    save_file({"w": torch.ones(2)}, str(no_metadata))
    zeros = tmp_path / "zeros.safetensors"  # no pickle either (not 0x80 first)
    zeros.write_bytes(bytes(100))
    for path in (junk, random_bytes, no_metadata, zeros):
        result = run_cli("run", "classify", path, images[0])
        assert result.exit_code == 3, (path, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    # Named as a converted model and no pickle: not the checkpoint reader's advice to
    # download the official file again, but what a converted model is.
    result = run_cli("run", "classify", zeros, images[0])
    assert "neither a safetensors file nor a torch.save file" in result.stderr
    assert "download" not in result.stderr and "pickle opcode" not in result.stderr
    # An official checkpoint keeps being read by its content, whatever its name.
    renamed = tmp_path / "official.pt"
    renamed.write_bytes(golden_checkpoint_path("imagenet_conv").read_bytes())
    result = run_cli("run", "classify", renamed, images[0])
    assert result.exit_code == 0 and "converted in memory from official.pt" in result.stderr


def test_unavailable_task(models, images, monkeypatch):
    spec = dataclasses.replace(TASKS["classify"], runner=".not_installed:run_task")
    monkeypatch.setitem(TASKS, "classify", spec)
    result = run_cli("run", "classify", models["imagenet_conv"], images[0])
    assert result.exit_code == 2 and "not available" in result.stderr


def _failing_runner(error: BaseException):
    def runner(pipeline, inputs, options):
        with options.open_output(options.output) as handle:
            handle.write(b"half of the results")
        raise error

    return runner


@pytest.mark.parametrize(
    "error,code",
    [(KeyboardInterrupt(), 130), (ValueError("boom"), 3)],
)
def test_a_failed_run_leaves_no_file(models, images, tmp_path, monkeypatch, error, code):
    import perceiver_torch.pipelines.image as image_module

    monkeypatch.setattr(image_module, "run_task", _failing_runner(error))
    out = tmp_path / "out.json"
    result = run_cli("run", "classify", models["imagenet_conv"], images[0], "-o", out)
    # An unforeseen error is one line too (ConverterGroup), never a traceback.
    assert result.exit_code == code and "Traceback" not in result.stderr
    # Every failure's line starts "error:", an interruption's too (it did not).
    expected = "error: interrupted; nothing was written" if code == 130 else "error: boom"
    assert result.stderr.strip().splitlines()[-1] == expected
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "error,code",
    [
        (KeyboardInterrupt(), 130),
        (InputError("bad frame"), 3),
    ],
)
def test_a_failed_run_with_json_prints_one_error_document(
    models, images, tmp_path, monkeypatch, error, code
):
    # The pipeline's own errors and an interrupt end the run in run_cli, not in
    # ConverterGroup: with --json they too are one error document on stdout.
    import perceiver_torch.pipelines.image as image_module

    monkeypatch.setattr(image_module, "run_task", _failing_runner(error))
    out = tmp_path / "out.json"
    result = run_cli("run", "classify", models["imagenet_conv"], images[0], "-o", out,
                     "--json")
    assert result.exit_code == code and "Traceback" not in result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == code
    assert document["error"]["type"] == type(error).__name__
    assert not out.exists() and leftovers(tmp_path) == []


def test_pipeline_errors_with_json(models, tmp_path):
    small = tmp_path / "px1.png"
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(small)
    bad_npy = tmp_path / "bad.npy"
    cases = [
        (["classify", models["imagenet_conv"], small], 3, "too small"),
        (["fill-mask", models["language_perceiver"], "no mask"], 3, "nothing to fill"),
        # A PipelineError with exit code 2: mask counts that do not stack for --npy.
        (["fill-mask", models["language_perceiver"], MARKED, "ab[MASK]", "--npy", "-o",
          bad_npy], 2, "--npz"),
    ]
    for args, code, message in cases:
        result = run_cli("run", *args, "--json", "-q")
        assert result.exit_code == code, result.stderr
        document = json.loads(result.stdout)  # one document, nothing else on stdout
        assert document["ok"] is False and document["exit_code"] == code, document
        assert message in document["error"]["message"]
        assert result.stderr.strip() == f"error: {document['error']['message']}"
    assert not bad_npy.exists() and leftovers(tmp_path) == []


def test_input_error_after_a_staged_file(models, images, tmp_path, monkeypatch):
    import perceiver_torch.pipelines.image as image_module
    from perceiver_torch.pipelines import InputError

    monkeypatch.setattr(image_module, "run_task", _failing_runner(InputError("bad frame")))
    out = tmp_path / "out.json"
    result = run_cli("run", "classify", models["imagenet_conv"], images[0], "-o", out)
    assert result.exit_code == 3 and result.stderr.strip().endswith("error: bad frame")
    assert not out.exists() and leftovers(tmp_path) == []


def test_staging_commits_all_or_nothing(tmp_path):
    staging = Staging(protected=[tmp_path / "input.png"])
    with staging.open_output(tmp_path / "a.bin") as handle:
        handle.write(b"a")
    with staging.output_path(tmp_path / "b.mp4") as temp:
        assert temp.suffix == ".mp4" and temp.parent == tmp_path
        temp.write_bytes(b"b")
    assert not (tmp_path / "a.bin").exists() and not (tmp_path / "b.mp4").exists()
    assert staging.commit() == [tmp_path / "a.bin", tmp_path / "b.mp4"]
    assert (tmp_path / "a.bin").read_bytes() == b"a" and (tmp_path / "b.mp4").read_bytes() == b"b"
    other = Staging(protected=[tmp_path / "a.bin"])
    from converter.errors import ConverterError

    with pytest.raises(ConverterError, match="it is the input"):
        with other.open_output(tmp_path / "a.bin"):
            pass
    with other.open_output(tmp_path / "c.bin") as handle:
        handle.write(b"c")
    with pytest.raises(ConverterError, match="twice"):
        with other.output_path(tmp_path / "c.bin"):
            pass
    other.discard()
    assert not (tmp_path / "c.bin").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------
# progress, help, registry, imports


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal():
    terminal = _Terminal()
    assert list(progress_bar(False, terminal)(iter(range(5)), 5, "tiles")) == list(range(5))
    assert "tiles" in terminal.getvalue()
    for quiet, stream in ((True, _Terminal()), (False, io.StringIO())):
        assert list(progress_bar(quiet, stream)(iter(range(5)), 5, "tiles")) == list(range(5))
        assert stream.getvalue() == ""


def test_help_lists_every_task():
    result = run_cli("run", "--help")
    assert result.exit_code == 0
    for name, spec in TASKS.items():
        assert name in result.stdout
        for option in spec.options:
            assert option.flag in result.stdout


def test_help_describes_the_documents(models, images):
    # Every key of fill-mask's and classify's result entries, at each level, is named
    # in run --help (fill-mask's top_k sits under "masked", per masked byte).
    help_text = run_cli("run", "--help").stdout
    fill = run_cli("run", "fill-mask", models["language_perceiver"], SENTENCE,
                   "--span", "51:53", "--json")
    (entry,) = json.loads(fill.stdout)["results"]
    classify = run_cli("run", "classify", models["imagenet_conv"], images[0], "--json")
    (labels,) = json.loads(classify.stdout)["results"]
    keys = set(entry) | set(entry["masked"][0]) | set(entry["masked"][0]["top_k"][0])
    keys |= set(labels) | set(labels["top_k"][0])
    assert keys >= {"masked", "position", "original", "byte", "value", "label"}
    for key in sorted(keys):
        assert f'"{key}"' in help_text, key
    assert '"masked": [per masked byte: "position"' in " ".join(help_text.split())


def test_registry_entries_resolve():
    from perceiver_torch.pipelines.base import import_attribute

    for name in ("fill-mask", "classify"):
        spec = TASKS[name]
        assert spec.available()
        for reference in (spec.pipeline, spec.runner, spec.demo):
            assert callable(import_attribute(reference))
    assert set(TASKS) >= {"fill-mask", "classify", "flow", "autoencode"}


def test_demo_runs_the_text_and_image_tasks(tmp_path):
    from converter.run_cli import format_task_demos, run_task_demos

    rows = {row["task"]: row for row in run_task_demos(tmp_path)}
    for task in ("fill-mask", "classify"):
        assert rows[task]["error"] is None and rows[task]["answer"], rows[task]
    assert rows["classify"]["model"] == "imagenet_learned"
    assert "answers are noise" in format_task_demos(list(rows.values()))
    assert (tmp_path / "classify" / "picture.png").is_file()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_imports_need_no_media_libraries():
    # Media libraries made unimportable: the packages and `run --help` still work, and
    # classify says which extra to install (exit 2).
    image = str(Path(__file__).parent / "data" / "golden" / "imagenet_conv" / "checkpoint.pickle")
    code = f"""
import sys
for name in ("PIL", "PIL.Image", "cv2", "av"):
    sys.modules[name] = None
import perceiver_torch, perceiver_torch.pipelines, converter.cli
from click.testing import CliRunner
runner = CliRunner()
assert runner.invoke(converter.cli.main, ["run", "--help"]).exit_code == 0
result = runner.invoke(converter.cli.main, ["run", "classify", {image!r}, {image!r}])
assert result.exit_code == 2, result.output
assert "perceiver-convert[media]" in result.stderr, result.stderr
assert "reading" not in result.stderr  # refused before the checkpoint is read
print("ok")
"""
    completed = _python(code)
    assert completed.stdout.strip() == "ok", completed.stderr


def test_cli_import_does_not_import_torch():
    completed = _python("import sys, converter.cli; print('torch' in sys.modules)")
    assert completed.stdout.strip() == "False", completed.stderr


def test_demo_command_shows_the_tasks(monkeypatch):
    """The demo's wiring: model rows, then the task table; a failed task exits 3."""
    import converter.demo
    import converter.run_cli

    model_row = {"model": "imagenet_conv", "size": "tiny", "params": 1, "convert_seconds": 0.1,
                 "relative": None, "argmax": None, "parity": "skipped", "round_trip": "-",
                 "error": None}
    monkeypatch.setattr(converter.demo, "run_demo", lambda names, **kw: [dict(model_row)])
    task_rows = [{"task": "classify", "model": "imagenet_learned", "input": "picture.png",
                  "answer": "class 3 (0.21)", "error": None}]
    monkeypatch.setattr(converter.run_cli, "run_task_demos", lambda folder, **kw: task_rows)
    result = run_cli("demo", "--models", "imagenet_conv", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"models": [model_row], "tasks": task_rows}
    assert "answers are noise" in result.stderr and "class 3 (0.21)" in result.stderr
    no_tasks = run_cli("demo", "--models", "imagenet_conv", "--no-tasks", "--json")
    assert json.loads(no_tasks.stdout)["tasks"] == []
    task_rows[0]["error"] = "the picture could not be made"
    failed = run_cli("demo", "--models", "imagenet_conv")
    # Without --json the tables are the result: stdout.
    assert failed.exit_code == 3 and "ERROR: the picture could not be made" in failed.stdout


# --------------------------------------------------------------------------------------
# --dtype


def test_run_dtype_computes_in_that_dtype(models, images, tmp_path):
    """--dtype bfloat16 gives the answers of the pipeline on the model loaded in
    bfloat16, from a converted file and from an official checkpoint alike (both round
    the same float32 weights); a bfloat16 file runs in bfloat16 unless told otherwise."""
    from perceiver_torch.pipelines import ClassifyPipeline

    model = models["imagenet_conv"]
    in_bfloat16 = pt.load(model, dtype="bfloat16")
    assert next(in_bfloat16.parameters()).dtype == torch.bfloat16
    expected = ClassifyPipeline(in_bfloat16)([str(p) for p in images])
    in_float32 = ClassifyPipeline(pt.load(model))([str(p) for p in images])
    assert [r.as_dict() for r in expected] != [r.as_dict() for r in in_float32]
    bf16_file = tmp_path / "conv_bf16.safetensors"
    convert(golden_checkpoint_path("imagenet_conv"), bf16_file, dtype="bfloat16")
    official = golden_checkpoint_path("imagenet_conv")
    runs = {
        "file --dtype": run_cli("run", "classify", model, *images, "--dtype", "bfloat16", "--json"),
        "official --dtype": run_cli("run", "classify", official, *images, "--dtype", "bfloat16",
                                    "--json"),
        "bfloat16 file": run_cli("run", "classify", bf16_file, *images, "--json"),
    }
    for how, result in runs.items():
        assert result.exit_code == 0, (how, result.stderr)
        document = json.loads(result.stdout)
        assert document["dtype"] == "bfloat16", how
        assert document["results"] == [r.as_dict() for r in expected], how
        assert ", bfloat16)" in result.stderr, how
    back = run_cli("run", "classify", bf16_file, *images, "--dtype", "float32", "--json")
    assert back.exit_code == 0, back.stderr
    assert json.loads(back.stdout)["dtype"] == "float32"
    plain = run_cli("run", "classify", model, *images, "--json")
    assert json.loads(plain.stdout)["dtype"] == "float32"
    assert json.loads(plain.stdout)["results"] == [r.as_dict() for r in in_float32]


def test_run_dtype_notes_a_cpu_without_its_matrix_instructions(models, images, monkeypatch):
    import perceiver_torch.linear as linear

    args = ("run", "classify", models["imagenet_conv"], images[0], "--dtype", "bfloat16")
    monkeypatch.setattr(linear, "cpu_has_matmul_instructions", lambda dtype: True)
    native = run_cli(*args)
    assert native.exit_code == 0 and "note:" not in native.stderr
    monkeypatch.setattr(
        linear, "cpu_has_matmul_instructions", lambda dtype: dtype == torch.float32
    )
    emulated = run_cli(*args)
    assert emulated.exit_code == 0, emulated.stderr
    assert "no bfloat16 matrix instructions (AVX512-BF16 or AMX)" in emulated.stderr
    assert "pass --dtype float32 to run in float32" in emulated.stderr
    assert "note:" not in run_cli("run", "classify", models["imagenet_conv"], images[0]).stderr
    assert run_cli(*args, "-q").stderr == ""  # quiet: errors only


def test_run_dtype_note_of_a_reduced_precision_file_gives_advice_that_works(
    images, monkeypatch, tmp_path
):
    """A file converted with --dtype bfloat16 runs in bfloat16 without --dtype, so
    the note's advice cannot be "leave out --dtype": it is --dtype float32."""
    import perceiver_torch.linear as linear

    bf16_file = tmp_path / "conv_bf16.safetensors"
    convert(golden_checkpoint_path("imagenet_conv"), bf16_file, dtype="bfloat16")
    monkeypatch.setattr(
        linear, "cpu_has_matmul_instructions", lambda dtype: dtype == torch.float32
    )
    result = run_cli("run", "classify", bf16_file, images[0])
    assert result.exit_code == 0, result.stderr
    assert ", bfloat16)" in result.stderr
    assert "no bfloat16 matrix instructions" in result.stderr
    assert "leave out --dtype" not in result.stderr
    assert "pass --dtype float32" in result.stderr


def _spy_on_packing(monkeypatch) -> list:
    """Records (packs, model) for each call of linear.pack_weights and
    linear.release_packed_weights (the real functions still run)."""
    import perceiver_torch.linear as linear

    calls = []
    for name, packs in (("pack_weights", True), ("release_packed_weights", False)):
        real = getattr(linear, name)

        def spy(module, real=real, packs=packs):
            calls.append((packs, module))
            return real(module)

        monkeypatch.setattr(linear, name, spy)
    return calls


def test_run_pack_weights_chooses_the_copies(models, images, monkeypatch, tmp_path):
    """--pack-weights packs every linear layer's weights, from a converted file and
    from an official checkpoint, and computes the same logits as the plain weights
    within the float32 bound both are held to against the float64 model (gamma_n of
    the model's roundings, test_precision; the packed kernel may sum in another
    order, on Intel CPUs it is MKL's); --no-pack-weights keeps none, in bfloat16 too;
    without either the library's default applies."""
    from perceiver_torch.linear import Linear
    from perceiver_torch.pipelines import ClassifyPipeline
    from tests.test_precision import gamma, relative

    calls = _spy_on_packing(monkeypatch)
    plain = run_cli("run", "classify", models["imagenet_learned"], *images, "--npy",
                    "-o", tmp_path / "plain.npy")
    assert plain.exit_code == 0, plain.stderr
    assert calls == []  # the default: load() decides by dtype
    pipeline = ClassifyPipeline(pt.load(models["imagenet_learned"]).double())
    exact = torch.stack(pipeline.logits([pipeline.preprocess(str(p)) for p in images]))
    bound = gamma("imagenet_learned", torch.float32)
    assert relative(torch.from_numpy(np.load(tmp_path / "plain.npy")), exact) <= bound
    official = golden_checkpoint_path("imagenet_learned")
    for i, source in enumerate((models["imagenet_learned"], official)):
        calls.clear()
        out = tmp_path / f"packed{i}.npy"
        packed = run_cli("run", "classify", source, *images, "--npy", "-o", out,
                         "--pack-weights")
        assert packed.exit_code == 0, packed.stderr
        assert [packs for packs, _ in calls] == [True], source
        layers = [m for m in calls[0][1].modules() if isinstance(m, Linear)]
        assert layers and all(layer.packing is True for layer in layers)
        assert relative(torch.from_numpy(np.load(out)), exact) <= bound, source
    calls.clear()
    released = run_cli("run", "classify", models["imagenet_learned"], images[0],
                       "--dtype", "bfloat16", "--no-pack-weights")
    assert released.exit_code == 0, released.stderr
    assert [packs for packs, _ in calls] == [False]
    layers = [m for m in calls[0][1].modules() if isinstance(m, Linear)]
    assert all(layer.packing is False and layer._packed is None for layer in layers)


def test_run_pack_weights_notes_where_it_changes_nothing(models, images, monkeypatch):
    import perceiver_torch.linear as linear

    args = ("run", "classify", models["imagenet_conv"], images[0], "--pack-weights")
    monkeypatch.setattr(linear, "packing_takes_effect", lambda dtype: True)
    assert "note:" not in run_cli(*args).stderr
    monkeypatch.setattr(linear, "packing_takes_effect", lambda dtype: False)
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert "--pack-weights changes nothing here" in result.stderr
    assert "in float32 (float32 needs AVX-512" in result.stderr
    assert "note:" not in run_cli(*args[:-1]).stderr  # not asked for: nothing to say
    assert run_cli(*args, "-q").stderr == ""


def test_run_refuses_an_unknown_dtype(models, images):
    result = run_cli("run", "classify", models["imagenet_conv"], images[0], "--dtype", "int8")
    assert result.exit_code == 2
    assert "'int8' is not one of" in result.stderr and "bfloat16" in result.stderr


def test_fill_mask_drops_one_final_line_ending_of_a_file_or_stdin(models, tmp_path):
    """The newline an editor or echo adds is not part of the text (it was read as a
    byte of it, changing the answer, and made a text of the model's length one byte
    too long); a second one, and a newline typed in the argument, stay."""
    from click.testing import CliRunner

    from converter.cli import main
    from perceiver_torch.pipelines.text import _read_input

    model = str(models["language_perceiver"])
    plain = run_cli("run", "fill-mask", model, MARKED, "--json")
    assert plain.exit_code == 0, plain.stderr
    expected = json.loads(plain.stdout)["results"]
    for ending in ("\n", "\r\n"):
        text_file = tmp_path / "marked.txt"
        text_file.write_bytes((MARKED + ending).encode())
        by_file = run_cli("run", "fill-mask", model, f"@{text_file}", "--json")
        by_stdin = CliRunner().invoke(main, ["run", "fill-mask", model, "-", "--json"],
                                      input=MARKED + ending, catch_exceptions=False)
        for result in (by_file, by_stdin):
            assert result.exit_code == 0, (ending, result.stderr)
            assert json.loads(result.stdout)["results"] == expected, ending
    # A text exactly the model's length, as an editor saves it, is accepted.
    length = pt.TINY_CONFIGS["language_perceiver"].max_seq_len
    full = tmp_path / "full.txt"
    full.write_bytes(b"a" * (length - 1) + b"[MASK]\n")
    result = run_cli("run", "fill-mask", model, f"@{full}", "-q")
    assert result.exit_code == 0, result.stderr
    full.write_bytes(b"x[MASK]\n\n")  # only the last line ending goes
    assert _read_input(f"@{full}") == b"x[MASK]\n"
    assert _read_input("x[MASK]\n") == "x[MASK]\n"  # the argument is taken as typed


def test_fill_mask_reads_a_file_and_stdin_as_bytes(models, tmp_path):
    # The model reads bytes and a command-line text need not be UTF-8: a file or stdin
    # holding the same bytes must give the same answer, not a decoding error (a file)
    # or a locale-dependent re-encoding (stdin).
    from click.testing import CliRunner

    from converter.cli import main

    data = b"caf\xe9 au lait, na\xefve [MASK*3] \xff"  # Latin-1: not UTF-8
    text_file = tmp_path / "latin1.txt"
    text_file.write_bytes(data)
    model = str(models["language_perceiver"])
    by_file = run_cli("run", "fill-mask", model, f"@{text_file}", "--json")
    by_stdin = CliRunner().invoke(
        main, ["run", "fill-mask", model, "-", "--json"], input=data,
        catch_exceptions=False)
    by_argv = run_cli("run", "fill-mask", model, data.decode("utf-8", "surrogateescape"),
                      "--json")
    documents = []
    for result in (by_file, by_stdin, by_argv):
        assert result.exit_code == 0, result.stderr
        (entry,) = json.loads(result.stdout)["results"]
        documents.append(entry)
    assert [m["position"] for m in documents[0]["masked"]] == [20, 21, 22]
    assert documents[0] == documents[1] == documents[2]


def test_fill_mask_stdin_closed_or_given_twice(models):
    """`run fill-mask MODEL - <&-` was "unexpected AttributeError: 'NoneType' object
    has no attribute 'read'"; `- -` read stdin once and the second text came out
    empty ("nothing to fill"). Both are one-line refusals now."""
    import subprocess
    import sys

    model = str(models["language_perceiver"])
    # A process of its own, started with stdin closed (click's test runner gives one).
    closed = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" <&-', sys.executable, "-c",
         "from converter.cli import main; main()", "run", "fill-mask", model, "-"],
        capture_output=True, text=True,
    )
    assert closed.returncode == 3, closed.stderr
    assert "stdin, which is closed; give the text itself or @FILE" in closed.stderr
    result = run_cli("run", "fill-mask", model, "-", "-")
    assert result.exit_code == 2, result.stderr
    assert "- (stdin) can be one of the texts only once" in result.stderr


def test_a_folder_given_as_images_or_frames_is_named(models, images, tmp_path):
    """A folder where images are expected: classify said "cannot read ... ([Errno 21]
    Is a directory)", flow "is not a file (a pipe?)"; both now say it is a folder and
    what to give instead (exit 3, before the model runs)."""
    folder = images[0].parent
    result = run_cli("run", "classify", models["imagenet_conv"], folder)
    assert result.exit_code == 3
    assert f"{folder} is a folder, not an image; give the image files in it" in result.stderr
    flow_model = tmp_path / "optical_flow.safetensors"
    convert(golden_checkpoint_path("optical_flow"), flow_model)
    for extra in ([], ["-o", str(tmp_path / "out.flo")]):
        result = run_cli("run", "flow", flow_model, folder, images[0], *extra)
        assert result.exit_code == 3, result.stderr
        assert f"{folder} is a folder; give the frames" in result.stderr
        assert "pipe" not in result.stderr
    result = run_cli("run", "flow", flow_model, images[0], folder, "-o", tmp_path / "o.flo")
    assert result.exit_code == 3 and f"{folder} is a folder, not an image" in result.stderr
