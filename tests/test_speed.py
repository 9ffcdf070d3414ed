"""The speed plan, and that packing changes nothing but speed: isolated samples, the same loss and updates."""

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


def test_fast_profile_packs_on_the_cpu_with_batch_times_length_tokens(tiny_model):
    from transformers import AutoConfig

    p = plan(settings(batch_size=4, max_seq_length=256), CPU, AutoConfig.from_pretrained(tiny_model))
    assert (p.packing, p.micro_batch_tokens, p.liger, p.gradient_checkpointing) == (True, 1024, False, False)


def test_guide_profile_pads_batches_and_checkpoints(tiny_model):
    from transformers import AutoConfig

    p = plan(settings(profile="guide"), CPU, AutoConfig.from_pretrained(tiny_model))
    assert (p.packing, p.micro_batch_tokens, p.gradient_checkpointing) == (False, None, True)


def test_explicit_settings_win_over_the_profile(tiny_model):
    from transformers import AutoConfig

    p = plan(settings(profile="guide", packing=True, micro_batch_tokens=2048, gradient_checkpointing=False), CPU,
             AutoConfig.from_pretrained(tiny_model))
    assert (p.packing, p.micro_batch_tokens, p.gradient_checkpointing) == (True, 2048, False)


def test_impossible_combinations_are_config_errors(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    with pytest.raises(ConfigError, match="FT_USE_LIGER=true: Liger's kernels need a CUDA GPU"):
        plan(settings(use_liger=True), CPU, config)



def test_a_micro_batch_smaller_than_a_sample_is_refused_with_the_settings(monkeypatch):
    from job.config import load_settings

    monkeypatch.setenv("FT_MICRO_BATCH_TOKENS", "512")
    with pytest.raises(ConfigError, match="FT_MICRO_BATCH_TOKENS=512: must hold one whole sample of FT_MAX_SEQ_LEN"):
        load_settings()


@pytest.mark.parametrize("attention, free_gib, max_len, expected", [
    ("sdpa", 130, 1024, (4096, False)),    # an H200: sdpa's cap, without checkpointing
    ("sdpa", 16, 1024, (4096, True)),      # a 24 GB card after the model: checkpointing at the cap
    ("sdpa", 130, 8192, (8192, False)),    # samples longer than the cap: one sample per micro-batch
    ("varlen", 130, 1024, (16384, False)),  # no block mask: the larger cap
    ("varlen", 60, 1024, (8192, False)),    # the largest that fits without checkpointing first
    ("varlen", 16, 1024, (16384, True)),    # then checkpointing with the largest micro-batch that fits
])
def test_gpu_micro_batch_sizing(monkeypatch, attention, free_gib, max_len, expected):
    from transformers import LlamaConfig

    fake_gpu(monkeypatch, free_gib)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = attention  # as resolved when the model was loaded
    p = plan(settings(max_seq_length=max_len, use_liger=False), Placement("cuda", torch.bfloat16), config)
    assert (p.micro_batch_tokens, p.gradient_checkpointing, p.attention) == (*expected, attention)


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
    p = plan(settings(profile="lean", max_seq_length=max_len, use_liger=False), Placement("cuda", torch.bfloat16),
             config)
    assert (p.micro_batch_tokens, p.gradient_checkpointing, p.packing) == (expected, True, True)


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


def test_packed_samples_do_not_attend_to_each_other(tiny_model):
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
