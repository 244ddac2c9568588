"""Numerical parity of a converted model against the JAX reference.

``verify`` runs :mod:`perceiver_jax` (the official modules restated in Haiku, fed the
original checkpoint) and the converted :mod:`perceiver_torch` model on the same
deterministic inputs and compares, per stage, the preprocessed inputs, the latents
after the encoder, the decoder output and the final outputs: max |diff|, max |diff| /
max |reference| and argmax agreement. The final outputs must be within the mapping's
tolerance (``tolerance.relative``); the earlier stages are reported for diagnosis.

The one allowed exception is ``tolerance.fourier_outputs``: outputs whose end-to-end
error may be larger because the official float32 Fourier features are themselves
inexact (perceiver_torch computes them in float64). For those, the PyTorch model is run
a second time with the reference's own float32 Fourier features injected, and that run
must meet ``tolerance.relative``: this shows the features are the whole cause.

Reduced precision (``convert --dtype float16|bfloat16 --verify``): the model runs
with the weights that are written, rounded to that dtype (and computed in float32,
as ``perceiver_torch.load(...).float()`` runs them), against the same float32 JAX
reference. The tolerance is the mapping's ``tolerance.float16`` / ``.bfloat16``, or by
default :data:`ROUNDING_TOLERANCE` (see there for the analysis); the argmax
agreement is reported but not required, since rounding may swap near-tied logits
without any mistake in the conversion.

Needs the ``[jax]`` extra; everything else in the converter works without it.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

import perceiver_torch
from converter.errors import (
    ParityError,
    UsageError,
    check_positive_int,
    extra_import_error,
)
from converter.progress import Progress, quiet

STAGES = ("preprocessed", "latents", "decoder_output")

# The largest --seed: the JAX reference's PRNGKey takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1

# Unit roundoff of the storage dtypes: rounding to nearest changes a weight by at most
# this fraction of itself (2^-24 float32, 2^-11 float16, 2^-8 bfloat16).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}

# Default parity tolerance of reduced-precision weights: 16 x the unit roundoff u
# (float16 7.8e-3, bfloat16 6.25e-2). Why: rounding moves each weight by a relative
# amount in [-u, u], independently (std u/sqrt(3)); a layer's output, a sum of many
# such terms, moves by about that relative amount too. The residual stream and the
# LayerNorms keep it from compounding with depth: the outputs move by a few u, and
# measured (max |diff| / max |ref| against the float32 JAX reference) they do: 0.5 to
# 4.5 u for the six tiny golden checkpoints, 1.4 to 1.8 u at the official sizes of
# the deepest models (imagenet_fourier, 48 self-attends; language_perceiver, 26),
# float16 and bfloat16 alike (random weights, seed 0, 2026-12-01). 16 u
# leaves a factor of 3.5 above the largest measured; a mapping mistake changes the
# outputs by O(1) (one square weight transposed in tiny imagenet_fourier: 0.14 =
# 37 u of bfloat16), so the check still tells a right conversion from a wrong one.
ROUNDING_FACTOR = 16
ROUNDING_TOLERANCE = {
    dtype: ROUNDING_FACTOR * u for dtype, u in UNIT_ROUNDOFF.items() if dtype != "float32"
}


def dtype_tolerance(tolerance: Mapping[str, Any], dtype: str) -> Optional[float]:
    """The mapping's tolerance for weights stored as ``dtype`` (None for float32)."""
    if dtype == "float32":
        return None
    return float(tolerance.get(dtype, ROUNDING_TOLERANCE[dtype]))


def require_jax() -> Any:
    """Imports perceiver_jax, or explains how to install it."""
    try:
        import perceiver_jax  # noqa: F401  (imports jax and haiku)
    except ImportError as error:
        # A missing optional extra: exit 2, as for run's media libraries.
        raise extra_import_error(
            error,
            f"verifying needs jax and dm-haiku ({error}); install them with "
            "`pip install 'perceiver-convert[jax]'`",
            "jax",
        ) from None
    return perceiver_jax


@dataclass
class Comparison:
    """One tensor compared between the JAX reference and the PyTorch model."""

    name: str
    # "stage" (an intermediate, reported only), "output" (checked against the
    # tolerance) or "fourier" (an output rerun with the reference's Fourier features).
    kind: str
    shape: Tuple[int, ...]
    max_abs_diff: float
    max_abs_ref: float
    relative: float
    argmax_agreement: Optional[float]
    tolerance: Optional[float]
    passed: Optional[bool]


@dataclass
class ParityReport:
    model: str
    size_preset: str
    batch: int
    seed: int
    comparisons: List[Comparison] = field(default_factory=list)
    # The dtype of the weights the PyTorch model ran with (what is written).
    dtype: str = "float32"
    seconds_jax: float = 0.0
    seconds_torch: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.comparisons if c.kind != "stage")

    def worst_output(self) -> Optional[Comparison]:
        """The output closest to (or furthest past) its tolerance: the largest
        relative / tolerance (outputs without a tolerance: the largest relative)."""
        outputs = [c for c in self.comparisons if c.kind == "output"]
        checked = [c for c in outputs if c.tolerance]
        if checked:
            return max(checked, key=lambda c: c.relative / c.tolerance)
        return max(outputs, key=lambda c: c.relative, default=None)

    def as_dict(self) -> Dict[str, Any]:
        # The summary's numbers are one output's, so that max_relative <= tolerance
        # exactly when the outputs pass (the video model's audio has 1e-4, its image
        # 1e-5: the largest of each could come from different outputs).
        worst = self.worst_output()
        return {
            "model": self.model,
            "size_preset": self.size_preset,
            "batch": self.batch,
            "seed": self.seed,
            "passed": self.passed,
            "dtype": self.dtype,
            "worst_output": worst.name if worst else None,
            "tolerance": worst.tolerance if worst else None,
            "max_relative": worst.relative if worst else None,
            "seconds_jax": round(self.seconds_jax, 3),
            "seconds_torch": round(self.seconds_torch, 3),
            "comparisons": [
                {**asdict(c), "shape": list(c.shape)} for c in self.comparisons
            ],
        }

    def format_table(self) -> str:
        lines = [
            f"parity of {self.model} ({self.size_preset}, {self.dtype} weights, batch "
            f"{self.batch}, seed {self.seed}) against the JAX reference",
            f"  {'stage':<26} {'shape':<20} {'max|diff|':>10} {'max rel':>10} "
            f"{'argmax':>8} {'tolerance':>10}  result",
        ]
        for c in self.comparisons:
            argmax = "-" if c.argmax_agreement is None else f"{c.argmax_agreement:.2%}"
            tol = "-" if c.tolerance is None else f"{c.tolerance:.2g}"
            if c.passed is None:
                result = "(info)"
            else:
                result = "ok" if c.passed else "FAIL"
            label = {
                "output": c.name,
                "stage": f"{c.name} (stage)",
                "fourier": f"{c.name} (JAX Fourier)",
            }[c.kind]
            lines.append(
                f"  {label:<26} {str(list(c.shape)):<20} {c.max_abs_diff:>10.2e} "
                f"{c.relative:>10.2e} {argmax:>8} {tol:>10}  {result}"
            )
        lines.append(
            f"  {'PASSED' if self.passed else 'FAILED'} (jax {self.seconds_jax:.1f} s, "
            f"torch {self.seconds_torch:.1f} s)"
        )
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            failed = [c.name for c in self.comparisons if c.passed is False]
            error = ParityError(
                f"{self.model}: outputs outside tolerance: {', '.join(failed)}\n"
                + self.format_table()
            )
            error.details = {"parity": self.as_dict()}  # for the --json document
            raise error


def compare(
    name: str,
    kind: str,
    reference: np.ndarray,
    actual: np.ndarray,
    tolerance: Optional[float],
    argmax_axis: Optional[int] = None,
    require_argmax: bool = True,
) -> Comparison:
    """Whole-tensor comparison: max |diff| / max |reference| against ``tolerance``
    (and, with ``require_argmax``, 100% argmax agreement)."""
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if reference.shape != actual.shape:
        return Comparison(
            name,
            kind,
            tuple(actual.shape),
            float("inf"),
            float("nan"),
            float("inf"),
            None,
            tolerance,
            False if tolerance is not None else None,
        )
    diff = float(np.max(np.abs(reference - actual))) if reference.size else 0.0
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    relative = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    if not np.all(np.isfinite(actual)):
        relative = float("inf")
    agreement = None
    if argmax_axis is not None:
        agreement = float(
            np.mean(
                np.argmax(reference, axis=argmax_axis)
                == np.argmax(actual, axis=argmax_axis)
            )
        )
    passed = None
    if tolerance is not None:
        passed = relative <= tolerance and (
            agreement is None or agreement == 1.0 or not require_argmax
        )
    return Comparison(
        name,
        kind,
        tuple(reference.shape),
        diff,
        scale,
        relative,
        agreement,
        tolerance,
        passed,
    )


# --------------------------------------------------------------------------------------
# Deterministic inputs per model: (jax inputs, torch inputs), and output adapters.


@dataclass
class Case:
    jax_inputs: Dict[str, Any]
    torch_inputs: Dict[str, Any]
    # name -> (jax output as numpy in the comparison layout, argmax axis or None)
    outputs: Callable[[Any], Dict[str, np.ndarray]]
    torch_outputs: Callable[[Any], Dict[str, np.ndarray]]
    argmax: Dict[str, Optional[int]]


def _language_case(config: Any, rng: np.random.Generator, batch: int) -> Case:
    length = config.max_seq_len
    tokens = rng.integers(6, config.vocab_size, size=(batch, length)).astype(np.int32)
    mask = np.zeros((batch, length), np.int32)
    for row in range(batch):
        # Real tokens followed by padding, as the tokenizer pads to max_seq_len; a few
        # real tokens are the [MASK] id, as in masked language modelling.
        real = max(1, (length * (3 - row % 2)) // 4 - row)
        mask[row, :real] = 1
        masked = rng.random(real) < 0.15
        tokens[row, :real][masked] = 3
        tokens[row, real:] = 0
    return Case(
        jax_inputs={"inputs": tokens, "input_mask": mask},
        torch_inputs={
            "input_ids": torch.from_numpy(tokens.astype(np.int64)),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
        },
        outputs=lambda out: {"logits": np.asarray(out)},
        torch_outputs=lambda out: {"logits": out.numpy()},
        argmax={"logits": -1},
    )


def _imagenet_case(
    name: str, config: Any, rng: np.random.Generator, batch: int
) -> Case:
    height, width = config.training_image_size
    images = rng.standard_normal((batch, height, width, 3)).astype(np.float32)
    return Case(
        jax_inputs={"images": images},
        torch_inputs={"images": torch.from_numpy(images.transpose(0, 3, 1, 2).copy())},
        outputs=lambda out: {"logits": np.asarray(out)},
        torch_outputs=lambda out: {"logits": out.numpy()},
        argmax={"logits": -1},
    )


def _flow_case(config: Any, rng: np.random.Generator, batch: int) -> Case:
    height, width = config.image_size
    frames = rng.uniform(-1, 1, (batch, 2, height, width, 3)).astype(np.float32)
    return Case(
        jax_inputs={"images": frames},
        torch_inputs={
            "frames": torch.from_numpy(frames.transpose(0, 1, 4, 2, 3).copy())
        },
        outputs=lambda out: {"flow": np.asarray(out)},
        # torch gives [B, 2, H, W]; compare in the official [B, H, W, 2] layout.
        torch_outputs=lambda out: {"flow": out.permute(0, 2, 3, 1).numpy()},
        argmax={"flow": None},
    )


def _video_case(config: Any, rng: np.random.Generator, batch: int) -> Case:
    frames = config.num_frames
    height, width = config.image_size
    samples = frames * config.audio_samples_per_frame
    images = rng.uniform(0, 1, (batch, frames, height, width, 3)).astype(np.float32)
    audio = (0.3 * rng.standard_normal((batch, samples, 1))).astype(np.float32)
    # A chunk in the middle of the clip, so the query positions are not the first ones.
    subsampling = require_jax().video_subsampling(config, config.num_chunks // 2)
    return Case(
        jax_inputs={
            "images": images,
            "audio": audio,
            "subsampling": subsampling,
        },
        torch_inputs={
            "images": torch.from_numpy(images.transpose(0, 1, 4, 2, 3).copy()),
            "audio": torch.from_numpy(audio[..., 0].copy()),
            "subsample": {
                key: torch.from_numpy(index.astype(np.int64))
                for key, index in subsampling.items()
            },
        },
        outputs=lambda out: {
            k: np.asarray(out[k]) for k in ("audio", "image", "label")
        },
        torch_outputs=lambda out: {
            k: out[k].numpy() for k in ("audio", "image", "label")
        },
        argmax={"audio": None, "image": None, "label": -1},
    )


def make_case(name: str, config: Any, seed: int = 0, batch: int = 1) -> Case:
    rng = np.random.default_rng(seed)
    if name == "language_perceiver":
        return _language_case(config, rng, batch)
    if name.startswith("imagenet_"):
        return _imagenet_case(name, config, rng, batch)
    if name == "optical_flow":
        return _flow_case(config, rng, batch)
    if name == "video_autoencoding":
        return _video_case(config, rng, batch)
    raise ValueError(f"no parity inputs for model {name!r}")


# --------------------------------------------------------------------------------------


def run_reference(
    name: str,
    config: Any,
    params: Mapping[str, Any],
    state: Mapping[str, Any],
    case: Case,
    seed: int,
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """The JAX reference's outputs and stages (run eagerly, as the golden outputs were)."""
    perceiver_jax = require_jax()
    import jax

    model = perceiver_jax.get_model(name, config, stages=True)
    (outputs, stages), _ = model.apply(
        params, state, jax.random.PRNGKey(seed), **case.jax_inputs
    )
    stages = {key: np.asarray(value) for key, value in stages.items()}
    return case.outputs(outputs), stages


def jax_axis_table(
    kind: str, size: int, num_bands: int, resolution: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's float32 Fourier features along one axis: (pos, sin, cos).

    Built with perceiver_jax's own functions (official linspace grid or subsampled
    positions, linspace frequencies, float32 arithmetic), so they carry exactly the
    rounding of the features the JAX model computes.
    """
    import jax.numpy as jnp
    from perceiver_jax import position_encoding as jax_pe

    if kind == "grid":
        positions = jax_pe.linear_positions((size,))
    else:
        positions = jax_pe.subsampled_positions(jnp.arange(size), (size,))
    features = np.asarray(jax_pe.fourier_features(positions, num_bands, (resolution,)))
    table = torch.from_numpy(features.copy())
    return table[:, :1], table[:, 1 : 1 + num_bands], table[:, 1 + num_bands :]


def run_torch(
    model: torch.nn.Module, case: Case, *, stages: bool = True
) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """The model's outputs as users get them, and (a second pass with the plain
    computation, see ``capture_stages``) its intermediate stages."""
    with torch.no_grad():
        outputs = case.torch_outputs(model(**case.torch_inputs))
        if not stages:
            return outputs, {}
        with perceiver_torch.capture_stages(model) as captured:
            model(**case.torch_inputs)
    return outputs, {k: v.numpy() for k, v in captured.items()}


def check_arguments(seed: Any, batch: Any, dtype: Any) -> None:
    """Raises UsageError for a seed, batch or dtype :func:`verify` cannot take (a
    batch of 0 was a ZeroDivisionError, a dtype of "float64" a KeyError)."""
    from converter.converted_files import TORCH_DTYPES

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (
        0 <= seed <= MAX_SEED
    ):
        raise UsageError(f"seed must be an integer from 0 to {MAX_SEED}, not {seed!r}")
    check_positive_int(batch, "batch")
    if dtype not in TORCH_DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(TORCH_DTYPES)}, not {dtype!r}")


def verify_prepared(
    prepared: Any,
    *,
    seed: int = 0,
    batch: int = 1,
    dtype: str = "float32",
    progress: Progress = quiet,
) -> ParityReport:
    """Compares the converted model of a :class:`~converter.conversion.PreparedConversion`.

    dtype: the storage dtype of the weights to check (``float16``/``bfloat16``: the
    weights are rounded to it, as they are written; see the module docstring).
    """
    from converter.converted_files import TORCH_DTYPES

    check_arguments(seed, batch, dtype)
    require_jax()
    # As convert --dtype does (exit 2), before seconds of JAX.
    prepared.check_dtype_range(dtype)
    name = prepared.model
    config = prepared.config_object()
    tolerance = prepared.mapping.tolerance
    default = float(tolerance.get("relative", 1e-5))
    fourier = {k: float(v) for k, v in (tolerance.get("fourier_outputs") or {}).items()}
    rounding = dtype_tolerance(tolerance, dtype)
    if rounding is not None:
        # Rounded weights: their error dominates every output's float32 tolerance.
        default = max(default, rounding)
        fourier = {k: max(v, rounding) for k, v in fourier.items()}
    case = make_case(name, config, seed, batch)
    report = ParityReport(name, prepared.config.preset or "custom", batch, seed)
    report.dtype = dtype

    progress("running the JAX reference")
    started = time.perf_counter()
    reference, reference_stages = run_reference(
        name, config, prepared.checkpoint.params, prepared.checkpoint.state, case, seed
    )
    report.seconds_jax = time.perf_counter() - started

    progress(f"running the converted PyTorch model ({dtype} weights)")
    model = prepared.build_model(TORCH_DTYPES[dtype])
    started = time.perf_counter()
    actual, actual_stages = run_torch(model, case)
    report.seconds_torch = time.perf_counter() - started
    injected: Dict[str, np.ndarray] = {}
    if fourier:
        from perceiver_torch.position_encoding import axis_tables_from

        progress("running the PyTorch model with the reference's Fourier features")
        with axis_tables_from(jax_axis_table):
            injected, _ = run_torch(model, case, stages=False)
    del model

    for stage in STAGES:
        if stage in reference_stages and stage in actual_stages:
            report.comparisons.append(
                compare(
                    stage, "stage", reference_stages[stage], actual_stages[stage], None
                )
            )
    for key, value in reference.items():
        report.comparisons.append(
            compare(
                key, "output", value, actual[key], fourier.get(key, default),
                case.argmax[key], require_argmax=rounding is None,
            )
        )
    for key in sorted(fourier):
        report.comparisons.append(
            compare(
                key, "fourier", reference[key], injected[key], default,
                case.argmax[key], require_argmax=rounding is None,
            )
        )
    return report


def verify(
    path: Any,
    model: Optional[str] = None,
    *,
    config: Optional[Mapping[str, Any]] = None,
    mapping: Optional[Any] = None,
    seed: int = 0,
    batch: int = 1,
    dtype: str = "float32",
    progress: Progress = quiet,
) -> ParityReport:
    """Converts ``path`` in memory and compares it with the JAX reference (see module
    doc); ``dtype`` checks the weights rounded to that storage dtype."""
    from converter.conversion import prepare

    check_arguments(seed, batch, dtype)  # before reading the checkpoint
    require_jax()
    progress(f"reading {path}")
    prepared = prepare(path, model, config=config, mapping=mapping)
    return verify_prepared(
        prepared, seed=seed, batch=batch, dtype=dtype, progress=progress
    )
