"""A TurboQuant-compressed stream of one tensor (the keys, or the values, of an attention layer).

Positions ``[0, n_sink)`` are the exact sink (the first tokens, where Gemma parks most of its
attention mass), ``[n_sink, n_quantized)`` are compressed, and the last tokens are held exact in
the tail. A token is compressed as soon as it leaves the exact window of the newest query (so a
query's reads never depend on when compression happened: chunking invariance), but its exact copy
stays in the tail for ``max_rewind`` more tokens. A trim of up to ``max_rewind`` tokens therefore
restores the stream exactly as it was (codes, means, running sum): it is what speculative decoding
and prompt-prefix reuse need. A longer trim raises ``TrimError``. The price is constant per layer:
max_rewind more exact tokens and one float32 running-sum checkpoint per stream (a running sum at
any later position is replayed from it over the exact tail copies, token by token, so it is the
same whichever path reached it: a trimmed stream continues bit for bit like one that never saw the
trimmed tokens). benchmarks/memory.py --quick, E2B tq2.5 at 8K, max_rewind=16: 2.717 stored
bits/channel (2.686 without exact trims; 2.779 with a float32 sum kept after each rewind token).

Centring: codes are taken of ``x - mean``. The first block of ``center_block`` tokens after the
sink is centred on the mean of its first ``center`` tokens (until those have arrived nothing is
compressed); every later block on the mean of the block before it, accumulated from the exact
tokens as they are compressed, so the mean follows keys that drift over a long context (on Gemma 3
270M's global layers a fixed mean removes 0-58% of the key energy over 16K tokens, a
per-1024-token mean 23-68%). ``center_block=0``: one mean for everything.

Tiers (``tiers=n``, keys): when the first mean is taken, each head's channels are ordered by their
variance over the centring tokens and the bits spread over n tiers (``turboquant.tiers``).

Storage: one (B, H, capacity, words) uint32 array per codebook group and the float16 norms
tier-major, (blocks, B, H, capacity), so attention can hand one block's norms to
``mx.quantized_matmul`` as its scales without a strided copy. Storage grows in chunks of ``step`` tokens, so appending a token costs the same at 1K and at 256K
tokens. ``append`` returns an immutable ``StreamView``: what attention reads.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace

import mlx.core as mx
import numpy as np

from turboquant.codec import CodecSpec, Encoded, encode, slice_encoded
from turboquant.tiers import plan_tiers, tiers_fit

# running sums over at most this many tokens (or 2 max_rewind + 1: a checkpoint's distance to
# the end of a speculative draft) are added one token at a time
_FOLD = 64


class TrimError(ValueError):
    """A trim further back than the exact tokens reach: it could not restore the state exactly."""


@dataclass(frozen=True)
class Layout:
    """Which positions are read exact and which compressed; shared by a layer's K and V."""

    sink: int = 0  # first tokens kept exact
    fp_window: int = 0  # each query's most recent tokens read exact
    max_rewind: int = 32  # tokens past the window kept exact too: the exact-trim budget
    center: int = 0  # tokens after the sink whose mean centres the first block (0: no centring)
    center_block: int = 0  # tokens per mean (0: one mean for all)

    def __post_init__(self):
        for name in ("sink", "fp_window", "max_rewind", "center", "center_block"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.center_block and not self.center:
            raise ValueError("center_block needs center > 0 (the first block's mean)")
        if self.center_block and self.center > self.center_block:
            raise ValueError(
                f"center ({self.center}) must be <= center_block ({self.center_block})"
            )

    def compressed_end(self, offset: int) -> int:
        """End of the compressed positions once ``offset`` tokens have arrived: everything older
        than the newest query's window, once the first mean is known."""
        n_sink = min(self.sink, offset)
        if offset < self.sink + self.center:
            return n_sink
        return max(n_sink, offset - self.fp_window)

    def exact_from(self, q_pos: mx.array) -> mx.array:
        """(L,) first position each query reads exact besides the sink (0: all of them, before
        the mean the codes refer to is known)."""
        return mx.where(q_pos < self.sink + self.center, 0, q_pos - self.fp_window)

    def first_exact(self, t: int) -> int:
        """``exact_from`` of one query position, as a number."""
        return 0 if t < self.sink + self.center else t - self.fp_window

    def block_of(self, position: int) -> int:
        """Index of the mean that centres the compressed token at ``position``."""
        return (position - self.sink) // self.center_block if self.center_block else 0


@dataclass(frozen=True)
class StreamView:
    """A stream at one moment, for attention: exact sink, codes, exact tail, means."""

    spec: CodecSpec
    layout: Layout
    offset: int  # tokens so far (a call's queries are the last ones)
    n_quantized: int  # positions [n_sink, n_quantized) are in ``codes``
    sink: mx.array | None  # (B, H, n_sink, D)
    codes: Encoded | None  # (B, H, capacity, ...), storage index = position - n_sink; its
    # norms tier-major: (blocks, B, H, capacity)
    tail: mx.array  # (B, H, offset - tail_start, D)
    tail_start: int
    means: mx.array | None  # (B, H, blocks, D)
    order: mx.array | None  # (H, D) channel order of the codes (tiers)

    @property
    def n_sink(self) -> int:
        return 0 if self.sink is None else self.sink.shape[2]

    @property
    def shape(self) -> tuple[int, ...]:  # like a (B, H, tokens, D) key array
        return (*self.tail.shape[:2], self.offset, self.spec.dim)

    @property
    def capacity(self) -> int:
        """Storage slots (live ones: positions [n_sink, n_quantized); the rest are masked)."""
        return 0 if self.codes is None else self.codes.norms.shape[-1]

    def block(self, start: int, stop: int) -> Encoded:
        """Codes of positions [start, stop), norms (B, H, T, blocks) as ``encode`` gives them."""
        return _token_major(self.codes, slice(start - self.n_sink, stop - self.n_sink))

    def to_code_order(self, x: mx.array, inverse: bool = False) -> mx.array:
        return code_order(x, self.order, inverse)


def code_order(x: mx.array, order: mx.array | None, inverse: bool = False) -> mx.array:
    """(B, H, T, D) with each head's channels in ``order`` (H, D), the order of the codes
    (``inverse``: back to the model's order); ``order`` None: unchanged."""
    if order is None:
        return x
    if inverse:
        order = mx.argsort(order, axis=-1)
    return mx.take_along_axis(x, mx.broadcast_to(order[None, :, None, :], x.shape), axis=-1)


def _storage_like(enc: Encoded, capacity: int) -> Encoded:
    """Zero storage for ``capacity`` tokens with the fields of ``enc`` (B, H, T, ...), norms
    tier-major (blocks, B, H, capacity)."""

    def grow(a: mx.array | None):
        return None if a is None else mx.zeros((*a.shape[:2], capacity, *a.shape[3:]), a.dtype)

    B, H, _, blocks = enc.norms.shape
    norms = mx.zeros((blocks, B, H, capacity), enc.norms.dtype)
    return Encoded(tuple(grow(c) for c in enc.codes), norms, grow(enc.signs), grow(enc.res_norms))


def _concat_storage(a: Encoded, b: Encoded) -> Encoded:
    def cat(x, y, axis=2):
        return None if x is None else mx.concatenate([x, y], axis=axis)

    return Encoded(
        tuple(cat(x, y) for x, y in zip(a.codes, b.codes)),
        cat(a.norms, b.norms, -1),
        cat(a.signs, b.signs),
        cat(a.res_norms, b.res_norms),
    )


def _assign(store: Encoded, new: Encoded, start: int) -> None:
    end = start + new.norms.shape[2]
    for dst, src in zip(store.codes, new.codes):
        dst[:, :, start:end] = src
    store.norms[..., start:end] = mx.moveaxis(new.norms, -1, 0)
    if store.signs is not None:
        store.signs[:, :, start:end] = new.signs
        store.res_norms[:, :, start:end] = new.res_norms


def _token_major(store: Encoded, tokens: slice) -> Encoded:
    """Storage slots ``tokens`` as ``encode`` lays them out (norms (B, H, T, blocks))."""
    enc = slice_encoded(store, (slice(None), slice(None), tokens))
    return replace(enc, norms=mx.moveaxis(store.norms[..., tokens], 0, -1))


class CompressedStream:
    """One tensor (B, H, T, D), compressed lazily behind an exact window, exactly trimmable."""

    step = 256

    def __init__(
        self,
        spec: CodecSpec,
        layout: Layout,
        tiers: int = 0,
        exact_dtype: mx.Dtype | None = None,
    ):
        if tiers and not layout.center:
            raise ValueError("key_tiers needs center > 0 (the centring tokens order the channels)")
        if tiers and not tiers_fit(spec.dim, tiers, spec.grid):
            raise ValueError(
                f"key_tiers must be >= 2 (0: off), 2^key_tiers must divide the head dim and leave "
                f">= 4 channels a tier (uniform grid: a multiple of 32): {tiers} tiers of "
                f"{spec.dim}"
            )
        self.base_spec = self.spec = spec  # spec gets its tiers with the first mean
        self.layout, self.tiers, self.exact_dtype = layout, tiers, exact_dtype
        self.offset = 0
        self.n_quantized = 0
        self.sink: mx.array | None = None  # (B, H, <= sink, D)
        self.codes: Encoded | None = None  # (B, H, capacity, ...)
        self.tail: mx.array | None = None  # (B, H, offset - tail_start, D) exact
        self.tail_start = 0
        self.means: mx.array | None = None  # (B, H, blocks, D), the exact tokens' dtype
        # float32 (B, H, 1, D), the checkpoint: the sum of the exact tokens of the block of
        # position tail_start - 1 up to it, [block start, tail_start); None: none needed (no
        # block means, or no token dropped from the tail yet). See _running_sum.
        self.sum_base: mx.array | None = None
        self.order: mx.array | None = None  # (H, D) uint32: channels strongest first (tiers)

    def __deepcopy__(self, memo: dict) -> CompressedStream:
        """An independent copy (e.g. to branch one prefilled prompt); specs are shared."""
        new = self.__class__.__new__(self.__class__)
        for name, value in self.__dict__.items():
            shared = name in ("spec", "base_spec", "layout", "exact_dtype")
            setattr(new, name, value if shared else copy.deepcopy(value, memo))
        return new

    @property
    def n_sink(self) -> int:
        return 0 if self.sink is None else self.sink.shape[2]

    # -- appending --------------------------------------------------------------------------
    def append(self, x: mx.array) -> StreamView:
        """x (B, H, L, D): the next L tokens. Returns the view this call's queries attend."""
        if self.exact_dtype is not None:
            x = x.astype(self.exact_dtype)
        self.tail = x if self.tail is None else mx.concatenate([self.tail, x], axis=2)
        self.offset += x.shape[2]
        if self.n_sink < self.layout.sink:  # the first tokens become the exact sink
            take = min(self.layout.sink - self.n_sink, self.offset - self.tail_start)
            head, self.tail = self.tail[:, :, :take], self.tail[:, :, take:]
            self.sink = head if self.sink is None else mx.concatenate([self.sink, head], axis=2)
            self.tail_start += take
            self.n_quantized = self.tail_start
        end = self.layout.compressed_end(self.offset)
        if end > self.n_quantized:
            if self.layout.center and self.means is None:
                self._take_first_mean()
            self._compress(end)
        view = self.view()
        rewind = self.layout.max_rewind
        if self.offset - rewind >= self.layout.sink + self.layout.center:  # a trim stays past
            self._drop_exact(self.n_quantized - rewind)  # the first mean: its tokens can go
        return view

    def view(self) -> StreamView:
        return StreamView(
            self.spec, self.layout, self.offset, self.n_quantized, self.sink, self.codes,
            self.tail, self.tail_start, self.means, self.order,
        )  # fmt: skip

    def _take_first_mean(self) -> None:
        """The mean of positions [sink, sink + center), still all in the tail."""
        first = self.tail[:, :, : self.layout.center]
        self.means = mx.mean(first.astype(mx.float32), 2, True).astype(first.dtype)
        if self.tiers:
            centred = first.astype(mx.float32) - self.means.astype(mx.float32)
            var = mx.mean(centred * centred, axis=(0, 2))  # (H, D)
            order = mx.argsort(-var, axis=-1)
            energy = np.array(mx.mean(mx.take_along_axis(var, order, axis=-1), axis=0))
            tiers = plan_tiers(energy, self.spec.bits, self.tiers, self.spec.grid)
            bits = sum(n * b for n, b in tiers) / self.spec.dim  # a budget no step fit: unspent
            self.spec = replace(self.spec, bits=bits, tiers=tiers)
            self.order = order.astype(mx.uint32)

    def _compress(self, end: int) -> None:
        """Encode positions [n_quantized, end) from their exact copies in the tail."""
        x = self.tail[:, :, self.n_quantized - self.tail_start : end - self.tail_start]
        enc = encode(code_order(self._centred(x), self.order), self.spec, check_finite=False)
        first, needed = self.n_quantized - self.n_sink, end - self.n_sink  # storage indices
        capacity = 0 if self.codes is None else self.codes.norms.shape[-1]
        if needed > capacity:
            extra = _storage_like(enc, -(-(needed - capacity) // self.step) * self.step)
            self.codes = extra if self.codes is None else _concat_storage(self.codes, extra)
        _assign(self.codes, enc, first)
        self.n_quantized = end

    def _centred(self, x: mx.array) -> mx.array:
        """x (positions [n_quantized, +L)) minus each token's block mean; complete blocks' means
        join ``means`` as their last token passes (each centres the next block)."""
        if self.means is None:
            return x
        block = self.layout.center_block
        if not block:
            return x.astype(mx.float32) - self.means
        parts, pos, lo = [], self.n_quantized, 0
        while lo < x.shape[2]:
            b = self.layout.block_of(pos)
            hi = min(x.shape[2], lo + self.layout.sink + (b + 1) * block - pos)
            seg = x[:, :, lo:hi].astype(mx.float32)
            parts.append(seg - self.means[:, :, b : b + 1])
            pos, lo = pos + hi - lo, hi
            if self.layout.block_of(pos) > b:  # block b complete: its mean centres block b + 1
                mean = (self._running_sum(pos) / block).astype(self.means.dtype)
                self.means = mx.concatenate([self.means, mean], axis=2)
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=2)

    def _running_sum(self, p: int) -> mx.array:
        """float32 (B, H, 1, D): the sum of the exact tokens of position p - 1's block up to it,
        [block start, p), for ``tail_start <= p`` (a complete block's sum at its end). Replayed
        from the checkpoint ``sum_base`` (or from the block start, if the block began at or after
        tail_start) over the exact tail copies. Short spans are added one token at a time, so
        the sum at p is the same left fold whichever checkpoint it started from: a trimmed stream
        and one that never saw the trimmed tokens agree bit for bit. Longer spans (a long prompt
        chunk) are summed at once."""
        start = self.layout.sink + self.layout.block_of(p - 1) * self.layout.center_block
        base, lo = (None, start) if start >= self.tail_start else (self.sum_base, self.tail_start)
        x = self.tail[:, :, lo - self.tail_start : p - self.tail_start].astype(mx.float32)
        if x.shape[2] > max(_FOLD, 2 * self.layout.max_rewind + 1):
            total = mx.sum(x, axis=2, keepdims=True)
            return total if base is None else base + total
        for i in range(x.shape[2]):
            base = x[:, :, i : i + 1] if base is None else base + x[:, :, i : i + 1]
        return base

    def _drop_exact(self, start: int) -> None:
        """Forget exact copies before ``start``, past the rewind budget; the running-sum
        checkpoint moves to ``start`` first (from the copies about to go)."""
        if start > self.tail_start:
            if self.layout.center_block and self.means is not None:
                self.sum_base = self._running_sum(start)
            self.tail = self.tail[:, :, start - self.tail_start :]
            self.tail_start = start

    def running_sum(self) -> mx.array | None:
        """float32 (B, H, 1, D): the current block's sum over its compressed tokens so far (None:
        no block means)."""
        if not (self.layout.center_block and self.means is not None):
            return None
        return self._running_sum(self.n_quantized)

    # -- trimming ---------------------------------------------------------------------------
    def can_trim(self, n: int) -> bool:
        """Whether the last ``n`` tokens can be dropped with the state restored exactly: up to
        ``max_rewind`` of them (every token compressed after offset - n still has its exact copy
        then), or all of them."""
        return n <= self.layout.max_rewind or n >= self.offset

    def trim(self, n: int) -> int:
        n = min(n, self.offset)
        if not self.can_trim(n):
            raise TrimError(
                f"cannot trim {n} of {self.offset} tokens exactly: compressed tokens keep exact "
                f"copies for max_rewind={self.layout.max_rewind} tokens past the exact window"
            )
        new = self.offset - n
        end = self.layout.compressed_end(new)
        assert new <= self.n_sink or end >= self.tail_start, "exact copies dropped too early"
        if new < self.n_sink:
            self.sink = self.sink[:, :, :new]
        self.tail = self.tail[:, :, : max(new - self.tail_start, 0)]
        self.tail_start = min(self.tail_start, new)
        # the checkpoint (at tail_start, which stays unless everything past the sink goes) holds
        if self.means is not None and new < self.layout.sink + self.layout.center:
            self.means = self.sum_base = self.order = None  # back before the first mean
            self.spec = self.base_spec
        elif self.means is not None and self.layout.center_block:
            self.means = self.means[:, :, : self.layout.block_of(end) + 1]
        self.n_quantized, self.offset = end, new  # codes past n_quantized are dead storage
        return n

    # -- size, save, load -------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes actually allocated: compressed storage (with its growth slack) + the rest."""
        total = 0 if self.codes is None else self.codes.nbytes
        for a in (self.sink, self.tail, self.means, self.sum_base, self.order):
            total += 0 if a is None else a.nbytes
        return total

    @property
    def state(self) -> dict:
        """A nested dict of arrays, numbers and strings (mlx-lm's prompt-cache files hold it)."""
        codes = None
        if self.codes is not None:
            enc = _token_major(self.codes, slice(0, self.n_quantized - self.n_sink))
            codes = {"codes": list(enc.codes), "norms": enc.norms}  # (B, H, T, blocks)
            codes.update(signs=enc.signs, res_norms=enc.res_norms)
        dtype = "" if self.exact_dtype is None else str(self.exact_dtype).split(".")[-1]
        meta = {
            "offset": self.offset,
            "n_quantized": self.n_quantized,
            "tail_start": self.tail_start,
            "tiers": self.tiers,
            "exact_dtype": dtype,
            "spec": json.dumps(asdict(self.spec)),
            "base_spec": json.dumps(asdict(self.base_spec)),
        }
        arrays = {
            "sink": self.sink,
            "tail": self.tail,
            "means": self.means,
            "sum_base": self.sum_base,
        }
        return {"meta": meta, "codes": codes, "order": self.order, **arrays}

    @classmethod
    def from_state(cls, state: dict, layout: Layout) -> CompressedStream:
        meta = state["meta"]
        dtype = meta["exact_dtype"]
        new = cls(
            CodecSpec(**json.loads(meta["base_spec"])),
            layout,
            int(meta["tiers"]),
            getattr(mx, dtype) if dtype else None,
        )
        new.spec = CodecSpec(**json.loads(meta["spec"]))
        new.offset, new.n_quantized = int(meta["offset"]), int(meta["n_quantized"])
        new.tail_start = int(meta["tail_start"])
        if state.get("codes"):
            c = state["codes"]
            new.codes = Encoded(
                tuple(c["codes"]),
                mx.contiguous(mx.moveaxis(c["norms"], -1, 0)),  # tier-major (see the top)
                c.get("signs"),
                c.get("res_norms"),
            )
        for name in ("sink", "tail", "means", "sum_base", "order"):
            setattr(new, name, state.get(name))
        old = state.get("sums")  # files written with a sum after each rewind token: the one
        if old is not None and new.sum_base is None:  # after position tail_start - 1, if kept
            if old.shape[2] == new.n_quantized - new.tail_start + 1:
                new.sum_base = old[:, :, :1]
        return new
