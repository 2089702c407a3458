"""Real-anatomy benchmark: nnU-Net's baseline vs our trainers on brain templates, identical settings.

    python benchmarks/anatomy_benchmark.py --work-dir /tmp/anatomy --epochs 8 --iterations 25 \
        --folds 0 1 2 3 4 --jobs 2 -tr nnUNetTrainer nnUNetTrainerLightDecoder nnUNetTrainerGLSP

Steps (stock nnU-Net commands; see nnunetv2_ext/anatomy.py for the data):
nnunetv2-ext anatomy-dataset (train: deformed MNI152 + ICBM 2009a, test: Colin27 unaltered) ->
nnUNetv2_plan_and_preprocess -> plans with widths capped for a CPU (nnUNetSmallPlans, same for all) ->
nnUNetv2_train per trainer and fold (short-schedule subclasses ``<Trainer>_Anatomy`` written to
<work-dir>/schedule_trainers, identical schedules; ``--jobs`` runs several at once) ->
nnUNetv2_predict on Colin27 (ensemble of the trained folds) -> nnUNetv2_evaluate_folder ->
nnunetv2-ext compare (the folds' validation results) -> nnunetv2-ext benchmark on the same plans.
Results (``--name``, default anatomy_results): <work-dir>/NAME.{md,json}, <work-dir>/NAME_compare/,
<work-dir>/cost/.

A trainer may carry attribute overrides, for ablations: ``nnUNetTrainerPVTGDLA_EncRefine:attn_weight=0``
trains a subclass with ``attn_weight = 0`` (class name ``nnUNetTrainerPVTGDLA_EncRefine__attn_weight0_Anatomy``).
They are set on the class and again on the trainer after its ``__init__``, so values nnU-Net's trainers set
there (``initial_lr``, ``weight_decay``) can be overridden too; the schedule (epochs, iterations) is refused.
``nnUNetTrainer@resenc_m`` trains on the run's narrowed plans with nnU-Net's ResEnc-M network instead
(``ResidualEncoderUNet``, residual blocks per encoder stage 1, 3, 4, 6, …; same patch and widths; plans
``nnUNetSmallResEncMPlans``): nnU-Net's residual-encoder baseline at the benchmark's size, for trainers that build
the network their plans name (refused on ours). Its predictions, logs and records are named
``<class>@resenc_m``; ``nnunetv2-ext compare`` (one plans identifier) covers the trainers on the baseline's plans.
Folds whose ``checkpoint_final.pth`` exists are not trained again, so a second invocation on the same
work dir (other trainers, more folds) reuses what is there.
Validation cases are deformed copies of the training subjects (optimistic); the Colin27 Dice is the honest
number.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from nnunetv2_ext.benchmark import BenchmarkError, find_trainer
from nnunetv2_ext.demo.pipeline import (NETWORK_VARIANTS, foreground_dice, nnunet_command, nnunet_env, run_step,
                                        write_small_plans)
from nnunetv2_ext.env_options import EnvOptionError, env_int
from nnunetv2_ext.publish import write_atomically
from nnunetv2_ext.trainers.base import CHECKPOINT_NAMES

DATASET_ID = 990
DATASET = f'Dataset{DATASET_ID}_BrainTemplates'
# what the short-schedule subclasses set from the run's options (after any override, so not overridable)
SCHEDULE_ATTRS = ('num_epochs', 'num_iterations_per_epoch', 'num_val_iterations_per_epoch', 'save_every')
SCHEDULE_FILE = 'anatomy_schedule.json'  # in a fold folder: the schedule and widths it was trained with
TRAIN_LOCK = '.anatomy_train.lock'  # in a fold folder: held (flock) while a driver trains, resumes or validates it
# ``Trainer@variant``: the run's narrowed plans with another network of nnU-Net's (NETWORK_VARIANTS), written as
PLANS_VARIANTS = {'resenc_m': 'nnUNetSmallResEncMPlans'}

SCHEDULE_MODULE = '''
import os
import torch
import nnunetv2_ext.trainers
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_ext.trainers.base import CrashSafeCheckpoints


def _short(base_name, name, overrides):
    base = nnUNetTrainer if base_name == 'nnUNetTrainer' else getattr(nnunetv2_ext.trainers, base_name)
    # every trainer of the benchmark writes its checkpoints atomically (the stock one too: same content)
    bases = (base,) if issubclass(base, CrashSafeCheckpoints) else (CrashSafeCheckpoints, base)

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device('cuda')):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in overrides.items():  # also what nnU-Net's __init__ sets (initial_lr, weight_decay)
            setattr(self, key, value)
        self.num_epochs = int(os.environ['ANATOMY_EPOCHS'])
        self.num_iterations_per_epoch = int(os.environ['ANATOMY_ITERS'])
        self.num_val_iterations_per_epoch = 5
        self.save_every = 1  # checkpoint_latest after every epoch: a killed fold resumes with --c
        if os.environ.get('ANATOMY_THREADS'):  # nnUNetv2_train -device cpu takes every core otherwise
            torch.set_num_threads(int(os.environ['ANATOMY_THREADS']))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        # ANATOMY_NO_MIRROR_AXIS: the left-right axis of a dataset with left and right classes; mirroring along it
        # (augmentation, and test-time mirroring in validation and prediction) would swap their meaning
        out = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
        if os.environ.get('ANATOMY_NO_MIRROR_AXIS') and out[3] is not None:
            axes = tuple(a for a in out[3] if a != int(os.environ['ANATOMY_NO_MIRROR_AXIS']))
            self.inference_allowed_mirroring_axes = axes
            out = (*out[:3], axes)
        return out

    methods = {'__init__': __init__,
               'configure_rotation_dummyDA_mirroring_and_inital_patch_size':
                   configure_rotation_dummyDA_mirroring_and_inital_patch_size}
    return type(name, bases, {**methods, '__module__': __name__, **overrides})
'''


def mean_seconds(times: list[float | None]) -> float | None:
    """The mean training seconds per fold; None when some fold has no time (trained in parts, or reused)."""
    return None if not times or None in times else sum(times) / len(times)


def builds_plans_network(trainer: str) -> bool:
    """Whether nnU-Net trainer class ``trainer`` builds the network its plans name (nnU-Net's own
    ``build_network_architecture``), so that a plans ``@variant`` changes its network."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cls = find_trainer(trainer)
    return cls.build_network_architecture is nnUNetTrainer.build_network_architecture  # a staticmethod in nnU-Net


class TrainerSpec:
    """``Base`` or ``Base:attr=value,attr=value`` (values are Python literals) -> a short-schedule subclass;
    a final ``@variant`` (``PLANS_VARIANTS``: ``@resenc_m``) trains it on the run's plans with that network of
    nnU-Net's instead of the plans' own (``nnUNetTrainer@resenc_m``: nnU-Net's ResEnc-M baseline, same patch and
    widths; only for trainers that build the network the plans name, checked by :class:`Benchmark`). ``key``
    names the spec's predictions, logs and records (class name + ``@variant``)."""

    def __init__(self, text: str):
        head, at, variant = text.rpartition('@') if '@' in text else (text, '', '')
        if at and variant not in PLANS_VARIANTS:
            raise ValueError(f"unknown plans variant '@{variant}' in {text!r}: expected Base[:attr=value,...]@variant "
                             f"with the variant last, one of {', '.join('@' + v for v in PLANS_VARIANTS)}")
        self.variant = variant
        base, _, rest = head.partition(':')
        if not re.fullmatch(r'[A-Za-z_]\w*', base):
            raise ValueError(f'bad trainer name {base!r} in {text!r}')
        self.base = base
        self.overrides: dict[str, object] = {}
        for item in filter(None, rest.split(',')):
            key, eq, value = item.partition('=')
            if not eq or not re.fullmatch(r'[A-Za-z_]\w*', key.strip()):
                raise ValueError(f'bad override {item!r} in {text!r}: expected attr=value')
            if key.strip() in SCHEDULE_ATTRS:
                raise ValueError(f'override {item!r} in {text!r}: the schedule is the run\'s (--epochs, '
                                 '--iterations), the same for every trainer')
            try:
                self.overrides[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise ValueError(f'bad override value {value!r} in {text!r}: expected a Python literal') from None
        suffix = ''.join('__' + k + re.sub(r'\W', '_', str(v)) for k, v in self.overrides.items())
        self.class_name = f'{base}{suffix}_Anatomy'
        self.key = self.class_name + at + variant
        self.label = base + (f"[{', '.join(f'{k}={v!r}' for k, v in self.overrides.items())}]"
                             if self.overrides else '') + at + variant

    def source_line(self) -> str:
        return f'{self.class_name} = _short({self.base!r}, {self.class_name!r}, {self.overrides!r})\n'


def write_schedule_modules(folder: str, specs: list[TrainerSpec]) -> list[str]:
    """Writes one module per ``<Trainer>_Anatomy`` subclass (nnUNetv2_train finds them via
    ``nnUNet_extTrainer``); modules of earlier invocations on the same folder stay usable."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for spec in specs:
        paths.append(os.path.join(folder, f'{spec.class_name}.py'))
        write_atomically(paths[-1], SCHEDULE_MODULE + '\n' + spec.source_line())
    return paths


def add_arguments(ap: argparse.ArgumentParser, default_cases: int) -> None:
    """The options every real-anatomy benchmark shares (trainers, schedule, plans widths, output)."""
    ap.add_argument('--work-dir', required=True)
    ap.add_argument('-tr', '--trainers', nargs='+', default=['nnUNetTrainer', 'nnUNetTrainerLightDecoder'],
                    help='trainer class names, optionally with overrides: Name:attr=value,attr=value')
    ap.add_argument('--baseline', default=None, help='trainer (as written in -tr) for the paired comparison '
                                                     '(default: the first)')
    ap.add_argument('--jobs', type=int, default=1, help='trainings run at once (each gets cores/jobs threads)')
    ap.add_argument('--epochs', type=int, default=20)
    ap.add_argument('--iterations', type=int, default=50)
    ap.add_argument('--cases-per-subject', type=int, default=default_cases)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--base-features', type=int, default=16, help='plans widths min(base * 2^s, max)')
    ap.add_argument('--max-features', type=int, default=128)
    ap.add_argument('--no-cost', action='store_true', help='skip nnunetv2-ext benchmark')


class Benchmark:
    """One benchmark run on ``Dataset<dataset_id>``: nnU-Net's folders under ``args.work_dir``, the
    short-schedule trainer classes, and the stock nnU-Net steps, each logged to ``<work-dir>/logs``.

    ``dataset_command`` (nnunetv2-ext arguments) writes the raw dataset when it is not there yet.
    """

    def __init__(self, ap: argparse.ArgumentParser, args: argparse.Namespace, dataset_id: int, dataset: str,
                 dataset_command: list[str]):
        try:
            self.specs = [TrainerSpec(t) for t in args.trainers]
        except ValueError as e:
            ap.error(str(e))
        self.baseline = next((s for s in self.specs if s.label == args.baseline or args.baseline is None), None)
        if self.baseline is None:
            ap.error(f'--baseline {args.baseline!r} is not one of -tr')
        self.args, self.dataset_id, self.dataset = args, dataset_id, dataset
        self.work = os.path.abspath(args.work_dir)
        self.logs = os.path.join(self.work, 'logs')
        os.makedirs(self.logs, exist_ok=True)
        from nnunetv2_ext import discovery
        discovery.register()
        for spec in self.specs:
            try:
                own_network = spec.variant and not builds_plans_network(spec.base)
            except BenchmarkError as e:
                ap.error(str(e))
            if own_network:
                ap.error(f'{spec.label}: @{spec.variant} swaps the network the plans name, and {spec.base} builds '
                         f'its own network instead; use a trainer of nnU-Net\'s, e.g. nnUNetTrainer@{spec.variant}')
        env = nnunet_env(self.work)
        shim = os.path.join(self.work, 'schedule_trainers')
        write_schedule_modules(shim, self.specs)
        env['nnUNet_extTrainer'] = os.pathsep.join([shim, env['nnUNet_extTrainer']])
        env.update(ANATOMY_EPOCHS=str(args.epochs), ANATOMY_ITERS=str(args.iterations), nnUNet_compile='f')
        cores = os.cpu_count() or 1
        try:  # read by every training (its torch threads): a bad value stops here, not in each training
            threads = env_int('ANATOMY_THREADS', 0, 1, 4096)
        except EnvOptionError as e:
            ap.error(str(e))
        env.pop('ANATOMY_THREADS', None)  # the trainings get the validated value, or none (blank = unset)
        if threads:
            env['ANATOMY_THREADS'] = str(threads)
        self.n_proc = str(max(1, min(4, cores // args.jobs)))
        env.setdefault('nnUNet_n_proc_DA', self.n_proc)
        env.setdefault('nnUNet_def_n_proc', self.n_proc)
        if args.jobs > 1:
            env['ANATOMY_THREADS'] = str(max(1, cores // args.jobs))
        self.env = env
        self.ext = [sys.executable, '-m', 'nnunetv2_ext.cli']
        self.raw = os.path.join(env['nnUNet_raw'], dataset)
        if not os.path.isdir(self.raw):
            self.step('dataset', self.ext + dataset_command)
        prep = os.path.join(env['nnUNet_preprocessed'], dataset)
        if not os.path.isfile(os.path.join(prep, 'nnUNetPlans.json')):
            self.step('plan', nnunet_command('nnUNetv2_plan_and_preprocess') + [
                '-d', str(dataset_id), '-c', '3d_fullres', '-np', self.n_proc, '-npfp', self.n_proc])
        self.plans = write_small_plans(prep, base_features=args.base_features, max_features=args.max_features)
        self.variant_plans = {'': self.plans}
        for variant in sorted({s.variant for s in self.specs} - {''}):
            self.variant_plans[variant] = write_small_plans(
                prep, target=PLANS_VARIANTS[variant], base_features=args.base_features,
                max_features=args.max_features, network=NETWORK_VARIANTS[variant])
        self.results = os.path.join(env['nnUNet_results'], dataset)

    def step(self, name: str, cmd: list[str], pass_fds: tuple[int, ...] = ()) -> float:
        """Runs one logged step (``run_step``); ``pass_fds``: descriptors the command inherits."""
        print(f'== {name}', flush=True)
        seconds = run_step(cmd, self.env, os.path.join(self.logs, f'{name}.log'), pass_fds=pass_fds)
        print(f'== {name} done in {seconds:.0f} s', flush=True)
        return seconds

    def plans_of(self, spec: TrainerSpec) -> str:
        """The plans identifier ``spec`` trains with: the run's narrowed plans, or their ``@variant``."""
        return self.variant_plans[spec.variant]

    def plans_text(self) -> str:
        """The run's plans identifiers, as the results name them."""
        return self.plans + ''.join(f' ({plans} for @{v})' for v, plans in self.variant_plans.items() if v)

    def fold_dir(self, spec: TrainerSpec, fold: int) -> str:
        return os.path.join(self.results, f'{spec.class_name}__{self.plans_of(spec)}__3d_fullres', f'fold_{fold}')

    def cost_dir(self, variant: str) -> str:
        """Where ``nnunetv2-ext benchmark`` measures the plans of ``variant`` ('' for the run's plans)."""
        return os.path.join(self.work, 'cost' + (variant and '_' + variant))

    def schedule(self, spec: TrainerSpec) -> dict:
        """What a fold's training depends on besides the data and the trainer: schedule, plans and widths."""
        return {'epochs': self.args.epochs, 'iterations': self.args.iterations, 'plans': self.plans_of(spec),
                'base_features': self.args.base_features, 'max_features': self.args.max_features}

    def _check_schedule(self, spec: TrainerSpec, fold: int) -> None:
        """A fold folder with a checkpoint is reused or resumed only if it was trained with this run's
        schedule (``anatomy_schedule.json``, written when its training started): the folder's name does not
        change with the schedule or the widths. SystemExit naming both otherwise."""
        path = os.path.join(self.fold_dir(spec, fold), SCHEDULE_FILE)
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            recorded = f'unknown ({e.__class__.__name__}: no readable {SCHEDULE_FILE})'
        if recorded != self.schedule(spec):
            raise SystemExit(f'{self.fold_dir(spec, fold)} holds a training with schedule {recorded}, this run asks '
                             f'for {self.schedule(spec)}: use another --work-dir, or delete that folder to train it again')

    @contextlib.contextmanager
    def _fold_lock(self, spec: TrainerSpec, fold: int):
        """Holds the fold folder's ``TRAIN_LOCK`` (an flock: the system drops it when its last holder dies, so
        it is never stale) and yields its descriptor, which the fold's ``nnUNetv2_train`` inherits: a training
        left running by a killed driver still holds it. SystemExit if another run holds it, as two trainings of
        one folder would overwrite each other's checkpoints."""
        os.makedirs(self.fold_dir(spec, fold), exist_ok=True)
        with open(os.path.join(self.fold_dir(spec, fold), TRAIN_LOCK), 'a') as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SystemExit(f'{self.fold_dir(spec, fold)} is being trained by another run (it holds '
                                 f'{TRAIN_LOCK}): wait for that run, or give this one other -tr / -f') from None
            yield f.fileno()

    def train(self, spec: TrainerSpec, fold: int) -> float | None:
        """Trains one fold (seconds), or reuses its ``checkpoint_final.pth`` (recorded seconds or None),
        finishing an interrupted final validation, or resumes an interrupted training from its
        ``checkpoint_latest.pth`` with ``--c`` (None: the time of a training done in parts is not recorded);
        either only if the fold was trained with this run's schedule (see ``_check_schedule``), and only by one
        run at a time (see ``_fold_lock``)."""
        with self._fold_lock(spec, fold) as lock_fd:
            return self._train(spec, fold, (lock_fd,))

    def _train(self, spec: TrainerSpec, fold: int, lock_fds: tuple[int, ...]) -> float | None:
        timing = os.path.join(self.fold_dir(spec, fold), 'anatomy_train_seconds.txt')
        command = nnunet_command('nnUNetv2_train') + [str(self.dataset_id), '3d_fullres', str(fold), '-tr',
                                                      spec.class_name, '-p', self.plans_of(spec), '-device', self.args.device]
        if any(os.path.isfile(os.path.join(self.fold_dir(spec, fold), n)) for n in CHECKPOINT_NAMES):
            self._check_schedule(spec, fold)
        if os.path.isfile(os.path.join(self.fold_dir(spec, fold), 'checkpoint_final.pth')):
            print(f'== train {spec.label} fold {fold}: checkpoint_final.pth exists, not trained again', flush=True)
            if not os.path.isfile(os.path.join(self.fold_dir(spec, fold), 'validation', 'summary.json')):
                # nnU-Net saves checkpoint_final before its final validation: finish an interrupted one
                self.step(f'validate_{spec.key}_fold{fold}', command + ['--val'], lock_fds)
            return float(open(timing).read()) if os.path.isfile(timing) else None
        if os.path.isfile(os.path.join(self.fold_dir(spec, fold), 'checkpoint_latest.pth')):
            # an interrupted training: nnU-Net resumes from its last epoch; the time is that of this part only
            print(f'== train {spec.label} fold {fold}: resuming from checkpoint_latest.pth (--c)', flush=True)
            self.step(f'train_{spec.key}_fold{fold}_resumed', command + ['--c'], lock_fds)
            return None
        os.makedirs(self.fold_dir(spec, fold), exist_ok=True)
        write_atomically(os.path.join(self.fold_dir(spec, fold), SCHEDULE_FILE), json.dumps(self.schedule(spec)))
        seconds = self.step(f'train_{spec.key}_fold{fold}', command, lock_fds)
        write_atomically(timing, f'{seconds:.1f}')
        return seconds

    def train_all(self, folds: list[int]) -> dict[str, float | None]:
        """Every trainer on every fold, ``--jobs`` at a time, fold-major (an early stop leaves whole folds);
        returns each trainer's mean training seconds per fold (None where a reused fold has no record)."""
        tasks = [(s, f) for f in folds for s in self.specs]
        with ThreadPoolExecutor(max(1, self.args.jobs)) as pool:
            seconds = list(pool.map(lambda t: self.train(*t), tasks))
        return {spec.label: mean_seconds([s for (sp, _), s in zip(tasks, seconds) if sp is spec])
                for spec in self.specs}

    def predict_and_evaluate(self, spec: TrainerSpec, folds: list[int], images: str, labels: str, tag: str) -> str:
        """``nnUNetv2_predict`` of ``images`` with the ensemble of ``folds``, then ``nnUNetv2_evaluate_folder``
        against ``labels`` (cases not predicted are skipped); returns the summary.json path."""
        out = os.path.join(self.work, 'predictions', spec.key, tag)
        self.step(f'predict_{spec.key}_{tag}', nnunet_command('nnUNetv2_predict') + [
            '-i', images, '-o', out, '-d', str(self.dataset_id), '-c', '3d_fullres', '-tr', spec.class_name,
            '-p', self.plans_of(spec), '-f', *map(str, folds), '-device', self.args.device])
        self.step(f'evaluate_{spec.key}_{tag}', nnunet_command('nnUNetv2_evaluate_folder') + [
            labels, out, '-djfile', os.path.join(out, 'dataset.json'), '-pfile', os.path.join(out, 'plans.json'),
            '--chill'])
        return os.path.join(out, 'summary.json')

    def compare_peers(self) -> list[TrainerSpec]:
        """The baseline, then the other trainers on its plans: what ``nnunetv2-ext compare`` (which reads one plans
        identifier) compares."""
        return [self.baseline] + [s for s in self.specs if s is not self.baseline and s.variant == self.baseline.variant]

    def compare_note(self, ran: bool) -> str:
        """A line for the results on what ``nnunetv2-ext compare`` left out because of the plans ('' if nothing)."""
        peers = self.compare_peers()
        others = [s.label for s in self.specs if s not in peers]
        if not others:
            return ''
        if not ran:
            return (f'\nValidation comparison (nnunetv2-ext compare) not run: no other trainer on the baseline\'s '
                    f'plans ({self.plans_of(self.baseline)}).\n')
        return (f"\nValidation comparison (nnunetv2-ext compare, one plans identifier): {', '.join(others)} "
                f"left out (other plans).\n")

    def compare_and_cost(self, folds: list[int], name: str, compare: bool = True) -> bool:
        """``nnunetv2-ext compare`` on the folds' validation results (unless ``compare`` is False) of
        :meth:`compare_peers`, and ``nnunetv2-ext benchmark`` (unless ``--no-cost``) on each plans of the run:
        ``<work-dir>/cost`` for the run's plans, ``cost_<variant>`` for a variant's. Returns whether ``compare``
        ran (not with fewer than two peers; :meth:`compare_note` says what it left out)."""
        peers = self.compare_peers()
        ran = compare and len(peers) > 1
        if ran:
            self.step('compare', self.ext + ['compare', '-d', str(self.dataset_id), '-p',
                                             self.plans_of(self.baseline), '-c', '3d_fullres',
                                             '-f', *map(str, folds), '-tr', *[s.class_name for s in peers],
                                             '-o', os.path.join(self.work, f'{name}_compare')])
        if not self.args.no_cost:
            for variant, plans in self.variant_plans.items():
                bases = list(dict.fromkeys(s.base for s in self.specs if s.variant == variant))
                if bases:
                    self.step('benchmark' + (variant and '_' + variant), self.ext + [
                        'benchmark', '-d', str(self.dataset_id), '-p', plans, '-tr', *bases, '--device',
                        self.args.device, '-o', self.cost_dir(variant)])
        return ran

    def write_results(self, name: str, text: str, payload: dict, compared: bool = True) -> None:
        """``<work-dir>/NAME.md`` (``text``) and ``NAME.json`` (``payload`` plus the arguments), atomically;
        ``compared``: ``compare_and_cost`` ran ``nnunetv2-ext compare``."""
        content = json.dumps({'args': vars(self.args), **payload}, indent=2)
        for ext_, data in (('md', text), ('json', content)):
            write_atomically(os.path.join(self.work, f'{name}.{ext_}'), data)
        print(text)
        if compared:
            print(f"paired comparison: {os.path.join(self.work, f'{name}_compare', 'compare.md')}")
        if not self.args.no_cost:
            for variant in sorted({s.variant for s in self.specs}):
                print(f"cost table: {os.path.join(self.cost_dir(variant), 'benchmark.md')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, default_cases=12)
    ap.add_argument('-f', '--folds', nargs='+', type=int, default=[0])
    ap.add_argument('--name', default='anatomy_results',
                    help='results: <work-dir>/NAME.{md,json}, <work-dir>/NAME_compare/ (default anatomy_results)')
    args = ap.parse_args(argv)
    bench = Benchmark(ap, args, DATASET_ID, DATASET,
                      ['anatomy-dataset', '--id', str(DATASET_ID), '--cases-per-subject', str(args.cases_per_subject)])
    train_s = bench.train_all(args.folds)
    rows = []
    fold_tag = '-'.join(map(str, args.folds))
    for spec in bench.specs:
        summary = bench.predict_and_evaluate(spec, args.folds, os.path.join(bench.raw, 'imagesTs'),
                                             os.path.join(bench.raw, 'labelsTs'), f'folds_{fold_tag}')
        test_mean, test_per_class = foreground_dice(summary)
        val = [foreground_dice(os.path.join(bench.fold_dir(spec, f), 'validation', 'summary.json'))[0]
               for f in args.folds]
        rows.append(dict(trainer=spec.label, class_name=spec.class_name, folds=args.folds, train_s=train_s[spec.label],
                         colin27_dice=test_per_class, colin27_mean=test_mean, val_mean_per_fold=val,
                         val_mean=sum(val) / len(val)))
    compared = bench.compare_and_cost(args.folds, args.name)
    table = ['| trainer | train s per fold | Colin27 Dice other-brain | Colin27 Dice grey matter | Colin27 mean | '
             'validation mean over folds (deformed copies) |', '|---|---:|---:|---:|---:|---:|']
    table += [f"| {r['trainer']} | {'—' if r['train_s'] is None else format(r['train_s'], '.0f')} | "
              f"{r['colin27_dice']['1']:.3f} | {r['colin27_dice']['2']:.3f} | {r['colin27_mean']:.3f} | "
              f"{r['val_mean']:.3f} |" for r in rows]
    text = (f"{args.epochs} epochs x {args.iterations} iterations per fold on {args.device}, plans {bench.plans_text()}, "
            f"folds {args.folds} (Colin27: ensemble of these folds).\n\n" + '\n'.join(table) + '\n'
            + bench.compare_note(compared))
    bench.write_results(args.name, text, {'rows': rows}, compared=compared)
    return 0


if __name__ == '__main__':
    sys.exit(main())
