"""Cost of nnU-Net trainers' networks on identical plans: parameters, FLOPs per patch, fwd+bwd step time,
peak memory, and how they grow with the patch size.

    python benchmarks/bench_networks.py nnUNetTrainer nnUNetTrainer@resenc_m nnUNetTrainerGLSP \\
        --patch-sizes 16x32x32 24x48x48 32x64x64 --base-features 8 --max-features 64 --out docs/benchmarks/glsp_cpu

Entries are trainer names as ``-tr`` takes them (resolved by nnU-Net's own lookup, so every trainer that
``nnUNetv2_train`` finds works); ``NAME@resenc_m`` builds the same plans with nnU-Net's ResEnc-M encoder
(``ResidualEncoderUNet``, blocks per stage 1,3,4,6,6,6…; same patch and widths, unlike the ResEnc-M planner).
The first entry is the baseline of the ratio columns.

Plans: ``--plans nnUNetPlans.json [--configuration 3d_fullres]`` takes that configuration; otherwise synthetic
CT-like plans (spacing ``--spacing``, widths ``min(base·2^s, max)``). For each ``--patch-sizes`` entry, strides
and kernels are re-derived with nnU-Net's planner rule (``get_pool_and_conv_props``, feature maps ≥ 4).

Measurements are ``nnunetv2-ext benchmark``'s (``nnunetv2_ext.benchmark``: params, forward FLOPs per patch,
step time, peak memory, saved activations, inference time), so
both commands report the same quantities. Writes ``OUT.json``, ``OUT.md`` and ``OUT.png``.

``--fake`` computes nothing: stored activations (float32, and float16 as under nnU-Net's CUDA AMP) and FLOPs
of a training step are counted on fake tensors (``nnunetv2_ext.benchmark.fake_step_cost``), so real patch
sizes and widths can be evaluated on a CPU in seconds. Writes ``OUT.json`` and ``OUT.md``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys


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


def plans_dict(configuration: dict) -> dict:
    dim = len(configuration['patch_size'])
    return {'dataset_name': 'Dataset999_Bench', 'plans_name': 'nnUNetPlans',
            'original_median_spacing_after_transp': configuration['spacing'],
            'original_median_shape_after_transp': configuration['patch_size'], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': list(range(dim)), 'transpose_backward': list(range(dim)),
            'configurations': {'3d_fullres': configuration}, 'experiment_planner_used': 'ExperimentPlanner',
            'label_manager': 'LabelManager', 'foreground_intensity_properties_per_channel': {},
            'continue_training': False}


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
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.add_argument('--fake', action='store_true',
                   help='count stored activations and FLOPs on fake tensors instead of measuring (any size, seconds)')
    p.add_argument('--out', default='docs/benchmarks/networks', help='output path without extension')
    return p.parse_args(argv)


def base_configuration(args) -> dict:
    if args.plans:
        with open(args.plans) as f:
            return json.load(f)['configurations'][args.configuration]
    return synthetic_configuration([float(s) for s in args.spacing.split(',')], args.base_features,
                                   args.max_features)


def jobs_for(entries: list[str], configurations: list[dict]) -> list[tuple]:
    """``(entry, trainer class, PlansManager, ConfigurationManager, patch)`` per configuration and entry."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_ext.benchmark import find_trainer
    from nnunetv2_ext.demo.pipeline import NETWORK_VARIANTS

    jobs = []
    for configuration in configurations:
        for entry in entries:
            name, _, variant = entry.partition('@')
            if variant and variant not in NETWORK_VARIANTS:
                raise SystemExit(f"unknown plans variant '@{variant}' in {entry!r} (known: "
                                 f"{', '.join('@' + v for v in NETWORK_VARIANTS)})")
            pm = PlansManager(plans_dict(NETWORK_VARIANTS[variant](configuration) if variant else configuration))
            cm = pm.get_configuration('3d_fullres')
            jobs.append((entry, find_trainer(name), pm, cm, list(cm.patch_size)))
    return jobs


def fake_report(jobs, dataset_json: dict, args) -> dict:
    """``fake_step_cost`` in float32 and under emulated CUDA AMP for every job."""
    from importlib.metadata import version

    import torch

    from nnunetv2_ext.benchmark import fake_step_cost

    results = []
    for label, trainer_cls, pm, cm, patch in jobs:
        heads = pm.get_label_manager(dataset_json).num_segmentation_heads
        fp32 = fake_step_cost(trainer_cls, pm, cm, args.in_channels, heads, patch, args.batch_size)
        amp = fake_step_cost(trainer_cls, pm, cm, args.in_channels, heads, patch, args.batch_size, amp=True)
        results.append(dict(trainer=label, patch_size=patch, strides=cm.network_arch_init_kwargs['strides'],
                            features=cm.network_arch_init_kwargs['features_per_stage'], **fp32,
                            stored_activation_bytes_amp=amp['stored_activation_bytes']))
    return {'schema': 1, 'method': 'fake tensors (nothing computed)', 'batch_size': args.batch_size,
            'torch': torch.__version__, 'nnunetv2': version('nnunetv2'), 'results': results}


def format_fake_markdown(report: dict) -> str:
    lines = [f"# {report['title']}", '',
             f"Counted on fake tensors (nothing computed), batch {report['batch_size']}, torch {report['torch']}, "
             f"nnunetv2 {report['nnunetv2']}. Stored activations = bytes autograd keeps for backward after forward "
             "+ loss; AMP = float16 autocast as nnU-Net uses on CUDA (emulated). Ratios to the first entry.", '']
    for patch in dict.fromkeys(tuple(r['patch_size']) for r in report['results']):
        rows = [r for r in report['results'] if tuple(r['patch_size']) == patch]
        base = rows[0]
        lines += [f"Patch {'×'.join(map(str, patch))} (strides {base['strides']}, widths {base['features']})", '',
                  '| network | params (M) | step TFLOPs | × | stored fp32 (MiB) | × | stored AMP (MiB) | × |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|']
        for r in rows:
            lines.append(
                f"| {r['trainer']} | {r['params'] / 1e6:.2f} | {r['step_flops'] / 1e12:.2f} | "
                f"{r['step_flops'] / base['step_flops']:.2f} | {r['stored_activation_bytes'] / 2**20:.0f} | "
                f"{r['stored_activation_bytes'] / base['stored_activation_bytes']:.2f} | "
                f"{r['stored_activation_bytes_amp'] / 2**20:.0f} | "
                f"{r['stored_activation_bytes_amp'] / base['stored_activation_bytes_amp']:.2f} |")
        lines.append('')
    return '\n'.join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from nnunetv2_ext.benchmark import benchmark_jobs, format_markdown, plot
    from nnunetv2_ext.cli import write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_configuration(args)
    if args.patch_sizes:
        configurations = [with_patch(base, [int(v) for v in p.split('x')]) for p in args.patch_sizes]
    elif args.plans:
        configurations = [base]  # the plans exactly as planned
    else:
        raise SystemExit('synthetic plans need --patch-sizes (e.g. 32x64x64)')
    dataset_json = {'channel_names': {str(i): 'CT' for i in range(args.in_channels)},
                    'labels': {'background': 0, **{f'c{i}': i for i in range(1, args.classes)}},
                    'numTraining': 5, 'file_ending': '.nii.gz'}
    jobs = jobs_for(args.entries, configurations)
    command = ' '.join(['python benchmarks/bench_networks.py'] + (argv if argv is not None else sys.argv[1:]))
    out_dir, stem = os.path.split(os.path.abspath(args.out))
    if args.fake:
        report = fake_report(jobs, dataset_json, args)
        report.update(title=f'`{command}`', command=command)
        write_report(out_dir, stem, report, format_fake_markdown(report), None)
        return
    report = benchmark_jobs(jobs, dataset_json, args.device, args.batch_size, args.warmup, args.repeats)
    arch = [c['architecture']['arch_kwargs'] for c in configurations]
    report.update(schema=1, title=f'`{command}`', command=command,
                  plans=[dict(patch_size=c['patch_size'], strides=a['strides'], features=a['features_per_stage'])
                         for c, a in zip(configurations, arch)])
    write_report(out_dir, stem, report, format_markdown(report), plot)


if __name__ == '__main__':
    main()
