"""Thin script: the benchmark lives in gemma4_mlx/bench/speculative.py (also `gemma4-mlx bench speculative`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("speculative", sys.argv[1:])
