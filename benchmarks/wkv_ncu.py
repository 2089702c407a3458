#!/usr/bin/env python
"""Nsight Compute's view of the CUDA WKV kernels: DRAM traffic, L2 hit rate, occupancy and latency per kernel.

The wall-clock benchmark (``bench_wkv.py``) says how far the kernel is from the memory bandwidth; this says
why: how many bytes each kernel really moves between DRAM and the chip (the forward is designed to move
8 passes over one (B, T, C) tensor against the minimal 5, the backward 15.5 against 8, docs/wkv.md
"Benchmark (GPU)"), whether the L2 serves the re-reads, how many warps stay resident and how long a warp
waits per instruction.
Two halves; ``benchmarks/gpu_check.sh`` (step ``wkv_ncu``) runs both::

    ncu $(python benchmarks/wkv_ncu.py ncu-args) -o REPORT \
        python benchmarks/wkv_ncu.py workload --device cuda --B 2 --T 32768 --C 128
    ncu --import REPORT.ncu-rep --csv --page details > details.csv
    python benchmarks/wkv_ncu.py table details.csv --B 2 --T 32768 --C 128

``ncu-args``: ncu's options for the workload (:data:`NCU_ARGS`), one per line.

``workload``: one forward and one backward of ``cuda_wkv.bi_wkv`` with the compiled kernel (the op's
self-check off: it would add kernels of its own), nothing else on the device that ncu's kernel filter
(:data:`KERNEL_FILTER`) selects. Chunk length: automatic, or ``CUDA_WKV_CHUNK``. With ``--device cpu`` it
runs the CPU kernel, which checks the script, not the GPU.

``table``: a Markdown table of ncu's long-form CSV (``--page details``: one row per kernel and metric, the
metric names as its sections print them), one row per WKV kernel in launch order; then the forward's and
the backward's totals: kernel time, DRAM bytes also counted in passes over one (B, T, C) tensor of the
dtype, and two bandwidths on kernel time: the DRAM bytes moved, and the minimal bytes (what
``bench_wkv.py`` counts for its share of the peak).
ncu replays each kernel with flushed caches (its default cache control), so the bytes are those of a
kernel whose inputs start in DRAM, as they mostly do at these sizes.

Exit status: 0 done, 1 the kernel is unavailable or the CSV holds no WKV kernel, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_wkv import min_bytes, wkv_inputs  # noqa: E402  (sibling script; puts this checkout on sys.path)

# the CUDA kernels of cuda_wkv/csrc/wkv_cuda.cu, each named <short name>_kernel (the leftmost match names
# the kernel: group_carry_kernel is group_carry, not carry)
KERNEL_NAME = r'(fwd_summary|fwd_rescan|bwd_summary|bwd_rescan|group_summary|group_carry|carry|sum_rows)_kernel'
KERNEL_FILTER = f'regex:{KERNEL_NAME}'
# ncu's options for the workload: the WKV kernels only (of the workload's process or a child), at the clocks
# the benchmarks see (no locking), the sections whose metrics the table reads, and the DRAM bytes
NCU_ARGS = ['--target-processes', 'all', '--clock-control', 'none', '--kernel-name', KERNEL_FILTER,
            *[a for s in ('SpeedOfLight', 'Occupancy', 'LaunchStats', 'MemoryWorkloadAnalysis', 'WarpStateStats',
                          'ComputeWorkloadAnalysis')
              for a in ('--section', s)],
            '--metrics', 'dram__bytes_read.sum,dram__bytes_write.sum']
# one forward + backward launches these, in this order (a summary kernel unless the sequence is a single
# block; phase 2 one carry kernel, or two for many chunks: the grouped carries)
CARRIES = r'(carry|group_summary group_carry)'
LAUNCHES = rf'(fwd_summary )?{CARRIES} fwd_rescan (bwd_summary )?{CARRIES} bwd_rescan sum_rows( sum_rows)?'
# (B, T, C) tensors the op must move at least, as bench_wkv counts them for its share of the peak
MINIMAL_PASSES = {'forward': min_bytes(1, 1, 1, 1, 'fwd'),
                  'backward': min_bytes(1, 1, 1, 1, 'fwd_bwd') - min_bytes(1, 1, 1, 1, 'fwd')}

# column -> (section's metric name as ncu prints it, unit of the column); absent metrics print as "—"
COLUMNS = {
    'µs': ('Duration', 'us'),
    'DRAM read MB': ('dram__bytes_read.sum', 'MB'),
    'DRAM write MB': ('dram__bytes_write.sum', 'MB'),
    'DRAM % of peak': ('DRAM Throughput', '%'),
    'L2 hit %': ('L2 Hit Rate', '%'),
    'achieved occupancy %': ('Achieved Occupancy', '%'),
    'theoretical occupancy %': ('Theoretical Occupancy', '%'),
    'registers': ('Registers Per Thread', ''),
    'waves per SM': ('Waves Per SM', ''),
    'cycles per issued instruction': ('Warp Cycles Per Issued Instruction', ''),
    # issue-bound or not (docs/wkv.md, "Instructions per position"): the share of cycles the schedulers issue
    'issue slots busy %': ('Issue Slots Busy', '%'),
}
SCALE = {  # ncu's unit (older and newer spellings) -> factor to bytes or seconds; its prefixes are decimal
    'byte': 1.0, 'kbyte': 1e3, 'mbyte': 1e6, 'gbyte': 1e9, 'tbyte': 1e12,
    'b': 1.0, 'kb': 1e3, 'mb': 1e6, 'gb': 1e9, 'tb': 1e12,
    'nsecond': 1e-9, 'usecond': 1e-6, 'msecond': 1e-3, 'second': 1.0,
    'ns': 1e-9, 'us': 1e-6, 'ms': 1e-3, 's': 1.0,
}
TO_COLUMN = {'MB': 1e-6, 'us': 1e6}


class NcuTableError(ValueError):
    """The CSV is not ncu's long-form details page, or holds no WKV kernel."""


def _number(text: str) -> float | None:
    text = text.strip().replace(',', '')  # thousands separators (C locale)
    try:
        return float(text)
    except ValueError:
        return None


def read_details(path: str) -> list[dict]:
    """``[{'id', 'kernel', 'metrics': {name: (value, unit)}}]`` in launch order from ncu's ``--csv --page
    details`` output (lines before the CSV header, e.g. ``==PROF==`` messages, are skipped).

    Raises :class:`NcuTableError` if no header with ``ID``, ``Kernel Name``, ``Metric Name``, ``Metric Unit``
    and ``Metric Value`` is found."""
    data = Path(path).read_bytes()
    lines = data.decode('utf-16' if data[:2] in (b'\xff\xfe', b'\xfe\xff') else 'utf-8-sig').splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise NcuTableError(f'{path}: no ncu CSV header ("ID",...) found; expected the output of '
                            f'ncu --import REPORT --csv --page details')
    rows = list(csv.DictReader(lines[start:]))
    need = {'ID', 'Kernel Name', 'Metric Name', 'Metric Unit', 'Metric Value'}
    if not need <= set(rows[0] if rows else need):
        raise NcuTableError(f'{path}: the CSV lacks the columns {sorted(need - set(rows[0]))}; expected '
                            f'the long form of --page details')
    kernels: dict[int, dict] = {}
    for row in rows:
        if not row.get('ID', '').strip().isdigit():
            continue
        kernel = kernels.setdefault(int(row['ID']), {'id': int(row['ID']), 'kernel': row['Kernel Name'],
                                                     'metrics': {}})
        kernel['metrics'][row['Metric Name']] = (row['Metric Value'], row['Metric Unit'])
    return [kernels[i] for i in sorted(kernels)]


def short_name(kernel: str) -> str | None:
    """``void (anonymous namespace)::fwd_rescan_kernel<float>(...)`` -> ``fwd_rescan``; None for another kernel."""
    m = re.search(KERNEL_NAME, kernel)
    return m.group(1) if m else None


def metric(kernel: dict, name: str, unit: str) -> float | None:
    """The metric ``name`` of ``kernel`` in the column's unit ('MB', 'us', '%' or '' for a plain number)."""
    if name not in kernel['metrics']:
        return None
    text, ncu_unit = kernel['metrics'][name]
    value = _number(text)
    if value is None or unit not in TO_COLUMN:
        return value
    scale = SCALE.get(ncu_unit.strip().lower())
    if scale is None:
        raise NcuTableError(f'{short_name(kernel["kernel"]) or kernel["kernel"]}: {name} in unknown unit {ncu_unit!r}')
    return value * scale * TO_COLUMN[unit]


def _fmt(x: float | None) -> str:
    if x is None:
        return '—'
    return f'{x:.0f}' if abs(x) >= 100 else f'{x:.3g}'


def table(path: str, B: int, T: int, C: int, itemsize: int) -> str:
    """The Markdown table of the details CSV at ``path`` (module doc); ``B, T, C, itemsize`` size one
    (B, T, C) tensor for the passes. Kernels up to the forward's rescan are the forward's, the rest the
    backward's."""
    named = [(k, short_name(k['kernel'])) for k in read_details(path)]
    kernels, names = [k for k, n in named if n], [n for _, n in named if n]
    if not re.fullmatch(LAUNCHES, ' '.join(names)):
        raise NcuTableError(f'{path}: the WKV kernels are {" ".join(names) or "none"}, not one forward + backward '
                            f'({LAUNCHES}); was the workload alone profiled with --kernel-name {KERNEL_FILTER!r}?')
    split = names.index('fwd_rescan') + 1
    lines = ['| ID | kernel | pass | ' + ' | '.join(COLUMNS) + ' |',
             '|---:|---|---|' + '---:|' * len(COLUMNS)]
    totals = {'forward': [0.0, 0.0, True], 'backward': [0.0, 0.0, True]}  # µs, DRAM MB, complete
    for i, (kernel, name) in enumerate(zip(kernels, names)):
        part = 'forward' if i < split else 'backward'
        values = {col: metric(kernel, *spec) for col, spec in COLUMNS.items()}
        lines.append(f'| {kernel["id"]} | {name} | {part} | ' + ' | '.join(_fmt(v) for v in values.values()) + ' |')
        moved = [values['µs'], values['DRAM read MB'], values['DRAM write MB']]
        if None in moved:
            totals[part][2] = False
        else:
            totals[part][0] += moved[0]
            totals[part][1] += moved[1] + moved[2]
    tensor_mb = B * T * C * itemsize / 1e6
    lines += ['', f'One (B, T, C) = ({B}, {T}, {C}) tensor: {tensor_mb:.1f} MB.', '',
              '| part | kernels µs | DRAM MB | passes over a (B, T, C) tensor | minimal passes | DRAM GB/s | '
              'minimal bytes GB/s |',
              '|---|---:|---:|---:|---:|---:|---:|']
    for part, (us, mb, complete) in totals.items():
        least = MINIMAL_PASSES[part]
        if not complete:
            lines.append(f'| {part} | — | — | — (a kernel lacks duration or DRAM bytes) | {least} | — | — |')
        else:  # MB per µs = 1000 GB/s
            lines.append(f'| {part} | {_fmt(us)} | {_fmt(mb)} | {mb / tensor_mb:.1f} | {least} | '
                         f'{_fmt(1e3 * mb / us)} | {_fmt(1e3 * least * tensor_mb / us)} |')
    return '\n'.join(lines) + '\n'


def workload(B: int, T: int, C: int, device: str, dtype: str) -> None:
    """One forward + backward of ``bi_wkv`` with the compiled kernel (module doc)."""
    os.environ['CUDA_WKV_BACKEND'] = 'auto'
    os.environ['CUDA_WKV_SELFCHECK'] = '0'
    import torch
    import cuda_wkv

    w, u, k, v, gy = wkv_inputs(B, T, C, device, dtype)
    if cuda_wkv.backend_for(k) == 'torch':
        raise RuntimeError(f'the compiled WKV kernel is unavailable on {device} (the op fell back to its PyTorch '
                           f'path); run python -m cuda_wkv.selfcheck --device {device} to see why')
    leaves = [x.detach().requires_grad_() for x in (w, u, k, v)]
    torch.autograd.grad(cuda_wkv.bi_wkv(*leaves), leaves, gy)
    if device == 'cuda':
        torch.cuda.synchronize()
    chunk = os.environ.get('CUDA_WKV_CHUNK', 'automatic')
    print(f'bi_wkv forward + backward: B={B} T={T} C={C} {dtype} on {device}, chunk length {chunk}')


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='mode', required=True)
    sub.add_parser('ncu-args')
    for name in ('workload', 'table'):
        q = sub.add_parser(name)
        if name == 'table':
            q.add_argument('csv', help='output of ncu --import REPORT --csv --page details')
        else:
            q.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
        q.add_argument('--B', type=int, default=2)
        q.add_argument('--T', type=int, default=32768)
        q.add_argument('--C', type=int, default=128)
        q.add_argument('--dtype', default='float32', choices=['float32', 'float64'])
    args = p.parse_args(argv)
    if args.mode == 'ncu-args':
        print('\n'.join(NCU_ARGS))
        return 0
    if min(args.B, args.T, args.C) < 1:
        p.error('--B, --T and --C must be at least 1')
    try:
        if args.mode == 'table':
            print(table(args.csv, args.B, args.T, args.C, 4 if args.dtype == 'float32' else 8), end='')
        else:
            workload(args.B, args.T, args.C, args.device, args.dtype)
    except (NcuTableError, OSError, RuntimeError) as e:
        print(f'wkv_ncu.py: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
