"""Vision cost: image preprocessing, the vision tower per token budget, time to first token.

- preprocessing (PIL resize + patchify) of a 1920x1080 photo-like image at each budget;
- the vision tower + embedder at the real E4B (768 wide, 16 layers, head dim 64, clipped
  linears) and 31B (1152 wide, 27 layers, head dim 72, standardize) shapes with random weights
  (timing does not depend on the values): seconds and peak MLX memory per image and budget;
- time to first token for an image prompt (280 tokens) on a tiny random model: preprocessing +
  tower + prefill + one token, i.e. what the image adds before text streams.

    python benchmarks/vision.py                 # every budget, full towers (a Mac: minutes)
    python benchmarks/vision.py --quick         # budget 70, towers cut to 2 layers, for CI
    python benchmarks/vision.py --towers e4b --budgets 70,280 --repeats 1   # a subset
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from gemma4_mlx.bench import DEFAULT_OUT as OUT
from gemma4_mlx.bench import BenchParser
from gemma4_mlx.bench.common import write_json
from gemma4_mlx.config import parse_config
from gemma4_mlx.media.image import BUDGETS, check_budget, preprocess_images
from gemma4_mlx.models.multimodal import Gemma4Multimodal, mm_token_type_ids
from gemma4_mlx.models.vision import MultimodalEmbedder, VisionModel, parse_vision_config

TOWERS = {
    # vision_config of the released checkpoints; text hidden for the embedder
    "e4b": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
             num_attention_heads=12, num_key_value_heads=12, head_dim=64,
             use_clipped_linears=True, standardize=False),
        2560,
    ),
    "31b": (
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
             num_attention_heads=16, num_key_value_heads=16, head_dim=72,
             use_clipped_linears=False, standardize=True),
        5376,
    ),
}  # fmt: skip


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 image: smooth colour gradients plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [128 + 100 * np.sin(xx / width * 3), 128 + 90 * np.cos(yy / height * 4), 128 + xx * 0],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def _randomize(module: nn.Module, seed: int, dtype) -> None:
    key = mx.random.key(seed)
    flat = tree_flatten(module.parameters())
    keys = mx.random.split(key, len(flat))
    it = iter(range(len(flat)))

    def rand(p):
        i = next(it)
        if p.ndim == 0:  # clip bounds: keep +-inf
            return p
        return (0.02 * mx.random.normal(p.shape, key=keys[i])).astype(dtype)

    module.update(tree_map(rand, module.parameters()))


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(best seconds, peak bytes) over ``repeats`` runs, after one warm-up when repeating."""
    if repeats > 1:
        mx.eval(fn())
    best, peak = float("inf"), 0
    for _ in range(repeats):
        mx.reset_peak_memory()
        t = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t)
        peak = max(peak, mx.get_peak_memory())
    return best, peak


def tower_rows(budgets, layers: int | None, dtype, repeats: int, towers) -> list[dict]:
    rows = []
    image = photo(1080, 1920)
    for name in towers:
        vc, text_hidden = TOWERS[name]
        vc = dict(vc, num_hidden_layers=layers or vc["num_hidden_layers"])
        cfg = parse_vision_config({"vision_config": vc})
        tower = VisionModel(cfg)
        embed = MultimodalEmbedder(cfg.hidden_size, text_hidden, cfg.rms_norm_eps)
        _randomize(tower, 0, dtype)
        _randomize(embed, 1, dtype)
        params = sum(v.size for _, v in tree_flatten(tower.parameters()))
        for budget in budgets:
            feats = preprocess_images([image], budget)
            pv = mx.array(feats["pixel_values"])
            pos = feats["image_position_ids"]
            run = lambda t=tower, e=embed, p=pv, q=pos: e(mx.concatenate(t(p, q)))  # noqa: E731
            seconds, peak = _timed(run, repeats)
            rows.append(
                {
                    "tower": name,
                    "layers": cfg.num_hidden_layers,
                    "params": params,
                    "dtype": str(dtype).removeprefix("mlx.core."),
                    "budget": budget,
                    "soft_tokens": feats["num_soft_tokens_per_image"][0],
                    "seconds": seconds,
                    "peak_memory_mib": peak / 2**20,
                }
            )
            print(rows[-1], flush=True)
    return rows


def tower_sizes() -> list[dict]:
    """Parameters of the full released towers + embedders (no weights materialised)."""
    rows = []
    for name, (vc, text_hidden) in TOWERS.items():
        cfg = parse_vision_config({"vision_config": vc})
        tower = VisionModel(cfg)
        embed = MultimodalEmbedder(cfg.hidden_size, text_hidden, cfg.rms_norm_eps)
        n = sum(v.size for m in (tower, embed) for _, v in tree_flatten(m.parameters()))
        table = tower.patch_embedder.position_embedding_table.size
        rows.append({"tower": name, "params": n, "position_table_params": table,
                     "bfloat16_mib": 2 * n / 2**20})  # fmt: skip
    return rows


def preprocess_rows(budgets, repeats: int) -> list[dict]:
    from PIL import Image

    image = Image.fromarray(photo(1080, 1920))
    rows = []
    for budget in budgets:
        best = float("inf")
        for _ in range(repeats + 1):
            t = time.perf_counter()
            preprocess_images([image], budget)
            best = min(best, time.perf_counter() - t)
        rows.append({"image": "1920x1080", "budget": budget, "seconds": best})
    return rows


def _tiny_model() -> Gemma4Multimodal:
    raw = {
        "model_type": "gemma4",
        "text_config": dict(
            model_type="gemma4_text", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
            layer_types=["sliding_attention"] * 3 + ["full_attention"], sliding_window=64,
        ),
        "vision_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, head_dim=32),
        "image_token_id": 500, "video_token_id": 501, "boi_token_id": 502, "eoi_token_id": 503,
    }  # fmt: skip
    model = Gemma4Multimodal(parse_config(raw))
    _randomize(model, 2, mx.float32)
    return model


def ttft_row(repeats: int) -> dict:
    from PIL import Image

    model, image = _tiny_model(), Image.fromarray(photo(768, 1024))
    tokens = model.media_tokens

    def first_token():
        feats = preprocess_images([image], 280)
        n = feats["num_soft_tokens_per_image"][0]
        ids = [5, 6, tokens.boi] + [tokens.image] * n + [tokens.eoi, 7, 8]
        logits = model(
            mx.array([ids]),
            cache=model.make_cache(),
            last_only=True,
            pixel_values=feats["pixel_values"],
            image_position_ids=feats["image_position_ids"],
            mm_token_type_ids=mm_token_type_ids(np.array([ids]), tokens),
        )
        return mx.argmax(logits[0, -1])

    seconds, peak = _timed(first_token, repeats)
    return {"model": "tiny (64 wide, 4 layers; tower 64 wide, 2 layers)", "image": "1024x768",
            "budget": 280, "seconds": seconds, "peak_memory_mib": peak / 2**20}  # fmt: skip


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = BenchParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="tower weights (default: bfloat16 on a GPU, float32 on CPU, where bf16 is slow)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--towers", default=",".join(TOWERS))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    budgets = [70] if args.quick else [int(b) for b in args.budgets.split(",")]
    towers = list(TOWERS) if args.quick else args.towers.split(",")
    for b in budgets:
        check_budget(b)
    if set(towers) - set(TOWERS):
        raise SystemExit(f"error: --towers takes {', '.join(TOWERS)}")
    layers = 2 if args.quick else None
    repeats = 1 if args.quick else args.repeats
    on_gpu = mx.default_device() == mx.gpu
    dtype = getattr(mx, args.dtype or ("bfloat16" if on_gpu else "float32"))
    payload = {
        "device": str(mx.default_device()),
        "quick": args.quick,
        "tower_sizes": tower_sizes(),
        "preprocess": preprocess_rows(budgets, repeats),
        "tower": tower_rows(budgets, layers, dtype, repeats, towers),
        "ttft": ttft_row(repeats),
    }
    name = (
        "vision_quick" if args.quick else f"vision_{str(mx.default_device().type).split('.')[-1]}"
    )
    path = write_json(args.out, name, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
