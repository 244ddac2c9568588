"""The scripts refuse bad counts and paths as argparse errors (exit 2, one line)
before any work, instead of tracebacks minutes into a run (scripts/script_args.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "script, args, words",
    [
        ("bench_forward.py", ["--rounds", "0"], "--rounds: 0 is not a positive integer"),
        ("bench_forward.py", ["--batch", "1", "-8"], "--batch: -8 is not a positive"),
        ("bench_interleaved.py", ["--reps", "0"], "--reps: 0 is not a positive"),
        ("bench_interleaved.py", ["--warmup", "-1"], "--warmup: -1 is negative"),
        ("bench_precision.py", ["--batch", "0"], "--batch: 0 is not a positive"),
        ("fast_path_errors.py", ["--threads", "0"], "--threads: 0 is not a positive"),
        ("bench_convert.py", ["--checkpoint", "missing.pickle"], "missing.pickle: no such file"),
        ("bench_convert.py", ["--repeat", "zero"], "'zero' is not an integer"),
        ("hf_fidelity.py", ["--models", "foo"], "invalid choice: 'foo'"),
        ("output_digests.py", ["compare", "missing.json"], "missing.json: no such file"),
        ("bench_pipelines.py", ["--flow-rounds", "0"], "--flow-rounds: 0 is not a positive"),
    ],
)
def test_bad_arguments_are_argparse_errors(script, args, words, tmp_path):
    result = run_script(script, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_pipelines_writes_its_json_where_the_readme_says(tmp_path):
    """The README runs `bench_pipelines.py --json pipelines.json` (a path, as every
    other script's --json); with both benchmarks skipped only the header is written."""
    result = run_script("bench_pipelines.py", "--skip-flow", "--skip-video",
                        "--json", "pipelines.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "pipelines.json").read_text())
    assert {"cpu", "threads", "torch", "command"} <= set(report)


@pytest.mark.parametrize(
    "script, args, words",
    [
        ("hf_fidelity.py", ["--seed", "-1"], "--seed: -1 is negative"),
        ("bench_precision.py", ["--size", "tiny", "--models", "optical_flow", "--seed", "-1"],
         "--seed: -1 is negative"),
        ("bench_precision.py", ["--size", "tiny", "--models", "optical_flow", "--no-clip",
                                "--json", "missing/precision.json"],
         "the folder missing does not exist"),
        ("output_digests.py", ["record", "missing/digests.json", "--models", "optical_flow"],
         "the folder missing does not exist"),
        ("output_digests.py", ["record", "digests.json", "--models", "bogus"],
         "unknown model(s) bogus"),
        ("bench_forward.py", ["--device", "bogus", "--models", "imagenet_fourier", "--impl",
                              "ours", "--rounds", "1", "--repeat", "1", "--no-peak",
                              "--no-flops"], "'bogus' is not a torch device"),
    ],
)
def test_output_paths_seeds_and_devices_are_checked_before_any_work(
    script, args, words, tmp_path
):
    """A --json (or digest document) whose folder is missing, a negative seed, an unknown
    model or device: argparse errors before the run, not a traceback after it (which
    loses the results the file was to hold)."""
    result = run_script(script, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_file_type(tmp_path):
    import argparse

    sys.path.insert(0, str(SCRIPTS))
    try:
        from script_args import output_file
    finally:
        sys.path.remove(str(SCRIPTS))
    assert output_file(str(tmp_path / "out.json")) == tmp_path / "out.json"
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        output_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        output_file(str(tmp_path / "missing" / "out.json"))


def test_flow_pictures_refuses_a_file_as_its_folder(tmp_path):
    # mkdir on an existing file was a FileExistsError traceback.
    (tmp_path / "pictures").write_text("not a folder")
    result = run_script("flow_pictures.py", "pictures", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "pictures is a file; name a folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "pictures").read_text() == "not a folder"


def test_bench_convert_reports_a_checkpoint_it_cannot_convert_in_one_line(tmp_path):
    """A --checkpoint that exists but is no official file ended in a traceback of
    subprocess.CalledProcessError quoting the child's whole source; the converter's
    own message was captured and lost."""
    (tmp_path / "notes.pickle").write_text("hello world\n")
    result = run_script("bench_convert.py", "--checkpoint", "notes.pickle", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("bench_convert.py: convert of notes.pickle failed: ")
    assert "not a readable pickle" in line


@pytest.mark.parametrize(
    "script, args, words",
    [
        ("output_digests.py", ["record", "digests.json", "--models", "bogus"],
         "unknown model(s) bogus"),
        ("hf_fidelity.py", ["--models", "foo"], "invalid choice: 'foo'"),
    ],
)
def test_scripts_run_the_checkouts_packages_not_installed_ones(script, args, words, tmp_path):
    """Run from a checkout, a script uses that checkout's converter and
    perceiver_torch, as bench_forward.py and bench_precision.py do, not another copy
    on the path (an installed release, another checkout's editable install):
    output_digests.py, recording before a change and comparing after it, would
    otherwise digest the other copy both times and say "identical"."""
    stale = tmp_path / "stale"
    for package in ("converter", "perceiver_torch"):
        (stale / package).mkdir(parents=True)
        (stale / package / "__init__.py").write_text(
            "raise SystemExit('imported a stale installed copy')\n"
        )
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(stale)
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *args], cwd=work,
                            env=env, capture_output=True, text=True, timeout=300)
    assert "stale" not in result.stderr
    assert result.returncode == 2 and words in result.stderr, result.stderr
