"""Gemma 4 with its media towers: soft tokens scattered into the text decoder's placeholders.

Reference: transformers 5.24 ``Gemma4Model.forward``. For a prompt whose ids hold media
placeholders (``<|image|>``, ``<|video|>``, ``<|audio|>``; ids read from config.json):

1. placeholder ids -> the pad id, embed, * sqrt(H) (the text embedding's own scaling);
   the per-layer (PLE) token half is computed from the same pad-substituted ids;
2. each modality's tower + embedder gives (n_tokens, H) features, written into that modality's
   placeholder slots in order (NOT scaled by sqrt(H)); a count mismatch raises;
3. the text decoder runs on that; on 26B/31B (``use_bidirectional_attention == "vision"``) and
   only when ``mm_token_type_ids`` is given, sliding layers let the soft tokens of one image (or
   one video frame) see each other: allowed = window AND (causal OR same block). Full-attention
   layers stay causal, so the global KV cache (TurboQuant or not) is unchanged.

The call takes the processor's outputs under transformers' names, so a parity test feeds both
implementations the same arrays. Each modality is one ``embed_*`` step returning
(placeholder id, features); a new tower (audio) adds one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask

from gemma4_mlx.config import SLIDING, ModelConfig, TextConfig, _get
from gemma4_mlx.errors import UserError
from gemma4_mlx.models.audio import AudioModel, audio_soft_tokens, parse_audio_config
from gemma4_mlx.models.text import CausalLM
from gemma4_mlx.models.vision import MultimodalEmbedder, VisionModel, parse_vision_config

# mm_token_type_ids values (transformers' ProcessorMixin.create_mm_token_type_ids)
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3

_MEDIA_PREFIXES = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaTokens:
    """Special token ids of the multimodal prompt format (config.json; never hard-coded)."""

    image: int  # <|image|> soft-token slot
    video: int  # <|video|> soft-token slot (frames are wrapped in boi/eoi)
    audio: int | None  # <|audio|>
    boi: int  # <|image>
    eoi: int  # <image|>
    boa: int | None  # <|audio>
    eoa: int | None  # <audio|>
    pad: int  # what placeholders become before the embedding lookup

    @property
    def placeholders(self) -> tuple[int, ...]:
        return tuple(t for t in (self.image, self.video, self.audio) if t is not None)


def parse_media_tokens(raw: dict[str, Any], source: str = "config.json") -> MediaTokens:
    def tid(key: str, default: Any = ...) -> int | None:
        return _get(raw, key, source, default=default)

    text = raw.get("text_config") or {}
    pad = text.get("pad_token_id", raw.get("pad_token_id", 0))
    return MediaTokens(
        image=tid("image_token_id"),
        video=tid("video_token_id"),
        audio=tid("audio_token_id", None),
        boi=tid("boi_token_id"),
        eoi=tid("eoi_token_id"),
        boa=tid("boa_token_id", None),
        eoa=raw.get("eoa_token_index", raw.get("eoa_token_id")),
        pad=0 if pad is None else int(pad),
    )


def mm_token_type_ids(ids: Any, tokens: MediaTokens) -> np.ndarray:
    """(B, L) ids -> (B, L) types: 1 image, 2 video, 3 audio slots, 0 elsewhere (boi/eoi too)."""
    ids = np.asarray(ids)
    types = np.zeros(ids.shape, dtype=np.int64)
    types[ids == tokens.image] = IMAGE
    types[ids == tokens.video] = VIDEO
    if tokens.audio is not None:
        types[ids == tokens.audio] = AUDIO
    return types


def vision_blocks(types: np.ndarray) -> np.ndarray:
    """(B, L) token types -> block id per token: each maximal run of image/video slots is one
    block (each image, each video frame), -1 elsewhere. Audio never joins a block."""
    vision = (types == IMAGE) | (types == VIDEO)
    previous = np.zeros_like(vision)
    previous[:, 1:] = vision[:, :-1]
    blocks = np.cumsum(vision & ~previous, axis=1) - 1
    return np.where(vision, blocks, -1)


def bidirectional_overlay(base: mx.array, blocks: np.ndarray) -> mx.array:
    """The sliding mask with future keys of the query's own block allowed.

    ``base`` (N, K) or (B, 1, N, K) bool: window AND causal for the N new queries against K keys,
    the last N of which are the new tokens. The reference's window AND (causal OR block) adds
    only keys after the query (for earlier keys causal already holds), and those lie in this
    call's tokens: a prefill chunk must never cut a block.
    """
    B, N = blocks.shape
    K = base.shape[-1]
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    future = np.triu(np.ones((N, N), dtype=bool), k=1)
    extra = np.zeros((B, N, K), dtype=bool)
    extra[:, :, K - N :] = same & future
    return mx.logical_or(base.reshape(-1, 1, N, K), mx.array(extra)[:, None])


def _pad_ids(ids: mx.array, tokens: MediaTokens) -> mx.array:
    slot = mx.zeros(ids.shape, dtype=mx.bool_)
    for t in tokens.placeholders:
        slot = slot | (ids == t)
    return mx.where(slot, tokens.pad, ids)


def scatter_features(h: mx.array, ids: np.ndarray, token: int, features: mx.array, name: str):
    """Write features (n, H) into the slots of ``token`` in (B, L, H), row-major over the batch
    (the reference's masked_scatter order). Raises on a count mismatch."""
    slots = np.flatnonzero(ids.reshape(-1) == token)
    if len(slots) != features.shape[0]:
        raise ValueError(
            f"{name} features and {name} tokens do not match: the prompt has {len(slots)} "
            f"{name} slots but the {name}s give {features.shape[0]} soft tokens"
        )
    B, L, H = h.shape
    flat = h.reshape(B * L, H)
    flat[mx.array(slots)] = features.astype(h.dtype)
    return flat.reshape(B, L, H)


class Gemma4Multimodal(nn.Module):
    """The ``gemma4`` checkpoint: ``language_model`` (mlx-lm's gemma4 layout) + media towers.

    Module names follow mlx-lm / mlx-vlm conversions (``language_model.model.*``,
    ``vision_tower.*``, ``embed_vision.*``); HF names are mapped by ``sanitize``.
    ``text_only`` builds no towers (less memory; media weights in the checkpoint are skipped).
    """

    def __init__(self, config: ModelConfig, text_only: bool = False):
        super().__init__()
        self.model_type = config.model_type
        self.language_model = CausalLM(config.text)
        raw = config.raw
        self.vision_config = None if text_only else parse_vision_config(raw, config.source)
        self.audio_config = None if text_only else parse_audio_config(config)
        has_media = self.vision_config is not None or self.audio_config is not None
        self.media_tokens = parse_media_tokens(raw, config.source) if has_media else None
        if self.vision_config is not None:
            vc = self.vision_config
            self.vision_tower = VisionModel(vc)
            self.embed_vision = MultimodalEmbedder(
                vc.hidden_size, config.text.hidden_size, vc.rms_norm_eps
            )
        if self.audio_config is not None:
            ac = self.audio_config
            self.audio_tower = AudioModel(ac)
            self.embed_audio = MultimodalEmbedder(
                ac.output_proj_dims, config.text.hidden_size, ac.rms_norm_eps
            )
        text_raw = raw.get("text_config") or {}
        self.bidirectional_vision = text_raw.get("use_bidirectional_attention") == "vision"

    @property
    def config(self) -> TextConfig:
        return self.language_model.config

    @property
    def has_vision(self) -> bool:
        return self.vision_config is not None

    @property
    def has_audio(self) -> bool:
        return self.audio_config is not None

    # -- media -> soft tokens -----------------------------------------------------------------

    def embed_image(self, pixel_values: Any, image_position_ids: Any) -> mx.array:
        """Processor arrays -> (n_tokens_total, H) soft tokens in the text model's space."""
        if not self.has_vision:
            raise ValueError(
                "this checkpoint has no vision tower (no vision_config in config.json)"
            )
        if image_position_ids is None:
            raise ValueError("pixel_values need image_position_ids (the processor returns both)")
        per_image = self.vision_tower(pixel_values, image_position_ids)
        return self.embed_vision(mx.concatenate(per_image, axis=0))

    def embed_audio_clips(self, input_features: Any, input_features_mask: Any) -> mx.array:
        """Feature extractor arrays (clips, T, mel), (clips, T) -> (n_tokens_total, H): each clip's
        real frames in order, as the reference's ``features[output_mask]``."""
        if not self.has_audio:
            raise ValueError("this checkpoint has no audio tower (no audio_config in config.json)")
        if input_features_mask is None:
            # The reference then skips audio silently (its placeholders stay pad embeddings).
            raise ValueError("input_features need input_features_mask (the extractor returns both)")
        clips = audio_soft_tokens(
            self.audio_tower,
            self.embed_audio,
            mx.array(input_features),
            mx.array(input_features_mask),
        )
        return mx.concatenate(clips, axis=0)

    def media_features(
        self,
        pixel_values: Any = None,
        image_position_ids: Any = None,
        pixel_values_videos: Any = None,
        video_position_ids: Any = None,
        input_features: Any = None,
        input_features_mask: Any = None,
    ) -> list[tuple[str, int, mx.array]]:
        """(modality, placeholder id, features (n, H)) for each modality given."""
        out = []
        if pixel_values is not None:
            feats = self.embed_image(pixel_values, image_position_ids)
            out.append(("image", self.media_tokens.image, feats))
        if pixel_values_videos is not None:
            # Frames of every video concatenated; the same tower, one 70-token block per frame.
            feats = self.embed_image(pixel_values_videos, video_position_ids)
            out.append(("video", self.media_tokens.video, feats))
        if input_features is not None:
            feats = self.embed_audio_clips(input_features, input_features_mask)
            out.append(("audio", self.media_tokens.audio, feats))
        return out

    def embed(self, inputs: mx.array, **media: Any) -> tuple[mx.array, mx.array | None]:
        """ids (B, L) + processor outputs -> (scaled embeddings (B, L, H), per-layer inputs)."""
        text = self.language_model.model
        ids = _pad_ids(inputs, self.media_tokens) if self.media_tokens else inputs
        e = text.embed_tokens(ids)
        h = e * mx.array(self.config.hidden_size**0.5, dtype=e.dtype)
        ids_np = np.array(inputs)
        for name, token, feats in self.media_features(**media):
            h = scatter_features(h, ids_np, token, feats, name)
        per_layer = text.embed_per_layer(ids) if self.config.hidden_size_per_layer_input else None
        return h, per_layer

    # -- masks --------------------------------------------------------------------------------

    def sliding_masks(self, h: mx.array, cache: Any, types: Any) -> dict[str, Any]:
        """The bidirectional overlay for sliding layers (26B/31B with token types), else {}."""
        if not self.bidirectional_vision or types is None or h.shape[1] == 1:
            return {}
        blocks = vision_blocks(np.asarray(types))
        if not (blocks >= 0).any():
            return {}
        cfg = self.config
        first_sliding = next((s.index for s in cfg.layers if s.layer_type == SLIDING), None)
        if first_sliding is None:
            return {}
        layer_cache = cache[first_sliding] if cache is not None else None
        base = create_attention_mask(
            h, layer_cache, window_size=cfg.sliding_window, return_array=True
        )
        return {SLIDING: bidirectional_overlay(base, blocks)}

    # -- the call -----------------------------------------------------------------------------

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: mx.array | None = None,
        per_layer_inputs: mx.array | None = None,
        last_only: bool = False,
        *,
        pixel_values: Any = None,
        image_position_ids: Any = None,
        pixel_values_videos: Any = None,
        video_position_ids: Any = None,
        input_features: Any = None,
        input_features_mask: Any = None,
        mm_token_type_ids: Any = None,
    ) -> mx.array:
        """Logits (B, L, vocab) (``last_only``: (B, 1, vocab)). Without media this is the text
        model's call (mlx-lm's protocol); with media, ``inputs`` are the expanded prompt ids."""
        media = dict(
            pixel_values=pixel_values,
            image_position_ids=image_position_ids,
            pixel_values_videos=pixel_values_videos,
            video_position_ids=video_position_ids,
            input_features=input_features,
            input_features_mask=input_features_mask,
        )
        has_media = any(v is not None for v in media.values())
        if not has_media and mm_token_type_ids is None:
            return self.language_model(inputs, cache, input_embeddings, per_layer_inputs, last_only)
        if input_embeddings is not None:
            raise ValueError("pass media as processor arrays with token ids, not input_embeddings")
        if (pixel_values is not None or pixel_values_videos is not None) and not self.has_vision:
            raise ValueError(
                "this checkpoint has no vision tower (no vision_config in config.json)"
            )
        h, per_layer = self.embed(inputs, **media)
        if per_layer_inputs is not None:
            per_layer = per_layer_inputs
        masks = self.sliding_masks(h, cache, mm_token_type_ids)
        hidden = self.language_model.model.decode(h, None, cache, per_layer, last_only, masks)
        return self.language_model.logits(hidden)

    # -- mlx-lm protocol ----------------------------------------------------------------------

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self, policy=None):
        return self.language_model.make_cache(policy)

    @property
    def quant_predicate(self):
        text = self.language_model.quant_predicate

        def predicate(path: str, module) -> bool | dict:
            # The position table and the embedder into the text model stay at >= 8 bits.
            if path.startswith("embed_") or "position_embedding" in path:
                return {"group_size": 64, "bits": 8}
            if path.startswith("audio_tower"):
                # Kept in float: the clip bounds were fitted to float activations, and the tiny
                # convolution-fed widths need not divide a quantization group.
                return False
            if path.startswith(_MEDIA_PREFIXES):
                return True
            return text(path.removeprefix("language_model."), module)

        return predicate

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF / mlx-lm / mlx-vlm names -> this tree; media weights kept when a tower is built."""
        media, rest = {}, {}
        for name, value in weights.items():
            bare = name.removeprefix("model.")
            if bare.startswith(_MEDIA_PREFIXES):
                media[bare] = value
            else:
                rest[name] = value
        out = {"language_model." + k: v for k, v in self.language_model.sanitize(rest).items()}
        skipped = set()
        for name, value in media.items():
            if name.split(".")[0] in self:  # a tower (or embedder) this model built
                out[name] = value
            else:
                skipped.add(name.split(".")[0])
        if skipped:
            log.info("skipping weights this model does not use: %s", ", ".join(sorted(skipped)))
        if self.has_audio:
            out = self.audio_tower.sanitize(out, prefix="audio_tower.")
        return out


def check_media_supported(model: nn.Module) -> None:
    """A UserError when media are given to a model without a vision tower."""
    if not getattr(model, "has_vision", False):
        raise UserError(
            "this model has no vision tower (text-only checkpoint or loaded with --text-only); "
            "images and videos need a Gemma 4 checkpoint with vision_config"
        )


def check_audio_supported(model: nn.Module) -> None:
    """A UserError when audio is given to a model without an audio tower (26B, 31B)."""
    if not getattr(model, "has_audio", False):
        raise UserError(
            "this model has no audio tower (26B/31B and text-only checkpoints, or loaded with "
            "--text-only); audio needs Gemma 4 E2B or E4B"
        )


__all__ = [
    "Gemma4Multimodal",
    "check_audio_supported",
    "MediaTokens",
    "bidirectional_overlay",
    "check_media_supported",
    "mm_token_type_ids",
    "parse_media_tokens",
    "vision_blocks",
]
