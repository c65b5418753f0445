"""Image preprocessing: bit-exact with transformers' Gemma4ImageProcessorPil (backend pil)."""

import numpy as np
import pytest
import tiny_multimodal as tm
from PIL import Image

from gemma4_mlx.errors import UserError
from gemma4_mlx.media import expand_image_placeholders
from gemma4_mlx.media.image import BUDGETS, num_soft_tokens, preprocess_images
from gemma4_mlx.models.multimodal import MediaTokens

SIZES = [(100, 100), (480, 640), (1080, 1920), (4000, 300), (37, 53), (1, 10000)]


def _reference(images, budget, patch_size=16):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    proc = Gemma4ImageProcessorPil(max_soft_tokens=budget, patch_size=patch_size)
    return proc(images, return_tensors="np")


def _assert_same(ours, ref):
    for key in ("pixel_values", "image_position_ids"):
        diff = np.abs(ours[key].astype(np.float64) - ref[key].astype(np.float64)).max()
        print(f"{key}: shape {ours[key].shape}, max |diff| {diff}")
        assert ours[key].shape == ref[key].shape
        assert ours[key].dtype == np.float32 if key == "pixel_values" else np.int64
        assert diff == 0.0
    assert list(ours["num_soft_tokens_per_image"]) == list(ref["num_soft_tokens_per_image"])


@pytest.mark.parametrize("budget", BUDGETS)
def test_photos_bit_exact_at_every_budget(budget):
    photos = [tm.photo(480, 640, 1), tm.photo(300, 200, 2), tm.photo(90, 700, 3)]
    _assert_same(preprocess_images(photos, budget), _reference(photos, budget))


@pytest.mark.parametrize("size", SIZES)
def test_token_counts_match_reference_formula(size):
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        get_aspect_ratio_preserving_size,
    )

    h, w = size
    for budget in BUDGETS:
        th, tw = get_aspect_ratio_preserving_size(h, w, 16, 9 * budget, 3)
        assert num_soft_tokens(h, w, budget) == (th // 16) * (tw // 16) // 9 <= budget


def test_spec_token_table():
    # transformers' own function gave these (1000x1000 / 1080x1920 / 480x640 / 4000x300)
    assert [num_soft_tokens(1000, 1000, b) for b in BUDGETS] == [64, 121, 256, 529, 1089]
    assert [num_soft_tokens(1080, 1920, b) for b in BUDGETS] == [66, 120, 264, 527, 1100]


def test_small_image_is_upscaled_and_extreme_aspect_works():
    small = [tm.photo(20, 30, 4)]
    _assert_same(preprocess_images(small, 280), _reference(small, 280))
    strip = [Image.fromarray(np.full((1, 10000, 3), 77, np.uint8))]
    _assert_same(preprocess_images(strip, 70), _reference(strip, 70))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "CMYK", "P", "L", "I;16"])
def test_modes_converted_as_the_reference(mode):
    rgb = tm.photo(64, 80, 5)
    if mode == "RGBA":
        image = rgb.copy()
        image.putalpha(
            Image.fromarray(np.linspace(0, 255, 64 * 80).reshape(64, 80).astype(np.uint8))
        )
    elif mode == "LA":
        image = rgb.convert("LA")
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 200)
    else:
        image = rgb.convert(mode)
    _assert_same(preprocess_images([image], 70), _reference([image], 70))


def test_rgba_array_composited_like_reference():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    _assert_same(preprocess_images([arr], 70), _reference([arr], 70))


def test_tiny_patch_size_matches_reference():
    photos = [tm.photo(50, 70, 1)]
    _assert_same(preprocess_images(photos, 70, patch_size=4), _reference(photos, 70, patch_size=4))


def test_bad_budget_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="not one of 70, 140, 280, 560, 1120"):
        preprocess_images([tm.photo(10, 10)], 100)
    with pytest.raises(UserError, match="no such image file"):
        preprocess_images([tmp_path / "missing.png"])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="not a readable image"):
        preprocess_images([tmp_path / "bad.png"])


def test_placeholder_expansion_uses_config_ids():
    tokens = MediaTokens(image=9, video=8, audio=None, boi=5, eoi=6, boa=None, eoa=None, pad=0)
    assert expand_image_placeholders([1, 9, 2, 9], tokens, [2, 1]) == [1, 5, 9, 9, 6, 2, 5, 9, 6]
    with pytest.raises(UserError, match="1 image placeholder"):
        expand_image_placeholders([1, 9], tokens, [2, 2])


@pytest.fixture()
def http_server(tmp_path):
    """A local HTTP server over tmp_path: (base URL)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_url_image_equals_the_file(http_server, tmp_path):
    from gemma4_mlx.media import image as image_module

    photo = tm.photo(120, 90, 9)
    photo.save(tmp_path / "p.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    url = f"{http_server}/p.png"
    a, b = preprocess_images([url], 70), preprocess_images([tmp_path / "p.png"], 70)
    assert np.array_equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(UserError, match="cannot fetch the image"):
        preprocess_images([f"{http_server}/missing.png"], 70)
    with pytest.raises(UserError, match="not a readable image"):
        preprocess_images([f"{http_server}/junk.png"], 70)
    with pytest.raises(UserError, match="MiB image limit"):
        image_module.fetch_url(url, max_bytes=100)


def test_animated_gif_gives_its_first_frame_as_reference(tmp_path):
    frames = [tm.photo(40, 60, s).convert("P") for s in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    first = Image.open(tmp_path / "a.gif")
    assert first.n_frames == 3
    ours = preprocess_images([tmp_path / "a.gif"], 70)
    _assert_same(ours, _reference([Image.open(tmp_path / "a.gif")], 70))
    assert np.array_equal(ours["pixel_values"], preprocess_images([frames[0]], 70)["pixel_values"])


def test_truncated_and_oversized_files_are_one_line(tmp_path, monkeypatch):
    tm.photo(200, 300, 1).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable image"):
        preprocess_images([tmp_path / "cut.jpg"], 70)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's bomb guard at 2x this
    with pytest.raises(UserError, match="too large to decode safely"):
        preprocess_images([tmp_path / "full.jpg"], 70)
