"""The Hub as a destination and as a source, against a Hub on loopback driven by the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so each case runs in a fresh
interpreter (a short script) with the environment a job would have."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from servers import FakeHub

from conftest import DATA, ROOT

WRITE, READ = "hf_writeTOKENwriteTOKENwrite12", "hf_readTOKENreadTOKENreadTOK12"
RESULT = "RESULT "


@pytest.fixture
def hub():
    server = FakeHub({WRITE: "write", READ: "read"})
    yield server
    server.stop()


def run_script(hub: FakeHub, tmp: Path, code: str, token: str | None = WRITE, **env: str) -> dict:
    """Run `code` (which calls `result(value)`) in a fresh interpreter pointed at `hub`; return the value."""
    prelude = f"import json\ndef result(v):\n    print({RESULT!r} + json.dumps(v), flush=True)\n"
    full_env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "HF_HOME": str(tmp / "hf"), **hub.env(token), **env}
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=full_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len(RESULT):])


def stage_run(root: Path, run_id: str, tokenizer_files: tuple[str, ...] = ("tokenizer.json", "tokenizer.model")):
    stage = root / run_id
    files = {"adapter/adapter_model.safetensors": os.urandom(20_000), "adapter/adapter_config.json": b'{"r": 8}',
             "adapter/README.md": b"peft's placeholder card", f"tensorboard/events.out.tfevents.{run_id}": b"ev",
             "README.md": b"---\nlibrary_name: peft\n---\n# card\n",
             **{f"tokenizer/{name}": name.encode() for name in tokenizer_files}}
    for rel, data in files.items():
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage / rel).write_bytes(data)
    listed = {rel: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for rel, data in files.items()}
    (stage / "manifest.json").write_text(json.dumps({"run_id": run_id, "files": listed}))
    return stage


PUBLISH = """
    import sys
    from pathlib import Path
    from job.storage import StorageOptions, StorageError, open_destination
    dest = open_destination("hf://acme/adapters", options=StorageOptions(**json.loads(sys.argv[1])))
    out = {}
    try:
        out["existed"] = dest.exists(f"{RUN}/manifest.json")
        dest.probe_write(".probe")
        dest.put_run(Path(STAGE), RUN, "manifest.json")
        out["exists"] = dest.exists(f"{RUN}/manifest.json")
    except StorageError as e:
        out["error"], out["retriable"] = str(e), e.retriable
    result(out)
"""


def publish(hub: FakeHub, tmp: Path, stage: Path, token: str | None = WRITE, **options) -> dict:
    code = PUBLISH.replace("RUN", repr(stage.name)).replace("STAGE", repr(str(stage)))
    code = code.replace("sys.argv[1]", repr(json.dumps({"storage_attempts": 3, **options})))
    return run_script(hub, tmp, code, token)


def test_a_run_arrives_as_one_commit_in_a_new_private_repo(hub, tmp_path):
    stage = stage_run(tmp_path, "run-1")
    assert publish(hub, tmp_path, stage) == {"existed": False, "exists": True}
    assert hub.created == [{"name": "adapters", "organization": "acme", "visibility": "private"}]
    assert hub.repo("acme/adapters").private
    [commit] = hub.commits_received
    assert commit["lines"][0]["value"]["summary"] == "finetune-job run run-1"
    kinds = {line["value"]["path"]: line["key"] for line in commit["lines"][1:]}
    assert kinds == {"adapter_model.safetensors": "lfsFile", "adapter_config.json": "file", "tokenizer.json": "file",
                     "tokenizer.model": "file", "README.md": "file", "runs/run-1/events.out.tfevents.run-1": "file",
                     "manifest.json": "file"}
    files = hub.head("acme/adapters").files
    assert files["README.md"] == (stage / "README.md").read_bytes()  # the model card, not peft's placeholder
    manifest = json.loads(files["manifest.json"])
    assert set(manifest["files"]) == set(kinds) - {"manifest.json"}
    for path, entry in manifest["files"].items():  # the manifest speaks of the repository's paths
        assert hashlib.sha256(files[path]).hexdigest() == entry["sha256"], path
    ours = [auth for _, path, auth in hub.requests if "acme/adapters" in path or path.startswith("/api/whoami")]
    assert len(ours) > 5 and set(ours) == {f"Bearer {WRITE}"}


def test_the_next_run_replaces_the_root_and_history_keeps_the_first(hub, tmp_path):
    publish(hub, tmp_path, stage_run(tmp_path, "run-1"))
    out = publish(hub, tmp_path, stage_run(tmp_path, "run-2", tokenizer_files=("tokenizer.json",)))
    assert out == {"existed": False, "exists": True}
    head = hub.head("acme/adapters")
    assert "tokenizer.model" not in head.files  # the first run's file, gone from the root in the same commit
    assert {"runs/run-1/events.out.tfevents.run-1", "runs/run-2/events.out.tfevents.run-2"} <= set(head.files)
    assert json.loads(head.files["manifest.json"])["run_id"] == "run-2"
    first = hub.repo("acme/adapters").commits[head.parent]
    assert json.loads(first.files["manifest.json"])["run_id"] == "run-1"
    assert publish(hub, tmp_path, stage_run(tmp_path / "again", "run-2"))["existed"] is True


def test_a_branch_receives_the_run_and_main_stays(hub, tmp_path):
    publish(hub, tmp_path, stage_run(tmp_path, "run-1"), hub_revision="candidate", hub_private=False)
    repo = hub.repo("acme/adapters")
    assert not repo.private and set(repo.branches) == {"main", "candidate"}
    assert "manifest.json" in hub.head("acme/adapters", "candidate").files
    assert "manifest.json" not in hub.head("acme/adapters", "main").files


@pytest.mark.parametrize("token, message", [
    ("hf_notAtokenNOTaTOKENnotAtoken1", "the Hub answered 401"),
    (READ, "HF_TOKEN is a read-only token"),
    (None, "no Hugging Face token"),
])
def test_bad_read_only_or_missing_tokens_fail_before_any_commit(hub, tmp_path, token, message):
    out = publish(hub, tmp_path, stage_run(tmp_path, "run-1"), token=token)
    assert message in out["error"] and out["retriable"] is False
    assert hub.commits_received == []


def test_a_failed_commit_is_retried_then_reported_as_retriable(hub, tmp_path):
    hub.fail("/commit/", 503, times=1)
    assert publish(hub, tmp_path, stage_run(tmp_path, "run-1"))["exists"] is True
    assert len(hub.commits_received) == 1
    hub.fail("/commit/", 503)
    out = publish(hub, tmp_path, stage_run(tmp_path, "run-2"), storage_attempts=2)
    assert "503" in out["error"] and out["retriable"] is True


FETCH = """
    from job.config import Settings
    from job.errors import JobError
    from job.fetch import fetch_dataset, fetch_model
    out = {}
    for name, fetch, settings in CASES:
        try:
            got = fetch(Settings(work_dir=WORK, **settings))
            files = [got.path] if got.path.is_file() else sorted(p for p in got.path.iterdir() if p.is_file())
            out[name] = {"revision": got.revision, "files": {p.name: p.read_text()[:40] for p in files
                                                           if p.suffix != ".safetensors"}}
        except JobError as e:
            out[name] = {"exit": e.exit_code, "error": str(e)}
    result(out)
"""


def fetch_cases(hub: FakeHub, tmp: Path, cases: str, token: str | None = WRITE) -> dict:
    code = FETCH.replace("CASES", textwrap.dedent(cases).strip()).replace("WORK", repr(str(tmp / "work")))
    return run_script(hub, tmp, code, token)


def test_hub_sources_download_pin_revisions_and_send_the_token(hub, tmp_path, tiny_model):
    model = hub.seed("model", "acme/tiny", {p.name: p.read_bytes() for p in tiny_model.iterdir()}, private=True)
    lines = (DATA / "sample-text.jsonl").read_text().splitlines(keepends=True)
    v1 = hub.seed("dataset", "acme/text", {"train.jsonl": "".join(lines[:3]).encode()})
    v2 = hub.seed("dataset", "acme/text", {"train.jsonl": "".join(lines[3:6]).encode()})
    out = fetch_cases(hub, tmp_path, f"""[
        ("model", fetch_model, {{"base_model": "hf://acme/tiny"}}),
        ("v1", fetch_dataset, {{"dataset": "hf://datasets/acme/text", "dataset_revision": "{v1}"}}),
        ("latest", fetch_dataset, {{"dataset": "acme/text"}}),
    ]""")
    assert out["model"]["revision"] == model and "config.json" in out["model"]["files"]
    assert out["v1"]["revision"] == v1 and out["v1"]["files"]["train.jsonl"] == lines[0][:40]
    assert out["latest"]["revision"] == v2 and out["latest"]["files"]["train.jsonl"] == lines[3][:40]
    assert any(path.endswith(f"/resolve/{v1}/train.jsonl") for _, path, _ in hub.requests)
    assert {auth for _, path, auth in hub.requests if "acme/tiny" in path} == {f"Bearer {WRITE}"}


def test_hub_source_errors_are_input_errors(hub, tmp_path, tiny_model):
    hub.seed("model", "acme/tiny", {p.name: p.read_bytes() for p in tiny_model.iterdir()}, private=True)
    hub.seed("dataset", "acme/text", {"train.jsonl": b'{"text": "x"}\n'})
    cases = """[
        ("missing", fetch_model, {"base_model": "hf://acme/nothing"}),
        ("revision", fetch_dataset, {"dataset": "hf://datasets/acme/text", "dataset_revision": "v9"}),
        ("private", fetch_model, {"base_model": "hf://acme/tiny"}),
    ]"""
    out = fetch_cases(hub, tmp_path, cases, token=None)
    assert out["missing"] == {"exit": 3, "error": "FT_BASE_MODEL=hf://acme/nothing: repository not found, or "
                                                  "private and HF_TOKEN lacks access"}
    assert out["revision"] == {"exit": 3, "error": "FT_DATASET=hf://datasets/acme/text: revision 'v9' not found"}
    assert out["private"]["exit"] == 3 and "repository not found" in out["private"]["error"]
    bad = fetch_cases(hub, tmp_path, cases, token="hf_notAtokenNOTaTOKENnotAtoken1")
    assert bad["private"]["exit"] == 3 and "401" in bad["private"]["error"], bad
