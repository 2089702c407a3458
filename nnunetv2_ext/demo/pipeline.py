"""Driving nnU-Net's real command-line tools in subprocesses (used by the demo and the e2e tests)."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from nnunetv2_ext.demo import supervisor
from nnunetv2_ext.publish import write_atomically


def nnunet_env(work_dir: str, base: dict | None = None) -> dict:
    """``base`` (default: this process's env) with nnU-Net's three folders under ``work_dir``, unbuffered."""
    env = dict(os.environ if base is None else base)
    env['PYTHONUNBUFFERED'] = '1'  # progress lines arrive as they are printed
    for var, sub in (('nnUNet_raw', 'nnUNet_raw'), ('nnUNet_preprocessed', 'nnUNet_preprocessed'),
                     ('nnUNet_results', 'nnUNet_results')):
        env[var] = os.path.join(work_dir, sub)
        os.makedirs(env[var], exist_ok=True)
    return env


class StepFailed(RuntimeError):
    """An nnU-Net command exited non-zero; the message has its command line, log file and last lines."""


def _pump(stream, lines: queue.Queue) -> None:
    """Puts each line of ``stream`` into ``lines``, then ``None`` at its end."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (the command and its workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _stop_orphaned_group(proc: subprocess.Popen, pump: threading.Thread) -> None:
    """The supervisor has ended (``kill -9``, ``pkill -f`` of the command line, which the supervisor's shares; or no
    /proc to find the command's leftovers) while something still holds the step's pipe: the command or its workers,
    in its group, which nothing else stops. SIGTERM to the group, SIGKILL 30 s later."""
    pump.join(1.0)  # its end of the pipe, the supervisor ended just now
    for sig, seconds in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
        if not pump.is_alive():
            return
        _signal_group(proc, sig)
        pump.join(seconds)


def run_step(cmd: Sequence[str], env: dict, log_path: str, on_line: Callable[[str], None] | None = None,
             on_quiet: Callable[[float], None] | None = None, quiet_s: float = 20.0,
             pass_fds: Sequence[int] = ()) -> float:
    """Runs ``cmd``, writing its output to ``log_path`` line by line as it arrives (``tail -f`` shows it) and
    passing each line to ``on_line``; ``on_quiet(seconds since start)`` runs after every ``quiet_s`` seconds
    without output; ``pass_fds``: open file descriptors the command inherits (e.g. one holding a lock, so
    the lock lasts as long as the command even if this process is killed). Returns the step's seconds.

    Raises :class:`StepFailed` naming the command, the log and its last 30 lines. If this process is stopped
    meanwhile (Ctrl-C, or SIGTERM turned into SystemExit), the command is stopped too, not left running; if it
    is killed (SIGKILL), :mod:`nnunetv2_ext.demo.supervisor`, which runs the command, stops it within a second.
    """
    start = time.perf_counter()
    tail: list[str] = []
    lines: queue.Queue = queue.Queue()
    with open(log_path, 'w', buffering=1) as log:
        # a session of its own: stopping the step stops the command's workers too (nnU-Net's augmentation and
        # export processes), not only the command; the supervisor (standard library only: -I -S) stops them
        # all if this process dies without doing so
        supervised = [sys.executable, '-I', '-S', supervisor.__file__, str(os.getpid()), '--', *cmd]
        proc = subprocess.Popen(supervised, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, pass_fds=tuple(pass_fds), start_new_session=True)
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        pump.start()
        try:
            while True:
                try:
                    line = lines.get(timeout=quiet_s)
                except queue.Empty:
                    if proc.poll() is not None:  # the supervisor is gone, yet the pipe is held
                        _stop_orphaned_group(proc, pump)
                    if on_quiet is not None:
                        on_quiet(time.perf_counter() - start)
                    continue
                if line is None:
                    break
                log.write(line)
                log.flush()
                tail = (tail + [line.rstrip()])[-30:]
                if on_line is not None:
                    on_line(line.rstrip())
            code = proc.wait()
        finally:
            if proc.poll() is None:  # stopped while the command runs: stop it and its workers too
                with contextlib.suppress(ProcessLookupError):  # the supervisor passes it on to the group once
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
            elif pump.is_alive():  # stopped after the supervisor ended, not its group
                _stop_orphaned_group(proc, pump)
    if code != 0:
        raise StepFailed(f"`{' '.join(cmd)}` exited with {code}. Full log: {log_path}\n--- last lines ---\n"
                         + '\n'.join(tail))
    return time.perf_counter() - start


def nnunet_command(name: str) -> list[str]:
    """The console script ``name`` next to this interpreter (falls back to PATH)."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return [candidate] if os.path.exists(candidate) else [name]


# nnU-Net's nnUNetPlannerResEncM: residual blocks per encoder stage (6 from the fourth stage on), one convolution
# per decoder stage (nnunetv2/experiment_planning/experiment_planners/residual_unets/residual_encoder_unet_planners.py)
RESENC_M_BLOCKS = (1, 3, 4, 6)


def as_resenc_m(configuration: dict) -> dict:
    """A copy of a plans configuration (e.g. ``plans['configurations']['3d_fullres']``) whose network is nnU-Net's
    ResEnc-M (``ResidualEncoderUNet``, residual blocks per encoder stage 1, 3, 4, 6, 6, …, one convolution per
    decoder stage), with the same patch, topology and widths: the architecture ``nnUNetPlannerResEncM`` plans,
    without its own choice of patch and widths (32…320 for 8 GB)."""
    cfg = copy.deepcopy(configuration)
    arch = cfg['architecture']
    kwargs = arch['arch_kwargs']
    n = kwargs['n_stages']
    arch['network_class_name'] = 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
    kwargs.pop('n_conv_per_stage', None)
    kwargs['n_blocks_per_stage'] = [RESENC_M_BLOCKS[min(s, len(RESENC_M_BLOCKS) - 1)] for s in range(n)]
    kwargs['n_conv_per_stage_decoder'] = [1] * (n - 1)
    return cfg


# ``NAME@variant`` (bench_networks.py, the anatomy drivers): the same plans with another network of nnU-Net's
NETWORK_VARIANTS: dict[str, Callable[[dict], dict]] = {'resenc_m': as_resenc_m}


def write_small_plans(preprocessed_dataset_dir: str, source: str = 'nnUNetPlans', target: str = 'nnUNetSmallPlans',
                      configuration: str = '3d_fullres', base_features: int = 8, max_features: int = 64,
                      network: Callable[[dict], dict] | None = None) -> str:
    """Copies plans ``source`` to ``target`` with ``features_per_stage = min(base·2^s, max)`` and, with
    ``network`` (e.g. :func:`as_resenc_m`), that function applied to ``configuration``.

    The preprocessed data is shared (same ``data_identifier``), so nothing is preprocessed again.
    Returns the new plans identifier.
    """
    with open(os.path.join(preprocessed_dataset_dir, f'{source}.json')) as f:
        plans = json.load(f)
    plans['plans_name'] = target
    arch = plans['configurations'][configuration]['architecture']['arch_kwargs']
    arch['features_per_stage'] = [min(base_features * 2 ** s, max_features) for s in range(arch['n_stages'])]
    if network is not None:
        plans['configurations'][configuration] = network(plans['configurations'][configuration])
    write_atomically(os.path.join(preprocessed_dataset_dir, f'{target}.json'), json.dumps(plans, indent=2))
    return target


def foreground_dice(summary_json: str) -> tuple[float, dict[str, float]]:
    """``(mean foreground Dice, {label: Dice})`` from ``nnUNetv2_evaluate_folder``'s summary.json."""
    with open(summary_json) as f:
        summary = json.load(f)
    per_class = {str(k): float(v['Dice']) for k, v in summary['mean'].items()}
    return float(summary['foreground_mean']['Dice']), per_class
