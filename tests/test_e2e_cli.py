"""End to end through nnU-Net's real commands, in a clean environment (only the startup hook registers us):
plan_and_preprocess -> train (a user's subclass of nnUNetTrainerLightDecoder from the user's own
nnUNet_extTrainer folder) -> train --c (resume) -> predict -> evaluate_folder."""
import json
import os
import textwrap

import torch

from nnunetv2_ext.demo.dataset import write_dataset
from nnunetv2_ext.demo.pipeline import foreground_dice, nnunet_command, nnunet_env, run_step, write_small_plans

DATASET_ID = 988
TRAINER = 'nnUNetTrainerLightDecoder_E2ETiny'

USER_TRAINER = textwrap.dedent('''
    import os
    import torch
    from nnunetv2_ext.trainers import nnUNetTrainerLightDecoder


    class nnUNetTrainerLightDecoder_E2ETiny(nnUNetTrainerLightDecoder):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(os.environ['E2E_EPOCHS'])
            self.num_iterations_per_epoch = 3
            self.num_val_iterations_per_epoch = 1
''')


def test_stock_cli_pipeline_with_user_subclass(tmp_path):
    user_dir = tmp_path / 'user_trainers'
    user_dir.mkdir()
    (user_dir / 'my_e2e_trainers.py').write_text(USER_TRAINER)
    base = {k: v for k, v in os.environ.items() if k in ('PATH', 'HOME', 'LANG', 'TMPDIR', 'PYTHONPATH')}
    base.update(nnUNet_extTrainer=str(user_dir), nnUNet_compile='f', nnUNet_n_proc_DA='1', nnUNet_def_n_proc='1',
                OMP_NUM_THREADS='2')
    env = nnunet_env(str(tmp_path), base)
    logs = tmp_path / 'logs'
    logs.mkdir()

    raw = write_dataset(env['nnUNet_raw'], DATASET_ID, 'E2E', num_train=5, num_test=2, shape=(16, 24, 24))
    run_step(nnunet_command('nnUNetv2_plan_and_preprocess') + ['-d', str(DATASET_ID), '-c', '3d_fullres',
                                                                '-np', '1', '-npfp', '1'], env, str(logs / 'plan.log'))
    preprocessed = os.path.join(env['nnUNet_preprocessed'], 'Dataset988_E2E')
    plans = write_small_plans(preprocessed, target='nnUNetTinyPlans', base_features=4, max_features=16)
    train = nnunet_command('nnUNetv2_train') + [str(DATASET_ID), '3d_fullres', '0', '-tr', TRAINER, '-p', plans,
                                                '-device', 'cpu']
    run_step(train, {**env, 'E2E_EPOCHS': '1'}, str(logs / 'train1.log'))
    fold = os.path.join(env['nnUNet_results'], 'Dataset988_E2E', f'{TRAINER}__{plans}__3d_fullres', 'fold_0')
    ckpt = torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert ckpt['trainer_name'] == TRAINER and ckpt['current_epoch'] == 1
    assert any(k.startswith('decoder.blocks.') for k in ckpt['network_weights'])

    # --c: continue from the checkpoint to a longer schedule; epoch 0 must not run again
    run_step(train + ['--c'], {**env, 'E2E_EPOCHS': '2'}, str(logs / 'train2.log'))
    resumed_log = (logs / 'train2.log').read_text()
    assert 'Epoch 1' in resumed_log and 'Epoch 0' not in resumed_log
    ckpt = torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert ckpt['current_epoch'] == 2
    with open(os.path.join(fold, 'validation', 'summary.json')) as f:
        assert 'foreground_mean' in json.load(f)
    # the user's folder was searched first and ours was appended by the startup hook
    assert f'Searching in: {user_dir}' in resumed_log

    out = str(tmp_path / 'pred')
    run_step(nnunet_command('nnUNetv2_predict') + ['-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d',
                                                   str(DATASET_ID), '-c', '3d_fullres', '-tr', TRAINER, '-p', plans,
                                                   '-f', '0', '--disable_tta', '-device', 'cpu', '-npp', '1', '-nps',
                                                   '1'], env, str(logs / 'predict.log'))
    assert sorted(f for f in os.listdir(out) if f.endswith('.nii.gz')) == ['e2e_ts_000.nii.gz', 'e2e_ts_001.nii.gz']
    run_step(nnunet_command('nnUNetv2_evaluate_folder') + [os.path.join(raw, 'labelsTs'), out, '-djfile',
                                                           os.path.join(out, 'dataset.json'), '-pfile',
                                                           os.path.join(out, 'plans.json')], env,
             str(logs / 'evaluate.log'))
    mean, per_class = foreground_dice(os.path.join(out, 'summary.json'))
    assert set(per_class) == {'1', '2'}
    assert all(0.0 <= d <= 1.0 for d in [mean, *per_class.values()])
