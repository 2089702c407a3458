"""Real-anatomy benchmark: nnU-Net's baseline vs our trainers on brain templates, identical settings.

    python benchmarks/anatomy_benchmark.py --work-dir /tmp/anatomy --epochs 20 --iterations 50 \
        -tr nnUNetTrainer nnUNetTrainerLightDecoder nnUNetTrainerGLSP

Steps (stock nnU-Net commands; see nnunetv2_ext/anatomy.py for the data):
nnunetv2-ext anatomy-dataset (train: deformed MNI152 + ICBM 2009a, test: Colin27 unaltered) ->
nnUNetv2_plan_and_preprocess -> plans with widths capped for a CPU (nnUNetSmallPlans, same for all) ->
nnUNetv2_train fold 0 per trainer (short-schedule subclasses ``<Trainer>_Anatomy`` written to
<work-dir>/schedule_trainers, one per trainer, identical schedules) -> nnUNetv2_predict on Colin27 -> nnUNetv2_evaluate_folder ->
nnunetv2-ext benchmark on the same plans. Results: <work-dir>/anatomy_results.{md,json}.
Fold 0's validation cases are deformed copies of the training subjects (optimistic); the Colin27 Dice
is the honest number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nnunetv2_ext.demo.pipeline import foreground_dice, nnunet_command, nnunet_env, run_step, write_small_plans

DATASET_ID = 990
DATASET = f'Dataset{DATASET_ID}_BrainTemplates'

SCHEDULE_MODULE = '''
import os
import torch
import nnunetv2_ext.trainers
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _short(base_name):
    base = nnUNetTrainer if base_name == 'nnUNetTrainer' else getattr(nnunetv2_ext.trainers, base_name)

    class Short(base):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(os.environ['ANATOMY_EPOCHS'])
            self.num_iterations_per_epoch = int(os.environ['ANATOMY_ITERS'])
            self.num_val_iterations_per_epoch = 5
    Short.__name__ = Short.__qualname__ = base_name + '_Anatomy'
    return Short
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--work-dir', required=True)
    ap.add_argument('-tr', '--trainers', nargs='+', default=['nnUNetTrainer', 'nnUNetTrainerLightDecoder'])
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--iterations', type=int, default=50)
    ap.add_argument('--cases-per-subject', type=int, default=12)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--base-features', type=int, default=16, help='plans widths min(base * 2^s, max)')
    ap.add_argument('--max-features', type=int, default=128)
    args = ap.parse_args(argv)
    work = os.path.abspath(args.work_dir)
    logs = os.path.join(work, 'logs')
    shim = os.path.join(work, 'schedule_trainers')
    os.makedirs(logs, exist_ok=True)
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, 'anatomy_schedule_trainers.py'), 'w') as f:
        f.write(SCHEDULE_MODULE + ''.join(f"\n{t}_Anatomy = _short('{t}')" for t in args.trainers) + '\n')
    from nnunetv2_ext import discovery
    discovery.register()
    env = nnunet_env(work)
    env['nnUNet_extTrainer'] = os.pathsep.join([shim, env['nnUNet_extTrainer']])
    env.update(ANATOMY_EPOCHS=str(args.epochs), ANATOMY_ITERS=str(args.iterations), nnUNet_compile='f')
    n_proc = str(max(1, min(4, os.cpu_count() or 1)))
    env.setdefault('nnUNet_n_proc_DA', n_proc)
    env.setdefault('nnUNet_def_n_proc', n_proc)
    ext = [sys.executable, '-m', 'nnunetv2_ext.cli']

    def step(name, cmd, **extra):
        print(f'== {name}', flush=True)
        return run_step(cmd, {**env, **extra}, os.path.join(logs, f'{name}.log'))

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
    rows = []
    for t in args.trainers:
        tr = f'{t}_Anatomy'
        train_s = step(f'train_{t}', nnunet_command('nnUNetv2_train') + [str(DATASET_ID), '3d_fullres', '0', '-tr',
                                                                         tr, '-p', plans, '-device', args.device])
        out = os.path.join(work, 'predictions', t)
        step(f'predict_{t}', nnunet_command('nnUNetv2_predict') + [
            '-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d', str(DATASET_ID), '-c', '3d_fullres', '-tr', tr,
            '-p', plans, '-f', '0', '-device', args.device])
        step(f'evaluate_{t}', nnunet_command('nnUNetv2_evaluate_folder') + [
            os.path.join(raw, 'labelsTs'), out, '-djfile', os.path.join(out, 'dataset.json'), '-pfile',
            os.path.join(out, 'plans.json')])
        test_mean, test_per_class = foreground_dice(os.path.join(out, 'summary.json'))
        fold = os.path.join(env['nnUNet_results'], DATASET, f'{tr}__{plans}__3d_fullres', 'fold_0', 'validation')
        val_mean, _ = foreground_dice(os.path.join(fold, 'summary.json'))
        rows.append(dict(trainer=t, train_s=train_s, colin27_dice=test_per_class, colin27_mean=test_mean,
                         fold0_val_mean=val_mean))
    step('benchmark', ext + ['benchmark', '-d', str(DATASET_ID), '-p', plans, '-tr', *args.trainers,
                             '--device', args.device, '-o', os.path.join(work, 'cost')])
    table = ['| trainer | train s | Colin27 Dice other-brain | Colin27 Dice grey matter | Colin27 mean | '
             'fold-0 val mean (deformed copies) |', '|---|---:|---:|---:|---:|---:|']
    table += [f"| {r['trainer']} | {r['train_s']:.0f} | {r['colin27_dice']['1']:.3f} | {r['colin27_dice']['2']:.3f} | "
              f"{r['colin27_mean']:.3f} | {r['fold0_val_mean']:.3f} |" for r in rows]
    text = (f"{args.epochs} epochs x {args.iterations} iterations per trainer on {args.device}, plans {plans}.\n\n"
            + '\n'.join(table) + '\n')
    with open(os.path.join(work, 'anatomy_results.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(work, 'anatomy_results.json'), 'w') as f:
        json.dump({'args': vars(args), 'rows': rows}, f, indent=2)
    print(text)
    print(f"cost table: {os.path.join(work, 'cost', 'benchmark.md')}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
