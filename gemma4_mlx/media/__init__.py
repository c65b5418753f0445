"""Media in: image (and video) preprocessing and the prompt expansion of their placeholders.

The chat template writes one ``<|image|>`` per image; ``expand_image_placeholders`` turns each
into ``<|image>`` + n x ``<|image|>`` + ``<image|>`` (n from the resized size), on token ids,
with the ids read from config.json (``MediaTokens``), never hard-coded.
"""

from __future__ import annotations

from gemma4_mlx.errors import UserError


def expand_image_placeholders(ids: list[int], tokens, counts: list[int]) -> list[int]:
    """Replace the i-th ``tokens.image`` id in ``ids`` by boi + counts[i] x image + eoi."""
    n_slots = sum(1 for t in ids if t == tokens.image)
    if n_slots != len(counts):
        raise UserError(
            f"the prompt has {n_slots} image placeholder(s) but {len(counts)} image(s) were given"
        )
    out: list[int] = []
    it = iter(counts)
    for t in ids:
        if t == tokens.image:
            out += [tokens.boi] + [tokens.image] * next(it) + [tokens.eoi]
        else:
            out.append(t)
    return out


__all__ = ["expand_image_placeholders"]
