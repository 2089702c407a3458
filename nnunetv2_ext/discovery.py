"""How stock ``nnUNetv2_train/predict -tr NAME`` find our trainers.

nnU-Net (>= 2.8) searches every folder listed in the environment variable ``nnUNet_extTrainer``
(``os.pathsep``-separated) for a module that has the class ``NAME``. We ship one such folder,
``trainer_shims/``, holding a single re-export module, and a startup hook (``nnunetv2_ext.pth``,
plus ``nnunetv2_ext.start`` for PEP 829 Pythons) that calls :func:`register` when the interpreter
starts. Everything here is standard library only at import: it runs on every start-up.

nnU-Net reads the variable at every lookup, so a script that overwrites it after start-up (nnU-Net's own
advice for custom trainers) hides our folder again; :func:`register_trainers` makes our trainers findable
in that process whatever the variable holds.
"""
from __future__ import annotations

import os

ENV_VAR = 'nnUNet_extTrainer'
SHIM_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'trainer_shims')
MIN_NNUNET_VERSION = (2, 8)


def _with_shim_folder(current: str) -> str:
    """``current`` with our folder appended once; the user's own entries stay first."""
    entries = [p for p in current.split(os.pathsep) if p]
    if SHIM_FOLDER not in entries:
        entries.append(SHIM_FOLDER)
    return os.pathsep.join(entries)


def register() -> None:
    """Append the shim folder to ``nnUNet_extTrainer`` in this process (children inherit it).

    Opt out with ``NNUNETV2_EXT_NO_AUTOREGISTER=1``.
    """
    if os.environ.get('NNUNETV2_EXT_NO_AUTOREGISTER', '') in ('1', 'true', 'True'):
        return
    os.environ[ENV_VAR] = _with_shim_folder(os.environ.get(ENV_VAR, ''))


def register_trainers() -> tuple[str, ...]:
    """Make every trainer of ``nnunetv2_ext.trainers`` findable by nnU-Net's trainer lookup in this process,
    whatever ``nnUNet_extTrainer`` holds now or later; returns their names.

    nnU-Net's lookup (``recursive_find_trainer_class_by_name``, behind ``nnUNetv2_train``, ``nnUNetv2_predict``
    and ``nnUNetPredictor``) first searches the modules of ``nnunetv2.training.nnUNetTrainer`` for an attribute
    of the requested name, then the folders in ``nnUNet_extTrainer``. This adds each of our trainers as an
    attribute of the module that defines ``nnUNetTrainer`` (a name nnU-Net already has is never replaced), and
    appends our folder to the variable (:func:`register`) for child processes. Idempotent; imports torch and
    nnunetv2. Once registered, our trainers are found before same-named classes in ``nnUNet_extTrainer``
    folders.

    Raises:
        ImportError: nnunetv2 is missing or older than 2.8 (with the command that fixes it).
    """
    import sys

    import nnunetv2_ext.trainers as ours
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    searched_module = sys.modules[nnUNetTrainer.__module__]
    for name in ours.__all__:
        if not hasattr(searched_module, name):
            setattr(searched_module, name, getattr(ours, name))
    register()
    return tuple(ours.__all__)


def export_line() -> str:
    """The shell line that does what :func:`register` does, for environments without startup hooks (the value
    shell-quoted, so ``eval`` runs nothing in it)."""
    import shlex

    return f'export {ENV_VAR}={shlex.quote(_with_shim_folder(os.environ.get(ENV_VAR, "")))}'


def nnunet_version_problem() -> str | None:
    """A message if the installed nnunetv2 cannot load external trainers (< 2.8), else ``None``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version('nnunetv2')
    except PackageNotFoundError:
        return "nnunetv2 is not installed: pip install 'nnunetv2>=2.8'"
    parts = tuple(int(p) for p in installed.split('.')[:2] if p.isdigit())
    if parts < MIN_NNUNET_VERSION:
        return (f"nnunetv2 {installed} is installed, but nnunetv2_ext needs nnunetv2 >= 2.8 (the first version that "
                f"reads {ENV_VAR}): pip install -U 'nnunetv2>=2.8'")
    return None
