"""Helpers of the reliability tests: processes seen through /proc, cache comparison."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, their children, ...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def wait_gone(pids: list[int], seconds: float) -> bool:
    """Wait until none of ``pids`` runs; False if some still do after ``seconds``."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def cache_files(root: Path, ignore: tuple[str, ...] = ("created",)) -> dict[str, bytes]:
    """Every file of a published cache, ``metadata.json`` without the keys ``ignore``."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "metadata.json":
                meta = json.loads(data)
                for key in ignore:
                    meta.pop(key, None)
                data = json.dumps(meta, sort_keys=True).encode()
            files[str(path.relative_to(root))] = data
    return files


def leftovers() -> list[int]:
    """Processes forked from this one (same command line, same session) still running."""
    me = os.getpid()
    mine = Path(f"/proc/{me}/cmdline").read_bytes()
    session = os.getsid(me)
    ancestors = {me}
    pid = me
    while pid > 1:
        fields = _stat(pid)
        pid = int(fields[1]) if fields else 1
        ancestors.add(pid)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ancestors:
            continue
        pid = int(entry.name)
        try:
            same = (entry / "cmdline").read_bytes() == mine and os.getsid(pid) == session
        except OSError:
            continue
        if same and alive(pid):
            found.append(pid)
    return sorted(found)


def published(folder: Path, *, required: bool = True) -> Path | None:
    """The one complete entry of a cache folder (not a ``.partial``, not a lock file)."""
    entries = [
        p for p in Path(folder).iterdir() if p.is_dir() and not p.name.endswith(".partial")
    ] if Path(folder).is_dir() else []
    assert len(entries) <= 1, entries
    if required:
        assert entries, f"nothing published in {folder}"
    return entries[0] if entries else None


FORK = multiprocessing.get_context("fork")


def start_forked(target: Callable, *args) -> multiprocessing.Process:
    """Run ``target(*args)`` in a forked child (milliseconds; no new interpreter)."""
    proc = FORK.Process(target=target, args=args)
    proc.start()
    return proc


def wait_for(condition: Callable[[], bool], proc: multiprocessing.Process, what: str) -> None:
    """Wait (at most a minute) until ``condition()``, while ``proc`` still runs."""
    deadline = time.monotonic() + 60
    while not condition():
        assert proc.is_alive(), f"the command ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def kill_family(proc: multiprocessing.Process) -> list[int]:
    """SIGKILL ``proc``; return the processes it had started (all must be gone soon)."""
    family = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    return family
