"""Each benchmark's --quick mode runs and writes its JSON (numbers are checked by the benchmark)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_mlx.bench.common import default_policy, setting_name
from gemma4_mlx.cache import cache_layers
from gemma4_mlx.variants import variant_config

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, tmp_path: Path, *extra: str, env: dict | None = None) -> dict:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / script),
        "--quick",
        "--out",
        str(tmp_path),
        *extra,
    ]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})
    files = sorted(tmp_path.glob("*.json"))
    assert files, f"{script} wrote no JSON"
    return json.loads(files[0].read_text())


def test_distortion_quick(tmp_path):
    result = _run("distortion.py", tmp_path)
    assert all(c["ok"] for c in result["checks"]), [c for c in result["checks"] if not c["ok"]]
    assert (tmp_path / "distortion_quick.png").stat().st_size > 0


def test_memory_quick(tmp_path):
    result = _run("memory.py", tmp_path)
    assert (tmp_path / "memory_quick.png").stat().st_size > 0
    rows = {r["setting"]: r for r in result["memory"]}
    default = setting_name(default_policy())
    assert {"bf16", "affine:4", "affine:8", default} <= set(rows) and result["default"] == default
    # the layer counts are the model's cache plan on the E2B config facts
    config = variant_config("E2B")
    owners = cache_layers(config)
    assert {r["global_layers"] for r in rows.values()} == {sum(not s.is_sliding for s in owners)}
    # bf16 stores 16 bits a channel; affine B-bit adds a bf16 scale and bias per group of 64
    assert rows["bf16"]["stored_bits_per_channel"] == 16
    assert rows["affine:4"]["stored_bits_per_channel"] == 4 + 32 / 64
    tq = rows[default]
    assert 2.5 < tq["stored_bits_per_channel"] < 4 and tq["ratio_to_bf16_global"] > 4
    # sliding layers hold the same SlidingKVCache whatever the global setting: at least the
    # window of every sliding layer in bf16
    window = (
        2
        * 2
        * config.sliding_window
        * sum(s.n_kv_heads * s.head_dim for s in owners if s.is_sliding)
    )
    assert {r["sliding_bytes"] for r in rows.values()} == {tq["sliding_bytes"]}
    assert tq["sliding_bytes"] >= window
    for r in rows.values():
        assert r["total_bytes"] == r["global_bytes"] + r["sliding_bytes"]
    peaks = {p["setting"]: p for p in result["attention_peak"]}
    assert {p["query_tokens"] for p in peaks.values()} == {1}
    assert 0 < peaks[default]["peak_growth_mib"] < peaks["affine:4"]["peak_growth_mib"]
    assert result["checks"] and all(c["ok"] for c in result["checks"]), result["checks"]


def test_quality_quick(tmp_path, demo_cache):
    result = _run("quality.py", tmp_path, env={"GEMMA4_MLX_CACHE": str(demo_cache)})
    rows = result["results"]
    assert rows["fp32"]["512"]["kl"] == 0.0
    default = rows[result["default"]]["512"]
    assert result["default"] == setting_name(default_policy())
    assert 0 < default["kl"] < rows["affine:4"]["512"]["kl"]
    assert 0.5 < default["top1"] <= 1 and default["global_bits_per_channel"] < 16
    assert (tmp_path / "quality_quick.png").stat().st_size > 0
    assert list(rows)[0] == "fp32" and set(rows) == set(result["settings"])
    for row in rows.values():  # every setting measured at the length, finite numbers
        r = row["512"]
        assert 1 < r["perplexity"] < 1e4 and r["kl"] >= 0 and 0 < r["top1"] <= 1
        assert (
            abs(r["perplexity_change"] - (r["perplexity"] / rows["fp32"]["512"]["perplexity"] - 1))
            < 1e-12
        )


def test_weights_quick(tmp_path, demo_cache):
    result = _run("weights.py", tmp_path, env={"GEMMA4_MLX_CACHE": str(demo_cache)})
    rows = result["results"]
    assert rows["float32"]["lengths"]["256"]["kl"] == 0.0
    q4 = rows["affine4"]
    assert q4["weight_bytes"] < rows["float32"]["weight_bytes"] / 4
    assert 0 < q4["lengths"]["256"]["kl"] < 1 and q4["lengths"]["256"]["top1"] > 0.5


def test_bench_subcommand_runs_a_benchmark(tmp_path):
    from gemma4_mlx.cli import main

    main(["bench", "distortion", "--quick", "--out", str(tmp_path)])
    assert (tmp_path / "distortion_quick.json").exists()
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2
