"""pointwise_mlp (the memory-lean MedNeXt MLP) against plain autograd: values, gradients, autocast, saved bytes."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from nnunetv2_ext.benchmark import saved_activation_bytes
from nnunetv2_ext.blocks.mednext import MedNeXtBlock
from nnunetv2_ext.blocks.pointwise_mlp import _PointwiseMLP, pointwise_mlp


def _convs(c_in, ratio, c_out, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return (nn.Conv3d(c_in, ratio * c_in, 1, bias=bias).to(dtype), nn.Conv3d(ratio * c_in, c_out, 1, bias=bias).to(dtype))


def _grads(fn, x, convs):
    x = x.detach().requires_grad_()
    for c in convs:
        c.zero_grad(set_to_none=True)
    y = fn(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for c in convs for p in c.parameters()]


def test_gradcheck_float64():
    expand, compress = _convs(3, 2, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [expand.weight, expand.bias, compress.weight, compress.bias]
    assert torch.autograd.gradcheck(lambda x, *p: _PointwiseMLP.apply(x, *p), (x, *params))


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('shape,ratio,c_out', [((2, 4, 3, 5, 7), 2, 4), ((1, 3, 1, 1, 9), 4, 6)])
def test_matches_plain_autograd(shape, ratio, c_out, bias):
    expand, compress = _convs(shape[1], ratio, c_out, bias)
    x = torch.randn(shape)
    lean = _grads(lambda t: pointwise_mlp(t, expand, compress), x, (expand, compress))
    plain = _grads(lambda t: compress(F.gelu(expand(t))), x, (expand, compress))
    for a, b in zip(lean, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_autocast_runs_in_the_autocast_dtype_like_plain_autograd():
    expand, compress = _convs(4, 2, 4)
    x = torch.randn(2, 4, 3, 4, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        lean = _grads(lambda t: pointwise_mlp(t, expand, compress), x, (expand, compress))
        plain = _grads(lambda t: compress(F.gelu(expand(t))), x, (expand, compress))
    assert lean[0].dtype == plain[0].dtype == torch.bfloat16
    for a, b in zip(lean, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_stores_one_expanded_tensor_less():
    expand, compress = _convs(4, 2, 4)
    x = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    lean = saved_activation_bytes(lambda: pointwise_mlp(x, expand, compress))
    plain = saved_activation_bytes(lambda: compress(F.gelu(expand(x))))
    expanded = 2 * 8 * 6 ** 3 * 4  # GELU(h): batch 2, 8 channels, float32
    assert plain - lean == expanded


def test_mednext_block_gradients_match_its_plain_definition():
    torch.manual_seed(0)
    for block in (MedNeXtBlock(4, exp_ratio=2), MedNeXtBlock(4, 6, exp_ratio=3, stride=(1, 2, 2))):
        x = torch.randn(2, 4, 3, 6, 6)
        convs = [m for m in block.modules() if isinstance(m, (nn.Conv3d, nn.InstanceNorm3d))]
        lean = _grads(block, x, convs)
        plain = _grads(lambda t: block.res(t) + block.body(t), x, convs)
        for a, b in zip(lean, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiles_with_aot_autograd():
    expand, compress = _convs(4, 2, 4)
    x = torch.randn(2, 4, 3, 4, 5)
    eager = _grads(lambda t: pointwise_mlp(t, expand, compress), x, (expand, compress))
    compiled_fn = torch.compile(lambda t: pointwise_mlp(t, expand, compress), backend='aot_eager', fullgraph=True)
    compiled = _grads(compiled_fn, x, (expand, compress))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_rejects_convs_that_are_not_pointwise():
    expand, compress = _convs(4, 2, 4)
    with pytest.raises(ValueError, match='1×1×1 convs'):
        pointwise_mlp(torch.randn(1, 4, 3, 3, 3), nn.Conv3d(4, 8, 3, padding=1), compress)
