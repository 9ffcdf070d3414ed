"""`varlen`: attention over packed micro-batches through torch's variable-length flash attention.

With sdpa, transformers keeps packed samples apart with a dense block-diagonal mask over the whole micro-batch, so
attention costs O(T^2) for T tokens. Here, as with flash-attention's varlen path, the samples' boundaries
(cumulative lengths) go to `torch.nn.attention.varlen.varlen_attn`, which attends only within each sample: the sum
of the squares of their lengths, and no mask is built. The boundaries come, in order of preference, from a padding
mask (padded batches: the padding is dropped), from trl's padding-free collator (`cu_seq_lens_q`, computed on the
CPU once per batch) or from position_ids restarting at each sample. The kernel runs on CUDA in bf16/fp16; elsewhere
(the CPU, fp32) a per-sample sdpa computes the same thing, so CPU tests run everything around the kernel. A
ready-made 4D mask goes to sdpa; attention dropout, sliding windows and a KV cache are refused.
"""

from __future__ import annotations

import copy
import inspect as signature_of
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import flash_attention_mask
from transformers.modeling_flash_attention_utils import _get_unpad_data, prepare_fa_kwargs_from_position_ids
from transformers.utils.generic import TransformersKwargs

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

NAME = "varlen"
HALF = (torch.bfloat16, torch.float16)
CAUSAL = (-1, 0)  # window_size (left, right); the kernel tests `window_size == (-1, 0)`, so it must be this tuple
FULL = (-1, -1)
PROBE = "finetune-job-probe"
# What a model may pass its attention function that varlen handles or ignores: transformers' generic keyword
# arguments (batch layout, outputs) and the sliding window. Anything else (softcap, s_aux, ...) changes the maths.
HANDLED = set(TransformersKwargs.__annotations__) | {"sliding_window", "use_cache", "cache_position",
                                                     "past_key_values", "past_key_value", "position_embeddings"}
WHAT = {"softcap": "logit soft-capping", "s_aux": "attention sinks (s_aux)", "dropout": "attention dropout"}
MAX_HEAD_DIM = 256  # flash attention's limit


def kernel_available(dtype: torch.dtype) -> bool:
    """Whether this torch has the varlen kernel with the window_size signature (2.11 and later), this GPU can run
    flash attention (Ampere or newer), and the compute dtype is one it takes."""
    return (varlen_attn is not None and "window_size" in signature_of.signature(varlen_attn).parameters
            and dtype in HALF and torch.cuda.is_available() and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability() >= (8, 0))


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers. Its mask is flash attention's: None, or the 2D
    padding mask when there is padding; never a 4D mask."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def window(causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """The kernel's `window_size` (left, right) for transformers' masks: query i sees key j iff
    `left < 0 or i - j <= left` and `right < 0 or j - i <= right`. transformers' causal sliding window
    (`masking_utils.sliding_window_overlay`: kv_idx > q_idx - sliding_window) keeps i - j <= sliding_window - 1,
    hence left = sliding_window - 1, as in its flash-attention path (`window_size=(sliding_window - 1, ...)`)."""
    if sliding_window is None:
        return CAUSAL if causal else FULL
    if not causal:
        raise NotImplementedError(f"attention {NAME!r}: a bidirectional sliding window is not supported")
    return (int(sliding_window) - 1, 0)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """transformers' attention interface: query [batch, heads, seq, dim], key and value [batch, kv_heads, seq, dim]
    -> ([batch, seq, heads, dim], None)."""
    if attention_mask is not None and attention_mask.dim() != 2:  # a ready-made 4D mask, given by the caller
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if dropout:
        raise ValueError(f"attention {NAME!r} has no attention dropout (the model asks for {dropout}); use "
                         "FT_ATTENTION=sdpa, or a model configured with attention_dropout=0")
    unsupported = [k for k, v in kwargs.items() if k not in HANDLED and v is not None]
    if unsupported or key.shape[2] != query.shape[2]:
        raise NotImplementedError(f"attention {NAME!r} is for training models without a KV cache; "
                                  f"use sdpa here ({unsupported or 'key and query lengths differ'})")
    batch, heads, seq, _ = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window_size = window(causal, kwargs.get("sliding_window"))
    # [batch, heads, seq, dim] -> [tokens, heads, dim]; key/value heads repeated for grouped-query attention
    # (torch 2.11's kernel has no enable_gqa).
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[3]) for t in (query, key, value))
    if k.shape[1] != heads:
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    kept, cu_q, cu_k, max_q, max_k = sequences(batch, seq, query.device, attention_mask, kwargs)
    if kept is not None:
        q, k, v = q[kept], k[kept], v[kept]
    if use_kernel(query):
        out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=window_size)
    else:
        out = reference_varlen_attn(q, k, v, cu_q, cu_k, scaling, window_size)
    if kept is not None:  # padding positions get zeros: nothing reads them
        out = out.new_zeros(batch * seq, *out.shape[1:]).index_copy(0, kept, out)
    return out.view(batch, seq, heads, -1), None


def use_kernel(query: torch.Tensor) -> bool:
    return query.is_cuda and query.dtype in HALF


def sequences(batch: int, seq: int, device, attention_mask, kwargs) -> tuple:
    """Where the sequences are in the flattened batch: (indices of the tokens kept, or None for all of them,
    cu_seq_q, cu_seq_k, max_q, max_k)."""
    if attention_mask is not None:  # a padded batch: one sequence per row, padding dropped
        kept, cu, max_len = _get_unpad_data(attention_mask)
        return kept, cu, cu, int(max_len), int(max_len)
    given = [kwargs.get(k) for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in given):  # from trl's padding-free collator
        cu_q, cu_k, max_q, max_k = given
        return None, cu_q, cu_k, int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq, device=device)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids.expand(batch, seq))
    return None, cu_q, cu_k, int(max_q), int(max_k)


def reference_varlen_attn(q, k, v, cu_q, cu_k, scale, window_size=CAUSAL):
    """What the kernel computes, one sequence at a time with sdpa, for the CPU and for checking the kernel:
    q, k, v [tokens, heads, dim]; cu_q, cu_k the sequences' cumulative lengths; `window_size` (left, right) as the
    kernel reads it (see `window`; -1 is unbounded). Returns [tokens, heads, dim]."""
    left, right = window_size
    bounds = zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])
    outs = []
    for qs, qe, ks, ke in bounds:
        visible = None
        if (left, right) not in (CAUSAL, FULL):  # a window; query and key lengths are equal (no KV cache)
            offset = torch.arange(qe - qs, device=q.device)[:, None] - torch.arange(ke - ks, device=q.device)[None]
            visible = ((offset <= left) | (left < 0)) & ((-offset <= right) | (right < 0))
        outs.append(F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1),
                                                   v[ks:ke].transpose(0, 1), attn_mask=visible,
                                                   is_causal=(left, right) == CAUSAL, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@dataclass(frozen=True)
class Inspection:
    """What `inspect` found: the model class (None when it could not be built), whether that class supports
    sdpa, and why varlen cannot compute its attention (None when it can)."""

    model_class: type | None
    supports_sdpa: bool
    incompatible: str | None


def inspect(config, trust_remote_code: bool = False) -> Inspection:
    """Build the model from `config` on the meta device (no memory, no weights), run one training-mode forward
    pass, and record what each layer passes its attention function. Takes well under a second even for a 70B
    config."""
    from transformers import AutoModelForCausalLM

    calls: list[dict] = []

    def probe(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        calls.append({"dropout": dropout, "causal": causal, "dims": (query.shape[-1], value.shape[-1]),
                      "unhandled": [k for k, v in kwargs.items() if k not in HANDLED and v is not None],
                      "window": kwargs.get("sliding_window")})
        return query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    AttentionInterface.register(PROBE, probe)
    AttentionMaskInterface.register(PROBE, flash_attention_mask)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=PROBE,
                                                     trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - an unknown or custom architecture: transformers chooses at load
        return Inspection(None, False, f"the model could not be built to inspect ({type(e).__name__})")
    supports_sdpa = bool(getattr(type(model), "_supports_sdpa", False))
    if any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in model.named_parameters()):  # gpt-oss: s_aux=self.sinks
        return Inspection(type(model), supports_sdpa, WHAT["s_aux"])  # (its mixture of experts cannot run on meta)
    try:
        # With a KV cache (use_cache, the config's default), transformers skips its packed-sequence detection, which
        # reads tensor values that meta tensors lack. The cache changes nothing the layers ask of their attention.
        model.train()(input_ids=torch.zeros(1, 8, dtype=torch.long, device="meta"), use_cache=True)
    except Exception as e:  # noqa: BLE001 - e.g. a model that reads tensor values: no varlen without knowing
        return Inspection(type(model), supports_sdpa, f"its forward pass could not be inspected ({type(e).__name__})")
    return Inspection(type(model), supports_sdpa, _incompatibility(calls))


def _incompatibility(calls: list[dict]) -> str | None:
    if not calls:
        return "it does not use transformers' attention functions"
    for call in calls:
        if call["unhandled"]:
            return ", ".join(WHAT.get(k, f"the attention argument {k!r}") for k in call["unhandled"])
        if call["dropout"]:
            return f"{WHAT['dropout']} ({call['dropout']})"
        if call["dims"][0] != call["dims"][1] or call["dims"][0] > MAX_HEAD_DIM:
            return f"head dimensions {call['dims']} (flash attention needs equal ones up to {MAX_HEAD_DIM})"
        if call["window"] is not None and not call["causal"]:
            return "a bidirectional sliding window"
    return None
