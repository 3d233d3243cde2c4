"""One process per run directory: an OS lock that a killed process never leaves behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import TokeneffError, show
from . import _faults
from .layout import LOCK_NAME, NOFOLLOW

# ----------------------------------------------------------------------------------------------------------
# one process per run directory
# ----------------------------------------------------------------------------------------------------------

class RunLock:
    """An OS lock (flock) on out/.tokeneff.lock, held while a process trains into `out`. The kernel releases it
    when the process dies, so a killed run never leaves a stale lock."""

    def __init__(self, out: Path):
        self.out, self.fd = out, None
        self.created: list[Path] = []
        """the folders acquire() made, deepest first"""

    def acquire(self) -> RunLock:
        out = self.out
        missing = []
        p = out
        while not p.exists() and not p.is_symlink() and p != p.parent:
            missing.append(p)
            p = p.parent
        path = out / LOCK_NAME
        try:
            for d in reversed(missing):
                try:
                    d.mkdir()
                    self.created.insert(0, d)
                except FileExistsError:  # another run made it meanwhile: it is not ours to remove
                    pass
            fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o666)
        except OSError as e:
            self.release(remove_created=True)
            if e.errno == errno.ELOOP:
                raise TokeneffError(f"out={show(str(out))}: {LOCK_NAME!r} is a symbolic link; tokeneff never writes "
                                    "through a link inside a run folder: remove it") from None
            raise TokeneffError(f"out={show(str(out))}: cannot open the run's lock {show(str(path))} "
                                f"({e.strerror})") from None
        if os.fstat(fd).st_nlink > 1:  # writing the PID would reach the other name's file (a `cp -al` copy?)
            os.close(fd)
            self.release(remove_created=True)
            raise TokeneffError(f"out={show(str(out))}: {LOCK_NAME!r} is a hard link to a file elsewhere; tokeneff "
                                "never writes into a file shared with another name: remove it (it only ever holds "
                                "a PID)")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            self.fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TokeneffError(f"out={str(out)!r} is in use by process {holder} (lock {str(path)!r}): wait for it "
                                "to finish or stop it") from None
        try:  # the holder's PID, for the message above; a full disk only loses it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self.fd = fd
        return self

    def release(self, remove_created: bool = False) -> None:
        """Unlock; with remove_created (a run that failed before writing anything), also remove the folders
        acquire() created, deepest first, each only while it holds nothing but this run's lock file: a folder that
        holds anything else (another run created beside it meanwhile, say) stays, and so do the folders above it."""
        if remove_created and self.created:
            _faults.hook("release")
            lock = self.out / LOCK_NAME
            try:
                if self.fd is not None and os.path.samestat(os.fstat(self.fd), os.lstat(lock)):
                    lock.unlink()
            except OSError:
                pass
            for d in self.created:
                try:
                    os.rmdir(d)  # never deletes anything but an empty folder
                except OSError:
                    break
            self.created = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
