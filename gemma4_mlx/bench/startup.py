"""Start-up time of the CLI: wall time of ``gemma4-mlx --help``, of an argument error, and of the
demo's first streamed token (process start to the first byte on stdout), median of 5 runs each.

Each run is a fresh process (``python -m gemma4_mlx.cli``, the console script's code), so the
times include Python's own start-up and every import. Target: --help and argument errors under
1.0 s (they must not import mlx_lm, transformers or torch). The demo is converted once before the
timed runs (its first use takes about 30 s and is not start-up).

    python benchmarks/startup.py [--runs 5] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser

CLI = [sys.executable, "-m", "gemma4_mlx.cli"]
CASES = {
    "help": ["--help"],
    "argument_error": ["generate", "-p", "hi", "--temp", "nan"],
    "demo_first_token": [
        "generate",
        "--model",
        "demo",
        "-p",
        "Once upon a time,",
        "--max-tokens",
        "1",
    ],
}
LIMIT_S = 1.0  # --help and argument errors


def time_to_first_byte(argv: list[str]) -> tuple[float, int]:
    """(seconds from process start to its first stdout byte, or to its exit; exit status)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        CLI + argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ
    )
    proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.stdout.read()
    return elapsed, proc.wait()


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="2 runs, no demo (CI)")
    ap.add_argument("--out", type=os.fspath, default=str(OUT))
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"argument --runs: expected a positive integer, got {args.runs}")
    runs = 2 if args.quick else args.runs
    cases = {k: v for k, v in CASES.items() if not (args.quick and k.startswith("demo"))}
    if "demo_first_token" in cases:
        from gemma4_mlx.demo import ensure_demo_model

        ensure_demo_model(progress=print)
    results = {}
    for name, case in cases.items():
        times, codes = [], set()
        for _ in range(runs):
            seconds, code = time_to_first_byte(case)
            times.append(seconds)
            codes.add(code)
        results[name] = {
            "command": "gemma4-mlx " + " ".join(case),
            "median_s": statistics.median(times),
            "runs_s": times,
            "exit_status": sorted(codes),
        }
        print(f"{name:18s} median {results[name]['median_s']:.3f} s over {runs} runs")
    checks = [
        {
            "check": f"{name} under {LIMIT_S} s",
            "ok": results[name]["median_s"] < LIMIT_S,
            "median_s": results[name]["median_s"],
        }
        for name in ("help", "argument_error")
    ]
    out = {
        "benchmark": "startup",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "runs": runs,
        "results": results,
        "checks": checks,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "startup_quick.json" if args.quick else "startup.json")
    with open(path + ".partial", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".partial", path)
    print(f"wrote {path}")
