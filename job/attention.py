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

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import flash_attention_mask
from transformers.modeling_flash_attention_utils import _get_unpad_data, prepare_fa_kwargs_from_position_ids

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

NAME = "varlen"
HALF = (torch.bfloat16, torch.float16)
CAUSAL = (-1, 0)  # window_size (left, right); the kernel tests `window_size == (-1, 0)`, so it must be this tuple


def kernel_available(dtype: torch.dtype) -> bool:
    """Whether this torch has the varlen kernel with the window_size signature (2.11 and later), this GPU can run
    flash attention (Ampere or newer), and the compute dtype is one it takes."""
    return (varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters
            and dtype in HALF and torch.cuda.is_available() and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability() >= (8, 0))


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers. Its mask is flash attention's: None, or the 2D
    padding mask when there is padding; never a 4D mask."""
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """transformers' attention interface: query [batch, heads, seq, dim], key and value [batch, kv_heads, seq, dim]
    -> ([batch, seq, heads, dim], None)."""
    if attention_mask is not None and attention_mask.dim() != 2:  # a ready-made 4D mask, given by the caller
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if dropout:
        raise ValueError(f"attention {NAME!r} has no attention dropout (the model asks for {dropout}); use "
                         "FT_ATTENTION=sdpa, or a model configured with attention_dropout=0")
    unsupported = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported or key.shape[2] != query.shape[2]:
        raise NotImplementedError(f"attention {NAME!r} is for training full-attention models without a KV cache; "
                                  f"use sdpa here ({unsupported or 'key and query lengths differ'})")
    batch, heads, seq, _ = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # [batch, heads, seq, dim] -> [tokens, heads, dim]; key/value heads repeated for grouped-query attention
    # (torch 2.11's kernel has no enable_gqa).
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[3]) for t in (query, key, value))
    if k.shape[1] != heads:
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    kept, cu_q, cu_k, max_q, max_k = sequences(batch, seq, query.device, attention_mask, kwargs)
    if kept is not None:
        q, k, v = q[kept], k[kept], v[kept]
    if use_kernel(query):
        out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=CAUSAL if causal else (-1, -1))
    else:
        out = reference_varlen_attn(q, k, v, cu_q, cu_k, scaling, causal)
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


def reference_varlen_attn(q, k, v, cu_q, cu_k, scale, causal):
    """What the kernel computes, one sequence at a time with sdpa: for the CPU and for checking the kernel."""
    bounds = zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])
    outs = [F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1),
                                           v[ks:ke].transpose(0, 1), is_causal=causal, scale=scale).transpose(0, 1)
            for qs, qe, ks, ke in bounds]
    return torch.cat(outs)
