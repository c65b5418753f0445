"""The serving engine behind ``gemma4-mlx serve``: a worker thread that owns the model
(worker), prefix reuse across requests (prefix) and constrained decoding (grammar)."""
