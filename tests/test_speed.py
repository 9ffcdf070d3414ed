"""The speed plan: how a step is computed changes with the hardware, the step never does; padding-free rows keep
samples apart."""

from __future__ import annotations

import json

import pytest
import torch

from job.config import Settings
from job.errors import ConfigError
from job.model import Placement, load_model
from job.speed import activation_bytes_per_token, plan

CPU = Placement("cpu", torch.float32)


def settings(**kw) -> Settings:
    return Settings.model_construct(**{**Settings().model_dump(), **kw})


def test_fast_profile_is_padding_free_on_the_cpu_with_batch_times_length_tokens(tiny_model):
    from transformers import AutoConfig

    p = plan(settings(batch_size=4, max_seq_length=256), CPU, AutoConfig.from_pretrained(tiny_model))
    assert (p.padding_free, p.micro_batch_tokens, p.liger, p.gradient_checkpointing) == (True, 1024, False, False)
    assert (p.step_samples, p.global_batch, p.eval_batch_size) == (4, 4, 4)


def test_lean_checkpoints_on_the_cpu_too(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    assert plan(settings(profile="lean"), CPU, config).gradient_checkpointing is True
    assert plan(settings(profile="lean", gradient_checkpointing=False), CPU, config).gradient_checkpointing is False
    assert plan(settings(profile="fast"), CPU, config).gradient_checkpointing is False


def test_guide_profile_pads_micro_batches_of_the_batch_size_and_checkpoints(tiny_model):
    from transformers import AutoConfig

    p = plan(settings(profile="guide", gradient_accumulation_steps=3), CPU, AutoConfig.from_pretrained(tiny_model))
    assert (p.padding_free, p.micro_batch_tokens, p.micro_batch_size, p.gradient_checkpointing) == (False, None, 4, True)
    assert p.global_batch == 12  # one dataloader batch per optimizer step; job/steps.py cuts it in three


def test_explicit_settings_win_over_the_profile(tiny_model):
    from transformers import AutoConfig

    p = plan(settings(profile="guide", padding_free=True, micro_batch_tokens=2048, gradient_checkpointing=False), CPU,
             AutoConfig.from_pretrained(tiny_model))
    assert (p.padding_free, p.micro_batch_tokens, p.gradient_checkpointing) == (True, 2048, False)


def test_impossible_combinations_are_config_errors(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    with pytest.raises(ConfigError, match="FT_USE_LIGER=true: Liger's kernels need a CUDA GPU"):
        plan(settings(use_liger=True), CPU, config)


@pytest.mark.parametrize("env, message", [
    ({"FT_MICRO_BATCH_TOKENS": "512"}, "FT_MICRO_BATCH_TOKENS=512: must hold one whole sample of FT_MAX_SEQ_LENGTH=1024"),
    ({"FT_PACKING": "true", "FT_PACKING_LENGTH": "4096", "FT_MICRO_BATCH_TOKENS": "2048"},
     "FT_MICRO_BATCH_TOKENS=2048: must hold one whole packed row of FT_PACKING_LENGTH=4096"),
    ({"FT_PACKING_LENGTH": "512"}, "FT_PACKING_LENGTH=512: must hold one whole sample of FT_MAX_SEQ_LENGTH=1024"),
])
def test_a_micro_batch_smaller_than_a_row_is_refused_with_the_settings(monkeypatch, env, message):
    from job.config import load_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


@pytest.mark.parametrize("attention, free_gib, max_len, batch, expected", [
    ("sdpa", 130, 1024, 64, (4096, False)),     # an H200: sdpa's cap, without checkpointing
    ("sdpa", 16, 1024, 64, (4096, True)),       # a 24 GB card after the model: checkpointing at the cap
    ("sdpa", 130, 8192, 64, (8192, False)),     # samples longer than the cap: one sample per micro-batch
    ("varlen", 130, 1024, 64, (16384, False)),  # no block mask: the larger cap
    ("varlen", 60, 1024, 64, (8192, False)),    # the largest that fits without checkpointing first
    ("varlen", 16, 1024, 64, (16384, True)),    # then checkpointing with the largest micro-batch that fits
    ("varlen", 130, 1024, 4, (4096, False)),    # the guide's 4 samples: never more than a whole step holds
])
def test_gpu_micro_batch_sizing(monkeypatch, attention, free_gib, max_len, batch, expected):
    from transformers import LlamaConfig

    fake_gpu(monkeypatch, free_gib)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = attention  # as resolved when the model was loaded
    p = plan(settings(max_seq_length=max_len, batch_size=batch, use_liger=False), Placement("cuda", torch.bfloat16),
             config)
    assert (p.micro_batch_tokens, p.gradient_checkpointing, p.attention) == (*expected, attention)
    assert p.step_samples == batch  # the plan never changes the step


@pytest.mark.parametrize("free_gib, step_tokens, expected", [
    (20, None, (4096, True)),    # a 24 GB card, steps of unknown size: checkpointing at the whole step's size
    (20, 1700, (2048, False)),   # 9 steps in 10 fit 2048 tokens whole: no checkpointing (measured 1.33x, run 14)
    (20, 3000, (4096, True)),    # 2048 would cut most steps in two: as before
    (130, 1700, (4096, False)),  # an H200: the largest that fits, as before
])
def test_small_steps_go_without_checkpointing_where_a_smaller_micro_batch_holds_them(monkeypatch, free_gib,
                                                                                  step_tokens, expected):
    from transformers import LlamaConfig

    fake_gpu(monkeypatch, free_gib)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = "varlen"
    p = plan(settings(max_seq_length=1024, batch_size=4, use_liger=False), Placement("cuda", torch.bfloat16), config,
             1, 0, step_tokens)
    assert (p.micro_batch_tokens, p.gradient_checkpointing, p.step_samples) == (*expected, 4)


def test_typical_step_tokens_is_the_90th_percentile_of_a_steps_tokens():
    from job.speed import typical_step_tokens

    assert typical_step_tokens([300] * 50, 4, False, 1024) == 1200
    assert typical_step_tokens([300] * 50, 4, True, 1024) == 4096  # packed rows are full
    assert typical_step_tokens([], 4, False, 1024) is None
    assert typical_step_tokens([10, 20], 4, False, 1024) == 30  # a step of the whole set
    lengths = [100] * 90 + [1000] * 10  # one sample in ten is long
    typical = typical_step_tokens(lengths, 4, False, 1024)
    assert typical == typical_step_tokens(list(lengths), 4, False, 1024)  # seeded: every process agrees
    # P(a step of 4 holds no long sample) = 0.65, P(at most one) = 0.95: the 90th percentile holds one long sample
    assert typical == 1300
    # grouped by length (FT_GROUP_BY_LENGTH), the long samples share steps: of 25 steps of 4, 22 short, one mixed
    # (2 x 100 + 2 x 1000) and 2 long; of 20 steps of 5, 2 in 10 are all long ones
    assert typical_step_tokens(lengths, 4, False, 1024, grouped=True) == 2200
    assert typical_step_tokens(lengths, 5, False, 1024, grouped=True) == 5000


@pytest.mark.parametrize("attention, free_gib, batch, expected", [
    ("varlen", 130, 4, 64),  # small steps evaluate in large forwards: 65536 tokens of 1024-token samples
    ("varlen", 8, 4, 16),    # the largest that fits (261 KiB per token: one layer and the logits, x1.5)
    ("varlen", 1, 4, 2),     # 1 GiB: no smaller than the training micro-batch, 2048 tokens here
    ("sdpa", 130, 4, 4),     # sdpa's dense mask grows with the square of a batch: as large as a training one
    ("varlen", 130, 64, 64),
])
def test_evaluation_batches_are_as_large_as_a_forward_allows(monkeypatch, attention, free_gib, batch, expected):
    from transformers import LlamaConfig

    fake_gpu(monkeypatch, free_gib)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = attention
    p = plan(settings(max_seq_length=1024, batch_size=batch, use_liger=False), Placement("cuda", torch.bfloat16),
             config)
    assert p.eval_batch_size == expected
    assert p.step_samples == batch  # the recipe is untouched


@pytest.mark.parametrize("attention, max_len, expected", [
    ("varlen", 2048, 8192),  # measured: 8.2 GiB peak for a 7B model, all-linear (bench/RESULTS.md run 8)
    ("sdpa", 2048, 4096),    # without the varlen kernel, sdpa's dense block mask keeps its own cap
    ("sdpa", 8192, 8192),    # one whole sample at least
])
def test_lean_micro_batches_and_checkpointing(monkeypatch, attention, max_len, expected):
    from transformers import LlamaConfig

    fake_gpu(monkeypatch, 14)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = attention
    p = plan(settings(profile="lean", max_seq_length=max_len, batch_size=16, use_liger=False),
             Placement("cuda", torch.bfloat16), config)
    assert (p.micro_batch_tokens, p.gradient_checkpointing, p.padding_free) == (expected, True, True)


def fake_gpu(monkeypatch, free_gib: float, fraction: float = 1.0, reserved_gib: float = 0.0) -> None:
    """An H200 (141 GiB) with `free_gib` free, this process capped at `fraction` of it, `reserved_gib` already held."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * 2**30), 141 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda *a: fraction, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: int(reserved_gib * 2**30))


def test_a_memory_fraction_caps_what_the_sizing_sees(monkeypatch):
    """torch.cuda.set_per_process_memory_fraction(24/141) on an H200 sizes micro-batches as on a 24 GB card."""
    from job.speed import free_gpu_bytes

    fake_gpu(monkeypatch, 130)
    assert free_gpu_bytes() == 130 * 2**30
    fake_gpu(monkeypatch, 130, fraction=24 / 141, reserved_gib=6)
    assert free_gpu_bytes() == pytest.approx(18 * 2**30, rel=1e-6)  # 24 GiB allowed, 6 held by the model


def test_activation_estimate_for_a_7b_model():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    full = activation_bytes_per_token(config, checkpointing=False, liger=True)
    assert 4e6 < full < 5e6  # ~34 h bytes per layer per token
    assert activation_bytes_per_token(config, checkpointing=True, liger=True) < full / 8
    assert activation_bytes_per_token(config, checkpointing=False, liger=False) == full + 4 * 32000


def test_samples_of_a_padding_free_row_do_not_attend_to_each_other(tiny_model):
    """Three samples in one padding-free row (position ids restart at each) give each sample's own logits."""
    model = load_model(tiny_model, settings(quantization="none"), CPU).eval()
    samples = [torch.randint(3, 500, (1, n)) for n in (13, 7, 21)]
    with torch.no_grad():
        alone = [model(input_ids=s).logits for s in samples]
        packed = model(input_ids=torch.cat(samples, 1),
                       position_ids=torch.cat([torch.arange(s.shape[1]) for s in samples])[None]).logits
    start = 0
    for s, logits in zip(samples, alone):
        torch.testing.assert_close(packed[:, start:start + s.shape[1]], logits, rtol=1e-4, atol=1e-4)
        start += s.shape[1]


@pytest.mark.parametrize("lengths, tokens, samples, expected", [
    ([10, 20, 30, 40], 60, None, [[0, 1, 2], [3]]),  # up to 60 tokens, in order
    ([10, 20, 30, 40], 100, None, [[0, 1, 2, 3]]),  # the whole step fits: one micro-batch
    ([70, 10, 10], 60, None, [[0], [1, 2]]),  # a sample above the budget is a micro-batch of its own
    ([5] * 10, None, 4, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),  # padded: FT_BATCH_SIZE samples each
])
def test_a_step_is_cut_into_micro_batches_in_order(lengths, tokens, samples, expected):
    from job.steps import StepCollator

    collator = StepCollator(lambda features: features, tokens, samples)
    assert [list(g) for g in collator.groups(lengths)] == expected
    step = collator([{"input_ids": [0] * n} for n in lengths])["micro_batches"]
    assert [len(mb) for mb in step] == [len(g) for g in expected]


@pytest.mark.parametrize("processes", [1, 2, 4])
@pytest.mark.parametrize("group_by_length", [False, True])
def test_the_samples_of_each_step_do_not_depend_on_the_process_count(tokenizer, processes, group_by_length):
    """accelerate shards a dataloader of per-process batches (global batch / processes) round-robin; the samples
    of step k over all processes are the same as on one process, so a run on 4 GPUs trains what one GPU trains."""
    from types import SimpleNamespace

    from accelerate.data_loader import prepare_data_loader
    from datasets import Dataset
    from torch.utils.data import DataLoader, RandomSampler

    from job.steps import StepTrainer

    lengths = [3 + (i * 37) % 50 for i in range(96)]  # 12 whole steps of 8
    ds = Dataset.from_dict({"input_ids": [list(range(n)) for n in lengths], "idx": list(range(96))})
    trainer = StepTrainer.__new__(StepTrainer)  # the sampler needs no model
    trainer.global_batch, trainer.group_by_length, trainer.train_dataset = 8, group_by_length, ds
    trainer.args = SimpleNamespace(data_seed=None, seed=42)

    def sampler():  # each process builds its own, as each runs its own Trainer
        return trainer._get_train_sampler(ds) if group_by_length else \
            RandomSampler(ds, generator=torch.Generator().manual_seed(42))

    def steps(processes: int) -> list[set[int]]:
        shards = [list(prepare_data_loader(
            DataLoader(ds, batch_size=8 // processes, sampler=sampler(), collate_fn=lambda f: [x["idx"] for x in f]),
            num_processes=processes, process_index=rank, put_on_device=False, even_batches=False))
            for rank in range(processes)]
        return [set().union(*(shard[k] for shard in shards)) for k in range(len(shards[0]))]

    assert steps(processes) == steps(1)
    if group_by_length:  # and grouping did group: the steps' lengths spread less than random steps' do
        spread = sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps(1))
        assert spread < 12 * 47 // 2


def test_packed_rows_are_padding_free_even_in_the_guide_profile(tiny_model):
    """Padded, a packed row's samples would attend to each other: packing always takes the padding-free plan."""
    from transformers import AutoConfig

    p = plan(settings(profile="guide", packing=True, packing_length=2048), CPU, AutoConfig.from_pretrained(tiny_model))
    assert (p.padding_free, p.micro_batch_size) == (True, None)


SEVEN_B_4BIT = 6_476_005_376 * 2  # bytes of a bf16 copy of a 7B Llama's 4-bit linear weights (224 of them)


@pytest.mark.parametrize("profile, free_gib, batch, strategy, processes, expected", [
    ("fast", 130, 4, "ddp", 1, True),     # an H200: the 12 GiB copy fits beside the micro-batch
    ("fast", 130, 4, "ddp", 2, True),     # each DDP process keeps its own full model anyway
    ("fast", 130, 4, "fsdp", 2, False),   # FSDP is there to save memory: no copy per GPU
    ("fast", 19, 4, "ddp", 1, True),      # a 24 GB card: the guide's step is checkpointed anyway and fits beside
    ("fast", 19, 64, "ddp", 1, False),    # ... but a 16k-token micro-batch would not fit beside the copy
    ("lean", 130, 4, "ddp", 1, False),    # lean is for memory
    ("guide", 130, 4, "ddp", 1, False),   # the guide's computation
])
def test_dequantize_once_only_where_the_copy_fits_beside_the_plan(monkeypatch, profile, free_gib, batch, strategy,
                                                                  processes, expected):
    from transformers import LlamaConfig

    fake_gpu(monkeypatch, free_gib)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = "varlen"
    cfg = settings(profile=profile, max_seq_length=1024, batch_size=batch, use_liger=False, strategy=strategy)
    alone = plan(cfg, Placement("cuda", torch.bfloat16), config, processes)
    p = plan(cfg, Placement("cuda", torch.bfloat16), config, processes, SEVEN_B_4BIT)
    assert p.dequantize_once is expected
    # the copy never changes the micro-batch nor checkpointing: it is only taken where they stay as they were
    assert (p.micro_batch_tokens, p.gradient_checkpointing, p.step_samples) == \
        (alone.micro_batch_tokens, alone.gradient_checkpointing, alone.step_samples)
    assert not alone.dequantize_once  # a model without 4-bit weights has nothing to dequantize
    if expected and free_gib < 24:  # evaluation batches are sized in the memory the copy leaves
        assert p.eval_batch_size < alone.eval_batch_size


def test_dequantize_once_asked_for_sizes_the_micro_batch_beside_the_copy(monkeypatch):
    """FT_DEQUANTIZE_ONCE=true where the automatic rule would not take the copy (a 24 GB card, 16k-token steps): the
    micro-batch shrinks to what fits beside it; a copy larger than the free memory is refused in one line."""
    from transformers import LlamaConfig

    from job.speed import SAFETY

    fake_gpu(monkeypatch, 19)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = "varlen"
    gpu = Placement("cuda", torch.bfloat16)
    cfg = settings(max_seq_length=1024, batch_size=16, use_liger=False)
    auto = plan(cfg, gpu, config, 1, SEVEN_B_4BIT)
    asked = plan(settings(**{**dict(cfg), "dequantize_once": True}), gpu, config, 1, SEVEN_B_4BIT)
    assert (auto.dequantize_once, asked.dequantize_once) == (False, True)
    assert asked.micro_batch_tokens < auto.micro_batch_tokens
    activations = activation_bytes_per_token(config, asked.gradient_checkpointing, False)
    assert asked.micro_batch_tokens * activations * SAFETY + SEVEN_B_4BIT <= 19 * 2**30
    fake_gpu(monkeypatch, 10)
    with pytest.raises(ConfigError, match=r"FT_DEQUANTIZE_ONCE=true: the 12.1 GiB copy .* 10.0 GiB of free memory"):
        plan(settings(**{**dict(cfg), "dequantize_once": True}), gpu, config, 1, SEVEN_B_4BIT)


@pytest.mark.parametrize("env, message", [
    ({"FT_DEQUANTIZE_ONCE": "true", "FT_QUANTIZATION": "int8"},
     "FT_DEQUANTIZE_ONCE=true: needs 4-bit base weights .FT_QUANTIZATION=nf4 or fp4., not FT_QUANTIZATION=int8"),
    ({"FT_DEQUANTIZE_ONCE": "true", "FT_STRATEGY": "fsdp", "FT_NPROC_PER_NODE": "2"},
     "FT_DEQUANTIZE_ONCE=true with FT_STRATEGY=fsdp: FSDP is there to save memory"),
    ({"FT_USE_LIGER": "true", "FT_COMPILE": "true"},
     "FT_USE_LIGER=true with FT_COMPILE=true: Liger's Triton kernels fail to build inside torch.compile's graphs"),
    ({"FT_CUDA_GRAPHS": "true", "FT_COMPILE": "true"}, "FT_CUDA_GRAPHS=true with FT_COMPILE=true"),
    ({"FT_CUDA_GRAPHS": "true", "FT_PACKING": "true"}, "FT_CUDA_GRAPHS=true with FT_PACKING=true"),
    ({"FT_CUDA_GRAPHS": "true", "FT_GRADIENT_CHECKPOINTING": "true"},
     "FT_CUDA_GRAPHS=true with FT_GRADIENT_CHECKPOINTING=true"),
])
def test_plan_combinations_that_cannot_run_are_refused_before_any_download(monkeypatch, env, message):
    from job.config import load_settings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_dequantized_layers_compute_what_the_4bit_layers_compute(tiny_model):
    """The same logits and input gradients as bitsandbytes' own 4-bit path (which also multiplies by the dequantized
    weight), the copies the size dequantized_size predicts, and release_dequantized puts the 4-bit path back."""
    import bitsandbytes as bnb

    from job.speed import dequantize_once, dequantized_size, release_dequantized

    model = load_model(tiny_model, settings(quantization="nf4"), CPU)
    ids = torch.randint(3, 500, (2, 24))

    def forward():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        return loss.detach(), embeds.grad

    loss4, grad4 = forward()
    size = dequantized_size(model, torch.float32)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and size == sum(m.in_features * m.out_features * 4 for m in layers)
    assert dequantize_once(model, torch.float32) == size
    assert all(type(m).__name__.startswith("Dequantized") and m.dequantized.dtype == torch.float32 for m in layers)
    loss_dq, grad_dq = forward()
    torch.testing.assert_close(loss_dq, loss4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_dq, grad4, rtol=1e-4, atol=1e-6)
    release_dequantized(model)
    assert all(type(m) is not None and not hasattr(m, "dequantized") and "Dequantized" not in type(m).__name__
               for m in layers)
    torch.testing.assert_close(forward()[0], loss4)


@pytest.mark.parametrize("quant_type, double_quant, bias, dtype", [
    ("nf4", False, True, torch.bfloat16),
    ("fp4", True, True, torch.bfloat16),
    ("nf4", True, False, torch.float32),
])
def test_dequantized_layer_is_bitsandbytes_own_product(quant_type, double_quant, bias, dtype):
    """One 4-bit layer as the job quantizes it (FT_QUANTIZATION, FT_DOUBLE_QUANT, storage in the compute dtype),
    with a bias and 3-D input: the dequantized copy gives bitsandbytes' outputs, dtypes and input gradients bit for
    bit. A second dequantize_once renews the copy without nesting, and release_dequantized restores the class
    (LinearNF4, LinearFP4: bitsandbytes' own subclasses)."""
    import bitsandbytes as bnb

    from job.speed import dequantize_once, release_dequantized

    torch.manual_seed(0)
    cls = bnb.nn.LinearNF4 if quant_type == "nf4" else bnb.nn.LinearFP4
    layer = cls(64, 48, bias=bias, compute_dtype=dtype, compress_statistics=double_quant, quant_storage=dtype)
    layer.weight = bnb.nn.Params4bit(torch.randn(48, 64, dtype=dtype), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant, quant_storage=dtype).to("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(48, dtype=dtype), requires_grad=False)
    model = torch.nn.Sequential(layer)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)

    def product():
        y = model(x)
        return y, torch.autograd.grad(y.float().square().sum(), x)[0]

    y4, grad4 = product()
    dequantize_once(model, dtype)
    dequantize_once(model, dtype)
    assert type(layer).__mro__[1] is cls
    y, grad = product()
    assert y.dtype == y4.dtype and torch.equal(y, y4) and torch.equal(grad, grad4)
    release_dequantized(model)
    assert type(layer) is cls and not hasattr(layer, "dequantized")
    assert torch.equal(product()[0], y4)


def test_out_of_memory_names_the_dequantized_copy_where_the_plan_took_it():
    from job.speed import SpeedPlan
    from job.train import out_of_memory

    taken, without = (SpeedPlan(True, 4096, None, 4, 4, True, True, "varlen", 1, copy) for copy in (True, False))
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    assert "FT_DEQUANTIZE_ONCE=false" in out_of_memory(error, taken).reason
    assert "FT_DEQUANTIZE_ONCE" not in out_of_memory(error, without).reason


def test_compiled_layers_leave_ligers_kernels_off_by_default(monkeypatch):
    """Liger's Triton kernels fail inside torch.compile's graphs; compiled layers get inductor's fusions instead."""
    from transformers import LlamaConfig

    fake_gpu(monkeypatch, 130)
    monkeypatch.setattr("job.speed.liger_available", lambda: True)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = "varlen"
    gpu = Placement("cuda", torch.bfloat16)
    assert plan(settings(), gpu, config).liger is True
    assert plan(settings(compile=True), gpu, config).liger is False
