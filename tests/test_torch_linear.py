"""perceiver_torch.linear.Linear: the oneDNN inference path computes F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from float64_reference import check_within_float32_rounding
from perceiver_torch import fast_paths, linear as linear_module
from perceiver_torch.linear import Linear


def test_inference_path_matches_f_linear(monkeypatch):
    if not linear_module._onednn_linear_enabled():
        pytest.skip("this torch has no oneDNN linear kernel: Linear is F.linear here")
    torch.manual_seed(0)
    layer = Linear(96, 40)
    x = torch.randn(3, 17, 96)
    expected = F.linear(x, layer.weight, layer.bias)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())

    def not_expected(*args, **kwargs):
        raise AssertionError("the inference path fell back to F.linear")

    # What is compared below must come from the oneDNN kernel, not F.linear itself.
    monkeypatch.setattr(linear_module.F, "linear", not_expected)
    with torch.inference_mode():
        fast = layer(x)
    with torch.no_grad():
        also_fast = layer(x.transpose(0, 1).contiguous().transpose(0, 1))  # strided
    assert fast.shape == expected.shape == (3, 17, 40)
    # Another order of the same 96-term sums: as close to float64 as MKL's.
    check_within_float32_rounding("oneDNN", fast, expected, exact)
    check_within_float32_rounding("oneDNN, strided input", also_fast, expected, exact)


def test_training_uses_autograd_path():
    layer = Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_switch_off_with_the_environment(monkeypatch):
    monkeypatch.setattr(linear_module, "_available", None)
    monkeypatch.setattr(fast_paths, "_environment", None)  # read again, then restored
    monkeypatch.setenv("PERCEIVER_TORCH_ONEDNN", "0")
    assert linear_module._onednn_linear_enabled() is False
    layer = Linear(6, 3)
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    monkeypatch.setattr(linear_module, "_available", None)  # re-probe for later tests


def test_state_dict_keys_are_nn_linears():
    assert set(Linear(3, 2).state_dict()) == {"weight", "bias"}
    assert isinstance(Linear(3, 2), torch.nn.Linear)
