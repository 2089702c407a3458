"""torch.compile of the PVT-GDLA networks and the light-decoder U-Net (nnU-Net compiles its network on CUDA):
one graph (``fullgraph=True``), outputs and gradients equal to eager within float32 tolerance. Inductor runs on
the CPU here (C++ code generation, tiny widths); ``aot_eager`` checks AOT autograd's traced backward on every
PVT-GDLA attention variant, where GDLA's backward once failed ("view size is not compatible with input tensor's
size and stride"). GLSP's compile test is in test_glsp_network.py."""
import copy

import pytest
import torch
from torch.nn import functional as F

from plans_factory import make_configuration
from nnunetv2_ext.networks.light_decoder_unet import LightDecoderUNet
from nnunetv2_ext.networks.pvt_gdla import PVTGDLA

TINY = dict(embed_dims=(8, 16), depths=(2, 1), num_heads=(1, 2), mlp_ratios=(2, 2), sr_ratios=(2, 1),
            stem_channels=4, decoder_head_dim=4, decoder_mlp_ratio=1.0, drop_path_rate=0.0)
# anisotropic 3-D plans: (1, 3, 3) kernels at the first levels, two transformer stages (levels 2, 3)
PLANS_3D = dict(patch_size=[4, 16, 16], strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]], features=[4] * 4,
                kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]])
PLANS_2D = dict(patch_size=[16, 12], strides=[[1, 1], [2, 2], [2, 2], [2, 1]], features=[4, 8, 8, 8])
# the smallest PVT-GDLA with every part: conv stem (levels 0, 1), one transformer stage and a GDLAM (level 2)
PLANS_2D_PVT = dict(patch_size=[16, 12], strides=[[1, 1], [2, 2], [2, 2]], features=[4] * 3)


@pytest.fixture(autouse=True)
def private_compile_cache(tmp_path, monkeypatch):
    """Inductor writes and loads generated code from a folder only this test can write; fresh dynamo state."""
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'inductor'))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _outputs_and_grads(net: torch.nn.Module, x: torch.Tensor, forward=None, seed: int = 0):
    """``forward(x)`` (default ``net``), an MSE loss to fixed random targets, backward; outputs and ``net``'s grads."""
    out = (net if forward is None else forward)(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    generator = torch.Generator().manual_seed(seed)
    targets = [torch.randn(o.shape, generator=generator) for o in outs]
    loss = sum(F.mse_loss(o, t) for o, t in zip(outs, targets))
    loss.backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_compiled_equals_eager(net: torch.nn.Module, x: torch.Tensor, backend: str) -> None:
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    out_c, grads_c = _outputs_and_grads(net, x, compiled)
    out_e, grads_e = _outputs_and_grads(eager, x)
    assert len(out_c) == len(out_e)
    for c, e in zip(out_c, out_e):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() == {n for n, _ in eager.named_parameters()}
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('attention', ['softmax', 'elliptical', 'mahalanobis'])
def test_pvt_gdla_aot_autograd_backward(attention):
    torch.manual_seed(0)
    net = PVTGDLA.from_plans(make_configuration(**PLANS_3D), 2, 3, True, attention=attention, **TINY)
    assert_compiled_equals_eager(net, torch.randn(2, 2, *PLANS_3D['patch_size']), 'aot_eager')


def test_pvt_gdla_inductor_2d():
    torch.manual_seed(0)
    net = PVTGDLA.from_plans(make_configuration(**PLANS_2D_PVT), 1, 3, True, **{**TINY, 'depths': (1, 1)})
    assert len(net.encoder.stages) == 1 and net.first_transformer_level == 2
    assert_compiled_equals_eager(net, torch.randn(2, 1, *PLANS_2D_PVT['patch_size']), 'inductor')


def test_light_decoder_unet_inductor_2d():
    torch.manual_seed(0)
    net = LightDecoderUNet.from_plans(make_configuration(**PLANS_2D), 3, 2, True)
    assert_compiled_equals_eager(net, torch.randn(2, 3, *PLANS_2D['patch_size']), 'inductor')
