"""Reduced precision (no Ray): bf16 labeling agrees with fp32 on the built-in sample, "auto" picks by device,
bundles record the training precision, and the autocast training step learns and checkpoints fp32 weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raypipe import schema
from raypipe.bundle import Bundle, load_bundle, save_bundle
from raypipe.config import LabelJobConfig, StorageConfig
from raypipe.datasets.sample import CLASSES, SampleSpec, iter_samples
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.pipeline import predict
from raypipe.pipeline.train import CheckpointPayload, train_step
from raypipe.transforms.image import ImageOptions
from raypipe.transforms.pairs import ModelInputPreparer
from raypipe.transforms.text import TextNormalizer, TextOptions
from raypipe.transforms.vocab import Vocabulary, count_tokens

# Measured on the sample (1,200 pairs, 1,144 ok; bf16 on AVX512-BF16): largest |p_bf16 - p_fp32| 0.019.
PROB_TOLERANCE = 0.03
IMAGE, TEXT = ImageOptions(size=32), TextOptions(max_len=16, lemmatize=False)


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig(num_classes=len(CLASSES), vocab_size=vocab_size, image_size=32, conv_channels=(8, 16, 32),
                       embed_dim=16, lstm_hidden=16, fc_dims=(32,), dropout=0.0)


@pytest.fixture(scope="module")
def sample_rows() -> tuple[dict[str, np.ndarray], Vocabulary, np.ndarray]:
    """1,200 pairs of the built-in sample, prepared for the model as the labeling job does; and their classes."""
    rows = list(iter_samples(SampleSpec(1200, 500, (64, 64))))
    normalizer = TextNormalizer(TEXT)
    vocab = Vocabulary.from_counts(count_tokens(normalizer.tokens(r["caption"]) for r in rows), min_freq=2)
    images = np.empty(len(rows), dtype=object)
    images[:] = [r["jpg"] for r in rows]
    batch = {
        schema.KEY: np.array([r["key"] for r in rows], dtype=object),
        schema.IMAGE: images,
        schema.TEXT: np.array([r["caption"] for r in rows], dtype=object),
        schema.SOURCE: np.full(len(rows), "sample", dtype=object),
        **schema.new_status_columns(len(rows)),
    }
    classes = np.array([CLASSES.index(r["label"]) for r in rows])
    return ModelInputPreparer(IMAGE, TEXT, vocab.token_to_id)(batch), vocab, classes


@pytest.fixture(scope="module")
def trained_bundle(sample_rows, tmp_path_factory) -> str:
    """A small fusion model trained in fp32 on the sample (~0.9 accuracy: confident, with the sample's real ties)."""
    batch, vocab, classes = sample_rows
    ok = batch[schema.STATUS] == schema.Status.OK.value
    images, tokens = torch.from_numpy(batch[schema.IMAGE][ok]), torch.from_numpy(batch[schema.TOKENS][ok]).long()
    labels = torch.from_numpy(classes[ok])
    torch.manual_seed(0)
    config = tiny_config(len(vocab))
    model = FusionClassifier(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scaler, loss_fn, draw = torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(), torch.Generator()
    draw.manual_seed(0)
    torch.set_flush_denormal(True)  # denormal products of the trained weights slowed this loop down 2x and more here
    try:
        for _ in range(300):
            i = torch.randint(0, len(labels), (64,), generator=draw)
            train_step(model, optimizer, scaler, loss_fn, images[i], tokens[i], labels[i], (1.0, 0.0), None)
    finally:
        torch.set_flush_denormal(False)
    url = str(tmp_path_factory.mktemp("precision") / "bundle")
    save_bundle(url, StorageConfig(), Bundle(config, IMAGE, TEXT, vocab, tuple(CLASSES), model.state_dict(), {}))
    return url


def label(bundle: str, batch: dict[str, np.ndarray], precision: str):
    predictor = predict.BundlePredictor(bundle, StorageConfig(), top_k=len(CLASSES), device="cpu", precision=precision)
    table = predictor({name: values.copy() for name, values in batch.items()})
    probs = np.zeros((table.num_rows, len(CLASSES)))
    for row, (ids, scores) in enumerate(zip(table.column(schema.TOP_K_LABELS).to_pylist(),
                                            table.column(schema.TOP_K_SCORES).to_pylist())):
        if ids:
            probs[row, [CLASSES.index(name) for name in ids]] = scores
    return predictor, np.array(table.column(schema.PREDICTED_ID).to_pylist(), dtype=object), probs


@pytest.mark.skipif(not predict.cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")
def test_bf16_labels_agree_with_fp32_on_the_sample(sample_rows, trained_bundle):
    batch, _, classes = sample_rows
    _, fp32_ids, fp32_probs = label(trained_bundle, batch, "fp32")
    bf16, bf16_ids, bf16_probs = label(trained_bundle, batch, "bf16")
    ok = np.array([i is not None for i in fp32_ids])
    assert ok.sum() >= 1000 and sum(i is not None for i in bf16_ids) == ok.sum()
    assert np.mean(fp32_ids[ok].astype(int) == classes[ok]) > 0.85  # a trained model, not noise
    agreement = np.mean(fp32_ids[ok] == bf16_ids[ok])
    assert agreement >= 0.999, f"top-1 agreement {agreement:.4f}"
    assert np.abs(bf16_probs - fp32_probs).max() <= PROB_TOLERANCE
    # Close calls were run again in fp32, a few percent of the rows.
    assert 0 < bf16.rechecked <= 0.1 * ok.sum()


def test_auto_precision_by_device_and_explicit_choices():
    assert predict.resolve_precision("auto", "cpu") == ("bf16" if predict.cpu_has_native_bf16() else "fp32")
    assert predict.resolve_precision("fp32", "cpu") == "fp32" and predict.resolve_precision("fp16", "cuda") == "fp16"
    assert predict.pool_precision("bf16", None) == "bf16"
    assert predict.pool_precision("auto", {"num_cpus": 0.9}) == predict.resolve_precision("auto", "cpu")
    with pytest.raises(ValueError, match="precision must be auto or one of"):
        predict.resolve_precision("int8", "cpu")
    assert LabelJobConfig().predict.precision == "auto"
    assert LabelJobConfig.model_validate({"predict": {"precision": "fp32"}}).predict.precision == "fp32"


def test_bundle_records_its_precision_and_old_bundles_read_as_fp32(tmp_path):
    vocab = Vocabulary(("<pad>", "<unk>", "dog"))
    config = tiny_config(len(vocab))
    bundle = Bundle(config, IMAGE, TEXT, vocab, tuple(CLASSES), FusionClassifier(config).state_dict(), {},
                    precision={"trained": "bf16", "validated": "bf16"})
    save_bundle(str(tmp_path / "new"), StorageConfig(), bundle)
    assert load_bundle(str(tmp_path / "new"), StorageConfig()).precision == {"trained": "bf16", "validated": "bf16"}
    save_bundle(str(tmp_path / "old"), StorageConfig(), bundle)
    config_file = tmp_path / "old" / "config.json"
    written = json.loads(config_file.read_text())
    del written["precision"]  # as written before the key existed
    config_file.write_text(json.dumps(written))
    assert load_bundle(str(tmp_path / "old"), StorageConfig()).precision == {"trained": "fp32", "validated": "fp32"}


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not predict.cpu_has_native_bf16(),
                                                 reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU; this machine has none")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_training_step_learns_and_checkpoints_fp32_weights(device, tmp_path):
    # The dtype the train job's workers use (WorkerState.amp_dtype): bf16 on CPU and on GPUs that have it.
    dtype = torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    torch.manual_seed(0)
    config = tiny_config(50)
    model = FusionClassifier(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    images = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, device=device)
    tokens = torch.randint(2, 50, (32, 16), device=device)
    labels = tokens[:, 0] % len(CLASSES)  # learnable from the first word
    losses = [float(train_step(model, optimizer, scaler, torch.nn.CrossEntropyLoss(), images, tokens, labels, (1.0, 0.0),
                               dtype)) for _ in range(80)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses

    CheckpointPayload(model.state_dict(), optimizer.state_dict(), scaler.state_dict(), model.state_dict(),
                      {"epoch": 1}, []).save(str(tmp_path))
    restored = FusionClassifier(config)
    restored.load_state_dict(CheckpointPayload.load(str(tmp_path)).model)
    assert {p.dtype for p in restored.state_dict().values()} == {torch.float32}
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(images.cpu(), tokens.cpu()), model.cpu()(images.cpu(), tokens.cpu()))
