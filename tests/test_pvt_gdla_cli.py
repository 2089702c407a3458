"""nnU-Net's real commands with a user's subclass of nnUNetTrainerPVTGDLA (``network_options``: tiny widths,
elliptical encoder attention): plan_and_preprocess -> train (1 epoch) -> predict, in a clean environment."""
import textwrap

from cli_runner import TinyCLIRun

DATASET_ID = 989
TRAINER = 'nnUNetTrainerPVTGDLA_CLITiny'

USER_TRAINER = textwrap.dedent('''
    import torch
    from nnunetv2_ext.trainers import nnUNetTrainerPVTGDLA


    class nnUNetTrainerPVTGDLA_CLITiny(nnUNetTrainerPVTGDLA):
        network_options = dict(attention='elliptical', embed_dims=(8, 16, 16, 16), depths=(2, 1, 1, 1),
                               num_heads=(1, 2, 2, 2), mlp_ratios=(2, 2, 2, 2), stem_channels=4, decoder_head_dim=8)

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1
''')


def test_cli_train_and_predict_with_pvt_gdla_subclass(tmp_path):
    # one thread: far faster than two on a shared, loaded 2-core machine
    run = TinyCLIRun(tmp_path, 'my_pvt_gdla_trainers', USER_TRAINER, DATASET_ID, 'PVTCLI', (16, 24, 24))
    plans = run.plan()
    run.train(TRAINER, plans)
    ckpt = run.checkpoint(TRAINER, plans)
    assert ckpt['trainer_name'] == TRAINER and ckpt['current_epoch'] == 1
    weights = ckpt['network_weights']
    assert any(k.startswith('decoder.blocks.') and k.endswith('.attn.main.lam') for k in weights)
    assert weights['encoder.stages.0.embed.proj.weight'].shape[0] == 8      # the variant's network_options
    assert [g['weight_decay'] for g in ckpt['optimizer_state']['param_groups']] == [0.05, 0.0]

    _, predicted = run.predict(TRAINER, plans)
    assert predicted == ['pvtcli_ts_000.nii.gz']
