"""Disk space where the job writes: "no space left" in each form the libraries raise it, as DiskFullError naming
the path, the setting that points there, the free bytes and about how many the run needs there.

The forms, each seen on a real full tmpfs (tests/test_diskspace.py makes them):

    OSError errno 28 (ENOSPC) or 122 (EDQUOT)     open/write, shutil, s3transfer, huggingface_hub, datasets
    safetensors' SafetensorError                   "... No space left on device (os error 28) ..."
    tokenizers' Exception                          "No space left on device (os error 28)"
    torch.save's RuntimeError                      "... unexpected pos 576 vs 534" (torch 2.13), "PytorchStreamWriter
                                                   failed writing file ..." (older); no errno: read as a full disk
                                                   when a watched filesystem is nearly full (under NEARLY_FULL free)

Preflight registers where the run writes (`watch`), with an estimate of what it writes there; an error whose path
is unknown (torch's, tokenizers') is put on the fullest of those filesystems.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from job.errors import DiskFullError, JobError

ERRNOS = {errno.ENOSPC, errno.EDQUOT}
SIGNS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122", "storagefull")
# torch.save's stream writer drops the errno: "PytorchStreamWriter failed writing file ...", or (torch 2.13)
# "[enforce fail at inline_container.cc] . unexpected pos 576 vs 534" raised from "basic_ios::clear: iostream error"
WRITE_FAILED = ("failed writing file", "file write failed", "unexpected pos", "iostream error")
NEARLY_FULL = 16 * 2**20  # bytes: below this, a failed write with no errno is taken for a full disk


@dataclass(frozen=True)
class Location:
    """A directory the job writes under: `setting` (FT_WORK_DIR, FT_OUTPUT_URI, FT_CHECKPOINT_URI, HF_HOME, ...)
    is what points there, `value` its value; `need` (bytes) estimates what the run writes on that filesystem."""

    path: Path
    setting: str
    value: str
    need: int | None = None


_watched: list[Location] = []


def watch(locations: list[Location]) -> None:
    """The places later errors are matched against (replacing earlier ones)."""
    _watched[:] = locations


def watched() -> list[Location]:
    return list(_watched)


def existing(path: Path) -> Path | None:
    """`path`, or its nearest ancestor that exists (a directory not created yet is on its parent's filesystem)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged process may still write on the filesystem of `path`; None when it cannot be told."""
    found = existing(Path(path).absolute())
    try:
        return shutil.disk_usage(found).free if found else None
    except OSError:
        return None


def device(path: Path) -> int | None:
    """The filesystem (st_dev) of `path` or of its nearest existing ancestor."""
    found = existing(Path(path).absolute())
    try:
        return os.stat(found).st_dev if found else None
    except OSError:
        return None


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_full(e: BaseException, where: list[Location] | None = None) -> bool:
    """Whether `e` (or an exception it was raised from) says the disk is full. `where`: the places whose free
    space decides for torch's errno-less write failure (default: the watched ones)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in ERRNOS:
            return True
        text = str(x).lower()
        if any(sign in text for sign in SIGNS):
            return True
        if any(sign in text for sign in WRITE_FAILED):
            frees = [free_bytes(loc.path) for loc in (_watched if where is None else where)]
            if any(free is not None and free < NEARLY_FULL for free in frees):
                return True
    return False


def _paths(e: BaseException) -> list[Path]:
    return [Path(p) for x in _chain(e) if isinstance(x, OSError)
            for p in (x.filename2, x.filename) if isinstance(p, str | os.PathLike)]


def locate(e: BaseException, locations: list[Location]) -> tuple[Location, Path] | None:
    """The watched place the error happened in, and the path written: the deepest place holding a path the error
    names, else the place with the least free space."""
    for path in _paths(e):
        path = path.absolute()
        holding = [loc for loc in locations if path.is_relative_to(loc.path.absolute())]
        if holding:
            return max(holding, key=lambda loc: len(loc.path.absolute().parts)), path
    known = [(free, loc) for loc in locations if (free := free_bytes(loc.path)) is not None]
    if not known:
        return None
    loc = min(known, key=lambda pair: pair[0])[1]
    return loc, loc.path


def error_for(e: BaseException, location: Location | None = None) -> DiskFullError | None:
    """DiskFullError for a disk-full `e`, at `location` (default: the watched place it happened in); None when `e`
    is something else."""
    if isinstance(e, DiskFullError):
        return e
    places = [location] if location else watched()
    if not is_full(e, places):
        return None
    found = locate(e, places)
    if found is None:
        paths = _paths(e)
        where = paths[0] if paths else Path("(unknown path)")
        return DiskFullError(where, "the filesystem", where, free_bytes(where))
    loc, path = found
    return DiskFullError(path, loc.setting, loc.value, free_bytes(loc.path), loc.need)


@contextmanager
def guard(location: Location | None = None) -> Iterator[None]:
    """Raise DiskFullError for a disk-full failure in the block (at `location`, or where it happened among the
    watched places); other exceptions pass unchanged."""
    try:
        yield
    except JobError:
        raise
    except Exception as e:
        if (full := error_for(e, location)) is not None:
            raise full from None
        raise
