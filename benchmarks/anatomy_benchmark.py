"""Real-anatomy benchmark: nnU-Net's baseline vs our trainers on brain templates, identical settings.

    python benchmarks/anatomy_benchmark.py --work-dir /tmp/anatomy --epochs 8 --iterations 25 \
        --folds 0 1 2 3 4 --jobs 2 -tr nnUNetTrainer nnUNetTrainerLightDecoder nnUNetTrainerGLSP

Steps (stock nnU-Net commands; see nnunetv2_ext/anatomy.py for the data):
nnunetv2-ext anatomy-dataset (train: deformed MNI152 + ICBM 2009a, test: Colin27 unaltered) ->
nnUNetv2_plan_and_preprocess -> plans with widths capped for a CPU (nnUNetSmallPlans, same for all) ->
nnUNetv2_train per trainer and fold (short-schedule subclasses ``<Trainer>_Anatomy`` written to
<work-dir>/schedule_trainers, identical schedules; ``--jobs`` runs several at once) ->
nnUNetv2_predict on Colin27 (ensemble of the trained folds) -> nnUNetv2_evaluate_folder ->
nnunetv2-ext compare (the folds' validation results) -> nnunetv2-ext benchmark on the same plans.
Results (``--name``, default anatomy_results): <work-dir>/NAME.{md,json}, <work-dir>/NAME_compare/,
<work-dir>/cost/.

A trainer may carry class-attribute overrides, for ablations: ``nnUNetTrainerPVTGDLA_EncRefine:attn_weight=0``
trains a subclass with ``attn_weight = 0`` (class name ``nnUNetTrainerPVTGDLA_EncRefine__attn_weight0_Anatomy``).
Folds whose ``checkpoint_final.pth`` exists are not trained again, so a second invocation on the same
work dir (other trainers, more folds) reuses what is there.
Validation cases are deformed copies of the training subjects (optimistic); the Colin27 Dice is the honest
number.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from nnunetv2_ext.demo.pipeline import foreground_dice, nnunet_command, nnunet_env, run_step, write_small_plans

DATASET_ID = 990
DATASET = f'Dataset{DATASET_ID}_BrainTemplates'

SCHEDULE_MODULE = '''
import os
import torch
import nnunetv2_ext.trainers
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _short(base_name, name, overrides):
    base = nnUNetTrainer if base_name == 'nnUNetTrainer' else getattr(nnunetv2_ext.trainers, base_name)

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ['ANATOMY_EPOCHS'])
        self.num_iterations_per_epoch = int(os.environ['ANATOMY_ITERS'])
        self.num_val_iterations_per_epoch = 5
        if os.environ.get('ANATOMY_THREADS'):  # nnUNetv2_train -device cpu takes every core otherwise
            torch.set_num_threads(int(os.environ['ANATOMY_THREADS']))

    return type(name, (base,), {'__init__': __init__, '__module__': __name__, **overrides})
'''


class TrainerSpec:
    """``Base`` or ``Base:attr=value,attr=value`` (values are Python literals) -> a short-schedule subclass."""

    def __init__(self, text: str):
        base, _, rest = text.partition(':')
        if not re.fullmatch(r'[A-Za-z_]\w*', base):
            raise ValueError(f'bad trainer name {base!r} in {text!r}')
        self.base = base
        self.overrides: dict[str, object] = {}
        for item in filter(None, rest.split(',')):
            key, eq, value = item.partition('=')
            if not eq or not re.fullmatch(r'[A-Za-z_]\w*', key.strip()):
                raise ValueError(f'bad override {item!r} in {text!r}: expected attr=value')
            try:
                self.overrides[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise ValueError(f'bad override value {value!r} in {text!r}: expected a Python literal') from None
        suffix = ''.join('__' + k + re.sub(r'\W', '_', str(v)) for k, v in self.overrides.items())
        self.class_name = f'{base}{suffix}_Anatomy'
        self.label = base + (f"[{', '.join(f'{k}={v!r}' for k, v in self.overrides.items())}]"
                             if self.overrides else '')

    def source_line(self) -> str:
        return f'{self.class_name} = _short({self.base!r}, {self.class_name!r}, {self.overrides!r})\n'


def write_schedule_modules(folder: str, specs: list[TrainerSpec]) -> list[str]:
    """Writes one module per ``<Trainer>_Anatomy`` subclass (nnUNetv2_train finds them via
    ``nnUNet_extTrainer``); modules of earlier invocations on the same folder stay usable."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for spec in specs:
        paths.append(os.path.join(folder, f'{spec.class_name}.py'))
        with open(paths[-1] + '.tmp', 'w') as f:
            f.write(SCHEDULE_MODULE + '\n' + spec.source_line())
        os.replace(paths[-1] + '.tmp', paths[-1])
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--work-dir', required=True)
    ap.add_argument('-tr', '--trainers', nargs='+', default=['nnUNetTrainer', 'nnUNetTrainerLightDecoder'],
                    help='trainer class names, optionally with overrides: Name:attr=value,attr=value')
    ap.add_argument('--baseline', default=None, help='trainer (as written in -tr) for the paired comparison '
                                                     '(default: the first)')
    ap.add_argument('-f', '--folds', nargs='+', type=int, default=[0])
    ap.add_argument('--jobs', type=int, default=1, help='trainings run at once (each gets cores/jobs threads)')
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--iterations', type=int, default=50)
    ap.add_argument('--cases-per-subject', type=int, default=12)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--base-features', type=int, default=16, help='plans widths min(base * 2^s, max)')
    ap.add_argument('--max-features', type=int, default=128)
    ap.add_argument('--no-cost', action='store_true', help='skip nnunetv2-ext benchmark')
    ap.add_argument('--name', default='anatomy_results',
                    help='results: <work-dir>/NAME.{md,json}, <work-dir>/NAME_compare/ (default anatomy_results)')
    args = ap.parse_args(argv)
    try:
        specs = [TrainerSpec(t) for t in args.trainers]
    except ValueError as e:
        ap.error(str(e))
    baseline = next((s for s in specs if s.label == args.baseline or args.baseline is None), None)
    if baseline is None:
        ap.error(f'--baseline {args.baseline!r} is not one of -tr')
    work = os.path.abspath(args.work_dir)
    logs = os.path.join(work, 'logs')
    os.makedirs(logs, exist_ok=True)
    from nnunetv2_ext import discovery
    discovery.register()
    env = nnunet_env(work)
    shim = os.path.join(work, 'schedule_trainers')
    write_schedule_modules(shim, specs)
    env['nnUNet_extTrainer'] = os.pathsep.join([shim, env['nnUNet_extTrainer']])
    env.update(ANATOMY_EPOCHS=str(args.epochs), ANATOMY_ITERS=str(args.iterations), nnUNet_compile='f')
    cores = os.cpu_count() or 1
    n_proc = str(max(1, min(4, cores // args.jobs)))
    env.setdefault('nnUNet_n_proc_DA', n_proc)
    env.setdefault('nnUNet_def_n_proc', n_proc)
    if args.jobs > 1:
        env['ANATOMY_THREADS'] = str(max(1, cores // args.jobs))
    ext = [sys.executable, '-m', 'nnunetv2_ext.cli']

    def step(name, cmd):
        print(f'== {name}', flush=True)
        seconds = run_step(cmd, env, os.path.join(logs, f'{name}.log'))
        print(f'== {name} done in {seconds:.0f} s', flush=True)
        return seconds

    raw = os.path.join(env['nnUNet_raw'], DATASET)
    if not os.path.isdir(raw):
        cmd = ext + ['anatomy-dataset', '--id', str(DATASET_ID), '--cases-per-subject', str(args.cases_per_subject)]
        step('dataset', cmd)
    prep = os.path.join(env['nnUNet_preprocessed'], DATASET)
    if not os.path.isfile(os.path.join(prep, 'nnUNetPlans.json')):
        cmd = nnunet_command('nnUNetv2_plan_and_preprocess') + ['-d', str(DATASET_ID), '-c', '3d_fullres',
                                                                '-np', n_proc, '-npfp', n_proc]
        step('plan', cmd)
    plans = write_small_plans(prep, base_features=args.base_features, max_features=args.max_features)
    results = os.path.join(env['nnUNet_results'], DATASET)

    def fold_dir(spec: TrainerSpec, fold: int) -> str:
        return os.path.join(results, f'{spec.class_name}__{plans}__3d_fullres', f'fold_{fold}')

    def train(spec: TrainerSpec, fold: int) -> float | None:
        timing = os.path.join(fold_dir(spec, fold), 'anatomy_train_seconds.txt')
        command = nnunet_command('nnUNetv2_train') + [str(DATASET_ID), '3d_fullres', str(fold), '-tr',
                                                      spec.class_name, '-p', plans, '-device', args.device]
        if os.path.isfile(os.path.join(fold_dir(spec, fold), 'checkpoint_final.pth')):
            print(f'== train {spec.label} fold {fold}: checkpoint_final.pth exists, not trained again', flush=True)
            if not os.path.isfile(os.path.join(fold_dir(spec, fold), 'validation', 'summary.json')):
                # nnU-Net saves checkpoint_final before its final validation: finish an interrupted one
                step(f'validate_{spec.class_name}_fold{fold}', command + ['--val'])
            return float(open(timing).read()) if os.path.isfile(timing) else None
        seconds = step(f'train_{spec.class_name}_fold{fold}', command)
        with open(timing, 'w') as f:
            f.write(f'{seconds:.1f}')
        return seconds

    tasks = [(s, f) for f in args.folds for s in specs]  # fold-major: an early stop leaves whole folds
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        train_s = list(pool.map(lambda t: train(*t), tasks))
    rows = []
    fold_tag = '-'.join(map(str, args.folds))
    for spec in specs:
        out = os.path.join(work, 'predictions', spec.class_name, f'folds_{fold_tag}')
        step(f'predict_{spec.class_name}_folds{fold_tag}', nnunet_command('nnUNetv2_predict') + [
            '-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d', str(DATASET_ID), '-c', '3d_fullres',
            '-tr', spec.class_name, '-p', plans, '-f', *map(str, args.folds), '-device', args.device])
        step(f'evaluate_{spec.class_name}_folds{fold_tag}', nnunet_command('nnUNetv2_evaluate_folder') + [
            os.path.join(raw, 'labelsTs'), out, '-djfile', os.path.join(out, 'dataset.json'), '-pfile',
            os.path.join(out, 'plans.json')])
        test_mean, test_per_class = foreground_dice(os.path.join(out, 'summary.json'))
        val = [foreground_dice(os.path.join(fold_dir(spec, f), 'validation', 'summary.json'))[0] for f in args.folds]
        seconds = [s for (sp, _), s in zip(tasks, train_s) if sp is spec]
        rows.append(dict(trainer=spec.label, class_name=spec.class_name, folds=args.folds,
                         train_s=None if None in seconds else sum(seconds) / len(seconds),
                         colin27_dice=test_per_class, colin27_mean=test_mean, val_mean_per_fold=val,
                         val_mean=sum(val) / len(val)))
    ordered = [baseline] + [s for s in specs if s is not baseline]
    step('compare', ext + ['compare', '-d', str(DATASET_ID), '-p', plans, '-c', '3d_fullres',
                           '-f', *map(str, args.folds), '-tr', *[s.class_name for s in ordered],
                           '-o', os.path.join(work, f'{args.name}_compare')])
    if not args.no_cost:
        bases = list(dict.fromkeys(s.base for s in specs))
        step('benchmark', ext + ['benchmark', '-d', str(DATASET_ID), '-p', plans, '-tr', *bases,
                                 '--device', args.device, '-o', os.path.join(work, 'cost')])
    table = ['| trainer | train s per fold | Colin27 Dice other-brain | Colin27 Dice grey matter | Colin27 mean | '
             'validation mean over folds (deformed copies) |', '|---|---:|---:|---:|---:|---:|']
    table += [f"| {r['trainer']} | {'—' if r['train_s'] is None else format(r['train_s'], '.0f')} | "
              f"{r['colin27_dice']['1']:.3f} | {r['colin27_dice']['2']:.3f} | {r['colin27_mean']:.3f} | "
              f"{r['val_mean']:.3f} |" for r in rows]
    text = (f"{args.epochs} epochs x {args.iterations} iterations per fold on {args.device}, plans {plans}, "
            f"folds {args.folds} (Colin27: ensemble of these folds).\n\n" + '\n'.join(table) + '\n')
    for ext_, content in (('md', text), ('json', json.dumps({'args': vars(args), 'rows': rows}, indent=2))):
        path = os.path.join(work, f'{args.name}.{ext_}')
        with open(path + '.tmp', 'w') as f:
            f.write(content)
        os.replace(path + '.tmp', path)
    print(text)
    print(f"paired comparison: {os.path.join(work, f'{args.name}_compare', 'compare.md')}")
    if not args.no_cost:
        print(f"cost table: {os.path.join(work, 'cost', 'benchmark.md')}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
