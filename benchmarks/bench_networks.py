"""Cost of nnU-Net trainers' networks on identical plans: parameters, FLOPs per patch, fwd+bwd step time,
peak memory, and how they grow with the patch size (DESIGN §8).

    python benchmarks/bench_networks.py nnUNetTrainer nnUNetTrainer@resenc_m nnUNetTrainerGLSP \\
        --patch-sizes 16x32x32 24x48x48 32x64x64 --base-features 8 --max-features 64 --out docs/benchmarks/glsp_cpu

Entries are trainer names as ``-tr`` takes them (resolved by nnU-Net's own lookup, so every trainer that
``nnUNetv2_train`` finds works); ``NAME@resenc_m`` builds the same plans with nnU-Net's ResEnc-M encoder
(``ResidualEncoderUNet``, blocks per stage 1,3,4,6,6,6…; same patch and widths, unlike the ResEnc-M planner).
The first entry is the baseline of the ratio columns.

Plans: ``--plans nnUNetPlans.json [--configuration 3d_fullres]`` takes that configuration; otherwise synthetic
CT-like plans (spacing ``--spacing``, widths ``min(base·2^s, max)``). For each ``--patch-sizes`` entry, strides
and kernels are re-derived with nnU-Net's planner rule (``get_pool_and_conv_props``, feature maps ≥ 4).

Every (entry, patch) runs in a fresh subprocess, on ``--device`` (default: cuda if available):

* params: all network parameters; GFLOPs: one forward of one patch (batch 1) under
  ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs; only matmul/conv-like ops are
  counted, so e.g. the WKV scan and norms are not);
* step time: median over ``--repeats`` of forward + the trainer's own loss (deep supervision as the trainer
  builds it) + backward at batch ``--batch-size``, after ``--warmup`` steps; autocast on CUDA as in nnU-Net,
  no torch.compile;
* peak memory: CUDA ``max_memory_allocated`` during a step minus the allocation before it (activations,
  gradients, workspace; parameters excluded). CPU: peak RSS (``ru_maxrss``) minus the RSS after building the
  network and the inputs, over the first step, in that fresh process; plus, on every device, the exact bytes of
  tensors saved for backward (``saved_tensors_hooks``, unique storages) — the device-independent activation
  footprint.

Writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

RESENC_M_BLOCKS = [1, 3, 4, 6, 6, 6]


# ---------------------------------------------------------------- plans

def synthetic_configuration(spacing, base_features: int, max_features: int) -> dict:
    """A 3d_fullres configuration like nnU-Net's planner writes (patch and topology filled in later)."""
    return {
        'data_identifier': 'bench', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 2,
        'patch_size': None, 'median_image_size_in_voxels': None, 'spacing': list(spacing),
        'normalization_schemes': ['CTNormalization'], 'use_mask_for_norm': [False], 'batch_dice': False,
        'architecture': {
            'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
            'arch_kwargs': {'features_per_stage': [min(base_features * 2 ** s, max_features) for s in range(12)],
                            'conv_op': 'torch.nn.modules.conv.Conv3d', 'conv_bias': True,
                            'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d',
                            'norm_op_kwargs': {'eps': 1e-05, 'affine': True}, 'dropout_op': None,
                            'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
                            'nonlin_kwargs': {'inplace': True}, 'n_conv_per_stage': [2] * 12},
            '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']},
    }


def with_patch(configuration: dict, patch_size) -> dict:
    """``configuration`` re-planned for ``patch_size`` with nnU-Net's topology rule (per-stage lists cut or
    extended with their last value)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    cfg = copy.deepcopy(configuration)
    _, strides, kernels, patch, _ = get_pool_and_conv_props(cfg['spacing'], list(patch_size), 4, 999999)
    n = len(strides)
    arch = cfg['architecture']['arch_kwargs']

    def fit(values):
        return [values[min(s, len(values) - 1)] for s in range(n)]

    arch.update(n_stages=n, strides=[list(s) for s in strides], kernel_sizes=[list(k) for k in kernels],
                features_per_stage=fit(arch['features_per_stage']), n_conv_per_stage_decoder=[2] * (n - 1))
    for key in ('n_conv_per_stage', 'n_blocks_per_stage'):
        if key in arch:
            arch[key] = fit(arch[key])
    cfg['patch_size'] = cfg['median_image_size_in_voxels'] = [int(p) for p in patch]
    return cfg


def as_resenc_m(configuration: dict) -> dict:
    """The same configuration with nnU-Net's ResEnc-M encoder (``nnUNetResEncUNetMPlans`` architecture)."""
    cfg = copy.deepcopy(configuration)
    arch = cfg['architecture']
    n = arch['arch_kwargs']['n_stages']
    arch['network_class_name'] = 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
    arch['arch_kwargs'].pop('n_conv_per_stage', None)
    arch['arch_kwargs']['n_blocks_per_stage'] = [RESENC_M_BLOCKS[min(s, 5)] for s in range(n)]
    arch['arch_kwargs']['n_conv_per_stage_decoder'] = [1] * (n - 1)
    return cfg


def plans_dict(configuration: dict) -> dict:
    dim = len(configuration['patch_size'])
    return {'dataset_name': 'Dataset999_Bench', 'plans_name': 'nnUNetPlans',
            'original_median_spacing_after_transp': configuration['spacing'],
            'original_median_shape_after_transp': configuration['patch_size'], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': list(range(dim)), 'transpose_backward': list(range(dim)),
            'configurations': {'3d_fullres': configuration}, 'experiment_planner_used': 'ExperimentPlanner',
            'label_manager': 'LabelManager', 'foreground_intensity_properties_per_channel': {},
            'continue_training': False}


# ---------------------------------------------------------------- one measurement (child process)

def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _saved_bytes(run) -> int:
    """Bytes of the unique storages autograd saves for backward while ``run()`` executes."""
    import torch

    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.data_ptr(), t.device)] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values())


def measure(entry: str, configuration: dict, args) -> dict:
    import numpy as np
    import torch
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    name, _, variant = entry.partition('@')
    if variant not in ('', 'resenc_m'):
        raise SystemExit(f"unknown plans variant '@{variant}' in {entry!r} (known: @resenc_m)")
    if variant:
        configuration = as_resenc_m(configuration)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset_json = {'channel_names': {str(i): 'CT' for i in range(args.in_channels)},
                    'labels': {'background': 0, **{f'c{i}': i for i in range(1, args.classes)}},
                    'numTraining': 5, 'file_ending': '.nii.gz'}
    trainer = recursive_find_trainer_class_by_name(name)(plans_dict(configuration), '3d_fullres', 0, dataset_json,
                                                         device=device)
    heads = trainer.label_manager.num_segmentation_heads
    net = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, args.in_channels,
                                             heads, True).to(device)
    loss_fn = trainer._build_loss()
    patch = configuration['patch_size']
    torch.manual_seed(0)

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(1, args.in_channels, *patch, device=device))
    flops = counter.get_total_flops()

    x = torch.randn(args.batch_size, args.in_channels, *patch, device=device)
    seg = torch.randint(0, args.classes, (args.batch_size, 1, *patch), device=device).float()
    scales = trainer._get_deep_supervision_scales()
    targets = [F.interpolate(seg, size=[round(p * s) for p, s in zip(patch, sc)], mode='nearest') for sc in scales]
    autocast = dict(device_type=device.type, enabled=device.type == 'cuda')

    def forward_loss():
        with torch.autocast(**autocast):
            return loss_fn(net(x), targets)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    def step():
        forward_loss().backward()
        net.zero_grad(set_to_none=False)  # gradients stay allocated, as in training

    if device.type == 'cuda':
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync()
        peak = torch.cuda.max_memory_allocated(device) - before
        memory_method = 'cuda max_memory_allocated - allocated before the step'
    else:
        before = _rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        memory_method = 'peak RSS - RSS before the first step (fresh process)'
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    saved = _saved_bytes(forward_loss)
    return {'entry': entry, 'patch_size': patch, 'voxels': int(np.prod(patch)),
            'strides': configuration['architecture']['arch_kwargs']['strides'],
            'features': configuration['architecture']['arch_kwargs']['features_per_stage'],
            'params': sum(p.numel() for p in net.parameters()), 'gflops_per_patch': flops / 1e9,
            'step_s_median': float(np.median(times)), 'step_s_all': times, 'peak_mem_mb': peak / 2 ** 20,
            'saved_activations_mb': saved / 2 ** 20, 'memory_method': memory_method,
            'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)',
            'batch_size': args.batch_size}


# ---------------------------------------------------------------- reports

def write_reports(results: list[dict], args, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = {'command': ' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:]), 'device': results[0]['device'],
            'batch_size': args.batch_size, 'repeats': args.repeats, 'warmup': args.warmup}
    with open(out + '.json', 'w') as f:
        json.dump({'meta': meta, 'results': results}, f, indent=2)

    baseline = args.entries[0]
    lines = [f"Device: {meta['device']}; batch {args.batch_size}; step = forward + trainer loss + backward, median "
             f"of {args.repeats} after {args.warmup} warm-up; memory: {results[0]['memory_method']}.", '',
             f"Command: `python benchmarks/{meta['command']}`", '']
    for patch in dict.fromkeys(tuple(r['patch_size']) for r in results):
        rows = [r for r in results if tuple(r['patch_size']) == patch]
        base = next((r for r in rows if r['entry'] == baseline), rows[0])
        lines += [f"**patch {'×'.join(map(str, patch))}** (strides {rows[0]['strides']}, widths {rows[0]['features']})",
                  '', '| network | params (M) | GFLOPs / patch | step (ms) | × | peak mem (MB) | × | saved activations (MB) |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|']
        for r in rows:
            lines.append(f"| {r['entry']} | {r['params'] / 1e6:.2f} | {r['gflops_per_patch']:.2f} | "
                         f"{1e3 * r['step_s_median']:.0f} | {r['step_s_median'] / base['step_s_median']:.2f} | "
                         f"{r['peak_mem_mb']:.0f} | {r['peak_mem_mb'] / max(base['peak_mem_mb'], 1e-9):.2f} | "
                         f"{r['saved_activations_mb']:.0f} |")
        lines.append('')
    with open(out + '.md', 'w') as f:
        f.write('\n'.join(lines))

    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for entry in args.entries:
        rows = sorted((r for r in results if r['entry'] == entry), key=lambda r: r['voxels'])
        vox = [r['voxels'] for r in rows]
        for ax, key in zip(axes, ('step_s_median', 'peak_mem_mb', 'saved_activations_mb')):
            ax.plot(vox, [r[key] for r in rows], marker='o', label=entry)
    for ax, title in zip(axes, ('step time (s)', 'peak memory (MB)', 'saved activations (MB)')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel('voxels per patch')
        ax.set_title(title)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, batch {args.batch_size}")
    fig.tight_layout()
    fig.savefig(out + '.png', dpi=110)


# ---------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('entries', nargs='+', help='trainer names, optionally NAME@resenc_m; the first is the baseline')
    p.add_argument('--plans', help='nnU-Net plans JSON (default: synthetic CT-like plans)')
    p.add_argument('--configuration', default='3d_fullres')
    p.add_argument('--patch-sizes', nargs='*', default=None,
                   help='e.g. 32x64x64 48x96x96 (default: the patch of --plans, topology as planned)')
    p.add_argument('--spacing', default='2.0,0.8,0.8', help='synthetic plans: voxel spacing (mm), z,y,x')
    p.add_argument('--base-features', type=int, default=32, help='synthetic plans: width of stage 0')
    p.add_argument('--max-features', type=int, default=320, help='synthetic plans: maximum width')
    p.add_argument('--in-channels', type=int, default=1)
    p.add_argument('--classes', type=int, default=3, help='including background')
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    p.add_argument('--device', default=None, help='cuda or cpu (default: cuda if available)')
    p.add_argument('--out', default='docs/benchmarks/networks', help='output path without extension')
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return args


def base_configuration(args) -> dict:
    if args.plans:
        with open(args.plans) as f:
            return json.load(f)['configurations'][args.configuration]
    return synthetic_configuration([float(s) for s in args.spacing.split(',')], args.base_features,
                                   args.max_features)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:  # one measurement; the parent reads the last stdout line
        entry, configuration = json.loads(args.child)
        print(json.dumps(measure(entry, configuration, args)))
        return
    base = base_configuration(args)
    if args.patch_sizes:
        configurations = [with_patch(base, [int(v) for v in p.split('x')]) for p in args.patch_sizes]
    elif args.plans:
        configurations = [base]  # the plans exactly as planned
    else:
        raise SystemExit('synthetic plans need --patch-sizes (e.g. 32x64x64)')
    env = {**os.environ, 'nnUNet_compile': 'f'}
    scratch = tempfile.mkdtemp(prefix='bench_networks_')
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        env.setdefault(var, os.path.join(scratch, var))
    results = []
    for configuration in configurations:
        patch = configuration['patch_size']
        for entry in args.entries:
            cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                   '--device', args.device, '--child', json.dumps([entry, configuration])]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{entry} @ {patch} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{entry:32s} patch {'x'.join(map(str, r['patch_size'])):>12s}  params {r['params'] / 1e6:7.2f}M  "
                  f"{r['gflops_per_patch']:8.2f} GFLOPs  step {1e3 * r['step_s_median']:8.0f} ms  "
                  f"peak {r['peak_mem_mb']:8.0f} MB  saved {r['saved_activations_mb']:7.0f} MB", flush=True)
    write_reports(results, args, args.out)
    print(f"wrote {args.out}.json, .md, .png")


if __name__ == '__main__':
    main()
