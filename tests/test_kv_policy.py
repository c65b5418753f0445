"""The KV policy: one text form, one place for its checks, bound to the model; the CLI's KV
options. mlx-lm's own cache functions build and round-trip our caches."""

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import run_cli

from gemma4_mlx.cache import KVPolicy, KVPolicyError, make_cache
from gemma4_mlx.loading import load, load_model

# -- the text form -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("exact", "exact"),
        ("fp16", "exact"),  # the old name of the exact cache
        ("affine:4", "affine:4"),
        ("affine", "affine:4"),
        ("affine:8,group=32", "affine:8,group=32"),
        ("turboquant", "turboquant:k3.125,v2,tiers=4,sink=4,window=32,center=128,block=512,codec=mse,grid=uniform"),
        ("turboquant:3.5", "turboquant:k5,v2,tiers=4,sink=4,window=32,center=128,block=512,codec=mse,grid=uniform"),
        ("turboquant: k4 , window=64", "turboquant:k4,v2,tiers=4,sink=4,window=64,center=128,block=512,codec=mse,grid=uniform"),
        ("turboquant:codec=prod", "turboquant:k3,v2,tiers=0,sink=4,window=32,center=128,block=512,codec=prod"),
        ("turboquant:center=0,block=64", "turboquant:k3,v2,tiers=0,sink=4,window=32,center=0,codec=mse,grid=uniform"),
        ("turboquant:k4.5,v2,exact=bfloat16,seed=3", "turboquant:k4.5,v2,tiers=4,sink=4,window=32,center=128,block=512,codec=mse,grid=uniform,exact=bfloat16,seed=3"),
        ("turboquant:grid=uniform,k3.125", "turboquant:k3.125,v2,tiers=4,sink=4,window=32,center=128,block=512,codec=mse,grid=uniform"),
        ("turboquant:grid=lloyd,attention=auto", "turboquant:k3,v2,tiers=4,sink=4,window=32,center=128,block=512,codec=mse,grid=lloyd,attention=auto"),
        ("exact:attention=grouped", "exact:attention=grouped"),
        ("exact:attention=sdpa,rewind=4", "exact:rewind=4"),
        ("affine:4,attention=grouped,group=32", "affine:4,group=32,attention=grouped"),
    ],
)  # fmt: skip
def test_policy_text_form_is_canonical_and_round_trips(text, canonical):
    policy = KVPolicy.parse(text)
    assert str(policy) == canonical
    assert KVPolicy.parse(canonical) == policy
    assert str(KVPolicy.parse(canonical)) == canonical


@st.composite
def policies(draw):
    kind = draw(st.sampled_from(["exact", "affine", "turboquant"]))
    attention = draw(st.sampled_from(["sdpa", "grouped", "auto"]))
    if kind == "exact":
        return KVPolicy(attention=attention)
    if kind == "affine":
        return KVPolicy(
            "affine", bits=draw(st.sampled_from([2, 3, 4, 5, 6, 8])), attention=attention
        )
    if draw(st.booleans()):  # the uniform grid: bits 2..8 but no 7, key eighths with tiers
        tiers = draw(st.sampled_from([0, 2, 4]))
        steps = 8 if tiers else 2
        key = draw(st.integers(steps, 8 * steps).map(lambda n: n / steps))
        return KVPolicy(
            "turboquant",
            key_bits=key,
            value_bits=draw(st.integers(2, 16).map(lambda n: n / 2)),
            key_tiers=tiers,
            grid="uniform",
            attention=attention,
        )
    codec = draw(st.sampled_from(["mse", "prod"]))
    low = 2 if codec == "prod" else 1
    half = st.integers(2 * low, 16).map(lambda n: n / 2)
    center = draw(st.integers(0, 64))
    return KVPolicy(
        "turboquant",
        key_bits=draw(half),
        value_bits=draw(half),
        codec=codec,
        fp_window=draw(st.integers(0, 64)),
        sink=draw(st.integers(0, 8)),
        center=center,
        center_block=draw(st.sampled_from([0, 64, 512])),
        key_tiers=draw(st.sampled_from([0, 2, 3, 4, 5])) if center and codec == "mse" else 0,
        exact_dtype=draw(st.sampled_from([None, "float16", "bfloat16", "float32"])),
        seed=draw(st.integers(0, 3)),
    )


@settings(max_examples=200, deadline=None)
@given(policies())
def test_every_policy_round_trips_through_its_text_form(policy):
    assert KVPolicy.parse(str(policy)) == policy
    assert hash(KVPolicy.parse(str(policy))) == hash(policy)


SPEC_WORDS = st.sampled_from(
    ["k", "v", "k3", "v2.5", "4", "x", "=", ",", ":", "tiers=", "sink=", "window=", "center=",
     "block=", "codec=", "exact=", "seed=", "group=", "mse", "prod", "-1", "1e400", "nan", ".",
     "0", "32", "bfloat16", " ", "grid=", "uniform", "lloyd", "attention=", "grouped", "k3.125"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["exact", "affine", "turboquant", "fp16", "tq", ""]),
    st.lists(SPEC_WORDS, max_size=8).map("".join) | st.text(max_size=20),
)
def test_any_spec_text_parses_or_is_one_policy_error(kind, rest):
    """--kv SPEC never gives a traceback: a policy, or a KVPolicyError naming a setting."""
    try:
        policy = KVPolicy.parse(f"{kind}:{rest}")
    except KVPolicyError as e:
        assert e.key and e.reason and "\n" not in str(e)
    else:
        assert KVPolicy.parse(str(policy)) == policy


def test_bits_are_stored_one_way():
    """``bits=`` is a constructor shorthand: the policy holds key and value bits only."""
    assert KVPolicy("turboquant").resolved_bits() == (3.125, 2)  # the default (uniform grid)
    assert KVPolicy("turboquant", grid="lloyd").resolved_bits() == (3, 2)  # 1/8 bit less
    assert KVPolicy("turboquant", key_tiers=0).resolved_bits() == (3, 2)  # 0.5-bit steps
    assert KVPolicy("turboquant", codec="prod").resolved_bits() == (3, 2)
    assert KVPolicy("turboquant", bits=3.5).resolved_bits() == (5, 2)
    assert KVPolicy("turboquant", bits=3.5, key_bits=4).resolved_bits() == (4, 3)
    assert KVPolicy("turboquant", bits=3.5) == KVPolicy("turboquant", key_bits=5, value_bits=2)
    assert KVPolicy("affine", bits=8).resolved_bits() == (8, 8)
    assert KVPolicy().resolved_bits() == (None, None)
    assert not hasattr(KVPolicy(), "keep_layers")


def test_tiers_are_at_most_the_policys_where_they_fit():
    lloyd = KVPolicy("turboquant", grid="lloyd")
    assert lloyd.tiers_for(256) == 4
    assert lloyd.tiers_for(16) == 3 and lloyd.tiers_for(6) == 0
    assert KVPolicy("turboquant", key_tiers=4, grid="lloyd").tiers_for(24) == 3
    uniform = KVPolicy("turboquant", grid="uniform")  # tiers of multiples of 32 channels
    assert [uniform.tiers_for(d) for d in (512, 256, 128, 64, 32, 16)] == [4, 4, 3, 2, 0, 0]
    assert KVPolicy("turboquant", center=0).tiers_for(256) == 0  # tiers ride on the centring
    assert KVPolicy("turboquant", codec="prod").tiers_for(256) == 0


@pytest.mark.parametrize(
    "build, field, words",
    [
        (lambda: KVPolicy("int4"), "kind", "must be one of exact, affine, turboquant"),
        (lambda: KVPolicy("turboquant", bits=9), "bits", "must be 1..8 in steps of 0.5"),
        (lambda: KVPolicy("turboquant", bits=2.7), "bits", "got 2.7"),
        (lambda: KVPolicy("turboquant", bits=float("nan")), "bits", "got nan"),
        (lambda: KVPolicy("turboquant", key_bits=8, value_bits=0.5), "value_bits", "got 0.5"),
        (lambda: KVPolicy("turboquant", key_bits=1.5, codec="prod"), "key_bits", "2..9"),
        (lambda: KVPolicy("turboquant", key_bits=3, value_bits=2, bits=3), "bits", "not all"),
        (lambda: KVPolicy("turboquant", fp_window=-1), "fp_window", "must be >= 0"),
        (lambda: KVPolicy("turboquant", sink=-1), "sink", "must be >= 0"),
        (lambda: KVPolicy("turboquant", center=-1), "center", "must be >= 0"),
        (lambda: KVPolicy("turboquant", center_block=-1), "center_block", "must be >= 0"),
        (lambda: KVPolicy("turboquant", center=600), "center", "(600) must be <= block (512"),
        (lambda: KVPolicy("turboquant", key_tiers=1), "key_tiers", "0 (off) or 2..5, got 1"),
        (lambda: KVPolicy("turboquant", key_tiers=4, center=0), "key_tiers", "need centring"),
        (lambda: KVPolicy("turboquant", key_tiers=4, codec="prod"), "key_tiers", "mse codec"),
        (lambda: KVPolicy("turboquant", codec="qjl"), "codec", "must be mse or prod"),
        (lambda: KVPolicy("turboquant", exact_dtype="int8"), "exact_dtype", "must be float16"),
        (lambda: KVPolicy("exact", bits=4), "bits", "the exact cache has no bits"),
        (lambda: KVPolicy("exact", sink=8), "sink", "applies to turboquant only, not exact"),
        (lambda: KVPolicy("affine", bits=7), "bits", "must be one of 2, 3, 4, 5, 6, 8"),
        (lambda: KVPolicy("affine", key_bits=4), "key_bits", "need the turboquant cache"),
        (lambda: KVPolicy("affine", fp_window=8), "fp_window", "applies to turboquant only"),
        (lambda: KVPolicy("affine", group_size=48), "group_size", "must be 32, 64 or 128"),
        (lambda: KVPolicy.parse("turboquant:foo=1"), "foo", "unknown setting"),
        (lambda: KVPolicy.parse("turboquant:k3,k4"), "key_bits", "given twice"),
        (lambda: KVPolicy.parse("turboquant:window=x"), "fp_window", "not a number: 'x'"),
        (lambda: KVPolicy.parse("turboquant:window=1.5"), "fp_window", "a whole number"),
        (lambda: KVPolicy.parse("turboquant:k=inf"), "key_bits", "not a finite number"),
        (lambda: KVPolicy.parse("exact:4"), "bits", "the exact cache has no bits"),
        (lambda: KVPolicy.parse("affine:4,group=32,window=3"), "fp_window", "turboquant only"),
        (lambda: KVPolicy.parse("turboquant:grid=affine"), "grid", "must be lloyd or uniform"),
        (lambda: KVPolicy.parse("turboquant:grid=uniform,codec=prod"), "grid", "mse codec only"),
        (lambda: KVPolicy.parse("turboquant:tiers=0,k3.125"), "key_bits", "steps of 0.5"),
        (lambda: KVPolicy.parse("exact:grid=uniform"), "grid", "turboquant only"),
        (lambda: KVPolicy.parse("exact:attention=fast"), "attention", "sdpa, grouped, auto"),
    ],
)
def test_bad_policy_is_a_value_error_naming_the_field(build, field, words):
    with pytest.raises(KVPolicyError) as info:
        build()
    assert isinstance(info.value, ValueError)
    assert info.value.field == field and words in str(info.value)
    names = info.value.key if info.value.key == field else f"{info.value.key} ({field})"
    assert str(info.value).startswith(f"KV policy {names}: ")
    assert "((" not in str(info.value) and "--" not in str(info.value)  # API terms, no tuples


def test_parse_takes_only_strings():
    with pytest.raises(TypeError, match="a KV policy spec is a string"):
        KVPolicy.parse(4)


# -- the policy bound to the model ---------------------------------------------------------------

SMALL_TQ = "turboquant:k4,v2,tiers=2,sink=2,window=3,center=2,block=6,codec=mse,grid=uniform"


def _layout(cache):
    return [
        (type(c).__name__, getattr(c, "fp_window", None), getattr(c, "bits", None)) for c in cache
    ]


@pytest.mark.parametrize("spec", ["exact", "affine:8", SMALL_TQ])
def test_mlx_lm_make_prompt_cache_builds_the_bound_policy(tiny_chat_model, spec):
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(tiny_chat_model), kv_policy=spec)
    built = make_prompt_cache(model)
    expected = make_cache(model.config, KVPolicy.parse(spec))
    assert _layout(built) == _layout(expected)
    assert _layout(model.make_cache()) == _layout(expected)
    quantized = [c for c in built if type(c).__name__ != "SlidingKVCache"]
    kinds = {"exact": "KVCache", "affine:8": "QuantizedKVCache"}
    assert {type(c).__name__ for c in quantized} == {kinds.get(spec, "TurboQuantKVCache")}


def test_load_refuses_a_bad_policy_before_loading(tmp_path):
    with pytest.raises(KVPolicyError, match=r"KV policy window \(fp_window\): must be >= 0"):
        load(str(tmp_path / "missing"), kv_policy="turboquant:window=-1")
    with pytest.raises(TypeError, match="kv_policy must be a KVPolicy or its text form"):
        load(str(tmp_path / "missing"), kv_policy=4)


def test_generate_takes_a_policy_string_and_reports_it(tiny_chat_model):
    from gemma4_mlx import generate

    model, tokenizer = load(str(tiny_chat_model))
    result = generate(model, tokenizer, "hello world", max_tokens=4, kv_policy="turboquant:3.5")
    assert result.kv_policy == str(KVPolicy("turboquant", bits=3.5))
    assert result.kv_cache.startswith("turboquant mse K5/V2")
    with pytest.raises(TypeError, match="kv_policy must be a KVPolicy or its text form"):
        generate(model, tokenizer, "hello world", max_tokens=4, kv_policy=3.5)
    exact = generate(model, tokenizer, "hello world", max_tokens=4)
    assert exact.kv_policy == "exact" and exact.kv_cache == "exact float32"


@pytest.mark.parametrize("spec", ["affine:8", SMALL_TQ])
def test_mlx_lm_generate_step_on_make_prompt_cache_gives_our_tokens(tiny_chat_model, spec):
    """mlx-lm's generator with mlx-lm's cache builder runs the bound policy: the tokens and the
    cache bytes of our generate() with no kv_policy (the bound one, reported)."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from gemma4_mlx import generate

    model, tokenizer = load(str(tiny_chat_model), kv_policy=spec)
    prompt = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54]
    cache = make_prompt_cache(model)
    theirs = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=8,
                                               prompt_cache=cache)]  # fmt: skip
    ours = generate(model, tokenizer, prompt, max_tokens=8)
    print(f"{spec}: mlx-lm {theirs}, ours {ours.tokens}")
    assert ours.kv_policy == str(KVPolicy.parse(spec))
    assert theirs == ours.tokens[: len(theirs)] and len(theirs) >= 1
    assert sum(getattr(c, "nbytes", 0) for c in cache) == ours.kv_cache_bytes


def _prefilled(model, tokens, policy):
    cache = model.make_cache(KVPolicy.parse(policy))
    model(mx.array([tokens]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


@pytest.mark.parametrize("spec", ["exact", "affine:8", SMALL_TQ])
def test_mlx_lm_save_and_load_prompt_cache_round_trip(tiny_checkpoints, tmp_path, spec):
    """mlx-lm's save_prompt_cache writes our caches; gemma4_mlx.prompt_files reads them back
    (mlx-lm's load_prompt_cache resolves classes in its own module only, so it reads files of
    mlx-lm's classes alone): the next token's logits are identical."""
    from mlx_lm.models import cache as mlx_cache
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    from gemma4_mlx.prompt_files import load_prompt_cache as our_load

    path, _ = tiny_checkpoints("e2b")
    model, _ = load_model(path)
    tokens = [5, 9, 33, 70, 101, 4, 8, 17, 23, 42, 11, 64, 3, 7, 90, 12, 5, 31, 8, 2]
    cache = _prefilled(model, tokens, spec)
    file = str(tmp_path / "cache.safetensors")
    save_prompt_cache(file, cache, {"note": "x"})
    loaded, meta = our_load(file, return_metadata=True)
    assert meta == {"note": "x"}
    if spec == SMALL_TQ:
        tq = [c for c in loaded if type(c).__name__ == "TurboQuantKVCache"]
        assert any(c.keys.n_quantized > c.keys.n_sink for c in tq)
    if all(hasattr(mlx_cache, type(c).__name__) for c in cache):  # mlx-lm: its classes only
        loaded = load_prompt_cache(file)
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    nxt = mx.array([[50]])
    want, got = model(nxt, cache=cache), model(nxt, cache=loaded)
    print(f"{spec}: max |logit difference| {mx.max(mx.abs(want - got)).item():.3g}")
    assert mx.array_equal(want, got)


# -- the CLI's KV options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--kv-bits", "9"], "--kv-bits must be 1..8 in steps of 0.5"),
        (["--kv-bits", "2.7"], "--kv-bits must be 1..8 in steps of 0.5 (or 3.25), got 2.7"),
        (["--kv-bits", "nan"], "'--kv-bits': 'nan' is not a finite number"),
        (["--kv-cache", "exact", "--kv-bits", "4"], "--kv-bits quantizes the KV cache"),
        (["--kv-cache", "fp16", "--key-bits", "4"], "--key-bits quantizes the KV cache"),
        (["--kv-cache", "affine", "--key-bits", "4"], "--key-bits needs --kv-cache turboquant"),
        (["--kv-cache", "affine", "--value-bits", "2"], "--value-bits needs --kv-cache turboquant"),
        (["--kv-cache", "affine", "--kv-bits", "7"], "--kv-bits must be one of 2, 3, 4, 5, 6, 8"),
        (["--kv-cache", "int4"], "--kv-cache must be one of exact, affine, turboquant"),
        (["--key-bits", "9"], "--key-bits must be 1..8 in steps of 1/8, got 9"),
        (["--value-bits", "0.5"], "--value-bits must be 1..8 in steps of 0.5, got 0.5"),
        (["--kv-bits", "3.5", "--key-bits", "8"], "--kv-bits 3.5 and --key-bits 8: the value"),
        (["--kv", "turboquant:window=-1"], "--kv window: must be >= 0, got -1"),
        (["--kv", "turboquant:tiers=7"], "--kv tiers: must be 0 (off) or 2..5, got 7"),
        (["--kv", "turboquant:foo=3"], "--kv foo: unknown setting"),
        (["--kv", "bogus"], "--kv kind: must be one of exact, affine, turboquant"),
        (["--kv", "affine:4,window=8"], "--kv window: applies to turboquant only"),
        (["--kv", "turboquant:k2.7"], "--kv k: must be 1..8 in steps of 1/8, got 2.7"),
        (["--kv", "turboquant", "--kv-bits", "3"], "--kv SPEC is the whole KV policy: drop"),
        (["--kv", "exact", "--kv-cache", "exact"], "--kv SPEC is the whole KV policy: drop"),
        (["--kv", "affine:64"], "--kv bits: must be one of 2, 3, 4, 5, 6, 8"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_kv_options_are_one_line_and_exit_2(
    tiny_chat_model, capsys, monkeypatch, command, options, message
):
    args = [command, "-m", str(tiny_chat_model), *options]
    args += ["-p", "hi"] if command == "generate" else []
    code, out, err = run_cli(args, capsys, stdin="hello\n", monkeypatch=monkeypatch)
    assert code == 2, err
    assert err == f"error: {err.removeprefix('error: ')}" and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err and "((" not in err and out == ""


def _generate_json(tiny_chat_model, capsys, *options):
    import json

    args = ["generate", "-m", str(tiny_chat_model), "-p", "hello", "--max-tokens", "4", "--json"]
    code, out, err = run_cli([*args, *options], capsys)
    assert code == 0, err
    return json.loads(out)


def test_kv_bits_alone_turns_on_turboquant(tiny_chat_model, capsys):
    """mlx-lm's rule: --kv-bits quantizes; without --kv-cache that is our turboquant cache."""
    result = _generate_json(tiny_chat_model, capsys, "--kv-bits", "3.5")
    assert result["kv_policy"] == str(KVPolicy("turboquant", bits=3.5))
    result = _generate_json(tiny_chat_model, capsys, "--key-bits", "4", "--value-bits", "3")
    assert result["kv_policy"].startswith("turboquant:k4,v3,")
    result = _generate_json(tiny_chat_model, capsys, "--kv-cache", "affine", "--kv-bits", "8")
    assert result["kv_policy"] == "affine:8" and result["kv_cache"].startswith("affine 8-bit")


def test_summary_names_the_exact_dtype_and_says_when_nothing_is_compressed(tiny_chat_model, capsys):
    result = _generate_json(tiny_chat_model, capsys)
    assert result["kv_cache"] == "exact float32" and result["kv_policy"] == "exact"
    result = _generate_json(tiny_chat_model, capsys, "--kv", "turboquant:sink=5000")
    assert "sink=5000" in result["kv_policy"]
    assert "(nothing compressed: this run's" in result["kv_cache"]
    result = _generate_json(tiny_chat_model, capsys, "--kv", "turboquant:sink=0,window=0,center=0")
    assert "nothing compressed" not in result["kv_cache"]


def test_main_help_shows_the_user_kv_options_only(capsys):
    code, out, _ = run_cli(["generate", "--help"], capsys)
    assert code == 0
    for flag in ("--kv-cache", "--kv-bits", "--key-bits", "--value-bits", "--kv "):
        assert flag in out
    for gone in ("--kv-window", "--kv-sink", "--kv-center", "--kv-key-tiers", "--kv-codec"):
        assert gone not in out


def test_no_memory_warning_past_the_models_context(tiny_chat_model):
    """A context the model cannot take is the prompt check's error, not a KV memory warning
    (it used to print a warning of hundreds of thousands of GiB first)."""
    from pathlib import Path

    from gemma4_mlx.generate import kv_bytes_per_token, memory_warning

    model, _ = load(str(tiny_chat_model))
    limit = model.config.max_position_embeddings
    assert memory_warning(Path(tiny_chat_model), model, KVPolicy(), 10**15) is None
    assert kv_bytes_per_token(model, KVPolicy()) * 10**15 > 2**50  # 1 PiB: it would have warned
    assert memory_warning(Path(tiny_chat_model), model, KVPolicy(), limit) is None  # tiny: fits
