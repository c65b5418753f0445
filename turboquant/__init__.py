"""TurboQuant (arXiv 2504.19874) vector compression for MLX: a generic library.

Tensors in, tensors out: ``codec`` (rotation, Lloyd-Max or uniform-grid codebooks, packing
bit-identical to MLX's affine quantization), ``tiers`` (the key channel plan), ``stream`` (a
compressed stream of one tensor: exact sink | codes | exact tail, exactly trimmable within
``max_rewind``) and ``attention`` (blockwise online softmax over two stream views; uniform-grid
codes read in place by ``mx.quantized_matmul``). It imports neither mlx_lm nor gemma4_mlx: the
mlx-lm cache protocol is gemma4_mlx.kv.cache, prompt-cache files are gemma4_mlx.prompt_files.
"""
