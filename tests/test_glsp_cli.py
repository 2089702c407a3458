"""nnUNetTrainerGLSP through nnU-Net's real commands: plan_and_preprocess -> train (a user's subclass of
nnUNetTrainerGLSP) -> train --c (resume) -> predict, on CPU with tiny widths."""
import json
import os
import textwrap

import torch

from nnunetv2_ext.demo.dataset import write_dataset
from nnunetv2_ext.demo.pipeline import nnunet_command, nnunet_env, run_step, write_small_plans

DATASET_ID = 986
TRAINER = 'nnUNetTrainerGLSP_CLITiny'

USER_TRAINER = textwrap.dedent('''
    import os
    import torch
    from nnunetv2_ext.trainers import nnUNetTrainerGLSP


    class nnUNetTrainerGLSP_CLITiny(nnUNetTrainerGLSP):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = int(os.environ['E2E_EPOCHS'])
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            # smoke run: no mirroring, so the final validation predicts each case once, not 8 times
            rotation, dummy_2d, patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            self.inference_allowed_mirroring_axes = None
            return rotation, dummy_2d, patch_size, None
''')


def test_glsp_trains_resumes_and_predicts_through_the_cli(tmp_path):
    user_dir = tmp_path / 'user_trainers'
    user_dir.mkdir()
    (user_dir / 'my_glsp_trainers.py').write_text(USER_TRAINER)
    base = {k: v for k, v in os.environ.items() if k in ('PATH', 'HOME', 'LANG', 'TMPDIR')}
    # the WKV kernels have their own tests; the PyTorch backend keeps this run free of a JIT build
    base.update(nnUNet_extTrainer=str(user_dir), nnUNet_compile='f', nnUNet_n_proc_DA='1', nnUNet_def_n_proc='1',
                OMP_NUM_THREADS='2', CUDA_WKV_BACKEND='torch')
    env = nnunet_env(str(tmp_path), base)
    logs = tmp_path / 'logs'
    logs.mkdir()

    # 16x32x32 is the smallest volume for which the planner makes the 4 stages the RWKV branch needs
    raw = write_dataset(env['nnUNet_raw'], DATASET_ID, 'GLSPCLI', num_train=5, num_test=1, shape=(16, 32, 32))
    run_step(nnunet_command('nnUNetv2_plan_and_preprocess') + ['-d', str(DATASET_ID), '-c', '3d_fullres',
                                                                '-np', '1', '-npfp', '1'], env, str(logs / 'plan.log'))
    preprocessed = os.path.join(env['nnUNet_preprocessed'], f'Dataset{DATASET_ID}_GLSPCLI')
    plans = write_small_plans(preprocessed, target='nnUNetGLSPTinyPlans', base_features=4, max_features=16)
    with open(os.path.join(preprocessed, f'{plans}.json')) as f:
        assert json.load(f)['configurations']['3d_fullres']['architecture']['arch_kwargs']['n_stages'] >= 4

    train = nnunet_command('nnUNetv2_train') + [str(DATASET_ID), '3d_fullres', '0', '-tr', TRAINER, '-p', plans,
                                                '-device', 'cpu']
    run_step(train, {**env, 'E2E_EPOCHS': '1'}, str(logs / 'train1.log'))
    fold = os.path.join(env['nnUNet_results'], f'Dataset{DATASET_ID}_GLSPCLI', f'{TRAINER}__{plans}__3d_fullres',
                        'fold_0')
    ckpt = torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert ckpt['trainer_name'] == TRAINER and ckpt['current_epoch'] == 1
    assert any(k.startswith('branch.glsp.0.mix.') for k in ckpt['network_weights'])

    run_step(train + ['--c'], {**env, 'E2E_EPOCHS': '2'}, str(logs / 'train2.log'))
    resumed_log = (logs / 'train2.log').read_text()
    assert 'Epoch 1' in resumed_log and 'Epoch 0' not in resumed_log
    assert torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu',
                      weights_only=False)['current_epoch'] == 2

    out = str(tmp_path / 'pred')
    run_step(nnunet_command('nnUNetv2_predict') + ['-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d',
                                                   str(DATASET_ID), '-c', '3d_fullres', '-tr', TRAINER, '-p', plans,
                                                   '-f', '0', '--disable_tta', '-device', 'cpu', '-npp', '1', '-nps',
                                                   '1'], env, str(logs / 'predict.log'))
    assert sorted(f for f in os.listdir(out) if f.endswith('.nii.gz')) == ['glspcli_ts_000.nii.gz']
