"""The real CLI with S3 and the Hub as sources and destinations, against servers on loopback: moto's S3 behind a
fault-injecting proxy, and a small Hub, each reached by the real client (boto3, huggingface_hub) over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from servers import FakeHub, FaultProxy, S3Server
from test_run import demo_env, events, interrupt_at, run_job

from conftest import DATA, ROOT
from job.errors import CODE_BY_NAME

# Two optimizer steps on a few samples, no evaluation: these tests are about where the files come from and go.
QUICK = {"FT_MAX_STEPS": "2", "FT_BATCH_SIZE": "2", "FT_MAX_SEQ_LENGTH": "64", "FT_MAX_SAMPLES": "16",
         "FT_EVAL_FRACTION": "0", "FT_LOGGING_STEPS": "1", "FT_OVERWRITE": "false"}
WRITE, READ = "hf_writeTOKENwriteTOKENwrite12", "hf_readTOKENreadTOKENreadTOK12"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def the_error(proc: subprocess.CompletedProcess) -> str:
    errors = [e["event"] for e in events(proc) if e["level"] == "error"]
    assert len(errors) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-2000:]
    return errors[0]


@pytest.fixture(scope="module")
def s3(tiny_model):
    """moto with the tiny model and the sample data uploaded, reached through a proxy that counts requests."""
    server = S3Server()
    proxy = FaultProxy(server.port)
    client = server.client()
    for bucket in ("models", "data", "results"):
        client.create_bucket(Bucket=bucket)
    for path in tiny_model.iterdir():
        client.upload_file(str(path), "models", f"tiny/{path.name}")
    client.upload_file(str(DATA / "sample-text.jsonl"), "data", "text/sample.jsonl")
    yield server, proxy
    proxy.stop()
    server.stop()


def s3_env(server: S3Server, proxy: FaultProxy, **extra: str) -> dict[str, str]:
    return {**demo_env(Path("unused"), **QUICK), **server.env(proxy.url), "FT_BASE_MODEL": "s3://models/tiny/",
            "FT_DATASET": "s3://data/text/sample.jsonl", "FT_OUTPUT_URI": "s3://results/runs", **extra}


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory):
    server, proxy = s3
    tmp = tmp_path_factory.mktemp("s3-run")
    proxy.clear()
    proc = run_job(s3_env(server, proxy, FT_TB_SYNC_SECONDS="1"), tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc, list(proxy.requests)


def test_check_data_tokenizes_the_s3_dataset_with_the_tokenizer_alone(s3, tmp_path):
    """`check --data` reads the dataset and the tokenizer from S3, never the weights, and counts what a run trains."""
    server, proxy = s3
    proxy.clear()
    env = s3_env(server, proxy, FT_NUM_TRAIN_EPOCHS="3")
    del env["FT_MAX_STEPS"]  # the epochs count
    proc = run_job(env, tmp_path, "check", "--data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = next(e for e in events(proc) if e["event"] == "data check passed")
    assert (found["train_samples"], found["eval_samples"], found["global_batch"]) == (16, 0, 2)
    assert (found["steps_per_epoch"], found["optimizer_steps"]) == (8, 24)
    assert found["trained_tokens"] > 0 and found["format"] == "text"
    assert proxy.count("GET", "/models/tiny/tokenizer.json") == 1
    assert proxy.count("GET", "/data/text/sample.jsonl") == 1
    assert proxy.count("GET", "/models/tiny/model.safetensors") == 0
    assert not list((tmp_path / "work").rglob("*.safetensors"))


def test_s3_results_read_back_by_the_aws_cli_match_the_manifest(s3, s3_run, tmp_path):
    server, _ = s3
    aws_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **server.env()}
    subprocess.run([str(ROOT / ".venv" / "bin" / "aws"), "s3", "sync", "s3://results/runs/demo", str(tmp_path / "run"),
                    "--only-show-errors"], env=aws_env, check=True, timeout=120)
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    found = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert found == set(manifest["files"]) | {"manifest.json"}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer/tokenizer.json",
            "README.md"} <= found and any(f.startswith("tensorboard/events.out.tfevents") for f in found)
    for rel, entry in manifest["files"].items():
        assert sha256((run / rel).read_bytes()) == entry["sha256"], rel
    assert manifest["model"]["uri"] == "s3://models/tiny/" and manifest["model"]["revision"].startswith("sha256:")


def test_s3_source_downloaded_once_and_manifest_uploaded_last(s3_run):
    _, proc, requests = s3_run
    assert sum(1 for m, p, _ in requests if m == "GET" and p == "/models/tiny/model.safetensors") == 1
    puts = [p for m, p, _ in requests if m == "PUT" and p.startswith("/results/runs/demo/")]
    assert puts[-1] == "/results/runs/demo/manifest.json" and puts.count(puts[-1]) == 1
    # TensorBoard logs went up during training (FT_TB_SYNC_SECONDS=1) before the results did.
    first_result = puts.index("/results/runs/demo/README.md")
    assert any("/tensorboard/" in p for p in puts[:first_result])
    # Every file once, plus config.json read by preflight before the download (the architecture checks).
    gets = [p for m, p, _ in requests if m == "GET" and p.startswith("/models/tiny/")]
    assert [e for e in events(proc) if e["event"] == "s3 fetch"][0]["downloaded"] == len(gets) - 1
    assert gets.count("/models/tiny/config.json") == 2 and len(set(gets)) == len(gets) - 1


def test_s3_completed_run_is_not_overwritten(s3, s3_run, monkeypatch):
    from job.errors import ConfigError
    from job.publish import check_destination
    from job.storage import S3Storage

    server, _ = s3
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="FT_RUN_ID=demo: a completed run already exists at s3://results/runs/demo"):
        check_destination(S3Storage("s3://results/runs"), "demo", overwrite=False)
    check_destination(S3Storage("s3://results/runs"), "demo", overwrite=True)
    check_destination(S3Storage("s3://results/runs"), "other", overwrite=False)


def test_upload_failure_is_retried_then_exits_6_with_local_results_and_no_manifest(s3, tmp_path):
    server, proxy = s3
    proxy.clear()
    proxy.fail("503", "PUT", "/results/runs/broken/adapter/adapter_model.safetensors")
    proc = run_job(s3_env(server, proxy, FT_RUN_ID="broken", FT_STORAGE_ATTEMPTS="3"), tmp_path)
    proxy.clear()
    assert proc.returncode == CODE_BY_NAME["upload"], proc.stdout[-3000:]
    (stage,) = (tmp_path / "work" / "broken").glob("a-*/output")  # the attempt's own work dir, kept on failure
    message = the_error(proc)
    assert "writing to s3://results/runs/broken failed" in message and "after 3 attempts" in message
    assert f"the results are kept in {stage}" in message
    assert (stage / "adapter" / "adapter_model.safetensors").is_file() and (stage / "manifest.json").is_file()
    keys = [o["Key"] for o in server.client().list_objects_v2(Bucket="results", Prefix="runs/broken/")["Contents"]]
    assert "runs/broken/README.md" in keys and "runs/broken/manifest.json" not in keys
    assert (tmp_path / "termination-log").read_text().startswith("upload: ")


def test_s3_destination_without_write_access_fails_before_the_model_loads(s3, tmp_path):
    server, proxy = s3
    reader = server.user("reader", ["s3:GetObject", "s3:ListBucket"])  # real IAM: this user may read, not write
    with server.authenticated():
        proc = run_job({**s3_env(server, proxy, FT_RUN_ID="denied"), **reader}, tmp_path)
    assert proc.returncode == CODE_BY_NAME["input"], proc.stdout[-3000:]
    error = the_error(proc)
    assert error.startswith("FT_OUTPUT_URI=s3://results/runs: not writable") and "403 AccessDenied" in error, error
    assert not any(e["event"] == "loading model" for e in events(proc))


@pytest.mark.parametrize("setting, uri, message", [
    ("dataset", "s3://data/missing.jsonl", "FT_DATASET=s3://data/missing.jsonl: no such key"),
    ("base_model", "s3://no-such-bucket/tiny/", "FT_BASE_MODEL=s3://no-such-bucket/tiny/: listing "
                                                 "s3://no-such-bucket/tiny: bucket no-such-bucket does not exist"),
])
def test_s3_missing_sources_are_input_errors(s3, tmp_path, monkeypatch, setting, uri, message):
    from job.config import Settings
    from job.errors import InputError
    from job.fetch import fetch_dataset, fetch_model

    server, _ = s3
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    cfg = Settings(work_dir=tmp_path, **{setting: uri})
    with pytest.raises(InputError) as failed:
        (fetch_model if setting == "base_model" else fetch_dataset)(cfg)
    assert str(failed.value).startswith(message) and failed.value.exit_code == 3


@pytest.fixture(scope="module")
def hub(tiny_model):
    """A Hub with a private model repository and a dataset repository at two revisions."""
    server = FakeHub({WRITE: "write", READ: "read"})
    server.model_commit = server.seed("model", "acme/tiny", {p.name: p.read_bytes() for p in tiny_model.iterdir()},
                                      private=True)
    lines = (DATA / "sample-text.jsonl").read_bytes().splitlines(keepends=True)
    server.v1 = server.seed("dataset", "acme/text", {"data/train.jsonl": b"".join(lines[:12])})
    server.v2 = server.seed("dataset", "acme/text", {"data/train.jsonl": b"".join(lines)})
    yield server
    server.stop()


def hub_env(hub: FakeHub, tmp: Path, token: str = WRITE, **extra: str) -> dict[str, str]:
    return {**demo_env(Path("unused"), **QUICK), **hub.env(token), "FT_BASE_MODEL": "hf://acme/tiny",
            "FT_DATASET": "hf://datasets/acme/text", "FT_DATASET_REVISION": hub.v1, "FT_OUTPUT_URI": "hf://acme/out",
            "FT_CHECKPOINT_URI": str(tmp / "checkpoints"), **extra}


def test_hub_to_hub_run_pins_the_dataset_and_commits_once(hub, tmp_path, tiny_model):
    proc = run_job(hub_env(hub, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    repo = hub.repo("acme/out")
    assert repo.private and len(hub.commits_received) == 1
    files = hub.head("acme/out").files
    manifest = json.loads(files["manifest.json"])
    assert (manifest["model"]["revision"], manifest["dataset"]["revision"]) == (hub.model_commit, hub.v1)
    assert manifest["data"]["train_samples"] == 12  # the pinned revision's rows, not the latest's
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= set(files)
    assert any(p.startswith("runs/demo/events.out.tfevents") for p in files)
    for path, entry in manifest["files"].items():
        assert sha256(files[path]) == entry["sha256"], path
    auth = {a for _, p, a in hub.requests if "acme/" in p and not p.startswith("/lfs-upload/")}
    assert auth == {f"Bearer {WRITE}"}
    finished = [e for e in events(proc) if e["event"] == "run finished"][0]
    assert (finished["adapter"], finished["tensorboard"]) == ("hf://acme/out", "hf://acme/out/runs/demo")

    # The Hub convention holds: peft loads the adapter from the repository's root.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "clone"
    for path, data in files.items():
        (local / path).parent.mkdir(parents=True, exist_ok=True)
        (local / path).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), local)
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)


def test_hub_read_only_token_fails_before_the_model_loads(hub, tmp_path):
    proc = run_job(hub_env(hub, tmp_path, READ, FT_OUTPUT_URI="hf://acme/out2"), tmp_path)
    assert proc.returncode == CODE_BY_NAME["input"], proc.stdout[-3000:]
    assert the_error(proc).startswith("FT_OUTPUT_URI=hf://acme/out2: not writable (writing to hf://acme/out2: HF_TOKEN "
                                      "is a read-only token")
    assert not any(e["event"] == "loading model" for e in events(proc))
    assert ("model", "acme/out2") not in hub.repos


def test_checkpoints_mirror_to_s3_and_a_run_preempted_on_one_node_resumes_on_another(s3, tmp_path):
    server, proxy = s3
    env = {**os.environ, "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "FT_LOG_FORMAT": "json",
           "FT_TERMINATION_LOG": str(tmp_path / "termination-log"),
           **s3_env(server, proxy, FT_MAX_STEPS="8", FT_SAVE_STEPS="3", FT_RUN_ID="s3-resume")}
    first = interrupt_at({**env, "FT_WORK_DIR": str(tmp_path / "node-a")}, '"checkpoint mirrored"')
    assert first == CODE_BY_NAME["interrupted"]
    listing = server.client().list_objects_v2(Bucket="results", Prefix="runs/s3-resume/checkpoints/")
    keys = {o["Key"].removeprefix("runs/s3-resume/checkpoints/") for o in listing.get("Contents", [])}
    latest = json.loads(server.client().get_object(Bucket="results", Key="runs/s3-resume/checkpoints/latest")
                        ["Body"].read())
    assert f"{latest['checkpoint']}/checkpoint.json" in keys and latest["step"] >= 3

    # A new node: nothing local survives, only what is in S3.
    second = run_job({**env, "FT_WORK_DIR": str(tmp_path / "node-b")}, tmp_path)
    assert second.returncode == 0, second.stdout[-3000:]
    assert [e["step"] for e in events(second) if e["event"].startswith("resumed from step")] == [latest["step"]]
    assert "Contents" not in server.client().list_objects_v2(Bucket="results", Prefix="runs/s3-resume/checkpoints/")
