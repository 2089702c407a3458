"""nnU-Net's real commands with a user's subclass of nnUNetTrainerPVTGDLA (tiny widths, elliptical encoder
attention): plan_and_preprocess -> train (1 epoch) -> predict, in a clean environment."""
import os
import textwrap

import torch

from nnunetv2_ext.demo.dataset import write_dataset
from nnunetv2_ext.demo.pipeline import nnunet_command, nnunet_env, run_step

DATASET_ID = 989
TRAINER = 'nnUNetTrainerPVTGDLA_CLITiny'

USER_TRAINER = textwrap.dedent('''
    import torch
    from nnunetv2_ext.networks.pvt_gdla import PVTGDLA
    from nnunetv2_ext.trainers import nnUNetTrainerPVTGDLA


    class nnUNetTrainerPVTGDLA_CLITiny(nnUNetTrainerPVTGDLA):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1

        @staticmethod
        def build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                       num_output_channels, enable_deep_supervision=True):
            return PVTGDLA.from_plans(configuration_manager, num_input_channels, num_output_channels,
                                      enable_deep_supervision, attention='elliptical', embed_dims=(8, 16, 16, 16),
                                      depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2),
                                      stem_channels=4, decoder_head_dim=8)
''')


def test_cli_train_and_predict_with_pvt_gdla_subclass(tmp_path):
    user_dir = tmp_path / 'user_trainers'
    user_dir.mkdir()
    (user_dir / 'my_pvt_gdla_trainers.py').write_text(USER_TRAINER)
    base = {k: v for k, v in os.environ.items() if k in ('PATH', 'HOME', 'LANG', 'TMPDIR')}
    base.update(nnUNet_extTrainer=str(user_dir), nnUNet_compile='f', nnUNet_n_proc_DA='1', nnUNet_def_n_proc='1',
                OMP_NUM_THREADS='1')  # one thread: far faster than two on a shared, loaded 2-core machine
    env = nnunet_env(str(tmp_path), base)
    logs = tmp_path / 'logs'
    logs.mkdir()

    raw = write_dataset(env['nnUNet_raw'], DATASET_ID, 'PVTCLI', num_train=5, num_test=1, shape=(16, 24, 24))
    run_step(nnunet_command('nnUNetv2_plan_and_preprocess') + ['-d', str(DATASET_ID), '-c', '3d_fullres',
                                                                '-np', '1', '-npfp', '1'], env, str(logs / 'plan.log'))
    run_step(nnunet_command('nnUNetv2_train') + [str(DATASET_ID), '3d_fullres', '0', '-tr', TRAINER, '-device', 'cpu'],
             env, str(logs / 'train.log'))
    fold = os.path.join(env['nnUNet_results'], 'Dataset989_PVTCLI', f'{TRAINER}__nnUNetPlans__3d_fullres', 'fold_0')
    ckpt = torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert ckpt['trainer_name'] == TRAINER and ckpt['current_epoch'] == 1
    assert any(k.startswith('decoder.blocks.') and k.endswith('.attn.main.lam') for k in ckpt['network_weights'])
    assert [g['weight_decay'] for g in ckpt['optimizer_state']['param_groups']] == [0.05, 0.0]

    out = str(tmp_path / 'pred')
    run_step(nnunet_command('nnUNetv2_predict') + ['-i', os.path.join(raw, 'imagesTs'), '-o', out, '-d',
                                                   str(DATASET_ID), '-c', '3d_fullres', '-tr', TRAINER, '-f', '0',
                                                   '--disable_tta', '-device', 'cpu', '-npp', '1', '-nps', '1'],
             env, str(logs / 'predict.log'))
    assert sorted(f for f in os.listdir(out) if f.endswith('.nii.gz')) == ['pvtcli_ts_000.nii.gz']
