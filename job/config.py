"""The job's one typed configuration: `FT_*` environment variables over an optional YAML file.

Precedence, highest first: environment variables, the YAML file named by `FT_CONFIG_FILE` (keys written either as
`lora_r` or `FT_LORA_R`), the defaults below. The defaults are those of the classic "fine-tune Llama-2-7b with
QLoRA" guide, except where the guide is wrong (see each field's description).

Every field's description is user documentation: `finetune-job env`, the README table and the Helm chart's values
are generated from or tested against this file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from job.config_sources import (CONFIG_FILE_VAR, PREFIX, PlatformSource, YamlSource, env_name, field_name,
                                hyperparameters, read_yaml, unknown_settings)
from job.errors import ConfigError
from job.storage.uri import uri_problem

# transformers' optimizer and scheduler names, listed here so that validation needs no heavy import.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adafactor", "adamw_bnb_8bit", "adamw_8bit", "lion_8bit", "lion_32bit",
    "paged_adamw_32bit", "paged_adamw_8bit", "paged_lion_32bit", "paged_lion_8bit", "sgd", "adagrad", "rmsprop",
)
# Not cosine_with_min_lr nor warmup_stable_decay: transformers needs lr_scheduler_kwargs for those (a minimum
# learning rate, the decay steps), which no setting gives; every run with them failed after the model loaded.
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)


class Settings(BaseSettings):
    """All settings of a run. Field name `lora_r` is the variable `FT_LORA_R`."""

    # allow_inf_nan: "inf" is a float to pydantic; as epochs, seconds or a learning rate it failed deep in a run.
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid", validate_default=True, allow_inf_nan=False)

    # --- sources -----------------------------------------------------------------------------------------------
    base_model: str = Field(
        "NousResearch/Llama-2-7b-chat-hf",
        description="Base model: a Hugging Face Hub id (`org/name`, or `hf://org/name`), an S3 prefix holding its "
        "files (`s3://bucket/models/llama-2-7b/`), or a local directory. In a SageMaker training job with an input "
        "channel `model`, that channel's directory.",
    )
    model_revision: str | None = Field(
        None, description="Hub branch, tag or commit of the base model; pin a commit for reproducible runs."
    )
    dataset: str = Field(
        "mlabonne/guanaco-llama2-1k",
        description="Dataset: a Hub dataset id (`org/name`, or `hf://datasets/org/name`), an S3 object or prefix "
        "(`s3://bucket/data/train.jsonl`, `s3://bucket/data/`), or a local file or directory of .jsonl, .json, .csv or "
        ".parquet files. In a SageMaker training job with an input channel `train`, that channel's directory.",
    )
    dataset_revision: str | None = Field(None, description="Hub branch, tag or commit of the dataset.")
    dataset_split: str = Field("train", description="Split of the dataset to train on.")
    eval_split: str | None = Field(
        None,
        description="Existing split to evaluate on; when unset, `FT_EVAL_FRACTION` of the training split is held out.",
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of the training split held out for evaluation (0 disables eval), rounded up to "
        "whole records. Both parts need a record, so a split (or FT_MAX_SAMPLES) with fewer records than that (2 up to "
        "0.5, 10 at 0.9) is a configuration error rather than a run without evaluation."
    )
    dataset_format: Literal["auto", "text", "chat", "alpaca", "prompt_completion", "tokens"] = Field(
        "auto",
        description="Record layout; `auto` detects it from the columns: `input_ids` (pre-tokenized, with optional "
        "`labels`), `messages` or ShareGPT's `conversations` (chat), `instruction`/`output` (alpaca), "
        "`prompt`/`completion`, else the text field.",
    )
    text_field: str = Field("text", description="Column holding the raw text for the `text` format.")
    max_seq_length: int = Field(
        1024, ge=2, description="Tokens per sample, at least 2 (a causal LM learns each token from those before it: "
        "one token alone trains nothing); longer samples are truncated and counted in the log."
    )
    max_samples: int | None = Field(
        None, gt=0, description="Use only the first N records of the training split (and of FT_EVAL_SPLIT), before "
        "FT_EVAL_FRACTION is held out of them (smoke runs); with FT_EVAL_FRACTION above 0, enough that both parts keep "
        "a record (2 at the default 0.1)."
    )
    completion_only_loss: bool = Field(
        True,
        description="Train on response tokens only where the format marks them (prompt/completion, alpaca, chat "
        "assistant turns); the text format always trains on every token.",
    )
    answer_roles: str = Field(
        "assistant",
        description="Roles of the chat turns that are trained, comma-separated (e.g. `assistant`, `gpt`, "
        "`assistant,bot`); every other turn is context. They are rendered as `assistant`, the role chat templates "
        "know. With the default, a conversation that has no `assistant` turn and uses exactly one of `model`, `gpt`, "
        "`bot`, `chatbot` has that one trained (Gemma's and ShareGPT's names; ShareGPT's `human` is rendered as "
        "`user`); a conversation with no answering turn is a bad record (see FT_BAD_RECORDS).",
    )
    bad_records: Literal["drop", "fail"] = Field(
        "drop",
        description="What a record that cannot be used does (a null or empty field, a field of the wrong type, no "
        "answering turn, a chat template or tokenizer that rejects it, e.g. a template that refuses a system "
        "message, or a template whose rendering hides which tokens are the answers): `drop` skips it and logs it by row (counted from 0 in its split), up to "
        "FT_BAD_RECORDS_MAX_FRACTION of the records; `fail` stops the run at the first one, naming its row.",
    )
    bad_records_max_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="Largest share of the records (train and eval together) that may be dropped as bad records; "
        "more stops the run with the first reasons, since so many point to a wrong format or template rather than "
        "to a few broken rows. 0 tolerates none; 1 drops any number.",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model repository. Off unless you trust its author."
    )

    # --- model -------------------------------------------------------------------------------------------------
    quantization: Literal["nf4", "fp4", "int8", "none"] = Field(
        "nf4", description="Base weights: 4-bit nf4 or fp4 (QLoRA), 8-bit, or `none` for plain LoRA."
    )
    double_quant: bool = Field(False, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Compute dtype; `auto` is bf16 on GPUs that support it (Ampere and newer), else fp16, and fp32 on "
        "the CPU. bf16 keeps fp32's exponent range, so it does not overflow where the guide's fp16 can.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where to train: `auto` takes the GPU when there is one, else the CPU."
    )
    lora_r: int = Field(64, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target_modules: str = Field(
        "auto",
        description="Modules that get adapters: `auto` (peft's default per architecture: q_proj,v_proj on Llama, as "
        "in the guide; for an architecture peft has none for, the attention input projections, such as Phi-3's fused "
        "qkv_proj), `all-linear`, or a comma-separated list of module names, where `attention` and `mlp` stand for "
        "every linear layer of the model's attention or MLP blocks (`attention,mlp`: qkv_proj, o_proj, gate_up_proj, "
        "down_proj on Phi-3). A name that matches no linear layer of the model, or the LM head, is refused before "
        "training with the names that exist.",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")

    # --- training ----------------------------------------------------------------------------------------------
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(
        4, gt=0, description="Samples per micro-batch in the guide's terms (its per_device_train_batch_size): an "
        "optimizer step trains FT_BATCH_SIZE x FT_GRADIENT_ACCUMULATION_STEPS samples over all processes, whatever the "
        "profile, the GPU, its free memory or the process count. The `guide` profile also computes each step in padded "
        "micro-batches of this many samples."
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Multiplies FT_BATCH_SIZE into the samples per optimizer step (the global batch, over "
        "all processes). How a step is computed (micro-batches, accumulation, processes) is the profile's business; "
        "with N processes the global batch must be a multiple of N."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.001, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming the learning rate up.")
    lr_scheduler_type: str = Field("cosine", description=f"Learning-rate schedule: one of {', '.join(SCHEDULERS)}.")
    optim: str = Field(
        "paged_adamw_32bit",
        description="Optimizer (transformers' names). AdamW with 32-bit states (`paged_adamw_32bit`, the guide's, "
        "`adamw_torch`, `adamw_torch_fused`) is one update whichever code computes it: it runs as torch's fused AdamW "
        "on a GPU and torch's AdamW on the CPU. Other bitsandbytes optimizers (8-bit states) need CUDA; on the CPU "
        "`adamw_torch` is used instead. The log says which implementation runs.",
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for data order, LoRA initialisation and dropout (0 to "
                      "2^32 - 1, numpy's range).")
    logging_steps: int = Field(25, gt=0, description="Log (and write TensorBoard scalars) every N optimizer steps.")
    eval_steps: int = Field(25, gt=0, description="Evaluate every N optimizer steps.")

    group_by_length: bool = Field(
        True, description="Put samples of similar length in the same optimizer steps (the guide's group_by_length; "
        "groups of 50 steps, shuffled). Part of the data order: the same in every profile."
    )
    packing: bool = Field(
        False, description="Bin-pack samples (best-fit decreasing, never splitting a sample) into rows of up to "
        "FT_PACKING_LENGTH tokens, each row counting as one sample of FT_BATCH_SIZE. This changes the recipe: an "
        "optimizer step holds several times more tokens and an epoch has that many times fewer steps (the log and the "
        "manifest say how many against the unpacked recipe), so the model may learn less per epoch. Off by default."
    )
    packing_length: int | None = Field(
        None, gt=0, description="Tokens per packed row with FT_PACKING=true; default FT_MAX_SEQ_LENGTH."
    )

    # --- speed: how a step is computed; the profile sets these unless they are given ----------------------------
    profile: Literal["fast", "lean", "guide"] = Field(
        "fast",
        description="How the hardware computes each optimizer step, never what it trains (samples per step, steps per "
        "epoch and data order are the same in every profile). `fast`: padding-free steps, micro-batches sized from "
        "free GPU memory, gradient checkpointing only when they would not fit, Liger kernels on a GPU, and the 4-bit "
        "weights dequantized once where the copy fits (FT_DEQUANTIZE_ONCE). `lean`: the "
        "same with gradient checkpointing and micro-batches of 8192 tokens (4096 with sdpa), for 16-24 GB GPUs. "
        "`guide`: the guide's computation: padded micro-batches of FT_BATCH_SIZE samples, gradient checkpointing, no Liger.",
    )
    padding_free: bool | None = Field(
        None, description="Flatten each micro-batch's samples into one row with position ids restarting at each "
        "sample: no padding, and samples never attend to each other. Default: on, except in the `guide` profile."
    )
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="Most tokens per padding-free micro-batch and process. A step whose samples hold more "
        "is split at sample boundaries into micro-batches whose gradients are accumulated, the loss normalised over "
        "the whole step's tokens, so the update is that of the unsplit step. At least one sample (FT_MAX_SEQ_LENGTH, "
        "or FT_PACKING_LENGTH). Default (`fast`): the largest that fits in free GPU memory, up to 16384 with the "
        "varlen kernel or 4096 with sdpa; 8192 (`lean`; 4096 with sdpa); FT_BATCH_SIZE x FT_MAX_SEQ_LENGTH on the CPU."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in the backward pass to save memory. Default: on in `lean` and "
        "`guide`, and in `fast` only when the micro-batch would not fit without it."
    )
    use_liger: bool | None = Field(
        None, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy). Default: "
        "on with a CUDA GPU when liger-kernel is installed, except in the `guide` profile."
    )
    dequantize_once: bool | None = Field(
        None, description="Keep a compute-dtype (bf16) copy of the frozen 4-bit base weights on the GPU, dequantized "
        "once, instead of dequantizing each weight before every matrix product (twice per weight and micro-batch, "
        "three times with gradient checkpointing). The products are QLoRA's own (bitsandbytes multiplies by the "
        "dequantized weight too); it costs 2 bytes per base parameter (~13 GB for a 7B model) and saves the "
        "dequantization kernels and their launches. Default: on in `fast` on a GPU when the copy fits beside the "
        "micro-batch without changing its size or checkpointing, and not under FSDP (there to save memory). "
        "`true`: the copy first, and micro-batches sized in the memory it leaves. Released when training ends.",
    )
    compile: bool = Field(
        False, description="Regional compilation: torch.compile each decoder layer (dynamic token counts, one graph "
        "shared by the layers) so that a step launches fewer, fused kernels. The same steps within numerical noise "
        "(with LoRA dropout, other random masks: the same in distribution); evaluation and generation (sample answers) "
        "run eagerly; "
        "Liger's kernels are left off (torch.compile fuses the same operations). On an H200 with a 7B model at 4 "
        "samples per step, steady steps run 1.6x as fast after a one-time compile of ~90 s (~45 s with a warm "
        "TORCHINDUCTOR_CACHE_DIR): worth it from ~1,000 steps on (bench/RESULTS.md, run 12).",
    )
    cuda_graphs: bool | None = Field(
        None, description="Replay each small training micro-batch's forward and backward from a captured CUDA graph "
        "instead of launching its kernels one by one (job/graphs.py). Micro-batches are padded to the next multiple "
        "of 256 tokens with padding sequences that carry no loss, and one graph is captured per size met: the same "
        "steps within numerical noise (with LoRA dropout, other random masks). Default: on in `fast` on a GPU for "
        "padding-free micro-batches of up to 4096 tokens with the varlen kernel, in bf16, one process, without "
        "gradient checkpointing, FT_PACKING or FT_COMPILE; where a capture fails, the run goes on eagerly. On an H200 "
        "with a 7B model at 4 samples per step, steady steps run 2.4x as fast (14,357 against 5,862 tokens/s), after "
        "~0.2 s of capture per size (bench/RESULTS.md, run 18).",
    )
    attention: Literal["auto", "varlen", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="Attention implementation. `varlen`: torch's variable-length flash attention (torch >= "
        "2.11, Ampere or newer GPU, bf16/fp16), which attends within each sample of a padding-free row and builds no "
        "mask; on the CPU a per-sample reference. `sdpa`, `flex_attention`, `eager`: the samples of a padding-free row "
        "are kept apart by a block mask. Default: `varlen` on a GPU that has it when the model's attention is what it "
        "computes (sliding windows included); else `sdpa`, or `eager` for a model without sdpa support (Gemma-2's "
        "logit soft-capping). The log says which and why."
    )

    # --- outputs -----------------------------------------------------------------------------------------------
    output_uri: str = Field(
        "./results",
        description="Destination: a local directory or `s3://bucket/prefix` (results in `<output>/<run id>/`, the "
        "manifest last), or `hf://org/name`, a Hub model repository that receives each run as one commit (adapter and "
        "tokenizer at its root). In a SageMaker training job the default is /opt/ml/model (SM_MODEL_DIR), which "
        "SageMaker uploads as model.tar.gz.",
    )
    run_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Name of this run at the destination and of its checkpoints. Default: the batch service's job id "
        "(AWS_BATCH_JOB_ID, CLOUD_RUN_EXECUTION, BATCH_JOB_UID, SageMaker's TRAINING_JOB_NAME), which every attempt "
        "of one job shares, so that a retried job resumes, else a fingerprint of the settings (`run-<12 hex>`). The "
        "Helm chart sets it to the Kubernetes Job's name.",
    )
    overwrite: bool = Field(False, description="Replace a completed run with the same run id at the destination.")
    work_dir: Path = Field(
        Path("/tmp/finetune-job"), description="Local scratch space for downloads and training output. An empty value "
        "is refused, as for the other paths (it would be the current directory)."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="`json` lines, or a `console` with a progress bar; `auto` picks console on a TTY."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")
    termination_log: Path | None = Field(
        Path("/dev/termination-log"), description="File that gets a one-line reason when the job ends in failure; "
        "empty: none is written. In a SageMaker training job the default is /opt/ml/output/failure, which SageMaker "
        "reports as the job's failure reason."
    )

    # --- quality: what every run shows of what it learned, and what it exports ----------------------------------
    # The environment's value is a JSON list in a string (NoDecode: left to _sample_prompts, which says what is wrong
    # with it); FT_CONFIG_FILE and the chart's values may give the list itself.
    sample_prompts: Annotated[str | list[str] | None, NoDecode] = Field(
        None, description="Prompts answered greedily before and after training, as a JSON list of strings "
        "(`[\"Write 12 in words.\", \"What is the plural of leaf?\"]`; in FT_CONFIG_FILE or the chart's values, "
        "a list), each rendered as a user turn by the chat "
        "template. Default: the first FT_SAMPLE_COUNT evaluation samples, cut where their answer begins. The answers "
        "go to the model card, the manifest and TensorBoard (text)."
    )
    sample_count: int = Field(
        3, ge=0, le=64, description="Evaluation samples answered before and after training when FT_SAMPLE_PROMPTS is "
        "unset; 0 generates nothing (and checks no stops)."
    )
    sample_max_new_tokens: int = Field(
        64, gt=0, le=4096, description="Token budget of each sample answer: an answer that has not produced an "
        "end-of-turn token (EOS, `<|im_end|>`...) within it counts as not stopping."
    )
    quality_check: Literal["warn", "fail"] = Field(
        "warn", description="A run whose eval loss did not fall, or fewer than half of whose sample answers stop within "
        "FT_SAMPLE_MAX_NEW_TOKENS, logs a warning that says what to change (`warn`); `fail` also ends it with exit "
        "code 9 once its results are published (the manifest's `quality.problems` lists why). `fail` with nothing to "
        "check is a configuration error: no eval loss (FT_EVAL_FRACTION=0, no FT_EVAL_SPLIT) and no sample answers "
        "(no FT_SAMPLE_PROMPTS, or FSDP over several processes, which skips them)."
    )
    export: Literal["adapter", "merged"] = Field(
        "adapter", description="`merged` also writes `merged/`: the LoRA merged into a bf16 copy of the base model "
        "(loaded unquantized on the CPU, never merged into 4-bit weights), as safetensors with the tokenizer, for "
        "servers without LoRA support. Needs host memory for the whole model in bf16 (2 bytes per parameter). A run "
        "already completed without `merged/` is a configuration error with `merged` unless FT_OVERWRITE=true (it "
        "trains and publishes again)."
    )

    # --- remote storage ---------------------------------------------------------------------------------------------
    hub_private: bool = Field(
        True, description="Create the Hub repository of `FT_OUTPUT_URI=hf://org/name` as private when it does not "
        "exist yet (an existing one keeps its visibility)."
    )
    hub_revision: str | None = Field(
        None, description="Branch of the Hub repository to commit results to, created when missing; default: `main`."
    )
    tb_sync_seconds: float = Field(
        60, ge=0, description="Copy TensorBoard event files to `<output>/<run id>/tensorboard/` every N seconds while "
        "training and once at the end, so TensorBoard can follow the run there; 0 copies them with the results only. "
        "Not on the Hub, where every copy would be a commit."
    )
    storage_attempts: int = Field(
        8, ge=1, le=100, description="Attempts of each S3 request, the first included, on throttling, 5xx answers, "
        "timeouts and dropped connections, with exponential backoff (botocore's standard retry mode); also of a Hub "
        "commit."
    )
    storage_timeout_seconds: float = Field(
        60, gt=0, description="Connect and read timeout of one S3 or Hub request: a transfer that stalls this long is "
        "retried, and fails when its attempts are spent. Start-up checks wait at most 10 s, twice."
    )
    storage_deadline_seconds: float = Field(
        3600, gt=0, description="Upper bound on one whole S3 transfer (a model download, the results upload) and on "
        "retrying a Hub commit, retries included: past it no request is sent and the transfer fails."
    )

    # --- resilience: checkpoints, resume, signals, preflight ----------------------------------------------------
    save_steps: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (0: only by time and on SIGTERM).")
    save_minutes: float = Field(
        10.0, ge=0, description="Checkpoint when this many minutes have passed since the last one (0 disables)."
    )
    checkpoint_uri: str | None = Field(
        None, description="Where checkpoints are mirrored; default `<FT_OUTPUT_URI>/<run id>/checkpoints`. A run "
        "finds its latest complete checkpoint there on start and resumes from it."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept at the checkpoint URI; older ones are pruned.")
    on_data_change: Literal["fail", "restart"] = Field(
        "fail", description="When checkpoints of this run id were trained on other data than FT_DATASET holds now (a "
        "file edited in place, a new Hub commit or S3 object; each checkpoint carries the data's sha256, or its Hub "
        "commit): `fail` stops before the model loads, with exit code 2, and keeps them; `restart` deletes them and "
        "trains from step 0 on the new data. A training is never resumed on other data."
    )
    termination_grace_seconds: float = Field(
        25.0, gt=0,
        description="Budget after SIGTERM to finish the step and save a checkpoint; keep it below the pod's "
        "terminationGracePeriodSeconds (Kubernetes' default is 30; AWS Batch's and Google Cloud Batch's stop also "
        "kill after 30 s). In a SageMaker training job the default is 110, below its 120-second stop.",
    )
    lease_ttl_seconds: float = Field(
        60, ge=1, le=3600, description="A run holds a lease at its checkpoint URI (`lease.json`) while it trains and "
        "publishes, renewed every TTL/4; another attempt of the same run id takes it over once its heartbeat is older "
        "than this (the holder was killed), with a warning naming the holder."
    )
    lease_wait_seconds: float = Field(
        90, ge=0, description="How long an attempt that finds the run's lease held by a live attempt waits for it to "
        "be released or go stale, then exits with code 10 (busy, retriable) naming the holder. Longer than "
        "FT_LEASE_TTL_SECONDS, a retry after a kill -9 takes the dead attempt's lease over instead of failing."
    )
    require_gpu: bool = Field(False, description="Fail in preflight when no CUDA GPU (or, for bf16, no bf16 support) is visible.")

    # --- scale out: several GPUs and nodes (torchrun) -------------------------------------------------------------
    nproc_per_node: int | None = Field(
        None, gt=0, description="Training processes on this node, one per GPU. Default: every visible GPU (1 on the "
        "CPU). More than one, or FT_NNODES above 1, re-launches the job under torchrun; the global batch stays what one "
        "process would train (see FT_GRADIENT_ACCUMULATION_STEPS)."
    )
    nnodes: int = Field(
        1, ge=1, description="Nodes that train together. Above 1, torchrun's c10d rendezvous meets at "
        "MASTER_ADDR:MASTER_PORT (the Helm chart sets both) and each node needs a rank (FT_NODE_RANK)."
    )
    node_rank: int | None = Field(
        None, ge=0, description="This node's rank, 0 to FT_NNODES-1; node 0 hosts the rendezvous. Default: "
        "JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs and JobSets), else AWS_BATCH_JOB_NODE_INDEX."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: `ddp` gives each GPU its own copy of the model; `fsdp` (FSDP2) shards "
        "each 16-bit weight, the LoRA weights, their gradients and optimizer state over the GPUs: all of the model with "
        "FT_QUANTIZATION=none (LoRA on a model that does not fit one GPU in 16 bits). 4-bit weights stay whole on each "
        "GPU: sharded as 16-bit words, FSDP2 gave some of them back changed (bench/RESULTS.md, run 13)."
    )
    dist_timeout_seconds: float = Field(
        1800, gt=0, description="A rendezvous or collective (all-reduce, barrier) that waits longer than this, because "
        "a peer died or hangs, ends the run with exit code 8 (retriable) instead of hanging until the Job's deadline."
    )

    @field_validator("answer_roles")
    @classmethod
    def _answer_roles(cls, v: str) -> str:
        roles = [r.strip() for r in v.split(",") if r.strip()]
        if not roles:
            raise ValueError("must name at least one role, e.g. `assistant` or `assistant,bot`")
        if asking := [r for r in roles if r.lower() in ("user", "human", "system", "tool")]:
            raise ValueError(f"{', '.join(asking)} asks, it does not answer: training on it would train on the prompts; "
                             "name the answering roles, e.g. `assistant` or `assistant,bot`")
        return ",".join(roles)

    @field_validator("sample_prompts", mode="before")
    @classmethod
    def _sample_prompts(cls, v: Any) -> str | None:
        import json

        if isinstance(v, list):  # from a YAML file: kept as the JSON the environment would give
            v = json.dumps(v, ensure_ascii=False)
        if v is not None:
            _prompt_list(v if isinstance(v, str) else "")  # a number or a mapping: what is valid, said as for text
        return v

    @field_validator("work_dir", mode="before")
    @classmethod
    def _work_dir_given(cls, v: Any) -> Any:
        # Path("") is the current directory: downloads, checkpoints and their clean-up would land where the job started.
        if isinstance(v, str) and not v.strip():
            raise ValueError("empty; give a local directory for scratch space, or leave it unset for /tmp/finetune-job")
        return v

    @field_validator("termination_log", mode="before")
    @classmethod
    def _no_termination_log_when_empty(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v  # as signals.termination_log_path reads it

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v not in OPTIMIZERS:
            raise ValueError(f"must be one of {', '.join(OPTIMIZERS)}")
        return v

    @field_validator("base_model", "dataset")
    @classmethod
    def _known_source_scheme(cls, v: str) -> str:
        return _uri(v, "source")

    @field_validator("output_uri")
    @classmethod
    def _known_destination_scheme(cls, v: str) -> str:
        return _uri(v, "destination")

    @field_validator("checkpoint_uri")
    @classmethod
    def _known_checkpoint_scheme(cls, v: str | None) -> str | None:
        return None if v is None else _uri(v, "checkpoints")

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v not in SCHEDULERS:
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}")
        return v

    @model_validator(mode="after")
    def _packed_rows_are_padding_free(self) -> Settings:
        if self.packing and self.padding_free is False:
            raise ValueError("FT_PACKING=true with FT_PADDING_FREE=false: a padded packed row would let its samples "
                             "attend to each other; leave FT_PADDING_FREE unset (packed rows are always padding-free)")
        return self

    @model_validator(mode="after")
    def _micro_batch_holds_a_sample(self) -> Settings:
        if self.packing_length is not None and self.packing_length < self.max_seq_length:
            raise ValueError(f"FT_PACKING_LENGTH={self.packing_length}: must hold one whole sample of "
                             f"FT_MAX_SEQ_LENGTH={self.max_seq_length} tokens")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < self.row_length:
            what = "packed row of FT_PACKING_LENGTH" if self.packing else "sample of FT_MAX_SEQ_LENGTH"
            raise ValueError(f"FT_MICRO_BATCH_TOKENS={self.micro_batch_tokens}: must hold one whole {what}="
                             f"{self.row_length} tokens")
        return self

    @model_validator(mode="after")
    def _no_setting_is_silently_ignored(self) -> Settings:
        padded = self.padding_free is False or (self.padding_free is None and self.profile == "guide" and
                                                not self.packing)
        if self.micro_batch_tokens is not None and padded:
            raise ValueError(f"FT_MICRO_BATCH_TOKENS={self.micro_batch_tokens}: sizes padding-free micro-batches, "
                             f"and this run pads them (FT_PROFILE={self.profile}, FT_PADDING_FREE="
                             f"{self.padding_free}: FT_BATCH_SIZE samples each); set FT_PADDING_FREE=true or leave it "
                             "unset")
        if self.packing_length is not None and not self.packing:
            raise ValueError(f"FT_PACKING_LENGTH={self.packing_length}: only with FT_PACKING=true")
        if self.eval_split is not None and self.eval_split == self.dataset_split:
            raise ValueError(f"FT_EVAL_SPLIT={self.eval_split}: the split it trains on (FT_DATASET_SPLIT); evaluate on "
                             "another split, or leave it unset to hold out FT_EVAL_FRACTION of the training split")
        return self

    @model_validator(mode="after")
    def _max_samples_leave_both_splits_a_sample(self) -> Settings:
        needed = self.records_to_split
        if self.max_samples is not None and needed and self.max_samples < needed:
            raise ValueError(f"FT_MAX_SAMPLES={self.max_samples}: too few records to hold out FT_EVAL_FRACTION="
                             f"{self.eval_fraction:g} for evaluation and keep one for training; use "
                             f"FT_MAX_SAMPLES={needed} or more, or FT_EVAL_FRACTION=0 to train without evaluation")
        return self

    @model_validator(mode="after")
    def _a_failing_quality_check_has_something_to_check(self) -> Settings:
        # The processes as far as the settings tell (as for FT_DEQUANTIZE_ONCE); FT_NPROC_PER_NODE's default, one per
        # visible GPU, is counted by distributed.check_launch, before any download.
        if error := self.nothing_to_check((self.nproc_per_node or 1) * self.nnodes):
            raise ValueError(error)
        return self

    @model_validator(mode="after")
    def _global_batch_splits_over_the_processes(self) -> Settings:
        # Only for an explicit FT_NPROC_PER_NODE: its default (one per visible GPU) is counted by
        # distributed.check_launch, before any download.
        if self.nproc_per_node and (error := self.uneven_global_batch(
                self.nproc_per_node * self.nnodes, f"FT_NPROC_PER_NODE={self.nproc_per_node} x FT_NNODES={self.nnodes}")):
            raise ValueError(error)
        return self

    @model_validator(mode="after")
    def _compiled_without_liger(self) -> Settings:
        if self.compile and self.use_liger:
            raise ValueError("FT_USE_LIGER=true with FT_COMPILE=true: Liger's Triton kernels fail to build inside "
                             "torch.compile's graphs (liger-kernel 0.8.5), and torch.compile fuses the same "
                             "operations itself; leave FT_USE_LIGER unset")
        return self

    @model_validator(mode="after")
    def _graphs_where_they_can_run(self) -> Settings:
        if not self.cuda_graphs:
            return self
        for clash, why in ((self.compile, "FT_COMPILE=true (compiled layers are a different plan)"),
                           (self.packing, "FT_PACKING=true (a packed row holds any number of samples)"),
                           (self.gradient_checkpointing, "FT_GRADIENT_CHECKPOINTING=true (its recomputation "
                                                         "saves random-number state, which a capture cannot)"),
                           (self.padding_free is False, "FT_PADDING_FREE=false (graphs replay padding-free "
                                                        "micro-batches)")):
            if clash:
                raise ValueError(f"FT_CUDA_GRAPHS=true with {why}; leave FT_CUDA_GRAPHS unset")
        return self

    @model_validator(mode="after")
    def _dequantize_4bit_only(self) -> Settings:
        if self.dequantize_once and self.quantization not in ("nf4", "fp4"):
            raise ValueError(f"FT_DEQUANTIZE_ONCE=true: needs 4-bit base weights (FT_QUANTIZATION=nf4 or fp4), not "
                             f"FT_QUANTIZATION={self.quantization}")
        if self.dequantize_once and self.strategy == "fsdp" and ((self.nproc_per_node or 1) * self.nnodes > 1):
            raise ValueError("FT_DEQUANTIZE_ONCE=true with FT_STRATEGY=fsdp: FSDP is there to save memory per GPU, "
                             "and the copy costs 2 bytes per base parameter on each; use FT_STRATEGY=ddp or leave "
                             "FT_DEQUANTIZE_ONCE unset")
        return self

    @model_validator(mode="after")
    def _node_rank_in_range(self) -> Settings:
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(f"FT_NODE_RANK={self.node_rank}: must be below FT_NNODES={self.nnodes}")
        return self

    @field_validator("lora_target_modules")
    @classmethod
    def _target_modules(cls, v: str) -> str:
        names = [m.strip() for m in v.split(",") if m.strip()]
        if not names:
            raise ValueError("must be `auto`, `all-linear` or a comma-separated list of module names")
        return ",".join(names)

    @property
    def sample_prompt_list(self) -> list[str]:
        """FT_SAMPLE_PROMPTS as a list of prompts ([] when unset)."""
        return _prompt_list(self.sample_prompts) if self.sample_prompts else []

    @property
    def row_length(self) -> int:
        """Most tokens of one training row: a sample (FT_MAX_SEQ_LENGTH), or a packed row (FT_PACKING_LENGTH)."""
        return (self.packing_length or self.max_seq_length) if self.packing else self.max_seq_length

    @property
    def global_batch(self) -> int:
        """Samples (packed rows with FT_PACKING) per optimizer step, over all processes: the recipe's step."""
        return self.batch_size * self.gradient_accumulation_steps

    def uneven_global_batch(self, processes: int, counted: str) -> str | None:
        """The one-line error when the global batch (samples per optimizer step) does not split evenly over
        `processes` processes, else None. `counted` says where the count came from (the settings, the visible GPUs,
        torchrun's world size). The recipe is the user's: the remedies change the global batch or the process count,
        never one for the other silently."""
        if self.global_batch % processes == 0:
            return None
        return (f"FT_BATCH_SIZE={self.batch_size} x FT_GRADIENT_ACCUMULATION_STEPS={self.gradient_accumulation_steps}: "
                f"the global batch of {self.global_batch} samples cannot be split evenly over {processes} processes "
                f"({counted}); make it a multiple of {processes}, or set FT_NPROC_PER_NODE to fewer processes that "
                "it splits over (the recipe stays as set)")

    def shards_model(self, processes: int) -> bool:
        """Whether FSDP shards the model over `processes` processes (FT_STRATEGY=fsdp and more than one): then the 4-bit
        weights are stored as bytes (model.quantization_config), no dequantized copy is taken (speed.plan) and the
        Trainer wraps the model in FSDP2 (train.sft_config)."""
        return processes > 1 and self.strategy == "fsdp"

    @property
    def records_to_split(self) -> int | None:
        """The fewest records of the training split that FT_EVAL_FRACTION divides into an evaluation and a training
        part of one record or more each (datasets' train_test_split holds out ceil(fraction x records)); None when
        nothing is held out (FT_EVAL_SPLIT set, or FT_EVAL_FRACTION=0)."""
        if self.eval_split is not None or self.eval_fraction <= 0:
            return None
        n = 2
        while math.ceil(self.eval_fraction * n) >= n:  # datasets' own arithmetic (floats), not a derived bound
            n += 1
        return n

    def nothing_to_check(self, processes: int) -> str | None:
        """The one-line error when FT_QUALITY_CHECK=fail would check nothing in a run of `processes` processes: no
        eval loss (FT_EVAL_FRACTION=0, no FT_EVAL_SPLIT) and no sample answers (no FT_SAMPLE_PROMPTS, or the model
        sharded by FSDP, under which job.quality skips them); else None."""
        if self.quality_check != "fail" or self.eval_split is not None or self.eval_fraction > 0:
            return None
        nothing = "FT_QUALITY_CHECK=fail: nothing to check with FT_EVAL_FRACTION=0 and no FT_EVAL_SPLIT (no eval loss)"
        if not self.sample_prompts:
            return f"{nothing} nor FT_SAMPLE_PROMPTS (no sample answers); hold out data or give prompts"
        if self.shards_model(processes):
            return (f"{nothing}, and FT_SAMPLE_PROMPTS are not answered while FSDP shards the model (FT_STRATEGY=fsdp "
                    "with several processes); hold out data, or use FT_STRATEGY=ddp")
        return None

    @property
    def target_modules(self) -> list[str] | str | None:
        """The value peft's LoraConfig takes: None for its per-architecture default."""
        if self.lora_target_modules == "auto":
            return None
        if self.lora_target_modules == "all-linear":
            return "all-linear"
        return self.lora_target_modules.split(",")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, YamlSource(settings_cls), PlatformSource(settings_cls)


def _prompt_list(value: str) -> list[str]:
    """A JSON list of non-empty strings; ValueError saying what is valid otherwise."""
    import json

    try:
        prompts = json.loads(value)
    except ValueError:
        prompts = None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError('must be a JSON list of non-empty strings, e.g. ["Write 12 in words."]')
    return prompts


def _uri(value: str, kind: str) -> str:
    """`value` when storage can read or write it as a `kind` of URI; a URI of an unknown scheme (ftp://, gs://) is
    refused here rather than taken for a local folder named `ftp:`."""
    if problem := uri_problem(value, kind):
        raise ValueError(problem)
    return value


def load_settings() -> Settings:
    """Read and validate every setting from the environment (and FT_CONFIG_FILE); raise one ConfigError that lists
    every problem found, before anything is downloaded."""
    environ = os.environ
    fields = Settings.model_fields
    problems = unknown_settings(sorted(k for k in environ if k.upper().startswith(PREFIX)), "", fields)
    yaml_file = environ.get(CONFIG_FILE_VAR)
    yaml_keys = [env_name(k) for k in read_yaml(yaml_file)]
    problems += unknown_settings(yaml_keys, f" in {CONFIG_FILE_VAR}={yaml_file}", fields)
    hyper_keys = [env_name(field_name(k)) for k in hyperparameters()]
    problems += unknown_settings(hyper_keys, " in SageMaker's hyperparameters", fields)
    # Where a value that is not in the environment came from (the environment wins over both, the file over the
    # hyperparameters: Settings.settings_customise_sources), so that its error names the place to fix it.
    sources = {**{k: " in SageMaker's hyperparameters" for k in hyper_keys},
               **{k: f" in {CONFIG_FILE_VAR}={yaml_file}" for k in yaml_keys}}
    settings = None
    try:
        settings = Settings()
    except ValidationError as e:
        problems += [_describe(err, environ, sources) for err in e.errors() if err["type"] != "extra_forbidden"]
    if problems:
        raise ConfigError(problems)
    return settings


def _describe(err: dict[str, Any], environ: dict[str, str], sources: dict[str, str] | None = None) -> str:
    """One line for a pydantic error of one setting: `FT_NAME=value: what is wrong`, with where the value was set
    when not in the environment (`sources`: FT_NAME -> " in FT_CONFIG_FILE=path")."""
    field = str(err["loc"][0]) if err["loc"] else ""
    message = err["msg"].removeprefix("Value error, ")
    if not field:
        return message
    name = env_name(field)
    where = "" if name in environ else (sources or {}).get(name, "")
    value = environ.get(name, err.get("input"))
    return f"{name}={value!s}{where}: {message[0].lower() + message[1:]}"


def requested_log_format(environ: dict[str, str] | None = None) -> str:
    """FT_LOG_FORMAT as set in the environment, for the logs before the settings are validated (a configuration
    error is then logged in the format asked for); `auto` when unset or not one of its values."""
    value = (os.environ if environ is None else environ).get("FT_LOG_FORMAT", "auto")
    return value if value in Settings.model_fields["log_format"].annotation.__args__ else "auto"
