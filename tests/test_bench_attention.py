"""benchmarks/attention.py --quick runs, checks its TurboQuant reads against the decode
reference and writes its JSON and PNG."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"sdpa_fp32", "grouped_fp32", "affine4", "tq_lloyd", "tq_uniform", "tq_uniform_dequant"}


def test_attention_quick(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--quick"]
    subprocess.run([*command, "--out", str(tmp_path)], check=True, cwd=ROOT, timeout=600)
    result = json.loads((tmp_path / "attention_quick.json").read_text())
    rows = result["results"]["demo"]["1024"]
    assert set(rows) == METHODS
    assert result["checks"] and all(c["ok"] for c in result["checks"]), result["checks"]
    assert rows["sdpa_fp32"]["speed_vs_sdpa_fp32"] == 1.0
    # bytes read per token: TurboQuant (Lloyd-Max K3/V2 < the uniform default's K3.125/V2, at
    # most 1/8 bit more of bf16's 32 bits per channel of K+V) < affine 4-bit < bf16 < float32
    tq, affine = rows["tq_uniform"]["bytes_vs_bf16"], rows["affine4"]["bytes_vs_bf16"]
    lloyd = rows["tq_lloyd"]["bytes_vs_bf16"]
    assert lloyd < tq <= lloyd + 0.125 / 32 and tq < affine < 1 < rows["sdpa_fp32"]["bytes_vs_bf16"]
    assert (tmp_path / "attention_quick.png").stat().st_size > 0
