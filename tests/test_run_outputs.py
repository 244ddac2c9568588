"""``perceiver-convert run`` follows the output rules of the other commands, for every
file a run writes (``-o`` and the names derived from it): an existing output is
refused without ``--force`` before the model is loaded (exit 2, the file's bytes and
the folder unchanged), ``--force`` replaces it, and an output that is an input
(MODEL, an INPUT, ``--audio``; by any path, symbolic or hard link) is refused even
with ``--force``.

Each case also checks that the planned outputs (``TaskSpec.planned_outputs``) are
exactly the files the run then writes, so that a name the runner derives cannot
escape the up-front check.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest

import converter.run_cli as run_cli_module
from converter.conversion import convert
from converter.errors import ConverterError, OutputError
from converter.run_cli import Staging
from tests.conftest import golden_checkpoint_path
from tests.helpers import run_cli

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("cv2")
pytest.importorskip("av")

from perceiver_torch.pipelines.flow import textured_pair  # noqa: E402  (needs the media extra)
from perceiver_torch.pipelines.media import iter_video_frames, read_audio  # noqa: E402
from perceiver_torch.pipelines.video import make_test_video  # noqa: E402

MARKED = "This is an incomplete sentence where some words are[MASK*9]"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Dict[str, Path]:
    """Converted tiny models (from the golden official-format checkpoints)."""
    folder = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("language_perceiver", "imagenet_conv", "optical_flow", "video_autoencoding"):
        out[name] = folder / f"{name}.safetensors"
        convert(golden_checkpoint_path(name), out[name])
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> Dict[str, str]:
    """Every file under ``folder`` (temporary files included) with its checksum."""
    return {
        str(p.relative_to(folder)): digest(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model is loaded: a refusal must come before any work."""

    monkeypatch.setattr(run_cli_module, "load_any_model", _refuse_load)


def _refuse_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the outputs were checked")


def _frames(folder: Path, count: int) -> List[Path]:
    first, second = textured_pair(40, 56, shift=(1, 2), seed=1)
    paths = []
    for i in range(count):
        path = folder / f"frame{i}.png"
        Image.fromarray((first, second)[i % 2]).save(path)
        paths.append(path)
    return paths


def _image(folder: Path) -> Path:
    path = folder / "image0.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def _video(path: Path, frames: int = 4) -> Path:
    make_test_video(path, frames, size=(32, 32))
    return path


# Each case: (task, model, make(folder) -> (arguments after MODEL, every file the run
# writes)). The file lists are the documented names (README "Tasks", the runners'
# docstrings), written out here rather than computed by the code under test.
Case = Callable[[Path], Tuple[List[object], List[Path]]]


def _fill_json(t: Path):
    return [MARKED, "-o", t / "fill.json"], [t / "fill.json"]


def _fill_npz(t: Path):
    return [MARKED, "--npz", "-o", t / "fill.npz"], [t / "fill.npz"]


def _classify_json(t: Path):
    return [_image(t), "-o", t / "labels.json"], [t / "labels.json"]


def _classify_npy(t: Path):
    return [_image(t), "--npy", "-o", t / "logits.npy"], [t / "logits.npy"]


def _flow_pair(t: Path):
    a, b = _frames(t, 2)
    return [a, b, "-o", t / "out.png"], [t / "out.flo", t / "out.png"]


def _flow_pair_default(t: Path):
    a, b = _frames(t, 2)  # no -o: <first input>.flow.* next to it
    return [a, b], [t / "frame0.flow.flo", t / "frame0.flow.png"]


def _flow_three_frames(t: Path):
    frames = _frames(t, 3)
    names = ["out_0000.flo", "out_0000.png", "out_0001.flo", "out_0001.png"]
    return [*frames, "-o", t / "out.flo"], [t / n for n in names]


def _flow_npz(t: Path):
    a, b = _frames(t, 2)
    return [a, b, "--npz", "-o", t / "flow.npz"], [t / "flow.npz"]


def _flow_video(t: Path):
    make_test_video(t / "clip.mp4", 3, size=(40, 56), sample_rate=None)
    return [t / "clip.mp4"], [t / "clip.flow.mp4"]


def _flow_video_gif(t: Path):
    make_test_video(t / "clip.mp4", 3, size=(40, 56), sample_rate=None)
    return [t / "clip.mp4", "-o", t / "moves.gif"], [t / "moves.gif"]


def _autoencode(t: Path):
    return [_video(t / "in.mp4"), "-o", t / "out.mp4"], [t / "out.mp4", t / "out.wav"]


def _autoencode_npy(t: Path):
    names = ["raw.npy", "raw.audio.npy", "raw.label_logits.npy"]
    return [_video(t / "in.mp4"), "--npy", "-o", t / "raw.npy"], [t / n for n in names]


def _autoencode_folder(t: Path):
    (t / "results").mkdir()
    names = ["v.autoencoded.mp4", "v.autoencoded.wav", "w.autoencoded.mp4", "w.autoencoded.wav"]
    inputs = [_video(t / "v.mp4"), _video(t / "w.mp4")]
    return [*inputs, "-o", t / "results"], [t / "results" / n for n in names]


CASES: Dict[str, Tuple[str, str, Case]] = {
    "fill-mask json": ("fill-mask", "language_perceiver", _fill_json),
    "fill-mask npz": ("fill-mask", "language_perceiver", _fill_npz),
    "classify json": ("classify", "imagenet_conv", _classify_json),
    "classify npy": ("classify", "imagenet_conv", _classify_npy),
    "flow pair": ("flow", "optical_flow", _flow_pair),
    "flow pair, default names": ("flow", "optical_flow", _flow_pair_default),
    "flow three frames": ("flow", "optical_flow", _flow_three_frames),
    "flow npz": ("flow", "optical_flow", _flow_npz),
    "flow video": ("flow", "optical_flow", _flow_video),
    "flow video gif": ("flow", "optical_flow", _flow_video_gif),
    "autoencode": ("autoencode", "video_autoencoding", _autoencode),
    "autoencode npy": ("autoencode", "video_autoencoding", _autoencode_npy),
    "autoencode two videos": ("autoencode", "video_autoencoding", _autoencode_folder),
}


@pytest.mark.parametrize("case", list(CASES))
def test_existing_outputs_need_force(case, models, tmp_path, monkeypatch):
    task, model, make = CASES[case]
    args, outputs = make(tmp_path)
    rng = np.random.default_rng(7)
    # Without --force: each planned file alone, when it exists, stops the run before
    # the model is loaded; that file and everything else in the folder are unchanged.
    with monkeypatch.context() as patch:
        patch.setattr(run_cli_module, "load_any_model", _refuse_load)
        for existing in outputs:
            existing.write_bytes(rng.bytes(64))
            before = listing(tmp_path)
            result = run_cli("run", task, models[model], *args)
            assert result.exit_code == 2, (existing, result.stderr)
            assert f"refusing to overwrite {existing}" in result.stderr, result.stderr
            assert "--force" in result.stderr and "Traceback" not in result.stderr
            assert listing(tmp_path) == before
            existing.unlink()
    # With --force: every file exists beforehand and each is replaced by the run's.
    junk = {path: rng.bytes(64) for path in outputs}
    for path, data in junk.items():
        path.write_bytes(data)
    result = run_cli("run", task, models[model], *args, "--force", "--json")
    assert result.exit_code == 0, result.stderr
    for path, data in junk.items():
        assert path.is_file() and path.read_bytes() != data, path
    documents = json.loads(result.stdout)["results"]
    if task in ("flow", "autoencode"):
        # The planned outputs are exactly what the run wrote (in the runner's order).
        written = [Path(f) for document in documents for f in document["files"]]
        assert written == outputs
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary file left


def test_existing_output_refused_with_json_too(models, tmp_path, no_model_load):
    out = tmp_path / "fill.json"
    out.write_text("keep me")
    result = run_cli("run", "fill-mask", models["language_perceiver"], MARKED, "-o", out,
                     "--json")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert "refusing to overwrite" in json.dumps(document)
    assert out.read_text() == "keep me"


# --------------------------------------------------------------------------------------
# an output that is an input: refused even with --force


def _as_input_cases(t: Path, models: Dict[str, Path]) -> Dict[str, Tuple[List[object], Path]]:
    """name -> (the whole command after "run", the input the run would replace)."""
    image = _image(t)
    text = t / "text.txt"
    text.write_text(MARKED)
    a, b = _frames(t, 2)
    video = _video(t / "in.mp4")
    sound = t / "in.wav"
    sound.write_bytes(b"RIFF" + bytes(60))  # never read: the refusal comes first
    symlink = t / "link.json"
    symlink.symlink_to(image)
    hardlink = t / "hard.json"
    os.link(image, hardlink)
    return {
        "the image": (["classify", models["imagenet_conv"], image, "-o", image], image),
        "a symbolic link to the image": (
            ["classify", models["imagenet_conv"], image, "-o", symlink], image),
        "a hard link to the image": (
            ["classify", models["imagenet_conv"], image, "-o", hardlink], image),
        "another spelling": (
            ["classify", models["imagenet_conv"], image, "-o",
             t / "sub" / ".." / image.name], image),
        "the model": (
            ["fill-mask", models["language_perceiver"], MARKED, "-o",
             models["language_perceiver"]], models["language_perceiver"]),
        "an @FILE text": (
            ["fill-mask", models["language_perceiver"], f"@{text}", "-o", text], text),
        # -o frame1.flo: the picture goes to frame1.png, the second frame.
        "flow's derived picture": (
            ["flow", models["optical_flow"], a, b, "-o", t / "frame1.flo"], b),
        "flow's video": (["flow", models["optical_flow"], video, "-o", video], video),
        # -o in.mp4 names the input video itself.
        "autoencode's video": (
            ["autoencode", models["video_autoencoding"], video, "-o", video], video),
        # -o in.gif: the sound goes to in.wav, which is the --audio file.
        "autoencode's sound is --audio": (
            ["autoencode", models["video_autoencoding"], video, "--audio", sound,
             "-o", t / "in.gif"], sound),
    }


CASE_NAMES = [
    "the image", "a symbolic link to the image", "a hard link to the image",
    "another spelling", "the model", "an @FILE text", "flow's derived picture",
    "flow's video", "autoencode's video", "autoencode's sound is --audio",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_an_input_is_never_an_output_even_with_force(name, models, tmp_path, no_model_load):
    (tmp_path / "sub").mkdir()
    command, victim = _as_input_cases(tmp_path, models)[name]
    before = digest(victim)
    listed = listing(tmp_path)
    result = run_cli("run", *command, "--force")
    assert result.exit_code == 2, result.stderr
    assert "it is the input" in result.stderr and "Traceback" not in result.stderr
    assert digest(victim) == before and listing(tmp_path) == listed


def test_a_file_planned_twice_is_refused(models, tmp_path, no_model_load):
    # Two videos of the same name into one folder: both would be x.autoencoded.mp4.
    for folder in ("a", "b", "results"):
        (tmp_path / folder).mkdir()
    first, second = _video(tmp_path / "a" / "x.mp4"), _video(tmp_path / "b" / "x.mp4")
    result = run_cli("run", "autoencode", models["video_autoencoding"], first, second,
                     "-o", tmp_path / "results", "--force")
    assert result.exit_code == 2 and "written twice" in result.stderr, result.stderr
    assert list((tmp_path / "results").iterdir()) == []


def test_a_missing_output_folder_is_refused_before_loading(models, tmp_path, no_model_load):
    a, b = _frames(tmp_path, 2)
    result = run_cli("run", "flow", models["optical_flow"], a, b,
                     "-o", tmp_path / "absent" / "out.png")
    assert result.exit_code == 2 and "does not exist" in result.stderr, result.stderr


# Each case: (runner's module, its pipeline, model, make(folder) -> (inputs, -o name)).
RUNNER_CASES: Dict[str, Tuple[str, str, str, Callable[[Path], Tuple[List[str], str]]]] = {
    "classify": ("image", "ClassifyPipeline", "imagenet_conv",
                 lambda t: ([str(_image(t))], "labels.json")),
    "fill-mask": ("text", "FillMaskPipeline", "language_perceiver",
                  lambda t: ([MARKED], "fill.json")),
    "flow pair": ("flow", "FlowPipeline", "optical_flow",
                  lambda t: ([str(p) for p in _frames(t, 2)], "out.flo")),
    "flow video": ("flow", "FlowPipeline", "optical_flow",
                   lambda t: ([str(_video(t / "v.mp4"))], "out.mp4")),
    "autoencode": ("video", "AutoencodePipeline", "video_autoencoding",
                   lambda t: ([str(_video(t / "v.mp4"))], "out.mp4")),
}


def _refused_before_any_work(case: str, inputs: List[str], options, monkeypatch):
    """The PipelineError that the runner of ``RUNNER_CASES[case]``, on a tiny model
    with random weights, raises for ``inputs`` and ``options`` (RunOptions), checked
    to come before any model call."""
    import importlib

    import torch

    import perceiver_torch as pt
    from perceiver_torch.pipelines.base import PipelineError

    module_name, pipeline_name, model_name, _ = RUNNER_CASES[case]
    module = importlib.import_module(f"perceiver_torch.pipelines.{module_name}")
    torch.manual_seed(0)
    model = pt.build(model_name, pt.TINY_CONFIGS[model_name]).eval()
    pipeline = getattr(module, pipeline_name)(model)

    def no_work(*args, **kwargs):
        raise AssertionError("the model ran before the outputs were checked")

    monkeypatch.setattr(torch.nn.Module, "__call__", no_work)
    with pytest.raises(PipelineError) as refused:
        module.run_task(pipeline, inputs, options)
    return refused.value


@pytest.mark.parametrize(
    "where", ["missing folder", "file in the way", "a folder", "no write permission"]
)
@pytest.mark.parametrize("case", list(RUNNER_CASES))
def test_a_runner_called_from_a_script_refuses_an_output_it_cannot_write_first(
    case, where, tmp_path, monkeypatch
):
    """A runner called from Python with RunOptions' defaults (no CLI to check -o
    first) ran the model and then failed at the write, naming the temporary file
    (FileNotFoundError: .../absent/.labels.<hex>.tmp.json), or (flow of a video,
    autoencode) at the temporary rows, advising to free disk space; an output that
    is a folder failed when the run ended (IsADirectoryError naming the temporary
    file), and one in a folder without write permission after the work
    (PermissionError naming the temporary file). It now refuses the output before any
    work, with the CLI's words (check_output_path's)."""
    import importlib

    from converter.atomic import check_output_path
    from perceiver_torch.pipelines.base import RunOptions

    module_name, _, _, make = RUNNER_CASES[case]
    module = importlib.import_module(f"perceiver_torch.pipelines.{module_name}")
    inputs, name = make(tmp_path)
    if where == "missing folder":
        out = tmp_path / "absent" / "deeper" / name
    elif where == "file in the way":
        (tmp_path / "notes.txt").write_text("a file, not a folder\n")
        out = tmp_path / "notes.txt" / name
    elif where == "a folder":
        out = tmp_path / name
        out.mkdir()
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        out = locked / name
        real_access = os.access

        def access(path, mode, *args, **kwargs):  # root may write anyway: as a user
            if Path(path) == locked and mode & os.W_OK:
                return False
            return real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)
    refused_path = out  # the output the refusal names
    if where == "a folder" and module_name in ("flow", "video"):
        # Their -o may be a folder, the files named in it: the first of those is one.
        refused_path = module.planned_outputs(inputs, RunOptions(output=out))[0]
        refused_path.mkdir()
    before = listing(tmp_path)
    refused = _refused_before_any_work(case, inputs, RunOptions(output=out), monkeypatch)
    with pytest.raises(OutputError) as cli:  # the CLI's refusal of the same -o
        check_output_path(refused_path)
    assert str(refused) == str(cli.value) and refused.exit_code == 2
    if where == "missing folder":
        assert f"the folder {out.parent} does not exist" in str(refused)
        assert f"mkdir -p {out.parent}" in str(refused)
    elif where == "file in the way":
        assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in str(refused)
    elif where == "a folder":
        assert "it is a folder; give the name of a file" in str(refused)
    else:
        assert f"no write permission in {out.parent}" in str(refused)
    assert listing(tmp_path) == before


def test_an_unexpanded_tilde_is_not_advised_mkdir(tmp_path, monkeypatch):
    """``~/x.json`` reaches the check unexpanded (quoted in a shell, or from Python):
    the advice was "mkdir -p ~", which the shell expands to the home folder, creating
    nothing, so the same refusal followed. The refusal now names the expanded path."""
    from converter.atomic import check_output_path
    from perceiver_torch.pipelines.base import PipelineError, check_output_paths

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # no folder named "~" here
    with pytest.raises(OutputError) as cli:
        check_output_path("~/x.json")
    with pytest.raises(PipelineError) as runner:
        check_output_paths(["~/x.json"])
    assert str(runner.value) == str(cli.value)
    assert str(cli.value) == (
        "cannot write ~/x.json: the folder ~ does not exist (~ is not expanded here); "
        f"give the full path ({home / 'x.json'}) or choose another output path"
    )


def _autoencode_with_an_earlier_output(t: Path) -> Tuple[List[str], Dict[str, object]]:
    # v.mp4's default output is v.autoencoded.mp4, given as the second video.
    return [str(_video(t / "v.mp4")), str(_video(t / "v.autoencoded.mp4", frames=6))], {}


def _flow_with_an_earlier_output(t: Path) -> Tuple[List[str], Dict[str, object]]:
    # -o o.png names the first pair's files o_0000.flo and o_0000.png: the third frame.
    frames = _frames(t, 3)
    third = frames[2].rename(t / "o_0000.png")
    return [str(frames[0]), str(frames[1]), str(third)], {"output": t / "o.png"}


@pytest.mark.parametrize(
    "case, make",
    [("autoencode", _autoencode_with_an_earlier_output),
     ("flow", _flow_with_an_earlier_output)],
)
def test_a_runner_called_from_a_script_refuses_an_output_that_is_a_later_input(
    case, make, tmp_path, monkeypatch
):
    """Flow and autoencode write an input's files before the next input is read: from a
    script (no CLI to refuse it), an output named as a later input replaced that
    input, which was lost; autoencode then read its own output in its place (a
    silently wrong answer), flow failed after the work, saying something else had
    written to it. The runner refuses it before any work, in the CLI's words."""
    import importlib

    from converter.atomic import check_outputs
    from perceiver_torch.pipelines.base import RunOptions

    runner = "autoencode" if case == "autoencode" else "flow pair"
    module = importlib.import_module(f"perceiver_torch.pipelines.{RUNNER_CASES[runner][0]}")
    inputs, options = make(tmp_path)
    options = RunOptions(**options)
    later_input = Path(inputs[-1])
    assert later_input in module.planned_outputs(inputs, options)
    before = listing(tmp_path)
    refused = _refused_before_any_work(runner, inputs, options, monkeypatch)
    with pytest.raises(OutputError) as cli:  # the CLI's refusal of the same output
        check_outputs(later_input, [later_input])
    assert str(refused) == str(cli.value) and refused.exit_code == 2
    assert listing(tmp_path) == before


def _advised_mkdir(message: str) -> List[str]:
    """The words of the ``(mkdir -p ...)`` command a refusal advises, as a shell splits
    them."""
    import re
    import shlex

    command = re.search(r"\((mkdir -p .*)\) or ", message)
    assert command is not None, message
    return shlex.split(command.group(1))


def test_the_advised_mkdir_creates_a_folder_named_with_spaces(models, tmp_path, no_model_load):
    """A missing folder whose name has a space was advised as "mkdir -p my dir/x",
    which a shell reads as two folders, "my" and "dir/x", neither the one named. The
    command is quoted, for -o FILE (the CLI's and the runners' check) and -o FOLDER/."""
    from converter.atomic import check_output_path

    folder = tmp_path / "my dir" / "x"
    with pytest.raises(OutputError) as refused:
        check_output_path(folder / "out.json")
    assert _advised_mkdir(str(refused.value)) == ["mkdir", "-p", str(folder)]
    a, b = _frames(tmp_path, 2)
    result = run_cli("run", "flow", models["optical_flow"], a, b, "-o", f"{folder}{os.sep}")
    assert result.exit_code == 2, result.stderr
    assert _advised_mkdir(result.stderr) == ["mkdir", "-p", f"{folder}{os.sep}"]


@pytest.mark.parametrize("task", ["flow", "classify"])
def test_an_empty_output_name_is_refused(task, models, tmp_path, no_model_load):
    # -o '' was Path(""), that is ".": the results went where no -o puts them, exit 0.
    a, b = _frames(tmp_path, 2)
    before = listing(tmp_path)
    args = (("flow", models["optical_flow"], a, b) if task == "flow"
            else ("classify", models["imagenet_conv"], a))
    result = run_cli("run", *args, "-o", "")
    assert result.exit_code == 2 and "the name is empty" in result.stderr, result.stderr
    assert listing(tmp_path) == before


_real_load_any_model = run_cli_module.load_any_model


@pytest.mark.parametrize("task", ["flow", "classify"])
def test_a_missing_folder_given_with_a_trailing_slash_is_refused(
    task, models, tmp_path, no_model_load, monkeypatch
):
    # "-o results/" names a folder; pathlib drops the slash, and without a check the
    # run wrote results.flo/results.png next to it (classify: a file named results).
    a, b = _frames(tmp_path, 2)
    before = listing(tmp_path)
    if task == "flow":
        args = ("flow", models["optical_flow"], a, b)
    else:
        args = ("classify", models["imagenet_conv"], a)
    result = run_cli("run", *args, "-o", f"{tmp_path / 'results'}{os.sep}")
    assert result.exit_code == 2, result.stderr
    assert "does not exist" in result.stderr and "mkdir -p" in result.stderr
    assert listing(tmp_path) == before and not (tmp_path / "results").exists()
    # An existing folder with the slash is a folder, as without it.
    (tmp_path / "results").mkdir()
    if task == "flow":
        monkeypatch.setattr(run_cli_module, "load_any_model", _real_load_any_model)
        result = run_cli("run", *args, "-o", f"{tmp_path / 'results'}{os.sep}")
        assert result.exit_code == 0, result.stderr
        assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
            "frame0.flow.flo", "frame0.flow.png"]


# --------------------------------------------------------------------------------------
# the staging enforces the same rules at write time


def _record_fsyncs(monkeypatch) -> List[Tuple[int, bool]]:
    """Patches os.fsync to record (inode, is a folder) of every descriptor synced."""
    import stat

    synced: List[Tuple[int, bool]] = []
    real_fsync = os.fsync

    def fsync(fd):
        status = os.fstat(fd)
        synced.append((status.st_ino, stat.S_ISDIR(status.st_mode)))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_staging_fsyncs_a_file_written_by_name_before_the_rename(tmp_path, monkeypatch):
    """Libraries that save by name (OpenCV, PyAV, the .flo writer) leave no handle to
    fsync: the staging fsyncs the file by name, as open_output fsyncs its handle, so a
    crash after the rename cannot leave the output naming lost data."""
    synced = _record_fsyncs(monkeypatch)
    out = tmp_path / "flow.flo"
    staging = Staging(force=False, planned=[out])
    with staging.output_path(out) as temp:
        temp.write_bytes(b"PIEH")  # as a library would: by name, closed
        inode = temp.stat().st_ino
    assert (inode, False) in synced
    assert staging.commit() == [out] and out.read_bytes() == b"PIEH"


def test_staging_fsyncs_the_folders_after_the_renames(tmp_path, monkeypatch):
    """A rename is durable only once its folder is flushed: without that, a crash
    soon after a run could leave the outputs missing although the run said it wrote
    them. Every target folder is fsynced after its files were put in place."""
    synced = _record_fsyncs(monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    outs = [tmp_path / "a" / "one.bin", tmp_path / "b" / "two.bin"]
    staging = Staging(force=False, planned=outs)
    for out in outs:
        with staging.open_output(out) as handle:
            handle.write(b"data")
    before_commit = len(synced)
    assert staging.commit() == outs
    after = synced[before_commit:]
    for folder in (tmp_path / "a", tmp_path / "b"):
        assert (folder.stat().st_ino, True) in after, (folder, after)


def test_hf_folder_is_flushed_before_and_after_its_rename(tmp_path, monkeypatch):
    """An HF export's files are written by name (transformers' save_pretrained,
    safetensors) and its folder is published by one rename, which does not flush the
    files' data: each file and the folder are fsynced before the rename, the parent
    folder after it, so that a crash leaves no folder or a whole one."""
    from converter import hf

    synced = _record_fsyncs(monkeypatch)
    published: List[int] = []
    real_publish = hf._publish_folder

    def publish(temp, out_dir):
        published.append(len(synced))
        return real_publish(temp, out_dir)

    monkeypatch.setattr(hf, "_publish_folder", publish)
    out = tmp_path / "hf"
    with hf.atomic_folder(out) as folder:
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.txt").write_text("a")
        (folder / "link.json").symlink_to(folder / "config.json")
    assert published, "the folder was not published through hf._publish_folder"
    before, after = synced[: published[0]], synced[published[0]:]
    for path in (out / "config.json", out / "tokenizer" / "vocab.txt"):
        assert (path.stat().st_ino, False) in before, path
    for path in (out, out / "tokenizer"):
        assert (path.stat().st_ino, True) in before, path
    assert (tmp_path.stat().st_ino, True) in after


def test_staging_refuses_existing_and_unplanned_files(tmp_path):
    existing = tmp_path / "old.bin"
    existing.write_bytes(b"old")
    planned = [existing, tmp_path / "new.bin"]
    staging = Staging(force=False, planned=planned)
    with pytest.raises(OutputError, match="refusing to overwrite"):
        with staging.open_output(existing):
            pass
    with pytest.raises(ConverterError, match="planned outputs do not list"):
        with staging.output_path(tmp_path / "other.bin"):
            pass
    with staging.open_output(tmp_path / "new.bin") as handle:
        handle.write(b"new")
    assert staging.commit() == [tmp_path / "new.bin"]
    forced = Staging(force=True, planned=planned)
    with forced.open_output(existing) as handle:
        handle.write(b"replaced")
    forced.commit()
    assert existing.read_bytes() == b"replaced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.bin", "old.bin"]


def test_staging_commit_keeps_a_file_that_appeared_and_takes_back_its_own(tmp_path):
    """Another run writes one of the outputs after the checks (both saw no file): the
    commit without force refuses it, keeps its bytes, and removes the files it had put
    in place already, so the failed run writes none. With force it is replaced."""
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    staging = Staging(force=False, planned=[first, second])
    for path in (first, second):
        with staging.open_output(path) as handle:
            handle.write(b"this run's " + path.name.encode())
    second.write_bytes(b"the other run's")
    with pytest.raises(OutputError) as caught:
        staging.commit()
    assert f"refusing to overwrite {second}" in str(caught.value)
    assert "appeared while" in str(caught.value) and "--force" in str(caught.value)
    assert second.read_bytes() == b"the other run's"
    assert [p.name for p in tmp_path.iterdir()] == ["b.bin"]  # no a.bin, no temporary file
    forced = Staging(force=True, planned=[first, second])
    for path in (first, second):
        with forced.open_output(path) as handle:
            handle.write(b"forced")
    assert forced.commit() == [first, second]
    assert first.read_bytes() == second.read_bytes() == b"forced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def _fail_rename_number(monkeypatch, number: int, folder: Path) -> List[int]:
    """Makes the ``number``-th call of os.replace that touches ``folder`` raise OSError
    (EACCES, as Windows does for a file another program holds open); returns the list
    that counts those calls."""
    import errno

    calls: List[int] = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if folder in (Path(src).parent, Path(dst).parent):
            calls.append(1)
            if len(calls) == number:
                raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def _forced_staging(
    folder: Path, old: Dict[str, bytes], *, force: bool = True
) -> Tuple[Staging, List[Path]]:
    """A --force staging (``force``) of three outputs in ``folder``: those named in
    ``old`` exist beforehand with those bytes (a.bin and c.bin), b.bin is new."""
    folder.mkdir()
    targets = [folder / name for name in ("a.bin", "b.bin", "c.bin")]
    for name, data in old.items():
        (folder / name).write_bytes(data)
    staging = Staging(force=force, planned=targets)
    for path in targets:
        with staging.open_output(path) as handle:
            handle.write(b"new " + path.name.encode())
    return staging, targets


def test_a_forced_commit_that_fails_midway_leaves_every_old_file(tmp_path, monkeypatch):
    """With --force, a rename that fails after others succeeded (a file held open on
    Windows, a permission changed meanwhile) took back nothing: the outputs already
    renamed kept the new bytes, the later ones the old, a mix of two runs. The commit
    is all or nothing: whichever of its renames fails, every old file is back with its
    bytes, no new file or hidden backup is left, and the error says so."""
    old = {"a.bin": b"old a", "c.bin": b"old c"}
    with monkeypatch.context() as patch:  # how many renames a commit takes here
        counted = _fail_rename_number(patch, 0, tmp_path / "count")
        staging, _ = _forced_staging(tmp_path / "count", old)
        staging.commit()
    assert len(counted) >= 3  # one per output at least
    for number in range(1, len(counted) + 1):
        folder = tmp_path / f"fail{number}"
        staging, targets = _forced_staging(folder, old)
        with monkeypatch.context() as patch:
            _fail_rename_number(patch, number, folder)
            with pytest.raises(ConverterError) as caught:
                staging.commit()
        message = str(caught.value)
        assert "Permission denied" in message and "nothing was written" in message, number
        assert f"{folder / 'a.bin'}, {folder / 'c.bin'} are as they were" in message
        assert listing(folder) == {name: hashlib.sha256(data).hexdigest()
                                   for name, data in old.items()}, (number, message)


def test_an_old_file_that_cannot_be_put_back_is_named_with_its_backup(
    tmp_path, monkeypatch
):
    """Should putting an old file back fail too, the error says where it is kept
    (its hidden backup, which holds its bytes) and to rename it back."""
    import errno

    staging, targets = _forced_staging(tmp_path / "out", {"a.bin": b"old a"})
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).suffix == ".old":  # putting a.bin back
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        if Path(dst).name == "c.bin":  # the last new file
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ConverterError) as caught:
        staging.commit()
    backups = list((tmp_path / "out").glob(".a.bin.*.old"))
    assert len(backups) == 1 and backups[0].read_bytes() == b"old a"
    assert str(caught.value) == (
        f"writing {targets[2]} failed: No space left on device, and putting the old "
        f"files back failed too: the old {targets[0]} is kept as {backups[0]} "
        "(Permission denied); rename it back by hand"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [backups[0].name]


def _interrupt_after_rename_number(monkeypatch, number: int, folder: Path) -> List[int]:
    """Makes the ``number``-th rename (os.replace or os.link) touching ``folder`` happen
    and then raise KeyboardInterrupt, as a Ctrl-C that arrives during the system call
    is raised as the call returns; returns the list that counts those calls."""
    calls: List[int] = []
    real = {name: getattr(os, name) for name in ("replace", "link")}

    def renamer(name):
        def rename(src, dst, *args, **kwargs):
            result = real[name](src, dst, *args, **kwargs)
            if folder in (Path(src).parent, Path(dst).parent):
                calls.append(1)
                if len(calls) == number:
                    raise KeyboardInterrupt
            return result

        return rename

    for name in real:
        monkeypatch.setattr(os, name, renamer(name))
    return calls


@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_a_commit_interrupted_as_a_rename_returns_leaves_every_old_file(
    force, tmp_path, monkeypatch
):
    """A Ctrl-C raised just after one of the commit's renames (the old file already set
    aside, or a new file already in place) was undone as if that rename had not
    happened: the old file stayed under its hidden backup name with its output name
    gone, or the new file stayed as the one output of a run that wrote nothing. Each
    rename is undone however the interrupt falls: the folder is as before."""
    old = {"a.bin": b"old a", "c.bin": b"old c"} if force else {}
    with monkeypatch.context() as patch:  # how many renames a commit takes here
        counted = _interrupt_after_rename_number(patch, 0, tmp_path / "count")
        staging, _ = _forced_staging(tmp_path / "count", old, force=force)
        staging.commit()
    assert len(counted) >= 3  # one per output at least
    for number in range(1, len(counted) + 1):
        folder = tmp_path / f"interrupt{number}"
        staging, _ = _forced_staging(folder, old, force=force)
        with monkeypatch.context() as patch:
            _interrupt_after_rename_number(patch, number, folder)
            with pytest.raises(KeyboardInterrupt):
                staging.commit()
        assert listing(folder) == {
            name: hashlib.sha256(data).hexdigest() for name, data in old.items()
        }, number


@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
def test_publish_all_refuses_a_name_given_twice(force, tmp_path):
    """publish_all given one name twice (here once through a linked folder) replaced
    it twice with --force, the first new file lost, and without it refused the second
    as a file that "appeared while this output was being written". It refuses the
    pair before any rename: the old file and both temporary files stay."""
    from converter.atomic import publish_all

    folder = tmp_path / "out"
    folder.mkdir()
    (tmp_path / "linked").symlink_to(folder)
    if force:
        (folder / "a.bin").write_bytes(b"old a")
    temps = [folder / ".first.tmp", folder / ".second.tmp"]
    for temp in temps:
        temp.write_bytes(temp.name.encode())
    before = listing(folder)
    with pytest.raises(ValueError, match="given twice"):
        publish_all([(temps[0], folder / "a.bin"), (temps[1], tmp_path / "linked" / "a.bin")],
                    overwrite=force)
    assert listing(folder) == before


def test_a_forced_run_that_fails_on_its_second_rename_keeps_the_old_files(
    models, tmp_path, monkeypatch
):
    """The same through ``run flow --force``, which writes a .flo and a .png: the
    second rename fails (exit 3, one line) and both old files are intact."""
    args, outputs = _flow_pair(tmp_path)
    for path in outputs:
        path.write_bytes(b"old " + path.name.encode())
    before = listing(tmp_path)
    _fail_rename_number(monkeypatch, 2, tmp_path)
    result = run_cli("run", "flow", models["optical_flow"], *args, "--force")
    assert result.exit_code == 3, result.stderr
    assert listing(tmp_path) == before
    assert "Traceback" not in result.stderr and "Permission denied" in result.stderr
    assert f"{outputs[0]}, {outputs[1]} are as they were" in result.stderr


def test_help_documents_force():
    result = run_cli("run", "--help")
    assert result.exit_code == 0 and "--force" in result.stdout


def test_every_task_planner_resolves():
    from perceiver_torch.pipelines import TASKS
    from perceiver_torch.pipelines.base import import_attribute

    for spec in TASKS.values():
        if spec.outputs is not None:
            assert callable(import_attribute(spec.outputs)), spec.name
    assert TASKS["flow"].outputs and TASKS["autoencode"].outputs  # they derive names


def test_an_installed_library_that_fails_to_load_is_not_called_missing(tmp_path, monkeypatch):
    """Under a memory limit (ulimit -v) cv2's import failed with "failed to map
    segment from shared object", and run said "this task needs opencv-python-headless
    ...; install it": the package was installed. A missing package still gets that
    advice."""
    import sys

    from perceiver_torch.pipelines.base import PipelineError, require

    (tmp_path / "perceiver_broken_library.py").write_text(
        'raise ImportError("libx.so: failed to map segment from shared object")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PipelineError) as failed:
        require("perceiver_broken_library")
    message = str(failed.value)
    assert "is installed but could not be loaded" in message
    assert "failed to map segment" in message and failed.value.exit_code == 2
    sys.modules.pop("perceiver_broken_library", None)
    with pytest.raises(PipelineError, match=r"this task needs perceiver_no_such_lib .*install it"):
        require("perceiver_no_such_lib")



def _reject_constant(name: str):
    raise AssertionError(f"{name} is not JSON (json.dumps writes it for a non-finite float)")


@pytest.fixture
def nan_outputs(monkeypatch):
    """``nan_outputs(*names)``: the runs' models get NaN in those biases, as a float16
    run past 65504 gets non-finite outputs (which the runners note)."""
    import torch

    def poison(*names: str) -> None:
        real = run_cli_module.load_any_model

        def load(*args, **kwargs):
            model, how = real(*args, **kwargs)
            parameters = dict(model.named_parameters())
            with torch.no_grad():
                for name in names:
                    parameters[name].fill_(float("nan"))
            return model, how

        monkeypatch.setattr(run_cli_module, "load_any_model", load)

    return poison


def _non_finite_notes(document) -> List[str]:
    notes = []
    for result in document["results"]:
        notes += [n for n in result.get("notes", []) if "non-finite" in n]
    return notes


def _run_with_json(args: List[object], tmp_path: Path) -> dict:
    result = run_cli("run", *args, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout, parse_constant=_reject_constant)
    assert _non_finite_notes(document), document
    assert "non-finite" in result.stderr
    for written in tmp_path.glob("*.json"):  # classify's and fill-mask's -o document
        assert json.loads(written.read_text(), parse_constant=_reject_constant) == document
    return document


@pytest.mark.parametrize("case", ["fill-mask", "classify", "flow", "autoencode"])
def test_json_of_non_finite_outputs_is_json(models, tmp_path, nan_outputs, case):
    """json.dumps wrote NaN and Infinity for the probabilities, flow statistics and
    PSNR of a model whose outputs are not finite: not JSON (jq, JSON.parse and
    json.loads(parse_constant=...) refuse the document). They are null now; the
    result's notes say why."""
    if case == "fill-mask":
        nan_outputs("output_postprocessor.bias")
        args = ["fill-mask", models["language_perceiver"], MARKED, "-o", tmp_path / "f.json"]
        key = lambda r: r["masked"][0]["top_k"][0]["probability"]  # noqa: E731
    elif case == "classify":
        nan_outputs("decoder.output_projection.bias")
        args = ["classify", models["imagenet_conv"], _image(tmp_path), "-o", tmp_path / "c.json"]
        key = lambda r: r["top_k"][0]["probability"]  # noqa: E731
    elif case == "flow":
        nan_outputs("decoder.output_projection.bias")
        args = ["flow", models["optical_flow"], *_frames(tmp_path, 2), "-o", tmp_path / "o.png"]
        key = lambda r: r["max_flow"]  # noqa: E731
    else:
        nan_outputs("output_postprocessor.modalities.label.projection.bias")
        args = ["autoencode", models["video_autoencoding"], _video(tmp_path / "in.mp4"),
                "-o", tmp_path / "o.mp4"]
        key = lambda r: r["clips"][0]["top_k"][0]["probability"]  # noqa: E731
    document = _run_with_json(args, tmp_path)
    assert key(document["results"][0]) is None


def test_flow_of_a_video_notes_non_finite_flow(models, tmp_path, nan_outputs):
    """The flow of frame pairs noted non-finite flow vectors; the flow of a video
    (pipeline.video yields bare arrays) dropped the note: max |flow| nan with no word."""
    nan_outputs("decoder.output_projection.bias")
    video = tmp_path / "in.mp4"
    make_test_video(video, 3, size=(40, 56), sample_rate=None)
    document = _run_with_json(["flow", models["optical_flow"], video, "-o", tmp_path / "o.mp4"],
                              tmp_path)
    (note,) = _non_finite_notes(document)
    assert "flow vectors are unknown" in note and document["results"][0]["max_flow"] is None


@pytest.mark.filterwarnings("error:invalid value encountered in cast:RuntimeWarning")
def test_autoencode_writes_non_finite_frames_and_sound(models, tmp_path, nan_outputs):
    """An autoencoding whose frames and sound are not finite got its notes, then the
    AAC encoder refused the NaN samples: exit 3 with PyAV's "avcodec_send_frame()
    returned 22" and no file. The video's sound is silent there and its frames black
    (NaN to uint8 was undefined); the .wav keeps the float samples as they are."""
    nan_outputs("decoder.output_projection.bias")
    video = _video(tmp_path / "in.mp4")
    document = _run_with_json(
        ["autoencode", models["video_autoencoding"], video, "-o", tmp_path / "o.mp4"], tmp_path
    )
    notes = " ".join(_non_finite_notes(document))
    assert all(f"reconstructed {part}" in notes for part in ("frames", "sound", "labels"))
    assert document["results"][0]["clips"][0]["psnr"] is None
    frames = np.stack(list(iter_video_frames(tmp_path / "o.mp4")))
    assert len(frames) == 4 and frames.max() <= 16  # black (H.264's studio range: 16)
    audio, _, _ = read_audio(tmp_path / "o.mp4", 1600)
    assert np.isfinite(audio).all() and np.abs(audio).max() < 1e-3
    wav = np.frombuffer((tmp_path / "o.wav").read_bytes()[-4 * 4 * 64:], "<f4")
    assert np.isnan(wav).all()  # the last 4 frames' worth of samples, as computed


# --------------------------------------------------------------------------------------
# a missing INPUT among many: named before the model is loaded, never blamed on -o


@pytest.mark.parametrize(
    "task, make",
    [
        # A typo among several videos: it was found only after the earlier videos'
        # whole work (minutes each at full size).
        ("autoencode", lambda t: [_video(t / "a.mp4"), t / "typo.mp4"]),
        # A missing folder (a shell pattern that matched nothing is passed on as it
        # is): it was "Invalid value for '-o'... the folder clips does not exist; create
        # it first", exit 2, though no -o was given.
        ("autoencode", lambda t: [_video(t / "a.mp4"), t / "clips" / "*.mp4"]),
        ("flow", lambda t: [t / "frames" / "*.png", *_frames(t, 2)]),
        ("flow", lambda t: [*_frames(t, 2), t / "frame9.png"]),
        ("flow", lambda t: [t / "clips" / "*.mp4"]),
    ],
)
def test_a_missing_input_is_named_before_any_work(task, make, models, tmp_path, no_model_load):
    inputs = make(tmp_path)
    missing = next(p for p in inputs if not p.exists())
    before = listing(tmp_path)
    model = models["video_autoencoding" if task == "autoencode" else "optical_flow"]
    result = run_cli("run", task, model, *inputs)
    assert result.exit_code == 3, result.stderr
    assert f"{missing}: no such file" in result.stderr, result.stderr
    assert "--output" not in result.stderr and "Traceback" not in result.stderr
    if "*" in str(missing):
        assert "shell pattern" in result.stderr
    assert listing(tmp_path) == before
    result = run_cli("run", task, model, *inputs, "--json", "-q")
    assert result.exit_code == 3 and json.loads(result.stdout)["exit_code"] == 3


@pytest.mark.parametrize("task", ["flow", "autoencode"])
def test_a_default_output_refused_beside_its_input_is_not_blamed_on_o(
    task, models, tmp_path, no_model_load
):
    # Without -o the results go beside the first input; a name there that cannot be
    # written (here over the filesystem's 255 bytes; also a read-only folder of
    # inputs) was "Invalid value for '-o' / '--output'", an option not given, whose
    # advice ("choose a shorter name") the user could only follow with -o.
    if task == "flow":
        frames = _frames(tmp_path, 2)
        long = frames[0].rename(tmp_path / ("f" * 247 + ".png"))  # + .flow.flo: 256
        args = ("flow", models["optical_flow"], long, frames[1])
    else:
        long = _video(tmp_path / ("v" * 240 + ".mp4"))  # + .autoencoded.mp4: 256
        args = ("autoencode", models["video_autoencoding"], long)
    before = listing(tmp_path)
    result = run_cli("run", *args)
    assert result.exit_code == 2, result.stderr
    assert "255" in result.stderr and "Traceback" not in result.stderr
    assert "'-o'" not in result.stderr and "--output" not in result.stderr
    assert "beside the input" in result.stderr and "give -o" in result.stderr
    assert listing(tmp_path) == before
    # With -o the option is the one named, as before.
    result = run_cli("run", *args, "-o", tmp_path / ("o" * 252))  # + .flo / .mp4: 256
    assert result.exit_code == 2 and "'-o'" in result.stderr, result.stderr
