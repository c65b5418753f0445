"""The audio benchmark's --quick mode runs at the real tower shape and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_audio_benchmark_quick_writes_json(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "audio.py"),
        "--quick",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    result = json.loads((tmp_path / "audio_quick.json").read_text())
    (row,) = result["rows"]
    assert row["soft_tokens"] == 50  # 2 s at 25 tokens per second
    assert row["tower_s_per_10s"] > 0 and row["tower_peak_mib"] > 0
