"""trl's SFTTrainer, configured from Settings: evaluate, train, evaluate, save the adapter."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from job import distributed, log
from job.callbacks import CheckpointMirror, DivergenceGuard, GracefulStop, ProgressBar, ProgressLog, SaveTimer
from job.checkpoints import CheckpointStore
from job.config import Settings
from job.errors import ConfigError, DivergedError, InterruptedJob, OutOfMemoryError
from job.history import RunHistory
from job.model import Placement, lora_config
from job.signals import Stopper
from job.speed import SpeedPlan, compile_layers, dequantize_once, release_dequantized


@dataclass
class TrainResult:
    metrics: dict[str, float] = field(default_factory=dict)
    global_step: int = 0
    train_seconds: float = 0.0
    steps: dict[str, int] = field(default_factory=dict)  # the recipe's steps per epoch (and without packing)
    lora_targets: list[str] = field(default_factory=list)  # the modules that got adapters, as resolved for the model
    model: Any = None  # the trained PeftModel, for sample answers after training (job/quality.py)
    run: dict = field(default_factory=dict)  # the whole run over its attempts (history.RunHistory.facts)


def final_eval_loss(trainer) -> float:
    """Eval loss of the trained adapter: the trainer's own evaluation when it ran at the last step (FT_EVAL_STEPS
    divides the step count), else one more evaluation."""
    last = next((e for e in reversed(trainer.state.log_history) if "eval_loss" in e), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


# AdamW with 32-bit states, whatever implementation computes it: the update is the same (Loshchilov & Hutter's
# decoupled weight decay), so which one runs is the plan's choice. bitsandbytes' paged variant exists to page large
# optimizer states out under memory pressure; a LoRA's states are small (268 MB for r=64 on q,v of a 7B model), and
# its one kernel per parameter tensor costs more than torch's fused multi-tensor step (bench/NOTES.md, issue 17).
ADAMW_32BIT = ("paged_adamw_32bit", "adamw_torch", "adamw_torch_fused")


def check_optimizer(cfg: Settings, placement: Placement, fsdp: bool = False) -> None:
    """Raise ConfigError naming FT_OPTIM where bitsandbytes' Lion (every `*lion*` name is bitsandbytes' in
    transformers) cannot run and torch's AdamW, which stands in for bitsandbytes' AdamW there, would be another
    update rule: on sharded parameters (FSDP) any Lion, on the CPU the 8-bit and paged ones (bitsandbytes has a CPU
    kernel for the 32-bit Lion only)."""
    if "lion" not in cfg.optim:
        return
    if fsdp:
        raise ConfigError([f"FT_OPTIM={cfg.optim}: bitsandbytes' Lion does not take FSDP's sharded parameters, and "
                           "AdamW would be another update rule; use an AdamW (adamw_torch, paged_adamw_32bit) or "
                           "FT_STRATEGY=ddp"])
    if placement.device != "cuda" and (cfg.optim.startswith("paged_") or "8bit" in cfg.optim):
        raise ConfigError([f"FT_OPTIM={cfg.optim}: bitsandbytes' paged and 8-bit Lion need a CUDA GPU, and AdamW "
                           "would be another update rule; on the CPU use lion_32bit or an AdamW (adamw_torch)"])


def effective_optim(cfg: Settings, placement: Placement, fsdp: bool = False) -> str:
    """The optimizer implementation for FT_OPTIM on this hardware. AdamW with 32-bit states (ADAMW_32BIT) runs as
    torch's fused AdamW on a GPU (except in the guide profile, which computes as the guide did) and torch's AdamW on
    the CPU; bitsandbytes' 8-bit AdamW needs CUDA and unsharded parameters, so on the CPU and under FSDP it falls back
    to torch's AdamW (the same rule with 32-bit states). Lion there is refused (check_optimizer). bench/check_optim.py
    compares the two updates."""
    check_optimizer(cfg, placement, fsdp)
    if cfg.optim in ADAMW_32BIT and not (cfg.profile == "guide" and placement.device == "cuda" and not fsdp):
        return "adamw_torch_fused" if placement.device == "cuda" else "adamw_torch"
    bnb = cfg.optim.startswith("paged_") or "8bit" in cfg.optim
    if bnb and placement.device != "cuda":
        return "adamw_torch"
    if bnb and fsdp:
        return "adamw_torch_fused"
    return cfg.optim


def sft_config(cfg: Settings, placement: Placement, output_dir: Path, has_eval: bool, console: bool, speed: SpeedPlan):
    from trl import SFTConfig

    on_gpu = placement.device == "cuda"
    fsdp = uses_fsdp(cfg, speed)
    optim = effective_optim(cfg, placement, fsdp)
    if optim != cfg.optim:
        log.get().info("optimizer implementation", requested=cfg.optim, used=optim)
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps or -1,
        # One dataloader batch is one optimizer step's samples on this process (job/steps.py computes it in
        # micro-batches): the step is the recipe's whatever the plan, and transformers' accumulation stays at 1.
        per_device_train_batch_size=speed.step_samples,
        per_device_eval_batch_size=speed.eval_batch_size,
        gradient_accumulation_steps=1,
        # Under FSDP, FSDP checkpoints activations itself (fsdp_arguments); the Trainer's would wrap layers twice.
        gradient_checkpointing=speed.gradient_checkpointing and not fsdp,
        use_liger_kernel=speed.liger,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a fraction below 1 is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        optim=optim,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=on_gpu and placement.dtype == torch.bfloat16,
        fp16=on_gpu and placement.dtype == torch.float16,
        use_cpu=not on_gpu,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        # The evaluation before training runs inside train(), as every later one does: transformers applies Liger's
        # kernels in train(), and an evaluate() before it computed the same weights' loss 1% below the evaluations
        # in training (bench/RESULTS.md, run 16). accelerate could not prepare an FSDP2 model for it either. The
        # job turns it off on resume (the first attempt's figure travels in the checkpoint: job/history.py).
        eval_on_start=has_eval,
        eval_steps=cfg.eval_steps,
        save_strategy="steps" if cfg.save_steps else "no",  # time and SIGTERM saves come from callbacks
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.keep_checkpoints,
        logging_nan_inf_filter=False,  # a NaN must reach DivergenceGuard, not be averaged away
        report_to="none",  # TensorBoard is attached explicitly, with its directory
        disable_tqdm=not console,
        train_sampling_strategy="random",  # FT_GROUP_BY_LENGTH: StepTrainer groups over the global step
        # Samples come tokenized, truncated and (FT_PACKING) packed by the job; the collator is job/steps.py's.
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        packing=False,
        padding_free=False,
        dataloader_pin_memory=on_gpu,
        # Each batch copied to the GPU from pinned memory without waiting: a blocking copy waits for the GPU to finish
        # the step before, so the host could not queue the next step while the GPU computes this one.
        accelerator_config={"non_blocking": on_gpu},
        ddp_backend=("nccl" if on_gpu else "gloo") if speed.processes > 1 else None,
        ddp_timeout=int(cfg.dist_timeout_seconds),
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; searching costs a graph walk per step
        **(fsdp_arguments(speed) if fsdp else {}),
    )


def align_special_tokens(model, tokenizer) -> dict[str, tuple]:
    """The model's config and generation config take the tokenizer's PAD/BOS/EOS ids, as the Trainer does at its
    start (transformers.trainer_utils.align_special_tokens), logged here as one info event of what changed instead
    of the Trainer's warning, which read as a fault on every run whose pad token the job chose (job/data.py: never
    EOS). Returns {name: (before, after)} for the ids that changed."""
    import logging

    from transformers import trainer_utils

    names = ("pad_token_id", "bos_token_id", "eos_token_id")
    config = model.config.get_text_config()
    generation = getattr(model, "generation_config", None)

    def ids():
        return {n: (getattr(config, n, None), getattr(generation, n, None) if generation is not None else None)
                for n in names}

    before = ids()
    quiet = logging.getLogger(trainer_utils.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        trainer_utils.align_special_tokens(model, tokenizer)
    finally:
        quiet.setLevel(level)
    after = ids()
    changed = {n: (before[n], after[n]) for n in names if before[n] != after[n]}
    if changed:
        log.get().info("special tokens of the model's config set to the tokenizer's",
                       **{n: {"before": list(b), "after": list(a)} for n, (b, a) in changed.items()})
    return changed


def uses_fsdp(cfg: Settings, speed: SpeedPlan) -> bool:
    return cfg.shards_model(speed.processes)


def fsdp_arguments(speed: SpeedPlan) -> dict:
    """LoRA with FSDP2: each decoder layer is a shard unit; the Trainer wraps LoRA for peft. Each process loads its
    copy on its own GPU, and FSDP keeps a shard of every 16-bit weight. 4-bit weights are stored as bytes under FSDP
    (model.quantization_config), which accelerate leaves out of the sharding: every GPU keeps them whole."""
    from transformers import TrainingArguments

    # accelerate tells every such run to store the 4-bit weights as bf16 words: what changed them (model.py).
    warnings.filterwarnings("ignore", message=r"Found \d+ non-floating frozen Params4bit")
    common = {"auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "cpu_ram_efficient_loading": False,
              "activation_checkpointing": speed.gradient_checkpointing}
    if not hasattr(TrainingArguments, "_apply_legacy_fsdp_to_config"):
        # FSDP1 would flatten the byte-stored 4-bit weights and the 16-bit ones into one parameter: it cannot.
        raise ConfigError(["FT_STRATEGY=fsdp: needs a transformers release with FSDP2 (fsdp_config version 2), "
                           "as in requirements.lock; or use FT_STRATEGY=ddp"])
    # FSDP2 (per-parameter sharding), configured in fsdp_config alone
    return {"fsdp": True, "fsdp_config": {**common, "version": 2, "reshard_after_forward": True}}


def fsdp_mixed_precision(dtype: torch.dtype):
    """FSDP2's mixed precision for the job: weights gathered and computed in `dtype` (bf16 on GPUs), gradients
    reduced in fp32, forward outputs left in the dtype they were computed in.

    accelerate's default for bf16 (accelerate 1.15, FullyShardedDataParallelPlugin.set_mixed_precision) also reduces
    in bf16 and casts every sharded module's output to bf16, the loss included: the loss FSDP logged read up to 1%
    above one GPU's for the same weights (bench/RESULTS.md, run 13). fp32 reduction is torchtitan's default
    (mixed_precision_reduce) and costs little here: only the LoRA weights have gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, output_dtype=None)


def build_trainer(cfg, model, tokenizer, train_ds, eval_ds, placement, checkpoint_dir: Path, writer, callbacks, console,
                  speed: SpeedPlan):
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from job.steps import StepCollator, StepTrainer

    # Padding-free: samples flattened into one row, position ids restarting at each; else rows padded with the pad
    # token (labels -100). Evaluation batches use it as it is; training steps through StepCollator.
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=speed.padding_free)
    align_special_tokens(model, tokenizer)
    trainer = StepTrainer(
        model=model,
        args=sft_config(cfg, placement, checkpoint_dir, eval_ds is not None, console, speed),
        data_collator=collate,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora_config(cfg, model),
        callbacks=[TensorBoardCallback(writer), ProgressLog(), *callbacks],
    )
    # CUDA graphs replay trl's plain loss only (StepTrainer.loss_and_tally): not a model's MoE auxiliary loss
    graphs = speed.cuda_graphs and trainer._plain_loss()
    if speed.cuda_graphs and not graphs:
        log.get().warning("CUDA graphs off: the loss is not trl's plain one (an MoE auxiliary loss); computing eagerly")
    # CUDA graphs: at most a step's samples (this process's) in a micro-batch, so its buckets' shapes are fixed
    trainer.step_collator = StepCollator(collate, speed.micro_batch_tokens, speed.micro_batch_size,
                                         bucket_sequences=speed.step_samples if graphs else None)
    trainer.global_batch, trainer.group_by_length = speed.global_batch, cfg.group_by_length
    trainer.remove_callback(PrinterCallback)  # prints raw dicts; ProgressLog logs them as events
    if trainer.pop_callback(ProgressCallback) is not None:  # a console's bar: it too printed the raw dicts
        trainer.add_callback(ProgressBar())
    if uses_fsdp(cfg, speed):  # read when the Trainer shards the model, in train()
        # transformers (Trainer, update_fsdp_plugin_peft) puts accelerate's bf16 policy back when the 4-bit weights
        # are stored as floats; under FSDP the job stores them as bytes (model.quantization_config), so this holds.
        trainer.accelerator.state.fsdp_plugin.mixed_precision_policy = fsdp_mixed_precision(placement.dtype)
    if placement.dtype != torch.bfloat16:
        # trl keeps a quantized model's LoRA weights in bf16 (as the QLoRA paper does with bf16 compute). Computing
        # in fp32 (CPU) or fp16 (pre-Ampere GPUs), that only rounds the updates away: keep them in fp32.
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if speed.dequantize_once:
        dequantize_once(trainer.model, placement.dtype)
    if cfg.compile:
        compile_layers(trainer.model)
        trainer.eager_evaluation = True
    if graphs:
        from job.graphs import StepGraphs

        trainer.graphs = StepGraphs(trainer.model.parameters(), placement.device)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.get().info("model ready", trainable_params=trainable, total_params=total,
                   trainable_pct=round(100 * trainable / total, 3))
    return trainer


def train(cfg: Settings, model, tokenizer, train_ds, eval_ds, placement: Placement, scratch: Path, console: bool,
          checkpoints: CheckpointStore, stopper: Stopper, speed: SpeedPlan) -> TrainResult:
    """Train (resuming from the latest complete checkpoint, if any) and write `adapter/`, `tokenizer/` and
    `tensorboard/` under `scratch/output`."""
    from torch.utils.tensorboard import SummaryWriter

    from job.steps import recipe_rows

    stage = scratch / "output"
    guard = DivergenceGuard()
    # Flushed as often as the live sync copies the files, so that what it copies is current.
    writer = SummaryWriter(log_dir=str(stage / "tensorboard"), flush_secs=max(5, int(cfg.tb_sync_seconds))) \
        if distributed.is_main() else None
    history = RunHistory(stage / "tensorboard", writer)
    # In this order: a stop or a timer decides to save, the history goes into the checkpoint, then it is mirrored.
    callbacks = [SaveTimer(cfg.save_minutes), GracefulStop(stopper), history, CheckpointMirror(checkpoints), guard]
    result = TrainResult()
    train_ds, result.steps = recipe_rows(cfg, train_ds, speed.global_batch)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, placement, scratch / "checkpoints", writer,
                            callbacks, console, speed)
    targets = trainer.model.peft_config["default"].target_modules
    names = targets if isinstance(targets, (set, list, tuple)) else [str(targets)]
    result.lora_targets = sorted({name.rsplit(".", 1)[-1] for name in names})  # q_proj, not model.layers.0...q_proj
    try:
        resume = checkpoints.restore_everywhere(scratch / "resume")
        if resume:
            history.restore(*resume)
        if resume:  # the first attempt's evaluation before training travels in the checkpoint (RunHistory)
            trainer.args.eval_on_start = False
        if resume and eval_ds is not None and history.eval_loss_before is None and distributed.is_main():
            # (a checkpoint of an older version's FSDP run): evaluating the resumed weights would not be "before"
            log.get().warning("eval loss before training unknown: the checkpoint resumed from does not record it",
                              checkpoint=str(resume[0]))
        history.start()
        start = time.monotonic()
        with stopper.deferred("training"):  # a signal now ends the step with a checkpoint (GracefulStop)
            out = trainer.train(resume_from_checkpoint=str(resume[0]) if resume else None)
        result.train_seconds, result.global_step = time.monotonic() - start, out.global_step
        result.run = history.facts(trainer.state.log_history, out.global_step)
        result.metrics["train_loss"] = result.run["train_loss"]  # over every step of every attempt
        if eval_ds is not None and history.eval_loss_before is not None:  # this attempt's or the first attempt's
            result.metrics["eval_loss_before"] = history.eval_loss_before
        stopped_early(trainer, guard, stopper, checkpoints)
        if eval_ds is not None:
            result.metrics["eval_loss_after"] = final_eval_loss(trainer)
        if cfg.compile:  # a handful; one per layer or per step would mean recompilations ate the gain
            from torch._dynamo.utils import counters

            caches = {f"{k.removeprefix('fxgraph_').removeprefix('autograd_')}_{layer}": counters[group][k]
                      for group, layer in (("inductor", "inductor"), ("aot_autograd", "aot"))
                      for k in counters[group] if "cache_" in k}  # why a warm TORCHINDUCTOR_CACHE_DIR is slow
            log.get().info("compiled graphs", graphs=counters["stats"]["unique_graphs"],
                           graph_breaks=sum(counters["graph_break"].values()),
                           reasons=[r[:300] for r, _ in counters["graph_break"].most_common(3)], **caches,
                           compile_seconds=compile_seconds())
        if trainer.graphs is not None:
            log.get().info("CUDA graphs", graphs=len(trainer.graphs.statics), buckets=sorted(trainer.graphs.statics),
                           capture_seconds=round(trainer.graphs.captured_seconds, 2), off=trainer.graphs.disabled)
    except torch.OutOfMemoryError as e:
        raise out_of_memory(e, speed) from None
    finally:
        if writer is not None:
            writer.close()
        if trainer.graphs is not None:  # their memory pool back, before sample answers
            trainer.graphs.release()
        release_dequantized(trainer.model)  # its memory back; sample answers compute as the adapter's users will
    save_adapter(trainer, stage / "adapter")
    result.model = trainer.model
    if distributed.is_main():
        tokenizer.save_pretrained(stage / "tokenizer")
    if torch.cuda.is_available():
        result.metrics["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result.metrics["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return result


# Phases of a compile as torch._dynamo.utils.compile_times names them (torch 2.13): all of it, dynamo's tracing,
# AOTAutograd's joint graph, inductor's forward and backward, waiting for Triton kernels, loading the generated code.
COMPILE_PHASES = {"_compile.compile_inner": "total", "bytecode_tracing": "dynamo_trace",
                  "aot_trace_joint_graph": "aot_trace", "compile_fx.<locals>.fw_compiler_base": "inductor_forward",
                  "compile_fx.<locals>.bw_compiler": "inductor_backward", "async_compile.wait": "triton_wait",
                  "compile_file": "load_code"}


def compile_seconds() -> dict[str, float]:
    """Seconds spent in each compile phase so far in this process (COMPILE_PHASES; phases a torch release does not
    report are left out), so that the log says where a cold or warm compile's time went; the five longest other
    timed functions over half a second under their own names (run 17: a warm compile's 42 s were 3 s of named
    phases)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    timed = {n: round(float(v), 2) for n, v in zip(names, values)}
    named = {COMPILE_PHASES[n]: v for n, v in timed.items() if n in COMPILE_PHASES}
    others = sorted(((v, n) for n, v in timed.items() if n not in COMPILE_PHASES and v >= 0.5), reverse=True)[:5]
    return {**named, **{n: v for v, n in others}}


def out_of_memory(e: Exception, speed: SpeedPlan) -> OutOfMemoryError:
    """What to change when training ran out of GPU memory; the dequantized copy first, where the plan took it."""
    copy = "set FT_DEQUANTIZE_ONCE=false (its bf16 copy of the 4-bit weights is the largest thing the plan added), " \
        if speed.dequantize_once else ""
    return OutOfMemoryError(
        f"out of GPU memory ({str(e).splitlines()[0][:200]}); {copy}lower FT_MICRO_BATCH_TOKENS (the same steps in "
        "smaller micro-batches), use FT_PROFILE=lean or FT_GRADIENT_CHECKPOINTING=true, or shorten FT_MAX_SEQ_LENGTH")


def save_adapter(trainer, path: Path) -> None:
    if not distributed.active():
        trainer.model.save_pretrained(path, safe_serialization=True)
        return
    # Under FSDP, gathering the full state dict is a collective (it lands on rank 0); under DDP every copy is equal.
    state = trainer.accelerator.get_state_dict(trainer.model)
    if distributed.is_main():
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(path, state_dict=state, safe_serialization=True)


def stopped_early(trainer, guard: DivergenceGuard, stopper: Stopper, checkpoints: CheckpointStore) -> None:
    """Raise when training ended because of a non-finite loss or a stop signal."""
    if guard.diverged:
        step, loss = guard.diverged
        dtype = "" if trainer.args.use_cpu or not torch.cuda.is_available() else "FT_COMPUTE_DTYPE=bf16 (or fp32), "
        raise DivergedError(  # the CPU computes in fp32 already (bf16 with 4-bit weights is refused there)
            f"training diverged: loss {loss} at step {step}; try {dtype}a lower FT_LEARNING_RATE (now "
            f"{trainer.args.learning_rate:g}) or a smaller FT_MAX_GRAD_NORM"
        )
    if stopper.requested or stopper.peer_requested:
        step = trainer.state.global_step
        by = stopper.requested or "a signal to another process of the run"
        raise InterruptedJob(f"stopped by {by} at step {step}; checkpoint-{step} is at "
                             f"{checkpoints.store.describe()} and a restart resumes from it")
