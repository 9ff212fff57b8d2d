"""Where outputs may go, writing them atomically, and removing what killed writers left behind.

Every output is written under a temporary name beside its target and renamed into place when complete,
so a reader sees the old version or the whole new one. A SIGKILL cannot run cleanup, so temp names carry
their writer's host and pid, and the next write to the same target removes those whose writer is gone.

An output folder carries a mark (`OUTPUT_MARK`) listing what matvlm wrote in it. `--overwrite` replaces
only a folder whose every entry is listed there, or an empty one: never a user's folder, never one the
user has put notes or sub-folders into, never an input, never the current directory.
Outputs get the modes the user's umask gives (temp directories and files are created private).
No torch here: the world generator uses it too.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import MatvlmError

OUTPUT_MARK = ".matvlm-output.json"

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


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def share_like_umask(root: Path) -> None:
    """Give `root` and everything in it the modes the user's umask gives new files (0755 folders and 0644
    files under the usual 022): mkdtemp, mkstemp and the libraries that write through them make them
    private, and a teammate or a serving account could not read the weights."""
    umask = _umask()
    os.chmod(root, 0o777 & ~umask)
    for directory, folders, files in os.walk(root):
        for name in folders:
            os.chmod(os.path.join(directory, name), 0o777 & ~umask, follow_symlinks=False)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def _cannot_write(target: Path, err: OSError) -> MatvlmError:
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(target) else ""
    return MatvlmError(f"{target}: writing it failed: {err.strerror or err}{where}")


def mark_output(directory: Path, entries: Iterable[str]) -> None:
    """Record in `directory` that matvlm wrote it, and which entries are matvlm's (see `check_replaceable`)."""
    write_atomic(Path(directory) / OUTPUT_MARK, json.dumps({"written_by": "matvlm", "entries": sorted(entries)}, indent=1) + "\n")


def check_replaceable(target: Path, what: str = "--output") -> None:
    """Refuse to replace `target` unless it is empty or matvlm wrote everything in it: its mark lists every
    entry (a temp name of a listed entry counts as that entry). Never the current directory or one above it."""
    target = Path(target)
    if not target.exists():
        return
    resolved, here = target.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        relation = "is" if resolved == here else "holds"
        raise MatvlmError(f"{target}: {what} {relation} the current directory, which is never replaced; write to a new folder")
    if not target.is_dir():
        raise MatvlmError(f"{target}: {what} exists and is not a directory")
    entries = [path.name for path in target.iterdir()]
    if not entries:
        return
    try:
        written = set(json.loads((target / OUTPUT_MARK).read_text())["entries"]) | {OUTPUT_MARK}
    except (OSError, ValueError, KeyError, TypeError):
        raise MatvlmError(
            f"{target}: {what} is not a folder matvlm wrote (it has no {OUTPUT_MARK}), so it is not replaced: "
            "move it away, or write somewhere else"
        ) from None
    foreign = sorted(name for name in entries if name not in written and not any(name.startswith(f".{w}.") for w in written))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise MatvlmError(
            f"{target}: {what} holds {foreign[0]}{more}, which matvlm did not write, so it is not replaced: "
            "move that out, or write somewhere else"
        )


def remove_contents(directory: Path) -> None:
    """Empty `directory` and keep it (a lock held on it stays valid)."""
    for path in Path(directory).iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_output_dir(output: str | os.PathLike, what: str = "--output", exists_ok: bool = False,
                     inputs: tuple = (), overwrite: bool = False, data_inputs: tuple = ()) -> Path:
    """Before any work: `output` can be made as a directory (or, with `exists_ok`, added to; with
    `overwrite`, replaced as `check_replaceable` allows), is neither one of `inputs` nor inside one nor
    around one (replacing it would delete them; writing into a model folder would change it), nor one of
    `data_inputs` or around one (it may lie inside a data folder), and its place is writable (tried, not
    guessed from permission bits: a read-only filesystem, /proc and root's view all differ from them)."""
    if not str(output).strip():
        raise MatvlmError(f"{what}: the path is empty")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise MatvlmError(f"{output}: {what} exists and is not a directory")
    if output.exists() and not (exists_ok or overwrite):
        raise MatvlmError(f"{output}: already exists (pass --overwrite to replace it)")
    resolved = output.resolve()
    for source, inside_ok in [*((path, False) for path in inputs), *((path, True) for path in data_inputs)]:
        source_resolved = Path(source).resolve()
        inside = source_resolved in resolved.parents
        if resolved == source_resolved or (inside and not inside_ok) or resolved in source_resolved.parents:
            relation = "is" if resolved == source_resolved else "is inside" if inside else "contains"
            raise MatvlmError(f"{output}: {what} {relation} the input {source}; write somewhere else")
    if overwrite and not exists_ok:
        check_replaceable(output, what)
    existing = next(p for p in (output, *output.parents) if p.exists() or p == Path(p.anchor or "."))
    if not existing.is_dir():
        raise MatvlmError(f"{existing}: not a directory, so {what} {output} cannot be made")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=temp_prefix(resolved.name), suffix=".tmp", dir=existing))
    except OSError as err:
        raise MatvlmError(f"{existing}: not writable ({err.strerror or err}), so {what} {output} cannot be written") from None
    return output


def lock_directory(directory: Path, what: str) -> int:
    """An exclusive lock on `directory`, held until the returned descriptor is closed or the process ends
    (a SIGKILL too, so no stale lock is left); a second writer gets a MatvlmError at once."""
    handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise MatvlmError(f"{directory}: another matvlm run is writing to this {what} now; wait for it to end, or choose another") from None
    return handle


class atomic_directory:
    """Write into a temp directory beside `target`; rename it into place, marked as matvlm's and with the
    umask's modes, only if all went well."""

    def __init__(self, target: Path, overwrite: bool = False):
        # absolute, so that "." or "x/.." have a name and a parent to put the temp directory in
        self.target, self.overwrite = Path(os.path.abspath(target)), overwrite

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise MatvlmError(f"{self.target}: already exists (pass --overwrite to replace it)")
        if self.target.exists() and not self.target.is_dir():
            raise MatvlmError(f"{self.target}: exists and is not a directory")
        parent = self.target.parent
        if parent.exists() and not parent.is_dir():
            raise MatvlmError(f"{parent}: not a directory")
        try:
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.target)
            self.tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(self.target.name), suffix=".tmp", dir=parent))
        except OSError as err:
            raise _cannot_write(self.target, err) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                mark_output(self.tmp, [path.name for path in self.tmp.iterdir()])
                share_like_umask(self.tmp)
                self._rename_into_place()
                return False
            except OSError as err:
                exc = err
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a lost mount, a folder made read-only meanwhile
            raise _cannot_write(self.target, exc) from None
        return False

    def _rename_into_place(self) -> None:
        if not self.target.exists():
            self.tmp.rename(self.target)
            return
        trash = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
        self.target.rename(trash)
        try:
            self.tmp.rename(self.target)
        except OSError:
            trash.rename(self.target)  # the old version stays
            raise
        shutil.rmtree(trash, ignore_errors=True)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: readers see the old file or
    the whole new one, never a half-written one. Bytes are written as they are (a PNG)."""
    remove_stale_temps(path)
    handle, temp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb" if isinstance(text, bytes) else "w") as stream:
            stream.write(text)
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp's file is private; results are ordinary files
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
