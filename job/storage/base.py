"""The one interface every source and destination implements, addressed by URI."""

from __future__ import annotations

import abc
from pathlib import Path


class Storage(abc.ABC):
    """A tree of files under one URI. Keys are `/`-separated paths relative to that root."""

    def __init__(self, uri: str):
        self.uri = uri

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys of every file under `prefix`, sorted."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the file `key` exists."""

    @abc.abstractmethod
    def get(self, key: str, dest: Path) -> Path:
        """Copy the file `key` to `dest` and return `dest`."""

    @abc.abstractmethod
    def put(self, src: Path, key: str) -> None:
        """Write the local file `src` as `key`, atomically: readers see the old file or the whole new one."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the file `key`; a missing file is not an error."""

    def delete_tree(self, prefix: str) -> None:
        for key in self.list(prefix):
            self.delete(key)

    def probe_write(self, key: str) -> None:
        """Prove write access with a real write (and removal) of a small file at `key`."""
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".probe") as f:
            f.write("finetune-job write probe\n")
            f.flush()
            self.put(Path(f.name), key)
        self.delete(key)

    def fetch(self, cache: Path, patterns: list[str] | None = None) -> Path:
        """Make the whole tree (or the files matching `patterns`) available locally and return its directory."""
        from fnmatch import fnmatch

        for key in self.list():
            if patterns is None or any(fnmatch(key, p) for p in patterns):
                self.get(key, cache / key)
        return cache

    def put_tree(self, src: Path, prefix: str = "", skip: set[str] | None = None) -> list[str]:
        """Write every file under `src` to `prefix/<relative path>`, except relative paths in `skip`."""
        written = []
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src).as_posix()
            if skip and rel in skip:
                continue
            key = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
            self.put(path, key)
            written.append(key)
        return written

    def describe(self, key: str = "") -> str:
        """The URI of `key`, for messages."""
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri
