"""gemma4-mlx: Gemma 4 on MLX with a TurboQuant KV cache."""

from gemma4_mlx.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
