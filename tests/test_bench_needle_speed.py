"""The needle and speed benchmarks' --quick modes on the real demo model, through their scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

from gemma4_mlx.bench.common import default_policy, setting_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = setting_name(default_policy())


def _run(script: str, tmp_path: Path, demo_cache: Path) -> dict:
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(tmp_path)]
    env = {**os.environ, "GEMMA4_MLX_CACHE": str(demo_cache)}
    subprocess.run(command, check=True, cwd=ROOT, timeout=600, env=env)
    name = script.replace(".py", "_quick")
    assert (tmp_path / f"{name}.png").stat().st_size > 0
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_needle_quick_finds_the_key_in_fp32(tmp_path, demo_cache):
    result = _run("needle.py", tmp_path, demo_cache)
    assert list(result["settings"]) == ["fp32", DEFAULT]
    trials = result["trials"]
    # 1 seed x 2 depths x 2 settings, the same prompts (key, needle position) for both settings
    assert len(trials) == 4 and {t["length"] for t in trials} == {1024}
    by_setting = {s: [t for t in trials if t["setting"] == s] for s in result["settings"]}
    assert [(t["key"], t["needle_position"]) for t in by_setting["fp32"]] == [
        (t["key"], t["needle_position"]) for t in by_setting[DEFAULT]
    ]
    for t in trials:
        assert 10000 <= t["key"] <= 99999
        assert t["correct"] == (str(t["key"]) in t["answer"])
    for row in result["summary"].values():
        s = row["1024"]
        assert 0 <= s["accuracy"] <= 1 and s["trials"] == 2 and 0 <= s["same_as_fp32"] <= 1
    assert result["summary"]["fp32"]["1024"]["same_as_fp32"] == 1.0
    # measured: the float32 270M model finds the key at 1K tokens, first and last depth
    assert result["summary"]["fp32"]["1024"]["accuracy"] == 1.0


def test_speed_quick_ratios_and_bytes(tmp_path, demo_cache):
    result = _run("speed.py", tmp_path, demo_cache)
    rows = result["results"]
    assert set(rows) == {"fp32", "affine:4", DEFAULT} and result["lengths"] == [512]
    fp32, tq = rows["fp32"]["512"], rows[DEFAULT]["512"]
    assert fp32["prompt_ratio"] == fp32["decode_ratio"] == 1.0
    for r in (fp32, tq, rows["affine:4"]["512"]):
        assert r["prompt_tps"] > 0 and r["decode_tps"] > 0 and r["context_tokens"] == 512
        # the peak includes the weights (the other settings' caches are subtracted)
        assert r["peak_memory_bytes"] >= result["weights_bytes"]
        assert 0 < r["global_cache_bytes"] < r["cache_bytes"]
    assert tq["prompt_ratio"] == tq["prompt_tps"] / fp32["prompt_tps"]
    # TurboQuant stores the global layers in far fewer bytes; sliding layers are identical
    assert tq["global_cache_bytes"] < fp32["global_cache_bytes"] / 3
    sliding = fp32["cache_bytes"] - fp32["global_cache_bytes"]
    assert tq["cache_bytes"] - tq["global_cache_bytes"] == sliding
