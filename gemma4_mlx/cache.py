"""The cache plan: which KV cache each decoder layer gets, from the config and a KV policy.

One function decides it for every variant. KV-shared consumer layers get nothing (they read
their producer's keys/values, compressed or not: quantized once, never twice). Sliding layers get
the exact keys/values of their last ``sliding_window`` - 1 + ``max_rewind`` tokens (bounded memory,
exactly trimmable; on Gemma 3 270M quantizing them cost quality for little memory). Global
layers, which hold nearly all KV memory at long context, get what the policy says:

- ``exact``: mlx-lm's KVCache, in the model's dtype (float32 / bfloat16 / float16: whatever the
  weights compute in; ``describe(dtype)`` names it). ``fp16`` is accepted as an old name for it;
- ``affine:B``: mlx-lm's QuantizedKVCache (group-wise affine, B in 2..8 bits), for comparison;
- ``turboquant``: our TurboQuantKVCache with separate key and value bits (keys decide quality on
  Gemma: the default K3.125/V2 with the uniform grid), the first ``sink`` tokens and each
  query's ``window`` most recent tokens read exact, keys and values centred on the mean of the ``center`` tokens after the sink
  (and, with ``block``, each later block of that many tokens on the mean of the block before it),
  key channels in up to ``tiers`` tiers by their variance over the centring tokens (strong
  channels get more of the key bits), codec ``mse`` (with norm correction) or ``prod`` (MSE at
  b-1 bits + 1-bit QJL residual), and the scalar grid of the MSE codes: ``grid=lloyd``
  (Lloyd-Max codebooks, read by decoding each block) or ``grid=uniform`` (the MSE-optimal
  uniform grid, read in place by ``mx.quantized_matmul``; its tier plans are ones qmm takes,
  and codes it cannot take, 1 or 7 bits or groups of other than 32, 64 or 128 channels (a head
  dim not a multiple of 32), are read by decoding them, as Lloyd-Max codes are). With key tiers
  the key bits go in steps of 1/8 (the tier planner spends them), else in steps of 0.5. The defaults are what benchmarks/quality.py and needle.py chose
  on real weights (README: the rule and the numbers).

Exact attention (``attention=``, every kind: the sliding layers, the exact global cache): ``sdpa``
(mlx-lm's path, ``mx.fast.scaled_dot_product_attention``), ``grouped`` (one matmul per kv head
with its query heads as rows: on the CPU 1.9-4.5x faster for a decode step's attention
(benchmarks/attention.py), 1.03-1.2x for the demo model's whole decode step and about equal for
prefill (benchmarks/speed.py), because MLX's CPU SDPA runs one matrix-vector product per query
head) or ``auto`` (grouped on the CPU, the fused SDPA kernel on a GPU). TurboQuant's own
exact tokens are always read grouped.

A policy has one text form, ``str(policy)``, which ``KVPolicy.parse`` reads back (the CLI's
``--kv SPEC``, benchmark setting names, prompt-cache files)::

    exact
    affine:4                     (group=64 unless said)
    turboquant:k3.125,v2,tiers=4,sink=4,window=32,center=128,block=512,codec=mse,grid=uniform

``parse`` also takes the short forms a person types: ``turboquant`` (every default),
``turboquant:3.5`` (an average of 3.5 bits split as DEFAULT_SPLITS says: K5/V2),
``turboquant:k4,window=64`` (the rest default). Every check lives in ``KVPolicy.__post_init__``
and raises ``KVPolicyError`` (a ValueError) naming the field.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, fields
from typing import Any

from mlx_lm.models.cache import KVCache, QuantizedKVCache

from gemma4_mlx.config import LayerSpec, TextConfig
from gemma4_mlx.errors import UserError
from gemma4_mlx.kv.cache import DEFAULT_MAX_REWIND, SlidingKVCache
from turboquant.codebook import GRIDS
from turboquant.tiers import tiers_fit

KV_KINDS = ("exact", "affine", "turboquant")
KIND_ALIASES = {"fp16": "exact"}  # the old name of the exact cache (it was never only fp16)
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
DEFAULT_AFFINE_BITS = 4
AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # what mlx's affine quantization packs
DEFAULT_TIERS = 4  # key channel tiers (measured on Gemma 3 270M weights: README)
EXACT_DTYPES = ("float16", "bfloat16", "float32")
# The uniform grid, read in place by mx.quantized_matmul (1.7-3.9x Lloyd-Max's decode speed on
# this CPU), with 1/8 more key bit where key tiers apply: quality.py --long and needle.py found
# it within the rule (+0.2 points of perplexity, 10% KL, needle equal) of Lloyd-Max K3 (README)
DEFAULT_GRID = "uniform"
DEFAULT_UNIFORM_KEY_BITS = 3.125  # the default key bits with the uniform grid and key tiers
ATTENTION_FORMS = ("sdpa", "grouped", "auto")  # exact attention (the module docstring)
DEFAULT_ATTENTION = "sdpa"  # mlx-lm's: the baseline the benchmarks compare with

# The text form's keys -> (field, the kinds it applies to). Bits are spelled k3/v2 (turboquant)
# or as a bare number (the affine bits; a turboquant average). Order = the canonical order.
# A new setting: its field in KVPolicy, a row here, and (if a count) a name in COUNTS.
SPEC_KEYS = {
    "k": ("key_bits", ("turboquant",)),
    "v": ("value_bits", ("turboquant",)),
    "tiers": ("key_tiers", ("turboquant",)),
    "sink": ("sink", ("turboquant",)),
    "window": ("fp_window", ("turboquant",)),
    "center": ("center", ("turboquant",)),
    "block": ("center_block", ("turboquant",)),
    "codec": ("codec", ("turboquant",)),
    "grid": ("grid", ("turboquant",)),
    "exact": ("exact_dtype", ("turboquant",)),
    "seed": ("seed", ("turboquant",)),
    "group": ("group_size", ("affine",)),
    "rewind": ("max_rewind", ("exact", "affine", "turboquant")),
    "attention": ("attention", ("exact", "affine", "turboquant")),
}
FIELD_KEYS = {field: key for key, (field, _) in SPEC_KEYS.items()}
COUNTS = ("fp_window", "sink", "center", "center_block", "seed")  # whole numbers >= 0
QUIET = {
    "exact_dtype": None,
    "seed": 0,
    "max_rewind": DEFAULT_MAX_REWIND,
    "attention": DEFAULT_ATTENTION,
}  # left out of the text form at these values


class KVPolicyError(UserError):
    """A bad KV policy setting: ``field`` is the KVPolicy field, ``key`` its name in the text
    form (both in the message), ``reason`` the message without the names (the CLI prefixes the
    flag it came from)."""

    def __init__(self, field: str, reason: str):
        self.field, self.key, self.reason = field, FIELD_KEYS.get(field, field), reason
        name = self.key if self.key == field else f"{self.key} ({field})"
        super().__init__(f"KV policy {name}: {reason}")


def _number(key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise KVPolicyError(SPEC_KEYS.get(key, (key,))[0], f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise KVPolicyError(SPEC_KEYS.get(key, (key,))[0], f"not a finite number: {text!r}")
    return value


def _integer(field: str, value: Any) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise KVPolicyError(field, f"must be a whole number, got {value!r}")
    return int(value)


def _default_grid(codec: str) -> str:
    return DEFAULT_GRID if codec == "mse" else "lloyd"


def _half_steps(bits: float) -> bool:
    return float(bits * 2).is_integer()


@dataclass(frozen=True)
class KVPolicy:
    """Which KV cache the global layers get (see the module docstring); frozen and hashable.

    Bits are stored one way, ``key_bits`` and ``value_bits`` (equal for affine, None for exact);
    ``bits=`` is a constructor shorthand: the affine bits, or a TurboQuant average split as
    DEFAULT_SPLITS says (``bits=3.5`` -> K5/V2; with ``key_bits`` the value bits make up the
    average). Options a kind does not use are refused, never ignored."""

    kind: str = "exact"
    key_bits: float | None = None
    value_bits: float | None = None
    codec: str = "mse"  # turboquant: "mse" | "prod"
    # turboquant: "lloyd" | "uniform" (the module docstring). None: the default, DEFAULT_GRID
    # for the mse codec, lloyd for prod (the uniform grid is for the mse codec only)
    grid: str | None = None
    fp_window: int = 32  # turboquant: each query's most recent tokens read exact
    sink: int = 4  # turboquant: the first tokens kept exact (Gemma's attention sink)
    exact_dtype: str | None = None  # turboquant: storage of exact tokens (None: model dtype)
    center: int = 128  # turboquant: the mean of this many tokens after the sink centres the codes
    center_block: int = 512  # turboquant: a new mean every this many tokens (0: one mean)
    # turboquant: key channels in up to this many tiers by their variance (0: off; a layer gets
    # the most that fit its head dim: divisible by 2^tiers, >= 4 channels a tier, uniform
    # grid: a multiple of 32). None: the
    # default, DEFAULT_TIERS where tiers apply (centring on, mse codec), else 0.
    key_tiers: int | None = None
    group_size: int = 64  # affine
    seed: int = 0  # turboquant: rotation seed (each layer adds its index)
    # sliding and turboquant layers: a trim of up to this many tokens restores the cache
    # exactly (speculative drafts, prompt-prefix reuse); longer trims raise TrimError
    max_rewind: int = DEFAULT_MAX_REWIND
    attention: str = DEFAULT_ATTENTION  # exact attention: "sdpa" | "grouped" | "auto"
    bits: InitVar[float | None] = None

    def __post_init__(self, bits: float | None) -> None:
        kind = KIND_ALIASES.get(self.kind, self.kind)
        if kind not in KV_KINDS:
            raise KVPolicyError("kind", f"must be one of {', '.join(KV_KINDS)}, got {self.kind!r}")
        set_ = object.__setattr__
        set_(self, "kind", kind)
        self._refuse_unused(bits)
        rewind = _integer("max_rewind", self.max_rewind)
        if rewind < 0:
            raise KVPolicyError("max_rewind", f"must be >= 0, got {rewind}")
        set_(self, "max_rewind", rewind)
        if self.attention not in ATTENTION_FORMS:
            raise KVPolicyError(
                "attention", f"must be {', '.join(ATTENTION_FORMS)}, got {self.attention!r}"
            )
        if kind == "exact":
            return
        if kind == "affine":
            self._check_affine(bits)
            return
        self._check_turboquant(bits)

    def _refuse_unused(self, bits: float | None) -> None:
        """Options the kind does not use, set to anything but their default, are errors."""
        if self.kind == "exact" and (bits, self.key_bits, self.value_bits) != (None, None, None):
            raise KVPolicyError(
                "bits", "the exact cache has no bits (choose affine or turboquant to quantize)"
            )
        if self.kind == "affine" and (self.key_bits, self.value_bits) != (None, None):
            if bits is not None or self.key_bits != self.value_bits:
                raise KVPolicyError(
                    "key_bits", "separate key and value bits need the turboquant cache"
                )
        defaults = {f.name: f.default for f in fields(self)}
        for name, kinds in SPEC_KEYS.values():
            if name in ("key_bits", "value_bits") or self.kind in kinds:
                continue
            if getattr(self, name) != defaults[name]:
                raise KVPolicyError(name, f"applies to {' and '.join(kinds)} only, not {self.kind}")

    def _check_affine(self, bits: float | None) -> None:
        if bits is None:
            bits = self.key_bits if self.key_bits is not None else DEFAULT_AFFINE_BITS
        if bits not in AFFINE_BITS:
            raise KVPolicyError(
                "bits",
                f"must be one of {', '.join(map(str, AFFINE_BITS))} for the affine cache, "
                f"got {bits:g}",
            )
        if self.group_size not in (32, 64, 128):
            raise KVPolicyError("group_size", f"must be 32, 64 or 128, got {self.group_size}")
        object.__setattr__(self, "key_bits", int(bits))
        object.__setattr__(self, "value_bits", int(bits))

    def _check_turboquant(self, bits: float | None) -> None:
        set_ = object.__setattr__
        if self.codec not in ("mse", "prod"):
            raise KVPolicyError("codec", f"must be mse or prod, got {self.codec!r}")
        for name in COUNTS:
            value = _integer(name, getattr(self, name))
            if value < 0:
                raise KVPolicyError(name, f"must be >= 0, got {value}")
            set_(self, name, value)
        if self.exact_dtype not in (None, *EXACT_DTYPES):
            raise KVPolicyError(
                "exact_dtype", f"must be {', '.join(EXACT_DTYPES)}, got {self.exact_dtype!r}"
            )
        if not self.center:  # centring off: no blocks either
            set_(self, "center_block", 0)
        if self.center_block and self.center > self.center_block:
            raise KVPolicyError(
                "center",
                f"({self.center}) must be <= block ({self.center_block}; block=0 for one mean)",
            )
        if self.grid is None:
            set_(self, "grid", _default_grid(self.codec))
        if self.grid not in GRIDS:
            raise KVPolicyError("grid", f"must be {' or '.join(GRIDS)}, got {self.grid!r}")
        if self.grid == "uniform" and self.codec != "mse":
            raise KVPolicyError("grid", "uniform is for the mse codec only")
        key, value = self._split(bits)
        low, high = (2, 9) if self.codec == "prod" else (1, 8)
        tiered = self._tiered()
        for name, b in (("key_bits", key), ("value_bits", value)):
            # with key tiers the tier planner spends any multiple of 1/8 bit a channel
            eighths = name == "key_bits" and tiered
            if not low <= b <= high or not float(b * (8 if eighths else 2)).is_integer():
                steps = "1/8" if eighths else "0.5"
                raise KVPolicyError(name, f"must be {low}..{high} in steps of {steps}, got {b:g}")
            set_(self, name, int(b) if float(b).is_integer() else float(b))
        tiers = self.key_tiers
        if tiers is None:
            tiers = DEFAULT_TIERS if self.center and self.codec == "mse" else 0
        tiers = _integer("key_tiers", tiers)
        if tiers and not 2 <= tiers <= 5:
            raise KVPolicyError("key_tiers", f"must be 0 (off) or 2..5, got {tiers}")
        if tiers and (not self.center or self.codec != "mse"):
            raise KVPolicyError(
                "key_tiers",
                "need centring (center > 0: its tokens order the channels) and the mse codec; "
                "tiers=0 turns them off",
            )
        set_(self, "key_tiers", tiers)

    def _tiered(self) -> bool:
        """Whether key tiers apply (asked for or left to the default, centring on, mse codec)."""
        return bool(self.key_tiers != 0 and self.center and self.codec == "mse")

    def _split(self, bits: float | None) -> tuple[float, float]:
        """(key bits, value bits) from the average ``bits`` and/or the explicit ones."""
        if bits is None:
            k_default, v_default = DEFAULT_SPLITS[DEFAULT_BITS]
            if self.grid == "uniform" and self._tiered():
                k_default = DEFAULT_UNIFORM_KEY_BITS
            if self.key_bits is None and self.value_bits is None:
                return k_default, v_default
            return (
                self.key_bits if self.key_bits is not None else k_default,
                self.value_bits if self.value_bits is not None else v_default,
            )
        if self.key_bits is not None and self.value_bits is not None:
            raise KVPolicyError("bits", "give the average bits or both key and value bits, not all")
        if not 1 <= bits <= 8 or not (_half_steps(bits) or float(bits) in DEFAULT_SPLITS):
            splits = ", ".join(f"{b:g}" for b in DEFAULT_SPLITS if not _half_steps(b))
            raise KVPolicyError("bits", f"must be 1..8 in steps of 0.5 (or {splits}), got {bits:g}")
        if self.key_bits is not None:
            return self.key_bits, 2 * bits - self.key_bits
        if self.value_bits is not None:
            return 2 * bits - self.value_bits, self.value_bits
        return DEFAULT_SPLITS.get(float(bits), (bits, bits))

    # -- the text form -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> KVPolicy:
        """A policy from its text form (see the module docstring); ``str()`` gives it back."""
        if not isinstance(text, str):
            raise TypeError(f"a KV policy spec is a string, got {type(text).__name__}")
        kind, _, rest = text.strip().partition(":")
        options: dict[str, Any] = {"kind": kind.strip()}
        for item in (i.strip() for i in rest.split(",")) if rest.strip() else ():
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not key:
                raise KVPolicyError("spec", f"an empty or unnamed setting in {text!r}")
            if not eq and key[:1] in ("k", "v") and key[1:] and key[1:2] in "0123456789.":
                key, value = key[0], key[1:]
            elif not eq:
                key, value = "bits", key
            if key == "bits":
                options["bits"] = _number("bits", value)
                continue
            if key not in SPEC_KEYS:
                known = ", ".join(["N", "kN", "vN", *(k + "=" for k in SPEC_KEYS if len(k) > 1)])
                raise KVPolicyError(key, f"unknown setting in {text!r} (known: {known})")
            name = SPEC_KEYS[key][0]
            if name in options:
                raise KVPolicyError(name, f"given twice in {text!r}")
            if name in ("codec", "exact_dtype", "grid", "attention"):
                options[name] = value
            elif name in ("key_bits", "value_bits"):
                options[name] = _number(key, value)
            else:
                options[name] = _integer(name, _number(key, value))
        return cls(**options)

    def __str__(self) -> str:
        common = [f"rewind={self.max_rewind}"] if self.max_rewind != QUIET["max_rewind"] else []
        if self.attention != QUIET["attention"]:
            common.append(f"attention={self.attention}")
        if self.kind == "exact":
            return "exact" + (":" + ",".join(common) if common else "")
        if self.kind == "affine":
            group = [] if self.group_size == 64 else [f"group={self.group_size}"]
            return f"affine:{self.key_bits:g}" + "".join("," + i for i in group + common)
        items = [f"k{self.key_bits:g}", f"v{self.value_bits:g}"]
        for key, (name, kinds) in SPEC_KEYS.items():
            value = getattr(self, name)
            if self.kind not in kinds or name in ("key_bits", "value_bits"):
                continue
            if (
                (name in QUIET and value == QUIET[name])
                or (name == "center_block" and not self.center)
                or (name == "grid" and self.codec != "mse")  # prod: always lloyd
            ):
                continue  # a default said by leaving it out; no blocks without centring
            items.append(f"{key}={value}")
        return "turboquant:" + ",".join(items)

    # -- what make_layer_cache and the reports read ------------------------------------------
    def resolved_bits(self) -> tuple[float, float]:
        """(key bits, value bits); None, None for the exact cache."""
        return self.key_bits, self.value_bits

    @property
    def nominal_tiers(self) -> int:
        """Key tiers this policy asks for (a layer with a small head dim may get fewer)."""
        return self.key_tiers or 0

    def tiers_for(self, head_dim: int) -> int:
        """Key tiers for a layer of ``head_dim``: the most, up to the policy's, that fit (head
        dim divisible by 2^tiers, >= 4 channels a tier)."""
        n = self.nominal_tiers
        while n and not tiers_fit(head_dim, n, self.grid):
            n -= 1
        return n if n >= 2 else 0

    def exact_tokens(self) -> int:
        """The most tokens a turboquant cache holds without compressing any: the sink plus the
        window, and nothing is compressed before the centring tokens have all arrived (the
        rewind budget's exact tokens do not count: queries outside their window read codes)."""
        return self.sink + max(self.fp_window, self.center - 1)

    def describe(self, dtype: str | None = None) -> str:
        """In words; ``dtype``: the model's (the exact cache's and turboquant's exact tokens)."""
        if self.kind == "exact":
            return f"exact {dtype}" if dtype else "exact (the model's dtype)"
        if self.kind == "affine":
            return f"affine {self.key_bits:g}-bit (group {self.group_size})"
        centre = f"centred on {self.center} tokens" if self.center else "uncentred"
        if self.center_block:
            centre += f", then on each previous block of {self.center_block}"
        tiers = f", keys in {self.key_tiers} channel tiers" if self.key_tiers else ""
        exact = self.exact_dtype or dtype
        grid = "uniform grid" if self.grid == "uniform" else "Lloyd-Max codes"
        return (
            f"turboquant {self.codec} K{self.key_bits:g}/V{self.value_bits:g}{tiers}, "
            f"{self.sink} first and {self.fp_window} recent tokens exact"
            + (f" ({exact})" if exact else "")
            + f", {centre}, {grid}"
        )


def as_policy(policy: KVPolicy | str | dict | None) -> KVPolicy | None:
    """A KVPolicy from what the API accepts: a KVPolicy, its text form, a dict of fields, or
    None (None stays None: the model's bound policy)."""
    if policy is None or isinstance(policy, KVPolicy):
        return policy
    if isinstance(policy, str):
        return KVPolicy.parse(policy)
    if isinstance(policy, dict):
        return KVPolicy(**policy)
    raise TypeError(
        f"kv_policy must be a KVPolicy or its text form (e.g. 'turboquant'), "
        f"got {type(policy).__name__}"
    )


def model_dtype(model: Any) -> str:
    """The dtype the model computes in (the exact cache's), e.g. ``float32``."""
    embed = model.language_model if hasattr(model, "language_model") else model
    embed = embed.model.embed_tokens
    weight = embed.scales if hasattr(embed, "scales") else embed.weight  # quantized: the scales
    return str(weight.dtype).rsplit(".", 1)[-1]


def bind_policy(model: Any, policy: KVPolicy | str | dict | None) -> KVPolicy:
    """Make ``policy`` the model's own: ``model.make_cache()`` (and so mlx-lm's
    ``make_prompt_cache(model)``) builds it. Checked against the model's layers here."""
    policy = as_policy(policy) or KVPolicy()
    target = model.language_model if hasattr(model, "language_model") else model
    make_cache(target.config, policy)  # raises if a layer cannot take it (e.g. affine groups)
    target.kv_policy = policy
    return policy


def bound_policy(model: Any) -> KVPolicy:
    """The policy bound to ``model`` (the exact cache if none was)."""
    target = model.language_model if hasattr(model, "language_model") else model
    return getattr(target, "kv_policy", None) or KVPolicy()


def cache_layers(config: TextConfig) -> list[LayerSpec]:
    """The layers that own a cache (all but KV-shared consumers), in order."""
    return [spec for spec in config.layers if not spec.is_kv_shared]


def make_layer_cache(config: TextConfig, spec: LayerSpec, policy: KVPolicy) -> Any:
    if spec.is_sliding:
        return SlidingKVCache(config.sliding_window, policy.max_rewind, policy.attention)
    if policy.kind == "exact":
        cache = KVCache()
        cache.attention = policy.attention  # read by gemma4_mlx.models.attention.attend
        return cache
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
        key_spec, value_spec = (
            CodecSpec(
                spec.head_dim, bits, policy.codec, norm_correction, seed=seed, grid=policy.grid
            )
            for bits in (key_bits, value_bits)
        )
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
    policy = as_policy(policy) or KVPolicy()
    return [make_layer_cache(config, spec, policy) for spec in cache_layers(config)]
