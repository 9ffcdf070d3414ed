"""The stages of a run, in order. Each stage lives in its own module and can be run and tested alone."""

from __future__ import annotations

import shutil
import time

from job import data, fetch, log, model, publish, train
from job.config import Settings
from job.storage import open_destination


def default_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())


def run(cfg: Settings, console: bool) -> dict:
    run_id = cfg.run_id or default_run_id()
    log.get().info("run starting", run_id=run_id, base_model=cfg.base_model, dataset=cfg.dataset,
                   output_uri=cfg.output_uri)
    dest = open_destination(cfg.output_uri)
    publish.check_destination(dest, run_id, cfg.overwrite)
    placement = model.resolve_placement(cfg)

    model_src = fetch.fetch_model(cfg)
    data_src = fetch.fetch_dataset(cfg)
    tokenizer = data.load_tokenizer(model_src.path, cfg)
    train_raw, eval_raw = data.load_splits(cfg, data_src.path)
    train_ds, eval_ds, stats = data.tokenize_splits(train_raw, eval_raw, tokenizer, cfg)

    base = model.load_model(model_src.path, cfg, placement)
    stage = cfg.work_dir / run_id
    shutil.rmtree(stage, ignore_errors=True)
    log.get().info("tensorboard logs", path=str(stage / "tensorboard"),
                   hint=f"tensorboard --logdir {stage / 'tensorboard'}")
    result = train.train(cfg, base, tokenizer, train_ds, eval_ds, placement, stage, console)

    facts = {
        "model": {"uri": model_src.uri, "revision": model_src.revision},
        "dataset": {"uri": data_src.uri, "revision": data_src.revision},
        "data": vars(stats),
        "placement": {"device": placement.device, "dtype": placement.dtype_name, "gpu": placement.gpu_name},
        "training": {"steps": result.global_step, "seconds": round(result.train_seconds, 2),
                     "optim": train.effective_optim(cfg, placement)},
        "metrics": result.metrics,
    }
    uri = publish.publish(stage, dest, cfg, run_id, facts)
    summary = {"run_id": run_id, "output": uri, "adapter": f"{uri}/adapter", "tensorboard": f"{uri}/tensorboard",
               **{k: round(v, 4) for k, v in result.metrics.items()}}
    log.get().info("run finished", **summary)
    return summary
