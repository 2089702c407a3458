"""Fine-tuning as with stock nnU-Net: ``-pretrained_weights`` of a model with another class count.

nnU-Net's ``load_pretrained_weights`` transfers every parameter except those whose key contains
``.seg_layers.`` (the 1×1 segmentation layers), and asserts equal shapes for the rest.
"""
import json
import os
import textwrap

import pytest
import torch
from cli_runner import TinyCLIRun
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from plans_factory import make_configuration, make_trainer

import nnunetv2_ext.trainers as ours
from nnunetv2_ext.demo.pipeline import nnunet_command

PLANS = dict(patch_size=[16, 16, 16], strides=[[1, 1, 1]] + [[2, 2, 2]] * 3 + [[1, 1, 1]], features=[4, 8, 16, 16, 16])
PLANS_2D = dict(patch_size=[64, 64], strides=[[1, 1]] + [[2, 2]] * 5, features=[4, 8, 16, 16, 16, 16])  # timm's pvt_v2_b2


@pytest.fixture(autouse=True)
def _torch_wkv(monkeypatch):
    monkeypatch.setenv('CUDA_WKV_BACKEND', 'torch')  # only built here, never run


def _network(trainer_class, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cm = make_configuration(**(PLANS_2D if trainer_class is ours.nnUNetTrainerPVTGDLA_ImageNet else PLANS))
    trainer = make_trainer(trainer_class, cm)
    return trainer.build_network_architecture(trainer.plans_manager, cm, 1, num_classes, True)


@pytest.mark.parametrize('name, target_classes', [(n, 2) for n in ours.__all__ if n != 'nnUNetTrainerExtBase'] +
                         [('nnUNetTrainerLightDecoder', 3)])  # same class count: heads still not copied (stock)
def test_load_pretrained_weights_skips_exactly_the_segmentation_layers(tmp_path, name, target_classes):
    trainer_class = getattr(ours, name)
    source = _network(trainer_class, 3, seed=0)
    target = _network(trainer_class, target_classes, seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    path = str(tmp_path / 'source.pth')
    torch.save({'network_weights': source.state_dict()}, path)

    load_pretrained_weights(target, path)

    src, after = source.state_dict(), target.state_dict()
    seg = {k for k in after if '.seg_layers.' in k}
    assert seg and all(k.startswith('decoder.seg_layers.') for k in seg)
    for key, value in after.items():
        expected = before[key] if key in seg else src[key]  # heads keep their own init, as in stock nnU-Net
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    if target_classes != 3:  # only the segmentation layers depend on the class count
        assert {k for k in after if after[k].shape != src[k].shape} == seg


USER_TRAINER = textwrap.dedent('''
    import torch
    from nnunetv2_ext.trainers import nnUNetTrainerLightDecoder


    class nnUNetTrainerLightDecoder_FineTuneTiny(nnUNetTrainerLightDecoder):
        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 2
            self.num_val_iterations_per_epoch = 1

        def perform_actual_validation(self, save_probabilities=False):
            pass  # the full validation is tested in test_e2e_cli.py; here it would only add minutes
''')
TRAINER = 'nnUNetTrainerLightDecoder_FineTuneTiny'


def _merge_foreground_labels(raw: str) -> None:
    """Relabels a demo dataset to one foreground class (label 2 -> 1): a target task with another class count."""
    import SimpleITK as sitk

    for split in ('labelsTr', 'labelsTs'):
        for name in os.listdir(os.path.join(raw, split)):
            path = os.path.join(raw, split, name)
            image = sitk.ReadImage(path)
            merged = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 0).astype('uint8'))
            merged.CopyInformation(image)
            sitk.WriteImage(merged, path)
    with open(os.path.join(raw, 'dataset.json')) as f:
        dataset = json.load(f)
    dataset['labels'] = {'background': 0, 'foreground': 1}
    with open(os.path.join(raw, 'dataset.json'), 'w') as f:
        json.dump(dataset, f)


def _architecture(run: TinyCLIRun, plans: str) -> dict:
    with open(os.path.join(run.env['nnUNet_preprocessed'], run.dataset, f'{plans}.json')) as f:
        return json.load(f)['configurations']['3d_fullres']['architecture']


def test_cli_fine_tunes_the_light_decoder_to_another_class_count(tmp_path):
    (tmp_path / 'source').mkdir()
    (tmp_path / 'target').mkdir()
    source = TinyCLIRun(tmp_path / 'source', 'my_ft_trainers', USER_TRAINER, 990, 'FTSource', (16, 24, 24))
    target = TinyCLIRun(tmp_path / 'target', 'my_ft_trainers', USER_TRAINER, 991, 'FTTarget', (16, 24, 24))
    _merge_foreground_labels(target.raw)
    small = dict(target='nnUNetTinyPlans', base_features=4, max_features=16)
    plans = source.plan(**small)
    assert target.plan(**small) == plans and _architecture(source, plans) == _architecture(target, plans)
    source.train(TRAINER, plans)
    pretrained = os.path.join(source.fold_dir(TRAINER, plans), 'checkpoint_final.pth')

    log = target.run('finetune', nnunet_command('nnUNetv2_train') + [
        str(target.dataset_id), '3d_fullres', '0', '-tr', TRAINER, '-p', plans, '-device', 'cpu',
        '-pretrained_weights', pretrained])

    transferred = log.split('overlapping blocks', 1)[1].split('################### Done')[0]
    assert 'encoder.' in transferred and 'decoder.blocks.' in transferred and 'seg_layers' not in transferred
    heads = {name: run.checkpoint(TRAINER, plans)['network_weights']['decoder.seg_layers.0.weight'].shape[0]
             for name, run in (('source', source), ('target', target))}
    assert heads == {'source': 3, 'target': 2}
