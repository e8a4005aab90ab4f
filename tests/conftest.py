"""Shared fixtures: tiny randomly initialised models of each family, built in-process.

Real benchmark files come from ../shared/data (never copied into the project); tests that
need them skip with a clear reason when that folder is absent.
"""
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("STREAMLINE_SHARED_DATA", REPO.parent / "shared" / "data"))
OPT_TOKENIZER = SHARED_DATA / "tokenizers" / "opt_derived"


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "SOURCES.md").is_file():
        pytest.skip(f"real benchmark files not found at {SHARED_DATA} (the ../shared/data checkout); "
                    "set STREAMLINE_SHARED_DATA to run these tests")
    return SHARED_DATA


def opt_tokenizer():
    """The OPT tokenizer rebuilt from shared/data/tokenizers/opt_derived (BPE vocab + merges)."""
    shared_data_or_skip()
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast(vocab=str(OPT_TOKENIZER / "vocab.json"), merges=str(OPT_TOKENIZER / "merges.txt"),
                            bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                            add_bos_token=True)
    return tok


def tiny_config(family: str, vocab_size: int = 128, layers: int = 6, hidden: int = 32):
    from transformers import (
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "opt":
        return OPTConfig(ffn_dim=4 * hidden, word_embed_proj_dim=hidden, pad_token_id=1, bos_token_id=2,
                         eos_token_id=2, **common)
    if family == "llama":
        return LlamaConfig(intermediate_size=2 * hidden, num_key_value_heads=2, **common)
    if family == "mistral":
        return MistralConfig(intermediate_size=2 * hidden, num_key_value_heads=2, sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(intermediate_size=2 * hidden, num_key_value_heads=2, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(intermediate_size=2 * hidden, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw))
    model.eval()
    return model


FAMILIES = ["opt", "llama", "mistral", "qwen2", "gpt_neox"]


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    """A tiny OPT with the real OPT tokenizer, saved to disk (for CLI runs on real task files)."""
    tok = opt_tokenizer()
    model = tiny_model("opt", vocab_size=len(tok), layers=6, hidden=32)
    path = tmp_path_factory.mktemp("tiny_opt")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
