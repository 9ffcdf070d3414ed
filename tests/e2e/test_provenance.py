"""Provenance through the real CLI: URIs of unknown schemes are configuration errors."""

from __future__ import annotations

import subprocess

import pytest
from test_run import demo_env, events, run_job

from conftest import ROOT
from job.errors import CODE_BY_NAME


def the_error(proc: subprocess.CompletedProcess) -> str:
    errors = [e["event"] for e in events(proc) if e["level"] == "error"]
    assert len(errors) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-2000:]
    return errors[0]


# --- 7: URIs -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("setting, uri", [("FT_OUTPUT_URI", "ftp://host/x"), ("FT_CHECKPOINT_URI", "gs://bucket/ckpt")])
def test_an_unknown_scheme_is_refused_by_check_and_run_and_nothing_is_written(tiny_model, tmp_path, command, setting,
                                                                              uri):
    proc = run_job(demo_env(tiny_model, **{setting: uri}), tmp_path, command)
    assert proc.returncode == CODE_BY_NAME["config"] == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    message = proc.stdout + proc.stderr
    assert f"{setting}={uri}: {uri.split(':')[0]}:// is not supported; use a local path" in message
    assert "Traceback" not in message
    assert (tmp_path / "termination-log").read_text().startswith("config: ")
    assert not (ROOT / uri.split("/")[0]).exists() and not (tmp_path / "work").exists()
