"""benchmarks/wkv_sass.py: the instruction count per position of the CUDA WKV kernels' main loops, read
from cuobjdump's SASS (the parser on a made-up listing; the whole script where nvcc and cuobjdump exist)."""
from __future__ import annotations

import json
import shutil

import pytest

from bench_scripts import load

wkv_sass = load("wkv_sass")

MANGLED = "_ZN44_GLOBAL__N__193cd297_11_wkv_cuda_cu_96715f5d17{}_kernelIfEEvNS_7FwdArgsIT_EEPKS2_NS_5ShapeE"


def _function(kernel: str, loop_body: list, rows: int, per_row: int) -> str:
    """A cuobjdump-like listing: a prologue, a loop of `loop_body` plus `rows * per_row` read-only loads
    closed by a backward branch, an inner short loop, an epilogue."""
    lines = [f"\t\tFunction : {MANGLED.format(kernel)}"]
    addr = 0

    def emit(text):
        nonlocal addr
        lines.append(f"        /*{addr:04x}*/                   {text} ;")
        addr += 0x10

    emit("MOV R1, c[0x0][0x28]")
    emit("@P0 EXIT")
    start = addr
    for _ in range(rows * per_row):
        emit("LDG.E.CONSTANT R4, desc[UR4][R2.64]")
    for op in loop_body:
        emit(op)
    inner = addr
    emit("IADD3 R9, R9, 0x1, RZ")
    emit(f"@P1 BRA 0x{inner:x}")  # a one-instruction loop inside: not the longest
    emit(f"@!P2 BRA 0x{start:x}")
    emit("EXIT")
    return "\n".join(lines)


def test_main_loop_instructions_per_position_from_a_listing():
    body = ["FFMA R5, R4, R4, R5", "MUFU.EX2 R6, R5", "@!P3 FSEL R7, R6, R5, P0", "@P4 BRA 0x10"]
    sass = "\n".join(_function(k, body, rows=4 if k.startswith("bwd") else 8,
                               per_row=6 if k.startswith("bwd") else 2) for k in wkv_sass.KERNELS)
    res = "\n".join(f"Function {MANGLED.format(k)}:\n REG:{100 + i} STACK:0" for i, k in enumerate(wkv_sass.KERNELS))
    rows = {"fwd_summary": 8, "fwd_rescan": 8, "bwd_summary": 4, "bwd_rescan": 4}
    counts = {c.kernel: c for c in wkv_sass.count_loops(sass, res, rows)}
    fwd = counts["fwd_summary"]
    assert fwd.positions == 8 and fwd.registers == 100
    assert fwd.loop_instructions == 16 + 4 + 2 + 1  # loads, body, the inner loop's two, the closing branch
    assert fwd.per_position == pytest.approx(23 / 8)
    assert fwd.mufu == 1 and fwd.branches == 3
    bwd = counts["bwd_rescan"]
    assert bwd.positions == 4 and bwd.loop_instructions == 24 + 7 and bwd.registers == 103


def test_bounds_pick_the_larger_of_issue_and_traffic():
    counts = [wkv_sass.LoopCount(k, "float32", 128, 800, 8, 0, 0) for k in wkv_sass.KERNELS]  # 100 per position
    est = wkv_sass.bounds(counts, "float32", B=1, T=1000, C=10, sms=1, clock_ghz=1.0, bandwidth_gbps=1.0)
    positions = 1000 * 10
    issue_us = positions * 200 / (32 * 4 * 1e3)  # fwd: summary + rescan
    traffic_us = 8 * positions * 4 / 1e3
    assert est["fwd"]["issue_us"] == pytest.approx(issue_us)
    assert est["fwd"]["traffic_us"] == pytest.approx(traffic_us)
    assert est["fwd"]["binding"] == "traffic"
    assert est["fwd"]["best_share_of_peak"] == pytest.approx(5 / 8)
    assert est["fwd+bwd"]["instructions_per_position"] == 400


def test_a_changed_kernel_structure_is_an_error_not_a_count():
    sass = _function("fwd_summary", ["FADD R1, R1, R1"], rows=4, per_row=2)  # half a block of 8
    with pytest.raises(wkv_sass.ToolError, match="structure changed"):
        wkv_sass.count_loops(sass, "", {k: 8 for k in wkv_sass.KERNELS})


def test_a_loop_holding_two_blocks_counts_both():
    """nvcc may unroll a block loop further; extra loads that are not a whole block (a state re-read)
    do not count as positions."""
    sass = "\n".join(_function(k, ["FADD R1, R1, R1"], rows=16 if k == "fwd_summary" else 8,
                               per_row=2 if k.startswith("fwd") else 6) for k in wkv_sass.KERNELS)
    sass = sass.replace("FADD R1, R1, R1", "LDG.E.CONSTANT R8, desc[UR4][R6.64]", 1)  # one extra load
    counts = {c.kernel: c for c in wkv_sass.count_loops(sass, "", {k: 8 for k in wkv_sass.KERNELS})}
    assert counts["fwd_summary"].positions == 16 and counts["fwd_rescan"].positions == 8


def test_missing_cuobjdump_names_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(wkv_sass.shutil, "which", lambda name: None)
    monkeypatch.setattr(wkv_sass.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr("cuda_wkv.loader.resolve_cuda_home", lambda: None)
    assert wkv_sass.main([]) == 1
    assert "pip install nvidia-cuda-cuobjdump" in capsys.readouterr().err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        wkv_sass.main(["--T", "0"])
    assert exc.value.code == 2


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
    # the forward's divisions have no out-of-line slow path: 4 / 7 MUFU per position (exp, rcp)
    assert per["fwd_summary"]["mufu"] / 8 == 4 and per["fwd_rescan"]["mufu"] / 8 == 7
    assert "CALL" not in capsys.readouterr().out
    assert (tmp_path / "wkv_sass_sm_90.md").read_text().startswith("# CUDA WKV kernels")
