"""Thin script: the benchmark lives in gemma4_mlx/bench/attention.py (also `gemma4-mlx bench attention`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("attention", sys.argv[1:])
