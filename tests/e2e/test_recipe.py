"""The recipe is what is trained: every plan takes the same optimizer steps over the same samples and ends at the same
adapter; only FT_PACKING (the user's explicit choice) changes the steps, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_run import demo_env, events, run_job

# 40 samples, 4 held out; 36 in steps of 8 (batch 4 x accumulation 2): 5 steps, the last one of 4 samples. Dropout
# off: its random masks are drawn per micro-batch shape, which is the plan's business.
COMMON = dict(FT_MAX_SAMPLES="40", FT_EVAL_FRACTION="0.1", FT_NUM_TRAIN_EPOCHS="1", FT_LOGGING_STEPS="1",
              FT_EVAL_STEPS="2", FT_LORA_DROPOUT="0", FT_BATCH_SIZE="4", FT_GRADIENT_ACCUMULATION_STEPS="2",
              FT_MAX_SEQ_LENGTH="64")
PLANS = {
    "guide": {"FT_PROFILE": "guide"},  # padded micro-batches of 4 samples, accumulated twice, checkpointing
    "fast": {"FT_PROFILE": "fast"},  # one padding-free micro-batch per step
    "split": {"FT_PROFILE": "fast", "FT_MICRO_BATCH_TOKENS": "64"},  # a micro-batch per sample or two
    "lean": {"FT_PROFILE": "lean", "FT_MICRO_BATCH_TOKENS": "128"},
    "compiled": {"FT_PROFILE": "fast", "FT_COMPILE": "true"},  # regional torch.compile of the decoder layers
    "dequantized": {"FT_PROFILE": "fast", "FT_DEQUANTIZE_ONCE": "true"},  # the 4-bit weights dequantized once
    # FT_COMPILE as a GPU with room runs it: compiled layers over the dequantized copy
    "compiled-dequantized": {"FT_PROFILE": "fast", "FT_COMPILE": "true", "FT_DEQUANTIZE_ONCE": "true"},
    # CUDA graphs as a GPU runs them (FT_CUDA_GRAPHS): micro-batches padded to buckets, computed through StepGraphs'
    # buffers without the capture the CPU cannot do (graphs_on_cpu/sitecustomize.py), with the varlen reference
    "graphed": {"FT_PROFILE": "fast", "FT_ATTENTION": "varlen",
                "PYTHONPATH": str(Path(__file__).parent / "graphs_on_cpu")},
}


def train(tiny_model, tmp_path, name: str, **extra: str) -> dict:
    from safetensors.torch import load_file

    proc = run_job(demo_env(tiny_model, FT_RUN_ID=name, **COMMON, **extra), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = events(proc)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "out" / name / "tensorboard"))
    board.Reload()
    return {
        "tensorboard": {tag: [s.value for s in board.Scalars(tag)] for tag in board.Tags()["scalars"]},
        "manifest": json.loads((tmp_path / "out" / name / "manifest.json").read_text()),
        "losses": [e["loss"] for e in log if e["event"] == "train step"],
        "evals": [e for e in log if e["event"] == "eval"],
        "adapter": load_file(tmp_path / "out" / name / "adapter" / "adapter_model.safetensors"),
        "log": log,
    }


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe")
    return {name: train(tiny_model, tmp, name, **extra) for name, extra in PLANS.items()}


def test_every_plan_takes_the_recipes_steps(runs):
    for name, run in runs.items():
        training = run["manifest"]["training"]
        assert (training["steps"], training["steps_per_epoch"], training["global_batch"]) == (5, 5, 8), name
        assert len(run["losses"]) == 5, name
    assert runs["split"]["manifest"]["training"]["micro_batch_tokens"] == 64
    # FT_LORA_TARGET_MODULES=all-linear (examples/tiny.env) as resolved for the model, in the manifest
    assert runs["fast"]["manifest"]["training"]["lora_target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert runs["guide"]["manifest"]["training"]["padding_free"] is False


def test_padding_free_and_split_steps_train_what_padded_steps_train(runs):
    """The same per-step losses and the same adapter, within float32 noise, however a step is computed."""
    reference = runs["guide"]
    assert reference["losses"][-1] < reference["losses"][0]  # it learns, so equal losses mean something
    for name in ("fast", "split", "lean", "compiled", "dequantized", "compiled-dequantized", "graphed"):
        assert runs[name]["losses"] == pytest.approx(reference["losses"], rel=1e-4), name
        for key, weight in reference["adapter"].items():
            torch.testing.assert_close(runs[name]["adapter"][key], weight, rtol=1e-3, atol=1e-5, msg=name)


def test_compiled_layers_share_their_graphs(runs, tiny_model):
    """FT_COMPILE compiles every decoder layer; they share their graphs (one per layer, or per token count, would
    mean recompilations eating the gain): one for training (the embeddings are made to need a gradient so that the
    first layer's input is like the others'). Evaluation (not launch-bound, and its graph would be a compile of its
    own) and the sample answers after training (no KV-cache recompilations) run eagerly; the equal eval losses above
    say that evaluating eagerly changes nothing."""
    log = runs["compiled"]["log"]
    layers = json.loads((tiny_model / "config.json").read_text())["num_hidden_layers"]
    assert next(e for e in log if e["event"] == "decoder layers compiled")["layers"] == layers
    for name in ("compiled", "compiled-dequantized"):
        compiled = next(e for e in runs[name]["log"] if e["event"] == "compiled graphs")
        assert compiled["graphs"] == 1 and compiled["graph_breaks"] == 0, (name, compiled)
        seconds = compiled["compile_seconds"]  # where the compile's time went (phases found in a cache are absent)
        assert seconds["total"] > 0 and seconds["dynamo_trace"] > 0, (name, seconds)
    # Over the dequantized copy no bitsandbytes autograd.Function is left in the graphs, so AOTAutograd can cache them
    # and a warm TORCHINDUCTOR_CACHE_DIR saves the next run most of its compile.
    assert not next(e for e in runs["compiled-dequantized"]["log"] if e["event"] == "compiled graphs").get(
        "cache_bypass_aot")
    assert runs["compiled"]["manifest"]["quality"]["generations"]["samples"]
    assert not any(e["event"] == "decoder layers compiled" for e in runs["fast"]["log"])


def test_graphed_steps_are_padded_to_buckets(runs):
    """The `graphed` run took the path a GPU captures: every micro-batch padded to a multiple of the bucket size, the
    padding trained nothing (the losses and adapter above) and counted in no metric (the same token counts)."""
    from job.graphs import BUCKET_TOKENS

    assert runs["graphed"]["manifest"]["training"]["cuda_graphs"] is True
    assert runs["fast"]["manifest"]["training"]["cuda_graphs"] is False  # the CPU itself never plans them
    graphs = next(e for e in runs["graphed"]["log"] if e["event"] == "CUDA graphs")
    assert graphs["buckets"] and all(b % BUCKET_TOKENS == 0 for b in graphs["buckets"]) and graphs["off"] is None
    graphed, fast = runs["graphed"]["tensorboard"], runs["fast"]["tensorboard"]
    assert graphed["train/num_tokens"] == fast["train/num_tokens"] and fast["train/num_tokens"][-1] > 0
    for tag in ("train/entropy", "train/mean_token_accuracy"):
        assert graphed[tag] == pytest.approx(fast[tag], rel=1e-4), tag


def test_dequantized_weights_are_used_for_training_and_released(runs):
    """FT_DEQUANTIZE_ONCE keeps the copies through training (the equal losses above say they compute what the 4-bit
    layers compute) and releases them before the sample answers; the default on the CPU leaves them off."""
    log = runs["dequantized"]["log"]
    copied = next(e for e in log if e["event"] == "4-bit base weights dequantized once")
    assert copied["bytes"] > 0 and copied["layers"] > 0
    assert runs["dequantized"]["manifest"]["training"]["dequantize_once"] is True
    assert runs["fast"]["manifest"]["training"]["dequantize_once"] is False
    assert runs["dequantized"]["manifest"]["quality"]["generations"]["samples"]


def test_evaluation_is_one_per_token_mean_however_it_is_batched(runs):
    """Padded batches of 4 (guide), padding-free rows of up to 4096 (fast) or 64 tokens (split): one eval loss.
    Mid-run evaluations follow FT_EVAL_STEPS, and the last step's evaluation is not repeated."""
    metrics = {name: run["manifest"]["metrics"] for name, run in runs.items()}
    for name, m in metrics.items():
        assert m["eval_loss_before"] == pytest.approx(metrics["guide"]["eval_loss_before"], rel=1e-5), name
        assert m["eval_loss_after"] == pytest.approx(metrics["guide"]["eval_loss_after"], rel=1e-4), name
        assert [e["step"] for e in runs[name]["evals"]] == [0, 2, 4, 5], name
    assert metrics["guide"]["eval_loss_after"] < metrics["guide"]["eval_loss_before"]


def test_packing_is_an_explicit_recipe_change_that_says_so(tiny_model, tmp_path):
    run = train(tiny_model, tmp_path, "packed", FT_PACKING="true", FT_PACKING_LENGTH="256")
    training = run["manifest"]["training"]
    # 36 samples of ~24 tokens fill 4-5 rows of 256 tokens: one step instead of five.
    assert training["unpacked_steps_per_epoch"] == 5
    assert training["steps_per_epoch"] == training["steps"] == 1
    warning = next(e for e in run["log"] if "FT_PACKING=true changes the recipe" in e["event"])
    assert (warning["samples"], warning["steps_per_epoch"], warning["unpacked_steps_per_epoch"]) == (36, 1, 5)
    card = (tmp_path / "out" / "packed" / "README.md").read_text()
    assert "1 steps per epoch, 5 unpacked" in card
