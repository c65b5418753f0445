"""Gemma 4 with audio (and an image) in one prompt against transformers'
Gemma4ForConditionalGeneration on a tiny random checkpoint with vision and audio towers."""

import mlx.core as mx
import numpy as np
import pytest
import tiny_audio
import tiny_multimodal as tmm

from gemma4_mlx.loading import load_model
from gemma4_mlx.media.audio import log_mel_features, token_count
from gemma4_mlx.models.multimodal import mm_token_type_ids, parse_media_tokens

TOL = 5e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_audio.write_full_checkpoint(tmp_path_factory.mktemp("tiny-e2b-audio"))


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """A voiced, formant-like 16 kHz signal with noise (deterministic, no files needed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.1 * x + 0.01 * rng.normal(size=t.shape)).astype(np.float32)


def _prompt(image_tokens: int | None, audio_tokens: list[int]) -> list[int]:
    rng = np.random.default_rng(0)
    ids = [2] + rng.integers(3, 400, 5).tolist()
    if image_tokens is not None:
        ids += [tmm.BOI] + [tmm.IMG] * image_tokens + [tmm.EOI] + rng.integers(3, 400, 3).tolist()
    for n in audio_tokens:
        ids += [tmm.BOA] + [tmm.AUD] * n + [tmm.EOA] + rng.integers(3, 400, 2).tolist()
    return ids + rng.integers(3, 400, 4).tolist()


def _inputs(with_image: bool):
    feats, mask = log_mel_features([_speechlike(1.0, 0), _speechlike(0.6, 1)])
    counts = [token_count(m) for m in mask]
    media = dict(input_features=feats, input_features_mask=mask)
    n_img = None
    if with_image:
        img = tmm.image_processor(70)([tmm.photo(50, 70, 3)], return_tensors="np")
        media.update(pixel_values=img["pixel_values"], image_position_ids=img["image_position_ids"])
        n_img = (
            int(img["num_soft_tokens_per_image"][0]) if "num_soft_tokens_per_image" in img else 63
        )
    ids = np.array([_prompt(n_img, counts)])
    return ids, media, counts


def _reference_logits(ref, ids, media, types):
    import torch

    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in media.items()}
    with torch.no_grad():
        out = ref(
            input_ids=torch.from_numpy(ids), mm_token_type_ids=torch.from_numpy(types), **kwargs
        )
    return out.logits.numpy()


@pytest.mark.parametrize("with_image", [False, True], ids=["audio+text", "audio+image+text"])
def test_logits_match_transformers_with_two_clips(checkpoint, with_image):
    path, ref = checkpoint
    model, config = load_model(path)
    assert model.has_audio
    ids, media, counts = _inputs(with_image)
    assert counts == [25, 15]
    types = mm_token_type_ids(ids, parse_media_tokens(config.raw))
    ours = np.array(model(mx.array(ids), mm_token_type_ids=types, **media))
    want = _reference_logits(ref, ids, media, types)
    err = float(np.abs(ours - want).max())
    top1 = float((ours.argmax(-1) == want.argmax(-1)).mean())
    print(
        f"{'image+' if with_image else ''}audio prompt ({ids.shape[1]} tokens): "
        f"max |logit diff| {err:.2e}, top-1 agreement {top1:.3f}"
    )
    assert err <= TOL
    assert top1 == 1.0
    # The audio really moves the logits (a dropped tower would not fail the test above otherwise).
    silent = dict(media, input_features=np.zeros_like(media["input_features"]))
    moved = np.abs(np.array(model(mx.array(ids), mm_token_type_ids=types, **silent)) - ours).max()
    assert moved > 1e-2


def test_audio_without_its_mask_or_with_the_wrong_token_count_is_an_error(checkpoint):
    path, _ = checkpoint
    model, _ = load_model(path)
    ids, media, _ = _inputs(False)
    with pytest.raises(ValueError, match="input_features_mask"):
        model(mx.array(ids), input_features=media["input_features"])
    short = np.array([ids[0][ids[0] != tmm.AUD].tolist() + [tmm.AUD] * 3])
    with pytest.raises(ValueError, match="audio"):
        model(mx.array(short), **media)


def test_text_only_load_skips_the_audio_tower(checkpoint):
    path, _ = checkpoint
    model, _ = load_model(path, text_only=True)
    assert not getattr(model, "has_audio", False)
