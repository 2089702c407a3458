"""benchmarks/gpu_env.py offline: what it carries to the GPU machine, how it publishes the wheels, how it
refuses bad input, and the placeholder module. Downloading and installing for real needs the package
index and the GPU machine (docs/gpu.md, "Preparing the GPU machine")."""
import importlib.metadata as metadata
import json
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench_scripts import load

gpu_env = load('gpu_env')


def test_closure_carries_nnunet_and_what_the_image_lacks_only():
    carried, image = gpu_env.requirement_closure()
    assert all(v is not None for v in carried.values())
    assert carried['nnunetv2'] == metadata.version('nnunetv2')
    assert {'batchgenerators', 'dynamic-network-architectures', 'acvl-utils', 'blosc2'} <= set(carried)
    assert 'nnunetv2-ext' not in carried  # installed from the working tree
    assert not set(carried) & (gpu_env.DEVICE_IMAGE | set(gpu_env.NOT_CARRIED))
    assert {'torch', 'numpy'} <= set(image) <= gpu_env.DEVICE_IMAGE
    # closed: every requirement of what is carried is carried, in the image, or left out on purpose
    env = gpu_env.marker_env(gpu_env.DEVICE_PYTHON)
    for name in carried:
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                dep = canonicalize_name(req.name)
                assert dep in carried or dep in image or dep in gpu_env.NOT_CARRIED, (name, dep)


class _Dist:
    def __init__(self, version, requires):
        self.version, self.requires = version, requires


def test_closure_walk_markers_extras_and_the_image(monkeypatch):
    dists = {
        'root': _Dist('0', ['alpha', 'img[x]', 'gone']),
        'alpha': _Dist('1.0', ['beta; python_version < "3.12"', 'img>=2', 'delta; extra == "docs"']),
        'beta': _Dist('2.0', []),
        'img': _Dist('3.0', ['gamma; extra == "x"', 'base-of-img']),  # the image satisfies base-of-img
        'gamma': _Dist('4.0', ['img']),
    }

    def distribution(name):
        if name not in dists:
            raise metadata.PackageNotFoundError(name)
        return dists[name]
    monkeypatch.setattr(gpu_env.metadata, 'distribution', distribution)
    monkeypatch.setattr(gpu_env, 'DEVICE_IMAGE', frozenset({'img'}))
    monkeypatch.setattr(gpu_env, 'NOT_CARRIED', {'gone': 'left out'})
    new = gpu_env.requirement_closure('root', python='3.12')
    assert new.carried == {'alpha': '1.0', 'gamma': '4.0'}
    assert new.image == {'img': [('', 'gamma'), ('', 'root'), ('>=2', 'alpha')]}
    assert gpu_env.requirement_closure('root', python='3.11').carried == {'alpha': '1.0', 'beta': '2.0', 'gamma': '4.0'}
    # an image distribution named in carry is carried, and its own requirements walked
    assert gpu_env.requirement_closure('root', python='3.12', carry=frozenset({'img'})).carried == {
        'alpha': '1.0', 'base-of-img': None, 'gamma': '4.0', 'img': '3.0'}


def test_image_versions_a_carried_distribution_refuses_are_named_with_the_fix(monkeypatch):
    versions = {'timm': '1.0.24', 'numpy': '2.5.2'}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(gpu_env.metadata, 'version', version)
    problems = gpu_env.image_mismatches({'timm': [('<1.0.23', 'dynamic-network-architectures')],
                                         'numpy': [('', 'nnunetv2'), ('>=1.26', 'blosc2')],
                                         'yacs': [('', 'nnunetv2')]})
    assert problems == [
        'timm 1.0.24 here: dynamic-network-architectures wants timm<1.0.23; fetch again with --carry timm',
        'yacs is not installed, though DEVICE_IMAGE lists it (required by nnunetv2): fetch again with --carry yacs']


def test_fetch_refuses_to_carry_what_is_not_an_image_distribution(capsys):
    assert gpu_env.main(['fetch', '--carry', 'nnunetv2', 'timm', '--dest', '/nonexistent/x']) == 2
    assert '--carry nnunetv2: not in the image list' in capsys.readouterr().err


def _fake_download(sizes):
    def download(spec, dest, python):
        name, version = spec.split('==')
        if name not in sizes:
            raise RuntimeError(f'{spec}: no wheel (injected)')
        (dest / f'{name.replace("-", "_")}-{version}-py3-none-any.whl').write_bytes(b'x' * sizes[name])
    return download


@pytest.fixture
def repo(tmp_path, monkeypatch):
    (tmp_path / '.git' / 'info').mkdir(parents=True)
    monkeypatch.setattr(gpu_env, 'REPO', tmp_path)
    monkeypatch.setattr(gpu_env, 'requirement_closure', lambda **kw: gpu_env.Closure(
        {'alpha': '1.0', 'beta-pkg': '2.1'}, {'torch': [('>=2', 'alpha')]}))
    return tmp_path


def test_fetch_publishes_a_complete_folder_with_its_manifest(repo, monkeypatch, dead_pid):
    monkeypatch.setattr(gpu_env, '_download_wheel', _fake_download({'alpha': 10, 'beta-pkg': 20}))
    dest = repo / '.whl'
    (dest).mkdir()
    (dest / 'stale.whl').write_bytes(b'old')
    manifest = gpu_env.fetch(dest, max_mib=1.0)
    assert sorted(p.name for p in dest.iterdir()) == [
        'alpha-1.0-py3-none-any.whl', 'beta_pkg-2.1-py3-none-any.whl', 'manifest.json']
    assert json.loads((dest / 'manifest.json').read_text()) == manifest
    assert manifest['wheels']['beta-pkg'] == {'version': '2.1', 'file': 'beta_pkg-2.1-py3-none-any.whl'}
    assert manifest['python'] == '3.12' and 'simpleitk' in manifest['not_carried']
    assert manifest['image_requirements'] == {'torch': [['>=2', 'alpha']]}
    assert sorted(p.name for p in repo.iterdir()) == ['.git', '.whl']  # no temporary or old folder left
    (repo / f'..whl.previous-{dead_pid}').mkdir()  # as a fetch killed between its two renames leaves it
    (repo / f'..whl.partial-{dead_pid}').mkdir()  # as a fetch killed while downloading leaves it
    gpu_env.fetch(dest, max_mib=1.0)
    assert sorted(p.name for p in repo.iterdir()) == ['.git', '.whl']
    # the folder and its staging twins are ignored, each by one line
    lines = (repo / '.git' / 'info' / 'exclude').read_text().splitlines()
    assert lines.count('/.whl') == 1 and lines.count('/..whl.*') == 1


def test_a_failed_fetch_leaves_the_previous_folder_as_it_was(repo, monkeypatch):
    dest = repo / '.whl'
    monkeypatch.setattr(gpu_env, '_download_wheel', _fake_download({'alpha': 10, 'beta-pkg': 20}))
    gpu_env.fetch(dest, max_mib=1.0)
    before = sorted(p.name for p in dest.iterdir())
    monkeypatch.setattr(gpu_env, '_download_wheel', _fake_download({'alpha': 10}))
    with pytest.raises(RuntimeError, match='beta-pkg==2.1: no wheel'):
        gpu_env.fetch(dest, max_mib=1.0)
    assert sorted(p.name for p in dest.iterdir()) == before
    assert sorted(p.name for p in repo.iterdir()) == ['.git', '.whl']


def test_fetch_refuses_wheels_over_the_size_limit(repo, monkeypatch, capsys):
    monkeypatch.setattr(gpu_env, '_download_wheel', _fake_download({'alpha': 3 * 2**20, 'beta-pkg': 10}))
    assert gpu_env.main(['fetch', '--dest', str(repo / '.whl'), '--max-mib', '2']) == 2
    err = capsys.readouterr().err
    assert 'the wheels take 3.0 MiB, over --max-mib 2' in err and 'alpha-1.0-py3-none-any.whl 3.0' in err
    assert sorted(p.name for p in repo.iterdir()) == ['.git']


def test_install_without_fetched_wheels_says_how_to_get_them(tmp_path, capsys):
    assert gpu_env.main(['install', '--src', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert 'manifest.json not found' in err and 'gpu_env.py fetch' in err and 'carry' in err


def test_install_refuses_wheels_for_another_python(tmp_path, capsys):
    (tmp_path / 'manifest.json').write_text(json.dumps({'python': '2.7', 'wheels': {}}))
    assert gpu_env.main(['install', '--src', str(tmp_path)]) == 2
    this = f'{sys.version_info.major}.{sys.version_info.minor}'
    assert f'for Python 2.7, this is Python {this}; fetch again with --python {this}' in capsys.readouterr().err


def test_install_builds_this_checkout_offline_through_pep_660(tmp_path, monkeypatch, capsys):
    """The wheels, then this checkout editable: no index, no isolated build, PEP 517's editable hook (not
    `setup.py develop`, which recent setuptools turns into an isolated pip run that needs the index)."""
    (tmp_path / 'manifest.json').write_text(json.dumps({'python': f'{sys.version_info.major}.{sys.version_info.minor}',
                                                        'mib': 0.1, 'wheels': {'yacs': {'file': 'yacs.whl'}}}))
    ran = []

    class Done:
        returncode = 0
        stderr = ''

    monkeypatch.setattr(gpu_env, '_run', lambda cmd, **kw: ran.append(cmd) or Done())
    monkeypatch.setattr(gpu_env, 'requirement_closure', lambda python: gpu_env.Closure({}, {}))
    monkeypatch.setattr(gpu_env, 'write_placeholders', lambda site: [])
    assert gpu_env.install(tmp_path) == []
    wheels, editable = ran[0][3:], ran[1][3:]
    assert wheels[-1] == str(tmp_path / 'yacs.whl') and '--no-index' in wheels
    assert editable[-2:] == ['-e', str(gpu_env.REPO)]
    assert {'--no-index', '--no-deps', '--no-build-isolation', '--use-pep517'} <= set(editable)


def test_placeholder_imports_and_fails_on_use_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_env, 'PLACEHOLDERS', {'simpleitk': 'NoSuchImageLibrary_ext'})
    assert gpu_env.write_placeholders(tmp_path) == ['NoSuchImageLibrary_ext']
    monkeypatch.syspath_prepend(str(tmp_path))
    import NoSuchImageLibrary_ext as sitk  # noqa: N813  (as nnU-Net imports SimpleITK)
    with pytest.raises(AttributeError, match='NoSuchImageLibrary_ext.ReadImage: .* placeholder .*gpu_env.py'):
        sitk.ReadImage('case.nii.gz')
    assert not hasattr(sitk, '__wrapped__') and not hasattr(sitk, 'sitkLinear')  # probes answer, not raise
    assert getattr(sitk, 'Version', None) is None
    monkeypatch.setattr(gpu_env, 'PLACEHOLDERS', {'simpleitk': 'json'})  # importable: left alone
    assert gpu_env.write_placeholders(tmp_path) == []
