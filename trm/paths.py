"""Where commands write: every output path checked before any work, one process per directory.

A run directory (``trm train --out``) and a dataset being built are held by an exclusive
lock (``flock`` on a ``.trm.lock`` file inside the directory, which names its holder and is
removed on release). The kernel drops the lock when its process dies, however it dies, so a
killed run never leaves a directory locked. A second process that wants a held directory
gets :class:`Busy` naming the holder, or, for a dataset being built, waits and then uses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK = ".trm.lock"


class PathProblem(ValueError):
    """An output path that cannot be written; the message names the option and the path."""


class Busy(RuntimeError):
    """A directory held by another process; the message names it."""


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_dir(option: str, path: Path, shown: Path | None = None) -> None:
    """`path` is, or can be created as, a directory this process can write into (nothing is
    left behind). Errors name `shown` (default `path`)."""
    shown = shown or path
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise PathProblem(f"{option} {shown}: {base} is not a directory")
    try:  # the honest test: root passes os.access() everywhere, yet cannot create files in /proc
        Path(tempfile.mkdtemp(prefix=".trm-probe-", dir=base)).rmdir()
    except OSError as e:
        raise PathProblem(f"{option} {shown}: cannot create anything in {base} ({e.strerror or e})") from None


def check_file(option: str, path: Path) -> None:
    """`path` can be written as a file: its directory exists and is writable, and it is not a directory."""
    if path.is_dir():
        raise PathProblem(f"{option} {path}: is a directory; give a file name")
    parent = Path(os.path.abspath(path)).parent
    if not parent.is_dir():
        problem = f"{parent} is not a directory" if parent.exists() else f"the directory {parent} does not exist"
        raise PathProblem(f"{option} {path}: {problem}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise PathProblem(f"{option} {path}: the file is not writable")
        return
    check_dir(option, parent, path)


def claim_new_dir(option: str, path: Path) -> Path | None:
    """Create `path` (and its parents) for a new run or dataset. Returns the top-most
    directory this call created (`path` or an ancestor), None if `path` was there."""
    if path.exists():
        if not path.is_dir():
            raise PathProblem(f"{option} {path}: is a file; give a directory")
        return None
    check_dir(option, path)
    top = Path(path)
    while not top.parent.exists():
        top = top.parent
    try:
        path.mkdir(parents=True)
    except FileExistsError:  # another process made it meanwhile: the lock decides who uses it
        return None
    except OSError as e:
        raise PathProblem(f"{option} {path}: cannot create it ({e.strerror or e})") from None
    return top


def _remove_made(path: Path, top: Path) -> None:
    """Remove `path` with its contents, then its empty parents up to `top` (those a claim made)."""
    shutil.rmtree(path, ignore_errors=True)
    for parent in path.parents:
        if not parent.is_relative_to(top):
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: something else lives there now
            break


def empty(path: Path) -> None:
    """Remove everything in the directory `path` but its lock file (what a failed run wrote)."""
    for p in path.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


def holds_anything(path: Path) -> bool:
    """A file, or a directory holding anything besides a lock file."""
    return path.exists() and (not path.is_dir() or any(p.name != LOCK for p in path.iterdir()))


def _holder() -> str:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip


def _describe_holder(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"process {h['pid']} on {h['host']} (`{h['command']}`, since {h['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


if os.name == "posix":
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

else:  # Windows: a byte-range lock on the first byte
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False


def _acquire(lock: Path) -> tuple[int | None, str]:
    """(fd, "") holding the lock, or (None, who holds it)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            raw = os.pread(fd, 4096, 0) if hasattr(os, "pread") else b""
            os.close(fd)
            return None, _describe_holder(raw)
        try:  # the file may have been removed by its last holder between our open and lock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, _holder().encode())
            return fd, ""
        os.close(fd)


@contextlib.contextmanager
def exclusive(
    directory: Path, what: str, wait: bool = False, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold `directory` (which must exist) for this process. Raises Busy naming the holder, or
    with `wait` calls ``on_wait(holder)`` once and blocks until the holder is done."""
    lock = directory / LOCK
    told = False
    while True:
        if wait:  # the holder may have failed and removed what it created
            directory.mkdir(parents=True, exist_ok=True)
        fd, holder = _acquire(lock)
        if fd is not None:
            break
        if not wait:
            raise Busy(f"{directory} is in use by {holder}: {what}")
        if on_wait is not None and not told:
            on_wait(holder)
            told = True
        time.sleep(0.5)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before the unlock: a waiter then retries on a fresh file
        os.close(fd)


@contextlib.contextmanager
def held_directory(
    option: str,
    path: Path,
    purpose: str,
    discard_partial: bool = False,
    created: Path | None = None,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[bool]:
    """Create `path` if absent and hold it (Busy if another process does); yields whether this
    call created it. If the body raises (a bad setting found later, Ctrl-C) and this call
    created the directory, it is removed when it holds nothing, or with whatever the body
    left there when `discard_partial` (a half-built dataset). A directory that existed, or
    a run that has written anything, is kept, and so are parents that were there.
    `created`: the top-most directory the caller has just made for `path`; `wait`, `on_wait`:
    as :func:`exclusive`'s."""
    top = claim_new_dir(option, path) or created
    try:
        with exclusive(path, purpose, wait, on_wait):
            yield top is not None
    except BaseException:
        if top is not None and (discard_partial or not holds_anything(path)):
            _remove_made(path, top)
        raise
