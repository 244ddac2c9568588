"""The models as objects users copy, save, move and transform.

Packed weights, fused projections and cached position features are kept on the
modules; copies, pickles, state dicts, dtype moves and ``torch.func`` must see the
models' weights and nothing else.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import perceiver_torch as pt
from float64_reference import (
    check_outputs_within_float32_rounding,
    float64_inputs,
    float64_model,
)
from perceiver_torch import fast_paths
from test_fast_paths import model_inputs
from test_torch_models import tiny, tiny_inputs

NAMES = list(pt.MODEL_NAMES)


def _item(out, i: int):
    """Item ``i`` of a vmapped output (a tensor or a dict of them)."""
    if isinstance(out, dict):
        return {k: v[i] for k, v in out.items()}
    return out[i]


def _ensemble(models, inputs_per_model, in_dims_inputs):
    """The models' outputs computed as one ``torch.vmap`` over their stacked
    parameters and buffers (``torch.func.stack_module_state``), the ensembling
    recipe of torch.func, with ``in_dims_inputs`` (None: every model gets
    ``inputs_per_model[0]``; 0: model i gets ``inputs_per_model[i]``)."""
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    if in_dims_inputs is None:
        inputs = inputs_per_model[0]
        dims = tuple(None for _ in inputs)
    else:
        inputs = tuple(
            torch.stack(items) if torch.is_tensor(items[0]) else items[0]
            for items in zip(*inputs_per_model)
        )
        dims = tuple(0 if torch.is_tensor(x) else None for x in inputs)

    def call(p, b, *x):
        return torch.func.functional_call(base, (p, b), x)

    with torch.no_grad():
        return torch.vmap(call, in_dims=(0, 0) + dims)(params, buffers, *inputs)


def _check_each(name, models, inputs_per_model, got):
    """Each model's vmapped output is as close to its float64 evaluation as the model
    run alone on the plain path (float64_reference)."""
    for i, (model, inputs) in enumerate(zip(models, inputs_per_model)):
        with torch.no_grad(), fast_paths.plain():
            plain = model(*inputs)
            exact = float64_model(model)(*float64_inputs(inputs))
        check_outputs_within_float32_rounding(f"{name}[{i}]", _item(got, i), plain, exact)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vmap_ensemble_of_models_with_packed_weights(name, dtype):
    """``torch.vmap`` over stacked weights (model ensembling) of packed models
    (bfloat16 packs by default on CPUs with bfloat16 instructions): the oneDNN
    paths have no batching rules and packing a batched weight failed ("'memory_format'
    argument is incompatible with mkldnn tensor"); the video model's preprocessor
    wrote the stacked padding into a tensor that was not batched. Under torch.func
    transforms the fast paths step aside. (bfloat16 rounds at the same places on
    both paths, so the float64 argument of float64_reference holds for it too.)"""
    models = [pt.pack_weights(tiny(name, seed=s).to(dtype)) for s in (0, 1)]
    inputs = model_inputs(name)
    with torch.no_grad():
        for model in models:
            model(*inputs)  # the packed copies exist
    got = _ensemble(models, [inputs, inputs], None)
    _check_each(name, models, [inputs, inputs], got)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_ensemble_with_inputs_per_model(name):
    """Each model of the ensemble its own batch (in_dims=0 for the inputs too): the
    language model's id check and padding skip, and the video model's index check
    and folded decoder, read tensor values, which vmap refuses (``.item()``); they
    step aside there as under torch.compile."""
    models = [tiny(name, seed=s) for s in (0, 1)]
    first = model_inputs(name)
    second = tiny_inputs(name, seed=3) + first[len(tiny_inputs(name)):]
    got = _ensemble(models, [first, second], 0)
    _check_each(name, models, [first, second], got)


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_derivatives_under_torch_func(name):
    """``torch.func.jvp`` (forward-mode derivatives, e.g. for Jacobian-vector
    products or ``jacfwd``) failed on every model: PyTorch's fused CPU attention has
    no forward-mode formula. Under torch.func transforms attention takes the explicit
    path. The derivative along a random direction of every weight, in float64,
    against central finite differences at h = 1e-6: their truncation error, h^2 / 6
    times the third directional derivative, passes 1e-6 of the first only where the
    third passes 6e6 times the first, and their rounding error is about
    1e-16 |f| / h = 1e-10 |f|; a wrong derivative (a dropped or doubled term) is
    off by a sizeable fraction of it."""
    model = float64_model(tiny(name)).eval()
    inputs = float64_inputs(model_inputs(name))
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    direction = {
        k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()
    }

    def outputs(p):
        out = torch.func.functional_call(model, p, inputs)
        return out if torch.is_tensor(out) else tuple(out[k] for k in sorted(out))

    with torch.no_grad():
        _, derivative = torch.func.jvp(outputs, (params,), (direction,))
        h = 1e-6
        ahead = outputs({k: v + h * direction[k] for k, v in params.items()})
        behind = outputs({k: v - h * direction[k] for k, v in params.items()})
    if torch.is_tensor(derivative):
        derivative, ahead, behind = (derivative,), (ahead,), (behind,)
    for got, plus, minus in zip(derivative, ahead, behind):
        expected = (plus - minus) / (2 * h)
        scale = expected.abs().max()
        assert scale > 0
        assert (got - expected).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grad", [False, True])
def test_forward_mode_derivatives_with_dual_tensors(name, grad):
    """``torch.autograd.forward_ad`` (dual tensors, forward-mode derivatives outside
    torch.func) failed as torch.func.jvp did (the fused CPU attention has no
    forward-mode formula), and under ``torch.no_grad`` the oneDNN kernels (packed
    weights) dropped the tangents: the outputs came back with none, or wrong (the
    language model's), silently. Within
    a dual level the fast paths step aside as under torch.func. The float32 tangents
    along a random direction of every weight are held, as every fast path is, to
    the float32 error of the plain path's (torch.func.jvp, checked against finite
    differences above) against float64 (float64_reference)."""
    import torch.autograd.forward_ad as fwad

    model = pt.pack_weights(tiny(name))
    inputs = model_inputs(name)
    with torch.no_grad():
        model(*inputs)  # the packed copies exist
    params = {k: v.detach() for k, v in model.named_parameters()}
    gen = torch.Generator().manual_seed(7)
    direction = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}

    def outputs(m, p, x):
        out = torch.func.functional_call(m, p, x)
        return out if torch.is_tensor(out) else {k: out[k] for k in sorted(out)}

    def tangents(out):
        if torch.is_tensor(out):
            return fwad.unpack_dual(out).tangent
        return {k: fwad.unpack_dual(v).tangent for k, v in out.items()}

    with torch.set_grad_enabled(grad), fwad.dual_level():
        duals = {k: fwad.make_dual(v, direction[k]) for k, v in params.items()}
        got = tangents(outputs(model, duals, inputs))
    for tangent in got.values() if isinstance(got, dict) else [got]:
        assert tangent is not None, "the tangent was dropped"
    plain_model = tiny(name)
    exact_model = float64_model(plain_model)
    exact_params = {k: v.detach() for k, v in exact_model.named_parameters()}
    with torch.no_grad():
        _, plain = torch.func.jvp(
            lambda p: outputs(plain_model, p, inputs), (params,), (direction,)
        )
        _, exact = torch.func.jvp(
            lambda p: outputs(exact_model, p, float64_inputs(inputs)),
            (exact_params,),
            ({k: v.double() for k, v in direction.items()},),
        )
    check_outputs_within_float32_rounding(name, got, plain, exact)


def _fourier_caches(model):
    """The cached features and tables of every Fourier position encoding in ``model``."""
    from perceiver_torch.position_encoding import FourierPositionEncoding

    return [
        entry
        for module in model.modules()
        if isinstance(module, FourierPositionEncoding)
        for entry in (*module._cache.values(), *module._table_cache.values())
    ]


def _saved_size(model) -> int:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return len(buffer.getvalue())


@pytest.mark.parametrize(
    "name", ["imagenet_fourier", "imagenet_conv", "optical_flow", "video_autoencoding"]
)
def test_copies_and_pickles_leave_the_cached_position_features_out(name):
    """The Fourier features a forward pass caches are derived data, as the packed
    weights are: copies, pickles and ``torch.save(model)`` leave them out. They were
    kept: at full size a saved optical flow model after one forward pass held its
    368x496x258 features (188 MB) beside 164 MB of weights, and every deep copy
    duplicated them. The copies compute them again, to the same outputs."""
    model, inputs = tiny(name), model_inputs(name)
    size_unused = _saved_size(model)
    with torch.no_grad():
        model(*inputs)
    assert _fourier_caches(model)  # the forward pass filled them
    copies = {
        "deepcopy": copy.deepcopy(model),
        "copy": copy.copy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
    }
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert len(buffer.getvalue()) <= size_unused
    buffer.seek(0)
    copies["torch.save"] = torch.load(buffer, weights_only=False)
    assert _fourier_caches(model)  # the original keeps its own
    with torch.no_grad(), fast_paths.plain():
        plain = model(*inputs)
        exact = float64_model(model)(*float64_inputs(inputs))
    for how, other in copies.items():
        if how != "copy":  # (a shallow copy shares the original's modules)
            assert not _fourier_caches(other), how
        with torch.no_grad():
            got = other(*inputs)
        check_outputs_within_float32_rounding(f"{name} {how}", got, plain, exact)
