"""Builds nnU-Net ConfigurationManagers for arbitrary (tiny) plans, as nnU-Net's planner would write them."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager


def make_configuration(patch_size: Sequence[int], strides: Sequence[Sequence[int]],
                       features: Sequence[int], kernel_sizes: Sequence[Sequence[int]] | None = None,
                       residual: bool = False) -> ConfigurationManager:
    dim = len(patch_size)
    n = len(strides)
    kernel_sizes = kernel_sizes or [[3] * dim] * n
    arch_kwargs = {
        'n_stages': n, 'features_per_stage': list(features),
        'conv_op': f'torch.nn.modules.conv.Conv{dim}d', 'kernel_sizes': [list(k) for k in kernel_sizes],
        'strides': [list(s) for s in strides], 'n_conv_per_stage_decoder': [1] * (n - 1), 'conv_bias': True,
        'norm_op': f'torch.nn.modules.instancenorm.InstanceNorm{dim}d',
        'norm_op_kwargs': {'eps': 1e-05, 'affine': True}, 'dropout_op': None, 'dropout_op_kwargs': None,
        'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True},
    }
    if residual:
        cls = 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
        arch_kwargs['n_blocks_per_stage'] = [1] * n
    else:
        cls = 'dynamic_network_architectures.architectures.unet.PlainConvUNet'
        arch_kwargs['n_conv_per_stage'] = [1] * n
    return ConfigurationManager({
        'data_identifier': 'test', 'preprocessor_name': 'DefaultPreprocessor', 'batch_size': 2,
        'patch_size': list(patch_size), 'median_image_size_in_voxels': list(patch_size),
        'spacing': [1.0] * dim, 'normalization_schemes': ['ZScoreNormalization'], 'use_mask_for_norm': [False],
        'batch_dice': False,
        'architecture': {'network_class_name': cls, 'arch_kwargs': arch_kwargs,
                         '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']},
    })


def make_plans(configuration: ConfigurationManager, name: str = '3d_fullres') -> dict:
    """A plans dict (as nnUNetv2_train hands it to a trainer) holding one configuration."""
    dim = len(configuration.patch_size)
    return {
        'dataset_name': 'Dataset999_Test', 'plans_name': 'nnUNetPlans',
        'original_median_spacing_after_transp': [1.0] * dim, 'original_median_shape_after_transp': [32] * dim,
        'image_reader_writer': 'SimpleITKIO', 'transpose_forward': list(range(dim)),
        'transpose_backward': list(range(dim)), 'configurations': {name: configuration.configuration},
        'experiment_planner_used': 'ExperimentPlanner', 'label_manager': 'LabelManager',
        'foreground_intensity_properties_per_channel': {}, 'continue_training': False,
    }


def make_trainer(trainer_class, configuration: ConfigurationManager, labels: dict | None = None, **dataset_extra):
    """An un-initialised trainer on CPU for ``configuration`` (no data needed)."""
    import torch

    labels = labels or {'background': 0, 'a': 1, 'b': 2}
    dataset_json = {'channel_names': {'0': 'x'}, 'labels': labels, 'numTraining': 5, 'file_ending': '.nii.gz',
                    **dataset_extra}
    name = '2d' if len(configuration.patch_size) == 2 else '3d_fullres'
    return trainer_class(make_plans(configuration, name), name, 0, dataset_json, device=torch.device('cpu'))


def expected_ds_shapes(plans: dict, num_classes: int, batch: int) -> list[tuple[int, ...]]:
    """Output shapes for ``make_configuration(**plans)``: scales exactly as nnU-Net derives them
    (1/cumprod(strides)[:-1]), cut to the four finest."""
    scales = (1 / np.cumprod(np.vstack(plans['strides']), axis=0))[:-1][:4]
    return [(batch, num_classes, *[round(p * s) for p, s in zip(plans['patch_size'], sc)]) for sc in scales]


def make_initialised_trainer(trainer_class, configuration: ConfigurationManager, root: str):
    """``make_trainer`` initialised (network, optimizer, loss) with nnU-Net's preprocessed/results folders under
    ``root`` (sets ``nnUNet_preprocessed``/``nnUNet_results``; no data written beyond a format probe file)."""
    import os

    os.environ['nnUNet_preprocessed'] = os.path.join(root, 'preprocessed')
    os.environ['nnUNet_results'] = os.path.join(root, 'results')
    trainer = make_trainer(trainer_class, configuration)
    os.makedirs(trainer.preprocessed_dataset_folder, exist_ok=True)
    open(os.path.join(trainer.preprocessed_dataset_folder, 'case.b2nd'), 'w').close()  # nnU-Net's format probe
    trainer.initialize()
    return trainer
