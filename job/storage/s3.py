"""An S3 bucket, or an S3-compatible store (MinIO, Ceph, R2), under `s3://bucket/prefix`.

Credentials, region and endpoint come from boto3's own chain: environment keys, shared config and credentials
files, web identity (IRSA), container and instance profiles; `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` point it
at another store. botocore reads the region from `AWS_DEFAULT_REGION` and the config file only, so `AWS_REGION`
(what the other AWS SDKs and EKS set) is passed on when those give none.

Every transfer goes through s3transfer's manager (parallel, multipart above `multipart_bytes`), every request
through botocore's standard retry mode (backoff on throttling, 5xx, timeouts and dropped connections) with
connect/read timeouts, and a whole operation through a deadline after which no request is sent or retried.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

from job import log
from job.storage.base import Storage, StorageError, StorageOptions

BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
CACHE_INDEX = ".s3-index.json"
CONCURRENCY = 8
NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
# Answers a retry cannot change; S3 answers 403 to a HEAD without a code, and to a missing key without ListBucket.
FINAL = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
         "InvalidToken", "NoSuchBucket", "InvalidBucketName", "AccountProblem", "AuthorizationHeaderMalformed",
         "PermanentRedirect", "InvalidRequest", "NotImplemented"}


class DeadlineExceeded(Exception):
    """Raised inside botocore, before a request is sent, once the operation's deadline has passed."""


def parse_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); ValueError for a malformed one."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not BUCKET.match(bucket):
        raise ValueError(f"{bucket!r} is not a bucket name (3-63 lowercase letters, digits, dots and hyphens)")
    return bucket, prefix.strip("/")


class S3Storage(Storage):
    def __init__(self, uri: str, options: StorageOptions | None = None):
        super().__init__(uri)
        self.bucket, self.prefix = parse_uri(uri)
        self.options = options or StorageOptions()
        self._session = None
        self._lock = threading.Lock()
        self.endpoint: str | None = None  # once a client exists: the URL requests go to, for messages

    # --- keys -----------------------------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}".rstrip("/")

    # --- clients --------------------------------------------------------------------------------------------------
    def _client(self, deadline: float):
        """A client whose requests stop (DeadlineExceeded) once `deadline` (time.monotonic) has passed. The session
        is shared, so credentials (an STS web-identity exchange, say) are resolved once."""
        import boto3
        from botocore.config import Config

        o = self.options
        config = Config(
            connect_timeout=o.storage_timeout_seconds, read_timeout=o.storage_timeout_seconds,
            retries={"total_max_attempts": o.storage_attempts, "mode": "standard"},
            max_pool_connections=CONCURRENCY + 2, user_agent_extra="finetune-job",
        )
        with self._lock:  # a boto3 session is not thread-safe; TensorBoard sync uploads from its own thread
            if self._session is None:
                self._session = boto3.session.Session()
            region = self._session.region_name or os.environ.get("AWS_REGION")
            client = self._session.client("s3", region_name=region, config=config)
            self.endpoint = client.meta.endpoint_url

        def check_deadline(**_):
            if time.monotonic() > deadline:
                raise DeadlineExceeded()

        client.meta.events.register_first("before-send.s3", check_deadline)
        return client

    def for_checks(self) -> S3Storage:
        checks = copy.copy(self)  # the same session and lock
        checks.options = self.options.for_checks()
        return checks

    def bounded(self, seconds: float) -> S3Storage:
        bounded = copy.copy(self)  # the same session and lock
        bounded.options = dataclasses.replace(self.options, storage_deadline_seconds=seconds)
        return bounded

    def _deadline(self) -> float:
        return time.monotonic() + self.options.storage_deadline_seconds

    def _call(self, what: str, fn: Callable):
        """Run `fn(client)` under the operation deadline, with botocore's errors as StorageError."""
        try:
            return fn(self._client(self._deadline()))
        except Exception as e:  # noqa: BLE001 - translated, or re-raised when not a transfer error
            raise self._error(e, what) from None

    def _transfer(self, what: str, jobs: list[Callable]) -> None:
        """Submit `jobs` (submit(manager) -> future) to one transfer manager and wait for all of them, within the
        deadline. The first failure cancels the rest."""
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        if not jobs:
            return
        deadline = self._deadline()
        size = self.options.multipart_bytes
        config = TransferConfig(multipart_threshold=size, multipart_chunksize=size, max_concurrency=CONCURRENCY,
                                num_download_attempts=self.options.storage_attempts)
        try:
            # Leaving the block on an exception cancels what is still queued (shutdown(cancel=True) is broken in
            # s3transfer 0.19); requests in flight end at their timeout, and send nothing past the deadline.
            with create_transfer_manager(self._client(deadline), config) as manager:
                futures = [submit(manager) for submit in jobs]
                for future in futures:
                    while not future.done():
                        if time.monotonic() > deadline:
                            raise DeadlineExceeded()
                        time.sleep(0.05)
                    future.result()
        except Exception as e:  # noqa: BLE001 - translated, or re-raised when not a transfer error
            raise self._error(e, what) from None

    def _error(self, e: Exception, what: str) -> Exception:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        attempts = self.options.attempts_note()
        if isinstance(e, StorageError | FileNotFoundError):
            return e
        if isinstance(e, DeadlineExceeded):
            bound = (f"{self.options.storage_deadline_seconds:g} s (the start-up check's bound)"
                     if self.options.checking else
                     f"FT_STORAGE_DEADLINE_SECONDS={self.options.storage_deadline_seconds:g}")
            return StorageError(f"{what}: not done within {bound} (endpoint {self.endpoint or 'AWS default'})")
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageError(f"{what}: no AWS credentials (boto3 looks in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                                "AWS_PROFILE and ~/.aws, web identity (IRSA) and the instance profile)", retriable=False)
        if isinstance(e, ClientError):
            error, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
            code, status = error.get("Code", ""), meta.get("HTTPStatusCode") or 0
            if code == "NoSuchBucket":
                return StorageError(f"{what}: bucket {self.bucket} does not exist", retriable=False)
            if code in NOT_FOUND:
                return FileNotFoundError(f"{what}: no such key")
            answer = f"S3 answered {status} {code}" + (f": {error['Message']}" if error.get("Message") else "")
            if code in FINAL or status == 403:
                return StorageError(f"{what}: access denied ({answer}); check the credentials and the bucket policy",
                                    retriable=False)
            if 400 <= status < 500 and status not in (408, 429):
                return StorageError(f"{what}: {answer}", retriable=False)
            return StorageError(f"{what}: {answer} {attempts}")
        if isinstance(e, BotoCoreError):
            return StorageError(f"{what}: {' '.join(str(e).split())} {attempts}")
        if type(e).__name__ == "CancelledError":  # s3transfer's, for transfers cancelled after another one failed
            return StorageError(f"{what}: cancelled")
        return e

    # --- the interface --------------------------------------------------------------------------------------------
    def objects(self, prefix: str = "") -> dict[str, tuple[str, int]]:
        """{relative key: (ETag, size)} of every object at or under `prefix` (a file, or a folder)."""
        base = self._key(prefix)

        def listing(client):
            found = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/") or (base and key != base and not key.startswith(base + "/")):
                        continue
                    found[self._relative(key)] = (obj["ETag"].strip('"'), obj["Size"])
            return found

        return dict(sorted(self._call(f"listing {self.describe(prefix)}", listing).items()))

    def list(self, prefix: str = "") -> list[str]:
        return list(self.objects(prefix))

    def exists(self, key: str) -> bool:
        return self.stat(key)[0] is not None

    def stat(self, key: str) -> tuple[int | None, str | None]:
        try:
            head = self._call(self.describe(key), lambda c: c.head_object(
                Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED"))
        except FileNotFoundError:
            return None, None
        return head["ContentLength"], _sha256_of(head)

    def get(self, key: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._transfer(f"downloading {self.describe(key)}", [lambda m: m.download(
            self.bucket, self._key(key), str(dest), extra_args={"ChecksumMode": "ENABLED"})])
        return dest

    def put(self, src: Path, key: str) -> None:
        self.put_many([(src, key)])

    def put_tree(self, src: Path, prefix: str = "", skip: set[str] | None = None) -> list[str]:
        pairs = [(p, f"{prefix.rstrip('/')}/{p.relative_to(src).as_posix()}".lstrip("/"))
                 for p in sorted(src.rglob("*")) if p.is_file() and p.relative_to(src).as_posix() not in (skip or ())]
        self.put_many(pairs)
        return [key for _, key in pairs]

    def put_many(self, pairs: list[tuple[Path, str]]) -> None:
        """Upload files in parallel. S3 computes and checks a SHA-256 of every object (of every part, for multipart
        ones), and its sha256 goes along as metadata, so that `stat` can compare it with the manifest."""
        from job.storage.base import file_sha256

        def job(src: Path, key: str):
            args = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": file_sha256(src)}}
            return lambda m: m.upload(str(src), self.bucket, self._key(key), extra_args=args)

        if pairs:
            where = self.describe(pairs[0][1]) if len(pairs) == 1 else f"{len(pairs)} files to {self.describe()}"
            self._transfer(f"uploading {where}", [job(src, key) for src, key in pairs])

    def delete(self, key: str) -> None:
        self._call(f"deleting {self.describe(key)}",
                   lambda c: c.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def delete_tree(self, prefix: str) -> None:
        keys = [self._key(k) for k in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True}
            self._call(f"deleting {self.describe(prefix)}",
                       lambda c, batch=batch: c.delete_objects(Bucket=self.bucket, Delete=batch))

    def fetch(self, cache: Path, patterns: list[str] | None = None) -> Path:
        """Download an object, or the objects under the prefix that match `patterns`, into `cache/<bucket>/<key>`.
        A file downloaded before is kept when its object's ETag and size are unchanged (`cache/.s3-index.json`);
        local files of objects no longer there are removed, so the folder is a copy of the prefix."""
        listing = self.objects()
        single = "" in listing  # the URI names one object, not a folder
        wanted = {"": listing[""]} if single else {
            k: v for k, v in listing.items() if patterns is None or any(fnmatch(k, p) for p in patterns)}
        if not wanted:
            raise FileNotFoundError("no such key, and no objects under it as a prefix")
        root = cache / self.bucket / self.prefix
        index_path = cache / CACHE_INDEX
        index = _read_index(index_path)
        todo = {}
        for rel, (etag, size) in wanted.items():
            local = root / rel if rel else root
            name = f"{self.bucket}/{self._key(rel)}"
            if index.get(name) == {"etag": etag, "size": size} and local.is_file() and local.stat().st_size == size:
                continue
            todo[rel] = local
            local.parent.mkdir(parents=True, exist_ok=True)
        if not single and root.is_dir():
            for stale in (p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in wanted):
                stale.unlink()
        self._transfer(f"downloading {self.describe()}", [
            lambda m, rel=rel, local=local: m.download(
                self.bucket, self._key(rel), str(local), extra_args={"ChecksumMode": "ENABLED"})
            for rel, local in todo.items()])
        for rel in todo:
            index[f"{self.bucket}/{self._key(rel)}"] = dict(zip(("etag", "size"), wanted[rel], strict=True))
        _write_index(index_path, index)
        log.get().info("s3 fetch", uri=self.uri, downloaded=len(todo), reused=len(wanted) - len(todo),
                       bytes=sum(wanted[r][1] for r in todo))
        return root


def _sha256_of(head: dict) -> str | None:
    """The object's sha256: S3's own checksum of a single-part object, else what the uploader said (metadata)."""
    checksum = head.get("ChecksumSHA256")
    whole = head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" and "-" not in head.get("ETag", "")
    if checksum and whole and "-" not in checksum:
        return base64.b64decode(checksum).hex()
    return head.get("Metadata", {}).get("sha256")


def _read_index(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_index(path: Path, index: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
