"""The PNG chart of bench/RESULTS.md: trained tokens/s of each variant, from run.py's results.json files; with
--markdown, also each file's table, written into RESULTS.md between its `<!-- report:begin -->` and
`<!-- report:end -->` lines (the text around them is written by hand).

    python bench/chart.py bench/data/2026-11-28-run{6,7,8}.json --out bench/results.png --markdown bench/RESULTS.md

One bar per variant and file, grouped by file (ratios only compare within one file: one benchmark run); the epoch
figure as the bar, the steady figure (warm-up left out), where the file has it, as a tick. Runs on the development
machine (matplotlib is a test tool here, not on the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def rows(paths: list[Path]) -> list[tuple[str, str, float, float | None, int]]:
    """(run label, variant, epoch tokens/s, steady tokens/s or None, GPUs) for every successful variant."""
    found = []
    for path in paths:
        for r in json.loads(path.read_text())["summary"]:
            if "tokens_per_s" in r:
                found.append((path.stem, r["variant"], r["tokens_per_s"], r.get("steady_tokens_per_s"),
                              r.get("processes", 1)))
    return found


def draw(data: list[tuple[str, str, float, float | None, int]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(run for run, *_ in data))
    colors = {run: plt.get_cmap("tab10")(i) for i, run in enumerate(runs)}
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(data) + 1.6))
    labels = [f"{variant} ({gpus} GPU{'s' if gpus > 1 else ''})" for _, variant, _, _, gpus in data]
    y = range(len(data))[::-1]
    ax.barh(list(y), [epoch for _, _, epoch, _, _ in data], color=[colors[run] for run, *_ in data])
    for yi, (_, _, epoch, steady, _) in zip(y, data):
        ax.text(epoch, yi, f" {epoch:,.0f}", va="center", fontsize=8)
        if steady:
            ax.plot([steady, steady], [yi - 0.4, yi + 0.4], color="black", linewidth=1)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("trained tokens/s over the epoch (tick: steady, warm-up left out)")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colors[r]) for r in runs], labels=runs, fontsize=7,
              loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("results", type=Path, nargs="+", help="results.json files written by bench/run.py")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results.png")
    p.add_argument("--title", default="Llama-2-7b shape, nf4 QLoRA, 1000-sample epoch, H200")
    p.add_argument("--markdown", type=Path, help="a RESULTS.md whose report block gets each file's table")
    args = p.parse_args(argv)
    draw(rows(args.results), args.out, args.title)
    print(args.out)
    if args.markdown:
        write_tables(args.markdown, args.results, args.out)
        print(args.markdown)
    return 0


BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"


def write_tables(markdown: Path, paths: list[Path], png: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from run import table_lines  # bench/run.py: the same table a run prints

    text = markdown.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{markdown}: no {BEGIN} ... {END} block to fill")
    block = [BEGIN, "", f"![tokens/s by variant]({os.path.relpath(png, markdown.parent)})", ""]
    for path in paths:
        data = json.loads(path.read_text())
        gpus = data.get("gpus")
        block += [f"**{path.stem}**: bf16 GEMM {data['gemm_tflops']:.0f} TFLOP/s, {data['samples']} samples"
                  + (f", GPUs {gpus}" if gpus else "") + (f"; `{data['command']}`" if data.get("command") else ""),
                  "", *table_lines(data["summary"]), ""]
    head, rest = text.split(BEGIN, 1)
    markdown.write_text(head + "\n".join(block) + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
