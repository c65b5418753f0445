"""Thin script: the benchmark lives in gemma4_mlx/bench/speed.py (also `gemma4-mlx bench speed`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("speed", sys.argv[1:])
