"""Writing results safely: durable files, strict JSON, and output folders that never lose or
overwrite what advfast did not write.

* :func:`write_durably`: a temporary name (``.NAME.advfast-tmp``), flush, fsync, rename, fsync
  the folder; on any error the temporary file is removed.
* :func:`strict` / :func:`dumps`: JSON that strict readers (JavaScript's JSON.parse, ...)
  accept: NaN and infinities become null.
* :class:`OutputFolder`: a command's ``--out``.  A non-empty folder is refused unless
  ``overwrite``; even then only files that advfast wrote there (listed in
  ``.advfast-files.json``) are replaced or removed, and a foreign file that would be
  overwritten is refused by name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable

from advfast.errors import FolderRefused

TMP_SUFFIX = ".advfast-tmp"
RECORD = ".advfast-files.json"


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
    error re-raised, so ``path`` is either the old file or the complete new one."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException:
        if os.path.exists(tmp):
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


class OutputFolder:
    """The ``--out`` folder of ``table1`` / ``attack``: claimed before any work, written file by
    file, recorded at the end.

    ``produces`` names every file (relative path; a name ending in "/" stands for every file
    in that folder) the command may write.  :meth:`claim` (before any work) refuses a non-empty
    folder without ``overwrite``, and with it a file that advfast did not write; nothing is
    removed then.  Each new file replaces its old self atomically when written, and only
    :meth:`record`, once the run has succeeded, removes the previous run's files that this one
    did not write again (old figures beside a new table).  Raises FolderRefused with a
    one-line message.
    """

    def __init__(self, path: str, produces: Iterable[str], overwrite: bool = False) -> None:
        self.path, self.produces, self.overwrite = path, list(produces), overwrite
        self.written: list[str] = []
        self.previous: set[str] = set()

    def claim(self) -> None:
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise FolderRefused(f"--out {self.path} is a file, not a folder")
        present = sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
        if present and not self.overwrite:
            raise FolderRefused(f"output folder {self.path} is not empty; pass --overwrite to "
                             "replace advfast's files in it, or choose another --out")
        self.previous = set(self._recorded())
        for name in self._present():
            if self._produced(name) and name not in self.previous:
                raise FolderRefused(f"{os.path.join(self.path, name)} was not written by "
                                 "advfast; it is left alone, so choose another --out")
        os.makedirs(self.path, exist_ok=True)
        probe = os.path.join(self.path, ".advfast-write-test" + TMP_SUFFIX)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)

    def _produced(self, name: str) -> bool:
        return any(name == p or (p.endswith("/") and name.startswith(p)) for p in self.produces)

    def _present(self) -> list[str]:
        """Files now in the folder, relative, descending into the folders this command
        writes to."""
        found = []
        for p in self.produces:
            full = os.path.join(self.path, p)
            if p.endswith("/") and os.path.isdir(full):
                found += [os.path.join(p, f) for f in os.listdir(full)]
            elif os.path.lexists(full):
                found.append(p)
        return found

    def _recorded(self) -> list[str]:
        path = os.path.join(self.path, RECORD)
        if not os.path.isfile(path):
            return []
        try:
            with open(path) as f:
                names = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise FolderRefused(f"{path} is damaged ({err}); remove it or choose another "
                             "--out") from err
        return [n for n in names if isinstance(n, str) and self._produced(n)]

    def file(self, name: str) -> str:
        """The full path of ``name`` (one of ``produces``), noted as written."""
        if not self._produced(name):
            raise FolderRefused(f"{name} is not one of this command's outputs")
        self.written.append(name)
        return os.path.join(self.path, name)

    def record(self) -> None:
        """After a successful run: removes the previous run's files that this one did not write
        again, and lists the files written, so a later ``--overwrite`` may replace them."""
        for name in self.previous - set(self.written):
            full = os.path.join(self.path, name)
            if os.path.isfile(full):
                os.remove(full)
        write_json(os.path.join(self.path, RECORD), {"files": sorted(set(self.written))})


def check_resumable(out: str, resume: bool, marker: str, command: str) -> bool:
    """For commands that continue a killed run (generate, detect): refuses a file, a non-empty
    folder without ``resume``, and a folder without ``marker`` (not this command's output:
    it is left alone).  Returns whether the folder holds a run to continue."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FolderRefused(f"--out {out} is a file, not a folder")
    present = [n for n in os.listdir(out) if n != ".lock"] if os.path.isdir(out) else []
    if present and not resume:
        raise FolderRefused(f"output folder {out} is not empty; pass --resume to continue the run "
                         "in it, or choose another --out")
    if present and not os.path.isfile(os.path.join(out, marker)):
        raise FolderRefused(f"{out} is not an advfast {command} output (no {marker}); it is left "
                         "alone, so choose another --out")
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
