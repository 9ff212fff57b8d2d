"""Writing outputs atomically, and removing what killed writers left behind.

Every output is written under a temporary name beside its target and renamed into place when complete,
so a reader sees the old version or the whole new one. A SIGKILL cannot run cleanup, so temp names carry
their writer's host and pid, and the next write to the same target removes those whose writer is gone.
No torch here: the world generator uses it too.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import MatvlmError

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def temp_prefix(name: str) -> str:
    """Temp names carry host and pid, so a later run can tell a dead writer's leftovers from a live one's."""
    return f".{name}.{_HOST}-{os.getpid()}-"


def _writer_is_gone(owner: str | None) -> bool:
    if owner is None:  # a name from before temp names carried their writer
        return True
    host, _, pid = owner.rpartition("-")
    if host != _HOST:
        return False  # another machine's, on a shared disk: its writer may be alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _is_stale(path: Path, target: Path) -> bool:
    temp = re.fullmatch(rf"\.{re.escape(target.name)}\.(?:(?P<owner>[A-Za-z0-9_-]+-\d+)-)?[a-z0-9_]*\.tmp", path.name)
    if temp:
        return _writer_is_gone(temp["owner"])
    trash = re.fullmatch(rf"\.{re.escape(target.name)}\.old-(?P<pid>\d+)", path.name)
    return bool(trash) and target.exists() and _writer_is_gone(f"{_HOST}-{trash['pid']}")


def remove_stale_temps(target: Path) -> None:
    """Delete what killed writers of `target` left beside it: `.NAME.*.tmp` temp directories or files, and
    `.NAME.old-PID` (the replaced copy, when the kill came while it was being deleted)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for path in target.parent.glob(f".{glob.escape(target.name)}.*"):
        if not _is_stale(path, target):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class atomic_directory:
    """Write into a temp directory beside `target`; rename it into place only if all went well."""

    def __init__(self, target: Path, overwrite: bool = False):
        self.target, self.overwrite = Path(target), overwrite

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise MatvlmError(f"{self.target}: already exists (pass --overwrite to replace it)")
        if self.target.exists() and not self.target.is_dir():
            raise MatvlmError(f"{self.target}: exists and is not a directory")
        parent = self.target.parent
        if parent.exists() and not parent.is_dir():
            raise MatvlmError(f"{parent}: not a directory")
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.target)
        self.tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(self.target.name), suffix=".tmp", dir=parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.target.exists():
            trash = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            self.target.rename(trash)
            self.tmp.rename(self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            self.tmp.rename(self.target)
        return False


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: readers see the old file or
    the whole new one, never a half-written one. Bytes are written as they are (a PNG)."""
    remove_stale_temps(path)
    handle, temp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb" if isinstance(text, bytes) else "w") as stream:
            stream.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp's file is private; results are ordinary files
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
