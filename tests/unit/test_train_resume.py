"""Going on with an interrupted epoch (no Ray): which rows a resumed worker leaves out, when step
checkpoints are due and how they are named, what a checkpoint holds after a round trip, and which
settings a resumed run may change."""

from __future__ import annotations

import json

import pytest
import torch

from raypipe.config import StorageConfig, TrainConfig, load_config
from raypipe.io.fs import resolve
from raypipe.model import FusionClassifier, ModelConfig
from raypipe.pipeline.train import (
    CHECKPOINT_SNAPSHOT,
    CKPT_EMA,
    CKPT_RNG,
    CKPT_SCALER,
    RUN_SETTINGS,
    CheckpointPayload,
    EpochSoFar,
    TrainError,
    check_resume,
    checkpoint_name,
    new_progress,
    resume_message,
    rows_to_skip,
    skip_rows,
    step_checkpoint_due,
    train_step,
)


def batches_of(rows: int, size: int):
    ids = torch.arange(rows)
    return [{"label_id": ids[i:i + size], "tokens": ids[i:i + size, None].repeat(1, 3)} for i in range(0, rows, size)]


def test_skipping_leaves_out_exactly_the_first_rows_also_inside_a_batch():
    for skip in (0, 8, 11, 40, 50):
        kept = list(skip_rows(batches_of(40, 8), skip))
        assert [i for b in kept for i in b["label_id"].tolist()] == list(range(skip, 40))
        assert all(torch.equal(b["tokens"][:, 0], b["label_id"]) for b in kept)  # the columns stay together
    # At a batch boundary (as a step checkpoint is) the batches after it are the ones the epoch had.
    assert [len(b["label_id"]) for b in skip_rows(batches_of(40, 8), 16)] == [8, 8, 8]


def test_each_worker_skips_its_share_of_the_rows_trained_before():
    assert rows_to_skip(256, 1) == 256
    assert rows_to_skip(256, 2) == 128


def test_step_checkpoints_are_due_every_n_steps_of_the_run_and_only_when_asked():
    assert [s for s in range(1, 13) if step_checkpoint_due(s, 4)] == [4, 8, 12]
    assert not any(step_checkpoint_due(s, None) for s in range(1, 13))


def test_checkpoint_names_sort_in_the_order_they_are_taken():
    taken = [checkpoint_name(1, 4, False), checkpoint_name(1, 8, False), checkpoint_name(1, 8, True),
             checkpoint_name(2, 12, False), checkpoint_name(2, 16, True), checkpoint_name(10, 400, True)]
    assert taken[0] == "checkpoint_epoch0001_step00000004" and taken[2] == "checkpoint_epoch0001_step00000008_end"
    assert sorted(taken) == taken


def test_an_epoch_goes_on_from_a_checkpoint_taken_inside_it_only():
    saved = {"epoch": 2, "steps": 4, "rows": 128, "loss_sum": 90.0, "seconds": 3.5}
    assert EpochSoFar.resumed(saved, 2) == EpochSoFar(2, 4, 128, 90.0, 3.5)
    assert EpochSoFar.resumed(saved, 3) == EpochSoFar(3, 0, 0, 0.0, 0.0)
    assert EpochSoFar.resumed(None, 0) == EpochSoFar(0, 0, 0, 0.0, 0.0)
    assert resume_message({"epoch": 2, "in_epoch": saved}) == (
        "resuming from the checkpoint at step 4 of epoch 3 (128 rows trained); the epoch goes on with the rows "
        "after those")
    assert resume_message({"epoch": 2}) == "resuming from the checkpoint after epoch 2"


def test_a_checkpoint_round_trip_restores_model_optimizer_scaler_progress_generators_and_average(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(num_classes=3, vocab_size=20, image_size=16, conv_channels=(4,), embed_dim=4,
                         lstm_hidden=4, fc_dims=(8,))
    model = FusionClassifier(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # on, so that it has a state to save
    images = torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8)
    tokens, labels = torch.randint(2, 20, (4, 6)), torch.tensor([0, 1, 2, 0])
    train_step(model, optimizer, scaler, torch.nn.CrossEntropyLoss(), images, tokens, labels, (1.0, 0.1), None)
    augmenter = torch.Generator().manual_seed(7)
    torch.rand(3, generator=augmenter)
    progress = {**new_progress(), "steps": 1, "in_epoch": {"epoch": 0, "steps": 1, "rows": 4, "loss_sum": 4.4,
                                                           "seconds": 0.1}}
    rng = [{"torch": torch.get_rng_state(), "cuda": None, "augmenter": augmenter.get_state()}]
    average = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}  # optim.ema_decay
    CheckpointPayload(model.state_dict(), optimizer.state_dict(), scaler.state_dict(), None, progress, rng,
                      average).save(str(tmp_path))

    loaded = CheckpointPayload.load(str(tmp_path))
    assert loaded.progress == progress and loaded.best is None
    assert all(torch.equal(loaded.ema[k], v) for k, v in average.items())
    assert all(torch.equal(loaded.model[k], v) for k, v in model.state_dict().items())
    assert loaded.scaler == scaler.state_dict() and loaded.scaler["scale"] > 0
    assert loaded.optimizer["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    # The same random numbers come out of a generator restored from it.
    restored = torch.Generator().set_state(loaded.rng[0]["augmenter"])
    assert torch.equal(torch.rand(5, generator=restored), torch.rand(5, generator=augmenter))

    # A checkpoint without the scaler and generator files goes on without them.
    (tmp_path / CKPT_SCALER).unlink()
    (tmp_path / CKPT_RNG).unlink()
    (tmp_path / CKPT_EMA).unlink()
    older = CheckpointPayload.load(str(tmp_path))
    assert older.scaler == {} and older.rng == [] and older.ema is None


def train_config(tmp_path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, [f"prepared={tmp_path / 'prepared'}", f"run.storage_path={tmp_path}",
                                           "run.name=r", *overrides])


def test_a_run_with_checkpoints_resumes_only_with_its_own_settings(tmp_path):
    run_dir = resolve(str(tmp_path / "r"), StorageConfig())
    check_resume(train_config(tmp_path, "model.mode=text"), run_dir)
    assert json.loads((tmp_path / "r" / RUN_SETTINGS).read_text())["model"]["mode"] == "text"
    # Before the run's first checkpoint there is nothing to resume: other settings start afresh.
    check_resume(train_config(tmp_path, "model.mode=image"), run_dir)
    (tmp_path / "r" / CHECKPOINT_SNAPSHOT).write_text("{}")  # Ray Train's record of the run's checkpoints
    # How long and how it trains may change ...
    check_resume(train_config(tmp_path, "model.mode=image", "optim.epochs=7", "scaling.num_workers=2"), run_dir)
    # ... what it trains may not.
    with pytest.raises(TrainError, match=r"model\.mode=fusion \(the run's: image\); optim\.lr=0\.01 \(the run's: 0\.001\)"):
        check_resume(train_config(tmp_path, "optim.lr=0.01"), run_dir)
    assert json.loads((tmp_path / "r" / RUN_SETTINGS).read_text())["model"]["mode"] == "image"
