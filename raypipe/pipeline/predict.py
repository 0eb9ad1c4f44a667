"""A callable predictor for Ray Data's ``map_batches``: loads the bundle once per actor."""

from __future__ import annotations

import numpy as np
import torch

from raypipe import schema
from raypipe.bundle import load_bundle
from raypipe.config import StorageConfig

PREDICTED_ID, PREDICTED, CONFIDENCE = "predicted_id", "predicted", "confidence"
TOP_K_LABELS, TOP_K_SCORES = "top_k_labels", "top_k_scores"


class BundlePredictor:
    """Prepared rows in, the same rows out with predictions; rows whose status is not ok are passed
    through with null predictions (and never reach the model)."""

    def __init__(self, bundle_url: str, storage: StorageConfig, top_k: int = 3, device: str | None = None):
        self.bundle = load_bundle(bundle_url, storage)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.bundle.build_model(self.device)
        self.classes = np.array(self.bundle.classes, dtype=object)
        self.top_k = min(top_k, len(self.classes))

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        schema.ensure_status_columns(batch)
        n = len(batch[schema.KEY])
        ok = schema.ok_mask(batch)
        predicted_id = np.full(n, -1, dtype=np.int64)
        confidence = np.full(n, np.nan, dtype=np.float32)
        top_ids = np.full((n, self.top_k), -1, dtype=np.int64)
        top_scores = np.full((n, self.top_k), np.nan, dtype=np.float32)
        if ok.any():
            image = torch.from_numpy(np.ascontiguousarray(batch[schema.IMAGE][ok])).to(self.device)
            tokens = torch.from_numpy(np.ascontiguousarray(batch[schema.TOKENS][ok])).long().to(self.device)
            probs = torch.softmax(self.model(image, tokens).float(), dim=1)
            scores, ids = probs.topk(self.top_k, dim=1)
            top_ids[ok], top_scores[ok] = ids.cpu().numpy(), scores.cpu().numpy()
            predicted_id[ok], confidence[ok] = top_ids[ok, 0], top_scores[ok, 0]
        batch[PREDICTED_ID] = predicted_id
        batch[PREDICTED] = np.where(predicted_id >= 0, self.classes[np.maximum(predicted_id, 0)], None)
        batch[CONFIDENCE] = confidence
        batch[TOP_K_LABELS] = np.array(
            [[str(self.classes[i]) for i in row] if row[0] >= 0 else None for row in top_ids], dtype=object
        )
        batch[TOP_K_SCORES] = np.array([row.tolist() if not np.isnan(row[0]) else None for row in top_scores], dtype=object)
        return batch
