"""File modes at both ends: published files take the process umask (0644 by default), so another user of the volume
can read them; an input this process cannot read is "permission denied" naming the file, the setting and the UID."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, ROOT
from job.errors import CODE_BY_NAME
from job.storage.local import LocalStorage, process_umask

OTHER_UID = 65534  # nobody: the owner of the files this process must not read


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_published_file_has_the_mode_the_umask_gives(tmp_path, umask, mode):
    src = tmp_path / "adapter_model.safetensors"
    src.write_bytes(b"weights")
    src.chmod(0o600)  # the source's own mode is not what is published
    old = os.umask(umask)
    try:
        assert process_umask() == umask
        LocalStorage(str(tmp_path / "out")).put(src, "run/adapter/adapter_model.safetensors")
    finally:
        os.umask(old)
    published = tmp_path / "out" / "run" / "adapter" / "adapter_model.safetensors"
    assert stat.S_IMODE(published.stat().st_mode) == mode
    assert published.read_bytes() == b"weights"
    assert not [p for p in published.parent.iterdir() if p.name.endswith(".partial")]


def run_check(env: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    """`finetune-job check` in a process that file permissions bind: as root, without the capabilities that let
    root read any file (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    drop = []
    if os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        drop = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
            "FT_WORK_DIR": str(tmp / "work"), "FT_OUTPUT_URI": str(tmp / "out"), "FT_LOG_FORMAT": "json",
            "FT_TERMINATION_LOG": str(tmp / "termination-log"), "OMP_NUM_THREADS": "2"}
    return subprocess.run([*drop, sys.executable, "-m", "job", "check"], env={**base, **env}, capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def unreadable(path: Path, mode: int) -> None:
    """Make `path` unreadable to this process: another owner and no access for others (as root), or mode 0."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
        path.chmod(mode)
    else:
        path.chmod(0)


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root without setpriv reads anything")
@pytest.mark.parametrize("setting, target", [("FT_BASE_MODEL", "model.safetensors"), ("FT_BASE_MODEL", "config.json"),
                                             ("FT_DATASET", ""), ("FT_DATASET", "sample-text.jsonl")])
def test_an_input_this_process_cannot_read_is_permission_denied(tiny_model, tmp_path, setting, target):
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_model, model)
    data.mkdir()
    shutil.copy(DATA / "sample-text.jsonl", data)
    root = model if setting == "FT_BASE_MODEL" else data
    path = root / target if target else root
    unreadable(path, 0o700 if path.is_dir() else 0o600)
    proc = run_check({"FT_BASE_MODEL": str(model), "FT_DATASET": str(data), "FT_RUN_ID": "perm"}, tmp_path)
    assert proc.returncode == CODE_BY_NAME["input"], proc.stdout[-2000:] + proc.stderr[-2000:]
    reason = (tmp_path / "termination-log").read_text()
    assert reason.startswith(f"input: {setting}={root}: permission denied: {path} ")
    assert f"UID {os.getuid()}" in reason and "No such file" not in reason
    assert "Traceback" not in proc.stdout + proc.stderr
