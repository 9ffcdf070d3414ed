"""Where FSDP's forward departs from the unsharded model's (issue 19): one batch, before and after sharding.

    torchrun --nproc-per-node 2 bench/fsdp_probe.py      # with the job's FT_* settings in the environment
                                                         # (FT_BASE_MODEL, FT_DATASET, FT_STRATEGY=fsdp, ...)

Each process builds the job's trainer exactly as a run does (job.train.build_trainer, the job's own speed plan), takes
the same eight held-out samples, collates them as training does and computes the loss with the unsharded model; then
it shards the model as the Trainer does (accelerator.prepare of model and optimizer: FSDP2, the job's fsdp_config) and
computes the same loss again on the same full batch. Forward hooks on the embeddings, every decoder layer and the final
norm record their outputs both times, so the first module whose output differs by more than bf16 noise is named.
Buffers (rotary inv_freq and the like) and parameter dtypes are compared too, and every bitsandbytes Linear4bit's
weight (packed bytes, quant state) and output against the product with its weight from before sharding.
The job stores the 4-bit weights as bytes under FSDP (accelerate then leaves them out of the sharding);
PROBE_QUANT_STORAGE=bfloat16 stores them as bf16 words, which FSDP2 shards, as the job did before run 13.
The job sets FSDP2's mixed precision (train.fsdp_mixed_precision: bf16 parameters, fp32 gradient reduction, outputs
left as computed); PROBE_MP=accelerate puts back accelerate's default (bf16 everywhere, the loss cast to bf16: run
13's FSDP losses read up to 1% high), PROBE_MP=fp32-out casts every output to fp32.
Rank 0 prints two JSON lines; exit 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from job import data, distributed, model, pipeline, train  # noqa: E402
from job.config import Settings  # noqa: E402


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def canonical(name: str) -> str:
    return name.removeprefix("module.")  # DDP's wrapper; FSDP2 keeps the names


def watch(net, store: dict) -> list:
    """Forward hooks on the embeddings, each decoder layer and the final norm: their outputs (float) into store."""
    net = getattr(net, "module", net)  # DDP's wrapper (on the CPU, accelerate prepares DDP); FSDP2 wraps in place
    inner = net.get_base_model().model
    modules = {"embed": inner.embed_tokens, **{f"layer{i}": m for i, m in enumerate(inner.layers)}, "norm": inner.norm}

    def hook(name):
        def record(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            store[name] = local(out).detach().float().clone()
        return record

    return [m.register_forward_hook(hook(n)) for n, m in modules.items()]


def watch_4bit(net, saved: dict, report: dict) -> list:
    """Forward hooks on every bitsandbytes Linear4bit: whether the weight it multiplied by (packed bytes and quant
    state) is the one it had before sharding, and its output against the product with that weight."""
    import bitsandbytes as bnb

    def hook(name):
        def check(module, inputs, output):
            packed, state = saved[canonical(name)]
            w = module.weight
            data = local(w.data).reshape(-1)
            qs = getattr(w, "quant_state", None)
            ref = inputs[0].to(state.dtype) @ bnb.functional.dequantize_4bit(packed, state).t()
            report[name] = {
                "bytes_equal": data.numel() == packed.numel() and torch.equal(data.view(torch.uint8), packed.reshape(-1).view(torch.uint8)),
                "state_same_object": qs is state, "absmax_equal": qs is not None and torch.equal(qs.absmax, state.absmax),
                "state_shape": [list(qs.shape) if qs is not None else None, list(state.shape)],
                "weight": f"{type(w).__name__} {list(w.shape)} {w.dtype}",
                "out_rel_diff": float((output.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))}
        return check

    return [m.register_forward_hook(hook(n)) for n, m in net.named_modules()
            if isinstance(m, bnb.nn.Linear4bit) and canonical(n) in saved]


def forward(trainer, net, batch) -> float:
    with torch.no_grad(), trainer.compute_loss_context_manager():
        return float(net(**batch).loss)


HEAD_SEEN: list = []  # what trl's fused LM head multiplied by, per call: weight type, dtype, shape


def record_head():
    """Record the LM head weight trl's fused head (trl.trainer.utils._fused_forward) hands to its kernel."""
    import trl.trainer.utils as trl_utils

    gather = trl_utils.maybe_gather_lm_head_ctx

    def recording(*params):
        w = params[0]
        HEAD_SEEN.append(f"{type(w).__name__} {w.dtype} {list(w.shape)} sum={float(local(w).float().sum()):.6g}")
        return gather(*params)

    trl_utils.maybe_gather_lm_head_ctx = recording


def fused(trainer, net, batch) -> float:
    """The loss as the job's training and evaluation compute it (StepTrainer.compute_loss: trl's fused LM head)."""
    with torch.no_grad(), trainer.compute_loss_context_manager():
        return float(trainer.compute_loss(net, batch))


def main() -> int:
    if storage := os.environ.get("PROBE_QUANT_STORAGE"):  # bfloat16: FSDP2 shards the 4-bit weights (run 13's bug)
        quantization_config = model.quantization_config

        def with_storage(cfg, placement, sharded=False):
            q = quantization_config(cfg, placement, sharded)
            q.bnb_4bit_quant_storage = getattr(torch, storage)
            return q

        model.quantization_config = with_storage
    cfg = Settings()
    distributed.init(cfg)
    placement = model.resolve_placement(cfg)
    tokenizer = data.load_tokenizer(Path(cfg.base_model), cfg)
    train_raw, eval_raw = data.load_splits(cfg, Path(cfg.dataset))
    train_ds, eval_ds, _ = data.tokenize_splits(train_raw, eval_raw, tokenizer, cfg)
    base, plan, _ = pipeline.load_and_plan(cfg, Path(cfg.base_model), placement, train_ds)
    trainer = train.build_trainer(cfg, base, tokenizer, train_ds, eval_ds, placement, Path("/tmp/fsdp-probe"), None,
                                  [], False, plan)
    samples = [{k: v for k, v in eval_ds[i].items() if k in ("input_ids", "completion_mask", "assistant_masks")}
               for i in range(8)]
    batch = {k: v.to(placement.device) if torch.is_tensor(v) else v for k, v in trainer.data_collator(samples).items()}
    net = trainer.model
    net.train()
    import copy

    import bitsandbytes as bnb

    saved = {canonical(n): (m.weight.data.detach().clone(), copy.deepcopy(m.weight.quant_state))
             for n, m in net.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    report_before, report_after = {}, {}
    checks = watch_4bit(net, saved, report_before)
    before_out, after_out = {}, {}
    buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    dtypes = {n: str(p.dtype) for n, p in net.named_parameters()}
    hooks = watch(net, before_out)
    loss_before = forward(trainer, net, batch)
    for h in hooks + checks:
        h.remove()
    net.eval()  # run 15: FSDP's evaluation before training read 1% high, its training steps exact
    eval_before = forward(trainer, net, batch)
    record_head()
    fused_before = fused(trainer, net, batch)
    net.train()
    trainer.create_optimizer()
    mixed_precision = {"accelerate": torch.bfloat16, "fp32-out": torch.float32}
    if os.environ.get("PROBE_MP") in mixed_precision:  # every output cast to this dtype
        from torch.distributed.fsdp import MixedPrecisionPolicy

        reduce_dtype = mixed_precision[os.environ["PROBE_MP"]]
        trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype, output_dtype=reduce_dtype)
    sharded, _ = trainer.accelerator.prepare(net, trainer.optimizer)
    policy = getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "mixed_precision_policy", None)
    sharded.eval()  # the first forward after sharding in evaluation mode, as SFTConfig.eval_on_start runs it
    fused_first = fused(trainer, sharded, batch)
    eval_first = forward(trainer, sharded, batch)
    fused_second = fused(trainer, sharded, batch)
    sharded.train()
    hooks = watch(sharded, after_out)
    checks = watch_4bit(sharded, saved, report_after)
    loss_after = forward(trainer, sharded, batch)
    for h in checks:
        h.remove()
    loss_again = forward(trainer, sharded, batch)
    sharded.eval()
    eval_again = forward(trainer, sharded, batch)
    fused_again = fused(trainer, sharded, batch)
    changed_buffers = {n: {"dtype": f"{buffers[n].dtype} -> {b.dtype}",
                           "max_abs_diff": float((local(b).float() - buffers[n].float()).abs().max())}
                       for n, b in ((canonical(n), b) for n, b in sharded.named_buffers())
                       if n in buffers and (b.dtype != buffers[n].dtype or not torch.equal(local(b), buffers[n]))}
    changed_dtypes = {n: f"{dtypes.get(n)} -> {local(p).dtype}" for n, p in
                      ((canonical(n), p) for n, p in sharded.named_parameters()) if dtypes.get(n) != str(local(p).dtype)}
    rel = {n: float((after_out[n] - before_out[n]).norm() / before_out[n].norm().clamp_min(1e-12))
           for n in before_out if n in after_out}
    first = next((n for n, r in rel.items() if r > 2e-2), None)
    def summary(report):
        bad = {n: r for n, r in report.items() if not r["bytes_equal"] or not r["absmax_equal"]
               or r["out_rel_diff"] > 1e-2}
        return {"modules": len(report), "bad": len(bad), "bytes_differ": sum(not r["bytes_equal"] for r in report.values()),
                "absmax_differs": sum(not r["absmax_equal"] for r in report.values()),
                "max_out_rel_diff": max((r["out_rel_diff"] for r in report.values()), default=None),
                "first_bad": dict(list(bad.items())[:4]), "first": dict(list(report.items())[:1])}

    if distributed.is_main():
        print(json.dumps({"linear4bit_before": summary(report_before), "linear4bit_after": summary(report_after)}),
              flush=True)
        print(json.dumps({"mixed_precision_policy": str(policy), "loss_unsharded": loss_before, "loss_fsdp": loss_after, "loss_fsdp_again": loss_again,
                          "eval_mode": {"unsharded": eval_before, "fsdp_first_forward": eval_first, "fsdp_later": eval_again},
                          "fused_eval": {"unsharded": fused_before, "fsdp_first_forward": fused_first,
                                         "fsdp_second": fused_second, "fsdp_later": fused_again},
                          "head_seen": HEAD_SEEN,
                          "rel_loss_diff": (loss_after - loss_before) / loss_before, "tokens": int(batch["input_ids"].numel()),
                          "first_module_off_by_2pct": first, "module_rel_diff": {k: round(v, 5) for k, v in rel.items()},
                          "missing_after": sorted(set(before_out) - set(after_out)),
                          "buffers_changed": changed_buffers, "param_dtypes_changed": dict(list(changed_dtypes.items())[:20]),
                          "params_dtype_changed_count": len(changed_dtypes),
                          "buffers_missing_after": sorted(set(buffers) - {canonical(n) for n, _ in sharded.named_buffers()})}),
              flush=True)
    distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
