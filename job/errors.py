"""Every way the job can end, as an exception with its exit code.

The table below is the job's contract with whatever runs it (Kubernetes' podFailurePolicy, a batch service's retry
rule, a shell script). `finetune-job` prints it with `finetune-job env --exit-codes`, and the README's copy is
checked against it by a test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExitCode:
    code: int
    name: str
    retriable: bool
    meaning: str


EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(0, "success", False, "the adapter, logs and manifest are at the destination"),
    ExitCode(1, "unexpected", True, "a bug or an unforeseen failure; the log has the traceback"),
    ExitCode(2, "config", False, "a setting is invalid or unknown, or does not fit the model or data (a split, a "
             "column, a chat template); found before training starts"),
    ExitCode(3, "input", False, "a model or dataset is missing, unreadable or access was denied"),
    ExitCode(4, "diverged", False, "the training loss became NaN or infinite"),
    ExitCode(5, "out_of_memory", False, "the GPU (or host) ran out of memory; lower the batch or sequence length"),
    ExitCode(6, "upload", True, "writing results to the destination failed; local artifacts are kept"),
    ExitCode(7, "interrupted", True, "stopped by SIGTERM/SIGINT (eviction, preemption); a retry resumes"),
    ExitCode(8, "unavailable", True, "a source could not be reached after retries (network, throttling, 5xx)"),
    ExitCode(9, "quality", False, "FT_QUALITY_CHECK=fail: eval loss did not fall or sample answers did not stop; "
                                  "the results are published"),
    ExitCode(10, "busy", True, "another attempt of this run id holds its lease (is still training or publishing)"),
    # Final codes past 9 begin with a final code's digits, so that AWS Batch's five exit-code rules can hold them as
    # patterns (scripts/render_cloud.py: "2*" ends 2 and 20).
    # Final: a volume too small for what the run writes is as small on the retry (a new emptyDir has the same
    # sizeLimit, a PVC keeps its contents), which would fail again only after the same download and training.
    ExitCode(20, "disk_full", False, "no space left where the job writes (the path, its setting, free and needed "
             "bytes are named); a larger volume is needed"),
)
CODE_BY_NAME = {e.name: e.code for e in EXIT_CODES}


class JobError(Exception):
    """A failure we expected and can explain in one line; never printed with a traceback."""

    exit_name = "unexpected"

    @property
    def exit_code(self) -> int:
        return CODE_BY_NAME[self.exit_name]

    @property
    def reason(self) -> str:
        """The one-line reason for the termination log."""
        return " ".join(str(self).split())[:1000]


class ConfigError(JobError):
    """One or more settings are invalid; `problems` holds one line per setting."""

    exit_name = "config"

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class InputError(JobError):
    exit_name = "input"


class DivergedError(JobError):
    exit_name = "diverged"


class OutOfMemoryError(JobError):
    exit_name = "out_of_memory"


class UploadError(JobError):
    exit_name = "upload"


class InterruptedJob(JobError):
    exit_name = "interrupted"


class StopSignal(BaseException):
    """Raised by the signal handler outside training. A BaseException, so that no library's `except Exception`
    (a retry loop, a dataset builder) swallows it or turns it into another error; cli turns it into InterruptedJob."""


class UnavailableError(JobError):
    exit_name = "unavailable"


class QualityError(JobError):
    """FT_QUALITY_CHECK=fail and the run's quality check found a problem (job/quality.py); raised after publishing."""

    exit_name = "quality"
class DiskFullError(JobError):
    """No space left on the filesystem of `path`, where `setting` (FT_WORK_DIR, FT_OUTPUT_URI, FT_CHECKPOINT_URI,
    HF_HOME, ...) set to `value` points. `free` and `need` are bytes; `need` estimates what the run writes on that
    filesystem (None when unknown). job.diskspace turns the libraries' forms of ENOSPC into this error."""

    exit_name = "disk_full"

    def __init__(self, path, setting: str, value, free: int | None, need: int | None = None):
        self.path, self.setting, self.value, self.free, self.need = path, setting, value, free, need
        free_text = "unknown" if free is None else f"{free:,} bytes ({human_bytes(free)})"
        need_text = f", about {need:,} bytes ({human_bytes(need)}) needed there" if need else ""
        super().__init__(f"no space left on device writing {path} ({setting}={value}): {free_text} free"
                         f"{need_text}; give {setting} a larger volume, or free space on it")


def human_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB': a size for people."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
class LeaseHeldError(JobError):
    """Another attempt of the same run id holds the run's lease (job/lease.py), or took it over from this one."""

    exit_name = "busy"


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, for a one-line reason."""
    return " ".join(str(e).split())[:limit]


def storage_failure(message: str, error: OSError) -> JobError:
    """InputError (final) or UnavailableError (retriable), as the storage error says a retry can help or not."""
    return (UnavailableError if getattr(error, "retriable", False) else InputError)(message)
