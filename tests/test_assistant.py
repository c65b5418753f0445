"""Speculative decoding with Gemma 4's assistant drafter: lossless, reported, refused when unsafe.

A random tiny drafter almost never agrees with the tiny target, so no draft would ever be kept.
``fitted`` gives the drafter a head fitted by least squares to the target's next-token logits on
a few greedy continuations (its features: its own hidden state at the first draft step), so it
is often right on its first draft and mostly wrong after: the target keeps some drafts and
rejects others (its caches are trimmed back), which every test asserts happened.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import tiny
import tiny_assistant

from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.errors import BadArgument, UserError
from gemma4_mlx.generate import generate
from gemma4_mlx.kv.cache import TurboQuantKVCache
from gemma4_mlx.loading import load_assistant
from gemma4_mlx.speculative import TargetKV

N_NEW = 24
POLICIES = {
    "exact": KVPolicy(),
    "affine": KVPolicy("affine", bits=8),
    "turboquant": KVPolicy("turboquant", sink=2, fp_window=4, center=8, center_block=16),
}


_prompt = tiny.prompt_ids


def fit_head(target, assistant, sequences: list[list[int]], start: int) -> None:
    """Set the drafter's head (and cluster scores) to the least-squares map from its first-step
    hidden state at position p to the target's logits there, over positions >= start."""
    window = target.config.sliding_window
    features, labels = [], []
    for seq in sequences:
        cache, stored = target.make_cache(KVPolicy()), {}
        h = target.hidden_states(mx.array([seq]), cache, stored)
        kv = TargetKV.after_call(stored, len(seq), None)
        logits = target.logits(h)[0]
        for p in range(start, len(seq) - 1):
            emb = target.model.scale_embeddings(target.model.embed_tokens(mx.array([[seq[p]]])))
            x = mx.concatenate([emb, h[:, p - 1 : p]], axis=-1)
            features.append(np.array(assistant.hidden(x, p, kv.for_position(p, window))[0, 0]))
            labels.append(np.array(logits[p]))
    F, logits = np.stack(features), np.stack(labels)
    Y = 8.0 * np.eye(logits.shape[1])[logits.argmax(axis=1)]  # the target's greedy choice
    Y = Y - Y.mean(axis=1, keepdims=True)
    W = np.linalg.lstsq(F, Y, rcond=None)[0]  # (H, V)
    head = mx.array(np.ascontiguousarray(W.T))
    if "lm_head" in assistant:
        assistant.lm_head.weight = head
    else:
        assistant.model.embed_tokens.weight = head
    if "masked_embedding" in assistant:  # cluster score: the best logit among its tokens
        ordering = np.array(assistant.masked_embedding.token_ordering)
        clusters = ordering.reshape(tiny_assistant.CENTROIDS, -1)
        best = (F @ W)[:, clusters].max(axis=-1)  # (samples, clusters)
        C = np.linalg.lstsq(F, best, rcond=None)[0]
        assistant.masked_embedding.centroids.weight = mx.array(np.ascontiguousarray(C.T))


@pytest.fixture(scope="module")
def fitted(tiny_checkpoints, tmp_path_factory):
    """name -> (target, tokenizer, drafter, drafter dir): the drafter's head fitted."""
    made = {}

    def get(name: str):
        if name not in made:
            model, _, tokenizer = tiny.load_target(name, tiny_checkpoints, tmp_path_factory)
            out = tmp_path_factory.mktemp(f"assistant-{name}")
            tiny_assistant.write_assistant(name, out)
            assistant = load_assistant(out)[0]
            # the test prompts' greedy continuations with each cache (compression changes them)
            prompts = [_prompt(48, seed) for seed in range(3)]
            sequences = [
                p + generate(model, tokenizer, p, N_NEW, kv_policy=policy).tokens
                for p in prompts
                for policy in POLICIES.values()
            ]
            fit_head(model, assistant, sequences, start=40)
            made[name] = (model, tokenizer, assistant, out)
        return made[name]

    return get


@pytest.mark.parametrize("kind", list(POLICIES))
@pytest.mark.parametrize("name", list(tiny_assistant.ASSISTANT_FOR))
def test_greedy_assistant_speculation_gives_the_greedy_tokens(name, kind, fitted, monkeypatch):
    model, tokenizer, assistant, _ = fitted(name)
    policy = POLICIES[kind]
    prompt = _prompt(48, seed=1)
    greedy = generate(model, tokenizer, prompt, N_NEW, kv_policy=policy)
    caches = tiny.collect_caches(monkeypatch, model)
    spec = generate(
        model, tokenizer, prompt, N_NEW, kv_policy=policy, draft_model=assistant,
        num_draft_tokens=3,
    )  # fmt: skip
    print(f"{name} {kind}: greedy {greedy.tokens}\n{name} {kind}: speculative {spec.tokens}")
    print(
        f"{name} {kind}: accepted {spec.accepted_tokens}/{spec.drafted_tokens} drafts, "
        f"per step {spec.accepted_per_step}"
    )
    assert spec.tokens == greedy.tokens
    assert 0 < spec.accepted_tokens < spec.drafted_tokens  # some drafts kept, some rejected
    assert sum(spec.accepted_per_step) == spec.accepted_tokens
    trims = [n for n in spec.accepted_per_step[:-1] if n < 3]
    assert trims  # steps that rejected a draft: the target's cache was trimmed back
    cache = caches[-1]
    assert cache[0].offset < len(prompt) + len(spec.tokens) + 3  # trimmed, not just grown
    if kind == "turboquant":
        tq = [c for c in cache if isinstance(c, TurboQuantKVCache)]
        assert tq and all(c.keys.n_quantized > c.keys.n_sink for c in tq)  # compressed


def test_assistant_speculation_through_the_prompt_cache_file_and_chat(fitted, tmp_path):
    model, tokenizer, assistant, _ = fitted("e2b")
    prompt, path = _prompt(40, seed=2), tmp_path / "prompt.safetensors"
    greedy = generate(model, tokenizer, prompt, 16)
    for _ in range(2):  # the first run saves the prompt's cache, the second reuses it
        spec = generate(
            model, tokenizer, prompt, 16, prompt_cache_file=path, on_note=lambda _: None,
            draft_model=assistant, num_draft_tokens=2,
        )  # fmt: skip
        assert spec.tokens == greedy.tokens
    assert spec.prefilled_tokens < len(prompt)


def test_chat_with_an_assistant_drafter_answers_as_without(tiny_chat_model, fitted):
    from gemma4_mlx import Chat, load

    model, tokenizer = load(str(tiny_chat_model))  # the e2b target's weights
    assistant = fitted("e2b")[2]
    plain = Chat(model, tokenizer, system="be brief")
    spec = Chat(model, tokenizer, system="be brief", draft_model=assistant, num_draft_tokens=3)
    drafted = 0
    for text in ("hello world", "the quick fox", "weather in paris"):
        a = plain.send(text, max_tokens=12)
        b = spec.send(text, max_tokens=12)
        assert b.tokens == a.tokens
        drafted += b.drafted_tokens
        assert spec.cache[0].offset == spec.held_tokens
    assert spec.last_prefilled < len(spec.cached_tokens)  # later turns reuse the cache
    assert drafted > 0


def test_sampled_assistant_tokens_have_the_target_distribution(fitted):
    """The first two sampled tokens over many seeds (the second drafted, kept or replaced by
    the residual rule): their joint distribution is the target's own (temperature 1, top-k 4),
    by a chi-square test."""
    model, tokenizer, assistant, _ = fitted("26b")
    prompt = _prompt(48, seed=0)  # a prompt the head was fitted on
    p_value, accepted, drafted = tiny.sampled_pair_test(model, tokenizer, prompt, assistant, 1)
    assert 0 < accepted < drafted
    assert p_value > 1e-3


def test_an_assistant_draft_longer_than_the_cache_rewind_is_refused_before_generating(fitted):
    model, tokenizer, assistant, _ = fitted("e2b")
    seen = []
    with pytest.raises(BadArgument, match="rewind"):
        generate(
            model, tokenizer, _prompt(16), 8, kv_policy=KVPolicy("turboquant", max_rewind=2),
            on_text=seen.append, draft_model=assistant, num_draft_tokens=3,
        )  # fmt: skip
    assert seen == []


def test_an_assistant_checkpoint_path_is_detected_from_its_config(fitted, tiny_checkpoints):
    model, tokenizer, _, path = fitted("e2b")
    greedy = generate(model, tokenizer, _prompt(20), 8)
    spec = generate(model, tokenizer, _prompt(20), 8, draft_model=str(path))
    assert spec.tokens == greedy.tokens
    assert spec.drafted_tokens > 0


def test_an_assistant_for_another_target_is_refused_in_words(fitted):
    model, tokenizer, _, _ = fitted("e4b")  # two kv heads; the e2b drafter reads one
    e2b_assistant = fitted("e2b")[2]
    with pytest.raises(UserError, match="assistant made for this model size"):
        generate(model, tokenizer, _prompt(8), 4, draft_model=e2b_assistant)


# -- CLI: one clear line and exit 2 for a drafter that cannot draft for the model -----------


@pytest.fixture(scope="module")
def bad_assistants(tmp_path_factory):
    """kind -> an assistant checkpoint the tiny e2b chat model cannot use."""
    out = {}
    for kind, overrides in (("size", {"backbone_hidden_size": 32}), ("vocab", {})):
        d = tmp_path_factory.mktemp(f"bad-assistant-{kind}")
        if kind == "vocab":
            config = tiny_assistant.assistant_config("e2b")
            config.text_config.vocab_size = 256
            from transformers import Gemma4AssistantForCausalLM

            Gemma4AssistantForCausalLM(config).save_pretrained(d, safe_serialization=True)
        else:
            tiny_assistant.write_assistant("e2b", d, **overrides)
        out[kind] = d
    return out


def test_cli_generate_with_an_assistant_reports_acceptance(tiny_chat_model, fitted, capsys):
    from test_cli import run_cli

    path = fitted("e2b")[3]
    base = ["generate", "-m", str(tiny_chat_model), "-p", "hello world", "--max-tokens", "10"]
    base += ["--temp", "0"]
    code, out, err = run_cli([*base, "--json"], capsys)
    assert code == 0, err
    plain = json.loads(out)
    code, out, err = run_cli([*base, "--draft-model", str(path), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == plain["tokens"]
    assert result["num_draft_tokens"] == 3 and result["drafted_tokens"] > 0
    assert 0 <= result["accepted_tokens"] <= result["drafted_tokens"]
    code, out, err = run_cli([*base, "--draft-model", str(path)], capsys)
    assert code == 0 and "draft accepted" in err


@pytest.mark.parametrize("kind", ["size", "vocab"])
def test_cli_refuses_an_assistant_for_another_model_in_one_line(
    tiny_chat_model, bad_assistants, kind, capsys
):
    from test_cli import run_cli

    args = ["generate", "-m", str(tiny_chat_model), "-p", "hello", "--max-tokens", "4"]
    code, out, err = run_cli([*args, "--draft-model", str(bad_assistants[kind])], capsys)
    print(err)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
    assert ("hidden size" if kind == "size" else "vocabulary") in err
    assert out == ""


def test_a_converted_quantized_assistant_drafts_losslessly(fitted, tmp_path):
    from gemma4_mlx.convert import convert
    from gemma4_mlx.speculative import load_draft

    model, tokenizer, _, path = fitted("e4b")
    out = convert(path, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma4_assistant" and config["quantization"]["bits"] == 8
    draft = load_draft(out)
    assert "scales" in dict(draft.pre_projection.items())  # quantized, as written
    prompt = _prompt(30, seed=5)
    greedy = generate(model, tokenizer, prompt, 12)
    spec = generate(model, tokenizer, prompt, 12, draft_model=draft, num_draft_tokens=2)
    assert spec.tokens == greedy.tokens and spec.drafted_tokens > 0


# -- serve --draft-model -------------------------------------------------------------------


def _serve(model_dir, draft=None):
    from gemma4_mlx.loading import load
    from gemma4_mlx.server import Server, ServerConfig
    from gemma4_mlx.speculative import prepare_draft

    model, tokenizer = load(model_dir)
    server = Server(ServerConfig(port=0, model_id="tiny"))
    server.attach(model, tokenizer, model_dir, draft=draft and prepare_draft(model, draft, 3))
    return server


def _ask(server, messages, **extra) -> dict:
    import urllib.request

    body = dict(model="tiny", messages=messages, max_tokens=12, temperature=0, **extra)
    request = urllib.request.Request(
        server.url + "/v1/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("drafter", ["assistant", "draft_model"])
def test_serve_with_a_draft_answers_as_without(tiny_chat_model, fitted, drafter):
    """Greedy answers through the server with a draft (the assistant, or a draft model: the
    target's own weights) are the plain server's, a follow-up turn (its prompt cache) too."""
    draft = fitted("e2b")[3] if drafter == "assistant" else tiny_chat_model
    plain, spec = _serve(tiny_chat_model), _serve(tiny_chat_model, draft)
    try:
        chat = [{"role": "user", "content": "hello world"}]
        for turn in ("the quick fox", "weather in paris"):
            a, b = _ask(plain, chat), _ask(spec, chat)
            assert b["choices"][0]["message"] == a["choices"][0]["message"]
            assert b["usage"] == a["usage"]
            chat += [a["choices"][0]["message"], {"role": "user", "content": turn}]
        engine = spec.state.api.engine
        assert engine.drafted > 0 and plain.state.api.engine.drafted == 0
        if drafter == "draft_model":  # the target's own weights: every draft kept
            assert engine.accepted == engine.drafted
    finally:
        plain.close()
        spec.close()


def test_cli_serve_refuses_num_draft_tokens_without_a_draft_in_one_line(tiny_chat_model, capsys):
    from test_cli import run_cli

    args = ["serve", "-m", str(tiny_chat_model), "--port", "0", "--num-draft-tokens", "2"]
    code, out, err = run_cli(args, capsys)
    assert code == 2 and "needs --draft-model" in err and err.count("\n") == 1
