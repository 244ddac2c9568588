"""HuggingFace transformers checkpoints of the six models: export and fidelity report.

``export_hf(converted, out_dir)`` writes a ``save_pretrained``-style folder that
transformers' own Perceiver classes load with no missing or unexpected keys:
``config.json`` (the fields the hub repositories carry), ``model.safetensors`` (with
this project's provenance in its metadata), the image processor config of the three
ImageNet models, the tokenizer files of the language model, and ``fidelity.json``.

The tensors follow the hub's convention, i.e. what HuggingFace's own converter
(``convert_perceiver_haiku_to_pytorch.py``) wrote from the official file: its renames,
``np.transpose`` of every kernel (for the conv stem's HWIO kernel a full axis reversal,
OIWH, so transformers convolves with height and width swapped) and squeezed BatchNorm
arrays. The names and ops are data: ``mappings/hf/<model>.yaml``, read by the same
engine as the official mappings, from the official Haiku names (the converted file is
first mapped back to them exactly) to transformers' keys.

transformers hard-codes some sizes in its classes (Fourier bands, the learned model's
256 position channels, the language decoder's 8 x 32 query channels, ...):
:func:`hf_config` refuses a checkpoint whose sizes differ, saying which.

The fidelity report runs transformers' forward pass and perceiver_torch's on the same
deterministic inputs, so a user sees what choosing HuggingFace's architecture costs
(docs/OFFICIAL.md lists the causes: erf GELU, the conv stem's padding and kernel
orientation, the learned model's query residual, the language decoder's query mask).

Needs the ``[hf]`` extra (transformers); nothing else in the converter imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from converter._version import __version__
from converter.errors import (
    CheckpointError,
    ConverterError,
    MappingError,
    OutputError,
    extra_import_error,
)
from converter.mapping import (
    MappingSpec,
    convert_arrays,
    load_hf_mapping,
    plan_forward,
)
from converter.progress import Progress, quiet
from converter.terminal import json_text

# Keys of the safetensors metadata; transformers wants "format": "pt".
# "haiku_dropped" (the BatchNorm EMA accumulators and counter that neither
# perceiver_torch nor transformers holds) lets the import give the original file back;
# "hf_source" is a converted file's own HF provenance (as the ONNX export keeps it);
# "dtype" the converted file's storage dtype: the float32 tensors of a bfloat16 file
# hold bfloat16 values, not those of source_sha256's file (the import records it).
HF_SOURCE_KEYS = ("model", "config", "source_file", "source_sha256", "mapping",
                  "mapping_sha256", "converter", "dtype", "haiku_dropped", "hf_source")


def require_transformers() -> Any:
    """Imports transformers, or explains how to install it."""
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        # A missing optional extra: exit 2, as for run's media libraries.
        raise extra_import_error(
            error,
            f"HuggingFace export and import need transformers ({error}); install it "
            "with `pip install 'perceiver-convert[hf]'`",
            "hf",
        ) from None
    return transformers


# --------------------------------------------------------------------------------------
# Configurations: perceiver_torch config (a plain dict) <-> transformers' PerceiverConfig.


def _fixed(model: str, config: Mapping[str, Any], fixed: Mapping[str, Any]) -> None:
    """transformers' class hard-codes these values; refuse a checkpoint with others."""
    wrong = {
        key: config[key]
        for key, value in fixed.items()
        if _plain(config[key]) != _plain(value)
    }
    if wrong:
        details = ", ".join(
            f"{key}={_plain(config[key])} (transformers fixes {_plain(fixed[key])})"
            for key in wrong
        )
        raise ConverterError(
            f"transformers' class for {model} cannot hold this checkpoint: {details}; "
            "only checkpoints with those sizes can be exported to HuggingFace"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def _square(model: str, size: Any, what: str) -> int:
    height, width = size
    if height != width:
        raise ConverterError(
            f"transformers' class for {model} takes a square {what}; this checkpoint "
            f"has {height}x{width}"
        )
    return int(height)


def class_labels(model: str, num_classes: int) -> Dict[str, Any]:
    """``id2label``/``label2id`` for the official class count of ``model``, else {}
    (transformers then numbers them LABEL_0, LABEL_1, ...). The names are
    perceiver_torch's package data (the colabs' lists: ImageNet in class-index order,
    Kinetics-700 alphabetical)."""
    from perceiver_torch.labels import imagenet_labels, kinetics700_labels

    if model == "video_autoencoding":
        names = kinetics700_labels()
    elif model.startswith("imagenet_"):
        names = imagenet_labels()
    else:
        return {}
    if num_classes != len(names):
        return {}
    id2label = {i: name for i, name in enumerate(names)}
    return {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}


def hf_config(model: str, config: Mapping[str, Any]) -> Dict[str, Any]:
    """``PerceiverConfig`` keyword arguments for perceiver_torch ``config`` (a dict).

    The values the hub repositories carry (sizes, ``architectures`` is added by the
    caller); raises :class:`ConverterError` where transformers cannot express ``config``.
    """
    c = dict(config)
    common = dict(
        num_latents=c["num_latents"],
        d_latents=c["d_latents"],
        num_self_attention_heads=c["num_self_attention_heads"],
        num_cross_attention_heads=c["num_cross_attention_heads"],
    )
    if model == "language_perceiver":
        # The decoder's 8 heads of 32 query channels are literals in PerceiverForMaskedLM.
        _fixed(model, c, {"qk_channels": 256, "num_cross_attention_heads": 8})
        return dict(
            common,
            d_model=c["d_model"],
            num_blocks=1,
            num_self_attends_per_block=c["num_self_attends"],
            qk_channels=c["qk_channels"],
            v_channels=c["v_channels"] or c["d_latents"],
            vocab_size=c["vocab_size"],
            max_position_embeddings=c["max_seq_len"],
        )
    if model.startswith("imagenet_"):
        imagenet = dict(
            common,
            num_blocks=c["num_blocks"],
            num_self_attends_per_block=c["num_self_attends_per_block"],
            qk_channels=None,
            v_channels=None,
            num_labels=c["num_classes"],
            **class_labels(model, c["num_classes"]),
        )
        if model == "imagenet_learned":
            _fixed(model, c, {"pos_channels": 256})
            size = _square(model, c["image_size"], "image")
            return dict(imagenet, d_model=512, image_size=size)
        if model == "imagenet_fourier":
            _fixed(model, c, {"num_bands": 64, "max_resolution": (224, 224)})
            return dict(imagenet, d_model=261, image_size=224)
        _fixed(model, c, {"num_bands": 64, "max_resolution": (56, 56), "conv_channels": 64})
        return dict(imagenet, d_model=322, image_size=224)
    if model == "optical_flow":
        _fixed(model, c, {"num_bands": 64, "patch_channels": 64, "rescale_factor": 100.0})
        return dict(
            common,
            d_model=322,
            num_blocks=1,
            num_self_attends_per_block=c["num_self_attends"],
            train_size=list(c["image_size"]),
        )
    if model == "video_autoencoding":
        _fixed(
            model,
            c,
            {
                "audio_num_bands": 192,
                "image_num_bands": 32,
                "label_query_channels": 1024,
                "spatial_downsample": 4,
                "input_padding": 4,
                "query_padding": 2,
            },
        )
        size = _square(model, c["image_size"], "frame")
        # transformers' image_size is the Fourier features' maximum resolution, the
        # frame size after space-to-depth (56 for the official 224: its default,
        # which HuggingFace's converter kept); output_shape holds the frame size.
        return dict(
            common,
            d_model=704,
            num_blocks=1,
            num_self_attends_per_block=c["num_self_attends"],
            num_frames=c["num_frames"],
            image_size=size // c["spatial_downsample"],
            audio_samples_per_frame=c["audio_samples_per_frame"],
            samples_per_patch=c["samples_per_patch"],
            output_shape=[1, c["num_frames"], size, size],
            output_num_channels=c["decoder_channels"],
            num_labels=c["num_classes"],
            **class_labels(model, c["num_classes"]),
        )
    raise ValueError(f"unknown model {model!r}")


# PerceiverConfig's default head counts. save_pretrained writes only the values that
# differ from the defaults, so a config.json without a head count means this one
# (the hub's ImageNet, flow and video files carry "num_cross_attention_heads": 1).
HF_DEFAULT_HEADS = {"num_self_attention_heads": 8, "num_cross_attention_heads": 8}


def config_overrides_from_hf(model: str, hf: Mapping[str, Any]) -> Dict[str, Any]:
    """perceiver_torch config values a transformers ``config.json`` gives that the
    tensors' shapes cannot reveal: the head counts (as transformers reads them: the
    file's, else PerceiverConfig's defaults), image and clip sizes, how often the
    ImageNet models' shared block repeats; the rest is derived. The video model's
    ``num_chunks`` (a decoding default, not in transformers' config) stays official."""
    _refuse_unrepresentable(model, hf)
    heads = {key: hf.get(key, default) for key, default in HF_DEFAULT_HEADS.items()}
    if model == "language_perceiver" and heads["num_cross_attention_heads"] != 8:
        raise MappingError(
            f"config.json gives num_cross_attention_heads="
            f"{heads['num_cross_attention_heads']}: PerceiverForMaskedLM's encoder "
            "cross-attention then has that many heads and its decoder 8 (a literal in "
            "transformers), where the official model, and perceiver_torch's, use one "
            "count for both; this checkpoint cannot be imported"
        )
    return {**heads, **_sizes_from_hf(model, hf)}


# config.json values that change what transformers computes without changing any
# tensor's shape, with the one the official architecture (and perceiver_torch) has;
# PerceiverConfig's defaults where the file leaves them out.
HF_FIXED_BEHAVIOUR = {"use_query_residual": True}


def _refuse_unrepresentable(model: str, hf: Mapping[str, Any]) -> None:
    """Raises :class:`MappingError` for a config.json whose transformers model computes
    something perceiver_torch cannot: importing it would silently give another model.
    (erf GELU, transformers' default, is the documented fidelity difference and is
    accepted: perceiver_torch computes the official tanh GELU.)"""
    wrong = []
    for key, official in HF_FIXED_BEHAVIOUR.items():
        if key in hf and hf[key] != official:
            wrong.append(f"{key}={json.dumps(hf[key])} (the official model: "
                         f"{json.dumps(official)})")
    act = hf.get("hidden_act", "gelu")
    if not (isinstance(act, str) and act.startswith("gelu") and act != "gelu_10"):
        wrong.append(f"hidden_act={json.dumps(act)} (the official model: a GELU)")
    # transformers repeats the whole self-attention stack num_blocks times; only the
    # ImageNet models (whose num_blocks perceiver_torch reads) have such a loop.
    blocks = hf.get("num_blocks", 1)
    if not model.startswith("imagenet_") and blocks != 1:
        wrong.append(f"num_blocks={json.dumps(blocks)} (the official {model}: 1)")
    if model == "video_autoencoding" and isinstance(hf.get("output_shape"), (list, tuple)):
        # (Another output_shape is left to the config's checks, which name it.)
        # transformers' Fourier features span (num_frames, image_size, image_size);
        # perceiver_torch's the frames after space-to-depth, output_shape[1:] / (1, 4, 4).
        shape = _int_list(hf, "output_shape", 4, "batch, frames, height, width")
        frames = _int_value(hf, "num_frames", 16)
        size = _int_value(hf, "image_size", 56)
        if shape[1] != frames or shape[2] != 4 * size or shape[3] != 4 * size:
            wrong.append(
                f"image_size={json.dumps(size)}, num_frames={json.dumps(frames)} with "
                f"output_shape={json.dumps(shape)} (the official model: output_shape "
                "[1, num_frames, 4 x image_size, 4 x image_size])"
            )
    if wrong:
        raise MappingError(
            f"config.json gives {'; '.join(wrong)}: transformers computes another "
            f"function with these, which the official {model}, and perceiver_torch's, "
            "cannot; this checkpoint cannot be imported"
        )


# perceiver_torch config keys that _sizes_from_hf reads from a config.json key of
# another name, by model: an error about the value names the key the file holds.
_READ_FROM_HF_KEY: Mapping[str, Mapping[str, str]] = {
    "optical_flow": {"image_size": "train_size"},
    "video_autoencoding": {"image_size": "output_shape"},
}


def hf_source_key(model: str, key: str) -> str:
    """The config.json key perceiver_torch's ``key`` of ``model`` is read from
    (``image_size`` of optical_flow: ``train_size``); ``key`` itself otherwise."""
    return _READ_FROM_HF_KEY.get(model, {}).get(key, key)


def _int_list(hf: Mapping[str, Any], key: str, length: int, what: str) -> List[int]:
    """config.json's ``key``, which transformers reads as ``length`` integers (the
    error also says which perceiver_torch key it becomes: train_size is image_size)."""
    value = hf[key]
    if not (isinstance(value, list) and len(value) == length
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        read_as = [ours for m in _READ_FROM_HF_KEY.values() for ours, theirs in m.items()
                   if theirs == key]
        read = f" (read as {read_as[0]})" if read_as else ""
        raise CheckpointError(
            f"config.json's {key}={json.dumps(value)}{read}: transformers reads it as a list "
            f"of {length} integers ({what}); correct config.json (save_pretrained writes "
            "it so)"
        )
    return list(value)


def _int_value(hf: Mapping[str, Any], key: str, default: int) -> int:
    """config.json's integer ``key`` (transformers' ``default`` when absent)."""
    value = hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(
            f"config.json's {key}={json.dumps(value)}: transformers reads it as an "
            "integer; correct config.json (save_pretrained writes it so)"
        )
    return value


def _sizes_from_hf(model: str, hf: Mapping[str, Any]) -> Dict[str, Any]:
    if model.startswith("imagenet_"):
        out = {"num_blocks": hf["num_blocks"]} if "num_blocks" in hf else {}
        if model == "imagenet_learned" and "image_size" in hf:
            size = hf["image_size"]
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            out["image_size"] = size
        return out
    if model == "optical_flow" and "train_size" in hf:
        return {"image_size": tuple(_int_list(hf, "train_size", 2, "height, width"))}
    if model == "video_autoencoding":
        out: Dict[str, Any] = {}
        if "output_shape" in hf:
            shape = _int_list(hf, "output_shape", 4, "batch, frames, height, width")
            out["image_size"] = tuple(shape[2:4])
        for key in ("num_frames", "audio_samples_per_frame", "samples_per_patch"):
            if key in hf:
                out[key] = hf[key]
        return out
    return {}


def architecture(model: str) -> str:
    """transformers' class name for ``model`` (from ``mappings/hf/<model>.yaml``)."""
    return str(load_hf_mapping(model).target["architecture"])


def build_hf_model(model: str, config_kwargs: Mapping[str, Any], *, meta: bool = False):
    """transformers' model for ``model`` with random weights (``meta``: no memory)."""
    transformers = require_transformers()
    cls = getattr(transformers, architecture(model))
    hf_cfg = transformers.PerceiverConfig(**config_kwargs)
    if meta:
        with torch.device("meta"):
            return cls(hf_cfg)
    return cls(hf_cfg)


def hf_targets(model: str, config_kwargs: Mapping[str, Any]) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Shapes and dtypes of transformers' state dict for this configuration."""
    hf_model = build_hf_model(model, config_kwargs, meta=True)
    return {
        key: (tuple(value.shape), str(value.dtype).replace("torch.", ""))
        for key, value in hf_model.state_dict().items()
    }


def expand_hf(spec: MappingSpec, config: Mapping[str, Any]):
    return spec.expand({**spec.config, **{k: _tuple(v) for k, v in config.items()}})


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def haiku_to_hf(
    model: str, config: Mapping[str, Any], flat: Mapping[str, np.ndarray]
) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], MappingSpec]:
    """Official Haiku arrays -> transformers' state dict (numpy), its PerceiverConfig
    keyword arguments and the mapping used. Checks totality both ways first."""
    spec = load_hf_mapping(model)
    kwargs = hf_config(model, config)
    table = expand_hf(spec, config)
    sources = {key: (tuple(a.shape), str(a.dtype)) for key, a in flat.items()}
    report = plan_forward(table, sources, hf_targets(model, kwargs), spec.name)
    report.raise_for_problems(
        f"internal error: {spec.file} does not fit transformers' "
        f"{spec.target.get('architecture')} for this configuration"
    )
    return dict(convert_arrays(table, flat)), kwargs, spec


# --------------------------------------------------------------------------------------
# Writing the folder.


def check_new_folder(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` may be created: its parent exists, it does not (or is an empty
    folder, not a link to one: the rename that publishes it cannot replace a link), and
    its name does not say a file format (``x.safetensors``, ``model.onnx``, ``.pickle``:
    a folder of that name would stand where a file is expected). Raises
    :class:`~converter.errors.OutputError` (a usage error) otherwise."""
    from converter.haiku_writer import OTHER_FORMAT_SUFFIXES

    out_dir = Path(out_dir)
    parent = out_dir.parent
    kind = {**OTHER_FORMAT_SUFFIXES, ".pickle": "a Haiku pickle", ".pkl": "a pickle",
            ".pystate": "a Haiku pickle"}.get(out_dir.suffix.lower())
    if kind is not None:
        raise OutputError(
            f"refusing to write a HuggingFace folder named {out_dir}: the suffix "
            f"{out_dir.suffix} says {kind}; name the folder without it (e.g. "
            f"{out_dir.with_suffix('')})"
        )
    if not parent.is_dir():
        raise OutputError(
            f"cannot write {out_dir}: the folder {parent} does not exist; create it first"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        # As check_output_path says for a file (exit 2, before the work): the folder
        # was refused only when the temporary folder was made, after the mapping,
        # as "writing ... failed" (exit 3).
        raise OutputError(
            f"cannot write {out_dir}: no write permission in {parent}; choose a "
            "writable folder"
        )
    if out_dir.is_symlink() and (not out_dir.exists() or _is_empty_folder(out_dir)):
        # The final rename(2) replaces the link itself, never writes through it, and
        # fails on one (ENOTDIR), so say so before the work rather than after it.
        target = Path(os.path.realpath(out_dir))
        what = "an empty folder" if out_dir.exists() else "a missing path"
        raise OutputError(
            f"refusing to write {out_dir}: it is a link to {what} ({target}); an "
            f"export writes a new folder and never replaces a link; give {target} "
            "itself or choose a new folder name"
        )
    if out_dir.exists() and not _is_empty_folder(out_dir):
        raise OutputError(
            f"{out_dir} already exists and is not an empty folder; choose a new folder "
            "name (an export never overwrites)"
        )
    return out_dir


def _is_empty_folder(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_folder(out_dir: Path):
    """Yields a temporary sibling folder that becomes ``out_dir`` if the block succeeds.

    ``out_dir`` must not exist (or be an empty folder): an export never overwrites,
    also not a folder or file another process puts at ``out_dir`` while this one
    writes (:class:`~converter.errors.OutputError`, that one kept). The files are
    fsynced before the rename and the parent folder after it, so a crash leaves either
    no ``out_dir`` or a whole one.
    """
    out_dir = check_new_folder(out_dir)
    parent = out_dir.parent
    from converter.atomic import fsync_folder, fsync_tree, raise_write_error, temporary_name

    temp = temporary_name(out_dir)
    try:
        temp.mkdir()
    except OSError as error:
        raise_write_error(out_dir, error)
    try:
        yield temp
        fsync_tree(temp)  # the files' data on disk before the rename names them
        _publish_folder(temp, out_dir)
        fsync_folder(parent)  # and the rename itself
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise_write_error(out_dir, error)  # disk full: one line, exit 3


def _publish_folder(temp: Path, out_dir: Path) -> None:
    """Renames the finished folder ``temp`` to ``out_dir`` without clobbering.

    rename(2) of a folder replaces an *empty* folder and fails on a non-empty one
    (ENOTEMPTY/EEXIST) or a file or link (ENOTDIR); that is the contract here (new or
    empty), so the rename itself is the no-clobber step: another export's folder is
    never empty (it holds config.json). Windows' rename never replaces a folder, hence
    the rmdir of an empty one first. A failure with ``out_dir`` now taken is the race
    (it was new or empty when checked): :class:`OutputError`, as the check says.
    """
    try:
        with contextlib.suppress(FileNotFoundError):
            if out_dir.is_dir() and not out_dir.is_symlink():
                out_dir.rmdir()  # empty when checked; ENOTEMPTY if filled since
        os.replace(temp, out_dir)
    except OSError:
        # What check_new_folder refuses, now there.
        if out_dir.is_symlink() or (out_dir.exists() and not _is_empty_folder(out_dir)):
            raise OutputError(
                f"refusing to write {out_dir}: it appeared while the export was being "
                "written (another run?) and was kept; choose a new folder name (an "
                "export never overwrites)"
            ) from None
        raise


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    from safetensors.numpy import save_file

    from converter.converted_files import header_metadata

    # np.asarray keeps a 0-d array 0-d (np.ascontiguousarray makes it shape (1,)).
    try:
        save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, str(path),
                  metadata=header_metadata(metadata))
    except Exception as error:
        # safetensors reports a failed write (disk full) as SafetensorError, which
        # the CLI took for an internal error ("unexpected ... please report it").
        if type(error).__name__ == "SafetensorError" and "I/O error" in str(error):
            detail = str(error).split("I/O error:", 1)[1].strip()
            raise OSError(f"{path.name}: {detail}") from error
        raise
    # safetensors creates its file 0600 whatever the umask; the folder's other files
    # (and every other output here) get the umask's permissions, as open() gives.
    os.chmod(path, _new_file_mode(path.parent))


def _new_file_mode(folder: Path) -> int:
    """The permissions ``open()`` gives a new file in ``folder`` (the umask's), read
    from a probe file: ``os.umask`` is only read by setting it, and a umask of 0 set
    for that instant applied to every file the process's other threads created
    meanwhile (group- and world-writable)."""
    from converter.atomic import temporary_name

    while True:
        probe = temporary_name(folder / "mode")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        os.unlink(probe)


def _write_processor_files(model: str, config: Mapping[str, Any], folder: Path) -> List[str]:
    """The image processor (ImageNet models) or tokenizer (language model) files."""
    transformers = require_transformers()
    before = set(os.listdir(folder))
    if model == "language_perceiver":
        tokenizer = transformers.PerceiverTokenizer(model_max_length=config["max_seq_len"])
        tokenizer.save_pretrained(str(folder))
    elif model.startswith("imagenet_"):
        from perceiver_torch.configs import config_from_dict

        height, width = config_from_dict(model, dict(config)).training_image_size
        # The hub's processor config, written as data (transformers' class needs
        # torchvision and Pillow just to be built): center crop 256, resize to 224
        # (bicubic), ImageNet normalisation; the crop keeps that 256:224 ratio.
        processor = {
            "image_processor_type": "PerceiverImageProcessor",
            "do_center_crop": True,
            "crop_size": {"height": height * 256 // 224, "width": width * 256 // 224},
            "do_resize": True,
            "size": {"height": height, "width": width},
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        }
        (folder / "preprocessor_config.json").write_text(
            json.dumps(processor, indent=2) + "\n"
        )
    return sorted(set(os.listdir(folder)) - before)


@dataclass
class HFExportResult:
    model: str
    output: Path
    architecture: str
    tensors: int
    files: List[str]
    fidelity: Dict[str, Any]
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "output": str(self.output),
            "format": "hf",
            "architecture": self.architecture,
            "tensors": self.tensors,
            "files": self.files,
            "fidelity": self.fidelity,
            "notes": self.notes,
        }


def export_hf(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    progress: Progress = quiet,
    mapping: Optional[str | os.PathLike] = None,
) -> HFExportResult:
    """Writes the transformers folder for a file made by :func:`converter.convert`,
    loads it back with transformers (strict) and measures its fidelity.

    ``mapping``: the mapping file the file was converted with, where that is not a
    bundled one (the export goes through the official names)."""
    from converter.exporter import converted_to_haiku, load_float32

    from converter.atomic import refuse_non_utf8_name

    require_transformers()
    out_dir = check_new_folder(out_dir)
    refuse_non_utf8_name(out_dir, "the safetensors library")
    haiku = converted_to_haiku(path, mapping=mapping)
    model, config = haiku.model, haiku.config
    progress(f"mapping {model} to transformers' keys")
    tensors, kwargs, spec = haiku_to_hf(model, config, haiku.flat)
    arch = str(spec.target["architecture"])
    metadata = {"format": "pt"}
    for key in HF_SOURCE_KEYS:
        if key in haiku.metadata:
            metadata[f"perceiver_convert.{key}"] = haiku.metadata[key]
    metadata["perceiver_convert.hf_mapping"] = spec.name
    metadata["perceiver_convert.hf_mapping_sha256"] = spec.sha256
    metadata["perceiver_convert.exporter"] = f"perceiver-convert {__version__}"
    with atomic_folder(out_dir) as folder:
        transformers = require_transformers()
        hf_cfg = transformers.PerceiverConfig(**kwargs)
        hf_cfg.architectures = [arch]
        hf_cfg.save_pretrained(str(folder))
        _write_safetensors(folder / "model.safetensors", tensors, metadata)
        files = ["config.json", "model.safetensors"]
        files += _write_processor_files(model, config, folder)
        progress("loading the folder back with transformers (strict)")
        hf_model = load_hf_folder(folder, arch)
        progress("fidelity: transformers against perceiver_torch on the same inputs")
        ours = load_float32(path)
        report = fidelity(model, ours, hf_model, seed=seed)
        report.update(
            {"source": Path(path).name, "architecture": arch, "model": model}
        )
        (folder / "fidelity.json").write_text(json_text(report) + "\n")
        files.append("fidelity.json")
    return HFExportResult(model, out_dir, arch, len(tensors), sorted(files), report,
                          list(haiku.notes))


def load_hf_folder(folder: str | os.PathLike, arch: str):
    """transformers' ``from_pretrained`` of ``folder``; any missing, unexpected or
    misshapen key is an error (transformers itself only warns)."""
    transformers = require_transformers()
    cls = getattr(transformers, arch)
    hf_logging = transformers.utils.logging
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own progress line says what happens
    try:
        hf_model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    problems = {
        k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                "mismatched_keys") and v
    }
    if problems:
        raise MappingError(f"transformers loads {folder} with problems: {problems}")
    _copy_out_of_the_file(hf_model)
    return hf_model.eval()


def _copy_out_of_the_file(module: torch.nn.Module) -> None:
    """Moves ``module``'s tensors from the memory-mapped file into memory of their own.

    transformers maps model.safetensors and its tensors start wherever the file's
    header ends, at any 4-byte offset. Matmul kernels round by alignment (on an AMD
    EPYC two exports of equal tensors whose headers differed in length gave logits
    that differed in their last bits), so a fidelity report would depend on the
    length of the file's metadata; PyTorch's own allocations are 64-byte aligned.
    It also lets go of the file before its folder is renamed into place."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


# --------------------------------------------------------------------------------------
# Fidelity: transformers' forward against perceiver_torch's.


def _compare(name: str, ours: torch.Tensor, theirs: torch.Tensor,
             argmax: bool, unit: str = "") -> Dict[str, Any]:
    ours64 = ours.detach().double()
    theirs64 = theirs.detach().double()
    diff = float((ours64 - theirs64).abs().max()) if ours64.numel() else 0.0
    scale = float(ours64.abs().max()) if ours64.numel() else 0.0
    row: Dict[str, Any] = {
        "output": name,
        "shape": list(ours.shape),
        "max_abs_diff": diff,
        "max_abs_reference": scale,
        "max_rel_diff": diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")),
        "argmax_agreement": (
            float((ours64.argmax(-1) == theirs64.argmax(-1)).double().mean())
            if argmax else None
        ),
    }
    if unit:
        row["unit"] = unit
    return row


def fidelity(model: str, ours: torch.nn.Module, hf_model: torch.nn.Module,
             *, seed: int = 0) -> Dict[str, Any]:
    """transformers' outputs against perceiver_torch's on the same deterministic inputs.

    max |diff|, max |diff| / max |perceiver_torch| and argmax agreement per output;
    the reference is perceiver_torch (faithful to the official model to ~1e-6).
    """
    gen = torch.Generator().manual_seed(seed)
    c = ours.config
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    with torch.no_grad():
        if model == "language_perceiver":
            length = c.max_seq_len
            ids = torch.randint(6, c.vocab_size, (1, length), generator=gen)
            real = (3 * length) // 4
            mask = torch.zeros(1, length, dtype=torch.long)
            mask[:, :real] = 1
            ids[:, real:] = 0
            ids[:, : real : 7] = 3  # some [MASK] tokens, as in masked language modelling
            a = ours(ids, attention_mask=mask)
            b = hf_model(inputs=ids, attention_mask=mask).logits
            # transformers drops the decoder's query mask: padded positions are noise.
            rows.append(_compare("logits (real tokens)", a[:, :real], b[:, :real], True))
            notes.append(f"{real} real tokens of {length}; padding positions not compared")
        elif model.startswith("imagenet_"):
            height, width = c.training_image_size
            images = torch.randn(1, 3, height, width, generator=gen)
            a = ours(images)
            b = hf_model(inputs=images).logits
            rows.append(_compare("logits", a, b, True))
        elif model == "optical_flow":
            from perceiver_torch.preprocessors import flow_patches

            height, width = c.image_size
            frames = torch.rand(1, 2, 3, height, width, generator=gen) * 2 - 1
            a = ours(frames)  # (B, 2, H, W), pixels
            # transformers takes the 3x3 patches, (B, frames, 27, H, W), channels in the
            # official (row, col, channel) order, and returns flow / rescale_factor.
            patches = flow_patches(frames).reshape(1, height, width, 2, 27)
            patches = patches.permute(0, 3, 4, 1, 2).contiguous()
            b = hf_model(inputs=patches).logits.permute(0, 3, 1, 2) * c.flow_scale
            rows.append(_compare("flow", a, b, False, unit="pixels"))
            notes.append(f"transformers' output x flow_scale ({c.flow_scale}) = pixels")
        elif model == "video_autoencoding":
            t, (h, w) = c.num_frames, c.image_size
            images = torch.rand(1, t, 3, h, w, generator=gen)
            audio = 0.3 * torch.randn(1, t * c.audio_samples_per_frame, generator=gen)
            chunk = ours.chunk_subsamples()[c.num_chunks // 2]
            a = ours(images, audio, subsample=chunk)
            b = hf_model(
                inputs={
                    "image": images,
                    "audio": audio[..., None],
                    "label": torch.zeros(1, c.num_classes),
                },
                subsampled_output_points={
                    "image": chunk["image"], "audio": chunk["audio"], "label": None
                },
            ).logits
            b = {k: v.reshape(a[k].shape) for k, v in b.items()}
            for key in ("audio", "image", "label"):
                rows.append(_compare(key, a[key], b[key], key == "label"))
            notes.append(f"chunk {c.num_chunks // 2} of {c.num_chunks}")
        else:
            raise ValueError(f"unknown model {model!r}")
    return {
        "reference": "perceiver_torch (faithful to the official model)",
        "seed": seed,
        "batch": 1,
        "outputs": rows,
        "notes": notes,
        "transformers": require_transformers().__version__,
    }


def format_fidelity(report: Mapping[str, Any]) -> str:
    lines = [
        f"fidelity of transformers' {report.get('architecture', '')} against "
        f"perceiver_torch (seed {report['seed']})",
        f"  {'output':<22} {'shape':<18} {'max|diff|':>10} {'max rel':>10} {'argmax':>8}",
    ]
    for row in report["outputs"]:
        argmax = "-" if row["argmax_agreement"] is None else f"{row['argmax_agreement']:.2%}"
        unit = f" {row['unit']}" if row.get("unit") else ""
        lines.append(
            f"  {row['output']:<22} {str(row['shape']):<18} {row['max_abs_diff']:>10.2e} "
            f"{row['max_rel_diff']:>10.2e} {argmax:>8}{unit}"
        )
    lines += [f"  note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)
