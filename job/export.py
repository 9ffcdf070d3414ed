"""What a run exports besides the adapter, and whether the adapter suits servers that load LoRA themselves.

- `export_merged` (FT_EXPORT=merged): the base model loaded again, unquantized, in bf16 on the CPU, the adapter
  applied by peft and merged into its weights (`merge_and_unload`), saved as safetensors with the run's tokenizer.
  Merging into 4-bit weights would round the update away and leave a model no server loads without bitsandbytes.
- `vllm_problems`: what vLLM's LoRA loader would refuse in an adapter folder, as read in its source
  (vllm/lora/peft_helper.py `PEFTHelper._validate_features`/`validate_legal`, vllm/lora/lora_model.py
  `LoRAModel.from_local_checkpoint`, vllm/lora/utils.py `parse_fine_tuned_lora_name`): `modules_to_save` set,
  DoRA, a LoRA bias, target modules not given by name, tensors whose names are not `<module>.lora_A.weight` /
  `lora_B.weight`, adapters on the embeddings or the LM head. The rank limit is the server's `--max-lora-rank`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from job import log
from job.config import Settings

MERGED = "merged"
NOT_SERVED = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")  # embeddings and LM heads


def export_merged(cfg: Settings, model_dir: Path, adapter_dir: Path, tokenizer, out: Path) -> dict[str, Any]:
    """Write the adapter merged into a bf16 copy of the base model at `model_dir` into `out` (model safetensors,
    config, tokenizer); returns the manifest's `export` entry. Peak host memory: the base model in bf16."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = time.monotonic()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                trust_remote_code=cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.name_or_path = cfg.base_model
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    seconds = round(time.monotonic() - start, 2)
    log.get().info("merged model written", path=str(out), dtype="bf16", seconds=seconds)
    return {"merged": {"path": MERGED, "dtype": "bf16", "seconds": seconds,
                       "parameters": sum(p.numel() for p in merged.parameters())}}


def vllm_problems(adapter_dir: Path) -> list[str]:
    """What vLLM's LoRA loader would reject in `adapter_dir` (adapter_config.json, adapter_model.safetensors), one
    line each; [] when it would load it."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    found = [f"adapter_config.json lacks {k}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if config.get("modules_to_save"):
        found.append(f"modules_to_save={config['modules_to_save']}: vLLM only loads adapters without it")
    if config.get("use_dora"):
        found.append("use_dora: vLLM does not load DoRA adapters (FT_USE_DORA=false)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append("a LoRA bias: vLLM loads it only with --enable-lora-bias")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        found.append(f"target_modules={targets!r}: not a list of module names")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    for key in keys:
        parts = key.split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_A", "lora_B"):
            found.append(f"tensor {key}: not a <module>.lora_A/lora_B.weight that vLLM parses")
            break
        if parts[-3] in NOT_SERVED:
            found.append(f"tensor {key}: an adapter on {parts[-3]}, which vLLM does not take")
            break
    return found


def check_for_servers(adapter_dir: Path) -> list[str]:
    """vllm_problems, logged as a warning when there are any; the manifest records them."""
    found = vllm_problems(adapter_dir)
    if found:
        log.get().warning("the adapter will not load in vLLM", problems=found)
    return found
