"""What a run shows of what it learned: sample answers before and after (job/samples.py), the loss curves drawn
from its own TensorBoard scalars, and a check that says when it learned nothing or does not stop.

`assess` runs after training on the process that publishes; it writes `loss.png` and a TensorBoard text summary
into the run's output folder and returns the manifest's `quality` section. `card_section` renders that section for
the model card; `enforce` turns its problems into QualityError under FT_QUALITY_CHECK=fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from job import log
from job.config import Settings
from job.errors import QualityError

CURVES = "loss.png"
MIN_STOPPED = 0.5  # the least share of sample answers after training that must end within the token budget
TEXT_TAG = "samples/generations"


def problems(metrics: dict[str, float], generations: dict[str, Any] | None, cfg: Settings) -> list[str]:
    """One line per sign that the run did not learn what it should, each saying what to change: eval loss that did
    not fall (eval_loss_after >= eval_loss_before), fewer than MIN_STOPPED of the sample answers ending with an
    end-of-turn token within FT_SAMPLE_MAX_NEW_TOKENS."""
    found = []
    before, after = metrics.get("eval_loss_before"), metrics.get("eval_loss_after")
    if before is not None and after is not None and not after < before:
        found.append(f"eval loss did not fall ({before:.4f} before, {after:.4f} after): raise FT_LEARNING_RATE (now "
                     f"{cfg.learning_rate:g}) or train longer (FT_NUM_TRAIN_EPOCHS, FT_MAX_STEPS), and check that "
                     "FT_DATASET_FORMAT trains on the answers")
    if generations and generations["stopped_after"] < MIN_STOPPED:
        n = len(generations["samples"])
        stopped = round(generations["stopped_after"] * n)
        found.append(f"{stopped} of {n} sample answers ended with an end-of-turn token within "
                     f"FT_SAMPLE_MAX_NEW_TOKENS={cfg.sample_max_new_tokens}: train longer, check that the data's "
                     "answers end with EOS (the chat data format ends each with the template's end token), or raise "
                     "FT_SAMPLE_MAX_NEW_TOKENS if the answers are meant to be longer")
    return found


def scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """train/loss and eval/loss as (step, value) pairs, read back from the run's event files by TensorBoard's own
    reader; tags that were not written are absent."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Its directory watcher logs each file it reads at INFO ("No path found after ..."): noise in the job's log.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    found = acc.Tags().get("scalars", [])
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("train/loss", "eval/loss") if tag in found}


def draw_curves(series: dict[str, list[tuple[int, float]]], out: Path) -> bool:
    """Train and eval loss against the optimizer step as a PNG at `out` (matplotlib, Agg: no display needed).
    False, and no file, when there is nothing to draw (or no matplotlib)."""
    if not any(series.values()):
        return False
    try:
        import matplotlib
    except ImportError:  # a runtime dependency; the GPU benchmark machine's hand-made environment may lack it
        log.get().warning("loss curves not drawn: matplotlib is not installed")
        return False

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    for tag, style in (("train/loss", "-"), ("eval/loss", "o-")):
        if points := series.get(tag):
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=tag, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, format="png")
    return True


def text_summary(generations: dict[str, Any]) -> str:
    """The sample answers as a Markdown table (prompt, reference, before, after), for the card and TensorBoard."""
    def cell(text: str | None, stopped: bool | None = None) -> str:
        body = "".join(c for c in " ".join((text or "").split()) if c.isprintable()).replace("|", "\\|") or "(nothing)"
        return body + ("" if stopped in (None, True) else " *(no stop)*")

    has_reference = any("reference" in s for s in generations["samples"])
    head = "| prompt |" + (" reference |" if has_reference else "") + " before | after |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in generations["samples"]:
        rows.append(f"| {cell(s['prompt'])} |" + (f" {cell(s.get('reference'))} |" if has_reference else "")
                    + f" {cell(s['before'], s['stopped_before'])} | {cell(s['after'], s['stopped_after'])} |")
    return "\n".join(rows)


def assess(cfg: Settings, model, tokenizer, eval_ds, stage: Path, metrics: dict[str, float], step: int,
           sharded: bool = False) -> dict:
    """Sample answers before and after, `loss.png` and a TensorBoard text summary in `stage` (the run's output
    folder), and the problems found, logged as a warning: the manifest's `quality` section. `model` is the trained
    PeftModel; `sharded` (FSDP) skips the answers, which would need every process."""
    from job.samples import sample_generations

    generations = None
    if sharded:
        log.get().info("sample answers skipped: the model is sharded by FSDP")
    else:
        generations = sample_generations(cfg, model, tokenizer, eval_ds)
    tb_dir = stage / "tensorboard"
    report: dict[str, Any] = {"curves": CURVES if draw_curves(scalars(tb_dir), stage / CURVES) else None}
    if generations:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(tb_dir)) as writer:
            writer.add_text(TEXT_TAG, text_summary(generations), global_step=step)
        log.get().info("sample answers", stopped_before=generations["stopped_before"],
                       stopped_after=generations["stopped_after"], seconds=generations["seconds"],
                       answers=[{k: s[k] for k in ("prompt", "before", "after")} for s in generations["samples"]])
        report["generations"] = generations
    report["problems"] = problems(metrics, generations, cfg)
    for problem in report["problems"]:
        log.get().warning("quality: " + problem, quality_check=cfg.quality_check)
    return report


def card_section(facts: dict[str, Any], root: str = "") -> str:
    """The model card's quality section from the manifest's facts: the loss curves, the sample answers, any problem
    found, and the merged model when one was exported. `root`: the run's folder relative to the card ("" for the
    run's own card, "../" for the copy in adapter/)."""
    report = facts.get("quality")
    if not report:
        return ""
    parts = ["## Quality", ""]
    if report.get("curves"):
        parts += [f"![train and eval loss]({root}{report['curves']})", ""]
    if gen := report.get("generations"):
        parts += [f"Greedy answers to {len(gen['samples'])} {gen['source']} before and after training (at most "
                  f"{gen['max_new_tokens']} new tokens): {gen['stopped_before']:.0%} stopped with an end-of-turn "
                  f"token before, {gen['stopped_after']:.0%} after.", "", text_summary(gen), ""]
    for problem in report.get("problems", []):
        parts += [f"> **Warning:** {problem}", ""]
    for problem in report.get("vllm_problems", []):
        parts += [f"> **vLLM will not load this adapter:** {problem}", ""]
    if merged := facts.get("export", {}).get("merged"):
        parts += [f"`{root}{merged['path']}/` holds the adapter merged into a {merged['dtype']} copy of the base model "
                  "(safetensors and the tokenizer), for servers without LoRA support.", ""]
    return "\n".join(parts) + "\n"


def enforce(cfg: Settings, report: dict[str, Any] | None) -> None:
    """Raise QualityError when FT_QUALITY_CHECK=fail and the run's check found a problem."""
    if cfg.quality_check == "fail" and report and report.get("problems"):
        raise QualityError("FT_QUALITY_CHECK=fail: " + "; ".join(report["problems"]))
