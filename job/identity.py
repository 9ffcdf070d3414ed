"""Run identity: the run id, and the fingerprint of what a run trains (its recipe and data settings, not where it
runs or how its hardware computes it). Checkpoints record the fingerprint; a run resumes only what it would train.

The rule for the fingerprint: a setting is in it when changing it changes the trained adapter or what its published
figures mean: the model and its revision, the data and how it is read, split (FT_EVAL_FRACTION, FT_EVAL_SPLIT) and
truncated, the LoRA, the optimizer and its schedule, the batch, the steps and epochs, the seed. A setting is left out
(NOT_FINGERPRINTED) when it only decides where the run is stored or published (FT_OUTPUT_URI, FT_CHECKPOINT_URI: the
run id is what names the run there), what is logged or exported and how often (FT_LOGGING_STEPS, FT_EVAL_STEPS:
the train loss over the run is a step-weighted mean, and the evaluation before and after training runs whatever
the interval), how the hardware computes a step, or how the job waits, retries and checkpoints. Such a setting may
change between the attempts of one run: a resume with another logging interval is the same training.

A checkpoint's marker and a completed run's manifest record, besides the hash, the fingerprinted settings
themselves (secrets redacted, as in the manifest's config), so that a refusal names the settings that differ;
records of versions that kept only the hash are compared by hash (this version's, or the previous version's rule:
LEGACY_FINGERPRINTED), and a refusal then cannot say which settings differ."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from job.config import Settings
from job.config_sources import env_name

# Job ids that batch services keep across the attempts of one job: AWS Batch (AWS_BATCH_JOB_ATTEMPT counts them),
# Cloud Run jobs, Google Cloud Batch (BATCH_TASK_RETRY_ATTEMPT), SageMaker (managed spot restarts keep the name).
PLATFORM_JOB_IDS = ("AWS_BATCH_JOB_ID", "CLOUD_RUN_EXECUTION", "BATCH_JOB_UID", "TRAINING_JOB_NAME")
# Settings that do not change what is trained, left out of the run-id fingerprint (the rule: the docstring above).
NOT_FINGERPRINTED = {"run_id", "overwrite", "log_format", "log_level", "work_dir", "termination_log",
                     "termination_grace_seconds", "require_gpu", "lease_ttl_seconds", "lease_wait_seconds", "save_steps", "save_minutes", "keep_checkpoints",
                     "checkpoint_uri", "on_data_change", "hub_private", "hub_revision", "tb_sync_seconds",
                     "bad_records", "bad_records_max_fraction",  # what happens to a bad row, not what is trained
                     "storage_attempts", "storage_timeout_seconds", "storage_deadline_seconds",
                     # how a step is computed, not what it trains: a run may resume under another plan (another GPU)
                     "profile", "padding_free", "micro_batch_tokens", "gradient_checkpointing", "use_liger", "attention",
                     "compile", "dequantize_once", "cuda_graphs",
                     # where and on how many processes it runs: the global batch is kept, and every node must agree
                     "nproc_per_node", "nnodes", "node_rank", "dist_timeout_seconds",
                     # what is shown and exported after training
                     "sample_prompts", "sample_count", "sample_max_new_tokens", "quality_check", "export",
                     # how often the run logs and evaluates: the same steps are trained, the same figures published
                     "logging_steps", "eval_steps",
                     # where the run is stored: the destination holds it under its run id, as FT_CHECKPOINT_URI does
                     "output_uri"}
# Fingerprinted before this rule left them out: a checkpoint or completed run that records only a hash may have
# hashed them (Fingerprint.legacy).
LEGACY_FINGERPRINTED = {"logging_steps", "eval_steps", "output_uri"}
PREVIOUS_RULE = NOT_FINGERPRINTED - LEGACY_FINGERPRINTED  # what the previous rule left out


@dataclass(frozen=True)
class Fingerprint:
    """What a checkpoint or a completed run records of its training settings: `digest` (settings_fingerprint),
    `settings` (the fingerprinted settings by field name, secrets redacted) and `legacy` (the digest under the
    previous rule, which older records hold)."""

    digest: str
    settings: dict = field(default_factory=dict)
    legacy: str | None = None

    def mismatch(self, digest: str | None, settings: dict | None) -> str | None:
        """None when a record with the hash `digest` and the settings `settings` (None: not recorded) was trained
        with these settings; else the text that names the settings that differ, e.g. " (FT_LORA_R: 16 saved, 64
        now)", or says that the record does not tell. Settings the record lacks (added since) count as the same."""
        if digest is not None and digest in (self.digest, self.legacy):
            return None
        if isinstance(settings, dict) and self.settings:
            differ = [name for name in sorted(self.settings.keys() & settings.keys())
                      if settings[name] != self.settings[name]]
            if differ:
                return " (" + "; ".join(f"{env_name(name)}: {_shown(settings[name])} saved, "
                                        f"{_shown(self.settings[name])} now" for name in differ) + ")"
            # Equal as shown: a setting added since that keeps its default is the same; a redacted value (a token
            # in a URI or a revision) may hide a difference that only the hash saw.
            defaults = _defaults()
            added = [n for n in sorted(self.settings.keys() - settings.keys()) if self.settings[n] != defaults.get(n)]
            if added:
                return " (" + "; ".join(f"{env_name(n)}: not recorded, {_shown(self.settings[n])} now"
                                        for n in added) + ")"
            if digest is None or not any("***" in json.dumps(v) for v in settings.values()):
                return None
            return " (a value shown redacted differs: a credential in a URI, or a token-like revision)"
        return " (not named: it was saved by an older version, which recorded only their hash)"


def resolve_run_id(cfg: Settings) -> str:
    """FT_RUN_ID, else the batch service's job id, else a fingerprint of what is trained: a retried job (or the
    same command run again) finds its checkpoints and resumes."""
    if cfg.run_id:
        return cfg.run_id
    for var in PLATFORM_JOB_IDS:
        if value := os.environ.get(var):
            value = value.split("#")[0]  # AWS Batch multi-node jobs: "<job id>#<node index>", one run on every node
            return re.sub(r"[^A-Za-z0-9._-]", "-", value)[:128]
    # The previous rule's hash: the same settings keep the id they had (a retry or rerun after an upgrade finds its
    # checkpoints and completed run), and runs to two destinations keep two ids.
    return "run-" + settings_fingerprint(cfg, PREVIOUS_RULE)[:12]


def settings_fingerprint(cfg: Settings, exclude: set[str] = NOT_FINGERPRINTED) -> str:
    """A hash of every setting that shapes what is trained (not where it is logged, stored or how long to wait)."""
    settings = json.dumps(cfg.model_dump(mode="json", exclude=exclude), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()


def fingerprinted_settings(cfg: Settings) -> dict:
    """The settings the fingerprint covers, by field name, with secrets redacted (credentials in a URI, tokens) as
    the manifest's config is: what a checkpoint marker records, and what a refusal may show."""
    from job.log import redact_value

    return redact_value(cfg.model_dump(mode="json", exclude=NOT_FINGERPRINTED))


def training_fingerprint(cfg: Settings) -> Fingerprint:
    """The Fingerprint a checkpoint or a completed run of these settings records, and the one a resume compares."""
    return Fingerprint(settings_fingerprint(cfg), fingerprinted_settings(cfg), settings_fingerprint(cfg, PREVIOUS_RULE))


def _defaults() -> dict:
    """Every fingerprinted setting's default, as fingerprinted_settings shows values."""
    return Settings.model_construct().model_dump(mode="json", exclude=NOT_FINGERPRINTED)


def _shown(value) -> str:
    text = "unset" if value is None else json.dumps(value) if isinstance(value, (bool, list, dict)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
