"""Our MLX audio tower + embedder against transformers' Gemma4AudioModel on a tiny random config."""

import mlx.core as mx
import numpy as np
import pytest
import tiny_audio

from gemma4_mlx.config import parse_config
from gemma4_mlx.errors import UserError
from gemma4_mlx.media.audio import token_count
from gemma4_mlx.models import audio
from gemma4_mlx.models.vision import MultimodalEmbedder

TOL = 5e-5


def _build(config: dict, seed: int = 0):
    ref_tower, ref_embedder = tiny_audio.build_reference(seed=seed, config=config)
    cfg = audio.audio_config_from_dict(config)
    tower = audio.AudioModel(cfg)
    embedder = MultimodalEmbedder(cfg.output_proj_dims, tiny_audio.TEXT_HIDDEN, cfg.rms_norm_eps)
    weights = {k: mx.array(v) for k, v in tiny_audio.mlx_weights(ref_tower, ref_embedder).items()}
    weights = tower.sanitize(weights, prefix="audio_tower.")
    tower.load_weights(
        [(k.removeprefix("audio_tower."), v) for k, v in weights.items() if "audio_tower." in k]
    )
    embedder.load_weights(
        [(k.removeprefix("embed_audio."), v) for k, v in weights.items() if "embed_audio." in k]
    )
    return (ref_tower, ref_embedder), (tower, embedder)


@pytest.fixture(scope="module")
def towers():
    return _build(tiny_audio.AUDIO_CONFIG)


def _ours(tower, embedder, feats, mask):
    hidden, out_mask = tower(mx.array(feats), mx.array(mask))
    return np.array(hidden), np.array(out_mask), np.array(embedder(hidden))


def test_clip_bounds_and_caps_are_active_in_the_reference(towers):
    """The perturbed bounds must really clip, or the parity test below could not see them."""
    import torch

    (ref_tower, _), _ = towers
    feats, mask = tiny_audio.probe_features(seed=3)
    hit = []

    def hook(module, args, output):
        lin = module.linear
        y = lin(torch.clamp(args[0], module.input_min, module.input_max))
        hit.append(bool((output.abs() < y.abs() - 1e-6).any()))

    mods = [m for m in ref_tower.modules() if type(m).__name__ == "Gemma4ClippableLinear"]
    handles = [m.register_forward_hook(hook) for m in mods]
    with torch.no_grad():
        ref_tower(torch.from_numpy(feats), torch.from_numpy(mask))
    for h in handles:
        h.remove()
    print(f"{sum(hit)}/{len(hit)} clippable linears clip their output")
    assert sum(hit) >= len(hit) // 2


def test_tower_and_embedder_match_transformers_two_clips_of_different_length(towers):
    (ref_tower, ref_embedder), (tower, embedder) = towers
    feats, mask = tiny_audio.probe_features(seed=1, lengths=(150, 61))
    ref_hidden, ref_mask, ref_emb = tiny_audio.reference_outputs(
        ref_tower, ref_embedder, feats, mask
    )
    hidden, out_mask, emb = _ours(tower, embedder, feats, mask)
    assert (out_mask == ref_mask).all()
    assert out_mask.sum(1).tolist() == [38, 16]  # ceil(ceil(n/2)/2)
    err_hidden = float(np.abs(hidden - ref_hidden).max())
    valid = ref_mask[..., None]
    err_emb = float(np.abs((emb - ref_emb) * valid).max())
    scale = float(np.abs(ref_emb).max())
    print(
        f"audio tower: max |diff| {err_hidden:.2e}; embedded soft tokens {err_emb:.2e} (max {scale:.2f})"
    )
    assert err_hidden <= TOL
    assert err_emb <= TOL


def test_each_clip_encodes_as_if_it_were_alone(towers):
    """Padding in a batch changes nothing for the real frames of the shorter clip."""
    _, (tower, embedder) = towers
    feats, mask = tiny_audio.probe_features(seed=2, lengths=(140, 70))
    _, _, batched = _ours(tower, embedder, feats, mask)
    _, _, alone = _ours(tower, embedder, feats[1:, :70], mask[1:, :70])
    err = float(np.abs(batched[1, : alone.shape[1]] - alone[0]).max())
    print(f"short clip batched vs alone: max |diff| {err:.2e}")
    assert err <= TOL


def test_soft_tokens_are_the_real_frames_only(towers):
    _, (tower, embedder) = towers
    feats, mask = tiny_audio.probe_features(seed=4, lengths=(99, 40))
    tokens = audio.audio_soft_tokens(tower, embedder, mx.array(feats), mx.array(mask))
    assert [t.shape for t in tokens] == [(25, 64), (10, 64)]
    assert [token_count(m) for m in mask] == [25, 10]


@pytest.mark.parametrize("offset", [-1, 0])
def test_attention_window_follows_the_named_constant(monkeypatch, offset):
    """Query t depends on frames t-window+1 .. t only: 12 frames (transformers) or 13 (mlx-vlm)."""
    monkeypatch.setattr(audio, "WINDOW_MINUS_CONTEXT_LEFT", offset)
    cfg = audio.audio_config_from_dict(dict(tiny_audio.AUDIO_CONFIG, use_clipped_linears=False))
    attn = audio.Attention(cfg)
    T, t = 40, 30
    x = mx.random.normal((1, T, cfg.hidden_size), key=mx.random.key(0))
    mask = audio.block_attention_mask(cfg, mx.ones((1, T), dtype=mx.bool_))
    pos = audio.relative_position_embeddings(cfg)
    base = np.array(attn(x, pos, mask))[0, t]
    seen = []
    for s in range(T):
        bumped = x.at[0, s].add(1.0)
        if np.abs(np.array(attn(bumped, pos, mask))[0, t] - base).max() > 1e-6:
            seen.append(s)
    window = 13 + offset
    print(f"offset {offset}: query {t} sees frames {seen[0]}..{seen[-1]}")
    assert seen == list(range(t - window + 1, t + 1))


def test_audio_config_errors_name_the_field():
    with pytest.raises(UserError, match="hidden_size"):
        audio.audio_config_from_dict({"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(UserError, match="subsampling_conv_channels"):
        audio.audio_config_from_dict({"subsampling_conv_channels": [128]})
    with pytest.raises(UserError, match="hidden_act"):
        audio.audio_config_from_dict({"hidden_act": "tanh"})
    text = {
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
    }
    cfg = parse_config({"model_type": "gemma4", "text_config": text})
    assert audio.parse_audio_config(cfg) is None
    cfg = parse_config({"model_type": "gemma4", "text_config": text, "audio_config": {}})
    assert audio.parse_audio_config(cfg) == audio.AudioConfig()


def test_released_tower_shape_matches_transformers():
    """E2B/E4B's real audio_config (transformers' defaults: hidden 1024, 8 heads of 128, channels
    128/32, cap 50, clamp 1e10, output 1536) cut to 2 layers, random perturbed weights."""
    config = dict(num_hidden_layers=2)
    (ref_tower, ref_embedder), (tower, embedder) = _build(config, seed=5)
    assert tower.config == audio.AudioConfig(num_hidden_layers=2)
    feats, mask = tiny_audio.probe_features(seed=6, lengths=(130, 77))
    ref_hidden, ref_mask, ref_emb = tiny_audio.reference_outputs(
        ref_tower, ref_embedder, feats, mask
    )
    hidden, out_mask, emb = _ours(tower, embedder, feats, mask)
    assert (out_mask == ref_mask).all()
    err = float(np.abs(hidden - ref_hidden).max())
    rel = err / float(np.abs(ref_hidden).max())
    print(f"released shape, 2 layers: max |diff| {err:.2e} (relative {rel:.1e})")
    assert rel <= 1e-5


def test_sanitize_drops_recomputed_buffers_and_fixes_layouts(towers):
    _, (tower, _) = towers
    h = tower.config.hidden_size
    weights = {
        "audio_tower.rel_pos_enc.inv_timescales": mx.zeros((1, 1, h // 2)),
        "audio_tower.layers.0.self_attn.softcap": mx.array(2.0),
        "audio_tower.layers.0.self_attn.q_proj.input_max": mx.array([3.0]),
        "audio_tower.subsample_conv_projection.layer1.conv.weight": mx.zeros((8, 128, 3, 3)),
        "audio_tower.layers.0.lconv1d.depthwise_conv1d.weight": mx.zeros((h, 1, 5)),
        "language_model.model.norm.weight": mx.zeros((4, 1, 3)),  # not ours: untouched
    }
    out = tower.sanitize(weights, prefix="audio_tower.")
    assert "audio_tower.rel_pos_enc.inv_timescales" not in out
    assert "audio_tower.layers.0.self_attn.softcap" not in out
    assert out["audio_tower.layers.0.self_attn.q_proj.input_max"].shape == ()
    assert out["audio_tower.subsample_conv_projection.layer1.conv.weight"].shape == (8, 3, 3, 128)
    assert out["audio_tower.layers.0.lconv1d.depthwise_conv1d.weight"].shape == (h, 5, 1)
    assert out["language_model.model.norm.weight"].shape == (4, 1, 3)
    again = tower.sanitize(out, prefix="audio_tower.")  # MLX layouts pass unchanged
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in out.items()}
