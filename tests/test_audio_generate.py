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
