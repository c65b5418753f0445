"""Thin script: the benchmark lives in gemma4_mlx/bench/serve.py (also `gemma4-mlx bench serve`)."""

import sys

from gemma4_mlx.bench import run

if __name__ == "__main__":
    run("serve", sys.argv[1:])
