"""A TurboQuant-compressed KV cache that follows mlx-lm's cache protocol.

Tokens are quantized as they arrive, except the ``fp_window`` most recent ones, which stay in
full precision (on real Gemma weights a window of exact recent tokens is worth more than a bit of
codebook). Keys and values are centred before encoding: a per-head mean is subtracted and kept
in full precision, so the codec spends its bits on how tokens differ, not on what they share.
The first block of ``center_block`` tokens after the sink is centred on the mean of its first
``center`` tokens (until those have arrived nothing is compressed); every later block on the mean
of the block before it, accumulated from the exact tokens as they are compressed, so the mean
follows keys that drift over a long context (on Gemma 3 270M's global layers a fixed mean removes
0-58% of the key energy over 16K tokens, a per-1024-token mean 23-68%). ``center_block=0``: one
mean for everything.
Key tiers (``key_tiers=n``): when the first mean is taken, the variance of each key channel over
those centring tokens orders every head's channels from strong to weak, and the key bits are
spread over n tiers of channels (1/2^(n-1), 1/2^(n-1), ..., 1/2 of them, strongest first) by
reverse water-filling on the tiers' energies (the same bits for every head, so the codes have one
layout; each head its own channel order). Gemma's keys are far from isotropic (RoPE pairs, a few
strong channels); a single rotation spreads the strong channels' error over all of them.
Storage grows in chunks of ``step`` tokens, so appending a token costs the same at 1K and at
256K tokens. ``update_and_fetch`` returns a lightweight ``CompressedView`` (for keys and
values alike) that attention understands: nothing is dequantized as a whole, ever.

Protocol: ``update_and_fetch``, ``offset``, ``state`` (a nested dict of arrays, numbers and
strings, so mlx-lm's ``save_prompt_cache`` writes it; load with ``load_prompt_cache`` below,
which also knows mlx-lm's own cache classes), ``trim``, ``is_trimmable``, ``make_mask``,
``nbytes`` (bytes actually allocated), ``empty``, ``size``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, replace
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from turboquant.codec import CodecSpec, Encoded, decode, encode, slice_encoded


class CompressedView:
    """What ``update_and_fetch`` returns: the cache's state at this moment, attendable.

    It keeps this call's exact copies (sink and recent tokens, including those the cache has just
    compressed for later calls); the compressed storage is read from the cache."""

    def __init__(self, cache: TurboQuantKVCache):
        self.cache = cache
        self.offset = cache.offset  # total tokens, the queries are the last ones
        self.fp_keys, self.fp_values, self.fp_start = cache.fp_keys, cache.fp_values, cache.fp_start
        self.sink_keys, self.sink_values = cache.sink_keys, cache.sink_values

    def attend(self, queries: mx.array, scale: float, mask: Any = None) -> mx.array:
        from turboquant.attention import attention

        return attention(queries, self, scale=scale, mask=mask)

    @property
    def shape(self) -> tuple[int, ...]:  # like a (B, n_kv_heads, tokens, D) key array
        c = self.cache
        return (c.batch, c.n_kv_heads, self.offset, c.key_spec.dim)


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


def _permute(x: mx.array, order: mx.array) -> mx.array:
    """x (B, H, T, D) with each head's channels in ``order`` (H, D)."""
    return mx.take_along_axis(x, mx.broadcast_to(order[None, :, None, :], x.shape), axis=-1)


def _encoded_like(enc: Encoded, capacity: int) -> Encoded:
    """Zero storage for ``capacity`` tokens with the field layout of ``enc`` (B, H, T, ...)."""

    def grow(a: mx.array | None):
        if a is None:
            return None
        return mx.zeros((*a.shape[:2], capacity, *a.shape[3:]), a.dtype)

    return Encoded(
        tuple(grow(c) for c in enc.codes), grow(enc.norms), grow(enc.signs), grow(enc.res_norms)
    )


def _concat_encoded(a: Encoded, b: Encoded) -> Encoded:
    def cat(x, y):
        return None if x is None else mx.concatenate([x, y], axis=2)

    return Encoded(
        tuple(cat(x, y) for x, y in zip(a.codes, b.codes)),
        cat(a.norms, b.norms),
        cat(a.signs, b.signs),
        cat(a.res_norms, b.res_norms),
    )


def _assign(store: Encoded, new: Encoded, start: int) -> None:
    end = start + new.norms.shape[2]
    for dst, src in zip(store.codes, new.codes):
        dst[:, :, start:end] = src
    store.norms[:, :, start:end] = new.norms
    if store.signs is not None:
        store.signs[:, :, start:end] = new.signs
        store.res_norms[:, :, start:end] = new.res_norms


class TurboQuantKVCache(mlx_cache._BaseCache):
    """Growing compressed cache for global (full-attention) layers.

    Which copy a query at position t reads for key j (the same in a chunked prefill and in
    token-by-token decode, so results do not depend on how a prompt is split):

    - j < ``sink``: exact (the first tokens, where Gemma parks most of its attention mass);
    - t - ``fp_window`` <= j <= t: exact (the query's most recent tokens and itself);
    - anything older: compressed;
    - t < ``sink + center``: everything exact (the mean the codes refer to is not known yet).

    The compressed token at position j was centred on ``key_mean[:, :, block(j)]`` with
    ``block(j) = (j - sink) // center_block`` (0 when ``center_block`` is 0).

    Between calls the cache stores the ``sink`` first and the ``fp_window`` last tokens exact and
    everything in between compressed; during an update the tokens leaving the window are
    compressed while the returned view still holds their exact copies for this call's queries.
    """

    step = 256

    window: int | None = None  # no eviction here: a global layer sees every token

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
    ):
        if key_tiers and not center:
            raise ValueError("key_tiers needs center > 0 (the centring tokens order the channels)")
        if key_tiers and not tiers_fit(key_spec.dim, key_tiers):
            raise ValueError(
                f"key_tiers must be >= 2 (0: off), 2^key_tiers must divide the head dim and leave "
                f">= 4 channels a tier: {key_tiers} tiers of {key_spec.dim}"
            )
        if fp_window < 0 or sink < 0 or center < 0 or center_block < 0:
            raise ValueError(
                "fp_window, sink, center and center_block must be >= 0, got "
                f"{fp_window}, {sink}, {center}, {center_block}"
            )
        if center_block and not center:
            raise ValueError("center_block needs center > 0 (the first block's mean)")
        if center_block and center > center_block:
            raise ValueError(f"center ({center}) must be <= center_block ({center_block})")
        self.key_spec = key_spec
        self.value_spec = value_spec
        self.fp_window = fp_window
        self.sink = sink
        self.exact_dtype = exact_dtype  # storage of the exact tokens (None: as they come)
        self.center = center  # tokens after the sink whose mean centres the codes (0: none)
        self.center_block = center_block  # tokens per mean (0: one mean for all)
        self.key_tiers = key_tiers  # channel tiers of the keys (0: one rotation over all)
        # (H, D) uint32: each head's key channels, strongest first (set with the first mean)
        self.key_order: mx.array | None = None
        # (B, H, blocks, D) in the exact tokens' dtype: one mean per block that has compressed
        # tokens (and the next one, once its predecessor is complete), subtracted before encoding
        # and added back when attending
        self.key_mean: mx.array | None = None
        self.value_mean: mx.array | None = None
        # float32 (B, H, 1, D): sum of the exact tokens of the current, incomplete block
        self.key_sum: mx.array | None = None
        self.value_sum: mx.array | None = None
        self.offset = 0
        # positions [0, n_sink) exact in sink_*, [n_sink, n_quantized) compressed (storage index
        # = position - n_sink), [fp_start, offset) exact in fp_*; fp_start <= n_quantized between
        # calls only after a trim (no overlap otherwise).
        self.n_quantized = 0
        self.keys: Encoded | None = None  # (B, H, capacity, ...) compressed storage
        self.values: Encoded | None = None
        self.sink_keys: mx.array | None = None  # (B, H, <= sink, D)
        self.sink_values: mx.array | None = None
        self.fp_keys: mx.array | None = None  # (B, H, offset - fp_start, D) most recent tokens
        self.fp_values: mx.array | None = None
        self.fp_start = 0

    def __deepcopy__(self, memo: dict) -> TurboQuantKVCache:
        """An independent copy (e.g. to branch one prefilled prompt); codec specs are shared."""
        new = self.__class__.__new__(self.__class__)
        for name, value in self.__dict__.items():
            shared = name in ("key_spec", "value_spec", "exact_dtype")
            setattr(new, name, value if shared else copy.deepcopy(value, memo))
        return new

    # -- protocol -------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.fp_keys.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.fp_keys.shape[1]

    @property
    def n_sink(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[2]

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.norms.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """keys, values: (B, n_kv_heads, L, D). Returns (view, view)."""
        if self.exact_dtype is not None:
            keys, values = keys.astype(self.exact_dtype), values.astype(self.exact_dtype)
        if self.fp_keys is None:
            self.fp_keys, self.fp_values = keys, values
        else:
            self.fp_keys = mx.concatenate([self.fp_keys, keys], axis=2)
            self.fp_values = mx.concatenate([self.fp_values, values], axis=2)
        self.offset += keys.shape[2]
        # the first tokens become the exact sink
        if self.n_sink < self.sink and self.fp_start == self.n_sink == self.n_quantized:
            take = min(self.sink - self.n_sink, self.offset - self.fp_start)
            new_k, new_v = self.fp_keys[:, :, :take], self.fp_values[:, :, :take]
            if self.sink_keys is None:
                self.sink_keys, self.sink_values = new_k, new_v
            else:
                self.sink_keys = mx.concatenate([self.sink_keys, new_k], axis=2)
                self.sink_values = mx.concatenate([self.sink_values, new_v], axis=2)
            self.fp_keys, self.fp_values = self.fp_keys[:, :, take:], self.fp_values[:, :, take:]
            self.fp_start += take
            self.n_quantized = max(self.n_quantized, self.fp_start)
        view = CompressedView(self)  # exact copies of this call's whole range, before trimming
        if self.offset < self.sink + self.center:  # the mean is not known yet: all stays exact
            return view, view
        if self.center and self.key_mean is None:  # positions [sink, sink + center)
            self.key_mean, self.value_mean = (
                mx.mean(a[:, :, : self.center].astype(mx.float32), 2, True).astype(a.dtype)
                for a in (self.fp_keys, self.fp_values)
            )
            if self.center_block:
                self.key_sum = mx.zeros(self.key_mean.shape, mx.float32)
                self.value_sum = mx.zeros(self.value_mean.shape, mx.float32)
            if self.key_tiers:
                self._plan_tiers(self.fp_keys[:, :, : self.center])
        # compress what leaves the window for the next call's queries, drop its exact copy
        keep_from = max(self.offset - self.fp_window, self.fp_start)
        if keep_from > self.n_quantized:
            lo = self.n_quantized - self.fp_start
            hi = keep_from - self.fp_start
            self._quantize(self.fp_keys[:, :, lo:hi], self.fp_values[:, :, lo:hi])
        if keep_from > self.fp_start:
            cut = keep_from - self.fp_start
            self.fp_keys, self.fp_values = self.fp_keys[:, :, cut:], self.fp_values[:, :, cut:]
            self.fp_start = keep_from
        return view, view

    def _plan_tiers(self, keys: mx.array) -> None:
        """Order each head's key channels by their variance over ``keys`` (the centring tokens)
        and spread the key bits over the tiers (same bits for every head)."""
        centred = keys.astype(mx.float32) - self.key_mean.astype(mx.float32)
        var = mx.mean(centred * centred, axis=(0, 2))  # (H, D)
        order = mx.argsort(-var, axis=-1)
        energy = np.array(mx.mean(mx.take_along_axis(var, order, axis=-1), axis=0))
        tiers = plan_tiers(energy, self.key_spec.bits, self.key_tiers)
        self.key_spec = replace(self.key_spec, tiers=tiers)
        self.key_order = order.astype(mx.uint32)

    def key_domain(self, x: mx.array, inverse: bool = False) -> mx.array:
        """(B, H, T, D) keys, queries or means in the order the key codes use (``inverse``: back
        to the model's order)."""
        if self.key_order is None:
            return x
        return _permute(x, mx.argsort(self.key_order, axis=-1) if inverse else self.key_order)

    def block_of(self, position: int) -> int:
        """Index of the mean that centres the compressed token at ``position``."""
        return (position - self.n_sink) // self.center_block if self.center_block else 0

    def _centred(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Subtract each token's block mean (keys/values at positions [n_quantized, +n)), and
        complete block means as their last token passes (the next block's mean)."""
        if self.key_mean is None:
            return keys, values
        if not self.center_block:
            return (
                keys.astype(mx.float32) - self.key_mean,
                values.astype(mx.float32) - self.value_mean,
            )
        out_k, out_v = [], []
        pos, lo, n = self.n_quantized, 0, keys.shape[2]
        while lo < n:
            b = self.block_of(pos)
            block_end = self.n_sink + (b + 1) * self.center_block
            hi = min(n, lo + block_end - pos)
            k, v = keys[:, :, lo:hi].astype(mx.float32), values[:, :, lo:hi].astype(mx.float32)
            out_k.append(k - self.key_mean[:, :, b : b + 1])
            out_v.append(v - self.value_mean[:, :, b : b + 1])
            self.key_sum = self.key_sum + k.sum(2, keepdims=True)
            self.value_sum = self.value_sum + v.sum(2, keepdims=True)
            pos += hi - lo
            lo = hi
            if pos == block_end:  # block b complete: its mean centres block b + 1
                dtype = self.key_mean.dtype
                self.key_mean = mx.concatenate(
                    [self.key_mean, (self.key_sum / self.center_block).astype(dtype)], axis=2
                )
                self.value_mean = mx.concatenate(
                    [self.value_mean, (self.value_sum / self.center_block).astype(dtype)], axis=2
                )
                self.key_sum = mx.zeros_like(self.key_sum)
                self.value_sum = mx.zeros_like(self.value_sum)
        if len(out_k) == 1:
            return out_k[0], out_v[0]
        return mx.concatenate(out_k, axis=2), mx.concatenate(out_v, axis=2)

    def _quantize(self, keys: mx.array, values: mx.array) -> None:
        n = keys.shape[2]
        keys, values = self._centred(keys, values)
        k = encode(self.key_domain(keys), self.key_spec, check_finite=False)
        v = encode(values, self.value_spec, check_finite=False)
        first = self.n_quantized - self.n_sink  # storage index
        needed = first + n
        if self.keys is None or needed > self.capacity:
            chunks = -(-(needed - self.capacity) // self.step)
            extra_k, extra_v = (
                _encoded_like(k, chunks * self.step),
                _encoded_like(v, chunks * self.step),
            )
            if self.keys is None:
                self.keys, self.values = extra_k, extra_v
            else:
                self.keys = _concat_encoded(self.keys, extra_k)
                self.values = _concat_encoded(self.values, extra_v)
        _assign(self.keys, k, first)
        _assign(self.values, v, first)
        self.n_quantized += n

    def compressed_block(self, start: int, end: int) -> tuple[Encoded, Encoded]:
        index = (slice(None), slice(None), slice(start, end))
        return slice_encoded(self.keys, index), slice_encoded(self.values, index)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.fp_keys is None

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        new = self.offset - n
        if new >= self.fp_start:
            self.fp_keys = self.fp_keys[:, :, : new - self.fp_start]
            self.fp_values = self.fp_values[:, :, : new - self.fp_start]
        else:  # back into the compressed part (or the sink): no exact recent tokens left
            self.fp_keys, self.fp_values = self.fp_keys[:, :, :0], self.fp_values[:, :, :0]
            self.fp_start = new
        if new < self.n_sink:
            self.sink_keys = self.sink_keys[:, :, :new]
            self.sink_values = self.sink_values[:, :, :new]
        # compressed slots past n_quantized are dead storage, overwritten on the next update
        n_quantized = min(self.n_quantized, max(new, self.n_sink))
        if n_quantized < self.n_quantized and self.center_block and self.key_mean is not None:
            self._rewind_means(n_quantized)
        self.n_quantized = n_quantized
        self.offset = new
        return n

    def _rewind_means(self, n_quantized: int) -> None:
        """Back to the block means of ``n_quantized`` compressed tokens. The exact tokens of the
        current block are gone, so its running sum is rebuilt from their decoded codes."""
        b = self.block_of(n_quantized)
        self.key_mean = self.key_mean[:, :, : b + 1]
        self.value_mean = self.value_mean[:, :, : b + 1]
        start = self.n_sink + b * self.center_block
        if n_quantized == start:
            self.key_sum = mx.zeros_like(self.key_sum)
            self.value_sum = mx.zeros_like(self.value_sum)
            return
        k_enc, v_enc = self.compressed_block(start - self.n_sink, n_quantized - self.n_sink)
        keys = self.key_domain(decode(k_enc, self.key_spec), inverse=True)
        for name, tokens, mean in (
            ("key_sum", keys, self.key_mean),
            ("value_sum", decode(v_enc, self.value_spec), self.value_mean),
        ):
            tokens = tokens + mean[:, :, b : b + 1].astype(mx.float32)
            setattr(self, name, tokens.sum(2, keepdims=True))

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False):
        return mlx_cache.create_attention_mask(
            N, offset=self.offset, return_array=return_array, window_size=window_size
        )

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated: compressed storage (with its growth slack) + exact tokens."""
        total = 0
        for enc in (self.keys, self.values):
            if enc is not None:
                total += enc.nbytes
        exact = (self.fp_keys, self.fp_values, self.sink_keys, self.sink_values)
        extra = (self.key_mean, self.value_mean, self.key_sum, self.value_sum, self.key_order)
        for a in (*exact, *extra):
            if a is not None:
                total += a.nbytes
        return total

    # -- save / load --------------------------------------------------------------------
    @property
    def state(self) -> dict:
        def fields(enc: Encoded | None) -> Any:
            if enc is None:
                return None
            live = slice_encoded(
                enc, (slice(None), slice(None), slice(0, self.n_quantized - self.n_sink))
            )
            return {
                "codes": list(live.codes),
                "norms": live.norms,
                "signs": live.signs,
                "res_norms": live.res_norms,
            }

        return {
            "meta": {
                "offset": self.offset,
                "n_quantized": self.n_quantized,
                "fp_window": self.fp_window,
                "sink": self.sink,
                "center": self.center,
                "center_block": self.center_block,
                "key_tiers": self.key_tiers,
                "fp_start": self.fp_start,
                "exact_dtype": ""
                if self.exact_dtype is None
                else str(self.exact_dtype).split(".")[-1],
                "key_spec": json.dumps(asdict(self.key_spec)),
                "value_spec": json.dumps(asdict(self.value_spec)),
            },
            "keys": fields(self.keys),
            "values": fields(self.values),
            "fp_keys": self.fp_keys,
            "fp_values": self.fp_values,
            "sink_keys": self.sink_keys,
            "sink_values": self.sink_values,
            "key_mean": self.key_mean,
            "value_mean": self.value_mean,
            "key_sum": self.key_sum,
            "value_sum": self.value_sum,
            "key_order": self.key_order,
        }

    @state.setter
    def state(self, v: dict) -> None:
        meta = v["meta"]
        self.key_spec = CodecSpec(**json.loads(meta["key_spec"]))
        self.value_spec = CodecSpec(**json.loads(meta["value_spec"]))
        self.fp_window = int(meta["fp_window"])
        self.offset = int(meta["offset"])
        self.n_quantized = int(meta["n_quantized"])
        self.sink = int(meta.get("sink", 0))
        self.center = int(meta.get("center", 0))
        self.center_block = int(meta.get("center_block", 0))
        self.key_tiers = int(meta.get("key_tiers", 0))
        dtype = meta.get("exact_dtype", "")
        self.exact_dtype = getattr(mx, dtype) if dtype else None

        def encoded(d):
            if not d:
                return None
            return Encoded(tuple(d["codes"]), d["norms"], d.get("signs"), d.get("res_norms"))

        self.keys, self.values = encoded(v.get("keys")), encoded(v.get("values"))
        self.fp_keys, self.fp_values = v.get("fp_keys"), v.get("fp_values")
        self.sink_keys, self.sink_values = v.get("sink_keys"), v.get("sink_values")
        self.key_mean, self.value_mean = v.get("key_mean"), v.get("value_mean")
        self.key_sum, self.value_sum = v.get("key_sum"), v.get("value_sum")
        self.key_order = v.get("key_order")
        fp = 0 if self.fp_keys is None else self.fp_keys.shape[2]
        self.fp_start = int(meta.get("fp_start", self.offset - fp))

    @property
    def meta_state(self) -> str:
        return ""


def save_prompt_cache(path: str, cache: list[Any], metadata: dict[str, str] | None = None) -> None:
    """mlx-lm's format; our caches' state is a nested dict it already serialises."""
    mlx_cache.save_prompt_cache(path, cache, metadata)


def load_prompt_cache(path: str, return_metadata: bool = False):
    """mlx-lm's loader, but resolving our cache classes as well as mlx-lm's."""
    from mlx.utils import tree_unflatten

    arrays, meta = mx.load(path, return_metadata=True)
    meta = tree_unflatten(list(meta.items()))
    metadata, classes, scalars = meta
    for pos, kind in scalars[1:]:
        a = arrays[pos]
        if kind == "scalar":
            arrays[pos] = a.item()
        elif kind == "string":
            arrays[pos] = "".join(chr(i) for i in a.tolist())
        else:
            arrays[pos] = None
    states = tree_unflatten(list(arrays.items()))
    registry = {"TurboQuantKVCache": TurboQuantKVCache}
    cache = []
    for name, state in zip(classes, states):
        cls = registry.get(name) or getattr(mlx_cache, name)
        cache.append(cls.from_state(state))
    return (cache, metadata) if return_metadata else cache
