"""Thin script: the benchmark lives in gemma4_mlx/bench/quality.py (also `gemma4-mlx bench quality`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("quality", sys.argv[1:])
