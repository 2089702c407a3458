"""nnUNetTrainerGLSP through nnU-Net's real commands: plan_and_preprocess -> train (a user's subclass of
nnUNetTrainerGLSP) -> train --c (resume) -> predict, on CPU with tiny widths, for 3d_fullres and 2d."""
import json
import os
import textwrap

import pytest

from cli_runner import TinyCLIRun

DATASET_ID = {'3d_fullres': 986, '2d': 985}
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


@pytest.mark.parametrize('configuration', ['3d_fullres', '2d'])
def test_glsp_trains_resumes_and_predicts_through_the_cli(tmp_path, configuration):
    # the WKV kernels have their own tests; the PyTorch backend keeps this run free of a JIT build.
    # 16x32x32 is the smallest volume for which the 3-D planner makes 4 stages (the RWKV branch then reads
    # stage 2); its 32x32 slices give the 2d configuration 4 stages too
    run = TinyCLIRun(tmp_path, 'my_glsp_trainers', USER_TRAINER, DATASET_ID[configuration], 'GLSPCLI', (16, 32, 32),
                     threads='2', configuration=configuration, CUDA_WKV_BACKEND='torch')
    plans = run.plan(target='nnUNetGLSPTinyPlans', base_features=4, max_features=16)
    with open(os.path.join(run.env['nnUNet_preprocessed'], run.dataset, f'{plans}.json')) as f:
        planned = json.load(f)['configurations'][configuration]
    assert len(planned['patch_size']) == (2 if configuration == '2d' else 3)
    assert planned['architecture']['arch_kwargs']['n_stages'] >= 4

    run.train(TRAINER, plans, 'train1', E2E_EPOCHS='1')
    ckpt = run.checkpoint(TRAINER, plans)
    assert ckpt['trainer_name'] == TRAINER and ckpt['current_epoch'] == 1
    assert any(k.startswith('branch.glsp.0.mix.') for k in ckpt['network_weights'])
    dw_kernel = ckpt['network_weights']['branch.glsp.0.local.0.weight']  # depthwise conv of the first GLSP block
    assert dw_kernel.ndim == len(planned['patch_size']) + 2  # a 2-D network for 2d, a 3-D one for 3d_fullres

    resumed_log = run.train(TRAINER, plans, 'train2', resume=True, E2E_EPOCHS='2')
    assert 'Epoch 1' in resumed_log and 'Epoch 0' not in resumed_log
    assert run.checkpoint(TRAINER, plans)['current_epoch'] == 2

    _, predicted = run.predict(TRAINER, plans)
    assert predicted == ['glspcli_ts_000.nii.gz']
