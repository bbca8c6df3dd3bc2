"""Lock files tied to a live process: who holds them, waiting, and taking over.

:func:`file_lock` serialises the work on one cache entry or one run folder between
processes (``fcntl.flock`` on a lock file). The holder writes a one-line record into the
file (pid, host, command, start time), so that

- a lock held by a live process is waited for with a message naming that process, or
  refused at once (``wait=False``, the command line's ``--no-wait``), naming it too;
- a lock whose holder is gone is taken over with a one-line notice. The kernel releases
  a ``flock`` when its holder dies; if processes forked by the holder (workers) still
  keep the file open, the lock file itself is replaced, so a dead holder never blocks
  the next command.

Processes forked while a lock is held (worker pools) must call
:func:`release_inherited_locks` first thing: they then never hold a lock themselves.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from brainage_core._utils.validation import BrainAgeInputError

#: Environment variable read when ``wait=None``: ``"0"`` refuses a held lock instead of
#: waiting (``--no-wait`` sets it, so that notebook kernels started by a run inherit it).
LOCK_WAIT_ENV = "BRAINAGE_LOCK_WAIT"

#: Environment variable naming the command that holds a lock (set by the command line,
#: inherited by the notebook kernels it starts).
COMMAND_ENV = "BRAINAGE_COMMAND"

#: Seconds between two attempts while waiting for a lock.
POLL_SECONDS = 0.2

_HELD: dict[str, int] = {}  # lock path -> file descriptor, in this process


class LockBusy(BrainAgeInputError):
    """A lock is held by a live process and ``wait=False`` was asked for."""


@dataclass(frozen=True)
class LockHolder:
    """The record a holder writes into its lock file.

    Attributes
    ----------
    pid : int
        Process id of the holder.
    host : str
        Host name of the holder (a lock on a shared file system may come from another
        machine, whose processes cannot be checked from here).
    command : str
        The command that took the lock.
    started : str
        When the lock was taken (ISO 8601, UTC).
    process_start : str or None
        Start time of the holder process as the kernel reports it (``/proc/<pid>/stat``),
        which tells a live holder from a new process that reuses its pid.
    """

    pid: int
    host: str
    command: str
    started: str
    process_start: str | None = None

    @classmethod
    def current(cls) -> LockHolder:
        """The record of this process."""
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            command=_command(),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            process_start=_process_start(os.getpid()),
        )

    def is_alive(self) -> bool | None:
        """True if the holder still runs, False if it is gone, None if unknown (other host)."""
        if self.host != socket.gethostname():
            return None
        return _pid_alive(self.pid, self.process_start)

    def describe(self) -> str:
        """One line: ``pid 123 on host (command, since ...)``."""
        return f"pid {self.pid} on {self.host} ({self.command}, since {self.started})"


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike,
    *,
    wait: bool | None = None,
    what: str = "this folder",
    notice: Callable[[str], None] | None = None,
) -> Iterator[LockHolder]:
    """Hold an exclusive lock on ``path`` for the block, recording this process as holder.

    Parameters
    ----------
    path : str or os.PathLike
        The lock file (created if needed; left in place afterwards, empty).
    wait : bool or None, default=None
        When another live process holds the lock: wait for it (True) or raise
        :class:`LockBusy` naming it (False). None reads :data:`LOCK_WAIT_ENV`
        (waiting unless it is ``"0"``).
    what : str, default="this folder"
        What the lock protects, for the messages (e.g. "the cache entry").
    notice : callable or None, default=None
        Receives the one-line messages (waiting, taking over); None prints them on
        standard error.

    Yields
    ------
    LockHolder
        The record written into the lock file.

    Raises
    ------
    LockBusy
        ``wait`` is False and a live process (or one on another host) holds the lock.
    """
    path = Path(path)
    if wait is None:
        wait = os.environ.get(LOCK_WAIT_ENV, "1") != "0"
    say = notice or _print_notice
    waiting_for: LockHolder | None = None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            if holder is not None and holder.is_alive() is False:
                # The holder is gone but processes it forked keep the file locked.
                if _replace_lock_file(path, holder):
                    say(
                        f"{path}: taking over the lock of {holder.describe()}, which is no "
                        "longer running"
                    )
                continue
            who = holder.describe() if holder is not None else "another process"
            if not wait:
                raise LockBusy(
                    f"{what} is in use by {who}; wait for it to finish, or leave out "
                    "--no-wait to wait for it",
                    path,
                ) from None
            if holder != waiting_for:
                say(f"{path}: {what} is in use by {who}; waiting for it (Ctrl-C to stop)")
                waiting_for = holder
            time.sleep(POLL_SECONDS)
            continue
        # Locked; make sure nobody replaced the file between open() and flock().
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break

    previous = _read_holder(fd)
    if previous is not None and previous.pid != os.getpid():
        say(
            f"{path}: taking over the lock of {previous.describe()}, which stopped "
            "without releasing it"
        )
    me = LockHolder.current()
    _write_holder(fd, me)
    _HELD[str(path)] = fd
    try:
        yield me
    finally:
        _HELD.pop(str(path), None)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_lock_holder(path: str | os.PathLike) -> LockHolder | None:
    """Return the holder recorded in a lock file (None if it is free or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def is_locked(path: str | os.PathLike) -> bool:
    """True if some process holds the lock on ``path`` right now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def release_inherited_locks() -> None:
    """Close, in a freshly forked child, the lock files its parent holds.

    A forked worker shares its parent's open files; closing its copies (never unlocking
    them) means the lock lives and dies with the parent alone.
    """
    for fd in list(_HELD.values()):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


# -- helpers ------------------------------------------------------------------------------
def _replace_lock_file(path: Path, dead: LockHolder) -> bool:
    """Replace a lock file held only by the leftovers of ``dead``; False if it changed."""
    # Serialise the replacement between waiters with a lock on the folder itself.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        if read_lock_holder(path) != dead:
            return False  # someone else replaced it, or the holder changed
        tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
        os.close(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666))
        os.replace(tmp, path)
        return True
    finally:
        fcntl.flock(dir_fd, fcntl.LOCK_UN)
        os.close(dir_fd)


def _read_holder(fd: int) -> LockHolder | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
        data = json.loads(text) if text else None
        return LockHolder(**data) if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def _write_holder(fd: int, holder: LockHolder) -> None:
    data = (json.dumps(asdict(holder)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _command() -> str:
    command = os.environ.get(COMMAND_ENV)
    if not command:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
    return command if len(command) <= 120 else command[:117] + "..."


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int, process_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    except OSError as err:  # pragma: no cover - unusual platforms
        return err.errno != errno.ESRCH
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/stat").exists()  # no /proc: trust kill(0)
    except OSError:
        return True
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has stopped; only its parent has not collected it
        return False
    return process_start is None or fields[19] == process_start


def _print_notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)
