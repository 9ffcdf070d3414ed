"""bench/chart.py: the PNG chart of bench/RESULTS.md, drawn from run.py's results.json files."""

from __future__ import annotations

import importlib.util
import json

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
