"""Tests of the compiled-kernel cache of cuda_wkv (cuda_wkv/loader.py): lazy loading, build
fallbacks, complete-or-absent builds, build locks, private cache folders.

Most tests run a subprocess on a private cache (TORCH_EXTENSIONS_DIR=tmp_path/...) in which
the compiler is replaced by a fake that copies the CPU kernel built once by the
`good_library` fixture, so they exercise the real load path without minutes of compiling."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cuda_wkv import loader

REPO = Path(__file__).resolve().parents[1]
HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
OTHER_UID = 54321  # any uid that is not ours


def _sub_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("CUDA_WKV_BACKEND", None)
    env.update(extra)
    return env


def _run_py(code, timeout=300, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_sub_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def good_library():
    """(module name, .so path) of the complete CPU build in the user's cache (built by the
    real compiler on first use)."""
    if not HAS_CXX:
        pytest.skip("no C++ compiler")
    mod = loader.load_extension("cpu")
    assert mod is not None, loader.failure_reason("cpu")
    # by its name: the sources may have changed since it was built (the key with them)
    return loader._verified_library(loader.extension_dir("cpu").parent / mod.__name__)


def _private_folder(tmp_path, monkeypatch, good_library, root=None):
    """(cache root, folder of the good library's build) of a private cache (default
    tmp_path/ext); _BI_WKV_SCRIPT builds under the good library's name."""
    root = root or tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    base = loader.extension_dir("cpu").parent
    monkeypatch.undo()
    return root, base / good_library[0]


def _install(folder: Path, good_library, record: bool = True) -> Path:
    """Put a copy of the good library (and its completion record) into `folder`."""
    module, so = good_library
    folder.mkdir(mode=0o700)
    dest = folder / so.name
    shutil.copyfile(so, dest)
    if record:
        data = dest.read_bytes()
        (folder / loader._RECORD).write_text(json.dumps(
            {"module": module, "file": so.name, "size": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}))
    return dest


# A run of bi_wkv in a subprocess whose "compiler" copies the good library (the real
# compiler takes minutes) and whose build is named after it (not after the sources, which
# may change while the tests run); prints one JSON line with what happened.
_BI_WKV_SCRIPT = """
    import json, logging, shutil, warnings
    from pathlib import Path
    logging.basicConfig(level=logging.INFO)
    import torch, cuda_wkv
    from cuda_wkv import loader
    loader._target = lambda kind: loader._Target(kind, {module!r}, {{}}, None, None)
    compiled = []
    def fake_compile(target, build_dir):
        compiled.append(target.name)
        so = Path(shutil.copyfile({so!r}, build_dir / Path({so!r}).name))
        return loader._import_library({module!r}, so)
    loader._compile = fake_compile
    g = torch.Generator().manual_seed(0)
    w = torch.rand(3, generator=g, dtype=torch.float64) * 0.1
    u = torch.randn(3, generator=g, dtype=torch.float64)
    k = torch.randn(2, 20, 3, generator=g, dtype=torch.float64)
    v = torch.randn(2, 20, 3, generator=g, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        y = cuda_wkv.bi_wkv(w, u, k, v)
        backend = cuda_wkv.backend_for(k)
    err = (y - cuda_wkv.bi_wkv_dense(w, u, k, v)).abs().max().item()
    print(json.dumps({{"backend": backend, "compiled": len(compiled), "err": err,
        "warnings": [str(r.message) for r in rec
                     if issubclass(r.category, cuda_wkv.WKVBuildWarning)]}}))
"""


def _run_bi_wkv(good_library, timeout=300, **env):
    """Run _BI_WKV_SCRIPT; returns (its JSON result, stderr).  Fails on a crash/signal."""
    module, so = good_library
    r = _run_py(_BI_WKV_SCRIPT.format(module=module, so=str(so)), timeout=timeout, **env)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["err"] < 1e-10, result
    return result, r.stderr


# ------------------------------------------------------- lazy load / build fallbacks
def test_import_does_not_build(tmp_path):
    r = _run_py("""
        import sys, os, cuda_wkv, torch
        assert not any(m.startswith('cuda_wkv_') for m in sys.modules), sys.modules
        assert 'torch.utils.cpp_extension' not in sys.modules
        x = torch.zeros(1, 2, 3)
        assert cuda_wkv.backend_for(x, build=False) == 'cpu'
        assert not any(m.startswith('cuda_wkv_') for m in sys.modules)
        print(os.listdir(os.environ['TORCH_EXTENSIONS_DIR']))
        """, TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


_FALLBACK_SCRIPT = """
    import warnings, torch, cuda_wkv
    from cuda_wkv import loader
    w = torch.rand(3) * 0.1; u = torch.randn(3)
    k = torch.randn(2, 20, 3, dtype=torch.float64); v = torch.randn(2, 20, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        y1 = cuda_wkv.bi_wkv(w.double(), u.double(), k, v)
        y2 = cuda_wkv.bi_wkv(w.double(), u.double(), k, v)
        backend = cuda_wkv.backend_for(k)
    msgs = [str(r.message) for r in rec if issubclass(r.category, cuda_wkv.WKVBuildWarning)]
    assert len(msgs) == 1, msgs
    assert backend == 'torch', backend
    err = (y1 - cuda_wkv.bi_wkv_dense(w.double(), u.double(), k, v)).abs().max().item()
    assert err < 1e-10, err
    print(msgs[0])
"""


def test_fallback_when_compiler_missing(tmp_path):
    r = _run_py(_FALLBACK_SCRIPT, TORCH_EXTENSIONS_DIR=str(tmp_path),
                CXX="/nonexistent/bin/c++")
    assert r.returncode == 0, r.stderr
    assert "C++ compiler '/nonexistent/bin/c++' not found" in r.stdout
    assert "pure-PyTorch" in r.stdout


@needs_cxx
def test_fallback_when_build_fails(tmp_path):
    """A toolchain that runs but fails (here: CXX=false) -> one warning, correct output, and
    neither a lock nor a half-built folder is left behind."""
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` executable")
    r = _run_py(_FALLBACK_SCRIPT, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=false)
    assert r.returncode == 0, r.stderr
    assert "could not build the C++ CPU kernel" in r.stdout
    (base,) = tmp_path.iterdir()
    assert list(base.iterdir()) == []


# --------------------------------------------------------- complete-or-absent builds
def test_published_build_is_complete_and_private(good_library):
    """The fixture's real build: a 0700 folder whose record matches the library, its lock
    removed."""
    module, so = good_library
    folder = so.parent
    assert module == folder.name and so.name == f"{module}{so.suffix}"
    assert folder.stat().st_mode & 0o777 == 0o700, oct(folder.stat().st_mode)
    assert folder.parent.stat().st_mode & 0o022 == 0  # may predate this version: not 0700
    assert not (folder.parent / f"{folder.name}.lock").exists()


def test_complete_build_is_loaded_without_compiling(tmp_path, monkeypatch, good_library):
    """... and, with no lock (nobody building it), the private folders killed builds of it left go;
    another build's recent folder stays (it may be compiling)."""
    root, folder = _private_folder(tmp_path, monkeypatch, good_library)
    _install(folder, good_library)
    killed = folder.with_name(f".{folder.name}.build-killed")
    other = folder.with_name(".cuda_wkv_cuda_0123456789ab.build-running")
    killed.mkdir()
    other.mkdir()
    result, err = _run_bi_wkv(good_library, TORCH_EXTENSIONS_DIR=str(root))
    assert result["backend"] == "cpu" and result["compiled"] == 0, (result, err)
    assert "not loading" not in err
    assert not killed.exists() and other.exists()


def test_record_is_private_whatever_the_umask(tmp_path, good_library):
    """Published under umask 002 (a common default), the build is loadable by the next process:
    its record is not group-writable (it was 0664, refused, and rebuilt on every start)."""
    import types

    module, so = good_library
    build_dir, folder = tmp_path / ".staging", tmp_path / module
    build_dir.mkdir(mode=0o700)
    built = Path(shutil.copyfile(so, build_dir / so.name))
    old = os.umask(0o002)
    try:
        loader._publish(types.SimpleNamespace(__name__=module, __file__=str(built)), build_dir, folder)
    finally:
        os.umask(old)
    assert loader._verified_library(folder) == (module, folder / so.name)
    for p in (folder / loader._RECORD, folder / so.name):
        assert p.stat().st_mode & 0o022 == 0, (p, oct(p.stat().st_mode))


def _truncate(so: Path) -> None:
    so.write_bytes(so.read_bytes()[: so.stat().st_size // 3])


def _flip_byte(so: Path) -> None:
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))


def _record_naming(module: str):
    def damage(so: Path) -> None:
        record = so.parent / loader._RECORD
        record.write_text(json.dumps({**json.loads(record.read_text()), "module": module}))
    return damage


def _moved_out_and_linked(which: str):
    """The build folder (or its library) moved out of the cache and a symbolic link left in
    its place: whoever can write where the link points could swap the library."""
    def damage(so: Path) -> None:
        entry = so.parent if which == "folder" else so
        outside = so.parents[3] / f"outside-{which}"  # next to the cache root
        os.rename(entry, outside)
        entry.symlink_to(outside)
    return damage


@pytest.mark.parametrize("damage, message", [
    (_truncate, "the record says"),
    (_flip_byte, "SHA-256"),
    (lambda so: (so.parent / loader._RECORD).unlink(), "no completion record"),
    (lambda so: (so.parent / loader._RECORD).write_text('{"module": '),
     "unreadable completion record"),
    (lambda so: so.unlink(), "is missing"),
    (lambda so: so.chmod(0o775), "writable by group/others"),
    (lambda so: (shutil.rmtree(so.parent), so.parent.write_text("")), "Not a directory"),
    (_record_naming("json"), "the record names the module 'json'"),
    (_moved_out_and_linked("folder"), "is a symbolic link"),
    (_moved_out_and_linked("library"), "is a symbolic link"),
], ids=["truncated", "corrupt", "no-record", "torn-record", "no-library", "group-writable",
        "file-not-folder", "other-module", "linked-folder", "linked-library"])
def test_damaged_build_is_rebuilt_not_loaded(tmp_path, monkeypatch, good_library, damage,
                                             message):
    """A torn copy, a full disk, a missing record or a library others could change is never
    loaded (a truncated .so killed the process with SIGBUS): one log warning, then a rebuild
    that is published complete."""
    root, folder = _private_folder(tmp_path, monkeypatch, good_library)
    damage(_install(folder, good_library))
    result, err = _run_bi_wkv(good_library, TORCH_EXTENSIONS_DIR=str(root))
    assert result["backend"] == "cpu" and result["compiled"] == 1, (result, err)
    assert result["warnings"] == []
    assert err.count("not loading the build") == 1 and message in err, err
    module, so = loader._verified_library(folder)  # replaced by a complete build
    assert module == good_library[0]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


@needs_root
def test_build_folder_of_another_user_is_rebuilt(tmp_path, monkeypatch, good_library):
    root, folder = _private_folder(tmp_path, monkeypatch, good_library)
    _install(folder, good_library)
    os.chown(folder, OTHER_UID, -1)
    result, err = _run_bi_wkv(good_library, TORCH_EXTENSIONS_DIR=str(root))
    assert result["compiled"] == 1 and f"belongs to uid {OTHER_UID}" in err, (result, err)
    assert folder.stat().st_uid == os.geteuid()


# ------------------------------------------------------------------------ build locks
def _write_lock(folder: Path, pid: int, host: str, age: float = 0.0) -> Path:
    lock = folder.parent / f"{folder.name}.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host, "time": 0}))
    if age:
        t = lock.stat().st_mtime - age
        os.utime(lock, (t, t))
    return lock


def test_complete_build_is_loaded_whatever_the_lock(tmp_path, monkeypatch, good_library):
    """A lock held by a live process does not delay loading a complete build."""
    root, folder = _private_folder(tmp_path, monkeypatch, good_library)
    _install(folder, good_library)
    lock = _write_lock(folder, os.getpid(), socket.gethostname())
    result, err = _run_bi_wkv(good_library, timeout=120, TORCH_EXTENSIONS_DIR=str(root),
                              CUDA_WKV_LOCK_TIMEOUT="600")
    assert result["backend"] == "cpu" and result["compiled"] == 0, (result, err)
    assert "another process" not in err and lock.exists()


def test_live_lock_is_announced_then_falls_back(tmp_path, monkeypatch, good_library):
    """A lock with a fresh heartbeat from another host: wait visibly (path, owner, how long,
    how to skip), then use the PyTorch path with a warning instead of hanging."""
    root, folder = _private_folder(tmp_path, monkeypatch, good_library)
    lock = _write_lock(folder, 4242, "node-17.cluster")
    result, err = _run_bi_wkv(good_library, timeout=120, TORCH_EXTENSIONS_DIR=str(root),
                              CUDA_WKV_LOCK_TIMEOUT="2")
    assert result["backend"] == "torch" and result["compiled"] == 0, (result, err)
    for text in (str(lock), "pid 4242 on host node-17.cluster", "waiting up to 2s",
                 "CUDA_WKV_LOCK_TIMEOUT", "CUDA_WKV_BACKEND=torch", "delete the lock"):
        assert text in err, (text, err)
    (warning,) = result["warnings"]
    assert "gave up after" in warning and str(lock) in warning, warning
    assert lock.exists() and not folder.exists()


@pytest.mark.parametrize("owner, reason", [
    (lambda dead: (dead, socket.gethostname(), 0.0), "is not running"),
    (lambda dead: (4242, "node-17.cluster", 120.0), "no heartbeat for"),
    (lambda dead: (os.getpid(), socket.gethostname(), 120.0), "no heartbeat for"),
], ids=["dead-pid", "other-host-old", "live-pid-old"])
def test_abandoned_lock_is_removed(tmp_path, monkeypatch, good_library, owner, reason, dead_pid):
    """Locks of killed builds (dead pid on this host; no heartbeat for a minute on any host,
    e.g. a reused pid or a node that died) are removed with a message, then built; the
    killed build's old private folder is deleted."""
    root, folder = _private_folder(tmp_path, monkeypatch, good_library)
    pid, host, age = owner(dead_pid)
    lock = _write_lock(folder, pid, host, age)
    leftover = folder.with_name(f".{folder.name}.build-killed")
    leftover.mkdir()
    os.utime(leftover, (0, 0))
    result, err = _run_bi_wkv(good_library, timeout=120, TORCH_EXTENSIONS_DIR=str(root),
                              CUDA_WKV_LOCK_TIMEOUT="60")
    assert result["backend"] == "cpu" and result["compiled"] == 1, (result, err)
    assert f"removing stale build lock {lock}" in err and reason in err, err
    assert not lock.exists() and not leftover.exists()
    loader._verified_library(folder)


def test_waiter_loads_the_build_published_meanwhile(tmp_path, monkeypatch, good_library):
    """While waiting for another builder, its published build is loaded at once."""
    root, folder = _private_folder(tmp_path, monkeypatch, good_library)
    lock = _write_lock(folder, 4242, "node-17.cluster")
    module, so = good_library
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_BI_WKV_SCRIPT.format(module=module, so=str(so)))],
        env=_sub_env(TORCH_EXTENSIONS_DIR=str(root), CUDA_WKV_LOCK_TIMEOUT="120"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "another process is building" in line:
                break
        staging = folder.with_name(".staging")
        _install(staging, good_library)
        os.rename(staging, folder)
        out, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(seen) + rest
    result = json.loads(out.strip().splitlines()[-1])
    assert result["backend"] == "cpu" and result["compiled"] == 0 and not result["warnings"]
    assert lock.exists()  # the other builder's lock is its own business


def test_lock_timeout_is_validated(monkeypatch):
    monkeypatch.setattr(loader, "_state", {})
    for bad in ("abc", "-1", "nan", "inf"):
        monkeypatch.setenv("CUDA_WKV_LOCK_TIMEOUT", bad)
        with pytest.raises(ValueError, match=f"CUDA_WKV_LOCK_TIMEOUT='{bad}'.*finite"):
            loader.load_extension("cpu")
    monkeypatch.setenv("CUDA_WKV_LOCK_TIMEOUT", "2.5")
    assert loader._lock_timeout() == 2.5
    monkeypatch.delenv("CUDA_WKV_LOCK_TIMEOUT")
    assert loader._lock_timeout() == loader._DEFAULT_LOCK_TIMEOUT_S


def test_rows_ahead_is_validated_and_gives_a_build_of_its_own(monkeypatch):
    """CUDA_WKV_ROWS_AHEAD: a bad value is an error naming it (not a silent fallback); a valid one
    is a -D flag of the CUDA build and changes its cache name (each depth is a build of its own)."""
    monkeypatch.setattr(loader, "_state", {})
    for bad in ("abc", "0", "33", "4.5"):
        monkeypatch.setenv("CUDA_WKV_ROWS_AHEAD", bad)
        with pytest.raises(ValueError, match=f"CUDA_WKV_ROWS_AHEAD='{bad}'.*integer in \\[1, 32\\]"):
            loader.load_extension("cuda")
    monkeypatch.delenv("CUDA_WKV_ROWS_AHEAD")
    default = loader._target("cuda")
    assert not any("WKV_ROWS_AHEAD" in f for f in default.flags["extra_cuda_cflags"])
    monkeypatch.setenv("CUDA_WKV_ROWS_AHEAD", "4")
    four = loader._target("cuda")
    assert "-DWKV_ROWS_AHEAD=4" in four.flags["extra_cuda_cflags"] and four.name != default.name
    assert not any("WKV_ROWS_AHEAD" in f for flags in loader._flags("cpu").values() for f in flags)


def test_lock_staleness_rules(dead_pid):
    host = socket.gethostname()
    assert loader._stale_reason({"pid": os.getpid(), "host": host}, 5) is None
    assert "not running" in loader._stale_reason({"pid": dead_pid, "host": host}, 5)
    assert loader._stale_reason({"pid": dead_pid, "host": "elsewhere"}, 5) is None
    assert "heartbeat" in loader._stale_reason({"pid": os.getpid(), "host": host}, 61)
    assert loader._stale_reason({}, 5) is None  # being written
    assert "heartbeat" in loader._stale_reason({}, 61)  # unreadable and abandoned
    assert loader._stale_reason({"pid": 4242, "host": "elsewhere"}, -3600) is None  # judged by watching
    assert "not a regular file" in loader._stale_reason({}, 5, regular=False)


def test_a_heartbeat_that_never_changes_is_stale_whatever_its_time_stamp(tmp_path, monkeypatch, caplog):
    """A lock stamped an hour in the future (a clock set back, or another host's clock): its age by the file's
    time says nothing, so a waiter takes it as abandoned once it has seen it unchanged for the stale time
    (it waited the whole lock timeout, then used the PyTorch path)."""
    monkeypatch.setattr(loader, "_LOCK_STALE_S", 1.0)
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "node-17.cluster", "time": 0}))
    future = time.time() + 3600
    os.utime(lock, (future, future))
    with caplog.at_level("WARNING", logger="cuda_wkv"):
        assert loader._acquire_lock(lock, "mine", 30.0, lambda: False) is True
    assert "has not changed for" in caplog.text and "the clocks differ" in caplog.text
    assert json.loads(lock.read_text())["token"] == "mine"


@pytest.mark.parametrize("kind", ["dangling-link", "folder"])
def test_lock_that_is_not_a_file_is_removed(tmp_path, monkeypatch, good_library, kind):
    """A lock no builder wrote (a dangling symbolic link: the loader spun at 100 % CPU, ignoring
    the lock timeout; a folder) is removed with a message, then the kernel is built."""
    root, folder = _private_folder(tmp_path, monkeypatch, good_library)
    lock = folder.parent / f"{folder.name}.lock"
    if kind == "folder":
        lock.mkdir()
    else:
        lock.symlink_to(tmp_path / "nowhere")
    result, err = _run_bi_wkv(good_library, timeout=120, TORCH_EXTENSIONS_DIR=str(root),
                              CUDA_WKV_LOCK_TIMEOUT="5")
    assert result["backend"] == "cpu" and result["compiled"] == 1, (result, err)
    assert f"removing stale build lock {lock}" in err and "not a regular file" in err, err
    assert not os.path.lexists(lock) and not (tmp_path / "nowhere").exists()


def test_lock_that_cannot_be_created_names_the_fix(tmp_path):
    with pytest.raises(loader._Fallback, match="cannot create the build lock .*TORCH_EXTENSIONS_DIR"):
        loader._acquire_lock(tmp_path / "gone" / "x.lock", "token", 5.0, lambda: False)


# -------------------------------------------------------------- private cache folders
def test_cache_folders_are_created_private(tmp_path, monkeypatch):
    root = tmp_path / "new" / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    base = loader.extension_dir("cpu").parent
    for p in (tmp_path / "new", root, base):
        assert p.stat().st_mode & 0o777 == 0o700, (p, oct(p.stat().st_mode))


def test_cache_path_that_is_a_file_is_named(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "ext"
    not_a_folder.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(not_a_folder))
    with pytest.raises(NotADirectoryError, match=f"kernel cache {not_a_folder} .* is not a folder"):
        loader.extension_dir("cpu")


def test_build_failure_summary_keeps_a_full_disk():
    exc = RuntimeError("Error building extension 'cuda_wkv_cpu_x': [1/2] c++ -c wkv_cpu.cpp\n"
                       "/usr/bin/ld: final link failed: No space left on device\n"
                       "collect2: error: ld returned 1 exit status")
    summary = loader._summarise(exc)
    assert "No space left on device" in summary and "collect2: error" in summary, summary


def _assert_refused(good_library, folder: Path, **env):
    result, err = _run_bi_wkv(good_library, **env)
    assert result["backend"] == "torch" and result["compiled"] == 0, (result, err)
    (warning,) = result["warnings"]
    assert f"refusing the kernel cache {folder}" in warning, warning
    assert "TORCH_EXTENSIONS_DIR" in warning
    return warning


def test_cache_writable_by_others_is_refused(tmp_path, good_library):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    warning = _assert_refused(good_library, shared, TORCH_EXTENSIONS_DIR=str(shared))
    assert "mode 0777" in warning and "chmod go-w" in warning
    assert list(shared.iterdir()) == []
    # a private folder inside a folder others can write is no better (they can swap it)
    _assert_refused(good_library, shared / "mine", TORCH_EXTENSIONS_DIR=str(shared / "mine"))


@needs_root
def test_cache_of_another_user_is_refused(tmp_path, good_library):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, -1)
    warning = _assert_refused(good_library, theirs, TORCH_EXTENSIONS_DIR=str(theirs))
    assert f"belongs to uid {OTHER_UID}" in warning


@needs_cxx
def test_planted_tmp_fallback_is_never_loaded(tmp_path, monkeypatch, good_library):
    """The home cache cannot be created, and the TMPDIR fallback was pre-created by another
    user with a library whose constructor would run in our process: refuse it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")  # XDG_CACHE_HOME below a file: the home cache cannot be made
    planted_root, folder = _private_folder(tmp_path, monkeypatch, good_library,
                                           tmp / f"torch_extensions_{os.geteuid()}")
    marker = tmp_path / "constructor_ran"
    src = tmp_path / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) '
                   '{ FILE *f = fopen("%s", "w"); if (f) fclose(f); }\n' % marker)
    folder.mkdir()
    so = folder / f"{folder.name}.so"
    subprocess.run([os.environ.get("CXX", "c++"), "-x", "c", "-shared", "-fPIC", "-o", str(so),
                    str(src)], check=True)
    data = so.read_bytes()
    (folder / loader._RECORD).write_text(json.dumps(
        {"module": folder.name, "file": so.name, "size": len(data),
         "sha256": hashlib.sha256(data).hexdigest()}))
    if os.geteuid() == 0:
        for p in [planted_root, *planted_root.rglob("*")]:
            os.chown(p, OTHER_UID, -1)
        problem = f"belongs to uid {OTHER_UID}"
    else:
        planted_root.chmod(0o777)
        problem = "writable by group/others"
    warning = _assert_refused(good_library, planted_root, TMPDIR=str(tmp),
                              XDG_CACHE_HOME=str(not_a_dir / "cache"), TORCH_EXTENSIONS_DIR="")
    assert problem in warning and not marker.exists()


@pytest.mark.skipif(os.name != "posix", reason="the password database's home")
def test_user_cache_ignores_relative_xdg_and_an_empty_home(monkeypatch, tmp_path):
    """XDG_CACHE_HOME counts only when absolute (the XDG spec; a relative one would follow the current
    folder); HOME unset, empty or relative ('~' would give '/' or a cwd-relative path) gives the password
    database's home."""
    import pwd

    db_home = Path(pwd.getpwuid(os.geteuid()).pw_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", "")
    assert loader._user_cache() == tmp_path / "xdg"
    for xdg in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        for home in ("", "relative_home"):
            monkeypatch.setenv("HOME", home)
            assert loader._user_cache() == db_home / ".cache", (xdg, home)
        monkeypatch.delenv("HOME")
        assert loader._user_cache() == db_home / ".cache"
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert loader._user_cache() == tmp_path / "home" / ".cache"
