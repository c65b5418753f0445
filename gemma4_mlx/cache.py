"""The cache plan: which KV cache each decoder layer gets, from the config and a KV policy.

One function decides it for every variant. KV-shared consumer layers get nothing (they read
their producer's keys/values, compressed or not: quantized once, never twice). Sliding layers get
the exact keys/values of their last ``sliding_window`` - 1 + ``max_rewind`` tokens (bounded memory,
exactly trimmable; REFERENCE.md measured that quantizing them costs quality for little memory).
Global layers, which hold nearly all KV memory at long
context, get what the policy says:

- ``fp16``: mlx-lm's KVCache in the model's dtype (bf16 / fp16 / fp32: the name is historical);
- ``affine``: mlx-lm's QuantizedKVCache (group-wise affine, ``bits`` 2..8), for comparison;
- ``turboquant``: our TurboQuantKVCache with separate key and value bits (keys decide quality on
  Gemma: the default average of 2.5 code bits is K3/V2), the first ``sink`` tokens and each
  query's ``fp_window`` most recent tokens read exact, keys and values centred on the mean of
  the ``center`` tokens after the sink (and, with ``center_block``, each later block of that
  many tokens on the mean of the block before it), key channels in ``key_tiers`` tiers by their
  variance over the centring tokens (strong channels get more of the key bits), codec ``mse``
  (with norm correction) or ``prod`` (MSE at b-1 bits + 1-bit QJL residual). The defaults are
  what benchmarks/quality.py and needle.py chose on real weights (README: the rule and the
  numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models.cache import KVCache, QuantizedKVCache

from gemma4_mlx.config import LayerSpec, TextConfig
from gemma4_mlx.errors import UserError
from gemma4_mlx.kv.cache import DEFAULT_MAX_REWIND, SlidingKVCache
from turboquant.tiers import tiers_fit

KV_KINDS = ("fp16", "affine", "turboquant")
# Average bits -> (key bits, value bits): keys get the bits (measured on Gemma 3 270M weights).
DEFAULT_BITS = 2.5  # K3/V2 with key tiers (README: stored bits/channel with everything counted)
DEFAULT_SPLITS = {
    2.5: (3, 2),
    3.0: (4, 2),
    3.25: (4.5, 2),
    3.5: (5, 2),
    4.0: (5, 3),
    4.5: (5, 4),
    5.0: (6, 4),
    6.0: (7, 5),
    8.0: (8, 8),
}


DEFAULT_TIERS = 4  # key channel tiers (measured on Gemma 3 270M weights: README)


@dataclass(frozen=True)
class KVPolicy:
    kind: str = "fp16"
    bits: float | None = None  # average of key and value bits (turboquant) or affine bits
    key_bits: float | None = None
    value_bits: float | None = None
    codec: str = "mse"  # turboquant: "mse" | "prod"
    fp_window: int = 32  # turboquant: each query's most recent tokens read exact
    sink: int = 4  # turboquant: the first tokens kept exact (Gemma's attention sink)
    exact_dtype: str | None = None  # turboquant: storage of exact tokens (None: model dtype)
    center: int = 128  # turboquant: the mean of this many tokens after the sink centres the codes
    center_block: int = 512  # turboquant: a new mean every this many tokens (0: one mean)
    # turboquant: key channels in this many tiers by their variance (0: off; None: DEFAULT_TIERS
    # where they fit: centring on, mse codec, head dim divisible by 2^tiers, >= 4 channels a tier)
    key_tiers: int | None = None
    keep_layers: tuple[int, ...] = field(default=())  # layers kept in full precision
    group_size: int = 64  # affine
    seed: int = 0
    # sliding and turboquant layers: a trim of up to this many tokens restores the cache
    # exactly (speculative drafts, prompt-prefix reuse); longer trims raise TrimError
    max_rewind: int = DEFAULT_MAX_REWIND

    def __post_init__(self):
        if self.kind not in KV_KINDS:
            raise UserError(f"--kv-cache must be one of {', '.join(KV_KINDS)}, got {self.kind!r}")
        if self.codec not in ("mse", "prod"):
            raise UserError(f"--kv-codec must be 'mse' or 'prod', got {self.codec!r}")
        if self.fp_window < 0:
            raise UserError(f"--kv-window must be >= 0, got {self.fp_window}")
        if self.exact_dtype not in (None, "float16", "bfloat16", "float32"):
            raise UserError(f"exact_dtype must be float16, bfloat16 or float32: {self.exact_dtype}")
        if self.sink < 0:
            raise UserError(f"--kv-sink must be >= 0, got {self.sink}")
        if self.max_rewind < 0:
            raise UserError(f"max_rewind must be >= 0, got {self.max_rewind}")
        if self.center < 0:
            raise UserError(f"--kv-center must be >= 0, got {self.center}")
        if self.center_block < 0:
            raise UserError(f"--kv-center-block must be >= 0, got {self.center_block}")
        if not self.center:  # centring off: no blocks either
            object.__setattr__(self, "center_block", 0)
        if self.center_block and self.center > self.center_block:
            raise UserError(
                f"--kv-center ({self.center}) must be <= --kv-center-block "
                f"({self.center_block}; 0 for one mean)"
            )
        if self.key_tiers and not 2 <= self.key_tiers <= 5:
            raise UserError(f"--kv-key-tiers must be 0 (off) or 2..5, got {self.key_tiers}")
        if self.key_tiers and (not self.center or self.codec != "mse"):
            raise UserError(
                "--kv-key-tiers needs centring (--kv-center > 0: its tokens order the channels) "
                "and the mse codec"
            )
        if self.kind == "affine" and self.resolved_bits()[0] not in (2, 3, 4, 5, 6, 8):
            raise UserError(
                f"--kv-bits for the affine cache must be 2, 3, 4, 5, 6 or 8, got {self.bits}"
            )
        if self.kind == "turboquant":
            low, high = (2, 9) if self.codec == "prod" else (1, 8)
            for name, b in zip(("--key-bits", "--value-bits"), self.resolved_bits()):
                if not low <= b <= high or (b * 2) != int(b * 2):
                    raise UserError(f"{name} must be in {low}..{high} in steps of 0.5, got {b}")

    def resolved_bits(self) -> tuple[float, float]:
        """(key bits, value bits)."""
        if self.kind == "affine":
            b = self.bits if self.bits is not None else 4
            return b, b
        avg = self.bits if self.bits is not None else DEFAULT_BITS
        if self.bits is not None and not 1 <= self.bits <= 8:
            raise UserError(f"--kv-bits must be in 1..8, got {self.bits}")
        k_default, v_default = DEFAULT_SPLITS.get(float(avg), (avg, avg))
        key = (
            self.key_bits
            if self.key_bits is not None
            else (2 * avg - self.value_bits if self.value_bits is not None else k_default)
        )
        value = (
            self.value_bits
            if self.value_bits is not None
            else (2 * avg - self.key_bits if self.key_bits is not None else v_default)
        )
        return float(key), float(value)

    @property
    def nominal_tiers(self) -> int:
        """Key tiers this policy asks for (a layer with a small head dim may get fewer)."""
        if self.key_tiers is not None:
            return self.key_tiers
        on = self.kind == "turboquant" and self.center and self.codec == "mse"
        return DEFAULT_TIERS if on else 0

    def tiers_for(self, head_dim: int) -> int:
        """Key tiers for a layer of ``head_dim``: the policy's, or by default the most (up to
        DEFAULT_TIERS) that fit (head dim divisible by 2^tiers, >= 4 channels a tier)."""
        n = self.nominal_tiers
        if self.key_tiers is None:
            while n and not tiers_fit(head_dim, n):
                n -= 1
            return n
        if n and not tiers_fit(head_dim, n):
            raise UserError(
                f"--kv-key-tiers {n} needs a head dim divisible by {1 << n} with >= 4 channels "
                f"a tier, got {head_dim}"
            )
        return n

    def describe(self) -> str:
        if self.kind == "fp16":
            return "fp16 (model dtype)"
        if self.kind == "affine":
            return f"affine {self.resolved_bits()[0]:g}-bit (group {self.group_size})"
        k, v = self.resolved_bits()
        centre = f"centred on {self.center} tokens" if self.center else "uncentred"
        if self.center_block:
            centre += f", then on each previous block of {self.center_block}"
        tiers = f", keys in {self.nominal_tiers} channel tiers" if self.nominal_tiers else ""
        return (
            f"turboquant {self.codec} K{k:g}/V{v:g}{tiers}, {self.sink} first and "
            f"{self.fp_window} recent tokens exact, {centre}"
        )


def cache_layers(config: TextConfig) -> list[LayerSpec]:
    """The layers that own a cache (all but KV-shared consumers), in order."""
    return [spec for spec in config.layers if not spec.is_kv_shared]


def make_layer_cache(config: TextConfig, spec: LayerSpec, policy: KVPolicy) -> Any:
    if spec.is_sliding:
        return SlidingKVCache(config.sliding_window, policy.max_rewind)
    if policy.kind == "fp16" or spec.index in policy.keep_layers:
        return KVCache()
    if policy.kind == "affine":
        group = policy.group_size if spec.head_dim % policy.group_size == 0 else 32
        if spec.head_dim % group:
            raise UserError(
                f"the affine KV cache needs head_dim divisible by 32, got {spec.head_dim}"
            )
        return QuantizedKVCache(group_size=group, bits=int(policy.resolved_bits()[0]))
    from gemma4_mlx.kv.cache import TurboQuantKVCache
    from turboquant.codec import CodecSpec

    key_bits, value_bits = policy.resolved_bits()
    seed = policy.seed + spec.index
    norm_correction = policy.codec == "mse"
    try:
        key_spec = CodecSpec(spec.head_dim, key_bits, policy.codec, norm_correction, seed=seed)
        value_spec = CodecSpec(spec.head_dim, value_bits, policy.codec, norm_correction, seed=seed)
    except ValueError as e:
        raise UserError(f"KV cache settings: {e}") from None
    import mlx.core as mx

    exact_dtype = getattr(mx, policy.exact_dtype) if policy.exact_dtype else None
    return TurboQuantKVCache(
        key_spec,
        value_spec,
        fp_window=policy.fp_window,
        sink=policy.sink,
        exact_dtype=exact_dtype,
        center=policy.center,
        center_block=policy.center_block,
        key_tiers=policy.tiers_for(spec.head_dim),
        max_rewind=policy.max_rewind,
    )


def make_cache(config: Any, policy: KVPolicy | dict | None = None) -> list[Any]:
    """One cache per cache-owning layer. ``config`` is a TextConfig or a model with ``.config``."""
    if not isinstance(config, TextConfig):
        config = config.config
    if policy is None:
        policy = KVPolicy()
    elif isinstance(policy, dict):
        policy = KVPolicy(**policy)
    return [make_layer_cache(config, spec, policy) for spec in cache_layers(config)]
