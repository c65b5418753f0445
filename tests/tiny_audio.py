"""A tiny Gemma 4 audio tower + embedder built with transformers' own classes, for parity tests.

``build_reference(seed)`` returns transformers' ``Gemma4AudioModel`` and ``Gemma4MultimodalEmbedder``
(float32, eval) with every constant-initialised tensor perturbed: RMSNorm/LayerNorm weights (ones),
``per_dim_scale`` (zeros), ``output_proj.bias`` (zeros), and the clip bounds of every clippable
linear (+-inf), set to +-half the largest |value| seen at that point on a probe input so that they
really clip. The small ``attention_logit_cap`` and ``gradient_clipping`` make the cap and the
residual clamps bite as well. ``mlx_weights`` maps the state dicts onto our module tree.
"""

from __future__ import annotations

import numpy as np

MEL = 128  # the real extractor's bins; subsampling_conv_channels[0] must equal it (see audio.py)
TEXT_HIDDEN = 64

AUDIO_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    subsampling_conv_channels=[MEL, 8],
    conv_kernel_size=5,
    attention_chunk_size=12,
    attention_context_left=13,
    attention_context_right=0,
    attention_logit_cap=2.0,
    gradient_clipping=4.0,
    output_proj_dims=24,
    use_clipped_linears=True,
)


def probe_features(seed: int = 0, lengths: tuple[int, ...] = (150, 97)) -> tuple:
    """(B, T, MEL) float32 log-mel-like features with right padding, and the (B, T) bool mask."""
    rng = np.random.default_rng(seed)
    T = max(lengths)
    feats = rng.normal(-2.0, 2.0, size=(len(lengths), T, MEL)).astype(np.float32)
    mask = np.arange(T)[None, :] < np.array(lengths)[:, None]
    return feats * mask[..., None], mask


def build_reference(seed: int = 0, config: dict | None = None):
    import torch
    from transformers.models.gemma4.configuration_gemma4 import (
        Gemma4AudioConfig,
        Gemma4TextConfig,
    )
    from transformers.models.gemma4.modeling_gemma4 import (
        Gemma4AudioModel,
        Gemma4ClippableLinear,
        Gemma4MultimodalEmbedder,
    )

    torch.manual_seed(seed)
    cfg = Gemma4AudioConfig(**(config or AUDIO_CONFIG))
    cfg._attn_implementation = "eager"
    tower = Gemma4AudioModel(cfg).float().eval()
    text_cfg = Gemma4TextConfig(hidden_size=TEXT_HIDDEN, vocab_size=16, num_hidden_layers=1)
    embedder = Gemma4MultimodalEmbedder(cfg, text_cfg).float().eval()

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(tower.named_parameters()) + list(embedder.named_parameters()):
            if name.endswith(".weight") and "norm" in name.split(".")[-2]:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("per_dim_scale"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name == "output_proj.bias":
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))

        # Clip bounds: +-half of what each clippable linear sees / produces on a probe batch.
        seen: dict = {}

        def hook(module, args, output):
            seen[module] = (float(args[0].abs().max()), float(output.abs().max()))

        clipped = [m for m in tower.modules() if isinstance(m, Gemma4ClippableLinear)]
        handles = [m.linear.register_forward_hook(hook) for m in clipped]
        feats, mask = probe_features(seed)
        tower(torch.from_numpy(feats), torch.from_numpy(mask))
        for h in handles:
            h.remove()
        for m in clipped:
            lin = m.linear
            x_max, y_max = seen[lin]
            m.input_min.fill_(-0.5 * x_max)
            m.input_max.fill_(0.45 * x_max)
            m.output_min.fill_(-0.4 * y_max)
            m.output_max.fill_(0.5 * y_max)
    return tower, embedder


def reference_outputs(tower, embedder, feats: np.ndarray, mask: np.ndarray):
    """transformers' (tower hidden, output mask, embedded soft tokens) as numpy."""
    import torch

    with torch.no_grad():
        out = tower(torch.from_numpy(feats), torch.from_numpy(mask))
        hidden = out.last_hidden_state
        return hidden.numpy(), out.attention_mask.numpy(), embedder(hidden).numpy()


def mlx_weights(tower, embedder) -> dict:
    """{our name: numpy array} under ``audio_tower.`` / ``embed_audio.`` (checkpoint layout)."""
    weights = {}
    for prefix, module in (("audio_tower.", tower), ("embed_audio.", embedder)):
        for name, t in module.state_dict().items():
            weights[prefix + name] = t.detach().numpy().copy()
    return weights


# ---- the whole Gemma4ForConditionalGeneration with an audio tower (and the vision one) ----------


def build_full_reference(name: str = "e2b", seed: int = 0):
    """tiny_multimodal's Gemma4ForConditionalGeneration plus ``audio_config``, every constant-init
    tensor perturbed as there, and clip bounds of the vision and audio linears set to clip."""
    import tiny_multimodal as tmm
    import torch
    from transformers import Gemma4ForConditionalGeneration
    from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig

    cfg = tmm._config(name)  # its audio_config=None cannot be overridden through ``extra``
    cfg.audio_config = Gemma4AudioConfig(**AUDIO_CONFIG)
    cfg.audio_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or key.endswith(("_min", "_max")):
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if key.endswith("std_bias"):
                tensor.copy_(0.3 * noise)
            elif key.endswith("std_scale"):
                tensor.copy_(1.0 + 0.3 * noise)
            elif key.endswith("position_embedding_table"):
                tensor.copy_(0.5 * noise)
            elif key.endswith("per_dim_scale") or key.endswith("output_proj.bias"):
                tensor.copy_(0.5 * noise)  # zeros at init
            elif "norm" in key or "scale" in key or "layer_scalar" in key:
                tensor.add_(0.2 * noise)
            else:
                tensor.add_(0.05 * noise)
        _set_clips(model, seed)
    return model


def _set_clips(model, seed: int) -> None:
    """Bounds at about half of what each clippable linear sees on a sample image / clip."""
    import tiny_multimodal as tmm
    import torch

    clipped = {
        n: m for n, m in model.named_modules() if type(m).__name__ == "Gemma4ClippableLinear"
    }
    seen: dict = {}

    def hook(name):
        def fn(module, args, out):
            seen[name] = [
                float(args[0].min()),
                float(args[0].max()),
                float(out.min()),
                float(out.max()),
            ]

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in clipped.items()]
    img = tmm.image_processor(70)([tmm.photo(50, 70, seed)], return_tensors="pt")
    feats, mask = probe_features(seed)
    model.model.get_image_features(img["pixel_values"], img["image_position_ids"])
    model.model.get_audio_features(torch.from_numpy(feats), torch.from_numpy(mask))
    for h in handles:
        h.remove()
    for name, m in clipped.items():
        if not m.use_clipped_linears:
            continue
        lo_in, hi_in, lo_out, hi_out = seen[name]
        m.input_min.fill_(0.6 * lo_in)
        m.input_max.fill_(0.5 * hi_in)
        m.output_min.fill_(0.5 * lo_out)
        m.output_max.fill_(0.6 * hi_out)


def write_full_checkpoint(out_dir, name: str = "e2b", seed: int = 0):
    model = build_full_reference(name, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir, model


MEDIA_TOKENS = [
    "<|image|>",
    "<|audio|>",
    "<|video|>",
    "<|image>",
    "<image|>",
    "<|audio>",
    "<audio|>",
]


def write_media_tokenizer(model_dir, vocab: int = 512) -> None:
    """tests/tiny_tokenizer.py's tokenizer with fillers so that the media tokens get the ids of
    tiny_multimodal (500..506), padded to the tiny vocabulary."""
    from tiny_tokenizer import write_tokenizer
    from transformers import PreTrainedTokenizerFast

    write_tokenizer(model_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    filler = [f"<unused{i}>" for i in range(len(tok), 500)]
    tok.add_special_tokens({"additional_special_tokens": filler + MEDIA_TOKENS})
    tok.add_special_tokens(
        {"additional_special_tokens": [f"<unused{i}>" for i in range(len(tok), vocab)]},
        replace_extra_special_tokens=False,
    )
    assert tok.convert_tokens_to_ids("<|audio|>") == 501 and len(tok) == vocab
    tok.save_pretrained(str(model_dir))


def write_video_with_sound(path, samples: np.ndarray, frames: int = 20):
    """An MPEG-4 video (32x32, 10 fps, grey ramp) with ``samples`` (16 kHz mono) as AAC sound."""
    import av

    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        sound = out.add_stream("aac", rate=16000, layout="mono")
        for i in range(frames):
            img = np.full((32, 32, 3), i * 10 % 256, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in (
            list(sound.encode(frame)) + list(sound.encode(None)) + list(video.encode(None))
        ):
            out.mux(packet)
    return path
