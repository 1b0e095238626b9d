"""The run lock: ``<output_dir>/run.lock`` held by rank 0 for a run's life.

Created atomically (``link`` of a complete file). A lock whose process is gone (same host, no live process
with its pid and start time) is stale and taken over with a warning; a lock from another host cannot be
checked and is never taken over (the message says which file to delete if that run is dead).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import time
import uuid
from typing import Optional, Tuple

from ..errors import RunFolderError, warn

LOCK_FILE = "run.lock"


def now_utc() -> str:
    """The current UTC time as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _proc_start_time(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def read_lock(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def lock_is_stale(info: dict) -> Tuple[bool, str]:
    """``(stale, why)`` for a lock's contents, judged from this host."""
    if not info or "pid" not in info or "host" not in info:
        return True, "the lock file is unreadable"
    pid = info["pid"]
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0 or not isinstance(info["host"], str):
        # no process can be named by it (kill(0 or -1, 0) would probe a whole process group): not a live run's
        return True, f"the lock file is damaged (pid {pid!r}, host {info['host']!r})"
    if info["host"] != socket.gethostname():
        return False, f"held by pid {pid} on host {info['host']} (cannot be checked from here)"
    if not _pid_alive(pid):
        return True, f"its process {pid} on this host is gone"
    start = _proc_start_time(pid)
    if start is not None and info.get("start_time") is not None and start != info["start_time"]:
        return True, f"pid {pid} now belongs to another process"
    return False, f"held by the live process {pid} on this host"


def _describe(info: dict, path: str) -> str:
    parts = [f"pid {info.get('pid')} on host {info.get('host')}"]
    if info.get("run_id"):
        parts.append(f"run {info['run_id']}")
    if info.get("acquired"):
        parts.append(f"since {info['acquired']}")
    try:
        parts.append(f"last heartbeat {time.time() - os.path.getmtime(path):.0f} s ago")
    except OSError:
        pass
    return ", ".join(parts)


@contextlib.contextmanager
def folder_flock(folder: str):
    """An exclusive advisory ``flock`` on the folder itself (skipped where the file system has no ``flock``);
    released by the kernel if its holder dies, so it never goes stale. The run lock's check-and-take-over (two
    processes never both take over one stale lock) and the synthetic corpus's generation use it."""
    fd = None
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        if fd is not None:
            os.close(fd)
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock


class RunLock:
    """``<folder>/run.lock``: ``acquire`` raises :class:`RunFolderError` when a live run holds it."""

    def __init__(self, folder: str, run_id: str = ""):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self.run_id = run_id
        self.held = False

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _proc_start_time(os.getpid()),
                "run_id": self.run_id, "token": self.token, "acquired": now_utc(), "argv": sys.argv[:8]}

    def acquire(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.{self.token[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._info(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            with folder_flock(self.folder):
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    info = read_lock(self.path)
                    if info is None:  # released in between
                        os.link(tmp, self.path)
                    else:
                        stale, why = lock_is_stale(info)
                        if not stale:
                            raise RunFolderError(
                                f"{self.folder} is in use by another run ({_describe(info, self.path)}); wait for it "
                                f"to finish or choose another output_dir. If that run is dead, delete {self.path}"
                            ) from None
                        warn(f"taking over the stale lock {self.path} ({why})")
                        os.replace(tmp, self.path)
                except OSError as e:
                    if isinstance(e, FileExistsError):
                        raise
                    # no hard links on this file system: exclusive create instead
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump(self._info(), f)
            if (read_lock(self.path) or {}).get("token") != self.token:
                raise RunFolderError(f"{self.folder} was claimed by another run at the same moment "
                                     f"({_describe(read_lock(self.path) or {}, self.path)})")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self.held = True
        return self

    def set_run_id(self, run_id: str) -> None:
        """Record the run id in the held lock (atomic replace)."""
        if not self.held:
            return
        self.run_id = run_id
        tmp = f"{self.path}.{os.getpid()}.{self.token[:8]}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._info(), f)
        os.replace(tmp, self.path)

    def heartbeat(self) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self.held and (read_lock(self.path) or {}).get("token") == self.token:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.held = False
