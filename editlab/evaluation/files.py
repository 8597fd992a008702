"""Writing files so that a kill never leaves half of one, and folders that one process at a time may write.

`atomic_write` writes a file under a private temporary name beside it and renames it into place: a reader, or a
run resumed after a kill, sees the old file or the new one, never a truncated one. The temporary names
(``.<name>.<pid>.tmp``) are recognisable, so `remove_orphans` can clean up after a kill between write and rename.
`FolderLock` is an exclusive ``flock`` on a file in a folder: the OS releases it when the holder exits or is
killed, so a stale lock never blocks a later run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_PATTERN = re.compile(r"^\..+\.\d+\.tmp$")


def current(paths) -> list[Path]:
    """Paths not inside a ``superseded_*`` folder (results that ``restart=true`` moved aside)."""
    return sorted(p for p in paths if not any(part.startswith("superseded_") for part in p.parts))


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[IO], Any], mode: str = "w") -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path``. On any
    failure (a full disk, say) the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with tmp.open(mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1, default=str) + "\n")


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left under ``folder`` (call it only while holding the folder's
    lock: another live writer's temporary file would look the same)."""
    orphans = [p for p in folder.rglob(".*.tmp") if TMP_PATTERN.match(p.name) and p.is_file()]
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


class FolderBusyError(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` (the file ``folder/<name>`` holds the holder's pid)."""

    def __init__(self, folder: Path, name: str = ".editlab.lock", what: str = "this folder") -> None:
        self.path, self.what = Path(folder) / name, what
        self._file: IO | None = None

    def acquire(self, wait: bool = False) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusyError(f"{self.path.parent} is in use by another process (pid {holder}) writing "
                                      f"{self.what}: wait for it to finish, or choose another folder") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def waiting_lock(folder: Path, name: str, what: str) -> Iterator[None]:
    """Hold ``FolderLock(folder, name)``, waiting for another holder to finish first (for short critical
    sections, such as writing or repairing a shared cache)."""
    lock = FolderLock(folder, name, what).acquire(wait=True)
    try:
        yield
    finally:
        lock.release()
