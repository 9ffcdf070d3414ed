"""On a GPU: for each model family's tiny model (tests/families.py), the attention the job chooses by default
(`FT_ATTENTION=auto`: varlen with the model's sliding windows, else sdpa or eager) against eager attention in fp32,
on one padding-free row of several samples (position ids restarting at each, as trl's collator makes them).

    PYTHONPATH=$PWD python3 bench/check_families.py [--out DIR] [--device cpu]

Passes a family when the chosen implementation's bf16 logits are within twice eager-in-bf16's own error of the
fp32 reference (plus 0.02), and its packed logits match each sample run alone. Exit 0 when every family passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import families  # noqa: E402 -- tests/families.py: the tiny models of each family

from job.config import Settings  # noqa: E402
from job.model import Placement, load_model  # noqa: E402

LENGTHS = (300, 45, 700, 17)  # longer than every tiny model's sliding window (8 or 16 tokens)


def packed(vocab: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(5, vocab, (n,), generator=gen) for n in LENGTHS])[None].to(device)
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None].to(device)
    return {"input_ids": ids, "position_ids": pos}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def check(family: str, path: Path, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    placement = Placement(device, dtype)
    settings = {"quantization": "none", "base_model": str(path)}
    chosen = load_model(path, Settings(attention="auto", **settings), placement).eval()
    eager = load_model(path, Settings(attention="eager", **settings), placement).eval()
    reference = load_model(path, Settings(attention="eager", **settings), Placement(device, torch.float32)).eval()
    batch = packed(chosen.config.vocab_size, device)
    ref, got, base = logits(reference, batch), logits(chosen, batch), logits(eager, batch)
    alone = torch.cat([logits(chosen, {"input_ids": ids[None]}) for ids in batch["input_ids"][0].split(list(LENGTHS))],
                      dim=1)
    err, eager_err = (got - ref).abs().max().item(), (base - ref).abs().max().item()
    alone_err = (got - alone).abs().max().item()
    ok = err <= 2 * eager_err + 0.02 and alone_err <= 2 * eager_err + 0.02
    return {"family": family, "attention": chosen.config._attn_implementation, "max_err": round(err, 4),
            "eager_bf16_err": round(eager_err, 4), "packed_vs_alone": round(alone_err, 4), "ok": ok}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/check_families"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tok, rows = families.tokenizer(), []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families.FAMILIES:
            try:
                path = families.build(family, Path(tmp) / family, families.chat_tokenizer(family, tok))
                rows.append(check(family, path, args.device))
            except Exception as e:  # one broken family must not hide the others
                rows.append({"family": family, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "check_families.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} families pass on {args.device}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
