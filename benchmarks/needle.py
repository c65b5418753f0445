"""Thin script: the benchmark lives in gemma4_mlx/bench/needle.py (also `gemma4-mlx bench needle`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("needle", sys.argv[1:])
