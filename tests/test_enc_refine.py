"""Decoder-aware encoder refinement: token losses, O(N) attention mass, inference refinement."""
import math

import numpy as np

import pytest
import torch
from torch.nn import functional as F

from nnunetv2_ext.refinement.inference import (FeatureRefinementHook, box_smooth_residual, fft_lowpass_blend,
                                               lowpass_mask)
from nnunetv2_ext.refinement.losses import (attention_distillation_loss, boundary_loss, boundary_tokens,
                                            labels_to_grid, linear_attention_mass, mask_contrastive_loss)


class SavedTensorSizes:
    """Records the largest tensor autograd saves for backward (a proxy for the loss's activation memory)."""

    def __init__(self):
        self.max_numel = 0

    def __enter__(self):
        def pack(t):
            self.max_numel = max(self.max_numel, t.numel())
            return t
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# ---------------------------------------------------------------- attention mass / distillation
@pytest.mark.parametrize('heads', [1, 3])
def test_linear_attention_mass_equals_explicit_column_sums(heads):
    torch.manual_seed(0)
    b, n, d, eps = 2, 17, 5, 1e-6
    q, k = torch.randn(b, heads, n, d, dtype=torch.float64), torch.randn(b, heads, n, d, dtype=torch.float64)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    scores = fq @ fk.transpose(-2, -1)                                    # (B, H, N, N), materialised
    attn = scores / (scores.sum(dim=-1, keepdim=True) + eps)
    explicit = attn.sum(dim=-2)                                           # column sums (B, H, N)
    torch.testing.assert_close(linear_attention_mass(q, k, eps), explicit.mean(1))
    torch.testing.assert_close(linear_attention_mass(q, k, eps, reduce_heads='sum'), explicit.sum(1))
    torch.testing.assert_close(linear_attention_mass(fq, fk, eps, apply_feature_map=False), explicit.mean(1))
    # rows of A sum to ~1, so the total mass is ~N
    torch.testing.assert_close(linear_attention_mass(q, k, eps).sum(1), torch.full((b,), float(n), dtype=q.dtype))


def test_attention_distillation_zero_for_identical_distributions_and_detached():
    torch.manual_seed(0)
    feats = torch.randn(2, 6, 4, 5, 3, requires_grad=True)                # (B, C, *S) 3-D
    mass = (feats.detach().flatten(2).norm(dim=1) * 7.0).requires_grad_(True)  # same distribution, other scale
    loss = attention_distillation_loss(feats, mass)
    assert abs(loss.item()) < 1e-6
    # token layout (B, N, C) gives the same value
    tokens = feats.detach().flatten(2).transpose(1, 2)
    assert abs(attention_distillation_loss(tokens, mass.detach()).item()) < 1e-6
    # a different target gives a positive loss; gradient reaches only the token features
    other = torch.rand(2, 60, requires_grad=True)
    loss = attention_distillation_loss(feats, other)
    assert loss.item() > 1e-3
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert other.grad is None


# ---------------------------------------------------------------- contrastive
def _separated(labels_grid, num_classes, channels=8):
    """Features where class c is the unit vector e_c at every token: (B, C, *S)."""
    return F.one_hot(labels_grid, channels).movedim(-1, 1).float() * 3.0


def test_contrastive_separated_classes_at_floor_and_below_random():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (2, 1, 8, 8))
    feats = _separated(y[:, 0], 3).requires_grad_(True)
    tau, a = 0.1, 2 * 64                                                   # num_anchors ≥ N: every token sampled
    loss = mask_contrastive_loss(feats, y, num_anchors=1000, temperature=tau)
    counts = torch.bincount(y.flatten(), minlength=3).double()
    per_class = torch.log((counts - 1) + (a - counts) * math.exp(-1 / tau))
    bound = (counts * per_class).sum() / counts.sum()                     # closed form of the floor
    assert loss.item() == pytest.approx(bound.item(), rel=1e-4)
    random = mask_contrastive_loss(torch.randn_like(feats), y, num_anchors=1000, temperature=tau)
    assert random.item() > loss.item() + 0.5
    loss.backward()
    assert feats.grad is not None


def test_contrastive_ignore_label_never_sampled_and_downsampling():
    torch.manual_seed(0)
    y = torch.randint(0, 2, (1, 1, 16, 16, 16))
    y[:, :, :8] = 5                                                        # half ignored
    grid = (4, 4, 4)
    yg = labels_to_grid(y, grid)
    assert yg.shape == (1, 4, 4, 4) and (yg == y[0, 0, ::4, ::4, ::4]).all()
    # features of ignored tokens are NaN: sampling any of them would make the loss NaN
    feats = torch.randn(1, 4, *grid)
    feats[:, :, yg[0] == 5] = float('nan')
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        loss = mask_contrastive_loss(feats, y, num_anchors=16, ignore_label=5, generator=g)
        assert torch.isfinite(loss)


def test_contrastive_memory_bounded_by_anchors():
    torch.manual_seed(0)
    grid = (24, 24, 24)                                                    # N = 13824 tokens
    feats = torch.randn(1, 8, *grid, requires_grad=True)
    y = torch.randint(0, 3, (1, 1, *grid))
    with SavedTensorSizes() as saved:
        loss = mask_contrastive_loss(feats, y, num_anchors=64)
    assert saved.max_numel <= 64 * 64                                      # only (A, A) / (A, C) tensors saved
    loss.backward()
    assert (feats.grad != 0).sum() <= 64 * 8


# ---------------------------------------------------------------- boundary
def test_boundary_tokens_equal_mask_xor_erosion():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (2, 6, 7, 5))
    border = boundary_tokens(y)
    expected = torch.zeros_like(border)
    for c in range(3):
        mask = (y == c).float().unsqueeze(1)
        eroded = 1 - F.max_pool3d(1 - mask, 3, stride=1, padding=1)
        expected |= (mask.bool() & ~eroded.bool())[:, 0]
    assert (border == expected).all()


def test_boundary_loss_zero_for_class_constant_features_positive_otherwise():
    torch.manual_seed(0)
    y = torch.zeros(2, 1, 12, 12, dtype=torch.long)
    y[:, :, 3:9, 2:7] = 1
    y[1, :, 8:, 8:] = 2
    feats = _separated(y[:, 0], 3)
    assert boundary_loss(feats, y).item() < 1e-8
    noisy = (feats + 0.5 * torch.randn_like(feats)).requires_grad_(True)
    loss = boundary_loss(noisy, y)
    assert loss.item() > 1e-3
    loss.backward()
    assert noisy.grad is not None
    # gradient only at boundary tokens (class means are detached)
    border = boundary_tokens(y[:, 0])
    assert (noisy.grad.abs().sum(1)[~border] == 0).all()
    # ignore label: features of ignored tokens do not change the loss
    y_ign = y.clone()
    y_ign[y_ign == 2] = 9
    base = noisy.detach()
    changed = torch.where(y_ign == 9, 10 * torch.randn_like(base), base)
    assert boundary_loss(changed, y_ign, ignore_label=9).item() == pytest.approx(
        boundary_loss(base, y_ign, ignore_label=9).item(), rel=1e-6)
    assert boundary_loss(changed, y_ign).item() != pytest.approx(boundary_loss(base, y_ign).item(), rel=1e-6)


# ---------------------------------------------------------------- inference refinement
@pytest.mark.parametrize('shape', [(2, 3, 8, 6), (1, 2, 6, 5, 4)])
def test_refinements_identity_at_zero_and_keep_constants(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    assert torch.equal(box_smooth_residual(x, 0.0), x)
    assert torch.equal(fft_lowpass_blend(x, 0.0), x)
    const = torch.full(shape, 2.5)
    torch.testing.assert_close(box_smooth_residual(const, 1.0), const)
    torch.testing.assert_close(fft_lowpass_blend(const, 1.0), const)
    # half strength is halfway
    torch.testing.assert_close(box_smooth_residual(x, 0.5), 0.5 * (x + box_smooth_residual(x, 1.0)))
    torch.testing.assert_close(fft_lowpass_blend(x, 0.5), 0.5 * (x + fft_lowpass_blend(x, 1.0)), atol=1e-5,
                               rtol=1e-5)


def test_box_smoothing_is_the_neighbourhood_mean():
    x = torch.zeros(1, 1, 5, 5, 5)
    x[0, 0, 2, 2, 2] = 27.0
    out = box_smooth_residual(x, 1.0)
    assert out[0, 0, 1:4, 1:4, 1:4].eq(1.0).all() and out.sum() == 27.0


def test_fft_lowpass_removes_checkerboard_keeps_dc():
    idx = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing='ij')).sum(0)
    checker = ((-1.0) ** idx)[None, None]                                  # Nyquist along every axis
    x = 1.5 + checker
    out = fft_lowpass_blend(x, 1.0, cutoff=0.25)
    torch.testing.assert_close(out, torch.full_like(x, 1.5), atol=1e-5, rtol=0)
    part = fft_lowpass_blend(x, 0.3, cutoff=0.25)
    torch.testing.assert_close(part, 1.5 + 0.7 * checker, atol=1e-5, rtol=0)
    assert lowpass_mask((8, 8), 1.0).sum() < lowpass_mask((8, 8), 1.5).sum()


def test_refinement_hook_only_in_eval():
    conv = torch.nn.Conv2d(1, 2, 1)
    hook = FeatureRefinementHook(box_strength=1.0)
    handle = hook.attach(conv)
    x = torch.randn(1, 1, 6, 6)
    conv.train()
    plain = conv(x)
    conv.eval()
    torch.testing.assert_close(conv(x), box_smooth_residual(plain, 1.0))
    handle.remove()
    torch.testing.assert_close(conv(x), plain)


# ---------------------------------------------------------------- trainers
from plans_factory import make_configuration, make_trainer  # noqa: E402
from nnunetv2_ext.networks.pvt_gdla import PVTGDLA  # noqa: E402
from nnunetv2_ext.trainers.enc_refine import (attach_inference_refinement, gdla_core_mass,  # noqa: E402
                                              nnUNetTrainerGLSP_EncRefine, nnUNetTrainerPVTGDLA_EncRefine)

TINY_PVT = dict(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2),
                stem_channels=4, decoder_head_dim=4, decoder_mlp_ratio=1.0)
GLSP_PLANS = dict(patch_size=[16, 16, 16], strides=[[1, 1, 1]] + [[2, 2, 2]] * 3 + [[1, 1, 1]],
                  features=[4, 8, 16, 16, 16])
PVT_PLANS = dict(patch_size=[16, 32, 32], strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]], features=[4] * 4)


@pytest.fixture(autouse=True)
def _torch_wkv(monkeypatch):
    monkeypatch.setenv('CUDA_WKV_BACKEND', 'torch')


def _setup(kind, labels=None):
    torch.manual_seed(0)
    if kind == 'glsp':
        cm = make_configuration(**GLSP_PLANS)
        trainer = make_trainer(nnUNetTrainerGLSP_EncRefine, cm, labels)
        trainer.network = trainer.build_network_architecture(trainer.plans_manager, cm, 1, 3, True)
    else:
        cm = make_configuration(**PVT_PLANS)
        trainer = make_trainer(nnUNetTrainerPVTGDLA_EncRefine, cm, labels)
        trainer.network = PVTGDLA.from_plans(cm, 1, 3, True, **TINY_PVT)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    patch = cm.patch_size
    seg = torch.zeros(2, 1, *patch)
    seg[:, :, 4:12, 3:10, 5:13] = 1
    seg[:, :, 8:, 8:, :6] = 2
    with torch.no_grad():
        trainer.network.eval()
        shapes = [o.shape[2:] for o in trainer.network.train()(torch.zeros(1, 1, *patch))]
    targets = [F.interpolate(seg, size=s, mode='nearest') for s in shapes]
    return trainer, {'data': torch.randn(2, 1, *patch), 'target': targets}


@pytest.mark.parametrize('kind', ['glsp', 'pvt'])
def test_trainer_train_step_and_epoch_logging(kind, monkeypatch):
    trainer, batch = _setup(kind)
    logged = []
    monkeypatch.setattr(trainer, 'print_to_log_file', lambda *a, **k: logged.append(' '.join(map(str, a))))
    before = [p.detach().clone() for p in trainer.network.parameters()]
    outputs = [trainer.train_step(batch) for _ in range(2)]
    for key in ('loss', 'enc_seg', 'enc_attn', 'enc_contrast', 'enc_boundary'):
        assert all(np.isfinite(o[key]) for o in outputs), key
    o = outputs[0]
    total = o['enc_seg'] + 0.1 * o['enc_attn'] + 0.05 * o['enc_contrast'] + 0.02 * o['enc_boundary']
    assert o['loss'] == pytest.approx(float(total), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
    trainer.on_train_epoch_end(outputs)
    store = trainer.logger.local_logger.my_fantastic_logging
    assert store['enc_attn'][0] == pytest.approx(float(np.mean([o['enc_attn'] for o in outputs])))
    assert store['train_losses'][0] == pytest.approx(float(np.mean([o['loss'] for o in outputs])))
    assert any('enc_refine' in line for line in logged)
    # switching terms off removes them
    trainer.contrast_weight = trainer.boundary_weight = 0.0
    assert set(trainer.train_step(batch)) == {'loss', 'enc_seg', 'enc_attn'}


def test_validation_step_gets_the_segmentation_loss_only():
    """nnU-Net's own validation_step (eval mode) sees the plain segmentation loss: no tokens are captured."""
    trainer, batch = _setup('glsp')
    trainer.train_step(batch)  # installs the hooks, as in training
    trainer.network.eval()
    with torch.no_grad():
        expected = trainer.loss.seg_loss(trainer.network(batch['data']), batch['target'])
    trainer._enc_terms = {}
    out = trainer.validation_step(batch)
    assert out['loss'] == pytest.approx(float(expected), rel=1e-6)
    assert trainer._enc_terms == {} and 'tokens' not in trainer._enc_cache


@pytest.mark.parametrize('kind', ['glsp', 'pvt'])
def test_aux_gradient_reaches_encoder_only_through_tokens(kind):
    trainer, batch = _setup(kind)
    net = trainer.network.train()
    trainer._enc_refine_setup()
    trainer._enc_cache.clear()
    net(batch['data'])
    mass = trainer._enc_cache['mass']
    assert not mass.requires_grad and mass.shape == (2, trainer._enc_cache['tokens'][0, 0].numel())
    aux = trainer.encoder_refinement_losses(batch['target'][0])
    sum(aux.values()).backward()
    decoder = {id(p) for p in net.decoder.parameters()}
    enc_grads = [p.grad for p in net.parameters() if id(p) not in decoder and p.grad is not None]
    assert enc_grads and any(g.abs().sum() > 0 for g in enc_grads)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.decoder.parameters())


def test_pvt_mass_is_gdla_core_column_sums():
    trainer, batch = _setup('pvt')
    net = trainer.network.train()
    core = net.decoder.blocks[str(max(int(k) for k in net.decoder.blocks.keys()))].attn.main
    seen = {}
    core.register_forward_pre_hook(lambda m, a: seen.update(q=a[0].detach(), k=a[1].detach()))
    trainer._enc_refine_setup()
    trainer._enc_cache.clear()
    net(batch['data'])
    q, k = core._heads(seen['q'].double()), core._heads(seen['k'].double())
    d = core.head_dim // 2
    explicit = 0
    for sl in (slice(None, d), slice(d, None)):
        fq, fk = F.elu(q[..., sl]) + 1, F.elu(k[..., sl]) + 1
        scores = fq @ fk.transpose(-2, -1)
        explicit = explicit + 0.5 * (scores / (scores.sum(-1, keepdim=True) + core.eps)).sum(-2).mean(1)
    torch.testing.assert_close(trainer._enc_cache['mass'].double(), explicit, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gdla_core_mass(core, seen['q'], seen['k']).double(), explicit, rtol=1e-4, atol=1e-5)


def test_inference_refinement_on_decoder_input(monkeypatch):
    cm = make_configuration(**PVT_PLANS)
    torch.manual_seed(0)
    net = PVTGDLA.from_plans(cm, 1, 3, False, **TINY_PVT).eval()
    x = torch.randn(1, 1, *cm.patch_size)
    with torch.no_grad():
        plain = net(x)
        handle = attach_inference_refinement(net, box_strength=0.5, fft_strength=0.5)
        refined = net(x)
        assert not torch.allclose(plain, refined)
        handle.remove()
        assert attach_inference_refinement(net, 0.0, 0.0) is None
        torch.testing.assert_close(net(x), plain)
    monkeypatch.setenv('NNUNETV2_EXT_REFINE_BOX', '0.5')
    monkeypatch.setenv('NNUNETV2_EXT_REFINE_FFT', '0.5')
    torch.manual_seed(0)
    built = nnUNetTrainerPVTGDLA_EncRefine.build_network_architecture(None, cm, 1, 3, False)
    assert len(built.decoder._forward_pre_hooks) == 1
