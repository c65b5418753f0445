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
            f"the prompt has {n_slots} image placeholder(s) but {len(counts)} image(s) were given "
            "(gemma4_mlx.media.with_image_placeholders writes one per image)"
        )
    out: list[int] = []
    it = iter(counts)
    for t in ids:
        if t == tokens.image:
            out += [tokens.boi] + [tokens.image] * next(it) + [tokens.eoi]
        else:
            out.append(t)
    return out


def _single_token(tokenizer: Any, token_id: int, what: str) -> str:
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    text = tok.convert_ids_to_tokens(token_id)
    if not text or tok.encode(text, add_special_tokens=False) != [token_id]:
        raise UserError(
            f"the tokenizer has no single token for the {what} placeholder id {token_id} "
            f"(config.json {what}_token_id)"
        )
    return text


def image_placeholder(tokenizer: Any, tokens) -> str:
    """The text that tokenizes to the single ``<|image|>`` id (read from the tokenizer)."""
    return _single_token(tokenizer, tokens.image, "image")


def with_image_placeholders(
    tokenizer: Any, tokens, prompt: str, n_images: int, n_videos: int = 0
) -> str:
    """A user message with the media first, as Gemma 4's template renders image and video
    items (``"\n\n<|image|>\n\n"``, ``"\n\n<|video|>\n\n"``)."""
    out = ""
    if n_videos:
        mark = _single_token(tokenizer, tokens.video, "video")
        out += "".join(f"\n\n{mark}\n\n" for _ in range(n_videos))
    if n_images:
        mark = image_placeholder(tokenizer, tokens)
        out += "".join(f"\n\n{mark}\n\n" for _ in range(n_images))
    return out + prompt


def prepare_media(
    model: Any,
    tokenizer: Any,
    ids: list[int],
    images: list[Any] = (),
    budget: int = 280,
    videos: list[Any] = (),
) -> tuple[list[int], dict[str, Any], dict[str, Any]]:
    """(prompt ids with one placeholder per image/video, media) -> (expanded ids, the model's
    keyword arguments incl. ``mm_token_type_ids``, a report: soft tokens per image, frames and
    tokens per frame per video, notes). ``videos`` are paths or ``video.load_video`` results."""
    import numpy as np

    from gemma4_mlx.models.multimodal import check_media_supported, mm_token_type_ids

    check_media_supported(model)
    tokens, media = model.media_tokens, {}
    report: dict[str, Any] = {"image_tokens": [], "video_frames": [], "notes": []}
    if videos:
        from gemma4_mlx.media.video import VIDEO_BUDGET, load_video, preprocess_video, video_ids

        videos = [v if hasattr(v, "frames") else load_video(v) for v in videos]  # paths: 32 frames

        n_slots = sum(1 for t in ids if t == tokens.video)
        if n_slots != len(videos):
            raise UserError(
                f"the prompt has {n_slots} video placeholder(s) but {len(videos)} video(s) were given"
            )
        done = [preprocess_video(v, VIDEO_BUDGET, model.vision_config.patch_size) for v in videos]
        it = iter(zip(videos, done))
        expanded: list[int] = []
        for t in ids:
            if t == tokens.video:
                video, feats = next(it)
                expanded += video_ids(tokenizer, tokens, video, feats["num_soft_tokens_per_video"])
            else:
                expanded.append(t)
        ids = expanded
        media["pixel_values_videos"] = np.concatenate([d["pixel_values_videos"] for d in done])
        media["video_position_ids"] = np.concatenate([d["video_position_ids"] for d in done])
        report["video_frames"] = [len(v.frames) for v in videos]
        report["notes"] += [v.note for v in videos if v.note]
    if images:
        ids, image_media, counts = prepare_images(model, ids, images, budget)
        image_media.pop("mm_token_type_ids")
        media.update(image_media)
        report["image_tokens"] = counts
    media["mm_token_type_ids"] = mm_token_type_ids(np.array([ids]), tokens)
    return ids, media, report


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
    "prepare_media",
    "image_placeholder",
    "prepare_images",
    "with_image_placeholders",
]
