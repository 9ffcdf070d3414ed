"""S3Storage against moto's S3 server on loopback, through a proxy of our own that records and fails requests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from servers import FaultProxy, S3Server

from job.errors import ConfigError, InterruptedJob
from job.fetch import DATA_FILES, MODEL_FILES, file_sha256
from job.storage import LocalStorage, S3Storage, StorageError, StorageOptions, open_destination
from job.tbsync import TensorBoardSync

FAST = StorageOptions(storage_attempts=4, storage_timeout_seconds=0.5, storage_deadline_seconds=20)


@pytest.fixture(scope="module")
def server():
    s3 = S3Server()
    proxy = FaultProxy(s3.port)
    yield s3, proxy
    proxy.stop()
    s3.stop()


@pytest.fixture
def s3(server, monkeypatch):
    """A fresh server, reached by the code under test through the proxy, configured only by AWS_* variables."""
    s3, proxy = server
    s3.reset()
    proxy.clear()
    for key, value in s3.env(proxy.url).items():
        monkeypatch.setenv(key, value)
    for bucket in ("models", "data", "results"):
        s3.client().create_bucket(Bucket=bucket)
    return s3, proxy


def upload_dir(s3: S3Server, local: Path, bucket: str, prefix: str) -> None:
    for path in local.iterdir():
        s3.client().upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_model_prefix_is_fetched_once_then_served_from_the_cache(s3, tiny_model, tmp_path):
    s3, proxy = s3
    upload_dir(s3, tiny_model, "models", "llama/tiny")
    source = S3Storage("s3://models/llama/tiny/", FAST)
    path = source.fetch(tmp_path / "cache", MODEL_FILES)
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in tiny_model.iterdir())
    assert file_sha256(path / "model.safetensors") == file_sha256(tiny_model / "model.safetensors")
    assert proxy.count("GET", "/models/llama/tiny/model.safetensors") == 1

    assert source.fetch(tmp_path / "cache", MODEL_FILES) == path
    assert proxy.count("GET", "/models/llama/tiny/model.safetensors") == 1  # unchanged ETag and size: no download

    # A changed object is downloaded again, a removed one disappears from the copy; the weights stay cached.
    s3.client().put_object(Bucket="models", Key="llama/tiny/config.json", Body=b'{"changed": true}')
    s3.client().delete_object(Bucket="models", Key="llama/tiny/generation_config.json")
    source.fetch(tmp_path / "cache", MODEL_FILES)
    assert (path / "config.json").read_bytes() == b'{"changed": true}'
    assert not (path / "generation_config.json").exists()
    assert proxy.count("GET", "/models/llama/tiny/config.json") == 2
    assert proxy.count("GET", "/models/llama/tiny/model.safetensors") == 1


def test_dataset_as_one_object_or_a_prefix(s3, tmp_path):
    s3, _ = s3
    sample = Path(__file__).parent.parent / "examples" / "data" / "sample-text.jsonl"
    for key in ("text/train.jsonl", "text/more/extra.jsonl", "text/notes.txt"):
        s3.client().upload_file(str(sample), "data", key)
    one = S3Storage("s3://data/text/train.jsonl", FAST).fetch(tmp_path / "cache", DATA_FILES)
    assert one.is_file() and one.read_bytes() == sample.read_bytes()
    folder = S3Storage("s3://data/text", FAST).fetch(tmp_path / "cache", DATA_FILES)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "more/extra.jsonl", "train.jsonl"]
    with pytest.raises(FileNotFoundError, match="no such key"):
        S3Storage("s3://data/nothing-here", FAST).fetch(tmp_path / "cache", DATA_FILES)


def test_multipart_upload_and_download_with_checksums(s3, tmp_path):
    s3, proxy = s3
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * 2**20))
    store = S3Storage("s3://results/x", StorageOptions(multipart_bytes=5 * 2**20))
    store.put(big, "big.bin")
    assert proxy.count("PUT", "partNumber=") == 3
    head = s3.client().head_object(Bucket="results", Key="x/big.bin", ChecksumMode="ENABLED")
    assert head["ETag"].endswith('-3"') and head["Metadata"]["sha256"] == file_sha256(big)
    assert store.stat("big.bin") == (big.stat().st_size, file_sha256(big))
    back = store.get("big.bin", tmp_path / "back" / "big.bin")
    assert file_sha256(back) == file_sha256(big)
    assert proxy.count("GET", "/results/x/big.bin") == 3  # ranged, in parallel


def stage_run(root: Path) -> Path:
    """A finished run's local folder, with a manifest as publish writes it."""
    stage = root / "stage"
    for rel, data in {"adapter/adapter_model.safetensors": os.urandom(3000), "adapter/adapter_config.json": b"{}",
                      "tokenizer/tokenizer.json": b'{"v": 1}', "tensorboard/events.out.tfevents.1": b"ev",
                      "README.md": b"# card\n"}.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_bytes(data)
    files = {p.relative_to(stage).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
             for p in sorted(stage.rglob("*")) if p.is_file()}
    (stage / "manifest.json").write_text(json.dumps({"run_id": "r1", "files": files}))
    return stage


def test_run_upload_is_checked_against_the_manifest_which_goes_last(s3, tmp_path):
    s3, proxy = s3
    stage = stage_run(tmp_path)
    S3Storage("s3://results/runs", FAST).put_run(stage, "r1", "manifest.json")
    puts = [path for method, path, _ in proxy.requests if method == "PUT"]
    assert puts[-1] == "/results/runs/r1/manifest.json" and len(puts) == 6
    # An independent client: S3's own SHA-256 of every object equals the manifest's.
    manifest = json.loads((stage / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        head = s3.client().head_object(Bucket="results", Key=f"runs/r1/{rel}", ChecksumMode="ENABLED")
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == entry["sha256"], rel
        assert head["ContentLength"] == entry["bytes"]


def test_a_file_that_does_not_match_the_manifest_leaves_no_manifest(s3, tmp_path):
    s3, _ = s3
    stage = stage_run(tmp_path)
    manifest = json.loads((stage / "manifest.json").read_text())
    manifest["files"]["tokenizer/tokenizer.json"]["sha256"] = hashlib.sha256(b"other").hexdigest()
    (stage / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match="tokenizer.json does not match the manifest"):
        S3Storage("s3://results/runs", FAST).put_run(stage, "r1", "manifest.json")
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="results")["Contents"]]
    assert "runs/r1/tokenizer/tokenizer.json" in keys and "runs/r1/manifest.json" not in keys


def test_throttling_and_dropped_connections_are_retried(s3, tmp_path):
    s3, proxy = s3
    stage = stage_run(tmp_path)
    proxy.fail("503", "PUT", "adapter_model.safetensors", times=2)
    proxy.fail("drop", "PUT", "README.md", times=2)
    S3Storage("s3://results/runs", FAST).put_run(stage, "r1", "manifest.json")
    assert [a for m, p, a in proxy.requests if m == "PUT" and "adapter_model" in p] == ["503", "503", "forwarded"]
    assert [a for m, p, a in proxy.requests if m == "PUT" and "README.md" in p] == ["drop", "drop", "forwarded"]
    proxy.fail("drop", "GET", "README.md", times=1)
    back = S3Storage("s3://results/runs", FAST).get("r1/README.md", tmp_path / "README.md")
    assert back.read_bytes() == b"# card\n"


def test_a_stalled_request_times_out_and_is_retried(s3, tmp_path):
    s3, proxy = s3
    s3.client().put_object(Bucket="data", Key="d.jsonl", Body=b'{"text": "x"}\n')
    proxy.fail(("stall", 3), "GET", "d.jsonl", times=1)
    start = time.monotonic()
    path = S3Storage("s3://data/d.jsonl", FAST).fetch(tmp_path / "cache", DATA_FILES)
    assert time.monotonic() - start < 2.5  # read timeout 0.5 s, then a second attempt
    assert path.read_bytes() == b'{"text": "x"}\n'


def test_attempts_are_bounded_and_the_failure_is_retriable(s3, tmp_path):
    s3, proxy = s3
    proxy.fail("503", "PUT", "adapter_config.json")
    options = StorageOptions(storage_attempts=3, storage_timeout_seconds=0.5)
    with pytest.raises(StorageError, match="503 SlowDown.*after 3 attempts") as failed:
        S3Storage("s3://results/runs", options).put_run(stage_run(tmp_path), "r1", "manifest.json")
    assert failed.value.retriable
    assert proxy.count("PUT", "adapter_config.json") == 3
    assert "runs/r1/manifest.json" not in [o["Key"] for o in s3.client().list_objects_v2(
        Bucket="results").get("Contents", [])]


def test_the_deadline_bounds_a_transfer_that_keeps_stalling(s3, tmp_path):
    s3, proxy = s3
    proxy.fail(("stall", 5), "PUT")
    options = StorageOptions(storage_attempts=50, storage_timeout_seconds=0.5, storage_deadline_seconds=1.5)
    start = time.monotonic()
    with pytest.raises(StorageError, match="not done within FT_STORAGE_DEADLINE_SECONDS=1.5") as failed:
        S3Storage("s3://results/runs", options).put_run(stage_run(tmp_path), "r1", "manifest.json")
    assert time.monotonic() - start < 3.5  # 50 attempts of 0.5 s would take 25 s and more
    assert failed.value.retriable
    assert "Contents" not in s3.client().list_objects_v2(Bucket="results")


def test_denied_missing_and_bad_credentials_are_final(s3, tmp_path, monkeypatch):
    s3, _ = s3
    reader = s3.user("reader", ["s3:GetObject", "s3:ListBucket"])
    with s3.authenticated():
        for key, value in reader.items():
            monkeypatch.setenv(key, value)
        assert S3Storage("s3://results/runs", FAST).list() == []  # reading is allowed
        with pytest.raises(StorageError, match="access denied .*403 AccessDenied") as denied:
            S3Storage("s3://results/runs", FAST).probe_write(".probe")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
        with pytest.raises(StorageError, match="access denied .*InvalidAccessKeyId") as bad_key:
            S3Storage("s3://results/runs", FAST).list()
    with pytest.raises(StorageError, match="bucket no-such-bucket does not exist") as missing:
        S3Storage("s3://no-such-bucket/x", FAST).probe_write(".probe")
    assert not (denied.value.retriable or bad_key.value.retriable or missing.value.retriable)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no AWS credentials"):
        S3Storage("s3://results/runs", FAST).list()


@pytest.mark.parametrize("uri, message", [
    ("s3://Bad_Bucket/x", "is not a bucket name"),
    ("gs://bucket/x", "gs:// is not supported; use a local path, s3://bucket/prefix or hf://org/name"),
    ("hf://org/repo/sub/folder", "a Hub destination is a model repository"),
])
def test_malformed_destinations_are_config_errors(uri, message):
    with pytest.raises(ConfigError, match=message):
        open_destination(uri)


def test_tensorboard_logs_reach_s3_while_training_and_at_the_end(s3, tmp_path):
    s3, _ = s3
    local = tmp_path / "tensorboard"
    local.mkdir()
    (local / "events.1").write_bytes(b"a" * 10)

    def remote_size():
        try:
            return s3.client().head_object(Bucket="results", Key="runs/r1/tensorboard/events.1")["ContentLength"]
        except Exception:  # noqa: BLE001 - not there yet
            return None

    with TensorBoardSync(S3Storage("s3://results/runs", FAST), local, "r1/tensorboard", 0.2) as sync:
        deadline = time.monotonic() + 10
        while remote_size() != 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert remote_size() == 10  # copied while the block runs
        (local / "events.1").write_bytes(b"a" * 20)
        assert sync._thread.is_alive()
    assert remote_size() == 20
    assert not TensorBoardSync(S3Storage("s3://results/runs"), local, "r1/tensorboard", 0).enabled


def test_tensorboard_sync_leaves_sigterm_grace_to_the_checkpoint(tmp_path):
    local = tmp_path / "tensorboard"
    local.mkdir()
    (local / "events.1").write_bytes(b"x")
    dest = LocalStorage(str(tmp_path / "out"))
    with pytest.raises(InterruptedJob), TensorBoardSync(dest, local, "r1/tensorboard", 3600):
        raise InterruptedJob("stopped by SIGTERM")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RuntimeError), TensorBoardSync(dest, local, "r1/tensorboard", 3600):
        raise RuntimeError("diverged")
    assert (tmp_path / "out" / "r1" / "tensorboard" / "events.1").read_bytes() == b"x"
