"""Packing changes nothing but speed: the same losses and the same adapter as padded batches."""

from __future__ import annotations

import json

import pytest
import torch
from test_run import demo_env, events, run_job


def test_packed_and_padded_training_give_the_same_losses_and_adapter(tiny_model, tmp_path):
    """16 samples in one optimizer step: as one padded batch, or packed into one padding-free micro-batch."""
    from safetensors.torch import load_file

    common = dict(FT_MAX_SAMPLES="16", FT_EVAL_FRACTION="0", FT_MAX_STEPS="3", FT_LOGGING_STEPS="1",
                  FT_LORA_DROPOUT="0", FT_BATCH_SIZE="16", FT_GROUP_BY_LENGTH="false")
    runs = {}
    for name, extra in {"padded": {"FT_PACKING": "false"},
                        "packed": {"FT_PACKING": "true", "FT_MICRO_BATCH_TOKENS": "2048"}}.items():
        proc = run_job(demo_env(tiny_model, FT_RUN_ID=name, **common, **extra), tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:]
        manifest = json.loads((tmp_path / "out" / name / "manifest.json").read_text())
        assert manifest["training"]["packing"] is (name == "packed")
        runs[name] = ([e["loss"] for e in events(proc) if e["event"] == "train step"],
                      load_file(tmp_path / "out" / name / "adapter" / "adapter_model.safetensors"))
    (padded_losses, padded), (packed_losses, packed) = runs["padded"], runs["packed"]
    assert len(padded_losses) == 3
    assert packed_losses == pytest.approx(padded_losses, rel=1e-4)
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], rtol=1e-3, atol=1e-5)
