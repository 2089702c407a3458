"""benchmarks/wkv_sass.py: the instruction count per position of the CUDA WKV kernels' main loops, read
from cuobjdump's SASS (the parser on a made-up listing; the whole script where nvcc and cuobjdump exist)."""
from __future__ import annotations

import json
import shutil

import pytest

from bench_scripts import load

wkv_sass = load("wkv_sass")

MANGLED = "_ZN44_GLOBAL__N__193cd297_11_wkv_cuda_cu_96715f5d17{}_kernelIfEEvNS_7FwdArgsIT_EEPKS2_NS_5ShapeE"


def _function(kernel: str, loops: list) -> str:
    """A cuobjdump-like listing: a prologue, then for each (rows, loads per row, exps per row, extra
    instructions) a loop of `rows` positions -- their read-only loads, exps and an FFMA each, the extra
    instructions, a one-instruction loop inside -- closed by a backward branch; an epilogue."""
    lines = [f"\t\tFunction : {MANGLED.format(kernel)}"]
    addr = 0

    def emit(text):
        nonlocal addr
        lines.append(f"        /*{addr:04x}*/                   {text} ;")
        addr += 0x10

    emit("MOV R1, c[0x0][0x28]")
    emit("@P0 EXIT")
    for rows, loads, exps, extra in loops:
        start = addr
        for _ in range(rows):
            for _ in range(loads):
                emit("@!P3 LDG.E.CONSTANT R4, desc[UR4][R2.64]")
            for _ in range(exps):
                emit("MUFU.EX2 R6, R5")
            emit("FFMA R5, R4, R4, R5")
        for op in extra:
            emit(op)
        inner = addr
        emit("IADD3 R9, R9, 0x1, RZ")
        emit(f"@P1 BRA 0x{inner:x}")  # a loop inside: no exps, never the main loop
        emit(f"@!P2 BRA 0x{start:x}")
    emit("EXIT")
    return "\n".join(lines)


ROWS = {"fwd_summary": 8, "fwd_rescan": 8, "bwd_summary": 4, "bwd_rescan": 4}


def _kernel_loops(kernel: str, blocks: int = 1, extra=("@P4 BRA 0x10", "CALL.REL.NOINC 0x40")) -> list:
    return [(ROWS[kernel] * blocks, wkv_sass.INPUTS_PER_POSITION[kernel],
             wkv_sass.EXPS_PER_POSITION[kernel], list(extra))]


def test_main_loop_instructions_per_position_from_a_listing():
    # phase 1's one-sided loop for the first / last chunk, unrolled twice by nvcc: longer, one exp a
    # position, twice the loads -- not the main loop, which reads exactly its positions' inputs
    one_sided = (16, 2, 1, ["FADD R1, R1, R1"] * 40)
    sass = "\n".join(_function(k, ([one_sided] if k == "fwd_summary" else []) + _kernel_loops(k))
                     for k in wkv_sass.KERNELS)
    res = "\n".join(f"Function {MANGLED.format(k)}:\n REG:{100 + i} STACK:0" for i, k in enumerate(wkv_sass.KERNELS))
    counts = {c.kernel: c for c in wkv_sass.count_loops(sass, res, ROWS)}
    fwd = counts["fwd_summary"]
    assert fwd.positions == 8 and fwd.registers == 100
    # per position 2 loads, 2 exps, an FFMA; then the extra two, the inner loop's two, the closing branch
    assert fwd.loop_instructions == 8 * 5 + 2 + 2 + 1
    assert fwd.per_position == pytest.approx(45 / 8)
    assert fwd.mufu == 16 and fwd.branches == 3 and fwd.calls == 1
    bwd = counts["bwd_rescan"]
    per_position = wkv_sass.INPUTS_PER_POSITION["bwd_rescan"] + wkv_sass.EXPS_PER_POSITION["bwd_rescan"] + 1
    assert bwd.positions == 4 and bwd.loop_instructions == 4 * per_position + 5 and bwd.registers == 103


def test_a_loop_holding_two_blocks_counts_both():
    """nvcc may unroll a block loop further; loads beyond a position's inputs (a state re-read) are no
    positions."""
    sass = "\n".join(_function(k, _kernel_loops(k, blocks=2 if k == "fwd_summary" else 1,
                                                extra=["LDG.E.CONSTANT R8, desc[UR4][R6.64]"] * 4))
                     for k in wkv_sass.KERNELS)
    counts = {c.kernel: c for c in wkv_sass.count_loops(sass, "", ROWS)}
    assert counts["fwd_summary"].positions == 16 and counts["fwd_rescan"].positions == 8


def test_a_changed_kernel_structure_is_an_error_not_a_count():
    sass = "\n".join(_function(k, [(6, 2, 2, [])] if k == "fwd_summary" else _kernel_loops(k))
                     for k in wkv_sass.KERNELS)  # 6 positions: not whole blocks of 8
    with pytest.raises(wkv_sass.ToolError, match="structure changed"):
        wkv_sass.count_loops(sass, "", ROWS)
    sass = "\n".join(_function(k, [(8, 1, 2, [])] if k == "fwd_summary" else _kernel_loops(k))
                     for k in wkv_sass.KERNELS)  # a load short of each position's inputs
    with pytest.raises(wkv_sass.ToolError, match="structure changed"):
        wkv_sass.count_loops(sass, "", ROWS)


def test_bounds_pick_the_larger_of_issue_and_traffic():
    counts = [wkv_sass.LoopCount(k, "float32", 128, 800, 8, 0, 0, 0) for k in wkv_sass.KERNELS]  # 100 per position
    est = wkv_sass.bounds(counts, "float32", B=1, T=1000, C=10, sms=1, clock_ghz=1.0, bandwidth_gbps=1.0)
    positions = 1000 * 10
    issue_us = positions * 200 / (32 * 4 * 1e3)  # fwd: summary + rescan
    traffic_us = 8 * positions * 4 / 1e3
    assert est["fwd"]["issue_us"] == pytest.approx(issue_us)
    assert est["fwd"]["traffic_us"] == pytest.approx(traffic_us)
    assert est["fwd"]["binding"] == "traffic"
    assert est["fwd"]["best_share_of_peak"] == pytest.approx(5 / 8)
    assert est["fwd+bwd"]["instructions_per_position"] == 400


def test_missing_cuobjdump_names_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(wkv_sass.shutil, "which", lambda name: None)
    monkeypatch.setattr(wkv_sass.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr("cuda_wkv.loader.resolve_cuda_home", lambda: None)
    assert wkv_sass.main([]) == 1
    assert "pip install nvidia-cuda-cuobjdump" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--T", "0"], "must be positive and finite"), (["--clock-ghz", "nan"], "must be positive and finite"),
    (["--bandwidth-gbps", "inf"], "must be positive and finite"), (["--source", "/no/such.cu"], "no such file"),
    (["--out-dir", __file__], "exists and is not a folder")])
def test_bad_arguments_exit_2_with_the_reason(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        wkv_sass.main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_counts_the_real_kernels(tmp_path, capsys):
    try:
        wkv_sass.find_cuobjdump()
    except wkv_sass.ToolError:
        pytest.skip("no cuobjdump")
    assert wkv_sass.main(["--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "wkv_sass_sm_90.json").read_text())
    per = {k["kernel"]: k for k in data["kernels"]}
    assert set(per) == set(wkv_sass.KERNELS)
    assert per["fwd_summary"]["positions"] == 8 and per["bwd_rescan"]["positions"] == 4
    # the forward's divisions have no out-of-line slow path: 4 / 8 MUFU per position (exp, rcp; the
    # rescan's log, lg2), no calls
    assert per["fwd_summary"]["mufu"] / 8 == 4 and per["fwd_rescan"]["mufu"] / 8 == 8
    assert all(k["calls"] == 0 for k in data["kernels"])
    assert (tmp_path / "wkv_sass_sm_90.md").read_text().startswith("# CUDA WKV kernels")
