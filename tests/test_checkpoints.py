"""Crash-safe checkpoints of our trainers: same content as nnU-Net's, written atomically, and ``--c`` resumes
from the newest readable checkpoint when one was torn (nnU-Net's own resume flow, ``maybe_load_checkpoint``)."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from plans_factory import make_configuration, make_initialised_trainer, make_trainer

import nnunetv2_ext.trainers as ours
from nnunetv2_ext.trainers.base import CrashSafeCheckpoints, checkpoint_problem, partial_checkpoint_path

TESTS = os.path.dirname(os.path.abspath(__file__))
TINY = dict(patch_size=[16, 16, 16], strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], features=[4, 8, 16])


def _tiny_trainer(root: str, trainer_class=ours.nnUNetTrainerLightDecoder):
    return make_initialised_trainer(trainer_class, make_configuration(**TINY), root)


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    for var in ('nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(var, os.environ[var])  # restored after the test
    return _tiny_trainer(str(tmp_path))


def _save(trainer, name: str, epoch: int) -> str:
    trainer.current_epoch = epoch
    path = os.path.join(trainer.output_folder, name)
    trainer.save_checkpoint(path)
    return path


def _visible(folder: str) -> set[str]:
    return {n for n in os.listdir(folder) if not n.startswith('.')}


def test_every_trainer_of_ours_is_crash_safe():
    for name in ours.__all__:
        cls = getattr(ours, name)
        assert issubclass(cls, CrashSafeCheckpoints), name


def test_written_checkpoint_is_what_nnunet_writes_and_nothing_is_left_over(trainer):
    stale = partial_checkpoint_path(os.path.join(trainer.output_folder, 'checkpoint_latest.pth'))
    elsewhere = os.path.join(os.path.dirname(trainer.output_folder), 'not_a_checkpoint.txt')
    with open(elsewhere, 'w') as f:
        f.write('untouched')
    os.symlink(elsewhere, stale)  # a leftover partial name is replaced, never written through
    ours_path = _save(trainer, 'checkpoint_latest.pth', 3)
    with open(elsewhere) as f:
        assert f.read() == 'untouched'
    assert not os.path.islink(ours_path) and not os.path.lexists(stale)
    stock_path = os.path.join(trainer.output_folder, 'stock.pth')
    nnUNetTrainer.save_checkpoint(trainer, stock_path)
    mine, stock = (torch.load(p, map_location='cpu', weights_only=False) for p in (ours_path, stock_path))
    assert mine.keys() == stock.keys()
    assert mine['current_epoch'] == stock['current_epoch'] == 4
    assert mine['trainer_name'] == 'nnUNetTrainerLightDecoder' and mine['init_args'] == stock['init_args']
    assert mine['network_weights'].keys() == stock['network_weights'].keys()
    for key, value in stock['network_weights'].items():
        torch.testing.assert_close(mine['network_weights'][key], value, rtol=0, atol=0)
    assert sorted(os.listdir(trainer.output_folder)) == sorted(['checkpoint_latest.pth', 'stock.pth',
                                                                os.path.basename(trainer.log_file)])


def test_a_failed_write_keeps_the_previous_checkpoint_and_says_why(trainer, monkeypatch):
    """A full disk mid-save: the previous checkpoint stays, the torn partial file is removed (it took the space a
    retry needs), and the error names the checkpoint, the free space and --c."""
    path = _save(trainer, 'checkpoint_latest.pth', 1)
    before = open(path, 'rb').read()

    def full_disk(self, filename):
        with open(filename, 'wb') as f:
            f.write(b'PK torn')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 53248 vs 53136')

    monkeypatch.setattr(nnUNetTrainer, 'save_checkpoint', full_disk)
    with pytest.raises(RuntimeError, match=r'cannot write the checkpoint .*checkpoint_latest.pth \(RuntimeError: '
                                           r'.*unexpected pos.*MiB free in .*resume with --c'):
        _save(trainer, 'checkpoint_latest.pth', 2)
    assert open(path, 'rb').read() == before
    assert not os.path.lexists(partial_checkpoint_path(path))

    def unpicklable(self, filename):  # not a write problem: raised as it is, the partial file still removed
        open(filename, 'wb').close()
        raise pickle.PicklingError("Can't pickle <function <lambda>>")

    monkeypatch.setattr(nnUNetTrainer, 'save_checkpoint', unpicklable)
    with pytest.raises(pickle.PicklingError, match="Can't pickle"):
        _save(trainer, 'checkpoint_latest.pth', 2)
    assert open(path, 'rb').read() == before and not os.path.lexists(partial_checkpoint_path(path))


def test_disabled_checkpointing_writes_nothing(trainer):
    trainer.disable_checkpointing = True
    _save(trainer, 'checkpoint_latest.pth', 0)
    assert os.listdir(trainer.output_folder) == [os.path.basename(trainer.log_file)]


def test_resume_skips_a_torn_latest_and_says_why(trainer, capsys):
    _save(trainer, 'checkpoint_best.pth', 2)
    latest = _save(trainer, 'checkpoint_latest.pth', 6)
    size = os.path.getsize(latest)
    with open(latest, 'r+b') as f:  # what nnU-Net's in-place torch.save leaves after kill -9
        f.truncate(size // 2)
    fresh = make_trainer(ours.nnUNetTrainerLightDecoder, make_configuration(**TINY))
    maybe_load_checkpoint(fresh, continue_training=True, validation_only=False)
    assert fresh.current_epoch == 3  # checkpoint_best.pth, saved at the end of epoch 2
    message = capsys.readouterr().out
    assert 'checkpoint_latest.pth cannot be read (BadZipFile' in message
    assert 'Loaded checkpoint_best.pth instead' in message and '(epoch 3)' in message


def test_resume_prefers_the_newest_readable_checkpoint(trainer):
    final = _save(trainer, 'checkpoint_final.pth', 9)
    _save(trainer, 'checkpoint_best.pth', 4)
    _save(trainer, 'checkpoint_latest.pth', 7)  # newest
    os.utime(os.path.join(trainer.output_folder, 'checkpoint_best.pth'), (1, 1))  # oldest
    with open(final, 'r+b') as f:
        f.truncate(100)
    fresh = make_trainer(ours.nnUNetTrainerLightDecoder, make_configuration(**TINY))
    maybe_load_checkpoint(fresh, continue_training=True, validation_only=False)
    assert fresh.current_epoch == 8


def test_corrupted_member_is_detected(trainer):
    path = _save(trainer, 'checkpoint_latest.pth', 0)
    assert checkpoint_problem(path) is None
    with open(path, 'r+b') as f:  # flip one byte inside the stored tensors, leaving the zip structure whole
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert 'fails its CRC check' in checkpoint_problem(path)


def test_val_refuses_a_model_standing_in_for_a_torn_final_checkpoint(trainer, monkeypatch):
    """nnUNetv2_train --val loads checkpoint_final.pth; torn, the newest readable other checkpoint is loaded (as
    for --c), but validating it would report a non-final model as the final one: refused with the ways on.
    --val_best (best loaded as requested) and a finished --c (a new final written) validate again."""
    from nnunetv2_ext.trainers.base import NoReadableCheckpoint

    monkeypatch.setattr(nnUNetTrainer, 'perform_actual_validation', lambda self, save_probabilities=False: 'validated')
    final = _save(trainer, 'checkpoint_final.pth', 9)
    best = _save(trainer, 'checkpoint_best.pth', 4)
    _save(trainer, 'checkpoint_latest.pth', 7)
    with open(final, 'r+b') as f:
        f.truncate(100)
    maybe_load_checkpoint(trainer, continue_training=False, validation_only=True)
    assert trainer.current_epoch == 8
    with pytest.raises(NoReadableCheckpoint) as err:
        trainer.perform_actual_validation()
    text = str(err.value)
    assert text.startswith('error: not validating:') and 'checkpoint_final.pth cannot be read (BadZipFile' in text
    assert 'checkpoint_latest.pth (epoch 8)' in text and '--c' in text and '--val --val_best' in text
    trainer.load_checkpoint(best)  # what --val_best does next
    assert trainer.perform_actual_validation() == 'validated'
    maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)  # --c: continues from latest
    with pytest.raises(NoReadableCheckpoint):
        trainer.perform_actual_validation()
    _save(trainer, 'checkpoint_final.pth', 9)  # the end of that training
    assert trainer.perform_actual_validation() == 'validated'


def test_no_readable_checkpoint_is_a_clear_error(trainer):
    """Raised inside nnU-Net's run_training: a SystemExit, so nnUNetv2_train prints this message alone, exit 1."""
    from nnunetv2_ext.trainers.base import NoReadableCheckpoint

    for name, epoch in (('checkpoint_latest.pth', 1), ('checkpoint_best.pth', 0)):
        with open(_save(trainer, name, epoch), 'r+b') as f:
            f.truncate(10)
    fresh = make_trainer(ours.nnUNetTrainerLightDecoder, make_configuration(**TINY))
    with pytest.raises(NoReadableCheckpoint) as err:
        maybe_load_checkpoint(fresh, continue_training=True, validation_only=False)
    assert isinstance(err.value, SystemExit)
    text = str(err.value)
    assert text.startswith('error: no readable checkpoint in') and 'without --c' in text
    assert 'checkpoint_latest.pth: BadZipFile' in text and 'checkpoint_best.pth: BadZipFile' in text


CHILD = textwrap.dedent('''
    import io, os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from test_checkpoints import _save, _tiny_trainer

    trainer = _tiny_trainer({root!r})
    _save(trainer, 'checkpoint_latest.pth', 0)
    real_save = torch.save

    def stalling_save(obj, f, *args, **kwargs):  # writes half of the archive, then hangs until killed
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, 'wb') as out:
            out.write(buffer.getvalue()[:buffer.tell() // 2])
            out.flush()
            print('HALF WRITTEN', out.name, flush=True)
            time.sleep(600)

    torch.save = stalling_save
    _save(trainer, 'checkpoint_latest.pth', 5)
''')


def test_kill_9_while_saving_leaves_the_previous_checkpoint(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    child = subprocess.Popen([sys.executable, '-c', CHILD.format(tests=TESTS, root=str(tmp_path))], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.startswith('HALF WRITTEN'):
                break
        else:
            pytest.fail(f'the child never reached the write: {child.stderr.read()[-3000:]}')
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    partial = line.split(' ', 2)[2].strip()
    folder = os.path.dirname(partial)
    latest = os.path.join(folder, 'checkpoint_latest.pth')
    assert partial == partial_checkpoint_path(latest) and os.path.basename(partial).startswith('.')
    assert checkpoint_problem(partial) is not None  # the torn write went to the hidden file ...
    assert checkpoint_problem(latest) is None  # ... and the previous checkpoint is whole
    assert torch.load(latest, map_location='cpu', weights_only=False)['current_epoch'] == 1
    assert {n for n in _visible(folder) if not n.startswith('training_log')} == {'checkpoint_latest.pth'}


def _with_pre_rename_heads(state_dict: dict) -> dict:
    """``state_dict`` as networks saved it before the heads were named ``seg_layers`` (``decoder.heads.N.*``)."""
    return {k.replace('decoder.seg_layers.', 'decoder.heads.'): v.clone() for k, v in state_dict.items()}


@pytest.mark.parametrize('name', ['nnUNetTrainerLightDecoder', 'nnUNetTrainerGLSP', 'nnUNetTrainerPVTGDLA'])
def test_weights_with_pre_rename_head_names_load_strictly(name):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from plans_factory import make_plans

    cm = make_configuration(**TINY)
    pm = PlansManager(make_plans(cm))
    build = getattr(ours, name).build_network_architecture
    torch.manual_seed(0)
    trained = build(pm, cm, 1, 3, True)
    old = _with_pre_rename_heads(trained.state_dict())
    assert sum(k.startswith('decoder.heads.') for k in old) == 2 * trained.decoder.num_ds_outputs
    torch.manual_seed(1)
    fresh = build(pm, cm, 1, 3, True)
    fresh.load_state_dict(old, strict=True)
    loaded = fresh.state_dict()
    assert loaded.keys() == trained.state_dict().keys()
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_resume_from_a_checkpoint_with_pre_rename_head_names(trainer):
    path = _save(trainer, 'checkpoint_latest.pth', 4)
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    checkpoint['network_weights'] = _with_pre_rename_heads(checkpoint['network_weights'])
    torch.save(checkpoint, path)
    fresh = make_trainer(ours.nnUNetTrainerLightDecoder, make_configuration(**TINY))
    maybe_load_checkpoint(fresh, continue_training=True, validation_only=False)
    assert fresh.current_epoch == 5
    head = fresh.network.decoder.seg_layers[0].weight
    assert torch.equal(head, trainer.network.decoder.seg_layers[0].weight)
