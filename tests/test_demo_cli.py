"""The README's main job, `nnunetv2-ext demo`, on the smallest settings: every step runs and the table is written."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest


def test_demo_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k in ('PATH', 'HOME', 'LANG', 'TMPDIR', 'PYTHONPATH')}
    env['OMP_NUM_THREADS'] = '2'
    work = tmp_path / 'demo'
    run = subprocess.run([sys.executable, '-m', 'nnunetv2_ext.cli', 'demo', '--work-dir', str(work), '--epochs', '1',
                          '--iterations', '2', '--num-train', '5', '--device', 'cpu'], env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert '[9/9] nnUNetv2_evaluate_folder nnUNetTrainerLightDecoder_ExtDemo' in run.stdout
    # progress of the long steps after training: final validation and prediction
    assert 'Mean Validation Dice' in run.stdout and 'done with extdemo_ts_000' in run.stdout
    assert '| ours (nnUNetTrainerLightDecoder) |' in run.stdout and '| nnU-Net (nnUNetTrainer) |' in run.stdout
    rows = json.loads((work / 'demo_results.json').read_text())
    assert [r['trainer'] for r in rows] == ['nnUNetTrainer_ExtDemo', 'nnUNetTrainerLightDecoder_ExtDemo']
    for r in rows:
        assert set(r['dice']) == {'1', '2'} and 0 <= r['mean_dice'] <= 1 and r['params'] > 0 and r['train_s'] > 0
    assert (work / 'demo_results.md').read_text().startswith('| trainer |')
    assert len(os.listdir(work / 'predictions' / 'nnUNetTrainerLightDecoder_ExtDemo')) >= 4  # 4 test cases + json


def test_demo_refuses_too_few_training_cases(tmp_path):
    run = subprocess.run([sys.executable, '-m', 'nnunetv2_ext.cli', 'demo', '--work-dir', str(tmp_path),
                          '--num-train', '3'], capture_output=True, text=True)
    assert run.returncode == 1 and "5-fold split needs at least 5 training cases" in run.stdout
    assert 'Traceback' not in run.stdout + run.stderr


def test_step_logs_are_written_line_by_line_and_silence_is_reported(tmp_path):
    """`tail -f` on a step's log shows each line as it is printed; a silent step still says it is running."""
    from nnunetv2_ext.demo.pipeline import StepFailed, run_step

    log = tmp_path / 'step.log'
    seen_while_running = []
    child = 'import time; print("first line", flush=True); time.sleep(2); print("second line")'
    seconds = run_step([sys.executable, '-c', child], dict(os.environ), str(log),
                       on_quiet=lambda s: seen_while_running.append((round(s, 1), log.read_text())), quiet_s=0.3)
    assert seen_while_running and all(text == 'first line\n' for _, text in seen_while_running)
    assert seen_while_running[0][0] >= 0.3 and seconds >= 2
    assert log.read_text() == 'first line\nsecond line\n'
    with pytest.raises(StepFailed, match=f'exited with 3. Full log: {log}'):
        run_step([sys.executable, '-c', 'import sys; print("bad input"); sys.exit(3)'], dict(os.environ), str(log))


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (an exit nobody has reaped yet, e.g. in a container without init)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _kill_all(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_a_step_and_its_workers_end_when_the_process_running_it_is_killed(tmp_path):
    """`kill -9` of the demo (or of any driver of run_step) stops the running nnU-Net step and its workers within
    about a second, instead of leaving them running until the step next prints a line into the closed pipe. The
    descriptors the driver passes (a lock) reach the step through the supervisor."""
    pids = tmp_path / 'pids'
    step = (f'import os, subprocess, time; worker = subprocess.Popen(["sleep", "600"]); '
            f'os.write(int(os.environ["LOCK_FD"]), b"held"); '
            f'open({str(pids)!r} + ".tmp", "w").write(f"{{os.getpid()}} {{worker.pid}}"); '
            f'os.replace({str(pids)!r} + ".tmp", {str(pids)!r}); time.sleep(600)')
    driver = (f'import os, sys; from nnunetv2_ext.demo.pipeline import run_step; '
              f'fd = os.open({str(tmp_path / "lock")!r}, os.O_WRONLY | os.O_CREAT); '
              f'run_step([sys.executable, "-c", {step!r}], {{**os.environ, "LOCK_FD": str(fd)}}, '
              f'{str(tmp_path / "step.log")!r}, pass_fds=[fd])')
    proc = subprocess.Popen([sys.executable, '-c', driver], stdin=subprocess.DEVNULL)
    try:
        assert _wait_for(pids.exists, 60), 'the step did not start'
        command, worker = map(int, pids.read_text().split())
        assert (tmp_path / 'lock').read_text() == 'held'
        assert not _gone(command) and not _gone(worker)
        proc.kill()
        proc.wait()
        assert _wait_for(lambda: _gone(command) and _gone(worker), 10), 'the step outlived its killed driver'
    finally:
        proc.kill()
        _kill_all(map(int, pids.read_text().split()) if pids.exists() else ())


def test_supervisor_passes_the_exit_status_and_refuses_a_bad_command_line(tmp_path):
    """The supervisor's status is the command's (128 + N for a signal N); a bad command line or a command that
    cannot start gets a shell's statuses, not a traceback."""
    sup = [sys.executable, '-m', 'nnunetv2_ext.demo.supervisor', str(os.getpid()), '--']

    def run(argv, **kwargs):  # as run_step starts it: the leader of a new session
        return subprocess.run(argv, start_new_session=True, timeout=60, **kwargs)

    assert run(sup + [sys.executable, '-c', 'import sys; sys.exit(3)']).returncode == 3
    killed = run(sup + [sys.executable, '-c', 'import os, signal; os.kill(os.getpid(), signal.SIGTERM)'])
    assert killed.returncode == 128 + 15
    missing = run(sup + [str(tmp_path / 'no-such-command')], capture_output=True, text=True)
    assert missing.returncode == 127 and 'cannot start' in missing.stderr and 'Traceback' not in missing.stderr
    bad = run([sys.executable, '-m', 'nnunetv2_ext.demo.supervisor', 'x'], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith('usage:')
    for pid in ('\u00b2', '-1'):  # str.isdigit() is true for '²', which int() refuses
        bad = run(sup[:3] + [pid, '--', 'true'], capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.startswith('usage:'), bad.stderr


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_the_workers_of_a_step_killed_by_the_oom_killer_neither_outlive_it_nor_keep_its_driver_waiting(tmp_path):
    """The out-of-memory killer's SIGKILL of the command (nnUNetv2_train) left its augmentation workers running
    (batchgenerators' workers never look for their parent) and holding the step's output pipe: run_step waited
    for the pipe's end forever. The supervisor stops what is left of the group once the command has ended."""
    pids = tmp_path / 'pids'
    step = (f'import os, subprocess, time; worker = subprocess.Popen(["sleep", "600"]); '
            f'open({str(pids)!r} + ".tmp", "w").write(f"{{os.getpid()}} {{worker.pid}}"); '
            f'os.replace({str(pids)!r} + ".tmp", {str(pids)!r}); time.sleep(600)')
    driver = (f'import os, sys; from nnunetv2_ext.demo.pipeline import run_step; '
              f'run_step([sys.executable, "-c", {step!r}], dict(os.environ), {str(tmp_path / "step.log")!r})')
    proc = subprocess.Popen([sys.executable, '-c', driver], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert _wait_for(pids.exists, 60), 'the step did not start'
        command, worker = map(int, pids.read_text().split())
        os.kill(command, signal.SIGKILL)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail('run_step still waits for a step whose command was killed')
        assert 'exited with 137' in err and _wait_for(lambda: _gone(worker), 5), err[-2000:]
    finally:
        proc.kill()
        proc.wait()
        _kill_all(map(int, pids.read_text().split()) if pids.exists() else ())


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
@pytest.mark.parametrize('how', ['supervisor_and_command_killed', 'supervisor_killed_then_ctrl_c'])
def test_a_step_whose_supervisor_is_gone_is_stopped_by_run_step(tmp_path, how):
    """``pkill -9 -f nnUNetv2_train`` matches the supervisor's command line too: supervisor and command die, their
    worker holds the pipe and run_step waited for it forever. A killed supervisor alone, then Ctrl-C: run_step saw
    the supervisor ended, signalled nothing and left the command and its worker running."""
    pids = tmp_path / 'pids'
    step = (f'import os, subprocess, time; worker = subprocess.Popen(["sleep", "600"]); '
            f'open({str(pids)!r} + ".tmp", "w").write(f"{{os.getppid()}} {{os.getpid()}} {{worker.pid}}"); '
            f'os.replace({str(pids)!r} + ".tmp", {str(pids)!r}); time.sleep(600)')
    driver = (f'import os, sys; from nnunetv2_ext.demo.pipeline import run_step; '
              f'run_step([sys.executable, "-c", {step!r}], dict(os.environ), {str(tmp_path / "step.log")!r}, '
              f'quiet_s=0.5)')
    proc = subprocess.Popen([sys.executable, '-c', driver], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert _wait_for(pids.exists, 60), 'the step did not start'
        supervisor, command, worker = map(int, pids.read_text().split())
        os.kill(supervisor, signal.SIGKILL)
        if how == 'supervisor_and_command_killed':
            os.kill(command, signal.SIGKILL)
        else:
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail('run_step still waits for a step whose supervisor was killed')
        assert _wait_for(lambda: _gone(command) and _gone(worker), 5), err[-2000:]
    finally:
        proc.kill()
        proc.wait()
        _kill_all(map(int, pids.read_text().split()) if pids.exists() else ())


# the supervisor with a grace of one second between SIGTERM and SIGKILL
_QUICK_SUPERVISOR = ('import sys; from nnunetv2_ext.demo import supervisor; supervisor.GRACE_S = 1.0; '
                     'sys.exit(supervisor.main())')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_workers_that_ignore_sigterm_are_killed_after_the_grace_once_the_driver_is_gone(tmp_path):
    """kill -9 of the driver: the command ends on SIGTERM, its worker ignores SIGTERM (or takes long); the worker
    gets SIGKILL after the grace instead of running on with the step's pipe and descriptors."""
    pids = tmp_path / 'pids'
    command = (f'import os, subprocess, sys, time; worker = subprocess.Popen([sys.executable, "-c", '
               f'"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]); '
               f'open({str(pids)!r} + ".tmp", "w").write(f"{{os.getpid()}} {{worker.pid}}"); '
               f'os.replace({str(pids)!r} + ".tmp", {str(pids)!r}); time.sleep(600)')
    driver = (f'import os, subprocess, sys, time; subprocess.Popen([sys.executable, "-c", {_QUICK_SUPERVISOR!r}, '
              f'str(os.getpid()), "--", sys.executable, "-c", {command!r}], start_new_session=True); time.sleep(600)')
    proc = subprocess.Popen([sys.executable, '-c', driver], stdin=subprocess.DEVNULL)
    try:
        assert _wait_for(pids.exists, 60), 'the command did not start'
        command_pid, worker = map(int, pids.read_text().split())
        proc.kill()
        proc.wait()
        assert _wait_for(lambda: _gone(command_pid), 5), 'the command outlived its killed driver'
        assert _wait_for(lambda: _gone(worker), 10), 'a worker ignoring SIGTERM outlived the grace'
    finally:
        proc.kill()
        _kill_all(map(int, pids.read_text().split()) if pids.exists() else ())


def _live_group_members(pgid: int) -> list[int]:
    members = []
    for name in (n for n in os.listdir('/proc') if n.isdigit()):
        with contextlib.suppress(OSError):
            with open(f'/proc/{name}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != 'Z':
                members.append(int(name))
    return members


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_a_process_started_while_the_leftovers_are_killed_is_killed_too(tmp_path):
    """A leftover that starts another process between the supervisor's scan of /proc and its SIGKILL (a pool
    replacing a worker, a SIGTERM handler running a tool): the supervisor ended with that process running, holding
    the step's pipe, so run_step waited for it. Here the scan itself starts one, right after it has looked."""
    supervisor = ('import subprocess, sys; from nnunetv2_ext.demo import supervisor; supervisor.GRACE_S = 0.1\n'
                  'scan, calls = supervisor._others_in_group, []\n'
                  'def late_start():\n'
                  '    others = scan(); calls.append(others)\n'
                  '    if len(calls) == 2: subprocess.Popen(["sleep", "600"])  # after the scan, before SIGKILL\n'
                  '    return others\n'
                  'supervisor._others_in_group = late_start\n'
                  'sys.exit(supervisor.main())')
    worker = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print("ready", flush=True); time.sleep(600)'
    command = (f'import subprocess, sys; w = subprocess.Popen([sys.executable, "-c", {worker!r}], '
               f'stdout=subprocess.PIPE, text=True); assert w.stdout.readline() == "ready\\n"')
    sup = subprocess.Popen([sys.executable, '-c', supervisor, str(os.getpid()), '--', sys.executable, '-c', command],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        assert sup.wait(timeout=30) == 0
        assert _wait_for(lambda: not _live_group_members(sup.pid), 2), _live_group_members(sup.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sup.pid, signal.SIGKILL)
        if sup.poll() is None:
            sup.kill()
            sup.wait()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_a_worker_ending_on_its_own_after_the_command_is_left_alone(tmp_path):
    """multiprocessing's resource tracker outlives nnU-Net's commands by a few milliseconds (it ends when their pipe
    closes): it got SIGTERM (which it ignores) and the step ended 0.5 s later, after half the demo's steps."""
    marker = tmp_path / 'sigterm'
    worker = (f'import signal, time; signal.signal(signal.SIGTERM, lambda *a: open({str(marker)!r}, "w").close()); '
              f'print("ready", flush=True); time.sleep(0.2)')
    command = (f'import subprocess, sys; w = subprocess.Popen([sys.executable, "-c", {worker!r}], '
               f'stdout=subprocess.PIPE, text=True); assert w.stdout.readline() == "ready\\n"')
    sup = subprocess.Popen([sys.executable, '-m', 'nnunetv2_ext.demo.supervisor', str(os.getpid()), '--',
                            sys.executable, '-c', command], start_new_session=True)
    try:
        assert sup.wait(timeout=30) == 0 and not marker.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sup.pid, signal.SIGKILL)
        sup.wait()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc, PR_SET_CHILD_SUBREAPER')
def test_a_zombie_nobody_reaps_does_not_hold_up_the_step(tmp_path):
    """In a container whose first process reaps nothing, an exited worker of the command stays a zombie in the
    group: it is no leftover to wait for (SIGTERM, then SIGKILL 30 s later, cannot end it)."""
    driver = ('import ctypes, os, subprocess, sys, time\n'
              'ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come here, never reaped\n'
              'command = "import os, subprocess, time; subprocess.Popen([\'true\']); time.sleep(0.3); os._exit(0)"\n'
              'sup = subprocess.Popen([sys.executable, "-m", "nnunetv2_ext.demo.supervisor", str(os.getpid()), "--",\n'
              '                        sys.executable, "-c", command], start_new_session=True)\n'
              'start = time.monotonic(); code = sup.wait(); print(code, round(time.monotonic() - start, 1))')
    run = subprocess.run([sys.executable, '-c', driver], capture_output=True, text=True, timeout=120)
    code, seconds = run.stdout.split()
    assert code == '0' and float(seconds) < 10, (run.stdout, run.stderr)


def test_a_sigterm_sent_to_the_supervisor_alone_reaches_the_command(tmp_path):
    """``kill SUPERVISOR_PID`` (what run_step sends, what `ps` shows a user) asks the command to stop, so it can end
    cleanly, instead of nothing for the grace and then SIGKILL; at once, not at the next check of the parent (0.5 s:
    Ctrl-C of the demo took that long more than before)."""
    marker = tmp_path / 'stopped'
    command = (f'import signal, sys, time\n'
               f'def stop(signum, frame):\n    open({str(marker)!r}, "w").write(str(signum)); sys.exit(5)\n'
               f'signal.signal(signal.SIGTERM, stop); print("ready", flush=True); time.sleep(600)')
    sup = subprocess.Popen([sys.executable, '-m', 'nnunetv2_ext.demo.supervisor', str(os.getpid()), '--',
                            sys.executable, '-c', command], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert sup.stdout.readline() == 'ready\n'
        sent = time.monotonic()
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=10) == 5 and marker.read_text() == str(int(signal.SIGTERM))
        assert time.monotonic() - sent < 0.3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sup.pid, signal.SIGKILL)
        sup.wait()


def test_a_supervisor_run_inside_its_callers_group_refuses_to_run(tmp_path):
    """Run by a script (not as a group leader, as run_step starts it), stopping "its group" stopped its caller and
    the caller's other children; it refuses to run instead, whatever PARENT_PID says."""
    script = ('sleep 30 & "$0" -m nnunetv2_ext.demo.supervisor $$ -- "$0" -c pass; echo "caller still here $?"; '
              'kill -0 $! && echo "sibling still here"; kill $!')
    run = subprocess.run(['sh', '-c', script, sys.executable], capture_output=True, text=True, start_new_session=True,
                         timeout=60)
    assert run.stdout == 'caller still here 2\nsibling still here\n', (run.returncode, run.stderr)
    assert 'must lead its own process group' in run.stderr, run.stderr
    run = subprocess.run(['sh', '-c', f'"$0" -m nnunetv2_ext.demo.supervisor 1 -- sleep 5; echo "caller still here $?"',
                          sys.executable], capture_output=True, text=True, start_new_session=True, timeout=60)
    assert run.stdout == 'caller still here 2\n', (run.returncode, run.stderr)


# a command that reports each SIGINT/SIGTERM it gets, and ends 1 s after the first (5 s without one)
_COUNTS_SIGNALS = ('import signal, sys, time\n'
                   'got = []\n'
                   'def on(signum, frame): got.append(signum)\n'
                   'signal.signal(signal.SIGINT, on); signal.signal(signal.SIGTERM, on)\n'
                   'print("ready", flush=True)\n'
                   'end = time.monotonic() + 5\n'
                   'while not got and time.monotonic() < end: time.sleep(0.05)\n'
                   'time.sleep(1); print("signals:", got, flush=True)')


def _ctrl_c_in_a_terminal(argv: list[str]) -> str:
    """Runs ``argv`` as a session leader with a new pseudo-terminal; types Ctrl-C once "ready" shows; its output."""
    import fcntl
    import pty
    import select
    import termios

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    out, typed, end = b'', False, time.monotonic() + 30
    try:
        while time.monotonic() < end and b'end\r\n' not in out:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    out += os.read(master, 1000)
                except OSError:  # all of them closed the terminal
                    break
            if not typed and b'ready' in out:
                os.write(master, b'\x03')
                typed = True
        return out.decode().replace('\r\n', '\n')
    finally:
        os.close(master)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='TIOCSCTTY as Linux has it')
def test_ctrl_c_in_a_terminal_reaches_the_command_once(tmp_path):
    """Run as a terminal's foreground job (an interactive shell gives it a group of its own), the command got Ctrl-C
    twice: from the terminal, which signals the whole foreground group, and passed on by the supervisor."""
    sup = [sys.executable, "-m", "nnunetv2_ext.demo.supervisor"]
    out = _ctrl_c_in_a_terminal(sup + [str(os.getpid()), '--', sys.executable, '-c', _COUNTS_SIGNALS])
    assert 'signals: [2]\n' in out, out


def test_dataset_rewrite_is_whole_and_a_silent_write_failure_is_caught(tmp_path, monkeypatch):
    """The demo's dataset is published as a whole: fewer cases leave no stale ones; an image that SimpleITK
    writes empty without an error (a full disk) is an OSError and the previous dataset stays complete."""
    import SimpleITK as sitk

    from nnunetv2_ext.demo.dataset import write_dataset

    root = write_dataset(str(tmp_path), num_train=7, num_test=1, shape=(8, 8, 8))
    assert write_dataset(str(tmp_path), num_train=5, num_test=1, shape=(8, 8, 8)) == root
    assert sorted(os.listdir(os.path.join(root, 'labelsTr'))) == [f'extdemo_tr_{i:03d}.nii.gz' for i in range(5)]
    before = {n: os.path.getsize(os.path.join(root, 'imagesTr', n)) for n in os.listdir(os.path.join(root, 'imagesTr'))}

    monkeypatch.setattr(sitk, 'WriteImage', lambda image, path: open(path, 'wb').close())
    with pytest.raises(OSError, match='could not write imagesTr/extdemo_tr_000_0000.nii.gz of .*Dataset987_ExtDemo '
                                      '.is the disk full'):
        write_dataset(str(tmp_path), num_train=6, num_test=1, shape=(8, 8, 8))
    assert {n: os.path.getsize(os.path.join(root, 'imagesTr', n)) for n in os.listdir(os.path.join(root, 'imagesTr'))} \
        == before and json.load(open(os.path.join(root, 'dataset.json')))['numTraining'] == 5
    assert os.listdir(tmp_path) == [os.path.basename(root)]
