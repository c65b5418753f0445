"""The KV wing's mlx-lm side: cache classes that follow mlx-lm's cache protocol (kv.cache)."""
