"""The stages of a run, in order. Each stage lives in its own module and can be run and tested alone."""

from __future__ import annotations

import contextlib
import time

from job import (completion, data, distributed, export, fetch, lease, log, model, preflight, publish, quality, speed,
                 tbsync, train)
from job.checkpoints import CheckpointStore
from job.config import Settings
from job.identity import Fingerprint, resolve_run_id, training_fingerprint
from job.signals import Stopper
from job.storage import StorageOptions, configure, open_destination


def run(cfg: Settings, console: bool, stopper: Stopper) -> dict:
    distributed.init(cfg)  # under torchrun: this process's GPU and the process group, before anything else
    run_id = resolve_run_id(cfg)
    configure(StorageOptions.of(cfg))  # retries, timeouts and the Hub repository's visibility, for every store
    log.get().info("run starting", run_id=run_id, base_model=cfg.base_model, dataset=cfg.dataset,
                   output_uri=cfg.output_uri)
    dest = open_destination(cfg.output_uri)
    fingerprint = training_fingerprint(cfg)
    attempt = distributed.broadcast(lease.new_attempt_id())  # the processes of one attempt share its work dir
    scratch = cfg.work_dir / run_id / attempt  # private: no attempt publishes another's files
    # The processes of a node check, download and cache one after the other: the first does the work.
    with distributed.local_main_first():
        found = completion.find(dest.for_checks(), run_id, fingerprint, cfg.overwrite, cfg.export)
        if found.intact:
            return already_complete(cfg, run_id, dest, found)
        placement = preflight.run(cfg, run_id)
        held = lease.take(cfg, run_id, attempt)
        # again: the attempt we waited for may have completed the run
        found = completion.find(dest.for_checks(), run_id, fingerprint, cfg.overwrite, cfg.export)
        if found.intact:
            held.release()
            return already_complete(cfg, run_id, dest, found)
        if distributed.local_rank() == 0:
            lease.clear_other_attempts(scratch, held)
        model_src = fetch.fetch_model(cfg)
        data_src = fetch.fetch_dataset(cfg)
        checkpoints = CheckpointStore(open_destination(preflight.checkpoint_uri(cfg, run_id), "FT_CHECKPOINT_URI"),
                                      cfg.keep_checkpoints, fingerprint, data_src.revision,
                                      cfg.on_data_change)
        checkpoints.guard = held.check  # an attempt whose lease was taken over must not mirror nor prune
        checkpoints.run_complete = lambda: completion.find(dest.for_checks(), run_id, fingerprint, False).intact
        if distributed.is_main():
            checkpoints.check_data()  # before the model loads: resuming on changed data is refused (or restarts)
        tokenizer = data.load_tokenizer(model_src.path, cfg)
        train_raw, eval_raw = data.load_splits(cfg, data_src.path)
    train_ds, eval_ds, stats = data.tokenize_splits(train_raw, eval_raw, tokenizer, cfg)

    base, plan, load_seconds = load_and_plan(cfg, model_src.path, placement, train_ds, eval_ds)
    main = distributed.is_main()  # the one process that writes TensorBoard, checkpoints and results
    log.get().info("tensorboard logs", path=str(scratch / "output" / "tensorboard"),
                   hint=f"tensorboard --logdir {scratch / 'output' / 'tensorboard'}")
    sync = tbsync.TensorBoardSync(held.guard(dest), scratch / "output" / "tensorboard", f"{run_id}/tensorboard",
                                  cfg.tb_sync_seconds) if main else contextlib.nullcontext()
    with sync:
        result = train.train(cfg, base, tokenizer, train_ds, eval_ds, placement, scratch, console, checkpoints,
                             stopper, plan)
    if not main:
        distributed.barrier()  # rank 0 publishes; the group ends together (torchrun's agents wait for each other)
        return {"run_id": run_id, "rank": distributed.rank()}

    facts = run_facts(cfg, model_src, data_src, stats, placement, plan, result, load_seconds, fingerprint)
    stage = scratch / "output"
    facts["quality"] = {**quality.assess(cfg, result.model, tokenizer, eval_ds, stage, result.metrics, result.global_step,
                                         sharded=train.uses_fsdp(cfg, plan)),
                        "vllm_problems": export.check_for_servers(stage / "adapter")}
    if cfg.export == "merged":
        facts["export"] = export.export_merged(cfg, model_src.path, stage / "adapter", tokenizer, stage / export.MERGED)
    held.check()  # an attempt that lost the lease must not publish
    with stopper.deferred("publishing"):  # a signal now lets the uploads finish, the manifest last
        uri = publish.publish(stage, dest, cfg, run_id, facts, replace=found.manifest is not None)
    stopper.complete()  # the outcome is decided: what follows is best effort and a signal ends the run with 0
    if stopper.requested:
        log.get().warning("the run was published before stopping", signal=stopper.requested, uri=uri)
    completion.remove_checkpoints(checkpoints)  # nothing to resume; a failure is finished by the next attempt
    held.release()  # best effort, as the clean-up
    lease.remove_work_dir(scratch)
    distributed.barrier()
    quality.enforce(cfg, facts["quality"])  # FT_QUALITY_CHECK=fail: published, then exit code 9
    summary = {"run_id": run_id, "output": uri, "adapter": dest.describe(f"{run_id}/adapter"),
               "tensorboard": dest.describe(f"{run_id}/tensorboard"),
               **{k: round(v, 4) for k, v in result.metrics.items()}}
    log.get().info("run finished", **summary)
    return summary


def load_and_plan(cfg: Settings, path, placement, train_ds=None, eval_ds=None) -> tuple:
    """The base model, loaded as FT_QUANTIZATION says, and the speed plan every process follows (rank 0's, sized from
    its free memory and the tokenized samples' lengths); returns (model, plan, seconds the load took)."""
    start = time.monotonic()
    base = model.load_model(path, cfg, placement)
    # peft writes this into adapter_config.json (base_model_name_or_path) of every checkpoint and of the adapter,
    # so that loading the adapter elsewhere fetches the base model by the name the user gave, not our cache path.
    base.name_or_path = base.config.name_or_path = fetch.model_name(cfg)
    seconds = time.monotonic() - start
    processes = distributed.world_size()
    step_tokens = None if train_ds is None or cfg.global_batch % processes else speed.typical_step_tokens(
        [] if cfg.packing else [len(ids) for ids in train_ds["input_ids"]], cfg.global_batch // processes,
        cfg.packing, cfg.row_length, cfg.group_by_length)
    plan = distributed.broadcast(speed.plan(cfg, placement, base.config, processes,
                                            speed.dequantized_size(base, placement.dtype), step_tokens,
                                            None if eval_ds is None else [len(ids) for ids in eval_ds["input_ids"]]))
    log.get().info("speed plan", **vars(plan), load_s=round(seconds, 2))
    return base, plan, seconds


def run_facts(cfg: Settings, model_src, data_src, stats, placement, plan, result, load_seconds: float,
              fingerprint: Fingerprint) -> dict:
    """What the manifest and the model card say about the run: sources and their revisions, data statistics, where
    and how it trained (the plan included), the metrics, and the fingerprint completion.find compares."""
    sharded = train.uses_fsdp(cfg, plan)
    return {
        "model": {"uri": model_src.uri, "revision": model_src.revision},
        "dataset": {"uri": data_src.uri, "revision": data_src.revision},
        "data": vars(stats),
        "placement": {"device": placement.device, "dtype": placement.dtype_name, "gpu": placement.gpu_name,
                      "processes": distributed.world_size(), "strategy": cfg.strategy if plan.processes > 1 else None},
        "training": {**result.run, **result.steps, "lora_target_modules": result.lora_targets,
                     "attempt_seconds": round(result.train_seconds, 2), "load_seconds": round(load_seconds, 2),
                     "optim": train.effective_optim(cfg, placement, sharded), **vars(plan)},
        "metrics": result.metrics,
        "fingerprint": {"settings": fingerprint.digest, "data": data_src.revision},
    }


def already_complete(cfg: Settings, run_id: str, dest, found: completion.Completed) -> dict:
    """A complete run with these settings is at the destination: check that it was trained on this data, remove
    the checkpoints an interrupted clean-up left, and end without training."""
    data_src = fetch.fetch_dataset(cfg)
    completion.check_data(found, dest, run_id, data_src.revision)
    if distributed.is_main():
        store = open_destination(preflight.checkpoint_uri(cfg, run_id), "FT_CHECKPOINT_URI")
        completion.remove_checkpoints(CheckpointStore(store, cfg.keep_checkpoints))
        lease.remove_leftover(store)
    summary = {"run_id": run_id, "output": dest.describe(run_id), "adapter": dest.describe(f"{run_id}/adapter"),
               "tensorboard": dest.describe(f"{run_id}/tensorboard"), "created": found.manifest.get("created")}
    log.get().info("run already complete: nothing to train", **summary)
    quality.enforce(cfg, found.manifest.get("quality"))  # FT_QUALITY_CHECK=fail holds on a retry too
    return summary
