"""Check the job's `varlen` attention on a GPU: the numbers of sdpa with its block mask, and the time it saves.

    PYTHONPATH=$PWD python3 bench/check_varlen.py [--tokens 4096,8192,16384] [--layers 4] [--repeats 5] [--out DIR]
    PYTHONPATH=$PWD python3 bench/check_varlen.py --smoke    # the script itself on a CPU (fp32, tiny, no kernel)

Needs only torch (2.11 or later, CUDA) and transformers. Packed micro-batches are made as trl's padding-free
collator makes them (position_ids restarting at each sample, cu_seq_lens_q/k, max_length_q/k), from samples of
the benchmark's lengths (lognormal, median 256, sigma 0.9, clipped to [16, 1024]).

1. Correctness: a small Llama (4 layers, hidden 1024, 16 query heads on 8 key/value heads) in bf16, one packed
   micro-batch of 4096 tokens: logits, loss and every gradient with varlen and with sdpa (transformers' block mask),
   the max abs difference between them, and each one's error against sdpa in fp32. varlen passes when its error is
   at most twice sdpa's own bf16 error, the kernel ran in every layer, and changing the first sample's tokens leaves
   the other samples' logits as they were.
2. Speed: forward + backward (activation gradients; frozen weights, as under LoRA) of a stack of Llama-2-7b-shaped
   decoder layers, and of attention alone, at each packed size: median milliseconds, tokens/s and peak memory.

Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from job import attention  # noqa: E402

SMALL = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=8)
LLAMA_2_7B_LAYER = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                        num_key_value_heads=32)
SMOKE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def sample_lengths(tokens: int, seed: int = 0) -> list[int]:
    """Samples of the benchmark's lengths filling exactly `tokens` (the last one cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < tokens:
        n = int(torch.empty(1).log_normal_(math.log(256), 0.9, generator=g).clamp(16, 1024))
        lengths.append(min(n, tokens - sum(lengths)))
    return lengths


def packed_batch(lengths: list[int], vocab: int, device, seed: int = 0) -> dict:
    """One padding-free micro-batch, as trl's DataCollatorForLanguageModeling(padding_free=True) makes it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, sum(lengths)), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    labels = ids.masked_fill(position_ids == 0, -100)
    batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids, "cu_seq_lens_q": cu,
             "cu_seq_lens_k": cu}
    return {k: v.to(device) for k, v in batch.items()} | {"max_length_q": max(lengths), "max_length_k": max(lengths)}


def block_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """sdpa's mask for a packed micro-batch: causal within each sample. [1, 1, T, T], True where attended."""
    sample = (position_ids == 0).cumsum(-1)
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    return ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]


@contextlib.contextmanager
def counting_kernel_calls():
    """Count the calls of the kernel that the job's varlen attention makes."""
    calls, kernel = [], attention.varlen_attn
    attention.varlen_attn = lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs)
    try:
        yield calls
    finally:
        attention.varlen_attn = kernel


def forward_backward(model, impl: str, batch: dict) -> dict:
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": out.logits.detach().float(), "loss": out.loss.detach().float(), "grads": grads}


def max_diff(a: dict, b: dict, key: str) -> float:
    if key == "grads":
        return max((a[key][n] - b[key][n]).abs().max().item() for n in a[key])
    return (a[key] - b[key]).abs().max().item()


def check_correctness(shape: dict, dtype: torch.dtype, device: str, tokens: int, use_kernel: bool) -> bool:
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, use_cache=False, attention_dropout=0.0)
    reference = LlamaForCausalLM(config).to(device).train()  # fp32
    model = copy.deepcopy(reference).to(dtype)
    lengths = sample_lengths(tokens)
    batch = packed_batch(lengths, shape["vocab_size"], device)
    with counting_kernel_calls() as calls:
        varlen = forward_backward(model, attention.NAME, batch)
    kernel_calls = len(calls)
    sdpa = forward_backward(model, "sdpa", batch)
    ref = forward_backward(reference, "sdpa", batch)

    print(f"\n## Correctness: {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
          f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, {dtype}, {tokens} tokens in "
          f"{len(lengths)} samples; kernel calls in the forward: {kernel_calls}\n")
    print("| quantity | max abs varlen - sdpa | varlen - fp32 ref | sdpa - fp32 ref | max abs fp32 ref | ok |")
    print("|---|---|---|---|---|---|")
    ok = kernel_calls == (shape["num_hidden_layers"] if use_kernel else 0)
    for key in ("logits", "loss", "grads"):
        between, err_v, err_s = max_diff(varlen, sdpa, key), max_diff(varlen, ref, key), max_diff(sdpa, ref, key)
        scale = max(v.abs().max().item() for v in ref[key].values()) if key == "grads" else ref[key].abs().max().item()
        good = err_v <= 2 * err_s + 1e-6 * scale
        ok &= good
        print(f"| {key} | {between:.3g} | {err_v:.3g} | {err_s:.3g} | {scale:.3g} | {'yes' if good else 'NO'} |")

    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, :lengths[0]] = (changed["input_ids"][0, :lengths[0]] + 1) % shape["vocab_size"]
    model.set_attn_implementation(attention.NAME)
    with torch.no_grad():
        leak = (model(**changed).logits - model(**batch).logits)[0, lengths[0]:].abs().max().item()
    isolated = leak <= 1e-3
    ok &= isolated
    print(f"\nChanging sample 1's tokens changes the other samples' logits by at most {leak:.3g} "
          f"({'ok' if isolated else 'NOT ISOLATED'}). Correctness: {'PASS' if ok else 'FAIL'}")
    return ok


def elapsed_ms(fn, repeats: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def peak_gib(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**30


def time_layers(shape: dict, layers: int, dtype, device: str, tokens: int, repeats: int) -> dict:
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=max(4096, tokens),
                         use_cache=False)
    with torch.device(device):
        model = LlamaModel(config).to(dtype).train().requires_grad_(False)
    batch = packed_batch(sample_lengths(tokens), shape["vocab_size"], device)
    del batch["input_ids"], batch["labels"]
    x = torch.randn(1, tokens, shape["hidden_size"], device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    result = {}
    for impl in ("sdpa", attention.NAME):
        model.set_attn_implementation(impl)

        def step():
            model(inputs_embeds=x, **batch).last_hidden_state.backward(grad)
            x.grad = None

        result[impl] = {"ms": elapsed_ms(step, repeats, device), "peak_gib": peak_gib(step, device)}
    del model
    return result


def time_attention(shape: dict, dtype, device: str, tokens: int, repeats: int, use_kernel: bool) -> dict:
    heads, dim = shape["num_attention_heads"], shape["hidden_size"] // shape["num_attention_heads"]
    lengths = sample_lengths(tokens)
    batch = packed_batch(lengths, shape["vocab_size"], device)
    mask = block_mask(batch["position_ids"])
    q, k, v = (torch.randn(1, heads, tokens, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    flat = [t.detach().transpose(1, 2).reshape(tokens, heads, dim).requires_grad_() for t in (q, k, v)]
    grad = torch.randn(tokens, heads, dim, device=device, dtype=dtype)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad.view(1, tokens, heads, dim).transpose(1, 2))

    def varlen():
        cu, m = batch["cu_seq_lens_q"], max(lengths)
        if use_kernel:
            out = attention.varlen_attn(*flat, cu, cu, m, m, window_size=attention.CAUSAL)
        else:
            out = attention.reference_varlen_attn(*flat, cu, cu, None, attention.CAUSAL)
        out.backward(grad)

    return {"sdpa": {"ms": elapsed_ms(sdpa, repeats, device)}, attention.NAME: {"ms": elapsed_ms(varlen, repeats, device)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="4096,8192,16384", help="packed micro-batch sizes to time")
    p.add_argument("--layers", type=int, default=4, help="Llama-2-7b-shaped decoder layers in the timed stack")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, help="also write results.json here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 on the CPU: checks the script")
    args = p.parse_args()

    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    use_kernel = not args.smoke
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")
    if use_kernel and not attention.kernel_available(dtype):
        print("torch's varlen kernel is not usable here (needs torch >= 2.11, CUDA, an Ampere or newer GPU)")
        return 1
    attention.register()
    if use_kernel:
        torch.backends.cuda.matmul.allow_tf32 = False  # a clean fp32 reference
    ok = check_correctness(SMOKE if args.smoke else SMALL, dtype, device, 2048 if args.smoke else 4096, use_kernel)

    layer_shape = SMOKE if args.smoke else LLAMA_2_7B_LAYER
    sizes = [1024, 2048] if args.smoke else [int(t) for t in args.tokens.split(",")]
    rows = []
    for tokens in sizes:
        stack = time_layers(layer_shape, 2 if args.smoke else args.layers, dtype, device, tokens, args.repeats)
        attn = time_attention(layer_shape, dtype, device, tokens, args.repeats, use_kernel)
        rows.append({"tokens": tokens, "samples": len(sample_lengths(tokens)), "stack": stack, "attention": attn})
        print(json.dumps(rows[-1]), flush=True)

    layers = 2 if args.smoke else args.layers
    print(f"\n## Forward + backward, {layers} Llama-2-7b-shaped layers and attention alone ({dtype}, median of "
          f"{args.repeats})\n")
    print("| packed tokens | samples | layers sdpa ms | layers varlen ms | x | tokens/s sdpa | tokens/s varlen | "
          "peak GiB sdpa | peak GiB varlen | attention sdpa ms | attention varlen ms | x |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, v = r["stack"]["sdpa"], r["stack"][attention.NAME]
        a_s, a_v = r["attention"]["sdpa"]["ms"], r["attention"][attention.NAME]["ms"]
        gib = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        print(f"| {r['tokens']} | {r['samples']} | {s['ms']:.1f} | {v['ms']:.1f} | {s['ms'] / v['ms']:.2f} | "
              f"{r['tokens'] / s['ms'] * 1000:,.0f} | {r['tokens'] / v['ms'] * 1000:,.0f} | {gib(s['peak_gib'])} | "
              f"{gib(v['peak_gib'])} | {a_s:.2f} | {a_v:.2f} | {a_s / a_v:.2f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_varlen.json").write_text(json.dumps({"torch": torch.__version__, "ok": ok, "rows": rows},
                                                               indent=2))
    print(f"\nCorrectness: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
