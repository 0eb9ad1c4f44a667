"""A callable predictor for Ray Data's ``map_batches``: loads the bundle once per actor."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from raypipe import schema
from raypipe.bundle import load_bundle
from raypipe.config import StorageConfig

PREDICTED_ID, PREDICTED, CONFIDENCE = "predicted_id", "predicted", "confidence"
TOP_K_LABELS, TOP_K_SCORES = "top_k_labels", "top_k_scores"


class BundlePredictor:
    """Prepared rows in; out, the same rows without the model inputs (image, tokens) and with
    predictions, as an Arrow table with explicit types. Rows whose status is not ok never reach the
    model and get null predictions."""

    def __init__(self, bundle_url: str, storage: StorageConfig, top_k: int = 3, device: str | None = None):
        self.bundle = load_bundle(bundle_url, storage)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.bundle.build_model(self.device)
        self.classes = list(self.bundle.classes)
        self.top_k = min(top_k, len(self.classes))

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        schema.ensure_status_columns(batch)
        n = len(batch[schema.KEY])
        ok = schema.ok_mask(batch)
        top_ids = np.zeros((0, self.top_k), dtype=np.int64)
        top_scores = np.zeros((0, self.top_k), dtype=np.float32)
        if ok.any():
            image = torch.from_numpy(np.ascontiguousarray(batch[schema.IMAGE][ok])).to(self.device)
            tokens = torch.from_numpy(np.ascontiguousarray(batch[schema.TOKENS][ok])).long().to(self.device)
            probs = torch.softmax(self.model(image, tokens).float(), dim=1)
            scores, ids = probs.topk(self.top_k, dim=1)
            top_ids, top_scores = ids.cpu().numpy(), scores.cpu().numpy()
        rows = iter(range(len(top_ids)))
        which = [next(rows) if is_ok else None for is_ok in ok]  # prediction row of each input row
        columns = {
            name: pa.array(list(values)) if values.dtype == object else pa.array(values)
            for name, values in batch.items()
            if name not in (schema.IMAGE, schema.TOKENS)
        }
        columns[PREDICTED_ID] = pa.array([None if r is None else int(top_ids[r, 0]) for r in which], pa.int64())
        columns[PREDICTED] = pa.array([None if r is None else self.classes[top_ids[r, 0]] for r in which], pa.string())
        columns[CONFIDENCE] = pa.array([None if r is None else float(top_scores[r, 0]) for r in which], pa.float32())
        columns[TOP_K_LABELS] = pa.array(
            [None if r is None else [self.classes[i] for i in top_ids[r]] for r in which], pa.list_(pa.string())
        )
        columns[TOP_K_SCORES] = pa.array(
            [None if r is None else top_scores[r].tolist() for r in which], pa.list_(pa.float32())
        )
        assert all(len(c) == n for c in columns.values())
        return pa.table(columns)
