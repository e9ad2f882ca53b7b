"""One running job per workdir: an exclusive lock held for the life of each job process.

Why: two launches on one workdir (an accidental double submit) would both do
all the work and race on the bookkeeping. Each process of a job holds an
exclusive ``flock`` on ``<workdir>/job.p<process index>.lock``; a second
launch finds it held and stops at once with a message naming the holder
(host, pid, start time, command), which the lock file records.

Stale locks: the kernel releases a ``flock`` when its holder dies, kill -9
included, so a restart after a crash never has to clean anything up; the
recorded holder is only informative.

Multi-host jobs: every process locks the file of its own index, so the hosts
of one job never contend, and a second launch of the same job is refused on
every host whose index is already running (its other processes then fail at
their first cross-host barrier, as with any lost peer).

File systems: local disks and NFSv4 (which maps ``flock`` to byte-range locks
seen by all clients) support the lock. Where a file system refuses locks,
the recorded holder decides: a live pid on this host, or any holder on another
host (whose liveness cannot be checked), refuses the launch, naming the file
to delete once that process is known to be gone. Object-store workdirs
(``gs://``) have no locks; there, never launch a job twice on one workdir.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from sdedit_jax.util import files

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirBusy(RuntimeError):
    """Another process holds the workdir (the message names it and the lock file)."""


class LinkInWorkdir(ValueError):
    """The workdir holds a symbolic link where the job writes: a write could leave the workdir."""


def link_refused(path: str) -> LinkInWorkdir:
    return LinkInWorkdir(
        f"workdir: {path} is a symbolic link; the job writes only inside its workdir and "
        "follows no link there: remove it"
    )


@dataclasses.dataclass
class WorkdirLock:
    """A held lock (``path`` empty when the workdir's storage has no locks)."""

    path: str
    fd: int | None

    def release(self) -> None:
        """Releases the lock (closing the file releases the ``flock``)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_path(workdir: str, process_index: int) -> str:
    return os.path.join(workdir, f"job.p{process_index:05d}.lock")


def _holder_text(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        return (
            f"pid {holder['pid']} on host {holder['host']} (started {holder['started']}: "
            f"{holder['command']})"
        )
    except (ValueError, KeyError, TypeError, OSError):
        return "another process"


def _holder_alive(fd: int) -> bool:
    """Fallback without locks: whether the recorded holder may still be running."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (ValueError, OSError):
        return False
    if not holder or holder.get("pid") == os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def acquire(workdir: str, process_index: int = 0) -> WorkdirLock:
    """Locks ``workdir`` for this process or raises :class:`WorkdirBusy`.

    A symbolic link planted as the lock file is not followed (:class:`LinkInWorkdir`).
    """
    if not files.is_local(workdir):
        return WorkdirLock("", None)
    os.makedirs(workdir, exist_ok=True)
    path = lock_path(workdir, process_index)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise link_refused(path) from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        message = (
            f"workdir {workdir} is in use by {_holder_text(fd)}; wait for that job to "
            f"end or stop it (lock file {path})"
        )
        os.close(fd)
        raise WorkdirBusy(message) from None
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            os.close(fd)
            raise
        if _holder_alive(fd):
            message = (
                f"workdir {workdir} may be in use by {_holder_text(fd)} (this file system "
                f"has no locks); if that process is gone, delete {path}"
            )
            os.close(fd)
            raise WorkdirBusy(message) from None
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    return WorkdirLock(path, fd)
