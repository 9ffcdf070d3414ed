"""CUDA graphs of small training steps (FT_CUDA_GRAPHS): each padding-free micro-batch's forward, loss and backward
replayed from a captured graph instead of launched kernel by kernel.

Why: at the guide's 4 samples per step a step of a 7B QLoRA holds ~1,400 tokens, and launching its ~10,000 kernels
from Python (peft's LoRA layers, transformers' modules, Liger's Triton launches) takes longer than the GPU takes to
run them (bench/NOTES.md, issue 17: ~215 ms per step on an H200 against ~130 ms of kernels). A replay launches the
whole graph at once.

How, with the step unchanged (the plan, not the recipe):
- Shapes must be static, so `pad_to_bucket` pads each micro-batch to the next multiple of BUCKET_TOKENS tokens,
  appending padding sequences (their own positions and sequence boundaries, labels -100): the real tokens attend and
  are scored exactly as without them, the padding carries no loss, and every micro-batch of a bucket has the same
  number of sequence boundaries (max_sequences + 2). One graph per bucket, captured the first time it is met.
- No host synchronisation may happen inside a graph. transformers skips its packed-sequence check while a stream is
  captured (`is_tracing`), the varlen kernel takes the boundaries as a tensor and the bucket as its bound, and trl's
  fused LM head scores every position instead of indexing the labelled ones with a boolean mask
  (`every_position_scored`; the same loss, the unlabelled positions masked to zero).
- Gradients are computed with torch.autograd.grad inside the graph and added into buffers outside it; the optimizer,
  clipping and the learning-rate schedule run eagerly as before.

Dropout draws from CUDA's graph-safe generator: other masks than an eager run, the same distribution (as any
change of kernel). Sources: PyTorch's "CUDA Graphs" notes (whole-network capture, shared memory pools), and
torch.cuda.graph's documentation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from job import log

BUCKET_TOKENS = 256  # padding per micro-batch: < 256 tokens, ~3% of a 1,400-token step's work (bench/NOTES.md)
MAX_MICRO_BATCH_TOKENS = 4096  # where steps are launch-bound; larger micro-batches are GEMM-bound (the `fast` default)
REAL_TOKENS = "real_tokens"  # a padded micro-batch's key: its tokens before padding


def bucket_size(tokens: int, slots: int, multiple: int = BUCKET_TOKENS) -> int:
    """Tokens of the padded micro-batch: `tokens` plus at least `slots` padding tokens (one per padding sequence),
    rounded up to a multiple of `multiple`."""
    return -(-(tokens + slots) // multiple) * multiple


def pad_to_bucket(batch: dict[str, Any], max_sequences: int, pad_id: int, multiple: int = BUCKET_TOKENS) -> dict:
    """A padding-free micro-batch from trl's collator (input_ids, labels, position_ids [1, T]; cu_seq_lens_q/k
    [k + 1] int32; max_length_q/k) -> the same k sequences followed by max_sequences + 1 - k padding sequences, so
    that it holds bucket_size(T, ...) tokens and max_sequences + 2 boundaries, with max_length the bucket (a bound
    for the kernel, fixed per bucket). Padding: `pad_id` tokens, positions restarting at 0, labels -100. Adds
    REAL_TOKENS = T. A micro-batch of more than `max_sequences` sequences is returned unchanged (computed eagerly)."""
    from job.steps import IGNORE as IGNORE_INDEX

    ids, cu = batch["input_ids"], batch["cu_seq_lens_q"]
    tokens, sequences = ids.shape[1], cu.numel() - 1
    if sequences > max_sequences:
        return batch
    slots = max_sequences + 1 - sequences
    size = bucket_size(tokens, slots, multiple)
    lengths = [1] * (slots - 1) + [size - tokens - (slots - 1)]
    positions = torch.cat([torch.arange(n, dtype=batch["position_ids"].dtype) for n in lengths])[None]
    ends = tokens + torch.tensor(lengths).cumsum(0)
    out = dict(batch)
    out["input_ids"] = torch.cat([ids, ids.new_full((1, size - tokens), pad_id)], 1)
    out["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, size - tokens), IGNORE_INDEX)], 1)
    out["position_ids"] = torch.cat([batch["position_ids"], positions], 1)
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = torch.cat([cu, ends.to(cu.dtype)])
    out["max_length_q"] = out["max_length_k"] = size
    if "seq_idx" in batch:  # sequence index per token (trl's collator, for linear-attention layers)
        bounds = out["cu_seq_lens_q"]
        out["seq_idx"] = torch.repeat_interleave(torch.arange(bounds.numel() - 1, dtype=batch["seq_idx"].dtype),
                                                 bounds.diff())[None]
    out[REAL_TOKENS] = tokens
    return out


def unpadded_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch's model inputs: without the REAL_TOKENS marker."""
    return {k: v for k, v in batch.items() if k != REAL_TOKENS}


@contextlib.contextmanager
def every_position_scored():
    """trl's fused LM head (trl.trainer.utils.add_fused_lm_head) on a Triton device selects the labelled positions
    with a boolean mask (`hidden_states[mask]`), which reads their count back to the host. Where Triton is not used
    it scores every position and zeroes the unlabelled ones: the same loss, entropy and accuracy, without the read.
    This makes it take that path (its kernel still runs in Triton: trl.kernels.chunked_logprob decides that itself).
    trl 1.16 (requirements.lock)."""
    import trl.trainer.utils as trl_utils

    chosen = trl_utils._use_triton
    trl_utils._use_triton = lambda device: False
    try:
        yield
    finally:
        trl_utils._use_triton = chosen


# (inputs, count, seen) -> (loss, tally): StepTrainer.loss_and_tally for the model being trained
LossFn = Callable[[dict, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Static:
    """One bucket's graph and the tensors it reads and writes (fixed addresses)."""

    inputs: dict[str, Any]
    count: torch.Tensor  # the step's trained tokens over every micro-batch (the loss's divisor)
    seen: torch.Tensor  # this micro-batch's real tokens (trl's num_tokens metric)
    loss: torch.Tensor
    tally: torch.Tensor
    graph: Any = field(default=None)


class StepGraphs:
    """Captured forward-and-backward graphs of padded micro-batches, one per bucket, for one model being trained on
    one CUDA GPU by one process. Per optimizer step: `begin_step`, then `run` per micro-batch, then `end_step`, which
    adds the step's gradients into each trainable parameter's .grad (creating it), where the optimizer reads them.

    `loss_fn(inputs, count, seen)` -> (loss scalar, tally [4] float64), set before the first `run` (StepTrainer sets
    it to its loss_and_tally for the model it trains), must be free of host synchronisation while a
    stream is captured. The first micro-batch runs eagerly on a side stream before any capture (lazy initialisation:
    cuBLAS workspaces, Triton kernels compiled on first use); later new buckets are captured, then replayed. All
    graphs share one memory pool (they never run at once, and their outputs are copied out before the next replay),
    so the pool holds about one micro-batch's activations; a tensor first allocated inside a capture that outlived it
    (a module's lazily built cache) would be overwritten by other buckets' replays: transformers' models build none
    in training (RoPE tables are computed per forward; dynamic RoPE reads a length back to the host, which fails the
    capture instead). If a capture fails, the rest of the run computes eagerly (`disabled` gives the reason), which
    trains the same steps. `capture=False` computes every micro-batch through the same buffers without graphs (the
    CPU tests: what is captured is this computation; `_record` and `_eager_on_side_stream` are where a CPU test puts
    a recording that runs on replay)."""

    def __init__(self, params, device, loss_fn: LossFn | None = None, capture: bool = True):
        self.loss_fn, self.device, self.capture = loss_fn, device, capture
        self.params = [p for p in params if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.statics: dict[int, _Static] = {}
        self.pool = None  # the graphs' shared memory pool, made at the first capture
        self.warm = False
        self.disabled: str | None = None
        self.captured_seconds = 0.0

    def begin_step(self) -> None:
        torch._foreach_zero_(self.grads)

    def end_step(self) -> None:
        for p, g in zip(self.params, self.grads):
            if p.grad is None:
                p.grad = g
            elif p.grad is not g:  # a micro-batch computed eagerly accumulated there
                p.grad.add_(g)
            # else: the buffer itself, left by a zero_grad(set_to_none=False): it holds the whole step already

    def run(self, batch: dict[str, Any], count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Forward and backward of one padded micro-batch (pad_to_bucket's), gradients added into the step's
        buffers. `count`: the step's trained tokens, a 0-d tensor on the device. Returns (loss, tally) as new
        tensors, or None when graphs are off (the caller then computes the micro-batch eagerly)."""
        if self.disabled:
            return None
        size = batch["input_ids"].shape[1]
        static = self.statics.get(size)
        if static is not None:
            self._fill(static, batch, count)
        else:
            static = self._new_static(batch)
            self._fill(static, batch, count)
            warm_up = self.capture and not self.warm
            if warm_up:  # computes this micro-batch for real, then the capture records without running anything
                self._eager_on_side_stream(static)
                self.warm = True
            if not self.capture or self._capture(static):
                self.statics[size] = static
            elif not warm_up:
                return None
            if warm_up:
                return static.loss.clone(), static.tally.clone()
        if static.graph is None:  # capture=False
            self._compute(static)
        else:
            static.graph.replay()
        return static.loss.clone(), static.tally.clone()

    def _new_static(self, batch) -> _Static:
        # copies: on a GPU the batch is already there (accelerate), and `.to` would return its tensors, which later
        # micro-batches would then be copied into
        inputs = {k: v.to(self.device, copy=True) if isinstance(v, torch.Tensor) else v
                  for k, v in unpadded_inputs(batch).items()}
        return _Static(inputs, torch.zeros((), dtype=torch.long, device=self.device),
                       torch.zeros((), dtype=torch.float64, device=self.device),
                       torch.zeros((), dtype=torch.float32, device=self.device),
                       torch.zeros(4, dtype=torch.float64, device=self.device))

    @staticmethod
    def _fill(static: _Static, batch, count: torch.Tensor) -> None:
        for k, v in static.inputs.items():
            if isinstance(v, torch.Tensor):
                v.copy_(batch[k], non_blocking=True)
        static.count.copy_(count)
        static.seen.fill_(batch[REAL_TOKENS])

    def _compute(self, static: _Static) -> None:
        with every_position_scored():
            loss, tally = self.loss_fn(static.inputs, static.count, static.seen)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        used = [(b, g) for b, g in zip(self.grads, grads) if g is not None]
        torch._foreach_add_([b for b, _ in used], [g for _, g in used])
        static.loss.copy_(loss.detach())
        static.tally.copy_(tally)

    def _eager_on_side_stream(self, static: _Static) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._compute(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # The eager run's activations go back to the driver, for the graphs' pool to take.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def _capture(self, static: _Static) -> bool:
        import time

        start = time.monotonic()
        try:
            static.graph = self._record(static)
        except Exception as e:  # noqa: BLE001 - any capture failure: the run goes on eagerly, the same steps
            cause = e.__context__ or e  # capture_end's "operation failed due to a previous error" hides the cause
            self.disabled = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            captured = len(self.statics)
            self.statics.clear()
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize(self.device)
            log.get().warning("CUDA graphs off: a step could not be captured; computing eagerly",
                              error=self.disabled[:300], buckets_captured=captured)
            return False
        self.captured_seconds += time.monotonic() - start
        log.get().info("CUDA graph captured", tokens=static.inputs["input_ids"].shape[1], graphs=len(self.statics) + 1,
                       capture_seconds=round(time.monotonic() - start, 2))
        return True

    def _record(self, static: _Static):
        """Capture `_compute(static)` into a CUDA graph (nothing runs until it is replayed)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._compute(static)
        except Exception:
            # torch.cuda.graph's exit ends the capture before it leaves its stream: when ending raises, the capture
            # stream would stay current for the rest of the run
            torch.cuda.set_stream(current)
            raise
        return graph

    def release(self) -> None:
        """Drop the graphs and their memory pool (training has ended)."""
        self.statics.clear()
        self.grads = []
        self.disabled = "released"
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()
