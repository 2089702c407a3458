"""A small synthetic 3-D dataset in nnU-Net's raw format, made on the fly (nothing is downloaded).

Each case is a ``shape`` volume with a smooth intensity bias and noise, containing a sphere
(label 1, bright) and an ellipsoid (label 2, dark), of random size and position, not overlapping.
"""
from __future__ import annotations

import json
import os

import numpy as np

from nnunetv2_ext.publish import publish_folder, write_atomically

LABELS = {'background': 0, 'sphere': 1, 'ellipsoid': 2}


def make_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(image float32, label uint8)``, both of ``shape`` (z, y, x)."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing='ij'))
    size = np.asarray(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    # sphere in one half of the x axis, ellipsoid in the other, so they never overlap
    left = rng.random() < 0.5
    for lab, (lo, hi) in ((1, (0.05, 0.45)), (2, (0.55, 0.95))):
        if not left:
            lo, hi = 1 - hi, 1 - lo
        radii = (np.full(3, rng.uniform(0.15, 0.2) * size.min(), dtype=np.float32) if lab == 1 else
                 rng.uniform([0.10, 0.15, 0.08], [0.2, 0.25, 0.15]) * size)
        centre = rng.uniform(radii + 1, size - radii - 1)
        centre[2] = rng.uniform(lo * size[2] + radii[2], hi * size[2] - radii[2])
        inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
        label[inside] = lab
    bias = 0.3 * np.sin(grid[0] / size[0] * np.pi * rng.uniform(0.5, 1.5) + rng.uniform(0, np.pi))
    image = 100 + 20 * bias + rng.normal(0, 12, shape)
    image[label == 1] += 40
    image[label == 2] -= 35
    return image.astype(np.float32), label


def write_dataset(raw_dir: str, dataset_id: int = 987, name: str = 'ExtDemo', num_train: int = 10,
                  num_test: int = 4, shape: tuple[int, int, int] = (32, 40, 40), seed: int = 0) -> str:
    """Writes ``Dataset{id}_{name}`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json); returns its path.

    The folder is published as a whole (:func:`~nnunetv2_ext.publish.publish_folder`): a kill leaves the previous
    complete dataset or the new one, and no case of an earlier, larger dataset stays behind. Each image is read
    back after writing (SimpleITK does not report a full disk: it left empty files); OSError if one is wrong."""
    import SimpleITK as sitk

    if num_train < 5:
        raise ValueError(f"num_train={num_train}: nnU-Net's 5-fold split needs at least 5 training cases")
    root = os.path.join(raw_dir, f'Dataset{dataset_id:03d}_{name}')

    def write_image(array: np.ndarray, path: str) -> None:
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(itk, path)
        try:
            same = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(path)), array)
        except RuntimeError:
            same = False
        if not same:
            raise OSError(f'could not write {os.path.relpath(path, os.path.dirname(os.path.dirname(path)))} of '
                          f'{root} (is the disk full?); the previous dataset, if any, is unchanged')

    def fill(staging: str) -> None:
        rng = np.random.default_rng(seed)
        for split, count in (('Tr', num_train), ('Ts', num_test)):
            os.makedirs(os.path.join(staging, f'images{split}'))
            os.makedirs(os.path.join(staging, f'labels{split}'))
            for i in range(count):
                image, label = make_case(rng, shape)
                case = f'{name.lower()}_{split.lower()}_{i:03d}'
                write_image(image, os.path.join(staging, f'images{split}', f'{case}_0000.nii.gz'))
                write_image(label, os.path.join(staging, f'labels{split}', f'{case}.nii.gz'))
        write_atomically(os.path.join(staging, 'dataset.json'), json.dumps(
            {'channel_names': {'0': 'synthetic'}, 'labels': LABELS, 'numTraining': num_train,
             'file_ending': '.nii.gz', 'name': name}, indent=2))

    publish_folder(root, fill)
    return root
