"""A directory on a local or mounted filesystem."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from job import diskspace
from job.errors import DiskFullError
from job.storage.base import Storage, file_sha256
from job.storage.uri import local_path


class LocalStorage(Storage):
    def __init__(self, uri: str, setting: str = "FT_OUTPUT_URI"):
        super().__init__(uri)
        self.root = local_path(uri)
        self.setting = setting  # what points here, for a message when its disk is full

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), dest)
        return dest

    def put(self, src: Path, key: str) -> None:
        dest = self._path(key)
        for attempt in range(3):  # another process's delete() may remove the emptied folder in between
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        os.close(fd)
        try:
            with diskspace.guard(self.place(src)):
                shutil.copyfile(src, tmp)
                # mkstemp makes the file 0600; a file written in place would have had the process umask's mode, which
                # is what another reader of the volume (a serving pod with another UID) expects.
                os.chmod(tmp, 0o666 & ~process_umask())
                os.replace(tmp, dest)
        except DiskFullError as e:
            Path(tmp).unlink(missing_ok=True)
            # Named by the file it was to be, with what is free once the partial copy is gone.
            raise DiskFullError(dest, e.setting, e.value, diskspace.free_bytes(dest.parent), e.need) from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def place(self, src: Path | None = None) -> diskspace.Location:
        """This store as a place that can run out of space: as preflight watches it (with its estimate), else as
        itself, needing at least `src`'s size."""
        root = self.root.absolute()
        for place in diskspace.watched():
            if root.is_relative_to(place.path.absolute()):
                return place
        return diskspace.Location(self.root, self.setting, self.uri, src.stat().st_size if src else None)

    def check_readable(self) -> None:
        """Raise PermissionError (its `filename` the path) for the first file under the root this process cannot read,
        or folder it cannot list: otherwise such a file is skipped by a listing or reported as missing by a loader."""
        if not self.root.exists():  # raises PermissionError itself when a parent folder cannot be searched
            return
        if self.root.is_file():
            _readable(self.root, os.R_OK)
            return
        _readable(self.root, os.R_OK | os.X_OK)
        for parent, folders, files in os.walk(self.root):
            for name in folders:
                _readable(Path(parent, name), os.R_OK | os.X_OK)
            for name in files:
                _readable(Path(parent, name), os.R_OK)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        # Like an object store, leave no empty folders behind, the root's included.
        parent = self._path(key).parent
        while parent.is_relative_to(self.root) and parent.is_dir() and not any(parent.iterdir()):
            try:
                parent.rmdir()
            except OSError:  # another process wrote into it meanwhile
                return
            parent = parent.parent

    def stat(self, key: str) -> tuple[int | None, str | None]:
        path = self._path(key)
        if not path.is_file():
            return None, None
        return path.stat().st_size, file_sha256(path)

    def fetch(self, cache: Path, patterns: list[str] | None = None) -> Path:
        # Already local: read it in place rather than copying gigabytes of weights.
        return self.root


def _readable(path: Path, mode: int) -> None:
    if not os.access(path, mode):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def process_umask() -> int:
    """This process's umask (e.g. 0o022), read without changing it where Linux tells it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way, set and restored at once
    os.umask(mask)
    return mask
