"""The base model, quantized as asked, and the LoRA configuration that goes on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from job import log
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


def quantization_config(cfg: Settings, placement: Placement):
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
        # Store in the compute dtype: what FSDP needs to shard 4-bit weights, and no cost otherwise.
        bnb_4bit_quant_storage=placement.dtype,
    )


def resolve_attention(cfg: Settings, placement: Placement) -> str:
    """FT_ATTENTION with `auto` decided: torch's varlen kernel on a GPU that has it (padding-free rows without a
    quadratic block mask; padded rows unpadded), else sdpa. `varlen` is registered with transformers before the model loads."""
    from job import attention

    name = cfg.attention
    kernel = attention.kernel_available(placement.dtype) if placement.device == "cuda" else None
    if name == "auto":
        name = attention.NAME if kernel else "sdpa"  # every profile but `guide` is padding-free
    if name == attention.NAME:
        if kernel is False:
            raise ConfigError([f"FT_ATTENTION=varlen: needs torch >= 2.11's varlen flash kernel, an Ampere or newer "
                               f"GPU and bf16/fp16 (torch {torch.__version__}, {placement.dtype_name}); use auto or sdpa"])
        attention.register()
    log.get().info("attention", implementation=name, requested=cfg.attention)
    return name


def load_model(path: Path, cfg: Settings, placement: Placement):
    from transformers import AutoModelForCausalLM

    log.get().info("loading model", path=str(path), quantization=cfg.quantization, device=placement.device,
                   dtype=placement.dtype_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            quantization_config=quantization_config(cfg, placement),
            dtype=placement.dtype,
            # Under torchrun each process has its GPU (distributed.init); FSDP shards this copy when it wraps.
            device_map={"": torch.cuda.current_device() if placement.device == "cuda" else "cpu"},
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
            attn_implementation=resolve_attention(cfg, placement),
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


def lora_config(cfg: Settings):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
