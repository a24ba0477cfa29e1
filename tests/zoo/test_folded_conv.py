"""FoldedConvNormAct: timm's ConvNormAct computed with the BatchNorm folded into the conv in eval mode."""

import copy

import pytest
import torch
from timm.layers import ConvNormAct

from attnzoo.zoo.folded_conv import FoldedConvNormAct, fold_batchnorm_in_eval
from tests.kernels.helpers import rel_err


def _with_statistics(layer: ConvNormAct) -> ConvNormAct:
    """Random running statistics and affine parameters, so that folding has something to fold."""
    bn = layer.bn
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return layer


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2), dict(kernel_size=1, bias=True),
                                    dict(kernel_size=3, groups=4, apply_act=False)])  # fmt: skip
def test_eval_forward_equals_timm_and_training_is_timm(kwargs):
    torch.manual_seed(0)
    timm_layer = _with_statistics(ConvNormAct(8, 12, **kwargs))
    ours = copy.deepcopy(timm_layer)
    assert fold_batchnorm_in_eval(ours) == 1 and type(ours) is FoldedConvNormAct
    assert ours.state_dict().keys() == timm_layer.state_dict().keys()
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        assert rel_err(ours.eval()(x), timm_layer.eval()(x)) < 1e-6
        assert rel_err(ours(x.contiguous(memory_format=torch.channels_last)), timm_layer(x)) < 1e-6
    # training mode is timm's own forward: batch statistics, running statistics updated alike
    ours.train(), timm_layer.train()
    assert torch.equal(ours(x), timm_layer(x))
    assert torch.equal(ours.bn.running_mean, timm_layer.bn.running_mean)


def test_layers_that_cannot_fold_keep_timm_forward():
    torch.manual_seed(0)
    same = _with_statistics(ConvNormAct(4, 4, kernel_size=3, stride=2, padding="same"))  # timm's dynamic padding
    no_affine = ConvNormAct(4, 4, kernel_size=1, norm_kwargs=dict(affine=False))
    for layer in (same, no_affine):
        ours = copy.deepcopy(layer)
        assert fold_batchnorm_in_eval(ours) == 0 and type(ours) is FoldedConvNormAct
        x = torch.randn(1, 4, 7, 7)
        with torch.no_grad():
            assert torch.equal(ours.eval()(x), layer.eval()(x))
