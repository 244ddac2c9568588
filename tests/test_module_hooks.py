"""Hooked and replaced modules: the fast paths step aside for them.

Users hook modules (feature extraction, ``torch.nn.utils.prune``) and replace them
(LoRA adapters, other classes). The eval-time shortcuts read weights instead of
calling modules (fused GELU and residual additions, fused projections, folded
attentions and decoders) or change what a module's hooks see (skipped padding, batch
slices); ``linear.intercepted`` tells them to step aside. These tests hook one module
at a time, so that the fast paths stay on around it, and replace every linear layer.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import perceiver_torch as pt
from float64_reference import (
    check_outputs_within_float32_rounding,
    check_within_float32_rounding,
    float64_inputs,
    float64_model,
)
from perceiver_torch import fast_paths
from perceiver_torch.linear import Linear, intercepted
from test_fast_paths import model_inputs
from test_torch_models import tiny

NAMES = list(pt.MODEL_NAMES)


def _hooked_modules(model: nn.Module, inputs: tuple) -> list:
    """Names of the modules the plain path calls (hooks fire on them), but for the
    second and later self-attention layers (the first stands for them) and dropouts
    (identities at inference, called only where a neighbour is called whole)."""
    called = []
    handles = [
        module.register_forward_hook(lambda m, a, o, n=name: called.append(n))
        for name, module in model.named_modules()
        if module is not model and not isinstance(module, nn.Dropout)
    ]
    with torch.no_grad(), fast_paths.plain():
        model(*inputs)
    for handle in handles:
        handle.remove()
    return [n for n in dict.fromkeys(called) if not re.search(r"self_attends\.[1-9]", n)]


def _record(model: nn.Module, names: list, inputs: tuple) -> dict:
    """{name: [(output, keyword arguments) of every call]} of modules ``names`` in
    one forward."""
    seen = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, args, kwargs, output, name=name: seen[name].append(
                (output, sorted(kwargs))
            ),
            with_kwargs=True,
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _tensors(output) -> list:
    """The tensors in a module's output (tuples and dicts of them; sizes skipped)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for k in sorted(output) for t in _tensors(output[k])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    return []


@pytest.mark.parametrize("name", NAMES)
def test_a_hooked_module_sees_the_plain_paths_tensors(name):
    """A hook on any one module fires as often, with the same keyword arguments and
    the same tensors, as on the plain path (float32 rounding apart): before, hooks
    on fused, folded or absorbed layers never fired, and those on an attention or an
    MLP saw the residual stream added in (their residual was passed in)."""
    model, inputs = tiny(name), model_inputs(name)
    exact_model, exact_inputs = float64_model(model), float64_inputs(inputs)
    names = _hooked_modules(model, inputs)
    assert len(names) > 20, names
    # Every module hooked at once: the plain path's calls (plain() is the same
    # computation, hooked or not).
    with fast_paths.plain():
        plain_calls = _record(model, names, inputs)
        exact_calls = _record(exact_model, names, exact_inputs)
    for module_name in names:
        (fast,) = _record(model, [module_name], inputs).values()
        plain, exact = plain_calls[module_name], exact_calls[module_name]
        label = f"{name}: {module_name}"
        assert len(fast) == len(plain) == len(exact), (label, len(fast), len(plain))
        for (f_out, f_kw), (p_out, p_kw), (e_out, _) in zip(fast, plain, exact):
            assert "residual" not in f_kw and f_kw == p_kw, (label, f_kw, p_kw)
            for f, p, e in zip(_tensors(f_out), _tensors(p_out), _tensors(e_out)):
                assert f.shape == p.shape, (label, f.shape, p.shape)
                if e.abs().max() > 0:
                    check_within_float32_rounding(label, f, p, e)


def test_global_hooks_fire_on_the_plain_paths_calls():
    """A hook for every module (``register_module_forward_hook``) sees the calls of
    the plain path: the same modules, as often."""
    for name in ("language_perceiver", "video_autoencoding", "imagenet_conv"):
        model, inputs = tiny(name), model_inputs(name)
        counts = {}
        for plain in (False, True):
            calls = []
            handle = nn.modules.module.register_module_forward_hook(
                lambda m, a, o: calls.append(m)
            )
            try:
                with torch.no_grad(), fast_paths.plain() if plain else _nothing():
                    model(*inputs)
            finally:
                handle.remove()
            counts[plain] = sorted(id(m) for m in calls)
        assert counts[False] == counts[True], name


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class LowRankAdapted(nn.Module):
    """A LoRA-style replacement of a linear layer: base(x) + x A^T B^T. Like peft's
    adapters it exposes the base layer's ``weight`` and ``bias``, so a shortcut that
    read them instead of calling the module would silently drop the adapter."""

    def __init__(self, base: nn.Module, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        gen = torch.Generator().manual_seed(base.in_features + 7 * base.out_features)
        self.a = nn.Parameter(torch.randn(rank, base.in_features, generator=gen) * 0.3)
        self.b = nn.Parameter(torch.randn(base.out_features, rank, generator=gen) * 0.3)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def _replace_linears(model: nn.Module, make) -> int:
    """Replaces every ``Linear`` of ``model`` by ``make(layer)``; returns how many."""
    targets = [
        (parent, child_name, child)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, Linear)
    ]
    for parent, child_name, child in targets:
        setattr(parent, child_name, make(child))
    return len(targets)


def _merge(adapted: LowRankAdapted) -> Linear:
    """The adapter's function as one Linear (W + B A), exactly in float64."""
    base = adapted.base
    merged = Linear(base.in_features, base.out_features).to(base.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(base.weight + adapted.b @ adapted.a)
        merged.bias.copy_(base.bias)
    return merged


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pack", [False, True], ids=["plain_weights", "packed_weights"])
def test_replaced_linear_layers_are_what_computes(name, pack):
    """Every linear layer replaced by a LoRA-style adapter: the model in eval mode
    with its fast paths on computes the adapted function (the float64 model with the
    adapters merged into its weights is the reference). Before, fused MLPs failed
    with an AttributeError and folded attentions read the base weights, dropping the
    adapters silently. ``pack_weights`` exercises the fused projections."""
    model, inputs = tiny(name), model_inputs(name)
    count = _replace_linears(model, LowRankAdapted)
    assert count > 10
    assert all(intercepted(m) for m in model.modules() if isinstance(m, LowRankAdapted))
    if pack:
        pt.pack_weights(model)
    merged = float64_model(model)
    _replace_linears_back(merged)
    with torch.no_grad():
        adapted = model(*inputs)
        exact = merged(*float64_inputs(inputs))
        with fast_paths.plain():
            plain = model(*inputs)
    check_outputs_within_float32_rounding(name, adapted, plain, exact)


def _replace_linears_back(model: nn.Module) -> None:
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LowRankAdapted):
                setattr(parent, child_name, _merge(child))


@pytest.mark.parametrize("name", NAMES)
def test_replaced_layers_train(name):
    """Training with adapters (the fast paths are off, but the MLP's fused GELU was
    not, and failed): a forward and backward pass gives the adapters gradients."""
    model, inputs = tiny(name), model_inputs(name)
    _replace_linears(model, LowRankAdapted)
    model.train()
    out = model(*inputs)
    loss = sum(t.float().square().mean() for t in _tensors(out))
    loss.backward()
    adapters = [m for m in model.modules() if isinstance(m, LowRankAdapted)]
    assert all(m.a.grad is not None and m.a.grad.abs().sum() > 0 for m in adapters[:3])


def test_plain_torch_linear_in_place_of_ours():
    """``nn.Linear`` (same weights) in place of every Linear computes the same model."""
    name = "optical_flow"  # absorbed attentions on both sides
    model, inputs = tiny(name), model_inputs(name)
    with torch.no_grad():
        expected = model(*inputs)

    def plain_linear(layer: Linear) -> nn.Linear:
        copy = nn.Linear(layer.in_features, layer.out_features)
        copy.load_state_dict(layer.state_dict())
        return copy

    exact = float64_model(model)(*float64_inputs(inputs))
    _replace_linears(model, plain_linear)
    assert not any(isinstance(m, Linear) for m in model.modules())
    with torch.no_grad():
        got = model(*inputs)
    check_within_float32_rounding(name, got, expected, exact)


@pytest.mark.parametrize("name", ["language_perceiver", "optical_flow", "video_autoencoding"])
def test_hooks_fire_in_bfloat16_as_on_the_plain_path(name):
    """bfloat16 has shortcuts of its own (q, k and v as one product against packed
    weights, a LayerNorm written into zero-padded keys): a hook on any one module
    fires as often, with the same keyword arguments and shapes, as on the plain path
    (the values are the float32 tests' concern)."""
    model = tiny(name).to(torch.bfloat16)
    inputs = model_inputs(name)
    names = _hooked_modules(model, inputs)
    with fast_paths.plain():
        plain_calls = _record(model, names, inputs)
    for module_name in names:
        (fast,) = _record(model, [module_name], inputs).values()
        plain = plain_calls[module_name]
        label = f"{name}: {module_name}"
        assert len(fast) == len(plain), (label, len(fast), len(plain))
        for (f_out, f_kw), (p_out, p_kw) in zip(fast, plain):
            assert f_kw == p_kw, (label, f_kw, p_kw)
            shapes = [t.shape for t in _tensors(f_out)]
            assert shapes == [t.shape for t in _tensors(p_out)], label


def test_a_hooked_key_norm_is_called_where_bfloat16_pads_it():
    """A bfloat16 one-head cross-attention of wide inputs writes its key LayerNorm
    into zero-padded keys (``layer_norm_padded``, test_precision.py checks it) rather
    than calling ``kv_norm``: hooked, the LayerNorm is called."""
    from perceiver_torch.attention import CrossAttentionLayer

    torch.manual_seed(3)
    layer = CrossAttentionLayer(q_channels=24, kv_channels=161, num_heads=1)
    layer = layer.to(torch.bfloat16).eval()
    inputs_q = torch.randn(2, 5, 24).to(torch.bfloat16)
    inputs_kv = torch.randn(2, 130, 161).to(torch.bfloat16)
    calls = []
    # PyTorch's kernels, as on Intel CPUs (the suite forces oneDNN's where it exists).
    with torch.no_grad(), fast_paths.plain(fast_paths.FastPath.ONEDNN_ATTENTION):
        assert layer.prepare(inputs_kv, mode="absorb_kv").k.shape[-1] == 192  # padded
        layer.kv_norm.register_forward_hook(lambda m, a, out: calls.append(out.shape))
        prepared = layer.prepare(inputs_kv, mode="absorb_kv")
        layer.attend_prepared(inputs_q, prepared)
    assert calls == [(2, 130, 161)]


def test_a_hook_outside_the_video_decoder_keeps_the_folded_decoder():
    """The fold reads the decoder's, queries' and postprocessors' weights only: a hook
    on the encoder (feature extraction) is called either way and need not turn it off
    (it did: intercepted_below(model) walked the whole model). Hooks inside the
    folded modules still turn it off."""
    model = tiny("video_autoencoding")
    latents = torch.zeros(1, 4, 4)
    with torch.no_grad():
        assert model._use_fused(latents)
        handle = model.encoder.register_forward_hook(lambda *args: None)
        try:
            assert model._use_fused(latents)
        finally:
            handle.remove()
        for folded in (model.decoder, model.output_queries, model.output_postprocessor):
            for module in (folded, list(folded.modules())[-1]):  # itself, a leaf
                handle = module.register_forward_hook(lambda *args: None)
                try:
                    assert not model._use_fused(latents), folded
                finally:
                    handle.remove()
        handle = model.decoder.cross_attention.mlp.fc1.register_forward_hook(
            lambda *args: None
        )
        try:
            assert not model._use_fused(latents)
        finally:
            handle.remove()


@pytest.mark.parametrize("name", ["language_perceiver", "video_autoencoding"])
def test_parametrized_weights_keep_the_whole_model_fast_paths(name):
    """torch.nn.utils.parametrizations (weight_norm, spectral_norm, orthogonal) compute
    a weight, which the shortcuts read through the parametrized attribute: their
    modules are no hooked or replaced layer, and SKIP_PADDING, MICRO_BATCHES and the
    folded decoder stay on (they were turned off), computing the parametrized model."""
    from torch.nn.utils import parametrizations

    from perceiver_torch.linear import intercepted_below

    model, inputs = tiny(name), model_inputs(name)
    layer = model.decoder.cross_attention.attention.to_q
    parametrizations.weight_norm(layer)
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(1.5)  # a different function
    assert not intercepted(layer)
    assert not intercepted_below(model)
    with torch.no_grad():
        fast = model(*inputs)
        with fast_paths.plain():
            plain = model(*inputs)
    exact = float64_model(model)(*float64_inputs(inputs))
    check_outputs_within_float32_rounding(name, fast, plain, exact)
