"""How a run computes each optimizer step on its hardware: padding-free micro-batches, their size, gradient
checkpointing, fused kernels. Never what a step trains on: that is the recipe (job/steps.py keeps it).

The profile (FT_PROFILE) gives the defaults; an explicit setting always wins. Sizes on a GPU come from the memory
left once the model is loaded and an estimate of activation memory per token, so the same settings fill an H200
and still fit a 24 GB card, and both compute the same steps. bench/NOTES.md says where the estimate comes from and how it compares to measurements.
"""

from __future__ import annotations

import functools
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
# Evaluation runs forward only, one layer's activations at a time: with the varlen kernel (no mask growing with the
# batch) its batches may be larger. At 4 samples per step, evaluating 100 held-out samples in 16,384-token batches
# took 7 launch-bound forwards, ~0.9 s per evaluation on an H200 (bench/RESULTS.md, run 18).
VARLEN_MAX_EVAL_TOKENS = 65536
SDPA_MAX_MICRO_BATCH_TOKENS = 4096
LEAN_MICRO_BATCH_TOKENS = 8192  # with checkpointing: 8.2 GiB peak for a 7B model, all-linear LoRA (bench/RESULTS.md)
SAFETY = 1.5  # allocator fragmentation, LoRA buffers, optimizer temporaries, the estimate's own error


@dataclass(frozen=True)
class SpeedPlan:
    """How one process computes its part of each optimizer step. The step itself (FT_BATCH_SIZE x
    FT_GRADIENT_ACCUMULATION_STEPS samples over all processes, in the sampler's order) is the recipe's and is the
    same in every plan; job/steps.py cuts it into the micro-batches described here."""

    padding_free: bool  # micro-batches flattened into one row with position ids; else padded rows
    micro_batch_tokens: int | None  # padding-free: most tokens per micro-batch (a step above it is split)
    micro_batch_size: int | None  # padded: samples per micro-batch (the guide's per_device_train_batch_size)
    step_samples: int  # samples (or packed rows) per optimizer step and process
    eval_batch_size: int  # samples per evaluation batch and process
    gradient_checkpointing: bool
    liger: bool
    attention: str
    processes: int = 1
    dequantize_once: bool = False  # a bf16 copy of the 4-bit base weights, dequantized once (job/speed.py)
    cuda_graphs: bool = False  # micro-batches padded to buckets and replayed from CUDA graphs (job/graphs.py)

    @property
    def global_batch(self) -> int:
        """Samples (or packed rows) per optimizer step, over every process: FT_BATCH_SIZE x accumulation."""
        return self.step_samples * self.processes


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


def forward_bytes_per_token(model_config) -> float:
    """Bytes per token that a forward pass without gradients (evaluation) holds at once: one layer's activations
    and fp32 logits (4 per vocabulary entry, where a loss computes them whole). A layer is 34*h (as in
    activation_bytes_per_token), or, for an MLP much wider than 4h, its three 16-bit [tokens, intermediate] tensors
    (gate, up, their product) beside four hidden-sized ones. Nothing is kept for a backward pass, so the layers do
    not add up."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    h = c.hidden_size
    intermediate = getattr(c, "intermediate_size", None) or 4 * h
    return max(34 * h, 8 * h + 6 * intermediate) + 4 * c.vocab_size


def plan(cfg: Settings, placement: Placement, model_config, processes: int = 1, dequantized_bytes: int = 0,
         step_tokens: int | None = None, eval_lengths: list[int] | None = None) -> SpeedPlan:
    """The plan for this hardware. `dequantized_bytes`: what a compute-dtype copy of the model's 4-bit weights would
    take (dequantized_size; 0 for a model without them). `step_tokens`: tokens that nearly every optimizer step of
    this process holds (typical_step_tokens; None when unknown). `eval_lengths`: the evaluation samples' token counts
    (None when unknown), which size evaluation batches in samples (eval_batch_samples). Raises ConfigError when the
    global batch cannot be split evenly over the processes, or Liger, FT_DEQUANTIZE_ONCE or FT_CUDA_GRAPHS is asked
    for where it cannot run."""
    gpu = placement.device == "cuda"
    sharded = cfg.shards_model(processes)
    if cfg.dequantize_once and (sharded or not dequantized_bytes):
        why = "not under FSDP (there to save memory); use FT_STRATEGY=ddp" if sharded else "the model has no 4-bit weights"
        raise ConfigError([f"FT_DEQUANTIZE_ONCE=true: {why}"])
    if cfg.dequantize_once and gpu and dequantized_bytes > free_gpu_bytes():
        raise ConfigError([f"FT_DEQUANTIZE_ONCE=true: the {_gib(dequantized_bytes)} GiB copy of the 4-bit weights does "
                           f"not fit in this GPU's {_gib(free_gpu_bytes())} GiB of free memory; leave it unset"])
    attention = getattr(model_config, "_attn_implementation", None) or cfg.attention  # as resolved at load
    if cfg.use_liger and not (gpu and liger_available()):
        raise ConfigError(["FT_USE_LIGER=true: Liger's kernels need a CUDA GPU and the liger-kernel package"])
    # Under FT_COMPILE, inductor fuses what Liger's kernels fuse (RMSNorm, RoPE, SwiGLU), and Liger's Triton kernels
    # fail to build inside a compiled graph (liger-kernel 0.8.5, RMSNorm: "'float' object has no attribute 'to'").
    liger = cfg.use_liger if cfg.use_liger is not None else \
        cfg.profile != "guide" and gpu and liger_available() and not cfg.compile
    if error := cfg.uneven_global_batch(processes, "the run's processes"):
        raise ConfigError([error])
    step = cfg.global_batch // processes
    # Packed rows are always padding-free: padded, their samples would attend to each other.
    padding_free = cfg.padding_free if cfg.padding_free is not None else cfg.profile != "guide" or cfg.packing
    if not padding_free:
        if cfg.cuda_graphs:
            raise ConfigError([f"FT_CUDA_GRAPHS=true: needs padding-free micro-batches, and FT_PROFILE={cfg.profile} "
                               "pads them; set FT_PADDING_FREE=true, or leave FT_CUDA_GRAPHS unset"])
        ckpt = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cfg.profile != "fast"
        micro = min(cfg.batch_size, step)
        return _logged(SpeedPlan(False, None, micro, step, cfg.batch_size, ckpt, liger, attention, processes,
                                 bool(cfg.dequantize_once)))
    # Asked for, the copy comes first and the micro-batch is sized in the memory left beside it.
    forced = dequantized_bytes if cfg.dequantize_once else 0
    tokens, ckpt = _size_micro_batch(cfg, placement, model_config, liger, attention, step, forced, step_tokens)
    dequantize = cfg.dequantize_once
    if dequantize is None:
        dequantize = gpu and cfg.profile == "fast" and not sharded and dequantized_bytes > 0 and \
            tokens * activation_bytes_per_token(model_config, ckpt, liger) * SAFETY + dequantized_bytes <= free_gpu_bytes()
    reserve = dequantized_bytes if dequantize else 0
    graphs = _cuda_graphs(cfg, placement, attention, processes, ckpt, tokens)
    if graphs:  # the graphs' memory pool keeps a micro-batch's activations while evaluation runs beside it
        reserve += int(tokens * activation_bytes_per_token(model_config, ckpt, liger))
    eval_tokens = _eval_tokens(placement, model_config, attention, tokens, reserve,
                               VARLEN_MAX_EVAL_TOKENS if cfg.profile == "fast" else VARLEN_MAX_MICRO_BATCH_TOKENS)
    eval_batch = eval_batch_samples(eval_lengths, eval_tokens, cfg.row_length, processes)
    return _logged(SpeedPlan(True, tokens, None, step, eval_batch, ckpt, liger, attention, processes, dequantize,
                             graphs))


def eval_batch_samples(lengths: list[int] | None, tokens: int, row_length: int, processes: int = 1) -> int:
    """Samples per padding-free evaluation batch and process such that no batch holds more than `tokens` tokens,
    whatever samples it gets: the most samples whose longest `lengths` add up to at most `tokens` (in any order,
    over any process's share), and no more than a process's share of the set (accelerate deals whole batches to the
    processes in turn: one batch of the whole set would leave the others only fill-ups). Without lengths, every
    sample is taken to be `row_length` long (FT_MAX_SEQ_LENGTH). At least 1."""
    if not lengths:
        return max(1, tokens // row_length)
    share = -(-len(lengths) // processes)
    total, count = 0, 0
    for n in sorted(lengths, reverse=True)[:share]:
        if total + n > tokens:
            break
        total, count = total + n, count + 1
    return max(1, count)


def _cuda_graphs(cfg: Settings, placement: Placement, attention: str, processes: int, checkpointing: bool,
                 tokens: int) -> bool:
    """FT_CUDA_GRAPHS for a padding-free plan: asked for, or by default in `fast` where micro-batches are small
    enough to be launch-bound (job/graphs.py MAX_MICRO_BATCH_TOKENS). Raises ConfigError where it was asked for
    and cannot run (the settings' own clashes are refused when they are read)."""
    import torch

    from job.graphs import MAX_MICRO_BATCH_TOKENS

    uses = "FT_PROFILE=lean" if cfg.profile == "lean" else "the micro-batch does not fit in free GPU memory without it"
    why = ("needs a CUDA GPU" if placement.device != "cuda" else
           f"needs the varlen attention kernel (FT_ATTENTION resolved to {attention})" if attention != "varlen" else
           "needs bf16 compute (fp16's loss scaling runs outside a graph)" if placement.dtype != torch.bfloat16 else
           "runs on one process (the gradients' reduction runs outside a graph)" if processes > 1 else
           f"cannot replay gradient checkpointing, which this plan uses ({uses})" if checkpointing else None)
    if cfg.cuda_graphs:
        if why:
            raise ConfigError([f"FT_CUDA_GRAPHS=true: {why}; leave it unset"])
        return True
    return cfg.cuda_graphs is None and why is None and cfg.profile == "fast" and not cfg.compile and \
        not cfg.packing and tokens <= MAX_MICRO_BATCH_TOKENS


def _eval_tokens(placement: Placement, model_config, attention: str, train_tokens: int, reserve: int = 0,
                 cap: int = VARLEN_MAX_EVAL_TOKENS) -> int:
    """Tokens per padding-free evaluation batch (FT_MAX_SEQ_LENGTH-long samples' worth). Evaluation only runs
    forward, keeping one layer's activations at a time, so on a GPU with the varlen kernel it takes the largest
    batch up to `cap` (VARLEN_MAX_EVAL_TOKENS in `fast`; `lean` keeps its memory low with 16,384) whose activations
    fit (forward_bytes_per_token); small training steps would otherwise evaluate in as many small, launch-bound
    forwards (the bench workload's 100 held-out samples: 25 forwards, ~2 s per evaluation on an H200, ~30% of an
    epoch with 10 evaluations; bench/NOTES.md). The reported loss does not depend on it: StepTrainer tallies it per token."""
    if placement.device != "cuda" or attention != "varlen":  # sdpa's dense mask grows with the square of a batch
        return train_tokens
    free = free_gpu_bytes() - reserve
    fits = [t for t in (cap >> i for i in range(7))
            if t * forward_bytes_per_token(model_config) * SAFETY <= free]
    return max([train_tokens, *fits[:1]])


def _gib(n: int) -> float:
    return round(n / 2**30, 1)


def _logged(p: SpeedPlan) -> SpeedPlan:
    if p.processes > 1:
        log.get().info("global batch kept across processes", processes=p.processes, step_samples=p.step_samples,
                       global_batch=p.global_batch)
    return p


def free_gpu_bytes() -> int:
    """What this process may still allocate on its GPU: the device's free memory, or less where a memory fraction
    caps the process (torch.cuda.set_per_process_memory_fraction: a shared GPU, or a smaller card simulated)."""
    import torch

    free, total = torch.cuda.mem_get_info()
    fraction = torch.cuda.get_per_process_memory_fraction() if hasattr(torch.cuda, "get_per_process_memory_fraction") \
        else 1.0
    return int(min(free, fraction * total - torch.cuda.memory_reserved()))


def typical_step_tokens(lengths: list[int], step_samples: int, packing: bool, row_length: int,
                        grouped: bool = False) -> int | None:
    """Tokens that 9 steps in 10 stay within: the 90th percentile of the summed length of `step_samples` samples
    drawn at random (1,000 seeded draws, so every process and attempt agrees), or, `grouped` (FT_GROUP_BY_LENGTH),
    of consecutive runs of the samples sorted by length (transformers' LengthGroupedSampler sorts within random
    mega-batches of 50 steps instead, so with heavy-tailed lengths this reads somewhat low); packed rows are full
    rows (`lengths` unused). None for an empty set. Used to size micro-batches, never to change a step (the recipe's
    sampler draws those): an estimate that reads low only splits more steps in two."""
    import random

    if packing:
        return step_samples * row_length
    if not lengths:
        return None
    k = min(step_samples, len(lengths))
    if grouped:
        ordered = sorted(lengths)
        sums = sorted(sum(ordered[i:i + k]) for i in range(0, len(ordered), k))
    else:
        rng = random.Random(0)
        sums = sorted(sum(rng.sample(lengths, k)) for _ in range(1000))
    return sums[int(0.9 * len(sums))]


def _size_micro_batch(cfg: Settings, placement: Placement, model_config, liger: bool, attention: str,
                      step_samples: int, reserve: int = 0, step_tokens: int | None = None) -> tuple[int, bool]:
    """Tokens per padding-free micro-batch, and whether to checkpoint. Never more than a whole step can hold
    (`step_samples` rows of FT_MAX_SEQ_LENGTH), so a small step is one micro-batch, computed without checkpointing
    wherever that fits in the free GPU memory less `reserve` bytes; `step_tokens` (typical_step_tokens) lets a
    smaller micro-batch that still holds nearly every step whole go without checkpointing."""
    forced, row = cfg.gradient_checkpointing, cfg.row_length
    if placement.device != "cuda":  # checkpointing as the profile says (lean), unless set
        return cfg.micro_batch_tokens or cfg.batch_size * row, forced if forced is not None else cfg.profile == "lean"
    if cfg.profile == "lean":  # sdpa's block mask grows with the square of the micro-batch: its cap holds there too
        lean = LEAN_MICRO_BATCH_TOKENS if attention == "varlen" else SDPA_MAX_MICRO_BATCH_TOKENS
        return cfg.micro_batch_tokens or max(min(lean, step_samples * row), row), forced is not False
    free = free_gpu_bytes() - reserve
    cap = min(VARLEN_MAX_MICRO_BATCH_TOKENS if attention == "varlen" else SDPA_MAX_MICRO_BATCH_TOKENS,
              step_samples * row)
    sizes = [cfg.micro_batch_tokens] if cfg.micro_batch_tokens else \
        [cap >> i for i in range(7) if cap >> i >= row] or [row]  # rows longer than the cap: one per micro-batch
    if forced is not None:
        options = [(tokens, forced) for tokens in sizes]
    else:
        # Recomputing costs about a third more compute, more than a smaller micro-batch down to 4096 tokens costs
        # (bench/RESULTS.md): prefer no checkpointing at the largest size that fits down to there, then
        # checkpointing with the largest micro-batch that fits. Where steps are small, a micro-batch that still
        # holds nearly every step whole adds no micro-batches: under a 24 GiB cap at the guide's 4 samples per step
        # (~1,300 tokens), 2048 tokens without checkpointing trained 4,612 tokens/s against 3,478 for 4096 with it
        # (bench/RESULTS.md, run 14).
        floor = min(SDPA_MAX_MICRO_BATCH_TOKENS, sizes[0])
        if step_tokens:
            floor = min([floor, *(t for t in sizes if t >= step_tokens)])
        options = [(t, False) for t in sizes if t >= floor] + [(t, True) for t in sizes]
    for tokens, ckpt in options:
        if tokens * activation_bytes_per_token(model_config, ckpt, liger) * SAFETY <= free:
            log.get().info("micro-batch sized from free GPU memory", free_gib=round(free / 2**30, 1),
                           micro_batch_tokens=tokens, gradient_checkpointing=ckpt)
            return tokens, ckpt
    smallest = sizes[-1]
    log.get().warning("micro-batch may not fit in free GPU memory", free_gib=round(free / 2**30, 1),
                      micro_batch_tokens=smallest)
    return smallest, forced is not False


def _linear4bit_modules(model) -> list:
    if importlib.util.find_spec("bitsandbytes") is None:
        return []
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def dequantized_size(model, dtype) -> int:
    """Bytes a `dtype` copy of every 4-bit weight of `model` takes (2 per parameter in bf16: ~13 GB for a 7B Llama);
    0 when the model has none."""
    import torch

    per = torch.empty((), dtype=dtype).element_size()
    return sum(m.weight.quant_state.shape.numel() * per for m in _linear4bit_modules(model)
               if getattr(m.weight, "quant_state", None) is not None)


@functools.cache
def _dequantized_class(base: type) -> type:
    import torch

    class Dequantized(base):
        """A bitsandbytes 4-bit linear layer that multiplies by `self.dequantized`, its weight dequantized once to the
        compute dtype, shape (out_features, in_features). bitsandbytes computes F.linear(x, dequantize_4bit(W)) too,
        dequantizing again before every product: in every backward pass, on the CPU, and in CUDA forwards of more
        than ~512 tokens (MatMul4Bit's fallback; below that its fused kernel sums the same products in another order,
        equal up to rounding); here only the dequantization is skipped. The weight needs no gradient, so autograd
        keeps no extra tensor."""

        def forward(self, x):
            w = self.dequantized
            bias = None if self.bias is None else self.bias.to(w.dtype)
            return torch.nn.functional.linear(x.to(w.dtype), w, bias).to(x.dtype)

    Dequantized.__name__ = Dequantized.__qualname__ = f"Dequantized{base.__name__}"
    return Dequantized


def dequantize_once(model, dtype) -> int:
    """FT_DEQUANTIZE_ONCE: give every bitsandbytes 4-bit linear layer of `model` a `dtype` copy of its weight and
    compute with it (the 4-bit weight stays, for checkpoints and merging). Returns the bytes the copies take. Undo
    with release_dequantized."""
    import bitsandbytes.functional as bnbf
    import torch

    total, layers = 0, _linear4bit_modules(model)
    with torch.no_grad():
        for module in layers:
            weight = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
            module.dequantized = weight
            if not hasattr(module, "_class_before_dequantized"):  # a second call renews the copy, never nests
                module._class_before_dequantized = type(module)
                module.__class__ = _dequantized_class(type(module))
            total += weight.numel() * weight.element_size()
    log.get().info("4-bit base weights dequantized once", layers=len(layers), bytes=total, gib=round(total / 2**30, 2),
                   dtype=str(dtype))
    return total


def release_dequantized(model) -> None:
    """Undo dequantize_once: the layers compute from their 4-bit weights again and the copies are freed."""
    for module in _linear4bit_modules(model):
        if hasattr(module, "_class_before_dequantized"):
            module.__class__ = module._class_before_dequantized
            del module.dequantized, module._class_before_dequantized


def compile_layers(model) -> int:
    """FT_COMPILE: compile every decoder layer of `model` (transformers' GradientCheckpointingLayer subclasses) in
    place with torch.compile(dynamic=True), leaving parameter names and state dicts unchanged; returns how many. With
    dynamo's inlining of nn.Modules (torch >= 2.5) the layers share one training graph, whatever the token count
    (StepTrainer evaluates eagerly: eager_evaluation)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # The first layer's input (the embeddings, frozen) needs no gradient, the others' do: two training graphs, each
    # compiled forward and backward (~20 s apiece for a 7B layer on an H200). Asking for the embeddings' gradient
    # gives every layer the same graph for one more input-gradient pass through the first layer (1/L of the
    # backward's activation-gradient work); the LoRA gradients are unchanged.
    model.get_input_embeddings().register_forward_hook(_embeddings_need_grad)
    for layer in layers:
        layer.compile(dynamic=True)
    log.get().info("decoder layers compiled", layers=len(layers), mode="torch.compile(dynamic=True), per layer")
    return len(layers)


def _embeddings_need_grad(module, inputs, output):
    """A forward hook on the input embeddings: their output needs a gradient in training, so that the first decoder
    layer's input is like the others'. transformers' enable_input_require_grads does this under torch.no_grad too,
    where it would give evaluation's first layer a graph of its own."""
    import torch

    if torch.is_grad_enabled():
        output.requires_grad_(True)


def eager():
    """A context in which compiled modules run eagerly: generation (a KV cache would recompile each layer) and, under
    FT_COMPILE, evaluation (StepTrainer.eager_evaluation)."""
    import torch

    return torch.compiler.set_stance("force_eager")  # torch >= 2.6; the lock pins 2.13
