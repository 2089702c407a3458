"""Lazy JIT build of the C++ CPU and CUDA kernels, and their on-disk cache.

Nothing is compiled at import time.  :func:`load_extension` builds the requested
kernel on first use with ``torch.utils.cpp_extension.load`` + ninja and caches the
result, in this process and on disk.  Any failure -- no compiler, no ninja, no CUDA
toolkit, a compile error, an unsafe cache folder, a build lock held for too long -- is
turned into one :class:`WKVBuildWarning` per kernel kind and ``None`` is returned, so
callers fall back to the pure-PyTorch path instead of crashing or hanging.

Cache layout (per user)::

    <root>/cuda_wkv-<version>-py<XY>-torch<version>/      # mode 0700
        cuda_wkv_<kind>_<hash>/             # a complete build (appears by rename only)
            cuda_wkv_<kind>_<hash>.so
            cuda_wkv_build.json             # completion record: module, file, size, sha256
        cuda_wkv_<kind>_<hash>.lock         # held while one process builds it
        .cuda_wkv_<kind>_<hash>.build-*/    # a build in progress (private folder)

``<root>`` is ``TORCH_EXTENSIONS_DIR``, else ``$XDG_CACHE_HOME/torch_extensions`` (an absolute
``XDG_CACHE_HOME``) or ``~/.cache/torch_extensions`` (the password database's home where ``HOME`` is
unset, empty or relative), else (when that cannot be created)
``$TMPDIR/torch_extensions_<uid>``; ``<hash>`` covers the sources, flags, toolchain,
CUDA archs and (CPU kernel) the host CPU.

* Complete or absent: a build is compiled in a private folder, its completion record
  is written last, and the folder is renamed into place.  A build whose ``.so`` does
  not match its record (torn copy, full disk, no record) is never loaded: one log
  warning, then it is rebuilt.
* A complete build is loaded without looking at any lock.  Otherwise one process
  builds while holding ``<name>.lock`` (pid, host, time; its mtime is a heartbeat
  refreshed every 10 s).  A lock whose owner is dead (same host) or whose heartbeat
  stopped 60 s ago (any host: shared NFS caches) is removed.  A live builder is waited
  for with a visible log message, at most ``CUDA_WKV_LOCK_TIMEOUT`` seconds, then the
  PyTorch path is used.
* Private: folders are created with mode 0700.  The cache root and everything in it
  must belong to the current user and not be writable by group/others, and no folder
  above the root may be writable by group/others unless it is sticky (like ``/tmp``);
  otherwise the cache is refused (warning, PyTorch path) -- a library planted there
  would run inside this process.

Environment variables: ``TORCH_EXTENSIONS_DIR`` (cache root), ``TORCH_CUDA_ARCH_LIST``
(CUDA archs; default: the current GPU's), ``CUDA_HOME`` / ``CUDA_PATH`` (toolkit
root), ``CXX`` (host compiler), ``CUDA_WKV_VERBOSE=1`` (show the build log),
``CUDA_WKV_NATIVE=0`` (no ``-march=native`` for the CPU kernel),
``CUDA_WKV_LOCK_TIMEOUT`` (seconds to wait for another process's build, in [0, 86400],
default 600), ``CUDA_WKV_ROWS_AHEAD`` (rows the CUDA kernel's phase 1 loads ahead, chunk summaries its
phase 2 and partial sums its final reduction, an integer in [1, 32], default 8; each value is
a separate build).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from nnunetv2_ext.env_options import env_float, env_int
from nnunetv2_ext.publish import fsync_path

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
_LAYOUT = "2"  # cache layout version (part of the build key)
_RECORD = "cuda_wkv_build.json"
_LOCK_TIMEOUT_ENV = "CUDA_WKV_LOCK_TIMEOUT"
_DEFAULT_LOCK_TIMEOUT_S = 600.0  # a busy machine can take minutes to build
_HEARTBEAT_S = 10.0  # a builder touches its lock this often
_LOCK_STALE_S = 60.0  # a lock without heartbeat for this long is abandoned
_LEFTOVER_BUILD_S = 3600.0  # private build folders older than this were abandoned


class WKVBuildWarning(RuntimeWarning):
    """A kernel could not be built; cuda_wkv falls back to the PyTorch implementation."""


class _Failure:
    def __init__(self, reason: str):
        self.reason = reason


class _Fallback(RuntimeError):
    """An expected reason to use the PyTorch path; the message is shown as is."""


class _Incomplete(Exception):
    """A cache entry that must not be loaded; the message says why."""


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


def _rows_ahead() -> int:
    """``CUDA_WKV_ROWS_AHEAD``: rows the CUDA kernel's phase 1 loads ahead of its steps, chunk
    summaries its phase 2 (0 = the header's default, 8); a tuning knob for GPU runs, each value a build of its own.  ``EnvOptionError``
    (a ValueError) naming it for anything but an integer in [1, 32]."""
    return env_int("CUDA_WKV_ROWS_AHEAD", 0, 1, 32)


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
        ahead = _rows_ahead()
        if ahead:
            cuda_cflags.append(f"-DWKV_ROWS_AHEAD={ahead}")
    return {"extra_cflags": cflags, "extra_ldflags": ldflags,
            "extra_cuda_cflags": cuda_cflags}


class _Target(NamedTuple):
    """What one build is made from; ``name`` is both the module and the folder name."""
    kind: str
    name: str
    flags: Dict[str, List[str]]
    arch: Optional[str]
    cuda_home: Optional[str]


def _target(kind: str) -> _Target:
    import torch
    flags = _flags(kind)
    arch = _cuda_arch_list() if kind == "cuda" else None
    cuda_home = resolve_cuda_home() if kind == "cuda" else None
    h = hashlib.sha256()
    for fname in _SOURCES[kind] + _HEADERS:
        h.update(fname.encode())
        h.update((CSRC / fname).read_bytes())
    parts = [kind, VERSION, _LAYOUT, torch.__version__, str(torch.version.cuda),
             sys.version, json.dumps(flags, sort_keys=True), os.environ.get("CXX", "c++"),
             str(shutil.which(os.environ.get("CXX", "c++")))]
    if kind == "cpu":
        parts.append(_cpu_signature())
    else:
        parts += [str(arch), str(cuda_home)]
    h.update("\n".join(parts).encode())
    return _Target(kind, f"cuda_wkv_{kind}_{h.hexdigest()[:12]}", flags, arch, cuda_home)


# ----------------------------------------------------------------- private cache folders
def _unsafe(path: Path, must_own: bool) -> Optional[str]:
    """Why someone other than the current user could change ``path``, or None.

    ``must_own``: the cache's own folders and files must belong to the current user, not
    be writable by group/others and not be symbolic links (whose target's folders nobody
    checks); a folder above the cache root may belong to anyone but must not be writable by
    group/others unless it is sticky (like ``/tmp``)."""
    st = os.lstat(path) if must_own else os.stat(path)
    if stat.S_ISLNK(st.st_mode):
        return (f"{path} is a symbolic link; the cache's own folders and files must be "
                "real (fix: delete it; to keep the cache elsewhere, set TORCH_EXTENSIONS_DIR "
                "to that folder)")
    if must_own and st.st_uid != os.geteuid():
        return (f"{path} belongs to uid {st.st_uid}, not to the current user "
                f"(uid {os.geteuid()})")
    sticky = not must_own and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & 0o022 and not sticky:
        return (f"{path} is writable by group/others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}; fix: chmod go-w {path})")
    return None


def _make_private_dir(path: Path) -> None:
    """``mkdir -p`` with mode 0700 for every folder it creates."""
    missing = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, 0o700)


def _private_root(root: Path, origin: str) -> Path:
    """``root`` created (0700) and checked; :class:`_Fallback` if others could change it."""
    _make_private_dir(root)
    real = Path(os.path.realpath(root))
    if not real.is_dir():
        raise NotADirectoryError(f"kernel cache {root} ({origin}) is not a folder: remove the file, "
                                 "or set TORCH_EXTENSIONS_DIR to a folder")
    problem = next(filter(None, (_unsafe(p, must_own=False) for p in reversed(real.parents))),
                   None) or _unsafe(real, must_own=True)
    if problem:
        raise _Fallback(f"refusing the kernel cache {root} ({origin}): {problem}. A "
                        "library planted there would run in this process; set "
                        "TORCH_EXTENSIONS_DIR to a folder only you can write")
    if not os.access(real, os.W_OK | os.X_OK):
        raise PermissionError(f"kernel cache {root} ({origin}) is not writable")
    return real


def _user_cache() -> Path:
    """The user's cache folder: ``$XDG_CACHE_HOME`` if it is an absolute path (the XDG spec: a relative one is
    ignored, it would follow the current folder), else ``<home>/.cache``, the home being ``$HOME`` if absolute,
    else the password database's (a batch job with ``HOME`` unset or empty, which ``~`` turns into ``/``)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg)
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home):
        home = os.path.expanduser("~")
        if os.name == "posix":
            import pwd
            with contextlib.suppress(KeyError):
                home = pwd.getpwuid(os.geteuid()).pw_dir
    return Path(home) / ".cache"


def _cache_base() -> Path:
    """This version's cache folder, created 0700 and checked (see :func:`_unsafe`)."""
    import torch
    tv = re.sub(r"[^A-Za-z0-9_.]", "_", torch.__version__)
    sub = f"cuda_wkv-{VERSION}-py{sys.version_info[0]}{sys.version_info[1]}-torch{tv}"
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        root = _private_root(Path(env), "TORCH_EXTENSIONS_DIR")
    else:
        try:
            root = _private_root(_user_cache() / "torch_extensions", "the default")
        except OSError as exc:  # e.g. a read-only home: use a private folder in TMPDIR
            fallback = Path(tempfile.gettempdir()) / f"torch_extensions_{os.geteuid()}"
            log.info("cuda_wkv: %s; using %s", exc, fallback)
            root = _private_root(fallback, "the fallback for an unwritable home cache")
    base = root / sub
    _make_private_dir(base)
    problem = _unsafe(base, must_own=True)
    if problem:
        raise _Fallback(f"refusing the kernel cache {base}: {problem}")
    return base


def extension_dir(kind: str) -> Path:
    """Folder holding the complete build of ``kind`` that :func:`load_extension` uses now
    (it may not exist yet).  Raises RuntimeError if the cache folder is unsafe."""
    return _cache_base() / _target(kind).name


# --------------------------------------------------------------- complete builds
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flush(path: Path) -> None:
    """``fsync_path`` where the file system allows it (some refuse a folder's fsync)."""
    with contextlib.suppress(OSError):
        fsync_path(str(path))


def _verified_library(folder: Path) -> Tuple[str, Path]:
    """(module name, .so path) of the complete build in ``folder``.

    Raises FileNotFoundError if there is no build, :class:`_Incomplete` if the folder
    must not be loaded: no or unreadable record, a ``.so`` whose size or SHA-256 differs
    from the record, or a folder/file that is not private."""
    if not os.path.lexists(folder):
        raise FileNotFoundError(folder)
    record = folder / _RECORD
    try:
        for p in (folder, record):
            problem = _unsafe(p, must_own=True)
            if problem:
                raise _Incomplete(problem)
        info = json.loads(record.read_text())
        module, fname = str(info["module"]), str(info["file"])
        size, digest = int(info["size"]), str(info["sha256"])
        if not re.fullmatch(rf"{re.escape(folder.name)}(_v\d+)?", module):  # torch may add _v1
            raise _Incomplete(f"the record names the module {module!r}, not {folder.name!r}")
    except FileNotFoundError:
        raise _Incomplete(f"no completion record {_RECORD}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Incomplete(f"unreadable completion record: {exc}") from None
    so = folder / fname
    if Path(fname).name != fname or not so.is_file():
        raise _Incomplete(f"the recorded library {fname!r} is missing")
    problem = _unsafe(so, must_own=True)
    if problem:
        raise _Incomplete(problem)
    actual = so.stat().st_size
    if actual != size:
        raise _Incomplete(f"{fname} has {actual} bytes, the record says {size}")
    if _sha256(so) != digest:
        raise _Incomplete(f"the SHA-256 of {fname} differs from the record")
    return module, so


def _import_library(module: str, path: Path) -> ModuleType:
    """Import the extension module ``module`` from ``path`` (once per process)."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(module, str(path))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as module {module}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[module] = mod
    return mod


def _load_complete(folder: Path, warned: set) -> Optional[ModuleType]:
    """The module of the complete build in ``folder``; None if there is none (an
    incomplete one is reported once per reason in ``warned`` and left to be rebuilt)."""
    try:
        return _import_library(*_verified_library(folder))
    except FileNotFoundError:
        return None
    except (_Incomplete, ImportError) as exc:
        reason = str(exc)
        if reason not in warned:
            warned.add(reason)
            log.warning("cuda_wkv: not loading the build in %s (%s); rebuilding it",
                        folder, reason)
        return None


def _remove(path: Path, strict: bool = False) -> None:
    """Delete a folder tree or a file (a symbolic link itself, never its target), as far as
    possible; ``strict``: raise the OSError (FileNotFoundError included) instead."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=not strict)
        else:
            path.unlink()
    except OSError:
        if strict:
            raise


def _discard(folder: Path) -> None:
    """Move a cache entry (normally a folder) out of the way, then delete it."""
    trash = folder.with_name(f".{folder.name}.old-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(folder, trash)
        _remove(trash)


def _publish(mod: ModuleType, build_dir: Path, folder: Path) -> None:
    """Write the completion record of the build in ``build_dir`` (last) and rename the
    folder to ``folder``; if a complete build got there first, keep that one."""
    so = Path(mod.__file__ or "")
    if so.parent != build_dir or not so.is_file():
        raise RuntimeError(f"the built module {mod.__name__} is not in {build_dir}")
    os.chmod(so, stat.S_IMODE(so.stat().st_mode) & ~0o022)
    _flush(so)
    record = {"module": mod.__name__, "file": so.name, "size": so.stat().st_size,
              "sha256": _sha256(so), "host": socket.gethostname(), "time": time.time()}
    # 0600 whatever the umask (with 002 a plain open gives 0664, which the next load refuses)
    fd = os.open(build_dir / _RECORD, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _flush(build_dir)
    for _ in range(3):
        try:
            os.rename(build_dir, folder)
            break
        except OSError as exc:
            error = exc
            try:
                _verified_library(folder)
            except (FileNotFoundError, _Incomplete):
                _discard(folder)
                continue
            shutil.rmtree(build_dir, ignore_errors=True)  # same build, published first
            break
    else:
        log.warning("cuda_wkv: could not publish the build as %s (%s); this process uses "
                    "it, later ones will build again", folder, error)
    _flush(folder.parent)


# ------------------------------------------------------------------------ build lock
def _lock_timeout() -> float:
    """``CUDA_WKV_LOCK_TIMEOUT`` in seconds (0 = never wait); ``EnvOptionError`` (a ValueError) naming it
    when it is not a number in [0, 86400]."""
    return env_float(_LOCK_TIMEOUT_ENV, _DEFAULT_LOCK_TIMEOUT_S, 0.0, 86400.0)


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


class _LockView(NamedTuple):
    info: dict  # the owner record, or {}
    age: Optional[float]  # seconds since the last heartbeat by the file's clock; None: no lock
    regular: bool  # a regular file, as every builder writes it
    identity: Tuple[int, int]  # (inode, mtime in ns): changes with every heartbeat


def _read_lock(path: Path) -> _LockView:
    """What the lock file ``path`` says (a symbolic link is not followed)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return _LockView({}, None, True, (0, 0))
    view = _LockView({}, time.time() - st.st_mtime, stat.S_ISREG(st.st_mode), (st.st_ino, st.st_mtime_ns))
    if not view.regular:
        return view
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = None
    return view._replace(info=info if isinstance(info, dict) else {})


def _stale_reason(info: dict, age: float, regular: bool = True) -> Optional[str]:
    """Why a lock with owner ``info`` and heartbeat age ``age`` is abandoned, or None.
    ``regular``: whether the lock is a regular file, as every builder writes it.  (A heartbeat
    that never changes while this process waits is judged in :func:`_acquire_lock`, by this
    process's own clock, whatever the file's times say.)"""
    if not regular:
        return "it is not a regular file (a symbolic link or a folder), which no build writes"
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int) \
            and not _pid_alive(pid):
        return f"its owner pid {pid} on this host is not running"
    if age > _LOCK_STALE_S:
        return f"no heartbeat for {age:.0f}s (> {_LOCK_STALE_S:.0f}s)"
    return None


def _owner(info: dict, age: float) -> str:
    return (f"held by pid {info.get('pid', '?')} on host {info.get('host', '?')}, "
            f"last heartbeat {age:.0f}s ago")


def _acquire_lock(path: Path, token: str, timeout: float,
                  ready: Callable[[], bool]) -> bool:
    """Take the build lock ``path`` (True), or return False as soon as ``ready()``.

    Abandoned locks (:func:`_stale_reason`) are removed with a log warning.  A live
    owner is waited for, with a log warning saying who and how to skip, for at most
    ``timeout`` seconds; then :class:`_Fallback` is raised."""
    start = time.monotonic()
    next_note = 0.0
    first_seen: Dict[Tuple[int, int], float] = {}  # lock identity -> when this process saw it first
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            fix = ("free space there" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                   else "make the cache folder writable")
            raise _Fallback(f"cannot create the build lock {path} ({exc}); {fix}, or set "
                            "TORCH_EXTENSIONS_DIR to a folder only you can write") from None
        else:
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "time": time.time(), "token": token}, fh)
            return True
        if ready():
            return False
        view = _read_lock(path)
        info, age = view.info, view.age
        if age is None:
            continue
        unchanged = time.monotonic() - first_seen.setdefault(view.identity, time.monotonic())
        reason = _stale_reason(info, age, view.regular) or (
            f"its heartbeat has not changed for {unchanged:.0f}s while this process waited "
            f"(its time stamp says {age:.0f}s ago: the clocks differ)"
            if unchanged > _LOCK_STALE_S else None)
        if reason:
            if _read_lock(path).identity != view.identity:
                continue  # replaced meanwhile (another waiter took over): judge the new one
            log.warning("cuda_wkv: removing stale build lock %s (%s)", path, reason)
            try:
                _remove(path, strict=True)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _Fallback(f"cannot remove the stale build lock {path} ({reason}): "
                                f"{exc}; delete it") from None
            continue
        waited = time.monotonic() - start
        if waited >= timeout:
            raise _Fallback(f"gave up after {waited:.0f}s waiting for the build lock {path} "
                            f"({_owner(info, age)}; {_LOCK_TIMEOUT_ENV}={timeout:g}); delete "
                            "the lock if no build is running")
        if waited >= next_note:
            log.warning("cuda_wkv: another process is building this kernel: lock %s (%s); "
                        "waiting up to %.0fs more (%s), then using the PyTorch path. To skip: "
                        "CUDA_WKV_BACKEND=torch, or delete the lock if no build is running",
                        path, _owner(info, age), timeout - waited, _LOCK_TIMEOUT_ENV)
            next_note = waited + 60.0
        time.sleep(min(0.5, max(timeout - waited, 0.01)))


@contextlib.contextmanager
def _holding_lock(path: Path, token: str) -> Iterator[None]:
    """Refresh the held lock's mtime every few seconds; remove it at the end if still ours."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(_HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, name="cuda_wkv-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if _read_lock(path).info.get("token") == token:  # not taken over meanwhile
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
    if isinstance(exc, _Fallback):
        return str(exc)
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0].split(": [", 1)[0][:200] if lines else ""
    errs = [ln for ln in lines[1:] if re.search(r"(error|Error|ERROR)\b|No space left", ln)
            and not ln.startswith("ninja:")]
    parts = [f"{type(exc).__name__}: {head}"] + [ln[:300] for ln in errs[:3]]
    return " | ".join(parts)


def _compile(target: _Target, build_dir: Path) -> ModuleType:
    """Compile and import ``target`` with torch's JIT; the ``.so`` lands in ``build_dir``."""
    ce = _cpp_extension()
    env_patch: Dict[str, str] = {}
    if target.kind == "cuda":
        if ce.CUDA_HOME is None or os.path.realpath(ce.CUDA_HOME) != target.cuda_home:
            log.info("cuda_wkv: torch guessed the CUDA toolkit %s; compiling with %s",
                     ce.CUDA_HOME, target.cuda_home)
            ce.CUDA_HOME = target.cuda_home  # torch's guess from nvcc on PATH can be wrong
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and target.arch:
            env_patch["TORCH_CUDA_ARCH_LIST"] = target.arch  # the visible GPUs' archs
    verbose = os.environ.get("CUDA_WKV_VERBOSE", "0") not in ("", "0")
    old = {k: os.environ.get(k) for k in env_patch}
    try:
        os.environ.update(env_patch)
        return ce.load(name=target.name, sources=[str(CSRC / s) for s in _SOURCES[target.kind]],
                       extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
                       verbose=verbose, with_cuda=(target.kind == "cuda"), **target.flags)
    finally:
        for k, val in old.items():
            if val is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = val


def _remove_leftovers(base: Path, name: Optional[str] = None) -> None:
    """Delete the folders that killed builds (or discards) left in ``base``: of any build once
    an hour old, or with ``name`` all of that build's (for a caller that knows none is running)."""
    now = time.time()
    for p in base.glob(f".{name}.*-*" if name else ".cuda_wkv_*.*-*"):
        with contextlib.suppress(OSError):
            if name or ".old-" in p.name or now - p.lstat().st_mtime > _LEFTOVER_BUILD_S:
                _remove(p)


def _load_or_build(kind: str, timeout: float) -> ModuleType:
    target = _target(kind)
    if kind == "cuda":
        log.info("cuda_wkv: using CUDA toolkit %s", target.cuda_home)
    base = _cache_base()
    folder = base / target.name
    lock = base / f"{target.name}.lock"
    warned: set = set()

    def ready() -> bool:
        return os.path.isdir(folder) and _load_complete(folder, warned) is not None

    token = secrets.token_hex(8)
    while True:
        mod = _load_complete(folder, warned)
        if mod is not None:
            if not os.path.lexists(lock):  # complete and nobody building: what is left is dead
                _remove_leftovers(base, target.name)
            return mod
        if _acquire_lock(lock, token, timeout, ready):
            break
    with _holding_lock(lock, token):
        mod = _load_complete(folder, warned)  # published just before we took the lock
        if mod is not None:
            return mod
        _discard(folder)
        _remove_leftovers(base)
        build_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=base))
        log.info("cuda_wkv: building the %s kernel in %s (first use only, ~1-2 min)",
                 kind, folder)
        t0 = time.time()
        try:
            mod = _compile(target, build_dir)
            sys.modules.setdefault(mod.__name__, mod)
            _publish(mod, build_dir, folder)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)  # gone after a publication
    log.info("cuda_wkv: %s kernel ready in %.1fs", kind, time.time() - t0)
    return mod


def load_extension(kind: str) -> Optional[ModuleType]:
    """The compiled ``kind`` ('cpu' or 'cuda') kernel module, or None after a failure.

    Loads the complete build from the cache, or builds it on first use (thread-safe; at
    most once per process).  On failure emits a single :class:`WKVBuildWarning` naming
    the cause and returns None from then on.  Raises ValueError for an unknown ``kind``
    or an invalid ``CUDA_WKV_LOCK_TIMEOUT`` / ``CUDA_WKV_ROWS_AHEAD``.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {_KINDS}")
    with _state_lock:
        entry = _state.get(kind)
        if entry is None:
            timeout = _lock_timeout()
            if kind == "cuda":
                _rows_ahead()  # a bad value is the caller's error, not a build failure
            reason = None
            try:
                reason = _precheck(kind)
                if reason is None:
                    entry = _load_or_build(kind, timeout)
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
