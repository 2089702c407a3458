"""A tiny dataset driven through nnU-Net's real commands in a clean environment (shared by the CLI tests).

Only PATH/HOME/LANG/TMPDIR/PYTHONPATH pass through, so our trainers are found solely via the startup hook;
the user's own trainer module sits in a folder that ``nnUNet_extTrainer`` names, as a user would set it up.
"""
from __future__ import annotations

import os

import torch

from nnunetv2_ext.demo.dataset import write_dataset
from nnunetv2_ext.demo.pipeline import foreground_dice, nnunet_command, nnunet_env, run_step, write_small_plans


class TinyCLIRun:
    def __init__(self, tmp_path, user_module: str, user_code: str, dataset_id: int, name: str,
                 shape: tuple[int, int, int], num_test: int = 1, threads: str = '1', configuration: str = '3d_fullres',
                 **env_extra: str):
        self.tmp = tmp_path
        self.configuration = configuration  # nnU-Net configuration planned, trained and predicted
        self.user_dir = tmp_path / 'user_trainers'
        self.user_dir.mkdir()
        (self.user_dir / f'{user_module}.py').write_text(user_code)
        base = {k: v for k, v in os.environ.items() if k in ('PATH', 'HOME', 'LANG', 'TMPDIR', 'PYTHONPATH')}
        base.update(nnUNet_extTrainer=str(self.user_dir), nnUNet_compile='f', nnUNet_n_proc_DA='1',
                    nnUNet_def_n_proc='1', OMP_NUM_THREADS=threads, **env_extra)
        self.env = nnunet_env(str(tmp_path), base)
        self.logs = tmp_path / 'logs'
        self.logs.mkdir()
        self.dataset_id = dataset_id
        self.dataset = f'Dataset{dataset_id:03d}_{name}'
        self.raw = write_dataset(self.env['nnUNet_raw'], dataset_id, name, num_train=5, num_test=num_test,
                                 shape=shape)

    def run(self, log_name: str, cmd: list[str], **env: str) -> str:
        """Runs ``cmd`` (raising with the log tail on failure); returns its log."""
        path = self.logs / f'{log_name}.log'
        run_step(cmd, {**self.env, **env}, str(path))
        return path.read_text()

    def plan(self, **small_plans) -> str:
        """plan_and_preprocess the configuration; with ``small_plans`` (write_small_plans kwargs) derive narrower
        plans."""
        self.run('plan', nnunet_command('nnUNetv2_plan_and_preprocess') + [
            '-d', str(self.dataset_id), '-c', self.configuration, '-np', '1', '-npfp', '1'])
        if not small_plans:
            return 'nnUNetPlans'
        return write_small_plans(os.path.join(self.env['nnUNet_preprocessed'], self.dataset),
                                 configuration=self.configuration, **small_plans)

    def train(self, trainer: str, plans: str, log_name: str = 'train', resume: bool = False, **env: str) -> str:
        cmd = nnunet_command('nnUNetv2_train') + [str(self.dataset_id), self.configuration, '0', '-tr', trainer, '-p',
                                                  plans, '-device', 'cpu']
        return self.run(log_name, cmd + (['--c'] if resume else []), **env)

    def fold_dir(self, trainer: str, plans: str) -> str:
        return os.path.join(self.env['nnUNet_results'], self.dataset, f'{trainer}__{plans}__{self.configuration}',
                            'fold_0')

    def checkpoint(self, trainer: str, plans: str) -> dict:
        return torch.load(os.path.join(self.fold_dir(trainer, plans), 'checkpoint_final.pth'), map_location='cpu',
                          weights_only=False)

    def predict(self, trainer: str, plans: str) -> tuple[str, list[str]]:
        """Predicts imagesTs without TTA; returns the output folder and the predicted files."""
        out = str(self.tmp / 'pred')
        self.run('predict', nnunet_command('nnUNetv2_predict') + [
            '-i', os.path.join(self.raw, 'imagesTs'), '-o', out, '-d', str(self.dataset_id), '-c', self.configuration,
            '-tr', trainer, '-p', plans, '-f', '0', '--disable_tta', '-device', 'cpu', '-npp', '1', '-nps', '1'])
        return out, sorted(f for f in os.listdir(out) if f.endswith('.nii.gz'))

    def evaluate(self, out: str) -> tuple[float, dict[str, float]]:
        self.run('evaluate', nnunet_command('nnUNetv2_evaluate_folder') + [
            os.path.join(self.raw, 'labelsTs'), out, '-djfile', os.path.join(out, 'dataset.json'), '-pfile',
            os.path.join(out, 'plans.json')])
        return foreground_dice(os.path.join(out, 'summary.json'))
