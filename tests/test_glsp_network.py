"""RWKV-UNet-3D from varied plans: deep-supervision outputs, gradients, variants, checkpointing, errors, compile."""
import inspect

import numpy as np
import pytest
import torch
from torch import nn

from plans_factory import expected_ds_shapes, make_configuration, make_trainer
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_ext.benchmark import saved_activation_bytes
from nnunetv2_ext.blocks.glsp import SE3D
from nnunetv2_ext.networks.plans import PlansError
from nnunetv2_ext.networks.rwkv_unet import RWKVUNet3D, depths_from_plans
from nnunetv2_ext.trainers import (nnUNetTrainerGLSP, nnUNetTrainerGLSP_BN, nnUNetTrainerGLSP_Checkpoint,
                                   nnUNetTrainerGLSP_NoRecompute, nnUNetTrainerGLSP_NoRWKV)


@pytest.fixture(autouse=True)
def _torch_wkv(monkeypatch):
    monkeypatch.setenv('CUDA_WKV_BACKEND', 'torch')  # WKV kernels are tested in tests/test_wkv.py


PLANS = {
    '3d_iso_5': dict(patch_size=[16, 16, 16], strides=[[1, 1, 1]] + [[2, 2, 2]] * 3 + [[1, 1, 1]],
                     features=[4, 8, 16, 16, 16]),
    '3d_aniso_6': dict(patch_size=[8, 32, 32], strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2],
                                                         [2, 2, 1]], features=[4, 8, 16, 16, 16, 16],
                       kernel_sizes=[[1, 3, 3], [1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
    '3d_odd_4_resenc': dict(patch_size=[12, 18, 30], strides=[[1, 1, 1], [2, 2, 2], [1, 1, 1], [3, 3, 3]],
                            features=[4, 8, 16, 16], residual=True),
    '3d_7stages': dict(patch_size=[16, 32, 32], strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2],
                                                          [2, 2, 2], [1, 1, 1]], features=[2, 4, 8, 8, 8, 8, 8]),
}


def _unzero(net: nn.Module) -> nn.Module:
    """Give the zero-initialised LayerNorm weights (identity-at-init residuals) nonzero values and keep the
    SE3D hidden ReLUs active, so "every parameter gets a gradient" tests connectivity, not the init or luck."""
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
        if isinstance(m, SE3D):
            nn.init.constant_(m.gate[1].bias, 1.0)
    return net


@pytest.mark.parametrize('name', list(PLANS))
def test_outputs_match_trainer_scales(name):
    plans = PLANS[name]
    cm = make_configuration(**plans)
    trainer = make_trainer(nnUNetTrainerGLSP, cm)
    net = trainer.build_network_architecture(trainer.plans_manager, cm, 2, 3, enable_deep_supervision=True)
    x = torch.randn(2, 2, *plans['patch_size'])
    out = net(x)
    trainer_scales = trainer._get_deep_supervision_scales()
    assert [tuple(o.shape) for o in out] == expected_ds_shapes(plans, 3, 2)
    assert len(out) == len(trainer_scales) == min(4, len(plans['strides']) - 1)
    for o, sc in zip(out, trainer_scales):
        assert list(o.shape[2:]) == [round(p * s) for p, s in zip(plans['patch_size'], sc)]
    # nnU-Net's own switch (used around validation / inference) gives one full-resolution tensor
    trainer.network = net
    trainer.set_deep_supervision_enabled(False)
    assert tuple(net(x).shape) == (2, 3, *plans['patch_size'])
    net_inf = trainer.build_network_architecture(trainer.plans_manager, cm, 2, 3, enable_deep_supervision=False)
    assert isinstance(net_inf(x), torch.Tensor)


def test_network_follows_the_plans():
    cm = make_configuration(**PLANS['3d_aniso_6'])
    net = RWKVUNet3D.from_plans(cm, 1, 2)
    feats = net.encoder(torch.randn(1, 1, *PLANS['3d_aniso_6']['patch_size']))
    assert [f.shape[1] for f in feats] == PLANS['3d_aniso_6']['features']
    assert len(net.branch.glsp) == 3 and len(net.fuse) == 4  # GLSP at stages 2..4, fusion at stages 2..5
    assert net.branch.glsp[0].local[0].kernel_size == (1, 3, 3)  # depthwise kernel = the plans' kernel
    norms = [m for m in net.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    assert norms and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert depths_from_plans(cm.network_arch_init_kwargs) == [1] * 6  # plain plans: 2 convs -> 1 block
    resenc = make_configuration(**PLANS['3d_odd_4_resenc']).network_arch_init_kwargs
    assert depths_from_plans({**resenc, 'n_blocks_per_stage': [1, 3, 4, 6]}) == [1, 3, 4, 6]


def _targets(trainer, shape, high):
    seg = torch.randint(0, high, (shape[0], 1, *shape[2:])).float()
    return [nn.functional.interpolate(seg, size=[round(s * f) for s, f in zip(shape[2:], sc)], mode='nearest')
            for sc in trainer._get_deep_supervision_scales()]


@pytest.mark.parametrize('trainer_class', [nnUNetTrainerGLSP, nnUNetTrainerGLSP_NoRWKV, nnUNetTrainerGLSP_BN])
def test_gradients_reach_every_parameter(trainer_class):
    plans = PLANS['3d_aniso_6']
    cm = make_configuration(**plans)
    trainer = make_trainer(trainer_class, cm)
    torch.manual_seed(0)
    net = _unzero(trainer.build_network_architecture(trainer.plans_manager, cm, 1, 3, True))
    out = net(torch.randn(2, 1, *plans['patch_size']))
    loss = trainer._build_loss()
    np.testing.assert_allclose(loss.weight_factors, np.array([8, 4, 2, 1]) / 15)
    loss(out, _targets(trainer, out[0].shape, 3)).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_variants():
    cm = make_configuration(**PLANS['3d_iso_5'])
    full = nnUNetTrainerGLSP.build_network_architecture(None, cm, 1, 2)
    no_rwkv = nnUNetTrainerGLSP_NoRWKV.build_network_architecture(None, cm, 1, 2)
    assert no_rwkv.branch is None and no_rwkv.fuse is None
    # same encoder and decoder: the ablation differs exactly by the branch and the fusions
    full_names = {n for n, _ in full.named_parameters() if not n.startswith(('branch.', 'fuse.'))}
    assert full_names == {n for n, _ in no_rwkv.named_parameters()}
    bn = nnUNetTrainerGLSP_BN.build_network_architecture(None, cm, 1, 2)
    assert not any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in bn.modules())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(bn)
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    # nnU-Net's initialize does this conversion itself under DDP (before wrapping in DDP)
    assert 'convert_sync_batchnorm' in inspect.getsource(nnUNetTrainer.initialize)


def test_checkpointing_gives_identical_outputs_and_gradients():
    plans = PLANS['3d_iso_5']
    cm = make_configuration(**plans)
    torch.manual_seed(0)
    plain = _unzero(nnUNetTrainerGLSP_NoRecompute.build_network_architecture(None, cm, 1, 2))
    default = nnUNetTrainerGLSP.build_network_architecture(None, cm, 1, 2)
    ckpt = nnUNetTrainerGLSP_Checkpoint.build_network_architecture(None, cm, 1, 2)
    assert (plain.encoder.checkpoint_stages, default.encoder.checkpoint_stages) == (0, 1)
    assert not plain.branch.checkpoint and default.branch.checkpoint
    assert ckpt.encoder.checkpoint_stages == len(ckpt.encoder.stages) and ckpt.branch.checkpoint
    nets = (plain, default, ckpt)
    for net in nets[1:]:
        net.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, *plans['patch_size'])
    outs = [net(x) for net in nets]
    for out in outs[1:]:
        for a, b in zip(outs[0], out):
            torch.testing.assert_close(a, b)
    for net, out in zip(nets, outs):
        sum((o ** 2).mean() for o in out).backward()
    for net in nets[1:]:
        for (name, p), q in zip(plain.named_parameters(), net.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_default_recomputes_stage_0_and_the_glsp_blocks_except_with_batch_norm():
    """They store ~40 % of the activations for ~1 % of the FLOPs (docs/glsp.md): the default recomputes them, so
    the stored activations drop by all of stage 0's except its input (which the checkpoint keeps) and more;
    BatchNorm (running statistics would be updated twice) keeps everything stored."""
    plans = PLANS['3d_iso_5']
    cm = make_configuration(**plans)
    x = torch.randn(2, 1, *plans['patch_size'])
    plain = RWKVUNet3D.from_plans(cm, 1, 2, checkpoint_levels=0, checkpoint_branch=False)
    stage0_only = RWKVUNet3D.from_plans(cm, 1, 2, checkpoint_branch=False)
    default = nnUNetTrainerGLSP.build_network_architecture(None, cm, 1, 2)
    stored = [saved_activation_bytes(lambda: net(x)) for net in (plain, stage0_only, default)]
    stage0 = saved_activation_bytes(lambda: plain.encoder.stages[0](x))
    assert stored[0] - stored[1] >= stage0 - x.numel() * x.element_size() > 0
    assert stored[2] < stored[1]
    bn = nnUNetTrainerGLSP_BN.build_network_architecture(None, cm, 1, 2)
    assert bn.encoder.checkpoint_stages == 0 and not bn.branch.checkpoint


def test_regions_and_ignore_label():
    cm = make_configuration(**PLANS['3d_iso_5'])
    regions = make_trainer(nnUNetTrainerGLSP, cm, labels={'background': 0, 'whole': [1, 2], 'core': 2},
                           regions_class_order=[1, 2])
    heads = regions.label_manager.num_segmentation_heads
    net = regions.build_network_architecture(regions.plans_manager, cm, 1, heads, True)
    out = net(torch.randn(2, 1, *PLANS['3d_iso_5']['patch_size']))
    assert out[0].shape[1] == 2
    region_targets = [torch.cat([(t >= 1), (t == 2)], 1).float() for t in _targets(regions, out[0].shape, 3)]
    assert torch.isfinite(regions._build_loss()(out, region_targets))
    ignore = make_trainer(nnUNetTrainerGLSP, cm, labels={'background': 0, 'a': 1, 'ignore': 2})
    out = ignore.build_network_architecture(ignore.plans_manager, cm, 1, 2, True)(torch.randn(2, 1, *PLANS['3d_iso_5']['patch_size']))
    assert torch.isfinite(ignore._build_loss()(out, _targets(ignore, out[0].shape, 3)))


def test_amp_forward_backward():
    cm = make_configuration(**PLANS['3d_iso_5'])
    net = _unzero(RWKVUNet3D.from_plans(cm, 1, 2))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, *PLANS['3d_iso_5']['patch_size']))
    sum(o.float().mean() for o in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize('plans,match', [
    (dict(patch_size=[64, 64], strides=[[1, 1]] + [[2, 2]] * 4, features=[4] * 5), r'3-D only.*nnUNetTrainerLightDecoder'),
    (dict(patch_size=[16, 16, 16], strides=[[1, 1, 1]] + [[2, 2, 2]] * 2, features=[4] * 3), 'at least 4 encoder stages'),
    (dict(patch_size=[16, 20, 16], strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, features=[4] * 5), 'does not fit'),
])
def test_unsupported_plans_are_clear_errors(plans, match):
    with pytest.raises(PlansError, match=match):
        nnUNetTrainerGLSP.build_network_architecture(None, make_configuration(**plans), 1, 2)


def test_compiles_with_wkv_as_graph_break():
    """Dynamo traces the network with one graph break per WKV call (``torch.compiler.disable``).
    (Full inductor compilation on CPU was checked by hand, docs/glsp.md; too slow for the suite.)"""
    cm = make_configuration(patch_size=[4, 8, 8], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
                            features=[2, 4, 8, 8])
    torch.manual_seed(0)
    net = _unzero(RWKVUNet3D.from_plans(cm, 1, 2))
    x = torch.randn(2, 1, 4, 8, 8)
    expected = net(x)
    out = torch.compile(net, backend='eager')(x)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in out).backward()
    assert net.branch.glsp[0].mix.key.weight.grad is not None
