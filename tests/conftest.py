"""Shared fixtures: a clean environment, the tiny model (built once per session), the sample data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No FT_* setting or credential leaks in from the developer's shell; the Hub is never contacted."""
    for key in list(os.environ):
        if key.startswith("FT_") or key in SECRET_VARS:
            monkeypatch.delenv(key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("FT_TERMINATION_LOG", str(tmp_path / "termination-log"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    # Smaller than the demo's model (scripts/build_tiny_model.py defaults), so the suite stays quick on two cores.
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_tiny_model.py"), str(out), "--force",
                    "--hidden", "128", "--layers", "2"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from job.config import Settings
    from job.data import load_tokenizer

    return load_tokenizer(tiny_model, Settings.model_construct())
