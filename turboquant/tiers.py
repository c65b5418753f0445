"""The key channel plan: how many channels each tier gets and how many bits each tier spends.

Gemma's keys are far from isotropic (RoPE pairs, a few strong channels); a single rotation spreads
the strong channels' error over all of them. With n tiers, each head's channels are ordered from
strong to weak (by their variance over the centring tokens) and split into 1/2^(n-1), 1/2^(n-1),
..., 1/2 of them, strongest first; the bits go where they cut the expected error most.
"""

from __future__ import annotations

import numpy as np


def tiers_fit(dim: int, n: int) -> bool:
    """n tiers split dim into halves down to dim / 2^(n-1) channels (>= 4), in half bits."""
    return n >= 2 and dim % (1 << n) == 0 and dim >> (n - 1) >= 4


def tier_sizes(dim: int, n: int) -> list[int]:
    """Channels per tier, strongest first: dim/2^(n-1), dim/2^(n-1), dim/2^(n-2), ..., dim/2."""
    return [dim >> (n - 1)] + [dim >> (n - i) for i in range(1, n)]


def plan_tiers(energy: np.ndarray, bits: float, n: int) -> tuple[tuple[int, float], ...]:
    """(channels, bits) per tier for channel energies sorted strongest first: every tier starts
    at min(2, bits) and half bits go, one at a time, where they cut the expected squared error
    most per stored bit (tier energy x 4^-bits / channels), up to 8 bits a channel."""
    sizes = tier_sizes(len(energy), n)
    edges = np.cumsum([0] + sizes)
    tier_energy = [float(energy[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
    spent = [min(2.0, bits)] * n
    budget = bits * len(energy) - sum(b * c for b, c in zip(spent, sizes))
    while budget > 1e-9:
        gains = [
            e * 4.0**-b / c if b < 8 and c / 2 <= budget + 1e-9 else -1.0
            for e, b, c in zip(tier_energy, spent, sizes)
        ]
        i = int(np.argmax(gains))
        if gains[i] < 0:
            break
        spent[i] += 0.5
        budget -= sizes[i] / 2
    return tuple(zip(sizes, spent))
