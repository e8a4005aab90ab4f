"""Calibration data: a text source cut into fixed-length token blocks.

Sources: a local ``.txt`` file (whole text), a local ``.jsonl``/``.json`` file (a text field,
default ``text``), or a Hub dataset id ``path[:config]`` (split via ``split``). The default is
wikitext-2 (Hub ``wikitext:wikitext-2-raw-v1`` train; offline the caller passes
``<data-dir>/wikitext2/wikitext-2-v1-tokens/valid.txt``).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from harness import defaults
from harness.errors import UsageError
from harness.io import iter_jsonl

HUB_DEFAULT = "wikitext:wikitext-2-raw-v1"
LOCAL_DEFAULT = "wikitext2/wikitext-2-v1-tokens/valid.txt"  # relative to --data-dir


@dataclass
class CalibrationConfig:
    source: str = HUB_DEFAULT
    split: str = "train"
    field: str = "text"
    num_samples: int = defaults.CALIB_SAMPLES
    seq_len: int = defaults.CALIB_SEQ_LEN
    seed: int = defaults.SEED
    batch_size: int = defaults.CALIB_BATCH_SIZE
    # X_L in the layer statistics: the last layer's output before the final norm, or after it (the released
    # LLM-Streamline get_cosine and ShortGPT code use hidden_states[-1], which is post-norm); harness.signals.activations
    top_boundary: str = defaults.TOP_BOUNDARY


@dataclass
class CalibrationData:
    input_ids: torch.Tensor  # (N, T) long
    attention_mask: torch.Tensor  # (N, T) long; 1 = real token
    config: CalibrationConfig
    description: dict
    # (N, T) long: the LM loss's labels, -100 where a token is not scored (a DocumentText draw: the
    # answers only). None = every real token is scored (plain text blocks).
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def split(self, k: int) -> tuple["CalibrationData", "CalibrationData"]:
        """``(first N-k blocks, last k blocks)``: training blocks and held-out blocks of one draw
        (disjoint unless the draw was with replacement, which both descriptions record)."""
        n = len(self) - k
        if not 0 < k < len(self):
            raise ValueError(f"cannot hold out {k} of {len(self)} blocks")
        head = CalibrationData(self.input_ids[:n], self.attention_mask[:n], self.config,
                               self.description | {"num_samples": n})
        tail = CalibrationData(self.input_ids[n:], self.attention_mask[n:], self.config,
                               self.description | {"num_samples": k, "held_out": True})
        return head, tail

    def batches(self, batch_size: int | None = None):
        bs = batch_size or self.config.batch_size
        for start in range(0, len(self), bs):
            yield self.input_ids[start:start + bs], self.attention_mask[start:start + bs]


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in (".txt", ".jsonl", ".json", ".gz") or Path(source).exists()


def read_text(source: str, split: str = "train", field: str = "text") -> str:
    """Return the whole text of a calibration source (documents joined by blank lines)."""
    if _is_local(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UsageError(f"calibration file '{source}' does not exist; pass an existing .txt or .jsonl file")
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8")
        else:
            rows = []
            for _line_no, row in iter_jsonl(path, "calibration file"):
                if field not in row:
                    raise UsageError(f"calibration file '{source}' has no field '{field}'; pick it with --calib-field")
                rows.append(str(row[field]))
            text = "\n\n".join(rows)
    else:
        path_name, _, config_name = source.partition(":")
        try:
            import datasets

            ds = datasets.load_dataset(path_name, config_name or None, split=split)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(
                f"could not load calibration dataset '{source}' ({type(exc).__name__}); offline, pass a local "
                f"file with --calib-data or --data-dir (which uses {LOCAL_DEFAULT})"
            ) from exc
        if field not in ds.column_names:
            raise UsageError(f"calibration dataset '{source}' has no column '{field}'; pick it with --calib-field")
        text = "\n\n".join(ds[field])
    if not text.strip():
        raise UsageError(f"calibration source '{source}' is empty; pass a file with text in it")
    return text


def load_calibration(cfg: CalibrationConfig, tokenizer, seed_offset: int = 0,
                     num_samples: int | None = None) -> CalibrationData:
    """Tokenise the source and draw ``num_samples`` random blocks of ``seq_len`` tokens.

    ``seed_offset`` draws a different sample from the same source (e.g. training data for a
    replacement network next to the scoring data). Blocks are sampled without replacement
    when there are enough; otherwise with replacement (recorded in the description).
    """
    n = cfg.num_samples if num_samples is None else num_samples
    if n < 1 or cfg.seq_len < 2:
        raise UsageError("calibration needs at least 1 sample of at least 2 tokens (--calib-samples, --calib-seq-len)")
    text = read_text(cfg.source, cfg.split, cfg.field)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    bos = tokenizer.bos_token_id
    block = cfg.seq_len - (1 if bos is not None else 0)
    n_blocks = len(ids) // block
    if n_blocks < 1:
        raise UsageError(
            f"calibration source '{cfg.source}' has {len(ids)} tokens, fewer than one block of {cfg.seq_len}; "
            "lower --calib-seq-len or pass more text"
        )
    gen = torch.Generator().manual_seed(cfg.seed + seed_offset)
    with_replacement = n > n_blocks
    if with_replacement:
        picks = torch.randint(n_blocks, (n,), generator=gen)
    else:
        picks = torch.randperm(n_blocks, generator=gen)[:n]
    all_ids = torch.tensor(ids[: n_blocks * block], dtype=torch.long).view(n_blocks, block)
    input_ids = all_ids[picks]
    if bos is not None:
        input_ids = torch.cat([torch.full((n, 1), bos, dtype=torch.long), input_ids], dim=1)
    attention_mask = torch.ones_like(input_ids)
    desc = asdict(cfg) | {
        "num_samples": n,
        "seed": cfg.seed + seed_offset,
        "source_tokens": len(ids),
        "available_blocks": n_blocks,
        "sampled_with_replacement": bool(with_replacement),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "bos_prepended": bos is not None,
    }
    return CalibrationData(input_ids, attention_mask, cfg, desc)


@dataclass(frozen=True)
class DocumentText:
    """A training text given as whole documents, each ``(context ids, scored ids)``: the format of a
    model whose own training was not plain text cut into blocks (the reference models: one
    episode per row from position 0, right-padded, the loss on what the context determines).

    ``draw`` gives blocks in that format: one document per row, no BOS, right-padded with
    ``pad_id`` (attention mask 0), ``labels`` = the token on its scored positions and -100 on
    the context and the padding. ``description`` says what the text is and is recorded with every
    draw (``format``, ``loss_mask``, source, text hash, ...).
    """
    documents: tuple  # ((context ids, scored ids), ...)
    pad_id: int
    description: dict

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def longest(self) -> int:
        return max(len(c) + len(a) for c, a in self.documents)

    def draw(self, cfg: CalibrationConfig, seed_offset: int = 0, num_samples: int | None = None
             ) -> CalibrationData:
        """``num_samples`` documents in a seeded random order (seed ``cfg.seed + seed_offset``,
        without replacement when there are enough, as ``load_calibration`` draws blocks), each
        padded to ``cfg.seq_len`` tokens."""
        n = cfg.num_samples if num_samples is None else num_samples
        if n < 1:
            raise UsageError("a training draw needs at least 1 document")
        if self.longest > cfg.seq_len:
            raise UsageError(
                f"{self.description.get('source', 'the training text')}: its documents have up to {self.longest} "
                f"tokens and are trained whole, one per row; a row of {cfg.seq_len} tokens does not hold them "
                f"(use a sequence length >= {self.longest})")
        gen = torch.Generator().manual_seed(cfg.seed + seed_offset)
        with_replacement = n > len(self.documents)
        if with_replacement:
            picks = torch.randint(len(self.documents), (n,), generator=gen).tolist()
        else:
            picks = torch.randperm(len(self.documents), generator=gen)[:n].tolist()
        input_ids = torch.full((n, cfg.seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((n, cfg.seq_len), -100, dtype=torch.long)
        attention_mask = torch.zeros((n, cfg.seq_len), dtype=torch.long)
        for r, k in enumerate(picks):
            context, scored = self.documents[k]
            toks = list(context) + list(scored)
            input_ids[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            attention_mask[r, :len(toks)] = 1
            labels[r, len(context):len(toks)] = input_ids[r, len(context):len(toks)]
        desc = {**self.description, "num_samples": n, "seq_len": cfg.seq_len, "seed": cfg.seed + seed_offset,
                "batch_size": cfg.batch_size, "available_documents": len(self.documents),
                "sampled_with_replacement": bool(with_replacement), "bos_prepended": False,
                "tokens": int(attention_mask.sum()), "scored_tokens": int((labels != -100).sum())}
        return CalibrationData(input_ids, attention_mask, cfg, desc, labels=labels)
