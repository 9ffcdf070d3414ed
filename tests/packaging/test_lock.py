"""The two lock files: complete, exact and hashed. requirements.lock is the image's (linux x86_64, the image's Python,
PyPI's CUDA torch, liger-kernel); requirements-dev.lock is the development and CI machines' (the same versions,
torch's CPU build, the test tools). A fresh resolution of either installs exactly what it pins."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE_LOCK, DEV_LOCK = ROOT / "requirements.lock", ROOT / "requirements-dev.lock"


def parse(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a `uv pip compile --generate-hashes` file; fails on anything else."""
    text = re.sub(r"\s*\\\n\s*", " ", path.read_text())
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split(" --hash=")
        req = Requirement(requirement)
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.marker and not req.extras, f"{path.name}: not an exact pin: {line}"
        assert options and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in options), f"{path.name}: {line}"
        pins[canonicalize_name(req.name)] = (spec.version, options)
    return pins


def lock_python() -> str:
    """The Python version the image lock was resolved for, from scripts/lock.sh's default."""
    return re.search(r"PYTHON_VERSION=\$\{PYTHON_VERSION:-(3\.\d+)\}", (ROOT / "scripts" / "lock.sh").read_text())[1]


def test_every_line_of_both_locks_is_an_exact_pin_with_hashes():
    assert len(parse(IMAGE_LOCK)) > 60 and len(parse(DEV_LOCK)) > 60


def test_the_image_lock_holds_the_cuda_torch_its_libraries_and_liger():
    image = parse(IMAGE_LOCK)
    assert image["torch"][0] == "2.13.0"
    assert {"triton", "liger-kernel", "nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13",
            "nvidia-nccl-cu13", "nvidia-nvjitlink", "cuda-bindings"} <= image.keys()
    # The CUDA 13.0 runtime: the major the Dockerfile's NVIDIA_REQUIRE_CUDA asks of the driver.
    major, minor = image["nvidia-cuda-runtime"][0].split(".")[:2]
    assert f'NVIDIA_REQUIRE_CUDA="cuda>={major}.{minor}"' in (ROOT / "Dockerfile").read_text()


def test_the_dev_lock_has_the_image_versions_with_the_cpu_torch_and_no_cuda_wheels():
    image, dev = parse(IMAGE_LOCK), parse(DEV_LOCK)
    assert dev["torch"][0] == image["torch"][0] + "+cpu"
    assert not [n for n in dev if n.startswith(("nvidia-", "cuda-")) or n in ("triton", "liger-kernel")]
    assert {n: v for n, (v, _) in dev.items() if n in image and n != "torch"} == \
           {n: v for n, (v, _) in image.items() if n in dev and n != "torch"}


@pytest.mark.parametrize("lock, groups", [(IMAGE_LOCK, ["gpu"]), (DEV_LOCK, ["test"])])
def test_every_declared_dependency_is_pinned_within_its_range(lock, groups):
    pins = parse(lock)
    declared = PYPROJECT["project"]["dependencies"] + [
        d for g in groups for d in PYPROJECT["project"]["optional-dependencies"][g]]
    for dependency in declared:
        req = Requirement(dependency)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in {lock.name}: make lock"
        version = pins[name][0].split("+")[0]
        assert req.specifier.contains(version, prereleases=True), f"{name}=={version} is outside {req.specifier}"


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def image_resolution(requirements: Path, tmp: Path) -> subprocess.CompletedProcess:
    """pip's own resolution of `requirements` (hash-checking mode) for the image's platform: linux x86_64 (glibc up
    to 2.28, as uv resolved it), CPython at the lock's version, wheels only; nothing is downloaded but metadata."""
    platforms = [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)] + [
        "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return subprocess.run(
        [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--cert", "/etc/ssl/certs/ca-certificates.crt", "--index-url", "https://pypi.org/simple",
         "--report", str(tmp / "report.json"), "--only-binary=:all:", "--implementation", "cp",
         "--python-version", lock_python(), *[a for p in platforms for a in ("--platform", p)],
         "--target", str(tmp / "target"), "-r", str(requirements)],
        capture_output=True, text=True, timeout=300)


def installed(tmp: Path) -> dict[str, str]:
    report = json.loads((tmp / "report.json").read_text())
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}


@pytest.mark.skipif(not pypi_reachable(), reason="needs PyPI (the image build does too)")
def test_a_fresh_resolution_for_the_image_installs_exactly_the_image_lock(tmp_path):
    proc = image_resolution(IMAGE_LOCK, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert installed(tmp_path) == {name: version for name, (version, _) in parse(IMAGE_LOCK).items()}


@pytest.mark.skipif(not pypi_reachable(), reason="needs PyPI")
def test_the_resolution_check_fails_on_a_lock_that_misses_a_dependency(tmp_path):
    text = re.sub(r"\s*\\\n\s*", " ", IMAGE_LOCK.read_text())
    partial = tmp_path / "partial.lock"
    partial.write_text("\n".join(line for line in text.splitlines() if line.startswith("pydantic-settings==")) + "\n")
    proc = image_resolution(partial, tmp_path)
    assert proc.returncode != 0 and "pydantic" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(not pypi_reachable(), reason="needs PyPI and the machine's CPU torch")
def test_a_fresh_resolution_on_this_machine_installs_exactly_the_dev_lock(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(tmp_path / "report.json"), "-r", str(DEV_LOCK)],
                          capture_output=True, text=True, timeout=300)
    if "torch==2.13.0+cpu" in proc.stderr and "No matching distribution" in proc.stderr:
        pytest.skip("torch's CPU build is not in this machine's find-links (see README: Set-up)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert installed(tmp_path) == {name: version for name, (version, _) in parse(DEV_LOCK).items()}
