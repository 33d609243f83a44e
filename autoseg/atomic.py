"""Atomic file writes: write to a temporary sibling, then rename over the final name.

A killed process leaves at most a ``.tmp-*`` file behind, never a half-written file under a name
that a later run would trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success rename it to ``final``.

    The temporary name keeps ``final``'s suffixes (``.nii.gz``, ``.npy``) so that writers that
    pick a format from the extension still work. On any exception the temporary file is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + final.name, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates the file owner-only (0600); give it the usual permissions (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a new temporary folder beside ``final``; on success it takes ``final``'s name.

    A folder that exists at ``final`` already (an earlier run's; the caller decides whether it may
    go) is replaced: moved to a temporary name, the new folder renamed into place, then the old
    one deleted, so ``final`` is never a mix of both runs. Should the new folder's rename fail, the
    old one is moved back. On any exception the temporary folder is removed and ``final`` is as
    it was.

    Raises:
        FileExistsError: ``final`` is a symbolic link (dangling or not) or not a folder; nothing
            is written through it.
    """
    import shutil

    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise FileExistsError(errno.EEXIST, "exists and is not a folder (a symbolic link or a file); not replaced",
                              os.fspath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, suffix="-" + final.name, dir=final.parent))
    # mkdtemp creates the folder owner-only (0700); give it the usual permissions (0777 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if final.is_symlink() or (final.exists() and not final.is_dir()):  # appeared while writing
            raise FileExistsError(errno.EEXIST, "exists and is not a folder (a symbolic link or a file); not replaced",
                                  os.fspath(final))
        if final.is_dir():
            old = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "old-", suffix="-" + final.name, dir=final.parent))
            try:
                os.replace(final, old / final.name)
                try:
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(old / final.name, final)  # roll back: the earlier folder stays
                    raise
            except BaseException:
                if not any(old.iterdir()):  # else the earlier folder could not be moved back: kept there
                    old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(final: Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``final``."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(final: Path, data: Any) -> None:
    """Atomically write ``data`` as indented, key-sorted JSON (deterministic bytes)."""
    write_text(final, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


@contextlib.contextmanager
def folder_lock(folder: Path, command: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while the block runs (the folder is created).

    For the writers that start by removing an interrupted run's temporary files
    (:func:`remove_stale_temp`): a second autoseg process writing into the same folder would
    delete the first one's files in flight, so it stops instead with a one-line error. The lock
    is the operating system's ``flock`` on the folder itself (no lock file is written): it goes
    with the process however that ends, so a killed run never leaves a stale lock behind. Where
    ``fcntl`` does not exist (Windows) nothing is locked.

    Raises:
        ConfigError: another process holds the lock.
    """
    from autoseg.errors import ConfigError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"{folder}: another 'autoseg {command}' is writing into this folder; wait for it to "
                              "finish (or stop it), then run this again") from None
        yield
    finally:
        os.close(descriptor)


def remove_stale_temp(folder: Path) -> int:
    """Delete leftover temporary files (``.tmp-*``) of an interrupted run in ``folder``; returns how many.

    Call it only where no other process is writing into ``folder`` at the same time (hold
    :func:`folder_lock`).
    """
    import os

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in os.scandir(folder):
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed
