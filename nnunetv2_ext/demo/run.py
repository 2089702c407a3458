"""``nnunetv2-ext demo``: nnU-Net's real pipeline on a built-in dataset, our trainer vs nnU-Net's.

Steps (each a stock nnU-Net command in a subprocess, logs under ``<work_dir>/logs``):
write dataset -> nnUNetv2_plan_and_preprocess -> small-width plans -> nnUNetv2_train (both trainers,
fold 0, short identical schedules) -> nnUNetv2_predict on the held-out test cases ->
nnUNetv2_evaluate_folder -> a Dice/time table (also saved as demo_results.md/.json).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import time

from nnunetv2_ext.demo.dataset import write_dataset
from nnunetv2_ext.demo.pipeline import (StepFailed, foreground_dice, nnunet_command, nnunet_env, run_step,
                                        write_small_plans)
from nnunetv2_ext.publish import write_atomically

DATASET_ID = 987
DATASET_NAME = f'Dataset{DATASET_ID}_ExtDemo'
CONFIGURATION = '3d_fullres'
TRAINERS = (('nnU-Net (nnUNetTrainer)', 'nnUNetTrainer_ExtDemo'),
            ('ours (nnUNetTrainerLightDecoder)', 'nnUNetTrainerLightDecoder_ExtDemo'))
PROGRESS_MARKERS = ('Epoch ', 'train_loss', 'val_loss', 'Pseudo dice', 'Epoch time',  # training
                    'predicting ', 'Validation complete', 'Mean Validation Dice',  # final validation
                    'Predicting ', 'done with ')  # nnUNetv2_predict
QUIET_S = 20.0  # a step silent this long prints that it is still running


def _count_parameters(preprocessed: str, plans_name: str, trainer_name: str) -> int:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2_ext import trainers

    plans = PlansManager(os.path.join(preprocessed, DATASET_NAME, f'{plans_name}.json'))
    cls = getattr(trainers, trainer_name)
    net = cls.build_network_architecture(plans, plans.get_configuration(CONFIGURATION), 1, 3, True)
    return sum(p.numel() for p in net.parameters())


def _format_table(rows: list[dict]) -> str:
    head = ('| trainer | params | train s | predict s | Dice sphere | Dice ellipsoid | mean Dice |\n'
            '|---|---:|---:|---:|---:|---:|---:|\n')
    return head + ''.join(
        f"| {r['label']} | {r['params']:,} | {r['train_s']:.0f} | {r['predict_s']:.0f} | "
        f"{r['dice']['1']:.3f} | {r['dice']['2']:.3f} | {r['mean_dice']:.3f} |\n" for r in rows)


def run_demo(work_dir: str | None = None, epochs: int = 4, iterations: int = 25, num_train: int = 10,
             device: str = 'auto') -> int:
    from nnunetv2_ext import discovery

    problem = discovery.nnunet_version_problem()
    if problem:
        print(f'error: {problem}')
        return 1
    discovery.register()  # children must see our trainers even where startup hooks are off
    work_dir = os.path.abspath(work_dir or 'nnunetv2_ext_demo')
    logs = os.path.join(work_dir, 'logs')
    os.makedirs(logs, exist_ok=True)
    if device == 'auto':
        import torch
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    env = nnunet_env(work_dir)
    env.update(NNUNETV2_EXT_DEMO_EPOCHS=str(epochs), NNUNETV2_EXT_DEMO_ITERS=str(iterations))
    env.setdefault('nnUNet_compile', 'f')  # compiling would dominate a 2-minute run
    # nnU-Net defaults to 8 worker processes, each importing torch: far too many for a small machine
    n_proc = str(max(1, min(2, os.cpu_count() or 1)))
    env.setdefault('nnUNet_n_proc_DA', n_proc)
    env.setdefault('nnUNet_def_n_proc', n_proc)
    start = time.perf_counter()
    step_numbers = itertools.count(1)
    n_steps = 3 + 3 * len(TRAINERS)

    def announce(text: str) -> None:
        print(f'[{next(step_numbers)}/{n_steps}] {text}', flush=True)

    def step(title: str, cmd: list[str], log_name: str) -> float:
        announce(f'{title}  (log: {os.path.join(logs, log_name)})')
        seconds = run_step(cmd, env, os.path.join(logs, log_name),
                           on_line=lambda l: any(m in l for m in PROGRESS_MARKERS) and print('      ' + l.strip(),
                                                                                            flush=True),
                           on_quiet=lambda s: print(f'      ... still running ({s:.0f} s)', flush=True),
                           quiet_s=QUIET_S)
        print(f'      done in {seconds:.0f} s', flush=True)
        return seconds

    try:
        announce(f'writing the built-in dataset to {env["nnUNet_raw"]}')
        try:
            raw = write_dataset(env['nnUNet_raw'], DATASET_ID, 'ExtDemo', num_train=num_train)
        except ValueError as e:
            print(f'error: {e}')
            return 1
        # an earlier run's split would be reused by nnU-Net even if --num-train changed the cases
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(env['nnUNet_preprocessed'], DATASET_NAME, 'splits_final.json'))
        step('nnUNetv2_plan_and_preprocess', nnunet_command('nnUNetv2_plan_and_preprocess') + [
            '-d', str(DATASET_ID), '-c', CONFIGURATION, '-np', n_proc, '-npfp', n_proc, '--verify_dataset_integrity'],
             'plan.log')
        plans_name = write_small_plans(os.path.join(env['nnUNet_preprocessed'], DATASET_NAME))
        announce(f'wrote plans {plans_name} (nnUNetPlans with features 8..64 for a CPU demo)')
        rows = []
        for label, trainer in TRAINERS:
            train_s = step(f'nnUNetv2_train {trainer} ({epochs} epochs x {iterations} iterations, {device})',
                           nnunet_command('nnUNetv2_train') + [str(DATASET_ID), CONFIGURATION, '0', '-tr', trainer,
                                                              '-p', plans_name, '-device', device],
                           f'train_{trainer}.log')
            out = os.path.join(work_dir, 'predictions', trainer)
            predict_s = step(f'nnUNetv2_predict {trainer} on {os.path.join(raw, "imagesTs")}',
                             nnunet_command('nnUNetv2_predict') + [
                                 '-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d', str(DATASET_ID),
                                 '-c', CONFIGURATION, '-tr', trainer, '-p', plans_name, '-f', '0', '--disable_tta',
                                 '-device', device, '-npp', '1', '-nps', '1'], f'predict_{trainer}.log')
            step(f'nnUNetv2_evaluate_folder {trainer}', nnunet_command('nnUNetv2_evaluate_folder') + [
                os.path.join(raw, 'labelsTs'), out, '-djfile', os.path.join(out, 'dataset.json'),
                '-pfile', os.path.join(out, 'plans.json')], f'evaluate_{trainer}.log')
            mean, per_class = foreground_dice(os.path.join(out, 'summary.json'))
            rows.append(dict(label=label, trainer=trainer, params=_count_parameters(
                env['nnUNet_preprocessed'], plans_name, trainer), train_s=train_s, predict_s=predict_s,
                dice=per_class, mean_dice=mean))
    except StepFailed as e:
        print(f'\ndemo failed: {e}')
        return 1
    table = _format_table(rows)
    note = (f'\nDataset {DATASET_NAME}: {num_train} synthetic training cases, 4 test cases; fold 0; '
            f'{epochs} epochs x {iterations} iterations each on {device}; identical plans ({plans_name}).\n'
            f'A few iterations cannot rank architectures: this shows the pipeline, not a benchmark.\n')
    print('\n' + table + note)
    write_atomically(os.path.join(work_dir, 'demo_results.md'), table + note)
    write_atomically(os.path.join(work_dir, 'demo_results.json'), json.dumps(rows, indent=2))
    print(f'total {time.perf_counter() - start:.0f} s; everything is kept in {work_dir}')
    return 0
