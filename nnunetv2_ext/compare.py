"""``nnunetv2-ext compare``: trainers' cross-validation results side by side, from nnU-Net's own outputs.

Reads ``$nnUNet_results/<Dataset>/<Trainer>__<Plans>__<Config>/fold_<f>/validation/summary.json``
(written by ``nnUNetv2_train``), or, where no fold has one, the pooled
``crossval_results_folds_*/summary.json`` of ``nnUNetv2_find_best_configuration``. Reports per class
mean ± std over folds, a paired per-case comparison against a baseline (wins/losses/ties and the
Wilcoxon signed-rank p-value of the per-case foreground-mean differences) and a box plot.

Refuses (:class:`CompareError`, naming the file or the trainers and the fix) what would give misleading
numbers: an unreadable or incomplete ``summary.json``, a metric no summary has, and trainers evaluated on
different label sets.
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainerResults:
    """One trainer's cross-validation summaries.

    ``fold_means[f][label][metric]``: the fold's mean over its cases; ``fold_foreground[f][metric]``: its
    mean over foreground labels (nnU-Net's ``foreground_mean``); ``per_case[case][label][metric]``.
    """
    trainer: str
    folder: str
    fold_means: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    fold_foreground: dict[int, dict[str, float]] = field(default_factory=dict)
    per_case: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    missing_folds: list[int] = field(default_factory=list)
    source: str = 'folds'


class CompareError(ValueError):
    """Results that cannot be compared as asked; the message names the file or trainers and the fix."""


def _case_id(entry: dict) -> str:
    name = os.path.basename(entry['reference_file'])
    for ending in ('.nii.gz', '.nrrd', '.mha', '.nii', '.png', '.tif', '.tiff', '.npz', '.b2nd'):
        if name.endswith(ending):
            return name[:-len(ending)]
    return os.path.splitext(name)[0]


def _read_summary(path: str, keys: tuple[str, ...] = ('metric_per_case', 'mean', 'foreground_mean')) -> dict:
    """nnU-Net's ``summary.json`` at ``path`` with ``per_case`` ``{case: {label: {metric: value}}}`` added."""
    fix = ('regenerate it with `nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER --val` (fold summaries) or '
           '`nnUNetv2_find_best_configuration` (pooled), or move it away')
    try:
        with open(path, encoding='utf-8') as f:
            summary = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f'{path} is not valid JSON ({e}); it was probably cut off while being written: {fix}') \
            from None
    missing = [k for k in keys if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise CompareError(f"{path} has no {', '.join(map(repr, missing))}: not a summary.json as nnU-Net writes it; "
                           f"{fix}")
    try:
        summary['per_case'] = {_case_id(e): e['metrics'] for e in summary['metric_per_case']}
    except (KeyError, TypeError) as e:
        raise CompareError(f"{path}: an entry of 'metric_per_case' lacks {e} (each needs 'reference_file' and "
                           f"'metrics'); {fix}") from None
    return summary


def load_trainer_results(results_dir: str, trainer: str, plans: str, configuration: str,
                         folds: list[int]) -> TrainerResults:
    folder = os.path.join(results_dir, f'{trainer}__{plans}__{configuration}')
    res = TrainerResults(trainer, folder)
    for f in folds:
        path = os.path.join(folder, f'fold_{f}', 'validation', 'summary.json')
        if not os.path.isfile(path):
            res.missing_folds.append(f)
            continue
        summary = _read_summary(path)
        res.fold_means[f], res.fold_foreground[f] = summary['mean'], summary['foreground_mean']
        res.per_case.update(summary['per_case'])
    if not res.fold_means:
        pooled = sorted(glob.glob(os.path.join(folder, 'crossval_results_folds_*', 'summary.json')))
        if pooled:
            res.per_case = _read_summary(pooled[-1], ('metric_per_case',))['per_case']
            res.source = os.path.relpath(pooled[-1], folder)
    return res


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def case_score(metrics: dict[str, dict[str, float]], metric: str = 'Dice') -> float:
    """Mean of ``metric`` over the labels of one case, ignoring NaN (label absent in both)."""
    vals = [m[metric] for m in metrics.values() if metric in m and m[metric] is not None
            and not math.isnan(m[metric])]
    return float(np.mean(vals)) if vals else math.nan


def paired_comparison(candidate: dict[str, float], baseline: dict[str, float], tol: float = 1e-9) -> dict:
    """Per-case ``candidate − baseline`` on the cases both have: counts, mean difference, Wilcoxon p."""
    from scipy.stats import wilcoxon

    common = sorted(c for c in set(candidate) & set(baseline)
                    if not (math.isnan(candidate[c]) or math.isnan(baseline[c])))
    diff = np.array([candidate[c] - baseline[c] for c in common], dtype=float)
    out = {'n_cases': len(common), 'wins': int((diff > tol).sum()), 'losses': int((diff < -tol).sum()),
           'ties': int((np.abs(diff) <= tol).sum()), 'mean_difference': float(diff.mean()) if diff.size else math.nan,
           'wilcoxon_p': math.nan}
    if (np.abs(diff) > tol).any():
        out['wilcoxon_p'] = float(wilcoxon(diff, zero_method='wilcox').pvalue)
    return out


def compare(results_dir: str, trainers: list[str], plans: str = 'nnUNetPlans', configuration: str = '3d_fullres',
            folds: list[int] | None = None, baseline: str | None = None, metric: str = 'Dice') -> dict:
    """The comparison as a JSON-ready dict (see module doc). ``baseline`` defaults to ``trainers[0]``."""
    folds = list(range(5)) if folds is None else folds
    baseline = baseline or trainers[0]
    names = trainers if baseline in trainers else [baseline, *trainers]
    results = {t: load_trainer_results(results_dir, t, plans, configuration, folds) for t in names}
    _check_comparable(results, metric)
    report: dict = {'results_dir': results_dir, 'plans': plans, 'configuration': configuration, 'folds': folds,
                    'metric': metric, 'baseline': baseline, 'trainers': {}}
    base_scores = {c: case_score(m, metric) for c, m in results[baseline].per_case.items()}
    for t, res in results.items():
        labels = sorted(_labels(res), key=_label_key)
        per_class = {}
        for lab in labels:
            if res.fold_means:
                mean, std, n = _mean_std([fm[lab].get(metric, math.nan) for fm in res.fold_means.values()
                                          if lab in fm])
            else:  # pooled cross-validation summary only: spread over cases
                mean, std, n = _mean_std([m[lab].get(metric, math.nan) for m in res.per_case.values() if lab in m])
            per_class[lab] = {'mean': mean, 'std': std, 'n': n}
        scores = {c: case_score(m, metric) for c, m in res.per_case.items()}
        fg = _mean_std([ff.get(metric, math.nan) for ff in res.fold_foreground.values()]
                       if res.fold_foreground else list(scores.values()))
        entry = {'folder': res.folder, 'source': res.source, 'folds_found': sorted(res.fold_means),
                 'missing_folds': res.missing_folds, 'n_cases': len(res.per_case), 'per_class': per_class,
                 'foreground_mean': {'mean': fg[0], 'std': fg[1], 'n': fg[2]}, 'per_case': scores}
        if t != baseline:
            entry['vs_baseline'] = paired_comparison(scores, base_scores)
        report['trainers'][t] = entry
    return report


def _labels(res: TrainerResults) -> set[str]:
    return ({lab for fm in res.fold_means.values() for lab in fm} |
            {lab for m in res.per_case.values() for lab in m})


def _check_comparable(results: dict[str, TrainerResults], metric: str) -> None:
    """Raises :class:`CompareError` if ``metric`` is in no summary or the trainers' label sets differ."""
    found = {t: r for t, r in results.items() if r.per_case}
    metrics = {k for r in found.values() for m in r.per_case.values() for lab in m.values() for k in lab}
    if found and metric not in metrics:
        raise CompareError(f"metric '{metric}' is not in the summaries; they have: {', '.join(sorted(metrics))} "
                           f"(pass one of them with --metric)")
    label_sets = {t: sorted(_labels(r), key=_label_key) for t, r in found.items()}
    if len({tuple(v) for v in label_sets.values()}) > 1:
        listed = '; '.join(f'{t}: {v}' for t, v in label_sets.items())
        raise CompareError(f'the trainers were evaluated on different label sets ({listed}): their means and '
                           f'per-case pairs are not comparable. Compare results of the same dataset version and '
                           f'labels (re-run nnUNetv2_train --val on the current dataset, or compare each group '
                           f'separately with -tr)')


def _label_key(label: str):
    return (0, int(label)) if label.isdigit() else (1, label)


def _fmt(stat: dict) -> str:
    if stat['n'] == 0:
        return 'n/a'
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def format_markdown(report: dict) -> str:
    metric = report['metric']
    labels = sorted({lab for e in report['trainers'].values() for lab in e['per_class']}, key=_label_key)
    lines = [f"{metric} per class, mean ± std over folds ({report['configuration']}, plans {report['plans']}); "
             f"paired per-case comparison against {report['baseline']}.", '',
             '| trainer | folds | ' + ' | '.join(f'label {lab}' for lab in labels) +
             ' | foreground mean | wins/losses/ties | mean Δ | Wilcoxon p |',
             '|---|---|' + '---:|' * (len(labels) + 4)]
    for t, e in report['trainers'].items():
        vs = e.get('vs_baseline')
        paired = (f"{vs['wins']}/{vs['losses']}/{vs['ties']} | {vs['mean_difference']:+.4f} | {vs['wilcoxon_p']:.3g}"
                  if vs else 'baseline | | ')
        folds = f"{len(e['folds_found'])}" if e['source'] == 'folds' else f"pooled ({e['source']})"
        lines.append(f"| {t} | {folds} | " + ' | '.join(_fmt(e['per_class'][lab]) if lab in e['per_class'] else 'n/a'
                                                  for lab in labels) + f" | {_fmt(e['foreground_mean'])} | {paired} |")
    missing = [f"- {t}: missing folds {e['missing_folds']}" for t, e in report['trainers'].items() if e['missing_folds']]
    if missing:
        lines += ['', 'Missing results (not counted above):', *missing]
    return '\n'.join(lines) + '\n'


def plot_boxes(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(report['trainers'])
    data = [[v for v in report['trainers'][t]['per_case'].values() if not math.isnan(v)] for t in names]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha='right', fontsize=8)
    ax.set_ylabel(f"per-case foreground mean {report['metric']}")
    ax.set_title(f"{report['configuration']} cross-validation, {report['plans']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
