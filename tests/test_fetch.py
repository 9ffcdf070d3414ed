"""Source failures map to the exit code a retry policy needs: final (3) or worth retrying later (8)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from job.errors import InputError, UnavailableError
from job.fetch import source_errors
from job.storage import LocalStorage
from job.storage.base import StorageError


@pytest.mark.parametrize("error, expected", [
    (StorageError("connection reset after 8 attempts", retriable=True), UnavailableError),
    (StorageError("access denied", retriable=False), InputError),
    (FileNotFoundError("no such key"), InputError),
    (PermissionError("denied"), InputError),
])
def test_source_errors_are_coded_for_retry_policies(error, expected):
    with pytest.raises(expected, match=r"^FT_DATASET=s3://bucket/data.jsonl: "):
        with source_errors(LocalStorage("s3://bucket/data.jsonl"), "FT_DATASET"):
            raise error


def test_unavailable_is_retriable_and_input_is_not():
    from job.errors import EXIT_CODES

    retriable = {e.name: e.retriable for e in EXIT_CODES}
    assert retriable[UnavailableError.exit_name] and not retriable[InputError.exit_name]


def test_a_local_source_is_hashed_in_the_background_and_its_revision_is_that_hash(tmp_path):
    from job.fetch import Fetched, _revision, content_hash

    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    fetched = Fetched("local", tmp_path, _revision(LocalStorage(str(tmp_path)), tmp_path))
    assert isinstance(fetched._revision, Future)  # computed beside loading, read when the manifest is written
    assert fetched.revision == "sha256:" + content_hash(tmp_path)
    (tmp_path / "a.json").write_text("{ }")  # the hash is of the content
    assert content_hash(tmp_path) != fetched.revision.removeprefix("sha256:")


def test_an_unreadable_source_costs_its_fingerprint_not_the_run(tmp_path, monkeypatch, capsys, caplog):
    import job.fetch as fetch

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path / "model.safetensors"))

    monkeypatch.setattr(fetch, "content_hash", unreadable)
    fetched = fetch.Fetched("s3://models/tiny/", tmp_path, fetch._revision(LocalStorage(str(tmp_path)), tmp_path))
    assert fetched.revision.startswith("unknown (") and "Permission denied" in fetched.revision
    # On stdout, or through logging when an earlier test left structlog on the standard library's loggers.
    assert "could not hash the source's files" in capsys.readouterr().out + caplog.text


def test_a_dataset_is_fingerprinted_at_fetch_and_a_model_in_the_background(tmp_path):
    from job.config import Settings
    from job.fetch import content_hash, fetch_dataset, fetch_model

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    fetched = fetch_dataset(Settings(dataset=str(data), work_dir=tmp_path / "work"))
    assert fetched._revision == "sha256:" + content_hash(data)  # a string now: checkpoints carry it
    data.write_text('{"text": "b"}\n')
    assert fetch_dataset(Settings(dataset=str(data), work_dir=tmp_path / "work")).revision != fetched.revision
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"0")
    assert isinstance(fetch_model(Settings(base_model=str(model), work_dir=tmp_path / "work"))._revision, Future)


@pytest.mark.parametrize("given, name", [
    ("acme/tiny", "acme/tiny"), ("hf://acme/tiny", "acme/tiny"), ("hf://models/acme/tiny/", "acme/tiny"),
    ("s3://models/tiny/", "s3://models/tiny/"), ("/data/model", "/data/model"), ("file:///data/my%20model",
                                                                                   "/data/my model"),
])
def test_the_base_model_is_named_as_given_never_by_its_local_copy(given, name):
    from job.config import Settings
    from job.fetch import model_name

    assert model_name(Settings(base_model=given)) == name


def test_an_unreachable_hub_is_retriable_not_unexpected(tmp_path, monkeypatch):
    """huggingface_hub's own retries spent on a connection refused: exit 8 naming the setting, not exit 1."""
    import socket

    from huggingface_hub import HfApi

    from job.errors import UnavailableError
    from job.fetch import source_errors
    from job.storage.hub import HubStorage

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    source = HubStorage("acme/nomodel", "acme/nomodel")
    with pytest.raises(UnavailableError, match=r"FT_BASE_MODEL=.*acme/nomodel: the Hub could not be reached.*"
                                               r"read as a Hub id: there is no acme/nomodel under "):
        with source_errors(source, "FT_BASE_MODEL"):
            HfApi(endpoint=f"http://127.0.0.1:{port}").list_repo_files("acme/nomodel")


@pytest.mark.parametrize("value", ["data/train.jsonl", "examples/missing.csv", "build/model.safetensors"])
def test_a_missing_relative_file_is_not_taken_for_a_hub_id(value):
    """A bare org/name is a Hub id, but no repository's name ends in a file's suffix: a missing file, exit 3 at once
    (not 25 s of retries against the Hub and exit 8)."""
    from job.errors import InputError
    from job.storage import open_source

    with pytest.raises(InputError, match=rf"FT_DATASET={value}: no such file or directory \(relative to /"):
        open_source(value, "FT_DATASET", "dataset")
