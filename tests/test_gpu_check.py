"""benchmarks/gpu_check.sh without a GPU: it refuses at once with a clear message, parses its
arguments, and in --cpu-smoke mode runs its steps, records failures and timeouts without
stopping, and writes the summary.  The network benchmark command is replaced by a stand-in
on PATH where its outcome (failure, hang, --compile support) is what is tested."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(args, tmp_path, stand_in=None, timeout=600):
    """Run the script with ``PYTHON`` = this interpreter; ``stand_in``: shell code of a fake
    ``nnunetv2-ext`` put first on PATH (it appends its arguments to ``calls.txt``)."""
    env = dict(os.environ, PYTHON=sys.executable)
    if stand_in is not None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        fake = bin_dir / "nnunetv2-ext"
        fake.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls.txt"\n{stand_in}\n')
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _steps(out: Path):
    return [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_without_gpu_it_stops_at_once_with_a_clear_message(tmp_path):
    res = _run([str(tmp_path / "out")], tmp_path)
    assert res.returncode == 2
    assert "no CUDA GPU is visible to PyTorch" in res.stderr and "--cpu-smoke" in res.stderr
    assert not (tmp_path / "out").exists()
    default = _run([], tmp_path)  # default folder: not created either
    assert default.returncode == 2 and not list(tmp_path.glob("gpu_check_*"))


@pytest.mark.parametrize("args,message", [
    (["--budget", "0"], "--budget needs a whole number of seconds > 0"),
    (["--step-timeout", "x"], "--step-timeout needs a whole number of seconds > 0"),
    (["--steps", "plans,bench"], "unknown step 'bench' in --steps (known: environment,"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["a", "b"], "only one OUT_DIR"),
])
def test_bad_arguments(tmp_path, args, message):
    res = _run(["--cpu-smoke", *args], tmp_path)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_existing_output_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    res = _run(["--cpu-smoke", "out"], tmp_path)
    assert res.returncode == 2 and "out already exists" in res.stderr


def test_help():
    res = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for part in ("--cpu-smoke", "--steps", "--budget", "Exit status", "patch 128^3"):
        assert part in res.stdout


def test_smoke_run_records_a_failed_step_and_goes_on(tmp_path):
    """Real environment and plans steps; the network benchmark fails (stand-in exits 3); the
    summary lists every step, the run exits 1."""
    res = _run(["--cpu-smoke", "--steps", "environment,plans,networks", "out"], tmp_path,
               stand_in='case "$*" in *--help*) echo "usage: benchmark"; exit 0;; esac\n'
                        'echo "CUDA out of memory" >&2; exit 3')
    out = tmp_path / "out"
    assert res.returncode == 1, res.stdout + res.stderr
    assert [s[:2] for s in _steps(out)] == [["environment", "ok"], ["plans", "ok"],
                                             ["networks", "FAILED (exit 3)"]]
    env_log = (out / "logs" / "environment.log").read_text()
    assert f"torch {torch.__version__}" in env_log and "cuda_wkv" in env_log
    networks_log = (out / "logs" / "networks.log").read_text()
    assert "CUDA out of memory" in networks_log and "torch.compile: not measured" in networks_log
    call = (tmp_path / "calls.txt").read_text().splitlines()[-1]
    assert call.startswith("benchmark -d 999 -c 3d_fullres --device cpu --profile -tr nnUNetTrainer "
                           "nnUNetTrainerGLSP nnUNetTrainerPVTGDLA")
    # the plans nnU-Net reads: a 3d_fullres configuration with the requested patch
    folder = out / "nnUNet" / "nnUNet_preprocessed" / "Dataset999_Bench"
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [16, 16, 16]
    assert json.loads((folder / "dataset.json").read_text())["labels"]["background"] == 0
    summary = (out / "summary.md").read_text()
    assert "| networks | FAILED (exit 3) |" in summary and "| plans | ok |" in summary
    assert "SOME STEPS FAILED" in summary and summary.strip() in res.stdout
    assert not list(out.rglob("*.partial"))  # every file published whole


def test_hanging_step_times_out_and_smoke_run_does_not_compile(tmp_path):
    res = _run(["--cpu-smoke", "--steps", "plans,networks", "--step-timeout", "5", "out"], tmp_path,
               stand_in='case "$*" in *--help*) echo "--compile  torch.compile"; exit 0;; esac\n'
                        'exec sleep 120')
    out = tmp_path / "out"
    assert res.returncode == 1
    assert _steps(out)[-1][:2] == ["networks", "TIMEOUT after 5s"]
    assert "--no-compile" in (tmp_path / "calls.txt").read_text().splitlines()[-1].split()
    assert "torch.compile: off in the CPU smoke run" in (out / "logs" / "networks.log").read_text()


def test_networks_without_plans_and_exhausted_budget_are_skipped(tmp_path):
    res = _run(["--cpu-smoke", "--steps", "networks", "a"], tmp_path, stand_in="exit 0")
    assert res.returncode == 1 and _steps(tmp_path / "a") == [["networks", "SKIPPED (needs the plans step)", "0"]]
    assert not (tmp_path / "calls.txt").exists()
    res = _run(["--cpu-smoke", "--steps", "plans,networks", "--budget", "4", "b"], tmp_path,
               stand_in="exit 0")
    assert res.returncode == 1
    assert [s[1] for s in _steps(tmp_path / "b")] == ["SKIPPED (budget of 4s used up)",
                                                      "SKIPPED (needs the plans step)"]


def _fake_bench_wkv(tmp_path, var: str, default: int, profile_line: str = "", only: int = 0):
    """A stand-in ``PYTHON`` for bench_wkv.py: appends ``$var`` (or "unset") to ``<var>.txt`` and
    writes a one-row table whose time is ``$var`` (``default`` when unset) into ``--out-dir``; with
    ``profile_line``, adds it where ``$var`` is ``only``."""
    fake = tmp_path / "fake_python"
    fake.write_text('#!/bin/sh\n'
                    f'echo "${{{var}:-unset}}" >> "{tmp_path}/{var}.txt"\n'
                    'while [ $# -gt 0 ]; do [ "$1" = --out-dir ] && dir=$2; shift; done\n'
                    'mkdir -p "$dir" && printf "| T |\\n|---:|\\n| 256 | %s ms |\\n" '
                    f'"${{{var}:-{default}}}" > "$dir/wkv_cpu.md"\n'
                    + (f'[ "${var}" = {only} ] && echo "{profile_line}" >> "$dir/wkv_cpu.md"\n'
                       if profile_line else '')
                    + 'exit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return fake


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_wkv_chunks_times_the_automatic_and_each_forced_chunk_length(tmp_path):
    """The opt-in step runs bench_wkv.py once per chunk length, the automatic one without any
    CUDA_WKV_CHUNK inherited from the caller, and the summary lists each length's first row.
    ``PYTHON`` is a stand-in that records the chunk length and writes a one-row table."""
    # a --profile line for one length only: the others have none, and that is no failure
    fake = _fake_bench_wkv(tmp_path, "CUDA_WKV_CHUNK", 9, 'kernel fwd+bwd, T=256: wall 2.0 ms', only=64)
    env = dict(os.environ, PYTHON=str(fake), CUDA_WKV_CHUNK="7")
    res = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--steps", "wkv_chunks", "out"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "CUDA_WKV_CHUNK.txt").read_text().split() == ["unset", "32", "64", "128", "256", "512",
                                                              "1024", "2048"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "    CUDA_WKV_CHUNK=auto\n    | 256 | 9 ms |\n    CUDA_WKV_CHUNK=32\n    | 256 | 32 ms |" in summary
    assert "    CUDA_WKV_CHUNK=64\n    | 256 | 64 ms |\n    kernel fwd+bwd, T=256: wall 2.0 ms\n" in summary
    assert (tmp_path / "out" / "bench_wkv_chunks" / "2048" / "wkv_cpu.md").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_wkv_depths_times_the_default_and_each_forced_depth(tmp_path):
    """The opt-in step runs bench_wkv.py once per depth of the kernel's loads ahead, the default
    without any CUDA_WKV_ROWS_AHEAD inherited from the caller, and the summary lists each depth's
    rows.  ``PYTHON`` is a stand-in that records the depth and writes a one-row table."""
    fake = _fake_bench_wkv(tmp_path, "CUDA_WKV_ROWS_AHEAD", 8)
    env = dict(os.environ, PYTHON=str(fake), CUDA_WKV_ROWS_AHEAD="2")
    res = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--steps", "wkv_depths", "out"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "CUDA_WKV_ROWS_AHEAD.txt").read_text().split() == ["unset", "1", "4"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert ("    CUDA_WKV_ROWS_AHEAD=default\n    | 256 | 8 ms |\n    CUDA_WKV_ROWS_AHEAD=1\n    | 256 | 1 ms |\n"
            "    CUDA_WKV_ROWS_AHEAD=4\n    | 256 | 4 ms |") in summary
    assert (tmp_path / "out" / "bench_wkv_depths" / "4" / "wkv_cpu.md").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_wkv_glsp_times_the_kernel_at_each_call(tmp_path):
    """The opt-in step runs bench_wkv.py (the real one, the CPU kernel) once per (T, C) of its list, each
    into a folder of its own, and the summary lists each call's rows."""
    res = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", "--steps", "wkv_glsp", "out"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    for T, C in ((256, 8), (64, 4)):
        md = (out / "bench_wkv_glsp" / f"T{T}_C{C}" / "wkv_cpu.md").read_text()
        assert f"B=1, C={C})" in md and f"\n| {T} | " in md
    summary = (out / "summary.md").read_text()
    assert "## wkv_glsp" in summary and "    T=256 C=8\n    | 256 | " in summary and "    T=64 C=4\n    | 64 | " in summary


def test_bench_wkv_cuda_sweep_keeps_the_points_around_a_failed_one(tmp_path, monkeypatch):
    """On CUDA every point runs in-process: one that raises (out of memory, say) becomes an error
    row, the others are measured, and the tables are on disk after each point."""
    from bench_scripts import load
    bench = load("bench_wkv")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    seen = []

    def run_point(backend, T, *args):
        seen.append(T)
        if T == 512:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        assert (tmp_path / "wkv_cuda.json").exists() == (T > 256)  # written after the first point
        return {"fwd_s": 1e-3, "fwd_peak_bytes": 0}

    monkeypatch.setattr(bench, "run_point", run_point)
    monkeypatch.setattr(bench, "write_plot", lambda *a: None)
    assert bench.main(["--device", "cuda", "--T", "256", "512", "1024", "--backends", "kernel",
                       "--modes", "fwd", "--out-dir", str(tmp_path)]) == 0
    assert seen == [256, 512, 1024]
    rows = json.loads((tmp_path / "wkv_cuda.json").read_text())["results"]
    assert [("error" in r, r["T"]) for r in rows] == [(False, 256), (True, 512), (False, 1024)]
    assert "OutOfMemoryError: CUDA out of memory (injected)" in rows[1]["error"]
    assert "kernel T=512: OutOfMemoryError" in (tmp_path / "wkv_cuda.md").read_text()
