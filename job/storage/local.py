"""A directory on a local or mounted filesystem."""

from __future__ import annotations

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
