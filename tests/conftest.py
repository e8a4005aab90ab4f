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


def one_error_line(rc, capsys, needles=(), out=None) -> str:
    """The bad-input convention: exit code 2, one ``error:`` line holding every needle, and (with
    ``out``) no result JSON written there; returns the line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    if out is not None and Path(out).exists():
        assert not list(Path(out).rglob("*.json"))
    return err[0]


def no_model_loading(monkeypatch):
    """Fail the test if the runner loads model weights (the bad input must be found before)."""
    import harness.runner

    def no_model(*_a, **_k):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(harness.runner, "load_model", no_model)


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "SOURCES.md").is_file():
        pytest.skip(f"real benchmark files not found at {SHARED_DATA} (the ../shared/data checkout); "
                    "set STREAMLINE_SHARED_DATA to run these tests")
    return SHARED_DATA


def arc_include_task(folder: Path, data: Path) -> Path:
    """A task for --include-path: ``my_arc``, ARC-Challenge's questions in a prompt of our own."""
    import yaml

    folder.mkdir(exist_ok=True)
    (folder / "my_arc.yaml").write_text(yaml.safe_dump({
        "task": "my_arc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data / "arc_challenge" / "test.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "Q: {{question}}\nA:", "doc_to_choice": "{{choices.text}}",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))
    return folder


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
    if family in NEW_FAMILY_CONFIGS:  # the families added with issue 8 (and "gptj", left to the structural fallback)
        from transformers import AutoConfig

        ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return AutoConfig.for_model(family, **{**common, **ids, **NEW_FAMILY_CONFIGS[family](hidden)})
    raise ValueError(family)


# model_type -> extra config of a tiny model; Gemma 2/3 get a 4-token sliding window on alternate layers
NEW_FAMILY_CONFIGS = {
    "qwen3": lambda h: dict(intermediate_size=2 * h, num_key_value_heads=2, head_dim=h // 4),
    "gemma": lambda h: dict(intermediate_size=2 * h, num_key_value_heads=2, head_dim=h // 4),
    "gemma2": lambda h: dict(intermediate_size=2 * h, num_key_value_heads=2, head_dim=h // 4, sliding_window=4),
    "gemma3_text": lambda h: dict(intermediate_size=2 * h, num_key_value_heads=2, head_dim=h // 4, sliding_window=4,
                                  sliding_window_pattern=2),
    "phi": lambda h: dict(intermediate_size=2 * h),
    "phi3": lambda h: dict(intermediate_size=2 * h, num_key_value_heads=2),
    "mixtral": lambda h: dict(intermediate_size=h, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "gptj": lambda h: dict(rotary_dim=4),  # not in the adapter table: served by the structural fallback
}


def tiny_model(family: str, seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw))
    model.eval()
    return model


FAMILIES = ["opt", "llama", "mistral", "qwen2", "gpt_neox"]


class CharTokenizer:
    """A stand-in tokenizer for tiny models: one id (3..102) per character."""

    def __init__(self, bos_token_id=None, pad_token_id=0):
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id

    def __call__(self, text, **kw):
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}


def tiny_tokenizer(vocab_size: int = 128):
    """A real (saveable) word-level tokenizer for tiny models: ids 0 <pad>, 1 <s>, 2 </s>, 3.. 't3'..,
    so ``save_pruned(model, tiny_tokenizer(), dir)`` writes a folder ``load_pruned`` reads back."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def random_blocks(k: int, seq: int = 16, seed: int = 0, vocab_size: int = 128, batch_size: int = 4):
    """``k`` random token blocks as CalibrationData (all tokens real)."""
    import torch

    from harness.signals.calibration import CalibrationConfig, CalibrationData

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (k, seq), generator=g)
    return CalibrationData(ids, torch.ones_like(ids),
                           CalibrationConfig(source="x.txt", seq_len=seq, batch_size=batch_size),
                           {"blocks": k, "seed": seed})


def make_context(model, n, samples=8, seq=16, batch_size=4):
    """A MethodContext on random calibration blocks whose training draws (``ctx.training_data``)
    are other random blocks, for running any method on a tiny model."""
    from harness import MethodContext, get_adapter

    ctx = MethodContext(model=model, adapter=get_adapter(model), tokenizer=CharTokenizer(),
                        calibration=random_blocks(samples, seq, batch_size=batch_size), num_remove=n, progress=False)
    ctx.training_data = lambda k, seq_len=None, seed_offset=1, **kw: random_blocks(k, seq_len or seq,
                                                                                   seed=100 + seed_offset)
    return ctx


def run_method(name, ctx, return_config=False, **opts):
    """Run a registered method (or METHOD+STEP) on ``ctx`` with string-able options
    (``{key: value}`` for a method, ``{component: {key: value}}`` for a pipeline). Trained
    Streamline variants default to as many training blocks as the calibration set (not 3,000)."""
    import torch

    from harness.plugins.pipeline import resolve_method

    base = name.split("+")[0]
    nested = "+" in name
    options = opts if nested else {name: opts}
    if base.startswith("streamline") and base != "streamline-none":
        options = {**options, base: {"train_samples": len(ctx.calibration), **options.get(base, {})}}
    spec, cfg = resolve_method(name, {t: {k: str(v) for k, v in o.items()} for t, o in options.items()})
    cfg.validate(ctx.num_layers, ctx.num_remove)  # as the runner does before any method runs
    torch.manual_seed(0)
    result = spec.fn(ctx, cfg)
    return (result, cfg) if return_config else result


@pytest.fixture
def method_context():
    """``make(model, n, samples=8, seq=16)``: see ``make_context``."""
    return make_context


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory):
    """A tiny OPT with the real OPT tokenizer, saved to disk (for CLI runs on real task files)."""
    tok = opt_tokenizer()
    model = tiny_model("opt", vocab_size=len(tok), layers=6, hidden=32)
    path = tmp_path_factory.mktemp("tiny_opt")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
