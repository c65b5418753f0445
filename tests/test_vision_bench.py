"""benchmarks/vision.py --quick runs and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vision_benchmark_quick(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "vision.py"), "--quick"]
    subprocess.run([*command, "--out", str(tmp_path)], check=True, cwd=ROOT, timeout=600)
    result = json.loads((tmp_path / "vision_quick.json").read_text())
    assert {r["tower"] for r in result["tower"]} == {"e4b", "31b"}
    assert all(r["seconds"] > 0 and r["soft_tokens"] <= r["budget"] for r in result["tower"])
    sizes = {r["tower"]: r["params"] for r in result["tower_sizes"]}
    assert sizes["31b"] > sizes["e4b"] > 10**8  # the released towers: ~0.17 B and ~0.57 B
    assert result["ttft"]["seconds"] > 0
