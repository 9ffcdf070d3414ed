"""What peft's LoRA layers cost on top of the base products, isolated from the rest of a step: a chain of
Llama-2-7b-shaped projections (4096 -> 4096, frozen bf16 base, as dequantize_once keeps it), each adapted by peft's
LoRA (r=64, alpha=16, dropout 0.1, LoRA weights in bf16 as trl keeps them), forward and backward at the token counts
of the bench's small steps, timed eagerly and replayed from a CUDA graph (as the `fast` default runs them).

    python3 bench/check_lora.py [--out DIR] [--layers 64] [--tokens 1536,4096] [--reps 20]

Compares the base products alone (the floor) with peft's layers. Prints a table of ms per chain (64 projections: the
bench's 32 layers x q, v) and writes DIR/check_lora.json. Needs a CUDA GPU. Run 19 (bench/RESULTS.md) also measured
a fused LoRA path here (one autograd function: the scale and sum in the B product's accumulation, one masked add of
the input gradients; commit 721a756): 5.13 against peft's 5.17 ms per chain at 1,536 tokens, graphed. It was not
kept: the cost is the six skinny rank-64 products per projection, not the elementwise passes it removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Chain(torch.nn.Module):
    def __init__(self, layers: int, width: int):
        super().__init__()
        self.proj = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))

    def forward(self, x):
        for p in self.proj:
            x = p(x)
        return x


def build(kind: str, layers: int, width: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = Chain(layers, width).to("cuda", torch.bfloat16)
    for p in model.parameters():
        p.data.mul_(width ** -0.5 / p.data.std())  # keep activations O(1) along the chain
        p.requires_grad_(False)
    if kind == "base":
        return model
    config = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False,  # B != 0: gradients for A
                        target_modules=[f"proj.{i}" for i in range(layers)])
    return get_peft_model(model, config, autocast_adapter_dtype=False).train()


def timed(fn, reps: int) -> float:
    """Median ms of `reps` calls of fn, each timed with CUDA events."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure(model, tokens: int, width: int, reps: int) -> dict:
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = [x, *params]

    def step():
        y = model(x)
        return torch.autograd.grad(y, inputs, grad_outputs=torch.ones_like(y))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = timed(step, reps)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replay = timed(graph.replay, reps)
    return {"eager_ms": round(eager, 3), "graph_ms": round(replay, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--tokens", default="1536,4096")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("check_lora needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        for kind in ("base", "peft"):
            model = build(kind, args.layers, args.width)
            rows.append({"tokens": tokens, "kind": kind, **measure(model, tokens, args.width, args.reps)})
            del model
            torch.cuda.empty_cache()
    print(f"{'tokens':>6} {'kind':>6} {'eager ms':>9} {'graph ms':>9} {'LoRA ms (graph)':>16}")
    for r in rows:
        base = next(b for b in rows if b["tokens"] == r["tokens"] and b["kind"] == "base")
        r["lora_graph_ms"] = round(r["graph_ms"] - base["graph_ms"], 3)
        print(f"{r['tokens']:>6} {r['kind']:>6} {r['eager_ms']:>9.2f} {r['graph_ms']:>9.2f} {r['lora_graph_ms']:>16.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_lora.json").write_text(json.dumps({"layers": args.layers, "width": args.width,
                                                              "gpu": torch.cuda.get_device_name(), "rows": rows},
                                                             indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
