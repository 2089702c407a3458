"""benchmarks/anatomy_benchmark.py: trainer specs with overrides become short-schedule subclasses that
nnU-Net's own trainer lookup finds (the training runs themselves are the benchmark, not a test)."""
import importlib.util
import os

import pytest
import torch

from plans_factory import make_configuration, make_plans

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def bench():
    spec = importlib.util.spec_from_file_location('anatomy_benchmark',
                                                  os.path.join(ROOT, 'benchmarks', 'anatomy_benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spec_names_and_overrides(bench):
    plain = bench.TrainerSpec('nnUNetTrainerGLSP')
    assert (plain.base, plain.overrides, plain.class_name, plain.label) == (
        'nnUNetTrainerGLSP', {}, 'nnUNetTrainerGLSP_Anatomy', 'nnUNetTrainerGLSP')
    ablation = bench.TrainerSpec('nnUNetTrainerGLSP_EncRefine:attn_weight=0,contrast_weight=0.5')
    assert ablation.overrides == {'attn_weight': 0, 'contrast_weight': 0.5}
    assert ablation.class_name == 'nnUNetTrainerGLSP_EncRefine__attn_weight0__contrast_weight0_5_Anatomy'
    assert ablation.label == 'nnUNetTrainerGLSP_EncRefine[attn_weight=0, contrast_weight=0.5]'


@pytest.mark.parametrize('text,message', [('bad name', 'bad trainer name'), ('T:attn', 'expected attr=value'),
                                          ('T:a=b c', 'expected a Python literal'), ('T:1a=2', 'attr=value')])
def test_bad_specs_say_what_is_wrong(bench, text, message):
    with pytest.raises(ValueError, match=message):
        bench.TrainerSpec(text)


def test_schedule_classes_are_found_by_nnunet_and_carry_schedule_and_overrides(bench, tmp_path, monkeypatch):
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    specs = [bench.TrainerSpec('nnUNetTrainer'), bench.TrainerSpec('nnUNetTrainerGLSP_EncRefine:boundary_weight=0')]
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
        assert cls is not None and cls.__name__ == spec.class_name and cls.__mro__[1].__name__ == spec.base
        trainer = cls(make_plans(cm, '3d_fullres'), '3d_fullres', 0, dataset_json, device=torch.device('cpu'))
        assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch) == (3, 7, 5)
    assert cls.boundary_weight == 0 and cls.attn_weight == 0.1  # override set, other defaults kept
