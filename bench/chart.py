"""The PNG chart of bench/RESULTS.md: trained tokens/s of each variant, from run.py's results.json files; with
--markdown, also each file's table, written into RESULTS.md between its `<!-- report:begin -->` and
`<!-- report:end -->` lines (the text around them is written by hand).

    python bench/chart.py bench/data/2026-11-28-run{6,7,8}.json --out bench/results.png --markdown bench/RESULTS.md

One bar per variant and file, grouped by file (ratios only compare within one file: one benchmark run); the epoch
figure as the bar, the steady figure (warm-up left out), where the file has it, as a tick. Drawing needs matplotlib
(a test tool on the development machine; the GPU machine has it too); the tables do not.
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


def table_lines(rows: list[dict]) -> list[str]:
    """run.py's summary rows as a markdown table (run.py prints it at the end of a run)."""
    lines = ["| variant | GPUs | tokens/s (median of n, spread) | steady tokens/s | x guide | x peer | x 1 GPU | "
             "peak GiB/GPU (reserved) | MFU/GPU | load s | tokens/step | epoch s (evals in) | start to published s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['variant']} | | {r.get('why', 'failed')} | | | | | | | | | | |")
            continue
        gpus = r.get("processes") or 1
        steady = f"{r['steady_tokens_per_s']:,.0f}" if r.get("steady_tokens_per_s") else "-"
        lines.append(
            f"| {r['variant']} | {gpus} | {r['tokens_per_s']:,.0f} (n={r.get('runs', 1)}, ±{r['spread']:,.0f}) | "
            f"{steady} | {f(r.get('x_guide'))} | {f(r.get('x_peer'))} | {f(r.get('x_1gpu'))} | "
            f"{r['peak_gib']:.1f} ({r['reserved_gib']:.1f}) | {100 * r['mfu'] / gpus:.1f}% | {r['load_s']:.1f} | "
            f"{r['tokens_per_step']:,.0f} | {seconds(r.get('seconds'))} | {seconds(r.get('e2e_s'))} |")
    return lines


def seconds(v: float | None) -> str:
    return f"{v:,.0f}" if v else "-"


def write_tables(markdown: Path, paths: list[Path], png: Path) -> None:
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
