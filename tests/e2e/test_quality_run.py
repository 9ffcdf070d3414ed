"""The CLI's quality report, merged export and quality failure, on the tiny model and the sample chat data."""

from __future__ import annotations

import json

import pytest

from conftest import DATA
from job.errors import CODE_BY_NAME

from test_run import demo_env, run_job

SHORT = {"FT_DATASET": str(DATA / "sample-chat.jsonl"), "FT_NUM_TRAIN_EPOCHS": "2", "FT_EVAL_STEPS": "20",
         "FT_LOGGING_STEPS": "5", "FT_RUN_ID": "quality"}


@pytest.fixture(scope="module")
def merged_run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    proc = run_job(demo_env(tiny_model, **SHORT, FT_EXPORT="merged", FT_SAMPLE_COUNT="2"), tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No path found" not in proc.stdout  # TensorBoard's reader, drawing the curves, keeps its INFO lines
    return tmp / "out" / "quality"


def test_manifest_card_and_tensorboard_show_answers_before_and_after(merged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    manifest = json.loads((merged_run / "manifest.json").read_text())
    gen = manifest["quality"]["generations"]
    assert gen["source"] == "evaluation samples" and gen["max_new_tokens"] == 64 and len(gen["samples"]) == 2
    for s in gen["samples"]:
        assert s["prompt"] and s["reference"] and s["before"] != s["after"]
    assert 0 <= gen["stopped_before"] <= 1 and 0 <= gen["stopped_after"] <= 1
    assert manifest["quality"]["vllm_problems"] == [] and manifest["quality"]["curves"] == "loss.png"
    card = (merged_run / "README.md").read_text()
    assert "![train and eval loss](loss.png)" in card and "| prompt | reference | before | after |" in card
    assert gen["samples"][0]["reference"] in card
    assert (merged_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "loss.png" in manifest["files"]
    acc = EventAccumulator(str(merged_run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    [tag] = [t for t in acc.Tags()["tensors"] if t.startswith("samples/generations")]
    text = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    assert "| prompt | reference | before | after |" in text


def test_merged_model_loads_with_transformers_alone_and_matches_base_plus_adapter(merged_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((merged_run / "manifest.json").read_text())
    assert manifest["export"]["merged"]["dtype"] == "bf16" and "merged/model.safetensors" in manifest["files"]
    tok = AutoTokenizer.from_pretrained(merged_run / "merged")
    ids = tok("[INST] What is the opposite of cold? [/INST]", return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(merged_run / "merged", dtype=torch.float32)
    saved = json.loads((merged_run / "merged" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16" and "quantization_config" not in saved
    with torch.no_grad():
        got = merged(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        plain = base(**ids).logits
        adapted = PeftModel.from_pretrained(base, merged_run / "adapter")(**ids).logits
    change = (adapted - plain).abs().max().item()
    error = (got - adapted).abs().max().item()
    assert change > 0.1, change  # the adapter changed the model measurably
    assert error < 0.1 * change, (error, change)  # the merge holds that change, up to bf16 rounding


def test_answers_that_do_not_stop_fail_the_run_with_fail_after_publishing(tiny_model, tmp_path):
    proc = run_job(demo_env(tiny_model, **SHORT, FT_MAX_STEPS="2", FT_SAMPLE_MAX_NEW_TOKENS="1",
                            FT_SAMPLE_PROMPTS='["What is the opposite of cold?"]', FT_QUALITY_CHECK="fail"), tmp_path)
    assert proc.returncode == CODE_BY_NAME["quality"], proc.stdout[-3000:]
    reason = (tmp_path / "termination-log").read_text()
    assert reason.startswith("quality: FT_QUALITY_CHECK=fail: 0 of 1 sample answers"), reason
    assert "FT_SAMPLE_MAX_NEW_TOKENS=1" in reason and "Traceback" not in proc.stdout + proc.stderr
    manifest = json.loads((tmp_path / "out" / "quality" / "manifest.json").read_text())  # published all the same
    assert manifest["quality"]["generations"]["source"] == "FT_SAMPLE_PROMPTS"
    [problem] = manifest["quality"]["problems"]
    assert problem.startswith("0 of 1 sample answers") and problem[:80] in reason
