"""Atomic file and directory writes: a reader sees the old content or the new, never half of either.

The one place for this pattern (issue 21). Every helper writes beside the target (same directory, so
the final ``os.replace``/``os.rename`` never crosses a file system), fsyncs the data before the rename
and the parent directory after it (so the rename itself survives a power loss), and removes its temp
on any error, leaving the old target untouched.

Temp names end in ``.tmp``: code that cleans stale temps (e.g. ``CheckpointManager.clean_stale``)
and globs for real files (``*.parquet``, ``*.json``) both keep working.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from typing import Any, Iterator, Union

__all__ = ["atomic_write", "atomic_write_json", "atomic_path", "atomic_dir", "fsync_dir", "fsync_tree"]

PathLike = Union[str, "os.PathLike[str]"]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """fsync a directory, which makes the renames and creations inside it durable."""
    _fsync(os.fspath(path) or ".")


def fsync_tree(path: PathLike) -> None:
    """fsync every file and directory under ``path`` (before renaming it into place)."""
    for dirpath, _, files in os.walk(os.fspath(path)):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def _temp_name(path: str) -> str:
    # pid + random: two processes (or threads) writing the same target never share a temp. Not
    # mkstemp: its 0600 file would replace a file that other users could read before.
    return f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


@contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True) -> Iterator[str]:
    """Yield a temp path beside ``path`` for a writer that wants a file name (``pq.write_table``,
    ``torch.save``, ...); when the body returns, the temp replaces ``path``. On error it is removed
    and ``path`` keeps its old content. The parent directory must exist."""
    path = os.fspath(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        if not os.path.isfile(tmp):
            raise FileNotFoundError(f"atomic write of {path}: the writer created no file at {tmp}")
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(_parent(path))


def atomic_write(path: PathLike, data: Union[str, bytes], *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically; see the module docstring."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write of {os.fspath(path)}: data must be str or bytes, not {type(data).__name__}")
    with atomic_path(path, fsync=fsync) as tmp:
        # O_EXCL: a temp name that somehow exists is an error, not something to overwrite
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def atomic_write_json(path: PathLike, obj: Any, *, fsync: bool = True, **json_kwargs: Any) -> None:
    """``json.dumps(obj, **json_kwargs)`` plus a final newline, written with :func:`atomic_write`.
    The document is serialized before anything touches the disk, so an unserializable ``obj``
    raises with ``path`` unchanged and no temp left."""
    atomic_write(path, json.dumps(obj, **json_kwargs) + "\n", fsync=fsync)


@contextmanager
def atomic_dir(path: PathLike, *, fsync: bool = True) -> Iterator[str]:
    """Yield a fresh empty directory beside ``path``; when the body returns it is fsynced and renamed
    to ``path``, on error it is removed. Refuses (FileExistsError) if ``path`` already exists: a
    directory cannot be replaced atomically, and silently merging into or deleting an existing output
    is never what the caller meant. Creates missing parent directories."""
    path = os.fspath(path)
    if os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; choose a new output directory or remove it first")
    parent = _parent(path)
    os.makedirs(parent, exist_ok=True)
    # hidden, so a half-written output never looks like a real one to a directory listing; os.mkdir
    # (not mkdtemp) so the result has the umask's permissions, like any directory the user makes
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.mkdir(tmp)
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        if os.path.lexists(path):  # someone else published it while we were writing
            raise FileExistsError(f"{path} appeared while it was being written; the new copy was discarded")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if fsync:
        fsync_dir(parent)
