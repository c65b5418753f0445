"""gemma4-mlx: Gemma 4 on MLX with a TurboQuant KV cache.

from gemma4_mlx import load, generate, KVPolicy
model, tokenizer = load("demo", kv_policy="turboquant")  # the model's own KV policy
result = generate(model, tokenizer, "The GPL is", max_tokens=32)
result = generate(model, tokenizer, "The GPL is", kv_policy=KVPolicy.parse("turboquant:3.5"))
print(result.text, result.kv_policy)
"""

from gemma4_mlx.errors import BadArgument, BadArgumentType, UserError

# Imported eagerly: the function names shadow the submodule gemma4_mlx.generate (as in mlx-lm).
# gemma4_mlx.generate imports mlx_lm only inside its functions, so this stays light.
from gemma4_mlx.generate import Chat, GenerationResult, SamplingOptions, generate, stream_generate

__version__ = "0.1.0"
__all__ = [
    "BadArgument",
    "BadArgumentType",
    "Chat",
    "GenerationResult",
    "KVPolicy",
    "KVPolicyError",
    "SamplingOptions",
    "UserError",
    "generate",
    "load",
    "stream_generate",
]

# These import mlx_lm (hence transformers, and torch where it is installed): loaded on first use
# so that importing the package, and `gemma4-mlx --help`, take a fraction of a second.
_LAZY = {
    "KVPolicy": "gemma4_mlx.cache",
    "KVPolicyError": "gemma4_mlx.cache",
    "load": "gemma4_mlx.loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gemma4_mlx' has no attribute {name!r}")
