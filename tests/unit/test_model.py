import dataclasses
import json

import pytest
import torch

from raypipe.model import (
    MODES,
    TEXT_LINEAR_SCALE,
    FusionClassifier,
    ModelConfig,
    count_parameters,
    flops_per_sample,
)

B, L, N, VOCAB = 4, 12, 5, 50
# A small model for the tests that train or repeat forward passes; shape tests use the defaults.
SMALL = dict(image_size=32, conv_channels=(8, 16), embed_dim=16, lstm_hidden=16, fc_dims=(32,))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a benchmark may share the machine; the tensors here are small anyway
    yield
    torch.set_num_threads(threads)


def make_batch(b=B, size=64, lengths=None):
    images = torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8)
    tokens = torch.randint(1, VOCAB, (b, L), dtype=torch.int32)  # int32, as the prepare pass writes them
    for row, n in enumerate(lengths if lengths is not None else [L, 7, 3, 1][:b]):
        tokens[row, n:] = 0  # right padding
    return images, tokens


@pytest.mark.parametrize("mode", MODES)
def test_output_shapes_per_mode_and_unused_input_may_be_none(mode):
    model = FusionClassifier(ModelConfig(num_classes=N, vocab_size=VOCAB, mode=mode)).eval()
    images, tokens = make_batch()
    logits, attention = model.forward_with_attention(
        images if mode != "text" else None, tokens if mode != "image" else None
    )
    assert logits.shape == (B, N) and logits.dtype == torch.float32
    assert attention is None if mode == "image" else attention.shape == (B, L)
    assert (model.image is None) == (mode == "text") and (model.text is None) == (mode == "image")
    assert torch.equal(model(images, tokens), logits)  # the unused input is ignored when given


def test_wrong_image_size_is_a_clear_error():
    model = FusionClassifier(ModelConfig(num_classes=N, vocab_size=VOCAB, mode="image"))
    with pytest.raises(ValueError, match=r"\[B, 64, 64, 3\]"):
        model(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), None)


def test_attention_is_a_distribution_over_real_tokens_and_empty_rows_stay_finite():
    model = FusionClassifier(ModelConfig(num_classes=N, vocab_size=VOCAB, mode="text", **SMALL))
    _, tokens = make_batch(b=5, lengths=[L, 7, 3, 1, 0])  # the last row is all padding
    logits, attention = model.forward_with_attention(None, tokens)
    real = tokens != 0
    assert torch.allclose(attention[:4].sum(1), torch.ones(4), atol=1e-6)
    assert (attention[~real] == 0).all()  # exactly zero on padding, the empty row included
    assert (attention[real] > 0).all()
    assert torch.isfinite(logits).all() and torch.isfinite(attention).all()
    logits.sum().backward()  # and its gradients stay finite too
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_uint8_and_float_images_on_the_same_0_255_scale_agree():
    model = FusionClassifier(ModelConfig(num_classes=N, vocab_size=VOCAB, **SMALL)).eval()
    images, tokens = make_batch(size=32)
    assert torch.equal(model(images, tokens), model(images.float(), tokens))
    assert not torch.allclose(model(images, tokens), model(images.float() / 255, tokens))  # 0-1 input differs


@pytest.mark.parametrize("bidirectional,layers,bag", [(False, 1, False), (True, 2, False), (False, 1, True)])
def test_trailing_padding_does_not_change_the_output(bidirectional, layers, bag):
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, bidirectional=bidirectional, lstm_layers=layers,
                         text_bag_of_words=bag, text_linear=bag, **SMALL)
    model = FusionClassifier(config).eval()
    images, tokens = make_batch(size=32)
    longer = torch.cat([tokens, torch.zeros(B, 9, dtype=tokens.dtype)], dim=1)
    logits, attention = model.forward_with_attention(images, tokens)
    logits_long, attention_long = model.forward_with_attention(images, longer)
    assert torch.allclose(logits, logits_long, atol=1e-6)
    assert torch.allclose(attention, attention_long[:, :L], atol=1e-6) and (attention_long[:, L:] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_a_small_batch_is_overfit(mode):
    # Random labels: only memorising works. No dropout, so this checks capacity and gradient flow.
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, mode=mode, dropout=0.0, **SMALL)
    model = FusionClassifier(config).train()
    images, tokens = make_batch(b=16, size=32, lengths=torch.randint(1, L + 1, (16,)).tolist())
    labels = torch.randint(0, N, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(images, tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert abs(losses[0] - torch.log(torch.tensor(float(N)))) < 0.3  # near-uniform start
    assert losses[-1] < 0.1 * losses[0], losses[::25]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("extras", [
    {}, dict(batch_norm=True, bidirectional=True, lstm_layers=2, fc_dims=(32, 16), text_bag_of_words=True,
             text_linear=True)
])
def test_every_parameter_gets_a_gradient(mode, extras):
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, mode=mode, **{**SMALL, **extras})
    model = FusionClassifier(config).train()
    images, tokens = make_batch(size=32)
    torch.nn.functional.cross_entropy(model(images, tokens), torch.arange(B) % N).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # DDP needs no find_unused_parameters


def test_bag_of_words_features_are_the_mean_embedding_of_the_real_tokens():
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, mode="text", text_bag_of_words=True, **SMALL)
    text = FusionClassifier(config).eval().text
    _, tokens = make_batch()  # lengths 12, 7, 3, 1
    features, _ = text(tokens)
    lstm_dim = config.lstm_hidden
    assert text.out_dim == lstm_dim + config.embed_dim and features.shape == (B, text.out_dim)
    for row, n in enumerate([L, 7, 3, 1]):
        torch.testing.assert_close(features[row, lstm_dim:], text.embed(tokens[row, :n]).mean(0))
    assert (text(torch.zeros(1, L, dtype=tokens.dtype))[0] == 0).all()  # an empty text: zeros, not NaN
    without = ModelConfig(num_classes=N, vocab_size=VOCAB, mode="text", **SMALL)
    assert flops_per_sample(config) > flops_per_sample(without)  # a wider head


@pytest.mark.parametrize("fusion_head", ["sum", "mlp"])
@pytest.mark.parametrize("mode", ["text", "fusion"])
def test_text_linear_adds_logistic_regression_on_the_distinct_words_to_the_text_logits(mode, fusion_head):
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, mode=mode, fusion_head=fusion_head, text_linear=True,
                         **SMALL)
    model = FusionClassifier(config).eval()
    assert not model.text_linear.weight.any()  # zero at the start: the initial loss stays ln(num_classes)
    with torch.no_grad():
        model.text_linear.weight[1:].normal_()  # padding's row stays zero
    images, tokens = make_batch(size=32)
    tokens[0, :4] = torch.tensor([5, 9, 5, 5])  # repeats count once: row 0's words are 5, 9 and tokens[0, 4:]
    expected = []
    for row in tokens:
        words = sorted({int(t) for t in row if t != 0})
        expected.append(model.text_linear.weight[words].sum(0) * TEXT_LINEAR_SCALE / len(words) ** 0.5)
    without = FusionClassifier(dataclasses.replace(config, text_linear=False)).eval()
    without.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("text_linear.")})
    with torch.no_grad():
        added = model(images, tokens) - without(images, tokens)  # [B, C]
        empty = model(images, torch.zeros_like(tokens)) - without(images, torch.zeros_like(tokens))
    share = 2 * (1 - config.image_share) if mode == "fusion" and fusion_head == "sum" else 1  # text's share
    torch.testing.assert_close(added, share * torch.stack(expected))
    assert not empty.any()  # an empty text: no words, no logits


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    config = ModelConfig(num_classes=8, vocab_size=20000, mode="text", conv_channels=(16, 32), fc_dims=(64, 32))
    d = json.loads(json.dumps(config.to_dict()))
    assert d["conv_channels"] == [16, 32]
    assert ModelConfig.from_dict(d) == config
    with pytest.raises(ValueError, match="unknown ModelConfig key.*lstm_hiden"):
        ModelConfig.from_dict({**d, "lstm_hiden": 64})
    with pytest.raises(ValueError, match="mode"):
        ModelConfig(num_classes=8, vocab_size=20000, mode="both")


def test_state_dict_reloads_with_weights_only_to_identical_outputs(tmp_path):
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, batch_norm=True, **SMALL)  # BatchNorm: buffers too
    model = FusionClassifier(config)
    images, tokens = make_batch(size=32)
    model(images, tokens)  # one training step's worth of BatchNorm running statistics
    model.eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = FusionClassifier(ModelConfig.from_dict(config.to_dict()))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    fresh.eval()
    assert torch.equal(fresh(images, tokens), model(images, tokens))


def test_runs_under_autocast():
    model = FusionClassifier(ModelConfig(num_classes=N, vocab_size=VOCAB, **SMALL)).eval()
    images, tokens = make_batch(size=32, lengths=[L, 5, 0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, attention = model.forward_with_attention(images, tokens)
    assert torch.isfinite(logits.float()).all() and (attention[tokens == 0] == 0).all()
    assert torch.allclose(logits.float(), model(images, tokens), atol=0.05)


def test_flops_and_parameter_counts():
    config = ModelConfig(num_classes=3, vocab_size=VOCAB, mode="image", image_size=8, conv_channels=(2,), fc_dims=())
    # conv: 8*8 positions x 2 out x 3 in x 9 taps; FC: (2*4*4) features x 3 classes; x2 for multiply + add
    assert flops_per_sample(config) == 2 * (8 * 8 * 2 * 3 * 9 + 32 * 3)
    assert count_parameters(FusionClassifier(config)) == (2 * 3 * 9 + 2) + (32 * 3 + 3)
    for mode in MODES:
        small, large = (ModelConfig(num_classes=8, vocab_size=20000, mode=mode, image_size=s) for s in (32, 64))
        assert flops_per_sample(small) > 0
        if mode == "text":
            assert flops_per_sample(small) == flops_per_sample(large)  # no image branch
        else:
            assert flops_per_sample(large) > flops_per_sample(small)


def test_modality_dropout_zeroes_one_branch_of_some_samples_in_training_only():
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, modality_dropout=0.5, **SMALL)
    model = FusionClassifier(config).train()
    image_kept, text_kept = model._one_branch_dropped(torch.ones(4000, 6))
    assert image_kept.shape == text_kept.shape == (4000, 1)
    image_dropped, text_dropped = ~image_kept[:, 0], ~text_kept[:, 0]
    assert not torch.any(image_dropped & text_dropped)  # never both
    assert 0.2 < image_dropped.float().mean() < 0.3 and 0.2 < text_dropped.float().mean() < 0.3
    images, tokens = make_batch(size=32)
    reference = FusionClassifier(ModelConfig(num_classes=N, vocab_size=VOCAB, **SMALL))
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(images, tokens), reference.eval()(images, tokens))


@pytest.mark.parametrize("field", ["modality_dropout", "embed_dropout"])
def test_dropout_out_of_range_is_refused(field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(num_classes=N, vocab_size=VOCAB, **{field: 1.0})


def test_embedding_dropout_acts_in_training_only_and_keeps_the_weights_loadable():
    text_only = dict(num_classes=N, vocab_size=VOCAB, mode="text", dropout=0.0, **SMALL)  # no other dropout
    model = FusionClassifier(ModelConfig(embed_dropout=0.5, **text_only))
    reference = FusionClassifier(ModelConfig(**text_only))
    reference.load_state_dict(model.state_dict())  # dropout adds no weights: bundles load either way
    _, tokens = make_batch()
    torch.testing.assert_close(model.eval()(None, tokens), reference.eval()(None, tokens))
    model.train()
    reference.train()
    assert not torch.allclose(model(None, tokens), reference(None, tokens))


def test_aux_heads_train_each_branch_and_leave_predictions_to_the_fused_head():
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, aux_heads=True, **SMALL)
    model = FusionClassifier(config).train()
    images, tokens = make_batch(size=32)
    logits, aux_logits = model(images, tokens, with_branches=True)
    assert logits.shape == (B, N) and [tuple(a.shape) for a in aux_logits] == [(B, N), (B, N)]
    labels = torch.arange(B) % N
    loss = sum(torch.nn.functional.cross_entropy(x, labels) for x in [logits, *aux_logits])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # DDP: the aux heads take part too
    model.eval()
    torch.testing.assert_close(model(images, tokens), model.forward_with_attention(images, tokens)[0])
    assert model(images, tokens, with_branches=True)[0].shape == (B, N)


@pytest.mark.parametrize("mode", ["image", "text"])
def test_single_branch_models_have_no_aux_heads(mode):
    model = FusionClassifier(ModelConfig(num_classes=N, vocab_size=VOCAB, mode=mode, aux_heads=True, **SMALL))
    assert model.branch_heads is None
    images, tokens = make_batch(size=32)
    assert model(images, tokens, with_branches=True)[1] == []


def test_average_pooled_image_features_are_one_per_channel_and_counted_in_the_flops():
    flat = ModelConfig(num_classes=N, vocab_size=VOCAB, mode="image", **SMALL)
    pooled = ModelConfig(num_classes=N, vocab_size=VOCAB, mode="image", image_pool="avg", **SMALL)
    images, _ = make_batch(size=32)
    assert FusionClassifier(pooled).image(images).shape == (B, SMALL["conv_channels"][-1])
    assert FusionClassifier(flat).image.out_dim == SMALL["conv_channels"][-1] * (32 >> len(SMALL["conv_channels"])) ** 2
    assert flops_per_sample(pooled, 12) < flops_per_sample(flat, 12)


def test_late_fusion_predicts_the_sum_of_the_branch_logits_and_trains_both_branches():
    config = ModelConfig(num_classes=N, vocab_size=VOCAB, fusion_head="sum", aux_heads=True, modality_dropout=0.5,
                         **SMALL)
    model = FusionClassifier(config).train()
    assert model.head is None
    images, tokens = make_batch(size=32)
    logits, branch_logits = model(images, tokens, with_branches=True)
    loss = sum(torch.nn.functional.cross_entropy(x, torch.arange(B) % N) for x in [logits, *branch_logits])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    image_logits, text_logits = (head(f) for head, f in zip(model.branch_heads, model._features(images, tokens)[0]))
    torch.testing.assert_close(model(images, tokens), image_logits + text_logits)
    # Without aux heads, the branch classifiers are there too: they make the prediction.
    plain = FusionClassifier(ModelConfig(num_classes=N, vocab_size=VOCAB, fusion_head="sum", **SMALL)).train()
    assert len(plain(images, tokens, with_branches=True)[1]) == 2 and len(plain.branch_heads) == 2
