"""The vision tower and the multimodal model against transformers' Gemma4ForConditionalGeneration
(float32, tiny random configs with every constant-initialised tensor perturbed)."""

import mlx.core as mx
import numpy as np
import pytest
import tiny_multimodal as tm
import torch

from gemma4_mlx.loading import load_model
from gemma4_mlx.media.image import preprocess_images
from gemma4_mlx.models.multimodal import mm_token_type_ids

FLAVOURS = list(tm.FLAVOURS)
TOL = 5e-4


@pytest.fixture(scope="session")
def tiny_mm(tmp_path_factory):
    """flavour -> (checkpoint dir, transformers model, our model), built once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            path, ref = tm.write_checkpoint(name, tmp_path_factory.mktemp(f"mm-{name}"))
            cache[name] = (path, ref, load_model(path)[0])
        return cache[name]

    return get


def _compare(what, ours, ref, tol=TOL):
    err = float(np.abs(ours - ref).max())
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{what}: max |logit diff| = {err:.2e}, top-1 agreement = {top1:.3f}")
    assert err <= tol
    assert top1 == 1.0


def _images(budget=70):
    # two non-square photos of different sizes and orientations
    return preprocess_images([tm.photo(50, 70, 1), tm.photo(90, 40, 2)], budget, tm.PATCH)


def _prompt(counts, seed=0):
    rng = np.random.default_rng(seed)
    pieces = [list(rng.integers(3, 400, n)) for n in (5, 4, 6)][: len(counts) + 1]
    return np.array([tm.expand_prompt(pieces, counts)])


def _torch_kwargs(ids, feats, types=True, tokens=None):
    kw = dict(
        input_ids=torch.tensor(ids),
        pixel_values=torch.tensor(feats["pixel_values"]),
        image_position_ids=torch.tensor(feats["image_position_ids"]),
    )
    if types:
        kw["mm_token_type_ids"] = torch.tensor(mm_token_type_ids(ids, tokens))
    return kw


def _ours_kwargs(ids, feats, tokens):
    return dict(
        pixel_values=feats["pixel_values"],
        image_position_ids=feats["image_position_ids"],
        mm_token_type_ids=mm_token_type_ids(ids, tokens),
    )


@pytest.mark.parametrize("name", FLAVOURS)
def test_vision_tower_and_embedder_match_transformers(name, tiny_mm):
    _, ref, model = tiny_mm(name)
    feats = _images()
    with torch.no_grad():
        out = ref.model.get_image_features(
            torch.tensor(feats["pixel_values"]),
            torch.tensor(feats["image_position_ids"]),
            return_dict=True,
        )
    theirs_tower = out.last_hidden_state.numpy()
    theirs = torch.cat(out.pooler_output).numpy()
    tower = model.vision_tower(feats["pixel_values"], feats["image_position_ids"])
    ours_tower = np.concatenate([np.array(t) for t in tower])
    ours = np.array(model.embed_image(feats["pixel_values"], feats["image_position_ids"]))
    assert [t.shape[0] for t in tower] == feats["num_soft_tokens_per_image"]
    rel = float(np.abs(ours_tower - theirs_tower).max() / np.abs(theirs_tower).max())
    err = float(np.abs(ours - theirs).max())
    print(f"{name}: tower max rel diff {rel:.2e}, soft tokens max |diff| {err:.2e}")
    assert rel <= 1e-5
    assert err <= 1e-5 * max(1.0, float(np.abs(theirs).max()))


@pytest.mark.parametrize("name", FLAVOURS)
def test_perturbed_constants_are_visible(name, tiny_mm):
    """The clip bounds (E2B) and std_bias/std_scale (26B) change the output: a port that
    ignored them would fail the parity tests."""
    _, _, model = tiny_mm(name)
    feats = _images()
    base = np.array(model.embed_image(feats["pixel_values"], feats["image_position_ids"]))
    tower = model.vision_tower
    if name == "e2b":
        lin = tower.encoder.layers[0].mlp.up_proj
        saved = (lin.input_min, lin.input_max)
        lin.input_min, lin.input_max = mx.array(-np.inf), mx.array(np.inf)
    else:
        saved = tower.std_bias
        tower.std_bias = mx.zeros_like(saved)
    changed = np.array(model.embed_image(feats["pixel_values"], feats["image_position_ids"]))
    if name == "e2b":
        lin.input_min, lin.input_max = saved
    else:
        tower.std_bias = saved
    print(
        f"{name}: output change without the perturbed constant {np.abs(changed - base).max():.3f}"
    )
    assert np.abs(changed - base).max() > 1e-2


@pytest.mark.parametrize("budget", [70, 140])
@pytest.mark.parametrize("name", FLAVOURS)
def test_image_prompt_logits_match_transformers(name, budget, tiny_mm):
    """Two non-square images of different sizes, each block (>= 60 tokens) longer than the
    sliding window (8); on 26B the bidirectional overlay (checked to matter)."""
    _, ref, model = tiny_mm(name)
    feats = _images(budget)
    ids = _prompt(feats["num_soft_tokens_per_image"])
    tokens = model.media_tokens
    with torch.no_grad():
        theirs = ref(**_torch_kwargs(ids, feats, tokens=tokens), use_cache=False).logits.numpy()
        causal = ref(**_torch_kwargs(ids, feats, types=False), use_cache=False).logits.numpy()
    ours = np.array(model(mx.array(ids), **_ours_kwargs(ids, feats, tokens)))
    _compare(f"{name} budget {budget} prefill ({ids.shape[1]} tokens)", ours, theirs)
    overlay = float(np.abs(causal - theirs).max())
    print(f"{name}: bidirectional overlay changes the reference logits by {overlay:.3f}")
    assert (overlay > 1e-2) == (name == "26b")


@pytest.mark.parametrize("name", FLAVOURS)
def test_decode_after_image_matches_transformers(name, tiny_mm):
    """Prefill through the cache (the image in one call), then token by token past the window."""
    _, ref, model = tiny_mm(name)
    feats = _images()
    counts = feats["num_soft_tokens_per_image"]
    ids = np.concatenate([_prompt(counts), _prompt([], seed=7)[:, :3], _prompt([], 8)], axis=1)
    tokens = model.media_tokens
    with torch.no_grad():
        theirs = ref(**_torch_kwargs(ids, feats, tokens=tokens), use_cache=False).logits.numpy()
    n = _prompt(counts).shape[1]
    cache = model.make_cache()
    kw = _ours_kwargs(ids[:, :n], feats, tokens)
    outs = [np.array(model(mx.array(ids[:, :n]), cache=cache, **kw))]
    for t in range(n, ids.shape[1]):
        outs.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    _compare(f"{name} prefill + {ids.shape[1] - n} decode steps", np.concatenate(outs, 1), theirs)


@pytest.mark.parametrize("name", FLAVOURS)
def test_greedy_generation_with_image_equals_transformers(name, tiny_mm):
    _, ref, model = tiny_mm(name)
    feats = _images()
    ids = _prompt(feats["num_soft_tokens_per_image"])
    tokens, n_new = model.media_tokens, 12
    cache = model.make_cache()
    logits = model(mx.array(ids), cache=cache, last_only=True, **_ours_kwargs(ids, feats, tokens))
    ours = []
    for _ in range(n_new):
        ours.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[ours[-1]]]), cache=cache)
    with torch.no_grad():
        out = ref.generate(
            **_torch_kwargs(ids, feats, tokens=tokens),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    theirs = out[0, ids.shape[1] :].tolist()
    print(f"{name}: ours {ours}\n{name}: transformers {theirs}")
    assert ours == theirs


@pytest.mark.parametrize("name", FLAVOURS)
def test_video_frames_match_transformers(name, tiny_mm):
    """Frames through pixel_values_videos: one 70-token block per frame, each wrapped in
    boi/eoi after an MM:SS label (here: arbitrary text ids), soft tokens in <|video|> slots."""
    _, ref, model = tiny_mm(name)
    frames = [tm.photo(60, 80, s) for s in range(3)]
    feats = preprocess_images(frames, 70, tm.PATCH)
    ids = [7, 8]
    for n in feats["num_soft_tokens_per_image"]:
        ids += [30, 31, tm.BOI] + [tm.VID] * n + [tm.EOI]
    ids = np.array([ids + [9, 10]])
    types = mm_token_type_ids(ids, model.media_tokens)
    with torch.no_grad():
        theirs = ref(
            input_ids=torch.tensor(ids),
            pixel_values_videos=torch.tensor(feats["pixel_values"]),
            video_position_ids=torch.tensor(feats["image_position_ids"]),
            num_frames_per_video=torch.tensor([3]),
            mm_token_type_ids=torch.tensor(types),
            use_cache=False,
        ).logits.numpy()
    ours = model(
        mx.array(ids),
        pixel_values_videos=feats["pixel_values"],
        video_position_ids=feats["image_position_ids"],
        mm_token_type_ids=types,
    )
    _compare(f"{name} video of 3 frames", np.array(ours), theirs)


def test_token_feature_count_mismatch_raises(tiny_mm):
    _, _, model = tiny_mm("e2b")
    feats = _images()
    ids = _prompt([feats["num_soft_tokens_per_image"][0], 5])
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        model(mx.array(ids), **_ours_kwargs(ids, feats, model.media_tokens))


def test_text_only_load_has_no_tower_and_same_text_logits(tiny_mm):
    path, ref, model = tiny_mm("e2b")
    text, _ = load_model(path, text_only=True)
    assert "vision_tower" not in text.language_model and not hasattr(text, "vision_tower")
    ids = mx.array(_prompt([])[:, :9])
    assert np.array_equal(np.array(text(ids)), np.array(model(ids)))
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(np.array(ids)), use_cache=False).logits.numpy()
    _compare("e2b text-only", np.array(text(ids)), theirs)


@pytest.mark.parametrize("name", FLAVOURS)
def test_image_after_cached_text_matches_transformers(name, tiny_mm):
    """A chat turn: text already in the cache (past the sliding window), then a call holding
    the image: the overlay is built against the cache's keys, not just this call's."""
    _, ref, model = tiny_mm(name)
    feats = _images()
    counts = feats["num_soft_tokens_per_image"]
    prefix = _prompt([], seed=3)[:, :5]
    prefix = np.concatenate([prefix, _prompt([], seed=4)[:, :5], prefix[:, :3]], axis=1)
    ids = np.concatenate([prefix, _prompt(counts)], axis=1)
    tokens = model.media_tokens
    with torch.no_grad():
        theirs = ref(**_torch_kwargs(ids, feats, tokens=tokens), use_cache=False).logits.numpy()
    cache = model.make_cache()
    n = prefix.shape[1]
    first = np.array(model(mx.array(ids[:, :n]), cache=cache))
    rest = model(mx.array(ids[:, n:]), cache=cache, **_ours_kwargs(ids[:, n:], feats, tokens))
    _compare(f"{name} {n} cached text tokens then images", np.concatenate([first, rest], 1), theirs)


def test_turboquant_cache_runs_image_prompts(tiny_mm, monkeypatch):
    """Global layers stay causal, so the TurboQuant cache takes image prompts unchanged: the
    global layer's attention output is the exact cache's to within K8/V8's error.

    The logits are compared by their top-1 only: in this tiny MoE a change of ~0.04 in one
    position's attention output can flip that token's expert choice (a jump of ~0.5 in its
    logits with the uniform grid at rotation seeds 0-2, 0.01 elsewhere), a discontinuity of the
    router, not of the cache."""
    import gemma4_mlx.models.text as text
    from gemma4_mlx.cache import KVPolicy

    _, _, model = tiny_mm("26b")
    feats = _images()
    ids = _prompt(feats["num_soft_tokens_per_image"])
    kw = _ours_kwargs(ids, feats, model.media_tokens)
    real, seen = text.attend, []

    def record(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(text, "attend", record)
    exact = np.array(model(mx.array(ids), cache=model.make_cache(), **kw))
    exact_global = np.array(seen[-1])  # the last layer is the global one
    cache = model.make_cache(KVPolicy(kind="turboquant", bits=8.0))  # K8/V8: near exact
    tq = np.array(model(mx.array(ids), cache=cache, **kw))
    tq_global = np.array(seen[-1])
    step = np.array(model(mx.array([[7]]), cache=cache))
    attn_err = float(np.abs(tq_global - exact_global).max())
    top1 = float((tq.argmax(-1) == exact.argmax(-1)).mean())
    print(
        f"turboquant K8/V8 vs exact cache on an image prompt: global attention max |diff| "
        f"{attn_err:.3e}, logits max |diff| {np.abs(tq - exact).max():.3e}, top-1 {top1:.3f}"
    )
    assert type(cache[-1]).__name__ == "TurboQuantKVCache"  # the global layer's, compressed
    assert np.isfinite(step).all() and attn_err < 0.1 and top1 >= 0.97


def test_float16_pool_scale_standardize_run_in_float32(tiny_mm, monkeypatch):
    """26B/31B pooled features times sqrt(Hv) exceed float16's 65504 and std_bias is O(1e4):
    pool, scale and standardize run in float32, so float16 encoder outputs of 1.5e4 (which
    float16 holds) still give the exact standardized features (ports that did these steps in
    float16 got inf/NaN, hence the <pad>-only output)."""
    _, _, model = tiny_mm("26b")
    tower = model.vision_tower
    feats = _images()
    n = int((feats["image_position_ids"][0, :, 0] >= 0).sum())
    rng = np.random.default_rng(0)
    hidden = rng.uniform(1.2e4, 1.6e4, (1, n, tower.config.hidden_size)).astype(np.float16)
    monkeypatch.setattr(tower, "encode", lambda pixels, positions: mx.array(hidden))
    bias = rng.uniform(8e4, 9e4, tower.config.hidden_size).astype(np.float32)
    scale = rng.uniform(1e-4, 2e-4, tower.config.hidden_size).astype(np.float32)
    monkeypatch.setattr(tower, "std_bias", mx.array(bias))
    monkeypatch.setattr(tower, "std_scale", mx.array(scale))
    out = np.array(tower(feats["pixel_values"][:1], feats["image_position_ids"][:1])[0])
    # the same in float64 with numpy (encode's rows come grouped by pooling cell, 9 each)
    cells = hidden[0].astype(np.float64).reshape(n // 9, 9, -1)
    pooled = cells.mean(1) * np.sqrt(hidden.shape[-1])
    expected = (pooled - bias) * scale
    err = float(np.abs(out - expected).max() / np.abs(expected).max())
    print(f"pooled*sqrt(Hv) up to {pooled.max():.0f}; float32 stage vs float64: rel {err:.1e}")
    assert pooled.max() > 65504 and np.isfinite(out).all() and err < 1e-5


REAL_VISION = {  # vision_config of the released E4B and 31B config.json files
    "e4b": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16,
                num_attention_heads=12, num_key_value_heads=12, head_dim=64, patch_size=16,
                pooling_kernel_size=3, position_embedding_size=10240, rms_norm_eps=1e-6,
                hidden_activation="gelu_pytorch_tanh", use_clipped_linears=True,
                standardize=False, default_output_length=280,
                rope_parameters={"rope_theta": 100, "rope_type": "default"}),
    "31b": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                num_attention_heads=16, num_key_value_heads=16, head_dim=72, patch_size=16,
                pooling_kernel_size=3, position_embedding_size=10240, rms_norm_eps=1e-6,
                hidden_activation="gelu_pytorch_tanh", use_clipped_linears=False,
                standardize=True, default_output_length=280,
                rope_parameters={"rope_theta": 100, "rope_type": "default"}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL_VISION))
def test_real_vision_configs_parse_and_match_transformers_parameter_count(name):
    from mlx.utils import tree_flatten
    from transformers import Gemma4VisionConfig, Gemma4VisionModel

    from gemma4_mlx.models.vision import VisionModel, parse_vision_config

    cfg = parse_vision_config({"vision_config": REAL_VISION[name]})
    assert cfg.head_dim == REAL_VISION[name]["head_dim"] and cfg.rope_theta == 100.0
    ours = sum(v.size for _, v in tree_flatten(VisionModel(cfg).parameters()))
    with torch.device("meta"):
        ref = Gemma4VisionModel(Gemma4VisionConfig(**REAL_VISION[name]))
    theirs = sum(t.numel() for t in ref.state_dict().values())
    print(f"{name}: vision tower parameters ours {ours:,}, transformers {theirs:,}")
    assert ours == theirs


@pytest.mark.parametrize(
    "change, message",
    [
        ({"head_dim": 70}, "'head_dim'=70 must be a multiple of 4"),
        ({"hidden_size": "wide"}, "'hidden_size'='wide' should be of type int"),
        ({"num_key_value_heads": 5}, "not a multiple of num_key_value_heads=5"),
        ({"rope_parameters": {"rope_type": "yarn"}}, "rope_type 'yarn' is not supported"),
    ],
)
def test_bad_vision_config_names_the_field(change, message):
    from gemma4_mlx.errors import UserError
    from gemma4_mlx.models.vision import parse_vision_config

    with pytest.raises(UserError, match=message):
        parse_vision_config({"vision_config": {**REAL_VISION["e4b"], **change}}, "m/config.json")


def test_real_31b_tower_shape_one_layer_matches_transformers():
    """The real 26B/31B tower width (1152, 16 heads of dim 72: the padded attention path) and
    patch size 16, cut to one layer, on a real-size photo at budget 70."""
    from transformers import Gemma4VisionConfig, Gemma4VisionModel

    from gemma4_mlx.models.vision import VisionModel, parse_vision_config

    vc = dict(REAL_VISION["31b"], num_hidden_layers=1)
    torch.manual_seed(0)
    ref = Gemma4VisionModel(Gemma4VisionConfig(**vc)).float().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, t in ref.state_dict().items():
            noise = torch.randn(t.shape, generator=gen)
            if key.endswith(("q_norm.weight", "k_norm.weight")):
                t.copy_(0.5 + 0.1 * noise)
            elif "norm" in key or key.endswith("std_scale"):
                t.copy_(1.0 + 0.2 * noise)
            elif key.endswith(("std_bias", "position_embedding_table")):
                t.copy_(0.5 * noise)
            else:
                t.copy_(0.02 * noise)
    ours = VisionModel(parse_vision_config({"vision_config": vc}))
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in ref.state_dict().items()])
    feats = preprocess_images([tm.photo(480, 640, 3)], 70)
    with torch.no_grad():
        theirs = ref(
            pixel_values=torch.tensor(feats["pixel_values"]),
            pixel_position_ids=torch.tensor(feats["image_position_ids"]),
        ).last_hidden_state.numpy()
    got = np.array(ours(feats["pixel_values"], feats["image_position_ids"])[0])
    rel = float(np.abs(got - theirs).max() / np.abs(theirs).max())
    print(f"31B-shaped tower, 1 layer, {got.shape[0]} tokens: max rel diff {rel:.2e}")
    assert got.shape == theirs.shape and rel <= 1e-5


@pytest.mark.parametrize("name", FLAVOURS)
def test_batch_of_two_prompts_with_different_images(name, tiny_mm):
    """Row-major scatter over the batch: each prompt gets its own image's soft tokens."""
    _, ref, model = tiny_mm(name)
    feats = _images()
    a, b = feats["num_soft_tokens_per_image"]
    rng = np.random.default_rng(5)
    text = lambda n: list(rng.integers(3, 400, n))  # noqa: E731
    pad = abs(a - b)
    rows = [
        tm.expand_prompt([text(5 + (pad if a < b else 0)), text(6)], [a]),
        tm.expand_prompt([text(5 + (pad if b < a else 0)), text(6)], [b]),
    ]
    ids = np.array(rows)
    tokens = model.media_tokens
    with torch.no_grad():
        theirs = ref(**_torch_kwargs(ids, feats, tokens=tokens), use_cache=False).logits.numpy()
    ours = np.array(model(mx.array(ids), **_ours_kwargs(ids, feats, tokens)))
    _compare(f"{name} batch of 2 prompts, one image each", ours, theirs)
