"""What a method receives: ``MethodContext`` (the harness's small public interface)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from harness.model.adapters import ModelAdapter
from harness.plugins.options import check_window
from harness.signals.activations import (
    LayerStats,
    cached_layer_stats,
    iter_boundary_pairs,
)
from harness.signals.calibration import CalibrationData, DocumentText, load_calibration


@dataclass
class MethodContext:
    model: Any  # the method's model: a shell sharing the dense weights (own_layer before changing weights)
    adapter: ModelAdapter
    tokenizer: Any
    calibration: CalibrationData
    num_remove: int  # n, layers to remove (resolved from --ratio or --layers)
    seed: int = 0
    progress: bool = True
    stats_cache: dict = field(default_factory=dict)  # shared across methods of one run
    dense_stats_key: str = ""
    timings: dict = field(default_factory=dict)  # stage -> seconds, copied into the result JSON
    # The calibration text in the model's own training format, for the LM loss: whole documents with
    # the loss on their answers (the reference models' episodes; the runner sets it when the model
    # declares such a format and the calibration text is its own). None: plain blocks, all tokens scored.
    lm_text: DocumentText | None = None

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def layer_stats(self, lags=None) -> LayerStats:
        """Cosine/angular statistics of the *dense* model on the calibration set.

        Computed once per run with lags {1, n} and shared by every method (one forward pass
        scores all Streamline windows, all ShortGPT BIs and all angular distances).
        """
        lags = sorted(set(lags or (1, self.num_remove)))
        stats, seconds = cached_layer_stats(self.stats_cache, self.dense_stats_key, self.model, self.adapter,
                                            self.calibration, lags, progress=self.progress)
        self.timings["score"] = seconds or 0.0  # 0: shared with an earlier method (or the runner) of this run
        return stats

    def training_data(self, num_samples: int, seq_len: int | None = None, seed_offset: int = 1,
                      source: str | None = None, split: str | None = None, field: str | None = None
                      ) -> CalibrationData:
        """More blocks from the calibration source (a different draw, for training).

        ``source`` (a .txt/.jsonl file or Hub dataset id[:config]) with ``split``/``field`` reads
        another text instead; ``None`` keeps the calibration's. Users of the calibration text
        pick distinct ``seed_offset`` values so their draws differ (streamline fit 1,
        streamline post-training 2, LoRA 3).
        """
        cfg = self.calibration.config
        changes = {k: v for k, v in (("seq_len", seq_len), ("source", source), ("split", split), ("field", field))
                   if v is not None and v != getattr(cfg, k)}
        if changes:
            cfg = replace(cfg, **changes)
        return load_calibration(cfg, self.tokenizer, seed_offset=seed_offset, num_samples=num_samples)

    def lm_training_data(self, num_samples: int, seq_len: int | None = None, seed_offset: int = 1,
                         source: str | None = None, split: str | None = None, field: str | None = None
                         ) -> CalibrationData:
        """Training data for the LM loss (post-training, ``loss=lm`` fits, LoRA): the same arguments
        and draw as :meth:`training_data`, in the format the model was trained in.

        With ``lm_text`` set (a reference model calibrated on its world's text) and no other
        ``source``, the draw is whole documents, one per row, labelled on the answers only
        (``labels``); otherwise it is ``training_data``'s blocks, every real token scored. The
        description records which (``format``: ``blocks`` or the document text's own, e.g.
        ``episodes``; ``loss_mask``: what the loss scores).
        """
        cal = self.calibration.config
        if self.lm_text is not None and (source is None or source == cal.source):
            cfg = replace(cal, seq_len=seq_len) if seq_len is not None else cal
            return self.lm_text.draw(cfg, seed_offset=seed_offset, num_samples=num_samples)
        data = self.training_data(num_samples, seq_len, seed_offset=seed_offset, source=source, split=split,
                                  field=field)
        return replace(data, description={**data.description, "format": "blocks",
                                          "loss_mask": "every real token"})

    def boundary_pairs(self, data: CalibrationData, start: int, end: int, batch_size: int | None = None,
                       boundaries=None):
        """Stream ``({j: X_j}, mask)`` per batch for the current model (see activations)."""
        return iter_boundary_pairs(self.model, self.adapter, data, start, end, batch_size, boundaries)

    def own_layer(self, index: int):
        """Copy decoder layer ``index`` (current position) into this model before changing its
        weights in place; returns the copy. The model starts as a shell sharing every tensor with
        the dense model (harness.model.sharing): a method that changes weights (LaCo's merge, a
        merged LoRA) owns those layers first. A snapshot taken before (``snapshot_layers``)
        restores the shared layer (``restore_layers``), dropping the copy."""
        from harness.model.sharing import own_layer

        return own_layer(self.adapter, index)

    def own_layers(self) -> list[int]:
        """``own_layer`` for every real decoder layer (replacement layers are the method's own
        already); returns the positions copied."""
        from harness.model.sharing import own_all_layers

        return own_all_layers(self.adapter)

    def check_window(self, n: int) -> None:
        check_window("method", None, self.num_layers, n)
