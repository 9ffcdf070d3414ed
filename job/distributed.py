"""Several processes and nodes, on PyTorch's own elastic launcher (torchrun).

`finetune-job run` with more than one process wanted (FT_NPROC_PER_NODE, or every visible GPU; FT_NNODES) runs
torchrun in-process with itself as the worker command: standalone on one node, c10d rendezvous at
MASTER_ADDR:MASTER_PORT across nodes, node 0 (FT_NODE_RANK, default JOB_COMPLETION_INDEX) hosting it. The
launcher's exit code is the first failed worker's, so the exit-code contract (job.errors) holds as for one process.

In the workers (this module's other functions): one process group with FT_DIST_TIMEOUT_SECONDS on every
collective, local rank 0 of each node first through downloads and scratch set-up, global rank 0 alone writes
TensorBoard, mirrors checkpoints and publishes, every rank resumes from the checkpoint rank 0 found, and a stop signal
on any process stops them all at the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from datetime import timedelta
from pathlib import Path

from job import log
from job.config import Settings
from job.errors import CODE_BY_NAME, ConfigError, JobError, StopSignal, UnavailableError, first_line

DEFAULT_PORT = 29500
UNAVAILABLE, INTERRUPTED = CODE_BY_NAME["unavailable"], CODE_BY_NAME["interrupted"]
NODE_RANK_VARS = ("JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_NODE_INDEX")  # Kubernetes Indexed Jobs/JobSets, AWS Batch


# --- the launcher --------------------------------------------------------------------------------------------------

def is_worker() -> bool:
    """Started by torchrun (which sets TORCHELASTIC_RUN_ID for its workers)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()  # counts through NVML: no CUDA context in the launcher


def processes_per_node(cfg: Settings) -> int:
    if cfg.device == "cpu":
        return cfg.nproc_per_node or 1
    gpus = _gpus()
    if cfg.nproc_per_node and gpus and cfg.nproc_per_node > gpus:
        raise ConfigError([f"FT_NPROC_PER_NODE={cfg.nproc_per_node}: this node shows only {gpus} GPU(s); one process "
                           "per GPU"])
    return cfg.nproc_per_node or max(1, gpus)


def wants_launcher(cfg: Settings) -> bool:
    return not is_worker() and (cfg.nnodes > 1 or processes_per_node(cfg) > 1)


def node_rank(cfg: Settings) -> int:
    if cfg.node_rank is not None:
        return cfg.node_rank
    for var in NODE_RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    if cfg.nnodes == 1:
        return 0
    raise ConfigError([f"FT_NODE_RANK: not set, and none of {', '.join(NODE_RANK_VARS)} is; with FT_NNODES="
                       f"{cfg.nnodes} every node needs its rank (0 to {cfg.nnodes - 1})"])


def master_addr() -> str | None:
    """Node 0's address for the rendezvous: MASTER_ADDR, else what an AWS Batch multi-node job says of it."""
    return os.environ.get("MASTER_ADDR") or aws_batch_main_node()


def aws_batch_main_node() -> str | None:
    """The rendezvous address in an AWS Batch multi-node parallel job, which sets no MASTER_ADDR: the main node's
    private IPv4 address on the other nodes (AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS), this host's name on the
    main node itself, which hosts the rendezvous (AWS_BATCH_JOB_NODE_INDEX = AWS_BATCH_JOB_MAIN_NODE_INDEX); None
    outside such a job."""
    env = os.environ
    if main := env.get("AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"):
        return main
    index, main_index = env.get("AWS_BATCH_JOB_NODE_INDEX"), env.get("AWS_BATCH_JOB_MAIN_NODE_INDEX")
    return socket.gethostname() if index is not None and index == main_index else None


def torchrun_args(cfg: Settings, run_id: str, nproc: int | None = None) -> list[str]:
    nproc = nproc or processes_per_node(cfg)
    args = ["--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "1"]
    if cfg.nnodes == 1:
        args.append("--standalone")
    else:
        addr = master_addr()
        if not addr:
            raise ConfigError([f"MASTER_ADDR: not set; with FT_NNODES={cfg.nnodes} it must name node 0 (the Helm "
                               "chart sets it to the first pod's hostname)"])
        port = os.environ.get("MASTER_PORT") or str(DEFAULT_PORT)
        if not port.isdigit():
            raise ConfigError([f"MASTER_PORT={port}: must be a port number"])
        rank = node_rank(cfg)
        timeout = int(cfg.dist_timeout_seconds)
        args += ["--nnodes", str(cfg.nnodes), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", f"{addr}:{port}", "--rdzv-id", run_id,
                 # Node 0 hosts the rendezvous store: set, not guessed from host names (all alike on loopback).
                 "--rdzv-conf", f"is_host={'true' if rank == 0 else 'false'},join_timeout={timeout},"
                 f"read_timeout={timeout}"]
    return [*args, "--module", "job", "run"]


def check_launch(cfg: Settings, run_id: str, rendezvous: bool = False) -> int:
    """What the processes of a run need of the settings, checked before anything is downloaded (`finetune-job check`,
    preflight) and again before torchrun starts: the global batch splits evenly over every process of every node
    (FT_NPROC_PER_NODE defaults to each visible GPU, so config validation alone cannot know the count), FSDP has
    GPUs and FT_QUALITY_CHECK=fail has something to check under it; with `rendezvous` (the launch itself, not `check`,
    which may run elsewhere than the nodes), that several nodes know where to meet (MASTER_ADDR, MASTER_PORT,
    FT_NODE_RANK). Returns the process count over all nodes; raises ConfigError naming the setting. A torchrun worker
    has passed these already: returns its world size."""
    if is_worker():
        return world_size()
    nproc = processes_per_node(cfg)
    processes = nproc * cfg.nnodes
    if error := cfg.uneven_global_batch(processes, f"{nproc} per node, by default one per visible GPU, x "
                                                   f"FT_NNODES={cfg.nnodes}"):
        raise ConfigError([error])
    if processes > 1 and cfg.strategy == "fsdp" and (cfg.device == "cpu" or not _gpus()):
        raise ConfigError(["FT_STRATEGY=fsdp: FSDP shards over GPUs (accelerate applies it to GPU process groups "
                           "only); on the CPU use ddp"])
    if error := cfg.nothing_to_check(processes):  # FSDP over the default count: the sample answers are skipped
        raise ConfigError([error])
    if processes > 1 and rendezvous:
        torchrun_args(cfg, run_id, nproc)  # MASTER_ADDR, MASTER_PORT and the node rank, as the launch reads them
    return processes


def launch(cfg: Settings, run_id: str) -> int:
    """Run the workers under torchrun and return the exit code of the first that failed (0 when all succeeded)."""
    from torch.distributed import DistNetworkError, DistStoreError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    check_launch(cfg, run_id, rendezvous=True)
    if cfg.strategy == "fsdp" and cfg.quantization in ("nf4", "fp4"):
        log.get().warning("FT_STRATEGY=fsdp: every GPU holds all of the 4-bit weights; FSDP shards the 16-bit weights, "
                          "LoRA and the optimizer state (FSDP2 changes 4-bit weights it shards: "
                          "bitsandbytes-foundation/bitsandbytes#1945; bench/RESULTS.md run 13)")
    nproc = processes_per_node(cfg)
    args = torchrun_args(cfg, run_id, nproc)
    log.get().info("launching workers with torchrun", nnodes=cfg.nnodes, node_rank=node_rank(cfg),
                   nproc_per_node=nproc, strategy=cfg.strategy,
                   rendezvous=master_addr() and f"{master_addr()}:"
                   f"{os.environ.get('MASTER_PORT') or DEFAULT_PORT}")
    # Workers that got SIGTERM need the grace budget to save; torchrun waits this long before SIGKILL.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(cfg.termination_grace_seconds) + 5))
    os.environ["FT_RUN_ID"] = run_id  # every worker (and node) must name the run alike
    # torchrun's default is one thread per worker (and a warning); share this node's cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(parse_args(args))
    except (RendezvousError, DistNetworkError, DistStoreError) as e:
        raise UnavailableError(f"the nodes did not meet at {master_addr()}:"
                               f"{os.environ.get('MASTER_PORT') or DEFAULT_PORT} within FT_DIST_TIMEOUT_SECONDS="
                               f"{cfg.dist_timeout_seconds:g} ({type(e).__name__}: {first_line(e, 200)})") from None
    except ChildFailedError as e:
        return exit_code_of(e.failures)
    except SignalException as e:
        # torchrun has passed the signal on to the workers and waited for them to save and stop.
        raise StopSignal(f"stopped by {e.sigval.name}") from None
    return 0


def exit_code_of(failures: dict) -> int:
    """The exit code of the failure that caused the others: peers of a failed process fail with "unavailable" (or
    "interrupted") when it goes away, so those count last; then the earliest, then the lowest rank."""
    rank, failure = min(failures.items(), key=lambda f: (f[1].exitcode in (UNAVAILABLE, INTERRUPTED) or
                                                         f[1].exitcode < 0, f[1].timestamp, f[0]))
    if failure.exitcode == -signal.SIGABRT:
        # torchrun's workers run with TORCH_NCCL_ASYNC_ERROR_HANDLING: NCCL's watchdog aborts a process whose
        # collective timed out or lost its peer, before Python can say so.
        log.get().error(f"worker rank {rank} was aborted by NCCL's watchdog: a collective timed out or a peer "
                        "stopped (FT_DIST_TIMEOUT_SECONDS bounds the wait); a restart resumes from the last checkpoint",
                        rank=rank, exit_code=UNAVAILABLE, reason="unavailable")
        return UNAVAILABLE
    if failure.exitcode < 0:  # killed by a signal torchrun did not send: the OOM killer, a node going away
        log.get().error(f"worker rank {rank} was killed by {failure.signal_name()}", rank=rank, exit_code=1)
        return 1
    log.get().info("worker failed; its reason is logged above", rank=rank, exit_code=failure.exitcode)
    return failure.exitcode


def one_gpu_only(cfg: Settings) -> None:
    """FT_NPROC_PER_NODE=1 on a node with several GPUs: show the process the first only (else the Trainer spreads each
    batch over all of them with nn.DataParallel, which trl refuses). Set before CUDA starts, without asking torch:
    where NVML is missing, counting the GPUs would start CUDA and fix what it sees."""
    if is_worker() or cfg.device == "cpu" or cfg.nproc_per_node != 1:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible == "":  # every GPU hidden on purpose
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = (visible or "0").split(",")[0].strip() or "0"


# --- in the workers -------------------------------------------------------------------------------------------------

def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init(cfg: Settings) -> None:
    """Pick this process's GPU and join the process group, before anything touches CUDA."""
    if not is_worker():
        return
    import torch
    from accelerate import PartialState

    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    PartialState(cpu=not cuda, backend="nccl" if cuda else "gloo",
                 timeout=timedelta(seconds=cfg.dist_timeout_seconds))
    global _slow_group, _flag_group
    import torch.distributed as dist

    # Small agreements taken every step go through the CPU, so that they never wait for the GPU's queue to drain.
    _flag_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.dist_timeout_seconds)) if cuda \
        else dist.group.WORLD
    # Waits behind one process's transfers (a download, a checkpoint upload, the publish) may take as long as a
    # transfer may (FT_STORAGE_DEADLINE_SECONDS): they go through their own group, on the CPU, with that much more.
    _slow_group = dist.new_group(backend="gloo", timeout=timedelta(
        seconds=cfg.dist_timeout_seconds + cfg.storage_deadline_seconds))
    if rank() != 0:  # every rank logs its warnings and errors; rank 0 alone tells the story
        log.setup(cfg.log_format, "warning")
    import structlog

    structlog.contextvars.bind_contextvars(rank=rank())
    log.get().info("process group ready", world_size=world_size(), backend="nccl" if cuda else "gloo",
                   host=socket.gethostname(), timeout_s=cfg.dist_timeout_seconds)


_slow_group = _flag_group = None


def barrier() -> None:
    """Wait for every process; the wait may last as long as one process's storage transfer."""
    if active():
        import torch.distributed as dist

        dist.barrier(group=_slow_group)


@contextlib.contextmanager
def local_main_first():
    """Local rank 0 of each node runs the block first (one download per node); the others then find its results."""
    if not active():
        yield
        return
    if local_rank() != 0:
        barrier()
    yield
    if local_rank() == 0:
        barrier()


def broadcast(value):
    """Rank 0's value, on every rank."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=_slow_group)
    return box[0]


def any_rank(*flags: bool) -> list[bool]:
    """Each flag True on every rank when it is True on any (one small all-reduce, on the CPU)."""
    if not active():
        return list(flags)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if f else 0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_flag_group)
    return [bool(v) for v in t.tolist()]


def gather_files(paths: list[Path], into: Path) -> None:
    """Copy each rank's files (its RNG state, on its own node) into rank 0's `into` directory."""
    if not active():
        return
    import torch.distributed as dist

    mine = {p.name: p.read_bytes() for p in paths if p.is_file()}
    gathered = [None] * world_size() if is_main() else None
    dist.gather_object(mine, gathered, dst=0, group=_slow_group)
    if is_main():
        for files in gathered:
            for name, data in files.items():
                if not (into / name).exists():
                    (into / name).write_bytes(data)


def collective_failure(e: BaseException) -> JobError | None:
    """A collective that failed or timed out because a peer died or hangs: retriable, not a bug."""
    import torch.distributed as dist

    if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and active() and _looks_collective(str(e))):
        return UnavailableError(f"a peer process stopped or stopped answering (FT_DIST_TIMEOUT_SECONDS bounds the wait): "
                           f"{str(e).splitlines()[0][:300]}; a restart resumes from the last checkpoint")
    return None


def _looks_collective(message: str) -> bool:
    """Whether a RuntimeError raised while the process group is up reads as a collective that lost its peer. gloo
    says so in several ways: "Timed out waiting ... for recv", "Connection reset by peer", and, when the peer is
    frozen (SIGSTOP) rather than dead, "Application timeout caused pair closure"."""
    m = message.lower()
    return any(s in m for s in ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout",
                                "pair closure", "watchdog", "broken pipe"))


