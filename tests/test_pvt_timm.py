"""Our 2-D PVTv2 pieces against an independent implementation, timm's ``pvt_v2`` (built with ``pretrained=False``;
no weights are downloaded): the same random weights copied into both, outputs equal in float64.

Covers the overlapping patch embedding (7×7 stride 4, 3×3 stride 2), spatial-reduction attention (sr 8, 4, 2 and
none), ConvFFN and whole stages (blocks, PVTv2's LayerNorm epsilons, final norm)."""
import re

import pytest
import torch
from torch import nn

from nnunetv2_ext.blocks.pvt import ConvFFN, OverlapPatchEmbed, PVTStage, SpatialReductionAttention

timm = pytest.importorskip('timm')

# pvt_v2_b0: widths 32/64/160/256, heads 1/2/5/8, MLP ratios 8/8/4/4, sr 8/4/2/1, depth 2 per stage
B0 = dict(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1),
          depth=2)
IMAGE = 64  # token grids 16², 8², 4², 2²
TOL = dict(rtol=1e-10, atol=1e-11)

# our parameter names -> timm's, inside one stage (the first stage's embedding is timm's model-level patch_embed)
RENAMES = [(r'^blocks\.(\d+)\.attn\.sr_norm\.', r'blocks.\1.attn.norm.'), (r'^blocks\.(\d+)\.ffn\.', r'blocks.\1.mlp.')]


def timm_key(key: str, stage: int) -> str:
    for pattern, repl in RENAMES:
        key = re.sub(pattern, repl, key)
    if key.startswith('embed.'):
        return ('patch_embed.' if stage == 0 else f'stages.{stage}.downsample.') + key[len('embed.'):]
    return f'stages.{stage}.{key}'


@pytest.fixture(scope='module')
def reference():
    """timm's pvt_v2_b0 in float64 with every parameter perturbed (non-trivial norms and biases)."""
    torch.manual_seed(0)
    model = timm.create_model('pvt_v2_b0', pretrained=False, num_classes=0).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def our_stage(reference, stage: int) -> PVTStage:
    """Our PVTStage for timm's stage ``stage`` (2-D, isotropic plans kernel 3), its weights copied from timm."""
    dims = B0['embed_dims']
    in_channels = 3 if stage == 0 else dims[stage - 1]
    stride = [4, 4] if stage == 0 else [2, 2]
    sr = B0['sr_ratios'][stage]
    ours = PVTStage(in_channels, dims[stage], stride, B0['depth'], B0['num_heads'][stage], B0['mlp_ratios'][stage],
                    [sr, sr], nn.Conv2d).double().eval()
    source = reference.state_dict()
    mapped = {key: source[timm_key(key, stage)] for key in ours.state_dict()}
    ours.load_state_dict(mapped, strict=True)
    prefix = f'stages.{stage}.'
    used = {timm_key(key, stage) for key in mapped}
    unused = [k for k in source if (k.startswith(prefix) or (stage == 0 and k.startswith('patch_embed.')))
              and k not in used]
    assert unused == []  # every timm parameter of the stage has its counterpart
    return ours


def timm_stage_forward(reference, stage: int, x: torch.Tensor) -> torch.Tensor:
    if stage == 0:
        x = reference.patch_embed(x)                  # (B, H, W, C); stage 0 has no downsample of its own
    return reference.stages[stage](x)


def test_whole_encoder_stage_by_stage(reference):
    torch.manual_seed(1)
    x = torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.float64)
    ours_x, ref_x = x, x
    with torch.no_grad():
        for stage in range(4):
            ours_x = our_stage(reference, stage)(ours_x)
            ref_x = timm_stage_forward(reference, stage, ref_x)
            assert ours_x.shape == ref_x.shape == (2, B0['embed_dims'][stage], *[IMAGE // 2 ** (stage + 2)] * 2)
            torch.testing.assert_close(ours_x, ref_x, **TOL)


@pytest.mark.parametrize('stage', [0, 1])
def test_overlapping_patch_embedding(reference, stage):
    ours = our_stage(reference, stage).embed
    assert isinstance(ours, OverlapPatchEmbed)
    timm_embed = reference.patch_embed if stage == 0 else reference.stages[stage].downsample
    assert tuple(ours.proj.kernel_size) == tuple(timm_embed.proj.kernel_size) == ((7, 7) if stage == 0 else (3, 3))
    assert tuple(ours.proj.padding) == tuple(timm_embed.proj.padding)
    torch.manual_seed(2)
    x = torch.randn(2, ours.proj.in_channels, 20, 28, dtype=torch.float64)   # non-square; 20/4, 28/4
    with torch.no_grad():
        tokens, grid = ours(x)
        expected = timm_embed(x)                                          # (B, H', W', C)
    assert grid == tuple(expected.shape[1:3])
    torch.testing.assert_close(tokens, expected.flatten(1, 2), **TOL)


@pytest.mark.parametrize('stage', [0, 1, 2, 3])
def test_spatial_reduction_attention_and_conv_ffn(reference, stage):
    block = our_stage(reference, stage).blocks[1]
    timm_block = reference.stages[stage].blocks[1]
    assert isinstance(block.attn, SpatialReductionAttention) and isinstance(block.ffn, ConvFFN)
    assert block.attn.reduce == (B0['sr_ratios'][stage] > 1)
    grid = (IMAGE // 2 ** (stage + 2),) * 2
    torch.manual_seed(3 + stage)
    x = torch.randn(2, grid[0] * grid[1], B0['embed_dims'][stage], dtype=torch.float64)
    with torch.no_grad():
        attn, _ = block.attn(x, grid)
        torch.testing.assert_close(attn, timm_block.attn(x, list(grid)), **TOL)
        torch.testing.assert_close(block.ffn(x, grid), timm_block.mlp(x, list(grid)), **TOL)
        torch.testing.assert_close(block(x, grid)[0], timm_block(x, list(grid)), **TOL)
