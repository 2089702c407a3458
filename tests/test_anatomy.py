"""Real-anatomy benchmark dataset: deformations keep valid labels, files and splits, clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nnunetv2_ext import anatomy


def _toy_subject(name='toy', shape=(20, 24, 20)):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij')).astype(float)
    r = np.sqrt((((grid.T - (np.array(shape) - 1) / 2) / (np.array(shape) / 2.5)) ** 2).sum(-1)).T
    label = np.where(r < 0.6, 1, np.where(r < 1.0, 2, 0)).astype(np.uint8)
    image = np.where(label == 1, 0.9, np.where(label == 2, 0.5, 0)).astype(np.float32)
    return anatomy.Subject(name, image, label)


def test_random_variant_keeps_a_valid_label_map_and_is_seeded():
    s = _toy_subject()
    a = anatomy.random_variant(np.random.default_rng(3), s)
    b = anatomy.random_variant(np.random.default_rng(3), s)
    assert a.image.shape == s.image.shape and a.label.dtype == np.uint8
    assert set(np.unique(a.label)) <= {0, 1, 2}
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.image, b.image)
    # a deformation, not a copy; but still the same anatomy (high overlap of the whole object)
    assert not np.array_equal(a.label, s.label)
    fg_a, fg_s = a.label > 0, s.label > 0
    assert 2 * (fg_a & fg_s).sum() / (fg_a.sum() + fg_s.sum()) > 0.8


def test_no_deformation_is_identity_on_labels():
    s = _toy_subject()
    v = anatomy.random_variant(np.random.default_rng(0), s, max_displacement=0, max_rotation_deg=0, max_scale=0)
    np.testing.assert_array_equal(v.label, s.label)


def test_write_dataset_layout_and_split(tmp_path):
    root = anatomy.write_dataset(str(tmp_path), {'a': _toy_subject('a'), 'b': _toy_subject('b')},
                                 {'c': _toy_subject('c')}, cases_per_subject=3, dataset_id=991, spacing=3.0)
    assert os.path.basename(root) == 'Dataset991_BrainTemplates'
    assert sorted(os.listdir(os.path.join(root, 'imagesTr'))) == [f'{s}_{i:03d}_0000.nii.gz' for s in 'ab'
                                                                  for i in range(3)]
    assert os.listdir(os.path.join(root, 'labelsTs')) == ['c.nii.gz']
    meta = json.load(open(os.path.join(root, 'dataset.json')))
    assert meta['numTraining'] == 6 and meta['labels'] == anatomy.LABELS
    import nibabel as nib
    img = nib.load(os.path.join(root, 'imagesTs', 'c_0000.nii.gz'))
    np.testing.assert_allclose(img.header.get_zooms(), (3.0, 3.0, 3.0))
    np.testing.assert_array_equal(np.asanyarray(nib.load(os.path.join(root, 'labelsTs', 'c.nii.gz')).dataobj),
                                  _toy_subject().label)  # the test subject is unaltered
    with pytest.raises(ValueError, match='overlap'):
        anatomy.write_dataset(str(tmp_path), {'a': _toy_subject()}, {'a': _toy_subject()}, cases_per_subject=5)


def test_a_rewrite_leaves_no_case_of_the_earlier_dataset(tmp_path):
    anatomy.write_dataset(str(tmp_path), {'a': _toy_subject('a'), 'b': _toy_subject('b')}, {'c': _toy_subject('c')},
                          cases_per_subject=3)
    root = anatomy.write_dataset(str(tmp_path), {'a': _toy_subject('a')}, {'d': _toy_subject('d')},
                                 cases_per_subject=5)
    assert sorted(os.listdir(os.path.join(root, 'imagesTr'))) == [f'a_{i:03d}_0000.nii.gz' for i in range(5)]
    assert os.listdir(os.path.join(root, 'labelsTs')) == ['d.nii.gz']
    assert os.listdir(tmp_path) == [os.path.basename(root)]


def test_missing_source_names_the_install_command(monkeypatch):
    monkeypatch.setattr(anatomy, 'MRICRON', '/nonexistent')
    with pytest.raises(FileNotFoundError, match='apt-get install mricron-data'):
        anatomy.load_subject('colin27')
    with pytest.raises(ValueError, match='unknown subject'):
        anatomy.load_subject('nobody')


def _available(name):
    try:
        anatomy.load_subject(name, spacing=6.0)
        return True
    except FileNotFoundError:
        return False


@pytest.mark.parametrize('name', sorted(anatomy.HOW_TO_INSTALL))
def test_real_templates_when_installed(name):
    if not _available(name):
        pytest.skip(f'{name} not installed ({anatomy.HOW_TO_INSTALL[name]})')
    s = anatomy.load_subject(name, spacing=6.0)
    counts = np.bincount(s.label.ravel(), minlength=3)
    assert s.label.shape == anatomy.grid_affine(6.0)[1]
    # a brain: 10-40 % of the box, with both tissue classes present
    assert 0.1 < counts[1:].sum() / s.label.size < 0.4 and counts[1] > 0 and counts[2] > 0
    assert s.image[s.label == 0].max() == 0  # skull-stripped


def test_cli_reports_missing_raw_folder():
    env = {k: v for k, v in os.environ.items() if k != 'nnUNet_raw'}
    run = subprocess.run([sys.executable, '-m', 'nnunetv2_ext.cli', 'anatomy-dataset'], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 1 and 'nnUNet_raw is not set' in run.stderr
