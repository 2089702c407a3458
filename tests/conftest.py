import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# nnU-Net reads its folders at import time; give tests private ones before anything imports nnunetv2.
_NNUNET_TMP = tempfile.mkdtemp(prefix='nnunetv2_ext_tests_')
for _var in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
    os.environ.setdefault(_var, os.path.join(_NNUNET_TMP, _var))
    os.makedirs(os.environ[_var], exist_ok=True)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/plans_factory.py


def pytest_sessionfinish(session, exitstatus):
    """The private nnU-Net folders go with the session: a test run leaves no nnunetv2_ext_tests_* behind."""
    shutil.rmtree(_NNUNET_TMP, ignore_errors=True)


@pytest.fixture
def dead_pid() -> int:
    """The pid of a child process that has exited and been reaped: no process of it runs any more, as after a
    ``kill -9`` (for leftovers of killed writers: staging folders, build locks)."""
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid
