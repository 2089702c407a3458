"""Publishing a report set (``stem.json``, ``stem.md``, ``stem.png``), or any folder, so that readers never
see a mix.

All files of a set (of a folder: :func:`publish_folder`) are first written and fsynced into a private staging folder next to the target
(``.<folder>.partial-<pid>``), then published:

* a folder that holds nothing but files of this report (``stem.*``) or does not exist yet is replaced
  as a whole: ``folder -> .<folder>.previous-<pid>``, ``staging -> folder``, then the previous one is
  deleted. A kill at any moment leaves either the complete old or the complete new set (between the two
  renames: none, and the old one is put back by the next publication);
* a folder shared with other files (e.g. ``docs/benchmarks``) gets the finished files moved in one
  ``os.replace`` after another — only a kill within those microseconds can mix generations, so
  ``nnunetv2-ext compare/benchmark`` refuse such folders (:func:`foreign_entries`).

Staging and previous folders of a killed process (its pid no longer runs) are removed, or restored, by the
next publication into the same place; on an exception the staging folder is removed at once.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Callable


def foreign_entries(folder: str, stem: str) -> list[str]:
    """Names in ``folder`` that are not files of the report ``stem`` (empty if the folder does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if not n.startswith(f'{stem}.'))


def _pid_running(pid: int) -> bool:
    try:
        return os.kill(pid, 0) is None
    except PermissionError:  # running, as another user
        return True
    except ProcessLookupError:
        return False


def _clean_leftovers(parent: str, base: str, target: str) -> None:
    """Removes staging folders of dead processes; puts back a previous set a killed swap left aside. This
    process's own leftovers (a failed earlier publication, or a dead process whose pid it reuses) count as dead:
    publications into one place are not concurrent within a process."""
    pattern = re.compile(rf'\.{re.escape(base)}\.(partial|previous)-(\d+)')
    for name in sorted(os.listdir(parent)):
        m = pattern.fullmatch(name)
        if m is None or (int(m.group(2)) != os.getpid() and _pid_running(int(m.group(2)))):
            continue
        path = os.path.join(parent, name)
        if m.group(1) == 'previous' and not os.path.exists(target):
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)


def fsync_path(path: str) -> None:
    """Flushes ``path`` (a file, or on POSIX a folder) to disk; read access is enough."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes | str) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` through a temporary file in the same folder (flushed,
    fsynced, then ``os.replace``): readers see the old file or the complete new one."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{name}.partial-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            f.write(data.encode('utf-8') if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_folder(folder: str, fill: Callable[[str], None], merge: bool = False) -> None:
    """Publishes what ``fill(staging)`` writes into a fresh private staging folder next to ``folder`` (see the
    module doc): every file in it is fsynced, then ``folder`` is replaced as a whole by it, or with ``merge`` the
    staged top-level entries are moved into ``folder`` one by one and its other entries are kept.

    The staging folder is removed if ``fill`` raises (``folder`` is then untouched), and leftovers of killed
    publications into the same place are cleaned up first. ``folder``'s parent is created if missing; a symbolic
    link is followed (its target is replaced, the link stays). Raises NotADirectoryError, before writing anything,
    if ``folder`` exists and is not a folder.
    """
    folder = os.path.realpath(folder)
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f'{folder} exists and is not a folder: pass the path of a folder (new or one '
                                 'that holds only what this command writes there)')
    parent, base = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    _clean_leftovers(parent, base, folder)
    staging = os.path.join(parent, f'.{base}.partial-{os.getpid()}')
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    try:
        fill(staging)
        for root, _, names in os.walk(staging):
            for path in (os.path.join(root, name) for name in names):
                if os.path.isfile(path) and not os.path.islink(path):
                    fsync_path(path)
            fsync_path(root)
        previous = None
        if merge and os.path.exists(folder):
            for name in sorted(os.listdir(staging)):
                os.replace(os.path.join(staging, name), os.path.join(folder, name))
        elif os.path.exists(folder):
            previous = os.path.join(parent, f'.{base}.previous-{os.getpid()}')
            os.rename(folder, previous)
            try:
                os.rename(staging, folder)
            except BaseException:
                os.rename(previous, folder)
                raise
        else:
            os.rename(staging, folder)
        fsync_path(parent)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)  # published already; a leftover is cleaned next time
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_files(folder: str, files: dict[str, Callable[[str], None]]) -> list[str]:
    """Writes ``files`` (file name -> ``writer(path)``) into ``folder`` as one set (see the module doc);
    returns the published paths. The stem is the part of the first name before its first dot."""
    stem = next(iter(files)).split('.')[0]

    def fill(staging: str) -> None:
        for name, write in files.items():
            write(os.path.join(staging, name))

    publish_folder(folder, fill, merge=bool(foreign_entries(folder, stem)))
    return [os.path.join(os.path.abspath(folder), name) for name in files]
