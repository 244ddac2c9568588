"""What running a converted model in bfloat16 or float16 does to its answers.

``fidelity_prepared(prepared, "bfloat16")`` runs the JAX reference (float32), the
converted perceiver_torch model in float32 and the same model in the reduced dtype on
the same deterministic, structured inputs, and reports per output, against the JAX
reference and against float32 perceiver_torch:

- max relative diff (max |diff| / max |reference|);
- argmax (top-1) agreement: language over every position of a natural English text
  (15% of its bytes masked, as in masked language modelling), ImageNet over a batch
  of structured images (gradients, stripes, checkerboards, discs, rectangles), the
  video model's label;
- optical flow: end-point error in pixels (mean and max of the per-pixel Euclidean
  distance between the two flow fields), on a textured frame and its shifted copy;
- video: PSNR of the reconstruction, 20 log10(peak-to-peak of the reference / RMS
  difference), for the reference chunk and (against float32) the whole clip.

The float32 model's own figures against JAX are listed too, as the floor. The inputs
are made here (no data set is needed); with random weights the figures measure the
arithmetic, not the task. ``perceiver-convert verify --dtype`` and
``scripts/bench_precision.py`` print this report. Needs the ``[jax]`` extra.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

import perceiver_torch
from converter.progress import Progress, quiet
from converter.verify import Case, compare, require_jax, run_reference
from perceiver_torch.registry import resolve_dtype

REDUCED_DTYPES = ("bfloat16", "float16")

# ImageNet normalisation (the official colab's), applied to the generated images.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

# A natural English text for the language model (written for this project; longer
# than the official 2048 bytes, and cut to the model's max_seq_len).
NATURAL_TEXT = (
    "The river was low that autumn, and the stones along its banks had turned pale "
    "in the sun. Every morning the ferryman walked down from the village before the "
    "mist had lifted, untied his boat and waited for the first travellers of the day. "
    "Some were farmers carrying baskets of apples to the market on the other side; "
    "some were children on their way to school, who argued about the names of the "
    "birds that followed the boat; and now and then a stranger came, with a heavy "
    "coat and a map that was already out of date. The ferryman liked the strangers "
    "best. He asked them where they had come from and where they were going, and he "
    "remembered their answers long after they had gone. In the evenings, when the "
    "light fell across the water and the last boat was tied up for the night, he sat "
    "by the window of his small house and wrote down what he had heard: a city by "
    "the sea where the streets were so steep that the houses seemed to stand on each "
    "other's shoulders; a valley where the wind never stopped and the trees grew "
    "bent towards the east; a market where a hundred languages were spoken and no "
    "one could remember which had come first. His daughter, who had moved to the "
    "city years before, sent him letters twice a month. She wrote about her work at "
    "the library, about the trains that were always late, about the neighbour who "
    "played the violin badly but with great feeling every Sunday afternoon. He read "
    "each letter twice, once quickly to know that she was well, and once slowly to "
    "hear her voice in the words. When winter came, the river rose again and the "
    "crossing became harder. The current pulled at the boat and the ropes grew stiff "
    "with cold. Fewer people came, and those who did came in silence, their hands "
    "deep in their pockets. Still he went down every morning, because someone might "
    "be waiting, and because a ferry that does not cross is only a boat. One grey "
    "morning in December a young woman stood on the far bank with a suitcase and a "
    "folded letter in her hand. He knew her before he could see her face. She had "
    "come home for the holidays, she said, and she had taken the early train so that "
    "she could cross with him, the way she used to when she was small. They did not "
    "say much on the water. The mist was thick, the oars creaked, and somewhere "
    "upstream a heron called. But when they reached the landing she took the rope "
    "from him and tied the knot herself, exactly as he had taught her, and he "
    "thought that some things are carried across a river and some are carried "
    "across a lifetime, and that both need a steady hand and a little patience."
)


def natural_tokens(length: int, seed: int = 0, mask_fraction: float = 0.15):
    """The first ``length`` bytes of :data:`NATURAL_TEXT` as ids, ``mask_fraction`` of
    them replaced by [MASK] (chosen with ``seed``), every position real.

    Returns (ids int64 (1, length), mask int64 (1, length)).
    """
    tokenizer = perceiver_torch.BytesTokenizer()
    ids = tokenizer.encode(NATURAL_TEXT)
    if len(ids) < length:
        ids = (ids * (length // len(ids) + 1))
    ids = torch.tensor(ids[:length], dtype=torch.int64)[None]
    rng = np.random.default_rng(seed)
    masked = torch.from_numpy(rng.random(length) < mask_fraction)
    ids[0, masked] = tokenizer.MASK
    return ids, torch.ones_like(ids)


def structured_images(batch: int, height: int, width: int) -> np.ndarray:
    """``batch`` RGB images in [0, 1] of different structured patterns: colour
    gradients, stripes at several angles and frequencies, checkerboards, discs and
    rectangles (no noise). Returns float32 (B, H, W, 3)."""
    y, x = np.meshgrid(
        np.linspace(0, 1, height, dtype=np.float64),
        np.linspace(0, 1, width, dtype=np.float64),
        indexing="ij",
    )
    images = []
    for i in range(batch):
        kind = i % 6
        phase = i // 6
        if kind == 0:  # two-colour gradient
            a = (x * math.cos(0.7 * i) + y * math.sin(0.7 * i)) % 1.0
            rgb = [a, 1 - a, 0.5 * (a + y)]
        elif kind == 1:  # stripes
            angle, freq = 0.4 + 0.9 * i, 2 + i % 4
            s = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle)))
            rgb = [s, 0.3 + 0.4 * s, 1 - s]
        elif kind == 2:  # checkerboard
            n = 4 + 2 * (i % 3)
            c = ((np.floor(x * n) + np.floor(y * n)) % 2).astype(np.float64)
            rgb = [0.2 + 0.6 * c, 0.8 - 0.6 * c, 0.5 * np.ones_like(c)]
        elif kind == 3:  # a disc on a gradient
            cy, cx, r = 0.5 + 0.2 * math.sin(i), 0.5 + 0.2 * math.cos(i), 0.25
            d = ((y - cy) ** 2 + (x - cx) ** 2 < r * r).astype(np.float64)
            rgb = [0.9 * d + 0.1 * y, 0.2 + 0.5 * x, 0.8 * (1 - d)]
        elif kind == 4:  # rectangles
            r1 = ((x > 0.1) & (x < 0.6) & (y > 0.2) & (y < 0.7)).astype(np.float64)
            r2 = ((x > 0.4) & (x < 0.9) & (y > 0.5) & (y < 0.95)).astype(np.float64)
            rgb = [0.1 + 0.8 * r1, 0.1 + 0.8 * r2, 0.5 * (r1 + r2)]
        else:  # concentric rings
            rho = np.hypot(y - 0.5, x - 0.5)
            s = 0.5 + 0.5 * np.cos(2 * math.pi * (6 + phase) * rho)
            rgb = [s, s * (1 - y), 1 - s * x]
        images.append(np.stack(rgb, axis=-1))
    return np.clip(np.stack(images), 0.0, 1.0).astype(np.float32)


def textured_frame(height: int, width: int, shift: tuple = (0, 0)) -> np.ndarray:
    """A smooth, textured RGB frame in [-1, 1] (sums of sinusoids and a disc), moved
    by ``shift`` = (dy, dx) pixels: a frame pair with a known motion. (H, W, 3)."""
    dy, dx = shift
    y, x = np.meshgrid(
        np.arange(height, dtype=np.float64) - dy,
        np.arange(width, dtype=np.float64) - dx,
        indexing="ij",
    )
    channels = []
    for c in range(3):
        v = (
            np.sin(x / (7.0 + 2 * c)) * np.cos(y / (11.0 - c))
            + 0.5 * np.sin((x + 2 * y) / (5.0 + c))
            + 0.8 * (((x - width / 2) ** 2 + (y - height / 2) ** 2) < (height / 4) ** 2)
        )
        channels.append(v)
    frame = np.stack(channels, axis=-1)
    return (frame / np.abs(frame).max()).astype(np.float32)


def structured_case(name: str, config: Any, batch: Optional[int] = None) -> Case:
    """Deterministic, structured inputs for model ``name`` (see the module doc).

    batch: images for the ImageNet models (default 8), clips or frame pairs for the
    others (default 1); the language model always reads one text.
    """
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if name == "language_perceiver":
        ids, mask = natural_tokens(config.max_seq_len)
        return Case(
            jax_inputs={"inputs": ids.numpy().astype(np.int32), "input_mask": mask.numpy().astype(np.int32)},
            torch_inputs={"input_ids": ids, "attention_mask": mask},
            outputs=lambda out: {"logits": np.asarray(out)},
            torch_outputs=lambda out: {"logits": out.float().numpy()},
            argmax={"logits": -1},
        )
    if name.startswith("imagenet_"):
        height, width = config.training_image_size
        images = structured_images(8 if batch is None else batch, height, width)
        images = (images - IMAGENET_MEAN) / IMAGENET_STD
        return Case(
            jax_inputs={"images": images},
            torch_inputs={"images": torch.from_numpy(images.transpose(0, 3, 1, 2).copy())},
            outputs=lambda out: {"logits": np.asarray(out)},
            torch_outputs=lambda out: {"logits": out.float().numpy()},
            argmax={"logits": -1},
        )
    if name == "optical_flow":
        height, width = config.image_size
        pairs = []
        for i in range(batch or 1):
            first = textured_frame(height, width, (i, 0))
            pairs.append(np.stack([first, textured_frame(height, width, (i + 2, 3))]))
        frames = np.stack(pairs)  # (B, 2, H, W, 3)
        return Case(
            jax_inputs={"images": frames},
            torch_inputs={"frames": torch.from_numpy(frames.transpose(0, 1, 4, 2, 3).copy())},
            outputs=lambda out: {"flow": np.asarray(out)},
            torch_outputs=lambda out: {"flow": out.float().permute(0, 2, 3, 1).numpy()},
            argmax={"flow": None},
        )
    if name == "video_autoencoding":
        t = config.num_frames
        height, width = config.image_size
        samples = t * config.audio_samples_per_frame
        clips, sounds = [], []
        for b in range(batch or 1):
            # A pattern moving one pixel per frame, and a chord of two tones.
            frames = [(textured_frame(height, width, (f + b, 2 * f)) + 1) / 2 for f in range(t)]
            clips.append(np.stack(frames))
            s = np.arange(samples) / 48000.0
            sounds.append(0.3 * np.sin(2 * math.pi * (440 + 110 * b) * s) + 0.2 * np.sin(2 * math.pi * 660 * s))
        images = np.stack(clips).astype(np.float32)  # (B, T, H, W, 3)
        audio = np.stack(sounds).astype(np.float32)[..., None]
        subsampling = require_jax().video_subsampling(config, config.num_chunks // 2)
        return Case(
            jax_inputs={"images": images, "audio": audio, "subsampling": subsampling},
            torch_inputs={
                "images": torch.from_numpy(images.transpose(0, 1, 4, 2, 3).copy()),
                "audio": torch.from_numpy(audio[..., 0].copy()),
                "subsample": {
                    key: torch.from_numpy(index.astype(np.int64))
                    for key, index in subsampling.items()
                },
            },
            outputs=lambda out: {k: np.asarray(out[k]) for k in ("audio", "image", "label")},
            torch_outputs=lambda out: {k: out[k].float().numpy() for k in ("audio", "image", "label")},
            argmax={"audio": None, "image": None, "label": -1},
        )
    raise ValueError(f"no fidelity inputs for model {name!r}")


# -- metrics ------------------------------------------------------------------------


def end_point_error(reference: np.ndarray, actual: np.ndarray) -> tuple:
    """(mean, max) of the per-pixel Euclidean distance of two flows (..., 2), pixels."""
    distance = np.sqrt(((np.asarray(reference, np.float64) - actual) ** 2).sum(-1))
    return float(distance.mean()), float(distance.max())


def psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    """20 log10(peak-to-peak of ``reference`` / RMS of the difference), dB (inf when
    equal). The peak is the reference's own range, since outputs of random weights
    are not in [0, 1]."""
    reference = np.asarray(reference, np.float64)
    rms = math.sqrt(float(np.mean((reference - np.asarray(actual, np.float64)) ** 2)))
    peak = float(reference.max() - reference.min())
    if rms == 0:
        return math.inf
    return 20 * math.log10(peak / rms) if peak > 0 else -math.inf


@dataclass
class FidelityRow:
    """One output of one run compared with one reference."""

    output: str
    run: str  # "float32" or the reduced dtype
    against: str  # "jax" or "float32"
    shape: List[int]
    max_abs_diff: float
    relative: float
    argmax_agreement: Optional[float] = None
    epe_mean: Optional[float] = None
    epe_max: Optional[float] = None
    psnr_db: Optional[float] = None


@dataclass
class FidelityReport:
    model: str
    dtype: str
    size_preset: str
    batch: int
    rows: List[FidelityRow] = field(default_factory=list)
    finite: bool = True
    seconds: Dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Reduced precision has no parity tolerance; it fails only on inf/NaN."""
        return self.finite

    def as_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "size_preset": self.size_preset,
            "batch": self.batch,
            "finite": self.finite,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "rows": [asdict(r) for r in self.rows],
        }

    def format_table(self) -> str:
        lines = [
            f"fidelity of {self.model} in {self.dtype} ({self.size_preset}, batch "
            f"{self.batch}, structured inputs)",
            f"  {'output':<14} {'run':<9} {'against':<8} {'max rel':>9} {'argmax':>8} "
            f"{'EPE mean/max px':>16} {'PSNR dB':>8}",
        ]
        for r in self.rows:
            argmax = "-" if r.argmax_agreement is None else f"{r.argmax_agreement:.2%}"
            epe = "-" if r.epe_mean is None else f"{r.epe_mean:.3g}/{r.epe_max:.3g}"
            db = "-" if r.psnr_db is None else f"{r.psnr_db:.1f}"
            lines.append(
                f"  {r.output:<14} {r.run:<9} {r.against:<8} {r.relative:>9.2e} "
                f"{argmax:>8} {epe:>16} {db:>8}"
            )
        if not self.finite:
            lines.append(f"  FAILED: the {self.dtype} outputs are not all finite")
        return "\n".join(lines)


def _row(output: str, run: str, against: str, reference, actual, argmax_axis) -> FidelityRow:
    c = compare(output, "output", reference, actual, None, argmax_axis)
    row = FidelityRow(
        output, run, against, list(c.shape), c.max_abs_diff, c.relative, c.argmax_agreement
    )
    if output == "flow":
        row.epe_mean, row.epe_max = end_point_error(reference, actual)
    if output.startswith(("image", "audio")):
        row.psnr_db = psnr(reference, actual)
    return row


def _run(model: torch.nn.Module, case: Case) -> Dict[str, np.ndarray]:
    with torch.no_grad():
        return case.torch_outputs(model(**case.torch_inputs))


def fidelity_prepared(
    prepared: Any,
    dtype: str,
    *,
    batch: Optional[int] = None,
    whole_clip: bool = True,
    seed: int = 0,
    progress: Progress = quiet,
    cache: Optional[Dict[str, Any]] = None,
) -> FidelityReport:
    """The fidelity report of a :class:`~converter.conversion.PreparedConversion` run
    in ``dtype`` ("bfloat16" or "float16"); see the module doc. ``whole_clip``: also
    reconstruct the whole video clip in both precisions (PSNR against float32).
    ``cache``: a dict kept across calls for the same conversion and inputs, so that
    reports for several dtypes share one JAX and one float32 run."""
    if dtype not in REDUCED_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(REDUCED_DTYPES)}, got {dtype!r}")
    require_jax()
    name = prepared.model
    config = prepared.config_object()
    case = structured_case(name, config, batch)
    first = next(iter(case.torch_inputs.values()))
    report = FidelityReport(
        name, dtype, prepared.config.preset or "custom", int(first.shape[0])
    )

    cache = {} if cache is None else cache
    if "reference" not in cache:
        progress("fidelity: running the JAX reference on structured inputs")
        started = time.perf_counter()
        cache["reference"], _ = run_reference(
            name, config, prepared.checkpoint.params, prepared.checkpoint.state, case, seed
        )
        cache["seconds_jax"] = time.perf_counter() - started
    reference = cache["reference"]
    report.seconds["jax"] = cache["seconds_jax"]

    model = prepared.build_model()
    images, audio = case.torch_inputs.get("images"), case.torch_inputs.get("audio")
    clip = whole_clip and name == "video_autoencoding"
    if "float32" not in cache or (clip and "clip" not in cache):
        progress("fidelity: running the PyTorch model in float32")
        started = time.perf_counter()
        cache["float32"] = _run(model, case)
        cache["seconds_float32"] = time.perf_counter() - started
        if clip:
            with torch.no_grad():
                cache["clip"] = model.reconstruct(
                    images, audio, num_chunks=config.num_chunks
                )
    full = cache["float32"]
    report.seconds["float32"] = cache["seconds_float32"]
    clip_full = cache.get("clip") if clip else None
    clip_low = None

    progress(f"fidelity: running the PyTorch model in {dtype}")
    model = model.to(resolve_dtype(dtype))
    started = time.perf_counter()
    low = _run(model, case)
    report.seconds[dtype] = time.perf_counter() - started
    if clip_full is not None:
        with torch.no_grad():
            clip_low = model.reconstruct(images, audio, num_chunks=config.num_chunks)
    del model

    report.finite = all(np.isfinite(v).all() for v in low.values())
    for key, value in reference.items():
        axis = case.argmax[key]
        report.rows.append(_row(key, "float32", "jax", value, full[key], axis))
        report.rows.append(_row(key, dtype, "jax", value, low[key], axis))
        report.rows.append(_row(key, dtype, "float32", full[key], low[key], axis))
    if clip_full is not None:
        for key in ("image", "audio"):
            got = clip_low[key].float().numpy()
            report.finite = report.finite and bool(np.isfinite(got).all())
            report.rows.append(
                _row(f"{key} (clip)", dtype, "float32", clip_full[key].numpy(), got, None)
            )
    return report


def fidelity(
    path: Any,
    dtype: str,
    model: Optional[str] = None,
    *,
    config: Optional[Dict[str, Any]] = None,
    mapping: Optional[Any] = None,
    batch: Optional[int] = None,
    whole_clip: bool = True,
    progress: Progress = quiet,
) -> FidelityReport:
    """Converts the official checkpoint ``path`` in memory and reports its fidelity
    in ``dtype`` (see :func:`fidelity_prepared`)."""
    from converter.conversion import prepare

    require_jax()
    prepared = prepare(path, model, config=config, mapping=mapping)
    return fidelity_prepared(
        prepared, dtype, batch=batch, whole_clip=whole_clip, progress=progress
    )
