"""Runs one command so that it does not outlive the process that started it.

    python -m nnunetv2_ext.demo.supervisor PARENT_PID -- COMMAND [ARGS ...]

:func:`nnunetv2_ext.demo.pipeline.run_step` starts every nnU-Net step through this, as the leader of a new
session (process group). It runs ``COMMAND`` as its child in that group, next to the command's own workers
(nnU-Net's augmentation and export processes), and checks every :data:`POLL_S` seconds that ``PARENT_PID`` is
still its parent and whether a stop signal arrived. A parent stopped with SIGKILL (``kill -9``, the out-of-memory killer, a batch system's hard
limit) cannot stop the step itself; the supervisor then finds itself re-parented and stops the whole group:
SIGTERM, and SIGKILL for whatever is left after :data:`GRACE_S` seconds. Without it the step ran on until it
next printed a line into the closed pipe (a training epoch or more later), holding its locks and the CPU.

A SIGTERM the supervisor receives (``run_step`` stops a step by sending it SIGTERM) is passed on to the group
once; a SIGINT is not (it comes from a terminal's Ctrl-C, which the whole foreground group has); whatever is
left of the group :data:`GRACE_S` seconds later gets SIGKILL. When the command ends (it exited, or was killed,
e.g. by the out-of-memory killer), the supervisor does not leave its workers running: they hold the command's
output pipe (``run_step`` would wait for its end forever) and inherited descriptors such as a lock; whatever
is left of the group :data:`SETTLE_S` seconds later gets SIGTERM, and SIGKILL after :data:`GRACE_S` seconds
(on Linux, where ``/proc`` lists the group). It refuses to run (status 2) unless it leads its process group,
so that it never signals its caller's. Open file descriptors the parent passed (e.g. one holding a lock) stay
open in the command. The exit status is the command's (128 + N where a signal N ended
it); 2 for a bad command line (or a ``PARENT_PID`` that is not its parent), 127 for a command that cannot be
started, as a shell does.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.05  # seconds between checks of the parent, of stop signals and of leftovers (Popen.wait polls as often)
GRACE_S = 30.0  # seconds between SIGTERM and SIGKILL when the group is stopped
SETTLE_S = 1.0  # seconds the command's workers have to end on their own once it has ended

USAGE = 'usage: python -m nnunetv2_ext.demo.supervisor PARENT_PID -- COMMAND [ARGS ...]'


def _signal_own_group(sig: int) -> None:
    """``sig`` to this process's group: the command, its workers and this process."""
    try:
        os.killpg(os.getpgrp(), sig)
    except ProcessLookupError:  # the group is gone already
        pass


def _others_in_group() -> list[int] | None:
    """The live processes of this process's group other than itself (zombies do not count); None where
    ``/proc`` cannot tell (not Linux)."""
    me, group = os.getpid(), os.getpgrp()
    try:
        names = [name for name in os.listdir('/proc') if name.isdigit()]
    except OSError:
        return None
    if str(me) not in names:
        return None
    others = []
    for name in names:
        try:
            with open(f'/proc/{name}/stat', 'rb') as f:
                fields = f.read().rsplit(b')', 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(name) != me and int(fields[2]) == group and fields[0] != b'Z':
            others.append(int(name))
    return others


def supervise(parent: int, cmd: list[str]) -> int:
    """Runs ``cmd`` in this process's group until it ends; stops the group if ``parent`` is no longer this
    process's parent or a stop signal arrives, and what is left of the group once ``cmd`` has ended. Returns
    ``cmd``'s exit status (128 + N for signal N)."""
    stop_requested: list[int] = []

    def on_signal(signum, frame):  # handled by the loop below
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if os.getpgrp() != os.getpid():  # stopping "its group" would stop its caller's
        print('supervisor: it must lead its own process group (start it in a new session, as run_step does)',
              file=sys.stderr, flush=True)
        return 2
    if stop_requested:  # stopped before the command started
        return 128 + stop_requested[0]
    if os.getppid() != parent:
        print(f'supervisor: {parent} is not its parent (gone already?): {cmd[0]!r} not started', file=sys.stderr,
              flush=True)
        return 2
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
        if deadline is None and (stop_requested or os.getppid() != parent):  # stopped, or the parent died
            deadline = time.monotonic() + GRACE_S
            if stop_requested != [signal.SIGINT]:  # a SIGINT is a terminal's Ctrl-C: the command has it already
                _signal_own_group(signal.SIGTERM)
        elif deadline is not None and time.monotonic() > deadline:
            _signal_own_group(signal.SIGKILL)  # this process too: the parent is gone or stops the group
    # the command has ended; its workers must not outlive it (they hold its output pipe and its descriptors):
    # SIGTERM (unless the group is being stopped already), SIGKILL at the deadline
    killing_since = None
    settled = time.monotonic() + SETTLE_S  # first let what ends on its own end (multiprocessing's resource tracker)
    while deadline is None and time.monotonic() < settled and _others_in_group():
        time.sleep(POLL_S)
    while others := _others_in_group():
        if deadline is None:
            deadline = time.monotonic() + GRACE_S
            _signal_own_group(signal.SIGTERM)
        elif time.monotonic() > deadline:  # then scan again: one may have started another after the scan
            for pid in others:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killing_since = killing_since or time.monotonic()
            if time.monotonic() - killing_since > max(GRACE_S, 1.0):  # SIGKILL cannot end it (uninterruptible)
                break
        time.sleep(POLL_S)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != '--' or not (args[0].isascii() and args[0].isdigit()):
        print(USAGE, file=sys.stderr)
        return 2
    return supervise(int(args[0]), args[2:])


if __name__ == '__main__':
    sys.exit(main())
