"""CUDA graphs of small steps (job/graphs.py): what the CPU can check. The capture itself needs a GPU (bench/run.py,
bench/RESULTS.md run 18); here, the padding to buckets trains exactly what the unpadded step trains, the graphed
step's computation (gradient buffers, the loss's divisor, the metrics' token count) equals transformers' path, and
the plan switches graphs on only where they can run."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from job.config import Settings
from job.errors import ConfigError
from job.graphs import BUCKET_TOKENS, REAL_TOKENS, StepGraphs, bucket_size, every_position_scored, pad_to_bucket
from job.model import Placement
from job.speed import eval_batch_samples, plan

LENGTHS = (9, 17, 6, 12)


def batch_of(lengths, collate):
    rows = [list(range(5, 5 + n)) for n in lengths]
    return collate([{"input_ids": r, "labels": [-100] * 3 + r[3:]} for r in rows])


@pytest.fixture
def collate():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)


def test_a_micro_batch_is_padded_with_sequences_that_carry_no_loss(collate):
    batch = batch_of(LENGTHS[:2], collate)  # 26 tokens, 2 sequences; a bucket holds up to 4
    padded = pad_to_bucket(batch, max_sequences=4, pad_id=0)
    size = padded["input_ids"].shape[1]
    assert size == BUCKET_TOKENS == bucket_size(26, 3)
    assert padded[REAL_TOKENS] == 26
    cu = padded["cu_seq_lens_q"].tolist()
    assert cu[:3] == [0, 9, 26] and cu[-1] == size and len(cu) == 4 + 2  # a fixed count of boundaries per bucket
    assert all(b > a for a, b in pairwise(cu))  # no empty sequence
    assert padded["max_length_q"] == padded["max_length_k"] == size  # the kernel's bound, fixed per bucket
    assert torch.equal(padded["input_ids"][:, :26], batch["input_ids"])
    assert torch.equal(padded["labels"][:, :26], batch["labels"])
    assert (padded["labels"][:, 26:] == -100).all() and (padded["input_ids"][:, 26:] == 0).all()
    positions = padded["position_ids"][0].tolist()
    assert positions[26:29] == [0, 0, 0] and positions[-1] == size - 29  # each padding sequence from 0
    assert padded["seq_idx"][0].tolist() == [i for i, (a, b) in enumerate(pairwise(cu)) for _ in range(b - a)]
    # a micro-batch of more sequences than a bucket holds is left as it is (computed eagerly)
    assert pad_to_bucket(batch, max_sequences=1, pad_id=0) is batch
    # sizes are multiples of the bucket, with room for one token per padding sequence
    assert bucket_size(BUCKET_TOKENS - 1, 1) == BUCKET_TOKENS and bucket_size(BUCKET_TOKENS - 1, 2) == 2 * BUCKET_TOKENS


def test_the_collator_pads_each_micro_batch(collate):
    from job.steps import StepCollator

    features = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in LENGTHS]
    plain = StepCollator(collate, max_tokens=24)(features)["micro_batches"]
    padded = StepCollator(collate, max_tokens=24, bucket_sequences=4)(features)["micro_batches"]
    assert [b[REAL_TOKENS] for b in padded] == [b["input_ids"].shape[1] for b in plain] == [9, 23, 12]
    assert all(b["input_ids"].shape[1] % BUCKET_TOKENS == 0 for b in padded)
    with pytest.raises(ValueError, match="padding-free"):
        StepCollator(collate, max_samples=4, bucket_sequences=4)


@pytest.fixture
def trainer(tiny_model, tokenizer, tmp_path, collate):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from job import attention
    from job.steps import StepCollator, StepTrainer

    attention.register()
    torch.manual_seed(0)
    rows = [list(range(5, 5 + n)) for n in LENGTHS]
    ds = Dataset.from_dict({"input_ids": rows, "labels": [[-100] * 3 + r[3:] for r in rows]})
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                     dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, logging_steps=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="varlen")
    t = StepTrainer(model=model, args=args, data_collator=collate, train_dataset=ds, processing_class=tokenizer,
                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for p in t.model.parameters():  # LoRA's B starts at zero: give A's gradient something to see
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    features = [ds[i] for i in range(4)]
    t.plain = StepCollator(collate, max_tokens=24)(features)  # the four samples in three micro-batches
    t.padded = StepCollator(collate, max_tokens=24, bucket_sequences=4)(features)
    return t


def step_result(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    trainer._tallies.clear()
    loss = trainer.training_step(trainer.model, batch)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, trainer._tallies["train"].clone()


def test_the_padding_is_not_counted_in_the_steps_flops(trainer):
    assert trainer.floating_point_ops(trainer.padded) == pytest.approx(trainer.floating_point_ops(trainer.plain))
    assert trainer.floating_point_ops(trainer.plain) > 0


def test_a_graphed_step_trains_what_the_plain_step_trains(trainer):
    """The padded micro-batches through StepGraphs' computation (gradients from autograd.grad added into buffers,
    the step's token count as the divisor) give the plain step's loss, gradients and metrics."""
    trainer.model.train()
    loss, grads, tally = step_result(trainer, trainer.plain)
    trainer.graphs = StepGraphs(trainer.model.parameters(), "cpu", capture=False)
    graphed_loss, graphed_grads, graphed_tally = step_result(trainer, trainer.padded)
    assert len(trainer.padded["micro_batches"]) == 3
    torch.testing.assert_close(graphed_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == graphed_grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(graphed_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # entropy, top-1 hits, labelled tokens, input tokens: the padding counts in none of them
    torch.testing.assert_close(graphed_tally, tally, rtol=1e-5, atol=1e-6)
    assert graphed_tally[3] == sum(LENGTHS)


def test_a_micro_batch_without_a_bucket_is_computed_eagerly_in_the_same_step(trainer):
    """A micro-batch left unpadded (more samples than a bucket holds), or one met after a capture failed, goes
    through transformers' path, its gradients added to the graphed ones."""
    trainer.model.train()
    loss, grads, _ = step_result(trainer, trainer.plain)
    mixed = {"micro_batches": [trainer.padded["micro_batches"][0], *trainer.plain["micro_batches"][1:]]}
    trainer.graphs = StepGraphs(trainer.model.parameters(), "cpu", capture=False)
    mixed_loss, mixed_grads, _ = step_result(trainer, mixed)
    torch.testing.assert_close(mixed_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(mixed_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
    trainer.graphs.disabled = "a capture failed"
    off_loss, off_grads, _ = step_result(trainer, trainer.padded)
    torch.testing.assert_close(off_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(off_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_trls_fused_head_is_told_to_score_every_position_and_then_restored():
    """What every_position_scored relies on in trl (a rename there must fail here, not inside a capture)."""
    import trl.trainer.utils as trl_utils

    chosen = trl_utils._use_triton
    with every_position_scored():
        assert trl_utils._use_triton(torch.device("cuda")) is False
    assert trl_utils._use_triton is chosen
    import inspect

    assert "compact = _use_triton(" in inspect.getsource(trl_utils.add_fused_lm_head)


def settings(**kw) -> Settings:
    return Settings.model_construct(**{**Settings().model_dump(), **kw})


def fake_gpu(monkeypatch, free_gib):
    monkeypatch.setattr("job.speed.free_gpu_bytes", lambda: int(free_gib * 2**30))


@pytest.mark.parametrize("kw, processes, free_gib, attention, expected", [
    ({}, 1, 130, "varlen", True),                           # the guide's 4 samples per step on an H200
    ({"batch_size": 16}, 1, 130, "varlen", False),          # 16k-token micro-batches: GEMM-bound, eager
    ({}, 2, 130, "varlen", False),                          # DDP reduces gradients outside a graph
    ({"profile": "lean"}, 1, 130, "varlen", False),         # lean checkpoints
    ({"profile": "guide"}, 1, 130, "varlen", False),        # padded micro-batches
    ({}, 1, 130, "sdpa", False),                            # no varlen kernel
    ({"compile": True}, 1, 130, "varlen", False),           # compiled layers are the other plan
    ({"packing": True}, 1, 130, "varlen", False),           # a packed row holds any number of samples
    ({"max_seq_length": 4096}, 1, 16, "varlen", False),     # a 24 GB card where the step needs checkpointing
])
def test_graphs_are_on_by_default_only_where_small_steps_can_be_captured(monkeypatch, kw, processes, free_gib,
                                                                         attention, expected):
    from transformers import LlamaConfig

    fake_gpu(monkeypatch, free_gib)
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000, intermediate_size=11008)
    config._attn_implementation = attention
    cfg = settings(**{"max_seq_length": 1024, "batch_size": 4, "use_liger": False, **kw})
    p = plan(cfg, Placement("cuda", torch.bfloat16), config, processes)
    assert p.cuda_graphs is expected
    assert p.step_samples * processes == cfg.batch_size  # never the recipe


def test_graphs_asked_for_where_they_cannot_run_are_refused_in_one_line(monkeypatch):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128, intermediate_size=128)
    config._attn_implementation = "varlen"
    with pytest.raises(ConfigError, match="FT_CUDA_GRAPHS=true: needs a CUDA GPU"):
        plan(settings(cuda_graphs=True), Placement("cpu", torch.float32), config)
    fake_gpu(monkeypatch, 130)
    with pytest.raises(ConfigError, match="FT_CUDA_GRAPHS=true: needs bf16 compute"):
        plan(settings(cuda_graphs=True), Placement("cuda", torch.float16), config)
    with pytest.raises(ConfigError, match="FT_CUDA_GRAPHS=true: runs on one process"):
        plan(settings(cuda_graphs=True, batch_size=4), Placement("cuda", torch.bfloat16), config, 2)
    with pytest.raises(ConfigError, match="FT_CUDA_GRAPHS=true: needs padding-free micro-batches, and "
                                          "FT_PROFILE=guide"):
        plan(settings(cuda_graphs=True, profile="guide"), Placement("cuda", torch.bfloat16), config)
    with pytest.raises(ConfigError, match="FT_CUDA_GRAPHS=true: cannot replay gradient checkpointing, which this "
                                          r"plan uses \(FT_PROFILE=lean\)"):
        plan(settings(cuda_graphs=True, profile="lean"), Placement("cuda", torch.bfloat16), config)
    assert plan(settings(cuda_graphs=True, batch_size=64), Placement("cuda", torch.bfloat16), config).cuda_graphs


def test_evaluation_batches_hold_as_many_samples_as_their_longest_allow():
    assert eval_batch_samples([300] * 100, 65536, 1024) == 100  # the whole set in one forward
    assert eval_batch_samples([1000, 900, 100, 50, 50], 1950, 1024) == 2  # whatever order: 1000 + 900 fit, + 100 not
    assert eval_batch_samples([5000], 4096, 1024) == 1  # at least one
    assert eval_batch_samples(None, 65536, 1024) == 64  # unknown lengths: rows of FT_MAX_SEQ_LENGTH
    assert eval_batch_samples([300] * 100, 65536, 1024, processes=2) == 50  # each process a batch of its own
    assert eval_batch_samples([300] * 101, 65536, 1024, processes=2) == 51


def test_a_forwards_memory_estimate_counts_a_wide_mlp():
    from transformers import LlamaConfig, Qwen2Config

    from job.speed import forward_bytes_per_token

    llama = LlamaConfig(hidden_size=4096, intermediate_size=11008, vocab_size=32000)
    assert forward_bytes_per_token(llama) == 34 * 4096 + 4 * 32000  # 34h covers Llama's MLP
    qwen = Qwen2Config(hidden_size=3584, intermediate_size=18944, vocab_size=152064)  # Qwen2.5-7B: 5.3h wide
    assert forward_bytes_per_token(qwen) == 8 * 3584 + 6 * 18944 + 4 * 152064


def test_a_step_after_an_evaluation_is_graphed_too(trainer):
    """transformers' evaluation leaves the model in eval mode until its training_step sets it back; the graphed step
    must not read that as "not training" and run the step after every evaluation (and the first) eagerly."""
    trainer.model.eval()  # as from_pretrained and every evaluation leave it
    trainer.graphs = StepGraphs(trainer.model.parameters(), "cpu", capture=False)
    runs = []
    run = trainer.graphs.run
    trainer.graphs.run = lambda batch, count: runs.append(batch) or run(batch, count)
    step_result(trainer, trainer.padded)
    assert len(runs) == 3 and trainer.model.training


def test_a_loss_other_than_trls_plain_one_is_not_replaced_by_the_graphed_one(trainer):
    """Graphs capture loss_and_tally (trl's plain loss); with a custom loss (as with an MoE auxiliary loss or label
    smoothing) the step computes that loss, as without graphs."""
    def custom(outputs, labels, num_items_in_batch=None):  # independent of the padding: labelled positions only
        kept = labels[..., 1:] != -100
        return outputs.logits[..., :-1, :][kept].float().logsumexp(-1).sum() / num_items_in_batch

    def result(batch):
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.training_step(trainer.model, batch)
        return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    trainer.model.train()
    trainer.compute_loss_func = custom
    loss, grads = result(trainer.plain)
    trainer.graphs = StepGraphs(trainer.model.parameters(), "cpu", capture=False)
    graphed_loss, graphed_grads = result(trainer.padded)
    torch.testing.assert_close(graphed_loss, loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(graphed_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_the_steps_token_count_is_taken_on_the_host_by_the_collator(trainer, monkeypatch):
    """On a GPU, accelerate has moved the micro-batches to the device before training_step: counting their labels
    there reads each count back (a host synchronisation per micro-batch). The collator counts them on the host."""
    from job import steps

    counts = [int(steps.trained_tokens(b)) for b in trainer.padded["micro_batches"]]
    assert trainer.padded[steps.STEP_TOKENS] == sum(counts)
    trainer.model.train()
    expected, _, _ = step_result(trainer, trainer.padded)

    def no_reads(batch):
        raise AssertionError("trained tokens counted in training_step")

    monkeypatch.setattr(steps, "trained_tokens", no_reads)
    for graphs in (None, StepGraphs(trainer.model.parameters(), "cpu", capture=False)):
        trainer.graphs = graphs
        loss, _, _ = step_result(trainer, trainer.padded)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_the_graphed_computation_scores_every_position(monkeypatch):
    """What StepGraphs captures runs trl's fused head on its every-position path (a boolean-mask selection reads its
    count back to the host, which a capture cannot); the CPU takes that path anyway, so check the switch itself."""
    import trl.trainer.utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)  # as on a GPU with Triton
    weight = torch.nn.Parameter(torch.ones(3))
    seen = []

    def loss_fn(inputs, count, tokens):
        seen.append(trl_utils._use_triton(torch.device("cuda")))
        return (weight * inputs["input_ids"][0]).sum() / count, torch.zeros(4, dtype=torch.float64)

    graphs = StepGraphs([weight], "cpu", loss_fn, capture=False)
    graphs.begin_step()
    graphs.run({"input_ids": torch.ones(1, 3), REAL_TOKENS: 3}, torch.tensor(3))
    graphs.end_step()
    assert seen == [False] and torch.equal(weight.grad, torch.full((3,), 1 / 3))


def test_gradients_are_not_doubled_when_zero_grad_keeps_the_buffers(trainer):
    """end_step hands the gradient buffers to .grad; a zero_grad(set_to_none=False) between steps leaves .grad being
    that buffer, which the next end_step must not add to itself."""
    trainer.model.train()
    trainer.graphs = StepGraphs(trainer.model.parameters(), "cpu", capture=False)
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.eval()  # the same computation twice: no dropout
    trainer._graphed_step(trainer.model, trainer.padded["micro_batches"], trainer.padded["step_trained_tokens"])
    first = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=False)
    trainer._graphed_step(trainer.model, trainer.padded["micro_batches"], trainer.padded["step_trained_tokens"])
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, first[n], rtol=1e-5, atol=1e-8, msg=n)


def test_a_graphed_step_leaves_the_callers_micro_batches_as_they_were(trainer):
    """A bucket's static inputs are its own tensors: where the batch is already on the graphs' device (a GPU, where
    accelerate put it; the CPU here), `.to` returned the first micro-batch's tensors, into which every later
    micro-batch of the bucket was then copied."""
    before = [{k: v.clone() for k, v in mb.items() if isinstance(v, torch.Tensor)}
              for mb in trainer.padded["micro_batches"]]
    trainer.model.train()
    trainer.graphs = StepGraphs(trainer.model.parameters(), "cpu", capture=False)
    step_result(trainer, trainer.padded)
    for mb, kept in zip(trainer.padded["micro_batches"], before):
        for k, v in kept.items():
            assert torch.equal(mb[k], v), k


class Recording:
    """What a CUDA graph's capture gives on the CPU: nothing runs when recorded, the computation runs on replay."""

    def __init__(self, compute):
        self.compute, self.replays = compute, 0

    def replay(self):
        self.replays += 1
        self.compute()


@pytest.fixture
def recorded(monkeypatch):
    """StepGraphs with capture on, its two CUDA-only seams (the capture, the warm-up on a side stream) done on the
    CPU; `failures` lists the captures (by number) that raise, as a capture that reads a value back would."""
    made, failures = [], set()

    def record(self, static):
        made.append(static.inputs["input_ids"].shape[1])
        if len(made) in failures:
            raise RuntimeError("operation not permitted when stream is capturing")
        return Recording(lambda: self._compute(static))

    monkeypatch.setattr(StepGraphs, "_record", record)
    monkeypatch.setattr(StepGraphs, "_eager_on_side_stream", lambda self, static: self._compute(static))
    return made, failures


def test_captured_steps_warm_up_once_then_replay_and_train_what_the_plain_step_trains(trainer, recorded):
    """The first micro-batch is computed by the warm-up and then captured (its capture must not count twice); the
    others replay; two steps in a row give the plain step's loss and gradients each time."""
    made, _ = recorded
    trainer.model.train()
    loss, grads, tally = step_result(trainer, trainer.plain)
    trainer.graphs = StepGraphs(trainer.model.parameters(), "cpu", capture=True)
    for _ in range(2):
        graphed_loss, graphed_grads, graphed_tally = step_result(trainer, trainer.padded)
        torch.testing.assert_close(graphed_loss, loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(graphed_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(graphed_tally, tally, rtol=1e-5, atol=1e-6)
    assert made == [BUCKET_TOKENS]  # one bucket, captured once
    assert trainer.graphs.statics[BUCKET_TOKENS].graph.replays == 2 * 3 - 1  # all but the warm-up


@pytest.mark.parametrize("failing", [1, 2])
def test_a_failed_capture_leaves_the_run_eager_and_the_step_whole(trainer, recorded, failing, collate):
    """A capture that fails (the first, after its warm-up computed the micro-batch; or a later bucket's) turns
    graphs off for the rest of the run; that micro-batch and the rest compute eagerly: the same step."""
    from job.steps import StepCollator

    made, failures = recorded
    failures.add(failing)
    features = [trainer.train_dataset[i] for i in range(4)]
    # two buckets: a micro-batch of 200+ tokens pads to 512
    features[1] = {"input_ids": list(range(5, 255)), "labels": [-100] * 3 + list(range(8, 255))}
    plain = StepCollator(collate, max_tokens=260)(features)
    padded = StepCollator(collate, max_tokens=260, bucket_sequences=4)(features)
    assert [b["input_ids"].shape[1] for b in padded["micro_batches"]] == [512, 256]
    trainer.model.train()
    loss, grads, _ = step_result(trainer, plain)
    trainer.graphs = StepGraphs(trainer.model.parameters(), "cpu", capture=True)
    for _ in range(2):
        graphed_loss, graphed_grads, _ = step_result(trainer, padded)
        torch.testing.assert_close(graphed_loss, loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(graphed_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert trainer.graphs.disabled and not trainer.graphs.statics
    assert made == [512, 256][:failing]
