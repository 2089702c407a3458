"""PVT-GDLA network from varied plans: deep-supervision outputs vs the trainer's scales, gradients, plans mapping
(strides and per-axis kernels), clear errors, trainer variants through nnU-Net's and the predictor's build path,
optimiser groups and schedule, and the 2-D timm encoder with local weights."""
import inspect
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from gradients import parameters_without_gradient
from plans_factory import make_configuration, make_plans, make_trainer
from nnunetv2_ext.blocks.pvt import embed_padding, overlap_kernel, reduction_ratios
from nnunetv2_ext.blocks.tokens import tokens_to_grid
from nnunetv2_ext.networks.plans import PlansError
from nnunetv2_ext.networks.pvt_gdla import PVTGDLA, TimmPVTv2Encoder, first_transformer_level, plans_widths
from nnunetv2_ext.trainers import (nnUNetTrainerPVTGDLA, nnUNetTrainerPVTGDLA_Elliptical,
                                   nnUNetTrainerPVTGDLA_EncRefine, nnUNetTrainerPVTGDLA_ImageNet,
                                   nnUNetTrainerPVTGDLA_Mahalanobis, nnUNetTrainerPVTGDLA_PlansWidths)
from nnunetv2_ext.trainers.base import deep_supervision_weights
from nnunetv2_ext.trainers.pvt_gdla import WarmupPolyLRScheduler, weight_decay_groups

TINY = dict(embed_dims=(8, 16, 16, 16), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2),
            stem_channels=4, decoder_head_dim=4, decoder_mlp_ratio=1.0)

PLANS = {
    '3d_iso_5': dict(patch_size=[32, 32, 32], strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, features=[4] * 5),
    '3d_4stages_odd': dict(patch_size=[20, 24, 40], strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                           features=[4] * 4, kernel_sizes=[[3, 3, 3], [3, 3, 3], [3, 3, 3], [1, 3, 3]]),
    '3d_aniso_6': dict(patch_size=[8, 32, 32], strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2],
                                                         [2, 2, 1]], features=[4] * 6,
                       kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
    '3d_3stages_odd': dict(patch_size=[12, 20, 28], strides=[[1, 1, 1], [2, 2, 2], [3, 5, 7]], features=[4] * 3),
    '3d_2stages': dict(patch_size=[8, 12, 16], strides=[[1, 1, 1], [2, 2, 2]], features=[4] * 2),
    '3d_7stages': dict(patch_size=[32, 32, 32], strides=[[1, 1, 1]] + [[2, 2, 2]] * 5 + [[1, 1, 1]], features=[4] * 7),
    '2d_7stages': dict(patch_size=[128, 96], strides=[[1, 1]] + [[2, 2]] * 5 + [[2, 1]], features=[4] * 7),
    '2d_4stages': dict(patch_size=[36, 20], strides=[[1, 1], [3, 2], [2, 2], [3, 5]], features=[4] * 4),
    '2d_5stages_odd': dict(patch_size=[48, 40], strides=[[1, 1], [2, 2], [2, 2], [2, 2], [2, 1]], features=[4] * 5),
    '2d_6stages': dict(patch_size=[64, 96], strides=[[1, 1]] + [[2, 2]] * 5, features=[4] * 6),
    '2d_8stages': dict(patch_size=[256, 128], strides=[[1, 1]] + [[2, 2]] * 6 + [[2, 1]], features=[4] * 8),
}
TRAINERS = {'softmax': nnUNetTrainerPVTGDLA, 'elliptical': nnUNetTrainerPVTGDLA_Elliptical,
            'mahalanobis': nnUNetTrainerPVTGDLA_Mahalanobis}
CASES = ([(name, 'softmax') for name in PLANS] +
         [('3d_aniso_6', 'elliptical'), ('2d_4stages', 'mahalanobis'), ('2d_6stages', 'elliptical')])


@pytest.mark.parametrize('case', range(len(CASES)), ids=[f'{n}-{a}' for n, a in CASES])
def test_outputs_match_trainer_scales_and_gradients_reach_every_parameter(case):
    name, attention = CASES[case]
    plans = PLANS[name]
    in_channels = 1 + case % 3                                       # 1, 2 and 3 input channels
    cm = make_configuration(**plans)
    trainer = make_trainer(TRAINERS[attention], cm)
    torch.manual_seed(case)
    # no stochastic depth: a block dropped for both samples would get no gradient, whatever the seed draws
    net = PVTGDLA.from_plans(cm, in_channels, 3, True, attention=attention, drop_path_rate=0.0, **TINY)
    # an attention over a single key (the deepest stages of deep plans hold one token) weights it by 1 whatever
    # the query: its query projection gets no gradient but rounding noise, by construction
    single_key = set()
    for name, module in net.named_modules():
        if isinstance(getattr(module, 'kv', None), torch.nn.Module) and isinstance(getattr(module, 'q', None),
                                                                                     torch.nn.Module):
            module.kv.register_forward_hook(
                lambda m, i, o, name=name: single_key.update({f'{name}.q.weight', f'{name}.q.bias'})
                if o.shape[1] == 1 else None)
    x = torch.randn(2, in_channels, *plans['patch_size'])
    out = net(x)
    scales = trainer._get_deep_supervision_scales()
    assert len(out) == len(scales) == min(4, len(plans['strides']) - 1)
    for o, sc in zip(out, scales):
        assert tuple(o.shape) == (2, 3, *[round(p * s) for p, s in zip(plans['patch_size'], sc)])
    seg = torch.randint(0, 3, (2, 1, *plans['patch_size'])).float()
    targets = [F.interpolate(seg, size=o.shape[2:], mode='nearest') for o in out]
    trainer._build_loss()(out, targets).backward()
    missing = set(parameters_without_gradient(net))
    assert missing <= single_key, sorted(missing - single_key)
    net.decoder.deep_supervision = False
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == out[0].shape
    inference = PVTGDLA.from_plans(cm, in_channels, 3, False, **TINY)
    assert not inference.decoder.deep_supervision


def _attention_of(net: nn.Module) -> set[str]:
    return {b.attn.attend.variant for stage in net.encoder.stages for b in stage.blocks}


VARIANTS = [(nnUNetTrainerPVTGDLA, 'softmax'), (nnUNetTrainerPVTGDLA_Elliptical, 'elliptical'),
            (nnUNetTrainerPVTGDLA_Mahalanobis, 'mahalanobis'), (nnUNetTrainerPVTGDLA_EncRefine, 'softmax')]


@pytest.mark.parametrize('trainer_class,attention', VARIANTS, ids=[c.__name__ for c, _ in VARIANTS])
def test_variants_are_built_by_nnunet_trainer_and_predictor(tmp_path, trainer_class, attention):
    """A variant only sets ``network_options``; nnU-Net's trainer (``self.build_network_architecture``) and
    ``nnUNetPredictor`` (``trainer_class.build_network_architecture`` from a saved model folder) both build it."""
    cm = make_configuration(**PLANS['3d_2stages'])
    trainer = make_trainer(trainer_class, cm)
    assert 'plans_manager' in inspect.signature(trainer.build_network_architecture).parameters   # nnU-Net's check
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, True)
    stage = net.encoder.stages[0]
    assert stage.embed.proj.out_channels == 64 and len(stage.blocks) == 3           # PVTv2-b2's first stage
    assert _attention_of(net) == {attention} and net.decoder.deep_supervision

    model = tmp_path / 'model'
    (model / 'fold_0').mkdir(parents=True)
    (model / 'plans.json').write_text(json.dumps(make_plans(cm)))
    (model / 'dataset.json').write_text(json.dumps(trainer.dataset_json))
    torch.save({'trainer_name': trainer_class.__name__, 'init_args': {'configuration': '3d_fullres'},
                'network_weights': net.state_dict(), 'inference_allowed_mirroring_axes': (0, 1, 2)},
               model / 'fold_0' / 'checkpoint_final.pth')
    predictor = nnUNetPredictor(device=torch.device('cpu'), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0,))
    assert type(predictor.network) is PVTGDLA and _attention_of(predictor.network) == {attention}
    assert not predictor.network.decoder.deep_supervision
    for key, value in net.state_dict().items():
        torch.testing.assert_close(predictor.network.state_dict()[key], value, rtol=0, atol=0)


def test_imagenet_variant_builds_the_timm_encoder():
    cm = make_configuration(**PLANS_2D_TIMM)
    trainer = make_trainer(nnUNetTrainerPVTGDLA_ImageNet, cm)
    net = trainer.build_network_architecture(trainer.plans_manager, cm, 1, 2, True)
    assert isinstance(net.encoder, TimmPVTv2Encoder) and net.encoder.variant == 'pvt_v2_b2'


# thick slices: (1, 3, 3) kernels (and no z stride) up to level 2, where the first transformer stage sits
THICK = dict(patch_size=[6, 32, 32], strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
             features=[4] * 5, kernel_sizes=[[1, 3, 3], [1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]])


def _changed_slices(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    """Indices along the first spatial axis (dim 2 of ``(B, C, Z, …)``) where ``a`` and ``b`` differ."""
    diff = (a - b).abs().flatten(3).amax(dim=(0, 1, 3))
    return set(torch.nonzero(diff > 0).flatten().tolist())


def test_plans_kernels_shape_every_conv_and_thick_slices_are_not_mixed():
    torch.manual_seed(0)
    net = PVTGDLA.from_plans(make_configuration(**THICK), 1, 2, True, **TINY).eval()
    k0, kernels = net.first_transformer_level, [tuple(k) for k in THICK['kernel_sizes']]
    assert k0 == 2
    # weights follow the plans: embedding (1, 7, 7) into level 2, 3³ below; ConvFFN and GDLAM convs per level
    assert [tuple(s.embed.proj.kernel_size) for s in net.encoder.stages] == [(1, 7, 7), (3, 3, 3), (3, 3, 3)]
    for i, stage in enumerate(net.encoder.stages):
        assert {tuple(b.ffn.dwconv.weight.shape[2:]) for b in stage.blocks} == {kernels[k0 + i]}
    for lvl in range(k0, len(net.encoder.stages) + k0):
        block = net.decoder.blocks[str(lvl)]
        assert {tuple(m.weight.shape[2:]) for m in (block.conv, block.attn.local_dw, block.mlp.dwconv)} == \
            {kernels[lvl]}

    # perturbing slice 3 changes the convolutions' outputs in slice 3 only, wherever the plans' kernel is 1 along z
    # (instance norm pools statistics over all slices, in nnU-Net's U-Net too: left out to probe the convolutions)
    net = PVTGDLA(1, 2, THICK['patch_size'], THICK['strides'], THICK['kernel_sizes'], norm_op=nn.Identity, **TINY)
    x = torch.randn(1, 1, *THICK['patch_size'])
    x2 = x.clone()
    x2[:, :, 3] += torch.randn_like(x2[:, :, 3])
    with torch.no_grad():
        for f, f2 in zip(net.stem(x), net.stem(x2)):                           # levels 0, 1
            assert _changed_slices(f, f2) == {3}
        embed = net.encoder.stages[0].embed                                    # level 2
        (t, grid), (t2, _) = embed(x), embed(x2)
        assert grid == (6, 8, 8) and _changed_slices(tokens_to_grid(t, grid), tokens_to_grid(t2, grid)) == {3}
        ffn = net.encoder.stages[0].blocks[0].ffn
        t = torch.randn(1, 6 * 8 * 8, ffn.fc1.in_features)
        t2 = tokens_to_grid(t, grid).clone()
        t2[:, :, 3] += 1.0
        t2 = t2.flatten(2).transpose(1, 2)
        assert _changed_slices(tokens_to_grid(ffn(t, grid), grid), tokens_to_grid(ffn(t2, grid), grid)) == {3}
        gdlam = net.decoder.blocks[str(k0)]
        h = torch.randn(1, gdlam.conv.in_channels, *grid)
        h2 = h.clone()
        h2[:, :, 3] += 1.0
        for conv in (gdlam.conv, gdlam.mlp):
            assert _changed_slices(conv(h), conv(h2)) == {3}
        q = torch.randn(1, gdlam.attn.local_dw.in_channels, *grid)
        q2 = q.clone()
        q2[:, :, 3] += 1.0
        assert _changed_slices(gdlam.attn.local_dw(q), gdlam.attn.local_dw(q2)) == {3}
        # at level 3 the plans convolve z (kernel 3): there the same ConvFFN probe does spread to the neighbours
        ffn3, grid3 = net.encoder.stages[1].blocks[0].ffn, (3, 4, 4)
        t = torch.randn(1, 3 * 4 * 4, ffn3.fc1.in_features)
        t2 = tokens_to_grid(t, grid3).clone()
        t2[:, :, 1] += 1.0
        t2 = t2.flatten(2).transpose(1, 2)
        assert _changed_slices(tokens_to_grid(ffn3(t, grid3), grid3), tokens_to_grid(ffn3(t2, grid3), grid3)) == \
            {0, 1, 2}


def test_even_plans_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match='even entry'):
        PVTGDLA.from_plans(make_configuration(**{**THICK, 'kernel_sizes': [[1, 3, 3]] * 2 + [[2, 3, 3]] * 3}),
                           1, 2, **TINY)


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
    assert overlap_kernel([4, 4, 1], [1, 3, 3]) == [4, 7, 3] and overlap_kernel([1, 4, 4], [1, 3, 3]) == [1, 7, 7]
    assert embed_padding([4, 7, 3], [4, 4, 1]) == [0, 3, 1]
    assert reduction_ratios([8, 8, 8], 8) == [4, 4, 4]                  # keeps 2 K/V tokens per axis
    assert reduction_ratios([16, 16], 8) == [8, 8] and reduction_ratios([2, 2, 2], 2) == [1, 1, 1]
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
    assert opt.param_groups[0]['lr'] == pytest.approx(3e-4 / trainer.warmup_epochs)  # first warm-up epoch
    narrow = make_trainer(nnUNetTrainerPVTGDLA_PlansWidths, cm)
    assert narrow.initial_lr == 1e-3  # the plans-width variant's own default (docs/pvt_gdla.md)


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


def test_zero_background_does_not_blow_up_gradients_at_init():
    """A patch that is mostly exactly 0 (nnU-Net's masked z-scoring and padding) must give gradients below
    nnU-Net's clip norm (12) at init (measured 3.5–4.5 over 3 seeds). With a zero patch-embedding bias every
    background token entered the embedding's LayerNorm as the zero vector and was divided by √eps: total norm
    8–10·10⁴, nearly all of it the embedding bias's, and the clip then scaled every gradient by ~10⁻⁴ (docs/pvt_gdla.md, "Convergence in short schedules")."""
    torch.manual_seed(0)
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 3
    net = PVTGDLA(1, 3, (24, 32, 24), strides, [[3, 3, 3]] * 4, **plans_widths([8, 16, 32, 64], strides))
    for stage in net.encoder.stages:
        assert stage.embed.proj.bias.std() > 0.5          # a constant region embeds to a non-degenerate token
    x = torch.zeros(2, 1, 24, 32, 24)
    x[:, :, 6:18, 8:24, 6:18] = torch.randn(2, 1, 12, 16, 12)   # brain in the middle, exact zeros around it
    target = (x[:, 0] != 0).long() + (x[:, 0] > 0).long()
    outputs = net(x)
    weights = deep_supervision_weights(len(outputs))                  # the trainer's (4, 2, 1) / 7
    loss = sum(w * F.cross_entropy(o, F.interpolate(target[:, None].float(), size=o.shape[2:])[:, 0].long())
               for w, o in zip(weights, outputs))
    loss.backward()
    norms = {n: p.grad.norm().item() for n, p in net.named_parameters() if p.grad is not None}
    total = sum(v ** 2 for v in norms.values()) ** 0.5
    assert total < 12, (total, max(norms, key=norms.get))
