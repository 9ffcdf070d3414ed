"""Source failures map to the exit code a retry policy needs: final (3) or worth retrying later (8)."""

from __future__ import annotations

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
