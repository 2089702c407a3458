"""benchmarks/wkv_ncu.py and gpu_check.sh's wkv_ncu step without a GPU: the table of Nsight Compute's
long-form CSV (units, thousands separators, forward/backward split, passes over a tensor), its errors, the
workload on the CPU kernel, and the step's CUDA branch with stand-ins for ncu and the GPU's Python."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bench_scripts import load

REPO = Path(__file__).resolve().parents[1]
wkv_ncu = load('wkv_ncu')

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
          '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def _kernel_rows(kid: int, name: str, metrics: list[tuple[str, str, str]]) -> list[str]:
    kernel = f'void (anonymous namespace)::{name}<float>((anonymous namespace)::FwdArgs<float>, float *, Shape)'
    return [f'"{kid}","4242","python3","gpu-host","{kernel}","1","7","(32, 4, 1)","(66, 4, 1)","0","9.0",'
            f'"Section","{m}","{u}","{v}"' for m, u, v in metrics]


def _metrics(us: str, us_unit: str, read: str, read_unit: str, write: str, write_unit: str):
    return [('Duration', us_unit, us), ('dram__bytes_read.sum', read_unit, read),
            ('dram__bytes_write.sum', write_unit, write), ('DRAM Throughput', '%', '41.5'),
            ('L2 Hit Rate', '%', '12.25'), ('Achieved Occupancy', '%', '23.4'),
            ('Theoretical Occupancy', '%', '25'), ('Registers Per Thread', 'register/thread', '114'),
            ('Waves Per SM', '', '1.00'), ('Warp Cycles Per Issued Instruction', 'cycle', '1,234.5'),
            ('Issue Slots Busy', '%', '61.75')]


# one (B, T, C) = (1, 1000, 250) float32 tensor is 1 MB: forward 15.03 MB, backward 30 MB
KERNELS = [
    ('fwd_summary_kernel', _metrics('100', 'usecond', '2', 'Mbyte', '10', 'Kbyte')),
    ('carry_kernel', _metrics('5,000', 'nsecond', '10,000', 'byte', '10', 'Kbyte')),
    ('fwd_rescan_kernel', _metrics('0.2', 'msecond', '7', 'Mbyte', '6,000', 'Kbyte')),
    ('bwd_summary_kernel', _metrics('150', 'usecond', '6', 'Mbyte', '0', 'byte')),
    ('carry_kernel', _metrics('10', 'usecond', '0', 'Mbyte', '0', 'Mbyte')),
    ('bwd_rescan_kernel', _metrics('400', 'usecond', '20', 'Mbyte', '0.004', 'Gbyte')),
    ('sum_rows_kernel', _metrics('3', 'usecond', '0', 'byte', '0', 'byte')),
]


def _csv(tmp_path: Path, kernels=KERNELS, preamble=('==PROF== Connected to process 4242',)) -> Path:
    lines = [*preamble, HEADER]
    for kid, (name, metrics) in enumerate(kernels):
        lines += _kernel_rows(kid, name, metrics)
    path = tmp_path / 'details.csv'
    path.write_text('\n'.join(lines) + '\n')
    return path


def test_table_converts_units_and_counts_passes_per_part(tmp_path):
    text = wkv_ncu.table(str(_csv(tmp_path)), B=1, T=1000, C=250, itemsize=4)
    rows = [line.split(' | ') for line in text.splitlines() if line.startswith('| ') and line[2].isdigit()]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ('| 0', 'fwd_summary', 'forward'), ('| 1', 'carry', 'forward'), ('| 2', 'fwd_rescan', 'forward'),
        ('| 3', 'bwd_summary', 'backward'), ('| 4', 'carry', 'backward'), ('| 5', 'bwd_rescan', 'backward'),
        ('| 6', 'sum_rows', 'backward')]
    # µs, DRAM read MB, DRAM write MB of the first three kernels: usecond / nsecond / msecond; M/K/byte
    assert [r[3:6] for r in rows[:3]] == [['100', '2', '0.01'], ['5', '0.01', '0.01'], ['200', '7', '6']]
    assert rows[5][3:6] == ['400', '20', '4']  # Gbyte
    assert rows[0][6:] == ['41.5', '12.2', '23.4', '25', '114', '1', '1234', '61.8 |']
    assert 'One (B, T, C) = (1, 1000, 250) tensor: 1.0 MB.' in text
    assert '| forward | 305 | 15 | 15.0 | 5 | 49.3 | 16.4 |' in text  # GB/s: 15.03 MB and 5 MB in 305 µs
    assert '| backward | 563 | 30 | 30.0 | 8 | 53.3 | 14.2 |' in text


def test_newer_unit_spellings_and_a_utf16_file_read_the_same(tmp_path):
    expected = wkv_ncu.table(str(_csv(tmp_path)), B=1, T=1000, C=250, itemsize=4)
    newer = {'usecond': 'us', 'nsecond': 'ns', 'msecond': 'ms', 'Mbyte': 'MB', 'Kbyte': 'KB', 'byte': 'B',
             'Gbyte': 'GB'}
    kernels = [(name, [(m, newer.get(u, u), v) for m, u, v in metrics]) for name, metrics in KERNELS]
    path = _csv(tmp_path, kernels)
    path.write_bytes(path.read_text().encode('utf-16'))
    assert wkv_ncu.table(str(path), B=1, T=1000, C=250, itemsize=4) == expected


def test_table_marks_a_part_with_a_missing_metric_and_skips_other_kernels(tmp_path):
    kernels = list(KERNELS)
    kernels[5] = ('bwd_rescan_kernel', [m for m in KERNELS[5][1] if m[0] != 'dram__bytes_write.sum'])
    kernels.insert(0, ('distribution_elementwise_grid_stride_kernel', KERNELS[0][1]))  # not ours: left out
    text = wkv_ncu.table(str(_csv(tmp_path, kernels)), B=1, T=1000, C=250, itemsize=4)
    assert 'distribution' not in text and '| 1 | fwd_summary | forward |' in text
    assert '| forward | 305 | 15 | 15.0 | 5 |' in text
    assert '| backward | — | — | — (a kernel lacks duration or DRAM bytes) | 8 | — | — |' in text
    assert '| 6 | bwd_rescan | backward | 400 | 20 | — |' in text


@pytest.mark.parametrize('content, message', [
    ('==PROF== No kernels were profiled.\n', 'no ncu CSV header'),
    ('"ID","Kernel Name","Value"\n"0","fwd_rescan_kernel","1"\n', "lacks the columns ['Metric Name'"),
    (None, 'the WKV kernels are fwd_summary, not one forward + backward'),
])
def test_table_errors_name_the_problem(tmp_path, capsys, content, message):
    path = _csv(tmp_path, KERNELS[:1]) if content is None else tmp_path / 'details.csv'
    if content is not None:
        path.write_text(content)
    assert wkv_ncu.main(['table', str(path)]) == 1
    assert message in capsys.readouterr().err


def test_a_kernel_sequence_other_than_one_forward_and_backward_is_refused(tmp_path):
    extra = KERNELS + [KERNELS[6]] * 2  # e.g. a PyTorch kernel caught by the filter
    with pytest.raises(wkv_ncu.NcuTableError, match='are fwd_summary carry fwd_rescan bwd_summary carry bwd_rescan '
                                                    'sum_rows sum_rows sum_rows, not one forward'):
        wkv_ncu.table(str(_csv(tmp_path, extra)), B=1, T=1000, C=250, itemsize=4)
    single_chunk = [k for k in KERNELS if 'summary' not in k[0]]  # T within one chunk: no summary kernels
    assert '| forward | 205 |' in wkv_ncu.table(str(_csv(tmp_path, single_chunk)), B=1, T=1000, C=250, itemsize=4)


def test_grouped_carries_are_two_kernels_of_their_part(tmp_path):
    """Many chunks: phase 2 is group_summary, group_carry (ncu's names as the CUDA source has them),
    counted with the forward's or the backward's traffic."""
    names = ['void (anonymous namespace)::group_summary_kernel<float, 4>(const T1 *, const T1 *, T1 *, Shape)',
             'void (anonymous namespace)::group_carry_kernel<float, 4>(const T1 *, const T1 *, const T1 *, T1 *, Shape)']
    grouped = [KERNELS[0], *((n, KERNELS[1][1]) for n in names), *KERNELS[2:4],
               *((n.replace(', 4>', ', 11>'), KERNELS[4][1]) for n in names), *KERNELS[5:],
               KERNELS[6]]  # gw, gu from many chunks: two sum_rows launches
    text = wkv_ncu.table(str(_csv(tmp_path, grouped)), B=1, T=1000, C=250, itemsize=4)
    rows = [line.split(' | ')[1:3] for line in text.splitlines() if line.startswith('| ') and line[2].isdigit()]
    assert rows == [['fwd_summary', 'forward'], ['group_summary', 'forward'],
                    ['group_carry', 'forward'], ['fwd_rescan', 'forward'], ['bwd_summary', 'backward'],
                    ['group_summary', 'backward'], ['group_carry', 'backward'],
                    ['bwd_rescan', 'backward'], ['sum_rows', 'backward'], ['sum_rows', 'backward']]
    assert '| forward | 310 | 15.1 | 15.1 | 5 |' in text  # one more carry-sized kernel: 5 µs, 20 KB


def test_an_unknown_unit_is_an_error_not_a_wrong_number(tmp_path):
    kernels = [(KERNELS[0][0], _metrics('100', 'usecond', '2', 'Mibibyte', '10', 'Kbyte'))] + KERNELS[1:]
    with pytest.raises(wkv_ncu.NcuTableError, match="dram__bytes_read.sum in unknown unit 'Mibibyte'"):
        wkv_ncu.table(str(_csv(tmp_path, kernels)), B=1, T=1000, C=250, itemsize=4)


def test_workload_runs_the_compiled_cpu_kernel(capsys):
    assert wkv_ncu.main(['workload', '--device', 'cpu', '--B', '1', '--T', '40', '--C', '3']) == 0
    assert 'B=1 T=40 C=3 float32 on cpu' in capsys.readouterr().out


def _run_gpu_step(tmp_path: Path, details: Path, import_fails_for: str = '') -> subprocess.CompletedProcess:
    """gpu_check.sh --steps wkv_ncu on its CUDA branch, with a stand-in Python that reports a GPU (the kernel
    build and the workload only record their calls; ncu-args and table run for real) and a stand-in ncu on PATH
    (records its options, runs the program, writes the report; --import prints ``details``, or fails for a
    report whose path holds ``import_fails_for``). Calls go to calls.txt."""
    log = tmp_path / 'calls.txt'
    fake_python = tmp_path / 'python'
    fake_python.write_text(
        '#!/bin/bash\n'
        f'[ "$1" = -c ] && {{ [[ "$2" == *load_extension* ]] && echo build >> "{log}"; exit 0; }}\n'
        f'if [ "$2" = workload ]; then echo "workload ${{CUDA_WKV_CHUNK:-unset}} ${{*:3}}" >> "{log}"; exit 0; fi\n'
        f'exec "{sys.executable}" "$@"\n')
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    fake_ncu = bin_dir / 'ncu'
    fake_ncu.write_text(
        '#!/bin/bash\n'
        '[ "$1" = --version ] && { echo "Version 2025.3.1.0 (stand-in)"; exit 0; }\n'
        f'[ "$1" = --import ] && {{ [[ -n "{import_fails_for}" && "$2" == *"{import_fails_for}"* ]] && '
        f'{{ echo "==ERROR== cannot read report (injected)"; exit 1; }}; cat "{details}"; exit 0; }}\n'
        f'echo "ncu LC_ALL=$LC_ALL $*" >> "{log}"\n'
        'while [ "$1" != -o ]; do shift; done\n'
        'touch "$2.ncu-rep"; shift 2\n'
        'exec "$@"\n')
    for fake in (fake_python, fake_ncu):
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PYTHON=str(fake_python), PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
               CUDA_WKV_CHUNK='7')
    return subprocess.run(['bash', str(REPO / 'benchmarks' / 'gpu_check.sh'), '--steps', 'wkv_ncu', 'out'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


needs_bash = pytest.mark.skipif(shutil.which('bash') is None or shutil.which('timeout') is None,
                                reason='needs bash and coreutils timeout')


@needs_bash
def test_the_gpu_step_profiles_each_chunk_length_and_tabulates_it(tmp_path):
    details = _csv(tmp_path)
    res = _run_gpu_step(tmp_path, details)
    assert res.returncode == 0, res.stdout + res.stderr
    calls = (tmp_path / 'calls.txt').read_text().splitlines()
    assert [c.split()[0] for c in calls] == ['build', 'ncu', 'workload', 'ncu', 'workload']  # built outside ncu
    assert calls[2] == 'workload unset --device cuda --B 2 --C 128 --T 32768'  # the caller's 7 is not inherited
    assert calls[4].startswith('workload 32 ')
    assert ' '.join(wkv_ncu.NCU_ARGS) in calls[1] and 'LC_ALL=C' in calls[1]
    for length in ('auto', '32'):
        folder = tmp_path / 'out' / 'wkv_ncu' / length
        assert sorted(p.name for p in folder.iterdir()) == ['details.csv', 'raw.csv', 'report.ncu-rep', 'table.md']
        assert (folder / 'table.md').read_text() == wkv_ncu.table(str(details), 2, 32768, 128, 4)
    summary = (tmp_path / 'out' / 'summary.md').read_text()
    auto, short = summary.index('## wkv_ncu/auto/table.md'), summary.index('## wkv_ncu/32/table.md')
    assert auto < short and '| forward | 305 | 15 |' in summary[short:]


@needs_bash
def test_a_failure_with_one_report_costs_neither_the_other_profile_nor_its_table(tmp_path):
    res = _run_gpu_step(tmp_path, _csv(tmp_path), import_fails_for='/auto/')
    assert res.returncode == 1, res.stdout + res.stderr
    assert [c.split()[0] for c in (tmp_path / 'calls.txt').read_text().splitlines()] == [
        'build', 'ncu', 'workload', 'ncu', 'workload']
    assert not (tmp_path / 'out' / 'wkv_ncu' / 'auto' / 'details.csv').exists()
    assert (tmp_path / 'out' / 'wkv_ncu' / '32' / 'table.md').is_file()
    assert (tmp_path / 'out' / 'steps.tsv').read_text().startswith('wkv_ncu\tFAILED (exit 1)')
