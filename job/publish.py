"""Model card, manifest and upload. The manifest goes last: a run is complete when its manifest exists and every
checksum in it matches."""

from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from job import log
from job.config import Settings
from job.quality import card_section as quality_section
from job.errors import ConfigError, InputError, UnavailableError, UploadError, storage_failure
from job.storage.base import file_sha256
from job.log import redact, redact_value
from job.storage import Storage, is_local

MANIFEST = "manifest.json"
PACKAGES = ("finetune-job", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
            "tokenizers", "huggingface_hub")


def check_destination(dest: Storage, run_id: str, overwrite: bool) -> None:
    """Refuse to replace a completed run unless asked, before any work is done."""
    try:
        completed = dest.exists(f"{run_id}/{MANIFEST}")
    except OSError as e:  # S3 or the Hub: access denied, no such bucket, bad token, unreachable
        raise storage_failure(f"FT_OUTPUT_URI={dest.uri}: cannot be read ({e})", e) from None
    if completed and not overwrite:
        raise ConfigError([f"FT_RUN_ID={run_id}: a completed run already exists at {dest.describe(run_id)}; "
                           "choose another run id or set FT_OVERWRITE=true"])


def replace_completed_run(dest: Storage, run_id: str) -> None:
    """With FT_OVERWRITE, remove an earlier completed run's files (its manifest first), so that none of them is
    mistaken for this run's. This run's own checkpoints stay until it completes."""
    if not dest.exists(f"{run_id}/{MANIFEST}"):
        return
    log.get().warning("replacing a completed run (FT_OVERWRITE=true)", uri=dest.describe(run_id))
    dest.delete(f"{run_id}/{MANIFEST}")
    for key in dest.list(run_id):
        if not key.startswith(f"{run_id}/checkpoints/"):
            dest.delete(key)


# Under the run's prefix but not the run's: its checkpoints (the default FT_CHECKPOINT_URI), removed once complete.
NOT_PUBLISHED = ("checkpoints/",)


def remove_unlisted(dest: Storage, run_id: str, listed: set[str]) -> list[str]:
    """Delete every file under `run_id/` that is not in `listed` (paths relative to the run) nor NOT_PUBLISHED, so
    that the published run holds exactly what its manifest lists. Returns the deleted keys."""
    stale = [key for key in dest.list(run_id) if (rel := key.removeprefix(f"{run_id}/")) not in listed
             and rel != MANIFEST and not rel.startswith(NOT_PUBLISHED)]
    for key in stale:
        dest.delete(key)
    if stale:
        log.get().info("removed files the manifest does not list", uri=dest.describe(run_id), files=len(stale))
    return stale


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def build_manifest(stage: Path, cfg: Settings, run_id: str, facts: dict[str, Any]) -> dict[str, Any]:
    files = {
        p.relative_to(stage).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(stage.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    return redact_value({
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.model_dump(mode="json"),
        "versions": {**versions(), "python": platform.python_version()},
        **facts,
        "files": files,
    })


def model_card(cfg: Settings, run_id: str, facts: dict[str, Any], root: str = "") -> str:
    """The run's model card (README.md): Hub metadata, what was trained on what, quality, how to load it. `root` is
    the run's folder relative to the card: "" for the run's own card, "../" for its copy in adapter/, whose links
    and loading snippet then point from there."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=hub_id(cfg.base_model, "models"),
        library_name="peft",
        tags=["lora", "qlora" if cfg.quantization != "none" else "peft", "sft", "trl", "finetune-job"],
        datasets=[hub_id(cfg.dataset, "datasets")] if hub_id(cfg.dataset, "datasets") else None,
    )
    m = facts.get("metrics", {})
    rows = [
        ("Base model", f"`{cfg.base_model}` @ `{facts['model']['revision']}`"),
        ("Dataset", f"`{cfg.dataset}` @ `{facts['dataset']['revision']}` ({facts['data']['format']} format)"),
        ("Samples", f"{facts['data']['train_samples']} train / {facts['data']['eval_samples']} eval"),
        ("Quantization", cfg.quantization + (" + double quant" if cfg.double_quant else "")),
        ("LoRA", f"r={cfg.lora_r}, alpha={cfg.lora_alpha:g}, dropout={cfg.lora_dropout:g}, "
                 f"targets={','.join(facts['training'].get('lora_target_modules') or [cfg.lora_target_modules])}"
                 + (", DoRA" if cfg.use_dora else "")
                 + (", rsLoRA" if cfg.use_rslora else "")),
        ("Optimisation", f"{facts['training']['optim']}, lr {cfg.learning_rate:g} ({cfg.lr_scheduler_type}), "
                         f"{_batches(cfg, facts['training'])}, {facts['training']['steps']} steps"),
        ("Compute", f"{facts['placement']['device']} ({facts['placement']['dtype']})"),
        ("Training", _attempts(facts['training'], m.get('train_loss'))),
        ("Eval loss", f"{_fmt(m.get('eval_loss_before'))} before, {_fmt(m.get('eval_loss_after'))} after"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = f"""---
{data.to_yaml()}
---

# {run_id}

A LoRA adapter for `{cfg.base_model}`, trained by finetune-job with trl's SFTTrainer.

| | |
|---|---|
{table}

{quality_section(facts, root)}## Use

{usage(cfg, run_id, root)}
`{root}manifest.json` {"in the run's folder" if root else "beside this card"} holds the full configuration, package \
versions and a sha256 of every file.
"""
    return redact(body)


def usage(cfg: Settings, run_id: str, root: str = "") -> str:
    """The card's loading snippet: the adapter and tokenizer from the Hub repository (a Hub destination) or from a
    copy of the run's folder; the base model by the name adapter_config.json records (fetch.model_name), which
    AutoPeftModelForCausalLM loads itself unless it is an S3 URI."""
    from job.fetch import model_name

    if cfg.output_uri.startswith("hf://"):
        where = cfg.output_uri.removeprefix("hf://").strip("/").removeprefix("models/")
        revision = f", revision={cfg.hub_revision!r}" if cfg.hub_revision else ""
        adapter, tokenizer, note = f'"{where}"{revision}', f'"{where}"{revision}', ""
    elif root:  # the card in adapter/: paths from there
        adapter, tokenizer = '"."', f'"{root}tokenizer"'
        note = f"In a copy of this adapter's folder (`{cfg.output_uri.rstrip('/')}/{run_id}/adapter`):\n\n"
    else:
        adapter, tokenizer = '"adapter"', '"tokenizer"'
        note = f"In a copy of this run's folder (`{cfg.output_uri.rstrip('/')}/{run_id}`):\n\n"
    base = model_name(cfg)
    if base.startswith("s3://") or is_local(cfg.base_model):
        # A local path is where the job read the model (relative to its working directory): adapter_config.json
        # records it, so AutoPeftModelForCausalLM elsewhere would look for it on the Hub.
        line = f'"<a local copy of {base}>")' if base.startswith("s3://") else \
            f'"{base}")  # the path the job read it from; elsewhere, your copy of it'
        return f"""{note}```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({line}
model = PeftModel.from_pretrained(base, {adapter})
tokenizer = AutoTokenizer.from_pretrained({tokenizer})
```
"""
    return f"""{note}```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained({adapter})  # and the base model, {base}
tokenizer = AutoTokenizer.from_pretrained({tokenizer})
```
"""


def hub_id(uri: str, kind: str) -> str | None:
    """The Hub repository id of a source, for the card's metadata (the Hub rejects anything else there)."""
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://").removeprefix(f"{kind}/").strip("/")
    return None if is_local(uri) or "://" in uri else uri


def _batches(cfg: Settings, training: dict[str, Any]) -> str:
    step = f"{cfg.global_batch} samples per step (batch {cfg.batch_size} x {cfg.gradient_accumulation_steps})"
    if cfg.packing:
        return (f"{cfg.global_batch} packed rows of up to {cfg.row_length} tokens per step (FT_PACKING: "
                f"{training.get('steps_per_epoch')} steps per epoch, {training.get('unpacked_steps_per_epoch')} unpacked)")
    return step


def _attempts(training: dict[str, Any], loss: Any) -> str:
    """Steps, attempts and seconds of the whole run, and the train loss over all its steps."""
    attempts = training.get("attempts") or [{}]
    resumed = training.get("resumed_from_steps") or []
    how = f"{len(attempts)} attempt{'s' if len(attempts) > 1 else ''}"
    if resumed:
        how += f", resumed from step{'s' if len(resumed) > 1 else ''} {', '.join(map(str, resumed))}"
    seconds = ", ".join(f"{a.get('seconds', 0):g}" for a in attempts)
    return f"{training.get('steps')} steps in {how} ({seconds} s); train loss {_fmt(loss)} over all steps"


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "n/a"


def publish(stage: Path, dest: Storage, cfg: Settings, run_id: str, facts: dict[str, Any],
            replace: bool = False) -> str:
    """Write the card (also as adapter/README.md) and manifest into `stage`, upload everything, the manifest last.
    Returns the run's URI.
    `replace` (or FT_OVERWRITE) replaces a completed run found there: one whose files do not match its manifest.
    Anything else under the run's prefix that the manifest does not list (a file of an earlier attempt, a partial
    upload) is removed before the manifest is written; checkpoints stay until the run is complete."""
    (stage / "README.md").write_text(model_card(cfg, run_id, facts))
    if (stage / "adapter").is_dir():  # instead of peft's placeholder, for an adapter folder copied on its own
        (stage / "adapter" / "README.md").write_text(model_card(cfg, run_id, facts, root="../"))
    manifest = build_manifest(stage, cfg, run_id, facts)
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    log.get().info("publishing", uri=dest.describe(run_id), files=len(manifest["files"]) + 1)
    try:
        check_destination(dest, run_id, cfg.overwrite or replace)
        if not dest.versioned:  # the Hub replaces a run in the same commit that adds the new one
            replace_completed_run(dest, run_id)
            remove_unlisted(dest, run_id, set(manifest["files"]))
        dest.put_run(stage, run_id, MANIFEST)
    except (OSError, InputError, UnavailableError) as e:
        raise UploadError(f"writing to {dest.describe(run_id)} failed ({e}); the results are kept in {stage}") from None
    uri = dest.describe(run_id)
    log.get().info("published", uri=uri, files=len(manifest["files"]) + 1)
    return uri
