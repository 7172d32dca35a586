"""MoCo-v3 pieces on CPU with a tiny timm backbone: schedules, loss, optimisation, checkpoints,
augmentations and the k-NN evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from services.trainer import evaluation, moco
from services.trainer.encoder import CheckpointError, EncoderState, ModelConfig
from services.trainer.training import TrainConfig, planned_steps, train, train_step

TINY = ModelConfig(backbone="test_resnet", image_size=32, seed=3, mlp_dim=64, projection_dim=32)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they save
    yield
    torch.set_num_threads(previous)


def fixed_views(batch: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, 36, 36), dtype=torch.uint8, generator=generator)
    augment = moco.TwoViewAugment(32, TINY.mean, TINY.std)
    return augment(images, generator)


# ---- schedules ---------------------------------------------------------------------------------
def test_momentum_schedule_is_a_pure_cosine_from_base_to_one():
    assert moco.momentum_at(0.0, 0.99) == pytest.approx(0.99)
    assert moco.momentum_at(1.0, 0.99) == pytest.approx(1.0)
    assert moco.momentum_at(0.5, 0.99) == pytest.approx(0.995)
    values = [moco.momentum_at(p / 20, 0.9985) for p in range(21)]
    assert values == sorted(values)
    assert values == [moco.momentum_at(p / 20, 0.9985) for p in range(21)]  # no hidden state
    assert moco.momentum_at(-1.0, 0.99) == moco.momentum_at(0.0, 0.99)  # clamped
    assert moco.momentum_at(2.0, 0.99) == moco.momentum_at(1.0, 0.99)
    with pytest.raises(ValueError):
        moco.momentum_at(0.5, 1.5)


def test_learning_rate_warms_up_then_decays_to_zero():
    assert moco.learning_rate_at(0.0, 1.0, 0.1) == 0.0
    assert moco.learning_rate_at(0.05, 1.0, 0.1) == pytest.approx(0.5)
    assert moco.learning_rate_at(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert moco.learning_rate_at(1.0, 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert moco.learning_rate_at(0.0, 2.0, 0.0) == pytest.approx(2.0)
    assert moco.scaled_learning_rate(0.6, 128) == pytest.approx(0.3)


# ---- loss --------------------------------------------------------------------------------------
def test_info_nce_is_low_for_matching_pairs_and_high_for_shuffled_ones():
    torch.manual_seed(0)
    q = torch.randn(32, 128)
    matched = moco.info_nce(q, q + 0.01 * torch.randn(32, 128), 0.2)
    shuffled = moco.info_nce(q, q[torch.randperm(32)], 0.2)
    assert matched < 0.2 and shuffled > 1.0
    # Scaled by 2T: uniform logits give 2T * log(N).
    assert moco.info_nce(torch.ones(8, 4), torch.ones(8, 4), 0.5).item() == pytest.approx(2 * 0.5 * math.log(8), rel=1e-5)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss():
    state = EncoderState.create(TINY, CPU)
    view1, view2 = fixed_views()
    losses = [train_step(state, view1, view2, lr=0.2, momentum=0.99, temperature=0.2) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses
    assert state.global_step == 8


def test_momentum_encoder_follows_the_base_encoder_by_ema():
    state = EncoderState.create(TINY, CPU)
    model = state.model
    base = next(model.backbone.parameters())
    ema = next(model.momentum_backbone.parameters())
    assert torch.equal(base, ema) and not ema.requires_grad
    with torch.no_grad():
        base.add_(1.0)
    before = ema.clone()
    model.update_momentum_encoder(0.9)
    assert torch.allclose(ema, 0.9 * before + 0.1 * base)


# ---- checkpoints -------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_the_identical_next_step():
    state = EncoderState.create(TINY, CPU)
    view1, view2 = fixed_views(seed=1)
    for _ in range(2):
        train_step(state, view1, view2, lr=0.1, momentum=0.99, temperature=0.2)
    state.iteration = 4
    blob = state.to_bytes(extra={"note": "x"})
    restored = EncoderState.from_bytes(blob, CPU)
    assert restored.config == state.config
    assert (restored.global_step, restored.iteration) == (2, 4)
    expected = train_step(state, view1, view2, lr=0.1, momentum=0.99, temperature=0.2)
    got = train_step(restored, view1, view2, lr=0.1, momentum=0.99, temperature=0.2)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    for a, b in zip(state.model.state_dict().values(), restored.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_initialisation_is_seeded_and_unknown_inits_are_refused():
    a = EncoderState.create(TINY, CPU)
    b = EncoderState.create(TINY, CPU)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert a.config.embedding_dim == moco.feature_dim(a.backbone, 32)
    with pytest.raises(ValueError, match="unsupported encoder init"):
        ModelConfig(backbone="test_resnet", image_size=32, init="imagenet")
    with pytest.raises(CheckpointError):
        EncoderState.from_bytes(b"not a checkpoint", CPU)


# ---- training run ------------------------------------------------------------------------------
def test_a_run_respects_the_step_cap_and_is_reproducible():
    images = torch.randint(0, 256, (20, 3, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    config = TrainConfig(batch_size=8, epochs=5, max_steps=3, base_lr=0.5)
    assert planned_steps(20, config) == (8, 3)
    assert planned_steps(1, config) == (1, 0)
    first, second = EncoderState.create(TINY, CPU), EncoderState.create(TINY, CPU)
    reports = []
    result = train(first, images, config, seed=11, on_step=reports.append)
    again = train(second, images, config, seed=11)
    assert result.steps == 3 and len(reports) == 3 and first.global_step == 3
    assert [r.step for r in reports] == [1, 2, 3]
    assert reports[0].lr == 0.0 and reports[1].lr > 0  # warm-up starts at zero
    assert reports[0].momentum < reports[-1].momentum <= 1.0
    assert again.final_loss == pytest.approx(result.final_loss, rel=1e-5)
    empty = train(first, images[:1], config, seed=1)
    assert empty.steps == 0


# ---- augmentations -----------------------------------------------------------------------------
def test_augmentations_make_two_different_normalised_views_per_image():
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    augment = moco.TwoViewAugment(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    v1, v2 = augment(images, torch.Generator().manual_seed(9))
    assert v1.shape == v2.shape == (6, 3, 32, 32) and v1.dtype == torch.float32
    assert not torch.allclose(v1, v2)
    assert float(v1.min()) >= -2.0 - 1e-5 and float(v1.max()) <= 2.0 + 1e-5  # [0, 1] normalised
    w1, _ = augment(images, torch.Generator().manual_seed(9))
    assert torch.equal(v1, w1)  # the generator is the only source of randomness


def test_crop_boxes_stay_inside_the_image_with_the_requested_area():
    augment = moco.TwoViewAugment(32, (0.5,) * 3, (0.25,) * 3, min_scale=0.2)
    boxes = augment._crop_boxes(500, 50, 40, torch.Generator().manual_seed(0))
    left, top, right, bottom = boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    assert bool((left >= 0).all() and (top >= 0).all() and (right <= 40).all() and (bottom <= 50).all())
    area = (right - left) * (bottom - top) / (50 * 40)
    assert float(area.min()) >= 0.15 and float(area.max()) <= 1.0


def test_resized_crop_of_a_same_size_box_is_the_slice(monkeypatch):
    augment = moco.TwoViewAugment(8, (0.0,) * 3, (1.0,) * 3)
    x = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[0, 4.0, 2.0, 12.0, 10.0], [1, 0.0, 0.0, 8.0, 8.0]])
    monkeypatch.setattr(augment, "_crop_boxes", lambda *args: boxes)
    out = augment._resized_crop(x, torch.Generator())
    torch.testing.assert_close(out[0], x[0, :, 2:10, 4:12])
    torch.testing.assert_close(out[1], x[1, :, 0:8, 0:8])


# ---- evaluation --------------------------------------------------------------------------------
def test_knn_top1_leaves_each_image_out():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    features = torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(15, 8), dim=1)
    assert evaluation.knn_top1(features, labels, k=3) == 1.0
    # Without leaving the image out, a single image per class would still score 1; left out it cannot.
    assert evaluation.knn_top1(centres, torch.tensor([0, 1, 2]), k=1) == 0.0
    with pytest.raises(ValueError):
        evaluation.knn_top1(features[:1], labels[:1])


def test_embeddings_are_unit_norm_and_leave_the_model_mode_alone():
    state = EncoderState.create(TINY, CPU)
    state.model.train()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    features = evaluation.embed(state.backbone, images, TINY.mean, TINY.std, CPU, batch_size=2)
    assert features.shape == (5, state.config.embedding_dim)
    assert torch.allclose(features.norm(dim=1), torch.ones(5), atol=1e-5)
    assert state.backbone.training
