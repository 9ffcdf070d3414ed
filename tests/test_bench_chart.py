"""bench/chart.py: the PNG chart of bench/RESULTS.md, drawn from run.py's results.json files."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT


def load_chart():
    spec = importlib.util.spec_from_file_location("chart", ROOT / "bench" / "chart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(tmp_path, name: str, summary: list[dict]):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"gemm_tflops": 790, "samples": 1000, "runs": [], "summary": summary}))
    return path


def test_one_bar_per_successful_variant_and_a_png(tmp_path):
    chart = load_chart()
    a = results(tmp_path, "run-a", [{"variant": "trl-packed", "tokens_per_s": 7919.0},
                                    {"variant": "fast", "tokens_per_s": 15621.0, "steady_tokens_per_s": 18400.0},
                                    {"variant": "guide", "failed": True}])
    b = results(tmp_path, "run-b", [{"variant": "ddp-2gpu", "tokens_per_s": 28538.0, "processes": 2}])
    assert chart.rows([a, b]) == [("run-a", "trl-packed", 7919.0, None, 1), ("run-a", "fast", 15621.0, 18400.0, 1),
                                  ("run-b", "ddp-2gpu", 28538.0, None, 2)]
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    assert chart.main([str(b), "--out", str(small)]) == 0
    assert chart.main([str(a), str(b), "--out", str(large)]) == 0
    from PIL import Image

    with Image.open(small) as s, Image.open(large) as l:
        assert s.format == l.format == "PNG"
        assert l.height > s.height  # a row per bar


def test_markdown_tables_fill_the_report_block_and_keep_the_text_around(tmp_path):
    chart = load_chart()
    run = {"variant": "fast", "tokens_per_s": 16583.0, "spread": 33.0, "runs": 2, "steady_tokens_per_s": 18621.0,
           "x_guide": 4.58, "x_peer": 2.04, "x_1gpu": None, "peak_gib": 62.361, "reserved_gib": 65.6, "mfu": 0.553,
           "load_s": 6.53, "tokens_per_step": 15777.0, "processes": 1}
    data = results(tmp_path, "run-6", [run, {"variant": "trl-packed-24gb", "failed": True}])
    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nby hand\n\n<!-- report:begin -->\nold table\n<!-- report:end -->\n\nmore by hand\n")
    assert chart.main([str(data), "--out", str(tmp_path / "r.png"), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Results\n\nby hand\n\n<!-- report:begin -->") and text.endswith("<!-- report:end -->\n\nmore by hand\n")
    assert "old table" not in text and "![tokens/s by variant](r.png)" in text
    assert "| fast | 1 | 16,583 (n=2, ±33) | 18,621 | 4.58 | 2.04 | - | 62.4 (65.6) | 55.3% | 6.5 | 15,777 |" in text
    assert "| trl-packed-24gb | | failed |" in text
    md.write_text("no block here\n")
    with pytest.raises(SystemExit, match="report:begin"):
        chart.main([str(data), "--out", str(tmp_path / "r.png"), "--markdown", str(md)])
