"""RWKV-UNet from varied 2-D and 3-D plans: deep-supervision outputs, gradients, variants, checkpointing, regions and
ignore label, errors, compile."""
import inspect

import numpy as np
import pytest
import torch
from torch import nn

from gradients import parameters_without_gradient
from plans_factory import expected_ds_shapes, make_configuration, make_trainer
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_ext.benchmark import saved_activation_bytes
from nnunetv2_ext.blocks.glsp import SqueezeExcite
from nnunetv2_ext.networks.plans import PlansError
from nnunetv2_ext.networks.rwkv_unet import RWKVUNet, depths_from_plans
from nnunetv2_ext.trainers import (nnUNetTrainerGLSP, nnUNetTrainerGLSP_BN, nnUNetTrainerGLSP_Checkpoint,
                                   nnUNetTrainerGLSP_NoRecompute, nnUNetTrainerGLSP_NoRWKV)


@pytest.fixture(autouse=True)
def _torch_wkv(monkeypatch):
    monkeypatch.setenv('CUDA_WKV_BACKEND', 'torch')  # WKV kernels are tested in tests/test_wkv.py


PLANS = {
    # bottlenecks of ≥ 2 voxels (instance norm needs more than one in training), as nnU-Net's planner makes them
    '2d_5_odd': dict(patch_size=[24, 40], strides=[[1, 1], [2, 2], [2, 2], [3, 1], [1, 5]], features=[4, 8, 8, 8, 8]),
    '2d_6_aniso': dict(patch_size=[64, 16], strides=[[1, 1], [2, 2], [2, 2], [2, 2], [2, 1], [2, 1]],
                       features=[4, 8, 8, 8, 8, 8], kernel_sizes=[[3, 3]] * 4 + [[3, 1]] * 2),
    '2d_7_resenc': dict(patch_size=[96, 128], strides=[[1, 1]] + [[2, 2]] * 4 + [[3, 2], [1, 2]],
                        features=[2, 4, 4, 8, 8, 8, 8], residual=True),
    '2d_8': dict(patch_size=[64, 256], strides=[[1, 1]] + [[2, 2]] * 5 + [[1, 2]] * 2,
                 features=[2, 4, 4, 4, 8, 8, 8, 8]),
    '3d_3_odd': dict(patch_size=[12, 20, 14], strides=[[1, 1, 1], [2, 2, 1], [3, 5, 7]], features=[4, 8, 8]),
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
    SqueezeExcite hidden ReLUs active, so "every parameter gets a gradient" tests connectivity, not the init or
    luck."""
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
        if isinstance(m, SqueezeExcite):
            nn.init.constant_(m.gate[1].bias, 1.0)
    return net


def _channels(name: str) -> int:
    """1, 2 or 3 input channels, varied over the plans."""
    return 1 + list(PLANS).index(name) % 3


@pytest.mark.parametrize('name', list(PLANS))
def test_outputs_match_trainer_scales(name):
    plans = PLANS[name]
    cm = make_configuration(**plans)
    trainer = make_trainer(nnUNetTrainerGLSP, cm)
    c_in = _channels(name)
    net = trainer.build_network_architecture(trainer.plans_manager, cm, c_in, 3, enable_deep_supervision=True)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert all(isinstance(m, nn.Conv2d if len(plans['patch_size']) == 2 else nn.Conv3d) for m in convs)
    x = torch.randn(2, c_in, *plans['patch_size'])
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
    net_inf = trainer.build_network_architecture(trainer.plans_manager, cm, c_in, 3, enable_deep_supervision=False)
    out_inf = net_inf(x)
    assert isinstance(out_inf, torch.Tensor) and tuple(out_inf.shape) == (2, 3, *plans['patch_size'])


@pytest.mark.parametrize('name,start,n_glsp', [('3d_3_odd', 1, 1), ('3d_odd_4_resenc', 2, 1), ('2d_5_odd', 2, 2),
                                               ('3d_7stages', 2, 4), ('2d_8', 2, 5)])
def test_branch_starts_where_the_plans_allow(name, start, n_glsp):
    """Stage 2 (1/4 resolution) with ≥ 4 stages, else stage n − 2: one GLSP stage and one downsampling."""
    net = RWKVUNet.from_plans(make_configuration(**PLANS[name]), 1, 2)
    n = len(PLANS[name]['strides'])
    assert (net.branch_start, len(net.branch.glsp), len(net.fuse)) == (start, n_glsp, n - start)
    assert net.branch.in_proj[0].in_channels == PLANS[name]['features'][start]


def test_network_follows_the_plans():
    cm2d = make_configuration(**PLANS['2d_6_aniso'])
    net2d = RWKVUNet.from_plans(cm2d, 1, 2)
    assert net2d.branch.glsp[-1].local[0].kernel_size == (3, 1)  # stage 4 kernel of the 2-D plans
    assert isinstance(net2d.branch.glsp[0].local[1], nn.InstanceNorm2d) and net2d.branch.glsp[0].mix.ndim == 2
    cm = make_configuration(**PLANS['3d_aniso_6'])
    net = RWKVUNet.from_plans(cm, 1, 2)
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


@pytest.mark.parametrize('name,trainer_class', [(name, nnUNetTrainerGLSP) for name in PLANS] + [
    (name, tr) for name in ('2d_6_aniso', '3d_aniso_6') for tr in (nnUNetTrainerGLSP_NoRWKV, nnUNetTrainerGLSP_BN)])
def test_gradients_reach_every_parameter(name, trainer_class):
    plans = PLANS[name]
    cm = make_configuration(**plans)
    trainer = make_trainer(trainer_class, cm)
    torch.manual_seed(0)
    c_in = _channels(name)
    net = _unzero(trainer.build_network_architecture(trainer.plans_manager, cm, c_in, 3, True))
    out = net(torch.randn(2, c_in, *plans['patch_size']))
    loss = trainer._build_loss()
    n_out = min(4, len(plans['strides']) - 1)
    weights = 2.0 ** np.arange(n_out - 1, -1, -1)
    np.testing.assert_allclose(loss.weight_factors, weights / weights.sum())  # (8, 4, 2, 1)/15 for 4 outputs
    loss(out, _targets(trainer, out[0].shape, 3)).backward()
    missing = parameters_without_gradient(net)
    # the WKV weight of neighbours, exp(−(|t−i|−1)·w/T), is 1: on a grid of two tokens the decay w has no effect
    assert missing == (['branch.glsp.3.mix.spatial_decay'] if name == '3d_7stages' else [])


class _NoSE(nnUNetTrainerGLSP):  # a user's variant: two lines
    network_options = {'se_ratio': 0.0}


def test_a_variant_is_a_class_attribute_that_trainer_and_predictor_both_use():
    """nnU-Net's trainer calls ``self.build_network_architecture(...)``, nnUNetPredictor
    ``trainer_class.build_network_architecture(...)`` after checking the signature names ``plans_manager``:
    both build the variant's network."""
    cm = make_configuration(**PLANS['2d_5_odd'])
    trainer = make_trainer(_NoSE, cm)
    for build in (trainer.build_network_architecture, _NoSE.build_network_architecture):
        assert 'plans_manager' in inspect.signature(build).parameters  # nnU-Net's check for the current signature
        net = build(trainer.plans_manager, cm, 1, 3, enable_deep_supervision=False)
        assert net.branch is not None and not any(isinstance(m, SqueezeExcite) for m in net.modules())
    base = nnUNetTrainerGLSP.build_network_architecture(None, cm, 1, 3)
    assert any(isinstance(m, SqueezeExcite) for m in base.modules())
    assert nnUNetTrainerGLSP.network_options == {}  # building did not change the base class's options


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
    plain = RWKVUNet.from_plans(cm, 1, 2, checkpoint_levels=0, checkpoint_branch=False)
    stage0_only = RWKVUNet.from_plans(cm, 1, 2, checkpoint_branch=False)
    default = nnUNetTrainerGLSP.build_network_architecture(None, cm, 1, 2)
    stored = [saved_activation_bytes(lambda: net(x)) for net in (plain, stage0_only, default)]
    stage0 = saved_activation_bytes(lambda: plain.encoder.stages[0](x))
    assert stored[0] - stored[1] >= stage0 - x.numel() * x.element_size() > 0
    assert stored[2] < stored[1]
    bn = nnUNetTrainerGLSP_BN.build_network_architecture(None, cm, 1, 2)
    assert bn.encoder.checkpoint_stages == 0 and not bn.branch.checkpoint


def _perturbed_where(tensors, masks, seed):
    """Copies of ``tensors`` with large random values wherever ``masks`` (broadcast over channels) is true."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.where(m, 10 * torch.randn(t.shape, generator=gen), t) for t, m in zip(tensors, masks)]


@pytest.mark.parametrize('name', ['2d_5_odd', '3d_iso_5'])
def test_regions_and_ignore_label_ignored_voxels_do_not_change_the_loss(name):
    """Regions + ignore label (BCE+Dice with the ignore channel last, as nnU-Net's transforms build it) and labels +
    ignore label (CE+Dice with ``ignore_index``): the logits, and for regions the region targets, at ignored voxels
    do not change the deep-supervised loss; the same change at the kept voxels does."""
    plans = PLANS[name]
    cm = make_configuration(**plans)
    torch.manual_seed(0)
    x = torch.randn(2, 1, *plans['patch_size'])
    regions = make_trainer(nnUNetTrainerGLSP, cm, labels={'background': 0, 'whole': [1, 2], 'core': 2, 'ignore': 3},
                           regions_class_order=[1, 2])
    assert regions.label_manager.has_regions and regions.label_manager.has_ignore_label
    heads = regions.label_manager.num_segmentation_heads
    out = [o.detach() for o in regions.build_network_architecture(regions.plans_manager, cm, 1, heads, True)(x)]
    assert out[0].shape[1] == heads == 2
    labels = _targets(regions, out[0].shape, 4)
    targets = [torch.cat([(t >= 1) & (t != 3), t == 2, t == 3], 1).float() for t in labels]
    ignored = [t == 3 for t in labels]
    assert all(m.any() and (~m).any() for m in ignored)
    loss = regions._build_loss()
    reference = loss(out, targets)
    torch.testing.assert_close(loss(_perturbed_where(out, ignored, 1), targets), reference, rtol=1e-6, atol=0)
    moved_targets = [torch.cat([torch.where(m, 1 - t[:, :-1], t[:, :-1]), t[:, -1:]], 1)
                     for t, m in zip(targets, ignored)]
    torch.testing.assert_close(loss(out, moved_targets), reference, rtol=1e-6, atol=0)
    kept = [~ignored[0]] + [torch.zeros_like(m) for m in ignored[1:]]
    assert not torch.isclose(loss(_perturbed_where(out, kept, 1), targets), reference, rtol=1e-4)

    ignore = make_trainer(nnUNetTrainerGLSP, cm, labels={'background': 0, 'a': 1, 'ignore': 2})
    out = [o.detach() for o in ignore.build_network_architecture(ignore.plans_manager, cm, 1, 2, True)(x)]
    targets = _targets(ignore, out[0].shape, 3)
    ignored = [t == 2 for t in targets]
    loss = ignore._build_loss()
    reference = loss(out, targets)
    torch.testing.assert_close(loss(_perturbed_where(out, ignored, 2), targets), reference, rtol=1e-6, atol=0)
    kept = [~ignored[0]] + [torch.zeros_like(m) for m in ignored[1:]]
    assert not torch.isclose(loss(_perturbed_where(out, kept, 2), targets), reference, rtol=1e-4)


@pytest.mark.parametrize('name', ['2d_5_odd', '3d_iso_5'])
def test_amp_forward_backward(name):
    # 3-D at 32^3, not the plan's 16^3: at a 2^3 grid, torch 2.14's CPU bfloat16 Conv3d weight gradient
    # (16 channels, 3^3 kernel) intermittently reads uninitialised memory (NaN in ~1 of 5 calls once freed
    # memory holds NaN; a bare Conv3d shows it, float32/float16 and 4^3 grids do not). nnU-Net autocasts on CUDA
    # only, so CPU training never runs that kernel.
    plan = dict(PLANS[name], patch_size=[32, 32, 32]) if name == '3d_iso_5' else PLANS[name]
    cm = make_configuration(**plan)
    net = _unzero(RWKVUNet.from_plans(cm, 1, 2))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, *plan['patch_size']))
    sum(o.float().mean() for o in out).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def _edited(plans: dict, **arch_changes):
    cm = make_configuration(**plans)
    cm.network_arch_init_kwargs.update(arch_changes)
    return cm


@pytest.mark.parametrize('cm,match', [
    (make_configuration(patch_size=[16, 16, 16], strides=[[1, 1, 1]], features=[4]), 'at least 2 encoder stages'),
    (make_configuration(patch_size=[16, 20, 16], strides=[[1, 1, 1]] + [[2, 2, 2]] * 4, features=[4] * 5),
     'does not fit'),
    (_edited(PLANS['2d_5_odd'], conv_op='torch.nn.modules.conv.Conv3d'),
     r"conv_op is 3-D but patch_size has \[2\] axes, strides has \[2\] axes, kernel_sizes has \[2\] axes"),
    (_edited(PLANS['3d_iso_5'], kernel_sizes=[[3, 3]] * 5), r'conv_op is 3-D but kernel_sizes has \[2\] axes'),
    (_edited(PLANS['3d_iso_5'], conv_op='torch.nn.modules.conv.Conv1d'), 'is not nn.Conv2d or nn.Conv3d'),
    (_edited(PLANS['3d_iso_5'], norm_op='torch.nn.NoSuchNorm'), "norm_op 'torch.nn.NoSuchNorm' cannot be imported"),
])
def test_unsupported_plans_are_clear_errors(cm, match):
    with pytest.raises(PlansError, match=match):
        nnUNetTrainerGLSP.build_network_architecture(None, cm, 1, 2)


COMPILE_PLANS = {2: dict(patch_size=[8, 8], strides=[[1, 1], [2, 2], [2, 2]], features=[2, 4, 4]),
                 3: dict(patch_size=[4, 8, 8], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]],
                         features=[2, 4, 8, 8])}


@pytest.mark.parametrize('ndim', [2, 3])
def test_compiles_as_one_graph(ndim):
    """Dynamo traces the whole network — the WKV custom op (fake implementation) and the recomputed
    (checkpointed) blocks included — as one graph without a break; the ``fullgraph=True`` compile with AOT
    autograd's traced forward and backward (``aot_eager``) gives eager's outputs and gradients within float32
    tolerance. (Inductor: see docs/glsp.md, "AMP, compile, devices".)"""
    import torch._dynamo as dynamo
    from test_compile import assert_compiled_equals_eager

    cm = make_configuration(**COMPILE_PLANS[ndim])
    torch.manual_seed(0)
    net = _unzero(RWKVUNet.from_plans(cm, 1, 2))
    assert net.branch.checkpoint and net.encoder.checkpoint_stages == 1
    x = torch.randn(2, 1, *COMPILE_PLANS[ndim]['patch_size'])
    dynamo.reset()
    explained = dynamo.explain(net)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    dynamo.reset()
    assert_compiled_equals_eager(net, x, 'aot_eager')
    dynamo.reset()


def test_inductor_is_as_accurate_as_eager():
    """Inductor (C++ code generation on the CPU; the WKV op stays the compiled kernel) on a 3-stage 3-D
    network: outputs and every parameter gradient are as close to the float64 eager network as eager float32
    is. An elementwise compiled-vs-eager comparison is the wrong test here: gradients of biases feeding a
    norm are float32 cancellation noise in both (1e-2 of their size, measured), and inductor sums in another
    order, so the two float32 results differ by that noise; against float64, compiled and eager errors agree."""
    import copy

    from test_compile import _outputs_and_grads

    cm = make_configuration(patch_size=[4, 8, 8], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], features=[2, 4, 4])
    torch.manual_seed(0)
    net = _unzero(RWKVUNet.from_plans(cm, 1, 2))
    x = torch.randn(2, 1, 4, 8, 8)
    out64, g64 = _outputs_and_grads(copy.deepcopy(net).double(), x.double())
    out_e, g_e = _outputs_and_grads(copy.deepcopy(net), x)
    torch._dynamo.reset()
    try:
        out_c, g_c = _outputs_and_grads(net, x, torch.compile(net, backend='inductor', fullgraph=True))
    finally:
        torch._dynamo.reset()

    def error(a: torch.Tensor, ref: torch.Tensor) -> float:
        return (a.double() - ref).abs().max().item()

    for c, e, ref in zip(out_c, out_e, out64):
        assert error(c, ref) <= 4 * error(e, ref) + 1e-6 * ref.abs().max().item()
    assert g_c.keys() == g_e.keys() == g64.keys() == {n for n, _ in net.named_parameters()}
    # parameters whose exact gradient is ~0 (biases feeding a norm: 1e-15 in float64) carry only float32
    # cancellation noise, a few eps of the largest gradient; inductor's summation order (it depends on the thread
    # count) changes that noise: 1e-6 of 3.2 on 1 thread for fuse.0.body.0.bias (eager: 6e-8)
    floor = 1e-2 * max(g.abs().max().item() for g in g64.values())
    for name, ref in g64.items():
        scale = max(ref.abs().max().item(), floor)
        assert error(g_c[name], ref) <= 4 * error(g_e[name], ref) + 1e-4 * scale, name


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='no CUDA GPU'))])
@pytest.mark.parametrize('backend', ['auto', 'torch'])
def test_wkv_backends_inside_the_network(monkeypatch, backend, device):
    """The production WKV kernel (`auto`: the C++ kernel on CPU, the CUDA kernel on a GPU) runs inside a GLSP
    network and gives the outputs and gradients of the float64 `torch` path, as does the `torch` fallback."""
    import cuda_wkv
    # float32 convolutions and matmuls in full precision on a GPU (TF32 would round their inputs to 10 bits)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', False)
    cm = make_configuration(**PLANS['3d_iso_5'])
    torch.manual_seed(0)
    net = _unzero(nnUNetTrainerGLSP.build_network_architecture(None, cm, 1, 2)).to(device)
    x = torch.randn(2, 1, *PLANS['3d_iso_5']['patch_size'], device=device)

    def run(dtype):
        model = net.to(dtype)
        model.zero_grad()
        out = model(x.to(dtype))
        sum((o ** 2).mean() for o in out).backward()
        return [o.detach().double() for o in out], [p.grad.double().clone() for p in model.parameters()]

    monkeypatch.setenv('CUDA_WKV_BACKEND', 'torch')
    ref_out, ref_grads = run(torch.float64)
    monkeypatch.setenv('CUDA_WKV_BACKEND', backend)
    expected = 'torch' if backend == 'torch' else device
    if cuda_wkv.backend_for(x) != expected:
        pytest.skip(f'the {device} kernel cannot be built here')
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
        out, grads = run(dtype)
        for a, b in zip(out, ref_out):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for (name, _), g, r in zip(net.named_parameters(), grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()), msg=name)
