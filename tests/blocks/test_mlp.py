"""The zoo's MLP: timm's Mlp with the activation applied in place on fc1's output when autograd records nothing."""

from __future__ import annotations

import pytest
import timm.layers
import torch
from torch import nn

from attnzoo.blocks import Mlp

ACTIVATIONS = [nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.SiLU, nn.ReLU, nn.Tanh]


def _pair(act_layer):
    torch.manual_seed(0)
    ours, timm_mlp = Mlp(16, 40, 12, act_layer=act_layer), timm.layers.Mlp(16, 40, 12, act_layer=act_layer)
    timm_mlp.load_state_dict(ours.state_dict())  # same keys, strict
    return ours, timm_mlp


def _fc1_outputs(mlp):
    """fc1's output tensors, captured as they leave fc1 (later in-place writes show up in them)."""
    seen = []
    mlp.fc1.register_forward_hook(lambda m, args, out: seen.append((out, out.clone())))
    return seen


@pytest.mark.parametrize("act_layer", ACTIVATIONS)
def test_inference_overwrites_fc1_output_and_matches_timm(act_layer):
    ours, timm_mlp = _pair(act_layer)
    seen = _fc1_outputs(ours)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, timm_mlp(x), rtol=0, atol=0)
    (after, before), = seen
    in_place = not isinstance(ours.act, nn.Tanh)  # activations without an in-place form run as their module
    assert torch.equal(after, ours.act(before)) is in_place
    assert torch.equal(after, before) is not in_place


@pytest.mark.parametrize("act_layer", ACTIVATIONS)
def test_training_keeps_timm_forward_and_gradients(act_layer):
    ours, timm_mlp = _pair(act_layer)
    seen = _fc1_outputs(ours)
    x = torch.randn(3, 7, 16, requires_grad=True)
    grads = []
    for mlp in (ours, timm_mlp):
        out = mlp(x)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()]))
    (after, before), = seen
    assert torch.equal(after, before)  # not overwritten: the activation's backward reads it
    for g_ours, g_timm in zip(*grads, strict=True):
        torch.testing.assert_close(g_ours, g_timm, rtol=0, atol=0)


def test_inference_mode_and_frozen_weights_run_in_place():
    ours, _ = _pair(nn.GELU)
    ours.requires_grad_(False)  # frozen: nothing requires grad even with grad mode on
    seen = _fc1_outputs(ours)
    ours(torch.randn(2, 16))
    with torch.inference_mode():
        ours(torch.randn(2, 16))
    assert all(not torch.equal(after, before) for after, before in seen)
