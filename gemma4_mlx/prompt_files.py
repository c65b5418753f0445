"""Prompt-cache files: a prefilled KV cache saved with what it belongs to.

The layout is mlx-lm's (``mlx_lm.models.cache.save_prompt_cache`` writes it: each cache's
``state``, the caches' class names and a metadata dict, in one safetensors file, whatever the
file is called), and the metadata says what the cache is for:

- ``format``: FORMAT (files without it are not ours and are never overwritten);
- ``model``: a digest of the text config (two models with other shapes, RoPE or layer layout
  can never share a cache) and ``model_summary``, the same in words for messages;
- ``layers``: each cache-owning layer's (type, KV heads, head dim), the shapes the cache has;
- ``policy``: the KV policy's text form (``str(KVPolicy)``);
- ``tokens``: the token ids the cache holds, as JSON.

Reading a file gives one of three answers: a cache to continue from; no cache, with a note
(the file is empty, from an older version, does not hold a prefix of the prompt, or was built
with another KV policy: the rule is to prefill from scratch with the requested policy and let
the caller replace the file, so a file never changes which cache a run uses); or a one-line
``UserError`` (the file is not a prompt cache, or belongs to another model: refusing keeps a
file that is not ours from being overwritten). Writes are atomic: a temporary file beside the
target, renamed over it, removed on any failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_unflatten

from gemma4_mlx.cache import KVPolicy, cache_layers, make_cache
from gemma4_mlx.config import TextConfig
from gemma4_mlx.errors import UserError

FORMAT = "gemma4-mlx prompt cache 1"


def _text_config(model: Any) -> TextConfig:
    return model if isinstance(model, TextConfig) else model.config


def model_identity(model: Any) -> tuple[str, str]:
    """(digest of the text config, a short description) of a model or TextConfig."""
    config = _text_config(model)
    facts = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    digest = hashlib.sha256(facts.encode()).hexdigest()[:16]
    layers = cache_layers(config)
    summary = (
        f"{config.model_type}, {len(config.layers)} layers ({len(layers)} with a KV cache), "
        f"hidden size {config.hidden_size}"
    )
    return digest, summary


def layer_shapes(model: Any) -> list[list]:
    """[layer type, KV heads, head dim] of each cache-owning layer."""
    return [
        [spec.layer_type, spec.n_kv_heads, spec.head_dim]
        for spec in cache_layers(_text_config(model))
    ]


def save_prompt_file(
    path: str | Path, cache: list[Any], tokens: list[int], model: Any, policy: KVPolicy
) -> None:
    """Write ``cache`` (holding ``tokens``) to ``path`` atomically, with the model's identity
    and the policy. One-line UserError if there is nothing to save or the path is unusable."""
    from mlx_lm.models.cache import save_prompt_cache

    path = Path(path)
    if not tokens or not cache:
        raise UserError("nothing to save yet: the KV cache holds no tokens")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name for the prompt cache")
    digest, summary = model_identity(model)
    metadata = {
        "format": FORMAT,
        "model": digest,
        "model_summary": summary,
        "layers": json.dumps(layer_shapes(model)),
        "policy": str(policy),
        "tokens": json.dumps([int(t) for t in tokens]),
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mx.save_safetensors appends ".safetensors" to other names: give it one that ends so
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".partial.safetensors"
        )
        os.close(fd)
        save_prompt_cache(tmp, cache, metadata)
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot write the prompt cache {path}: {reason}") from None
    finally:
        if tmp is not None:  # any failure, Ctrl-C included: leave nothing behind
            with contextlib.suppress(OSError):
                os.remove(tmp)


def read_prompt_file(path: str | Path) -> tuple[dict[str, Any], list[Any], list[str], dict]:
    """(arrays, states, class names, metadata) of a file in mlx-lm's prompt-cache layout.
    UserError if it is not one (whatever its name: ``cache.bin`` works)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a prompt cache file")
    try:
        arrays, flat_meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for files it cannot parse
        raise UserError(
            f"{path}: not a prompt cache file (not readable as safetensors: {e}); "
            "remove it or choose another path"
        ) from None
    try:
        metadata, classes, scalars = tree_unflatten(list(flat_meta.items()))
        for position, kind in scalars[1:]:  # mlx-lm's encoding of non-array state entries
            a = arrays[position]
            if kind == "scalar":
                arrays[position] = a.item()
            elif kind == "string":
                arrays[position] = "".join(chr(i) for i in a.tolist())
            else:
                arrays[position] = None
        states = tree_unflatten(list(arrays.items())) if arrays else []
    except (ValueError, TypeError, KeyError, IndexError):
        raise UserError(
            f"{path}: not a prompt cache written by gemma4-mlx (safetensors without a prompt "
            "cache's layout); remove it or choose another path"
        ) from None
    return arrays, states, classes, metadata


def cache_classes() -> dict[str, type]:
    """The cache classes a prompt-cache file may name: mlx-lm's and ours (mlx-lm's own loader
    resolves names in its module only, and patching that module is not ours to do)."""
    import mlx_lm.models.cache as mlx_cache

    from gemma4_mlx.kv.cache import SlidingKVCache, TurboQuantKVCache

    classes = {
        name: obj
        for name, obj in vars(mlx_cache).items()
        if isinstance(obj, type) and hasattr(obj, "from_state")
    }
    for cls in (SlidingKVCache, TurboQuantKVCache):
        classes[cls.__name__] = cls
    return classes


def load_prompt_cache(path: str | Path, return_metadata: bool = False):
    """mlx-lm's ``load_prompt_cache`` for files that hold our caches too (any file name):
    the caches, and with ``return_metadata`` the metadata dict."""
    _, states, classes, metadata = read_prompt_file(path)
    registry = cache_classes()
    unknown = [name for name in classes if name not in registry]
    if unknown:
        raise UserError(f"{path}: holds a cache of unknown class {unknown[0]!r}")
    cache = [registry[name].from_state(state) for name, state in zip(classes, states, strict=True)]
    return (cache, metadata) if return_metadata else cache


def load_prompt_file(
    path: str | Path, model: Any, policy: KVPolicy, tokens: list[int]
) -> tuple[list[Any] | None, int, str | None]:
    """(cache, tokens it holds, note) for a prompt starting with the file's tokens.

    ``(None, 0, note)``: use no file (the note says why). UserError: refuse (not a prompt
    cache, or another model's)."""
    path = Path(path)
    _, states, classes, meta = read_prompt_file(path)
    if meta.get("format") != FORMAT:
        if "tokens" in meta:  # written by gemma4-mlx before the format was recorded
            return None, 0, f"{path} is from an older gemma4-mlx; prefilling from scratch"
        raise UserError(f"{path}: not a prompt cache written by gemma4-mlx; remove it or rename")
    digest, summary = model_identity(model)
    if meta.get("model") != digest:
        raise UserError(
            f"{path} holds a KV cache for another model ({meta.get('model_summary', '?')}), "
            f"not this one ({summary}); remove it or choose another file"
        )
    try:
        saved = [int(t) for t in json.loads(meta["tokens"])]
    except (KeyError, TypeError, ValueError):
        saved = []
    if not saved:
        return None, 0, f"{path} holds no tokens; ignoring it"
    if meta.get("policy") != str(policy):
        return (
            None,
            0,
            f"{path} was built with KV policy {meta.get('policy')}, not the requested "
            f"{policy}; prefilling from scratch",
        )
    expected = make_cache(_text_config(model), policy)
    names = [type(c).__name__ for c in expected]
    if classes != names or json.loads(meta.get("layers", "null")) != layer_shapes(model):
        return None, 0, f"{path} does not match this model's cache layout; ignoring it"
    if len(saved) >= len(tokens) or tokens[: len(saved)] != saved:
        return None, 0, f"{path} does not hold a prefix of this prompt; prefilling from scratch"
    try:
        cache = [type(c).from_state(state) for c, state in zip(expected, states, strict=True)]
    except Exception as e:  # a state the class cannot take: treat the file as unusable
        return None, 0, f"{path} is unusable ({type(e).__name__}: {e}); ignoring it"
    if any(getattr(c, "offset", len(saved)) != len(saved) for c in cache):
        return None, 0, f"{path} holds caches of another length than its tokens; ignoring it"
    return cache, len(saved), None
