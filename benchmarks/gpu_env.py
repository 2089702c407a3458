#!/usr/bin/env python
"""Carry nnU-Net to the lent GPU machine, whose Python has PyTorch but no nnU-Net and no network.

Two halves, one on each machine::

    python benchmarks/gpu_env.py fetch      # here (PyPI reachable): wheels into .whl/, about 20 MiB
    python3 benchmarks/gpu_env.py install   # there, in the repository root: no network needed

``fetch`` walks the requirements of the installed ``nnunetv2_ext`` (``importlib.metadata``, markers
evaluated for the GPU machine's CPython 3.12 on Linux x86-64), stops at every distribution the GPU
machine's image already holds (:data:`DEVICE_IMAGE`), and downloads the rest as wheels for that
Python (pure-Python ones built here for projects published as source only), at the versions installed
here (the versions CI tests). It publishes ``.whl/`` only when
every wheel is there (a staging folder swapped into place, :func:`nnunetv2_ext.publish.publish_folder`) with
``manifest.json``, refuses if the
wheels exceed ``--max-mib`` (the device tool carries at most 64 MiB with the working tree), and puts
``/.whl`` and its staging twins into ``.git/info/exclude`` so that the folder travels only when ``carry`` names it.

``install`` installs those wheels without dependencies or network into the running Python, then this
repository (``pip install -e . --no-deps``: the console script ``nnunetv2-ext`` and the startup file
that registers our trainers with nnU-Net), and checks that ``nnUNetv2_train``'s own lookup finds our trainers.
Two requirements do not travel: ``SimpleITK`` (a 50 MB wheel; nnU-Net imports it at start but only
image reading and writing use it, which no step of ``gpu_check.sh`` does) is replaced by a module that
raises an error naming this script on first use, and ``imagecodecs`` (an optional codec
library of tifffile, never imported by nnU-Net at start) is left out.

The GPU run is one device call (``carry: [".whl"]``); docs/gpu.md, "Preparing the GPU machine", gives
it and why each part is there.

Exit status: 0 done, 1 a download, an install or the import check failed, 2 bad arguments or input.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import NamedTuple

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / '.whl'
sys.path.insert(0, str(REPO))  # this checkout's package, installed or not

from nnunetv2_ext.publish import publish_folder, write_atomically  # noqa: E402  (standard library only)

# Distributions in the GPU machine's image ('cuda'), as /work/.library/device/KINDS.md lists them
# (read there on 2026-11-17): python3 is CPython 3.12.3 with CUDA PyTorch.
DEVICE_PYTHON = '3.12'
DEVICE_IMAGE = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# Requirements that are not carried, and why; PLACEHOLDERS get a stand-in module on the GPU machine.
NOT_CARRIED = {
    'simpleitk': 'a 50 MB wheel; replaced by a placeholder module that raises on use',
    'imagecodecs': "tifffile's optional codecs; nnU-Net does not import it at start",
    'argparse': 'part of the standard library (the PyPI distribution is an obsolete backport)',
}
PLACEHOLDERS = {'simpleitk': 'SimpleITK'}
# wheel platforms the GPU machine accepts (its glibc is at least 2.28: PyTorch's own wheels need that)
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_24_x86_64', 'manylinux_2_17_x86_64',
             'manylinux2014_x86_64', 'manylinux1_x86_64')


def marker_env(python: str) -> dict[str, str]:
    """PEP 508 marker values of CPython ``python`` (major.minor) on Linux x86-64, no extra."""
    return {'python_version': python, 'python_full_version': f'{python}.0', 'sys_platform': 'linux',
            'platform_system': 'Linux', 'platform_machine': 'x86_64', 'os_name': 'posix',
            'implementation_name': 'cpython', 'platform_python_implementation': 'CPython', 'extra': ''}


ROOT = 'nnunetv2_ext'
# pip's options for installing this checkout editable without a package index: no isolated build environment
# (it would download setuptools) and PEP 660's editable hook, never `setup.py develop` -- which older pip runs
# where `wheel` is installed, and which in recent setuptools calls `pip install -e . --use-pep517` itself,
# isolated, so it reached for the index (the H200 machine, 2026-12-04: "No matching distribution found for
# setuptools>=40.8.0", the install stopped before its placeholder modules)
EDITABLE_OFFLINE = ('--no-build-isolation', '--use-pep517')
IMPORT_CHECK = ('import cuda_wkv; '
                'from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find; '
                "find('nnUNetTrainerGLSP'); find('nnUNetTrainerPVTGDLA')")  # nnUNetv2_train's own lookup


class EnvError(Exception):
    """Bad input (exit 2): the message names the problem and the fix."""


class Closure(NamedTuple):
    """What ``nnunetv2_ext`` needs on the GPU machine (see :func:`requirement_closure`)."""
    carried: dict[str, str | None]  # name -> version installed here (None: not installed here)
    image: dict[str, list[tuple[str, str]]]  # image distribution -> [(version specifier, required by)]


def requirement_closure(root: str = ROOT, python: str = DEVICE_PYTHON, carry: frozenset[str] = frozenset()) -> Closure:
    """Walk ``Requires-Dist`` from ``root`` as the GPU machine would need it.

    Markers are evaluated for CPython ``python`` on Linux x86-64; requested extras (``httpx[http2]``) are
    followed. ``root`` itself is not carried (it is installed from the working tree). A distribution of
    :data:`DEVICE_IMAGE` (unless named in ``carry``) is not carried and its own requirements are not
    walked (the image satisfies them), except those of the extras asked for; its version specifiers are
    collected, for :func:`install` to check against the image's versions. :data:`NOT_CARRIED` is skipped.
    """
    in_image = (DEVICE_IMAGE - {canonicalize_name(n) for n in carry}).__contains__
    carried: dict[str, str | None] = {}
    image: dict[str, list[tuple[str, str]]] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(root), frozenset())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            carried[name] = None
            continue
        if name != canonicalize_name(root) and not in_image(name):
            carried[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if not _needed(req, extras, python, base=not in_image(name)):
                continue
            dep = canonicalize_name(req.name)
            if in_image(dep):
                image.setdefault(dep, []).append((str(req.specifier), name))
                if req.extras:
                    todo.append((dep, frozenset(req.extras)))
            elif dep not in NOT_CARRIED:
                todo.append((dep, frozenset(req.extras)))
    return Closure(dict(sorted(carried.items())), {n: sorted(set(v)) for n, v in sorted(image.items())})


def _needed(req: Requirement, extras: frozenset[str], python: str, base: bool) -> bool:
    """Whether ``req`` applies on the target: without an extra (if ``base``) or for one of ``extras``."""
    if req.marker is None:
        return base
    env = marker_env(python)
    with_extra = any(req.marker.evaluate({**env, 'extra': e}) for e in extras)
    without = req.marker.evaluate(env)
    return (base and without) or (with_extra and not without)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` run from the repository, so that no module of the caller's folder is imported."""
    return subprocess.run(cmd, cwd=REPO, **kwargs)


def _pip(*args: str) -> list[str]:
    return [sys.executable, '-m', 'pip', *args]


def fetch(dest: Path, max_mib: float, python: str = DEVICE_PYTHON, carry: frozenset[str] = frozenset()) -> dict:
    """Download the carried wheels for CPython ``python`` into ``dest`` (replaced only when complete).

    ``carry``: image distributions to carry all the same (an image version a carried one does not accept)."""
    unknown = sorted(n for n in carry if canonicalize_name(n) not in DEVICE_IMAGE)
    if unknown:
        raise EnvError(f'--carry {" ".join(unknown)}: not in the image list (DEVICE_IMAGE); what the image lacks '
                       f'is carried anyway')
    closure = requirement_closure(python=python, carry=carry)
    absent = sorted(n for n, v in closure.carried.items() if v is None)
    if absent:
        raise EnvError(f'{", ".join(absent)} required by {ROOT} but not installed here; '
                       f'install this repository first: pip install -e ".[test]"')
    wanted = {n: str(v) for n, v in closure.carried.items()}
    dest = dest.resolve()
    _exclude_from_git(dest)  # before anything is written: neither the folder nor its temporary twins travel
    def fill(staging: str) -> None:
        tmp = Path(staging)
        for name, version in wanted.items():
            _download_wheel(f'{name}=={version}', tmp, python)
        files = sorted(tmp.glob('*.whl'))
        by_name = {canonicalize_name(f.name.split('-')[0]): f for f in files}
        missing = sorted(set(wanted) - set(by_name))
        if missing:
            raise RuntimeError(f'pip download gave no wheel for {", ".join(missing)}')
        mib = sum(f.stat().st_size for f in files) / 2**20
        if mib > max_mib:
            sizes = ', '.join(f'{f.name} {f.stat().st_size / 2**20:.1f}' for f in files)
            raise EnvError(f'the wheels take {mib:.1f} MiB, over --max-mib {max_mib:g} (MiB: {sizes}); '
                           f'leave the largest out (NOT_CARRIED in {Path(__file__).name}) or raise --max-mib')
        manifest = {'python': python, 'platforms': list(PLATFORMS), 'mib': round(mib, 2),
                    'wheels': {n: {'version': wanted[n], 'file': by_name[n].name} for n in wanted},
                    'image_requirements': closure.image, 'not_carried': NOT_CARRIED}
        (tmp / 'manifest.json').write_text(json.dumps(manifest, indent=1) + '\n')

    publish_folder(str(dest), fill)
    return json.loads((dest / 'manifest.json').read_text())  # as install reads it


def _download_wheel(spec: str, dest: Path, python: str) -> None:
    """A wheel of ``spec`` for CPython ``python`` on Linux x86-64 into ``dest``: its binary wheel from the index,
    else (a project published as source only, e.g. nnunetv2) one built here, which must be pure Python."""
    platforms = [a for p in PLATFORMS for a in ('--platform', p)]
    download = _pip('download', '--quiet', '--no-deps', '--only-binary=:all:', '--python-version', python,
                    '--implementation', 'cp', *platforms, '--dest', str(dest), spec)
    got = _run(download, capture_output=True, text=True)
    if got.returncode == 0:
        return
    with tempfile.TemporaryDirectory(dir=dest) as build:
        cmd = _pip('wheel', '--quiet', '--no-deps', '--wheel-dir', build, spec)
        if _run(cmd).returncode != 0:
            raise RuntimeError(f'{spec}: no wheel for CPython {python} on the index and building one failed '
                               f'({" ".join(cmd)}); is the package index reachable?')
        (built,) = Path(build).glob('*.whl')
        if not built.name.endswith('-none-any.whl'):
            raise RuntimeError(f'{spec}: the index gave no binary wheel for CPython {python} on {", ".join(PLATFORMS)} '
                               f'(pip: {got.stderr.strip()[-300:]}), and the one built here ({built.name}) is for '
                               f'this machine only; add the wheel\'s platform to PLATFORMS in {Path(__file__).name} '
                               f'if the GPU machine accepts it, or leave the package out (NOT_CARRIED)')
        os.replace(built, dest / built.name)


def _exclude_from_git(dest: Path) -> None:
    """Ignore ``dest`` and its staging twins (``.<name>.partial-*``, ``.<name>.previous-*``) in this clone only:
    they travel only when ``carry`` names them."""
    if not (REPO / '.git').is_dir() or not dest.is_relative_to(REPO):
        return
    rel = dest.relative_to(REPO)
    lines = [f'/{rel.as_posix()}', f'/{(rel.parent / f".{rel.name}.").as_posix()}*']
    exclude = REPO / '.git' / 'info' / 'exclude'
    text = exclude.read_text() if exclude.exists() else ''
    new = [line for line in lines if line not in text.splitlines()]
    if new:
        exclude.parent.mkdir(exist_ok=True)
        with open(exclude, 'a') as f:
            f.write(('\n' if text and not text.endswith('\n') else '') + '\n'.join(new) + '\n')


PLACEHOLDER_SOURCE = '''"""Placeholder written by benchmarks/gpu_env.py: the real {module} was not carried to this machine."""


class PlaceholderError(AttributeError):
    """Raised on any use; an AttributeError, so that hasattr() and getattr(..., default) answer."""


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)
    raise PlaceholderError("{module}.%s: {module} is a placeholder on this machine (benchmarks/gpu_env.py install "
                           "left the real package out: {why}); install the real {module} to read or write images" % name)
'''


def write_placeholders(site: Path) -> list[str]:
    """Write a stand-in package into ``site`` for each :data:`PLACEHOLDERS` module that is not importable."""
    written = []
    for dist, module in PLACEHOLDERS.items():
        if importlib.util.find_spec(module) is not None:
            continue
        pkg = site / module
        pkg.mkdir(parents=True, exist_ok=True)
        write_atomically(str(pkg / '__init__.py'), PLACEHOLDER_SOURCE.format(module=module, why=NOT_CARRIED[dist]))
        written.append(module)
    return written


def image_mismatches(requirements: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Image distributions whose installed version a carried one does not accept, each with the fix."""
    problems = []
    for name, specs in requirements.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f'{name} is not installed, though DEVICE_IMAGE lists it (required by '
                            f'{", ".join(sorted({by for _, by in specs}))}): fetch again with --carry {name}')
            continue
        bad = [(spec, by) for spec, by in specs if spec and version not in SpecifierSet(spec, prereleases=True)]
        if bad:
            wants = ', '.join(f'{by} wants {name}{spec}' for spec, by in bad)
            problems.append(f'{name} {version} here: {wants}; fetch again with --carry {name}')
    return problems


def install(src: Path) -> list[str]:
    """On the GPU machine: install the wheels of ``src`` and this repository, the placeholders; check them.

    Returns the warnings (image versions the carried distributions do not accept); raises
    :class:`EnvError` for unusable input and RuntimeError when pip or the import check fails."""
    manifest_path = src / 'manifest.json'
    if not manifest_path.is_file():
        raise EnvError(f'{manifest_path} not found: run "python benchmarks/gpu_env.py fetch" where PyPI is '
                       f'reachable and name ".whl" in the device call\'s carry')
    manifest = json.loads(manifest_path.read_text())
    python = f'{sys.version_info.major}.{sys.version_info.minor}'
    if manifest['python'] != python:
        raise EnvError(f'the wheels in {src} are for Python {manifest["python"]}, this is Python {python}; '
                       f'fetch again with --python {python}')
    site = Path(sysconfig.get_paths()['purelib'])
    wheels = [str(src / w['file']) for w in manifest['wheels'].values()]
    for cmd in (_pip('install', '--quiet', '--no-index', '--no-deps', '--no-compile', *wheels),
                _pip('install', '--quiet', '--no-index', '--no-deps', *EDITABLE_OFFLINE, '-e', str(REPO))):
        if _run(cmd).returncode != 0:
            raise RuntimeError(f'pip could not install into {site} ({" ".join(cmd[3:6])} ...; its message is above); '
                               f'run this as the user who owns that Python\'s site-packages')
    importlib.invalidate_caches()  # see what the pip subprocesses installed
    missing = sorted(n for n, v in requirement_closure(python=python).carried.items() if v is None)
    if missing:
        raise EnvError(f'{", ".join(missing)} still missing after the install: {src} was fetched for another '
                       f'checkout or image; fetch again from this one')
    warnings = image_mismatches(manifest.get('image_requirements', {}))
    written = write_placeholders(site)
    check = _run([sys.executable, '-c', IMPORT_CHECK], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError('installed, but nnUNetv2_train\'s trainer lookup failed'
                           + ''.join(f'\n  (image: {w})' for w in warnings) + f':\n{check.stderr[-3000:]}')
    print(f'installed {len(wheels)} wheels ({manifest["mib"]} MiB) and nnunetv2_ext from {REPO}'
          + (f'; placeholder module(s): {", ".join(written)}' if written else ''))
    return warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    f = sub.add_parser('fetch', help='here: download the wheels the GPU machine lacks')
    f.add_argument('--dest', type=Path, default=WHEELS, help='folder to publish (default: %(default)s)')
    f.add_argument('--max-mib', type=float, default=48.0,
                   help='refuse above this total (the device tool carries 64 MiB with the tree; default %(default)s)')
    f.add_argument('--python', default=DEVICE_PYTHON,
                   help='CPython version of the target (default %(default)s, the GPU machine\'s)')
    f.add_argument('--carry', nargs='+', default=[], metavar='NAME',
                   help='image distributions to carry all the same (install names them when needed)')
    f.add_argument('--list', action='store_true', help='only print what would be downloaded')
    i = sub.add_parser('install', help='on the GPU machine: install them and this repository, offline')
    i.add_argument('--src', type=Path, default=WHEELS, help='folder fetch published (default: %(default)s)')
    args = parser.parse_args(argv)
    try:
        if args.command == 'fetch' and args.list:
            closure = requirement_closure(python=args.python, carry=frozenset(args.carry))
            for name, version in closure.carried.items():
                print(f'{name}=={version}')
        elif args.command == 'fetch':
            m = fetch(args.dest, args.max_mib, args.python, frozenset(args.carry))
            print(f'{args.dest}: {len(m["wheels"])} wheels, {m["mib"]} MiB for CPython {m["python"]}; '
                  f'not carried: {", ".join(m["not_carried"])}')
        else:
            for warning in install(args.src):
                print(f'gpu_env.py install: warning: {warning}', file=sys.stderr)
    except EnvError as e:
        print(f'gpu_env.py {args.command}: {e}', file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f'gpu_env.py {args.command}: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
