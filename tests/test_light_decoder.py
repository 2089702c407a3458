"""Light conv decoder: shapes/scales from varied plans, deep-supervision weights, loss wiring, gradients."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradients import parameters_without_gradient
from plans_factory import expected_ds_shapes, make_configuration, make_trainer
from nnunetv2_ext.benchmark import saved_activation_bytes
from nnunetv2_ext.blocks.light_decoder import LightDecoder, LightResidualBlock
from nnunetv2_ext.networks.light_decoder_unet import LightDecoderUNet
from nnunetv2_ext.networks.plans import PlansError, check_patch_fits_strides
from nnunetv2_ext.trainers import nnUNetTrainerLightDecoder
from nnunetv2_ext.trainers.base import deep_supervision_weights

PLANS = {
    '3d_iso_5': dict(patch_size=[32, 32, 32], strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, features=[4, 8, 16, 16, 16]),
    '3d_aniso_6': dict(patch_size=[8, 64, 48], strides=[[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2],
                                                         [2, 2, 1]], features=[4, 8, 8, 16, 16, 16],
                       kernel_sizes=[[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
    '3d_3stages_residual': dict(patch_size=[12, 20, 28], strides=[[1, 1, 1], [2, 2, 2], [3, 5, 7]],
                                features=[4, 8, 8], residual=True),
    '3d_7stages': dict(patch_size=[64, 64, 64], strides=[[1, 1, 1]] + [[2, 2, 2]] * 5 + [[1, 1, 1]],
                       features=[2, 2, 4, 4, 4, 4, 4]),
    '2d_7stages': dict(patch_size=[128, 96], strides=[[1, 1]] + [[2, 2]] * 5 + [[2, 1]], features=[4] * 7),
    '2d_4stages_residual': dict(patch_size=[36, 20], strides=[[1, 1], [3, 2], [2, 2], [3, 5]], features=[4, 8, 8, 8],
                                residual=True),
}


@pytest.mark.parametrize('name', list(PLANS))
def test_outputs_match_trainer_scales(name):
    plans = PLANS[name]
    cm = make_configuration(**plans)
    trainer = make_trainer(nnUNetTrainerLightDecoder, cm)
    net = trainer.build_network_architecture(trainer.plans_manager, cm, 2, 3, enable_deep_supervision=True)
    x = torch.randn(2, 2, *plans['patch_size'])
    out = net(x)
    expected = expected_ds_shapes(plans, 3, 2)
    assert [tuple(o.shape) for o in out] == expected
    trainer_scales = trainer._get_deep_supervision_scales()
    assert len(trainer_scales) == len(out) == min(4, len(plans['strides']) - 1)
    for o, sc in zip(out, trainer_scales):
        assert list(o.shape[2:]) == [round(p * s) for p, s in zip(plans['patch_size'], sc)]
    # inference: deep supervision off -> one full-resolution tensor (and the trainer's switch works)
    net.decoder.deep_supervision = False
    single = net(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == expected[0]
    net_inf = trainer.build_network_architecture(trainer.plans_manager, cm, 2, 3, enable_deep_supervision=False)
    assert isinstance(net_inf(x), torch.Tensor)


def test_encoder_is_the_planned_one():
    plain = LightDecoderUNet.from_plans(make_configuration(**PLANS['3d_iso_5']), 1, 2)
    residual = LightDecoderUNet.from_plans(make_configuration(**PLANS['3d_3stages_residual']), 1, 2)
    assert type(plain.encoder).__name__ == 'PlainConvEncoder'
    assert type(residual.encoder).__name__ == 'ResidualEncoder'
    assert plain.decoder.blocks[0].body[1].__class__ is nn.InstanceNorm3d  # norm_op follows the plans


def test_residual_block_formula():
    torch.manual_seed(0)
    block = LightResidualBlock(6, 4, nn.Conv3d, [3, 3, 3], nn.InstanceNorm3d, {'affine': True}, nn.LeakyReLU,
                               {'inplace': True, 'negative_slope': 0.01}).double()
    g = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64)
    c1, n1, _, c2, n2 = block.body
    r2 = n2(c2(F.leaky_relu(n1(c1(g)), 0.01)))
    expected = F.leaky_relu(block.proj(g) + r2, 0.01)
    torch.testing.assert_close(block(g), expected, rtol=0, atol=1e-12)
    assert isinstance(LightResidualBlock(4, 4, nn.Conv3d, [3] * 3, None, None, nn.ReLU, None).proj, nn.Identity)


def test_inner_activation_runs_in_place_as_planned_and_saves_one_tensor():
    def block(inplace):
        torch.manual_seed(0)
        return LightResidualBlock(4, 4, nn.Conv3d, [3] * 3, nn.InstanceNorm3d, {'affine': True}, nn.LeakyReLU,
                                  {'inplace': inplace})
    lean, plain = block(True), block(False)
    assert lean.body[2].inplace and not lean.act.inplace  # the outer σ never: the heads read r1 + r2
    g = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    torch.testing.assert_close(lean(g), plain(g), rtol=0, atol=0)
    one_tensor = 2 * 4 * 6 ** 3 * 4
    assert saved_activation_bytes(lambda: plain(g)) - saved_activation_bytes(lambda: lean(g)) == one_tensor


def test_deep_supervision_weights():
    np.testing.assert_allclose(deep_supervision_weights(4), np.array([8, 4, 2, 1]) / 15, rtol=0, atol=1e-15)
    np.testing.assert_allclose(deep_supervision_weights(3), np.array([4, 2, 1]) / 7, rtol=0, atol=1e-15)
    np.testing.assert_allclose(deep_supervision_weights(1), [1.0])


def _targets(trainer, shape, high):
    """One integer label map per deep-supervision scale (nearest downsampling, as nnU-Net's transform)."""
    seg = torch.randint(0, high, (shape[0], 1, *shape[2:])).float()
    return [F.interpolate(seg, size=[round(s * f) for s, f in zip(shape[2:], sc)], mode='nearest')
            for sc in trainer._get_deep_supervision_scales()]


def test_loss_wiring_weights_and_sum():
    cm = make_configuration(**PLANS['3d_iso_5'])
    trainer = make_trainer(nnUNetTrainerLightDecoder, cm)
    loss = trainer._build_loss()
    np.testing.assert_allclose(loss.weight_factors, np.array([8, 4, 2, 1]) / 15)
    net = trainer.build_network_architecture(trainer.plans_manager, cm, 1, 3, True)
    out = net(torch.randn(2, 1, 32, 32, 32))
    targets = _targets(trainer, out[0].shape, 3)
    total = loss(out, targets)
    manual = sum(w * loss.loss(o, t) for w, o, t in zip(np.array([8, 4, 2, 1]) / 15, out, targets))
    torch.testing.assert_close(total, manual)
    assert type(loss.loss).__name__ == 'DC_and_CE_loss'


def test_two_stage_plans_supervise_one_output_without_a_numpy_warning():
    """One supervised output gets weight 1; nnU-Net's own weights (0/0 there, replaced) warn nothing."""
    cm = make_configuration(patch_size=[8, 12, 16], strides=[[1, 1, 1], [2, 2, 2]], features=[4, 4])
    trainer = make_trainer(nnUNetTrainerLightDecoder, cm)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        loss = trainer._build_loss()
    np.testing.assert_allclose(loss.weight_factors, [1.0])


def test_regions_use_bce_dice_and_one_head_per_region():
    cm = make_configuration(**PLANS['3d_iso_5'])
    trainer = make_trainer(nnUNetTrainerLightDecoder, cm, labels={'background': 0, 'whole': [1, 2], 'core': 2},
                           regions_class_order=[1, 2])
    assert trainer.label_manager.num_segmentation_heads == 2
    loss = trainer._build_loss()
    assert type(loss.loss).__name__ == 'DC_and_BCE_loss'
    np.testing.assert_allclose(loss.weight_factors, np.array([8, 4, 2, 1]) / 15)


def test_ignore_label_voxels_do_not_affect_loss():
    cm = make_configuration(**PLANS['3d_iso_5'])
    trainer = make_trainer(nnUNetTrainerLightDecoder, cm, labels={'background': 0, 'a': 1, 'ignore': 2})
    heads = trainer.label_manager.num_segmentation_heads
    assert heads == 2
    loss = trainer._build_loss()
    net = trainer.build_network_architecture(trainer.plans_manager, cm, 1, heads, True)
    torch.manual_seed(0)
    out = [o.detach() for o in net(torch.randn(2, 1, 32, 32, 32))]
    targets = _targets(trainer, out[0].shape, 3)
    base = loss(out, targets)
    perturbed = [o + 50 * (t == 2).float() * torch.randn_like(o) for o, t in zip(out, targets)]
    torch.testing.assert_close(loss(perturbed, targets), base)
    changed = [o + 5 * (t == 1).float() * torch.randn_like(o) for o, t in zip(out, targets)]
    assert not torch.allclose(loss(changed, targets), base)


@pytest.mark.parametrize('name', ['3d_aniso_6', '2d_4stages_residual'])
def test_gradients_reach_every_parameter(name):
    plans = PLANS[name]
    cm = make_configuration(**plans)
    trainer = make_trainer(nnUNetTrainerLightDecoder, cm)
    loss = trainer._build_loss()
    net = trainer.build_network_architecture(trainer.plans_manager, cm, 1, 3, True)
    # ResEnc zero-initialises the last norm of each residual branch (nnU-Net's choice), which zeroes
    # the gradients behind it at step 0; undo that so "nonzero" tests connectivity only
    for m in net.modules():
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            nn.init.ones_(m.weight)
    out = net(torch.randn(2, 1, *plans['patch_size']))
    loss(out, _targets(trainer, out[0].shape, 3)).backward()
    missing = parameters_without_gradient(net)
    assert missing == []


def test_patch_not_fitting_strides_is_a_clear_error():
    with pytest.raises(PlansError, match=r'axis 1: patch 30 vs total stride 16.*re-run nnUNetv2_plan_and_preprocess'):
        check_patch_fits_strides([32, 30, 32], [[1, 1, 1]] + [[2, 2, 2]] * 4)
    cm = make_configuration(patch_size=[32, 30, 32], strides=PLANS['3d_iso_5']['strides'], features=[4] * 5)
    with pytest.raises(PlansError, match='does not fit'):
        LightDecoderUNet.from_plans(cm, 1, 2)


def test_architecture_without_encoder_is_a_clear_error():
    cm = make_configuration(**PLANS['3d_iso_5'])
    cm.configuration['architecture']['network_class_name'] = 'torch.nn.Identity'
    with pytest.raises((PlansError, TypeError)):
        LightDecoderUNet.from_plans(cm, 1, 2)


def test_decoder_rejects_wrong_number_of_features():
    dec = LightDecoder([4, 8], [[1, 1, 1], [2, 2, 2]], [[3] * 3] * 2, 2, nn.Conv3d)
    with pytest.raises(ValueError, match='expected 2 feature maps, got 1'):
        dec([torch.randn(1, 4, 4, 4, 4)])


def test_vnet_dice_formula_and_trainer_variant():
    from nnunetv2.utilities.helpers import softmax_helper_dim1
    from nnunetv2_ext.losses import SquaredDenominatorDiceLoss
    from nnunetv2_ext.trainers import nnUNetTrainerLightDecoder_VNetDice

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 1, 5, 6, 7))
    p = torch.softmax(x, 1)[:, 1:]
    onehot = F.one_hot(y[:, 0], 3).permute(0, 4, 1, 2, 3)[:, 1:].double()
    axes = (2, 3, 4)
    expected = -((2 * (p * onehot).sum(axes) + 1e-5) / ((p * p).sum(axes) + (onehot ** 2).sum(axes) + 1e-5)).mean()
    loss = SquaredDenominatorDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=False, do_bg=False, smooth=1e-5,
                                      ddp=False)
    torch.testing.assert_close(loss(x, y).double(), expected)
    # batch dice sums over the batch before the ratio
    expected_b = -((2 * (p * onehot).sum((0, *axes)) + 1e-5) /
                   ((p * p).sum((0, *axes)) + onehot.sum((0, *axes)) + 1e-5)).mean()
    loss.batch_dice = True
    torch.testing.assert_close(loss(x, y).double(), expected_b)
    # differs from nnU-Net's plain-sum Dice, and the variant wires it under deep supervision
    cm = make_configuration(**PLANS['3d_iso_5'])
    trainer_loss = make_trainer(nnUNetTrainerLightDecoder_VNetDice, cm)._build_loss()
    assert isinstance(trainer_loss.loss.dc, SquaredDenominatorDiceLoss) and trainer_loss.loss.dc.do_bg is False
    np.testing.assert_allclose(trainer_loss.weight_factors, np.array([8, 4, 2, 1]) / 15)
    stock = make_trainer(nnUNetTrainerLightDecoder, cm)._build_loss().loss.dc
    loss.batch_dice = False
    assert not torch.allclose(stock(x, y).double(), loss(x, y).double())


def test_decoder_formula_heads_read_the_residual_sum():
    torch.manual_seed(0)
    kw = dict(conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d, norm_op_kwargs={'affine': True}, nonlin=nn.LeakyReLU,
              nonlin_kwargs={'inplace': True})
    dec = LightDecoder([3, 5, 6], [[1, 1, 1], [2, 2, 1], [1, 2, 2]], [[3, 3, 3]] * 3, 2, **kw).double()
    x0, x1, x2 = (torch.randn(2, c, *s, dtype=torch.float64) for c, s in ((3, (4, 8, 8)), (5, (2, 4, 8)),
                                                                          (6, (2, 2, 4))))
    lrelu = lambda t: F.leaky_relu(t, 0.01)  # noqa: E731
    up1, up0 = dec.upsample
    b1, b0 = dec.blocks
    r1 = b1.proj(torch.cat((up1(x2), x1), 1)) + b1.body(torch.cat((up1(x2), x1), 1))
    g0 = torch.cat((up0(lrelu(r1)), x0), 1)
    r0 = b0.proj(g0) + b0.body(g0)
    out = dec([x0, x1, x2])
    torch.testing.assert_close(out[0], dec.seg_layers[0](r0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1], dec.seg_layers[1](r1), rtol=0, atol=1e-12)
