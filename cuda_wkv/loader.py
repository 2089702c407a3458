"""Lazy JIT build of the C++ CPU and CUDA kernels.

Nothing is compiled at import time.  :func:`load_extension` builds the requested
kernel on first use with ``torch.utils.cpp_extension.load`` + ninja and caches the
result (in this process and on disk).  Any failure -- no compiler, no ninja, no CUDA
toolkit, a compile error, a lock held for too long -- is turned into one
:class:`WKVBuildWarning` per kernel kind and ``None`` is returned, so callers fall
back to the pure-PyTorch path instead of crashing.

Cache layout (per user; ``TORCH_EXTENSIONS_DIR`` respected)::

    $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/
        cuda_wkv-<version>-py<XY>-torch<version>/
            cuda_wkv_cpu_<hash>/     # hash of sources, flags, toolchain, arch, CPU
            cuda_wkv_cuda_<hash>/

Environment variables: ``TORCH_EXTENSIONS_DIR`` (cache root), ``TORCH_CUDA_ARCH_LIST``
(CUDA archs; default: the current GPU's), ``CUDA_HOME`` / ``CUDA_PATH`` (toolkit
root), ``CXX`` (host compiler), ``CUDA_WKV_VERBOSE=1`` (show the build log),
``CUDA_WKV_NATIVE=0`` (no ``-march=native`` for the CPU kernel),
``CUDA_WKV_LOCK_TIMEOUT`` (seconds, default 1800: a build lock older than this, or
held by a dead process on this host, is removed; waiting for a live builder gives
up after this long).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, Optional, Union

__all__ = ["VERSION", "WKVBuildWarning", "load_extension", "failure_reason",
           "resolve_cuda_home", "extension_dir", "clear_state"]

VERSION = "0.1.0"

log = logging.getLogger("cuda_wkv")

CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = {
    "cpu": ["wkv_cpu.cpp"],
    "cuda": ["wkv_cuda_binding.cpp", "wkv_cuda.cu"],
}
_HEADERS = ["wkv_checks.h", "wkv_recurrence.h"]
_KINDS = ("cpu", "cuda")
_TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's lock file name
_OUR_LOCK = "cuda_wkv_build.lock"


class WKVBuildWarning(RuntimeWarning):
    """A kernel could not be built; cuda_wkv falls back to the PyTorch implementation."""


class _Failure:
    def __init__(self, reason: str):
        self.reason = reason


_state_lock = threading.RLock()
_state: Dict[str, Union[ModuleType, _Failure]] = {}


def clear_state() -> None:
    """Forget loaded modules / recorded failures of this process (for tests)."""
    with _state_lock:
        _state.clear()


def failure_reason(kind: str) -> Optional[str]:
    """Why ``kind`` ('cpu' / 'cuda') fell back to PyTorch in this process, if it did."""
    entry = _state.get(kind)
    return entry.reason if isinstance(entry, _Failure) else None


# --------------------------------------------------------------------------- toolchain
def resolve_cuda_home() -> Optional[str]:
    """Root of the CUDA toolkit used to compile the CUDA kernel.

    Order: ``CUDA_HOME``, ``CUDA_PATH``, the toolkit of the ``nvcc`` on ``PATH`` (its
    real path, or -- for wrapper scripts -- the ``TOP`` that ``nvcc --dryrun``
    reports), ``/usr/local/cuda``.  A candidate must contain ``bin/nvcc``.
    """
    def ok(root: Optional[str]) -> bool:
        return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc"))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if ok(root):
            return os.path.realpath(root)
        if root:
            log.warning("cuda_wkv: %s=%s has no bin/nvcc; ignoring it", var, root)
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if ok(root) and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
        # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc -> exec .../cuda-X/bin/nvcc)
        try:
            out = subprocess.run([nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull,
                                  "-o", os.devnull], capture_output=True, text=True,
                                 timeout=60)
            m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
            if m:
                root = os.path.realpath(m.group(1).strip())  # TOP = <root>/bin/..
                if ok(root):
                    return root
        except (OSError, subprocess.SubprocessError):
            pass
    if ok("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda")
    return None


def _cpu_signature() -> str:
    """Identifies the host CPU (for -march=native builds in a shared cache)."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        for key in ("model name", "flags", "Features", "CPU part"):
            m = re.search(r"^%s\s*:\s*(.*)$" % key, text, re.M)
            if m:
                sig += "|" + m.group(1).strip()
    except OSError:
        sig += "|" + platform.processor()
    return sig


def _cuda_arch_list() -> Optional[str]:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    import torch
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return None


def _flags(kind: str) -> Dict[str, List[str]]:
    # -fno-trapping-math lets gcc if-convert the selects of the recurrence so that the
    # channel loops vectorise; no -ffast-math (the exp relies on exact rounding).
    cflags = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    ldflags: List[str] = []
    cuda_cflags: List[str] = []
    if kind == "cpu":
        cflags.append("-fopenmp")  # at::parallel_for uses OpenMP in PyTorch builds
        ldflags.append("-fopenmp")
        if os.environ.get("CUDA_WKV_NATIVE", "1") != "0" and \
                platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
            cflags.append("-march=native")
    else:
        cuda_cflags = ["-O3"]
    return {"extra_cflags": cflags, "extra_ldflags": ldflags,
            "extra_cuda_cflags": cuda_cflags}


def _cache_base() -> Path:
    import torch
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        root = Path(env)
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache")
        root = Path(cache) / "torch_extensions"
    tv = re.sub(r"[^A-Za-z0-9_.]", "_", torch.__version__)
    sub = f"cuda_wkv-{VERSION}-py{sys.version_info[0]}{sys.version_info[1]}-torch{tv}"
    path = root / sub
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(str(path))
    except OSError:
        if env:
            raise
        uid = os.getuid() if hasattr(os, "getuid") else os.getlogin()
        path = Path(tempfile.gettempdir()) / f"torch_extensions_{uid}" / sub
        path.mkdir(parents=True, exist_ok=True)
    return path


def _build_key(kind: str, flags: Dict[str, List[str]], arch: Optional[str],
               cuda_home: Optional[str]) -> str:
    import torch
    h = hashlib.sha256()
    for fname in _SOURCES[kind] + _HEADERS:
        h.update(fname.encode())
        h.update((CSRC / fname).read_bytes())
    parts = [kind, VERSION, torch.__version__, str(torch.version.cuda), sys.version,
             json.dumps(flags, sort_keys=True), os.environ.get("CXX", "c++"),
             str(shutil.which(os.environ.get("CXX", "c++")))]
    if kind == "cpu":
        parts.append(_cpu_signature())
    else:
        parts += [str(arch), str(cuda_home)]
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:12]


def extension_dir(kind: str) -> Path:
    """Build directory that :func:`load_extension` uses for ``kind`` right now."""
    arch = _cuda_arch_list() if kind == "cuda" else None
    home = resolve_cuda_home() if kind == "cuda" else None
    return _cache_base() / f"cuda_wkv_{kind}_{_build_key(kind, _flags(kind), arch, home)}"


# ------------------------------------------------------------------------ build lock
def _lock_timeout() -> float:
    try:
        return float(os.environ.get("CUDA_WKV_LOCK_TIMEOUT", "1800"))
    except ValueError:
        return 1800.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _lock_is_stale(path: Path, stale_after: float) -> Optional[str]:
    """Reason string if the cuda_wkv lock at ``path`` is stale, else None."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = None
    if info is None:
        return f"unreadable lock, {age:.0f}s old" if age > 10 else None
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
        return f"owner pid {info.get('pid')} is not running"
    if age > stale_after:
        return f"lock is {age:.0f}s old (> {stale_after:.0f}s)"
    return None


def _torch_lock_file_blocks() -> bool:
    """True for PyTorch versions whose JIT build lock is a FileBaton (the mere existence
    of ``lock`` blocks forever).  Newer versions hold an OS-level lock on that file,
    which the kernel releases when the holder dies, and leave the file behind."""
    ce = _cpp_extension()
    return hasattr(ce, "FileBaton") and not hasattr(ce, "FileLock")


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Inter-process lock around one build directory, robust to killed builders.

    torch's own FileBaton (``lock``) waits forever on a lock left by a killed build.
    cuda_wkv builders first take this lock (O_EXCL file holding pid/host/time); while
    it is held no other cuda_wkv builder can be inside torch's build, so a leftover
    torch ``lock`` is stale and is removed (only for such FileBaton-based torch
    versions; newer ones use an OS lock that dies with its holder).  Our own lock is removed when its owner
    process is dead (same host) or it is older than CUDA_WKV_LOCK_TIMEOUT.
    """
    path = build_dir / _OUR_LOCK
    timeout = _lock_timeout()
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            reason = _lock_is_stale(path, timeout)
            if reason:
                log.warning("cuda_wkv: removing stale build lock %s (%s)", path, reason)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f}s for the build lock {path} "
                                   "held by another process (CUDA_WKV_LOCK_TIMEOUT)")
            if not announced:
                log.info("cuda_wkv: waiting for another process building in %s", build_dir)
                announced = True
            time.sleep(0.5)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "time": time.time()}, fh)
        break
    try:
        torch_lock = build_dir / _TORCH_LOCK
        if _torch_lock_file_blocks() and torch_lock.exists():
            log.warning("cuda_wkv: removing stale torch build lock %s (left by a killed "
                        "build)", torch_lock)
            with contextlib.suppress(FileNotFoundError):
                torch_lock.unlink()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------- build
def _cpp_extension() -> ModuleType:
    """torch.utils.cpp_extension, imported without its misleading CUDA_HOME guess warning
    (we resolve and log the toolkit ourselves, see resolve_cuda_home)."""
    if "torch.utils.cpp_extension" not in sys.modules:
        lg = logging.getLogger("torch.utils.cpp_extension")
        old = lg.level
        lg.setLevel(logging.ERROR)
        try:
            import torch.utils.cpp_extension  # noqa: F401
        finally:
            lg.setLevel(old)
    return sys.modules["torch.utils.cpp_extension"]


def _precheck(kind: str) -> Optional[str]:
    ce = _cpp_extension()
    if not ce.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"C++ compiler {cxx!r} not found (install g++ or set CXX)"
    if kind == "cuda":
        if resolve_cuda_home() is None:
            return ("CUDA toolkit not found (no nvcc; set CUDA_HOME to the toolkit root)")
        if _cuda_arch_list() is None:
            return "no CUDA device visible and TORCH_CUDA_ARCH_LIST is not set"
    return None


def _summarise(exc: BaseException) -> str:
    """Short cause for the warning: the exception headline + the compiler's error lines."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0].split(": [", 1)[0][:200] if lines else ""
    errs = [ln for ln in lines[1:] if re.search(r"(error|Error|ERROR)\b", ln)
            and not ln.startswith("ninja:")]
    parts = [f"{type(exc).__name__}: {head}"] + [ln[:300] for ln in errs[:3]]
    return " | ".join(parts)


def _build(kind: str) -> ModuleType:
    ce = _cpp_extension()

    flags = _flags(kind)
    arch = cuda_home = None
    env_patch: Dict[str, str] = {}
    if kind == "cuda":
        cuda_home = resolve_cuda_home()
        arch = _cuda_arch_list()
        if ce.CUDA_HOME is None or os.path.realpath(ce.CUDA_HOME) != cuda_home:
            log.info("cuda_wkv: using CUDA toolkit %s (torch guessed %s)", cuda_home,
                     ce.CUDA_HOME)
            ce.CUDA_HOME = cuda_home  # torch's guess from nvcc on PATH can be wrong
        else:
            log.info("cuda_wkv: using CUDA toolkit %s", cuda_home)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            env_patch["TORCH_CUDA_ARCH_LIST"] = arch  # the visible GPUs' archs
    key = _build_key(kind, flags, arch, cuda_home)
    name = f"cuda_wkv_{kind}_{key}"
    build_dir = _cache_base() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("CUDA_WKV_VERBOSE", "0") not in ("", "0")
    sources = [str(CSRC / s) for s in _SOURCES[kind]]
    log.info("cuda_wkv: loading the %s kernel from %s (first use compiles it, "
             "~1-2 min)", kind, build_dir)
    old = {k: os.environ.get(k) for k in env_patch}
    t0 = time.time()
    try:
        os.environ.update(env_patch)
        with _build_lock(build_dir):
            mod = ce.load(name=name, sources=sources, extra_include_paths=[str(CSRC)],
                          build_directory=str(build_dir), verbose=verbose,
                          with_cuda=(kind == "cuda"), **flags)
    finally:
        for k, val in old.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val
    log.info("cuda_wkv: %s kernel ready in %.1fs", kind, time.time() - t0)
    return mod


def load_extension(kind: str) -> Optional[ModuleType]:
    """The compiled ``kind`` ('cpu' or 'cuda') kernel module, or None after a failure.

    Builds on first call (thread-safe; at most once per process).  On failure emits a
    single :class:`WKVBuildWarning` naming the cause and returns None from then on.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {_KINDS}")
    with _state_lock:
        entry = _state.get(kind)
        if entry is None:
            reason = None
            try:
                reason = _precheck(kind)
                if reason is None:
                    entry = _build(kind)
            except Exception as exc:  # noqa: BLE001 - any build problem means fallback
                reason = _summarise(exc)
            if reason is not None:
                entry = _Failure(reason)
                label = "C++ CPU" if kind == "cpu" else "CUDA"
                warnings.warn(
                    f"cuda_wkv: could not build the {label} kernel ({reason}); using the "
                    "pure-PyTorch O(T) implementation instead (exact, but slower). "
                    "Set CUDA_WKV_VERBOSE=1 to see the build log, or "
                    "CUDA_WKV_BACKEND=torch to choose the fallback explicitly.",
                    WKVBuildWarning, stacklevel=3)
            _state[kind] = entry
        return None if isinstance(entry, _Failure) else entry
