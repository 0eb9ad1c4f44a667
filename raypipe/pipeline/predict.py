"""A callable predictor for Ray Data's ``map_batches``: loads the bundle once per actor."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import torch

from raypipe import schema
from raypipe.bundle import load_bundle
from raypipe.config import StorageConfig
from raypipe.schema import (
    ATTENTION_WEIGHTS, ATTENTION_WORDS, CONFIDENCE, PREDICTED, PREDICTED_ID, TOP_K_LABELS, TOP_K_SCORES,
)

# On a CPU the model runs a batch in chunks of this many rows: a chunk's conv activations stay in the
# core's caches (default architecture, one thread: 1.2 ms/pair in chunks of 32 rows vs 1.9 ms for a
# whole 256-row batch, which also holds ~170 MB of activations at once). A GPU takes the whole batch.
CPU_CHUNK_ROWS = 32

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# In bf16/fp16, a row whose best two class probabilities are closer than this is run again in fp32. On the
# sample, bf16 moves a probability by at most ~0.02, so a gap of 0.05 cannot flip; 1-2.5% of rows are rerun.
RECHECK_MARGIN = 0.05


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmul/conv in hardware. Without them oneDNN emulates bf16 (slower than fp32)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def resolve_precision(requested: str, device_type: str) -> str:
    """``predict.precision`` on a device: "auto" is bf16 on a GPU that has it (else fp16), and on a CPU
    with native bf16 (faster there, measured in docs/labeling.md "Precision"), else fp32."""
    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device_type == "cpu" and cpu_has_native_bf16() else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {requested!r}")
    return requested


def pool_precision(requested: str, compute: dict | None) -> str:
    """The precision a predictor pool (``capacity.predictor_pool``'s answer) labels with, as resolved on
    this machine: GPU actors when the pool has GPUs, else CPU ones (same CPU kind as the driver assumed)."""
    return resolve_precision(requested, "cuda" if compute and "num_gpus" in compute else "cpu")


class BundlePredictor:
    """Prepared rows in; out, the same rows without the model inputs (image, tokens) and with
    predictions, as an Arrow table of the declared types (``schema.to_arrow``). Rows whose status is not ok never reach the
    model and get null predictions."""

    def __init__(
        self,
        bundle_url: str,
        storage: StorageConfig,
        top_k: int = 3,
        device: str | None = None,
        explain_words: int = 0,
        passthrough: Mapping[str, pa.DataType] | None = None,
        precision: str = "auto",
        uncalibrated: bool = False,
    ):
        """``explain_words`` > 0 adds, for models that read text, the words the attention weighted most
        (vocabulary tokens, ``<unk>`` for words outside it) and their weights, most weighted first.
        ``passthrough``: the Arrow types of the input columns the rows carry beside raypipe's own.
        ``precision``: ``predict.precision`` (auto, fp32, bf16, fp16), resolved for the device.
        ``uncalibrated`` adds the top-1 probability before temperature scaling (evaluate's calibration report)."""
        self.passthrough = dict(passthrough or {})
        self.bundle = load_bundle(bundle_url, storage)
        self.explain_words = explain_words if self.bundle.model_config.mode in ("fusion", "text") else 0
        self.vocab_tokens = self.bundle.vocab.tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.bundle.build_model(self.device)
        self.classes = list(self.bundle.classes)
        self.top_k = min(top_k, len(self.classes))
        self.precision = resolve_precision(precision, self.device.type)
        self.rechecked = 0  # rows run again in fp32 (close calls), for benchmarks and tests
        self.uncalibrated = uncalibrated

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        schema.ensure_status_columns(batch)
        n = len(batch[schema.KEY])
        ok = schema.ok_mask(batch)
        top_ids = np.zeros((0, self.top_k), dtype=np.int64)
        top_scores = np.zeros((0, self.top_k), dtype=np.float32)
        unscaled_top = np.zeros(0, dtype=np.float32)
        explained: list[tuple[list[str], list[float]]] = []
        if ok.any():
            image = torch.from_numpy(np.ascontiguousarray(batch[schema.IMAGE][ok])).to(self.device)
            tokens = torch.from_numpy(np.ascontiguousarray(batch[schema.TOKENS][ok])).long().to(self.device)
            logits, attention = self._forward(image, tokens)
            probs = torch.softmax(logits, dim=1)
            if self.explain_words:
                explained = self._explain(tokens.cpu().numpy(), attention.float().cpu().numpy())
            scores, ids = probs.topk(self.top_k, dim=1)
            top_ids, top_scores = ids.cpu().numpy(), scores.cpu().numpy()
            if self.uncalibrated:
                unscaled_top = torch.softmax(logits * self.bundle.temperature, dim=1).max(1).values.cpu().numpy()
        rows = iter(range(len(top_ids)))
        which = [next(rows) if is_ok else None for is_ok in ok]  # prediction row of each input row

        def per_row(value_of_prediction) -> np.ndarray:  # None for rows without a prediction
            out = np.empty(n, dtype=object)
            out[:] = [None if r is None else value_of_prediction(r) for r in which]
            return out

        columns = {name: values for name, values in batch.items() if name not in (schema.IMAGE, schema.TOKENS)}
        columns[PREDICTED_ID] = per_row(lambda r: int(top_ids[r, 0]))
        columns[PREDICTED] = per_row(lambda r: self.classes[top_ids[r, 0]])
        columns[CONFIDENCE] = per_row(lambda r: float(top_scores[r, 0]))
        columns[TOP_K_LABELS] = per_row(lambda r: [self.classes[i] for i in top_ids[r]])
        columns[TOP_K_SCORES] = per_row(lambda r: top_scores[r].tolist())
        if self.uncalibrated:
            columns[schema.CONFIDENCE_UNCALIBRATED] = per_row(lambda r: float(unscaled_top[r]))
        if self.explain_words:
            columns[ATTENTION_WORDS] = per_row(lambda r: explained[r][0])
            columns[ATTENTION_WEIGHTS] = per_row(lambda r: explained[r][1])
        return schema.to_arrow(columns, self.passthrough)

    def _forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, num_classes] (fp32) and attention [B, L] (None for an image model) of a whole batch.
        In bf16/fp16, rows whose two best scores are within ``RECHECK_MARGIN`` are run again in fp32,
        so rounding cannot swap their top-1 (and their scores are the fp32 ones)."""
        dtype = DTYPES.get(self.precision)
        logits, attention = self._run(image, tokens, dtype)
        if dtype is None or logits.shape[1] < 2:
            return logits, attention
        best_two = torch.softmax(logits, dim=1).topk(2, dim=1).values
        close = torch.nonzero(best_two[:, 0] - best_two[:, 1] < RECHECK_MARGIN).squeeze(1)
        self.rechecked += len(close)
        if len(close):
            logits[close], exact_attention = self._run(image[close], tokens[close], None)
            if attention is not None:
                attention[close] = exact_attention
        return logits, attention

    def _run(self, image: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype | None):
        """The model on CPU chunks (a GPU takes the whole batch), under autocast when ``dtype`` is given: the
        weights stay fp32, convs, LSTM and linears run in ``dtype``; the outputs are returned in fp32, the
        logits divided by the bundle's temperature (so every probability downstream is calibrated)."""
        rows = CPU_CHUNK_ROWS if self.device.type == "cpu" else len(image)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            chunks = [self.model.forward_with_attention(image[i : i + rows], tokens[i : i + rows])
                      for i in range(0, len(image), rows)]
        logits = torch.cat([chunk_logits for chunk_logits, _ in chunks]).float() / self.bundle.temperature
        attention = None if chunks[0][1] is None else torch.cat([a for _, a in chunks]).float()
        return logits, attention

    def _explain(self, tokens: np.ndarray, attention: np.ndarray) -> list[tuple[list[str], list[float]]]:
        """Per row: the real tokens with the largest attention weights, most weighted first."""
        out = []
        for ids, weights in zip(tokens, attention):
            real = np.flatnonzero(ids != 0)
            order = real[np.argsort(-weights[real], kind="stable")][: self.explain_words]
            out.append(([self.vocab_tokens[ids[i]] for i in order], [float(weights[i]) for i in order]))
        return out
