"""The key channel plan: how many channels each tier gets and how many bits each tier spends.

Gemma's keys are far from isotropic (RoPE pairs, a few strong channels); a single rotation spreads
the strong channels' error over all of them. With n tiers, each head's channels are ordered from
strong to weak (by their variance over the centring tokens) and split into 1/2^(n-1), 1/2^(n-1),
..., 1/2 of them, strongest first; the bits go where they cut the expected error most.

With the uniform grid (``grid="uniform"``) a plan must be one ``mx.quantized_matmul`` can read:
every tier a multiple of 32 channels, bits in 2, 3, 4, 5, 6, 8, and a half bit (two codebook
groups of half the tier) only on tiers of 64 channels or more, so each group is >= 32 channels.
"""

from __future__ import annotations

import numpy as np

QMM_TIER_BITS = (2, 3, 4, 5, 6, 8)  # turboquant.codec.QMM_BITS
MIN_TIER = {"lloyd": 4, "uniform": 32}  # channels in the smallest tier


def tiers_fit(dim: int, n: int, grid: str = "lloyd") -> bool:
    """n tiers split dim into halves down to dim / 2^(n-1) channels (>= 4; uniform grid: a
    multiple of 32)."""
    smallest = dim >> (n - 1)
    return (
        n >= 2
        and dim % (1 << n) == 0
        and smallest >= MIN_TIER[grid]
        and (grid == "lloyd" or smallest % 32 == 0)
    )


def tier_sizes(dim: int, n: int) -> list[int]:
    """Channels per tier, strongest first: dim/2^(n-1), dim/2^(n-1), dim/2^(n-2), ..., dim/2."""
    return [dim >> (n - 1)] + [dim >> (n - i) for i in range(1, n)]


def _next_bits(bits: float, channels: int, grid: str) -> float | None:
    """The next bits a tier can take after ``bits`` (None: none)."""
    if grid == "lloyd":
        return bits + 0.5 if bits < 8 else None
    half = channels >= 64  # two groups of >= 32 channels
    for b in QMM_TIER_BITS:
        if half and bits < b - 0.5 and b - 1 in QMM_TIER_BITS:
            return b - 0.5
        if bits < b:
            return float(b)
    return None


def plan_tiers(
    energy: np.ndarray, bits: float, n: int, grid: str = "lloyd"
) -> tuple[tuple[int, float], ...]:
    """(channels, bits) per tier for channel energies sorted strongest first: every tier starts
    at min(2, bits) and bits go, one step at a time (half a bit; uniform grid: the next plan qmm
    reads), where they cut the expected squared error most per stored bit (tier energy x
    4^-bits x (1 - 4^-step) / (channels x step)), up to 8 bits a channel. A budget no step fits
    is left unspent (the plan's mean is then a little below ``bits``)."""
    sizes = tier_sizes(len(energy), n)
    edges = np.cumsum([0] + sizes)
    tier_energy = [float(energy[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
    spent = [min(2.0, bits)] * n
    budget = bits * len(energy) - sum(b * c for b, c in zip(spent, sizes))
    while budget > 1e-9:
        gains = []
        for e, b, c in zip(tier_energy, spent, sizes):
            nxt = _next_bits(b, c, grid)
            cost = None if nxt is None else (nxt - b) * c
            if cost is None or cost > budget + 1e-9:
                gains.append(-1.0)
            else:
                gains.append(e * 4.0**-b * (1 - 4.0 ** (b - nxt)) / cost)
        i = int(np.argmax(gains))
        if gains[i] < 0:
            break
        nxt = _next_bits(spent[i], sizes[i], grid)
        budget -= (nxt - spent[i]) * sizes[i]
        spent[i] = nxt
    return tuple(zip(sizes, spent))
