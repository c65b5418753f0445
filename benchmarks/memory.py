"""Thin script: the benchmark lives in gemma4_mlx/bench/memory.py (also `gemma4-mlx bench memory`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("memory", sys.argv[1:])
