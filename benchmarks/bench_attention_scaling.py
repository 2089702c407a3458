"""How a decoder block's cost grows with the number of 3-D tokens.

Compares, at width ``--dim`` on cubic grids ``s³`` (N = s³ tokens, batch 1):

* ``gdla``: the GDLAM block (GDLA linear attention + GatedMLP), O(N);
* ``softmax``: a 3-D softmax self-attention block (pre-norm MHSA over all N tokens with the N×N
  attention matrix materialised, + MLP) — the quadratic reference;
* ``light_conv``: the light residual conv decoder stage (two 3×3×3 convs, InstanceNorm, LeakyReLU), O(N).

Per block and grid: forward+backward time (median of ``--repeats`` after one warm-up) and the activation
memory autograd keeps for the backward pass (bytes of the distinct tensors saved by the graph, counted
with ``saved_tensors_hooks``: device-independent and unaffected by other processes). The softmax block is
skipped above ``--softmax-max-tokens`` (its N×N matrices alone would take
``heads · N² · 4`` bytes several times over).

    python benchmarks/bench_attention_scaling.py --threads 1 --out-dir docs/benchmarks

writes ``attention_scaling.json``, ``attention_scaling.md`` and ``attention_scaling.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from nnunetv2_ext.blocks.gdla import GDLAM
from nnunetv2_ext.blocks.light_decoder import LightResidualBlock
from nnunetv2_ext.blocks.tokens import grid_to_tokens, tokens_to_grid


class SoftmaxSelfAttentionBlock3D(nn.Module):
    """Reference: ``x = x + W_o softmax(QKᵀ/√D) V`` over all voxels, then ``x = x + MLP(LN(x))``; ``(B, C, *S)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[2:]
        t = grid_to_tokens(x)
        b, n, c = t.shape
        q, k, v = self.qkv(self.norm1(t)).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)        # (B, h, N, N)
        t = t + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return tokens_to_grid(t + self.mlp(self.norm2(t)), shape)


def build_blocks(dim: int, head_dim: int) -> dict[str, nn.Module]:
    return {
        'gdla': GDLAM(dim, dim // head_dim, nn.Conv3d, mlp_ratio=2.0),
        'softmax': SoftmaxSelfAttentionBlock3D(dim, dim // head_dim, mlp_ratio=2.0),
        'light_conv': LightResidualBlock(dim, dim, nn.Conv3d, [3, 3, 3], nn.InstanceNorm3d, {'affine': True},
                                         nn.LeakyReLU, {'negative_slope': 1e-2}),
    }


def saved_activation_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in ``block(x)`` (parameters excluded)."""
    params = {p.data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(seen.values())


def step_ms(block: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median forward+backward time in ms (one warm-up step first)."""
    times = []
    for i in range(repeats + 1):
        block.zero_grad(set_to_none=True)
        if x.device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        F.mse_loss(block(x), torch.zeros_like(x)).backward()
        if x.device.type == 'cuda':
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(sides: list[int], dim: int, head_dim: int, repeats: int, softmax_max_tokens: int, device: str) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    blocks = {name: b.to(dev) for name, b in build_blocks(dim, head_dim).items()}
    rows = []
    for side in sides:
        n = side ** 3
        x = torch.randn(1, dim, side, side, side, device=dev, requires_grad=True)
        for name, block in blocks.items():
            if name == 'softmax' and n > softmax_max_tokens:
                rows.append(dict(block=name, side=side, tokens=n, step_ms=None, saved_bytes=None, skipped=True))
                continue
            rows.append(dict(block=name, side=side, tokens=n, step_ms=step_ms(block, x, repeats),
                             saved_bytes=saved_activation_bytes(block, x), skipped=False))
            print(f"{name:>10} s={side:3d} N={n:7d} {rows[-1]['step_ms']:9.1f} ms "
                  f"{rows[-1]['saved_bytes'] / 2 ** 20:9.1f} MiB", flush=True)
    params = {name: sum(p.numel() for p in b.parameters()) for name, b in blocks.items()}
    return dict(schema=1, dim=dim, head_dim=head_dim, repeats=repeats, device=device_name(dev),
                threads=torch.get_num_threads(), torch=torch.__version__, params=params, rows=rows)


def device_name(dev: torch.device) -> str:
    if dev.type == 'cuda':
        return torch.cuda.get_device_name(dev)
    return f'CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)'


def to_markdown(report: dict) -> str:
    sides = sorted({r['side'] for r in report['rows']})
    names = list(report['params'])
    cell = {(r['block'], r['side']): r for r in report['rows']}
    lines = [f"Device: {report['device']}, {report['threads']} threads, torch {report['torch']}; width "
             f"{report['dim']}, head dim {report['head_dim']}, batch 1, median of {report['repeats']} "
             f"forward+backward steps. Memory = activations saved for backward.", '',
             '| tokens N (grid) | ' + ' | '.join(f'{n} ms | {n} MiB' for n in names) + ' |',
             '|---|' + '---|---|' * len(names)]
    for s in sides:
        vals = []
        for n in names:
            r = cell[(n, s)]
            vals += (['skipped', 'skipped'] if r['skipped'] else
                     [f"{r['step_ms']:.1f}", f"{r['saved_bytes'] / 2 ** 20:.1f}"])
        lines.append(f'| {s ** 3} ({s}³) | ' + ' | '.join(vals) + ' |')
    lines += ['', 'Parameters: ' + ', '.join(f'{n} {p:,}' for n, p in report['params'].items())]
    return '\n'.join(lines) + '\n'


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in report['params']:
        rows = [r for r in report['rows'] if r['block'] == name and not r['skipped']]
        n = [r['tokens'] for r in rows]
        axes[0].loglog(n, [r['step_ms'] for r in rows], 'o-', label=name)
        axes[1].loglog(n, [r['saved_bytes'] / 2 ** 20 for r in rows], 'o-', label=name)
    for ax, title in zip(axes, ('forward+backward time [ms]', 'activations saved for backward [MiB]')):
        ax.set_xlabel('tokens N (3-D grid)')
        ax.set_title(title)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend()
    fig.suptitle(f"Decoder block cost vs tokens ({report['device']}, width {report['dim']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sides', type=int, nargs='+', default=[8, 12, 16, 20, 24, 32, 40])
    parser.add_argument('--dim', type=int, default=32)
    parser.add_argument('--head-dim', type=int, default=16)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--softmax-max-tokens', type=int, default=14000)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: torch\'s); 1 is steadier on a shared machine')
    parser.add_argument('--out-dir', default='docs/benchmarks')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args.sides, args.dim, args.head_dim, args.repeats, args.softmax_max_tokens, args.device)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, 'attention_scaling')
    with open(stem + '.json', 'w') as f:
        json.dump(report, f, indent=2)
    with open(stem + '.md', 'w') as f:
        f.write(to_markdown(report))
    plot(report, stem + '.png')
    print(to_markdown(report))


if __name__ == '__main__':
    main()
