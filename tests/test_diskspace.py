"""Every form a full disk takes in the libraries the job writes with, made on a real full tmpfs, is read as a full
disk; other failures are not."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from job import diskspace
from job.errors import CODE_BY_NAME, DiskFullError

FORMS = r'''
import json, os, shutil, sys, torch, safetensors.torch
from transformers import AutoTokenizer
from job import diskspace
d, model = sys.argv[1], sys.argv[2]
diskspace.watch([diskspace.Location(__import__("pathlib").Path(d), "FT_WORK_DIR", d)])
open(f"{d}/fill", "wb").write(b"x" * (200 * 1024))
def attempt(fn):
    try:
        fn()
        return "no error"
    except Exception as e:
        full = diskspace.error_for(e)
        return f"{type(e).__name__}: {full.setting if full else None}"
big = {"w": torch.zeros(256 * 1024)}
tok = AutoTokenizer.from_pretrained(model)
print(json.dumps({
    "torch.save": attempt(lambda: torch.save(big, f"{d}/t.pt")),
    "safetensors": attempt(lambda: safetensors.torch.save_file(big, f"{d}/s.safetensors")),
    "tokenizers": attempt(lambda: tok.save_pretrained(f"{d}/tok")),
    "shutil": attempt(lambda: shutil.copyfile(os.path.join(model, "model.safetensors"), f"{d}/copy")),
    "open": attempt(lambda: open(f"{d}/x.json", "w").write("x" * 300000)),
}))
'''


def namespaces_work() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs in its own user and mount namespace."""
    import shutil

    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True).returncode == 0


def test_each_library_form_of_a_full_disk_is_disk_full(tiny_model, tmp_path):
    if not namespaces_work():
        pytest.skip("needs unprivileged user and mount namespaces")
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$0" && "$@"',
                           str(mount), sys.executable, "-c", FORMS, str(mount), str(tiny_model)],
                          capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    assert all(v.endswith(": FT_WORK_DIR") for v in found.values()), found


def test_other_failures_are_not_disk_full(tmp_path):
    place = diskspace.Location(tmp_path, "FT_WORK_DIR", str(tmp_path))
    assert diskspace.error_for(PermissionError(errno.EACCES, "denied", str(tmp_path / "f")), place) is None
    assert diskspace.error_for(RuntimeError("PytorchStreamWriter failed writing file data/0"), place) is None  # space
    assert diskspace.error_for(ValueError("bad"), place) is None


def test_the_error_names_the_watched_place_by_path_and_says_free_and_needed(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    monkeypatch.setattr(diskspace, "_watched", [diskspace.Location(work, "FT_WORK_DIR", "/w", 10 * 2**20),
                                                diskspace.Location(out, "FT_OUTPUT_URI", "/o", 3 * 2**20)])
    e = OSError(errno.ENOSPC, "No space left on device")
    e.filename, e.filename2 = str(work / "src"), str(out / "run" / "adapter.safetensors")
    full = diskspace.error_for(e)
    assert isinstance(full, DiskFullError) and full.exit_code == CODE_BY_NAME["disk_full"]
    assert full.setting == "FT_OUTPUT_URI" and full.need == 3 * 2**20 and full.free > 0
    assert str(out / "run" / "adapter.safetensors") in str(full) and "(FT_OUTPUT_URI=/o)" in str(full)
    assert "3,145,728 bytes (3.0 MiB) needed" in str(full)


def test_a_full_disk_in_a_local_put_names_the_setting_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """ENOSPC injected at the write boundary (os.sendfile, which shutil.copyfile writes with on Linux)."""
    import os
    import shutil

    from job.storage import open_destination

    src = tmp_path / "adapter.safetensors"
    src.write_bytes(b"w" * 4096)
    dest = open_destination(str(tmp_path / "ckpt"), "FT_CHECKPOINT_URI")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "sendfile", full)
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", True)
    with pytest.raises(DiskFullError, match=r"writing .*ckpt/checkpoint-1/adapter.safetensors \(FT_CHECKPOINT_URI="
                                            r".*ckpt\).*about 4,096 bytes"):
        dest.put(src, "checkpoint-1/adapter.safetensors")
    assert [p.name for p in (tmp_path / "ckpt").rglob("*") if p.is_file()] == []
