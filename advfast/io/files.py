"""Writing results safely: durable files, strict JSON, and output folders that never lose or
overwrite what advfast did not write.

* :func:`write_durably`: a temporary name (``.NAME.advfast-tmp``), flush, fsync, rename, fsync
  the folder; on any error the temporary file is removed.
* :func:`strict` / :func:`dumps`: JSON that strict readers (JavaScript's JSON.parse, ...)
  accept: NaN and infinities become null.
* :func:`inside`: the one gate every path advfast creates, truncates, renames, chmods or deletes
  in an output folder goes through: a plain relative name, no ``..``, no symbolic link at any
  component, so nothing reaches outside the folder.
* :class:`OutputFolder`: a command's ``--out``.  A non-empty folder is refused unless
  ``overwrite``; even then only files that advfast wrote there (listed in
  ``.advfast-files.json``) are replaced or removed, and a foreign file that would be
  overwritten is refused by name.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterable

from advfast.errors import Busy, FolderRefused

TMP_SUFFIX = ".advfast-tmp"
RECORD = ".advfast-files.json"
LOCK = ".lock"


def plain_name(name: object) -> bool:
    """Whether ``name`` is a plain relative path: components separated by "/", none empty,
    "." or "..", no backslash or NUL, not absolute."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name \
            or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def inside(root: str, name: str) -> str:
    """``root/name``, refused (FolderRefused) unless ``name`` is a plain relative name (see
    :func:`plain_name`) and no component of it below ``root`` is a symbolic link: the path can
    then only reach a file inside ``root``."""
    if not plain_name(name):
        raise FolderRefused(f"{name!r} is not a plain name inside {root}; advfast only touches "
                            "files inside its output folder")
    path = root
    for part in name.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise FolderRefused(f"{path} is a symbolic link; advfast does not follow links in "
                                "its folders, so remove it or choose another folder")
    return path


def refuse_link(path: str) -> None:
    """FolderRefused if ``path`` is a symbolic link (written through, it would reach its
    target)."""
    if os.path.islink(path):
        raise FolderRefused(f"{path} is a symbolic link; advfast does not follow links in its "
                            "folders, so remove it or choose another folder")


def tmp_name(path: str) -> str:
    """The temporary name advfast writes ``path`` under."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TMP_SUFFIX}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: str, write: Callable[[str], None], mode: int = 0o644) -> None:
    """Calls ``write(tmp_path)``, fsyncs the file, gives it ``mode`` (less the umask), renames
    it to ``path`` and fsyncs the folder.  On any error the temporary file is removed and the
    error re-raised, so ``path`` is either the old file or the complete new one.  A symbolic
    link at ``path`` or at the temporary name is refused, never written through."""
    tmp = tmp_name(path)
    refuse_link(path)
    refuse_link(tmp)
    if os.path.lexists(tmp):
        os.remove(tmp)  # left by a killed run
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException:
        if os.path.lexists(tmp) and not os.path.islink(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def strict(obj: object) -> object:
    """``obj`` with every non-finite float replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: object, **kwargs) -> str:
    """Strict JSON text of ``obj`` (NaN and infinities as null)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj: object) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(dumps(obj, indent=1) + "\n")

    write_durably(path, dump)


class FolderLock:
    """The advisory lock on an output folder (``.lock``, flock), held for the run's life by
    every process of the run.  The first process takes it exclusively (so a live run, even one
    whose other ranks outlived their launcher, refuses it), notes who holds it, and then
    shares it with the run's other processes."""

    def __init__(self, out: str) -> None:
        self.path = os.path.join(out, LOCK)
        self._fd: int | None = None

    def acquire(self, first: bool) -> None:
        refuse_link(self.path)
        try:  # O_NOFOLLOW: a link planted between the check and the open is refused too
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:
                refuse_link(self.path)
            raise
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if first else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            self.release()
            raise Busy(f"another advfast run ({holder}) is using {os.path.dirname(self.path)}; "
                       "wait for it to finish or stop it first") from None
        if first:
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
            os.fsync(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # now shared with the run's other ranks

    def holder(self) -> str:
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            return os.read(self._fd, 200).decode(errors="replace").strip() or "unknown process"
        except OSError:
            return "unknown process"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def remove(self) -> None:
        """Releases the lock and removes its file (a finished command's folder keeps only its
        results); the file is unlinked while still held, so no other run can take it first."""
        if self._fd is not None:
            os.remove(self.path)
        self.release()


class OutputFolder:
    """The ``--out`` folder of ``table1``, ``attack``, ``toy`` and ``detect``'s tables: checked
    before any work, claimed (created and locked) once the inputs are known to be usable,
    written file by file, recorded at the end.

    ``produces`` names every file (relative path; a name ending in "/" stands for every file
    in that folder) the command may write.  :meth:`check` refuses a non-empty folder without
    ``overwrite``, and with it a file that advfast did not write, a damaged record or a
    symbolic link; nothing is touched then.  :meth:`claim` checks again, creates the folder
    and takes its lock (a second run on the same folder is refused while the first runs).
    Each new file replaces its old self atomically when written, and only :meth:`record`,
    once the run has succeeded, removes the previous run's files that this one did not write
    again.  :meth:`abandon` (after a failure) removes a folder that :meth:`claim` created if
    nothing was written in it.  Raises FolderRefused with a one-line message.
    """

    def __init__(self, path: str, produces: Iterable[str], overwrite: bool = False) -> None:
        self.path, self.produces, self.overwrite = path, list(produces), overwrite
        self.written: list[str] = []
        self.previous: set[str] = set()
        self.lock = FolderLock(path)
        self.created = False

    def check(self) -> None:
        refuse_link(self.path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise FolderRefused(f"output folder {self.path} is a file, not a folder")
        present = [n for n in sorted(os.listdir(self.path)) if n != LOCK] \
            if os.path.isdir(self.path) else []
        if present and not self.overwrite:
            raise FolderRefused(f"output folder {self.path} is not empty; pass overwrite=True to "
                                "replace advfast's files in it, or choose another out folder")
        self.previous = set(self._recorded())
        for name in self._present():
            if self._produced(name) and name not in self.previous:
                raise FolderRefused(f"{os.path.join(self.path, name)} was not written by "
                                    "advfast; it is left alone, so choose another out folder")

    def claim(self) -> None:
        self.check()
        self.created = not os.path.isdir(self.path)
        os.makedirs(self.path, exist_ok=True)
        self.lock.acquire(first=True)

    def abandon(self) -> None:
        """After a failed run: releases the lock, and removes the folder if :meth:`claim`
        made it and nothing else was written in it."""
        self.lock.release()
        if self.created and os.path.isdir(self.path) and set(os.listdir(self.path)) <= {LOCK}:
            if os.path.isfile(os.path.join(self.path, LOCK)):
                os.remove(os.path.join(self.path, LOCK))
            os.rmdir(self.path)

    def _produced(self, name: str) -> bool:
        return any(name == p or (p.endswith("/") and name.startswith(p)) for p in self.produces)

    def _present(self) -> list[str]:
        """Files now in the folder, relative, descending into the folders this command
        writes to; a symbolic link among them is refused."""
        found = []
        for p in self.produces:
            full = inside(self.path, p.rstrip("/"))
            if p.endswith("/") and os.path.isdir(full):
                found += [os.path.join(p, f) for f in os.listdir(full)]
            elif os.path.lexists(full):
                found.append(p)
        for name in found:
            refuse_link(os.path.join(self.path, name))
        return found

    def _recorded(self) -> list[str]:
        path = os.path.join(self.path, RECORD)
        refuse_link(path)
        if not os.path.isfile(path):
            return []
        try:
            with open(path) as f:
                names = json.load(f)["files"]
            if not all(plain_name(n) for n in names):
                raise ValueError("a name that is not a plain relative path")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FolderRefused(f"{path} is damaged ({err}); remove it or choose another "
                                "out folder") from err
        return [n for n in names if self._produced(n)]

    def file(self, name: str) -> str:
        """The full path of ``name`` (one of ``produces``), noted as written."""
        if not self._produced(name):
            raise ValueError(f"{name} is not one of this command's outputs")  # a bug
        path = inside(self.path, name)
        self.written.append(name)
        return path

    def record(self) -> None:
        """After a successful run: removes the previous run's files that this one did not write
        again, lists the files written, so a later ``--overwrite`` may replace them, and
        releases the lock."""
        for name in self.previous - set(self.written):
            full = inside(self.path, name)
            if os.path.isfile(full):
                os.remove(full)
        write_json(os.path.join(self.path, RECORD), {"files": sorted(set(self.written))})
        self.lock.remove()


def check_resumable(out: str, resume: bool, marker: str, command: str) -> bool:
    """For commands that continue a killed run (generate, detect): refuses a file, a non-empty
    folder without ``resume``, and a folder without ``marker`` (not this command's output:
    it is left alone).  Returns whether the folder holds a run to continue."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FolderRefused(f"output folder {out} is a file, not a folder")
    refuse_link(out)
    present = [n for n in os.listdir(out) if n != LOCK] if os.path.isdir(out) else []
    if present and not resume:
        raise FolderRefused(f"output folder {out} is not empty; pass resume=True to continue the "
                            "run in it, or choose another out folder")
    if present and not os.path.isfile(os.path.join(out, marker)):
        raise FolderRefused(f"{out} is not an advfast {command} output (no {marker}); it is left "
                            "alone, so choose another out folder")
    return bool(present)


def read_json_object(path: str, what: str) -> dict:
    """The JSON object in ``path``; FolderRefused naming ``what`` when it is damaged."""
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as err:
        raise FolderRefused(f"{path} is damaged or not advfast's ({type(err).__name__}); "
                            f"{what}") from err
    return saved


def first_difference(saved: dict, identity: dict) -> tuple[str, object, object] | None:
    """The first key of ``identity`` whose value (as strict JSON) differs in ``saved``:
    (key, saved value, new value), or None when they agree.  A resumed run must match the
    identity of the run it continues."""
    for key, value in json.loads(dumps(identity)).items():
        if saved.get(key) != value:
            return key, saved.get(key), value
    return None
