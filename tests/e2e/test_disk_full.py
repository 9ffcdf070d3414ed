"""The real CLI with a place it writes on a small real filesystem: a tmpfs mounted in a user and mount namespace
(`unshare -rm`, no root needed). Running out of space there ends with exit 20 (disk_full, final) naming the path,
the setting, free and needed bytes, after preflight warned; nothing is half-published."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_diskspace import namespaces_work
from test_remote import the_error

from conftest import DATA, ROOT
from job.errors import CODE_BY_NAME

QUICK = {"FT_MAX_STEPS": "4", "FT_SAVE_STEPS": "1", "FT_BATCH_SIZE": "2", "FT_MAX_SEQ_LENGTH": "64",
         "FT_MAX_SAMPLES": "16", "FT_EVAL_FRACTION": "0", "FT_LOGGING_STEPS": "1", "FT_QUANTIZATION": "none",
         "FT_RUN_ID": "full", "FT_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


pytestmark = pytest.mark.skipif(not namespaces_work(), reason="needs unprivileged user and mount namespaces")


def run_on_tmpfs(mount: Path, size: str, env: dict[str, str], tmp: Path) -> tuple[subprocess.CompletedProcess,
                                                                                   list[str]]:
    """Run the job with a `size` tmpfs mounted at `mount`; return the process and the files left on the tmpfs (it
    vanishes with the namespace, so they are listed inside it)."""
    mount.mkdir(parents=True, exist_ok=True)
    listing = tmp / "listing"
    script = ('mount -t tmpfs -o size="$1" tmpfs "$0" || exit 99; shift; "$@"; rc=$?; '
              f'find "$0" -type f > "{listing}"; exit $rc')
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "HF_HOME": str(tmp / "hf"),
            "FT_TERMINATION_LOG": str(tmp / "termination-log"), "FT_DATASET": str(DATA / "sample-text.jsonl")}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(mount), size, sys.executable, "-m", "job"],
                          env={**base, **QUICK, **env}, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode != 99, proc.stderr
    return proc, listing.read_text().splitlines()


def warned(proc) -> str:
    return next(line for line in proc.stdout.splitlines() if "free space looks too small" in line)


def test_a_full_work_dir_is_disk_full_naming_ft_work_dir(tiny_model, tmp_path):
    work = tmp_path / "work"
    proc, left = run_on_tmpfs(work, "256k", {"FT_BASE_MODEL": str(tiny_model), "FT_WORK_DIR": str(work),
                                             "FT_OUTPUT_URI": str(tmp_path / "out")}, tmp_path)
    assert proc.returncode == CODE_BY_NAME["disk_full"], proc.stdout[-3000:] + proc.stderr[-3000:]
    error = the_error(proc)
    assert f"(FT_WORK_DIR={work})" in error and "bytes (" in error and "free, about" in error, error
    assert "FT_WORK_DIR" in warned(proc) and "LoRA parameters" in warned(proc)
    assert not (tmp_path / "out" / "full" / "manifest.json").exists()
    assert (tmp_path / "termination-log").read_text().startswith("disk_full: no space left on device")


def test_a_full_local_destination_publishes_nothing_and_leaves_no_partial_files(tiny_model, tmp_path):
    out = tmp_path / "out"
    proc, left = run_on_tmpfs(out, "200k", {"FT_BASE_MODEL": str(tiny_model), "FT_WORK_DIR": str(tmp_path / "w"),
                                            "FT_OUTPUT_URI": str(out)}, tmp_path)
    assert proc.returncode == CODE_BY_NAME["disk_full"], proc.stdout[-3000:] + proc.stderr[-3000:]
    error = the_error(proc)
    assert f"(FT_OUTPUT_URI={out})" in error and "free, about" in error and ".partial" not in error, error
    assert "FT_OUTPUT_URI" in warned(proc)
    assert not [f for f in left if f.endswith("manifest.json") or f.endswith(".partial") or "/checkpoints/" in f], left
