"""A model or dataset repository on the Hugging Face Hub (or a mirror at HF_ENDPOINT).

huggingface_hub reads HF_TOKEN, HF_HOME and HF_ENDPOINT itself; nothing here handles a credential.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from job.storage.base import Storage


class HubStorage(Storage):
    def __init__(self, uri: str, repo_id: str, repo_type: str = "model", revision: str | None = None):
        super().__init__(uri)
        self.repo_id, self.repo_type, self.revision = repo_id, repo_type, revision
        self.commit: str | None = None  # the resolved commit, once fetched

    def list(self, prefix: str = "") -> list[str]:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(self.repo_id, repo_type=self.repo_type, revision=self.revision)
        return sorted(f for f in files if f.startswith(prefix))

    def exists(self, key: str) -> bool:
        from huggingface_hub import file_exists

        return file_exists(self.repo_id, key, repo_type=self.repo_type, revision=self.revision)

    def get(self, key: str, dest: Path) -> Path:
        from huggingface_hub import hf_hub_download

        cached = hf_hub_download(self.repo_id, key, repo_type=self.repo_type, revision=self.revision)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, dest)
        return dest

    def put(self, src: Path, key: str) -> None:
        raise NotImplementedError("the Hub as a destination is not available yet")

    def delete(self, key: str) -> None:
        raise NotImplementedError("the Hub as a destination is not available yet")

    def fetch(self, cache: Path, patterns: list[str] | None = None) -> Path:
        """Download into HF_HOME's cache (shared between runs and pods) and return the snapshot directory."""
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(
            self.repo_id, repo_type=self.repo_type, revision=self.revision, allow_patterns=patterns
        ))
        self.commit = path.name  # snapshots/<commit sha>
        return path
