"""GLSP3D building blocks: q_shift_3d, VRWKV_SpatialMix (WKV call, formula, AMP), GLSP3D, SE3D, MedNeXt."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cuda_wkv import bi_wkv_dense
from nnunetv2_ext.blocks import spatial_mix
from nnunetv2_ext.blocks.glsp import SE3D, Downsample3D, GLSP3D
from nnunetv2_ext.blocks.mednext import MedNeXtBlock, MedNeXtEncoder
from nnunetv2_ext.blocks.q_shift import q_shift_3d
from nnunetv2_ext.blocks.spatial_mix import VRWKV_SpatialMix, fancy_init


@pytest.fixture(autouse=True)
def _torch_wkv(monkeypatch):
    # the network code is under test here, not the WKV kernels (tests/test_wkv.py): use the PyTorch path
    monkeypatch.setenv('CUDA_WKV_BACKEND', 'torch')


# (axis of the (B, D, H, W, C) view, +1 = content moves towards higher index) per channel group
DIRECTIONS = [(3, +1), (3, -1), (2, +1), (2, -1), (1, +1), (1, -1)]


def _to_vol(x, size):
    return x.reshape(x.shape[0], *size, x.shape[-1])


@pytest.mark.parametrize('size', [(3, 5, 7), (1, 4, 2), (1, 1, 1), (2, 1, 3)])
@pytest.mark.parametrize('channels', [16, 19])
def test_q_shift_moves_each_group_one_voxel_on_a_ramp(size, channels):
    g = int(channels / 8)
    for group, (axis, sign) in enumerate(DIRECTIONS):
        # ramp 1, 2, 3, ... along the group's axis, identical along the others
        length = size[axis - 1]
        ramp = torch.arange(1, length + 1, dtype=torch.float64)
        shape = [1, 1, 1, 1, 1]
        shape[axis] = length
        vol = ramp.view(shape).expand(2, *size, channels).clone()
        out = _to_vol(q_shift_3d(vol.reshape(2, -1, channels), size), size)
        sl = slice(group * g, (group + 1) * g)
        # +1: out[i] = in[i-1] = i (0 at i=0);  -1: out[i] = in[i+1] = i+2 (0 at the last voxel)
        expected = ramp - 1 if sign > 0 else torch.where(ramp < length, ramp + 1, torch.zeros_like(ramp))
        torch.testing.assert_close(out[..., sl], expected.view(shape).expand_as(out[..., sl]))
        torch.testing.assert_close(out[..., 6 * g:], vol[..., 6 * g:])  # unshifted channels untouched


@pytest.mark.parametrize('size', [(3, 5, 7), (1, 2, 3), (4, 1, 1)])
def test_q_shift_matches_roll_with_zeroed_border(size):
    torch.manual_seed(0)
    channels, g = 17, 2
    x = torch.randn(2, math.prod(size), channels, dtype=torch.float64)
    vol = _to_vol(x, size)
    expected = vol.clone()
    for group, (axis, sign) in enumerate(DIRECTIONS):
        sl = slice(group * g, (group + 1) * g)
        rolled = torch.roll(vol[..., sl], shifts=sign, dims=axis)
        rolled.select(axis, 0 if sign > 0 else vol.shape[axis] - 1).zero_()
        expected[..., sl] = rolled
    torch.testing.assert_close(_to_vol(q_shift_3d(x, size, gamma=1 / 8), size), expected)


def test_q_shift_validates_and_tiny_channel_counts_are_unshifted():
    x = torch.randn(1, 24, 7)
    torch.testing.assert_close(q_shift_3d(x, (2, 3, 4)), x)  # int(7/8) = 0 channels per direction
    x16 = torch.randn(1, 24, 16)
    torch.testing.assert_close(q_shift_3d(x16, (2, 3, 4), shift=0), x16)  # shift 0 moves nothing
    with pytest.raises(ValueError, match='has 24 voxels but the sequence has N=25'):
        q_shift_3d(torch.randn(1, 25, 8), (2, 3, 4))
    with pytest.raises(ValueError, match='gamma'):
        q_shift_3d(x, (2, 3, 4), gamma=0.2)


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


def test_spatial_mix_formula_against_dense_wkv():
    torch.manual_seed(0)
    mix = VRWKV_SpatialMix(8, layer_id=0, n_layers=2).double()
    size, T = (2, 3, 4), 24
    x = torch.randn(2, T, 8, dtype=torch.float64)
    xx = q_shift_3d(x, size)
    lerp = {n: x * getattr(mix, f'spatial_mix_{n}') + xx * (1 - getattr(mix, f'spatial_mix_{n}')) for n in 'kvr'}
    y = bi_wkv_dense(mix.spatial_decay / T, mix.spatial_first / T, mix.key(lerp['k']), mix.value(lerp['v']))
    expected = mix.output(torch.sigmoid(mix.receptance(lerp['r'])) * mix.key_norm(y))
    torch.testing.assert_close(mix(x, size), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('dim_in,dim_out,kernel,size', [(16, 16, 3, (3, 5, 7)), (8, 12, (1, 3, 3), (1, 4, 6)),
                                                        (16, 16, 3, (1, 1, 2))])
def test_glsp_shapes_and_identity_sequence_residual_at_init(dim_in, dim_out, kernel, size):
    torch.manual_seed(0)
    block = GLSP3D(dim_in, dim_out, exp_ratio=2.0, se_ratio=0.25, kernel_size=kernel, n_layers=2).eval()
    x = torch.randn(2, dim_in, *size)
    out = block(x)
    assert out.shape == (2, dim_out, *size)
    # LN after SpatialMix starts at weight 0 (bias 0): the token-mixing residual is exactly the identity
    h = block.proj(block.local(block.conv1(x)))
    torch.testing.assert_close(out, x + h if dim_in == dim_out else h)
    assert isinstance(block.local[-1], SE3D)


def test_se3d_formula():
    torch.manual_seed(0)
    se = SE3D(8, 0.25)
    x = torch.randn(2, 8, 3, 4, 5)
    _, c1, _, c2, _ = se.gate
    gate = torch.sigmoid(c2(F.relu(c1(x.mean(dim=(2, 3, 4), keepdim=True)))))
    torch.testing.assert_close(se(x), x * gate)
    assert c1.out_channels == 2


def test_downsample_and_mednext_shapes():
    x = torch.randn(2, 4, 6, 8, 10)
    assert Downsample3D(4, 8, (1, 2, 2))(x).shape == (2, 8, 6, 4, 5)
    assert Downsample3D(4, 8, 1)(x).shape == (2, 8, 6, 8, 10)
    regular = MedNeXtBlock(4, exp_ratio=2, kernel_size=(1, 3, 3))
    assert isinstance(regular.res, nn.Identity) and regular(x).shape == x.shape
    down = MedNeXtBlock(4, 8, exp_ratio=2, kernel_size=3, stride=(1, 2, 2))
    assert down(x).shape == (2, 8, 6, 4, 5)
    enc = MedNeXtEncoder(1, [4, 8, 8], [[1, 1, 1], [2, 2, 2], [1, 2, 2]], [[3, 3, 3]] * 3, [1, 0, 2])
    assert [tuple(f.shape) for f in enc(torch.randn(2, 1, 4, 8, 8))] == [(2, 4, 4, 8, 8), (2, 8, 2, 4, 4),
                                                                        (2, 8, 2, 2, 2)]


def test_mednext_block_formula():
    torch.manual_seed(0)
    block = MedNeXtBlock(4, exp_ratio=2).double()
    x = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64)
    dw, norm, expand, _, compress = block.body
    torch.testing.assert_close(block(x), x + compress(F.gelu(expand(norm(dw(x))))))

