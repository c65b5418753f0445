"""Thin script: the benchmark lives in gemma4_mlx/bench/audio.py (also `gemma4-mlx bench audio`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("audio", sys.argv[1:])
