"""Tiny models of each common family, built locally (no network), each with the repo's tiny BPE tokenizer dressed
in its own family's real chat template, special tokens, BOS and EOS (tests/chat_templates.py).

Every linear layer's in and out features are multiples of 64, so bitsandbytes quantizes them to 4-bit as it would
a 7B model (the vocabulary is padded up to a multiple of 64, as real models pad theirs). Windows are small (8
tokens) so that a test sample exceeds them; Gemma-2 has its logit soft-capping.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 8  # sliding window of the windowed families, in tokens: shorter than the test samples
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False)


def _configs() -> dict:
    """Family name -> (config class name, model class name, config keyword arguments)."""
    head = dict(head_dim=64)
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", COMMON),
        "mistral": ("MistralConfig", "MistralForCausalLM", {**COMMON, **head, "sliding_window": WINDOW}),
        # Qwen2 windows only the layers from max_window_layers on: layer 0 full, layer 1 windowed.
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**COMMON, "use_sliding_window": True, "sliding_window": WINDOW,
                                                      "max_window_layers": 1}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, **head}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, **head, "sliding_window": WINDOW,
                                                         "query_pre_attn_scalar": 64, "attn_logit_softcapping": 50.0,
                                                         "final_logit_softcapping": 30.0}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, **head, "sliding_window": WINDOW,
                                                             "query_pre_attn_scalar": 64,
                                                             "layer_types": ["sliding_attention", "full_attention"]}),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {**COMMON, "sliding_window": 2 * WINDOW}),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     {k: v for k, v in COMMON.items() if k != "num_key_value_heads"} | {"rotary_pct": 0.25}),
    }


FAMILIES = tuple(_configs())
# The chat template (tests/chat_templates.py) each family's tokenizer carries. Gemma-2 and Gemma-3 ship Gemma's.
# GPT-NeoX has no official chat template: ChatML, whose EOS `<|endoftext|>` is GPT-NeoX's own EOS, as Qwen2 base's.
CHAT_TEMPLATE = {"llama": "llama2", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma",
                 "gemma3": "gemma", "phi3": "phi3", "gpt_neox": "qwen2"}


def tokenizer():
    """scripts/build_tiny_model.py's byte-level BPE (vocabulary 512) trained on the sample data."""
    spec = importlib.util.spec_from_file_location("build_tiny_model", ROOT / "scripts" / "build_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tokenizer(ROOT / "examples" / "data", 512)


def chat_tokenizer(family: str, base=None):
    """`base` (default: `tokenizer()`) with family `family`'s chat template, special tokens, BOS and EOS."""
    from chat_templates import with_template

    return with_template(base or tokenizer(), CHAT_TEMPLATE[family])


def config(family: str, tok):
    """The family's transformers config, sized as above, with the tokenizer's vocabulary (padded to a multiple of
    64) and special tokens."""
    import transformers

    config_class, _, kwargs = _configs()[family]
    return getattr(transformers, config_class)(
        vocab_size=-(-len(tok) // 64) * 64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **kwargs)


def build(family: str, out: Path, tok=None, seed: int = 0) -> Path:
    """Write a randomly initialised tiny `family` model and its tokenizer (default: `chat_tokenizer(family)`) to
    `out` (safetensors); returns `out`."""
    import torch
    import transformers

    tok = tok or chat_tokenizer(family)
    torch.manual_seed(seed)
    model = getattr(transformers, _configs()[family][1])(config(family, tok))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
