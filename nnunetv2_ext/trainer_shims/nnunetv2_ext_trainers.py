# Imported as a top-level module by nnU-Net's trainer lookup (nnUNet_extTrainer); re-exports only.
import os
import sys

try:
    from nnunetv2_ext.trainers import *  # noqa: F401,F403
except ModuleNotFoundError as err:
    if err.name != 'nnunetv2_ext':
        raise
    _looked = (f'nnU-Net looked for a trainer in the nnunetv2_ext folder {os.path.dirname(os.path.abspath(__file__))} '
               '(listed in nnUNet_extTrainer), but ')
    if sys.flags.no_site:
        raise ImportError(
            _looked + 'this Python runs without site-packages (python -S), where nnunetv2_ext cannot be imported. '
            'Fix: run it without -S, or put what it needs on the path: eval "$(nnunetv2-ext env --no-site)"') from None
    raise ImportError(
        _looked + f'this Python, {sys.executable}, cannot import nnunetv2_ext: it is installed for another '
        'Python. Usually the nnUNetv2_* command on PATH belongs to a different environment than nnunetv2_ext '
        '(e.g. a virtualenv made with --system-site-packages whose nnunetv2 is installed outside it). Fix: '
        f'install nnunetv2_ext for this Python ({sys.executable} -m pip install <nnunetv2_ext checkout or '
        "wheel>), or install nnunetv2 into nnunetv2_ext's environment so that its own nnUNetv2_* commands "
        'come first on PATH.') from None
