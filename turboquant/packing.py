"""Exact bit packing of b-bit indices (b = 1..8) into uint32 words along the last axis.

Index i of a row occupies bits [i*b, i*b + b) of the row's bit stream; indices may straddle two
words, so a row of n indices takes ceil(n * b / 32) words: nothing is wasted beyond the padding of
the row's last word. Every 32 indices fill exactly b words, which is what the vectorised code
below works in: blocks of 32 indices <-> blocks of b words, with a fixed shift pattern.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

MASK32 = 0xFFFFFFFF


def packed_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def _pattern(bits: int):
    """For each word j of a 32-index block: [(index i, shift)] with shift = i*b - 32j."""
    return [
        [
            (i, i * bits - 32 * j)
            for i in range(32)
            if i * bits < 32 * (j + 1) and i * bits + bits > 32 * j
        ]
        for j in range(bits)
    ]


@lru_cache(maxsize=16)
def _pack_plan(bits: int) -> tuple[mx.array, mx.array, mx.array]:
    """(index, left, right): for word j of a 32-index block and term t, the index whose bits it
    holds (32: a zero pad), shifted left by ``left`` then right by ``right``; (bits, terms)."""
    pattern = _pattern(bits)
    terms = max(len(p) for p in pattern)
    index = [[i for i, _ in p] + [32] * (terms - len(p)) for p in pattern]
    left = [[max(s, 0) for _, s in p] + [0] * (terms - len(p)) for p in pattern]
    right = [[max(-s, 0) for _, s in p] + [0] * (terms - len(p)) for p in pattern]
    return (
        mx.array(index, dtype=mx.uint32).reshape(-1),
        mx.array(left, dtype=mx.uint32),
        mx.array(right, dtype=mx.uint32),
    )


# blocks of 32 indices up to which ``pack`` gathers (a few ops in all: a decode step's token)
# rather than going word by word (fewer bytes moved: a prefill chunk)
GATHER_BLOCKS = 64


def pack(indices: mx.array, bits: int) -> mx.array:
    """(..., n) integer indices < 2^bits -> (..., ceil(n*bits/32)) uint32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if indices.size > 32 * GATHER_BLOCKS:
        return _pack_by_words(indices, bits)
    return _pack_by_gather(indices, bits)


def _pack_by_gather(indices: mx.array, bits: int) -> mx.array:
    """Each word is the sum of its shifted indices (their bit fields do not overlap, so the sum is
    their OR, and bits shifted past 32 drop as uint32 shifts do): a gather, two shifts and a sum,
    whatever the bits (a few ops: what one token's codes cost per decode step)."""
    *lead, n = indices.shape
    blocks = -(-n // 32)
    idx = indices.astype(mx.uint32)
    pad = blocks * 32 - n + 1  # the block's padding and one zero per block (term padding)
    idx = mx.concatenate([idx, mx.zeros((*lead, pad), mx.uint32)], axis=-1) if pad else idx
    idx = mx.concatenate(
        [
            idx[..., : blocks * 32].reshape(*lead, blocks, 32),
            mx.zeros((*lead, blocks, 1), mx.uint32),
        ],
        axis=-1,
    )  # (..., blocks, 33): index 32 is zero
    index, left, right = _pack_plan(bits)
    terms = left.shape[-1]
    parts = mx.take(idx, index, axis=-1).reshape(*lead, blocks, bits, terms)
    words = mx.sum(mx.right_shift(mx.left_shift(parts, left), right), axis=-1).astype(mx.uint32)
    return words.reshape(*lead, blocks * bits)[..., : packed_words(n, bits)]


def _pack_by_words(indices: mx.array, bits: int) -> mx.array:
    """``pack`` one word position at a time: ~2 ops per index of a block, cheap per element."""
    *lead, n = indices.shape
    blocks = -(-n // 32)
    idx = indices.astype(mx.uint32)
    if blocks * 32 != n:
        idx = mx.concatenate([idx, mx.zeros((*lead, blocks * 32 - n), mx.uint32)], axis=-1)
    idx = idx.reshape(*lead, blocks, 32)
    words = []
    for terms in _pattern(bits):
        word = None
        for i, shift in terms:
            part = idx[..., i]
            part = mx.left_shift(part, shift) if shift >= 0 else mx.right_shift(part, -shift)
            word = part if word is None else mx.bitwise_or(word, part)
        words.append(word)
    out = mx.stack(words, axis=-1).reshape(*lead, blocks * bits)  # uint32 wraps at 32 bits
    return out[..., : packed_words(n, bits)]


def unpack(words: mx.array, bits: int, n: int) -> mx.array:
    """(..., ceil(n*bits/32)) uint32 -> (..., n) uint32 indices."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, w = words.shape
    if w != packed_words(n, bits):
        raise ValueError(f"{w} words cannot hold {n} indices of {bits} bits")
    blocks = -(-n // 32)
    if blocks * bits != w:
        words = mx.concatenate([words, mx.zeros((*lead, blocks * bits - w), mx.uint32)], axis=-1)
    words = words.reshape(*lead, blocks, bits)
    mask = mx.array((1 << bits) - 1, dtype=mx.uint32)
    out = []
    for i in range(32):
        start = i * bits
        j, offset = divmod(start, 32)
        value = mx.right_shift(words[..., j], offset)
        if offset + bits > 32:
            value = mx.bitwise_or(value, mx.left_shift(words[..., j + 1], 32 - offset))
        out.append(mx.bitwise_and(value, mask))
    return mx.stack(out, axis=-1).reshape(*lead, blocks * 32)[..., :n]
