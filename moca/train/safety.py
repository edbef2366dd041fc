"""Run safety shared by both trainers: the output-folder lock, graceful stops on SIGTERM / SIGINT, the errors
the ``moca`` command reports in one line, and a test-only fault-injection hook.

* :class:`RunLock`: one run per output folder. ``<output_dir>/moca.lock`` is held with an exclusive
  ``flock`` (released by the kernel when the process dies, however it dies) and names its holder (pid, host,
  start time); a second run refuses naming the first. A lock left by a killed run is taken over with a
  warning. Where ``flock`` is unavailable, a lock whose pid is gone (same host) is taken over.
* :class:`GracefulStop`: the first SIGTERM / SIGINT asks the loop to finish its step, write a checkpoint and
  raise :class:`TrainingInterrupted` (exit status 128 + signal number: 143 for SIGTERM, 130 for SIGINT); a
  second signal exits at once with the same status, without a checkpoint.
* :func:`fault`: ``MOCA_FAULT="point[@n]:action[,...]"`` makes the n-th (default first) pass through a named
  point kill the process (``kill``), send it a signal (``term``, ``int``, ``term2``/``int2``: two), or raise
  ``OSError(ENOSPC)`` (``enospc``). Used by tests/moca/test_faults.py; unset in normal runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional

log = logging.getLogger("moca.train")

LOCK_NAME = "moca.lock"


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""

    moca_exit_code = 1     # the ``moca`` command prints "moca: error: <message>" and exits with this


class CheckpointError(OSError):
    """A checkpoint could not be written, or none of the checkpoints found is intact (the message says which
    file and why)."""


class ExportError(OSError):
    """The final export failed; the message names the folder, the cause and the intact checkpoint."""


class TrainingInterrupted(Exception):
    """A run stopped by SIGTERM / SIGINT after writing a checkpoint; ``exit_code`` = 128 + signal number."""

    def __init__(self, signame: str, signum: int, step: int, max_steps: int, checkpoint: Optional[Path]):
        self.signame, self.signum, self.step, self.max_steps, self.checkpoint = signame, signum, step, max_steps, checkpoint
        self.exit_code = self.moca_exit_code = 128 + signum
        super().__init__(f"stopped by {signame} after step {step} of {max_steps}; checkpoint {checkpoint} written; "
                         f"run the same command again to resume")


# --------------------------------------------------------------------------------------------------------
# Fault injection (tests only)
# --------------------------------------------------------------------------------------------------------

_fault_hits: Dict[str, int] = {}


def fault(point: str, path: Optional[os.PathLike] = None) -> None:
    """Test hook: act on ``MOCA_FAULT`` at ``point`` (see the module docstring); nothing when it is unset."""
    spec = os.environ.get("MOCA_FAULT")
    if not spec:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    for item in spec.split(","):
        where, _, action = item.strip().partition(":")
        name, _, nth = where.partition("@")
        if name != point or _fault_hits[point] != int(nth or 1):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)
        elif action in ("term", "int", "term2", "int2"):
            sig = signal.SIGTERM if action.startswith("term") else signal.SIGINT
            for _ in range(2 if action.endswith("2") else 1):
                os.kill(os.getpid(), sig)
                time.sleep(0.05)     # let the handler run between the two
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else None)
        else:
            raise ValueError(f"MOCA_FAULT: unknown action {action!r} in {item!r}")


# --------------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------------


class GracefulStop:
    """Context manager: while active, SIGTERM / SIGINT set :attr:`signum` instead of killing the process; a
    second one exits at once (status 128 + signal number). Inactive outside the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            sys.stderr.write(f"moca: second {name}: exiting at once, without a checkpoint (exit status {128 + signum})\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        log.warning("%s received: finishing the current step, then writing a checkpoint and exiting "
                    "(send it again to exit at once)", name)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


# --------------------------------------------------------------------------------------------------------
# The output-folder lock
# --------------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _describe(info: dict) -> str:
    if not info:
        return "another process (it wrote no details)"
    when = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    return f"pid {info.get('pid')} on host {info.get('host')} (started {when}: {info.get('command', '?')})"


class RunLock:
    """Exclusive use of an output folder by one run (see the module docstring). Re-entrant within a process:
    the stage entry point and the trainer both take it. Use as a context manager, or acquire()/release()."""

    _held: Dict[str, list] = {}     # resolved lock path -> [count, fd]

    def __init__(self, output_dir: os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(sys.argv)[:300]}

    @staticmethod
    def _read(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            raw += b
        try:
            info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
            return info if isinstance(info, dict) else {}
        except ValueError:
            return {}

    def _write(self, fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(self._info()).encode("utf-8"))
        os.fsync(fd)

    def acquire(self) -> "RunLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in RunLock._held:
            RunLock._held[key][0] += 1
            return self
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except (ImportError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockedError(
                        f"output_dir {self.dir} is in use by another run: {_describe(self._read(fd))}; wait for it to "
                        f"finish or choose another train.output_dir") from None
                locked = False        # no flock here: fall back to the pid written in the file
            prev = self._read(fd)
            if prev:
                same_host = prev.get("host") == socket.gethostname()
                pid = prev.get("pid")
                if not locked and (not same_host or (isinstance(pid, int) and _pid_alive(pid))):
                    raise RunLockedError(
                        f"output_dir {self.dir} is in use by another run: {_describe(prev)}; wait for it to finish, "
                        f"or delete {self.path} if that run is gone")
                log.warning("taking over the lock %s left by %s, which ended without releasing it", self.path,
                            _describe(prev) + (" (no longer running)" if same_host and isinstance(pid, int)
                                               and not _pid_alive(pid) else ""))
            self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        RunLock._held[key] = [1, fd]
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        entry = RunLock._held.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] > 0:
            return
        del RunLock._held[key]
        fd = entry[1]
        try:
            os.ftruncate(fd, 0)     # a clean exit leaves an empty lock file: nothing to take over
        except OSError:
            pass
        os.close(fd)                # closing releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
