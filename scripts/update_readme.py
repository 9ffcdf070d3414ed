"""Rewrite the generated tables in README.md from job/config.py and job/errors.py (`make docs`).

tests/test_docs.py fails when the README and the code drift apart.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from job.cli import env_markdown, exit_codes_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = {"env-table": env_markdown, "exit-codes": exit_codes_markdown}


def block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- BEGIN {name} -->\n)(.*?)(<!-- END {name} -->)", re.S)


def render(text: str) -> str:
    for name, make in SECTIONS.items():
        if not block(name).search(text):
            sys.exit(f"README.md has no <!-- BEGIN {name} --> ... <!-- END {name} --> block")
        text = block(name).sub(lambda m, make=make: m.group(1) + make() + m.group(3), text)
    return text


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
    print("README.md tables regenerated")
