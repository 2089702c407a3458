"""Runs one command so that it does not outlive the process that started it.

    python -m nnunetv2_ext.demo.supervisor PARENT_PID -- COMMAND [ARGS ...]

:func:`nnunetv2_ext.demo.pipeline.run_step` starts every nnU-Net step through this, as the leader of a new
session (process group). It runs ``COMMAND`` as its child in that group, next to the command's own workers
(nnU-Net's augmentation and export processes), and checks every :data:`POLL_S` seconds that ``PARENT_PID`` is
still its parent. A parent stopped with SIGKILL (``kill -9``, the out-of-memory killer, a batch system's hard
limit) cannot stop the step itself; the supervisor then finds itself re-parented and stops the whole group:
SIGTERM, and SIGKILL for whatever is left after :data:`GRACE_S` seconds. Without it the step ran on until it
next printed a line into the closed pipe (a training epoch or more later), holding its locks and the CPU.

A SIGTERM or SIGINT the supervisor receives is taken as sent to the group, as ``run_step`` stops a step (the
command has it too): the supervisor waits up to :data:`GRACE_S` seconds for the command to end, then sends
the group SIGKILL. Open file descriptors the parent passed (e.g. one holding a lock) stay open in the
command. The exit status is the command's (128 + N where a signal N ended it); 2 for a bad command line,
127 for a command that cannot be started, as a shell does.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5  # seconds between checks that the parent is alive
GRACE_S = 30.0  # seconds between SIGTERM and SIGKILL when the group is stopped

USAGE = 'usage: python -m nnunetv2_ext.demo.supervisor PARENT_PID -- COMMAND [ARGS ...]'


def _signal_own_group(sig: int) -> None:
    """``sig`` to this process's group: the command, its workers and this process."""
    try:
        os.killpg(os.getpgrp(), sig)
    except ProcessLookupError:  # the group is gone already
        pass


def supervise(parent: int, cmd: list[str]) -> int:
    """Runs ``cmd`` in this process's group until it ends; stops the group if ``parent`` is no longer this
    process's parent or a stop signal arrives. Returns ``cmd``'s exit status (128 + N for signal N)."""
    stop_requested: list[int] = []

    def on_signal(signum, frame):  # the group's signal reached the command too: wait for it to end
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        child = subprocess.Popen(cmd, close_fds=False)  # inheritable descriptors (pass_fds) stay open
    except OSError as e:
        print(f'supervisor: cannot start {cmd[0]!r}: {e}', file=sys.stderr, flush=True)
        return 127
    deadline = None  # when the group gets SIGKILL, once it is being stopped
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if deadline is None and stop_requested:
            deadline = time.monotonic() + GRACE_S
        elif deadline is None and os.getppid() != parent:  # the parent died without stopping the step
            deadline = time.monotonic() + GRACE_S
            _signal_own_group(signal.SIGTERM)
        elif deadline is not None and time.monotonic() > deadline:
            _signal_own_group(signal.SIGKILL)  # this process too: the parent is gone or stops the group
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != '--' or not args[0].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    return supervise(int(args[0]), args[2:])


if __name__ == '__main__':
    sys.exit(main())
