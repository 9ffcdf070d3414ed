"""How a run uses its hardware: packing, micro-batch size, gradient checkpointing, fused kernels.

The profile (FT_PROFILE) gives the defaults; an explicit setting always wins. Sizes on a GPU come from the memory
left once the model is loaded and an estimate of activation memory per token, so the same settings fill an H200
and still fit a 24 GB card. bench/NOTES.md says where the estimate comes from and how it compares to measurements.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from job import log
from job.config import Settings
from job.errors import ConfigError
from job.model import Placement

# With sdpa, packed samples are kept apart by a block mask over the whole micro-batch, so attention costs grow with
# the square of its length: on an H200 with a 7B model, 4096-token micro-batches trained fastest (8,175 tokens/s
# against 6,697 at 8192 and 5,078 at 16384). torch's varlen kernel (job/attention.py, FT_ATTENTION=auto on a GPU)
# attends within each sample only: 15,643 tokens/s at 8192 and 16,091 at 16384 (bench/RESULTS.md).
VARLEN_MAX_MICRO_BATCH_TOKENS = 16384
SDPA_MAX_MICRO_BATCH_TOKENS = 4096
LEAN_MICRO_BATCH_TOKENS = 8192  # with checkpointing: 8.2 GiB peak for a 7B model, all-linear LoRA (bench/RESULTS.md)
SAFETY = 1.5  # allocator fragmentation, LoRA buffers, optimizer temporaries, the estimate's own error


@dataclass(frozen=True)
class SpeedPlan:
    packing: bool
    micro_batch_tokens: int | None  # packed: tokens per micro-batch and process; None: padded batches
    gradient_checkpointing: bool
    liger: bool
    attention: str
    batch_size: int = 1  # padded: samples per micro-batch and process
    accumulation: int = 1  # micro-batches per optimizer step and process
    processes: int = 1

    @property
    def global_batch(self) -> int:
        """Samples (padded) or at most tokens (packed) per optimizer step, over every process."""
        return (self.micro_batch_tokens or self.batch_size) * self.accumulation * self.processes


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def activation_bytes_per_token(model_config, checkpointing: bool, liger: bool) -> float:
    """Bytes of activations kept for the backward pass, per token (Korthikanti et al. 2022: about 34*h bytes per
    layer with 16-bit activations and flash-style attention; checkpointing keeps each layer's 2*h-byte input plus
    one layer being recomputed). Logits add 4 bytes per vocabulary entry in fp32, unless Liger fuses them away."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    per_layer = 34 * h
    kept = layers * 2 * h + per_layer if checkpointing else layers * per_layer
    return kept + (0 if liger else 4 * vocab)


def plan(cfg: Settings, placement: Placement, model_config, processes: int = 1) -> SpeedPlan:
    gpu = placement.device == "cuda"
    attention = getattr(model_config, "_attn_implementation", None) or cfg.attention  # as resolved at load
    if cfg.use_liger and not (gpu and liger_available()):
        raise ConfigError(["FT_USE_LIGER=true: Liger's kernels need a CUDA GPU and the liger-kernel package"])
    liger = cfg.use_liger if cfg.use_liger is not None else cfg.profile != "guide" and gpu and liger_available()
    if not cfg.packs:
        ckpt = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cfg.profile != "fast"
        batch, accumulation = split_global_batch(cfg, cfg.batch_size, processes, 1, "FT_BATCH_SIZE")
        return _logged(SpeedPlan(False, None, ckpt, liger, attention, batch, accumulation, processes))
    tokens, ckpt = _size_micro_batch(cfg, placement, model_config, liger, attention)
    tokens, accumulation = split_global_batch(cfg, tokens, processes, cfg.max_seq_length, "FT_MICRO_BATCH_TOKENS")
    return _logged(SpeedPlan(True, tokens, ckpt, liger, attention, 1, accumulation, processes))


def split_global_batch(cfg: Settings, micro: int, processes: int, smallest: int, setting: str) -> tuple[int, int]:
    """The per-process micro-batch and accumulation that keep one process's global batch (micro x
    FT_GRADIENT_ACCUMULATION_STEPS) on `processes` processes: the fewest accumulation steps, with a micro-batch no
    larger than `micro` (what fits) and no smaller than `smallest`."""
    total = micro * cfg.gradient_accumulation_steps
    for accumulation in range(1, cfg.gradient_accumulation_steps + 1):
        per_process, rest = divmod(total, accumulation * processes)
        if not rest and smallest <= per_process <= micro:
            return per_process, accumulation
    raise ConfigError([f"FT_GRADIENT_ACCUMULATION_STEPS={cfg.gradient_accumulation_steps}: the global batch of {total} "
                       f"({setting}={micro} x {cfg.gradient_accumulation_steps}) cannot be split evenly over "
                       f"{processes} processes; make it a multiple of {processes}"])


def _logged(p: SpeedPlan) -> SpeedPlan:
    if p.processes > 1:
        log.get().info("global batch kept across processes", processes=p.processes, accumulation=p.accumulation,
                       **({"micro_batch_tokens": p.micro_batch_tokens} if p.packing else {"batch_size": p.batch_size}),
                       global_batch=p.global_batch, unit="tokens" if p.packing else "samples")
    return p


def free_gpu_bytes() -> int:
    """What this process may still allocate on its GPU: the device's free memory, or less where a memory fraction
    caps the process (torch.cuda.set_per_process_memory_fraction: a shared GPU, or a smaller card simulated)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    fraction = torch.cuda.get_per_process_memory_fraction() if hasattr(torch.cuda, "get_per_process_memory_fraction") \
        else 1.0
    return int(min(free, fraction * total - torch.cuda.memory_reserved()))


def _size_micro_batch(cfg: Settings, placement: Placement, model_config, liger: bool,
                      attention: str) -> tuple[int, bool]:
    forced = cfg.gradient_checkpointing
    if placement.device != "cuda":
        return cfg.micro_batch_tokens or cfg.batch_size * cfg.max_seq_length, bool(forced)
    if cfg.profile == "lean":  # sdpa's block mask grows with the square of the micro-batch: its cap holds there too
        lean = LEAN_MICRO_BATCH_TOKENS if attention == "varlen" else SDPA_MAX_MICRO_BATCH_TOKENS
        return cfg.micro_batch_tokens or max(lean, cfg.max_seq_length), forced is not False
    free = free_gpu_bytes()
    cap = VARLEN_MAX_MICRO_BATCH_TOKENS if attention == "varlen" else SDPA_MAX_MICRO_BATCH_TOKENS
    sizes = [cfg.micro_batch_tokens] if cfg.micro_batch_tokens else \
        [cap >> i for i in range(7) if cap >> i >= cfg.max_seq_length] \
        or [cfg.max_seq_length]  # samples longer than the cap: one sample per micro-batch
    if forced is not None:
        options = [(tokens, forced) for tokens in sizes]
    else:
        # Recomputing costs about a third more compute, more than a smaller micro-batch down to 4096 tokens costs
        # (bench/RESULTS.md): prefer no checkpointing at the largest size that fits down to there, then
        # checkpointing with the largest micro-batch that fits.
        options = [(t, False) for t in sizes if t >= min(SDPA_MAX_MICRO_BATCH_TOKENS, sizes[0])] + \
            [(t, True) for t in sizes]
    for tokens, ckpt in options:
        if tokens * activation_bytes_per_token(model_config, ckpt, liger) * SAFETY <= free:
            log.get().info("micro-batch sized from free GPU memory", free_gib=round(free / 2**30, 1),
                           micro_batch_tokens=tokens, gradient_checkpointing=ckpt)
            return tokens, ckpt
    smallest = sizes[-1]
    log.get().warning("micro-batch may not fit in free GPU memory", free_gib=round(free / 2**30, 1),
                      micro_batch_tokens=smallest)
    return smallest, forced is not False
