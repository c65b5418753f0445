"""Thin script: the benchmark lives in gemma4_mlx/bench/startup.py (also `gemma4-mlx bench startup`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("startup", sys.argv[1:])
