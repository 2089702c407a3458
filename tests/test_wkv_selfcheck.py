"""The kernels' self-check on first use (cuda_wkv.selfcheck + dispatch).

On CPU the mechanism is exercised through the same code path as on CUDA: the CPU backend
is added to the checked backends and the compiled kernel's entry point is replaced by a
stand-in whose results can be made wrong (values, gradients, or an exception)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import cuda_wkv
from cuda_wkv import WKVSelfCheckWarning, bi_wkv, bi_wkv_scan, dispatch, loader, selfcheck

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


class _StandInKernel:
    """Stands in for ``dispatch.kernel_bi_wkv`` (the compiled kernel's entry point);
    exact unless a fault is injected."""

    def __init__(self, value_error=0.0, grad_k_factor=1.0, raises=False):
        self.value_error, self.grad_k_factor, self.raises = value_error, grad_k_factor, raises
        self.calls = 0

    def __call__(self, w, u, k, v):
        self.calls += 1
        if self.raises:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        f = self.grad_k_factor
        k_scaled_grad = k * f - (k * (f - 1)).detach()  # the value of k, f times its gradient
        return bi_wkv_scan(w, u, k_scaled_grad, v) + self.value_error


@pytest.fixture
def cpu_checked(monkeypatch):
    """Check the CPU backend like the CUDA one, with a fresh record of checks; returns a
    function installing a stand-in kernel."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.delenv(selfcheck.SELFCHECK_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_CHECKED_BACKENDS", ("cpu", "cuda"))
    monkeypatch.setattr(dispatch, "_checks", {})
    return lambda kernel: _install(monkeypatch, kernel)


def _install(monkeypatch, kernel):
    monkeypatch.setattr(loader, "failure_reason", lambda kind: None)
    monkeypatch.setattr(loader, "load_extension", lambda kind: object())  # "built"
    monkeypatch.setattr(dispatch, "kernel_bi_wkv", kernel)
    return kernel


def _problem(dtype=torch.float32, T=50):
    g = torch.Generator().manual_seed(3)
    w = torch.rand(4, generator=g, dtype=torch.float64) / 10
    u, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4,), (2, T, 4), (2, T, 4)))
    return [x.to(dtype) for x in (w, u, k, v)]


def _calls_with_warnings(fn, *args):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [r for r in rec if issubclass(r.category, WKVSelfCheckWarning)]


def test_healthy_kernel_is_checked_once_then_used(cpu_checked):
    kernel = cpu_checked(_StandInKernel())
    args = _problem()
    y, warned = _calls_with_warnings(bi_wkv, *args)
    assert not warned
    assert kernel.calls == 2  # the check, then the call itself
    assert dispatch._checks == {("cpu", torch.float32): None}
    for _ in range(3):
        bi_wkv(*args)
    assert kernel.calls == 5  # no further checks
    torch.testing.assert_close(y, bi_wkv_scan(*args))
    assert cuda_wkv.backend_for(args[2]) == "cpu"


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_first_call_without_autograd(cpu_checked, mode):
    """Prediction runs under no_grad / inference_mode: the check still computes gradients."""
    kernel = cpu_checked(_StandInKernel())
    with mode():
        y, warned = _calls_with_warnings(bi_wkv, *_problem())
    assert not warned and kernel.calls == 2 and dispatch._checks == {("cpu", torch.float32): None}
    assert not y.requires_grad


def test_wrong_values_warn_once_and_fall_back(cpu_checked):
    kernel = cpu_checked(_StandInKernel(value_error=0.1))
    args = _problem()
    y, warned = _calls_with_warnings(bi_wkv, *args)
    assert len(warned) == 1
    msg = str(warned[0].message)
    for part in ("cpu kernel disagrees", "on cpu", "float32", "|error| of y", "issue tracker",
                 "python -m cuda_wkv.selfcheck --device cpu --dtype float32",
                 "CUDA_WKV_SELFCHECK=0"):
        assert part in msg, (part, msg)
    assert warned[0].filename == __file__  # attributed to the caller of bi_wkv
    torch.testing.assert_close(y, bi_wkv_scan(*args), rtol=0, atol=0)
    calls = kernel.calls
    leaves = [x.clone().requires_grad_() for x in args]
    y2, warned = _calls_with_warnings(bi_wkv, *leaves)
    assert not warned and kernel.calls == calls  # the kernel is not used any more
    y2.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)
    assert cuda_wkv.backend_for(args[2]) == "torch"
    assert cuda_wkv.kernel_backend(args[2]) == "cpu"
    # float64 is a separate (device, dtype): checked (and failed) on its own
    _, warned = _calls_with_warnings(bi_wkv, *_problem(torch.float64))
    assert len(warned) == 1 and "float64" in str(warned[0].message)
    assert set(dispatch._checks) == {("cpu", torch.float32), ("cpu", torch.float64)}


def test_wrong_gradient_is_caught(cpu_checked):
    cpu_checked(_StandInKernel(grad_k_factor=1.01))
    _, warned = _calls_with_warnings(bi_wkv, *_problem())
    assert len(warned) == 1 and "|error| of grad k" in str(warned[0].message)


def test_kernel_that_raises_is_a_failed_check(cpu_checked):
    cpu_checked(_StandInKernel(raises=True))
    y, warned = _calls_with_warnings(bi_wkv, *_problem())
    assert len(warned) == 1
    assert "raised RuntimeError: CUDA error: an illegal memory access" in str(warned[0].message)
    torch.testing.assert_close(y, bi_wkv_scan(*_problem()))


def test_check_can_be_turned_off(cpu_checked, monkeypatch):
    kernel = cpu_checked(_StandInKernel(value_error=0.1))
    monkeypatch.setenv("CUDA_WKV_SELFCHECK", "0")
    args = _problem()
    y, warned = _calls_with_warnings(bi_wkv, *args)
    assert not warned and kernel.calls == 1 and not dispatch._checks
    torch.testing.assert_close(y, bi_wkv_scan(*args) + 0.1)  # the (faulty) kernel ran
    monkeypatch.setenv("CUDA_WKV_SELFCHECK", "off")
    with pytest.raises(ValueError, match=r"CUDA_WKV_SELFCHECK='off' is not valid; use 1 .* or 0"):
        bi_wkv(*args)


def test_unchecked_backends_run_no_check(monkeypatch):
    """By default only the CUDA kernel is checked: CPU calls never run the check."""
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_checks", {})
    kernel = _install(monkeypatch, _StandInKernel(value_error=0.1))
    assert dispatch._CHECKED_BACKENDS == ("cuda",)
    bi_wkv(*_problem())
    assert kernel.calls == 1 and not dispatch._checks
    monkeypatch.setenv("CUDA_WKV_SELFCHECK", "yes")  # validated on every call all the same
    with pytest.raises(ValueError, match="CUDA_WKV_SELFCHECK='yes' is not valid"):
        bi_wkv(*_problem())


def test_checked_under_torch_compile(cpu_checked):
    """The check runs (eagerly) when the first call is being compiled; a failed check
    puts the PyTorch path into the graph."""
    if getattr(torch.library, "custom_op", None) is None:
        pytest.skip("torch.library.custom_op not available")
    cpu_checked(_StandInKernel(value_error=0.1))
    args = _problem()
    compiled = torch.compile(lambda *a: bi_wkv(*a), fullgraph=True, backend="aot_eager")
    y, warned = _calls_with_warnings(compiled, *args)
    assert len(warned) == 1
    torch.testing.assert_close(y, bi_wkv_scan(*args))


def test_selfcheck_command(cpu_checked, capsys):
    cpu_checked(_StandInKernel())
    assert selfcheck.main(["--device", "cpu", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "cpu kernel on cpu, float64: OK" in out
    cpu_checked(_StandInKernel(value_error=1e-3))
    assert selfcheck.main(["--device", "cpu"]) == 1
    assert "cpu kernel on cpu, float32: FAILED: max |error| of y is" in capsys.readouterr().out


def test_selfcheck_command_runs_without_a_runpy_warning():
    """The command a WKVSelfCheckWarning asks users to run and attach: its output is the check's alone (the package
    does not import cuda_wkv.selfcheck before runpy runs it)."""
    run = subprocess.run([sys.executable, "-m", "cuda_wkv.selfcheck", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "usage: python -m cuda_wkv.selfcheck" in run.stdout
    assert "RuntimeWarning" not in run.stderr, run.stderr
    # imported on first use, the module and its names are still where they were
    probe = ("import cuda_wkv; print(cuda_wkv.selfcheck.__name__, cuda_wkv.SELFCHECK_ENV, "
             "{'selfcheck', 'WKVSelfCheckWarning'} <= set(dir(cuda_wkv)))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["cuda_wkv.selfcheck", "CUDA_WKV_SELFCHECK", "True"], run.stderr


def test_selfcheck_command_without_kernel(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_WKV_BACKEND", "torch")
    assert selfcheck.main(["--device", "cpu"]) == 2
    assert "no compiled kernel serves cpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        monkeypatch.delenv("CUDA_WKV_BACKEND")
        assert selfcheck.main(["--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_kernel_passes_the_check(dtype, monkeypatch):
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    assert loader.load_extension("cpu") is not None, loader.failure_reason("cpu")
    assert selfcheck.compare_to_reference(dispatch.kernel_bi_wkv, torch.device("cpu"), dtype) is None


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_kernel_passes_the_selfcheck(dtype, monkeypatch):
    monkeypatch.delenv("CUDA_WKV_BACKEND", raising=False)
    monkeypatch.delenv(selfcheck.SELFCHECK_ENV, raising=False)
    monkeypatch.setattr(dispatch, "_checks", {})
    x = torch.zeros(1, 1, 1, device="cuda", dtype=dtype)
    _, warned = _calls_with_warnings(cuda_wkv.backend_for, x)
    assert not warned
    assert dispatch._checks == {(str(x.device), dtype): None}
    assert cuda_wkv.backend_for(x) == "cuda"
    if dtype == torch.float32:  # a device's default dtype: the bare "cuda" is the same GPU
        assert cuda_wkv.backend_for("cuda") == "cuda" and len(dispatch._checks) == 1


@pytest.mark.parametrize("initialized,spelling,expected", [
    (True, "cuda", "cuda:1"), (False, "cuda", "cuda:0"), (True, "cuda:0", "cuda:0"), (True, "cpu", "cpu")])
def test_bare_cuda_is_the_current_device(monkeypatch, initialized, spelling, expected):
    """backend_for("cuda") and a tensor on cuda:N share one self-check (its key is the device);
    resolving it never initialises CUDA (before initialisation the current device is 0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)

    def current_device() -> int:
        if not initialized:
            raise AssertionError("current_device() would initialise CUDA")
        return 1

    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    assert dispatch._device_of(spelling) == torch.device(expected)


def test_bare_cuda_without_a_gpu_stays_bare(monkeypatch):
    """Without a GPU "cuda" is left as it is (the dispatcher then warns that no CUDA device is visible)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dispatch._device_of("cuda") == torch.device("cuda")
