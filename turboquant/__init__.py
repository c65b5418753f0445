"""TurboQuant (arXiv 2504.19874) vector compression for MLX: a generic library.

It imports nothing from gemma4_mlx.
"""
