"""The last attention block's map: the gradient read-out equals the attention weights, computed independently
(explicit softmax for dense attention; one forward per key with v = that key's indicator for local ones)."""

import contextlib

import pytest
import timm
import torch

import attnzoo.zoo  # noqa: F401
from attnzoo.train.attention_maps import attention_received, last_attention_block, last_attention_map, save_overlay
from tests.train.helpers import rel_err

VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, in_chans=1, **kwargs).double().eval()


def _block_input(model, x) -> torch.Tensor:
    block, seen = last_attention_block(model), {}
    hook = block.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return seen["x"]


def test_dense_attention_matches_softmax():
    model, x = _model("attnzoo_vit_tiny_patch4_28", **VIT), torch.randn(3, 1, 28, 28, dtype=torch.float64)
    block = last_attention_block(model)
    q, k, _ = block.project_qkv(_block_input(model, x))
    probs = (q @ k.transpose(-1, -2) * block.scale).softmax(-1)  # (B, H, N, N)
    ref = probs.sum(dim=2).mean(dim=1)[:, 1:].reshape(3, 7, 7)  # drop the class token
    assert rel_err(attention_received(model, x), ref) <= 1e-12


def _received_by_indicators(model, x) -> torch.Tensor:
    """Σ_q P_qk for every key k by running the block once per key with v = the indicator of k (no autograd)."""
    block, x_in = last_attention_block(model), _block_input(model, x)
    q, k, v = block.project_qkv(x_in)
    heads, keys, dim = v.shape[1], v.shape[2:-1], v.shape[-1]
    out = torch.zeros(v.shape[0], *keys, dtype=v.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in keys]).reshape(-1, len(keys)):
        onehot = torch.zeros_like(v)
        onehot[(slice(None), slice(None), *idx.tolist())] = 1.0
        seen = {}

        def capture(m, args, seen=seen):
            seen["out"] = args[0]
            raise StopIteration

        hook = block.proj.register_forward_pre_hook(capture)
        block.project_qkv = lambda _x, onehot=onehot: (q, k, onehot)
        with torch.no_grad(), contextlib.suppress(StopIteration):
            block(x_in)
        hook.remove()
        del block.project_qkv
        # summed over queries, heads and channels: D copies of Σ_h Σ_q P_qk, averaged over the H heads
        out[(slice(None), *idx.tolist())] = seen["out"].sum(dim=tuple(range(1, seen["out"].dim()))) / (heads * dim)
    return out


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("attnzoo_nat_mini", {}),
        ("attnzoo_vit_tiny_patch4_28", {**VIT, "attn": "na", "attn_kwargs": {"kernel_size": 3}}),
    ],
)
def test_local_attention_matches_indicator_probes(name, kwargs):
    model, x = _model(name, **kwargs), torch.randn(2, 1, 28, 28, dtype=torch.float64)
    ref = _received_by_indicators(model, x)
    got = attention_received(model, x)
    if ref.dim() == 2:  # a token sequence: class token first, then the 7 x 7 grid
        ref = ref[:, 1:].reshape(2, 7, 7)
    assert got.shape == ref.shape and rel_err(got, ref) <= 1e-12


def test_map_is_scaled_and_model_restored(tmp_path):
    model = _model("attnzoo_nat_mini").float().train()
    x = torch.randn(2, 1, 28, 28)
    maps = last_attention_map(model, x)
    assert maps.shape[0] == 2 and torch.allclose(maps.amin(dim=(1, 2)), torch.zeros(2))
    assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(2))
    assert model.training and "project_qkv" not in vars(last_attention_block(model))  # hooks and patches undone
    with torch.inference_mode():  # as in Lightning's predict loop
        torch.testing.assert_close(last_attention_map(model, x), maps)
    save_overlay(tmp_path / "a.png", x[0], maps[0], [0.5], [0.25])
    from PIL import Image

    assert Image.open(tmp_path / "a.png").size == (400, 220)


def test_model_without_attention():
    with pytest.raises(ValueError, match=r"Sequential has no attention block"):
        last_attention_map(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)), torch.randn(1, 1, 8, 8))
