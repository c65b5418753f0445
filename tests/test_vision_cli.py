"""Images through the Python API and the CLI on a tiny E2B-style checkpoint with a vision tower."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import tiny_multimodal as tm
from PIL import Image
from test_cli import run_cli

from gemma4_mlx.errors import UserError
from gemma4_mlx.generate import generate
from gemma4_mlx.loading import load
from gemma4_mlx.media import prepare_images, with_image_placeholders
from gemma4_mlx.models.multimodal import mm_token_type_ids
from gemma4_mlx.tokenizer import build_prompt

MEDIA = ["<|image>", "<|image|>", "<image|>", "<|video|>", "<|audio>", "<|audio|>", "<audio|>"]
KEYS = ["boi_token_id", "image_token_id", "eoi_token_id", "video_token_id", "boa_token_id"]
KEYS += ["audio_token_id", "eoa_token_index"]


@pytest.fixture(scope="session")
def tiny_mm_chat(tmp_path_factory):
    """A tiny E2B-style checkpoint with a vision tower (patch 4), a tiny tokenizer with Gemma 4's media tokens, and config.json ids pointing at them."""
    from tiny_tokenizer import write_tokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("mm-chat")
    src, _ = tm.write_checkpoint("e2b", root / "src")
    dst = root / "model"
    shutil.copytree(src, dst)
    write_tokenizer(dst)
    tok = PreTrainedTokenizerFast.from_pretrained(str(dst))
    tok.add_special_tokens({"additional_special_tokens": MEDIA})
    tok.save_pretrained(str(dst))
    config = json.loads((dst / "config.json").read_text())
    for key, text in zip(KEYS, MEDIA):
        config[key] = tok.convert_tokens_to_ids(text)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="session")
def photo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    tm.photo(30, 44, 3).save(path)  # patch 4: resized to fill the 70-token budget
    return path


def test_api_generate_with_image_equals_direct_model_calls(tiny_mm_chat, photo_file):
    model, tokenizer = load(tiny_mm_chat)
    prompt = with_image_placeholders(tokenizer, model.media_tokens, "what is this", 1)
    ids = build_prompt(tokenizer, prompt)
    result = generate(model, tokenizer, ids, max_tokens=6, images=[photo_file], image_tokens=70)
    expanded, media, counts = prepare_images(model, ids, [photo_file], 70)
    assert result.image_tokens == counts and result.prompt_tokens == len(expanded)
    cache = model.make_cache()
    logits = model(mx.array([expanded]), cache=cache, **media)
    ours = []
    for _ in range(len(result.tokens)):
        ours.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[ours[-1]]]), cache=cache)
    print(f"generate(images=...) {result.tokens}, direct {ours}")
    assert result.tokens == ours


def test_image_changes_the_answer(tiny_mm_chat, photo_file, tmp_path):
    model, tokenizer = load(tiny_mm_chat)
    prompt = with_image_placeholders(tokenizer, model.media_tokens, "what", 1)
    ids = build_prompt(tokenizer, prompt)
    other = tmp_path / "other.png"
    Image.fromarray(np.full((30, 44, 3), 250, np.uint8)).save(other)
    a = generate(model, tokenizer, ids, max_tokens=8, images=[photo_file], image_tokens=70)
    b = generate(model, tokenizer, ids, max_tokens=8, images=[other], image_tokens=70)
    assert a.tokens != b.tokens


def test_cli_image_json_reports_soft_tokens(tiny_mm_chat, photo_file, capsys):
    args = ["generate", "-m", str(tiny_mm_chat), "-p", "describe", "--max-tokens", "4"]
    args += ["--image", str(photo_file), "--image", str(photo_file), "--image-tokens", "70"]
    code, out, err = run_cli([*args, "--json"], capsys)
    assert code == 0, err
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        get_aspect_ratio_preserving_size,
    )

    th, tw = get_aspect_ratio_preserving_size(30, 44, tm.PATCH, 9 * 70, 3)
    expected = (th // tm.PATCH) * (tw // tm.PATCH) // 9
    result = json.loads(out)
    assert result["image_tokens"] == [expected, expected]
    assert result["prompt_tokens"] > 2 * expected


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "/nonexistent.png"], "no such image file"),
        (["--image-tokens", "100"], "not one of 70, 140, 280, 560, 1120"),
    ],
)
def test_cli_bad_image_input_is_one_line(tiny_mm_chat, photo_file, capsys, extra, message):
    args = ["generate", "-m", str(tiny_mm_chat), "-p", "hi", "--max-tokens", "2"]
    if extra[0] == "--image-tokens":
        extra = ["--image", str(photo_file), *extra]
    code, _, err = run_cli([*args, *extra], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-tokens", "70"], "--image-tokens needs --image"),
        (["--video-frames", "4"], "--video-frames/--video-fps need --video"),
        (["--video-fps", "1"], "--video-frames/--video-fps need --video"),
    ],
)
def test_media_options_without_their_media_are_refused(tiny_chat_model, capsys, extra, message):
    """A media option with no media to apply it to would be silently ignored: refuse it."""
    args = ["generate", "-m", str(tiny_chat_model), "-p", "hi", "--max-tokens", "2", *extra]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_unreadable_image_is_one_line(tiny_mm_chat, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    args = ["generate", "-m", str(tiny_mm_chat), "-p", "hi", "--image", str(bad)]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "not a readable image" in err and err.count("\n") == 1


def test_image_to_text_only_model_is_one_line(tiny_chat_model, tiny_mm_chat, photo_file, capsys):
    for args in (
        ["-m", str(tiny_chat_model)],
        ["-m", str(tiny_mm_chat), "--text-only"],
    ):
        full = ["generate", *args, "-p", "hi", "--image", str(photo_file)]
        code, _, err = run_cli(full, capsys)
        assert code == 2 and "no vision tower" in err and err.count("\n") == 1


def test_text_only_cli_still_generates(tiny_mm_chat, capsys):
    args = ["generate", "-m", str(tiny_mm_chat), "-p", "hello", "--max-tokens", "3", "--json"]
    code, out, err = run_cli([*args, "--text-only"], capsys)
    assert code == 0, err
    code2, out2, _ = run_cli(args, capsys)
    assert json.loads(out)["tokens"] == json.loads(out2)["tokens"]


def test_placeholder_count_mismatch_raises(tiny_mm_chat, photo_file):
    model, tokenizer = load(tiny_mm_chat)
    ids = build_prompt(tokenizer, "no placeholder here")
    with pytest.raises(UserError, match="0 image placeholder"):
        generate(model, tokenizer, ids, max_tokens=2, images=[photo_file], image_tokens=70)


def _image_logits(path, photo, **load_kw):
    from gemma4_mlx.loading import load_model

    model, _ = load_model(path, **load_kw)
    ids = [5, 9, model.media_tokens.image, 33, 70]
    expanded, media, _ = prepare_images(model, ids, [photo], 70)
    return model, np.array(model(mx.array([expanded]), **media))


def test_convert_keeps_the_vision_tower_and_processor_config(tiny_mm_chat, photo_file, tmp_path):
    from gemma4_mlx.convert import convert

    src = tmp_path / "src"
    shutil.copytree(tiny_mm_chat, src)
    processor = {"image_processor": {"max_soft_tokens": 280}, "image_seq_length": 280}
    (src / "processor_config.json").write_text(json.dumps(processor))
    out = convert(src, tmp_path / "float")
    assert json.loads((out / "processor_config.json").read_text()) == processor
    _, ours = _image_logits(out, photo_file)
    _, theirs = _image_logits(src, photo_file)
    assert np.array_equal(ours, theirs)

    q = convert(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    model, quantized = _image_logits(q, photo_file)
    proj = model.embed_vision.embedding_projection
    assert proj.bits == 8  # the embedder into the text model stays at 8 bits
    assert model.vision_tower.encoder.layers[0].mlp.up_proj.linear.bits == 4
    assert model.vision_tower.patch_embedder.position_embedding_table.dtype == mx.float32
    # random tiny weights at 4 bits say nothing about quality: only that it loads and runs
    assert quantized.shape == theirs.shape and np.isfinite(quantized).all()


def test_chat_turn_with_image_then_text_reuses_the_cache(tiny_mm_chat, photo_file):
    from gemma4_mlx.generate import Chat

    model, tokenizer = load(tiny_mm_chat)
    chat = Chat(model, tokenizer)
    first = chat.send("what is this", max_tokens=4, images=[photo_file], image_tokens=280)
    assert first.prompt_tokens > 63  # the image's soft tokens are in the prompt
    cached = list(chat.cached_tokens)
    second = chat.send("and now", max_tokens=4)
    assert chat.last_prefilled < 20 and chat.cached_tokens[: len(cached)] == cached
    # the same conversation from scratch, one call with the image, gives the same answer
    ids = chat.cached_tokens[: len(chat.cached_tokens) - len(second.tokens)]
    _, media, _ = prepare_images(model, with_image_prompt(model, tokenizer), [photo_file], 280)
    media["mm_token_type_ids"] = mm_token_type_ids(np.array([ids]), model.media_tokens)
    logits = model(mx.array([ids]), cache=model.make_cache(), **media)
    assert int(mx.argmax(logits[0, -1])) == second.tokens[0]


def with_image_prompt(model, tokenizer):
    return build_prompt(
        tokenizer, with_image_placeholders(tokenizer, model.media_tokens, "what is this", 1)
    )


def test_chat_command_image_attachment(tiny_mm_chat, photo_file, capsys, monkeypatch):
    stdin = f"/image {photo_file}\nwhat is it\n/image /nope.png\nthanks\n/quit\n"
    code, out, err = run_cli(
        ["chat", "-m", str(tiny_mm_chat), "--max-tokens", "3"], capsys, stdin, monkeypatch
    )
    assert code == 0, err
    assert "attached to the next message" in err and "no such image file" in err
    assert err.count("prefilled") == 2


def test_default_budget_comes_from_the_processor_config(tmp_path):
    from gemma4_mlx.media.image import default_budget

    assert default_budget(tmp_path) == 280
    config = {"image_processor": {"max_soft_tokens": 560}, "image_seq_length": 560}
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    assert default_budget(tmp_path) == 560
