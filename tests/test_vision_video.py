"""Video: PyAV decoding, the reference's frame sampling and prompt layout, API and CLI."""

import json
from types import SimpleNamespace

import av
import mlx.core as mx
import numpy as np
import pytest
import tiny_multimodal as tm
from test_cli import run_cli
from test_vision_cli import photo_file, tiny_mm_chat  # noqa: F401 (session fixtures)

from gemma4_mlx.errors import UserError
from gemma4_mlx.generate import generate
from gemma4_mlx.loading import load
from gemma4_mlx.media import prepare_media, with_image_placeholders
from gemma4_mlx.media.video import load_video, sample_indices, video_ids
from gemma4_mlx.tokenizer import build_prompt


def write_video(path, n_frames, rate=10, size=(48, 64)):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        out.start_encoding()  # writes the header even with no frames
        for i in range(n_frames):
            frame = np.asarray(tm.photo(*size, seed=i))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 45)


@pytest.mark.parametrize(
    "total, video_fps, num_frames, fps",
    [(100, 30.0, 32, None), (45, 10.0, 32, None), (300, 30.0, None, 1.0), (90, 24.0, 7, None)],
)
def test_sampling_matches_transformers(total, video_fps, num_frames, fps):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    meta = VideoMetadata(total_num_frames=total, fps=video_fps)
    theirs = default_sample_indices_fn(meta, num_frames=num_frames, fps=fps).tolist()
    ours, note = sample_indices(total, video_fps, num_frames, fps)
    assert ours == theirs and note is None


def test_short_clip_uses_every_frame_and_says_so():
    ours, note = sample_indices(5, 10.0, 32)
    assert ours == [0, 1, 2, 3, 4] and "using every frame" in note


def test_load_video_frames_and_timestamps(clip):
    video = load_video(clip, num_frames=8)
    assert video.total_frames == 45 and video.fps == 10.0 and len(video.frames) == 8
    assert video.indices == sample_indices(45, 10.0, 8)[0]
    assert video.labels == [f"00:{i // 10:02d}" for i in video.indices]
    assert video.frames[0].shape == (48, 64, 3) and video.frames[0].dtype == np.uint8


def test_prompt_layout_matches_transformers_replace_video_token(clip, tiny_mm_chat):  # noqa: F811
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.video_utils import VideoMetadata

    model, tokenizer = load(tiny_mm_chat)
    tokens, video = model.media_tokens, load_video(clip, num_frames=12)
    tok = tokenizer._tokenizer
    me = SimpleNamespace(
        boi_token=tok.convert_ids_to_tokens(tokens.boi),
        eoi_token=tok.convert_ids_to_tokens(tokens.eoi),
        video_token=tok.convert_ids_to_tokens(tokens.video),
    )
    meta = VideoMetadata(total_num_frames=45, fps=10.0, frames_indices=video.indices)
    inputs = {"num_soft_tokens_per_video": [5], "video_metadata": [meta]}
    text = Gemma4Processor.replace_video_token(me, inputs, 0)
    assert tok.encode(text, add_special_tokens=False) == video_ids(tokenizer, tokens, video, 5)


def test_video_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no such video file"):
        load_video(tmp_path / "none.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"nope" * 100)
    with pytest.raises(UserError, match="not a readable video"):
        load_video(tmp_path / "junk.mp4")
    # FFmpeg rejects some zero-frame files when opening, others decode to nothing
    with pytest.raises(UserError, match="not a readable video|the video has no frames"):
        load_video(write_video(tmp_path / "empty.mp4", 0))


def test_api_generate_with_video_equals_direct_model_calls(tiny_mm_chat, clip):  # noqa: F811
    model, tokenizer = load(tiny_mm_chat)
    prompt = with_image_placeholders(tokenizer, model.media_tokens, "what happens", 0, 1)
    ids = build_prompt(tokenizer, prompt)
    video = load_video(clip, num_frames=4)
    result = generate(model, tokenizer, ids, max_tokens=5, videos=[video])
    expanded, media, report = prepare_media(model, tokenizer, ids, videos=[video])
    assert result.video_frames == [4] == report["video_frames"]
    slots = sum(t == model.media_tokens.video for t in expanded)
    assert slots == 4 * (media["video_position_ids"][0, :, 0] >= 0).sum() // 9
    cache = model.make_cache()
    logits = model(mx.array([expanded]), cache=cache, **media)
    ours = []
    for _ in range(len(result.tokens)):
        ours.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[ours[-1]]]), cache=cache)
    assert result.tokens == ours
    _, _, by_path = prepare_media(model, tokenizer, ids, videos=[clip])  # a path: 32 frames
    assert by_path["video_frames"] == [32]


def test_cli_video_and_image_together(tiny_mm_chat, clip, photo_file, capsys):  # noqa: F811
    args = ["generate", "-m", str(tiny_mm_chat), "-p", "describe", "--max-tokens", "3", "--json"]
    args += ["--video", str(clip), "--video-frames", "3", "--image", str(photo_file)]
    args += ["--image-tokens", "70"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["video_frames"] == [3] and len(result["image_tokens"]) == 1


def test_cli_short_clip_note_and_bad_video(tiny_mm_chat, tmp_path, capsys):  # noqa: F811
    short = write_video(tmp_path / "short.mp4", 4)
    args = ["generate", "-m", str(tiny_mm_chat), "-p", "x", "--max-tokens", "2"]
    code, _, err = run_cli([*args, "--video", str(short)], capsys)
    assert code == 0 and "using every frame" in err
    code, _, err = run_cli([*args, "--video", str(tmp_path / "missing.mp4")], capsys)
    assert code == 2 and "no such video file" in err and err.count("\n") == 1
