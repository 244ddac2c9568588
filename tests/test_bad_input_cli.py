"""Bad input is stopped at the door, through the CLI and the Python API (issue 9).

Every refusal asserts the exit code, the key words of the one-line message, and that
no file in the folder changed or appeared (sha256 of every file before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import pickle
import signal
import warnings
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import converter
import perceiver_torch
from converter import converted_files as outputs_module
from converter.errors import ConfigError, OutputError
from converter.fixtures import make_fixture, write_fixture
from converter.haiku_reader import load_haiku_checkpoint
from converter.haiku_writer import save_haiku_checkpoint
from helpers import run_cli

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


def snapshot(folder: Path) -> Dict[str, str]:
    """sha256 of every file under ``folder`` (hidden temporary files included)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_clean_error(result, code: int, *words: str) -> None:
    """Exit ``code``, one ``error:`` line naming ``words``, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.fixture
def work(tmp_path):
    """A folder with a tiny imagenet_fourier checkpoint and its conversion."""
    source = tmp_path / "fourier.pickle"
    write_fixture("imagenet_fourier", source, size="tiny", seed=4)
    converted = tmp_path / "fourier.safetensors"
    assert run_cli("convert", source, "-o", converted, "-q").exit_code == 0
    return tmp_path


@pytest.fixture(scope="module")
def jax_ready():
    pytest.importorskip("jax")
    pytest.importorskip("haiku")


# --------------------------------------------------------------------------------------
# Outputs: never an input, never an existing file without --force, never a wrong suffix.


def test_export_refuses_to_overwrite_its_own_input(work):
    before = snapshot(work)
    converted = work / "fourier.safetensors"
    result = run_cli("export", converted, "-o", converted)
    assert_clean_error(result, 2, "refusing", ".safetensors", "*.pickle")
    assert snapshot(work) == before


def test_export_refuses_a_suffix_of_another_format(work):
    before = snapshot(work)
    for name in ("back.pt", "back.safetensors"):
        result = run_cli("export", work / "fourier.safetensors", "-o", work / name)
        assert_clean_error(result, 2, "refusing to write a Haiku pickle", "*.pickle")
    # *.onnx means an ONNX graph, unless the Haiku format is asked for by name.
    result = run_cli(
        "export", work / "fourier.safetensors", "-o", work / "back.onnx", "--format", "haiku"
    )
    assert_clean_error(result, 2, "refusing to write a Haiku pickle", "*.pickle")
    assert snapshot(work) == before


def test_convert_refuses_to_overwrite_its_input(work):
    source = work / "ck.pt"  # an official pickle, oddly named: the output would be it
    source.write_bytes((work / "fourier.pickle").read_bytes())
    before = snapshot(work)
    result = run_cli("convert", source, "-o", source)
    assert_clean_error(result, 2, "it is the input", "choose another output name")
    # Through a link, the same file by another name is refused too.
    link = work / "link.pt"
    link.symlink_to(source)
    before = snapshot(work)
    result = run_cli("convert", source, "-o", link, "--force")
    assert_clean_error(result, 2, "it is the input")
    with pytest.raises(OutputError, match="it is the input"):
        converter.convert(source, link)  # the Python API too, even with overwrite=True
    assert snapshot(work) == before


def test_a_dangling_link_as_output_needs_force(work):
    # Path.exists() follows the link: the link was silently replaced by a file.
    link = work / "out.safetensors"
    link.symlink_to(work / "missing.safetensors")
    result = run_cli("convert", work / "fourier.pickle", "-o", link)
    assert_clean_error(result, 2, "refusing to overwrite", "link to a missing file", "--force")
    assert link.is_symlink() and not (work / "missing.safetensors").exists()
    assert run_cli("convert", work / "fourier.pickle", "-o", link, "--force", "-q").exit_code == 0


def test_existing_output_needs_force(work):
    source, converted = work / "fourier.pickle", work / "fourier.safetensors"
    exported = work / "back.pickle"
    assert run_cli("export", converted, "-o", exported, "-q").exit_code == 0
    before = snapshot(work)
    for args in (
        ("convert", source, "-o", converted),
        ("export", converted, "-o", exported),
        ("fixture", "imagenet_fourier", "-o", source),
    ):
        assert_clean_error(run_cli(*args), 2, "refusing to overwrite", "--force")
        assert snapshot(work) == before
    # --force replaces the file (here: converted again as float16).
    result = run_cli("convert", source, "-o", converted, "--force", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    with safe_open(str(converted), framework="pt") as f:
        assert f.metadata()["dtype"] == "float16"
    # The Python API refuses it only when asked to, naming its own parameter too.
    with pytest.raises(OutputError, match=r"--force \(overwrite=True in Python\)"):
        converter.convert(source, converted, overwrite=False)
    with pytest.raises(OutputError, match="it is the input"):
        converter.export(exported, exported)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_fifo_or_device_is_never_replaced_by_an_output(work):
    """Outputs are renamed into place, which would replace a FIFO or a device node
    (/dev/null with --force, as root) by a regular file: refused (exit 2) by every
    command that writes, with --force too, also where -o is only the stem of the
    names written (flow), and by the Python API; the node stays what it was."""
    import stat

    fifo = work / "pipe"
    os.mkfifo(fifo)
    images = work / "frame.png"
    pytest.importorskip("PIL.Image").new("RGB", (40, 32)).save(images)
    flow_model = work / "flow.safetensors"
    write_fixture("optical_flow", work / "flow.pickle", size="tiny", seed=1)
    assert run_cli("convert", work / "flow.pickle", "-o", flow_model, "-q").exit_code == 0
    before = snapshot(work)
    for args in (
        ("convert", work / "fourier.pickle", "-o", fifo, "--force"),
        ("fixture", "imagenet_fourier", "-o", fifo, "--force"),
        ("export", work / "fourier.safetensors", "-o", fifo, "--force"),
        ("run", "classify", work / "fourier.safetensors", images, "-o", fifo, "--force"),
        ("run", "flow", flow_model, images, images, "-o", fifo),
    ):
        result = run_cli(*args)
        assert_clean_error(result, 2, f"cannot write {fifo}: it is a FIFO (named pipe)",
                           "give the name of a regular file")
        assert stat.S_ISFIFO(fifo.stat().st_mode), args
    named = work / "pipe.safetensors"
    os.mkfifo(named)
    with pytest.raises(converter.ConverterError, match="it is a FIFO"):
        converter.convert(work / "fourier.pickle", named)  # overwrite=True by default
    assert stat.S_ISFIFO(fifo.stat().st_mode) and stat.S_ISFIFO(named.stat().st_mode)
    if Path("/dev/null").exists():
        result = run_cli("run", "classify", work / "fourier.safetensors", images,
                         "-o", "/dev/null", "--force")
        assert_clean_error(result, 2, "cannot write /dev/null: it is a character device")
    assert snapshot(work) == before


def test_a_file_where_the_output_folder_should_be_is_named(work):
    """-o inside a path whose "folder" is a file: the advice is not mkdir -p (which
    would fail) but to choose another path."""
    blocking = work / "fourier.safetensors"
    before = snapshot(work)
    for out in (blocking / "x.pickle", blocking / "a" / "b.pickle"):
        result = run_cli("fixture", "imagenet_fourier", "-o", out)
        assert_clean_error(result, 2, f"{blocking} is a file, not a folder",
                           "choose another output path")
        assert "mkdir" not in result.stderr
    assert snapshot(work) == before


def test_fixture_refuses_a_suffix_of_another_format(tmp_path):
    result = run_cli("fixture", "optical_flow", "-o", tmp_path / "x.safetensors")
    assert_clean_error(result, 2, "refusing to write a Haiku pickle")
    assert snapshot(tmp_path) == {}


# --------------------------------------------------------------------------------------
# --config: validated against the model's config dataclass, exit 2 naming the key.


@pytest.mark.parametrize(
    "item, words",
    [
        ("num_self_attention_heads=-1", ["num_self_attention_heads", ">= 1"]),
        ("num_self_attention_heads=0", ["num_self_attention_heads", ">= 1"]),
        ('decoder_query_residual="yes"', ["decoder_query_residual", "true or false"]),
        ("decoder_query_residual=2", ["decoder_query_residual", "true or false"]),
        ("nosuch_key=3", ["nosuch_key", "unknown config key", "valid keys", "num_blocks"]),
        ("max_resolution=8x", ["max_resolution", "two integers", "8x8"]),
        ("max_resolution=0x8", ["max_resolution", ">= 1"]),
        ("num_blocks", ["KEY=VALUE"]),
        ("dropout=1.5", ["dropout", "[0, 1)"]),
        # Relations, checked once the model is known: heads must divide the widths.
        ("num_self_attention_heads=3", ["num_self_attention_heads", "divide", "d_latents"]),
        ("num_cross_attention_heads=2", ["num_cross_attention_heads", "divide", "37"]),
        # A key of another model, and a value the checkpoint's shapes contradict.
        ("image_size=8x8", ["image_size", "unknown config key"]),
        ("num_latents=7", ["num_latents", "contradicts the checkpoint"]),
    ],
)
@pytest.mark.parametrize("forced", [False, True])
def test_bad_config_values_exit_2_naming_the_key(work, item, words, forced):
    before = snapshot(work)
    args = ["convert", work / "fourier.pickle", "-o", work / "out.safetensors",
            "--config", item, "--json"]
    if forced:
        args += ["--model", "imagenet_fourier"]
    result = run_cli(*args)
    assert_clean_error(result, 2, *words)
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == 2
    assert document["error"]["type"] == "ConfigError"
    assert snapshot(work) == before


@pytest.mark.parametrize("forced", [False, True])
def test_an_override_no_shape_reveals_is_still_checked_against_the_tensors(work, forced):
    """imagenet_learned's checkpoint holds only the product H*W of image_size (its
    position table's rows): a size of another product was a shape mismatch exiting 3,
    as if the file were wrong; it is the override (exit 2)."""
    write_fixture("imagenet_learned", work / "learned.pickle", size="tiny", seed=5)
    before = snapshot(work)
    args = ["convert", work / "learned.pickle", "-o", work / "out.safetensors",
            "--config", "image_size=8x8", "--json"]
    if forced:
        args += ["--model", "imagenet_learned"]
    result = run_cli(*args)
    assert_clean_error(result, 2, "--config image_size=8x8", "contradicts", "[64, 16]")
    assert json.loads(result.stdout)["error"]["type"] == "ConfigError"
    assert snapshot(work) == before
    # Only the override that changes a value is named (an HF import passes all of
    # config.json's as overrides), with it as the error's key.
    d_latents = perceiver_torch.TINY_CONFIGS["imagenet_learned"].d_latents
    with pytest.raises(ConfigError, match=r"--config image_size=8x8 contradicts") as info:
        converter.convert(work / "learned.pickle", work / "out.safetensors",
                          config={"d_latents": d_latents, "image_size": [8, 8]})
    assert info.value.key == "image_size" and "d_latents" not in str(info.value)
    # The same product in another shape fits the tensors: accepted.
    out = work / "wide.safetensors"
    result = run_cli("convert", work / "learned.pickle", "-o", out, "-q",
                     "--config", "image_size=16x64")
    assert result.exit_code == 0, result.output
    assert perceiver_torch.load(out).config.image_size == (16, 64)


def test_tuples_parse_from_x_comma_and_json(work):
    for i, value in enumerate(("8x8", "8,8", "[8, 8]", " 8 X 8 ")):
        out = work / f"out{i}.safetensors"
        result = run_cli("convert", work / "fourier.pickle", "-o", out, "-q",
                         "--config", f"max_resolution={value}")
        assert result.exit_code == 0, result.output
        with safe_open(str(out), framework="pt") as f:
            assert json.loads(f.metadata()["config"])["max_resolution"] == [8, 8]


def test_training_only_config_keys_are_recorded(work):
    """dropout and attention_dropout are no part of the mapping (no tensor depends
    on them) but are config keys: convert accepts them and the file records them, so
    the loaded model trains with them."""
    out = work / "dropout.safetensors"
    result = run_cli("convert", work / "fourier.pickle", "-o", out, "-q",
                     "--config", "dropout=0.25", "--config", "attention_dropout=0.125")
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    assert (config["dropout"], config["attention_dropout"]) == (0.25, 0.125)
    model = perceiver_torch.load(out)
    assert (model.config.dropout, model.config.attention_dropout) == (0.25, 0.125)
    from perceiver_torch.attention import Attention

    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.25}
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and {m.attention_dropout for m in attentions} == {0.125}


@pytest.mark.jax
def test_bad_config_with_verify_is_a_config_error_not_a_parity_failure(jax_ready, work):
    before = snapshot(work)
    for command in (["convert", "-o", work / "o.safetensors", "--verify"], ["verify"]):
        args = [command[0], work / "fourier.pickle", *command[1:],
                "--config", "num_self_attention_heads=0"]
        assert_clean_error(run_cli(*args), 2, "num_self_attention_heads")
    assert snapshot(work) == before


def test_python_api_validates_configs():
    tiny = perceiver_torch.TINY_CONFIGS["imagenet_fourier"]
    values = perceiver_torch.config_to_dict(tiny)
    with pytest.raises(perceiver_torch.ConfigError, match="num_self_attention_heads") as info:
        perceiver_torch.build("imagenet_fourier", {**values, "num_self_attention_heads": 0})
    assert info.value.key == "num_self_attention_heads"
    with pytest.raises(perceiver_torch.ConfigError, match="true or false"):
        perceiver_torch.ImageNetFourierConfig(decoder_query_residual="yes")
    with pytest.raises(perceiver_torch.ConfigError, match="divide"):
        perceiver_torch.OpticalFlowConfig(num_self_attention_heads=7)
    with pytest.raises(perceiver_torch.ConfigError, match="spatial_downsample"):
        perceiver_torch.VideoAutoencodingConfig(image_size=(30, 32))
    with pytest.raises(perceiver_torch.ConfigError, match="num_chunks"):
        perceiver_torch.VideoAutoencodingConfig(num_chunks=10**9)
    with pytest.raises(ConfigError, match="num_self_attention_heads"):
        converter.convert(GOLDEN / "imagenet_fourier" / "checkpoint.pickle",
                          config={"num_self_attention_heads": 3})
    # Lists become tuples; a valid edit still builds.
    assert perceiver_torch.ImageNetFourierConfig(max_resolution=[8, 8]).max_resolution == (8, 8)


def test_config_widths_match_the_models():
    """The widths validate() divides by are the models' own (official and tiny)."""
    for name, tiny in perceiver_torch.TINY_CONFIGS.items():
        for config in (tiny, perceiver_torch.CONFIG_CLASSES[name]()):
            if not hasattr(config, "input_width"):
                continue
            with torch.device("meta"):
                model = perceiver_torch.build(name, config)
            assert config.input_width() == model.input_preprocessor.num_channels


# --------------------------------------------------------------------------------------
# Exit codes: Ctrl-C 130 with no partial file, --json errors, --debug, no traceback.


def test_help_lists_the_exit_codes_of_the_readme():
    """`perceiver-convert --help` and README's table name the same codes, and the
    help's 2 and 3 cover what the table's do (it said nothing of an unwritable
    folder, a wrong suffix, a missing extra, malformed YAML or a failed write)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("Exit codes:", 1)[1].split("\n\n", 2)[1]
    readme_codes = re.findall(r"^\| (\d+) \|", table, re.M)
    help_text = run_cli("--help").output
    listed = help_text.split("Exit codes:", 1)[1].split("\n\n", 1)[0]
    entries = {}  # code -> its words, continuation lines joined
    for line in listed.strip().splitlines():
        match = re.match(r"\s*(\d+)\s+(.*)", line)
        if match:
            code = match.group(1)
            entries[code] = match.group(2)
        else:
            entries[code] += " " + line.strip()
    assert list(entries) == readme_codes == ["0", "1", "2", "3", "130", "141", "143"]
    usage, bad_input = entries["2"], entries["3"]
    for words in ("unwritable output folder", "wrong output suffix", "optional extra",
                  "exists without --force", "--config"):
        assert words in usage, words
    for words in ("malformed YAML", "empty", "write that failed"):
        assert words in bad_input, words



def test_interrupted_convert_exits_130_without_a_partial_file(work, monkeypatch):
    calls = {"n": 0}
    real = outputs_module._tensor_bytes

    def interrupt_midway(tensor):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(tensor)

    monkeypatch.setattr(outputs_module, "_tensor_bytes", interrupt_midway)
    before = snapshot(work)
    result = run_cli("convert", work / "fourier.pickle", "-o", work / "new.safetensors",
                     "--json")
    assert_clean_error(result, 130, "interrupted")
    assert json.loads(result.stdout)["exit_code"] == 130
    assert snapshot(work) == before


def test_sigterm_exits_143_without_a_partial_file(work, monkeypatch):
    """SIGTERM (kill, a CI timeout) is cleaned up as Ctrl-C is: the temporary file
    removed, the existing output kept, one line, exit 143 (it used to kill the
    process on the spot, leaving .NAME.*.tmp behind)."""
    import signal

    def not_handled(signum, frame):
        raise RuntimeError("SIGTERM was left to the default handler")

    previous = signal.signal(signal.SIGTERM, not_handled)
    try:
        calls = {"n": 0}
        real = outputs_module._tensor_bytes

        def terminate_midway(tensor):
            calls["n"] += 1
            if calls["n"] == 10:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(tensor)

        monkeypatch.setattr(outputs_module, "_tensor_bytes", terminate_midway)
        (work / "new.safetensors").write_bytes(b"the previous output")
        before = snapshot(work)
        result = run_cli("convert", work / "fourier.pickle", "-o",
                         work / "new.safetensors", "--force", "--json")
        assert_clean_error(result, 143, "terminated")
        assert result.stderr.count("error:") == 1, result.stderr
        assert json.loads(result.stdout)["exit_code"] == 143
        assert snapshot(work) == before
        assert signal.getsignal(signal.SIGTERM) is not_handled  # given back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_while_the_cli_starts_exits_130(work, monkeypatch):
    """Ctrl-C in the first second (torch being imported to read the debug switch)
    is an interrupt like any other: one line, exit 130, not click's "Aborted!" and
    exit 1 (the code of a parity failure)."""
    import converter.cli

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(converter.cli, "_debug_from_environment", interrupt)
    before = snapshot(work)
    result = run_cli("convert", work / "fourier.pickle", "-o", work / "new.safetensors")
    assert_clean_error(result, 130, "interrupted")
    assert "Aborted" not in result.stderr
    assert snapshot(work) == before


def _console_script_entry_point() -> str:
    """``module:function`` of the perceiver-convert console script in setup.cfg."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    scripts = setup["options.entry_points"]["console_scripts"]
    (line,) = [s for s in scripts.splitlines() if s.strip().startswith("perceiver-convert")]
    return line.split("=", 1)[1].strip()


@pytest.mark.parametrize("entry", ["console-script", "python-m"])
@pytest.mark.parametrize("library", ["click", "numpy"])
@pytest.mark.parametrize(
    "signum, code, error_type",
    [(signal.SIGINT, 130, KeyboardInterrupt), (signal.SIGTERM, 143, converter.errors.Terminated)],
    ids=["ctrl-c", "sigterm"],
)
def test_a_signal_while_the_console_script_imports_the_cli(
    tmp_path, library, signum, code, error_type, entry
):
    """Ctrl-C while the console script still imported converter.cli (click, numpy:
    a few tenths of a second) was a Python traceback, and SIGTERM killed the process
    (-15), where a moment later both are one line and exit 130 or 143. The signal is
    sent by a stand-in for a library of the startup, so that it lands inside the
    startup imports on every run: click, the first one converter.cli imports, and
    numpy, which the converter package itself imported (before the console script
    could run a line of its own). ``python -m converter`` goes the same way."""
    import subprocess
    import sys

    from converter.cli import error_document

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / f"{library}.py").write_text(f"import os\nos.kill(os.getpid(), {int(signum)})\n")
    repo = Path(__file__).resolve().parents[1]
    module, function = _console_script_entry_point().split(":")
    # What the installed script runs (pip writes `sys.exit(function())`).
    script = f"import sys; from {module} import {function}; sys.exit({function}())"
    command = [sys.executable, "-c", script] if entry == "console-script" else [
        sys.executable, "-m", "converter"]

    def default_signals():  # a background job (the suite run with `&`) ignores SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    done = subprocess.run(
        [*command, "models", "--json"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(repo)])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
        preexec_fn=default_signals,
    )
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    message = converter.errors.interrupt_message(error_type())  # the CLI's own line
    assert done.stderr.splitlines() == [f"error: {message}"]
    assert json.loads(done.stdout) == error_document(error_type(), code)

    # Without the stand-in the same script is the command line itself.
    version = subprocess.run(
        [*command, "--version"],
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("perceiver-convert, version ")


class _FailAfter:
    """A file wrapper whose writes raise ``failure`` once ``limit`` bytes are passed."""

    def __init__(self, handle, limit, failure):
        self._handle, self._limit, self._failure, self._size = handle, limit, failure, 0

    def write(self, data):
        self._size += len(data)
        if self._size > self._limit:
            raise self._failure
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)


@pytest.mark.parametrize(
    "failure, code, words",
    [
        (lambda: OSError(28, "No space left on device"), 3, ("No space left", "new.pt")),
        (KeyboardInterrupt, 130, ("interrupted",)),
    ],
    ids=["disk-full", "ctrl-c"],
)
def test_pt_output_reports_a_full_disk_or_ctrl_c_not_torchs_zip_error(
    work, monkeypatch, failure, code, words
):
    """torch.save's zip writer raised "unexpected RuntimeError: [enforce fail at
    inline_container.cc] ... please report it" (exit 3) over both."""
    import contextlib

    real = outputs_module.atomic_write

    @contextlib.contextmanager
    def failing(path, **options):
        with real(path, **options) as handle:
            yield _FailAfter(handle, 100_000, failure())

    monkeypatch.setattr(outputs_module, "atomic_write", failing)
    (work / "new.pt").write_bytes(b"the previous output")
    before = snapshot(work)
    result = run_cli("convert", work / "fourier.pickle", "-o", work / "new.pt", "--force")
    assert_clean_error(result, code, *words)
    assert "inline_container" not in result.stderr
    assert snapshot(work) == before


def test_interrupted_verify_and_demo_exit_130(work, monkeypatch):
    import converter.demo
    import converter.verify

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(converter.verify, "require_jax", lambda: None)
    monkeypatch.setattr(converter.verify, "run_reference", interrupt)
    before = snapshot(work)
    assert_clean_error(run_cli("verify", work / "fourier.pickle"), 130, "interrupted")
    monkeypatch.setattr(converter.demo, "demo_one", interrupt)
    assert_clean_error(run_cli("demo", "--models", "imagenet_fourier"), 130, "interrupted")
    assert snapshot(work) == before


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(work, monkeypatch):
    import converter.conversion

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(converter.conversion, "prepare", broken)
    args = ["convert", work / "fourier.pickle", "-o", work / "o.safetensors"]
    result = run_cli(*args)
    assert result.exit_code == 3
    assert "Traceback" not in result.stderr
    assert "unexpected RuntimeError: boom" in result.stderr and "--debug" in result.stderr
    result = run_cli("--debug", *args)
    assert result.exit_code == 3 and "Traceback" in result.stderr
    monkeypatch.setenv("PERCEIVER_CONVERT_DEBUG", "1")
    assert "Traceback" in run_cli(*args).stderr
    monkeypatch.setenv("PERCEIVER_CONVERT_DEBUG", "false")  # off, as 0 (was on)
    assert "Traceback" not in run_cli(*args).stderr


def test_a_bad_config_value_inside_a_mapping_file_is_the_files_fault(tmp_path):
    """mapping FILE.yaml without --config: a bad value in the file's own config is a
    malformed mapping (exit 3, the file named), not a --config usage error (exit 2)."""
    root = Path(__file__).resolve().parents[1] / "mappings"
    text = (root / "optical_flow.yaml").read_text()
    bad = tmp_path / "bad_config.yaml"
    bad.write_text(text.replace("schema: 1\n", 'schema: 1\nconfig:\n  num_self_attention_heads: "abc"\n', 1))
    for include in root.glob("_*.yaml"):  # the blocks it includes, beside it
        (tmp_path / include.name).write_text(include.read_text())
    result = run_cli("mapping", bad)
    assert_clean_error(result, 3, str(bad), "num_self_attention_heads")
    assert "--config" not in result.stderr


def _converted_copy(work, name, change=None, metadata_change=None):
    """A copy of the work folder's conversion with its tensors or metadata changed."""
    with safe_open(str(work / "fourier.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    if change:
        change(state)
    save_file(state, str(work / name), metadata={**metadata, **(metadata_change or {})})
    return work / name


def test_nan_weights_in_a_converted_file_are_marked_and_not_exported(work):
    """A converted file's NaN/Inf (only a changed file has them) are corrupt weights,
    as in an official pickle: inspect marks them (exit 3), no export writes them."""
    pytest.importorskip("onnx")
    key = "encoder.latents"
    bad = _converted_copy(work, "nan.safetensors",
                          change=lambda state: state[key].view(-1)[3:5].fill_(float("nan")))
    result = run_cli("inspect", bad, "--json")
    assert result.exit_code == 3 and key in result.stderr and "NaN" in result.stderr
    document = json.loads(result.stdout)
    assert document["ok"] is False
    assert {row["name"]: row["nonfinite"] for row in document["tensors"]}[key] == 2
    before = snapshot(work)
    for out in ("back.pickle", "back.onnx"):
        assert_clean_error(run_cli("export", bad, "-o", work / out), 3, key, "NaN")
    assert snapshot(work) == before


def test_config_metadata_nested_too_deeply_is_a_load_error(work):
    bad = _converted_copy(work, "deep.safetensors",
                          metadata_change={"config": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(perceiver_torch.LoadError, match="nested too deeply"):
        perceiver_torch.load(bad)
    for args in (["inspect", bad], ["export", bad, "-o", work / "back.pickle"]):
        assert_clean_error(run_cli(*args), 3, "nested too deeply")
    assert not (work / "back.pickle").exists()


def test_inspect_reads_an_official_pickle_by_its_content_whatever_its_suffix(work):
    renamed = work / "official.pth"
    renamed.write_bytes((work / "fourier.pickle").read_bytes())
    result = run_cli("inspect", renamed, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["safe"] is True and document["protocol"] == 3 and document["globals"]


def test_running_out_of_memory_is_a_clean_error(work, monkeypatch):
    """A size too large for the machine (e.g. verify --batch 100000000) ends in a
    MemoryError: one line saying so and what to lower, exit 3, no file."""
    import converter.conversion

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.35 TiB")

    monkeypatch.setattr(converter.conversion, "prepare", too_big)
    before = snapshot(work)
    result = run_cli("convert", work / "fourier.pickle", "-o", work / "o.safetensors", "--json")
    assert_clean_error(result, 3, "not enough memory", "lower it")
    assert json.loads(result.stdout)["exit_code"] == 3
    assert snapshot(work) == before


@pytest.mark.parametrize(
    "args, code",
    [
        (["convert", "{bad}", "-o", "{out}.safetensors"], 3),
        (["convert", "{src}", "-o", "{out}.bin"], 2),
        (["convert", "{src}", "-o", "{out}.safetensors", "--dtype", "float8"], 2),
        (["verify", "{bad}"], 3),
        (["export", "{src}", "-o", "{out}.pickle"], 3),
        (["export", "{conv}", "-o", "{conv}"], 2),
        (["inspect", "{bad}"], 3),
        (["fixture", "nosuch", "-o", "{out}.pickle"], 2),
        (["models", "--bogus"], 2),
    ],
)
def test_every_json_outcome_is_one_document_on_stdout(work, args, code):
    bad = work / "bad.pickle"
    bad.write_bytes(b"\x80\x03cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    names = {"bad": bad, "src": work / "fourier.pickle", "out": work / "out",
             "conv": work / "fourier.safetensors"}
    before = snapshot(work)
    result = run_cli(*[a.format(**names) for a in args], "--json")
    assert result.exit_code == code, result.output
    document = json.loads(result.stdout)  # exactly one JSON document
    assert document["ok"] is False and document["exit_code"] == code
    assert "Traceback" not in result.stderr
    assert snapshot(work) == before


# --------------------------------------------------------------------------------------
# Reduced precision: --verify checks the weights that are written.


@pytest.mark.jax
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_verify_measures_the_written_weights(jax_ready, work, dtype):
    from converter.verify import ROUNDING_TOLERANCE, UNIT_ROUNDOFF

    out = work / f"model.{dtype}.safetensors"
    result = run_cli("convert", work / "fourier.pickle", "-o", out, "--dtype", dtype,
                     "--verify", "--json", "-q")
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as f:
        parity = json.loads(f.metadata()["parity"])
    assert parity["dtype"] == dtype and parity["passed"] is True
    assert parity["tolerance"] == ROUNDING_TOLERANCE[dtype]
    # The rounded weights were run, not the float32 ones: rounding ~1e5 weights by up
    # to u moves the outputs by about u (0.5-5 u measured); u/16 is above anything
    # float32 gives (the float32 tolerance is 1e-5 < 2^-11 / 16 = 3.1e-5).
    assert UNIT_ROUNDOFF[dtype] / 16 < parity["max_relative"] <= parity["tolerance"]
    assert json.loads(result.stdout)["parity"]["dtype"] == dtype
    # The Python API, in memory: the same check of the same rounded weights.
    in_memory = converter.convert(work / "fourier.pickle", dtype=dtype, verify=True)
    assert in_memory.parity["dtype"] == dtype
    assert in_memory.parity["max_relative"] == parity["max_relative"]


@pytest.mark.jax
def test_reduced_precision_tolerance_still_catches_a_wrong_weight(jax_ready, monkeypatch):
    """A mapping mistake (a square weight transposed: 0.14 relative, float32) is O(1),
    above the bfloat16 tolerance of 16 u = 0.0625; float16 (7.8e-3) catches it too."""
    from converter.conversion import PreparedConversion, prepare
    from converter.verify import verify_prepared

    real = PreparedConversion.state_dict

    def transposed(self, dtype=None):
        state = real(self, dtype)
        key = "encoder.self_attends.0.attention.to_q.weight"
        state[key] = state[key].t().contiguous()
        return state

    prepared = prepare(GOLDEN / "imagenet_fourier" / "checkpoint.pickle")
    monkeypatch.setattr(PreparedConversion, "state_dict", transposed)
    for dtype in ("bfloat16", "float16"):
        report = verify_prepared(prepared, dtype=dtype)
        assert not report.passed, dtype


# --------------------------------------------------------------------------------------
# Loading: Haiku pickles recognised first, dtype mismatches named, NaNs listed.


def test_load_and_export_recognise_a_haiku_pickle(tmp_path):
    official = GOLDEN / "optical_flow" / "checkpoint.pickle"
    with pytest.raises(perceiver_torch.LoadError) as info:
        perceiver_torch.load(official)
    message = str(info.value)
    assert "official Haiku checkpoint" in message and "convert it first" in message
    assert "weights_only" not in message and "safe_globals" not in message
    result = run_cli("export", official, "-o", tmp_path / "back.pickle")
    assert_clean_error(result, 3, "official Haiku checkpoint", "convert it first")
    assert "weights_only" not in result.stderr
    assert snapshot(tmp_path) == {}
    # Any other pickle (here one naming os.system, never unpickled): one sentence, and
    # convert named as the reader that refuses what is not a checkpoint.
    other = tmp_path / "other.pickle"
    other.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02os"
                      b"\x8c\x06system\x93.")
    with pytest.raises(perceiver_torch.LoadError) as info:
        perceiver_torch.load(other)
    assert ("this is a pickle, not a converted perceiver_torch file; if it is an official "
            "Haiku checkpoint, convert it first with `perceiver-convert convert") in str(
                info.value)
    assert "without running anything and refuses any other pickle" in str(info.value)
    assert not (tmp_path / "other.safetensors").exists()


def test_verify_of_a_converted_file_asks_for_its_original(work):
    """A converted file is checked against the official file it came from: verify
    alone names the --reference form instead of "not a Haiku pickle"."""
    before = snapshot(work)
    result = run_cli("verify", work / "fourier.safetensors")
    assert_clean_error(result, 3, "perceiver-convert output", "imagenet_fourier",
                       "--reference")
    assert snapshot(work) == before


def test_load_names_what_a_file_is_by_its_content(work):
    """perceiver_torch.load reads a converted file by its content, not its name, and
    names anything else (a truncated copy, an ONNX graph, a torch.save file holding
    other objects) as a LoadError, without torch's advice to load unsafely."""
    import collections
    import os

    source = work / "fourier.safetensors"
    renamed = work / "renamed.pickle"
    renamed.write_bytes(source.read_bytes())
    expected = perceiver_torch.load(source).state_dict()
    got = perceiver_torch.load(renamed).state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    # A .pt file named *.safetensors: torch.load, given that path, handed it to
    # safetensors ("header too large", not even a LoadError).
    pt_file = work / "as_pt.pt"
    assert run_cli("convert", work / "fourier.pickle", "-o", pt_file, "-q").exit_code == 0
    misnamed = work / "as_pt.safetensors"
    misnamed.write_bytes(pt_file.read_bytes())
    got = perceiver_torch.load(misnamed).state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    inspected = run_cli("inspect", misnamed, "--json")
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["format"] == "pt"
    data = source.read_bytes()
    (work / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (work / "graph.onnx").write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))
    (work / "junk.bin").write_bytes(b"\x08\x08\x00 not a model" + bytes(64))
    model = perceiver_torch.load(source)
    torch.save({"model": "imagenet_fourier", "config": {}, "state_dict": model.state_dict()},
               work / "whole.pt")
    data = (work / "whole.pt").read_bytes()
    (work / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save({"model": "imagenet_fourier", "call": os.getcwd,
                "kind": collections.OrderedDict}, work / "other.pt")
    Image = pytest.importorskip("PIL.Image")
    image = work / "grey.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    cases = {"cut.safetensors": "not a readable safetensors file",
             "graph.onnx": "the file is an ONNX model",
             "junk.bin": "neither a safetensors file nor a torch.save file",
             "cut.pt": "not a readable torch.save file",
             "other.pt": "asks for the global 'posix.getcwd'"}
    for name, words in cases.items():
        with pytest.raises(perceiver_torch.LoadError, match=words) as info:
            perceiver_torch.load(work / name)
        assert "weights_only" not in str(info.value), name
        result = run_cli("run", "classify", work / name, image)
        assert_clean_error(result, 3)  # the CLI's own wording (e.g. for pickles)
        assert "weights_only" not in result.stderr, name


def test_a_folder_is_named_as_a_folder_not_as_is_a_directory(work):
    """A folder given where a converted file belongs (a HuggingFace download:
    config.json + model.safetensors) is a LoadError saying it is a folder, and for a
    transformers folder, how to convert it; not open()'s bare "Is a directory". The
    converter's readers say the same, and `run` stops it at the door (exit 2)."""
    from converter.errors import ConverterError
    from converter.run_cli import load_any_model

    hf = work / "perceiver-hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "perceiver"}')
    (hf / "model.safetensors").write_bytes((work / "fourier.safetensors").read_bytes())
    plain = work / "plain"
    plain.mkdir()
    advice = f"perceiver-convert convert {hf} -o perceiver-hf.safetensors"
    for folder, words in ((hf, ["a folder", "HuggingFace", advice]),
                          (plain, ["a folder", ".safetensors"])):
        with pytest.raises(perceiver_torch.LoadError) as info:
            perceiver_torch.load(folder)
        message = str(info.value)
        assert all(w in message for w in words), message
        assert "directory" not in message
        with pytest.raises(ConverterError) as info:
            outputs_module.read_converted(folder)
        assert all(w in str(info.value) for w in words), str(info.value)
        with pytest.raises(ConverterError) as info:
            load_any_model(folder)
        assert all(w in str(info.value) for w in words), str(info.value)
    assert "HuggingFace" not in message  # the plain folder's
    # run refuses a folder as a usage error (exit 2), with the same words; it was
    # click's bare "Directory ... is a directory" with no hint.
    for folder, words in ((hf, ["a folder", "HuggingFace", advice]),
                          (plain, ["a folder", ".safetensors"])):
        result = run_cli("run", "classify", folder, work / "fourier.safetensors")
        assert result.exit_code == 2, result.output
        assert "MODEL" in result.stderr and "is a directory" not in result.stderr
        assert all(w in result.stderr for w in words), result.stderr
        assert "Traceback" not in result.stderr
        result = run_cli("run", "classify", folder, work / "fourier.safetensors", "--json")
        document = json.loads(result.stdout)
        assert result.exit_code == 2 and document["exit_code"] == 2
        assert all(w in document["error"]["message"] for w in words), document
        # export too (click's bare "File ... is a directory." before).
        result = run_cli("export", folder, "-o", work / "back.pickle")
        assert result.exit_code == 2 and "is a directory" not in result.stderr
        assert all(w in result.stderr for w in words), result.stderr
        assert not (work / "back.pickle").exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8])
def test_wrong_dtype_in_a_converted_file_is_a_dtype_mismatch(work, dtype):
    source = work / "fourier.safetensors"
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    key = "encoder.latents"
    state[key] = state[key].to(dtype)
    bad = work / "bad.safetensors"
    save_file(state, str(bad), metadata=metadata)
    with pytest.raises(perceiver_torch.LoadError, match="dtype mismatch") as info:
        perceiver_torch.load(bad)
    assert key in str(info.value) and "shape mismatch" not in str(info.value)
    assert ".float()" in str(info.value)
    before = snapshot(work)
    result = run_cli("export", bad, "-o", work / "back.pickle")
    assert_clean_error(result, 3, "dtype mismatch", key)
    assert snapshot(work) == before


@pytest.mark.parametrize("suffix", [".pickle", ".onnx"])
def test_export_refuses_tensors_that_do_not_fit_the_files_config(work, suffix):
    """The inverse mapping reads names, not shapes: a converted file whose tensor was
    changed after conversion would export a checkpoint nothing loads. Every export
    refuses it (exit 3, the key and both shapes named), nothing written."""
    if suffix == ".onnx":
        pytest.importorskip("onnx")
    source = work / "fourier.safetensors"
    with safe_open(str(source), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    key = "encoder.latents"
    state[key] = state[key][:, : state[key].shape[1] // 2].contiguous()
    bad = work / "bad.safetensors"
    save_file(state, str(bad), metadata=metadata)
    before = snapshot(work)
    result = run_cli("export", bad, "-o", work / f"back{suffix}")
    assert_clean_error(result, 3, key, "shape")
    assert "Usage:" not in result.stderr
    assert snapshot(work) == before


@pytest.mark.parametrize("dtype", [np.float64, np.int8])
def test_wrong_dtype_in_a_haiku_checkpoint_is_a_dtype_mismatch(tmp_path, dtype):
    params, state = make_fixture("imagenet_fourier", size="tiny", seed=2)
    module = "classification_decoder/~/basic_decoder/output"
    params[module]["w"] = params[module]["w"].astype(dtype)
    source = tmp_path / "odd.pickle"
    save_haiku_checkpoint(source, params, state)
    before = snapshot(tmp_path)
    result = run_cli("convert", source, "-o", tmp_path / "o.safetensors",
                     "--model", "imagenet_fourier")
    assert_clean_error(result, 3, "dtype mismatch", f"{module}/w", "astype(np.float32)")
    assert "shape mismatch" not in result.stderr
    assert snapshot(tmp_path) == before


def test_inspect_lists_parameters_with_nonfinite_values(tmp_path):
    params, state = make_fixture("imagenet_fourier", size="tiny", seed=2)
    module = "classification_decoder/~/basic_decoder/output"
    params[module]["w"][0, :3] = [np.nan, np.inf, -np.inf]
    source = tmp_path / "nan.pickle"
    save_haiku_checkpoint(source, params, state)
    result = run_cli("inspect", source)
    assert_clean_error(result, 3, "NaN or Inf", f"{module}/w")
    assert f"{module}/w  [3 NaN/Inf]" in result.stdout
    assert f"{module}/b" in result.stdout  # the other parameters are listed too
    result = run_cli("inspect", source, "--json")
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == 3
    rows = {(r["module"], r["param"]): r for r in document["params"]["entries"]}
    assert rows[(module, "w")]["nonfinite"] == 3 and rows[(module, "b")]["nonfinite"] == 0
    with pytest.raises(converter.CheckpointError, match="non-finite"):
        load_haiku_checkpoint(source)  # converting still refuses it
    kept = load_haiku_checkpoint(source, check_finite=False)  # what inspect reads
    assert np.isnan(kept.params[module]["w"][0, 0])


# --------------------------------------------------------------------------------------
# demo and export options.


def test_demo_workdir_that_cannot_be_written_is_a_usage_error(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    result = run_cli("demo", "--models", "imagenet_fourier", "--workdir", a_file / "sub")
    assert_clean_error(result, 2, "cannot create the demo folder", "--workdir")
    # Running as root ignores permission bits, so simulate a read-only folder.
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access",
        lambda p, mode: False if Path(p) == readonly and mode & os.W_OK else real_access(p, mode),
    )
    result = run_cli("demo", "--models", "imagenet_fourier", "--workdir", readonly)
    assert_clean_error(result, 2, "no write permission", "--workdir")
    assert snapshot(tmp_path) == {"file": hashlib.sha256(b"x").hexdigest()}


def test_demo_models_parse_comma_separated_and_repeated(monkeypatch, tmp_path):
    import converter.demo

    seen = []

    def record(name, size, seed, folder, progress):
        seen.append(name)
        return {"model": name, "params": 1, "convert_seconds": 0.0, "relative": None,
                "argmax": None, "parity": "skipped", "round_trip": "bit-identical",
                "error": None}

    monkeypatch.setattr(converter.demo, "demo_one", record)
    # The README's form: --models NAME[,NAME...]
    # (--no-tasks: the task pipelines are tested with run.)
    assert run_cli("demo", "--no-tasks", "--models", "imagenet_fourier,optical_flow").exit_code == 0
    assert run_cli("demo", "--no-tasks", "--models", "language_perceiver", "--models",
                   "imagenet_conv").exit_code == 0
    assert seen == ["imagenet_fourier", "optical_flow", "language_perceiver", "imagenet_conv"]
    result = run_cli("demo", "--models", "imagenet_fourier,nosuch")
    assert result.exit_code == 2 and "nosuch" in result.stderr
    for empty in ("", ","):  # names no model: refused, not "all six"
        result = run_cli("demo", "--no-tasks", "--models", empty)
        assert result.exit_code == 2 and "no model named" in result.stderr
    assert len(seen) == 4
    # Files of an earlier demo in --workdir need --force.
    (tmp_path / "imagenet_fourier.pickle").write_bytes(b"earlier")
    before = snapshot(tmp_path)
    result = run_cli("demo", "--models", "imagenet_fourier", "--workdir", tmp_path)
    assert_clean_error(result, 2, "refusing to overwrite", "--force")
    assert snapshot(tmp_path) == before
    assert run_cli("demo", "--no-tasks", "--models", "imagenet_fourier", "--workdir",
                   tmp_path, "--force").exit_code == 0
    # And the task demos' files (their own names, under tasks/), unless --no-tasks.
    other = tmp_path / "other"
    (other / "tasks" / "classify").mkdir(parents=True)
    (other / "tasks" / "classify" / "photo.png").write_bytes(b"earlier")
    before = snapshot(other)
    result = run_cli("demo", "--models", "imagenet_fourier", "--workdir", other)
    assert_clean_error(result, 2, "refusing to overwrite", "photo.png", "--force")
    assert snapshot(other) == before
    assert run_cli("demo", "--no-tasks", "--models", "imagenet_fourier", "--workdir",
                   other).exit_code == 0


@pytest.fixture
def quick_demo(monkeypatch):
    """demo without the JAX parity step and with two of the task demos (classify,
    fill-mask): what is written where is the same, in seconds."""
    import converter.demo
    import perceiver_torch.pipelines

    monkeypatch.setattr(converter.demo, "_jax_available", lambda: False)
    tasks = {name: perceiver_torch.pipelines.TASKS[name] for name in ("fill-mask", "classify")}
    monkeypatch.setattr(perceiver_torch.pipelines, "TASKS", tasks)


def test_demo_rerun_after_ctrl_c_replaces_its_own_files_only(tmp_path, monkeypatch, quick_demo):
    """demo --workdir D interrupted after writing its fixture: the rerun refused
    ("refusing to overwrite ... imagenet_fourier.pickle; pass --force"), for a file the
    demo itself had written. It recognises its own files now (.perceiver-demo.json);
    a file it did not write, or one changed since, still needs --force."""
    import converter.fixtures

    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "notes.txt").write_bytes(b"the user's own")
    real_fixture = converter.fixtures.write_fixture

    def fixture_then_ctrl_c(*args, **kwargs):
        real_fixture(*args, **kwargs)
        raise KeyboardInterrupt

    command = ("demo", "--no-tasks", "--models", "imagenet_fourier", "--workdir", workdir)
    with monkeypatch.context() as patch:
        patch.setattr(converter.fixtures, "write_fixture", fixture_then_ctrl_c)
        assert run_cli(*command).exit_code == 130
    assert (workdir / "imagenet_fourier.pickle").exists()
    assert not (workdir / "imagenet_fourier.safetensors").exists()
    result = run_cli(*command)  # the same command again
    assert result.exit_code == 0, result.stderr
    assert run_cli(*command).exit_code == 0  # and after a whole run
    assert (workdir / "notes.txt").read_bytes() == b"the user's own"
    # A demo file the user replaced is theirs: refused, left as it is.
    (workdir / "imagenet_fourier.safetensors").write_bytes(b"the user's model")
    before = snapshot(workdir)
    result = run_cli(*command)
    assert_clean_error(result, 2, "refusing to overwrite 1 file(s)",
                       "imagenet_fourier.safetensors", "--force")
    assert snapshot(workdir) == before
    assert run_cli(*command, "--force").exit_code == 0
    assert run_cli(*command).exit_code == 0  # the demo's again
    assert (workdir / "notes.txt").read_bytes() == b"the user's own"


def test_demo_rerun_after_ctrl_c_among_the_task_demos(tmp_path, monkeypatch, quick_demo):
    # The task demos name their own files under tasks/: an interrupted run's are the
    # demo's, a file the user put there is not.
    import perceiver_torch.pipelines.image

    workdir = tmp_path / "demo"
    real_demo = perceiver_torch.pipelines.image.demo_task

    def demo_then_ctrl_c(*args, **kwargs):
        real_demo(*args, **kwargs)
        raise KeyboardInterrupt

    command = ("demo", "--models", "imagenet_fourier", "--workdir", workdir)
    with monkeypatch.context() as patch:
        patch.setattr(perceiver_torch.pipelines.image, "demo_task", demo_then_ctrl_c)
        assert run_cli(*command).exit_code == 130
    assert (workdir / "tasks" / "classify" / "picture.png").exists()
    assert (workdir / "tasks" / "fill-mask" / "sentence.txt").exists()
    result = run_cli(*command)
    assert result.exit_code == 0, result.stderr
    assert run_cli(*command).exit_code == 0
    (workdir / "tasks" / "classify" / "photo.png").write_bytes(b"the user's photo")
    before = snapshot(workdir)
    result = run_cli(*command)
    assert_clean_error(result, 2, "refusing to overwrite 1 file(s)", "photo.png", "--force")
    assert snapshot(workdir) == before
    assert run_cli(*command, "--force").exit_code == 0
    # --force replaced the demo's files; the user's photo is still not the demo's.
    assert (workdir / "tasks" / "classify" / "photo.png").read_bytes() == b"the user's photo"
    assert run_cli(*command).exit_code == 2


@pytest.mark.parametrize("suffix", [".pickle", ".onnx"])
def test_export_quiet_and_the_half_precision_note_printed_once(work, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnx")
    converted = work / "half.safetensors"
    assert run_cli("convert", work / "fourier.pickle", "-o", converted, "--dtype",
                   "float16", "-q").exit_code == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("export", converted, "-o", work / f"a{suffix}")
    assert result.exit_code == 0
    assert result.stderr.count("float16") == 1 and "UserWarning" not in result.stderr
    assert not [w for w in caught if "float16" in str(w.message)]
    result = run_cli("export", converted, "-o", work / f"b{suffix}", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    if suffix == ".pickle":
        # The Python API still warns, at the caller's line (it named the exporter's).
        with pytest.warns(UserWarning, match="float16") as record:
            converter.export(converted, work / "c.pickle")
        assert record[0].filename == __file__


@pytest.mark.jax
def test_parity_failure_exits_1_with_the_report_in_the_json_and_no_file(
    jax_ready, work, monkeypatch
):
    from converter.conversion import PreparedConversion

    real = PreparedConversion.state_dict

    def transposed(self, dtype=None):  # a mapping mistake: one square weight transposed
        state = real(self, dtype)
        key = "encoder.self_attends.0.attention.to_q.weight"
        state[key] = state[key].t().contiguous()
        return state

    monkeypatch.setattr(PreparedConversion, "state_dict", transposed)
    before = snapshot(work)
    result = run_cli("convert", work / "fourier.pickle", "-o", work / "new.safetensors",
                     "--verify", "--json", "-q")
    assert_clean_error(result, 1, "outside tolerance", "logits")
    document = json.loads(result.stdout)
    assert document["exit_code"] == 1 and document["error"]["type"] == "ParityError"
    assert document["error"]["parity"]["passed"] is False
    assert snapshot(work) == before


class _MakeDirs:
    """Unpickling this would create ``path`` (a stand-in for any code execution)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (str(self.path),))


def test_refused_pytorch_model_bin_names_the_global_without_torchs_advice(tmp_path):
    """A pytorch_model.bin that torch.load(weights_only=True) refuses: the message
    names the global it asked for, and never passes on torch's advice to retry with
    weights_only=False (which would run the file)."""
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "ran"
    weights = {"w": torch.randn(3, 4), "b": _MakeDirs(marker)}
    torch.save(weights, folder / "pytorch_model.bin")
    before = snapshot(tmp_path)
    result = run_cli("convert", folder / "pytorch_model.bin", "-o", tmp_path / "out.safetensors")
    assert_clean_error(result, 3, "refused", "'os.makedirs'", "nothing from the file was run")
    assert "set to `False`" not in result.stderr and "Re-running" not in result.stderr
    result = run_cli("inspect", folder / "pytorch_model.bin")
    assert_clean_error(result, 3, "'os.makedirs'")
    assert "set to `False`" not in result.stderr
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_torch_load_warnings_do_not_reach_stderr(tmp_path):
    """torch warns (UserWarning, on stderr) about pickle protocols other than its own
    before refusing such files; the user sees only the one-line error."""
    import pickle

    plain = tmp_path / "plain.bin"  # a plain pickle named like pytorch_model.bin
    with open(plain, "wb") as handle:
        pickle.dump({"a": [1]}, handle, protocol=4)
    saved = tmp_path / "p4.pt"  # torch.save's zip, its data.pkl in protocol 4
    torch.save({"model": "imagenet_fourier", "config": {}, "state_dict": {}}, saved,
               pickle_protocol=4)
    before = snapshot(tmp_path)
    for args in (["convert", plain, "-o", tmp_path / "x.safetensors", "-q"],
                 ["inspect", plain], ["inspect", saved]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_cli(*args)
        assert_clean_error(result, 3)
        assert [str(w.message) for w in caught] == [], args
        assert "Warning" not in result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(perceiver_torch.LoadError):
            perceiver_torch.load(saved)
    assert [str(w.message) for w in caught] == []
    assert snapshot(tmp_path) == before


def test_learned_positions_of_an_unknown_image_size_name_the_config_fix(tmp_path):
    """A learned position encoding's length is H*W, which the shapes cannot split:
    when no size preset has it, the error says which --config fixes it."""
    from converter.config_fixtures import write_config_fixture

    source = tmp_path / "learned.pickle"
    write_config_fixture(
        "imagenet_learned", source,
        dict(image_size=[6, 10], pos_channels=16, num_latents=8, d_latents=16,
             num_self_attends_per_block=1, num_blocks=1, num_classes=5),
        seed=7,
    )
    out = tmp_path / "learned.safetensors"
    before = snapshot(tmp_path)
    for extra in ((), ("--model", "imagenet_learned")):
        result = run_cli("convert", source, "-o", out, *extra)
        assert_clean_error(result, 3, "60 positions", "--config image_size=6x10")
    assert snapshot(tmp_path) == before
    result = run_cli("convert", source, "-o", out, "--config", "image_size=6x10", "-q")
    assert result.exit_code == 0, result.stderr
    checkpoint = load_haiku_checkpoint(source)
    pos = checkpoint.params[
        "image_preprocessor/~_build_network_inputs/trainable_position_encoding"]["pos_embs"]
    with safe_open(str(out), framework="np") as f:
        assert np.array_equal(f.get_tensor("input_preprocessor.position_encoding.embeddings"), pos)
    assert json.loads(perceiver_torch.read_checkpoint(out)[1]["config"])["image_size"] == [6, 10]


def test_a_checkpoint_saved_in_float16_is_named_as_a_dtype_problem(tmp_path):
    """Every array in float16 (names and shapes right): the error says that only the
    dtypes differ and how to fix it, not that the file may be another model."""
    source = tmp_path / "fourier.pickle"
    write_fixture("imagenet_fourier", source, size="tiny", seed=5)
    checkpoint = load_haiku_checkpoint(source)
    half = {
        module: {name: array.astype(np.float16) for name, array in params.items()}
        for module, params in checkpoint.params.items()
    }
    halved = tmp_path / "half.pickle"
    save_haiku_checkpoint(halved, half)
    out = tmp_path / "half.safetensors"
    before = snapshot(tmp_path)
    for extra in ((), ("--model", "imagenet_fourier")):
        result = run_cli("convert", halved, "-o", out, *extra)
        assert_clean_error(result, 3, "Only the dtypes differ", "float32")
        assert "really a" not in result.stderr
    result = run_cli("convert", halved, "-o", out)
    assert "closest model is imagenet_fourier (100% of the tensors fit)" in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "name",
    ["x.bin", "x.safetensors", "x.pt", "x.onnx", "hf/model.safetensors",
     "hf/pytorch_model.bin"],
)
def test_an_empty_file_is_named_as_empty_by_every_reader(tmp_path, name):
    """A 0-byte file (an interrupted download or copy) is called empty by convert,
    verify, inspect and export alike, in one line, exit 3, whatever reader it meets
    (HuggingFace .bin/.safetensors/folder, converted .safetensors/.pt, ONNX)."""
    import importlib.util

    path = tmp_path / name
    given = path
    if path.parent != tmp_path:  # a HuggingFace folder whose weights file is empty
        path.parent.mkdir()
        (path.parent / "config.json").write_text(
            json.dumps({"architectures": ["PerceiverForMaskedLM"]})
        )
        given = path.parent
    path.write_bytes(b"")
    commands = [["inspect", given], ["inspect", "--json", given]]
    if path.suffix != ".onnx":
        commands.append(["convert", given, "-o", tmp_path / "out.safetensors", "-q"])
        if importlib.util.find_spec("jax") is not None:
            commands.append(["verify", given, "-q"])
    if given is path and path.suffix in (".safetensors", ".pt"):
        commands.append(["export", given, "-o", tmp_path / "out.pickle", "-q"])
    before = snapshot(tmp_path)
    for args in commands:
        result = run_cli(*args)
        assert_clean_error(result, 3, f"{path}: the file is empty (0 bytes)")
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, lines)
    assert snapshot(tmp_path) == before
    if given is path and path.suffix in (".safetensors", ".pt"):
        with pytest.raises(perceiver_torch.LoadError, match=r"empty \(0 bytes\)"):
            perceiver_torch.load(path)


def test_another_projects_weights_file_is_named_by_convert_and_verify(tmp_path):
    # It was "the tensor names match none of transformers' six Perceiver classes;
    # add the folder's config.json": advice for an HF checkpoint, not for this file.
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(other),
              metadata={"foo": "bar"})
    before = snapshot(tmp_path)
    for args in (["convert", other, "-o", tmp_path / "out.safetensors"], ["verify", other]):
        result = run_cli(*args)
        assert_clean_error(result, 3, "another project's safetensors file",
                           "not a Perceiver checkpoint")
        assert "config.json beside it" in result.stderr
    assert snapshot(tmp_path) == before


# The first bytes of torch.onnx.export's files: ir_version 8, producer_name "pytorch".
_ONNX_HEAD = b"\x08\x08\x12\x07pytorch\x1a\x052.5.0"


def _onnx_graph(path: Path) -> Path:
    """A real ONNX model (Identity) where onnx is installed, else its first bytes."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        path.write_bytes(_ONNX_HEAD + bytes(64))
        return path
    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [value("x", TensorProto.FLOAT, [1])],
                              [value("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(path))
    return path


@pytest.mark.parametrize("name", ["model.onnx", "model.bin", "model.pickle",
                                  "model.safetensors"])
def test_an_onnx_model_is_named_as_onnx_by_convert_and_run(tmp_path, name):
    # It was "byte 0x08 near offset 0 is not a pickle opcode" (model.bin: torch.load's
    # refusal of an unknown protocol), naming neither ONNX nor what convert takes.
    graph = _onnx_graph(tmp_path / name)
    head = graph.read_bytes()[:3]  # ir_version (tag 0x08), then producer_name (0x12)
    assert head[0] == 0x08 and head[2] == 0x12, head
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((8, 8, 3), np.uint8))
    before = snapshot(tmp_path)
    words = ("an ONNX model", "export format", "official checkpoint",
             "HuggingFace transformers folder", f"perceiver-convert inspect {graph}")
    result = run_cli("convert", graph, "-o", tmp_path / "out.safetensors")
    assert_clean_error(result, 3, *words)
    assert "pickle opcode" not in result.stderr and "torch.load" not in result.stderr
    result = run_cli("run", "classify", graph, image)
    assert_clean_error(result, 3, *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["model.onnx", "model.bin", "model.pickle"])
def test_an_onnx_model_is_named_as_onnx_by_verify(jax_ready, tmp_path, name):
    graph = _onnx_graph(tmp_path / name)
    result = run_cli("verify", graph)
    assert_clean_error(result, 3, "an ONNX model", "export format", "official checkpoint")


@pytest.mark.parametrize("name", ["model.onnx", "model.bin", "model.pickle"])
def test_inspect_describes_an_onnx_model_whatever_its_name(tmp_path, name):
    pytest.importorskip("onnx")
    graph = _onnx_graph(tmp_path / name)
    result = run_cli("inspect", graph, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["kind"] == "onnx" and document["producer"].startswith("pytorch")


def test_a_torch_save_file_of_pickle_protocol_4_is_named_as_such(tmp_path):
    # torch.load(weights_only=True) cannot read protocol 4's opcodes here; the refusal
    # said the file "holds objects other than tensors", sending the user the wrong way.
    tensors = {"perceiver.embeddings.latents": torch.randn(4, 8)}
    torch.save(tensors, tmp_path / "pytorch_model.bin", pickle_protocol=4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the protocol
            torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    except pickle.UnpicklingError:
        pass
    else:
        pytest.skip("this torch reads protocol 4 with weights_only=True")
    torch.save({"model": "imagenet_conv", "config": {}, "state_dict": tensors},
               tmp_path / "model.pt", pickle_protocol=4)
    before = snapshot(tmp_path)
    result = run_cli("convert", tmp_path / "pytorch_model.bin", "-o", tmp_path / "x.safetensors")
    assert_clean_error(result, 3, "pickled with a protocol", "pickle_protocol=4",
                       "default protocol")
    assert "holds objects" not in result.stderr
    with pytest.raises(perceiver_torch.LoadError, match="pickled with a protocol"):
        perceiver_torch.load(tmp_path / "model.pt")
    assert snapshot(tmp_path) == before


def test_the_python_apis_config_values_are_checked_like_the_cli(work):
    # converter.convert(config=...) said "-1 contradicts the checkpoint, whose shapes
    # give num_latents=16" for a value that is no size at all; a list was an
    # AttributeError.
    source, out = work / "fourier.pickle", work / "api.safetensors"
    cases = [({"num_latents": "abc"}, "must be an integer, got 'abc'"),
             ({"num_latents": -1}, "must be an integer >= 1, got -1"),
             (["num_latents"], "must be a mapping of config keys to values")]
    for config, words in cases:
        with pytest.raises(ConfigError, match=re.escape(words)):
            converter.convert(source, out, config=config)
    assert not out.exists()


# --------------------------------------------------------------------------------------
# A full disk is one line (exit 3), never "unexpected OSError ... please report it".


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_run_outputs_on_a_full_disk_are_a_clean_error(tmp_path):
    from converter.run_cli import Staging

    staging = Staging()
    with pytest.raises(converter.errors.ConverterError, match="No space left on device"):
        with staging.open_output(tmp_path / "flow.flo"):
            _disk_full()
    with pytest.raises(converter.errors.ConverterError, match="No space left on device"):
        with staging.output_path(tmp_path / "out.mp4"):
            _disk_full()
    assert list(tmp_path.iterdir()) == []


def test_hf_folder_on_a_full_disk_is_a_clean_error(tmp_path, monkeypatch):
    import safetensors.numpy
    from safetensors import SafetensorError

    from converter import hf

    def full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with pytest.raises(converter.errors.ConverterError, match="No space left on device"):
        with hf.atomic_folder(tmp_path / "hf") as folder:
            hf._write_safetensors(folder / "model.safetensors",
                                  {"w": np.zeros(2, np.float32)}, {"format": "pt"})
    with pytest.raises(converter.errors.ConverterError, match="No space left on device"):
        with hf.atomic_folder(tmp_path / "hf2") as folder:
            _disk_full()
    assert list(tmp_path.iterdir()) == []


def test_demo_task_files_on_a_full_disk_keep_the_previous_ones(tmp_path, monkeypatch):
    """demo --workdir --force wrote the tasks' media in place: a full disk left a
    half-written flow.flo (the previous one lost) and "unexpected OSError"."""
    from converter.run_cli import run_task_demos

    folder = tmp_path / "tasks"
    (folder / "flow").mkdir(parents=True)
    (folder / "flow" / "flow.flo").write_bytes(b"the previous flow.flo")
    real = Path.write_bytes

    def half_then_full(self, data):
        if self.suffix == ".flo":
            real(self, bytes(data)[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    rows = {row["task"]: row for row in run_task_demos(folder)}
    assert "No space left on device" in rows["flow"]["error"]
    assert (folder / "flow" / "flow.flo").read_bytes() == b"the previous flow.flo"
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]


def test_an_empty_config_json_is_named_as_empty(tmp_path):
    # It was "not a readable JSON file (Expecting value: line 1 column 1 (char 0))".
    from safetensors.numpy import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"perceiver.embeddings.latents": np.ones((4, 8), np.float32)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text("\n")
    result = run_cli("convert", folder, "-o", tmp_path / "out.safetensors")
    assert_clean_error(result, 3, "config.json: the file is empty")
    assert not (tmp_path / "out.safetensors").exists()


def _run_with_a_ctrl_c_in_a_gc_callback(monkeypatch, sigint, wait=0.0):
    """``run_cli("models", "--json")`` with SIGINT's disposition ``sigint`` (restored
    after), where the first mapping load raises KeyboardInterrupt from a
    garbage-collection callback (jax's, while verify imports it, in real runs) and
    the command then goes on for ``wait`` seconds (time for a re-delivered interrupt
    to land). Returns the result; asserts that the callback ran."""
    import gc
    import time

    import converter.mapping

    real = converter.mapping.load_mapping
    fired = []

    def interrupting_gc(phase, info):
        if not fired:
            fired.append(phase)
            raise KeyboardInterrupt

    def load_mapping(name):
        if not fired:
            gc.callbacks.append(interrupting_gc)
            try:
                gc.collect()
            finally:
                gc.callbacks.remove(interrupting_gc)
            for _ in range(round(wait / 0.01)):  # the command goes on meanwhile
                time.sleep(0.01)
        return real(name)

    monkeypatch.setattr(converter.mapping, "load_mapping", load_mapping)
    previous = signal.signal(signal.SIGINT, sigint)
    try:
        result = run_cli("models", "--json")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fired, "the gc callback did not run"
    return result


def test_a_ctrl_c_python_could_not_raise_where_it_landed_still_interrupts(monkeypatch):
    """A Ctrl-C arriving in a garbage-collection callback (jax's, while verify imports
    it) is "unraisable": Python printed "Exception ignored" and the command went on to
    print success and exit 0. It is raised again in the main thread: exit 130."""
    # A Ctrl-C needs Python's SIGINT handler; a shell starts a background job (the
    # suite run with `&`) with SIGINT ignored, and interrupt_main then does nothing.
    result = _run_with_a_ctrl_c_in_a_gc_callback(
        monkeypatch, signal.default_int_handler, wait=2.0
    )
    assert result.exit_code == 130, result.output
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["exit_code"] == 130


@pytest.mark.parametrize(
    "disposition", [signal.SIG_IGN, signal.SIG_DFL], ids=["ignored", "default"]
)
def test_a_swallowed_ctrl_c_without_a_python_handler_still_reaches_the_previous_hook(
    monkeypatch, disposition
):
    """Where SIGINT has no Python handler (ignored, as in a shell's background job, or
    the default), ``_thread.interrupt_main`` does nothing: the unraisable Ctrl-C the
    CLI's hook had taken was then lost without even Python's "Exception ignored". It
    goes to the hook that was there before, and the command runs on as it would
    have."""
    reported = []
    monkeypatch.setattr("sys.unraisablehook", reported.append)  # the hook before the CLI's
    result = _run_with_a_ctrl_c_in_a_gc_callback(monkeypatch, disposition)
    assert [type(r.exc_value) for r in reported] == [KeyboardInterrupt]
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)


def test_a_dtype_op_mismatch_says_whether_the_array_or_the_mapping_is_at_fault(tmp_path):
    """The BatchNorm counter stored as int64 (the official file: int32) was told to
    "correct the dtype op's 'from'/'to'" of the bundled mapping, and that int64, the
    dtype it already had, was the one to store: the array is the one to fix. A
    mapping whose dtype op gives the wrong dtype is still the mapping's to fix."""
    source = tmp_path / "conv.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=5)
    checkpoint = load_haiku_checkpoint(source)
    state = {module: dict(arrays) for module, arrays in checkpoint.state.items()}
    module = "image_preprocessor/~/conv2_d_downsample/~/batchnorm/~/mean_ema"
    state[module]["counter"] = state[module]["counter"].astype(np.int64)
    wide = tmp_path / "int64.pickle"
    save_haiku_checkpoint(wide, checkpoint.params, state)
    with pytest.raises(converter.MappingError) as refused:
        converter.convert(wide, None)
    message = str(refused.value)
    assert "takes int32: store the array as int32 (numpy: array.astype(np.int32))" in message
    assert "correct its 'from'/'to'" not in message
    assert "(100% of the tensors fit)" in message  # the dropped accumulators count

    mappings = Path(__file__).resolve().parents[1] / "mappings"
    text = (mappings / "imagenet_conv.yaml").read_text()
    assert "{dtype: {from: int32, to: int64}}" in text
    wrong = tmp_path / "imagenet_conv.yaml"
    wrong.write_text(text.replace("{dtype: {from: int32, to: int64}}",
                                  "{dtype: {from: int32, to: int32}}"))
    with pytest.raises(converter.MappingError, match=r"must turn the array's dtype into "
                                                     r"int64: correct its 'from'/'to'"):
        converter.convert(source, None, mapping=wrong)


@pytest.mark.parametrize(
    "name, advice",
    [("ENOSPC", "(free disk space or choose another folder)"),
     ("EROFS", "(the filesystem is read-only: choose a folder on a writable one)"),
     ("EACCES", "(choose a folder you may write in)"),
     ("EFBIG", "(the file is larger than this process may write: raise its file-size "
      "limit (ulimit -f) or choose a filesystem that takes files this large)")],
)
def test_a_failed_write_advises_what_fits_its_cause(tmp_path, name, advice):
    """Every failed write advised "free disk space", also on a read-only filesystem
    (EROFS), without permission (EACCES) or past a file-size limit (EFBIG)."""
    import errno

    from converter.atomic import write_failed

    code = getattr(errno, name)
    message = str(write_failed(tmp_path / "x.safetensors", OSError(code, os.strerror(code))))
    assert message.endswith(f"nothing was written {advice}"), message


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`perceiver-convert mapping NAME | head`: the write into the closed pipe was
    "error: unexpected BrokenPipeError ... please report it", exit 3. Now exit 141
    (128 + SIGPIPE, as shells report it) and nothing on stderr, as other tools."""
    import subprocess
    import sys

    command = [sys.executable, "-c", "from converter.cli import main; main()",
               "mapping", "language_perceiver", "--size", "full"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first line is written
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141, stderr
    assert stderr == ""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names of any bytes: Linux")
def test_names_that_are_not_utf8(tmp_path):
    """A checkpoint named b"bad\\xffname.pickle" converted with exit 0 to a file whose
    safetensors header (the name in source_file, as lone surrogates) safetensors
    refused: every later read called it "a truncated or corrupt copy", --verify
    included. A .safetensors name that is not UTF-8 read the same (the library opens
    only UTF-8 names). The ONNX and HuggingFace writers cannot take such names: they
    are refused up front (a TypeError quoting the whole graph; "unexpected ...")."""
    from converter.converted_files import metadata_text

    source = tmp_path / os.fsdecode(b"bad\xffname.pickle")
    write_fixture("imagenet_fourier", source, size="tiny", seed=3)
    plain = tmp_path / "plain.safetensors"
    assert run_cli("convert", source, "-o", plain, "-q").exit_code == 0
    model = perceiver_torch.load(plain)
    with safe_open(str(plain), framework="pt") as handle:
        assert handle.metadata()["source_file"] == "bad\\xffname.pickle"
    odd = tmp_path / os.fsdecode(b"out\xff.safetensors")
    assert run_cli("convert", source, "-o", odd, "-q").exit_code == 0
    loaded = perceiver_torch.load(odd)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))
    # In a process of its own: click's test runner cannot print such a name.
    import subprocess
    import sys

    inspected = subprocess.run(
        [sys.executable, "-c", "from converter.cli import main; main()", "inspect", odd],
        capture_output=True,
    )
    assert inspected.returncode == 0, inspected.stderr
    for args, library in (([tmp_path / os.fsdecode(b"m\xff.onnx")], "torch.onnx.export"),
                          ([tmp_path / os.fsdecode(b"hf\xff"), "--format", "hf"],
                           "the safetensors library")):
        result = run_cli("export", plain, "-o", *args)
        assert result.exit_code == 2, result.stderr
        assert f"{library} takes only names that are valid UTF-8" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    # A name decoded in an ASCII locale (PYTHONUTF8=0, LC_ALL=C): its UTF-8 bytes as
    # lone surrogates, which the header holds as the characters again.
    assert metadata_text(os.fsencode("café.pickle").decode("ascii", "surrogateescape")) \
        == "café.pickle"


def test_long_names_and_link_loops(tmp_path):
    """A legal 255-byte output name failed on its temporary file's longer name
    ("File name too long ... choose a writable folder", exit 3); a longer one and a
    link loop (a -> b -> a) were "unexpected OSError/RuntimeError ... please report
    it". Now the legal name is written, and the others refused in one line (exit 2)."""
    source = tmp_path / "conv.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=1)
    longest = tmp_path / ("x" * (255 - len(".safetensors")) + ".safetensors")
    result = run_cli("convert", source, "-o", longest, "-q")
    assert result.exit_code == 0, result.stderr
    assert perceiver_torch.load(longest).model_name == "imagenet_conv"
    from converter.atomic import temporary_name

    for name in (longest, tmp_path / ("é" * 127 + ".json")):  # 254 bytes, 2 a character
        temp = temporary_name(name, keep_suffix=name.suffix == ".json")
        assert len(os.fsencode(temp.name)) <= 255 and temp.parent == name.parent
        assert temp.name.startswith(".") and temp.suffix == (
            ".json" if name.suffix == ".json" else ".tmp")
    too_long = tmp_path / ("y" * 250 + ".safetensors")
    result = run_cli("convert", source, "-o", too_long)
    assert result.exit_code == 2 and "its name is 262 bytes long, more than the 255" in \
        result.stderr, result.stderr
    (tmp_path / "a.safetensors").symlink_to("b.safetensors")
    (tmp_path / "b.safetensors").symlink_to("a.safetensors")
    for force in ((), ("--force",)):
        result = run_cli("convert", source, "-o", tmp_path / "a.safetensors", *force)
        assert result.exit_code == 2 and "a link in a loop of links" in result.stderr
        assert "unexpected" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["conv.pickle", longest.name, "a.safetensors", "b.safetensors"])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_stdout_that_cannot_be_written(tmp_path):
    """`models --json >/dev/full`: "unexpected OSError", then the error document
    failed too and ended in a traceback and exit 1 (the parity failure's code)."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-c", "from converter.cli import main; main()", "models",
             "--json"], stdout=full, stderr=subprocess.PIPE, text=True,
        )
    assert done.returncode == 3, done.stderr
    assert done.stderr == (
        "error: cannot write the JSON document to stdout: No space left on device\n")
    closed = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-c",
         "from converter.cli import main; main()", "models", "--json"],
        stderr=subprocess.PIPE, text=True,
    )
    assert closed.returncode == 3, closed.stderr
    assert closed.stderr == "error: cannot write the JSON document to stdout: it is closed\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["models"], ["mapping", "imagenet_conv"]])
def test_a_stdout_that_cannot_take_a_table(args):
    """The tables (models, mapping, inspect, demo) on a full stdout ended in
    "unexpected OSError: [Errno 28] ... please report it", and on a closed one were
    lost with exit 0; both are one line naming stdout, exit 3, as for --json."""
    import subprocess
    import sys

    command = [sys.executable, "-c", "from converter.cli import main; main()", *args]
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stderr == (
        "error: cannot write to stdout: No space left on device; send it to a file or "
        "device that has room\n")
    closed = subprocess.run(["sh", "-c", 'exec "$0" "$@" >&-', *command],
                            stderr=subprocess.PIPE, text=True)
    assert closed.returncode == 3, closed.stderr
    assert closed.stderr == "error: cannot write to stdout: it is closed\n"


def test_force_keeps_the_replaced_files_permissions(tmp_path):
    """A file kept private (0600) and replaced with --force became 0644 (the
    umask's); cp over it keeps 0600, and so does every --force now. A new file gets
    what the umask gives, as open() would."""
    import stat as stat_module

    source = tmp_path / "conv.pickle"
    write_fixture("imagenet_conv", source, size="tiny", seed=1)
    private = tmp_path / "private.safetensors"
    assert run_cli("convert", source, "-o", private, "-q").exit_code == 0
    private.chmod(0o600)
    assert run_cli("convert", source, "-o", private, "--force", "-q").exit_code == 0
    assert stat_module.S_IMODE(private.stat().st_mode) == 0o600
    umask = os.umask(0)
    os.umask(umask)
    fresh = tmp_path / "fresh.safetensors"
    assert run_cli("convert", source, "-o", fresh, "-q").exit_code == 0
    assert stat_module.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_names_with_terminal_controls_are_shown_escaped(tmp_path):
    """A file name may carry escape sequences (``\\x1b[2J`` clears the screen), a
    carriage return that overwrites the line, or a bidirectional override that shows
    ``gpj.exe`` as ``exe.jpg``; every line the CLI printed passed them to the terminal
    raw. Now they are shown as Python escapes, in progress lines, results and errors
    alike, click's own usage errors included; JSON already escaped them."""
    from converter.terminal import terminal_safe

    assert terminal_safe("a\x1b[2Jb\rc\x9bd\u202ee\tf\ng é") == \
        "a\\x1b[2Jb\\rc\\x9bd\\u202ee\tf\ng é"
    source = tmp_path / "in\x1b]0;title\x07.pickle"
    write_fixture("imagenet_learned", source, size="tiny", seed=2)
    converted = tmp_path / "out\r\u202e.safetensors"
    printed = []
    for code, args in ((0, ("convert", source, "-o", converted)),        # progress
                       (2, ("convert", source, "-o", converted)),        # error
                       (0, ("inspect", converted)),                      # stdout
                       (3, ("run", "classify", converted, tmp_path / "no\x1b[2J.png")),
                       (2, ("run", "classify", converted, source, "--npy",  # click's
                            "-o", tmp_path / "x\x1b[2J.json"))):
        result = run_cli(*args)
        assert result.exit_code == code, (args, result.stderr)
        printed.append(result.output + result.stderr)
        assert "\\x1b" in printed[-1] or "\\r\\u202e" in printed[-1], printed[-1]
    for text in printed:
        assert not set(text) & set("\x1b\x07\r\u202e"), text


def test_an_output_named_only_by_a_suffix_is_refused(work, monkeypatch):
    """To pathlib ".onnx" is a hidden file with no suffix: `export -o .onnx` wrote a
    Haiku pickle under that name (exit 0), and `convert -o .safetensors` asked for
    "*.safetensors", the very name given."""
    monkeypatch.chdir(work)
    before = snapshot(work)
    for args in (("export", "fourier.safetensors", "-o", ".onnx"),
                 ("convert", "fourier.pickle", "-o", ".safetensors"),
                 ("fixture", "imagenet_conv", "-o", ".pickle"),
                 ("run", "classify", "fourier.safetensors", "fourier.pickle", "--npz",
                  "-o", ".npz")):
        result = run_cli(*args)
        assert_clean_error(result, 2, f"{args[-1]} is a suffix without a name",
                           f"such as model{args[-1]}")
    with pytest.raises(OutputError, match="suffix without a name"):
        converter.convert("fourier.pickle", ".pt")
    assert snapshot(work) == before
    # A hidden file with a name and a suffix is a name like any other.
    assert run_cli("export", "fourier.safetensors", "-o", ".hidden.pickle").exit_code == 0


@pytest.mark.parametrize("how", ["export_metadata", "config_json", "names"])
def test_load_names_a_transformers_weights_file(tmp_path, how):
    """A HuggingFace folder's model.safetensors given to perceiver_torch.load (or
    `run`) is named as one, with the command that converts it, as its folder is;
    not as a converted file whose metadata lacks model and config."""
    folder = tmp_path / "vision-perceiver-conv"
    folder.mkdir()
    weights = folder / "model.safetensors"
    key = "perceiver.embeddings.latents" if how == "names" else "embeddings.latents"
    metadata = {"format": "pt"}
    if how == "export_metadata":
        metadata["perceiver_convert.model"] = "imagenet_conv"
    save_file({key: torch.zeros(4, 8)}, str(weights), metadata=metadata)
    if how == "config_json":
        (folder / "config.json").write_text(json.dumps({"model_type": "perceiver"}))
    with pytest.raises(perceiver_torch.LoadError) as caught:
        perceiver_torch.load(weights)
    message = str(caught.value)
    assert "HuggingFace" in message, message
    assert f"perceiver-convert convert {folder} -o" in message, message
    assert "lacks model" not in message


def test_load_of_another_projects_safetensors_keeps_its_message(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(perceiver_torch.LoadError, match="metadata lacks model"):
        perceiver_torch.load(other)
