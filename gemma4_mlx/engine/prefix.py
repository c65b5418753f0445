"""Prefix reuse across requests: KV checkpoints in a token trie, budgeted by real nbytes.

mlx-lm's ``LRUPromptCache`` trims a longer entry whenever every layer says ``is_trimmable()``
and drops shorter checkpoints when a trimmable entry arrives. A compressed cache can be
trimmable without the trim being exact (a trim back past its exact copies leaves compressed
tokens where a cold prefill reads exact ones), so that policy could silently change outputs.
This store keeps mlx-lm's ``PromptTrie`` for the token lookup and decides itself:

1. the longest stored checkpoint that is a prefix of the prompt (no trim at all);
2. else a longer entry trimmed back, only when every layer's trim is known exact
   (``trim_is_exact``);
3. else nothing (cold prefill).

Entries are deep copies handed out as deep copies (mlx caches are updated in place), so a
request can never corrupt a checkpoint. Entries larger than the whole budget are not stored
(rather than evicting everything for them).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


def trim_is_exact(cache: list[Any], n: int) -> bool:
    """True when trimming ``n`` tokens off every layer gives what a cold prefill would.

    Our sliding and TurboQuant caches answer for themselves (``can_trim(n)``: within their
    ``max_rewind`` budget a trim restores the exact state). mlx-lm's KVCache and
    QuantizedKVCache store every token as it came (a trim moves the offset back); a
    RotatingKVCache is exact while it has not wrapped (``is_trimmable``). Anything else is
    never trimmed here."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

    for layer in cache:
        own = getattr(layer, "can_trim", None)
        if callable(own):
            if not own(n):
                return False
        elif type(layer) in (KVCache, QuantizedKVCache):
            if layer.offset < n:
                return False
        elif type(layer) is RotatingKVCache:
            if not layer.is_trimmable() or layer.offset < n:
                return False
        else:
            return False
    return True


def cache_nbytes(cache: list[Any]) -> int:
    return int(sum(getattr(layer, "nbytes", 0) for layer in cache))


@dataclass
class Hit:
    cache: list[Any] | None  # a private copy, ready to extend; None: prefill from scratch
    reused: int  # prompt tokens the cache already holds
    how: str  # "checkpoint" | "trimmed" | "miss"
    common: int = 0  # tokens shared with the closest stored entry (where the prompt diverged)


class PrefixStore:
    """Checkpoints keyed by (``key``, token ids); ``key`` names the model and KV policy, so an
    exact prefix never feeds a TurboQuant request or the reverse."""

    def __init__(self, max_bytes: int):
        from mlx_lm.models.cache import PromptTrie

        self.max_bytes = max_bytes
        self.trie = PromptTrie()
        self.lru: OrderedDict[tuple, tuple[list[Any], int]] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.lru)

    def insert(self, key: str, tokens: list[int], cache: list[Any], copy_cache: bool) -> bool:
        """Store ``cache`` (holding exactly ``tokens``); False if it alone exceeds the budget."""
        if not tokens:
            return False
        size = cache_nbytes(cache)
        if size > self.max_bytes:
            return False
        ident = (key, tuple(tokens))
        if ident in self.lru:
            self.lru.move_to_end(ident)
            return True
        stored = copy.deepcopy(cache) if copy_cache else cache
        self.trie.add(key, list(tokens), stored)
        self.lru[ident] = (stored, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes and self.lru:
            (old_key, old_tokens), (_, old_size) = self.lru.popitem(last=False)
            self.trie.pop(old_key, list(old_tokens))
            self.nbytes -= old_size
        return True

    def fetch(self, key: str, prompt: list[int]) -> Hit:
        """The best reusable cache for ``prompt``; at least one prompt token is always left
        to run (the first sampled token needs its logits)."""
        target = prompt[:-1]
        if not target:
            return Hit(None, 0, "miss")
        found = self.trie.search(key, target)
        if found.exact is not None:
            return self._take(key, found.exact, len(target), "checkpoint", len(target))
        short = len(found.shorter) if found.shorter is not None else 0
        if found.longer is not None and found.common_prefix > short:
            stored = self.trie.get(key, found.longer)
            n_trim = len(found.longer) - found.common_prefix
            if trim_is_exact(stored, n_trim):
                hit = self._take(
                    key, found.longer, found.common_prefix, "trimmed", found.common_prefix
                )
                for layer in hit.cache:
                    layer.trim(n_trim)
                return hit
        if short:
            return self._take(key, found.shorter, short, "checkpoint", found.common_prefix)
        return Hit(None, 0, "miss", found.common_prefix)

    def _take(self, key: str, tokens: list[int], reused: int, how: str, common: int) -> Hit:
        self.lru.move_to_end((key, tuple(tokens)))
        return Hit(copy.deepcopy(self.trie.get(key, tokens)), reused, how, common)
