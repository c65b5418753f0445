"""Speculative decoding through generate(draft_model=...): lossless and refused when unsafe.

The draft is a differently seeded tiny model of the same shape blended 1:9 with the target, so
it agrees often but not always: the target accepts some drafts and rejects others (its caches
are trimmed back), which every test asserts happened.
"""

import json

import pytest
import tiny
from mlx.utils import tree_map

from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.errors import BadArgument
from gemma4_mlx.generate import generate
from gemma4_mlx.kv.cache import TurboQuantKVCache
from gemma4_mlx.loading import load_model

N_NEW = 24
# The differently seeded model's share of the draft's weights: enough that the draft is often
# wrong, little enough that it is often right (the deeper 26B/31B shapes diverge faster).
DRAFT_MIX = {"26b": 0.03, "31b": 0.03}
# TurboQuant with a small exact sink/window/centring so that a 48-token prompt is compressed.
POLICIES = {
    "exact": KVPolicy(),
    "affine": KVPolicy("affine", bits=8),
    "turboquant": KVPolicy("turboquant", sink=2, fp_window=4, center=8, center_block=16),
}


@pytest.fixture(scope="module")
def pair(tiny_checkpoints, tmp_path_factory):
    """name -> (target, tokenizer, draft): the draft blended from a seed-1 model."""
    made = {}

    def get(name: str):
        if name not in made:
            model, _, tokenizer = tiny.load_target(name, tiny_checkpoints, tmp_path_factory)
            draft_dir = tiny.write_checkpoint(name, tmp_path_factory.mktemp(f"draft-{name}"), 1)[0]
            draft, _ = load_model(draft_dir)
            share = DRAFT_MIX.get(name, 0.1)
            mix = lambda own, other: (1 - share) * own + share * other  # noqa: E731
            draft.update(tree_map(mix, model.parameters(), draft.parameters()))
            made[name] = (model, tokenizer, draft)
        return made[name]

    return get


_prompt = tiny.prompt_ids


@pytest.mark.parametrize("kind", list(POLICIES))
@pytest.mark.parametrize("name", list(tiny.TINY_CONFIGS))
def test_greedy_speculative_decoding_gives_the_greedy_tokens(name, kind, pair, monkeypatch):
    model, tokenizer, draft = pair(name)
    policy = POLICIES[kind]
    if kind == "affine" and any(s.head_dim % 32 for s in model.config.layers if not s.is_sliding):
        pytest.skip("mlx's affine quantization needs a head dim divisible by 32")
    prompt = _prompt(48)
    greedy = generate(model, tokenizer, prompt, N_NEW, kv_policy=policy)
    caches = tiny.collect_caches(monkeypatch, model)
    spec = generate(
        model, tokenizer, prompt, N_NEW, kv_policy=policy, draft_model=draft, num_draft_tokens=3
    )
    print(f"{name} {kind}: greedy {greedy.tokens}\n{name} {kind}: speculative {spec.tokens}")
    print(
        f"{name} {kind}: accepted {spec.accepted_tokens}/{spec.drafted_tokens} drafts, "
        f"per step {spec.accepted_per_step}"
    )
    assert spec.tokens == greedy.tokens
    assert 0 < spec.accepted_tokens < spec.drafted_tokens  # some drafts kept, some rejected
    assert sum(spec.accepted_per_step) == spec.accepted_tokens
    if kind == "turboquant":
        tq = [c for c in caches[-1] if isinstance(c, TurboQuantKVCache)]
        assert tq and all(c.keys.n_quantized > c.keys.n_sink for c in tq)  # compressed


def test_a_draft_equal_to_the_target_is_always_accepted(pair):
    model, tokenizer, _ = pair("gemma3")
    result = generate(model, tokenizer, _prompt(16), 13, draft_model=model, num_draft_tokens=4)
    assert result.accepted_tokens == result.drafted_tokens > 0
    assert result.acceptance_rate == 1.0
    # 13 tokens at 4 drafts + 1 of the target's per step: 5 + 5 + the last 3 (all drafts)
    assert result.accepted_per_step == [4, 4, 3] or result.finish_reason == "stop"


def test_a_draft_longer_than_the_cache_rewind_is_refused_before_generating(pair):
    model, tokenizer, draft = pair("e2b")
    seen = []
    with pytest.raises(BadArgument, match="rewind"):
        generate(
            model, tokenizer, _prompt(16), 8, kv_policy=KVPolicy("turboquant", max_rewind=2),
            on_text=seen.append, draft_model=draft, num_draft_tokens=3,
        )  # fmt: skip
    assert seen == []
    with pytest.raises(BadArgument, match="num_draft_tokens"):
        generate(model, tokenizer, _prompt(16), 8, draft_model=draft, num_draft_tokens=0)


def test_sampled_speculative_tokens_have_the_target_distribution(pair):
    """The first two sampled tokens (the first is a draft step too) over many seeds: their
    joint distribution is the target's own (temperature 1, top-k 4), by a chi-square test."""
    model, tokenizer, draft = pair("gemma3")
    p_value, accepted, drafted = tiny.sampled_pair_test(
        model, tokenizer, tiny.prompt_ids(12, 3), draft, 2
    )
    assert 0 < accepted < drafted
    assert p_value > 1e-3


def test_cli_generate_with_a_draft_model_reports_acceptance(tiny_chat_model, capsys):
    from test_cli import run_cli

    base = ["generate", "-m", str(tiny_chat_model), "-p", "hello world", "--max-tokens", "10"]
    base += ["--temp", "0"]
    code, out, err = run_cli([*base, "--json"], capsys)
    assert code == 0, err
    plain = json.loads(out)
    spec_args = ["--draft-model", str(tiny_chat_model), "--num-draft-tokens", "2", "--json"]
    code, out, err = run_cli([*base, *spec_args], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == plain["tokens"]
    assert result["num_draft_tokens"] == 2
    assert result["accepted_tokens"] == result["drafted_tokens"] > 0  # the draft is the target
    code, _, err = run_cli(
        [*base, "--draft-model", str(tiny_chat_model), "--num-draft-tokens", "99"], capsys
    )
    assert code == 2 and "--num-draft-tokens" in err and err.count("\n") == 1
    code, _, err = run_cli([*base, "--num-draft-tokens", "2"], capsys)
    assert code == 2 and "needs --draft-model" in err and err.count("\n") == 1
    code, _, err = run_cli([*base, "--draft-model", str(tiny_chat_model / "nope")], capsys)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_chat_with_a_draft_model_answers_as_without(tiny_chat_model, pair):
    from gemma4_mlx import Chat, load

    model, tokenizer = load(str(tiny_chat_model))
    draft = pair("e2b")[2]  # tiny_chat_model holds the e2b target's weights
    plain = Chat(model, tokenizer, system="be brief")
    spec = Chat(model, tokenizer, system="be brief", draft_model=draft, num_draft_tokens=3)
    accepted = rejected = 0
    for text in ("hello world", "the quick fox", "weather in paris"):
        a = plain.send(text, max_tokens=12)
        b = spec.send(text, max_tokens=12)
        assert b.tokens == a.tokens
        assert b.prompt_tokens == a.prompt_tokens
        accepted += b.accepted_tokens
        rejected += b.drafted_tokens - b.accepted_tokens
        assert spec.cache[0].offset == spec.draft_cache[0].offset == spec.held_tokens
    assert spec.last_prefilled < len(spec.cached_tokens)  # later turns reuse the cache
    assert accepted > 0 and rejected > 0


def test_cli_chat_with_a_draft_model_reports_acceptance(tiny_chat_model, capsys, monkeypatch):
    import io

    from test_cli import run_cli

    lines = b"hello world\nthe quick fox\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines)))
    args = ["chat", "-m", str(tiny_chat_model), "--max-tokens", "8", "--temp", "0"]
    code, _, err = run_cli([*args, "--draft-model", str(tiny_chat_model)], capsys)
    assert code == 0, err
    assert err.count("draft accepted") == 2


def test_an_unsupported_assistant_checkpoint_is_detected_and_refused_in_words(tmp_path, pair):
    from gemma4_mlx.errors import UserError

    model, tokenizer, _ = pair("gemma3")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4_unified_assistant"}))
    with pytest.raises(UserError, match="gemma4_unified_assistant drafter .* not supported"):
        generate(model, tokenizer, _prompt(8), 4, draft_model=tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4_assistant"}))
    with pytest.raises(UserError, match="needs a text_config"):
        generate(model, tokenizer, _prompt(8), 4, draft_model=tmp_path)


def test_a_draft_checkpoint_path_is_loaded(pair, tiny_checkpoints):
    model, tokenizer, _ = pair("gemma3")
    greedy = generate(model, tokenizer, _prompt(8), 8)
    spec = generate(model, tokenizer, _prompt(8), 8, draft_model=str(tiny_checkpoints("gemma3")[0]))
    assert spec.tokens == greedy.tokens
    assert spec.accepted_tokens == spec.drafted_tokens > 0  # the target's own weights


def test_a_reused_prompt_cache_file_gives_the_draft_the_same_prefix(pair, tmp_path):
    model, tokenizer, draft = pair("e4b")
    prompt, path = _prompt(40), tmp_path / "prompt.safetensors"
    greedy = generate(model, tokenizer, prompt, 16)
    for _ in range(2):  # the first run saves the prompt's cache, the second reuses it
        notes = []
        spec = generate(
            model, tokenizer, prompt, 16, prompt_cache_file=path, on_note=notes.append,
            draft_model=draft, num_draft_tokens=2,
        )  # fmt: skip
        assert spec.tokens == greedy.tokens
        assert spec.drafted_tokens > spec.accepted_tokens
    assert spec.prefilled_tokens < len(prompt)  # the second run prefilled only the rest


def test_speculative_benchmark_quick_is_lossless_on_real_weights(tmp_path, demo_cache):
    from test_benchmarks_smoke import _run

    result = _run("speculative.py", tmp_path, env={"GEMMA4_MLX_CACHE": str(demo_cache)})
    rows = [r for r in result["results"]["exact"].values() if "draft" in r]
    print(rows)
    assert rows and all(r["lossless"] and 0 <= r["accepted"] <= r["drafted"] for r in rows)
    assert (tmp_path / "speculative_quick.png").stat().st_size > 0
