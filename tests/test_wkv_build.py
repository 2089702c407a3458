"""Build tests of cuda_wkv: the CUDA source must compile (and import) wherever nvcc
exists, with or without a GPU, and be published complete in the cache.  Uses the per-user
extension cache, so the ~1-2 min nvcc build happens once per source version."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_resolve_cuda_home_finds_nvcc():
    from cuda_wkv.loader import resolve_cuda_home
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no nvcc")
    root = resolve_cuda_home()
    assert root is not None and os.path.isfile(os.path.join(root, "bin", "nvcc"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernel_compiles():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if not has_gpu and not env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"  # nothing to query without a device
    code = textwrap.dedent("""
        import logging, warnings
        logging.basicConfig(level=logging.INFO)
        warnings.simplefilter('error', category=__import__('cuda_wkv').WKVBuildWarning)
        from cuda_wkv import loader
        mod = loader.load_extension('cuda')
        assert mod is not None, loader.failure_reason('cuda')
        assert callable(mod.forward) and callable(mod.backward)
        module, so = loader._verified_library(loader.extension_dir('cuda'))  # published whole
        assert module == mod.__name__, (module, mod.__name__)
        print('BUILT', so)
        """)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    assert "BUILT" in r.stdout
    assert "using CUDA toolkit" in r.stderr  # the resolved toolkit root is logged


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernels_do_not_spill(tmp_path):
    """Every CUDA kernel keeps its state in registers (sm_90, as the H200 runs it): a spill
    would put each scan step's state through local memory.  The translation unit needs only
    the CUDA runtime, so nvcc compiles it alone; ptxas reports each entry's registers."""
    src = REPO / "cuda_wkv" / "csrc" / "wkv_cuda.cu"
    r = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "-std=c++17", "-Xptxas", "-v", "-c", str(src),
                        "-o", str(tmp_path / "wkv_cuda.o")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = r.stderr
    entries = report.count("Compiling entry function")
    spills = [line for line in report.splitlines() if "spill" in line]
    assert entries >= 10 and len(spills) == entries, report[-3000:]  # forward, backward, f32/f64
    assert all("0 bytes spill stores, 0 bytes spill loads" in line for line in spills), report[-3000:]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="x86-64 and objdump needed")
def test_cpu_kernel_vectorises_with_avx2_alone(tmp_path):
    """The CPU kernel's channel loops vectorise on AVX2 machines without AVX-512 too (-march=haswell,
    the loader's other flags), in float32 and float64: packed multiply-adds in the object code.
    Conversions between double and int64 need AVX-512DQ: with them in the float64 exp and log (as
    until 2026-12-06) gcc 12 left every float64 loop scalar here, 0 packed-double multiply-adds."""
    import torch.utils.cpp_extension as cpp
    from cuda_wkv import loader

    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        pytest.skip("no C++ compiler")
    flags = [f for f in loader._flags("cpu")["extra_cflags"] if not f.startswith("-march")]
    includes = [f"-I{p}" for p in (*cpp.include_paths(), sysconfig.get_paths()["include"], REPO / "cuda_wkv" / "csrc")]
    obj = tmp_path / "wkv_cpu.o"
    r = subprocess.run([cxx, "-std=c++20", "-march=haswell", *flags, *includes,
                        "-DTORCH_EXTENSION_NAME=wkv_cpu_avx2", "-c", str(REPO / "cuda_wkv" / "csrc" / "wkv_cpu.cpp"),
                        "-o", str(obj)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    asm = subprocess.run(["objdump", "-d", str(obj)], capture_output=True, text=True, timeout=300).stdout
    packed = {kind: len(re.findall(rf"\bvfn?m(?:add|sub)\d+{kind}\b", asm)) for kind in ("ps", "pd")}
    assert packed["ps"] > 100 and packed["pd"] > 100, packed
