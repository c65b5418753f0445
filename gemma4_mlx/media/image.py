"""Image preprocessing for the Gemma 4 vision tower, with PIL + numpy only.

Bit-exact with transformers 5.24 ``Gemma4ImageProcessorPil`` (tests/test_vision_preprocess.py):

1. convert to RGB as the reference does (transparency composited onto white, CMYK/palette/
   16-bit through PIL's ``convert("RGB")``; an animated image gives its first frame);
2. resize (bicubic) to the largest size whose sides are multiples of 3 * 16 px and whose patch
   count fits 9 * budget: the image always fills the budget, small images are upscaled;
3. / 255 -> float32, 16 x 16 patches row-major, each patch (py, px, channel) flattened;
4. (x, y) patch positions; both padded to 9 * budget rows (pixels 0, positions -1).

The model, not the processor, maps pixels to [-1, 1]. One soft token per 3 x 3 patches.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from gemma4_mlx.errors import UserError

BUDGETS = (70, 140, 280, 560, 1120)  # soft tokens per image the model was trained with
DEFAULT_BUDGET = 280
PATCH_SIZE = 16
POOLING = 3


def check_budget(budget: int) -> int:
    if budget not in BUDGETS:
        raise UserError(
            f"image token budget {budget!r} is not one of {', '.join(map(str, BUDGETS))}"
        )
    return budget


def default_budget(model_dir: Path | None) -> int:
    """The checkpoint's own image budget (processor_config.json's image processor
    ``max_soft_tokens``, or preprocessor_config.json's), else 280 as Google ships."""
    import json

    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(model_dir or ".") / name
        if model_dir is None or not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        value = (raw.get("image_processor") or {}).get(
            "max_soft_tokens", raw.get("max_soft_tokens")
        )
        if value in BUDGETS:
            return int(value)
    return DEFAULT_BUDGET


def target_size(
    height: int, width: int, budget: int, patch_size: int = PATCH_SIZE, pooling: int = POOLING
) -> tuple[int, int]:
    """The resized (height, width): transformers' ``get_aspect_ratio_preserving_size``."""
    max_patches = budget * pooling**2
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling * patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise UserError(f"image of {width}x{height} pixels cannot be resized to the token budget")
    longest = (max_patches // pooling**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        th, tw = min(int(math.floor(height / width)) * side, longest), side
    if th * tw > target_px:
        raise UserError(
            f"image of {width}x{height} pixels is too elongated for a {budget}-token budget "
            f"(it would need {th}x{tw} pixels)"
        )
    return th, tw


def num_soft_tokens(height: int, width: int, budget: int, patch_size: int = PATCH_SIZE) -> int:
    th, tw = target_size(height, width, budget, patch_size)
    return (th // patch_size) * (tw // patch_size) // POOLING**2


def to_rgb(image: Any) -> np.ndarray:
    """A PIL image or a uint8 array (H, W[, 1|3|4]) -> (H, W, 3) uint8, as the reference converts."""
    from PIL import Image

    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise UserError(f"image arrays must be uint8 (H, W, 3), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise UserError(f"image arrays must have shape (H, W, 3), got {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:  # alpha over white, rounded (the reference's numpy path)
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


URL_TIMEOUT_S = 20.0
URL_MAX_BYTES = 50 * 2**20


def fetch_url(url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = URL_MAX_BYTES) -> bytes:
    """GET an http(s) URL with a timeout and a size cap (UserError on any failure)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "gemma4-mlx"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise UserError(f"{url}: larger than the {max_bytes // 2**20} MiB image limit")
            data = response.read(max_bytes + 1)
    except UserError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"{url}: cannot fetch the image ({getattr(e, 'reason', e)})") from None
    if len(data) > max_bytes:
        raise UserError(f"{url}: larger than the {max_bytes // 2**20} MiB image limit")
    return data


def open_image(source: Any) -> Any:
    """A path, http(s) URL, PIL image or uint8 array -> something ``to_rgb`` takes; UserError
    if unreadable. An animated image gives its first frame (as the reference, which reads the
    PIL image as opened)."""
    import io

    from PIL import Image, UnidentifiedImageError

    def decode(data: Any, name: Any) -> Any:
        try:
            image = Image.open(data)
            image.load()  # decode now: a truncated file fails here, not later
        except Image.DecompressionBombError as e:
            raise UserError(f"{name}: image too large to decode safely ({e})") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"{name}: not a readable image ({e})") from None
        return image

    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return decode(io.BytesIO(fetch_url(source)), source)
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: no such image file")
        return decode(path, path)
    if isinstance(source, Image.Image) or isinstance(source, np.ndarray):
        return source
    raise UserError(
        f"images must be paths, PIL images or uint8 arrays, got {type(source).__name__}"
    )


def preprocess_image(
    image: Any, budget: int = DEFAULT_BUDGET, patch_size: int = PATCH_SIZE
) -> tuple[np.ndarray, np.ndarray, int]:
    """One image -> (pixels (9*budget, 3p^2) float32, positions (9*budget, 2) int64, tokens)."""
    from PIL import Image

    check_budget(budget)
    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    if height == 0 or width == 0:
        raise UserError("image has no pixels")
    th, tw = target_size(height, width, budget, patch_size)
    if (th, tw) != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((tw, th), Image.BICUBIC))
    # float64 * (1/255) then float32: the reference's rescale, to the last bit
    pixels = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    ph, pw = th // patch_size, tw // patch_size
    patches = pixels.reshape(ph, patch_size, pw, patch_size, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(ph * pw, 3 * patch_size**2)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([gx, gy], axis=-1).reshape(ph * pw, 2).astype(np.int64)
    rows = budget * POOLING**2
    out_pixels = np.zeros((rows, patches.shape[1]), dtype=np.float32)
    out_positions = np.full((rows, 2), -1, dtype=np.int64)
    out_pixels[: len(patches)] = patches
    out_positions[: len(patches)] = positions
    return out_pixels, out_positions, ph * pw // POOLING**2


def preprocess_images(
    images: list[Any], budget: int = DEFAULT_BUDGET, patch_size: int = PATCH_SIZE
) -> dict[str, Any]:
    """Images -> the processor's outputs under transformers' names: ``pixel_values`` (B, 9*budget,
    3p^2) float32, ``image_position_ids`` (B, 9*budget, 2) int64, ``num_soft_tokens_per_image``."""
    done = [preprocess_image(open_image(im), budget, patch_size) for im in images]
    return {
        "pixel_values": np.stack([d[0] for d in done]),
        "image_position_ids": np.stack([d[1] for d in done]),
        "num_soft_tokens_per_image": [d[2] for d in done],
    }


__all__ = [
    "BUDGETS",
    "DEFAULT_BUDGET",
    "check_budget",
    "default_budget",
    "num_soft_tokens",
    "open_image",
    "preprocess_image",
    "preprocess_images",
    "target_size",
    "to_rgb",
]
