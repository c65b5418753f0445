"""Media in: image (and video) preprocessing and the prompt expansion of their placeholders.

The prompt carries one ``<|image|>`` per image (the chat template writes it for an image item;
``image_placeholder`` gives the tokenizer's string for it); ``expand_image_placeholders`` turns
each into ``<|image>`` + n x ``<|image|>`` + ``<image|>`` (n from the resized size), on token
ids, with the ids read from config.json (``MediaTokens``), never hard-coded.
"""

from __future__ import annotations

from typing import Any

from gemma4_mlx.errors import UserError


def expand_image_placeholders(ids: list[int], tokens, counts: list[int]) -> list[int]:
    """Replace the i-th ``tokens.image`` id in ``ids`` by boi + counts[i] x image + eoi."""
    n_slots = sum(1 for t in ids if t == tokens.image)
    if n_slots != len(counts):
        raise UserError(
            f"the prompt has {n_slots} image placeholder(s) but {len(counts)} image(s) were given"
        )
    out: list[int] = []
    it = iter(counts)
    for t in ids:
        if t == tokens.image:
            out += [tokens.boi] + [tokens.image] * next(it) + [tokens.eoi]
        else:
            out.append(t)
    return out


def image_placeholder(tokenizer: Any, tokens) -> str:
    """The text that tokenizes to the single ``<|image|>`` id (read from the tokenizer)."""
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    text = tok.convert_ids_to_tokens(tokens.image)
    if not text or tok.encode(text, add_special_tokens=False) != [tokens.image]:
        raise UserError(
            f"the tokenizer has no single token for the image placeholder id {tokens.image} "
            "(config.json image_token_id)"
        )
    return text


def with_image_placeholders(tokenizer: Any, tokens, prompt: str, n_images: int) -> str:
    """A user message with the images first, as Gemma 4's template renders an image item."""
    mark = image_placeholder(tokenizer, tokens)
    return "".join(f"\n\n{mark}\n\n" for _ in range(n_images)) + prompt


def prepare_images(
    model: Any, ids: list[int], images: list[Any], budget: int
) -> tuple[list[int], dict[str, Any], list[int]]:
    """(prompt ids with one placeholder per image, images) -> (expanded ids, the model's media
    keyword arguments incl. ``mm_token_type_ids``, soft tokens per image)."""
    import numpy as np

    from gemma4_mlx.media.image import check_budget, preprocess_images
    from gemma4_mlx.models.multimodal import check_media_supported, mm_token_type_ids

    check_media_supported(model)
    check_budget(budget)
    feats = preprocess_images(images, budget, model.vision_config.patch_size)
    counts = list(feats["num_soft_tokens_per_image"])
    expanded = expand_image_placeholders(ids, model.media_tokens, counts)
    media = {
        "pixel_values": feats["pixel_values"],
        "image_position_ids": feats["image_position_ids"],
        "mm_token_type_ids": mm_token_type_ids(np.array([expanded]), model.media_tokens),
    }
    return expanded, media, counts


__all__ = [
    "expand_image_placeholders",
    "image_placeholder",
    "prepare_images",
    "with_image_placeholders",
]
