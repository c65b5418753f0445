"""Each benchmark's --quick mode runs and writes its JSON (numbers are checked by the benchmark)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--quick",
            "--out",
            str(tmp_path),
            *extra,
        ],
        check=True,
        cwd=ROOT,
        timeout=600,
    )
    files = sorted(tmp_path.glob("*.json"))
    assert files, f"{script} wrote no JSON"
    return json.loads(files[0].read_text())


def test_distortion_quick(tmp_path):
    result = _run("distortion.py", tmp_path)
    assert all(c["ok"] for c in result["checks"]), [c for c in result["checks"] if not c["ok"]]
    assert (tmp_path / "distortion_quick.png").stat().st_size > 0
