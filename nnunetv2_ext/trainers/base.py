"""What all our trainers share: checkpoints that survive a crash, deep supervision on the four finest outputs.

:class:`CrashSafeCheckpoints` makes every checkpoint appear only when complete and lets ``--c`` resume from
the newest readable checkpoint; :class:`nnUNetTrainerExtBase` adds the light decoder's supervision.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import zipfile

import numpy as np
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_ext.blocks.light_decoder import NUM_DS_OUTPUTS
from nnunetv2_ext.publish import fsync_path


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """Weights ``2^(L-1-i) / Σ`` for outputs ``i = 0..L-1`` (highest resolution first).

    ``L = 4`` gives ``(8, 4, 2, 1) / 15``; every output is used (nnU-Net's stock scheme zeroes
    the coarsest one instead).
    """
    w = 2.0 ** np.arange(num_outputs - 1, -1, -1)
    return w / w.sum()


#: nnU-Net's checkpoint names, in the order ``nnUNetv2_train --c`` looks for them.
CHECKPOINT_NAMES = ('checkpoint_final.pth', 'checkpoint_latest.pth', 'checkpoint_best.pth')


class NoReadableCheckpoint(SystemExit):
    """The checkpoint a run needs cannot be read: ``--c`` found checkpoints but could read none, or ``--val``
    found ``checkpoint_final.pth`` torn. A ``SystemExit`` carrying its message, so that ``nnUNetv2_train``, in
    whose ``run_training`` it is raised, ends with that message alone and exit status 1 instead of a traceback
    through nnU-Net's code; catch it by this name when calling the trainer from Python."""


def partial_checkpoint_path(filename: str) -> str:
    """The hidden file in ``filename``'s folder that a checkpoint is written to before it is renamed."""
    folder, name = os.path.split(os.path.abspath(filename))
    return os.path.join(folder, f'.{name}.partial')


def checkpoint_problem(filename: str) -> str | None:
    """Why ``torch.load`` cannot read the checkpoint ``filename`` (torn, truncated, corrupted), or ``None``.

    ``torch.save`` writes a zip archive; it is intact when its central directory (written last) is present
    and every member passes its CRC-32 check. Reads the whole file once; unpickles nothing.
    """
    try:
        with zipfile.ZipFile(filename) as archive:
            bad_member = archive.testzip()
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        return f'{type(e).__name__}: {e}'
    if bad_member is not None:
        return f'member {bad_member!r} fails its CRC check (the file is corrupted)'
    return None


class CrashSafeCheckpoints:
    """Mixin for an ``nnUNetTrainer``: no interruption can leave a torn checkpoint, and ``--c`` survives one.

    * :meth:`save_checkpoint` lets nnU-Net write its usual checkpoint (same content) to a hidden
      ``.<name>.partial`` file in the same folder, flushes it to disk, then renames it over ``<name>``
      (``os.replace``, atomic): a crash or ``kill -9`` at any moment leaves the previous checkpoint whole.
      A write that fails (a full disk) removes the partial file and raises a ``RuntimeError`` naming the
      checkpoint, the free space and the way on.
    * :meth:`load_checkpoint`: if the requested checkpoint (one of :data:`CHECKPOINT_NAMES`) cannot be read,
      e.g. torn by a crash under an older version, it loads the newest (modification time) of the others
      that can, printing which and why; :class:`NoReadableCheckpoint` naming every file and its problem if
      none can.
    * :meth:`perform_actual_validation` refuses to validate while the loaded model stands in for an unreadable
      ``checkpoint_final.pth`` (``nnUNetv2_train --val``: the results would be reported as the final model's),
      until training writes a new final checkpoint (``--c``) or another checkpoint is loaded as requested
      (``--val --val_best``).
    """

    #: why the loaded model is not the requested ``checkpoint_final.pth`` (None: it is, or none was requested)
    _final_unreadable: str | None = None

    def save_checkpoint(self, filename: str) -> None:
        if os.path.basename(filename) == CHECKPOINT_NAMES[0]:
            self._final_unreadable = None  # every rank: training has ended with this model
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)  # writes nothing (logs that checkpointing is off)
        partial = partial_checkpoint_path(filename)
        if os.path.lexists(partial):
            os.remove(partial)  # an interrupted save's leftover, or a link: never written through
        try:
            super().save_checkpoint(partial)
            fsync_path(partial)
        except BaseException as e:
            with contextlib.suppress(OSError):  # the torn file would only take the space a retry needs
                os.remove(partial)
            if not isinstance(e, (OSError, RuntimeError)):  # not a write problem (or a stop): as it is
                raise
            folder = os.path.dirname(os.path.abspath(partial))
            try:
                free = f'{shutil.disk_usage(folder).free / 2**20:.0f} MiB free in {folder}'
            except OSError:
                free = f'free space in {folder} unknown'
            # e.g. a full disk, where torch says only "unexpected pos 53248 vs 53136"
            raise RuntimeError(
                f"cannot write the checkpoint {filename} ({type(e).__name__}: {e}); {free}. The previous "
                f"checkpoint is intact: free space (or fix the folder's permissions), then resume with --c.") from e
        os.replace(partial, filename)
        if os.name == 'posix':
            fsync_path(os.path.dirname(partial))  # make the rename itself durable

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if not (isinstance(filename_or_checkpoint, str) and os.path.isfile(filename_or_checkpoint)):
            return super().load_checkpoint(filename_or_checkpoint)  # nnU-Net's own handling and errors
        chosen, problem = self._readable_checkpoint(filename_or_checkpoint)
        super().load_checkpoint(chosen)
        final = os.path.basename(filename_or_checkpoint) == CHECKPOINT_NAMES[0] and chosen != filename_or_checkpoint
        self._final_unreadable = (f"{filename_or_checkpoint} cannot be read ({problem}); the model loaded instead "
                                  f"is {os.path.basename(chosen)} (epoch {self.current_epoch})") if final else None
        if chosen != filename_or_checkpoint:
            self.print_to_log_file(
                f"WARNING: {filename_or_checkpoint} cannot be read ({problem}); it was probably torn by an "
                f"interrupted write. Loaded {os.path.basename(chosen)} instead, the newest readable checkpoint "
                f"(epoch {self.current_epoch}).")

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self._final_unreadable:
            raise NoReadableCheckpoint(
                f"error: not validating: {self._final_unreadable}, and its results would be reported as the "
                f"final model's. Resume the training with --c (it continues from that checkpoint and writes a new "
                f"checkpoint_final.pth, then validates), or validate the best checkpoint with --val --val_best.")
        return super().perform_actual_validation(save_probabilities)

    @staticmethod
    def _readable_checkpoint(requested: str) -> tuple[str, str | None]:
        """``(requested, None)`` if it can be read, else the newest readable checkpoint beside it and the
        requested file's problem; raises :class:`NoReadableCheckpoint` if there is none."""
        folder, name = os.path.split(os.path.abspath(requested))
        problems = {name: checkpoint_problem(requested)}
        if problems[name] is None:
            return requested, None
        others = [os.path.join(folder, n) for n in CHECKPOINT_NAMES if name in CHECKPOINT_NAMES and n != name]
        for candidate in sorted(filter(os.path.isfile, others), key=os.path.getmtime, reverse=True):
            problems[os.path.basename(candidate)] = checkpoint_problem(candidate)
            if problems[os.path.basename(candidate)] is None:
                return candidate, problems[name]
        listing = '; '.join(f'{n}: {p}' for n, p in problems.items())
        raise NoReadableCheckpoint(
            f"error: no readable checkpoint in {folder} ({listing}). Restore a checkpoint from a backup, or start "
            f"this fold afresh: move the folder away and run nnUNetv2_train without --c.")


class nnUNetTrainerExtBase(CrashSafeCheckpoints, nnUNetTrainer):
    """nnU-Net's trainer with the light decoder's supervision: the ``min(4, n_stages-1)`` finest
    outputs, weighted ``(8, 4, 2, 1)/15`` on nnU-Net's own CE+Dice (or BCE+Dice for regions, with the
    ignore label handled as upstream). Subclasses override only ``build_network_architecture``;
    their networks return exactly ``len(self._get_deep_supervision_scales())`` outputs.
    """

    def _get_deep_supervision_scales(self):
        scales = super()._get_deep_supervision_scales()
        return None if scales is None else scales[:NUM_DS_OUTPUTS]

    def _build_loss(self):
        with np.errstate(invalid='ignore'):  # nnU-Net's own weights, replaced below, are 0/0 for one output
            loss = super()._build_loss()
        if self.enable_deep_supervision:
            loss.weight_factors = tuple(deep_supervision_weights(len(self._get_deep_supervision_scales())))
        return loss
