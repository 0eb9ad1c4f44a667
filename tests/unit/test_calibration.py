"""Temperature scaling, the late-fusion image share and expected calibration error, from the sums workers
all-reduce; and a bundle's temperature and share reaching every probability the predictor returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypipe import calibration, schema
from raypipe.bundle import Bundle, BundleError, load_bundle, save_bundle
from raypipe.config import StorageConfig
from raypipe.model import FusionClassifier, ModelConfig, late_sum
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
    # The grid's temperature itself, unrounded: "ece_calibrated" was measured with it, and evaluate's ECE
    # with the bundle's temperature matches only if that is the same number.
    assert fitted["temperature"] in calibration.TEMPERATURES.tolist()


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


def two_branches(image_noise: float, n: int = 3000, classes: int = 6, seed: int = 3):
    """A text branch that is right most of the time and an image branch whose logits carry the same signal
    plus confident noise of scale ``image_noise``, as a CNN that memorised its training set looks on new data."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    signal = torch.nn.functional.one_hot(labels, classes).double() * 2.0
    text = signal + torch.randn(n, classes, generator=generator, dtype=torch.float64)
    image = signal + image_noise * torch.randn(n, classes, generator=generator, dtype=torch.float64)
    return image, text, labels


def fitted_shares(image, text, labels, batch: int = 256) -> dict:
    nll, bins = calibration.empty_sums(len(calibration.IMAGE_SHARES))
    for start in range(0, len(labels), batch):
        end = start + batch
        calibration.accumulate(nll, bins, calibration.share_logits(image[start:end], text[start:end]), labels[start:end])
    return calibration.fit(nll, bins)


def accuracy(logits, labels) -> float:
    return float((logits.argmax(1) == labels).double().mean())


def test_a_noisy_image_branch_is_weighted_down_and_the_fused_accuracy_does_not_fall_below_the_text_branch():
    image, text, labels = two_branches(image_noise=4.0)
    assert accuracy(image + text, labels) < accuracy(text, labels)  # the plain sum loses to text alone
    fitted = fitted_shares(image, text, labels)
    assert fitted["image_share"] < 0.3 and fitted["accuracy_plain_sum"] == pytest.approx(accuracy(image + text, labels))
    fused = accuracy(late_sum(image, text, fitted["image_share"]), labels)
    assert fused >= accuracy(text, labels) - 0.005 and fused > accuracy(image + text, labels) + 0.02


def test_two_equally_good_branches_keep_an_even_share_and_an_useless_one_is_weighted_out():
    image, text, labels = two_branches(image_noise=1.0, seed=4)
    assert fitted_shares(image, text, labels)["image_share"] == pytest.approx(0.5, abs=0.1)
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    assert fitted_shares(noise, text, labels)["image_share"] <= 0.05


def test_a_model_without_late_fusion_fits_only_a_temperature():
    logits, labels = overconfident(n=500, seed=6)
    fitted = calibration.fit(*sums_of(logits, labels))
    assert fitted["image_share"] is None and fitted["nll_calibrated_image"] is None


def test_each_branch_gets_its_own_nll_at_its_own_best_temperature():
    image, text, labels = two_branches(image_noise=4.0, n=600)
    fitted = fitted_shares(image, text, labels)
    for name, alone in (("image", 2 * image), ("text", 2 * text)):  # share 1 and 0 of 2 s image + 2 (1 - s) text
        by_hand = min(float(torch.nn.functional.cross_entropy(alone / t, labels)) for t in calibration.TEMPERATURES)
        assert fitted[f"nll_calibrated_{name}"] == pytest.approx(by_hand, abs=1e-4)
    assert fitted["nll_calibrated_image"] > fitted["nll_calibrated_text"]  # the noisy branch is the worse one


def test_the_grid_in_chunks_gives_the_same_sums_as_at_once(monkeypatch):
    """Many classes make calibration.accumulate step through the temperatures a few at a time."""
    image, text, labels = two_branches(image_noise=2.0, n=200)
    whole = fitted_shares(image, text, labels, batch=200)
    monkeypatch.setattr(calibration, "CHUNK_ELEMENTS", 200 * 6 * 7)  # 7 temperatures per step: a ragged last step
    assert fitted_shares(image, text, labels, batch=200) == whole


def test_the_ece_floor_is_what_a_perfectly_calibrated_model_shows_on_so_few_rows():
    """Labels drawn from the model's own probabilities: calibrated by construction, yet its ECE on 100 rows is
    far from 0, as ece_if_calibrated predicts; on 10,000 rows both shrink ~10x."""
    generator = torch.Generator().manual_seed(0)
    for rows, floor_range in ((100, (0.07, 0.16)), (10_000, (0.005, 0.02))):
        confidence = 0.3 + 0.65 * torch.rand(rows, generator=generator, dtype=torch.float64)
        measured = []
        for _ in range(200 if rows == 100 else 20):
            correct = torch.rand(rows, generator=generator, dtype=torch.float64) < confidence
            measured.append(calibration.expected_calibration_error(calibration.bin_sums(confidence, correct)))
        floor = calibration.ece_if_calibrated(calibration.bin_sums(confidence, correct))
        assert floor_range[0] < floor < floor_range[1]
        assert float(np.mean(measured)) == pytest.approx(floor, rel=0.15)
    # A bin of one sure row (confidence 1) adds nothing; no rows, no floor.
    assert calibration.ece_if_calibrated(calibration.bin_sums(torch.tensor([1.0]), torch.tensor([True]))) == pytest.approx(0, abs=1e-9)
    assert calibration.ece_if_calibrated(torch.zeros(calibration.ECE_BINS, 3)) == 0


def test_expected_calibration_error_by_hand():
    confidence = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, True, True, False, True, False])
    bins = calibration.bin_sums(confidence, correct)
    assert bins[:, 0].sum() == 6 and bins[14, 0] == 4 and bins[8, 0] == 2  # 0.95 -> bin 14, 0.55 -> bin 8
    # bin 14: |0.75 - 0.95| x 4 rows; bin 8: |0.5 - 0.55| x 2 rows; over 6 rows
    assert calibration.expected_calibration_error(bins) == pytest.approx((0.2 * 4 + 0.05 * 2) / 6)
    assert calibration.bin_sums(torch.tensor([1.0]), torch.tensor([True]))[14, 0] == 1  # 1.0 is in the last bin
    assert calibration.reliability(bins)["accuracy"] == pytest.approx([0.5, 0.75])
    stacked = calibration.bin_sums(torch.stack([confidence, confidence.flip(0)]), torch.stack([correct, correct]))
    torch.testing.assert_close(stacked[0], bins)  # leading dimensions are bin-summed independently
    torch.testing.assert_close(stacked[1], calibration.bin_sums(confidence.flip(0), correct))


def test_a_late_fusion_model_weights_its_branches_by_the_image_share_and_the_bundle_keeps_it(tmp_path):
    config = ModelConfig(num_classes=3, vocab_size=10, image_size=16, conv_channels=(4,), embed_dim=8, lstm_hidden=8,
                         fusion_head="sum", aux_heads=True, image_share=0.2)
    model = FusionClassifier(config).eval()
    image = torch.randint(0, 255, (5, 16, 16, 3), dtype=torch.uint8)
    tokens = torch.randint(1, 10, (5, 4))
    with torch.no_grad():
        image_logits, text_logits = model.branch_logits(image, tokens)
        torch.testing.assert_close(model(image, tokens), 0.4 * image_logits + 1.6 * text_logits)
        shared = calibration.share_logits(image_logits, text_logits)
        torch.testing.assert_close(shared[calibration.AS_TRAINED].float(), image_logits + text_logits)
        torch.testing.assert_close(shared[4].float(), model(image, tokens))  # share 0.2 is the grid's fifth
    url = str(tmp_path / "bundle")
    save_bundle(url, StorageConfig(), Bundle(config, ImageOptions(size=16), TextOptions(max_len=4),
                                             Vocabulary(("<pad>", "<unk>", *(f"w{i}" for i in range(8)))),
                                             ("a", "b", "c"), model.state_dict(), {}))
    assert load_bundle(url, StorageConfig()).build_model().config.image_share == 0.2
    with pytest.raises(ValueError, match="image_share"):
        ModelConfig(num_classes=3, vocab_size=10, image_share=1.5)


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
