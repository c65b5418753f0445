"""Our KV caches behind mlx-lm's cache protocol, every one exactly trimmable within a budget.

Protocol (what mlx-lm's generate_step, speculative_generate_step and prompt-cache files use):
``update_and_fetch``, ``offset``, ``make_mask``, ``is_trimmable``, ``trim``, ``state`` /
``from_state`` (a nested dict of arrays, numbers and strings: mlx-lm's ``save_prompt_cache`` writes
it), ``meta_state``, ``nbytes``, ``empty``, ``size``. Ours add ``can_trim(n)``: a trim that could
not restore the state exactly raises ``TrimError`` (a ValueError) instead of silently losing
tokens, as mlx-lm's RotatingKVCache does once full.

- ``SlidingKVCache``: sliding-window layers. The exact keys/values of the last window - 1 +
  ``max_rewind`` tokens (mlx-lm's RotatingKVCache keeps window tokens and stops being trimmable
  once full). Written in place; every ``step`` tokens the live tokens move to the front.
- ``TurboQuantKVCache``: global layers, two ``turboquant.stream.CompressedStream`` (K and V) with
  one ``Layout``; ``update_and_fetch`` returns their immutable views, which
  ``gemma4_mlx.models.attention.attend`` hands to ``turboquant.attention``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import create_attention_mask

from turboquant.codec import CodecSpec
from turboquant.stream import CompressedStream, Layout, StreamView, TrimError

__all__ = ["SlidingKVCache", "TrimError", "TurboQuantKVCache", "StreamView"]

# Tokens a trim may take back exactly (speculative drafts, prefix reuse). Each costs its exact
# copy per global layer (~16 bits/channel a token, spread over the context: 16 tokens add
# ~0.03 bits/channel at 8K, ~0.28 at 1K); 16 covers mlx-lm's draft lengths and the few tokens
# a re-tokenised chat turn gives back.
DEFAULT_MAX_REWIND = 16


class SlidingKVCache:
    """Exact keys/values for a sliding-window layer (query t sees keys t - window < j <= t)."""

    step = 256

    def __init__(self, window: int, max_rewind: int = DEFAULT_MAX_REWIND, attention: str = "sdpa"):
        if window < 1 or max_rewind < 0:
            raise ValueError(f"window must be >= 1 and max_rewind >= 0, got {window}, {max_rewind}")
        self.window, self.max_rewind = window, max_rewind
        self.attention = attention  # how attend reads it: "sdpa" | "grouped" | "auto" (KVPolicy)
        self.keys: mx.array | None = None  # (B, H, capacity, D): positions from offset - used
        self.values: mx.array | None = None
        self.used = 0  # live slots; slot i holds position offset - used + i
        self.offset = 0

    def _first_visible(self, offset: int) -> int:
        """The oldest position the query at ``offset`` (the next one) sees."""
        return max(0, offset - self.window + 1)

    def _make_room(self, keys: mx.array, values: mx.array) -> None:
        """Move the tokens still needed (window - 1 + max_rewind) to the front of a buffer with
        room for this call's tokens, and ``step`` more after a short call (decode steps and
        speculative verifications: the copy of the kept tokens is then paid once per ``step``
        tokens). A prompt chunk of ``step`` tokens or more gets no slack: the next chunk moves
        the kept tokens anyway, and the buffer stays window - 1 + max_rewind + chunk, not
        rounded up (it was up to 3x the window at 512-token chunks)."""
        keep = min(self.used, self.window - 1 + self.max_rewind)
        L = keys.shape[2]
        capacity = keep + L + (self.step if L < self.step else 0)
        buffers = []
        for old, new in ((self.keys, keys), (self.values, values)):
            fresh = mx.zeros((*new.shape[:2], capacity - keep, new.shape[3]), new.dtype)
            live = [] if old is None else [old[:, :, self.used - keep : self.used]]
            buffers.append(mx.concatenate([*live, fresh], axis=2))
        self.keys, self.values = buffers
        self.used = keep

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """keys, values (B, H, L, D) -> the keys/values from the first query's window on."""
        L = keys.shape[2]
        if self.keys is None or self.used + L > self.keys.shape[2]:
            self._make_room(keys, values)
        self.keys[:, :, self.used : self.used + L] = keys
        self.values[:, :, self.used : self.used + L] = values
        first = self.used - (self.offset - self._first_visible(self.offset))  # slot
        self.used += L
        self.offset += L
        return self.keys[:, :, first : self.used], self.values[:, :, first : self.used]

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        """The mask of the next N queries over the keys ``update_and_fetch`` will return."""
        k_start = self._first_visible(self.offset)
        n_keys = self.offset + N - k_start
        if N == 1 and not return_array:
            return None  # the returned keys are exactly its window
        if n_keys <= self.window and not return_array:
            return "causal"
        q = mx.arange(self.offset, self.offset + N)[:, None]
        k = mx.arange(k_start, self.offset + N)[None, :]
        return (k <= q) & (q - k < self.window)

    def can_trim(self, n: int) -> bool:
        """Up to ``max_rewind`` tokens (the next query still finds its whole window), or all.
        The same rule as TurboQuantKVCache's, so one model's caches agree on every trim."""
        return n <= self.max_rewind or n >= self.offset

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if not self.can_trim(n):
            raise TrimError(
                f"cannot trim {n} of {self.offset} tokens exactly: a sliding-window cache keeps "
                f"max_rewind={self.max_rewind} tokens past its window"
            )
        self.used = max(self.used - n, 0)  # all: empty again
        self.offset -= n
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> dict:
        live = slice(0, self.used)
        meta = {"offset": self.offset, "window": self.window, "max_rewind": self.max_rewind}
        if self.keys is None:
            return {"meta": meta, "keys": None, "values": None}
        return {"meta": meta, "keys": self.keys[:, :, live], "values": self.values[:, :, live]}

    @state.setter
    def state(self, v: dict) -> None:
        meta = v["meta"]
        self.window, self.max_rewind = int(meta["window"]), int(meta["max_rewind"])
        self.offset = int(meta["offset"])
        self.keys, self.values = v.get("keys"), v.get("values")
        self.used = 0 if self.keys is None else self.keys.shape[2]

    @property
    def meta_state(self) -> str:
        return ""

    @classmethod
    def from_state(cls, state: dict, meta_state: Any = None) -> SlidingKVCache:
        new = cls.__new__(cls)
        new.attention = "sdpa"  # a compute choice, not state: a loaded cache reads as mlx-lm's
        new.state = state
        return new


class TurboQuantKVCache:
    """Global-layer cache: keys and values each a CompressedStream with the same Layout."""

    def __init__(
        self,
        key_spec: CodecSpec,
        value_spec: CodecSpec,
        fp_window: int = 0,
        sink: int = 0,
        exact_dtype: mx.Dtype | None = None,
        center: int = 0,
        center_block: int = 0,
        key_tiers: int = 0,
        max_rewind: int = DEFAULT_MAX_REWIND,
    ):
        layout = Layout(sink, fp_window, max_rewind, center, center_block)
        self.keys = CompressedStream(key_spec, layout, key_tiers, exact_dtype)
        self.values = CompressedStream(value_spec, layout, 0, exact_dtype)

    @property
    def layout(self) -> Layout:
        return self.keys.layout

    @property
    def offset(self) -> int:
        return self.keys.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[StreamView, StreamView]:
        """keys, values (B, n_kv_heads, L, D) -> the two streams' views for this call."""
        return self.keys.append(keys), self.values.append(values)

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        return create_attention_mask(
            N, offset=self.offset, return_array=return_array, window_size=window_size
        )

    def can_trim(self, n: int) -> bool:
        return self.keys.can_trim(n)  # the values stream is in lockstep

    def is_trimmable(self) -> bool:
        return True  # up to max_rewind tokens; ``can_trim`` says how far

    def trim(self, n: int) -> int:
        self.keys.trim(n)  # raises TrimError beyond the budget, before anything changes
        return self.values.trim(n)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys.tail is None

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated: codes (with their growth slack), exact tokens, means."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> dict:
        layout = self.layout
        meta = {
            name: getattr(layout, name)
            for name in ("sink", "fp_window", "max_rewind", "center", "center_block")
        }
        return {"layout": meta, "keys": self.keys.state, "values": self.values.state}

    @state.setter
    def state(self, v: dict) -> None:
        layout = Layout(**{name: int(x) for name, x in v["layout"].items()})
        self.keys = CompressedStream.from_state(v["keys"], layout)
        self.values = CompressedStream.from_state(v["values"], layout)

    @property
    def meta_state(self) -> str:
        return ""

    @classmethod
    def from_state(cls, state: dict, meta_state: Any = None) -> TurboQuantKVCache:
        new = cls.__new__(cls)
        new.state = state
        return new
