"""A tiny byte-level BPE tokenizer with Gemma 4's special tokens, written into a model directory.

Ids: <pad>=0 <eos>=1 <bos>=2 <unk>=3, then the Gemma 4 markers, then learned merges; the whole
vocabulary fits the tiny models' 512 embeddings. generation_config.json lists <eos> and <turn|>
as stop ids, like the real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    "<|tool_call>",
    "<tool_call|>",
]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests of gemma four on mlx",
    "user model system thought call weather city paris tokyo answer question",
] * 20


def write_tokenizer(
    model_dir: str | Path, vocab_size: int = 400, chat_template: str | None = None
) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gemma4_mlx.tokenizer import GEMMA4_TEMPLATE

    model_dir = Path(model_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = chat_template if chat_template is not None else GEMMA4_TEMPLATE
    fast.save_pretrained(str(model_dir))
    # Prepend BOS like Gemma's tokenizer does for raw prompts.
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<bos>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    (model_dir / "generation_config.json").write_text(
        json.dumps(
            {"bos_token_id": 2, "eos_token_id": [1, SPECIAL.index("<turn|>")], "pad_token_id": 0}
        )
    )
    return model_dir
