"""bitsandbytes' paged 32-bit AdamW against torch's fused AdamW on the same LoRA-shaped parameters and gradients.

    python3 bench/check_optim.py [--steps 200] [--out DIR]

The job runs FT_OPTIM=paged_adamw_32bit (the guide's optimizer) as torch's fused AdamW on a GPU (job/train.py
ADAMW_32BIT): the same update (decoupled weight decay), so the parameters must stay within fp32 rounding of each other
over many steps. This drives both with the Trainer's settings (lr 2e-4 with the job's cosine schedule and warm-up, betas
0.9/0.999, eps 1e-8, weight decay 0.001) on the 64 LoRA matrices of a 7B model's q,v at r=64 (random, not a model),
with the same random gradients (gradient clipping left out: it acts before either optimizer), and prints the largest
relative difference of the parameters and of the first update. Needs CUDA and bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import bitsandbytes as bnb

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(64, 4096), (4096, 64)] * 64
    start = [torch.randn(s, device="cuda", generator=g) * 0.02 for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    kw = {"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.001}
    fused = torch.optim.AdamW(ours, fused=True, **kw)
    paged = bnb.optim.PagedAdamW32bit(theirs, **kw)
    warm = math.ceil(0.03 * args.steps)
    for step in range(args.steps):
        lr = 2e-4 * (step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm))))
        for opt in (fused, paged):
            for group in opt.param_groups:
                group["lr"] = lr
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, device="cuda", generator=g) * 1e-3
            a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        paged.step()
        if step == warm:  # the first update at a nonzero learning rate
            update = max(((a - s) - (b - s)).abs().max().item() / (b - s).abs().max().item()
                         for a, b, s in zip(ours, theirs, start))
    moved = max((b - s).abs().max().item() for b, s in zip(theirs, start))
    diff = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    result = {"steps": args.steps, "max_abs_param_diff": diff, "max_abs_movement": moved,
              "diff_over_movement": diff / moved, "first_update_rel_diff": update}
    print(json.dumps(result))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "check_optim.json").write_text(json.dumps(result, indent=2))
    return 0 if diff / moved < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
