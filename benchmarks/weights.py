"""Thin script: the benchmark lives in gemma4_mlx/bench/weights.py (also `gemma4-mlx bench weights`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("weights", sys.argv[1:])
