"""One samplan run per output folder: an exclusive lock whose file names its holder.

Why fcntl.flock on an open file rather than a lock file created with O_CREAT|O_EXCL: the kernel drops a flock
when its holder dies in any way (SIGKILL, the out-of-memory killer, a power cut of the machine), so on a local disk
a dead run never blocks the next one, and no liveness guess is needed: `os.kill(pid, 0)` on an O_EXCL file's pid is
fooled by pid reuse and cannot see other hosts. The JSON written into the file ({pid, host, argv, started}) only
serves the message. NFS: Linux clients implement flock with the server's byte-range locks, which work across hosts,
but a mount with `nolock` or `local_lock=flock` keeps them local to one client; so a record written on another host
is never taken over before REMOTE_STALE_AFTER_S, even when the flock is free. The file is removed on release.
"""
from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from samplan.disk_space import disk_full_guard
from samplan.errors import AlreadyRunningError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not protected there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".samplan.lock"
# a lock from another host cannot be checked; after this long it is taken over (a training can take days, so the
# bound is generous: deleting the file is the way to take it over sooner)
REMOTE_STALE_AFTER_S = 24 * 3600


def holder_record(what: str) -> dict[str, Any]:
    """The JSON this process writes into a lock it holds."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "argv": list(sys.argv), "what": what,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started_unix": time.time()}


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record in lock file `path`, or None when it is missing, empty or unreadable."""
    try:
        record = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict[str, Any] | None) -> str:
    """'pid 12 on host h (started ..., 3 min ago; command: ...)' for messages."""
    if record is None:
        return "a process whose details are unreadable"
    age = time.time() - float(record.get("started_unix", time.time()))
    ago = f"{age / 60:.0f} min ago" if age < 3 * 3600 else f"{age / 3600:.1f} h ago"
    command = shlex.join(str(a) for a in record.get("argv", [])) or "unknown"
    return (f"pid {record.get('pid')} on host {record.get('host')} (started {record.get('started')}, {ago}; "
            f"command: {command})")


def _busy_error(path: Path, what: str, record: dict[str, Any] | None, remote: bool) -> AlreadyRunningError:
    """The message for a lock that another process holds (or may hold, on another host)."""
    doing = (record or {}).get("what", what)
    head = f"another samplan run is already {doing} in {path.parent}: {_describe(record)}; lock file {path}."
    if remote:
        return AlreadyRunningError(
            f"{head} samplan cannot check a process on another host: if it has stopped, delete {path} and run this "
            f"command again (a lock written on another host is taken over by itself after "
            f"{REMOTE_STALE_AFTER_S / 3600:g} h).")
    if record is not None and record.get("pid") == os.getpid():
        return AlreadyRunningError(f"{head} This process holds it already: do not run the same job twice at once.")
    return AlreadyRunningError(
        f"{head} Wait for it to finish (or stop it: kill {record.get('pid') if record else '<pid>'}), then run this "
        "command again; a lock left by a process that died is taken over automatically.")


def _open_locked(path: Path, what: str) -> int | None:
    """Open `path` and flock it; the fd, None when the filesystem has no locks, AlreadyRunningError when busy."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _busy_error(path, what, read_record(path), remote=False) from None
            print(f"note: cannot lock {path} ({e.strerror}; a network filesystem without locks?): a second run "
                  "on this folder at the same time would not be stopped", file=sys.stderr)
            return None
        # a releasing holder unlinks the file before closing it: if ours is no longer the one at `path`, retry
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold lock file `path` while the block runs; AlreadyRunningError naming the holder if another run has it.

    `what` says what the holder does, for the message ("preprocessing Dataset004_Hippocampus"). A lock left by a
    dead process on this host is taken over with a one-line note; see the module docstring for other hosts.
    """
    path = Path(path)
    with disk_full_guard(path.parent, detail=f" while creating the lock file {path.name}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path, what) if fcntl is not None else None
    if fcntl is None:
        print(f"note: no file locks on this platform (no fcntl): a second run on {path.parent} at the same time "
              "would not be stopped", file=sys.stderr)
    if fd is None:
        yield path
        return
    previous = read_record(path)
    if previous is not None:
        age = time.time() - float(previous.get("started_unix", 0))
        if previous.get("host") != socket.gethostname():
            if age < REMOTE_STALE_AFTER_S:
                os.close(fd)  # keep the other host's record: it may still be running
                raise _busy_error(path, what, previous, remote=True)
            why = f"written on another host more than {REMOTE_STALE_AFTER_S / 3600:g} h ago"
        else:
            why = "which is no longer running"
        print(f"note: taking over the lock {path} of {_describe(previous)}, {why}", file=sys.stderr)
    try:
        data = json.dumps(holder_record(what)).encode()
        with disk_full_guard(path.parent, detail=f" while writing the lock file {path.name}"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        yield path
    finally:
        # unlink while still holding the lock, so a waiting process cannot lock the old file after we are gone
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
