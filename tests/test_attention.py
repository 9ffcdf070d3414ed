"""`varlen` attention: the numbers of sdpa with its block mask, without the mask; `auto` picks it only on a GPU.

On the CPU the kernel is replaced by the per-sample reference; a stand-in with torch 2.11's signature checks what
the kernel is called with. bench/check_varlen.py compares the real kernel on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from job import attention
from job.config import Settings
from job.errors import ConfigError
from job.model import Placement, load_model, lora_config, resolve_attention

CPU = Placement("cpu", torch.float32)
GPU = Placement("cuda", torch.bfloat16, "a GPU")
LENGTHS = (7, 12, 3, 9)  # samples packed into one micro-batch


def settings(**kw) -> Settings:
    return Settings.model_construct(**{**Settings().model_dump(), **kw})


def packed(lengths=LENGTHS, seed=0, vocab=50) -> dict:
    """One padding-free micro-batch as trl's collator makes it: position_ids restarting, cu_seq_lens_q/k, max_length."""
    g = torch.Generator().manual_seed(seed)
    samples = [{"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist()} for n in lengths]
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(samples)


def without_varlen_kwargs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "labels", "position_ids")}


def forward_backward(model, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def models(tiny_model):
    loaded = {name: load_model(tiny_model, settings(attention=name, quantization="none"), CPU).train()
              for name in ("varlen", "sdpa")}
    assert {n: m.config._attn_implementation for n, m in loaded.items()} == {"varlen": "varlen", "sdpa": "sdpa"}
    return loaded


@pytest.mark.parametrize("inputs", [dict, without_varlen_kwargs], ids=["trl-cu-seq-lens", "position-ids-only"])
def test_packed_logits_and_gradients_match_sdpa_with_its_block_mask(models, inputs):
    batch = inputs(packed())
    assert_same(forward_backward(models["varlen"], batch), forward_backward(models["sdpa"], batch))


def test_packed_samples_do_not_attend_to_each_other(models):
    model = models["varlen"]
    first = LENGTHS[0]
    batch, changed = packed(), packed()
    changed["input_ids"][0, :first] = (changed["input_ids"][0, :first] + 1) % 50
    with torch.no_grad():
        before, after = model(**batch).logits, model(**changed).logits
        # Control: the same change leaks into later tokens when nothing separates the samples.
        plain = {"input_ids": batch["input_ids"], "position_ids": torch.arange(sum(LENGTHS))[None]}
        leaked = model(**{**plain, "input_ids": changed["input_ids"]}).logits
        plain = model(**plain).logits
    assert not torch.allclose(before[0, :first], after[0, :first])
    torch.testing.assert_close(before[0, first:], after[0, first:], rtol=0, atol=1e-6)
    assert not torch.allclose(plain[0, first:], leaked[0, first:])


def test_sequence_boundaries():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    kept, cu_q, cu_k, max_q, max_k = attention.sequences(1, 9, "cpu", None, {"position_ids": pos})
    assert kept is None and cu_q.tolist() == cu_k.tolist() == [0, 3, 5, 9] and (max_q, max_k) == (4, 4)
    assert cu_q.dtype == torch.int32 and type(max_q) is int
    # trl's precomputed boundaries win over position_ids
    given = {"cu_seq_lens_q": torch.tensor([0, 9], dtype=torch.int32), "max_length_q": 9}
    given |= {"cu_seq_lens_k": given["cu_seq_lens_q"], "max_length_k": 9, "position_ids": pos}
    assert attention.sequences(1, 9, "cpu", None, given)[1].tolist() == [0, 9]
    # unpadded rows of a batch, one sequence each (position_ids not expanded to the batch, as models pass them)
    assert attention.sequences(2, 4, "cpu", None, {"position_ids": torch.arange(4)[None]})[1].tolist() == [0, 4, 8]
    assert attention.sequences(2, 4, "cpu", None, {})[1].tolist() == [0, 4, 8]
    # a padding mask (right and left padding): padding dropped
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    kept, cu_q, _, max_q, _ = attention.sequences(2, 4, "cpu", mask, {"position_ids": torch.arange(4)[None]})
    assert kept.tolist() == [0, 1, 2, 5, 6, 7] and cu_q.tolist() == [0, 3, 6] and max_q == 3


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_matches_sdpa(models, padding_side):
    lengths = (9, 4, 6)
    seq = max(lengths)
    ids = torch.randint(3, 50, (len(lengths), seq), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    if padding_side == "left":
        mask = mask.flip(-1)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    (logits_v, grads_v), (logits_s, grads_s) = (forward_backward(models[n], batch) for n in ("varlen", "sdpa"))
    real = mask.bool()
    assert_same((logits_v[real], grads_v), (logits_s[real], grads_s))


def block_mask(pos: torch.Tensor) -> torch.Tensor:
    """What transformers builds for sdpa: causal within each sample of the micro-batch."""
    sample = (pos == 0).cumsum(-1)
    n = pos.shape[-1]
    return ((sample[:, :, None] == sample[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril())[:, None]


def gqa_inputs():
    g = torch.Generator().manual_seed(2)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    n = pos.shape[-1]
    q = torch.randn(1, 4, n, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, n, 8, generator=g, requires_grad=True) for _ in range(2))
    return SimpleNamespace(num_key_value_groups=2, is_causal=True), q, k, v, pos


def attend(fn, module, q, k, v, mask, **kw):
    out, _ = fn(module, q, k, v, mask, scaling=0.3, **kw)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


def test_grouped_query_attention_with_a_scale_matches_sdpa():
    module, q, k, v, pos = gqa_inputs()
    want = attend(sdpa_attention_forward, module, q, k, v, block_mask(pos))
    got = attend(attention.varlen_attention_forward, module, q, k, v, None, position_ids=pos)
    assert got[0].shape == (1, pos.shape[-1], 4, 8)  # [batch, seq, heads, head_dim]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def fake_kernel(calls: list):
    """torch 2.11's varlen_attn signature; checks its arguments, then computes with the reference."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        assert query.dim() == 3 and query.shape[1] == key.shape[1] == value.shape[1]  # heads repeated for GQA
        assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and type(max_q) is type(max_k) is int
        assert window_size == (-1, 0) and isinstance(window_size, tuple)  # what the kernel reads as causal
        assert max_q == int(cu_seq_q.diff().max())
        calls.append(scale)
        return attention.reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, scale, window_size)
    return varlen_attn


@pytest.fixture
def kernel_stand_in(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "use_kernel", lambda query: True)
    monkeypatch.setattr(attention, "varlen_attn", fake_kernel(calls))
    return calls


def test_the_kernel_is_called_as_torch_2_11_expects(models, kernel_stand_in):
    module, q, k, v, pos = gqa_inputs()
    want = attend(sdpa_attention_forward, module, q, k, v, block_mask(pos))
    torch.testing.assert_close(attend(attention.varlen_attention_forward, module, q, k, v, None, position_ids=pos),
                               want, rtol=1e-5, atol=1e-5)
    assert kernel_stand_in == [0.3]
    batch = packed()
    via_kernel = forward_backward(models["varlen"], batch)
    layers = models["varlen"].config.num_hidden_layers
    scaling = models["varlen"].model.layers[0].self_attn.scaling
    assert kernel_stand_in[1:] == [scaling] * layers
    assert_same(via_kernel, forward_backward(models["sdpa"], batch))


def test_quantized_lora_model_matches_sdpa(tiny_model):
    from peft import get_peft_model

    def lora(name):
        cfg = settings(attention=name, lora_dropout=0.0)
        torch.manual_seed(0)
        model = get_peft_model(load_model(tiny_model, cfg, CPU), lora_config(cfg)).train()
        for n, p in model.named_parameters():
            if "lora_B" in n:  # not the zero init, so the adapter's gradients depend on attention
                torch.nn.init.normal_(p, std=0.02)
        return forward_backward(model, packed())

    assert_same(lora("varlen"), lora("sdpa"))


def test_unsupported_uses_are_refused():
    module, q, k, v, pos = gqa_inputs()
    with pytest.raises(ValueError, match="no attention dropout"):
        attention.varlen_attention_forward(module, q, k, v, None, dropout=0.1, position_ids=pos)
    with pytest.raises(NotImplementedError, match="KV cache"):
        attention.varlen_attention_forward(module, q[:, :, -1:], k, v, None)


def test_a_ready_made_4d_mask_goes_to_sdpa():
    module, q, k, v, pos = gqa_inputs()
    want = attend(sdpa_attention_forward, module, q, k, v, block_mask(pos))
    torch.testing.assert_close(attend(attention.varlen_attention_forward, module, q, k, v, block_mask(pos)), want)


def test_auto_resolution(monkeypatch, tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    assert Settings().attention == "auto"
    assert resolve_attention(settings(), CPU, config) == "sdpa"
    assert resolve_attention(settings(attention="varlen"), CPU, config) == "varlen"  # the reference path
    assert not attention.kernel_available(torch.float32)
    with pytest.raises(ConfigError, match="FT_ATTENTION=varlen"):
        resolve_attention(settings(attention="varlen"), GPU, config)  # no kernel here
    assert resolve_attention(settings(), GPU, config) == "sdpa"
    monkeypatch.setattr(attention, "kernel_available", lambda dtype: True)
    # Every run is padding-free (one row per micro-batch, with position_ids): varlen whatever the profile.
    for profile in ("fast", "lean", "guide"):
        assert resolve_attention(settings(profile=profile), GPU, config) == "varlen"
    assert resolve_attention(settings(packing=False), GPU, config) == "varlen"
    assert resolve_attention(settings(attention="sdpa"), GPU, config) == "sdpa"


def test_flex_attention_on_the_cpu_is_refused_before_loading(tiny_model):
    from transformers import AutoConfig

    from job.model import choose_attention

    with pytest.raises(ConfigError, match="FT_ATTENTION=flex_attention: PyTorch's FlexAttention has no backward"):
        choose_attention(settings(attention="flex_attention"), CPU, AutoConfig.from_pretrained(tiny_model))
