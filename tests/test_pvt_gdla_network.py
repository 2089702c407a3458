"""PVT-GDLA network from varied plans: deep-supervision outputs vs the trainer's scales, plans mapping,
clear errors, optimiser groups and schedule, gradients, and the 2-D timm encoder with local weights."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from plans_factory import make_configuration, make_trainer
from nnunetv2_ext.blocks.pvt import overlap_kernel, reduction_ratios
from nnunetv2_ext.networks.plans import PlansError
from nnunetv2_ext.networks.pvt_gdla import PVTGDLA, first_transformer_level, plans_widths
from nnunetv2_ext.trainers import (nnUNetTrainerPVTGDLA, nnUNetTrainerPVTGDLA_Elliptical,
                                   nnUNetTrainerPVTGDLA_Mahalanobis, nnUNetTrainerPVTGDLA_PlansWidths)
from nnunetv2_ext.trainers.pvt_gdla import WarmupPolyLRScheduler, weight_decay_groups

TINY = dict(embed_dims=(8, 16, 16, 16), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2),
            stem_channels=4, decoder_head_dim=4, decoder_mlp_ratio=1.0)

PLANS = {
    '3d_iso_5': dict(patch_size=[32, 32, 32], strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, features=[4] * 5),
    '3d_aniso_6': dict(patch_size=[8, 32, 32], strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2],
                                                         [2, 2, 1]], features=[4] * 6,
                       kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
    '3d_3stages_odd': dict(patch_size=[12, 20, 28], strides=[[1, 1, 1], [2, 2, 2], [3, 5, 7]], features=[4] * 3),
    '3d_2stages': dict(patch_size=[8, 12, 16], strides=[[1, 1, 1], [2, 2, 2]], features=[4] * 2),
    '3d_7stages': dict(patch_size=[32, 32, 32], strides=[[1, 1, 1]] + [[2, 2, 2]] * 5 + [[1, 1, 1]], features=[4] * 7),
    '2d_7stages': dict(patch_size=[128, 96], strides=[[1, 1]] + [[2, 2]] * 5 + [[2, 1]], features=[4] * 7),
    '2d_4stages': dict(patch_size=[36, 20], strides=[[1, 1], [3, 2], [2, 2], [3, 5]], features=[4] * 4),
}
TRAINERS = {'softmax': nnUNetTrainerPVTGDLA, 'elliptical': nnUNetTrainerPVTGDLA_Elliptical,
            'mahalanobis': nnUNetTrainerPVTGDLA_Mahalanobis}
CASES = [(name, 'softmax') for name in PLANS] + [('3d_aniso_6', 'elliptical'), ('2d_4stages', 'mahalanobis')]


@pytest.mark.parametrize('name,attention', CASES)
def test_outputs_match_trainer_scales(name, attention):
    plans = PLANS[name]
    cm = make_configuration(**plans)
    trainer = make_trainer(TRAINERS[attention], cm)
    net = PVTGDLA.from_plans(cm, 2, 3, True, attention=attention, **TINY)
    x = torch.randn(2, 2, *plans['patch_size'])
    with torch.no_grad():
        out = net(x)
    scales = trainer._get_deep_supervision_scales()
    assert len(out) == len(scales) == min(4, len(plans['strides']) - 1)
    for o, sc in zip(out, scales):
        assert tuple(o.shape) == (2, 3, *[round(p * s) for p, s in zip(plans['patch_size'], sc)])
    net.decoder.deep_supervision = False
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == out[0].shape
    inference = PVTGDLA.from_plans(cm, 2, 3, False, **TINY)
    assert not inference.decoder.deep_supervision


@pytest.mark.parametrize('attention', list(TRAINERS))
def test_trainers_build_b2_networks_with_their_attention(attention):
    cm = make_configuration(**PLANS['3d_2stages'])
    trainer = make_trainer(TRAINERS[attention], cm)
    net = trainer.build_network_architecture(trainer.plans_manager, cm, 1, 3, True)
    stage = net.encoder.stages[0]
    assert stage.embed.proj.out_channels == 64 and len(stage.blocks) == 3           # PVTv2-b2's first stage
    assert {b.attn.attend.variant for b in stage.blocks} == {attention}


def test_plans_widths_variant_takes_the_plans_features():
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    widths = plans_widths([8, 16, 32, 192, 320], strides)
    # first transformer level 2 ((1,4,4) reaches stride 4): widths of levels 2..4, heads of 64 channels
    # (192 -> 3 heads; 320 -> 5 heads as in PVTv2-b2), b2 depths/ratios cut to 3 stages
    assert widths == dict(embed_dims=[32, 192, 320], num_heads=[1, 3, 5], depths=(3, 4, 6), mlp_ratios=(8, 8, 4),
                          sr_ratios=(8, 4, 2), stem_channels=8)
    assert plans_widths([4, 8, 96], [[1, 1], [2, 2], [2, 2]])['num_heads'] == [1]
    assert plans_widths([4, 8, 16, 100], [[1, 1], [2, 2], [2, 2], [2, 2]])['num_heads'] == [1, 1]  # 100: 1 head
    cm = make_configuration(patch_size=[16, 32, 32], strides=strides, features=[4, 8, 16, 32, 32])
    trainer = make_trainer(nnUNetTrainerPVTGDLA_PlansWidths, cm)
    net = trainer.build_network_architecture(trainer.plans_manager, cm, 1, 3, True)
    assert net.encoder.output_channels == [16, 32, 32]
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 32, 32))
    assert [tuple(o.shape) for o in out] == [(1, 3, 16, 32, 32), (1, 3, 16, 16, 16), (1, 3, 8, 8, 8),
                                             (1, 3, 4, 4, 4)]
    b2 = make_trainer(nnUNetTrainerPVTGDLA, cm).build_network_architecture(trainer.plans_manager, cm, 1, 3, True)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in b2.parameters()) / 10


def test_plans_mapping():
    assert first_transformer_level([[1, 1, 1]] + [[2, 2, 2]] * 4) == 2
    assert first_transformer_level([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]) == 2   # (1, 4, 4) reaches 4
    assert first_transformer_level([[1, 1, 1], [2, 2, 2]]) == 1                          # shallow plans: last level
    assert first_transformer_level([[1, 1], [4, 4], [2, 2]]) == 1
    assert overlap_kernel([4, 2, 1]) == [7, 3, 3]
    assert reduction_ratios([8, 8, 8], 8) == [8, 8, 8]
    assert reduction_ratios([4, 40, 40], 8) == [1, 8, 8]
    assert reduction_ratios([6, 20, 14], 4) == [1, 4, 2]
    net = PVTGDLA.from_plans(make_configuration(**PLANS['3d_7stages']), 1, 2, **TINY)
    # stages at cumulative strides 4, 8, 16, 32; the plans' 7th level is not used
    assert [list(s.embed.proj.stride) for s in net.encoder.stages] == [[4] * 3, [2] * 3, [2] * 3, [2] * 3]
    assert [list(s.embed.proj.kernel_size) for s in net.encoder.stages] == [[7] * 3, [3] * 3, [3] * 3, [3] * 3]
    assert len(net.stem.levels) == 2 and net.first_transformer_level == 2
    aniso = PVTGDLA.from_plans(make_configuration(**{**PLANS['3d_aniso_6'], 'patch_size': [8, 64, 48]}), 1, 2, **TINY)
    assert list(aniso.encoder.stages[0].embed.proj.stride) == [1, 4, 4]
    assert list(aniso.encoder.stages[0].blocks[0].attn.sr.stride) == [4, 8, 6]    # grid (8, 16, 12), sr 8


def test_bad_plans_are_clear_errors():
    with pytest.raises(PlansError, match='axis 1: patch 30 vs total stride 16'):
        PVTGDLA.from_plans(make_configuration([32, 30, 32], [[1, 1, 1]] + [[2, 2, 2]] * 4, [4] * 5), 1, 2, **TINY)
    with pytest.raises(PlansError, match='at least 2 stages'):
        PVTGDLA.from_plans(make_configuration([32, 32, 32], [[1, 1, 1]], [4]), 1, 2, **TINY)
    with pytest.raises(PlansError, match='timm encoder pvt_v2_b0 is 2-D'):
        PVTGDLA.from_plans(make_configuration(**PLANS['3d_iso_5']), 1, 2, timm_encoder='pvt_v2_b0')
    with pytest.raises(ValueError, match='one entry per stage'):
        PVTGDLA.from_plans(make_configuration(**PLANS['3d_iso_5']), 1, 2, **{**TINY, 'depths': (1, 1)})


def test_weight_decay_groups_exclude_lambda_norms_and_biases():
    net = PVTGDLA.from_plans(make_configuration(**PLANS['3d_iso_5']), 1, 2, **TINY)
    decay, no_decay = weight_decay_groups(net, 0.05)
    assert decay['weight_decay'] == 0.05 and no_decay['weight_decay'] == 0.0
    names = {id(p): n for n, p in net.named_parameters()}
    exempt = {names[id(p)] for p in no_decay['params']}
    decayed = {names[id(p)] for p in decay['params']}
    assert len(exempt) + len(decayed) == len(names)
    assert any(n.endswith('.lam') for n in exempt) and any(n.endswith('.rms_weight') for n in exempt)
    assert not any(n.endswith(('.lam', '.rms_weight', '.bias')) or 'norm' in n for n in decayed)
    assert 'decoder.blocks.2.attn.qkvg.weight' in decayed and 'encoder.stages.0.blocks.0.attn.q.weight' in decayed


def test_warmup_poly_schedule():
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPolyLRScheduler(opt, 3e-4, 100, 10)
    lrs = [sched.lr_at(e) for e in range(100)]
    np.testing.assert_allclose(lrs[:10], 3e-4 * np.arange(1, 11) / 10)
    assert lrs[10] == pytest.approx(3e-4) and lrs[55] == pytest.approx(3e-4 * 0.5 ** 0.9)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 0
    sched.step(42)                                     # nnU-Net steps with the epoch: stateless resume
    assert opt.param_groups[0]['lr'] == pytest.approx(sched.lr_at(42))
    assert WarmupPolyLRScheduler(opt, 1.0, 1, 10).lr_at(0) == 1.0      # a 1-epoch run skips warmup


def test_trainer_optimiser_is_adamw_with_groups():
    cm = make_configuration(**PLANS['3d_2stages'])
    trainer = make_trainer(nnUNetTrainerPVTGDLA, cm)
    trainer.network = PVTGDLA.from_plans(cm, 1, 3, True, **TINY)
    opt, sched = trainer.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and [g['weight_decay'] for g in opt.param_groups] == [0.05, 0.0]
    assert trainer.initial_lr == 3e-4 and isinstance(sched, WarmupPolyLRScheduler)


@pytest.mark.parametrize('name', ['3d_aniso_6', '2d_4stages'])
def test_gradients_reach_every_parameter(name):
    plans = PLANS[name]
    cm = make_configuration(**plans)
    trainer = make_trainer(nnUNetTrainerPVTGDLA_Elliptical, cm)
    net = PVTGDLA.from_plans(cm, 1, 3, True, attention='elliptical', **TINY)
    out = net(torch.randn(2, 1, *plans['patch_size']))
    seg = torch.randint(0, 3, (2, 1, *plans['patch_size'])).float()
    targets = [F.interpolate(seg, size=o.shape[2:], mode='nearest') for o in out]
    trainer._build_loss()(out, targets).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


PLANS_2D_TIMM = dict(patch_size=[64, 64], strides=[[1, 1]] + [[2, 2]] * 5, features=[4] * 6)


def test_timm_encoder_loads_a_local_checkpoint(tmp_path):
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    reference = timm.create_model('pvt_v2_b0', pretrained=False)           # an "ImageNet" checkpoint with head
    path = tmp_path / 'pvt_v2_b0.pth'
    torch.save(reference.state_dict(), path)
    cm = make_configuration(**PLANS_2D_TIMM)
    net = PVTGDLA.from_plans(cm, 3, 2, timm_encoder='pvt_v2_b0', decoder_head_dim=16)
    with torch.no_grad():
        assert [tuple(o.shape) for o in net(torch.randn(1, 3, 64, 64))] == [(1, 2, 64, 64), (1, 2, 32, 32),
                                                                          (1, 2, 16, 16), (1, 2, 8, 8)]
    net.encoder.load_pretrained(str(path))
    loaded = net.encoder.body.state_dict()
    ref = reference.state_dict()
    assert len(loaded) > 50
    for key, value in loaded.items():                 # features_only flattens 'stages.i' to 'stages_i'
        torch.testing.assert_close(value, ref[key.replace('stages_', 'stages.', 1)], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match='NNUNETV2_EXT_PVT_WEIGHTS'):
        net.encoder.load_pretrained(str(tmp_path / 'missing.pth'))
    wrong = tmp_path / 'wrong.pth'
    torch.save({'patch_embed1.proj.weight': torch.zeros(3)}, wrong)
    with pytest.raises(RuntimeError, match='not a usable pvt_v2_b0 checkpoint'):
        net.encoder.load_pretrained(str(wrong))
    # one input channel: timm adapts the RGB stem (sums it), everything else is copied as is
    single = PVTGDLA.from_plans(cm, 1, 2, timm_encoder='pvt_v2_b0', decoder_head_dim=16)
    single.encoder.load_pretrained(str(path))
    stem = 'patch_embed.proj.weight'
    torch.testing.assert_close(single.encoder.body.state_dict()[stem], ref[stem].sum(1, keepdim=True))
