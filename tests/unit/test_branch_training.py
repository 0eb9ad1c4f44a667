"""Late fusion with separately trained branches (optim.branch_training): which losses train what, and which
epochs' weights are kept."""

from __future__ import annotations

import copy

import pytest
import torch

from raypipe.config import OptimSection
from raypipe.model import BRANCH_KEYS, FusionClassifier, ModelConfig
from raypipe.pipeline.train import (
    LoopConfig,
    WorkerState,
    evaluated_weights,
    loss_weights,
    new_progress,
    record,
    train_step,
    update_ema,
)

SMALL = dict(num_classes=4, vocab_size=30, image_size=16, conv_channels=(4,), embed_dim=8, lstm_hidden=8,
             fc_dims=(8,), dropout=0.0)


@pytest.mark.parametrize(("model", "optim", "weights"), [
    (dict(fusion_head="sum"), dict(branch_training="separate"), (0.0, 1.0)),
    (dict(fusion_head="sum", aux_heads=True), dict(branch_training="joint", aux_loss_weight=0.3), (1.0, 0.3)),
    (dict(fusion_head="sum", aux_heads=False), dict(branch_training="joint"), (1.0, 0.0)),
    (dict(fusion_head="mlp", aux_heads=True), dict(branch_training="separate", aux_loss_weight=0.3), (1.0, 0.3)),
    (dict(fusion_head="sum", aux_heads=True, mode="text"), dict(branch_training="separate"), (1.0, 0.0)),
])
def test_loss_weights_per_head_and_branch_training(model, optim, weights):
    assert loss_weights(ModelConfig(**SMALL, **model), OptimSection(**optim)) == weights


def image_branch_after_a_step(model: FusionClassifier, weights, images, tokens, labels) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_step(model, optimizer, scaler, torch.nn.CrossEntropyLoss(), images, tokens, labels, weights, None)
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("image.", "branch_heads.0."))}


@pytest.mark.parametrize("branch_training", ["separate", "joint"])
def test_separately_trained_branches_do_not_learn_from_each_other(branch_training):
    """A different text branch leaves the image branch's update unchanged when the branches train
    separately, and changes it when they train jointly (the fused loss couples them)."""
    torch.manual_seed(0)
    config = ModelConfig(**SMALL, fusion_head="sum", aux_heads=True)
    weights = loss_weights(config, OptimSection(branch_training=branch_training))
    images = torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8)
    tokens = torch.randint(1, 30, (8, 5))
    labels = torch.arange(8) % 4
    model = FusionClassifier(config).train()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.branch_heads[1][-1].weight.mul_(50)  # a confident text classifier
    ours = image_branch_after_a_step(model, weights, images, tokens, labels)
    theirs = image_branch_after_a_step(other, weights, images, tokens, labels)
    same = all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert same == (branch_training == "separate")


def worker(branch_training: str, patience: int = 3, best_epoch_by: str = "val_accuracy", **model) -> WorkerState:
    model_config = ModelConfig(**SMALL, fusion_head="sum", **model)
    loop = LoopConfig(model=model_config, optim=OptimSection(branch_training=branch_training, best_epoch_by=best_epoch_by,
                                                             early_stopping_patience=patience),
                      amp=False, torch_threads=None, class_weights=None, train_rows=None, progress_interval_s=60,
                      tensorboard=None, checkpoint_every_steps=None, mlflow=None)
    model = FusionClassifier(model_config)
    return WorkerState(loop, 0, 1, torch.device("cpu"), model, model, torch.optim.SGD(model.parameters(), lr=0.1),
                       new_progress(), None, None)


def epoch(state: WorkerState, number: int, image: float, text: float, fused: float,
          nll: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[bool, bool]:
    """Records an epoch whose weights are all ``number``, with the validation accuracies given and the
    calibrated validation NLLs ``nll`` (image, text, fused)."""
    with torch.no_grad():
        for p in state.raw_model.parameters():
            p.fill_(number)
    return record(state, {"epoch": number, "val_accuracy": fused, "val_accuracy_image": image,
                          "val_accuracy_text": text, "val_nll_calibrated_image": nll[0],
                          "val_nll_calibrated_text": nll[1], "val_nll_calibrated": nll[2]})


def kept_epochs(state: WorkerState) -> dict[str, int]:
    """The epoch whose weights the kept model holds, per branch."""
    return {branch: int(next(v for k, v in state.best_state.items() if k.startswith(prefixes)).flatten()[0])
            for branch, prefixes in BRANCH_KEYS.items()}


@pytest.mark.parametrize("text_linear", [False, True])
def test_separately_trained_branches_keep_each_its_best_epoch_and_stop_when_neither_improves(text_linear):
    state = worker("separate", patience=3, text_linear=text_linear)
    assert epoch(state, 1, image=0.3, text=0.5, fused=0.5) == (True, False)
    assert epoch(state, 2, image=0.4, text=0.9, fused=0.8) == (True, False)  # text's best
    assert epoch(state, 3, image=0.5, text=0.8, fused=0.7) == (True, False)
    assert epoch(state, 4, image=0.6, text=0.7, fused=0.7) == (True, False)  # image's best
    assert epoch(state, 5, image=0.6, text=0.7, fused=0.9) == (False, False)  # a better sum changes nothing
    assert epoch(state, 6, image=0.5, text=0.6, fused=0.6) == (False, False)
    assert epoch(state, 7, image=0.5, text=0.6, fused=0.6) == (False, True)  # 3 epochs since image's best
    assert {b: best["epoch"] for b, best in state.progress["best_branches"].items()} == {"image": 4, "text": 2}
    kept = state.best_state
    assert set(kept) == set(state.raw_model.state_dict())  # the two branches make up the whole model
    for key, value in kept.items():
        assert torch.all(value == (4 if key.startswith(BRANCH_KEYS["image"]) else 2)), key


def test_by_val_nll_each_branch_keeps_its_epoch_of_least_calibrated_nll_whatever_its_accuracy():
    state = worker("separate", patience=2, best_epoch_by="val_nll")
    assert epoch(state, 1, image=0.5, text=0.5, fused=0.5, nll=(1.0, 0.8, 0.7)) == (True, False)
    assert epoch(state, 2, image=0.7, text=0.6, fused=0.7, nll=(1.1, 0.6, 0.6)) == (True, False)  # text only
    assert epoch(state, 3, image=0.4, text=0.9, fused=0.9, nll=(0.9, 0.7, 0.5)) == (True, False)  # image only
    assert epoch(state, 4, image=0.9, text=0.9, fused=0.9, nll=(0.95, 0.65, 0.4)) == (False, False)
    assert epoch(state, 5, image=0.9, text=0.9, fused=0.9, nll=(0.95, 0.65, 0.4)) == (False, True)
    assert kept_epochs(state) == {"image": 3, "text": 2}


def test_by_val_nll_a_single_model_keeps_its_epoch_of_least_calibrated_nll():
    state = worker("joint", patience=2, best_epoch_by="val_nll")
    epoch(state, 1, image=0, text=0, fused=0.9, nll=(1, 1, 0.8))
    epoch(state, 2, image=0, text=0, fused=0.6, nll=(1, 1, 0.5))
    assert epoch(state, 3, image=0, text=0, fused=0.95, nll=(1, 1, 0.55)) == (False, False)
    assert epoch(state, 4, image=0, text=0, fused=0.95, nll=(1, 1, 0.55)) == (False, True)
    assert state.progress["best_epoch"] == 2 and all(torch.all(v == 2) for v in state.best_state.values())


def test_jointly_trained_branches_keep_the_best_epoch_of_the_fused_model():
    state = worker("joint", patience=2)
    epoch(state, 1, image=0.3, text=0.9, fused=0.5)
    epoch(state, 2, image=0.6, text=0.2, fused=0.7)
    assert epoch(state, 3, image=0.9, text=0.9, fused=0.6) == (False, False)
    assert epoch(state, 4, image=0.9, text=0.9, fused=0.6) == (False, True)
    assert state.progress["best_epoch"] == 2 and all(torch.all(v == 2) for v in state.best_state.values())


def test_the_moving_average_warms_up_then_follows_the_weights_at_the_decay():
    config = ModelConfig(**SMALL, fusion_head="sum", batch_norm=True)
    model = FusionClassifier(config)
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    update_ema(ema, model, decay=0.99, step=1)  # warm-up: decay (1 + 1) / (10 + 1), so 9/11 of the way
    weights = next(k for k, v in model.named_parameters())
    assert torch.allclose(ema[weights], torch.full_like(ema[weights], 9 / 11))
    counts = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    assert counts and all(torch.equal(ema[k], model.state_dict()[k]) for k in counts)  # BatchNorm's batch count
    for step in range(2, 2000):
        update_ema(ema, model, decay=0.99, step=step)
    assert torch.allclose(ema[weights], torch.ones_like(ema[weights]))
    before = ema[weights].clone()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    update_ema(ema, model, decay=0.99, step=10_000)  # past the warm-up: 1% of the way
    assert torch.allclose(ema[weights], before + 0.01)


def test_with_a_moving_average_the_average_is_validated_and_kept_and_training_goes_on_from_the_trained_weights():
    state = worker("joint", patience=2)
    with torch.no_grad():
        for p in state.raw_model.parameters():
            p.fill_(1.0)  # the weights as trained
    state.ema = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v.clone()
                 for k, v in state.raw_model.state_dict().items()}
    with evaluated_weights(state):
        assert all(torch.all(p == 7) for p in state.raw_model.parameters())  # what validation sees
        record(state, {"epoch": 1, "val_accuracy": 0.9, "val_accuracy_image": 0, "val_accuracy_text": 0,
                       "val_nll_calibrated_image": 1, "val_nll_calibrated_text": 1, "val_nll_calibrated": 1})
    assert all(torch.all(v == 7) for v in state.best_state.values() if v.is_floating_point())  # kept: the average
    assert all(torch.all(p == 1) for p in state.raw_model.parameters())  # trained on from: the trained weights
