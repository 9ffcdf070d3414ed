"""What a user reads is generated from the code: the README's tables must match it."""

from __future__ import annotations

import importlib.util

from conftest import ROOT


def load_updater():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_code():
    updater = load_updater()
    text = updater.README.read_text()
    assert updater.render(text) == text, "README.md is out of date: run `make docs`"


def test_readme_lists_every_variable():
    from job.config import Settings, env_name

    text = (ROOT / "README.md").read_text()
    for field in Settings.model_fields:
        assert f"`{env_name(field)}`" in text
