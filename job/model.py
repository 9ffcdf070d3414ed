"""The base model, quantized as asked, and the LoRA configuration that goes on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from job import distributed, log
from job.config import Settings
from job.errors import ConfigError, InputError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    """Where and in which precision the run computes."""

    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    gpu_name: str | None = None

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)


def resolve_placement(cfg: Settings) -> Placement:
    """Decide device and compute dtype up front, so an impossible combination fails before any download."""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise ConfigError(["FT_DEVICE=cuda: no CUDA GPU is visible to this process; use auto or cpu"])
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and has_cuda) else "cpu"
    if device == "cpu":
        if cfg.compute_dtype in ("bf16", "fp16") and cfg.quantization != "none":
            raise ConfigError([f"FT_COMPUTE_DTYPE={cfg.compute_dtype}: quantized layers compute in fp32 on the CPU; "
                               "use auto or fp32 (or FT_QUANTIZATION=none)"])
        dtype = DTYPES["fp32" if cfg.compute_dtype == "auto" else cfg.compute_dtype]
        return Placement("cpu", dtype)
    bf16_ok = torch.cuda.is_bf16_supported()
    if cfg.compute_dtype == "bf16" and not bf16_ok:
        raise ConfigError(["FT_COMPUTE_DTYPE=bf16: this GPU has no bf16 support (pre-Ampere); use auto or fp16"])
    name = "bf16" if cfg.compute_dtype == "auto" and bf16_ok else "fp16" if cfg.compute_dtype == "auto" else cfg.compute_dtype
    return Placement("cuda", DTYPES[name], torch.cuda.get_device_name())


def quantization_config(cfg: Settings, placement: Placement, sharded: bool = False):
    """The bitsandbytes configuration for FT_QUANTIZATION (None for `none`). `sharded`: the model will be wrapped in
    FSDP (FT_STRATEGY=fsdp with several processes): the 4-bit weights are then stored as bytes, which accelerate leaves
    out of FSDP's sharding (accelerate >= 1.15), so that every GPU keeps them whole. Stored as bf16 words and sharded,
    FSDP2 gave back changed bytes in every 4-bit layer on two H200s (bench/fsdp_probe.py: the layers' outputs 2-14%
    off, the loss 6% off before any update; bench/RESULTS.md run 13): it rewrites the words that read as NaN
    (bitsandbytes-foundation/bitsandbytes#1945)."""
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "none":
        return None
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=placement.dtype,
        bnb_4bit_quant_storage=torch.uint8 if sharded else placement.dtype,
    )


def choose_attention(cfg: Settings, placement: Placement, config) -> tuple[str | None, str]:
    """FT_ATTENTION decided for this model (its transformers config) and placement: (implementation, why).

    `auto`: varlen on a CUDA GPU whose torch has the kernel, when the model's attention is what varlen computes
    (training is padding-free, so varlen always applies); otherwise sdpa where the model class supports it, else
    eager (Gemma-2's soft-capping). None leaves the choice to transformers (a model that could not be inspected).
    An explicit choice the model cannot take is a ConfigError, before any weight is loaded."""
    from job import attention

    found = attention.inspect(config, cfg.trust_remote_code)
    model = found.model_class.__name__ if found.model_class else config.model_type
    fallback = "sdpa" if found.supports_sdpa else "eager" if found.model_class else None
    if cfg.attention == attention.NAME:
        if found.incompatible:
            raise ConfigError([f"FT_ATTENTION=varlen: {model} cannot use it ({found.incompatible}); use auto"])
        if placement.device == "cuda" and not attention.kernel_available(placement.dtype):
            raise ConfigError([f"FT_ATTENTION=varlen: needs torch >= 2.11's varlen flash kernel, an Ampere or newer "
                               f"GPU and bf16/fp16 (torch {torch.__version__}, {placement.dtype_name}); use auto or sdpa"])
        return attention.NAME, "requested" + ("" if placement.device == "cuda" else " (the per-sample CPU reference)")
    if cfg.attention == "flex_attention" and placement.device != "cuda":
        raise ConfigError(["FT_ATTENTION=flex_attention: PyTorch's FlexAttention has no backward pass on the CPU; use "
                           "auto, sdpa or eager"])
    if cfg.attention == "sdpa" and found.model_class and not found.supports_sdpa:
        raise ConfigError([f"FT_ATTENTION=sdpa: {model} does not support sdpa; use auto or eager"])
    if cfg.attention != "auto":
        return cfg.attention, "requested"
    if found.incompatible:
        return fallback, f"{model} needs what varlen cannot compute: {found.incompatible}"
    if placement.device != "cuda":
        return fallback, "on the CPU"
    if not attention.kernel_available(placement.dtype):
        return fallback, f"no varlen kernel here (torch {torch.__version__}, {placement.dtype_name})"
    return attention.NAME, f"{model}'s attention is what varlen computes"


def resolve_attention(cfg: Settings, placement: Placement, config) -> str | None:
    """`choose_attention`, logged in one line, with varlen registered with transformers when chosen."""
    from job import attention

    name, why = choose_attention(cfg, placement, config)
    if name == attention.NAME:
        attention.register()
    log.get().info("attention", implementation=name or "transformers' default", requested=cfg.attention, why=why)
    return name


def load_model(path: Path, cfg: Settings, placement: Placement):
    from transformers import AutoConfig, AutoModelForCausalLM

    log.get().info("loading model", path=str(path), quantization=cfg.quantization, device=placement.device,
                   dtype=placement.dtype_name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(cfg, placement, cfg.shards_model(distributed.world_size())),
            dtype=placement.dtype,
            # Under torchrun each process has its GPU (distributed.init); FSDP shards this copy when it wraps.
            device_map={"": torch.cuda.current_device() if placement.device == "cuda" else "cpu"},
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            attn_implementation=resolve_attention(cfg, placement, config),
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"FT_BASE_MODEL={cfg.base_model}: the model needs its own code; set "
                             "FT_TRUST_REMOTE_CODE=true only if you trust its author") from None
        raise
    model.config.use_cache = False  # the KV cache is useless in training and wastes memory
    if placement.device == "cpu":
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place for bf16 inference at the first
        # no-grad forward (an evaluation) and unpacks them whenever a state dict is taken (a checkpoint). Training
        # numerics would then depend on when evaluations and checkpoints happened, and a resumed run would not
        # reproduce an uninterrupted one. Keep the one fp32 path.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


# Output projections of attention blocks: `auto` adapts the input projections, as peft's defaults do (q_proj,v_proj).
ATTENTION_OUTPUTS = {"o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out"}
GROUPS = {"attention": ("Attention",), "mlp": ("MLP", "Mlp", "FeedForward")}  # parent class names, by substring


def adaptable_modules(model) -> dict[str, str]:
    """Every module of `model` that LoRA can adapt (linear layers, quantized or not, GPT-2's Conv1D, embeddings),
    as full name -> kind: `attention` or `mlp` (by its parent's class name), `output` (the LM head), `embedding`,
    or `other`."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    found = {}
    for parent_name, parent in model.named_modules():
        kind = next((g for g, marks in GROUPS.items() if any(m in type(parent).__name__ for m in marks)), "other")
        for name, child in parent.named_children():
            if isinstance(child, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
                full = f"{parent_name}.{name}" if parent_name else name
                found[full] = "output" if child is output else "embedding" if isinstance(child, torch.nn.Embedding) \
                    else kind
    return found


def _matches(target: str, full_name: str) -> bool:
    """peft's rule for a name in target_modules: the module's full name, or its last dotted parts."""
    return full_name == target or full_name.endswith("." + target)


def resolve_targets(cfg: Settings, model) -> tuple[list[str] | str, str]:
    """FT_LORA_TARGET_MODULES for this model (loaded, or built on the meta device): (what peft's LoraConfig
    takes, why). `auto`: peft's default for the architecture, else the model's attention input projections
    (fused qkv_proj / query_key_value included). In a list, `attention` and `mlp` stand for every linear layer of
    the model's attention or MLP blocks (gate_up_proj, ...). A name that matches no adaptable module, or the LM
    head (trl computes the loss from its weight, so an adapter there never trains), or an embedding layer, is a
    ConfigError listing the names that exist."""
    modules = adaptable_modules(model)
    leaves = lambda kinds: sorted({n.rsplit(".", 1)[-1] for n, k in modules.items() if k in kinds})  # noqa: E731
    setting = f"FT_LORA_TARGET_MODULES={cfg.lora_target_modules}"
    valid = f"valid: auto, all-linear, attention, mlp or names from {', '.join(leaves({'attention', 'mlp', 'other'}))}"
    if cfg.lora_target_modules == "all-linear":
        return "all-linear", "requested"
    if cfg.lora_target_modules == "auto":
        default = _peft_default(model.config.model_type)
        if default and all(any(_matches(t, n) for n in modules) for t in default):
            return default, f"peft's default for {model.config.model_type}"
        attention = leaves({"attention"})
        chosen = [n for n in attention if n not in ATTENTION_OUTPUTS] or attention
        if not chosen:
            raise ConfigError([f"{setting}: no attention projection found in {type(model).__name__}; {valid}"])
        return chosen, f"the attention input projections of {type(model).__name__} (peft has no default for it)"
    chosen = []
    for target in cfg.lora_target_modules.split(","):
        if target in GROUPS:
            chosen += leaves({target})
            continue
        kinds = {k for n, k in modules.items() if _matches(target, n)}
        if not kinds:
            raise ConfigError([f"{setting}: {type(model).__name__} has no linear module named {target!r}; {valid}"])
        if "output" in kinds:
            raise ConfigError([f"{setting}: {target!r} is the LM head, whose adapter would never train (trl computes "
                               f"the loss from its weight directly); {valid}"])
        if "embedding" in kinds:
            raise ConfigError([f"{setting}: {target!r} is an embedding layer: peft then saves the whole embedding "
                               f"matrix in the adapter, and vLLM does not load adapters on embeddings; {valid}"])
        chosen.append(target)
    return list(dict.fromkeys(chosen)), "requested"


def _peft_default(model_type: str) -> list[str] | None:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:  # a peft that moved it: the attention projections serve
        return None
    return list(defaults[model_type]) if defaults.get(model_type) else None


def meta_model(config, trust_remote_code: bool = False):
    """The model `config` describes, built on the meta device: its modules and names, no memory or weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def lora_config(cfg: Settings, model=None):
    """peft's LoraConfig from the settings; with `model`, the targets are resolved for it (and logged), else
    FT_LORA_TARGET_MODULES goes to peft as it is."""
    from peft import LoraConfig

    targets = cfg.target_modules
    if model is not None:
        targets, why = resolve_targets(cfg, model)
        log.get().info("lora targets", modules=targets, requested=cfg.lora_target_modules, why=why)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
        revision=cfg.model_revision,  # adapter_config.json pins the base model's revision for whoever loads it
    )
