"""`nnunetv2-ext env` output is safe to eval, `python -S` is served, and the command line help and argument
checks are complete."""
import argparse
import os
import subprocess
import sys

import pytest

from nnunetv2_ext import discovery
from nnunetv2_ext.cli import build_parser, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k in ('PATH', 'HOME', 'LANG', 'TMPDIR')}
    env.update(extra)
    return env


def test_env_line_is_shell_quoted(tmp_path):
    """`eval "$(nnunetv2-ext env)"` must neither run a `$(...)` in the user's value nor mangle quotes/spaces."""
    marker = tmp_path / 'executed'
    user_value = f'/my trainers/$(touch {marker})/it\'s "quoted"/`touch {marker}`'
    script = f'eval "$({sys.executable} -m nnunetv2_ext.cli env)" && printf %s "$nnUNet_extTrainer"'
    run = subprocess.run(['bash', '-c', script], env=_env(nnUNet_extTrainer=user_value), capture_output=True,
                         text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert not marker.exists()
    assert run.stdout == f'{user_value}{os.pathsep}{discovery.SHIM_FOLDER}'


def test_python_dash_s_finds_our_trainers_with_the_no_site_lines(tmp_path):
    """`python -S` reads no site-packages and runs no startup hook (nor the editable install's import hook):
    `env --no-site` prints what it needs, and nnU-Net's external-trainer lookup then imports our shim module."""
    probe = ('import importlib.util, os, sys; '
             'shims = os.environ["nnUNet_extTrainer"].split(os.pathsep)[-1]; '
             'spec = importlib.util.spec_from_file_location("shim", os.path.join(shims, "nnunetv2_ext_trainers.py")); '
             'mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); '
             'print(mod.nnUNetTrainerLightDecoder.__module__, sys.flags.no_site)')
    without = subprocess.run([sys.executable, '-S', '-c', 'import nnunetv2_ext.trainers'], env=_env(),
                             capture_output=True, text=True, cwd=tmp_path)
    assert without.returncode != 0 and 'ModuleNotFoundError' in without.stderr
    script = f'eval "$({sys.executable} -m nnunetv2_ext.cli env --no-site)" && {sys.executable} -S -c \'{probe}\''
    run = subprocess.run(['bash', '-c', script], env=_env(PYTHONPATH='/keep/me'), capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ['nnunetv2_ext.trainers.light_decoder', '1']
    echo = subprocess.run(['bash', '-c', f'eval "$({sys.executable} -m nnunetv2_ext.cli env --no-site)" && '
                                         f'printf %s "$PYTHONPATH"'], env=_env(PYTHONPATH='/keep/me'),
                          capture_output=True, text=True, cwd=tmp_path)
    assert echo.stdout.endswith(f'{os.pathsep}/keep/me')  # the user's own entries stay, after ours


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_help_has_no_markup_and_every_option_has_help_and_default():
    parser = build_parser()
    top = parser.format_help()
    assert '``' not in top and ':func:' not in top and 'nnUNet_results' in top
    for name, sub in _subparsers(parser).items():
        text = sub.format_help()
        assert '``' not in text, name
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help and action.help.strip(), f'{name} {action.option_strings} has no help'
            if action.default not in (None, False) and not isinstance(action, argparse._HelpAction):
                assert 'default' in sub._get_formatter()._get_help_string(action), (name, action.option_strings)
    bench = _subparsers(parser)['benchmark'].format_help()
    assert '(default: 5)' in bench and '(default: 3d_fullres)' in bench


@pytest.mark.parametrize('argv, message', [
    (['benchmark', '-d', '1', '--repeats', '0'], "--repeats: '0' is not an integer >= 1"),
    (['benchmark', '-d', '1', '--batch-size', '0'], "--batch-size: '0' is not an integer >= 1"),
    (['benchmark', '-d', '1', '--scaling', '1', 'nan'], "--scaling: 'nan' is not a finite number > 0"),
    (['benchmark', '-d', '1', '--scaling', 'inf'], "--scaling: 'inf' is not a finite number > 0"),
    (['benchmark', '-d', '1', '--scaling', '0'], "--scaling: '0' is not a finite number > 0"),
    (['benchmark', '-d', '1', '--warmup', '-1'], "--warmup: '-1' is not an integer >= 0"),
    (['demo', '--epochs', '0'], "--epochs: '0' is not an integer >= 1"),
    (['demo', '--iterations', 'x'], "--iterations: 'x' is not an integer >= 1"),
    (['compare', '-d', '1', '-tr', 'A', '-f', '-1'], "--folds: '-1' is not an integer >= 0"),
])
def test_bad_numbers_are_argument_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_test_run_leaves_no_temporary_folders(tmp_path):
    temp = tmp_path / 'tmp'
    temp.mkdir()
    run = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                          os.path.join(REPO, 'tests', 'test_env_options.py'), '-k', 'env_int_default_and_valid'],
                         env={**_env(TMPDIR=str(temp)), 'PYTHONPATH': os.environ.get('PYTHONPATH', '')},
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:]
    assert '1 passed' in run.stdout and os.listdir(temp) == []


def test_licence_is_declared():
    """Apache-2.0 like nnU-Net: the LICENSE text ships and the wheel's metadata declares it."""
    probe = ('import setuptools; from distutils.core import run_setup; '
             'd = run_setup("setup.py", stop_after="config"); '
             'print(d.metadata.license_expression, d.metadata.license_files)')
    run = subprocess.run([sys.executable, '-W', 'ignore', '-c', probe], cwd=REPO, capture_output=True, text=True)
    assert run.stdout.split() == ['Apache-2.0', "['LICENSE']"], run.stderr[-2000:]
    with open(os.path.join(REPO, 'LICENSE')) as f:
        text = f.read()
    assert text.split()[:4] == ['Apache', 'License', 'Version', '2.0,'] and 'END OF TERMS AND CONDITIONS' in text


def test_readme_for_a_newcomer():
    """Starts with the two commands; says nnU-Net needs its folders before the first nnU-Net command; no suite
    counts or timings that go stale; no reference to a document that is not in the repository."""
    import re

    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    assert readme.startswith('# nnunetv2_ext\n\n```bash\npython -m pip install -e . && nnunetv2-ext demo\n'
                             'python -m pip install -e ".[test]" && python -m pytest -ra tests\n```\n')
    first_nnunet_command = readme.index('nnUNetv2_plan_and_preprocess -d')
    for var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        assert f'{var}=' in readme[:first_nnunet_command], var
    assert not re.search(r'\d+ tests|GPU-only skips|\d+ s measured', readme)
    assert 'DESIGN' not in readme and 'design note' not in readme
    assert '## Which trainer to choose' in readme
