"""A model or dataset repository on the Hugging Face Hub (or a mirror at HF_ENDPOINT): a source, or a destination
that receives each run as one commit.

huggingface_hub reads HF_TOKEN, HF_HOME and HF_ENDPOINT itself; nothing here handles a credential.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from job import log
from job.storage.base import CHECK_DEADLINE_SECONDS, CHECK_TIMEOUT_SECONDS, Storage, StorageError, StorageOptions

MANIFEST = "manifest.json"  # publish's commit marker; on the Hub the commit itself is the atomic unit


_timeout: float | None = None  # of every request huggingface_hub sends, as set_timeout last set it
_deadline: float | None = None  # time.monotonic() after which no request is sent (within a `timeout` block)


class HubDeadline(ConnectionError):
    """Raised before a request once a start-up check's deadline has passed (huggingface_hub retries timeouts on its
    own, up to 5 times with waits: without it a silent endpoint holds one check for minutes)."""


def set_timeout(seconds: float | None) -> None:
    """Bound huggingface_hub's requests: `seconds` to connect and for each read and write. Its shared HTTP client
    has no timeout, and most HfApi calls pass `timeout=None`, so a silent endpoint would hang the job: a request
    hook puts `seconds` in place of every missing timeout (hf_hub_download's own, HF_HUB_ETAG_TIMEOUT and
    HF_HUB_DOWNLOAD_TIMEOUT, stay). Process-wide; None removes the bound."""
    global _timeout
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    if seconds == _timeout:
        return
    base = _http.default_client_factory

    def bound(request) -> None:
        if _deadline is not None and time.monotonic() > _deadline:
            raise HubDeadline(f"no answer from {request.url.scheme}://{request.url.netloc.decode()} within the "
                              "start-up check's bound")
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: seconds if given.get(k) is None else given[k]
                                         for k in ("connect", "read", "write", "pool")}

    def factory():
        client = base()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), bound]}
        return client

    set_client_factory(factory)  # closes the current client: the next request gets a bounded one
    _timeout = seconds


@contextmanager
def timeout(seconds: float | None, deadline_seconds: float | None = None) -> Iterator[None]:
    """Within the block: requests time out after `seconds` (None: as they are), and none is sent once
    `deadline_seconds` have passed (HubDeadline). The previous bounds after it."""
    global _deadline
    previous, previous_deadline = _timeout, _deadline
    if seconds is None:
        yield
        return
    set_timeout(seconds)
    _deadline = time.monotonic() + deadline_seconds if deadline_seconds else None
    try:
        yield
    finally:
        _deadline = previous_deadline
        set_timeout(previous)


class HubStorage(Storage):
    def __init__(self, uri: str, repo_id: str, repo_type: str = "model", revision: str | None = None):
        super().__init__(uri)
        self.repo_id, self.repo_type, self.revision = repo_id, repo_type, revision
        self.commit: str | None = None  # the resolved commit, once fetched
        self.check_timeout: float | None = None  # set by for_checks: the timeout of this store's requests

    def for_checks(self) -> HubStorage:
        checks = copy.copy(self)
        checks.check_timeout = min(CHECK_TIMEOUT_SECONDS, _timeout or CHECK_TIMEOUT_SECONDS)
        return checks

    def list(self, prefix: str = "") -> list[str]:
        from huggingface_hub import HfApi

        with timeout(self.check_timeout, CHECK_DEADLINE_SECONDS):
            files = HfApi().list_repo_files(self.repo_id, repo_type=self.repo_type, revision=self.revision)
        return sorted(f for f in files if f.startswith(prefix))

    def exists(self, key: str) -> bool:
        from huggingface_hub import file_exists

        with timeout(self.check_timeout, CHECK_DEADLINE_SECONDS):
            return file_exists(self.repo_id, key, repo_type=self.repo_type, revision=self.revision)

    def get(self, key: str, dest: Path) -> Path:
        from huggingface_hub import hf_hub_download

        with timeout(self.check_timeout, CHECK_DEADLINE_SECONDS):
            cached = hf_hub_download(self.repo_id, key, repo_type=self.repo_type, revision=self.revision,
                                     **({"etag_timeout": self.check_timeout} if self.check_timeout else {}))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, dest)
        return dest

    def put(self, src: Path, key: str) -> None:
        raise NotImplementedError("a Hub source is read-only; a destination is opened with open_destination")

    def delete(self, key: str) -> None:
        raise NotImplementedError("a Hub source is read-only; a destination is opened with open_destination")

    def fetch(self, cache: Path, patterns: list[str] | None = None) -> Path:
        """Download into HF_HOME's cache (shared between runs and pods) and return the snapshot directory."""
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(
            self.repo_id, repo_type=self.repo_type, revision=self.revision, allow_patterns=patterns
        ))
        self.commit = path.name  # snapshots/<commit sha>
        return path


def repo_path(rel: str, run_id: str) -> str | None:
    """Where a run's file goes in a Hub model repository, as the Hub's conventions have it: the adapter and the
    tokenizer at the root (`PeftModel.from_pretrained("org/name")`, `AutoTokenizer.from_pretrained("org/name")`),
    the model card as the repository's README, TensorBoard logs under `runs/<run id>/` (the Hub's metrics tab
    reads them there). None for peft's placeholder card, which the model card replaces."""
    if rel == "adapter/README.md":
        return None
    top, _, rest = rel.partition("/")
    if top in ("adapter", "tokenizer"):
        return rest
    if top == "tensorboard":
        return f"runs/{run_id}/{rest}".rstrip("/")
    return rel


class HubDestination(HubStorage):
    """A model repository that receives runs. A run is one commit of every file, its manifest included (with the
    files' repository paths); the repository's history keeps the earlier runs."""

    versioned = True
    live_sync = False  # every upload is a commit: TensorBoard logs go with the results

    def __init__(self, uri: str, repo_id: str, options: StorageOptions):
        super().__init__(uri, repo_id, "model", options.hub_revision)
        self.options = options
        if options.checking:
            self.check_timeout = options.storage_timeout_seconds

    def for_checks(self) -> HubDestination:
        return HubDestination(self.uri, self.repo_id, self.options.for_checks())

    def describe(self, key: str = "") -> str:
        path = self._path(key)
        return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "") + (f"/{path}" if path else "")

    def _path(self, key: str) -> str | None:
        run, _, rel = key.partition("/")
        return repo_path(rel, run) if rel else ""

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """huggingface_hub's failures as StorageError: what a retry cannot fix (401, 403, 404, no token) is final."""
        from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

        try:
            yield
        except StorageError:
            raise
        except LocalTokenNotFoundError:
            raise StorageError(f"{what}: no Hugging Face token; set HF_TOKEN to a token that can write to "
                               f"{self.repo_id}", retriable=False) from None
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            answer = f"the Hub answered {status} ({' '.join(str(e).split())[:200]})"
            if status in (401, 403, 404):
                raise StorageError(f"{what}: {answer}; HF_TOKEN must be valid and allowed to write to {self.repo_id}",
                                   retriable=False) from None
            raise StorageError(f"{what}: {answer}", retriable=status >= 500 or status in (408, 429)) from None
        except ValueError as e:  # a malformed answer, or a card the Hub rejects: the same again next time
            raise StorageError(f"{what}: {' '.join(str(e).split())[:300]}", retriable=False) from None
        except Exception as e:  # noqa: BLE001 - the network: httpx errors, and LFS upload failures wrapping them
            from huggingface_hub import constants

            raise StorageError(f"{what}: {type(e).__name__}: {' '.join(str(e).split())[:300]} (the Hub at "
                               f"{constants.ENDPOINT}, HF_ENDPOINT)") from None

    def _root_manifest(self) -> dict | None:
        """The manifest of the run now at the repository's root (at FT_HUB_REVISION), if any."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        with self._errors(f"reading {self.describe()}"), timeout(self.check_timeout, CHECK_DEADLINE_SECONDS):
            try:
                return json.loads(Path(hf_hub_download(
                    self.repo_id, MANIFEST, revision=self.revision,
                    **({"etag_timeout": self.check_timeout} if self.check_timeout else {}))).read_text())
            except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
                return None

    def exists(self, key: str) -> bool:
        """A run's file exists when the run at the root is that run and its manifest lists the file."""
        run, _, rel = key.partition("/")
        manifest = self._root_manifest() or {}
        return manifest.get("run_id") == run and (rel == MANIFEST or self._path(key) in manifest.get("files", {}))

    def probe_write(self, key: str) -> None:
        """Prove write access without a commit: the token is valid and not read-only, and the repository (and the
        branch) exists or is created now, private unless FT_HUB_PRIVATE=false."""
        from huggingface_hub import HfApi

        what = f"writing to {self.describe()}"
        api = HfApi()
        with self._errors(what), timeout(self.check_timeout, CHECK_DEADLINE_SECONDS):
            role = api.whoami().get("auth", {}).get("accessToken", {}).get("role")
            if role == "read":
                raise StorageError(f"{what}: HF_TOKEN is a read-only token; a write token is needed", retriable=False)
            api.create_repo(self.repo_id, private=self.options.hub_private, exist_ok=True)
            if self.revision:
                api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        log.get().info("hub repository ready", uri=self.describe(), private_if_new=self.options.hub_private)

    def put(self, src: Path, key: str) -> None:
        from huggingface_hub import HfApi

        path = self._path(key)
        if path:
            with self._errors(f"uploading {self.describe(key)}"):
                HfApi().upload_file(path_or_fileobj=str(src), path_in_repo=path, repo_id=self.repo_id,
                                    revision=self.revision, commit_message=f"finetune-job: {path}")

    def delete(self, key: str) -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import EntryNotFoundError

        path = self._path(key)
        with self._errors(f"deleting {self.describe(key)}"):
            try:
                HfApi().delete_file(path, self.repo_id, revision=self.revision, commit_message=f"finetune-job: {path}")
            except EntryNotFoundError:
                pass

    def put_run(self, stage: Path, prefix: str, marker: str) -> None:
        """One commit: every file at its repository path, the manifest with those paths, and the removal of the
        files the previous run at the root had and this one has not. Retried on network failures and 5xx answers
        within FT_STORAGE_ATTEMPTS and FT_STORAGE_DEADLINE_SECONDS; a retry of a commit that did land is a no-op."""
        from huggingface_hub import HfApi

        manifest = json.loads((stage / marker).read_text())
        files = {rel: path for rel in manifest["files"] if (path := repo_path(rel, prefix))}
        manifest["files"] = {files[rel]: entry for rel, entry in manifest["files"].items() if rel in files}
        card = json.dumps(manifest, indent=2).encode() + b"\n"
        what = f"committing run {prefix} to {self.describe()}"
        deadline, pause = time.monotonic() + self.options.storage_deadline_seconds, 1.0
        for attempt in range(1, self.options.storage_attempts + 1):
            try:
                with self._errors(what):
                    stale = self._stale_paths(set(manifest["files"]))
                    commit = HfApi().create_commit(
                        self.repo_id, self._operations(stage, files, card, marker, stale), revision=self.revision,
                        commit_message=f"finetune-job run {prefix}",
                        commit_description=f"Adapter, tokenizer, model card, {marker} and TensorBoard logs "
                                           f"(runs/{prefix}/) of the run {prefix}.")
                break
            except StorageError as e:
                if not e.retriable or attempt == self.options.storage_attempts or time.monotonic() + pause > deadline:
                    raise
                log.get().warning("hub commit failed; retrying", attempt=attempt, error=str(e), pause_s=pause)
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
        self._verify_commit(commit.oid, manifest["files"])
        log.get().info("hub commit", uri=self.describe(), commit=commit.oid, url=commit.commit_url)

    @staticmethod
    def _operations(stage: Path, files: dict[str, str], card: bytes, marker: str, stale: set[str]) -> list:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        ops = [CommitOperationDelete(path) for path in sorted(stale)]
        ops += [CommitOperationAdd(path, str(stage / rel)) for rel, path in files.items()]
        return ops + [CommitOperationAdd(marker, card)]

    def _stale_paths(self, keep: set[str]) -> set[str]:
        """Files of the previous run at the root that this run does not write (its TensorBoard logs stay)."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        previous = self._root_manifest() or {}
        try:
            present = set(HfApi().list_repo_files(self.repo_id, revision=self.revision))
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return set()
        return {p for p in previous.get("files", {}) if p in present and p not in keep and not p.startswith("runs/")}

    def _verify_commit(self, commit: str, files: dict[str, dict]) -> None:
        """The commit holds every file with its size, and its sha256 where the Hub keeps one (LFS files)."""
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        with self._errors(f"checking the commit {commit} of {self.describe()}"):
            tree = {f.path: f for f in HfApi().list_repo_tree(self.repo_id, revision=commit, recursive=True)
                    if isinstance(f, RepoFile)}
        for path, expected in files.items():
            found = tree.get(path)
            sha256 = found.lfs.sha256 if found is not None and found.lfs else None
            if found is None or found.size != expected["bytes"] or sha256 not in (None, expected["sha256"]):
                raise StorageError(f"hf://{self.repo_id}/{path} at {commit} does not match the manifest: "
                                   f"{'missing' if found is None else f'{found.size} bytes, sha256 {sha256}'}")
