"""Run identity: the run id, and the fingerprint of what a run trains (its recipe and data settings, not where it
runs or how its hardware computes it). Checkpoints record the fingerprint; a run resumes only what it would train."""

from __future__ import annotations

import hashlib
import json
import os
import re

from job.config import Settings

# Job ids that batch services keep across the attempts of one job: AWS Batch (AWS_BATCH_JOB_ATTEMPT counts them),
# Cloud Run jobs, Google Cloud Batch (BATCH_TASK_RETRY_ATTEMPT), SageMaker (managed spot restarts keep the name).
PLATFORM_JOB_IDS = ("AWS_BATCH_JOB_ID", "CLOUD_RUN_EXECUTION", "BATCH_JOB_UID", "TRAINING_JOB_NAME")
# Settings that do not change what is trained, left out of the run-id fingerprint.
NOT_FINGERPRINTED = {"run_id", "overwrite", "log_format", "log_level", "work_dir", "termination_log",
                     "termination_grace_seconds", "require_gpu", "lease_ttl_seconds", "lease_wait_seconds", "save_steps", "save_minutes", "keep_checkpoints",
                     "checkpoint_uri", "on_data_change", "hub_private", "hub_revision", "tb_sync_seconds",
                     "bad_records", "bad_records_max_fraction",  # what happens to a bad row, not what is trained
                     "storage_attempts", "storage_timeout_seconds", "storage_deadline_seconds",
                     # how a step is computed, not what it trains: a run may resume under another plan (another GPU)
                     "profile", "padding_free", "micro_batch_tokens", "gradient_checkpointing", "use_liger", "attention",
                     "compile", "dequantize_once",
                     # where and on how many processes it runs: the global batch is kept, and every node must agree
                     "nproc_per_node", "nnodes", "node_rank", "dist_timeout_seconds",
                     # what is shown and exported after training
                     "sample_prompts", "sample_count", "sample_max_new_tokens", "quality_check", "export"}


def resolve_run_id(cfg: Settings) -> str:
    """FT_RUN_ID, else the batch service's job id, else a fingerprint of what is trained: a retried job (or the
    same command run again) finds its checkpoints and resumes."""
    if cfg.run_id:
        return cfg.run_id
    for var in PLATFORM_JOB_IDS:
        if value := os.environ.get(var):
            value = value.split("#")[0]  # AWS Batch multi-node jobs: "<job id>#<node index>", one run on every node
            return re.sub(r"[^A-Za-z0-9._-]", "-", value)[:128]
    return "run-" + settings_fingerprint(cfg)[:12]


def settings_fingerprint(cfg: Settings) -> str:
    """A hash of every setting that shapes what is trained (not where it is logged, stored or how long to wait)."""
    settings = json.dumps(cfg.model_dump(mode="json", exclude=NOT_FINGERPRINTED), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()
