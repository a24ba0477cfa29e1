"""Helpers of the zoo tests."""

import torch


def run_against_float64(model, ref, x):
    """``model(x)`` and ``ref`` (moved to float64) on ``x`` in float64, both backpropagated from one random output
    gradient: (out, ref_out, {name: grad} of model, {name: grad} of ref)."""
    out = model(x)
    expected = ref.double()(x.double())
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g.double())
    grads, ref_grads = ({n: p.grad for n, p in m.named_parameters()} for m in (model, ref))
    return out, expected, grads, ref_grads
