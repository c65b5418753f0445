"""Benchmarks (``gemma4-mlx bench NAME`` or ``python benchmarks/NAME.py``): each writes JSON and a
PNG under ``--out`` (default ``benchmarks/results``) and has a ``--quick`` mode for CI."""

from pathlib import Path

BENCHMARKS = (
    "quality", "needle", "speed", "memory", "distortion", "weights", "vision", "audio",
)  # fmt: skip
DEFAULT_OUT = Path("benchmarks/results")


def run(name: str, argv: list[str] | None = None) -> None:
    import importlib

    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    importlib.import_module(f"gemma4_mlx.bench.{name}").main(argv)
