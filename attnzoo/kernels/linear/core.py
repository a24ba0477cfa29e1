"""The unnormalized linear-attention core (``reference.linear_reference``'s contract) as ``torch.library`` custom
ops ``attnzoo::linear_fwd`` / ``attnzoo::linear_bwd`` with fake (meta) implementations and an autograd rule, so
the core is one graph node under ``torch.compile(fullgraph=True)``, ``torch.export`` and tracing. The ``backend``
string picks the implementation inside the op: the Triton pair of ``triton_launch`` or the torch pair of
``torch_impl``, which share one signature.
"""

from __future__ import annotations

import importlib.util

import torch

from attnzoo.kernels.linear import torch_impl
from attnzoo.kernels.precision import compute_dtype

_TRITON_MODULE = "attnzoo.kernels.linear.triton_launch"


def triton_launch_available() -> bool:
    """Whether the Triton launchers of the linear family are part of this build."""
    return importlib.util.find_spec(_TRITON_MODULE) is not None


def triton_launch():
    # Imported on first use: keeps `import attnzoo` free of Triton and lets tests set TRITON_INTERPRET.
    from attnzoo.kernels.linear import triton_launch

    return triton_launch


def _out_dtype(q: torch.Tensor, full_precision: bool) -> torch.dtype:
    return compute_dtype(q.dtype) if full_precision else q.dtype


def _state_like(q: torch.Tensor, v: torch.Tensor, return_state: bool) -> torch.Tensor:
    shape = (*q.shape[:2], q.shape[-1], v.shape[-1]) if return_state else (0,)
    return q.new_empty(shape, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("attnzoo::linear_fwd", mutates_args=())
def linear_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, initial_state: torch.Tensor | None,
    scale: float, causal: bool, chunk_size: int, return_state: bool, full_precision: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: (B, H, T, K), v: (B, H, T, V), g: None, (B, H, T) or (B, H, T, K) -> (o (B, H, T, V), final state
    (B, H, K, V) in the accumulation dtype, or an empty tensor when ``return_state`` is False).

    o is in q's dtype, or in the accumulation dtype if ``full_precision`` (then the torch path never rounds it to
    fp16/bf16, and its gradient comes back unrounded too).
    """
    kwargs = {"scale": scale, "causal": causal, "chunk_size": chunk_size, "initial_state": initial_state}
    if backend == "triton":
        o, state = triton_launch().linear_fwd_triton(q, k, v, g, **kwargs)
    else:
        o, state = torch_impl.linear_fwd_torch(q, k, v, g, **kwargs, out_dtype=_out_dtype(q, full_precision))
    o = o.to(_out_dtype(q, full_precision))
    return o, state.to(compute_dtype(q.dtype)) if return_state else _state_like(q, v, False)


@linear_fwd.register_fake
def _(q, k, v, g, initial_state, scale, causal, chunk_size, return_state, full_precision, backend):
    o = q.new_empty((*q.shape[:3], v.shape[-1]), dtype=_out_dtype(q, full_precision))
    return o, _state_like(q, v, return_state)


@torch.library.custom_op("attnzoo::linear_bwd", mutates_args=())
def linear_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None, initial_state: torch.Tensor | None,
    do: torch.Tensor, dstate: torch.Tensor | None, scale: float, causal: bool, chunk_size: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, dinitial_state) of ``linear_fwd`` for the gradients ``do`` (in o's dtype) and ``dstate``;
    dg / dinitial_state are empty when g / initial_state are None."""
    kwargs = {"scale": scale, "causal": causal, "chunk_size": chunk_size, "initial_state": initial_state}
    if backend == "triton":
        grads = triton_launch().linear_bwd_triton(q, k, v, g, do.to(q.dtype), dstate, **kwargs)
    else:
        grads = torch_impl.linear_bwd_torch(q, k, v, g, do, dstate, **kwargs)
    return tuple(q.new_empty(0) if x is None else x for x in grads)


@linear_bwd.register_fake
def _(q, k, v, g, initial_state, do, dstate, scale, causal, chunk_size, backend):
    optional = (q.new_empty(0) if x is None else x.new_empty(x.shape) for x in (g, initial_state))
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *optional)


def _setup_context(ctx, inputs, output):
    q, k, v, g, initial_state, *params = inputs
    ctx.save_for_backward(q, k, v, g, initial_state)
    ctx.params = params


def _backward(ctx, do, dstate):
    q, k, v, g, initial_state = ctx.saved_tensors
    scale, causal, chunk_size, return_state, _, backend = ctx.params
    dstate = dstate.contiguous() if return_state and dstate is not None else None
    dq, dk, dv, dg, dinit = linear_bwd(q, k, v, g, initial_state, do.contiguous(), dstate, scale, causal, chunk_size,
                                      backend)
    return dq, dk, dv, None if g is None else dg, None if initial_state is None else dinit, *(None,) * len(ctx.params)


linear_fwd.register_autograd(_backward, setup_context=_setup_context)
