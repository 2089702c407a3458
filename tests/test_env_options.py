"""Every numeric environment option of the package is checked: finite, in range, an error naming it."""
import pytest
import torch
from torch import nn

from nnunetv2_ext.env_options import EnvOptionError, env_float, env_int


@pytest.mark.parametrize('raw', ['nan', 'NaN', 'inf', '-inf', '1e999', 'abc', '-0.1', '1.5'])
def test_env_float_rejects_non_finite_and_out_of_range(monkeypatch, raw):
    monkeypatch.setenv('NNUNETV2_EXT_TEST_FLOAT', raw)
    with pytest.raises(EnvOptionError) as err:
        env_float('NNUNETV2_EXT_TEST_FLOAT', 0.0, 0.0, 1.0)
    message = str(err.value)
    assert f"NNUNETV2_EXT_TEST_FLOAT={raw!r}" in message and 'a finite number in [0, 1]' in message
    assert 'unset NNUNETV2_EXT_TEST_FLOAT' in message


def test_env_float_default_and_valid(monkeypatch):
    monkeypatch.delenv('NNUNETV2_EXT_TEST_FLOAT', raising=False)
    assert env_float('NNUNETV2_EXT_TEST_FLOAT', 0.25, 0.0, 1.0) == 0.25
    monkeypatch.setenv('NNUNETV2_EXT_TEST_FLOAT', '  ')
    assert env_float('NNUNETV2_EXT_TEST_FLOAT', 0.25, 0.0, 1.0) == 0.25
    for raw, value in (('0', 0.0), ('1', 1.0), (' 0.5 ', 0.5)):
        monkeypatch.setenv('NNUNETV2_EXT_TEST_FLOAT', raw)
        assert env_float('NNUNETV2_EXT_TEST_FLOAT', 0.25, 0.0, 1.0) == value


@pytest.mark.parametrize('raw, odd', [('0', False), ('16', False), ('2.5', False), ('x', False), ('4', True),
                                      ('nan', False)])
def test_env_int_rejects(monkeypatch, raw, odd):
    monkeypatch.setenv('NNUNETV2_EXT_TEST_INT', raw)
    with pytest.raises(EnvOptionError, match=rf"NNUNETV2_EXT_TEST_INT='{raw}' is invalid: expected an"
                                             rf"{' odd' if odd else ''} integer in \[1, 15\]"):
        env_int('NNUNETV2_EXT_TEST_INT', 3, 1, 15, odd=odd)


def test_env_int_default_and_valid(monkeypatch):
    monkeypatch.delenv('NNUNETV2_EXT_TEST_INT', raising=False)
    assert env_int('NNUNETV2_EXT_TEST_INT', 3, 1, 15, odd=True) == 3
    monkeypatch.setenv('NNUNETV2_EXT_TEST_INT', '5')
    assert env_int('NNUNETV2_EXT_TEST_INT', 3, 1, 15, odd=True) == 5


class _WithDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Identity()


@pytest.mark.parametrize('var, raw', [('NNUNETV2_EXT_REFINE_BOX', 'nan'), ('NNUNETV2_EXT_REFINE_BOX', 'inf'),
                                      ('NNUNETV2_EXT_REFINE_FFT', 'nan'), ('NNUNETV2_EXT_REFINE_FFT', '2'),
                                      ('NNUNETV2_EXT_REFINE_KERNEL', '4'), ('NNUNETV2_EXT_REFINE_CUTOFF', 'inf')])
def test_refinement_options_are_checked_when_the_network_is_built(monkeypatch, var, raw):
    """The issue's case: REFINE_BOX=nan used to give all-NaN logits and exit code 0 at prediction."""
    from nnunetv2_ext.trainers.enc_refine import refinement_from_env

    monkeypatch.setenv('NNUNETV2_EXT_REFINE_BOX', '0.5')
    monkeypatch.setenv(var, raw)
    with pytest.raises(EnvOptionError, match=f"{var}='{raw}' is invalid"):
        refinement_from_env(_WithDecoder())


def test_valid_refinement_options_attach_the_hook(monkeypatch):
    from nnunetv2_ext.trainers.enc_refine import refinement_from_env

    net = _WithDecoder()
    monkeypatch.delenv('NNUNETV2_EXT_REFINE_BOX', raising=False)
    monkeypatch.delenv('NNUNETV2_EXT_REFINE_FFT', raising=False)
    assert refinement_from_env(net) is None
    monkeypatch.setenv('NNUNETV2_EXT_REFINE_BOX', '0.5')
    monkeypatch.setenv('NNUNETV2_EXT_REFINE_KERNEL', '5')
    assert refinement_from_env(net) is not None and len(net.decoder._forward_pre_hooks) == 1


@pytest.mark.parametrize('kwargs, match', [({'box_strength': float('nan')}, 'box_strength=nan is not finite'),
                                           ({'fft_strength': float('inf')}, 'fft_strength=inf is not finite'),
                                           ({'kernel': 4}, 'positive odd integer')])
def test_refinement_hook_rejects_bad_parameters(kwargs, match):
    from nnunetv2_ext.refinement.inference import FeatureRefinementHook

    with pytest.raises(ValueError, match=match):
        FeatureRefinementHook(**kwargs)
    assert torch.isfinite(FeatureRefinementHook(0.5, 0.5)._refine(torch.randn(1, 2, 4, 4, 4))).all()


@pytest.mark.parametrize('var, raw', [('NNUNETV2_EXT_DEMO_EPOCHS', '0'), ('NNUNETV2_EXT_DEMO_ITERS', '-3'),
                                      ('NNUNETV2_EXT_DEMO_ITERS', 'many')])
def test_demo_schedule_options_are_checked(monkeypatch, var, raw):
    from nnunetv2_ext.trainers.demo import _apply_demo_schedule

    monkeypatch.setenv(var, raw)
    with pytest.raises(EnvOptionError, match=rf"{var}='{raw}' is invalid: expected an integer in \[1, 100000\]"):
        _apply_demo_schedule(nn.Module())
    monkeypatch.setenv(var, '7')
    trainer = nn.Module()
    _apply_demo_schedule(trainer)
    assert 7 in (trainer.num_epochs, trainer.num_iterations_per_epoch)
