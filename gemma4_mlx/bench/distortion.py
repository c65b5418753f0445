"""TurboQuant distortion vs bits, beside the paper's bounds, plus codec throughput.

For b = 1..5 bits, d = 256 and 512, N random unit vectors (default 10,000):
- MSE codec (with and without norm correction): E|x - x~|^2 against the Lloyd-Max values and
  the paper's bounds (lower 4^-b, upper sqrt(3) pi / 2 * 4^-b);
- inner products <q, x~> - <q, x> for random unit q (variance) and for q = x (bias: the MSE codec
  shrinks by D, the prod codec is unbiased);
- stored bits per channel measured from the encoded arrays' nbytes; vectors/s encode and decode.

    python benchmarks/distortion.py            # writes benchmarks/results/distortion.{json,png}
    python benchmarks/distortion.py --quick    # seconds, for CI
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser
from turboquant.codebook import GAUSSIAN_MSE
from turboquant.codec import CodecSpec, bits_per_channel, decode, encode


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(spec: CodecSpec, x: np.ndarray, q: np.ndarray) -> dict:
    X = mx.array(x)
    mx.eval(X)
    t0 = time.perf_counter()
    enc = encode(X, spec)
    mx.eval(enc.arrays())
    t1 = time.perf_counter()
    xr = decode(enc, spec)
    mx.eval(xr)
    t2 = time.perf_counter()
    xr = np.array(xr)
    n = len(x)
    ip_random = np.sum(q * xr, 1) - np.sum(q * x, 1)
    ip_self = np.sum(x * xr, 1) - 1.0
    return {
        "d": spec.dim,
        "bits": spec.bits,
        "codec": spec.kind,
        "norm_correction": spec.norm_correction,
        "mse": float(np.mean(np.sum((xr - x) ** 2, 1))),
        "ip_error_var": float(np.var(ip_random) * spec.dim),  # scaled by d like the paper's D_prod
        "self_ip_bias": float(ip_self.mean()),
        "self_ip_bias_se": float(ip_self.std() / math.sqrt(n)),
        "stored_bits_per_channel": bits_per_channel(spec),
        "encode_vectors_per_s": n / (t1 - t0),
        "decode_vectors_per_s": n / (t2 - t1),
    }


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="1,000 vectors, d=256 only")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    n = 1000 if args.quick else args.n
    dims = (256,) if args.quick else (256, 512)
    rows = []
    for d in dims:
        x, q = _unit(n, d, 0), _unit(n, d, 1)
        settings = [
            CodecSpec(d, b, "mse", norm_correction=nc)
            for b in (1, 2, 3, 4, 5)
            for nc in (False, True)
        ]
        settings += [CodecSpec(d, b, "prod", norm_correction=False) for b in (2, 3, 4, 5)]
        settings += [
            CodecSpec(d, b, kind, norm_correction=kind == "mse")
            for b in (2.5, 3.5)
            for kind in ("mse", "prod")
        ]
        for spec in settings:
            row = measure(spec, x, q)
            rows.append(row)
            print(
                f"d={d} {spec.kind:4s} b={spec.bits:<3} nc={int(spec.norm_correction)}  mse={row['mse']:.4f}  "
                f"<x,x~>-1={row['self_ip_bias']:+.4f}±{row['self_ip_bias_se']:.4f}  "
                f"bits/ch={row['stored_bits_per_channel']:.4f}  "
                f"enc {row['encode_vectors_per_s']:,.0f}/s dec {row['decode_vectors_per_s']:,.0f}/s"
            )
    checks = []
    for row in rows:
        b = row["bits"]
        if row["codec"] == "mse" and not row["norm_correction"] and b in GAUSSIAN_MSE:
            rel = abs(row["mse"] - GAUSSIAN_MSE[b]) / GAUSSIAN_MSE[b]
            checks.append(
                {
                    "check": f"mse d={row['d']} b={b} within 3% of {GAUSSIAN_MSE[b]}",
                    "ok": rel < 0.03,
                    "rel": rel,
                }
            )
        if row["codec"] == "prod":
            ok = abs(row["self_ip_bias"]) < 3 * row["self_ip_bias_se"]
            checks.append(
                {"check": f"prod d={row['d']} b={b} unbiased (|mean| < 3 s.e.)", "ok": bool(ok)}
            )
    for c in checks:
        print(("PASS " if c["ok"] else "FAIL ") + c["check"])
    args.out.mkdir(parents=True, exist_ok=True)
    name = "distortion_quick" if args.quick else "distortion"
    (args.out / f"{name}.json").write_text(
        json.dumps({"n": n, "rows": rows, "checks": checks}, indent=1)
    )
    _plot(rows, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    bits = np.array([1, 2, 3, 4, 5])
    for ax, key, title in (
        (axes[0], "mse", "MSE of unit vectors"),
        (axes[1], "ip_error_var", "d * Var(<q,x~> - <q,x>)"),
    ):
        for d in sorted({r["d"] for r in rows}):
            for codec, nc, style in (
                ("mse", False, "o-"),
                ("mse", True, "s--"),
                ("prod", False, "^-"),
            ):
                pts = [
                    (r["bits"], r[key])
                    for r in rows
                    if r["d"] == d
                    and r["codec"] == codec
                    and r["norm_correction"] == nc
                    and float(r["bits"]).is_integer()
                ]
                if pts:
                    b, v = zip(*sorted(pts))
                    ax.semilogy(b, v, style, label=f"{codec}{' +nc' if nc else ''} d={d}")
        ax.semilogy(bits, 4.0**-bits, "k:", label="lower bound 4^-b")
        ax.semilogy(bits, math.sqrt(3) * math.pi / 2 * 4.0**-bits, "k-.", label="upper bound")
        ax.set_xlabel("bits per channel")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
