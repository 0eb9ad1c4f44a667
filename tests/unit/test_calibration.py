"""Temperature scaling and expected calibration error, from the sums workers all-reduce; and a bundle's
temperature reaching every probability the predictor returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypipe import calibration, schema
from raypipe.bundle import Bundle, BundleError, load_bundle, save_bundle
from raypipe.config import StorageConfig
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.pipeline.predict import BundlePredictor
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.text import TextOptions
from raypipe.transforms.vocab import Vocabulary


def overconfident(n: int = 4000, classes: int = 5, sharpen: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(true logits), and the true logits multiplied by ``sharpen``: a model whose
    calibrated temperature is ``sharpen``."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, classes, generator=generator) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    return true_logits * sharpen, labels


def sums_of(logits: torch.Tensor, labels: torch.Tensor, batch: int = 500):
    nll, bins = calibration.empty_sums()
    for start in range(0, len(labels), batch):
        calibration.accumulate(nll, bins, logits[start : start + batch], labels[start : start + batch])
    return nll, bins


def test_the_fitted_temperature_undoes_overconfidence_and_lowers_the_error():
    logits, labels = overconfident(sharpen=3.0)
    fitted = calibration.fit(*sums_of(logits, labels))
    assert fitted["temperature"] == pytest.approx(3.0, rel=0.1)
    assert fitted["nll_calibrated"] < fitted["nll"] and fitted["rows"] == 4000
    assert fitted["ece"] > 0.15 and fitted["ece_calibrated"] < 0.03


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, labels = overconfident(sharpen=1.0, seed=1)
    assert calibration.fit(*sums_of(logits, labels))["temperature"] == pytest.approx(1.0, rel=0.1)


def test_sums_over_shards_equal_the_sums_over_the_whole_split():
    """What the all-reduce relies on: sums of two workers' halves are the sums of the whole."""
    logits, labels = overconfident(n=600, seed=2)
    whole = sums_of(logits, labels, batch=600)
    halves = [sums_of(logits[:250], labels[:250]), sums_of(logits[250:], labels[250:], batch=64)]
    torch.testing.assert_close(halves[0][0] + halves[1][0], whole[0])
    torch.testing.assert_close(halves[0][1] + halves[1][1], whole[1])


def test_expected_calibration_error_by_hand():
    confidence = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, True, True, False, True, False])
    bins = calibration.bin_sums(confidence, correct)
    assert bins[:, 0].sum() == 6 and bins[14, 0] == 4 and bins[8, 0] == 2  # 0.95 -> bin 14, 0.55 -> bin 8
    # bin 14: |0.75 - 0.95| x 4 rows; bin 8: |0.5 - 0.55| x 2 rows; over 6 rows
    assert calibration.expected_calibration_error(bins) == pytest.approx((0.2 * 4 + 0.05 * 2) / 6)
    assert calibration.bin_sums(torch.tensor([1.0]), torch.tensor([True]))[14, 0] == 1  # 1.0 is in the last bin
    assert calibration.reliability(bins)["accuracy"] == pytest.approx([0.5, 0.75])


def test_the_predictor_returns_probabilities_at_the_bundles_temperature(tmp_path):
    config = ModelConfig(num_classes=3, vocab_size=10, image_size=16, conv_channels=(4,), embed_dim=8, lstm_hidden=8,
                         fc_dims=(8,), dropout=0.0)
    model = FusionClassifier(config)
    with torch.no_grad():
        model.head[-1].weight.mul_(300)  # confident logits, so that the temperature visibly matters
    vocab = Vocabulary(("<pad>", "<unk>", *(f"w{i}" for i in range(8))))
    url = str(tmp_path / "bundle")
    save_bundle(url, StorageConfig(), Bundle(config, ImageOptions(size=16), TextOptions(max_len=4), vocab,
                                             ("a", "b", "c"), model.state_dict(), {}, temperature=2.5))
    assert load_bundle(url, StorageConfig()).temperature == 2.5
    rng = np.random.default_rng(0)
    batch = {schema.KEY: np.array(["k0", "k1", "k2"], dtype=object),
             schema.IMAGE: rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8),
             schema.TOKENS: rng.integers(1, 10, (3, 4)).astype(np.int32),
             **schema.new_status_columns(3)}
    out = BundlePredictor(url, StorageConfig(), top_k=3, precision="fp32", uncalibrated=True)(batch).to_pydict()
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(batch[schema.IMAGE]), torch.from_numpy(batch[schema.TOKENS]).long())
    np.testing.assert_allclose(out[schema.CONFIDENCE], torch.softmax(logits / 2.5, 1).max(1).values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(out[schema.CONFIDENCE_UNCALIBRATED], torch.softmax(logits, 1).max(1).values.numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose([sum(s) for s in out[schema.TOP_K_SCORES]], 1.0, rtol=1e-5)


@pytest.mark.parametrize("value", [0, -1.0, "2", True, float("inf")])
def test_a_bundle_with_a_temperature_that_is_not_a_positive_number_is_refused(tmp_path, value):
    import json

    config = ModelConfig(num_classes=2, vocab_size=4, image_size=16, conv_channels=(4,), embed_dim=4, lstm_hidden=4)
    url = str(tmp_path / "bundle")
    save_bundle(url, StorageConfig(), Bundle(config, ImageOptions(size=16), TextOptions(max_len=4),
                                             Vocabulary(("<pad>", "<unk>", "a", "b")), ("x", "y"),
                                             FusionClassifier(config).state_dict(), {}))
    written = json.loads((tmp_path / "bundle" / "config.json").read_text())
    (tmp_path / "bundle" / "config.json").write_text(json.dumps({**written, "temperature": value}))
    with pytest.raises(BundleError, match="temperature must be a positive number"):
        load_bundle(url, StorageConfig())
