"""gemma4-mlx: Gemma 4 on MLX with a TurboQuant KV cache.

from gemma4_mlx import load, generate, KVPolicy
model, tokenizer = load("demo", kv_policy="turboquant")  # the model's own KV policy
result = generate(model, tokenizer, "The GPL is", max_tokens=32)
result = generate(model, tokenizer, "The GPL is", kv_policy=KVPolicy.parse("turboquant:3.5"))
print(result.text, result.kv_policy)
"""

from gemma4_mlx.cache import KVPolicy, KVPolicyError
from gemma4_mlx.errors import UserError

# Imported eagerly: the function names shadow the submodule gemma4_mlx.generate (as in mlx-lm).
from gemma4_mlx.generate import Chat, GenerationResult, SamplingOptions, generate, stream_generate
from gemma4_mlx.loading import load

__version__ = "0.1.0"
__all__ = [
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
