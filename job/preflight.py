"""Checks that fail in seconds what would otherwise fail after a long download: run as `finetune-job check` and at
the start of every run, before the model is fetched or loaded."""

from __future__ import annotations

import shutil
from fnmatch import fnmatch
from pathlib import Path

from job import log
from job.config import Settings
from job.errors import ConfigError, InputError, first_line, storage_failure
from job.fetch import MODEL_FILES, source_errors
from job.model import Placement, choose_attention, meta_model, resolve_placement, resolve_targets
from job.storage import HubStorage, LocalStorage, Storage, open_destination, open_source

PROBE = ".finetune-job-write-probe"


def run(cfg: Settings, run_id: str) -> Placement:
    """Every check in order; the first failure raises with its exit code."""
    placement = resolve_placement(cfg)
    if cfg.require_gpu and placement.device != "cuda":
        raise ConfigError(["FT_REQUIRE_GPU=true: no CUDA GPU is visible to this process"])
    if cfg.use_liger and placement.device != "cuda":
        raise ConfigError(["FT_USE_LIGER=true: Liger's kernels need a CUDA GPU"])
    if cfg.nnodes > 1 and "://" not in checkpoint_uri(cfg, run_id):
        # After a restart, global rank 0 (the one that resumes and mirrors) may be on another node.
        log.get().warning("with several nodes, checkpoints on a local path resume only if every node mounts the same "
                          "filesystem there; prefer FT_CHECKPOINT_URI=s3://...", uri=checkpoint_uri(cfg, run_id))
    for uri, setting in destinations(cfg, run_id):
        probe_write(open_destination(uri, setting), setting, f"{PROBE}-{run_id}{_rank_suffix()}")
    model = open_source(cfg.base_model, "FT_BASE_MODEL", "model", cfg.model_revision)
    dataset = open_source(cfg.dataset, "FT_DATASET", "dataset", cfg.dataset_revision)
    for source, setting in ((model, "FT_BASE_MODEL"), (dataset, "FT_DATASET")):
        probe_read(source, setting)
    if isinstance(model, HubStorage) and not _hub_offline():
        check_disk_for(model, Path(_hub_cache()))
    if cfg.quantization != "none":
        check_bitsandbytes(placement)
    check_model_settings(cfg, model, placement)
    log.get().info("preflight passed", run_id=run_id, device=placement.device, dtype=placement.dtype_name)
    return placement


def _rank_suffix() -> str:
    """Processes of one run probe at once: each its own key."""
    from job import distributed

    return f"-rank{distributed.rank()}" if distributed.is_worker() else ""


def destinations(cfg: Settings, run_id: str) -> list[tuple[str, str]]:
    found = [(cfg.output_uri, "FT_OUTPUT_URI")]
    if cfg.checkpoint_uri:
        found.append((cfg.checkpoint_uri, "FT_CHECKPOINT_URI"))
    return found


def checkpoint_uri(cfg: Settings, run_id: str) -> str:
    if cfg.checkpoint_uri:
        return f"{cfg.checkpoint_uri.rstrip('/')}/{run_id}"
    if cfg.output_uri.startswith("hf://"):
        # Every checkpoint would be a commit on the Hub: keep them under the work directory instead, which survives
        # a retry only when FT_WORK_DIR is a persistent volume.
        log.get().warning("checkpoints stay in FT_WORK_DIR with a Hub destination; set FT_CHECKPOINT_URI (s3:// or a "
                          "mounted path) for them to survive the node", work_dir=str(cfg.work_dir))
        return str(cfg.work_dir / "checkpoints" / run_id)
    return f"{cfg.output_uri.rstrip('/')}/{run_id}/checkpoints"


def probe_write(dest: Storage, setting: str, key: str) -> None:
    try:
        dest.probe_write(key)
    except (OSError, NotImplementedError) as e:
        raise storage_failure(f"{setting}={dest.uri}: not writable ({first_line(e)})", e) from None


def probe_read(source: Storage, setting: str) -> None:
    if isinstance(source, HubStorage) and _hub_offline():
        return  # HF_HUB_OFFLINE: only the local cache can answer, and fetching checks it
    with source_errors(source, setting):
        if isinstance(source, LocalStorage):
            source.check_readable()
        if not source.list():
            raise InputError(f"{setting}={source.uri}: no such file or directory, or it is empty")


def check_disk_for(model: HubStorage, cache: Path) -> None:
    """Free space where huggingface_hub caches downloads, against the size of the files to download."""
    from huggingface_hub import HfApi

    with source_errors(model, "FT_BASE_MODEL"):
        info = HfApi().model_info(model.repo_id, revision=model.revision, files_metadata=True)
    need = sum(s.size or 0 for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in MODEL_FILES))
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if need * 1.05 > free:
        raise InputError(f"FT_BASE_MODEL={model.uri}: needs {need / 2**30:.1f} GiB in {cache}, only "
                         f"{free / 2**30:.1f} GiB free (mount a larger volume at HF_HOME)")


def check_model_settings(cfg: Settings, source: Storage, placement: Placement) -> None:
    """FT_ATTENTION and FT_LORA_TARGET_MODULES against the model's architecture, read from its config.json alone
    (the model is built on the meta device: no weights). Skipped, with a debug line, when config.json cannot be
    read here (trusted remote code, an offline Hub cache without it); the same checks run again after load."""
    import tempfile

    from transformers import AutoConfig

    if cfg.trust_remote_code:
        return  # the config class is the model's own code, which only the fetch brings
    with tempfile.TemporaryDirectory() as tmp:
        try:
            source.get("config.json", Path(tmp) / "config.json")
            config = AutoConfig.from_pretrained(tmp)
            model = meta_model(config)
        except Exception as e:  # noqa: BLE001 - whatever stops the early check, the load-time one remains
            log.get().debug("model settings checked after load", reason=first_line(e))
            return
    choose_attention(cfg, placement, config)
    resolve_targets(cfg, model)


def check_bitsandbytes(placement: Placement) -> None:
    """Quantize and dequantize a small tensor where training will run."""
    import torch

    try:
        import bitsandbytes.functional as bnbf

        x = torch.randn(64, 64, device=placement.device, dtype=placement.dtype)
        q, state = bnbf.quantize_4bit(x, quant_type="nf4")
        error = (bnbf.dequantize_4bit(q, state) - x).abs().mean().item()
    except Exception as e:  # noqa: BLE001 - whatever breaks inside it, the answer is the same
        raise ConfigError([f"FT_QUANTIZATION: bitsandbytes does not work here ({type(e).__name__}: "
                           f"{first_line(e, 200)}); FT_QUANTIZATION=none trains plain LoRA"]) from None
    if not error < 0.2:
        raise ConfigError([f"FT_QUANTIZATION: bitsandbytes 4-bit round trip is wrong here (mean error {error:.3f})"])


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE
