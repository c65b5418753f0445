"""TurboQuant codec: codebooks, packing, MSE/prod codecs, edge cases."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turboquant.codebook import GAUSSIAN_CENTROIDS, GAUSSIAN_MSE, codebook
from turboquant.codec import CodecSpec, bits_per_channel, decode, decode_rotated, encode, rotate
from turboquant.packing import pack, packed_words, unpack
from turboquant.rotation import Rotation


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@given(
    bits=st.integers(1, 8),
    n=st.integers(1, 300),
    lead=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=60, deadline=None)
def test_pack_unpack_round_trip(bits, n, lead, seed):
    idx = np.random.default_rng(seed).integers(0, 2**bits, size=(lead, n))
    packed = pack(mx.array(idx), bits)
    assert packed.dtype == mx.uint32 and packed.shape[-1] == packed_words(n, bits) == math.ceil(
        n * bits / 32
    )
    assert np.array_equal(np.array(unpack(packed, bits, n)), idx)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_matches_gaussian_lloyd_max_for_large_d(bits):
    cb = codebook(512, bits)
    upper = cb.centroids[len(cb.centroids) // 2 :] * math.sqrt(512)
    print(
        f"b={bits}: centroids*sqrt(d) {np.round(upper, 4)} vs {GAUSSIAN_CENTROIDS[bits]}; mse {cb.mse_per_vector:.4f}"
    )
    assert np.allclose(upper, GAUSSIAN_CENTROIDS[bits], rtol=0.01)
    assert abs(cb.mse_per_vector - GAUSSIAN_MSE[bits]) / GAUSSIAN_MSE[bits] < 0.01
    assert np.allclose(cb.centroids, -cb.centroids[::-1])  # symmetric law, symmetric codebook


def test_codebooks_exist_up_to_8_bits_and_beat_the_lower_bound():
    for bits in range(1, 9):
        cb = codebook(256, bits)
        assert len(cb.centroids) == 2**bits and np.all(np.diff(cb.centroids) > 0)
        assert 4.0**-bits <= cb.mse_per_vector <= math.sqrt(3) * math.pi / 2 * 4.0**-bits


@pytest.mark.parametrize("kind", ["hadamard", "qr"])
def test_rotation_is_orthonormal_and_invertible(kind):
    rot = Rotation(128, seed=3, kind=kind)
    x = mx.array(_unit(50, 128))
    y = rot.forward(x)
    assert np.allclose(np.linalg.norm(np.array(y), axis=1), 1, atol=1e-5)
    assert np.allclose(np.array(rot.inverse(y)), np.array(x), atol=1e-5)


def test_hadamard_signs_come_before_the_transform():
    """The all-ones vector is a Hadamard column: H alone (or signs applied after H) maps it to a
    single spike; random signs applied before spread it over every coordinate."""
    ones = mx.ones((1, 64)) / 8.0
    y = np.array(Rotation(64, 0).forward(ones))
    print(f"max |coordinate| after rotation: {np.abs(y).max():.3f} (a spike would be 1.0)")
    assert np.abs(y).max() < 0.6
    assert np.abs(np.array(mx.hadamard_transform(ones))).max() == pytest.approx(1.0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_codebook_points_round_trip_exactly(bits):
    """The scalar quantizer maps every centroid to its own index, and back to itself."""
    from turboquant.codec import _nearest

    cb = codebook(256, bits)
    centroids = mx.array(cb.centroids.astype(np.float32))
    idx = _nearest(centroids, cb.boundaries_mx, bits)
    assert np.array_equal(np.array(idx), np.arange(2**bits))
    assert np.array_equal(np.array(cb.centroids_mx[idx]), np.array(centroids))


@pytest.mark.parametrize("bits", [2, 3.5, 5])
def test_decoded_vectors_re_encode_to_the_same_codes(bits):
    """encode(decode(encode(x))) == encode(x): decoded vectors are fixed points of the codec."""
    spec = CodecSpec(128, bits, norm_correction=False)
    first = encode(mx.array(_unit(200, 128) * 5.0), spec)
    second = encode(decode(first, spec), spec)
    same = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(first.codes, second.codes)])
    print(f"{bits} bits: {same:.4f} of code words identical after re-encoding")
    assert same > 0.98


def test_zero_vectors_decode_to_zero_and_tiny_huge_norms():
    spec = CodecSpec(64, 4)
    x = np.zeros((3, 64), np.float32)
    x[1] = _unit(1, 64)[0] * 1e-3
    x[2] = _unit(1, 64, 1)[0] * 6e4
    out = np.array(decode(encode(mx.array(x), spec), spec))
    assert np.all(out[0] == 0)
    for i in (1, 2):
        rel = np.linalg.norm(out[i] - x[i]) / np.linalg.norm(x[i])
        assert rel < 0.15, rel
    with pytest.raises(ValueError, match="float16"):
        encode(mx.array(_unit(1, 64) * 1e6), spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_an_error(bad):
    x = _unit(2, 64)
    x[1, 3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        encode(mx.array(x), CodecSpec(64, 3))


def test_invalid_specs_are_errors():
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        CodecSpec(64, 9)
    with pytest.raises(ValueError, match="prod codec bits must be in 2..9"):
        CodecSpec(64, 1.5, "prod")
    with pytest.raises(ValueError, match="cannot be split exactly"):
        CodecSpec(64, 3.3)
    with pytest.raises(ValueError, match="no Hadamard"):
        Rotation(96 * 3, kind="hadamard")


@pytest.mark.parametrize("bits, d", [(3.5, 256), (2.5, 512), (4, 128)])
def test_stored_bits_per_channel_are_what_is_advertised(bits, d):
    spec = CodecSpec(d, bits)
    measured = bits_per_channel(spec)
    print(f"{bits} bits, d={d}: {measured:.4f} stored bits/channel")
    assert measured == pytest.approx(bits + 16 / d)
    assert bits_per_channel(CodecSpec(d, bits, "prod")) == pytest.approx(bits + 32 / d)


def test_mse_codec_distortion_close_to_lloyd_max():
    x = _unit(4000, 256)
    for bits in (1, 2, 3, 4):
        spec = CodecSpec(256, bits, norm_correction=False)
        mse = np.mean(np.sum((np.array(decode(encode(mx.array(x), spec), spec)) - x) ** 2, 1))
        print(f"b={bits}: mse {mse:.4f} vs {GAUSSIAN_MSE[bits]}")
        assert abs(mse - GAUSSIAN_MSE[bits]) / GAUSSIAN_MSE[bits] < 0.03


def test_prod_codec_is_unbiased_where_mse_shrinks():
    """<x, x~> for unit x: MSE gives 1 - D (a shrink), prod gives 1 on average."""
    x = _unit(4000, 256, seed=5)
    X = mx.array(x)
    for kind, bits in (("mse", 2), ("prod", 3)):
        spec = CodecSpec(256, bits, kind, norm_correction=False)
        ip = np.sum(np.array(decode(encode(X, spec), spec)) * x, axis=1)
        err = ip - 1.0
        mean, se = err.mean(), err.std() / np.sqrt(len(err))
        print(f"{kind} {bits} bits: mean error {mean:.4f} (s.e. {se:.4f})")
        if kind == "prod":
            assert abs(mean) < 3 * se
        else:
            assert mean == pytest.approx(-GAUSSIAN_MSE[2], rel=0.05)


@pytest.mark.parametrize("qjl", ["gaussian", "orthogonal"])
def test_prod_inner_product_estimator_unbiased_for_both_sketches(qjl):
    x = _unit(3000, 128, seed=7)
    q = x + 0.5 * _unit(3000, 128, seed=8)  # correlated queries: a large true inner product
    spec = CodecSpec(128, 2, "prod", qjl=qjl)
    est = np.sum(np.array(decode(encode(mx.array(x), spec), spec)) * q, axis=1)
    err = est - np.sum(x * q, axis=1)
    print(f"{qjl}: mean error {err.mean():.5f}, s.e. {err.std() / np.sqrt(len(err)):.5f}")
    assert abs(err.mean()) < 3 * err.std() / np.sqrt(len(err))


def test_norm_correction_restores_the_norm():
    x = _unit(100, 128) * 7.0
    spec = CodecSpec(128, 2, norm_correction=True)
    out = np.array(decode(encode(mx.array(x), spec), spec))
    assert np.allclose(np.linalg.norm(out, axis=1), 7.0, rtol=2e-3)


def test_rotated_domain_inner_products_equal_original():
    x, q = _unit(10, 128), _unit(10, 128, 1)
    spec = CodecSpec(128, 4)
    enc = encode(mx.array(x), spec)
    a = np.sum(np.array(decode_rotated(enc, spec)) * np.array(rotate(mx.array(q), spec)), 1)
    b = np.sum(np.array(decode(enc, spec)) * q, 1)
    assert np.allclose(a, b, atol=1e-5)


TIERS = ((32, 7.0), (32, 5.0), (64, 3.0), (128, 2.5))  # 3.5 bits on average over 256 channels


def test_tiers_spend_more_bits_on_strong_channels():
    """Channels ordered strong to weak (as the cache orders each head's keys): tiers, each rotated
    and normed on its own with its own bits, beat one rotation over all at the same code bits;
    each tier's norm costs 16 bits; inner products still equal the rotated domain's."""
    rng = np.random.default_rng(4)
    scales = np.r_[np.full(32, 5.0), np.full(32, 2.0), np.full(64, 1.0), np.full(128, 0.3)]
    x = mx.array((rng.standard_normal((2000, 256)) * scales).astype(np.float32))
    errors = {}
    for tiers in ((), TIERS):
        spec = CodecSpec(256, 3.5, tiers=tiers)
        enc = encode(x, spec)
        out = decode(enc, spec)
        errors[tiers] = float(mx.mean(mx.sum((out - x) ** 2, -1)) / mx.mean(mx.sum(x * x, -1)))
        assert enc.norms.shape == (2000, len(tiers) or 1)
        assert bits_per_channel(spec) == pytest.approx(3.5 + 16 * (len(tiers) or 1) / 256)
        q = mx.array(rng.standard_normal((5, 256)).astype(np.float32))
        a = np.array(rotate(q, spec) @ decode_rotated(enc, spec).T)
        assert np.allclose(a, np.array(q @ out.T), atol=1e-3)
    print(f"relative MSE: one rotation {errors[()]:.4f}, tiers {errors[TIERS]:.4f}")
    assert errors[TIERS] < 0.3 * errors[()]


def test_tier_blocks_use_their_own_size_codebooks():
    """A tier of n channels is a unit vector in R^n after its norm: its codebook is the one for
    dimension n, and the decoded vector round-trips to the same codes."""
    spec = CodecSpec(256, 3.5, tiers=TIERS)
    assert spec.blocks == ((0, 32), (32, 32), (64, 64), (128, 128))
    assert [n for _, n in spec.group_block] == [32, 32, 64, 128, 128]  # 2.5 bits: 2 groups
    x = mx.array(_unit(50, 256, 3))
    enc = encode(x, spec)
    again = encode(decode(enc, spec), spec)
    assert all(mx.array_equal(a, b).item() for a, b in zip(enc.codes, again.codes))


def test_invalid_tiers_are_errors():
    with pytest.raises(ValueError, match="must cover 256 channels"):
        CodecSpec(256, 3.5, tiers=((128, 3.5), (64, 3.5)))
    with pytest.raises(ValueError, match="average 4.0 bits, not bits=3.5"):
        CodecSpec(256, 3.5, tiers=((128, 4.0), (128, 4.0)))
    with pytest.raises(ValueError, match="MSE codec only"):
        CodecSpec(256, 3.5, "prod", tiers=((128, 3.5), (128, 3.5)))
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        CodecSpec(256, 5.0, tiers=((128, 9.0), (128, 1.0)))
    assert CodecSpec(256, 3.5, tiers=[[128, 3.5], [128, 3.5]]).tiers == ((128, 3.5), (128, 3.5))


# -- the uniform grid (what mx.quantized_matmul reads) ----------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_packing_is_bit_identical_to_mlx_affine_quantization(bits, group):
    """Our packed codes are mx.quantize's: a row holding 0 and 2^b - 1 in each group (so the
    quantizer's scale is 1 and its bias the minimum) packs to the same words, and
    mx.dequantize with scale 1 and bias 0 reads our words back as the indices."""
    idx = np.random.default_rng(bits * group).integers(0, 2**bits, size=(5, 2 * group))
    idx[:, [0, group]], idx[:, [1, group + 1]] = 0, 2**bits - 1
    theirs, scales, biases = mx.quantize(
        mx.array(idx - (2**bits - 1), mx.float32), group_size=group, bits=bits
    )
    ours = pack(mx.array(idx), bits)
    assert np.all(np.array(scales) == 1) and mx.array_equal(ours, theirs).item()
    read = mx.dequantize(ours, mx.ones((5, 2)), mx.zeros((5, 2)), group_size=group, bits=bits)
    assert np.array_equal(np.array(read), idx)


@pytest.mark.parametrize(
    "dim,bits,ratio", [(32, 2, 1.010), (32, 3, 1.069), (32, 4, 1.175), (128, 3, 1.080)]
)
def test_uniform_grid_costs_what_the_design_measured_over_lloyd_max(dim, bits, ratio):
    from turboquant.codebook import uniform_codebook, uniform_step

    u, lm = uniform_codebook(dim, bits), codebook(dim, bits)
    step = uniform_step(dim, bits)
    print(f"d={dim} b={bits}: step*sqrt(d) {step * math.sqrt(dim):.4f}, mse ratio "
          f"{u.mse_per_vector / lm.mse_per_vector:.4f} (design: {ratio})")  # fmt: skip
    assert np.allclose(np.diff(u.centroids), step) and np.allclose(u.centroids, -u.centroids[::-1])
    assert u.mse_per_vector / lm.mse_per_vector == pytest.approx(ratio, abs=0.003)
    for nudge in (0.97, 1.03):  # the step is the best one
        c = (np.arange(2**bits) - (2**bits - 1) / 2) * step * nudge
        x = mx.array(_unit(4000, dim, seed=1)) * 1.0
        y = np.array(x).ravel()
        err = np.min((y[:, None] - c[None, :]) ** 2, axis=1).mean() * dim
        assert err > u.mse_per_vector * 0.995


def test_uniform_codes_decode_to_their_grid_levels_and_keep_the_norm():
    from turboquant.codebook import uniform_step

    tiers = ((32, 5), (32, 4), (64, 3.5), (128, 2))
    spec = CodecSpec(256, 3.0, tiers=tiers, grid="uniform")
    assert spec.qmm_ready and [c for _, c, _ in spec.groups] == [32, 32, 32, 32, 128]
    x = mx.array(np.random.default_rng(0).standard_normal((300, 256)).astype(np.float32))
    enc = encode(x, spec)
    y = np.array(decode_rotated(enc, spec))
    for code, (first, count, bits), (block, n) in zip(enc.codes, spec.groups, spec.group_block):
        level = np.array(unpack(code, bits, count)) - (2**bits - 1) / 2
        norm = np.array(enc.norms[:, block : block + 1].astype(mx.float32))
        expect = level * uniform_step(n, bits) * norm
        assert np.allclose(y[:, first : first + count], expect, rtol=1e-5, atol=1e-6)
    blocks = [np.linalg.norm(np.array(x)[:, a : a + n], axis=1) for a, n in spec.blocks]
    again = [np.linalg.norm(y[:, a : a + n], axis=1) for a, n in spec.blocks]
    assert np.allclose(again, blocks, rtol=2e-3)  # norm correction, float16 norms
    err = float(mx.mean((decode(enc, spec) - x) ** 2) / mx.mean(x**2))
    lloyd = CodecSpec(256, 3.0, tiers=tiers)
    ref = float(mx.mean((decode(encode(x, lloyd), lloyd) - x) ** 2) / mx.mean(x**2))
    print(f"relative MSE uniform {err:.4f} vs Lloyd-Max {ref:.4f}")
    assert ref < err < 1.25 * ref


def test_uniform_groups_wider_than_128_channels_are_stored_as_128():
    spec = CodecSpec(512, 2.5, grid="uniform")
    assert spec.groups == ((0, 128, 3), (128, 128, 3), (256, 128, 2), (384, 128, 2))
    assert spec.qmm_ready and spec.group_block == ((0, 512),) * 4
    assert not CodecSpec(16, 2.5, grid="uniform").qmm_ready  # 8-channel groups: decoded
    assert not CodecSpec(256, 3.0).qmm_ready  # Lloyd-Max codes are never read by qmm
    with pytest.raises(ValueError, match="uniform grid is for the MSE codec"):
        CodecSpec(256, 3.0, kind="prod", grid="uniform")
    with pytest.raises(ValueError, match="grid must be one of"):
        CodecSpec(256, 3.0, grid="affine")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_both_packing_paths_give_the_same_words(bits):
    """``pack`` gathers for a few blocks (a decode step's token) and goes word by word for many
    (a prefill chunk): the words are the same either way."""
    from turboquant.packing import _pack_by_gather, _pack_by_words

    for shape in ((1, 1, 1, 256), (3, 2, 33), (40, 100)):
        idx = mx.array(np.random.default_rng(bits).integers(0, 2**bits, size=shape))
        assert mx.array_equal(_pack_by_gather(idx, bits), _pack_by_words(idx, bits)).item()
