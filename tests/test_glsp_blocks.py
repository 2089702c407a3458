"""RWKV-UNet building blocks in 2-D and 3-D: q_shift / q_shift_3d, VRWKV_SpatialMix (WKV call, formula, AMP),
GLSP, SqueezeExcite, Downsample, MedNeXt, pointwise_mlp in 2-D, and the shared helpers of blocks/common.py."""
import math
from functools import partial

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cuda_wkv import bi_wkv_dense
from nnunetv2_ext.blocks import spatial_mix
from nnunetv2_ext.blocks.common import (as_triple, elu_feature_map, float32_region, instance_norm_for, is_batch_norm,
                                        merge_heads, norm_factory, per_axis, split_heads)
from nnunetv2_ext.blocks.glsp import GLSP, Downsample, SqueezeExcite
from nnunetv2_ext.blocks.mednext import MedNeXtBlock, MedNeXtEncoder
from nnunetv2_ext.blocks.pointwise_mlp import pointwise_mlp
from nnunetv2_ext.blocks.q_shift import q_shift, q_shift_3d
from nnunetv2_ext.blocks.spatial_mix import VRWKV_SpatialMix, fancy_init


@pytest.fixture(autouse=True)
def _torch_wkv(monkeypatch):
    # the network code is under test here, not the WKV kernels (tests/test_wkv.py): use the PyTorch path
    monkeypatch.setenv('CUDA_WKV_BACKEND', 'torch')


def _directions(ndim):
    """(axis of the (B, *size, C) view, +1 = content moves towards higher index) per channel group:
    ±W, ±H (, ±D) — Vision-RWKV's order, last axis first."""
    return [(axis, sign) for axis in range(ndim, 0, -1) for sign in (+1, -1)]


def _to_grid(x, size):
    return x.reshape(x.shape[0], *size, x.shape[-1])


SHIFTS = {2: (q_shift, 4), 3: (q_shift_3d, 8)}  # function, 1/default gamma


@pytest.mark.parametrize('size', [(3, 5, 7), (1, 4, 2), (1, 1, 1), (2, 1, 3), (5, 7), (1, 3), (1, 1)])
@pytest.mark.parametrize('channels', [16, 19])
def test_q_shift_moves_each_group_one_voxel_on_a_ramp(size, channels):
    fn, per_group = SHIFTS[len(size)]
    g = int(channels / per_group)
    groups = 2 * len(size)
    for group, (axis, sign) in enumerate(_directions(len(size))):
        # ramp 1, 2, 3, ... along the group's axis, identical along the others
        length = size[axis - 1]
        ramp = torch.arange(1, length + 1, dtype=torch.float64)
        shape = [1] * (len(size) + 2)
        shape[axis] = length
        grid = ramp.view(shape).expand(2, *size, channels).clone()
        out = _to_grid(fn(grid.reshape(2, -1, channels), size), size)
        sl = slice(group * g, (group + 1) * g)
        # +1: out[i] = in[i-1] = i (0 at i=0);  -1: out[i] = in[i+1] = i+2 (0 at the last voxel)
        expected = ramp - 1 if sign > 0 else torch.where(ramp < length, ramp + 1, torch.zeros_like(ramp))
        torch.testing.assert_close(out[..., sl], expected.view(shape).expand_as(out[..., sl]))
        torch.testing.assert_close(out[..., groups * g:], grid[..., groups * g:])  # unshifted channels untouched


@pytest.mark.parametrize('size,gamma', [((3, 5, 7), 1 / 8), ((1, 2, 3), 1 / 8), ((4, 1, 1), 1 / 8), ((5, 6), 1 / 8),
                                        ((5, 6), 1 / 4), ((1, 4), 1 / 4)])
def test_q_shift_matches_roll_with_zeroed_border(size, gamma):
    torch.manual_seed(0)
    channels = 17
    g = int(channels * gamma)
    x = torch.randn(2, math.prod(size), channels, dtype=torch.float64)
    grid = _to_grid(x, size)
    expected = grid.clone()
    for group, (axis, sign) in enumerate(_directions(len(size))):
        sl = slice(group * g, (group + 1) * g)
        rolled = torch.roll(grid[..., sl], shifts=sign, dims=axis)
        rolled.select(axis, 0 if sign > 0 else grid.shape[axis] - 1).zero_()
        expected[..., sl] = rolled
    torch.testing.assert_close(_to_grid(SHIFTS[len(size)][0](x, size, gamma=gamma), size), expected)


def test_q_shift_2d_default_shifts_every_channel_as_vision_rwkv():
    x = torch.ones(1, 9, 8)
    out = _to_grid(q_shift(x, (3, 3)), (3, 3))  # gamma 1/4: 4 groups of 2 channels, none unshifted
    assert out[0, 1, 1].tolist() == [1.0] * 8  # interior pixel: every group finds a neighbour
    assert out[0, 0, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]  # corner: +W and +H sources lie outside


def test_q_shift_validates_and_tiny_channel_counts_are_unshifted():
    x = torch.randn(1, 24, 7)
    torch.testing.assert_close(q_shift_3d(x, (2, 3, 4)), x)  # int(7/8) = 0 channels per direction
    x16 = torch.randn(1, 24, 16)
    torch.testing.assert_close(q_shift_3d(x16, (2, 3, 4), shift=0), x16)  # shift 0 moves nothing
    with pytest.raises(ValueError, match='has 24 voxels but the sequence has N=25'):
        q_shift_3d(torch.randn(1, 25, 8), (2, 3, 4))
    with pytest.raises(ValueError, match='gamma'):
        q_shift_3d(x, (2, 3, 4), gamma=0.2)
    with pytest.raises(ValueError, match=r'gamma=0.3 must lie in \[0, 1/4\]'):
        q_shift(x, (4, 6), gamma=0.3)
    with pytest.raises(ValueError, match='q_shift is 2-D.*q_shift_3d'):
        q_shift(x, (2, 3, 4))
    with pytest.raises(ValueError, match='q_shift_3d is 3-D.*q_shift for images'):
        q_shift_3d(x, (4, 6))


def test_fancy_init_schedule():
    first_layer, last_layer = fancy_init(8, 0, 3), fancy_init(8, 2, 3)
    torch.testing.assert_close(first_layer['spatial_decay'][[0, -1]], torch.tensor([-5.0, 3.0]))
    assert torch.all(last_layer['spatial_decay'] <= first_layer['spatial_decay'] + 1e-6)
    assert first_layer['spatial_mix_k'].shape == (1, 1, 8)
    torch.testing.assert_close(first_layer['spatial_first'][:3], math.log(0.3) + torch.tensor([0.0, 0.5, -0.5]))
    single = fancy_init(1, 0, 1)  # one channel, one layer: no division by zero
    assert all(torch.isfinite(v).all() for v in single.values())


def test_spatial_mix_calls_wkv_with_decay_and_first_over_T_in_float32(monkeypatch):
    calls, real = [], spatial_mix.bi_wkv

    def spy(w, u, k, v):
        calls.append((w, u, k, v))
        return real(w, u, k, v)

    monkeypatch.setattr(spatial_mix, 'bi_wkv', spy)
    torch.manual_seed(0)
    mix = VRWKV_SpatialMix(16, layer_id=1, n_layers=3)
    size = (3, 4, 5)
    x = torch.randn(2, 60, 16)
    assert mix(x, size).shape == (2, 60, 16)
    w, u, k, v = calls[-1]
    torch.testing.assert_close(w, mix.spatial_decay / 60)
    torch.testing.assert_close(u, mix.spatial_first / 60)
    assert k.shape == v.shape == (2, 60, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mix(x, size)
    w, u, k, v = calls[-1]
    assert {t.dtype for t in (w, u, k, v)} == {torch.float32}  # WKV in float32 under AMP
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert mix.spatial_decay.grad is not None and torch.isfinite(mix.spatial_decay.grad).all()


@pytest.mark.parametrize('size', [(2, 3, 4), (4, 6)])
def test_spatial_mix_formula_against_dense_wkv(size):
    """Vision-RWKV's spatial mix on the flattened grid against the O(T²) WKV definition, float64;
    the q-shift is the one for the grid's dimension (2-D: Vision-RWKV's q_shift with gamma 1/4)."""
    torch.manual_seed(0)
    ndim = len(size)
    mix = VRWKV_SpatialMix(8, layer_id=0, n_layers=2, ndim=ndim).double()
    T = math.prod(size)
    x = torch.randn(2, T, 8, dtype=torch.float64)
    xx = q_shift(x, size) if ndim == 2 else q_shift_3d(x, size)
    assert mix.gamma == (1 / 4 if ndim == 2 else 1 / 8)
    lerp = {n: x * getattr(mix, f'spatial_mix_{n}') + xx * (1 - getattr(mix, f'spatial_mix_{n}')) for n in 'kvr'}
    y = bi_wkv_dense(mix.spatial_decay / T, mix.spatial_first / T, mix.key(lerp['k']), mix.value(lerp['v']))
    expected = mix.output(torch.sigmoid(mix.receptance(lerp['r'])) * mix.key_norm(y))
    torch.testing.assert_close(mix(x, size), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('dim_in,dim_out,kernel,size', [(16, 16, 3, (3, 5, 7)), (8, 12, (1, 3, 3), (1, 4, 6)),
                                                        (16, 16, 3, (1, 1, 2)), (16, 16, 3, (5, 7)),
                                                        (8, 12, (1, 3), (4, 6))])
def test_glsp_shapes_and_identity_sequence_residual_at_init(dim_in, dim_out, kernel, size):
    torch.manual_seed(0)
    conv_op = nn.Conv2d if len(size) == 2 else nn.Conv3d
    block = GLSP(dim_in, dim_out, exp_ratio=2.0, se_ratio=0.25, kernel_size=kernel, conv_op=conv_op,
                 n_layers=2).eval()
    x = torch.randn(2, dim_in, *size)
    out = block(x)
    assert out.shape == (2, dim_out, *size)
    # LN after SpatialMix starts at weight 0 (bias 0): the token-mixing residual is exactly the identity
    h = block.proj(block.local(block.conv1(x)))
    torch.testing.assert_close(out, x + h if dim_in == dim_out else h)
    assert isinstance(block.local[-1], SqueezeExcite)
    assert block.local[0].kernel_size == per_axis(kernel, len(size))  # the given per-axis kernel
    assert all(type(m) in (conv_op, nn.Linear) for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    assert isinstance(block.local[1], nn.InstanceNorm2d if len(size) == 2 else nn.InstanceNorm3d)


def test_glsp_mixes_globally_in_2d():
    """With the LayerNorm weight nonzero, the output at one pixel depends on a pixel far outside the depthwise
    kernel's reach (the WKV is global over the flattened H·W sequence)."""
    torch.manual_seed(0)
    block = GLSP(8, 8, se_ratio=0, conv_op=nn.Conv2d).double()
    nn.init.ones_(block.mix_norm.weight)
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64, requires_grad=True)
    block(x)[0, :, 0, 0].sum().backward()
    assert x.grad[0, :, 8, 8].abs().sum() > 0  # far corner reaches (0, 0) through the WKV


@pytest.mark.parametrize('ndim', [2, 3])
def test_squeeze_excite_formula(ndim):
    torch.manual_seed(0)
    se = SqueezeExcite(8, 0.25, nn.Conv2d if ndim == 2 else nn.Conv3d)
    x = torch.randn(2, 8, *(3, 4, 5)[:ndim])
    _, c1, _, c2, _ = se.gate
    gate = torch.sigmoid(c2(F.relu(c1(x.mean(dim=tuple(range(2, 2 + ndim)), keepdim=True)))))
    torch.testing.assert_close(se(x), x * gate)
    assert c1.out_channels == 2


def test_downsample_and_mednext_shapes():
    x = torch.randn(2, 4, 6, 8, 10)
    assert Downsample(4, 8, (1, 2, 2))(x).shape == (2, 8, 6, 4, 5)
    assert Downsample(4, 8, 1)(x).shape == (2, 8, 6, 8, 10)
    regular = MedNeXtBlock(4, exp_ratio=2, kernel_size=(1, 3, 3))
    assert isinstance(regular.res, nn.Identity) and regular(x).shape == x.shape
    down = MedNeXtBlock(4, 8, exp_ratio=2, kernel_size=3, stride=(1, 2, 2))
    assert down(x).shape == (2, 8, 6, 4, 5)
    enc = MedNeXtEncoder(1, [4, 8, 8], [[1, 1, 1], [2, 2, 2], [1, 2, 2]], [[3, 3, 3]] * 3, [1, 0, 2])
    assert [tuple(f.shape) for f in enc(torch.randn(2, 1, 4, 8, 8))] == [(2, 4, 4, 8, 8), (2, 8, 2, 4, 4),
                                                                        (2, 8, 2, 2, 2)]


def test_2d_downsample_and_mednext_use_2d_layers():
    x = torch.randn(2, 4, 8, 10)
    down = Downsample(4, 8, (2, 1), nn.Conv2d)
    assert down(x).shape == (2, 8, 4, 10) and isinstance(down[1], nn.InstanceNorm2d)
    enc = MedNeXtEncoder(1, [4, 8, 8], [[1, 1], [2, 2], [1, 2]], [[3, 3], [3, 3], [1, 3]], [1, 0, 2],
                         conv_op=nn.Conv2d)
    assert [tuple(f.shape) for f in enc(torch.randn(2, 1, 8, 8))] == [(2, 4, 8, 8), (2, 8, 4, 4), (2, 8, 4, 2)]
    convs = [m for m in enc.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert convs and all(isinstance(m, nn.Conv2d) for m in convs)
    assert enc.stages[2][1].body[0].kernel_size == (1, 3)
    with pytest.raises(ValueError, match=r'kernel_size \[3, 3, 3\] has 3 entries but the network is 2-D'):
        MedNeXtBlock(4, kernel_size=(3, 3, 3), conv_op=nn.Conv2d)


@pytest.mark.parametrize('ndim', [2, 3])
def test_mednext_block_formula(ndim):
    torch.manual_seed(0)
    block = MedNeXtBlock(4, exp_ratio=2, conv_op=nn.Conv2d if ndim == 2 else nn.Conv3d).double()
    x = torch.randn(2, 4, *(3, 4, 5)[:ndim], dtype=torch.float64)
    dw, norm, expand, _, compress = block.body
    torch.testing.assert_close(block(x), x + compress(F.gelu(expand(norm(dw(x))))))


def test_pointwise_mlp_2d_matches_plain_autograd():
    torch.manual_seed(0)
    expand, compress = nn.Conv2d(3, 6, 1).double(), nn.Conv2d(6, 4, 1).double()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    lean = pointwise_mlp(x, expand, compress)
    grads = torch.autograd.grad(lean.pow(2).sum(), [x, *expand.parameters(), *compress.parameters()])
    plain = compress(F.gelu(expand(x)))
    ref = torch.autograd.grad(plain.pow(2).sum(), [x, *expand.parameters(), *compress.parameters()])
    torch.testing.assert_close(lean, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match='needs 1×1 convs'):
        pointwise_mlp(x, nn.Conv2d(3, 6, 3).double(), compress)
    with pytest.raises(ValueError, match='needs 1×1×1 convs'):
        pointwise_mlp(torch.randn(1, 3, 2, 2, 2), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 1))


# ---------------------------------------------------------------- blocks/common.py

def test_per_axis_and_as_triple():
    assert per_axis(3, 2) == (3, 3) and per_axis([1, 3], 2) == (1, 3) and as_triple(2) == (2, 2, 2)
    assert as_triple((1, 3, 3)) == (1, 3, 3)
    with pytest.raises(ValueError, match=r'stride \[2, 2\] has 2 entries but the network is 3-D'):
        as_triple([2, 2], 'stride')


def test_norm_factory_resolves_plans_names_and_none():
    norm = norm_factory('torch.nn.modules.instancenorm.InstanceNorm2d', {'affine': True, 'eps': 1e-3})(6)
    assert isinstance(norm, nn.InstanceNorm2d) and norm.affine and norm.eps == 1e-3 and norm.num_features == 6
    assert isinstance(norm_factory(None)(6), nn.Identity)
    assert isinstance(instance_norm_for(nn.Conv3d)(4), nn.InstanceNorm3d)
    with pytest.raises(ValueError, match="norm_op 'torch.nn.NoSuchNorm' is not an importable"):
        norm_factory('torch.nn.NoSuchNorm')
    assert is_batch_norm(norm_factory(nn.BatchNorm2d)) and not is_batch_norm(instance_norm_for(nn.Conv2d))
    assert not is_batch_norm(norm_factory(None)) and is_batch_norm(partial(nn.SyncBatchNorm))


def test_float32_region_turns_autocast_off_and_promotes():
    a, b = torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(4, 4, dtype=torch.float64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with float32_region(a, b) as (a32, b64):
            assert (a32.dtype, b64.dtype) == (torch.float32, torch.float64)
            assert (a32 @ a32).dtype == torch.float32  # autocast would give bfloat16
        assert (a32 @ a32).dtype == torch.bfloat16
    with pytest.raises(ValueError, match='at least one tensor'):
        with float32_region():
            pass


def test_heads_and_elu_feature_map():
    x = torch.randn(2, 5, 12)
    heads = split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    torch.testing.assert_close(heads[:, 1], x[..., 4:8])  # head j holds channels [j·D, (j+1)·D)
    torch.testing.assert_close(merge_heads(heads), x)
    with pytest.raises(ValueError, match='12 channels do not split into 5 heads'):
        split_heads(x, 5)
    t = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(elu_feature_map(t), torch.tensor([math.exp(-1.0), 1.0, 3.0]))
