"""Thin script: the benchmark lives in gemma4_mlx/bench/distortion.py (also `gemma4-mlx bench distortion`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("distortion", sys.argv[1:])
