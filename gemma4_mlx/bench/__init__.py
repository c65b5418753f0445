"""Benchmarks (``gemma4-mlx bench NAME`` or ``python benchmarks/NAME.py``): each writes JSON and a
PNG under ``--out`` (default ``benchmarks/results``) and has a ``--quick`` mode for CI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCHMARKS = (
    "quality",
    "needle",
    "speed",
    "memory",
    "distortion",
    "attention",
    "weights",
    "startup",
    "audio",
    "vision",
    "serve",
    "speculative",
)
DEFAULT_OUT = Path("benchmarks/results")


class BenchParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: PROG: why``) and exit status 2, as the CLI's."""

    def error(self, message: str):
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(2)


def positive_ints(text: str) -> list[int]:
    """``--lengths 1024,4096`` -> [1024, 4096]; anything else is a one-line argparse error."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1024,4096, got {text!r}")
    return values


def fractions(text: str) -> list[float]:
    """``--depths 0,0.5,1`` -> [0.0, 0.5, 1.0], each in [0, 1]."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 1] like 0,0.5,1, got {text!r}")
    return values


def run(name: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    import importlib

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    importlib.import_module(f"gemma4_mlx.bench.{name}").main(argv, prog=prog)
