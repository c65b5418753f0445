"""Audio through the Python API and the CLI on a tiny E2B-shaped checkpoint with vision and audio
towers and a tokenizer that knows the media tokens; greedy tokens against transformers."""

import json
import subprocess

import numpy as np
import pytest
import tiny_audio
import tiny_multimodal as tmm
from test_cli import run_cli

from gemma4_mlx import generate
from gemma4_mlx.loading import load
from gemma4_mlx.media.audio import load_audio, prepare_audio


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    path, ref = tiny_audio.write_full_checkpoint(tmp_path_factory.mktemp("tiny-e2b-audio-chat"))
    tiny_audio.write_media_tokenizer(path)
    return path, ref


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    out = tmp_path_factory.mktemp("wav") / "hello.wav"
    try:
        subprocess.run(
            ["espeak-ng", "-w", str(out), "hello world"], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("espeak-ng is not installed")
    return out


def _clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.2 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.normal(size=t.shape)).astype(np.float32)


def test_greedy_generation_with_audio_equals_transformers_generate(audio_model):
    import torch

    path, ref = audio_model
    model, tokenizer = load(path)
    clips = [_clip(0.8, 0), _clip(0.5, 1)]
    prompt = [2, 10, 20, tmm.AUD, 30, tmm.AUD, 40, 50]  # one placeholder per clip
    result = generate(model, tokenizer, prompt, max_tokens=8, audio=clips)
    prepared = prepare_audio(clips)
    assert result.prompt_tokens == len(prompt) - 2 + sum(prepared.token_counts) + 4
    from gemma4_mlx.media.audio import expand_audio_placeholders

    ids = expand_audio_placeholders(prompt, prepared, tmm.AUD, tmm.BOA, tmm.EOA)
    with torch.no_grad():
        want = ref.generate(
            input_ids=torch.tensor([ids]),
            input_features=torch.from_numpy(prepared.features),
            input_features_mask=torch.from_numpy(prepared.mask),
            max_new_tokens=8,
            do_sample=False,
        )[0, len(ids) :].tolist()
    print(f"ours {result.tokens} / transformers {want}")
    assert result.tokens == want[: len(result.tokens)]
    assert len(result.tokens) == len(want) or result.finish_reason == "stop"


def test_cli_transcribes_a_wav_file(audio_model, speech_wav, capsys):
    path, _ = audio_model
    args = ["generate", "-m", str(path), "--audio", str(speech_wav), "-p", "hello", "--json"]
    code, out, err = run_cli([*args, "--max-tokens", "3"], capsys)
    assert code == 0, err
    result = json.loads(out)
    n_audio = prepare_audio([load_audio(speech_wav)]).token_counts[0]
    text_only = json.loads(
        run_cli(
            ["generate", "-m", str(path), "-p", "hello", "--json", "--max-tokens", "3"], capsys
        )[1]
    )
    # the chat prompt grew by <|audio> + n x <|audio|> + <audio|>
    assert result["prompt_tokens"] == text_only["prompt_tokens"] + n_audio + 2


def test_cli_audio_errors_are_one_line(audio_model, tiny_chat_model, speech_wav, tmp_path, capsys):
    path, _ = audio_model
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"\x00\x01not an mp3" * 10)
    cases = [
        (["-m", str(tiny_chat_model), "--audio", str(speech_wav)], "no audio tower"),
        (["-m", str(path), "--audio", str(bad)], "broken.mp3: not a readable audio file"),
        (["-m", str(path), "--audio", str(tmp_path / "nope.wav")], "nope.wav: no such audio file"),
    ]
    for args, message in cases:
        code, _, err = run_cli(["generate", *args, "-p", "hi", "--max-tokens", "2"], capsys)
        assert code == 2
        assert message in err
        assert len(err.strip().splitlines()) == 1, err


def test_chat_turn_with_audio_then_a_cached_text_turn(audio_model):
    from gemma4_mlx import Chat
    from gemma4_mlx.tokenizer import build_prompt

    path, _ = audio_model
    model, tokenizer = load(path)
    clip = _clip(0.6, 2)
    chat = Chat(model, tokenizer)
    first = chat.send("hello world", max_tokens=4, audio=[clip])
    ids = build_prompt(tokenizer, "<|audio|>hello world")
    direct = generate(model, tokenizer, ids, max_tokens=4, audio=[clip])
    assert first.tokens == direct.tokens
    assert first.prompt_tokens == direct.prompt_tokens
    second = chat.send("the quick brown fox", max_tokens=4)
    assert chat.last_prefilled < second.prompt_tokens - 15  # the audio turn came from the cache
    # The cached turn sees the first turn's audio: its first token is the argmax of the whole
    # conversation run at once with that audio.
    import mlx.core as mx

    prompt = chat.cached_tokens[: -len(second.tokens)]
    prepared = prepare_audio([clip])
    logits = model(
        mx.array([prompt]), input_features=prepared.features, input_features_mask=prepared.mask
    )
    assert int(logits[0, -1].argmax()) == second.tokens[0]


def test_chat_prefilled_from_scratch_re_reads_earlier_turns_audio(audio_model):
    from gemma4_mlx import Chat
    from gemma4_mlx.tokenizer import conversation_tokens

    path, _ = audio_model
    model, tokenizer = load(path)
    clip = _clip(0.6, 3)
    history = [
        {"role": "user", "content": "<|audio|>hello world"},
        {"role": "assistant", "content": "the quick"},
    ]
    chat = Chat(model, tokenizer, messages=list(history), audio=[clip])
    got = chat.send("brown fox", max_tokens=4)
    ids = conversation_tokens(tokenizer, history + [{"role": "user", "content": "brown fox"}])
    want = generate(model, tokenizer, ids, max_tokens=4, audio=[clip])
    assert got.prompt_tokens == want.prompt_tokens
    assert got.tokens == want.tokens


def test_audio_to_a_vision_only_checkpoint_is_a_clear_error(tmp_path):
    from gemma4_mlx.errors import UserError
    from gemma4_mlx.generate import audio_prompt
    from gemma4_mlx.loading import load_model

    path, _ = tmm.write_checkpoint("26b", tmp_path / "tiny-26b")
    model, _ = load_model(path)
    assert model.has_vision and not model.has_audio
    with pytest.raises(UserError, match="no audio tower"):
        audio_prompt(model, None, [2, tmm.AUD, 5], [_clip(0.5, 0)])


def test_chat_command_attaches_audio_to_the_next_message(
    audio_model, speech_wav, tmp_path, capsys, monkeypatch
):
    path, _ = audio_model
    stdin = f"/audio {tmp_path / 'missing.wav'}\n/audio {speech_wav}\nhello\nthe quick\n/quit\n"
    code, _, err = run_cli(
        ["chat", "-m", str(path), "--max-tokens", "3"], capsys, stdin=stdin, monkeypatch=monkeypatch
    )
    assert code == 0, err
    assert "missing.wav: no such audio file" in err
    n_audio = prepare_audio([load_audio(speech_wav)]).token_counts[0]
    first, second = [int(line.split()[1]) for line in err.splitlines() if "prefilled" in line]
    assert first > n_audio > second  # the audio went with the first message, then was cached


def test_greedy_generation_with_image_and_audio_equals_transformers(audio_model):
    import torch

    from gemma4_mlx.media import prepare_images
    from gemma4_mlx.media.audio import expand_audio_placeholders

    path, ref = audio_model
    model, tokenizer = load(path)
    clip, image = _clip(0.7, 4), tmm.photo(50, 70, 5)
    prompt = [2, 11, tmm.IMG, 12, tmm.AUD, 13, 14]
    result = generate(
        model, tokenizer, prompt, max_tokens=8, images=[image], image_tokens=70, audio=[clip]
    )
    assert result.image_tokens == [63] and result.audio_tokens == [18]
    prepared = prepare_audio([clip])
    ids = expand_audio_placeholders(prompt, prepared, tmm.AUD, tmm.BOA, tmm.EOA)
    ids, media, _ = prepare_images(model, ids, [image], 70)
    with torch.no_grad():
        want = ref.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.from_numpy(np.asarray(media["pixel_values"])),
            image_position_ids=torch.from_numpy(np.asarray(media["image_position_ids"])),
            mm_token_type_ids=torch.from_numpy(np.asarray(media["mm_token_type_ids"])),
            input_features=torch.from_numpy(prepared.features),
            input_features_mask=torch.from_numpy(prepared.mask),
            max_new_tokens=8,
            do_sample=False,
        )[0, len(ids) :].tolist()
    print(f"image+audio: ours {result.tokens} / transformers {want}")
    assert result.prompt_tokens == len(ids)
    assert result.tokens == want[: len(result.tokens)]
    assert len(result.tokens) == len(want) or result.finish_reason == "stop"


def test_cli_video_audio_passes_the_soundtrack(audio_model, tmp_path, capsys):
    path, _ = audio_model
    clip = tiny_audio.write_video_with_sound(tmp_path / "clip.mp4", _clip(1.0, 6))
    args = ["generate", "-m", str(path), "--video", str(clip), "--video-frames", "2", "-p", "hi"]
    code, out, err = run_cli([*args, "--video-audio", "--json", "--max-tokens", "2"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["video_frames"] == [2]
    assert len(result["audio_tokens"]) == 1 and 20 <= result["audio_tokens"][0] <= 30
    code, _, err = run_cli(["generate", "-m", str(path), "-p", "hi", "--video-audio"], capsys)
    assert code == 2 and "--video-audio needs --video" in err


def test_str_prompt_gets_audio_in_front_and_long_audio_two_blocks(audio_model):
    path, _ = audio_model
    model, tokenizer = load(path)
    text_ids = list(tokenizer.encode("hello world"))
    long = np.concatenate([_clip(30.0, 7), _clip(1.0, 8)])  # 31 s: a 30 s clip and a 1 s clip
    result = generate(model, tokenizer, "hello world", max_tokens=2, audio=[long])
    assert result.audio_tokens == [750, 25]
    assert result.prompt_tokens == len(text_ids) + 750 + 25 + 4  # two <|audio> ... <audio|> blocks
    placed = generate(
        model, tokenizer, "hello <|audio|> world", max_tokens=2, audio=[_clip(1.0, 9)]
    )
    assert placed.audio_tokens == [25]
