"""``nnunetv2-ext``: helper commands around nnU-Net's own CLIs.

    nnunetv2-ext env     # check the install; print the export line for nnUNet_extTrainer
    nnunetv2-ext demo    # built-in dataset -> plan/preprocess -> train -> predict -> evaluate, ours vs nnU-Net
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
