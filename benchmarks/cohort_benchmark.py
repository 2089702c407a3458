"""Six-subject cohort benchmark: nnU-Net's baseline vs our trainers with subject-wise folds, identical settings.

    python benchmarks/cohort_benchmark.py --work-dir /tmp/cohort --epochs 300 --iterations 50 \
        --base-features 8 --max-features 64 --jobs 2 -tr nnUNetTrainer nnUNetTrainerLightDecoder \
        nnUNetTrainerGLSP nnUNetTrainerPVTGDLA_PlansWidths

(300 x 50 steps: the budget at which nnU-Net's own trainer learns all 16 classes on fold 0, docs/benchmarks.md;
in a short schedule ``nnUNetTrainerPVTGDLA_PlansWidths:warmup_epochs=1`` shortens PVT-GDLA's 10-epoch warm-up.)
An interrupted run continues with the same command: finished folds are reused, an interrupted one resumes from
its last epoch (``--c``). Each finished fold leaves a small JSON record (``--records``, default
<work-dir>/records) and the table is built from the records: folds run on different machines or in different
sessions combine when their records are copied into one folder (folds recorded there are not trained again).
How many steps the task needs: cohort_learnability.py. ``nnUNetTrainer@resenc_m`` among ``-tr`` is nnU-Net's
ResEnc-M as a second baseline (its residual encoder on the same narrowed plans; anatomy_benchmark.py's
``TrainerSpec``).

Steps (stock nnU-Net commands; data: nnunetv2_ext/cohort.py): nnunetv2-ext cohort-dataset (random-contrast
cases of six real brains in imagesTr, one fixed T1-like case per subject in imagesTs, subject-wise
splits_final.json) -> nnUNetv2_plan_and_preprocess -> nnUNetSmallPlans (widths capped, the same for all) ->
nnUNetv2_train per trainer and fold (short-schedule ``<Trainer>_Anatomy`` subclasses, as in
anatomy_benchmark.py; finished folds are reused) -> per fold, nnUNetv2_predict of the T1-like cases of that fold's
held-out subjects with that fold's model only -> nnUNetv2_evaluate_folder -> per-subject test Dice, paired
(held-out subject × class) comparison against the baseline -> nnunetv2-ext compare (the folds' validation:
random-contrast cases of the held-out subjects; where every fold's nnU-Net results are here) -> nnunetv2-ext
benchmark on the same plans.
Results (``--name``, default cohort_results): <work-dir>/NAME.{md,json}, <work-dir>/NAME_curves.png (training
curves), <work-dir>/NAME_compare/, <work-dir>/cost/ (and cost_resenc_m/ for ``@resenc_m``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable

import numpy as np

from anatomy_benchmark import Benchmark, TrainerSpec, add_arguments, mean_seconds
from nnunetv2_ext.cohort import CLASSES, SPACING_MM, TEST_CASE, build_parameters, subject_of
from nnunetv2_ext.benchmark import cpu_model
from nnunetv2_ext.compare import paired_comparison
from nnunetv2_ext.demo.pipeline import foreground_dice
from nnunetv2_ext.publish import write_atomically

DATASET_ID = 992
DATASET = f'Dataset{DATASET_ID}_DKCohort'


def held_out_subjects(splits_json: str) -> list[list[str]]:
    """Per fold, the subjects of its validation cases; an error if a subject is on both sides of a fold."""
    with open(splits_json) as f:
        splits = json.load(f)
    held = []
    for k, split in enumerate(splits):
        train, val = ({subject_of(c) for c in split[part]} for part in ('train', 'val'))
        if train & val:
            raise ValueError(f'{splits_json}: fold {k} has subjects {sorted(train & val)} in both training and '
                             f'validation; rebuild the dataset with nnunetv2-ext cohort-dataset')
        held.append(sorted(val, key=int))
    return held


def left_right_axis(raw: str, plans_json: str) -> int:
    """The axis of nnU-Net's arrays that runs left-right in the dataset's images: the label files' affine gives
    the NIfTI voxel axis, SimpleITK (nnU-Net's reader in these plans) reverses the axis order, and the plans'
    ``transpose_forward`` permutes them. Raises ValueError for another reader."""
    import nibabel as nib
    with open(plans_json) as f:
        plans = json.load(f)
    if plans['image_reader_writer'] != 'SimpleITKIO':
        raise ValueError(f"{plans_json}: reader {plans['image_reader_writer']}, expected SimpleITKIO (axis order)")
    label = sorted(os.listdir(os.path.join(raw, 'labelsTr')))[0]
    codes = nib.aff2axcodes(nib.load(os.path.join(raw, 'labelsTr', label)).affine)
    nifti_axis = next(i for i, c in enumerate(codes) if c in ('L', 'R'))
    return list(plans['transpose_forward']).index(2 - nifti_axis)


def test_inputs(raw: str, subjects: list[str], folder: str) -> str:
    """A folder with the T1-like test images of ``subjects`` only (copied from imagesTs)."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    for s in subjects:
        image = f'{s}_{TEST_CASE}_0000.nii.gz'
        shutil.copyfile(os.path.join(raw, 'imagesTs', image), os.path.join(folder, image))
    return folder


def per_subject_dice(summary_json: str) -> dict[str, dict[str, float]]:
    """``{subject: {class label: Dice}}`` from nnUNetv2_evaluate_folder's summary.json (NaN: class absent
    in both reference and prediction)."""
    with open(summary_json) as f:
        summary = json.load(f)
    out = {}
    for entry in summary['metric_per_case']:
        case = os.path.basename(entry['reference_file']).removesuffix('.nii.gz')
        out[subject_of(case)] = {str(k): float(v['Dice']) for k, v in entry['metrics'].items()}
    return out


LEARNED = 0.05  # a class counts as learned (at an epoch, or on a test case) when its (pseudo) Dice is above this


def _stat(values: list[float]) -> str:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if v.size == 0:
        return 'n/a'
    return f'{v.mean():.3f} ± {v.std(ddof=1):.3f}' if v.size > 1 else f'{v.mean():.3f}'


def results_table(test: dict[str, dict[str, dict[str, float]]], baseline: str,
                  train_s: dict[str, float | None]) -> tuple[str, dict]:
    """Markdown table (one row per class and the foreground mean, one column per trainer: mean ± std over
    held-out subjects; then per held-out subject the classes with Dice above ``LEARNED``, of those present)
    and the paired (subject × class) comparison of each trainer against ``baseline``: over all pairs, and
    (``paired[t]['where_baseline_learned']``) over the pairs whose class the baseline learned on that subject
    (Dice above ``LEARNED``), so a mean difference made only of classes the baseline missed shows as such."""
    trainers = list(test)
    labels = [str(i) for i in range(1, len(CLASSES))]
    lines = ['| structure | ' + ' | '.join(trainers) + ' |', '|---|' + '---:|' * len(trainers)]
    for lab in labels:
        lines.append(f'| {CLASSES[int(lab)]} | ' + ' | '.join(
            _stat([d[lab] for d in test[t].values()]) for t in trainers) + ' |')
    means = {t: [float(np.nanmean([d[lab] for lab in labels])) for d in test[t].values()] for t in trainers}
    lines.append('| **foreground mean** | ' + ' | '.join(f'**{_stat(means[t])}**' for t in trainers) + ' |')
    subjects = list(dict.fromkeys(s for t in trainers for s in test[t]))

    def learned(d: dict[str, float] | None) -> str:
        present = [] if d is None else [d[lab] for lab in labels if not math.isnan(d[lab])]
        return '—' if d is None else f'{sum(x > LEARNED for x in present)}/{len(present)}'
    lines.append(f'| classes with Dice > {LEARNED} ({", ".join(subjects)}) | ' + ' | '.join(
        ', '.join(learned(test[t].get(s)) for s in subjects) for t in trainers) + ' |')
    paired = {}
    flat = {t: {f'{s}/{lab}': d[lab] for s, d in test[t].items() for lab in labels} for t in trainers}
    learned_by_baseline = {pair for pair, x in flat[baseline].items() if x > LEARNED}  # NaN > x is False
    for t in trainers:
        if t != baseline:
            paired[t] = paired_comparison(flat[t], flat[baseline])
            paired[t]['where_baseline_learned'] = paired_comparison(
                {pair: x for pair, x in flat[t].items() if pair in learned_by_baseline}, flat[baseline])

    def cells(p: dict) -> str:
        return (f"{p['n_cases']} | {p['wins']}/{p['losses']}/{p['ties']} | {p['mean_difference']:+.4f} | "
                f"{p['wilcoxon_p']:.3g}")
    lines += ['', f'Paired (held-out subject × class) comparison against {baseline}, over all pairs and over the '
              f'pairs whose class {baseline} learned on that subject (Dice > {LEARNED}); training time per fold:', '',
              '| trainer | pairs | wins/losses/ties | mean Δ Dice | Wilcoxon p | pairs (baseline learned) | '
              'wins/losses/ties | mean Δ Dice | Wilcoxon p | train s per fold |',
              '|---|' + '---:|' * 9]
    for t in trainers:
        seconds = '—' if train_s.get(t) is None else f'{train_s[t]:.0f}'
        if t == baseline:
            lines.append(f'| {t} | | baseline | | | | | | | {seconds} |')
        else:
            lines.append(f"| {t} | {cells(paired[t])} | {cells(paired[t]['where_baseline_learned'])} | {seconds} |")
    return '\n'.join(lines) + '\n', paired


def pseudo_dice_curve(fold_dir: str) -> list[list[float]]:
    """Per epoch, nnU-Net's pseudo Dice per class (the foreground classes, on its validation batches) from the
    fold's ``training_log_*.txt`` files in time order (a resumed training writes a new one)."""
    curve = []
    for name in sorted(n for n in os.listdir(fold_dir) if n.startswith('training_log_') and n.endswith('.txt')):
        with open(os.path.join(fold_dir, name)) as f:
            for line in f:
                found = re.search(r'Pseudo dice \[(.*)\]', line)
                if found:  # nnU-Net prints numpy scalars: "np.float32(0.5), ..." (older numpy: "0.5, ...")
                    values = re.sub(r'np\.float\d+\(([^()]*)\)', r'\1', found.group(1))
                    curve.append([float(x) for x in values.split(',') if x.strip()])
    return curve


def dataset_parameters(raw: str, wanted: dict) -> dict:
    """The parameters the cohort in ``raw`` was built from (its dataset.json), if they are ``wanted`` (this run's
    options); SystemExit naming the differences otherwise: the driver reuses an existing dataset."""
    path = os.path.join(raw, 'dataset.json')
    with open(path) as f:
        built = json.load(f).get('cohort') or {}
    if built != wanted:
        differ = sorted(k for k in wanted if built.get(k) != wanted[k])
        raise SystemExit(f"{path}: the dataset here was built with {', '.join(f'{k}={built.get(k)!r}' for k in differ)}"
                         f", this run asks for {', '.join(f'{k}={wanted[k]!r}' for k in differ)}: pass the options it was "
                         f"built with, or use another --work-dir")
    return built


def _finite(values: list[float]) -> list[float | None]:
    """JSON has no NaN: NaN (a class absent from reference and prediction) is stored as null."""
    return [None if math.isnan(x) else x for x in values]


def fold_record(settings: dict, spec: TrainerSpec, fold: int, held: list[str], fold_dir: str, test_summary: str,
                train_s: float | None, device: str) -> dict:
    """What the results need of one trained fold, as JSON: the settings it was trained with, the held-out
    subjects' test Dice (``per_subject_dice`` of ``test_summary``), nnU-Net's final validation (foreground mean
    and per class, from ``fold_dir``) and pseudo Dice per epoch, the training seconds, and where it ran."""
    import platform
    from importlib.metadata import version

    mean, per_class = foreground_dice(os.path.join(fold_dir, 'validation', 'summary.json'))
    return {'trainer': spec.label, 'class_name': spec.class_name, 'fold': fold, 'held_out': held,
            'settings': settings,
            'test_dice': {s: dict(zip(d, _finite(list(d.values())))) for s, d in per_subject_dice(test_summary).items()},
            'validation': {'foreground_mean': _finite([mean])[0], 'per_class': dict(zip(per_class, _finite(list(
                per_class.values()))))},
            'pseudo_dice': [_finite(epoch) for epoch in pseudo_dice_curve(fold_dir)], 'train_s': train_s,
            'device': device, 'machine': f'{cpu_model()}, {os.cpu_count()} cores, {platform.system()}',
            'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'versions': {p: version(p) for p in ('nnunetv2', 'nnunetv2_ext', 'torch')}}


class FoldRecords:
    """One JSON record per trained (trainer, fold) in ``folder``/<spec key>/fold_<k>.json, written atomically
    when the fold's training, test prediction and evaluation are done. The results table is built from the
    records, so folds trained on different machines or in different sessions (each writing its records, e.g.
    into a folder kept under version control) combine into one table, and a fold with a record is not trained
    again. A record of other settings (schedule, plans, widths, spacing, dataset seed ...) is an error, not
    reused. ``settings``: a trainer spec's settings (they differ in the plans for an ``@variant``)."""

    def __init__(self, folder: str, settings: Callable[[TrainerSpec], dict]):
        self.folder, self.settings = folder, settings

    def path(self, spec: TrainerSpec, fold: int) -> str:
        return os.path.join(self.folder, spec.key, f'fold_{fold}.json')

    def get(self, spec: TrainerSpec, fold: int, held: list[str]) -> dict | None:
        """The record of ``spec`` on ``fold`` (held-out subjects ``held``), None if there is none; SystemExit
        for an unreadable record or one made with other settings."""
        path = self.path(spec, fold)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                record = json.load(f)
            recorded = record['settings']
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f'{path}: unreadable fold record ({e.__class__.__name__}: {e}); delete it to train '
                             'and predict that fold again') from None
        wanted = {**self.settings(spec), 'held_out': held}
        recorded = {**recorded, 'held_out': record.get('held_out')}
        differ = sorted(k for k in wanted.keys() | recorded.keys() if recorded.get(k) != wanted.get(k))
        if differ:
            raise SystemExit(f'{path}: recorded with other settings ('
                             + '; '.join(f'{k}: recorded {recorded.get(k)!r}, here {wanted.get(k)!r}' for k in differ)
                             + '); use another --records folder, or this run\'s options as recorded')
        return record

    def put(self, spec: TrainerSpec, fold: int, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path(spec, fold)), exist_ok=True)
        write_atomically(self.path(spec, fold), json.dumps(record, indent=1, allow_nan=False))


def classes_learned(curve: list[list[float | None]]) -> list[int]:
    """Per epoch of a record's ``pseudo_dice``, the number of classes above ``LEARNED``."""
    return [sum(x is not None and x > LEARNED for x in epoch) for epoch in curve]


def mean_pseudo_dice(curve: list[list[float | None]]) -> list[float]:
    """Per epoch of a record's ``pseudo_dice``, the mean over the classes present (NaN if none)."""
    return [float(np.nanmean([np.nan if x is None else x for x in epoch])) for epoch in curve]


def learning_table(records: list[dict]) -> str:
    """Markdown: per trainer and fold (records of ``fold_record``), the final validation (nnU-Net's, on the
    held-out subjects' random-contrast cases) as foreground mean and worst class, the mean pseudo Dice at the
    first, middle and last epoch, the classes above ``LEARNED`` pseudo Dice at a quarter, half and the end of
    training, and the first epoch (from 1) at which every class was."""
    lines = ['| trainer | fold | validation mean | worst class (Dice) | pseudo Dice first / middle / last epoch '
             f'| classes > {LEARNED} at ¼ / ½ / last epoch | first epoch with every class |',
             '|---|---:|---:|---|---|---|---:|']
    def fmt(x: float | None) -> str:
        return 'n/a' if x is None or math.isnan(x) else f'{x:.3f}'

    for r in records:
        per_class = {c: x for c, x in r['validation']['per_class'].items() if x is not None}
        worst = f'{CLASSES[int(min(per_class, key=per_class.get))]} ({fmt(min(per_class.values()))})' \
            if per_class else 'n/a'
        curve = mean_pseudo_dice(r['pseudo_dice'])
        picks = ' / '.join(fmt(curve[i]) for i in (0, len(curve) // 2, -1)) if curve else 'n/a'
        learned = classes_learned(r['pseudo_dice'])
        n = len(r['pseudo_dice'][0]) if r['pseudo_dice'] else 0
        counts = ' / '.join(f'{learned[i]}/{n}' for i in (len(learned) // 4 - 1, len(learned) // 2 - 1, -1)) \
            if len(learned) >= 4 else 'n/a'
        every = next((str(e + 1) for e, c in enumerate(learned) if n and c == n), 'never')
        lines.append(f"| {r['trainer']} | {r['fold']} | {fmt(r['validation']['foreground_mean'])} | {worst} | "
                     f"{picks} | {counts} | {every} |")
    return '\n'.join(lines) + '\n'


def plot_curves(records: list[dict], path: str) -> None:
    """PNG at ``path`` (written atomically): per trainer and fold, the classes above ``LEARNED`` pseudo Dice and
    the mean pseudo Dice per epoch (the training curves of the table's folds)."""
    import io

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    trainers = list(dict.fromkeys(r['trainer'] for r in records))
    for r in records:
        style = dict(color=f'C{trainers.index(r["trainer"])}', linestyle=('-', '--', ':', '-.')[r['fold'] % 4],
                     label=f"{r['trainer']} fold {r['fold']}")
        epochs = range(1, len(r['pseudo_dice']) + 1)
        left.plot(epochs, classes_learned(r['pseudo_dice']), **style)
        right.plot(epochs, mean_pseudo_dice(r['pseudo_dice']), **style)
    left.set_title(f'classes with pseudo Dice > {LEARNED}')
    right.set_title('mean pseudo Dice (validation batches)')
    for ax in (left, right):
        ax.set_xlabel('epoch')
    right.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=100)
    plt.close(fig)
    write_atomically(path, buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, default_cases=8)
    ap.add_argument('--subjects', nargs='+', default=None, help='donors (default: all six)')
    ap.add_argument('--subject-folds', type=int, default=3,
                    help='subject-wise folds of the dataset (3: two held-out subjects each)')
    ap.add_argument('-f', '--folds', nargs='+', type=int, default=None, help='folds to run (default: all)')
    ap.add_argument('--spacing', type=float, default=SPACING_MM,
                    help=f'isotropic spacing of the dataset in mm (default {SPACING_MM:g})')
    ap.add_argument('--seed', type=int, default=0, help='dataset seed')
    ap.add_argument('--name', default='cohort_results',
                    help='results: <work-dir>/NAME.{md,json}, <work-dir>/NAME_compare/ (default cohort_results)')
    ap.add_argument('--records', default=None,
                    help='folder of the per-fold records the table is built from (default <work-dir>/records); '
                         'folds recorded there are not trained again')
    args = ap.parse_args(argv)
    command = ['cohort-dataset', '--id', str(DATASET_ID), '--cases-per-subject', str(args.cases_per_subject),
               '--folds', str(args.subject_folds), '--spacing', str(args.spacing), '--seed', str(args.seed)]
    if args.subjects:
        command += ['--subjects', *args.subjects]
    bench = Benchmark(ap, args, DATASET_ID, DATASET, command)
    held = held_out_subjects(os.path.join(bench.env['nnUNet_preprocessed'], DATASET, 'splits_final.json'))
    folds = list(range(len(held))) if args.folds is None else args.folds
    if not set(folds) <= set(range(len(held))):
        ap.error(f'--folds {folds}: the dataset has folds 0..{len(held) - 1}')
    wanted = build_parameters(args.subjects, args.cases_per_subject, args.subject_folds, args.spacing, args.seed)
    built = dataset_parameters(bench.raw, wanted)

    def settings(spec: TrainerSpec) -> dict:
        return {'dataset': built, **bench.schedule(spec)}

    records = FoldRecords(os.path.abspath(args.records or os.path.join(bench.work, 'records')), settings)
    # left and right structures are different classes: no mirroring across the midline (training or inference)
    bench.env['ANATOMY_NO_MIRROR_AXIS'] = str(left_right_axis(
        bench.raw, os.path.join(bench.env['nnUNet_preprocessed'], DATASET, f'{bench.plans}.json')))
    images = {k: test_inputs(bench.raw, held[k], os.path.join(bench.work, 'test_inputs', f'fold_{k}')) for k in folds}
    # one task of a trainer at a time: nnU-Net rewrites the trainer's plans.json / dataset.json (not atomically)
    # when a fold's training starts, and nnUNetv2_predict of another fold of that trainer reads them
    busy = {spec.label: threading.Lock() for spec in bench.specs}

    def run_fold(task: tuple[TrainerSpec, int]) -> None:
        """Train (or reuse / resume) one fold, predict its held-out subjects' test cases, record it."""
        spec, k = task
        with busy[spec.label]:
            seconds = bench.train(spec, k)
            summary = bench.predict_and_evaluate(spec, [k], images[k], os.path.join(bench.raw, 'labelsTs'),
                                                 f'test_fold_{k}')
        records.put(spec, k, fold_record(settings(spec), spec, k, held[k], bench.fold_dir(spec, k), summary, seconds,
                                         args.device))

    # fold-major, --jobs at a time; each fold is recorded as soon as it is done (an early stop keeps it), and a
    # failure is reported at once and stops what has not started
    todo = [(spec, k) for k in folds for spec in bench.specs if records.get(spec, k, held[k]) is None]
    failed = []
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run_fold, task): task for task in todo}
        for future in as_completed(futures):
            if future.exception() is not None:
                spec, k = futures[future]
                failed.append(f'{spec.label} fold {k}: {future.exception()}')
                print(f'== FAILED {failed[-1]}', flush=True)
                for other in futures:
                    other.cancel()
    if failed:
        raise SystemExit('cohort benchmark: ' + '\n'.join(failed))
    done = {(spec.label, k): records.get(spec, k, held[k]) for k in folds for spec in bench.specs}
    test = {spec.label: {s: {c: math.nan if x is None else x for c, x in d.items()}
                         for k in folds for s, d in done[spec.label, k]['test_dice'].items()} for spec in bench.specs}
    train_s = {}
    for spec in bench.specs:
        mine = [done[spec.label, k] for k in folds]
        # a mean over folds timed on different machines or devices would mean nothing
        same = len({(r['machine'], r['device']) for r in mine}) == 1
        train_s[spec.label] = mean_seconds([r['train_s'] for r in mine]) if same else None
    # nnunetv2-ext compare needs the folds' nnU-Net results, which folds recorded elsewhere do not have here
    local = all(os.path.isfile(os.path.join(bench.fold_dir(spec, k), 'validation', 'summary.json'))
                for spec in bench.compare_peers() for k in folds)
    compared = bench.compare_and_cost(folds, args.name, compare=local)
    table, paired = results_table(test, bench.baseline.label, train_s)
    ordered = [done[spec.label, k] for spec in bench.specs for k in folds]
    learning = learning_table(ordered)
    subjects = [s for k in folds for s in held[k]]
    text = (f"{args.epochs} epochs x {args.iterations} iterations per fold on {args.device}, plans {bench.plans_text()}, "
            f"folds {folds} (held-out subjects {[held[k] for k in folds]}). Test Dice on each held-out subject's "
            f"T1-like case, predicted by the fold that held it out; mean ± std over the {len(subjects)} held-out "
            f"subject(s).\n\n"
            + table + '\nEvery class learned in every fold? Validation of each fold (its held-out subjects\' '
            'random-contrast cases) and the mean pseudo Dice of training:\n\n' + learning
            + ('\nValidation comparison (nnunetv2-ext compare) not run: some folds were trained elsewhere (their '
               'records are in ' + records.folder + ').\n' if not local else bench.compare_note(compared)))
    bench.write_results(args.name, text, {'held_out': {k: held[k] for k in folds}, 'test_dice': test,
                                          'paired': paired, 'train_s': train_s, 'records': records.folder},
                        compared=compared)
    curves = os.path.join(bench.work, f'{args.name}_curves.png')
    plot_curves(ordered, curves)
    print(f'training curves: {curves}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
