"""Video in: frames decoded with PyAV (FFmpeg's libraries; wheels for macOS and Linux bundle
FFmpeg, so no system install), sampled and laid out as transformers 5.24's
``Gemma4VideoProcessor`` / ``Gemma4Processor.replace_video_token`` do:

- 32 frames sampled uniformly by default: ``indices = arange(n) * total // n``; with a sampling
  rate ``fps`` instead, ``n = max(1, int(total / video_fps * fps))``. A clip with fewer frames
  than asked uses every frame (the reference raises; we say so in ``Video.note``);
- every frame through the image preprocessing at 70 soft tokens (the reference's video budget);
- the prompt: each ``<|video|>`` placeholder becomes, per frame, ``"MM:SS "`` + ``<|image>`` +
  n x ``<|video|>`` + ``<image|>``, frames joined by a space; ``MM:SS`` is the frame's
  ``index / fps`` floored to whole seconds (fps 24 when the file does not say).

Difference from the reference: it resizes frames with torchvision (bicubic, antialiased), we with
PIL (bicubic), as the image processor's PIL backend does; pixels differ slightly, shapes and
token counts do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemma4_mlx.errors import UserError
from gemma4_mlx.media.image import preprocess_images

DEFAULT_FRAMES = 32
VIDEO_BUDGET = 70  # soft tokens per frame
DEFAULT_FPS = 24.0  # the reference's fallback when a file has no frame rate


@dataclass
class Video:
    frames: list[np.ndarray]  # (H, W, 3) uint8, the sampled frames
    indices: list[int]  # their indices in the clip
    fps: float
    total_frames: int
    note: str | None = None  # what was done differently from what was asked

    @property
    def timestamps(self) -> list[float]:
        return [i / self.fps for i in self.indices]

    @property
    def labels(self) -> list[str]:
        return [f"{int(t // 60):02d}:{int(t % 60):02d}" for t in self.timestamps]


def sample_indices(
    total: int, video_fps: float, num_frames: int | None = DEFAULT_FRAMES, fps: float | None = None
) -> tuple[list[int], str | None]:
    """Frame indices to keep, and a note when the clip is shorter than asked."""
    if num_frames is not None and fps is not None:
        raise UserError("give a frame count or a sampling rate for the video, not both")
    if fps is not None:
        if fps <= 0:
            raise UserError(f"--video-fps must be > 0, got {fps}")
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None or num_frames < 1:
        raise UserError(f"--video-frames must be >= 1, got {num_frames}")
    note = None
    if num_frames > total:
        note = f"the clip has {total} frames (fewer than {num_frames} asked): using every frame"
        num_frames = total
    return [int(i) for i in np.arange(num_frames) * total // num_frames], note


def load_video(
    path: str | Path, num_frames: int | None = DEFAULT_FRAMES, fps: float | None = None
) -> Video:
    """Decode and sample a video file; one-line UserErrors for missing/unreadable/empty files."""
    import av

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such video file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UserError(f"{path}: the video has no frames (no video stream)")
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            # Decode once; keep frames as RGB arrays (a 32-frame sample of a long clip would
            # want seeking, but counting frames exactly needs a full decode anyway).
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except UserError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable video ({e})") from None
    if not frames:
        raise UserError(f"{path}: the video has no frames")
    note = None
    if rate is None:
        rate, note = DEFAULT_FPS, f"no frame rate in the file: assuming {DEFAULT_FPS:g} fps"
    indices, short = sample_indices(len(frames), rate, num_frames, fps)
    note = "; ".join(n for n in (note, short) if n) or None
    return Video([frames[i] for i in indices], indices, rate, len(frames), note)


def preprocess_video(
    video: Video, budget: int = VIDEO_BUDGET, patch_size: int = 16
) -> dict[str, Any]:
    """Frames -> ``pixel_values_videos`` (F, 9*budget, 3p^2), ``video_position_ids``,
    ``num_frames_per_video``, ``num_soft_tokens_per_video`` (tokens per frame)."""
    feats = preprocess_images(video.frames, budget, patch_size)
    return {
        "pixel_values_videos": feats["pixel_values"],
        "video_position_ids": feats["image_position_ids"],
        "num_frames_per_video": [len(video.frames)],
        "num_soft_tokens_per_video": feats["num_soft_tokens_per_image"][0],
    }


def video_ids(tokenizer: Any, tokens, video: Video, per_frame: int) -> list[int]:
    """The ids that replace one ``<|video|>`` placeholder: per frame ``MM:SS `` + boi +
    per_frame x video + eoi, frames separated by a space (labels tokenized as plain text)."""
    tok = getattr(tokenizer, "_tokenizer", tokenizer)
    out: list[int] = []
    for i, label in enumerate(video.labels):
        out += tok.encode(("" if i == 0 else " ") + label + " ", add_special_tokens=False)
        out += [tokens.boi] + [tokens.video] * per_frame + [tokens.eoi]
    return out


__all__ = [
    "DEFAULT_FRAMES",
    "VIDEO_BUDGET",
    "Video",
    "load_video",
    "preprocess_video",
    "sample_indices",
    "video_ids",
]
