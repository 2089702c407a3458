"""benchmarks/anatomy_benchmark.py: trainer specs with overrides become short-schedule subclasses that
nnU-Net's own trainer lookup finds (the training runs themselves are the benchmark, not a test)."""
import json
import os
import shutil

import pytest
import torch

import bench_scripts
from plans_factory import make_configuration, make_plans

from nnunetv2_ext.trainers.base import CrashSafeCheckpoints

@pytest.fixture(scope='module')
def bench():
    return bench_scripts.load('anatomy_benchmark')


def test_spec_names_and_overrides(bench):
    plain = bench.TrainerSpec('nnUNetTrainerGLSP')
    assert (plain.base, plain.overrides, plain.class_name, plain.label) == (
        'nnUNetTrainerGLSP', {}, 'nnUNetTrainerGLSP_Anatomy', 'nnUNetTrainerGLSP')
    ablation = bench.TrainerSpec('nnUNetTrainerGLSP_EncRefine:attn_weight=0,contrast_weight=0.5')
    assert ablation.overrides == {'attn_weight': 0, 'contrast_weight': 0.5}
    assert ablation.class_name == 'nnUNetTrainerGLSP_EncRefine__attn_weight0__contrast_weight0_5_Anatomy'
    assert ablation.label == 'nnUNetTrainerGLSP_EncRefine[attn_weight=0, contrast_weight=0.5]'


def test_a_plans_variant_keeps_the_trainer_class_and_names_its_own_folders(bench):
    resenc = bench.TrainerSpec('nnUNetTrainer@resenc_m')
    assert (resenc.base, resenc.variant, resenc.class_name, resenc.key, resenc.label) == (
        'nnUNetTrainer', 'resenc_m', 'nnUNetTrainer_Anatomy', 'nnUNetTrainer_Anatomy@resenc_m', 'nnUNetTrainer@resenc_m')
    tuned = bench.TrainerSpec('nnUNetTrainer:initial_lr=0.003@resenc_m')
    assert (tuned.overrides, tuned.key) == ({'initial_lr': 0.003}, 'nnUNetTrainer__initial_lr0_003_Anatomy@resenc_m')
    plain = bench.TrainerSpec('nnUNetTrainer')
    assert (plain.variant, plain.key) == ('', 'nnUNetTrainer_Anatomy')


def test_resenc_m_plans_are_nnunets_resenc_m_network_on_the_same_patch_and_widths(tmp_path):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_ext.demo.pipeline import as_resenc_m, write_small_plans

    cm = make_configuration([16, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                            [32, 64, 128, 256, 320])
    source = make_plans(cm, '3d_fullres')
    # as nnU-Net's default planner writes them: two convolutions per encoder and per decoder stage
    source['configurations']['3d_fullres']['architecture']['arch_kwargs'].update(n_conv_per_stage=[2] * 5,
                                                                                 n_conv_per_stage_decoder=[2] * 4)
    (tmp_path / 'nnUNetPlans.json').write_text(json.dumps(source))
    name = write_small_plans(str(tmp_path), target='nnUNetSmallResEncMPlans', base_features=4, max_features=16,
                             network=as_resenc_m)
    plans = json.loads((tmp_path / f'{name}.json').read_text())
    assert plans['plans_name'] == name == 'nnUNetSmallResEncMPlans'
    arch = plans['configurations']['3d_fullres']['architecture']
    kwargs = arch['arch_kwargs']
    assert arch['network_class_name'].endswith('.ResidualEncoderUNet') and 'n_conv_per_stage' not in kwargs
    # nnUNetPlannerResEncM's blocks per stage (1, 3, 4, 6, 6, ...) and one convolution per decoder stage
    assert (kwargs['n_blocks_per_stage'], kwargs['n_conv_per_stage_decoder']) == ([1, 3, 4, 6, 6], [1] * 4)
    assert kwargs['features_per_stage'] == [4, 8, 16, 16, 16]
    assert plans['configurations']['3d_fullres']['patch_size'] == [16, 32, 32]
    assert kwargs['strides'] == source['configurations']['3d_fullres']['architecture']['arch_kwargs']['strides']
    configuration = PlansManager(plans).get_configuration('3d_fullres')
    network = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, 1, 3)
    assert type(network).__name__ == 'ResidualEncoderUNet'
    blocks = [[m for m in stage.modules() if type(m).__name__ == 'StackedResidualBlocks'] for stage in
              network.encoder.stages]
    assert [len(b[0].blocks) for b in blocks] == [1, 3, 4, 6, 6]
    assert [len(stage.convs) for stage in network.decoder.stages] == [1] * 4


def test_only_trainers_that_build_the_plans_network_take_a_plans_variant(bench):
    from nnunetv2_ext import discovery
    discovery.register()
    assert bench.builds_plans_network('nnUNetTrainer') and bench.builds_plans_network('nnUNetTrainerNoDeepSupervision')
    assert not bench.builds_plans_network('nnUNetTrainerGLSP')  # builds its own network from the plans' widths
    assert not bench.builds_plans_network('nnUNetTrainerLightDecoder')


def test_a_resenc_m_spec_trains_predicts_and_costs_on_its_own_plans(bench, tmp_path):
    import argparse

    b = object.__new__(bench.Benchmark)  # the command lines only; no dataset, no training
    b.args = argparse.Namespace(device='cpu', epochs=3, iterations=5, base_features=4, max_features=8, no_cost=False)
    b.dataset_id, b.plans, b.results, b.work = 990, 'P', str(tmp_path / 'results'), str(tmp_path)
    b.variant_plans = {'': 'P', 'resenc_m': 'nnUNetSmallResEncMPlans'}
    b.ext = ['ext']
    plain, glsp, resenc = (bench.TrainerSpec(t) for t in ('nnUNetTrainer', 'nnUNetTrainerGLSP', 'nnUNetTrainer@resenc_m'))
    b.specs, b.baseline = [plain, glsp, resenc], plain
    calls = {}

    def step(name, cmd, pass_fds=()):
        calls[name] = cmd
        return 1.0

    b.step = step
    b.train(resenc, 0)
    b.train(plain, 0)
    b.predict_and_evaluate(resenc, [0], 'in', 'labels', 'test')
    train = calls['train_nnUNetTrainer_Anatomy@resenc_m_fold0']
    assert train[train.index('-p') + 1] == 'nnUNetSmallResEncMPlans' and train[train.index('-tr') + 1] == 'nnUNetTrainer_Anatomy'
    assert b.fold_dir(resenc, 0) == str(tmp_path / 'results' / 'nnUNetTrainer_Anatomy__nnUNetSmallResEncMPlans__3d_fullres' / 'fold_0')
    plain_train = calls['train_nnUNetTrainer_Anatomy_fold0']
    assert plain_train[plain_train.index('-p') + 1] == 'P'
    predict = calls['predict_nnUNetTrainer_Anatomy@resenc_m_test']
    assert predict[predict.index('-p') + 1] == 'nnUNetSmallResEncMPlans'
    assert predict[predict.index('-o') + 1] == str(tmp_path / 'predictions' / 'nnUNetTrainer_Anatomy@resenc_m' / 'test')
    assert b.compare_and_cost([0], 'res') is True
    compare = calls['compare']
    assert compare[compare.index('-tr') + 1:compare.index('-o')] == ['nnUNetTrainer_Anatomy', 'nnUNetTrainerGLSP_Anatomy']
    assert 'nnUNetTrainer@resenc_m left out (other plans)' in b.compare_note(True)
    cost = calls['benchmark_resenc_m']
    assert cost[cost.index('-p') + 1] == 'nnUNetSmallResEncMPlans' and cost[cost.index('-tr') + 1:cost.index('--device')] == ['nnUNetTrainer']
    assert cost[-1] == str(tmp_path / 'cost_resenc_m') and calls['benchmark'][-1] == str(tmp_path / 'cost')
    b.specs = [plain, resenc]  # the baseline alone on its plans: nothing to compare, and said so
    calls.clear()
    assert b.compare_and_cost([0], 'res') is False and 'compare' not in calls
    assert "not run: no other trainer on the baseline's plans (P)" in b.compare_note(False)


@pytest.mark.parametrize('text,message', [('bad name', 'bad trainer name'), ('T:attn', 'expected attr=value'),
                                          ('T:a=b c', 'expected a Python literal'), ('T:1a=2', 'attr=value'),
                                          ('T:num_epochs=9', "the schedule is the run's"),
                                          ('T@resenc_l', r"unknown plans variant '@resenc_l' in 'T@resenc_l': expected "
                                                         r"Base\[:attr=value,...\]@variant with the variant last, "
                                                         "one of @resenc_m"),
                                          ('T@resenc_m:a=1', "with the variant last")])
def test_bad_specs_say_what_is_wrong(bench, text, message):
    with pytest.raises(ValueError, match=message):
        bench.TrainerSpec(text)


def test_schedule_classes_are_found_by_nnunet_and_carry_schedule_and_overrides(bench, tmp_path, monkeypatch):
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    specs = [bench.TrainerSpec('nnUNetTrainer'),
             bench.TrainerSpec('nnUNetTrainerGLSP_EncRefine:boundary_weight=0,initial_lr=0.003')]
    paths = bench.write_schedule_modules(str(tmp_path), specs)
    assert sorted(os.path.basename(p) for p in paths) == sorted(s.class_name + '.py' for s in specs)
    monkeypatch.setenv('ANATOMY_EPOCHS', '3')
    monkeypatch.setenv('ANATOMY_ITERS', '7')
    monkeypatch.setenv('ANATOMY_THREADS', str(torch.get_num_threads()))
    cm = make_configuration([16, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], [4, 8, 16, 16])
    dataset_json = {'channel_names': {'0': 'x'}, 'labels': {'background': 0, 'a': 1}, 'numTraining': 5,
                    'file_ending': '.nii.gz'}
    for spec in specs:
        # exactly how nnUNetv2_train searches an nnUNet_extTrainer folder
        cls = recursive_find_python_class(str(tmp_path), spec.class_name, None, base_folder=str(tmp_path),
                                          cleanup_imports_from_base_folder=True)
        assert cls is not None and cls.__name__ == spec.class_name
        assert spec.base in [c.__name__ for c in cls.__mro__] and issubclass(cls, CrashSafeCheckpoints)
        trainer = cls(make_plans(cm, '3d_fullres'), '3d_fullres', 0, dataset_json, device=torch.device('cpu'))
        assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (3, 7, 5)
        assert trainer.save_every == 1  # a checkpoint_latest per epoch, written atomically: --c can resume
        assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] == (0, 1, 2)
        monkeypatch.setenv('ANATOMY_NO_MIRROR_AXIS', '2')  # left and right classes: never mirrored across
        assert trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()[3] == (0, 1)
        assert trainer.inference_allowed_mirroring_axes == (0, 1)  # saved in the checkpoint, used by predict
        monkeypatch.delenv('ANATOMY_NO_MIRROR_AXIS')
    assert cls.boundary_weight == 0 and cls.attn_weight == 0.1  # override set, other defaults kept
    assert trainer.initial_lr == 0.003  # a value nnU-Net's __init__ sets is overridden on the trainer


@pytest.fixture(scope='module')
def cohort_bench():
    return bench_scripts.load('cohort_benchmark')


def test_an_interrupted_fold_resumes_with_c_and_a_finished_one_is_reused(bench, tmp_path):
    import argparse

    b = object.__new__(bench.Benchmark)  # the fold logic only; no dataset, no training
    b.args = argparse.Namespace(device='cpu', epochs=3, iterations=5, base_features=4, max_features=8)
    b.dataset_id, b.plans, b.variant_plans, b.results = 990, 'P', {'': 'P'}, str(tmp_path)
    calls = []
    b.step = lambda name, cmd, pass_fds=(): calls.append((name, cmd)) or 12.0
    spec = bench.TrainerSpec('nnUNetTrainer')
    assert b.train(spec, 0) == 12.0 and '--c' not in calls[-1][1]  # fresh: trained, time recorded
    with open(os.path.join(b.fold_dir(spec, 0), bench.SCHEDULE_FILE)) as f:  # the schedule it was trained with
        assert json.load(f) == {'epochs': 3, 'iterations': 5, 'plans': 'P', 'base_features': 4, 'max_features': 8}
    os.makedirs(b.fold_dir(spec, 1))
    open(os.path.join(b.fold_dir(spec, 1), 'checkpoint_latest.pth'), 'w').close()
    with pytest.raises(SystemExit, match=r"fold_1 holds a training with schedule unknown \(FileNotFoundError: no "
                                         r"readable anatomy_schedule.json\), this run asks for .*delete that folder"):
        b.train(spec, 1)  # a checkpoint of unknown schedule is neither resumed nor reused
    shutil.copy(os.path.join(b.fold_dir(spec, 0), bench.SCHEDULE_FILE), b.fold_dir(spec, 1))
    assert b.train(spec, 1) is None  # interrupted: resumed, time of a split training not recorded
    assert calls[-1][0].endswith('_resumed') and calls[-1][1][-1] == '--c'
    for name in ('checkpoint_final.pth', os.path.join('validation', 'summary.json')):
        os.makedirs(os.path.dirname(os.path.join(b.fold_dir(spec, 1), name)), exist_ok=True)
        open(os.path.join(b.fold_dir(spec, 1), name), 'w').close()
    n = len(calls)
    assert b.train(spec, 1) is None and len(calls) == n  # finished: nothing runs again
    b.args.epochs = 30  # the same folder asked for with another schedule: refused, not reused
    with pytest.raises(SystemExit, match=r"fold_1 holds a training with schedule \{'epochs': 3, .*this run asks "
                                         r"for \{'epochs': 30,"):
        b.train(spec, 1)
    assert len(calls) == n


def test_a_fold_is_trained_by_one_run_at_a_time(bench, tmp_path):
    """A second driver asking for a fold that another one is training stops with a message instead of
    training the same folder twice; the lock goes with its holder (no stale lock after a kill)."""
    import argparse
    import fcntl

    b = object.__new__(bench.Benchmark)
    b.args = argparse.Namespace(device='cpu', epochs=3, iterations=5, base_features=4, max_features=8)
    b.dataset_id, b.plans, b.variant_plans, b.results = 990, 'P', {'': 'P'}, str(tmp_path)
    calls = []
    b.step = lambda name, cmd, pass_fds=(): calls.append(name) or 1.0
    spec = bench.TrainerSpec('nnUNetTrainer')
    os.makedirs(b.fold_dir(spec, 0))
    holder = open(os.path.join(b.fold_dir(spec, 0), bench.TRAIN_LOCK), 'a')  # another run, training fold 0
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(SystemExit, match=r"fold_0 is being trained by another run \(it holds "
                                         r"\.anatomy_train\.lock\): wait for that run, or give this one other -tr / -f"):
        b.train(spec, 0)
    assert calls == []
    holder.close()  # that run ended (or was killed): its lock is gone
    assert b.train(spec, 0) == 1.0 and calls == ['train_nnUNetTrainer_Anatomy_fold0']


def test_a_training_left_running_by_a_killed_driver_keeps_its_fold_locked(bench, tmp_path):
    """``kill -9`` of a driver: its ``nnUNetv2_train`` inherited the lock, so while it is still running (the
    supervisor stops it within a second; here it ignores SIGTERM, so it runs until the supervisor's SIGKILL 30 s
    later) a new driver cannot start a second training of the same folder; the lock goes with the child."""
    import fcntl
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / 'child.pid'
    child = f"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
            f"open({str(marker)!r} + '.tmp', 'w').write(str(os.getpid())); " \
            f"os.replace({str(marker)!r} + '.tmp', {str(marker)!r}); time.sleep(300)"
    driver = f"""
import argparse, os, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import bench_scripts
bench = bench_scripts.load('anatomy_benchmark')
bench.nnunet_command = lambda name: [sys.executable, '-c', {child!r}]  # stands in for nnUNetv2_train
b = object.__new__(bench.Benchmark)
b.args = argparse.Namespace(device='cpu', epochs=3, iterations=5, base_features=4, max_features=8)
b.dataset_id, b.plans, b.variant_plans, b.results = 990, 'P', {{'': 'P'}}, {str(tmp_path / 'results')!r}
b.env, b.logs = dict(os.environ), {str(tmp_path)!r}
b.train(bench.TrainerSpec('nnUNetTrainer'), 0)
"""
    proc = subprocess.Popen([sys.executable, '-c', driver])
    child_pid = None
    try:
        for _ in range(1200):  # up to 120 s (the driver imports nnU-Net)
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), f'the driver never started its training (exit {proc.poll()})'
        child_pid = int(marker.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        lock = tmp_path / 'results' / 'nnUNetTrainer_Anatomy__P__3d_fullres' / 'fold_0' / bench.TRAIN_LOCK
        with open(lock, 'a') as f:
            with pytest.raises(BlockingIOError):  # the training, still running, holds it
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.kill(child_pid, signal.SIGKILL)
            child_pid = None
            for _ in range(100):
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # gone with the training: not stale
                    break
                except BlockingIOError:
                    time.sleep(0.1)
            else:
                pytest.fail('the lock outlived the training that held it')
    finally:
        if proc.poll() is None:
            proc.kill()
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)


def test_mean_seconds_needs_every_fold_timed(bench):
    assert bench.mean_seconds([10.0, 20.0]) == 15.0
    assert bench.mean_seconds([10.0, None]) is None  # a fold trained in parts, or reused without a time
    assert bench.mean_seconds([]) is None


def test_held_out_subjects_rejects_a_subject_on_both_sides(cohort_bench, tmp_path):
    path = tmp_path / 'splits_final.json'
    path.write_text('[{"train": ["9861_0", "10021_0"], "val": ["12876_0", "12876_1"]},'
                    ' {"train": ["12876_0"], "val": ["9861_0", "10021_1"]}]')
    assert cohort_bench.held_out_subjects(str(path)) == [['12876'], ['9861', '10021']]
    path.write_text('[{"train": ["9861_0", "10021_0"], "val": ["9861_1"]}]')
    with pytest.raises(ValueError, match=r"fold 0 has subjects \['9861'\] in both"):
        cohort_bench.held_out_subjects(str(path))


def test_results_table_statistics_over_held_out_subjects(cohort_bench):
    labels = [str(i) for i in range(1, 17)]
    base = {'a': {lab: 0.5 for lab in labels}, 'b': {lab: 0.7 for lab in labels}}
    better = {'a': {lab: 0.6 for lab in labels}, 'b': {lab: 0.8 for lab in labels}}
    better['b']['16'] = float('nan')  # class absent in reference and prediction: no pair
    table, paired = cohort_bench.results_table({'base': base, 'new': better}, 'base', {'base': 60.0, 'new': None})
    assert paired['new']['n_cases'] == 31 and paired['new']['wins'] == 31
    assert paired['new']['mean_difference'] == pytest.approx(0.1)
    assert '| left_cortex | 0.600 ± 0.141 | 0.700 ± 0.141 |' in table
    assert '| right_amygdala | 0.600 ± 0.141 | 0.600 |' in table  # the NaN is left out, not counted as 0
    assert '| base | | baseline | | | | | | | 60 |' in table
    p = f"{paired['new']['wilcoxon_p']:.3g}"
    assert f'| new | 31 | 31/0/0 | +0.1000 | {p} | 31 | 31/0/0 | +0.1000 | {p} | — |' in table  # all learned
    assert '| classes with Dice > 0.05 (a, b) | 16/16, 16/16 | 16/16, 15/15 |' in table  # NaN: not present
    base['a']['3'] = 0.05  # not above the threshold: not learned by the baseline
    base['a']['4'] = 0.0
    better['a']['4'] = 0.9  # the only large gain is on a class the baseline missed
    table, paired = cohort_bench.results_table({'base': base, 'new': better}, 'base', {})
    assert '| classes with Dice > 0.05 (a, b) | 14/16, 16/16 |' in table
    assert paired['new']['n_cases'] == 31 and paired['new']['mean_difference'] == pytest.approx((29 * 0.1 + 0.55 + 0.9) / 31)
    learned = paired['new']['where_baseline_learned']
    assert (learned['n_cases'], learned['wins']) == (29, 29) and learned['mean_difference'] == pytest.approx(0.1)
    assert f"| new | 31 | 31/0/0 | {paired['new']['mean_difference']:+.4f} | " in table
    assert f"| 29 | 29/0/0 | +0.1000 | {learned['wilcoxon_p']:.3g} | — |" in table
    better['b']['5'] = 0.0  # a class the candidate misses is kept: the subset is the baseline's, not both
    _, paired = cohort_bench.results_table({'base': base, 'new': better}, 'base', {})
    learned = paired['new']['where_baseline_learned']
    assert (learned['n_cases'], learned['wins'], learned['losses']) == (29, 28, 1)
    assert learned['mean_difference'] == pytest.approx((28 * 0.1 - 0.7) / 29)


@pytest.mark.parametrize('codes_axis,transpose,expected', [(0, [0, 1, 2], 2), (0, [2, 0, 1], 0), (1, [0, 1, 2], 1),
                                                         (2, [1, 2, 0], 2)])
def test_left_right_axis_in_nnunet_array_order(cohort_bench, tmp_path, codes_axis, transpose, expected):
    import json

    import nibabel as nib
    import numpy as np
    affine = np.eye(4)[[1, 2, 0, 3]] if codes_axis == 1 else (np.eye(4)[[2, 0, 1, 3]] if codes_axis == 2 else np.eye(4))
    affine[0, codes_axis] = -1.0  # world x (left-right) along NIfTI voxel axis codes_axis
    (tmp_path / 'labelsTr').mkdir()
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.uint8), affine), str(tmp_path / 'labelsTr' / 'a.nii.gz'))
    assert nib.aff2axcodes(affine)[codes_axis] in ('L', 'R')
    plans = tmp_path / 'plans.json'
    plans.write_text(json.dumps({'image_reader_writer': 'SimpleITKIO', 'transpose_forward': transpose}))
    assert cohort_bench.left_right_axis(str(tmp_path), str(plans)) == expected
    plans.write_text(json.dumps({'image_reader_writer': 'NibabelIO', 'transpose_forward': transpose}))
    with pytest.raises(ValueError, match='expected SimpleITKIO'):
        cohort_bench.left_right_axis(str(tmp_path), str(plans))


def test_learning_table_reads_validation_and_pseudo_dice_curves(bench, cohort_bench, tmp_path):
    """Every class learned in every fold? The final validation's worst class and nnU-Net's pseudo Dice per
    epoch, parsed from its training logs (numpy-scalar and plain formats; a resumed run's second log)."""
    import json
    fold = tmp_path / 'fold_0'
    (fold / 'validation').mkdir(parents=True)
    per_class = {str(i): {'Dice': 0.5} for i in range(1, 17)}
    per_class['7'] = {'Dice': 0.125}  # the left accumbens area learned least
    per_class['16'] = {'Dice': float('nan')}  # absent from every validation case and prediction
    (fold / 'validation' / 'summary.json').write_text(json.dumps(
        {'foreground_mean': {'Dice': 0.4766}, 'mean': per_class}))
    (fold / 'training_log_2026_11_30_10_00_00.txt').write_text(
        'x: Epoch 0\nx: Pseudo dice [np.float32(0.0), np.float32(0.2)]\n'
        'x: Pseudo dice [np.float32(nan), np.float32(0.4)]\n')
    (fold / 'training_log_2026_11_30_11_00_00.txt').write_text('x: Pseudo dice [0.6, 0.8]\n')
    assert cohort_bench.pseudo_dice_curve(str(fold)) == [[0.0, 0.2], [pytest.approx(float('nan'), nan_ok=True), 0.4],
                                                         [0.6, 0.8]]
    test = tmp_path / 'test_summary.json'
    test.write_text(json.dumps({'metric_per_case': [
        {'reference_file': '/x/labelsTs/9861_t1.nii.gz', 'metrics': {'1': {'Dice': 0.25}, '2': {'Dice': float('nan')}}}]}))
    record = cohort_bench.fold_record({'epochs': 1}, bench.TrainerSpec('T'), 0, ['9861'], str(fold), str(test),
                                      12.5, 'cpu')
    assert record['pseudo_dice'][1][0] is None  # NaN (class absent) stored as JSON null
    assert record['validation']['per_class']['16'] is None and record['validation']['per_class']['7'] == 0.125
    assert record['test_dice'] == {'9861': {'1': 0.25, '2': None}} and record['train_s'] == 12.5
    json.dumps(record, allow_nan=False)  # valid JSON
    table = cohort_bench.learning_table([record])
    assert '| T | 0 | 0.477 | left_accumbensarea (0.125) | 0.100 / 0.400 / 0.700 | n/a | 3 |' in table
    # classes above 0.05 pseudo Dice at a quarter, half and the end of 8 epochs; every class first at epoch 6
    record['pseudo_dice'] = [[0.0, 0.0], [0.1, None], [0.0, 0.01], [0.2, 0.0], [0.3, 0.04], [0.3, 0.06],
                             [0.01, 0.5], [0.4, 0.6]]
    assert '| 1/2 / 1/2 / 2/2 | 6 |' in cohort_bench.learning_table([record])
    record['pseudo_dice'][-1] = [0.4, 0.05]  # not above the threshold at the end
    assert '| 1/2 / 1/2 / 1/2 | 6 |' in cohort_bench.learning_table([record])
    record['pseudo_dice'][5] = [0.3, 0.0]
    assert '| never |' in cohort_bench.learning_table([record])
    png = tmp_path / 'curves.png'
    cohort_bench.plot_curves([record, dict(record, trainer='U', fold=1)], str(png))
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and not list(tmp_path.glob('.curves.png.partial*'))


def test_fold_records_are_reused_and_other_settings_are_refused(bench, cohort_bench, tmp_path):
    spec = bench.TrainerSpec('nnUNetTrainer')
    records = cohort_bench.FoldRecords(str(tmp_path / 'rec'), lambda spec: {'epochs': 100, 'spacing': 4.0})
    assert records.get(spec, 0, ['9861']) is None
    records.put(spec, 0, {'settings': {'epochs': 100, 'spacing': 4.0}, 'held_out': ['9861'], 'fold': 0})
    assert records.get(spec, 0, ['9861'])['fold'] == 0
    other = cohort_bench.FoldRecords(str(tmp_path / 'rec'), lambda spec: {'epochs': 20, 'spacing': 4.0})
    with pytest.raises(SystemExit, match=r"fold_0.json: recorded with other settings \(epochs: recorded 100, here "
                                         r"20\); use another --records folder"):
        other.get(spec, 0, ['9861'])
    with pytest.raises(SystemExit, match=r"\(held_out: recorded \['9861'\], here \['14380'\]\)"):
        records.get(spec, 0, ['14380'])  # the same fold number of a dataset split otherwise
    path = tmp_path / 'rec' / 'nnUNetTrainer_Anatomy' / 'fold_0.json'
    for broken in ('{"settings": ', '[1, 2]', '{"fold": 0}'):  # truncated, not an object, no settings
        path.write_text(broken)
        with pytest.raises(SystemExit, match='unreadable fold record .*delete it to train and predict that fold'):
            records.get(spec, 0, ['9861'])


def test_an_existing_dataset_built_otherwise_is_refused(cohort_bench, tmp_path):
    from nnunetv2_ext import cohort
    wanted = cohort.build_parameters(['9861', '14380'], 3, 2, 2.0, 0)
    (tmp_path / 'dataset.json').write_text(json.dumps({'name': 'DKCohort', 'cohort': wanted}))
    assert cohort_bench.dataset_parameters(str(tmp_path), wanted) == wanted
    with pytest.raises(SystemExit, match=r"built with cases_per_subject=3, spacing_mm=2.0, this run asks for "
                                         r"cases_per_subject=8, spacing_mm=4.0: pass the options it was built with"):
        cohort_bench.dataset_parameters(str(tmp_path), cohort.build_parameters(['9861', '14380'], 8, 2, 4.0, 0))
    (tmp_path / 'dataset.json').write_text(json.dumps({'name': 'DKCohort'}))  # written by an older version
    with pytest.raises(SystemExit, match=r"built with cases_per_subject=None, folds=None, seed=None, spacing_mm=None"):
        cohort_bench.dataset_parameters(str(tmp_path), wanted)


def test_cohort_benchmark_end_to_end_on_two_toy_subjects(cohort_bench, tmp_path):
    """A handful of iterations through the real nnU-Net commands; checks the wiring, not the accuracy."""
    import json

    from nnunetv2_ext import cohort
    from toy_cohort import write_toy_abagen

    work = tmp_path / 'work'
    cohort.write_cohort(str(work / 'nnUNet_raw'), str(work / 'nnUNet_preprocessed'), donors=['9861', '14380'],
                        cases_per_subject=3, n_folds=2, spacing=2.0, dataset_id=cohort_bench.DATASET_ID,
                        source=write_toy_abagen(str(tmp_path / 'abagen')))
    options = ['--work-dir', str(work), '-tr', 'nnUNetTrainer', 'nnUNetTrainerLightDecoder',
               'nnUNetTrainer@resenc_m', '-f', '0', '--epochs',
               '1', '--iterations', '2', '--base-features', '4', '--max-features', '8', '--no-cost', '--subjects',
               '9861', '14380', '--cases-per-subject', '3', '--subject-folds', '2', '--spacing', '2']
    assert cohort_bench.main(options) == 0
    result = json.loads((work / 'cohort_results.json').read_text())
    assert result['held_out'] == {'0': ['9861']}
    record = json.loads((work / 'records' / 'nnUNetTrainer_Anatomy' / 'fold_0.json').read_text())
    assert record['settings'] == {'dataset': cohort.build_parameters(['9861', '14380'], 3, 2, 2.0, 0), 'epochs': 1,
                                  'iterations': 2, 'plans': 'nnUNetSmallPlans', 'base_features': 4, 'max_features': 8}
    assert len(record['pseudo_dice']) == 1 and record['held_out'] == ['9861'] and record['device'] == 'cpu'
    assert sorted(result['test_dice']) == ['nnUNetTrainer', 'nnUNetTrainer@resenc_m', 'nnUNetTrainerLightDecoder']
    # nnU-Net's ResEnc-M baseline: the stock trainer on the same narrowed plans with nnU-Net's residual encoder
    resenc = json.loads((work / 'records' / 'nnUNetTrainer_Anatomy@resenc_m' / 'fold_0.json').read_text())
    assert resenc['trainer'] == 'nnUNetTrainer@resenc_m' and resenc['settings'] == {
        **record['settings'], 'plans': 'nnUNetSmallResEncMPlans'}
    trained = work / 'nnUNet_results' / cohort_bench.DATASET / 'nnUNetTrainer_Anatomy__nnUNetSmallResEncMPlans__3d_fullres'
    assert json.loads((trained / 'plans.json').read_text())['configurations']['3d_fullres']['architecture'][
        'network_class_name'].endswith('.ResidualEncoderUNet')
    assert (trained / 'fold_0' / 'checkpoint_final.pth').is_file()
    assert 'plans nnUNetSmallPlans (nnUNetSmallResEncMPlans for @resenc_m)' in (work / 'cohort_results.md').read_text()
    assert list(result['test_dice']['nnUNetTrainer']) == ['9861']  # the held-out subject only, by its own fold
    assert sorted(result['test_dice']['nnUNetTrainer']['9861'], key=int) == [str(i) for i in range(1, 17)]
    assert 0 < result['paired']['nnUNetTrainerLightDecoder']['n_cases'] <= 16
    assert os.listdir(work / 'test_inputs' / 'fold_0') == ['9861_t1_0000.nii.gz']
    assert 'left_cortex' in (work / 'cohort_results.md').read_text()
    assert (work / 'cohort_results_compare' / 'compare.md').is_file()
    assert (work / 'cohort_results_curves.png').read_bytes()[:4] == b'\x89PNG'
    # nnU-Net trained on the builder's subject-wise split, not on a random 5-fold split of its own
    assert 'Using splits from existing split file' in (work / 'logs' / 'train_nnUNetTrainer_Anatomy_fold0.log').read_text()
    # the folds' records alone rebuild the results, as for folds trained in another session: nothing is trained
    # or predicted again, and nnunetv2-ext compare (which needs nnU-Net's fold results) is left out
    records = work / 'records'
    assert sorted(os.listdir(records)) == ['nnUNetTrainerLightDecoder_Anatomy', 'nnUNetTrainer_Anatomy',
                                           'nnUNetTrainer_Anatomy@resenc_m']
    shutil.rmtree(work / 'nnUNet_results')
    shutil.rmtree(work / 'logs')
    assert cohort_bench.main(options + ['--name', 'again']) == 0
    assert not (work / 'nnUNet_results' / cohort_bench.DATASET).exists() and not (work / 'again_compare').exists()
    assert json.loads((work / 'again.json').read_text())['test_dice'] == result['test_dice']
    assert 'compare) not run: some folds were trained elsewhere' in (work / 'again.md').read_text()


@pytest.mark.parametrize('value', ['two', '0', '1.5'])
def test_a_bad_thread_count_stops_the_driver_before_any_step(bench, tmp_path, monkeypatch, capsys, value):
    monkeypatch.setenv('ANATOMY_THREADS', value)
    with pytest.raises(SystemExit):
        bench.main(['--work-dir', str(tmp_path / 'w'), '-tr', 'nnUNetTrainer'])
    assert f"ANATOMY_THREADS='{value}' is invalid: expected an integer in [1, 4096]" in capsys.readouterr().err
    assert os.listdir(tmp_path / 'w' / 'logs') == [] and os.listdir(tmp_path / 'w' / 'nnUNet_raw') == []  # no step ran


@pytest.mark.parametrize('value, passed', [(' ', None), (' 3 ', '3')])
def test_the_trainings_get_the_validated_thread_count(bench, tmp_path, monkeypatch, value, passed):
    """A blank value is unset for the driver, so it must be for the trainings too (they would fail on int(' '))."""
    monkeypatch.setenv('ANATOMY_THREADS', value)
    seen = {}

    def first_step(self, name, cmd, pass_fds=()):
        seen.update(self.env)
        raise RuntimeError('stop before the dataset is built')

    monkeypatch.setattr(bench.Benchmark, 'step', first_step)
    with pytest.raises(RuntimeError, match='stop before'):
        bench.main(['--work-dir', str(tmp_path / 'w'), '-tr', 'nnUNetTrainer'])
    assert seen.get('ANATOMY_THREADS') == passed
