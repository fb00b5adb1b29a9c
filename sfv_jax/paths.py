"""Outputs that never touch a command's inputs, have one writer, and are never half-written.

An output folder that equals, contains or sits inside an input path is refused before anything is written,
with or without ``--overwrite`` (symbolic links resolved first). A command holds an exclusive lock on each
output it writes (:class:`OutputLock`, a lock file beside the output): a second command on the same output
stops at once with an error naming the holder. Folders are built in a staging folder beside the output whose
name is unique per process and renamed into place at the end (:func:`staged_folder`); staging folders
left by a killed run of this host are removed by the next run on the same output, and nothing else is.

    problem = output_overlaps("--out", out, {"--src": src})   # None, or the message to raise
    problem = folder_problem("--workdir", workdir)              # a file, or not writable
    with OutputLock(out, "--out"):                              # or OutputError naming the holder
        with staged_folder(out, overwrite) as tmp: ...          # tmp -> out on success, removed on error
    write_atomic(path, lambda tmp: tmp.write_text(text))         # never a half-written file at path
    message = os_error_message(e)                               # an OSError as one line, or None (a bug)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path


class OutputError(Exception):
    """An output cannot be written: another command holds it, or it is not a usable folder."""


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def output_overlaps(
    out_flag: str, out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]
) -> str | None:
    """The message for the first input (``{flag: path}``; None entries skipped) that ``out`` equals,
    contains or lies inside, else None. Paths are compared after resolving symbolic links."""
    o = _real(out)
    for flag, path in inputs.items():
        if path is None or str(path) == "":
            continue
        i = _real(path)
        if o == i:
            how = "is"
        elif i.is_relative_to(o):
            how = "contains"
        elif o.is_relative_to(i):
            how = "is inside"
        else:
            continue
        return (
            f"{out_flag} {out} {how} {flag} {path} ({o} vs {i}): an output must not overlap an input, "
            f"with or without --overwrite (nothing was written); choose another {out_flag}"
        )
    return None


def folder_problem(flag: str, path: str | os.PathLike, *, replaced: bool = False) -> str | None:
    """The message if ``path`` cannot be a command's output folder (it is a file, or neither it nor its
    nearest existing parent can be written; with ``replaced``, an output that is built beside and renamed
    into place, also a symbolic link: the rename would replace the link, not fill its target), else None:
    checked before any work."""
    p = Path(path).expanduser().absolute()
    if replaced and p.is_symlink():
        return f"{flag} {p}: is a symbolic link (to {os.path.realpath(p)}); give the folder's real path"
    if p.exists() and not p.is_dir():
        return f"{flag} {p}: exists and is not a folder"
    probe = p if p.exists() else next(q for q in p.parents if q.exists())
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return f"{flag} {p}: {probe} is not a writable folder"
    try:  # a read-only file system (or a full one) passes os.access for root: write a byte to be sure
        with open(probe / f".sfv-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}", "wb") as fh:
            fh.write(b"0")
            os.unlink(fh.name)
    except OSError as e:
        return f"{flag} {p}: cannot write in {probe}: {e.strerror or e}"
    return None


def check_free_space(flag: str, path: str | os.PathLike, needed: int) -> None:
    """OutputError if the file system of ``path`` (or its nearest existing parent) has less than ``needed``
    bytes free: known before the work, not found by a full disk in the middle of it."""
    p = Path(path).absolute()
    probe = p if p.exists() else next(q for q in p.parents if q.exists())
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OutputError(
            f"{flag} {p}: needs about {needed / 1e9:.3g} GB, {free / 1e9:.3g} GB free on its file system; "
            f"free space or choose another {flag}"
        )


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no temp file behind
        raise
    return path


# ------------------------------------------------------------------------------------------- one writer


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class OutputLock:
    """An exclusive lock on an output path, held while a command writes it: ``.<name>.lock`` beside the
    output, locked with ``flock`` (released by the kernel when the process ends, however it ends) and
    naming its holder (host, pid, command, start time). ``part`` separates the locks of one multi-process
    command (one per process). A lock file whose holder ended without removing it is taken over, with a
    warning that names the old holder.

        with OutputLock("runs/sfv", "--workdir", command="sfv-train"):
            ...
    """

    def __init__(self, path: str | os.PathLike, flag: str, *, command: str = "", part: str = ""):
        self.path = Path(path).expanduser().absolute()
        self.flag, self.command = flag, command
        self.file = self.path.with_name(f".{self.path.name}{part}.lock")
        self.previous: dict | None = None  # the holder of a stale lock taken over
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputError(
                    f"{self.flag} {self.path}: in use by {_describe(holder)} (lock file {self.file}); one command "
                    f"writes an output at a time: wait for it to end, or choose another {self.flag}"
                ) from None
            except OSError as e:  # a file system without locks: carry on unlocked, but say so
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                logging.warning("%s %s: the file system refuses locks (%s); not locked", self.flag, self.path, e)
                return self
            try:  # the file may have been removed (and re-created) by the holder between open and flock
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = _read_holder(fd) or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**_holder(), "command": self.command}).encode(), 0)
        self._fd = fd
        _HELD.add(self.file)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            _HELD.discard(self.file)
            with contextlib.suppress(OSError):
                os.unlink(self.file)  # while still holding it: a waiting opener re-checks the inode
            os.close(self._fd)
            self._fd = None


_HELD: set[Path] = set()  # the lock files this process holds (removed by stop_on_signal's exit too)


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    what = f"{holder.get('command') or 'a command'} (pid {holder.get('pid')} on {holder.get('host')}"
    return what + (f", since {holder['started']})" if holder.get("started") else ")")


# ------------------------------------------------------------------------------------------- staging

_STAGING = ".staging-"


def staging_name(out: Path) -> Path:
    """A staging folder beside ``out``, unique per process: ``.<name>.staging-<host>-<pid>-<random>``."""
    return out.with_name(f".{out.name}{_STAGING}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders of ``out`` left by runs of this host that no longer run (their pid is
    gone); returns them. Only names :func:`staging_name` makes are considered: nothing else is touched."""
    out, host, removed = Path(out).absolute(), socket.gethostname(), []
    prefix = f".{out.name}{_STAGING}{host}-"
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        if not p.name.startswith(prefix) or p.is_symlink() or not p.is_dir():
            continue
        pid, _, tag = p.name[len(prefix) :].partition("-")
        if pid.isdigit() and len(tag) == 8 and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def publish(built: Path, out: Path) -> None:
    """Rename the complete folder ``built`` onto ``out``; an existing ``out`` is moved aside first and
    removed only once the new one is in place."""
    if out.exists():
        trash = staging_name(out)
        os.replace(out, trash)
        os.replace(built, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(built, out)


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on success it is renamed into place (an existing
    ``out`` is replaced only with ``overwrite``, and only after the new one is complete), on any error or
    interrupt it is removed, so ``out`` is never half-written. Take :class:`OutputLock` on ``out`` first."""
    out = Path(out).absolute()
    if out.is_symlink():
        raise OutputError(f"{flag} {out}: is a symbolic link (to {os.path.realpath(out)}); give the real path")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{flag} {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{flag} {out}: already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = staging_name(out)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def stop_on_signal(cleanup: Callable[[], object]) -> Iterator[None]:
    """Inside: SIGINT and SIGTERM stop the process within moments, whatever it is waiting on (a pool of
    decoding processes, a library that catches KeyboardInterrupt): ``cleanup()`` (remove the staging
    folder), the locks this process holds released, the child processes terminated, one ``error:`` line,
    exit 128 + the signal's number."""

    def handle(signum, frame):
        with contextlib.suppress(Exception):
            cleanup()
        for lock_file in list(_HELD):
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
        for child in multiprocessing.active_children():
            with contextlib.suppress(Exception):
                child.terminate()
        os.write(2, f"error: stopped by signal {signum} (nothing half-written was kept)\n".encode())
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------- I/O errors

# errors of the machine rather than of the code: a full or read-only disk, permissions, a path that is a
# file where a folder is wanted (or the reverse), a name too long, a symlink loop, an I/O failure
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENOTEMPTY,
        errno.ENAMETOOLONG,
        errno.ELOOP,
        errno.EIO,
        errno.EMFILE,
        errno.EXDEV,
    }
)


def os_error_message(e: BaseException) -> str | None:
    """One line for an :class:`OSError` of the environment (see ``ENVIRONMENT_ERRNOS``; a full disk gets a
    hint), else None (let it surface: it is a bug, not the machine)."""
    if not isinstance(e, OSError) or e.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = f"{where}: {e.strerror}" if where else str(e.strerror or e)
    hint = {
        errno.ENOSPC: "; free space or write elsewhere (nothing half-written was kept)",
        errno.EDQUOT: "; over the disk quota: free space or write elsewhere",
        errno.EROFS: "; the file system is read-only: write elsewhere",
        errno.EACCES: "; no permission: write elsewhere or fix the permissions",
    }.get(e.errno, "")
    return f"{what} ({errno.errorcode.get(e.errno, e.errno)}){hint}"
