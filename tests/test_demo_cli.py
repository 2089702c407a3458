"""The README's main job, `nnunetv2-ext demo`, on the smallest settings: every step runs and the table is written."""
import json
import os
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k in ('PATH', 'HOME', 'LANG', 'TMPDIR', 'PYTHONPATH')}
    env['OMP_NUM_THREADS'] = '2'
    work = tmp_path / 'demo'
    run = subprocess.run([sys.executable, '-m', 'nnunetv2_ext.cli', 'demo', '--work-dir', str(work), '--epochs', '1',
                          '--iterations', '2', '--num-train', '5', '--device', 'cpu'], env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '[9/9] nnUNetv2_evaluate_folder nnUNetTrainerLightDecoder_ExtDemo' in run.stdout
    # progress of the long steps after training: final validation and prediction
    assert 'Mean Validation Dice' in run.stdout and 'done with extdemo_ts_000' in run.stdout
    assert '| ours (nnUNetTrainerLightDecoder) |' in run.stdout and '| nnU-Net (nnUNetTrainer) |' in run.stdout
    rows = json.loads((work / 'demo_results.json').read_text())
    assert [r['trainer'] for r in rows] == ['nnUNetTrainer_ExtDemo', 'nnUNetTrainerLightDecoder_ExtDemo']
    for r in rows:
        assert set(r['dice']) == {'1', '2'} and 0 <= r['mean_dice'] <= 1 and r['params'] > 0 and r['train_s'] > 0
    assert (work / 'demo_results.md').read_text().startswith('| trainer |')
    assert len(os.listdir(work / 'predictions' / 'nnUNetTrainerLightDecoder_ExtDemo')) >= 4  # 4 test cases + json


def test_demo_refuses_too_few_training_cases(tmp_path):
    run = subprocess.run([sys.executable, '-m', 'nnunetv2_ext.cli', 'demo', '--work-dir', str(tmp_path),
                          '--num-train', '3'], capture_output=True, text=True)
    assert run.returncode == 1 and "5-fold split needs at least 5 training cases" in run.stdout
    assert 'Traceback' not in run.stdout + run.stderr


def test_step_logs_are_written_line_by_line_and_silence_is_reported(tmp_path):
    """`tail -f` on a step's log shows each line as it is printed; a silent step still says it is running."""
    from nnunetv2_ext.demo.pipeline import StepFailed, run_step

    log = tmp_path / 'step.log'
    seen_while_running = []
    child = 'import time; print("first line", flush=True); time.sleep(2); print("second line")'
    seconds = run_step([sys.executable, '-c', child], dict(os.environ), str(log),
                       on_quiet=lambda s: seen_while_running.append((round(s, 1), log.read_text())), quiet_s=0.3)
    assert seen_while_running and all(text == 'first line\n' for _, text in seen_while_running)
    assert seen_while_running[0][0] >= 0.3 and seconds >= 2
    assert log.read_text() == 'first line\nsecond line\n'
    import pytest
    with pytest.raises(StepFailed, match=f'exited with 3. Full log: {log}'):
        run_step([sys.executable, '-c', 'import sys; print("bad input"); sys.exit(3)'], dict(os.environ), str(log))


def test_dataset_rewrite_is_whole_and_a_silent_write_failure_is_caught(tmp_path, monkeypatch):
    """The demo's dataset is published as a whole: fewer cases leave no stale ones; an image that SimpleITK
    writes empty without an error (a full disk) is an OSError and the previous dataset stays complete."""
    import SimpleITK as sitk

    from nnunetv2_ext.demo.dataset import write_dataset

    root = write_dataset(str(tmp_path), num_train=7, num_test=1, shape=(8, 8, 8))
    assert write_dataset(str(tmp_path), num_train=5, num_test=1, shape=(8, 8, 8)) == root
    assert sorted(os.listdir(os.path.join(root, 'labelsTr'))) == [f'extdemo_tr_{i:03d}.nii.gz' for i in range(5)]
    before = {n: os.path.getsize(os.path.join(root, 'imagesTr', n)) for n in os.listdir(os.path.join(root, 'imagesTr'))}

    monkeypatch.setattr(sitk, 'WriteImage', lambda image, path: open(path, 'wb').close())
    import pytest
    with pytest.raises(OSError, match='could not write imagesTr/extdemo_tr_000_0000.nii.gz of .*Dataset987_ExtDemo '
                                      '.is the disk full'):
        write_dataset(str(tmp_path), num_train=6, num_test=1, shape=(8, 8, 8))
    assert {n: os.path.getsize(os.path.join(root, 'imagesTr', n)) for n in os.listdir(os.path.join(root, 'imagesTr'))} \
        == before and json.load(open(os.path.join(root, 'dataset.json')))['numTraining'] == 5
    assert os.listdir(tmp_path) == [os.path.basename(root)]
