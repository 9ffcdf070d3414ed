"""An optimizer step as the recipe defines it, computed as the speed plan says.

The recipe: an optimizer step trains FT_BATCH_SIZE x FT_GRADIENT_ACCUMULATION_STEPS samples over all processes, in
the sampler's order, and an epoch has ceil(samples / that) steps. The training dataloader therefore yields one batch
per optimizer step and process (the step's samples divided evenly over the processes), and transformers' own
gradient accumulation stays at 1: which samples make step k never depends on the plan, the GPU or the process count.

The plan: `StepCollator` cuts a step into micro-batches (padding-free rows of at most `micro_batch_tokens` tokens,
or the guide's padded micro-batches of FT_BATCH_SIZE samples) and `StepTrainer.training_step` runs forward and
backward on each, every micro-batch's loss summed over its tokens and divided by the trained tokens of the whole
step over every process (the `num_items_in_batch` normalisation of transformers' Trainer, which trl's SFTTrainer
applies). A split step and an unsplit one give the same gradient, up to floating-point summation order.

Evaluation reports the per-token mean over the whole evaluation set (summed losses over summed tokens), so the
figure does not depend on how the evaluation samples are batched or padded.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer

from job import log
from job.config import Settings

IGNORE = -100
STEP_TOKENS = "step_trained_tokens"  # a step batch's key: its trained tokens, counted by StepCollator


class StepCollator:
    """One optimizer step's samples (this process's share) -> {"micro_batches": [batch, ...]}.

    `collate` turns a list of samples into one batch (trl's DataCollatorForLanguageModeling: padding-free, one row
    [1, tokens] with position_ids and cu_seq_lens; or padded rows [samples, longest]). Samples stay in order; a
    micro-batch takes samples while it holds at most `max_tokens` tokens (padding-free) or `max_samples` samples
    (padded). A sample longer than `max_tokens` is a micro-batch of its own. With `bucket_sequences` (CUDA graphs:
    the most samples a micro-batch can hold), each padding-free micro-batch is padded to a bucket (job/graphs.py
    pad_to_bucket); collated here, in the dataloader, so the padding costs the training loop nothing."""

    def __init__(self, collate, max_tokens: int | None = None, max_samples: int | None = None,
                 bucket_sequences: int | None = None):
        if (max_tokens is None) == (max_samples is None):
            raise ValueError("give exactly one of max_tokens (padding-free) and max_samples (padded)")
        if bucket_sequences is not None and max_tokens is None:
            raise ValueError("bucket_sequences (CUDA graphs) needs padding-free micro-batches (max_tokens)")
        self.collate, self.max_tokens, self.max_samples = collate, max_tokens, max_samples
        self.bucket_sequences = bucket_sequences

    def groups(self, lengths: list[int]) -> list[range]:
        """Consecutive index ranges of the step's samples, one per micro-batch."""
        groups, start, tokens = [], 0, 0
        for i, n in enumerate(lengths):
            full = (tokens + n > self.max_tokens) if self.max_tokens else (i - start == self.max_samples)
            if i > start and full:
                groups.append(range(start, i))
                start, tokens = i, 0
            tokens += n
        groups.append(range(start, len(lengths)))
        return groups

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        groups = self.groups([len(f["input_ids"]) for f in features])
        batches = [self.collate([features[i] for i in group]) for group in groups]
        if self.bucket_sequences:
            from job.graphs import pad_to_bucket

            batches = [pad_to_bucket(b, self.bucket_sequences, self.collate.pad_token_id) for b in batches]
        # Counted here, on the host: by training_step, accelerate has moved the micro-batches to the GPU, where
        # reading a count back would wait for the GPU's queue.
        step = {"micro_batches": batches}
        if all(isinstance(b, dict) and "labels" in b for b in batches):
            step[STEP_TOKENS] = sum(int(trained_tokens(b)) for b in batches)
        return step


def trained_tokens(batch: dict[str, Any]) -> torch.Tensor:
    """Tokens whose loss counts in a causal-LM batch: labels other than -100 after the one-token shift (the first
    label of a row predicts nothing; a padding-free row marks each sample's first label -100 already)."""
    return batch["labels"][..., 1:].ne(IGNORE).sum()


class StepTrainer(SFTTrainer):
    """trl's SFTTrainer, fed one batch per optimizer step (see the module's docstring). Set `step_collator`,
    `global_batch` and `group_by_length` before training."""

    step_collator: StepCollator | None = None
    global_batch: int = 1
    group_by_length: bool = False
    # FT_COMPILE: evaluation runs the layers eagerly. Its graph (no gradients) would be a compile of its own, ~15 s
    # cold for a 7B layer on an H200, for ~0.25 s saved per evaluation of 100 samples in 16k-token batches, which
    # are not launch-bound (bench/RESULTS.md run 12): worth it only past ~60 evaluations.
    eager_evaluation: bool = False
    _eval_tally: torch.Tensor | None = None
    # FT_CUDA_GRAPHS (job/graphs.py StepGraphs): training micro-batches replayed from captured graphs
    graphs: Any = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Per mode, since the last log: [entropy sum, correct top-1 predictions, labelled tokens, input tokens].
        self._tallies: dict[str, torch.Tensor] = {}

    def get_train_dataloader(self):
        # Evaluation keeps the plain collator (one batch per call); training batches are whole steps.
        collate, self.data_collator = self.data_collator, self.step_collator
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def get_eval_dataloader(self, eval_dataset=None):
        """transformers' evaluation dataloader; under several processes over a set filled up to a multiple of
        processes x evaluation batch size with samples that carry no loss (`fill_to_multiple`). accelerate otherwise
        evens out the processes' last batches by repeating samples from the start of the set (even_batches), which
        the per-token tally would count twice: a two-GPU evaluation of 60 samples in batches of 32 counted 4 twice
        and reported 1.3% above one GPU's (bench/NOTES.md, issue 19)."""
        if self.accelerator.num_processes == 1:
            return super().get_eval_dataloader(eval_dataset)
        # A named set (of a dict of them) is filled too. Passed on as a dataset, it is cached under "eval", which
        # matters only with persistent dataloader workers (the job has none).
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else \
            eval_dataset if eval_dataset is not None else self.eval_dataset
        return super().get_eval_dataloader(
            fill_to_multiple(dataset, self.accelerator.num_processes * self.args.eval_batch_size))

    def _run_epoch(self, *args, **kwargs):
        # transformers (5.x) trains a step before it compares the step count with max_steps: an attempt resumed from
        # the checkpoint of the run's last step (stopped after saving it, before publishing) would train one step
        # past the recipe when FT_MAX_STEPS ends inside an epoch. There is nothing left to train.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        """The guide's group_by_length over the global step (transformers groups by its per-process batch, which
        would change the data order with the process count); else transformers' seeded random order."""
        if not self.group_by_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        # Seeded on its own: every process draws the same order whatever else consumed the global RNG.
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(self.global_batch, lengths=[len(ids) for ids in dataset["input_ids"]],
                                    generator=torch.Generator().manual_seed(seed))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward over each micro-batch of one optimizer step; returns the step's loss (this
        process's share of the per-token mean, as transformers reports it)."""
        micro_batches = inputs["micro_batches"]
        # Counted by the collator, on the host (a count read back from the GPU would wait for its queue).
        count = inputs.get(STEP_TOKENS)
        count = count if count is not None else sum(int(trained_tokens(mb)) for mb in micro_batches)
        # Graphs capture loss_and_tally, trl's plain loss only (a custom loss, label smoothing or an MoE auxiliary
        # loss goes through trl's compute_loss). An evaluation leaves the model in eval mode until transformers'
        # training_step sets it back: set it here, or the step after every evaluation would run eagerly.
        if self.graphs is not None and self._plain_loss():
            model.train()
            return self._graphed_step(model, micro_batches, count)
        tokens = torch.full((), count, device=self.args.device)
        if self.accelerator.num_processes > 1:
            tokens = self.accelerator.reduce(tokens, reduction="sum")
        loss = torch.zeros((), device=self.args.device)
        for i, batch in enumerate(micro_batches):
            # Gradients are reduced across processes once per step, after the last micro-batch (as transformers
            # does between its accumulation steps).
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = loss + super().training_step(model, batch, num_items_in_batch=tokens)
        return loss

    def _graphed_step(self, model, micro_batches, count: int) -> torch.Tensor:
        """training_step through CUDA graphs (one process; job/graphs.py). `count`: the step's trained tokens,
        counted by StepCollator on the host, so that no read waits for the GPU; a micro-batch that has no
        bucket (more samples than a bucket holds) or no graph computes eagerly, as without graphs."""
        from job.graphs import REAL_TOKENS

        count = torch.full((), count, device=self.args.device)
        if self.graphs.loss_fn is None:
            self.graphs.loss_fn = functools.partial(self.loss_and_tally, model)
        self.graphs.begin_step()
        loss = torch.zeros((), device=self.args.device)
        for batch in micro_batches:
            out = self.graphs.run(batch, count) if REAL_TOKENS in batch else None
            if out is None:
                loss = loss + super().training_step(model, batch, num_items_in_batch=count)
            else:
                loss = loss + out[0]
                self._add_tally("train", out[1])
        self.graphs.end_step()
        return loss

    def floating_point_ops(self, inputs) -> float:
        """transformers' estimate (6 x parameters x input tokens) per micro-batch, over a step's real tokens: the
        padding of a micro-batch padded for CUDA graphs (job/graphs.py REAL_TOKENS) is not counted."""
        from job.graphs import REAL_TOKENS

        if "micro_batches" in inputs:
            return sum(self.floating_point_ops(mb) for mb in inputs["micro_batches"])
        flops = super().floating_point_ops(inputs)
        if REAL_TOKENS in inputs:
            flops *= inputs[REAL_TOKENS] / inputs["input_ids"].numel()
        return flops

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """trl's causal-LM loss (summed over the trained tokens, divided by `num_items_in_batch`), computed here in
        trl's plain case (no custom loss function, label smoothing, MoE auxiliary loss or sequence parallelism) so
        that its entropy, token accuracy and token count stay on the device until a log needs them: trl reads them
        back with three host synchronisations per micro-batch, which drain the queue of kernels that small steps
        depend on. Outputs are built only when asked for (trl 1.16 runs a second forward to return them)."""
        from job.graphs import REAL_TOKENS, unpadded_inputs

        real, inputs = inputs.get(REAL_TOKENS), unpadded_inputs(inputs)  # a micro-batch padded for CUDA graphs
        if return_outputs or not self._plain_loss():
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch) if return_outputs else \
                (super().compute_loss(model, inputs, False, num_items_in_batch), None)
        else:
            seen = real if real is not None else \
                inputs["attention_mask"].sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
            loss, tally = self.loss_and_tally(model, inputs, num_items_in_batch, seen)
            outputs = None
            self._add_tally("train" if model.training else "eval", tally)
        if self._eval_tally is not None and not model.training:  # a per-token mean over this batch: weigh it back
            n = trained_tokens(inputs).to(self._eval_tally.device).double()
            # a batch of fill-ups alone has no tokens (and, through trl's mean, a NaN loss): it adds nothing
            self._eval_tally += torch.stack([torch.where(n > 0, loss.detach().double() * n, 0.0), n])
        return (loss, outputs) if return_outputs else loss

    def loss_and_tally(self, model, inputs, num_items_in_batch, seen) -> tuple[torch.Tensor, torch.Tensor]:
        """compute_loss's plain case: (the loss, [entropy sum, correct top-1 predictions, labelled tokens, `seen`
        input tokens] as float64 on the device). No host synchronisation beyond the model's own, so that
        job/graphs.py can capture it."""
        outputs = model(**{**inputs, "use_cache": False}, fused_lm_head=True)
        labelled = outputs.label_mask.sum()
        count = labelled if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages gradients
        # A host number goes in through a fill, not a copy: a blocking copy to the GPU waits for its queue.
        seen = seen.to(torch.float64) if isinstance(seen, torch.Tensor) else \
            torch.full((), seen, dtype=torch.float64, device=labelled.device)
        tally = torch.cat([torch.stack([outputs.entropy.detach().sum(), outputs.is_top1.sum(), labelled]).double(),
                           seen[None]])
        return loss, tally

    def _add_tally(self, mode: str, tally: torch.Tensor) -> None:
        self._tallies[mode] = tally + self._tallies[mode] if mode in self._tallies else tally

    def _plain_loss(self) -> bool:
        parallel = getattr(self.accelerator, "parallelism_config", None)
        return (self.compute_loss_func is None and self.label_smoother is None and not self.aux_loss_enabled
                and not (parallel is not None and getattr(parallel, "sp_enabled", False)))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """trl's log, with the metrics tallied on the device read back once per log (one host synchronisation per
        logging step instead of three per micro-batch): per-token means over the logging interval."""
        mode = "train" if self.model.training else "eval"
        tally = self._tallies.pop(mode, None)
        if tally is not None:
            if self.accelerator.num_processes > 1:
                tally = self.accelerator.reduce(tally, reduction="sum")
            entropy, correct, labelled, seen = tally.tolist()
            self._metrics[mode]["entropy"] = [entropy / labelled if labelled else 0.0]
            self._metrics[mode]["mean_token_accuracy"] = [correct / labelled if labelled else 0.0]
            if mode == "train":
                self._total_train_tokens += int(seen) // getattr(self, "_tp_size", 1)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """transformers' loop, with `<prefix>_loss` replaced by the per-token mean over every evaluation sample
        (transformers averages per-batch means weighted by rows, which a padding-free row of many samples breaks).
        Under several processes each sample counts once (get_eval_dataloader)."""
        from job.speed import eager

        self._eval_tally = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            with eager() if self.eager_evaluation else contextlib.nullcontext():
                output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                                 metric_key_prefix)
            tally = self._eval_tally
        finally:
            self._eval_tally = None
        if self.accelerator.num_processes > 1:
            tally = self.accelerator.reduce(tally, reduction="sum")
        if tally[1] > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = (tally[0] / tally[1]).item()
        return output


def fill_to_multiple(dataset, multiple: int):
    """`dataset` (a datasets.Dataset of tokenized samples) followed by as many one-token copies of its first sample
    as make its length a multiple of `multiple`. A one-token sample carries no loss: its only label predicts nothing
    (the causal shift drops a row's first label; padding-free, each sample's first label is -100). Per-token columns
    (input_ids, masks) keep their first element; packed rows' `seq_lengths` become [1]."""
    from datasets import Dataset, concatenate_datasets

    missing = -len(dataset) % multiple
    if not missing or not len(dataset):
        return dataset
    first = dataset[0]
    tokens = len(first["input_ids"])
    filler = {k: v[:1] if isinstance(v, list) and len(v) == tokens else v for k, v in first.items()}
    if "seq_lengths" in filler:
        filler["seq_lengths"] = [1]
    return concatenate_datasets([dataset, Dataset.from_list([filler] * missing, features=dataset.features)])


def steps_per_epoch(rows: int, global_batch: int) -> int:
    """Optimizer steps in one pass over `rows` samples (or packed rows): ceil(rows / global batch)."""
    return -(-rows // global_batch)


def recipe_rows(cfg: Settings, samples, global_batch: int) -> tuple[Any, dict]:
    """The rows an epoch trains on, and its optimizer steps: (the samples, or with FT_PACKING the packed rows;
    {"global_batch", "steps_per_epoch"[, "unpacked_steps_per_epoch"]}). `global_batch`: samples (or packed rows) per
    optimizer step over all processes. Logs the steps, and with packing warns that it changes the recipe."""
    rows = pack(samples, cfg.row_length) if cfg.packing else samples
    steps = {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch(len(rows), global_batch)}
    if cfg.packing:
        steps["unpacked_steps_per_epoch"] = steps_per_epoch(len(samples), global_batch)
        log.get().warning(
            "FT_PACKING=true changes the recipe: each packed row counts as one sample of FT_BATCH_SIZE",
            samples=len(samples), packed_rows=len(rows), packing_length=cfg.row_length, **steps)
    else:
        log.get().info("optimizer steps", samples=len(rows), **steps)
    return rows, steps


def pack(dataset, length: int):
    """FT_PACKING: the samples bin-packed into rows of at most `length` tokens with trl's best-fit-decreasing
    packer (no sample is split; each row keeps its samples' lengths in `seq_lengths`, from which the collator
    restarts position ids). Each row then counts as one sample of FT_BATCH_SIZE."""
    from trl.data_utils import pack_dataset

    return pack_dataset(dataset, length, strategy="bfd")
