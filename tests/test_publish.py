"""Report sets are published as a whole: a failure or kill never leaves mixed generations or hidden files."""
import json
import math
import os
import subprocess
import sys
import time

import pytest

from nnunetv2_ext.cli import write_report
from nnunetv2_ext.publish import foreign_entries, publish_files, publish_folder


def _plot_text(text: str):
    def plot(report, path):
        with open(path, 'w') as f:
            f.write(text)
    return plot


def _files(folder) -> dict[str, str]:
    return {n: (folder / n).read_text() for n in sorted(os.listdir(folder))}


def _hidden(parent) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith('.')]


def test_a_failure_between_files_keeps_the_previous_set(tmp_path):
    out = tmp_path / 'report'
    write_report(str(out), 'compare', {'v': 1}, 'table 1\n', _plot_text('png 1'), quiet=True)
    old = _files(out)
    assert set(old) == {'compare.json', 'compare.md', 'compare.png'}

    def failing_plot(report, path):  # json and md of the new set are already written
        raise RuntimeError('disk full while plotting')

    with pytest.raises(RuntimeError, match='disk full'):
        write_report(str(out), 'compare', {'v': 2}, 'table 2\n', failing_plot, quiet=True)
    assert _files(out) == old and _hidden(tmp_path) == []
    write_report(str(out), 'compare', {'v': 2}, 'table 2\n', _plot_text('png 2'), quiet=True)
    assert _files(out) == {'compare.json': json.dumps({'v': 2}, indent=2), 'compare.md': 'table 2\n',
                           'compare.png': 'png 2'}
    assert _hidden(tmp_path) == []


def test_a_killed_publication_leaves_the_old_set_and_the_next_one_cleans_up(tmp_path):
    out = tmp_path / 'report'
    write_report(str(out), 'benchmark', {'v': 1}, 'table 1\n', _plot_text('png 1'), quiet=True)
    old = _files(out)
    child = ('import os, signal, sys\n'
             'from nnunetv2_ext.cli import write_report\n'
             'def plot(report, path):\n'
             '    os.kill(os.getpid(), signal.SIGKILL)\n'
             f'write_report({str(out)!r}, "benchmark", {{"v": 2}}, "table 2", plot, quiet=True)\n')
    run = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    assert _files(out) == old
    assert len(_hidden(tmp_path)) == 1  # the dead process's staging folder ...
    write_report(str(out), 'benchmark', {'v': 3}, 'table 3\n', _plot_text('png 3'), quiet=True)
    assert _hidden(tmp_path) == []  # ... is removed by the next publication
    assert _files(out)['benchmark.md'] == 'table 3\n'


def test_a_swap_killed_between_its_renames_is_undone(tmp_path, dead_pid):
    """Killed after `folder -> .folder.previous-PID` and before `staging -> folder`: no folder, the old set aside."""
    out = tmp_path / 'report'
    write_report(str(out), 'compare', {'v': 1}, 'table 1\n', None, quiet=True)
    old = _files(out)
    os.rename(out, tmp_path / f'.report.previous-{dead_pid}')
    publish_files(str(tmp_path / 'other'), {'x.md': lambda p: open(p, 'w').close()})  # an unrelated report
    assert not out.exists() and len(_hidden(tmp_path)) == 1  # leftovers of other names are not touched
    with pytest.raises(RuntimeError):
        publish_files(str(out), {'compare.json': lambda p: (_ for _ in ()).throw(RuntimeError('boom'))})
    assert _files(out) == old and _hidden(tmp_path) == []  # restored, even though the new publication failed


def test_a_shared_folder_keeps_its_other_files(tmp_path):
    (tmp_path / 'README.md').write_text('mine')
    write_report(str(tmp_path), 'glsp_cpu', {'v': 1}, 'table\n', None, quiet=True)
    assert _files(tmp_path)['README.md'] == 'mine' and 'glsp_cpu.md' in _files(tmp_path)
    assert foreign_entries(str(tmp_path), 'glsp_cpu') == ['README.md']
    assert foreign_entries(str(tmp_path / 'missing'), 'glsp_cpu') == []
    assert _hidden(tmp_path) == []


def test_report_json_is_strict(tmp_path):
    report = {'mean': math.nan, 'rows': [{'p': math.inf, 'q': -math.inf, 'ok': 0.5}], 'n': 3}
    write_report(str(tmp_path / 'r'), 'compare', report, 't\n', None, quiet=True)
    text = (tmp_path / 'r' / 'compare.json').read_text()
    assert 'NaN' not in text and 'Infinity' not in text
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f'non-standard JSON constant {c}'))
    assert parsed == {'mean': None, 'rows': [{'p': None, 'q': None, 'ok': 0.5}], 'n': 3}


def test_write_atomically_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    from nnunetv2_ext import publish

    path = tmp_path / 'plans.json'
    publish.write_atomically(str(path), '{"old": 1}')
    monkeypatch.setattr(publish.os, 'replace', lambda *a: (_ for _ in ()).throw(OSError('no space left')))
    with pytest.raises(OSError, match='no space left'):
        publish.write_atomically(str(path), b'{"new": 2}')
    assert path.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ['plans.json']
    monkeypatch.undo()
    publish.write_atomically(str(path), b'{"new": 2}')
    assert path.read_bytes() == b'{"new": 2}' and os.listdir(tmp_path) == ['plans.json']


def test_sigterm_during_publication_leaves_the_old_set_and_nothing_hidden(tmp_path):
    """`kill PID` (SIGTERM) on compare/benchmark: the staging folder is removed on the way out."""
    import signal
    import time

    out = tmp_path / 'report'
    write_report(str(out), 'compare', {'v': 1}, 'table 1\n', _plot_text('png 1'), quiet=True)
    old = _files(out)
    ready = tmp_path / 'ready'
    child = ('import time\n'
             'from nnunetv2_ext.cli import exit_on_sigterm, write_report\n'
             'def plot(report, path):\n'
             f'    open({str(ready)!r}, "w").close()\n'
             '    time.sleep(60)\n'
             'exit_on_sigterm()\n'
             f'write_report({str(out)!r}, "compare", {{"v": 2}}, "table 2", plot, quiet=True)\n')
    proc = subprocess.Popen([sys.executable, '-c', child], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()[1][-2000:]
    os.remove(ready)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert _files(out) == old and _hidden(tmp_path) == []


def test_a_folder_is_replaced_as_a_whole_or_merged_and_left_alone_when_filling_fails(tmp_path):
    out = tmp_path / 'wheels'
    out.mkdir()
    (out / 'stale.whl').write_text('old')

    def fill(staging):
        os.mkdir(os.path.join(staging, 'sub'))
        for name in ('a.whl', 'sub/b.txt'):
            with open(os.path.join(staging, name), 'w') as f:
                f.write(name)

    publish_folder(str(out), fill)
    assert sorted(os.listdir(out)) == ['a.whl', 'sub'] and (out / 'sub' / 'b.txt').read_text() == 'sub/b.txt'

    def failing(staging):
        fill(staging)
        raise OSError('no space left (injected)')

    with pytest.raises(OSError, match='injected'):
        publish_folder(str(out), failing)
    assert sorted(os.listdir(out)) == ['a.whl', 'sub'] and _hidden(tmp_path) == []
    (out / 'sub').rename(out / 'mine')
    publish_folder(str(out), lambda staging: open(os.path.join(staging, 'a.whl'), 'w').close(), merge=True)
    assert sorted(os.listdir(out)) == ['a.whl', 'mine'] and (out / 'a.whl').read_text() == ''
    assert _hidden(tmp_path) == []


def test_a_failed_swap_puts_the_old_folder_back_and_an_own_leftover_does_not_block(tmp_path, monkeypatch):
    out = tmp_path / 'r'
    publish_folder(str(out), lambda staging: open(os.path.join(staging, 'old.txt'), 'w').close())
    rename = os.rename

    def failing_rename(src, dst):
        if os.path.basename(src).startswith('.r.partial-'):
            raise OSError('rename refused (injected)')
        rename(src, dst)

    monkeypatch.setattr(os, 'rename', failing_rename)
    with pytest.raises(OSError, match='injected'):
        publish_folder(str(out), lambda staging: open(os.path.join(staging, 'new.txt'), 'w').close())
    assert os.listdir(out) == ['old.txt'] and _hidden(tmp_path) == []
    monkeypatch.setattr(os, 'rename', rename)
    # a previous folder left under this process's pid (a reused pid, or a removal that failed) is cleaned up
    leftover = tmp_path / f'.r.previous-{os.getpid()}'
    leftover.mkdir()
    (leftover / 'stale.txt').write_text('x')
    publish_folder(str(out), lambda staging: open(os.path.join(staging, 'new.txt'), 'w').close())
    assert os.listdir(out) == ['new.txt'] and _hidden(tmp_path) == []



def test_a_file_in_place_of_the_folder_is_refused_and_kept(tmp_path):
    """``-o notes.txt`` (an existing file): refused before anything is written; the file stays (it was moved to a
    hidden name and never put back)."""
    notes = tmp_path / 'notes.txt'
    notes.write_text('mine')
    with pytest.raises(NotADirectoryError, match='notes.txt exists and is not a folder'):
        publish_folder(str(notes), lambda staging: open(os.path.join(staging, 'r.json'), 'w').close())
    assert notes.read_text() == 'mine' and sorted(os.listdir(tmp_path)) == ['notes.txt']


def test_a_link_to_a_folder_publishes_into_its_target(tmp_path):
    """The link stays a link and its target gets the new set (it was replaced by a real folder, the target left
    stale and a hidden link behind)."""
    target, link = tmp_path / 'real', tmp_path / 'link'
    target.mkdir()
    (target / 'r.json').write_text('old')
    link.symlink_to(target)
    publish_files(str(link), {'r.json': lambda path: open(path, 'w').write('new')})
    assert link.is_symlink() and (target / 'r.json').read_text() == 'new'
    assert sorted(os.listdir(tmp_path)) == ['link', 'real']


def test_a_stopped_step_stops_its_command(tmp_path):
    """The demo's steps: when this process is stopped (here an exception from the output callback, as Ctrl-C or
    SIGTERM raise), the running nnU-Net command is terminated, not left training."""
    from nnunetv2_ext.demo.pipeline import run_step

    pids = []

    def running(pid: int) -> bool:  # neither gone nor a zombie
        try:
            with open(f'/proc/{pid}/stat') as f:
                return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
        except FileNotFoundError:
            return False

    # the command and a worker of its own (as nnU-Net's augmentation workers), each printing its pid
    code = ('import os, subprocess, sys, time; '
            'subprocess.Popen([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); '
            'time.sleep(120)"]); time.sleep(1); print(os.getpid(), flush=True); time.sleep(120)')

    def on_line(line: str) -> None:
        pids.append(int(line))
        if len(pids) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_step([sys.executable, '-c', code], dict(os.environ), str(tmp_path / 'step.log'), on_line=on_line)
    deadline = time.monotonic() + 10
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, pids)), pids


def test_cli_turns_an_os_error_into_one_line(monkeypatch, capsys):
    """A full disk, a read-only folder, ...: ``error: ...`` naming the path, exit 1, no traceback."""
    from nnunetv2_ext import cli

    def full_disk(args):
        raise OSError(28, 'No space left on device', '/data/out/compare.md')

    monkeypatch.setattr(cli, '_cmd_demo', full_disk)
    assert cli.main(['demo']) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 28] No space left on device: '/data/out/compare.md'. The disk is full")

    def missing_command(args):  # not a problem of where we write: keeps its traceback
        raise FileNotFoundError(2, 'No such file or directory', 'nnUNetv2_plan_and_preprocess')

    monkeypatch.setattr(cli, '_cmd_demo', missing_command)
    with pytest.raises(FileNotFoundError):
        cli.main(['demo'])


def test_report_output_that_is_a_file_is_refused_before_measuring(tmp_path):
    from nnunetv2_ext.cli import _own_folder_problem

    notes = tmp_path / 'notes.txt'
    notes.write_text('mine')
    assert _own_folder_problem(str(notes), 'benchmark') == f'output path {notes} is a file, not a folder; pass -o NEW_FOLDER'
