"""The launcher's decisions (torchrun arguments, node rank, exit code) and the global batch split, without launching."""

from __future__ import annotations

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from job import distributed, speed
from job.config import Settings
from job.identity import settings_fingerprint
from job.errors import CODE_BY_NAME, ConfigError


def settings(**kw) -> Settings:
    return Settings(device="cpu", **kw)


def test_one_process_needs_no_launcher(monkeypatch):
    assert not distributed.wants_launcher(settings())
    assert distributed.wants_launcher(settings(nproc_per_node=2))
    assert distributed.wants_launcher(settings(nnodes=2))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # a worker never launches again
    assert not distributed.wants_launcher(settings(nproc_per_node=2))


def test_single_node_is_standalone():
    args = distributed.torchrun_args(settings(nproc_per_node=4), "run-1")
    assert args[args.index("--nproc-per-node") + 1] == "4"
    assert "--standalone" in args and "--rdzv-endpoint" not in args
    assert args[-3:] == ["--module", "job", "run"]


@pytest.mark.parametrize("index, host", [("0", "true"), ("1", "false")])
def test_nodes_meet_at_master_addr_with_rank_from_the_indexed_job(monkeypatch, index, host):
    monkeypatch.setenv("MASTER_ADDR", "train-0.train")
    monkeypatch.setenv("MASTER_PORT", "29555")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", index)
    args = distributed.torchrun_args(settings(nnodes=2, dist_timeout_seconds=60), "run-7")
    opt = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert opt["--rdzv-backend"] == "c10d" and opt["--rdzv-endpoint"] == "train-0.train:29555"
    assert opt["--nnodes"] == "2" and opt["--rdzv-id"] == "run-7"
    assert f"is_host={host}" in opt["--rdzv-conf"] and "join_timeout=60" in opt["--rdzv-conf"]
    assert "--standalone" not in args


def test_several_nodes_need_a_master_address_and_a_rank(monkeypatch):
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        distributed.torchrun_args(settings(nnodes=2, node_rank=0), "r")
    monkeypatch.setenv("MASTER_ADDR", "h")
    with pytest.raises(ConfigError, match="FT_NODE_RANK"):
        distributed.torchrun_args(settings(nnodes=2), "r")
    monkeypatch.setenv("MASTER_PORT", "http")
    with pytest.raises(ConfigError, match="MASTER_PORT=http"):
        distributed.torchrun_args(settings(nnodes=2, node_rank=1), "r")


def test_node_rank_must_be_below_nnodes(monkeypatch):
    monkeypatch.setenv("FT_NNODES", "2")
    monkeypatch.setenv("FT_NODE_RANK", "2")
    from job.config import load_settings

    with pytest.raises(ConfigError, match="FT_NODE_RANK=2: must be below FT_NNODES=2"):
        load_settings()


def test_every_node_names_the_run_alike():
    """The default run id is a fingerprint of the settings: a node's rank and the process count are not in it."""
    one = settings_fingerprint(settings())
    assert settings_fingerprint(settings(nnodes=2, node_rank=1, nproc_per_node=2)) == one
    assert settings_fingerprint(settings(learning_rate=1e-4)) != one


def test_aws_batch_nodes_of_one_job_name_the_run_alike(monkeypatch):
    from job.identity import resolve_run_id

    monkeypatch.setenv("AWS_BATCH_JOB_ID", "1f2e3d4c-aaaa-bbbb-cccc-0123456789ab#1")
    assert resolve_run_id(settings()) == "1f2e3d4c-aaaa-bbbb-cccc-0123456789ab"


def test_more_processes_than_gpus_is_a_config_error(monkeypatch):
    monkeypatch.setattr(distributed, "_gpus", lambda: 2)
    with pytest.raises(ConfigError, match="FT_NPROC_PER_NODE=4: this node shows only 2 GPU"):
        distributed.processes_per_node(Settings(nproc_per_node=4))
    assert distributed.processes_per_node(Settings()) == 2  # default: every GPU


def test_fsdp_on_the_cpu_is_refused_before_launching():
    """accelerate applies FSDP to GPU process groups only: on the CPU the run would silently be DDP."""
    with pytest.raises(ConfigError, match="FT_STRATEGY=fsdp: FSDP shards over GPUs"):
        distributed.launch(settings(nproc_per_node=2, strategy="fsdp"), "r")


def failure(rank: int, code: int, ts: int) -> ProcessFailure:
    f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="/nonexistent")
    f.timestamp = ts
    return f


def test_exit_code_is_the_cause_not_its_echo():
    unavailable, inp = CODE_BY_NAME["unavailable"], CODE_BY_NAME["input"]
    # rank 1 failed on its input; rank 0 then lost its peer, at the same second
    assert distributed.exit_code_of({0: failure(0, unavailable, 5), 1: failure(1, inp, 5)}) == inp
    assert distributed.exit_code_of({0: failure(0, 6, 9), 1: failure(1, 3, 4)}) == 3  # the earlier
    assert distributed.exit_code_of({0: failure(0, unavailable, 5)}) == unavailable
    assert distributed.exit_code_of({1: failure(1, -9, 5)}) == 1  # killed from outside: no code of ours
    # NCCL's watchdog aborts a process whose collective timed out (torchrun sets TORCH_NCCL_ASYNC_ERROR_HANDLING)
    assert distributed.exit_code_of({1: failure(1, -6, 5)}) == unavailable
    assert distributed.exit_code_of({0: failure(0, -6, 4), 1: failure(1, inp, 5)}) == inp


@pytest.mark.parametrize("batch, accum, processes, padding_free, expected", [
    (8, 1, 2, False, (4, 4)),   # the guide's padded micro-batches: 4 samples per process
    (4, 6, 4, False, (6, 4)),   # 24 samples = 6 per process, padded micro-batches of at most 4
    (4, 2, 2, True, (4, None)),  # padding-free: each process's 4 samples in micro-batches by tokens
    (8, 3, 1, True, (24, None)),  # one process: the whole step
])
def test_global_batch_is_kept(tiny_model, batch, accum, processes, padding_free, expected):
    from transformers import AutoConfig

    from job.model import Placement
    import torch

    cfg = settings(batch_size=batch, gradient_accumulation_steps=accum, max_seq_length=128, padding_free=padding_free)
    plan = speed.plan(cfg, Placement("cpu", torch.float32), AutoConfig.from_pretrained(tiny_model), processes)
    assert (plan.step_samples, plan.micro_batch_size) == expected
    assert plan.global_batch == batch * accum


def test_global_batch_that_cannot_be_split_is_a_clear_error(tiny_model):
    from transformers import AutoConfig

    from job.model import Placement
    import torch

    with pytest.raises(ConfigError, match=r"^FT_BATCH_SIZE=3 x FT_GRADIENT_ACCUMULATION_STEPS=1: the global batch of 3 "
                                          r"samples cannot be split evenly over 2 processes \(the run's processes\)"):
        speed.plan(settings(batch_size=3), Placement("cpu", torch.float32), AutoConfig.from_pretrained(tiny_model), 2)


@pytest.mark.parametrize("visible, expected", [(None, "0"), ("3,5", "3"), ("GPU-aa,GPU-bb", "GPU-aa"), ("", "")])
def test_one_process_on_a_node_of_several_gpus_sees_one(monkeypatch, visible, expected):
    """Else the Trainer would wrap the model in nn.DataParallel over every visible GPU, which trl refuses."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    distributed.one_gpu_only(Settings(nproc_per_node=1))
    assert distributed.os.environ["CUDA_VISIBLE_DEVICES"] == expected


def test_the_default_and_workers_leave_the_gpus_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    distributed.one_gpu_only(Settings())  # every visible GPU: torchrun takes them
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    distributed.one_gpu_only(Settings(nproc_per_node=1))
    assert distributed.os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_the_fingerprint_is_the_recipe_not_the_plan():
    """A run may resume under another plan (another GPU, another profile), never under another recipe."""
    one = settings_fingerprint(settings())
    for plan in ({"profile": "guide"}, {"padding_free": False}, {"micro_batch_tokens": 2048},
                 {"gradient_checkpointing": True}, {"use_liger": False}, {"attention": "sdpa"}, {"compile": True},
                 {"dequantize_once": True}, {"dequantize_once": False}):
        assert settings_fingerprint(settings(**plan)) == one, plan
    for recipe in ({"batch_size": 8}, {"gradient_accumulation_steps": 2}, {"packing": True},
                   {"group_by_length": False}, {"seed": 1}):
        assert settings_fingerprint(settings(**recipe)) != one, recipe


@pytest.mark.parametrize("message, peer", [
    ("Application timeout caused pair closure", True),  # gloo, a frozen peer (tests/e2e: SIGSTOP)
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500", True),
    ("Timed out waiting 15000ms for recv operation to complete", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1, unhandled system error", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)", False),
])
def test_a_collective_that_lost_its_peer_is_retriable_and_a_bug_is_not(monkeypatch, message, peer):
    from job import distributed
    from job.errors import UnavailableError

    monkeypatch.setattr(distributed, "active", lambda: True)
    found = distributed.collective_failure(RuntimeError(message))
    assert isinstance(found, UnavailableError) if peer else found is None


@pytest.mark.parametrize("kw, gpus, message", [
    # FT_NPROC_PER_NODE unset: every visible GPU, which config validation cannot know (8 GPUs, the default 4 samples)
    ({"device": "auto"}, 8, "global batch of 4 samples cannot be split evenly over 8 processes .* or set "
                            "FT_NPROC_PER_NODE to fewer processes"),
    ({"batch_size": 3, "nnodes": 2, "node_rank": 0}, 0, "cannot be split evenly over 2 processes"),
    ({"nnodes": 2, "node_rank": 0}, 0, "MASTER_ADDR: not set; with FT_NNODES=2"),
    ({"nproc_per_node": 2, "strategy": "fsdp"}, 0, "FT_STRATEGY=fsdp: FSDP shards over GPUs"),
    # FSDP over every visible GPU skips the sample answers: with no eval, FT_QUALITY_CHECK=fail had nothing to check
    ({"device": "auto", "strategy": "fsdp", "quality_check": "fail", "eval_fraction": 0, "sample_prompts": '["Hi?"]'},
     2, r"FT_QUALITY_CHECK=fail: nothing to check .* FT_SAMPLE_PROMPTS are not answered while FSDP shards the model"),
])
def test_what_the_processes_need_is_checked_before_any_download(monkeypatch, kw, gpus, message):
    """`check` and preflight call check_launch: before, an uneven global batch over the default process count (every
    GPU) or over nodes failed in every process after the model was downloaded and loaded."""
    monkeypatch.setattr(distributed, "_gpus", lambda: gpus)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    cfg = Settings(**{"device": "cpu", **kw})
    with pytest.raises(ConfigError, match=message):
        distributed.check_launch(cfg, "r", rendezvous=True)


def test_check_launch_counts_the_processes(monkeypatch):
    monkeypatch.setattr(distributed, "_gpus", lambda: 4)
    monkeypatch.setenv("MASTER_ADDR", "node-0")
    assert distributed.check_launch(Settings(device="auto", batch_size=8), "r") == 4
    assert distributed.check_launch(Settings(device="auto", batch_size=8, nnodes=2, node_rank=1), "r") == 8
    assert distributed.check_launch(Settings(device="cpu"), "r") == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # a worker: what torchrun gave it
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.check_launch(Settings(device="cpu", batch_size=3), "r") == 2


def test_check_alone_leaves_the_rendezvous_to_the_nodes(monkeypatch):
    """`finetune-job check` may run where the nodes' MASTER_ADDR and ranks are not set: only the launch needs them."""
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert distributed.check_launch(Settings(device="cpu", nnodes=2), "r") == 2
