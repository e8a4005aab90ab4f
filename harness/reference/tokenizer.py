"""A word-level tokenizer for the generated world, wrapped as a ``PreTrainedTokenizerFast``.

Special tokens mirror OPT's layout: ``<s>``=0, ``<pad>``=1, ``</s>``=2 (used as both BOS and EOS,
as in OPT's tokenizer), ``<unk>``=3; then the world's words in sorted order. The pre-tokenizer
splits on whitespace and punctuation, and no special tokens are added on encoding (like GPT-2),
so ``encode(query + choice) == encode(query) + encode(choice)`` whenever the choice starts with a
space. Training documents are separated by ``</s>``; some training sequences also start with it,
because the harness prepends BOS to calibration blocks while lm-eval scoring does not.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
PAD_ID, EOS_ID, UNK_ID = 1, 2, 3
BOS_ID = EOS_ID


def build_tokenizer(words: list[str], model_max_length: int) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        if w in vocab:
            raise ValueError(f"word {w!r} collides with a special token")
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False)
    return fast


def word_ids(words: list[str]) -> dict[str, int]:
    """The same mapping as the tokenizer's vocabulary, for fast encoding of space-separated text."""
    return {w: i + len(SPECIALS) for i, w in enumerate(words)}
