"""Build a tiny Llama-architecture model with its own tokenizer, locally, with no downloads.

The tokenizer is a byte-level BPE trained on the sample data, wrapped like Llama-2's: `<s>` prepended to every
encoded text, `</s>` as EOS, a separate `<pad>` token, and a Llama-2 chat template. The model is a randomly
initialised LlamaForCausalLM small enough to fine-tune on a CPU in a minute or two, with every dimension a
multiple of 64 so that bitsandbytes quantizes it to 4-bit exactly as it would a 7B model.

    python scripts/build_tiny_model.py build/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }} {{ eos_token }}"
    "{% endif %}{% endfor %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def training_texts(data_dir: Path) -> list[str]:
    texts = []
    for line in (data_dir / "sample-text.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["text"])
    # A little general English so that prompts outside the sample data still tokenize into sensible pieces.
    texts.append("The quick brown fox jumps over the lazy dog. Write the answer in words. Instruction: Input: Output:")
    return texts


def build_tokenizer(data_dir: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(training_texts(data_dir), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=2048, padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, hidden: int, layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32),
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory to write (config, safetensors weights, tokenizer)")
    p.add_argument("--data", type=Path, default=root / "examples" / "data", help="sample data to train the BPE on")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the directory holds a model")
    args = p.parse_args(argv)

    if (args.out / "config.json").exists() and not args.force:
        print(f"tiny model already at {args.out} (use --force to rebuild)")
        return 0
    tokenizer = build_tokenizer(args.data, args.vocab_size)
    model = build_model(tokenizer, args.hidden, args.layers, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # transformers writes model.safetensors 0600 (a temporary file renamed): give it the umask's mode like the rest,
    # so that a container running as another UID (the image's 10001) can read the mounted model.
    umask = os.umask(0o022)
    os.umask(umask)
    for path in args.out.iterdir():
        path.chmod((0o666 if path.is_file() else 0o777) & ~umask)
    n = sum(p.numel() for p in model.parameters())
    print(f"built tiny Llama ({n / 1e6:.2f}M parameters, vocab {len(tokenizer)}) at {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
