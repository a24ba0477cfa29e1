"""``linear_attention`` / ``linear_attention_step`` vs float64 expectations built from the quadratic reference:
feature maps, normalizer, every decay form (with its gradient), states (continuation, decoding steps), graph
capture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.kernels import LinearState, linear_attention, linear_attention_step
from attnzoo.kernels.linear.feature_maps import FEATURE_MAPS, apply_feature_map
from attnzoo.kernels.linear.reference import linear_reference
from tests.kernels.helpers import TOL, leaf64, randn, rel_err
from tests.kernels.test_linear_core import DTYPES, device_for, on_backends

B, H, T, D, DV = 2, 2, 29, 8, 6
EPS = 1e-6
DECAYS = ("float", "heads", "steps", "channels")  # a float, (H,), (B, H, T), (B, H, T, K)


def _assert_close(got, want, tol, label):
    errors = [rel_err(g, w) for g, w in zip(got, want, strict=True)]
    assert max(errors) <= tol, f"{label}: {errors} > {tol}"


def test_feature_maps_match_their_formulas():
    q, k = torch.randn(B, H, T, D, dtype=torch.float64), torch.randn(B, H, T, D, dtype=torch.float64)
    formulas = {"elu1": (torch.where(q > 0, q + 1, q.exp()), torch.where(k > 0, k + 1, k.exp())),
                "relu": (q.clamp_min(0), k.clamp_min(0)),
                "softmax": (q.exp() / q.exp().sum(-1, keepdim=True), k.exp() / k.exp().sum(2, keepdim=True)),
                "identity": (q, k)}
    for name, want in formulas.items():
        _assert_close(apply_feature_map(name, q, k), want, 1e-14, name)
    fq, fk = apply_feature_map("taylor2", q, k)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)  # BASED: φ(q)·φ(k) = 1 + s + s²/2
    assert fq.shape[-1] == 1 + D + D * D
    _assert_close([fq @ fk.transpose(-1, -2)], [1 + s + s * s / 2], 1e-14, "taylor2")


def _decay(kind, device, width=D):
    """(the op's decay argument, its float64 (B, H, T[, K]) expansion, the tensor to differentiate or None)."""
    if kind is None:
        return None, None, None
    if kind == "float":
        return -0.2, torch.full((B, H, T), -0.2, dtype=torch.float64), None
    shape = {"heads": (H,), "steps": (B, H, T), "channels": (B, H, T, width)}[kind]
    g = (-torch.rand(shape, dtype=torch.float64) * 0.4).float().to(device).requires_grad_()
    g64 = leaf64(g)
    return g, g64.view(1, H, 1).expand(B, H, T) if kind == "heads" else g64, g64


def expected(q, k, v, *, feature_map, causal, g=None, normalize=True, initial=None):
    """float64 output and final state from two reference calls (numerator; denominator with v = ones)."""
    fq, fk = apply_feature_map(feature_map, q, k)
    kw = {"scale": D**-0.5, "causal": causal, "return_state": True}
    num, kv = linear_reference(fq, fk, v, g, initial_state=None if initial is None else initial.kv, **kw)
    if not normalize:
        return num, LinearState(kv)
    z0 = None if initial is None else initial.k_sum.unsqueeze(-1)
    den, z = linear_reference(fq, fk, torch.ones_like(v[..., :1]), g, initial_state=z0, **kw)
    return num / (den + EPS), LinearState(kv, z[..., 0])


def _qkv(dtype, device, t=T):
    return [randn(B, H, t, d, dtype=dtype, device=device).requires_grad_() for d in (D, D, DV)]


# softmax is non-causal only (its refusal: test_linear_api.py); identity features give normalizers of either sign,
# an ill-conditioned ratio, so identity runs unnormalized.
MAP_MODES = [(fm, causal, normalize) for fm in FEATURE_MAPS for causal in (False, True) for normalize in (True, False)
             if not (causal and fm == "softmax") and not (normalize and fm == "identity")]


@pytest.mark.parametrize(("backend", "feature_map", "causal", "normalize", "dtype"),
                         on_backends([(*m, d) for m in MAP_MODES for d in DTYPES],
                                     [("taylor2", True, True, "fp32"), ("softmax", False, True, "fp16")]))
def test_op_matches_reference(backend, feature_map, causal, normalize, dtype, request):
    dtype = DTYPES[dtype]
    q, k, v = _qkv(dtype, device_for(backend, request))
    leaves = [leaf64(t) for t in (q, k, v)]
    want, _ = expected(*leaves, feature_map=feature_map, causal=causal, normalize=normalize)
    out = linear_attention(q, k, v, feature_map=feature_map, causal=causal, normalize=normalize, chunk_size=16,
                           backend=backend)
    assert out.dtype == dtype and out.shape == (B, H, T, DV)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    want_grads = torch.autograd.grad(want, leaves, do.double().cpu())
    _assert_close([out, *grads], [want, *want_grads], TOL[dtype], f"{feature_map} {causal=} {normalize=}")


@pytest.mark.parametrize(("backend", "decay", "normalize"),
                         on_backends([(d, n) for d in (None, *DECAYS) for n in (True, False)], [("heads", True)]))
def test_decay_and_initial_state_gradients(backend, decay, normalize, request):
    device = device_for(backend, request)
    q, k, v = _qkv(torch.float32, device)
    g, g64, g_leaf = _decay(decay, device)
    initial = LinearState(randn(B, H, D, DV, dtype=torch.float32, device=device).requires_grad_(),
                          randn(B, H, D, dtype=torch.float32, device=device).abs().requires_grad_()
                          if normalize else None)
    init64 = LinearState(*(None if t is None else leaf64(t) for t in initial))
    leaves = [leaf64(t) for t in (q, k, v)]
    want, want_state = expected(*leaves, feature_map="elu1", causal=True, g=g64, normalize=normalize, initial=init64)
    out, state = linear_attention(q, k, v, causal=True, decay=g, normalize=normalize, chunk_size=16,
                                  initial_state=initial, return_state=True, backend=backend)
    outs, wants = [out, *(t for t in state if t is not None)], [want, *(t for t in want_state if t is not None)]
    ups = [torch.randn_like(t) for t in outs]
    xs = [q, k, v, *(t for t in initial if t is not None), *([] if g_leaf is None else [g])]
    refs = [*leaves, *(t for t in (*init64, g_leaf) if t is not None)]
    grads = torch.autograd.grad(outs, xs, ups)
    want_grads = torch.autograd.grad(wants, refs, [u.double().cpu() for u in ups])
    _assert_close([*outs, *grads], [*wants, *want_grads], TOL[torch.float32], f"{decay=} {normalize=}")


@pytest.mark.parametrize(("feature_map", "decay", "normalize"),
                         [("elu1", None, True), ("taylor2", "heads", True), ("relu", "channels", False),
                          ("identity", "float", False), ("elu1", "steps", True)])
def test_steps_equal_one_chunked_call(feature_map, decay, normalize):
    """Decoding token by token from a state == one chunked call continuing from that state."""
    q, k, v = (t.detach() for t in _qkv(torch.float32, "cpu"))
    width = 1 + D + D * D if feature_map == "taylor2" else D
    g, _, _ = _decay(decay, "cpu", width)
    g = g.detach() if isinstance(g, torch.Tensor) else g
    start = LinearState(torch.rand(B, H, width, DV), torch.rand(B, H, width) if normalize else None)
    kw = {"feature_map": feature_map, "decay": g, "normalize": normalize}
    out, final = linear_attention(q, k, v, causal=True, chunk_size=8, initial_state=start, return_state=True, **kw)
    state, steps = start, []
    for t in range(T):
        kw["decay"] = g[:, :, t] if isinstance(g, torch.Tensor) and g.dim() > 1 else g
        o, state = linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, **kw)
        steps.append(o)
    got, want = [torch.stack(steps, 2), *state], [out, *final]
    _assert_close([x for x in got if x is not None], [x for x in want if x is not None], 1e-5, feature_map)


@pytest.mark.parametrize(("backend", "decay"), on_backends([(None,), ("steps",), ("channels",)], [("channels",)]))
def test_initial_state_continuation_equals_one_long_call(backend, decay, request):
    device = device_for(backend, request)
    q, k, v = (t.detach() for t in _qkv(torch.float32, device, t=45))
    g = None if decay is None else -torch.rand(*q.shape[:3], *((D,) if decay == "channels" else ()),
                                               device=device) * 0.3
    kw = {"causal": True, "chunk_size": 16, "return_state": True, "backend": backend}
    whole, whole_state = linear_attention(q, k, v, decay=g, **kw)
    cut = 20  # not a chunk boundary
    first, mid = linear_attention(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut],
                                  decay=None if g is None else g[:, :, :cut], **kw)
    second, end = linear_attention(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:],
                                   decay=None if g is None else g[:, :, cut:], initial_state=mid, **kw)
    _assert_close([torch.cat([first, second], 2), *end], [whole, *whole_state], 1e-5, f"{decay=}")


def test_bidirectional_state_is_the_feature_sums():
    q, k, v = (t.detach() for t in _qkv(torch.float32, "cpu"))
    _, state = linear_attention(q, k, v, return_state=True)
    fk = F.elu(k) + 1
    _assert_close(state, [fk.transpose(-1, -2) @ v, fk.sum(2)], 1e-6, "state")


def test_compile_fullgraph_matches_eager():
    q, k, v = _qkv(torch.float32, "cpu")
    g = torch.full((H,), -0.1, requires_grad=True)
    initial = LinearState(torch.randn(B, H, D, DV), torch.rand(B, H, D))

    def f(q, k, v, g):
        out, state = linear_attention(q * 1.5, k, v, causal=True, decay=g, chunk_size=8, initial_state=initial,
                                      return_state=True)
        return out.square().sum() + state.kv.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(f(q, k, v, g), (q, k, v, g))
    got = torch.autograd.grad(compiled(q, k, v, g), (q, k, v, g))
    _assert_close(got, want, 1e-6, "compiled")


def test_meta_device_forward_and_backward():
    q, k, v = _qkv(torch.float32, "meta")
    g = torch.zeros(B, H, T, D, device="meta", requires_grad=True)
    out = linear_attention(q, k, v, feature_map="relu", causal=True, decay=g)
    assert out.shape == (B, H, T, DV) and out.device.type == "meta"
    grads = torch.autograd.grad(out.sum(), (q, k, v, g))
    assert [x.shape for x in grads] == [x.shape for x in (q, k, v, g)]
