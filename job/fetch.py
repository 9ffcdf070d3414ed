"""Bring the base model and the dataset to local disk, and say exactly which version was used."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from job import distributed, log
from job.config import Settings
from job.errors import ConfigError, InputError, UnavailableError, first_line
from job.storage import HubStorage, Storage, StorageError, open_source
from job.storage.base import file_sha256
from job.storage.uri import local_path, scheme

MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "tokenizer*"]
TOKENIZER_FILES = [p for p in MODEL_FILES if p != "*.safetensors"]  # the configuration and tokenizer, no weights
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DATA_FILES = [f"*{ext}" for ext in DATA_BUILDERS] + [f"**/*{ext}" for ext in DATA_BUILDERS] + ["README.md"]


@dataclass
class Fetched:
    """A source on local disk and its identity: a Hub commit, or a content hash for local files."""

    uri: str
    path: Path
    _revision: str | Future[str] | None  # None: not computed in this process (rank 0 alone writes the manifest)

    @property
    def revision(self) -> str | None:
        if not isinstance(self._revision, Future):
            return self._revision
        try:
            return self._revision.result()
        except OSError as e:
            # The files were read for training; only their fingerprint is lost (one vanished or became unreadable).
            log.get().warning("could not hash the source's files", uri=self.uri, error=first_line(e))
            return f"unknown ({first_line(e)})"


def fetch_model(cfg: Settings) -> Fetched:
    source = open_source(cfg.base_model, "FT_BASE_MODEL", "model", cfg.model_revision)
    patterns = MODEL_FILES + (["*.py"] if cfg.trust_remote_code else [])  # the model's own code, when trusted
    path = _fetch(source, "FT_BASE_MODEL", cfg.work_dir / "model", patterns)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InputError(f"FT_BASE_MODEL={cfg.base_model}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise InputError(
            f"FT_BASE_MODEL={cfg.base_model}: no *.safetensors weights; weights load from safetensors only "
            "(pickled .bin files can run code)"
        )
    return Fetched(cfg.base_model, path, _revision(source, path))


def fetch_tokenizer(cfg: Settings) -> Path:
    """FT_BASE_MODEL's configuration and tokenizer files without its weights (`finetune-job check --data`), into the
    cache fetch_model fills and later completes. Returns their local directory; raises as fetch_model does."""
    source = open_source(cfg.base_model, "FT_BASE_MODEL", "model", cfg.model_revision)
    patterns = TOKENIZER_FILES + (["*.py"] if cfg.trust_remote_code else [])
    return _fetch(source, "FT_BASE_MODEL", cfg.work_dir / "model", patterns)


def model_name(cfg: Settings) -> str:
    """FT_BASE_MODEL as a loader on another machine names it: a Hub id for `hf://org/name` (transformers and peft do
    not read `hf://`), the path for a `file:` URI, else the value as given (a Hub id, an S3 URI, a local path).
    Never the local copy's path (a cache snapshot), which exists on this machine only."""
    uri = cfg.base_model
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://").strip("/").removeprefix("models/")
    if scheme(uri) == "file":
        return str(local_path(uri))
    return uri


def fetch_dataset(cfg: Settings) -> Fetched:
    source = open_source(cfg.dataset, "FT_DATASET", "dataset", cfg.dataset_revision)
    path = _fetch(source, "FT_DATASET", cfg.work_dir / "dataset", DATA_FILES)
    check_data_file(cfg.dataset, path)
    return Fetched(cfg.dataset, path, _dataset_revision(source, path))


def check_data_file(dataset: str, path: Path) -> None:
    """Raise ConfigError (exit 2) when FT_DATASET (`dataset`, as set) is one file at `path` of a type that is not
    read (only .jsonl, .json, .csv, .parquet); a directory is filtered by DATA_FILES instead. Preflight calls it on
    a local file, fetching on every file."""
    if path.is_file() and path.suffix not in DATA_BUILDERS:
        raise ConfigError([f"FT_DATASET={dataset}: unsupported file type {path.suffix or '(none)'}; "
                           f"valid: {', '.join(DATA_BUILDERS)}"])


@contextmanager
def source_errors(source: Storage, setting: str):
    """Turn the ways a source can fail into InputError (exit 3: missing, denied) or UnavailableError (exit 8:
    unreachable after retries, worth retrying later), naming the setting."""
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"{setting}={source.uri}"
    # A bare org/name that is no local path is read as a Hub id; say so, in case a path was meant
    hint = f" (read as a Hub id: there is no {source.uri} under {Path.cwd()})" \
        if isinstance(source, HubStorage) and "://" not in source.uri else ""
    try:
        yield
    except RevisionNotFoundError:
        raise InputError(f"{where}: revision {getattr(source, 'revision', None)!r} not found") from None
    except GatedRepoError:
        raise InputError(f"{where}: gated repository; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise InputError(f"{where}: repository not found, or private and HF_TOKEN lacks access{hint}") from None
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        error = InputError if constants.HF_HUB_OFFLINE else UnavailableError
        raise error(f"{where}: not in the local cache and the Hub is unreachable ({first_line(e)}){hint}") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None) if getattr(e, "response", None) is not None else None
        error = UnavailableError if status is not None and (status >= 500 or status == 429) else InputError
        raise error(f"{where}: the Hub answered {first_line(e)}") from None
    except PermissionError as e:
        raise InputError(f"{where}: permission denied: {e.filename or source.uri} cannot be read by UID "
                         f"{os.getuid()} (GID {os.getgid()}); make it readable to that user or group") from None
    except network_errors() as e:  # the Hub unreachable after huggingface_hub's own retries: worth a later retry
        from huggingface_hub import constants

        raise UnavailableError(f"{where}: the Hub could not be reached at {constants.ENDPOINT} (HF_ENDPOINT) "
                               f"({type(e).__name__}: {first_line(e)}){hint}") from None
    except StorageError as e:  # S3: access denied, no such bucket or key (final), or unreachable (retriable)
        raise (UnavailableError if e.retriable else InputError)(f"{where}: {e}") from None
    except FileNotFoundError as e:
        raise InputError(f"{where}: {e}") from None


def network_errors() -> tuple[type[BaseException], ...]:
    """The transport failures (no route, DNS, timeouts, dropped connections) of the HTTP client huggingface_hub
    uses: httpx2 (huggingface_hub 2.x), httpx (1.x), requests (older); and the built-in ConnectionError."""
    import importlib

    found: list[type[BaseException]] = [ConnectionError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _fetch(source: Storage, setting: str, cache: Path, patterns: list[str]) -> Path:
    with source_errors(source, setting):
        path = source.fetch(cache, patterns)
    if not path.exists():
        raise InputError(f"{setting}={source.uri}: no such file or directory")
    log.get().info("source ready", setting=setting, uri=source.uri, path=str(path))
    return path


def _dataset_revision(source: Storage, path: Path) -> str | None:
    """The dataset's Hub commit, else a sha256 of its files, computed now (rank 0 only): it is also the data
    fingerprint that checkpoints carry and a resume compares, and datasets are small next to a model. A file
    downloaded from S3 is hashed too, rather than its ETag taken: the ETag of a multipart upload depends on the
    uploader's part size, so the same data uploaded again would read as changed."""
    if isinstance(source, HubStorage) and source.commit:
        return source.commit
    if not distributed.is_main():
        return None
    try:
        return "sha256:" + content_hash(path)
    except OSError as e:
        raise InputError(f"FT_DATASET={source.uri}: cannot be read ({first_line(e)})") from None


def _revision(source: Storage, path: Path) -> str | Future[str] | None:
    if isinstance(source, HubStorage) and source.commit:
        return source.commit
    if not distributed.is_main():
        return None
    # Hashing a 7B model's 13 GB takes ~10 s: it runs beside loading and training, in a daemon thread (an early exit
    # does not wait for it), and the manifest waits for it.
    future: Future[str] = Future()

    def work() -> None:
        try:
            future.set_result("sha256:" + content_hash(path))
        except BaseException as e:  # noqa: BLE001 -- handed to whoever reads the revision
            future.set_exception(e)

    threading.Thread(target=work, name="content-hash", daemon=True).start()
    return future


def content_hash(path: Path) -> str:
    """One sha256 over every file's relative path and content, in a stable order."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        digest.update(f.relative_to(path.parent if path.is_file() else path).as_posix().encode() + b"\0")
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()
