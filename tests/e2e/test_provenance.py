"""Provenance through the real CLI: the adapter names its base model as the user did (and the model card's loading
snippet works from a fresh cache, against a Hub on loopback), checkpoints refuse to resume on changed data, and URIs
of unknown schemes are configuration errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import FakeHub
from test_run import demo_env, events, hub_cache, interrupt_at, run_job

from conftest import DATA, ROOT
from job.errors import CODE_BY_NAME

QUICK = {"FT_MAX_STEPS": "2", "FT_BATCH_SIZE": "2", "FT_MAX_SEQ_LENGTH": "64", "FT_MAX_SAMPLES": "16",
         "FT_EVAL_FRACTION": "0", "FT_LOGGING_STEPS": "1", "FT_SAVE_STEPS": "1"}
WRITE, READ = "hf_writeTOKENwriteTOKENwrite12", "hf_readTOKENreadTOKENreadTOK12"


def the_error(proc: subprocess.CompletedProcess) -> str:
    errors = [e["event"] for e in events(proc) if e["level"] == "error"]
    assert len(errors) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-2000:]
    return errors[0]


# --- 7: URIs -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("setting, uri", [("FT_OUTPUT_URI", "ftp://host/x"), ("FT_CHECKPOINT_URI", "gs://bucket/ckpt")])
def test_an_unknown_scheme_is_refused_by_check_and_run_and_nothing_is_written(tiny_model, tmp_path, command, setting,
                                                                              uri):
    proc = run_job(demo_env(tiny_model, **{setting: uri}), tmp_path, command)
    assert proc.returncode == CODE_BY_NAME["config"] == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    message = proc.stdout + proc.stderr
    assert f"{setting}={uri}: {uri.split(':')[0]}:// is not supported; use a local path" in message
    assert "Traceback" not in message
    assert (tmp_path / "termination-log").read_text().startswith("config: ")
    assert not (ROOT / uri.split("/")[0]).exists() and not (tmp_path / "work").exists()


# --- 5: the base model as the user named it ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub(tiny_model):
    server = FakeHub({WRITE: "write", READ: "read"})
    server.seed("model", "acme/tiny", {p.name: p.read_bytes() for p in tiny_model.iterdir()}, private=True)
    yield server
    server.stop()


def card_snippet(card: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", card, re.S)
    return code


def run_elsewhere(code: str, hub: FakeHub, tmp: Path, cwd: Path) -> dict:
    """Run the card's snippet as a user on another machine would: a new HF_HOME, the Hub reached over HTTP."""
    check = ("\nimport json\nprint(json.dumps({'base': model.peft_config['default'].base_model_name_or_path, "
             "'lora_b_trained': any(bool(p.abs().sum()) for n, p in model.named_parameters() if 'lora_B' in n), "
             "'tokens': len(tokenizer('hello world').input_ids)}))\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), "HF_HOME": str(tmp / "elsewhere"), **hub.env(READ)}
    proc = subprocess.run([sys.executable, "-c", code + check], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp / "elsewhere" / "hub" / "models--acme--tiny" / "snapshots").is_dir()  # downloaded by its name
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("destination", ["local", "hub"])
def test_the_model_cards_loading_snippet_works_from_a_fresh_cache(hub, tmp_path, destination):
    output = {"local": str(tmp_path / "out"), "hub": f"hf://acme/adapter-{destination}"}[destination]
    env = {**demo_env(Path("unused"), **QUICK), **hub.env(WRITE), "FT_BASE_MODEL": "acme/tiny",
           "FT_OUTPUT_URI": output, "FT_CHECKPOINT_URI": str(tmp_path / "checkpoints")}
    # Stopped after its first checkpoint: an attempt that does not complete keeps its work dir and its checkpoints
    # (a complete one removes both). Every adapter_config.json peft wrote names the base model as the user did.
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
            "FT_WORK_DIR": str(tmp_path / "work"), "FT_LOG_FORMAT": "json", "OMP_NUM_THREADS": "2",
            "FT_TERMINATION_LOG": str(tmp_path / "termination-log")}
    assert interrupt_at({**base, **env}, '"checkpoint mirrored"') == CODE_BY_NAME["interrupted"]
    saved = [*(tmp_path / "work" / "demo").rglob("adapter_config.json"),
             *(tmp_path / "checkpoints").rglob("adapter_config.json")]
    assert len(saved) >= 2 and any("checkpoint-" in str(p) for p in saved)
    assert {json.loads(p.read_text())["base_model_name_or_path"] for p in saved} == {"acme/tiny"}
    proc = run_job(env, tmp_path)  # resumes and completes
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    if destination == "hub":
        files = hub.head("acme/adapter-hub").files
        card, where = files["README.md"].decode(), tmp_path
        assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "acme/tiny"
    else:
        where = tmp_path / "copied-run"  # a copy of the run's folder, as `aws s3 sync` would leave it
        shutil.copytree(tmp_path / "out" / "demo", where)
        card = (where / "README.md").read_text()
    got = run_elsewhere(card_snippet(card), hub, tmp_path, where)
    assert got["base"] == "acme/tiny" and got["lora_b_trained"] and got["tokens"] > 0


def test_several_processes_record_the_name_too(tiny_model, tmp_path):
    """DDP (torchrun, two CPU processes): rank 0 gathers and saves; the model came from a warm Hub cache."""
    hub_cache(tmp_path / "hf", "model", "acme/tiny-llama", list(tiny_model.iterdir()))
    proc = run_job(demo_env(tiny_model, **QUICK, FT_BASE_MODEL="acme/tiny-llama", FT_NPROC_PER_NODE="2",
                            OMP_NUM_THREADS="1", FT_PACKING="false"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    adapter = json.loads((tmp_path / "out" / "demo" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "acme/tiny-llama"
    # (The checkpoints' adapter_config.json, written by the same peft model, went with the work dir at the end; the
    # single-process test above checks them.)


# --- 6: checkpoints and changed data -----------------------------------------------------------------------------

def test_resuming_on_edited_data_is_refused_and_restart_starts_over(tiny_model, tmp_path):
    from job.fetch import content_hash

    data = tmp_path / "train.jsonl"
    shutil.copy(DATA / "sample-text.jsonl", data)
    env = {**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "FT_WORK_DIR": str(tmp_path / "work"), "FT_OUTPUT_URI": str(tmp_path / "out"), "FT_LOG_FORMAT": "json",
           "FT_TERMINATION_LOG": str(tmp_path / "termination-log"), "OMP_NUM_THREADS": "2",
           **demo_env(tiny_model, **{**QUICK, "FT_MAX_STEPS": "6", "FT_SAVE_STEPS": "2"}, FT_DATASET=str(data))}
    assert interrupt_at(env, '"checkpoint mirrored"') == CODE_BY_NAME["interrupted"]
    checkpoints = tmp_path / "out" / "demo" / "checkpoints"
    step = json.loads((checkpoints / "latest").read_text())["step"]
    before = "sha256:" + content_hash(data)
    marker = json.loads((checkpoints / f"checkpoint-{step}" / "checkpoint.json").read_text())
    assert marker["data"] == before

    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:]))  # edited in place: same name, same settings, other data
    after = "sha256:" + content_hash(data)
    refused = run_job(env, tmp_path)
    assert refused.returncode == CODE_BY_NAME["config"], refused.stdout[-3000:]
    error = the_error(refused)
    assert error.startswith("FT_DATASET: ") and f"trained on other data ({before}; now {after})" in error
    assert "FT_ON_DATA_CHANGE=restart" in error and "FT_RUN_ID" in error
    assert not any(e["event"] == "loading model" for e in events(refused))  # refused before the model loads
    assert (checkpoints / f"checkpoint-{step}" / "checkpoint.json").is_file()  # nothing deleted

    again = run_job({**env, "FT_ON_DATA_CHANGE": "restart"}, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    found = events(again)
    assert any(e["event"].startswith("the data changed since the checkpoints were saved") for e in found)
    assert not any(e["event"].startswith("resumed from step") for e in found)
    assert min(e["step"] for e in found if e["event"] == "train step") == 1  # from the start, on the new data
    manifest = json.loads((tmp_path / "out" / "demo" / "manifest.json").read_text())
    assert manifest["dataset"]["revision"] == after and manifest["training"]["steps"] == 6
