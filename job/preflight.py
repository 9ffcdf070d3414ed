"""Checks that fail in seconds what would otherwise fail after a long download: run as `finetune-job check` and at
the start of every run, before the model is fetched or loaded."""

from __future__ import annotations

import math
import os
import shutil
from fnmatch import fnmatch
from pathlib import Path

from job import log
from job.config import Settings
from job import diskspace
from job.errors import ConfigError, DiskFullError, InputError, first_line, human_bytes, storage_failure
from job.fetch import MODEL_FILES, check_data_file, source_errors
from job.model import Placement, adaptable_modules, choose_attention, meta_model, resolve_placement, resolve_targets
from job.storage import HubStorage, LocalStorage, S3Storage, Storage, open_destination, open_source

PROBE = ".finetune-job-write-probe"


def run(cfg: Settings, run_id: str) -> Placement:
    """Every check in order; the first failure raises with its exit code."""
    placement = resolve_placement(cfg)
    if cfg.require_gpu and placement.device != "cuda":
        raise ConfigError(["FT_REQUIRE_GPU=true: no CUDA GPU is visible to this process"])
    if cfg.use_liger and placement.device != "cuda":
        raise ConfigError(["FT_USE_LIGER=true: Liger's kernels need a CUDA GPU"])
    from job import distributed, train

    processes = distributed.check_launch(cfg, run_id)
    train.check_optimizer(cfg, placement, cfg.shards_model(processes))
    if cfg.nnodes > 1 and "://" not in checkpoint_uri(cfg, run_id):
        # After a restart, global rank 0 (the one that resumes and mirrors) may be on another node.
        log.get().warning("with several nodes, checkpoints on a local path resume only if every node mounts the same "
                          "filesystem there; prefer FT_CHECKPOINT_URI=s3://...", uri=checkpoint_uri(cfg, run_id))
    # Every store is asked with short timeouts and few attempts (Storage.for_checks): a silent endpoint fails here
    # in well under a minute, naming the setting; the transfers later keep FT_STORAGE_ATTEMPTS and the timeouts.
    for uri, setting in destinations(cfg, run_id):
        probe_write(open_destination(uri, setting).for_checks(), setting, f"{PROBE}-{run_id}{_rank_suffix()}")
    model = open_source(cfg.base_model, "FT_BASE_MODEL", "model", cfg.model_revision).for_checks()
    dataset = open_source(cfg.dataset, "FT_DATASET", "dataset", cfg.dataset_revision).for_checks()
    for source, setting in ((model, "FT_BASE_MODEL"), (dataset, "FT_DATASET")):
        probe_read(source, setting)
    if isinstance(dataset, LocalStorage):
        check_data_file(cfg.dataset, dataset.root)
    check_work_dir(cfg.work_dir)
    if isinstance(model, HubStorage) and not _hub_offline():
        check_disk_for(model, Path(_hub_cache()))
    if cfg.quantization != "none":
        check_bitsandbytes(placement)
    meta = check_model_settings(cfg, model, placement)
    check_space(cfg, run_id, model, dataset, lora_parameters(cfg, meta) if meta is not None else None)
    log.get().info("preflight passed", run_id=run_id, device=placement.device, dtype=placement.dtype_name)
    return placement


def check_data(cfg: Settings, show: int = 1) -> dict:
    """`finetune-job check --data`: download the dataset and the model's tokenizer (not its weights), tokenize every
    record and count the optimizer steps as a run would, and log them ("data check passed"), after the first `show`
    training samples as the model will see them, the trained tokens in [[ ]] ("data sample"; ⟦ ⟧ where the
    sample's own brackets would make those ambiguous). Returns the data statistics (job.data.DataStats), the steps
    per epoch and the optimizer steps of the run; raises what a run raises on the same data: InputError naming
    FT_DATASET and the row, ConfigError for a format the tokenizer cannot render. With console logs (FT_LOG_FORMAT) each sample is printed as
    it reads, under a header line."""
    from job import data, fetch
    from job.steps import recipe_rows

    tokenizer = data.load_tokenizer(fetch.fetch_tokenizer(cfg), cfg)
    train_raw, eval_raw = data.load_splits(cfg, fetch.fetch_dataset(cfg).path)
    train, _, stats = data.tokenize_splits(train_raw, eval_raw, tokenizer, cfg)
    console = log.use_console(cfg.log_format)
    for i in range(min(show, len(train))):
        sample = train[i]
        text, opening, closing = data.render_trained(tokenizer, sample["input_ids"], sample["labels"])
        counts = {"tokens": len(sample["input_ids"]),
                  "trained_tokens": data.trained_count(sample["labels"])}
        if console:  # for a person: the text as it reads, not one escaped line
            print(f"--- sample {i}: {counts['tokens']} tokens, {counts['trained_tokens']} trained "
                  f"(in {opening} {closing}) ---\n{text}\n", flush=True)
        else:
            log.get().info("data sample", sample=i, **counts, text=text, trained_in=f"{opening} {closing}")
    steps = recipe_rows(cfg, train, cfg.global_batch)[1]
    total = cfg.max_steps or math.ceil(cfg.num_train_epochs * steps["steps_per_epoch"])  # as the Trainer counts them
    facts = {**vars(stats), **steps, "optimizer_steps": total}
    log.get().info("data check passed", **facts)
    return facts


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


def check_work_dir(work_dir: Path) -> None:
    """Raise InputError (exit 3) when FT_WORK_DIR cannot become a writable directory: a file stands at it or at a
    folder above it, or the nearest existing folder is not writable. Creates nothing."""
    existing = work_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"FT_WORK_DIR={work_dir}: {existing} is a file, not a directory; give a directory the job "
                         "may create and write")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"FT_WORK_DIR={work_dir}: {existing} is not writable by UID {os.getuid()}; give a directory "
                         "the job may create and write")


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

    from job.storage.base import CHECK_DEADLINE_SECONDS
    from job.storage.hub import timeout

    with source_errors(model, "FT_BASE_MODEL"), timeout(model.check_timeout, CHECK_DEADLINE_SECONDS):
        info = HfApi().model_info(model.repo_id, revision=model.revision, files_metadata=True,
                                  timeout=model.check_timeout)
    need = sum(s.size or 0 for s in info.siblings or [] if any(fnmatch(s.rfilename, p) for p in MODEL_FILES))
    model.size = need
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    if need * 1.05 > free:
        raise DiskFullError(cache, _hf_setting("HF_HUB_CACHE"), cache, free, need)


def check_model_settings(cfg: Settings, source: Storage, placement: Placement):
    """FT_ATTENTION and FT_LORA_TARGET_MODULES against the model's architecture, read from its config.json alone
    (the model is built on the meta device: no weights), which is returned. Skipped (None), with a debug line, when
    config.json cannot be read here (trusted remote code, an offline Hub cache without it); the same checks run
    again after load."""
    import tempfile

    from transformers import AutoConfig

    if cfg.trust_remote_code:
        return None  # the config class is the model's own code, which only the fetch brings
    with tempfile.TemporaryDirectory() as tmp:
        try:
            source.get("config.json", Path(tmp) / "config.json")
            config = AutoConfig.from_pretrained(tmp)
            model = meta_model(config)
        except Exception as e:  # noqa: BLE001 - whatever stops the early check, the load-time one remains
            log.get().debug("model settings checked after load", reason=first_line(e))
            return None
    choose_attention(cfg, placement, config)
    check_lora_rank(cfg, model)
    return model


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


def adapted_linears(cfg: Settings, model) -> dict[str, tuple[int, int]]:
    """The linear layers of `model` (built on the meta device) that FT_LORA_TARGET_MODULES adapts: full name ->
    (in_features, out_features)."""
    targets, _ = resolve_targets(cfg, model)
    found = {}
    for name, kind in adaptable_modules(model).items():
        leaf = name.rsplit(".", 1)[-1]
        chosen = kind != "output" if targets == "all-linear" else leaf in targets or name in targets
        module = model.get_submodule(name)
        if chosen and hasattr(module, "in_features"):
            found[name] = (module.in_features, module.out_features)
    return found


def lora_parameters(cfg: Settings, model) -> int:
    """Trainable parameters of the adapter on `model` (built on the meta device): r x (in + out) per target."""
    return sum(cfg.lora_r * (fan_in + fan_out) for fan_in, fan_out in adapted_linears(cfg, model).values())


def check_lora_rank(cfg: Settings, model) -> None:
    """Raise ConfigError when FT_LORA_R exceeds the narrowest adapted layer's min(in, out): the update B @ A of such
    a layer cannot have a higher rank (a product's rank is at most its inner and outer dimensions), so the extra
    rank is memory that trains nothing."""
    layers = adapted_linears(cfg, model)
    if not layers:
        return
    name, (fan_in, fan_out) = min(layers.items(), key=lambda item: min(item[1]))
    if cfg.lora_r > min(fan_in, fan_out):
        raise ConfigError([f"FT_LORA_R={cfg.lora_r}: above the rank an update of {name.rsplit('.', 1)[-1]} "
                           f"({fan_in} x {fan_out}) can have; at most {min(fan_in, fan_out)} for these "
                           f"FT_LORA_TARGET_MODULES"])


def source_bytes(source: Storage) -> int | None:
    """Total size of a source's files, when it can be told without downloading them."""
    if getattr(source, "size", None):
        return source.size  # a Hub model: check_disk_for summed its files
    if isinstance(source, LocalStorage):  # read in place, nothing is copied
        return 0
    if isinstance(source, S3Storage):
        try:
            return sum(size for _, size in source.objects().values())
        except OSError:
            return None
    return None


def space_needs(cfg: Settings, run_id: str, model: Storage, dataset: Storage,
                lora: int | None) -> list[diskspace.Location]:
    """Where the run writes on local disk, and about how many bytes there (None: unknown). A checkpoint is the
    adapter in fp32 plus Adam's two moments (12 bytes a LoRA parameter) and a few MiB of tokenizer and state; the
    work directory holds FT_KEEP_CHECKPOINTS + 1 of them while the Trainer saves, a downloaded one to resume from,
    the adapter, and S3 sources' copies; a Hub model goes to HF_HOME's cache, data to datasets' cache (~3x)."""
    from datasets import config as datasets_config

    from job.storage import is_local

    checkpoint = lora * 12 + 8 * 2**20 if lora is not None else None
    model_bytes, data_bytes = source_bytes(model), source_bytes(dataset)
    work = None if checkpoint is None else (cfg.keep_checkpoints + 3) * checkpoint
    if work is not None and not isinstance(model, HubStorage) and model_bytes is not None:
        work += model_bytes + (data_bytes or 0)
    places = [diskspace.Location(cfg.work_dir, "FT_WORK_DIR", str(cfg.work_dir), work)]
    ckpt_uri = checkpoint_uri(cfg, run_id)
    if is_local(cfg.output_uri):
        out = None if checkpoint is None else lora * 4 + 8 * 2**20
        if out is not None and ckpt_uri.startswith(cfg.output_uri.rstrip("/")):
            out += (cfg.keep_checkpoints + 1) * checkpoint
        places.append(diskspace.Location(_local(cfg.output_uri), "FT_OUTPUT_URI", cfg.output_uri, out))
    if cfg.checkpoint_uri and is_local(cfg.checkpoint_uri):
        need = None if checkpoint is None else (cfg.keep_checkpoints + 1) * checkpoint
        places.append(diskspace.Location(_local(cfg.checkpoint_uri), "FT_CHECKPOINT_URI", cfg.checkpoint_uri, need))
    if isinstance(model, HubStorage):
        places.append(diskspace.Location(Path(_hub_cache()), _hf_setting("HF_HUB_CACHE"), _hub_cache(), model_bytes))
    cache = Path(datasets_config.HF_DATASETS_CACHE)
    places.append(diskspace.Location(cache, _hf_setting("HF_DATASETS_CACHE"), str(cache),
                                     3 * data_bytes if data_bytes else None))
    return places


def check_space(cfg: Settings, run_id: str, model: Storage, dataset: Storage, lora: int | None) -> None:
    """Watch where the run writes (so that a full disk later names its setting) and warn when a filesystem's free
    space is below the estimate of what the run writes on it."""
    places = space_needs(cfg, run_id, model, dataset, lora)
    diskspace.watch(places)
    by_device: dict[int | None, list[diskspace.Location]] = {}
    for place in places:
        by_device.setdefault(diskspace.device(place.path), []).append(place)
    for group in by_device.values():
        need = sum(p.need or 0 for p in group)
        free = diskspace.free_bytes(group[0].path)
        if free is not None and need > free:
            log.get().warning(
                f"free space looks too small: {human_bytes(free)} free for about {human_bytes(need)} this run writes "
                f"there ({', '.join(f'{p.setting}={p.value}: ~{human_bytes(p.need or 0)}' for p in group)}; "
                f"estimated from the model's size and {lora or 0:,} LoRA parameters, 12 bytes each per checkpoint)",
                free=free, need=need)


def _local(uri: str) -> Path:
    from job.storage.uri import local_path

    return local_path(uri)


def _hf_setting(specific: str) -> str:
    """The variable that placed a Hugging Face cache: its own (HF_HUB_CACHE, HF_DATASETS_CACHE) when set."""
    import os

    return specific if os.environ.get(specific) else "HF_HOME"
