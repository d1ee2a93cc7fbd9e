"""Durable file writes: fsync of files and directories, atomic replace, fsynced appends."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

__all__ = ["append_line", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "fsync_file",
           "fsync_tree"]

# a directory fsync some file systems (and Windows) do not support: nothing more can be done
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF,
                          errno.EACCES, errno.EPERM, errno.EISDIR}


def fsync_file(path: Path | str) -> None:
    """Flush a written file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path | str) -> None:
    """Flush a directory's entries (creations, renames, removals) to stable storage.

    A no-op where directories cannot be opened or synced (Windows, some network file systems)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path | str) -> None:
    """fsync every file and directory under ``path`` (bottom-up), ``path`` itself last."""
    path = Path(path)
    if path.is_file():
        fsync_file(path)
        return
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file() and not full.is_symlink():
                fsync_file(full)
        fsync_dir(dirpath)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new content:
    a temporary file in the same directory, fsynced, renamed over ``path``, directory fsynced."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path | str, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: Path | str, line: str) -> None:
    """Append ``line`` plus a newline to ``path`` (created if absent) and fsync it.

    ``line`` must not contain a newline. If the file does not end in one (a line torn by a crash
    during an earlier append), a newline is written first, so the torn line stays on its own
    line and the new one is intact."""
    if "\n" in line or "\r" in line:
        raise ValueError(f"append_line: the line must not contain a newline, got {line[:80]!r}")
    path = Path(path)
    created = not path.exists()
    with open(path, "a+b") as fh:
        fh.seek(0, os.SEEK_END)
        prefix = b""
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                prefix = b"\n"
        fh.write(prefix + line.encode("utf-8") + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    if created:
        fsync_dir(path.parent)
