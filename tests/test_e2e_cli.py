"""End to end through nnU-Net's real commands, in a clean environment (only the startup hook registers us):
plan_and_preprocess -> train (a user's subclass of nnUNetTrainerLightDecoder from the user's own
nnUNet_extTrainer folder) -> train --c (resume) -> predict -> evaluate_folder."""
import json
import os
import textwrap

from cli_runner import TinyCLIRun

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
    run = TinyCLIRun(tmp_path, 'my_e2e_trainers', USER_TRAINER, DATASET_ID, 'E2E', (16, 24, 24), num_test=2,
                     threads='2')
    plans = run.plan(target='nnUNetTinyPlans', base_features=4, max_features=16)
    run.train(TRAINER, plans, 'train1', E2E_EPOCHS='1')
    ckpt = run.checkpoint(TRAINER, plans)
    assert ckpt['trainer_name'] == TRAINER and ckpt['current_epoch'] == 1
    assert any(k.startswith('decoder.blocks.') for k in ckpt['network_weights'])

    # --c: continue from the checkpoint to a longer schedule; epoch 0 must not run again
    resumed_log = run.train(TRAINER, plans, 'train2', resume=True, E2E_EPOCHS='2')
    assert 'Epoch 1' in resumed_log and 'Epoch 0' not in resumed_log
    assert run.checkpoint(TRAINER, plans)['current_epoch'] == 2
    with open(os.path.join(run.fold_dir(TRAINER, plans), 'validation', 'summary.json')) as f:
        assert 'foreground_mean' in json.load(f)
    # the user's folder was searched first and ours was appended by the startup hook
    assert f'Searching in: {run.user_dir}' in resumed_log

    out, predicted = run.predict(TRAINER, plans)
    assert predicted == ['e2e_ts_000.nii.gz', 'e2e_ts_001.nii.gz']
    mean, per_class = run.evaluate(out)
    assert set(per_class) == {'1', '2'}
    assert all(0.0 <= d <= 1.0 for d in [mean, *per_class.values()])
