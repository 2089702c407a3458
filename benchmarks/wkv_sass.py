#!/usr/bin/env python
"""Instructions per position of the CUDA WKV kernels, counted in their machine code (SASS), without a GPU.

On a GPU a WKV call is bounded below twice: by the bytes it moves (the memory bandwidth) and by the
instructions its threads issue (each SM issues at most one warp instruction per scheduler and cycle).
``bench_wkv.py`` measures the time; this counts the second bound's input from the compiled code: it
compiles ``cuda_wkv/csrc/wkv_cuda.cu`` with nvcc for one architecture (``-cubin``, the flags the
extension is built with), disassembles it with ``cuobjdump -sass`` and, for each phase-1 and phase-3
kernel in float32 (``fwd_summary``, ``fwd_rescan``, ``bwd_summary``, ``bwd_rescan``), finds its
main loop, counts the instructions in it and divides by the positions one iteration handles.
A position costs each kernel a known number of exps (EXPS_PER_POSITION: the summary folds both sums,
the rescan runs its store and finish steps), each one ``MUFU.EX2``; a loop's positions are its
``MUFU.EX2`` over that number, and the main loop is the one whose positions are whole blocks of the
header's rows (``kAheadOf`` in phase 1, ``kCheckpointRows`` in phase 3, read by compiling a few lines
against ``wkv_recurrence.h`` with the same defines) and which reads each position's inputs (2 forward,
4 in the backward's summary, 6 in its rescan, through the read-only cache) -- preferring a loop that reads exactly those (phase 1 also
has loops for the first and last chunks, which fold one side only and which nvcc may unroll further),
then the most positions, then the longest.  Phase 2 and the final reduction are left out (per chunk, not per
position), and so is float64 (the tests' dtype).

Then, for a (B, T, C) call on a device (``--sms``, ``--clock-ghz``, ``--bandwidth-gbps``), two lower
bounds on the device time of a forward and of a forward + backward: issue = positions x instructions
per position / (32 threads x 4 schedulers x SMs x clock), at one instruction per scheduler and cycle
-- a bound no latency or stall improves; traffic = passes x (B, T, C) bytes / bandwidth, with the
passes of the design (8 forward, 15.5 backward: docs/wkv.md, "Benchmark (GPU)").  Whichever is larger
is what the kernel's design allows at best; the share of the peak ``bench_wkv.py`` reports (minimal
bytes, 5 and 13 passes, over the time) follows from it.

    python benchmarks/wkv_sass.py                      # sm_90, GLSP's largest call (B=2, T=32768, C=128)
    python benchmarks/wkv_sass.py --source OTHER/wkv_cuda.cu --out-dir docs/benchmarks

Needs nvcc (the CUDA toolkit) and cuobjdump with its nvdisasm (the toolkit's, or ``pip install
nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``, which the ``test`` extra installs on Linux).
Exit status: 0 done, 1 a tool is missing or the code has no recognisable loop, 2 bad arguments.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's cuda_wkv (its toolkit lookup), installed or not
SOURCE = REPO / "cuda_wkv" / "csrc" / "wkv_cuda.cu"
KERNELS = ("fwd_summary", "fwd_rescan", "bwd_summary", "bwd_rescan")
# the loads through __ldg: k, v in the forward; the backward's folds read y, m, r, gy, its rescan also k, v
INPUTS_PER_POSITION = {"fwd_summary": 2, "fwd_rescan": 2, "bwd_summary": 4, "bwd_rescan": 6}
# exps per position in each kernel's main loop (docs/wkv.md, "Three phases" and "Backward"): phase 1
# folds the left and the right sum (one exp a fold), phase 3 a store step and a finish step (forward
# 1 + 3, backward 2 + 3)
EXPS_PER_POSITION = {"fwd_summary": 2, "fwd_rescan": 4, "bwd_summary": 2, "bwd_rescan": 5}
PASSES = {"fwd": 8.0, "bwd": 15.5}  # (B, T, C) tensors moved by design (docs/wkv.md)
MINIMAL_PASSES = {"fwd": 5, "bwd": 8}  # every input read once, every output written once
SCHEDULERS_PER_SM = 4
WARP = 32


class ToolError(RuntimeError):
    """A tool is missing, failed, or its output is not what this script reads."""


@dataclass
class LoopCount:
    kernel: str  # e.g. fwd_rescan
    dtype: str  # float32 / float64
    registers: int
    loop_instructions: int
    positions: int  # per loop iteration
    mufu: int  # special-function instructions (exp2, rcp, ...) in the loop
    branches: int  # BRA in the loop (divergence and out-of-line paths show here)
    calls: int  # CALL in the loop: out-of-line paths (e.g. a division's slow path)

    @property
    def per_position(self) -> float:
        return self.loop_instructions / self.positions


def _cuda_home() -> Optional[str]:
    """The CUDA toolkit root as cuda_wkv resolves it (this checkout's cuda_wkv; None without torch)."""
    try:
        from cuda_wkv.loader import resolve_cuda_home
    except ImportError:
        return None
    return resolve_cuda_home()


def find_tool(name: str) -> Optional[str]:
    """``name`` (nvcc, cuobjdump, nvdisasm) on PATH, in the CUDA toolkit, or from its pip package
    (nvidia-cuda-NAME)."""
    found = shutil.which(name)
    if found:
        return found
    home = _cuda_home()
    if home and os.path.isfile(os.path.join(home, "bin", name)):
        return os.path.join(home, "bin", name)
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(root).glob(f"*/bin/{name}")):
            return str(path)
    return None


def find_cuobjdump() -> str:
    found = find_tool("cuobjdump")
    if found is None:
        raise ToolError("cuobjdump not found: install the CUDA toolkit's, or "
                        "`pip install nvidia-cuda-cuobjdump`")
    return found


def _nvcc() -> str:
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise ToolError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    return nvcc


def nvcc_version() -> str:
    out = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [^\n]*", out)
    return f"nvcc {m.group(0)}" if m else "nvcc (version unknown)"


def compile_cubin(source: Path, arch: str, defines: List[str], folder: Path) -> Path:
    nvcc = _nvcc()
    cubin = folder / "wkv_cuda.cubin"
    cmd = [nvcc, f"-arch={arch}", "-O3", "-std=c++17", "-cubin", *(f"-D{d}" for d in defines),
           str(source), "-o", str(cubin)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ToolError(f"nvcc failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return cubin


def block_rows(source: Path, defines: List[str], folder: Path) -> Dict[str, int]:
    """Positions per block of each kernel's loop, from the header the kernel includes."""
    cxx = shlex.split(os.environ.get("CXX") or "c++")
    program = folder / "rows.cpp"
    program.write_text('#include <cstdio>\n#include "wkv_recurrence.h"\nint main() {\n'
                       '  std::printf("%d %d %d %d\\n", wkv::kAheadOf<float, false>, wkv::kCheckpointRows<false>,\n'
                       '              wkv::kAheadOf<float, true>, wkv::kCheckpointRows<true>);\n}\n')
    exe = folder / "rows"
    r = subprocess.run([*cxx, "-std=c++17", *(f"-D{d}" for d in defines), "-I", str(source.parent),
                        str(program), "-o", str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        raise ToolError(f"cannot read the block sizes from {source.parent / 'wkv_recurrence.h'} "
                        f"(host compiler {cxx[0]}): {r.stderr[-2000:]}")
    values = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    return dict(zip(KERNELS, values))


def _kernel_key(mangled: str) -> Optional[tuple]:
    m = re.search(r"\d+((?:fwd|bwd)_(?:summary|rescan))_kernelIfE", mangled)
    return (m.group(1), "float32") if m else None


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[T\d]+\s+", "", text).split()[0]


def loops(instructions: List[tuple]) -> List[List[str]]:
    """The instructions of every loop: from a backward branch's target to the branch."""
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    out = []
    for i, (addr, text) in enumerate(instructions):
        if _opcode(text) != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
        if target and int(target.group(1), 16) <= addr and int(target.group(1), 16) in index:
            out.append([t for _, t in instructions[index[int(target.group(1), 16)]:i + 1]])
    return out


def main_loop(instructions: List[tuple], kernel: str, rows: int) -> Tuple[Counter, int, int]:
    """A kernel's main loop -- its opcodes counted, its length -- and the positions one iteration
    handles (see the module's docstring)."""
    best: Optional[tuple] = None
    inputs = INPUTS_PER_POSITION[kernel]
    for body in loops(instructions):
        ops = Counter(_opcode(t) for t in body)
        exps = ops["MUFU.EX2"]
        loads = sum(n for op, n in ops.items() if op.startswith("LDG") and ".CONSTANT" in op)
        positions = exps // EXPS_PER_POSITION[kernel]
        if exps == 0 or exps % EXPS_PER_POSITION[kernel] or positions % rows or loads < positions * inputs:
            continue
        key = (loads == positions * inputs, positions, len(body))
        if best is None or key > best[0]:
            best = (key, ops, len(body), positions)
    if best is None:
        raise ToolError(f"{kernel}: no loop of whole blocks of {rows} positions, each with "
                        f"{EXPS_PER_POSITION[kernel]} exps and {inputs} read-only loads -- has the kernel's "
                        "structure changed? (EXPS_PER_POSITION)")
    return best[1], best[2], best[3]


def parse_sass(sass: str) -> Dict[tuple, List[tuple]]:
    """{(kernel, "float32"): [(address, instruction)]} of the float phase-1/3 kernels in cuobjdump's text."""
    out: Dict[tuple, List[tuple]] = {}
    for part in re.split(r"(?:^|\n)\s*Function : ", sass)[1:]:
        key = _kernel_key(part.split("\n", 1)[0])
        if key is None:
            continue
        out[key] = [(int(m.group(1), 16), m.group(2).strip()) for m in
                    re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", part)]
    return out


def parse_registers(res_usage: str) -> Dict[tuple, int]:
    out = {}
    for m in re.finditer(r"Function (\S+):\s*REG:(\d+)", res_usage):
        key = _kernel_key(m.group(1))
        if key is not None:
            out[key] = int(m.group(2))
    return out


def count_loops(sass: str, res_usage: str, rows: Dict[str, int]) -> List[LoopCount]:
    """Each float kernel's main loop; ``rows``: positions per block of each kernel (:func:`block_rows`)."""
    registers = parse_registers(res_usage)
    counts = []
    for (kernel, dtype), instructions in sorted(parse_sass(sass).items()):
        ops, length, positions = main_loop(instructions, kernel, rows[kernel])
        counts.append(LoopCount(kernel, dtype, registers.get((kernel, dtype), 0), length, positions,
                                sum(n for op, n in ops.items() if op.startswith("MUFU")), ops["BRA"],
                                sum(n for op, n in ops.items() if op.startswith("CALL"))))
    missing = {(k, "float32") for k in KERNELS} - {(c.kernel, c.dtype) for c in counts}
    if missing:
        raise ToolError(f"kernels not found in the SASS: {sorted(missing)}")
    return counts


def bounds(counts: List[LoopCount], dtype: str, B: int, T: int, C: int, sms: int, clock_ghz: float,
           bandwidth_gbps: float) -> Dict[str, dict]:
    """Issue and traffic lower bounds (µs) of a forward and a forward + backward call."""
    per = {c.kernel: c.per_position for c in counts if c.dtype == dtype}
    size = 4 if dtype == "float32" else 8
    positions = B * T * C
    issue_rate = WARP * SCHEDULERS_PER_SM * sms * clock_ghz * 1e3  # thread instructions per µs
    out = {}
    for name, dirs in (("fwd", ("fwd",)), ("fwd+bwd", ("fwd", "bwd"))):
        instr = sum(per[f"{d}_summary"] + per[f"{d}_rescan"] for d in dirs)
        issue_us = positions * instr / issue_rate
        traffic_us = sum(PASSES[d] for d in dirs) * positions * size / (bandwidth_gbps * 1e3)
        minimal = sum(MINIMAL_PASSES[d] for d in dirs) * positions * size
        bound = max(issue_us, traffic_us)
        out[name] = {"instructions_per_position": instr, "issue_us": issue_us, "traffic_us": traffic_us,
                     "binding": "issue" if issue_us > traffic_us else "traffic",
                     "best_share_of_peak": minimal / (bound * 1e-6) / (bandwidth_gbps * 1e9)}
    return out


def report(counts: List[LoopCount], est: Dict[str, dict], args: argparse.Namespace) -> str:
    lines = [f"# CUDA WKV kernels: instructions per position ({args.arch}, SASS)", "",
             f"Generated by `python benchmarks/wkv_sass.py {' '.join(args.argv)}`".rstrip() + " on "
             f"{args.date} with {args.nvcc_version}; source `{args.source_label}`.  Static counts of the "
             "compiled code: no GPU involved, independent of the machine's load.", "",
             "Main loop of each phase-1/3 kernel (see the script's docstring): instructions, positions per "
             "iteration (its exps over the exps a position costs), special-function instructions (MUFU), branches "
             "and out-of-line calls in it.", "",
             "| kernel | dtype | registers | loop instructions | positions | per position | MUFU per position | "
             "branches | calls |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in counts:
        lines.append(f"| {c.kernel} | {c.dtype} | {c.registers} | {c.loop_instructions} | {c.positions} | "
                     f"{c.per_position:.1f} | {c.mufu / c.positions:.1f} | {c.branches} | {c.calls} |")
    lines += ["", f"Lower bounds at B={args.B}, T={args.T}, C={args.C}, float32, on {args.sms} SMs at "
              f"{args.clock_ghz} GHz and {args.bandwidth_gbps:.0f} GB/s: issue (one instruction per scheduler "
              "and cycle) and traffic (the design's 8 / 15.5 passes); the best share of the peak the larger "
              "allows, on the minimal bytes (5 / 13 passes) as `bench_wkv.py` counts them.", "",
              "| call | instructions per position | issue µs | traffic µs | binding | best share of peak |",
              "|---|---:|---:|---:|---|---:|"]
    for name, e in est.items():
        lines.append(f"| {name} | {e['instructions_per_position']:.0f} | {e['issue_us']:.0f} | "
                     f"{e['traffic_us']:.0f} | {e['binding']} | {100 * e['best_share_of_peak']:.0f} % |")
    return "\n".join(lines) + "\n"


def disassemble(cuobjdump: str, cubin: Path, what: str) -> str:
    """cuobjdump's text (``what``: -sass or -res-usage); the nvdisasm it runs goes on its PATH."""
    nvdisasm = find_tool("nvdisasm")
    extra = [str(Path(p).parent) for p in (nvdisasm, cuobjdump) if p]
    env = dict(os.environ, PATH=os.pathsep.join([*extra, os.environ.get("PATH", "")]))
    r = subprocess.run([cuobjdump, what, str(cubin)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise ToolError(f"cuobjdump {what} failed: {r.stderr.strip()[-2000:]} (nvdisasm missing? "
                        "`pip install nvidia-cuda-nvdisasm`, or the CUDA toolkit's)")
    return r.stdout


def run(args: argparse.Namespace) -> int:
    cuobjdump = find_cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        args.nvcc_version = nvcc_version()
        args.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rows = block_rows(args.source, args.define, Path(tmp))
        cubin = compile_cubin(args.source, args.arch, args.define, Path(tmp))
        sass = disassemble(cuobjdump, cubin, "-sass")
        res = disassemble(cuobjdump, cubin, "-res-usage")
    counts = count_loops(sass, res, rows)
    est = bounds(counts, "float32", args.B, args.T, args.C, args.sms, args.clock_ghz, args.bandwidth_gbps)
    text = report(counts, est, args)
    print(text, end="")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.out_dir / f"wkv_sass_{args.arch}"
        for path, content in ((stem.with_suffix(".md"), text),
                              (stem.with_suffix(".json"), json.dumps(
                                  {"command": args.argv, "source": args.source_label, "date": args.date,
                                   "nvcc": args.nvcc_version,
                                   "kernels": [dict(asdict(c), per_position=c.per_position) for c in counts],
                                   "bounds": est}, indent=1) + "\n")):
            tmp_path = path.with_name(path.name + ".tmp")
            tmp_path.write_text(content)
            os.replace(tmp_path, path)  # visible only when complete
        print(f"wrote {stem}.md / .json")
    return 0


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90", help="nvcc -arch (default sm_90: H100/H200)")
    p.add_argument("--source", type=Path, default=SOURCE, help="wkv_cuda.cu to compile (default: this checkout's)")
    p.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                   help="a -D for nvcc (e.g. WKV_ROWS_AHEAD=4); repeatable")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=32768)
    p.add_argument("--C", type=int, default=128)
    p.add_argument("--sms", type=int, default=132, help="SMs (default 132: H100/H200 SXM)")
    p.add_argument("--clock-ghz", type=float, default=1.98, help="SM clock (default 1.98: H200 boost)")
    p.add_argument("--bandwidth-gbps", type=float, default=4800.0, help="memory bandwidth (default: H200's 4800)")
    p.add_argument("--out-dir", type=Path, help="also write wkv_sass_ARCH.md / .json here")
    args = p.parse_args(argv)
    if not args.source.is_file():
        p.error(f"--source {args.source}: no such file")
    if min(args.B, args.T, args.C, args.sms) < 1 or not (0 < args.clock_ghz < math.inf) \
            or not (0 < args.bandwidth_gbps < math.inf):
        p.error("--B, --T, --C, --sms, --clock-ghz and --bandwidth-gbps must be positive and finite")
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        p.error(f"--out-dir {args.out_dir}: exists and is not a folder")
    args.argv = argv
    src = args.source.resolve()
    args.source_label = str(src.relative_to(REPO)) if REPO in src.parents else str(args.source)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except ToolError as exc:
        print(f"wkv_sass: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
