"""``nnunetv2-ext compare`` on a hand-made results tree with hand-computed statistics."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from nnunetv2_ext.compare import CompareError, compare, format_markdown, paired_comparison

# per trainer, per fold: {case: (Dice label 1, Dice label 2)}
CASES = {
    'nnUNetTrainer': {0: {'c0': (0.80, 0.60), 'c1': (0.90, 0.70)}, 1: {'c2': (0.70, 0.50), 'c3': (0.60, 0.40)}},
    'nnUNetTrainerLightDecoder': {0: {'c0': (0.85, 0.65), 'c1': (0.90, 0.70)}, 1: {'c2': (0.75, 0.45),
                                                                              'c3': (0.70, 0.50)}},
}


def _write_tree(root, trainers=CASES, folds=(0, 1)):
    for trainer, per_fold in trainers.items():
        for f in folds:
            if f not in per_fold:
                continue
            cases = per_fold[f]
            entries = [{'metrics': {'1': {'Dice': d1, 'IoU': 0.0}, '2': {'Dice': d2, 'IoU': 0.0}},
                        'prediction_file': f'/x/{c}.nii.gz', 'reference_file': f'/gt/{c}.nii.gz'}
                       for c, (d1, d2) in cases.items()]
            mean = {lab: {'Dice': float(np.mean([v[i] for v in cases.values()])), 'IoU': 0.0}
                    for i, lab in enumerate(('1', '2'))}
            summary = {'foreground_mean': {'Dice': (mean['1']['Dice'] + mean['2']['Dice']) / 2, 'IoU': 0.0},
                       'mean': mean, 'metric_per_case': entries}
            d = root / f'{trainer}__nnUNetPlans__3d_fullres' / f'fold_{f}' / 'validation'
            d.mkdir(parents=True)
            (d / 'summary.json').write_text(json.dumps(summary))


def test_statistics_against_hand_computed_values(tmp_path):
    _write_tree(tmp_path)
    report = compare(str(tmp_path), ['nnUNetTrainer', 'nnUNetTrainerLightDecoder'], folds=[0, 1])
    base = report['trainers']['nnUNetTrainer']
    # label 1 fold means: 0.85 and 0.65 -> mean 0.75, sample std sqrt(0.02) = 0.141421...
    assert base['per_class']['1']['mean'] == pytest.approx(0.75)
    assert base['per_class']['1']['std'] == pytest.approx(math.sqrt(0.02))
    # foreground mean per fold: (0.85+0.65)/2 = 0.75 and (0.65+0.45)/2 = 0.55
    assert base['foreground_mean']['mean'] == pytest.approx(0.65)
    assert base['foreground_mean']['std'] == pytest.approx(math.sqrt(0.02))
    ours = report['trainers']['nnUNetTrainerLightDecoder']
    vs = ours['vs_baseline']
    # per-case foreground means: base c0 .70 c1 .80 c2 .60 c3 .50; ours .75 .80 .60 .60 -> +.05 0 0 +.10
    assert (vs['wins'], vs['losses'], vs['ties'], vs['n_cases']) == (2, 0, 2, 4)
    assert vs['mean_difference'] == pytest.approx(0.0375)
    from scipy.stats import wilcoxon
    assert vs['wilcoxon_p'] == pytest.approx(wilcoxon([0.05, 0.0, 0.0, 0.10], zero_method='wilcox').pvalue)
    md = format_markdown(report)
    assert '| nnUNetTrainerLightDecoder | 2 | 0.8000 ± 0.1061 |' in md
    assert '2/0/2 | +0.0375 |' in md


def test_paired_comparison_counts_and_identical_inputs():
    out = paired_comparison({'a': 0.9, 'b': 0.5, 'c': 0.7, 'x': 1.0}, {'a': 0.8, 'b': 0.6, 'c': 0.7, 'y': 0.1})
    assert (out['wins'], out['losses'], out['ties'], out['n_cases']) == (1, 1, 1, 3)
    same = paired_comparison({'a': 0.5}, {'a': 0.5})
    assert same['ties'] == 1 and math.isnan(same['wilcoxon_p'])


def test_missing_folds_are_reported(tmp_path):
    _write_tree(tmp_path)
    report = compare(str(tmp_path), ['nnUNetTrainer', 'nnUNetTrainerLightDecoder'], folds=[0, 1, 2])
    assert report['trainers']['nnUNetTrainer']['missing_folds'] == [2]
    assert 'nnUNetTrainer: missing folds [2]' in format_markdown(report)


def test_pooled_crossval_summary_is_used_when_no_fold_has_one(tmp_path):
    _write_tree(tmp_path)
    folder = tmp_path / 'nnUNetTrainer__nnUNetPlans__3d_fullres'
    pooled = folder / 'crossval_results_folds_0_1_2_3_4'
    pooled.mkdir()
    entries = []
    for f in (0, 1):
        entries += json.loads((folder / f'fold_{f}' / 'validation' / 'summary.json').read_text())['metric_per_case']
    (pooled / 'summary.json').write_text(json.dumps({'metric_per_case': entries, 'mean': {}, 'foreground_mean': {}}))
    report = compare(str(tmp_path), ['nnUNetTrainer'], folds=[3, 4])
    e = report['trainers']['nnUNetTrainer']
    assert e['source'] == os.path.join('crossval_results_folds_0_1_2_3_4', 'summary.json')
    assert e['n_cases'] == 4 and e['per_class']['1']['mean'] == pytest.approx(0.75)


def test_cli_writes_files_and_fails_clearly(tmp_path):
    results = tmp_path / 'results'
    _write_tree(results / 'Dataset555_Fake')
    env = {**os.environ, 'nnUNet_results': str(results), 'nnUNet_raw': str(tmp_path),
           'nnUNet_preprocessed': str(tmp_path)}
    cmd = [sys.executable, '-m', 'nnunetv2_ext.cli', 'compare', '-d', 'Dataset555_Fake', '-tr', 'nnUNetTrainer',
           'nnUNetTrainerLightDecoder', '-f', '0', '1', '-o', str(tmp_path / 'out')]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name in ('compare.json', 'compare.md', 'compare.png'):
        assert (tmp_path / 'out' / name).stat().st_size > 0
    bad = subprocess.run(cmd[:-2] + ['-tr', 'NoSuchTrainer'], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and 'no results for' in bad.stderr and 'run nnUNetv2_train first' in bad.stderr


def _cli(tmp_path, *extra):
    env = {**os.environ, 'nnUNet_results': str(tmp_path / 'results'), 'nnUNet_raw': str(tmp_path),
           'nnUNet_preprocessed': str(tmp_path)}
    cmd = [sys.executable, '-m', 'nnunetv2_ext.cli', 'compare', '-d', 'Dataset555_Fake', '-tr', 'nnUNetTrainer',
           'nnUNetTrainerLightDecoder', '-f', '0', '1', *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _summary(root, trainer='nnUNetTrainer', fold=0):
    return root / f'{trainer}__nnUNetPlans__3d_fullres' / f'fold_{fold}' / 'validation' / 'summary.json'


def test_malformed_summary_names_the_file_and_the_fix(tmp_path):
    root = tmp_path / 'results' / 'Dataset555_Fake'
    _write_tree(root)
    path = _summary(root)
    path.write_text(path.read_text()[:200])  # cut off while being written
    run = _cli(tmp_path, '-o', str(tmp_path / 'out'))
    assert run.returncode == 1 and 'Traceback' not in run.stderr
    assert f'{path} is not valid JSON' in run.stderr and '--val' in run.stderr
    assert not (tmp_path / 'out').exists()


def test_summary_without_metric_per_case_is_a_clear_error(tmp_path):
    _write_tree(tmp_path)
    path = _summary(tmp_path, 'nnUNetTrainerLightDecoder', 1)
    summary = json.loads(path.read_text())
    del summary['metric_per_case']
    path.write_text(json.dumps(summary))
    with pytest.raises(CompareError, match=rf"{path} has no 'metric_per_case': not a summary.json as nnU-Net"):
        compare(str(tmp_path), ['nnUNetTrainer', 'nnUNetTrainerLightDecoder'], folds=[0, 1])


def test_unknown_metric_lists_the_metrics_that_exist(tmp_path):
    _write_tree(tmp_path)
    with pytest.raises(CompareError, match="metric 'Dicey' is not in the summaries; they have: Dice, IoU"):
        compare(str(tmp_path), ['nnUNetTrainer', 'nnUNetTrainerLightDecoder'], folds=[0, 1], metric='Dicey')
    assert compare(str(tmp_path), ['nnUNetTrainer'], folds=[0, 1], metric='IoU')['metric'] == 'IoU'


def test_different_label_sets_are_refused(tmp_path):
    _write_tree(tmp_path)
    for fold in (0, 1):  # the candidate was evaluated on a dataset version with a third label
        path = _summary(tmp_path, 'nnUNetTrainerLightDecoder', fold)
        summary = json.loads(path.read_text())
        for entry in summary['metric_per_case']:
            entry['metrics']['3'] = {'Dice': 0.5, 'IoU': 0.3}
        summary['mean']['3'] = {'Dice': 0.5, 'IoU': 0.3}
        path.write_text(json.dumps(summary))
    with pytest.raises(CompareError, match=r"different label sets \(nnUNetTrainer: \['1', '2'\]; "
                                           r"nnUNetTrainerLightDecoder: \['1', '2', '3'\]\)"):
        compare(str(tmp_path), ['nnUNetTrainer', 'nnUNetTrainerLightDecoder'], folds=[0, 1])


def test_compare_json_is_strict_json(tmp_path):
    """Identical results give a NaN Wilcoxon p: it must be written as null, not as a bare NaN."""
    results = tmp_path / 'results' / 'Dataset555_Fake'
    _write_tree(results, {'nnUNetTrainer': CASES['nnUNetTrainer'], 'nnUNetTrainerLightDecoder': CASES['nnUNetTrainer']})
    run = _cli(tmp_path, '-o', str(tmp_path / 'out'))
    assert run.returncode == 0, run.stderr
    text = (tmp_path / 'out' / 'compare.json').read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f'non-standard JSON constant {c}'))
    assert report['trainers']['nnUNetTrainerLightDecoder']['vs_baseline']['wilcoxon_p'] is None


def test_output_folder_with_other_files_is_refused(tmp_path):
    _write_tree(tmp_path / 'results' / 'Dataset555_Fake')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    run = _cli(tmp_path, '-o', str(out))
    assert run.returncode == 1 and 'holds other files (notes.txt)' in run.stderr and '-o NEW_FOLDER' in run.stderr
    assert os.listdir(out) == ['notes.txt']
