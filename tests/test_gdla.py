"""GDLA against an explicit N×N construction (float64), its λ=0 reduction, linear cost, and the GDLAM block."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from gradients import parameters_without_gradient
from nnunetv2_ext.blocks.gdla import GDLA, GDLAM, GatedDiffLinearAttentionCore, GatedMLP
from nnunetv2_ext.blocks.tokens import grid_to_tokens, tokens_to_grid

EPS = 1e-6


def _phi(x):
    return F.elu(x) + 1


def _explicit_core(core: GatedDiffLinearAttentionCore, q, k, v, g):
    """Materialises A_i = diag(1/(φQ_i φK_iᵀ 1 + ε)) φQ_i φK_iᵀ (N×N) per head and applies the formula."""
    b, n, c = q.shape
    h, dh = core.num_heads, core.head_dim
    d = dh // 2
    out = torch.empty(b, n, c, dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * dh, (hi + 1) * dh)
            qh, kh, vh = _phi(q[bi, :, sl]), _phi(k[bi, :, sl]), v[bi, :, sl]
            ys = []
            for half in (slice(0, d), slice(d, dh)):
                scores = qh[:, half] @ kh[:, half].T                               # (N, N)
                attn = scores / (scores.sum(dim=1, keepdim=True) + EPS)
                ys.append(attn @ vh)
            y = ys[0] - core.lam[hi] * ys[1]
            y = y / torch.sqrt((y ** 2).mean(dim=1, keepdim=True) + core.rms_eps) * core.rms_weight[hi]
            out[bi, :, sl] = y * torch.sigmoid(g[bi, :, sl])
    return out


def _random_core(dim=8, heads=2, seed=0):
    torch.manual_seed(seed)
    core = GatedDiffLinearAttentionCore(dim, heads).double()
    with torch.no_grad():
        core.rms_weight.uniform_(0.5, 1.5)
    return core


def test_core_equals_explicit_construction():
    core = _random_core()
    q, k, v, g = torch.randn(4, 2, 13, 8, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(core(q, k, v, g), _explicit_core(core, q, k, v, g), rtol=1e-10, atol=1e-12)


def test_lambda_init_and_shapes():
    torch.manual_seed(0)
    core = GatedDiffLinearAttentionCore(64, 4)
    assert core.lam.shape == core.rms_weight.shape == (4, 16)
    assert abs(core.lam.std().item() - 0.1) < 0.03 and abs(core.lam.mean().item()) < 0.03
    with pytest.raises(ValueError, match='even head dim'):
        GatedDiffLinearAttentionCore(12, 4)


def test_lambda_zero_is_gated_normalised_linear_attention():
    core = _random_core()
    with torch.no_grad():
        core.lam.zero_()
    q, k, v, g = torch.randn(4, 2, 11, 8, dtype=torch.float64).unbind(0)
    # reference: heads of size D, first halves only: RMSNorm(LA(Q1, K1, V)) ⊙ σ(G)
    qh, kh, vh = (t.view(2, 11, 2, 4).transpose(1, 2) for t in (q, k, v))
    q1, k1 = _phi(qh[..., :2]), _phi(kh[..., :2])
    la = (q1 @ (k1.transpose(-2, -1) @ vh)) / (q1 @ k1.sum(-2, keepdim=True).transpose(-2, -1) + EPS)
    la = la / torch.sqrt((la ** 2).mean(-1, keepdim=True) + core.rms_eps) * core.rms_weight[None, :, None, :]
    expected = la.transpose(1, 2).reshape(2, 11, 8) * torch.sigmoid(g)
    torch.testing.assert_close(core(q, k, v, g), expected, rtol=1e-10, atol=1e-12)
    # and the second halves of Q, K no longer matter
    q2, k2 = q.clone(), k.clone()
    q2.view(2, 11, 2, 4)[..., 2:] += 3.0
    k2.view(2, 11, 2, 4)[..., 2:] -= 1.0
    torch.testing.assert_close(core(q2, k2, v, g), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('grid,conv_op', [((3, 4, 5), nn.Conv3d), ((6, 7), nn.Conv2d)])
def test_gdla_module_equals_explicit_construction(grid, conv_op):
    torch.manual_seed(1)
    gdla = GDLA(8, 2, conv_op).double()
    for core in (gdla.main, gdla.aux):
        with torch.no_grad():
            core.rms_weight.uniform_(0.5, 1.5)
    n = int(torch.tensor(grid).prod())
    x = torch.randn(2, n, 8, dtype=torch.float64)
    qkvg = gdla.qkvg(x)
    local = grid_to_tokens(gdla.local_pw(gdla.local_dw(tokens_to_grid(qkvg, grid))))
    y_main = _explicit_core(gdla.main, *qkvg.chunk(4, -1))
    y_aux = _explicit_core(gdla.aux, *local.chunk(4, -1))
    expected = gdla.fuse(torch.cat((y_main, y_aux), -1))
    torch.testing.assert_close(gdla(x, grid), expected, rtol=1e-10, atol=1e-12)
    assert gdla.main.lam is not gdla.aux.lam  # the local pass has its own λ


def _flops(module, x, *args):
    with FlopCounterMode(display=False) as counter:
        module(x, *args)
    return counter.get_total_flops()


def test_cost_is_linear_in_tokens():
    gdla = GDLA(16, 2, nn.Conv3d)
    f1 = _flops(gdla, torch.randn(1, 8 * 8 * 8, 16), (8, 8, 8))
    f2 = _flops(gdla, torch.randn(1, 16 * 8 * 8, 16), (16, 8, 8))
    f4 = _flops(gdla, torch.randn(1, 32 * 8 * 8, 16), (32, 8, 8))
    assert f2 / f1 == pytest.approx(2.0, rel=0.01) and f4 / f1 == pytest.approx(4.0, rel=0.01)


def test_no_token_by_token_tensor_on_a_large_grid():
    """N = 131,072 tokens: one N×N float32 matrix would need 69 GB (more than this machine has)."""
    torch.manual_seed(0)
    gdla = GDLA(8, 2, nn.Conv3d)
    grid = (32, 64, 64)
    with torch.no_grad():
        out = gdla(torch.randn(1, 32 * 64 * 64, 8), grid)
    assert out.shape == (1, 32 * 64 * 64, 8) and torch.isfinite(out).all()


def test_gated_mlp_formula():
    torch.manual_seed(0)
    mlp = GatedMLP(4, nn.Conv3d, mlp_ratio=2.0).double()
    x = torch.randn(2, 4, 3, 5, 4, dtype=torch.float64)
    h = mlp.dwconv(mlp.expand(x))
    expected = mlp.project(h[:, :8] * F.silu(h[:, 8:]))
    torch.testing.assert_close(mlp(x), expected)


def test_gdlam_block_formula_and_gradients():
    torch.manual_seed(0)
    block = GDLAM(8, 2, nn.Conv2d).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    shape = (5, 6)
    t = grid_to_tokens(x)
    h = F.silu(block.conv(tokens_to_grid(block.norm1(t), shape)))
    x1 = x + tokens_to_grid(block.attn(grid_to_tokens(h), shape), shape)
    expected = x1 + block.mlp(tokens_to_grid(block.norm2(grid_to_tokens(x1)), shape))
    out = block(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    missing = parameters_without_gradient(block)
    assert missing == []
