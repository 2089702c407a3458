"""Zero-set-up discovery: the startup hook, the user's own nnUNet_extTrainer, wheels, the env command."""
import os
import subprocess
import sys
import zipfile

import pytest

from nnunetv2_ext import discovery

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k in ('PATH', 'HOME', 'LANG', 'TMPDIR', 'SYSTEMROOT', 'PYTHONPATH')}
    env.update(extra)
    return env


def _python(code: str, env: dict, *flags: str) -> str:
    return subprocess.run([sys.executable, *flags, '-c', code], env=env, capture_output=True, text=True,
                          check=True, cwd='/').stdout.strip()


def test_startup_hook_registers_shim_folder_without_heavy_imports():
    out = _python("import os, sys; print(os.environ.get('nnUNet_extTrainer')); "
                  "print('torch' in sys.modules, 'nnunetv2' in sys.modules)", _clean_env())
    value, heavy = out.splitlines()
    assert value == discovery.SHIM_FOLDER
    assert heavy == 'False False'


def test_startup_hook_keeps_users_value_first():
    user = os.pathsep.join(['/my/trainers', '/other/trainers'])
    out = _python("import os; print(os.environ['nnUNet_extTrainer'])", _clean_env(nnUNet_extTrainer=user))
    assert out == os.pathsep.join([user, discovery.SHIM_FOLDER])
    # idempotent: a child that inherits the variable does not add the folder twice
    twice = _python("import os; print(os.environ['nnUNet_extTrainer'])",
                    _clean_env(nnUNet_extTrainer=os.pathsep.join([user, discovery.SHIM_FOLDER])))
    assert twice == out


def test_opt_out_variable():
    out = _python("import os; print(os.environ.get('nnUNet_extTrainer'))", _clean_env(NNUNETV2_EXT_NO_AUTOREGISTER='1'))
    assert out == 'None'


def test_stock_lookup_finds_our_trainers():
    code = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
            "import nnunetv2_ext.trainers as t\n"
            "for name in t.__all__:\n"
            "    cls = f(name)\n"
            "    assert cls.__module__.startswith('nnunetv2_ext.trainers'), cls.__module__\n"
            "    assert cls is getattr(t, name)\n"
            "print('ok', len(t.__all__))")
    from nnunetv2_ext.trainers import __all__ as ours
    out = _python(code, _clean_env(nnUNet_raw='/tmp', nnUNet_preprocessed='/tmp', nnUNet_results='/tmp'))
    assert out.splitlines()[-1] == f'ok {len(ours)}'


def test_wheel_ships_startup_files_and_they_work(tmp_path):
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp_path / 'wheel'), REPO], check=True, capture_output=True)
    (wheel,) = (tmp_path / 'wheel').iterdir()
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ('nnunetv2_ext.pth', 'nnunetv2_ext.start', 'nnunetv2_ext/trainer_shims/nnunetv2_ext_trainers.py',
                   'nnunetv2_ext/discovery.py'):
        assert needed in names
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / 'nnunetv2_ext.start').read_text().strip() == 'nnunetv2_ext.discovery:register'
    # -S: no site-packages (and no editable install of the repo); the wheel's own .pth must do the work
    out = _python(f"import site; site.addsitedir({str(target)!r}); import os; print(os.environ['nnUNet_extTrainer'])",
                  _clean_env(), '-S')
    assert out == str(target / 'nnunetv2_ext' / 'trainer_shims')


def test_env_command_prints_export_line():
    out = subprocess.run([sys.executable, '-m', 'nnunetv2_ext.cli', 'env'], capture_output=True, text=True,
                         check=True, env=_clean_env(nnUNet_extTrainer='/mine')).stdout.strip()
    assert __import__('shlex').split(out) == ['export', f'nnUNet_extTrainer=/mine{os.pathsep}{discovery.SHIM_FOLDER}']


@pytest.mark.parametrize('installed, ok', [('2.7.0', False), ('2.6.4', False), ('2.8.0', True), ('2.8.1', True),
                                           ('3.0', True)])
def test_old_nnunet_gets_a_clear_message(monkeypatch, installed, ok):
    import importlib.metadata
    monkeypatch.setattr(importlib.metadata, 'version', lambda name: installed)
    problem = discovery.nnunet_version_problem()
    if ok:
        assert problem is None
    else:
        assert f'nnunetv2 {installed} is installed' in problem and ">=2.8" in problem.replace(' ', '')


def test_startup_line_is_silent_when_the_package_is_gone(tmp_path):
    """A stale .pth (package source removed, e.g. a deleted editable checkout) must not print a traceback
    at every interpreter start; other import errors still surface."""
    with open(os.path.join(REPO, 'nnunetv2_ext', 'startup', 'nnunetv2_ext.pth')) as f:
        line = f.read().strip()
    (tmp_path / 'site').mkdir()
    (tmp_path / 'site' / 'x.pth').write_text(line + '\n')
    code = f"import site; site.addsitedir({str(tmp_path / 'site')!r}); print('ok')"
    proc = subprocess.run([sys.executable, '-S', '-c', code], env=_clean_env(PYTHONPATH=''), capture_output=True,
                          text=True, cwd=str(tmp_path))
    assert proc.stdout.strip() == 'ok' and proc.stderr == ''
    broken = tmp_path / 'broken'
    (broken / 'nnunetv2_ext').mkdir(parents=True)
    (broken / 'nnunetv2_ext' / '__init__.py').write_text('import a_module_that_does_not_exist\n')
    proc = subprocess.run([sys.executable, '-S', '-c', code], env=_clean_env(PYTHONPATH=str(broken)),
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert 'a_module_that_does_not_exist' in proc.stderr


LOOKUP_AFTER_OVERWRITE = '''
import json, os, sys
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find

model = sys.argv[1]
predictor = nnUNetPredictor(device=torch.device('cpu'), perform_everything_on_device=False, allow_tqdm=False)
os.environ['nnUNet_extTrainer'] = '/somewhere/else'  # nnU-Net's own advice, overwriting what the hook set
try:
    predictor.initialize_from_trained_model_folder(model, use_folds=(0,), checkpoint_name='checkpoint_final.pth')
except RuntimeError as e:
    print('before:', str(e).split(' in ')[0])
import nnunetv2_ext
import nnunetv2_ext.trainers as ours
names = nnunetv2_ext.register_trainers()
os.environ['nnUNet_extTrainer'] = '/yet/another'  # whatever the variable holds afterwards
predictor.initialize_from_trained_model_folder(model, use_folds=(0,), checkpoint_name='checkpoint_final.pth')
print('after:', type(predictor.network).__name__)
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
found = {n: find(n) is getattr(ours, n) for n in names}
print(json.dumps({'names': sorted(names), 'all_found': all(found.values()), 'stock': find('nnUNetTrainer') is nnUNetTrainer}))
'''


def test_register_trainers_survives_an_overwritten_variable(tmp_path, monkeypatch):
    """A script that sets nnUNet_extTrainer itself, then uses nnUNetPredictor on a model of ours."""
    import json

    from plans_factory import make_configuration, make_initialised_trainer

    from nnunetv2_ext.trainers import __all__ as all_ours
    from nnunetv2_ext.trainers import nnUNetTrainerLightDecoder

    for var in ('nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(var, os.environ[var])  # restored after the test
    cm = make_configuration([16, 16, 16], [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [4, 8, 16])
    trainer = make_initialised_trainer(nnUNetTrainerLightDecoder, cm, str(tmp_path))
    trainer.save_checkpoint(os.path.join(trainer.output_folder, 'checkpoint_final.pth'))
    model = trainer.output_folder_base
    for name, content in (('plans.json', trainer.plans_manager.plans), ('dataset.json', trainer.dataset_json)):
        with open(os.path.join(model, name), 'w') as f:
            json.dump(content, f)
    env = _clean_env(nnUNet_raw='/tmp', nnUNet_preprocessed='/tmp', nnUNet_results='/tmp', OMP_NUM_THREADS='1',
                     PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                              os.environ.get('PYTHONPATH', '')])))
    before, after, found = _python(LOOKUP_AFTER_OVERWRITE.replace('sys.argv[1]', repr(model)), env).splitlines()[-3:]
    assert before == 'before: Could not find requested nnunet trainer nnUNetTrainerLightDecoder'
    assert after == 'after: LightDecoderUNet'
    assert json.loads(found) == {'names': sorted(all_ours), 'all_found': True, 'stock': True}


def _shim_error(code_before: str, *flags: str) -> tuple[str, str]:
    """(exception type, message) of importing our shim the way nnU-Net's lookup does, in a child Python."""
    shim = os.path.join(discovery.SHIM_FOLDER, 'nnunetv2_ext_trainers.py')
    code = (code_before + "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('nnunetv2_ext_trainers', {shim!r})\n"
            "try:\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "except ImportError as e:\n"
            "    print(type(e).__name__, '|', e)\n")
    env = {k: v for k, v in _clean_env().items() if k != 'PYTHONPATH'}
    kind, message = _python(code, env, *flags).split(' | ', 1)
    return kind, message


def test_shim_in_a_python_without_nnunetv2_ext_names_the_interpreter_and_the_fix():
    """The child ``nnUNetv2_train`` may belong to another Python than the parent that set
    nnUNet_extTrainer (a --system-site-packages virtualenv whose nnunetv2 lives outside it): the
    lookup then imports our shim where nnunetv2_ext is missing. It says so, not just 'No module'."""
    # nnunetv2_ext made unimportable in an otherwise normal Python: a finder in front of the others that
    # reports it missing, as an interpreter without it would
    kind, message = _shim_error(
        "import sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nnunetv2_ext':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Missing())\n"
        "for m in [m for m in sys.modules if m.split('.')[0] == 'nnunetv2_ext']:\n"
        "    del sys.modules[m]  # the startup hook imported nnunetv2_ext.discovery\n")
    assert kind == 'ImportError'
    assert f'this Python, {sys.executable}, cannot import nnunetv2_ext' in message
    assert discovery.SHIM_FOLDER in message and 'nnUNet_extTrainer' in message
    assert f'{sys.executable} -m pip install' in message
    # without site-packages (python -S) the fix is the env command, not an install
    kind, message = _shim_error('', '-S')
    assert kind == 'ImportError'
    assert 'without site-packages (python -S)' in message and 'nnunetv2-ext env --no-site' in message
