"""Tiny random ``Gemma4ForConditionalGeneration`` checkpoints with a vision tower.

- ``FLAVOURS``: name -> (text config name in tiny.TINY_CONFIGS, text overrides, vision config):
  ``e2b`` is shaped like E2B/E4B (PLE, KV sharing, clipped linears, no standardize, causal
  decoder); ``26b`` like 26B/31B (MoE, standardize, ``use_bidirectional_attention="vision"``,
  vision head dim 36: a multiple of 4 that is not 64, as 72 is on the real towers).
  An audio helper adds ``audio_config`` through ``extra`` of ``build_reference``.
- ``build_reference(name, seed)``: the transformers model (float32, eval, eager) with every
  constant-initialised tensor perturbed: the position table (ones), std_bias/std_scale, every
  norm weight (incl. vision q/k norms), layer scalars, and the clip buffers of E2B-style linears
  (+-inf: set to bounds that clip about half the observed range of each linear).
- ``write_checkpoint(name, out_dir, seed)`` -> (out_dir, torch model).
- ``image_processor(budget)``: transformers' Gemma4ImageProcessorPil at the tiny patch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tiny

# Media ids remapped below the tiny vocab (boi/eoi/boa/eoa are embedded, so they must be < vocab).
IMG, AUD, VID, BOI, EOI, BOA, EOA = 500, 501, 502, 503, 504, 505, 506
PATCH = 4  # tiny patch size: a 70-token budget is 630 patches of 4x4 pixels

_VISION_COMMON = dict(
    patch_size=PATCH,
    pooling_kernel_size=3,
    position_embedding_size=160,
    rms_norm_eps=1e-6,
    intermediate_size=64,
    num_hidden_layers=2,
)

FLAVOURS: dict[str, tuple[str, dict, dict]] = {
    "e2b": (
        "e2b",
        dict(use_bidirectional_attention=None),
        dict(
            _VISION_COMMON,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            use_clipped_linears=True,
            standardize=False,
        ),
    ),
    "26b": (
        "26b",
        dict(use_bidirectional_attention="vision"),
        dict(
            _VISION_COMMON,
            hidden_size=48,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=36,
            use_clipped_linears=False,
            standardize=True,
        ),
    ),
}


def image_processor(budget: int = 70):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(patch_size=PATCH, max_soft_tokens=budget, pooling_kernel_size=3)


def photo(height: int, width: int, seed: int = 0):
    """A real-looking RGB photo: smooth gradients, a few shapes, sensor noise (PIL image)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            128 + 100 * np.sin(xx / max(width, 1) * 3 + seed),
            128 + 90 * np.cos(yy / max(height, 1) * 4),
            128 + 80 * np.sin((xx + yy) / max(height + width, 1) * 5),
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(1, width // 2 + 2), y0 + rng.integers(1, height // 2 + 2)
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _config(name: str, extra: dict | None = None):
    from transformers import Gemma4Config

    text_name, text_over, vision = FLAVOURS[name]
    text = dict(tiny.TINY_CONFIGS[text_name])
    text.pop("model_type")
    text.update(text_over)
    kwargs = dict(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        image_token_id=IMG,
        audio_token_id=AUD,
        video_token_id=VID,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        boa_token_id=BOA,
        eoa_token_index=EOA,
        tie_word_embeddings=True,
    )
    kwargs.update(extra or {})  # e.g. {"audio_config": {...}}
    cfg = Gemma4Config(**kwargs)
    cfg._attn_implementation = "eager"
    for sub in (cfg.text_config, cfg.vision_config, cfg.audio_config):
        if sub is not None:
            sub._attn_implementation = "eager"
    return cfg


def _observe_and_set_clips(model, seed: int) -> None:
    """Clip buffers at about half of what each linear sees on a sample image (so they bite)."""
    import torch

    clipped = {
        n: m for n, m in model.named_modules() if type(m).__name__ == "Gemma4ClippableLinear"
    }
    if not clipped or not next(iter(clipped.values())).use_clipped_linears:
        return
    seen: dict[str, list[float]] = {}

    def hook(name):
        def fn(module, args, out):
            x = args[0]
            seen[name] = [float(x.min()), float(x.max()), float(out.min()), float(out.max())]

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in clipped.items()]
    feats = image_processor(70)([photo(50, 70, seed)], return_tensors="pt")
    with torch.no_grad():
        model.model.get_image_features(feats["pixel_values"], feats["image_position_ids"])
    for h in handles:
        h.remove()
    with torch.no_grad():
        for name, m in clipped.items():
            lo_in, hi_in, lo_out, hi_out = seen[name]
            m.input_min.fill_(0.6 * lo_in)
            m.input_max.fill_(0.5 * hi_in)
            m.output_min.fill_(0.5 * lo_out)
            m.output_max.fill_(0.6 * hi_out)


def build_reference(name: str, seed: int = 0, extra: dict | None = None):
    import torch
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(_config(name, extra)).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or key.endswith(("_min", "_max")):
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if key.endswith("std_bias"):
                tensor.copy_(0.3 * noise)
            elif key.endswith("std_scale"):
                tensor.copy_(1.0 + 0.3 * noise)
            elif key.endswith("position_embedding_table"):
                tensor.copy_(0.5 * noise)  # init all ones: x/y swaps would not show
            elif "vision_tower" in key and key.endswith(("q_norm.weight", "k_norm.weight")):
                # 0.5 +- 0.1: attention has scale 1.0, and at 1 +- 0.2 with head dim 36 its
                # softmax saturates so float32 rounding alone moves transformers' own logits
                # by 6e-4 from float64 (ours too); this keeps the comparison meaningful.
                tensor.copy_(0.5 + 0.1 * noise)
            elif "norm" in key or "scale" in key or "layer_scalar" in key:
                tensor.add_(0.2 * noise)
            else:
                tensor.add_(0.05 * noise)
    _observe_and_set_clips(model, seed)
    return model


def write_checkpoint(name: str, out_dir: str | Path, seed: int = 0, extra: dict | None = None):
    out_dir = Path(out_dir)
    model = build_reference(name, seed, extra)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir, model


def expand_prompt(text_ids: list[list[int]], counts: list[int]) -> list[int]:
    """Text pieces around images: piece0 <|image> IMG*n0 <image|> piece1 ... (ids)."""
    out: list[int] = []
    for i, piece in enumerate(text_ids):
        out += piece
        if i < len(counts):
            out += [BOI] + [IMG] * counts[i] + [EOI]
    return out
