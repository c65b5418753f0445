"""Thin script: the benchmark lives in gemma4_mlx/bench/vision.py (also `gemma4-mlx bench vision`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("vision", sys.argv[1:])
