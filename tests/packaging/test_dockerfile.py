"""The Dockerfile (there is no Docker engine here): hadolint finds nothing, it installs exactly what requirements.lock
pins, and the image it describes fits the chart (user, caches on the chart's writable volumes, entrypoint, version)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from chart_support import CHART, ci_values, env, mounts, render
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LABELS = ("title", "description", "version", "revision", "created", "licenses", "base.name")


def instructions() -> list[tuple[int, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + (" " if line.rstrip().endswith("\\") else "")
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    out, stage = [], -1
    for text in logical:
        keyword, _, args = text.partition(" ")
        stage += keyword.upper() == "FROM"
        out.append((stage, keyword.upper(), args.strip()))
    return out


def final(keyword: str) -> list[str]:
    last = max(stage for stage, _, _ in instructions())
    return [args for stage, kw, args in instructions() if kw == keyword and stage == last]


def commands() -> list[list[str]]:
    """Every shell command of every RUN, as words."""
    out = []
    for _, keyword, args in instructions():
        if keyword == "RUN":
            out += [shlex.split(part) for part in re.split(r"&&|;|\|\|", args) if part.strip()]
    return out


def image_env() -> dict[str, str]:
    found = {}
    for args in final("ENV"):
        found.update(dict(word.split("=", 1) for word in shlex.split(args)))
    return found


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    labels = [a for label in LABELS for a in ("--require-label", f"org.opencontainers.image.{label}:text")]
    result = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "style", *labels, DOCKERFILE],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout or "[]") == [] and result.returncode == 0, result.stdout + result.stderr
    # The one rule silenced is apt version pinning, each time with the reason above it.
    ignored = re.findall(r"# hadolint ignore=(\S+)", DOCKERFILE.read_text())
    assert set(ignored) == {"DL3008"}


def test_it_installs_what_the_lock_pins_and_nothing_else():
    pip = [words for words in commands() if any(w.endswith("pip") for w in words[:1]) and "install" in words[:2]]
    lock_dest = next(args.split()[-1] for _, kw, args in instructions()
                     if kw == "COPY" and args.split()[0] == "requirements.lock")
    package_dest = next(args.split()[-1] for _, kw, args in instructions()
                        if kw == "COPY" and "pyproject.toml" in args.split()[:-1])
    # The lock with every file's hash and wheels only; the package built into a wheel with the locked setuptools (no
    # build isolation, which would fetch an unpinned one) and installed without dependencies or an index.
    assert [w[2:] for w in pip] == [["--no-cache-dir", "--require-hashes", "--only-binary=:all:", "-r", lock_dest],
                                    ["--no-cache-dir", "--no-deps", "--no-index", "/wheels/*.whl"]]
    wheel = [w for w in commands() if w[:2] == ["pip", "wheel"]]
    assert wheel == [["pip", "wheel", "--no-cache-dir", "--no-deps", "--no-build-isolation", "--wheel-dir", "/wheels",
                      package_dest.rstrip("/")]]
    installers = {"uv", "conda", "mamba", "micromamba", "pipx", "easy_install", "poetry", "pip3"}
    assert not [w for w in commands() if installers & set(w) or (w[1:3] == ["-m", "pip"])]
    apt = [p for w in commands() if w[:2] == ["apt-get", "install"] for p in w[2:] if not p.startswith("-")]
    assert not [p for p in apt if re.match(r"python3-(?!venv)", p)], "Python packages come from the lock, not apt"


def build_args() -> dict[str, str]:
    """Every ARG with a default, across stages (one value per name)."""
    found: dict[str, str] = {}
    for _, keyword, args in instructions():
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            assert found.setdefault(name, value) == value, f"ARG {name} has two defaults"
    return found


def test_base_image_and_python_are_build_args_defaulting_to_production():
    args = build_args()
    assert re.fullmatch(r"debian:[a-z]+-slim", args["BASE_IMAGE"]), "a pinned Debian release, not latest"
    froms = [a.split()[0] for _, kw, a in instructions() if kw == "FROM"]
    assert froms[0] == "${BASE_IMAGE}" and set(froms[1:]) <= {"base", "build"}
    python = re.fullmatch(r"python(3\.\d+)", args["PYTHON"])[1]
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python)
    # The lock is resolved for that Python (scripts/lock.sh); Debian bookworm's python3 is 3.11.
    assert f"PYTHON_VERSION=${{PYTHON_VERSION:-{python}}}" in (ROOT / "scripts" / "lock.sh").read_text()
    assert not [w for w in commands() for p in w if re.fullmatch(r"python3\.\d+", p)], "the Python is ${PYTHON}"


def test_the_driver_requirement_is_declared_for_the_nvidia_runtime():
    variables = image_env()
    assert variables["NVIDIA_REQUIRE_CUDA"].startswith("cuda>=")
    assert variables["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert set(variables["NVIDIA_DRIVER_CAPABILITIES"].split(",")) == {"compute", "utility"}


def test_the_image_runs_as_the_charts_non_root_user():
    (user,) = final("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and gid.isdigit()
    pod = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (int(uid), int(gid), int(gid))


def test_the_entrypoint_is_the_package_script():
    (entrypoint,) = final("ENTRYPOINT")
    assert json.loads(entrypoint) == ["finetune-job"]
    assert "finetune-job" in PYPROJECT["project"]["scripts"]


def test_every_cache_lies_on_a_volume_the_chart_mounts_writable():
    variables = image_env()
    caches = {k: v for k, v in variables.items() if k == "HOME" or re.search(r"(CACHE|HOME|CONFIG|_DIR)", k)}
    assert {"HF_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "MPLCONFIGDIR", "HOME"} <= set(caches)
    assert variables.get("PYTHONDONTWRITEBYTECODE") == "1"
    objs, _ = render(ci_values("job-values.yaml"))
    writable = [path for path, volume in mounts(objs).items() if {"emptyDir", "persistentVolumeClaim"} & set(volume)]
    for name, path in caches.items():
        assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in writable), f"{name}={path} on no volume"
    assert variables["HF_HOME"] == env(objs)["HF_HOME"]["value"]


def test_the_version_is_the_packages_and_the_charts():
    args = dict(a.split("=", 1) for a in final("ARG") if "=" in a)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert args["VERSION"] == PYPROJECT["project"]["version"] == chart["appVersion"]
    labels = " ".join(final("LABEL"))
    assert all(f"org.opencontainers.image.{label}=" in labels for label in LABELS)


def test_the_build_context_holds_what_the_dockerfile_copies_and_little_else():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "the context is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = {s.rstrip("/") for _, kw, args in instructions() if kw == "COPY" and "--from" not in args
               for s in args.split()[:-1]}
    assert sources == allowed
    # README.md is the package's long description: setuptools needs it to build the package.
    assert PYPROJECT["project"]["readme"] == "README.md" and "README.md" in sources
    assert all((ROOT / s).exists() for s in sources - {"README.md"})
