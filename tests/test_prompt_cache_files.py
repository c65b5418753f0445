"""Prompt-cache files (gemma4_mlx.prompt_files): reused only for the model and KV policy they
were built with, any file name, atomic writes, one line for every bad file or path (CLI exit 2,
nothing left behind), and chat's /save never ends the conversation."""

import json
import shutil

import mlx.core as mx
import pytest
from test_cli import run_cli

from gemma4_mlx import generate
from gemma4_mlx.cache import KVPolicy
from gemma4_mlx.errors import UserError
from gemma4_mlx.loading import load
from gemma4_mlx.prompt_files import (
    FORMAT,
    load_prompt_file,
    model_identity,
    read_prompt_file,
    save_prompt_file,
)

PROMPT = [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58]
TQ = "turboquant:k4,v2,tiers=2,sink=2,window=3,center=2,block=6,codec=mse,grid=uniform"


@pytest.fixture(scope="module")
def chat_model(tiny_chat_model):
    return load(str(tiny_chat_model))


@pytest.fixture(scope="module")
def other_model_dir(tiny_checkpoints, tmp_path_factory):
    """Another model (Gemma 3 layout) with the same tokenizer."""
    from tiny_tokenizer import write_tokenizer

    src, _ = tiny_checkpoints("gemma3")
    dst = tmp_path_factory.mktemp("tiny-other") / "model"
    shutil.copytree(src, dst)
    write_tokenizer(dst)
    return dst


def _leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("policy", ["exact", TQ])
def test_a_reused_file_gives_the_tokens_of_a_fresh_run(chat_model, tmp_path, policy):
    model, tokenizer = chat_model
    fresh = generate(model, tokenizer, PROMPT, max_tokens=6, kv_policy=policy)
    path = tmp_path / "cache.bin"  # any name: the tool reads what it wrote
    first = generate(model, tokenizer, PROMPT[:12], max_tokens=2, kv_policy=policy,
                     prompt_cache_file=path)  # fmt: skip
    assert first.prefilled_tokens == 12 and path.is_file()
    assert read_prompt_file(path)[3]["policy"] == str(KVPolicy.parse(policy))
    notes = []
    reused = generate(model, tokenizer, PROMPT, max_tokens=6, kv_policy=policy,
                      prompt_cache_file=path, on_note=notes.append)  # fmt: skip
    print(f"{policy}: fresh {fresh.tokens}, from the file {reused.tokens}")
    assert reused.prefilled_tokens == len(PROMPT) - 11 and notes == []
    assert reused.tokens == fresh.tokens
    assert reused.kv_policy == str(KVPolicy.parse(policy))
    assert _leftovers(tmp_path) == ["cache.bin"]


def test_file_records_model_policy_shapes_and_tokens(chat_model, tmp_path):
    model, tokenizer = chat_model
    path = tmp_path / "p.safetensors"
    generate(model, tokenizer, PROMPT, max_tokens=1, kv_policy=TQ, prompt_cache_file=path)
    _, _, classes, meta = read_prompt_file(path)
    assert meta["format"] == FORMAT and meta["model"] == model_identity(model)[0]
    assert json.loads(meta["tokens"]) == PROMPT[:-1]
    assert meta["policy"] == TQ
    layers = json.loads(meta["layers"])
    assert len(layers) == len(classes) == len(model.make_cache())
    assert all(n_kv > 0 and head_dim > 0 for _, n_kv, head_dim in layers)


def test_another_policy_is_reported_and_the_file_rebuilt(chat_model, tmp_path):
    model, tokenizer = chat_model
    path = tmp_path / "p.safetensors"
    generate(model, tokenizer, PROMPT[:10], max_tokens=1, kv_policy="exact", prompt_cache_file=path)
    notes = []
    result = generate(model, tokenizer, PROMPT, max_tokens=2, kv_policy=TQ,
                      prompt_cache_file=path, on_note=notes.append)  # fmt: skip
    assert (
        len(notes) == 1 and "built with KV policy exact, not the requested turboquant" in notes[0]
    )
    assert result.prefilled_tokens == len(PROMPT) and result.kv_policy == TQ
    assert result.kv_cache.startswith("turboquant mse K4/V2")
    assert read_prompt_file(path)[3]["policy"] == TQ  # rebuilt with the requested policy


def _write_raw(path, model, tokens, cache=None, **meta):
    """A file in the tool's format with chosen metadata (e.g. what /save used to write)."""
    from mlx_lm.models.cache import save_prompt_cache

    digest, summary = model_identity(model)
    metadata = {"format": FORMAT, "model": digest, "model_summary": summary, "policy": "exact"}
    metadata |= {"tokens": json.dumps(tokens), "layers": "[]"} | meta
    save_prompt_cache(str(path), cache if cache is not None else model.make_cache(), metadata)


@pytest.mark.parametrize(
    "tokens, meta, note",
    [
        ([], {}, "holds no tokens; ignoring it"),  # chat's /save before any turn used to write it
        ([40, 41], {}, "does not match this model's cache layout"),  # cache offsets 0, not 2
        ([40, 41], {"format": None}, "is from an older gemma4-mlx"),
    ],
)
def test_an_empty_or_unusable_file_is_no_file(chat_model, tmp_path, tokens, meta, note):
    model, tokenizer = chat_model
    path = tmp_path / "p.safetensors"
    _write_raw(path, model, tokens, **{k: v for k, v in meta.items() if v is not None})
    if meta.get("format", 1) is None:  # an old file: no format entry at all
        arrays, flat = mx.load(str(path), return_metadata=True)
        flat.pop("0.format")
        mx.save_safetensors(str(path), arrays, flat)
    notes = []
    result = generate(model, tokenizer, [40, 41, 60, 61], max_tokens=2, prompt_cache_file=path,
                      on_note=notes.append)  # fmt: skip
    assert len(notes) == 1 and note in notes[0], notes
    assert result.prefilled_tokens == 4 and result.kv_cache_bytes > 0
    assert json.loads(read_prompt_file(path)[3]["tokens"]) == [40, 41, 60]  # replaced


def test_saving_nothing_is_refused():
    with pytest.raises(UserError, match="nothing to save yet"):
        save_prompt_file("x.safetensors", [], [], None, KVPolicy())


def test_ctrl_c_while_writing_leaves_nothing_behind(chat_model, tmp_path, monkeypatch):
    import mlx_lm.models.cache as mlx_cache

    model, _ = chat_model
    cache = model.make_cache()
    model(mx.array([[40, 41, 42]]), cache=cache)

    def interrupted(path, *args):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_cache, "save_prompt_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_prompt_file(tmp_path / "p.safetensors", cache, [40, 41, 42], model, KVPolicy())
    assert _leftovers(tmp_path) == []


def test_load_refuses_another_models_file(chat_model, other_model_dir, tmp_path):
    other, tokenizer = load(str(other_model_dir))
    path = tmp_path / "p.safetensors"
    generate(other, tokenizer, PROMPT, max_tokens=1, prompt_cache_file=path)
    model, _ = chat_model
    with pytest.raises(UserError, match="holds a KV cache for another model") as info:
        load_prompt_file(path, model, KVPolicy(), PROMPT + [60])
    assert "gemma3_text" in str(info.value) and "gemma4_text" in str(info.value)


# -- the CLI: one line, exit 2, nothing left behind, files that are not ours untouched ----------


def _cli_generate(model_dir, path, capsys, *extra):
    args = ["generate", "-m", str(model_dir), "-p", "the quick brown fox", "--raw"]
    args += ["--max-tokens", "3", "--json", "--prompt-cache-file", str(path), *extra]
    return run_cli(args, capsys)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "sub", "is a directory; give a file"),
        (lambda d: d / "plain.txt" / "cache.safetensors", "cannot write the prompt cache"),
        (lambda d: d / "plain.txt", "not a prompt cache file"),
        (lambda d: d / "weights.safetensors", "not a prompt cache written by gemma4-mlx"),
    ],
)
def test_bad_prompt_cache_paths_are_one_line(tiny_chat_model, tmp_path, capsys, make, message):
    (tmp_path / "sub").mkdir()
    (tmp_path / "plain.txt").write_text("my notes\n")
    mx.save_safetensors(str(tmp_path / "weights.safetensors"), {"w": mx.zeros((2,))})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, out, err = _cli_generate(tiny_chat_model, make(tmp_path), capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert _leftovers(tmp_path) == ["plain.txt", "sub", "weights.safetensors"]
    assert list((tmp_path / "sub").iterdir()) == []


def test_cli_refuses_another_models_file(tiny_chat_model, other_model_dir, tmp_path, capsys):
    path = tmp_path / "cache.bin"
    code, _, err = _cli_generate(other_model_dir, path, capsys)
    assert code == 0, err
    saved = path.read_bytes()
    code, out, err = _cli_generate(tiny_chat_model, path, capsys)
    assert code == 2 and err.count("\n") == 1 and "for another model" in err, err
    assert path.read_bytes() == saved


def test_cli_reports_the_policy_it_used(tiny_chat_model, tmp_path, capsys):
    path = tmp_path / "cache.bin"
    code, out, err = _cli_generate(tiny_chat_model, path, capsys, "--kv-cache", "turboquant")
    assert code == 0, err
    code, out, err = _cli_generate(tiny_chat_model, path, capsys)  # asks for the exact cache
    result = json.loads(out)
    assert code == 0 and result["kv_policy"] == "exact" and result["kv_cache"] == "exact float32"
    assert err.count("\n") == 1 and "built with KV policy turboquant:" in err, err
    assert read_prompt_file(path)[3]["policy"] == "exact"


def test_chat_save_errors_keep_the_conversation(tiny_chat_model, tmp_path, capsys, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "plain.txt").write_text("x")
    lines = [
        f"/save {tmp_path / 'early.safetensors'}",  # before any turn: nothing to save
        "hello",
        f"/save {tmp_path / 'sub'}",
        f"/save {tmp_path / 'plain.txt' / 'c.safetensors'}",
        "the quick fox",
        f"/save {tmp_path / 'chat.bin'}",
        "/quit",
    ]
    code, out, err = run_cli(
        ["chat", "-m", str(tiny_chat_model), "--max-tokens", "3"],
        capsys,
        stdin="\n".join(lines) + "\n",
        monkeypatch=monkeypatch,
    )
    assert code == 0, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "Traceback" not in err
    assert "nothing to save yet" in errors[0] and "is a directory" in errors[1]
    assert "cannot write the prompt cache" in errors[2]
    assert err.count("prefilled") == 2  # both turns ran
    assert _leftovers(tmp_path) == ["chat.bin", "plain.txt", "sub"]
    assert list((tmp_path / "sub").iterdir()) == []
    # what /save wrote is a prompt cache the next run reads
    meta = read_prompt_file(tmp_path / "chat.bin")[3]
    assert meta["policy"] == "exact" and len(json.loads(meta["tokens"])) > 0


def test_load_prompt_cache_refuses_an_unknown_cache_class(tmp_path):
    from mlx_lm.models.cache import KVCache, save_prompt_cache

    from gemma4_mlx.prompt_files import load_prompt_cache

    class SomeoneElsesCache(KVCache):
        pass

    cache = SomeoneElsesCache()
    cache.update_and_fetch(mx.zeros((1, 1, 2, 4)), mx.zeros((1, 1, 2, 4)))
    save_prompt_cache(str(tmp_path / "c.safetensors"), [cache])
    with pytest.raises(UserError, match="unknown class 'SomeoneElsesCache'"):
        load_prompt_cache(tmp_path / "c.safetensors")
