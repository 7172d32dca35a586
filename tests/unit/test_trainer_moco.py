"""MoCo-v3 pieces on CPU with a tiny timm backbone: schedules, loss, optimisation, checkpoints,
augmentations and the k-NN evaluation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from services.trainer import evaluation, moco
from services.trainer.encoder import CheckpointError, EncoderState, ModelConfig
from services.trainer.loader import Position, TensorLoader
from services.trainer.training import RunPlan, RunProgress, TrainConfig, plan_run, schedule_at, train, train_step

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


def test_exploration_schedule_warms_up_once_then_stays_constant():
    # The first step of the warm-up already trains; later steps (later iterations) stay at the peak.
    assert moco.exploration_learning_rate(0, 1.0, 4) == pytest.approx(0.25)
    assert [moco.exploration_learning_rate(s, 1.0, 4) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert moco.exploration_learning_rate(0, 2.0, 0) == 2.0
    with pytest.raises(ValueError):
        moco.exploration_learning_rate(-1, 1.0, 4)


def test_no_step_of_either_schedule_runs_at_learning_rate_zero():
    for schedule in ("exploration", "cosine"):
        config = TrainConfig(schedule=schedule, warmup_steps=5, warmup_fraction=0.3)
        rates = [schedule_at(config, step, step, 10, 1.0)[0] for step in range(10)]
        assert min(rates) > 0.0, schedule
    # The exploration schedule continues from the exploration's step, not the run's.
    config = TrainConfig(schedule="exploration", warmup_steps=5)
    assert schedule_at(config, 12, 0, 10, 1.0) == (1.0, config.base_momentum)


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
    assert plan_run(20, config) == RunPlan(global_batch=8, steps_per_epoch=2, total_steps=3)
    assert plan_run(1, config).total_steps == 0
    assert plan_run(20, config, world_size=3).global_batch == 6  # divisible by the ranks
    first, second = EncoderState.create(TINY, CPU), EncoderState.create(TINY, CPU)
    reports = []
    result = train(first, TensorLoader(images, 8, seed=11), config, seed=11, on_step=reports.append)
    again = train(second, TensorLoader(images, 8, seed=11), config, seed=11)
    assert result.steps == 3 and len(reports) == 3 and first.global_step == 3
    assert [r.step for r in reports] == [1, 2, 3]
    assert 0.0 < reports[0].lr < reports[1].lr  # the warm-up's first step already trains
    assert reports[0].momentum == reports[-1].momentum == config.base_momentum  # the paper's constant momentum
    assert again.final_loss == pytest.approx(result.final_loss, rel=1e-5)
    assert train(first, TensorLoader(images[:1], 1, seed=1), config, seed=1).steps == 0


def test_one_step_at_default_settings_changes_the_backbone_weights():
    """The committed exploration benchmark once trained 1 step per iteration at lr 0: nothing but
    BatchNorm statistics moved. One step of a fresh exploration must move the backbone itself."""
    images = torch.randint(0, 256, (16, 3, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    state = EncoderState.create(TINY, CPU)
    before = {name: p.detach().clone() for name, p in state.model.backbone.named_parameters()}
    result = train(state, TensorLoader(images, 8, seed=2), TrainConfig(batch_size=8, max_steps=1), seed=2)
    assert result.steps == 1 and state.global_step == 1
    moved = [name for name, p in state.model.backbone.named_parameters() if not torch.equal(p, before[name])]
    weights = [name for name, p in state.model.backbone.named_parameters() if p.ndim > 1]
    assert set(weights) <= set(moved), sorted(set(weights) - set(moved))[:5]


def test_frozen_batchnorm_keeps_the_backbones_running_statistics():
    images = torch.randint(0, 256, (16, 3, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))

    def statistics(state):
        return {name: b.clone() for name, b in state.model.backbone.named_buffers() if "running_mean" in name}

    frozen, trained = EncoderState.create(TINY, CPU), EncoderState.create(TINY, CPU)
    before = statistics(frozen)
    train(frozen, TensorLoader(images, 8, seed=2), TrainConfig(batch_size=8, max_steps=2, batchnorm="frozen"), seed=2)
    train(trained, TensorLoader(images, 8, seed=2), TrainConfig(batch_size=8, max_steps=2), seed=2)
    assert all(torch.equal(before[n], v) for n, v in statistics(frozen).items())
    assert any(not torch.equal(before[n], v) for n, v in statistics(trained).items())
    # The heads' BatchNorms still learn their statistics, and the backbone's weights still move.
    assert frozen.model.projector[1].num_batches_tracked.item() == 4  # two views a step
    assert frozen.model.training  # train mode everywhere else
    with pytest.raises(ValueError):
        TrainConfig(batchnorm="sometimes")


def test_head_warmup_trains_the_heads_and_leaves_the_backbone_alone():
    images = torch.randint(0, 256, (16, 3, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(10))
    state = EncoderState.create(TINY, CPU)
    backbone = {n: p.detach().clone() for n, p in state.model.backbone.named_parameters()}
    heads = {n: p.detach().clone() for n, p in state.model.predictor.named_parameters()}
    config = TrainConfig(batch_size=8, max_steps=2, head_warmup_steps=2, batchnorm="frozen")
    train(state, TensorLoader(images, 8, seed=3), config, seed=3)
    assert all(torch.equal(backbone[n], p) for n, p in state.model.backbone.named_parameters())
    assert any(not torch.equal(heads[n], p) for n, p in state.model.predictor.named_parameters())
    # Counted in exploration steps: the next run (iteration) trains the backbone too.
    train(state, TensorLoader(images, 8, seed=3), config, seed=4)
    assert any(not torch.equal(backbone[n], p) for n, p in state.model.backbone.named_parameters())


def test_early_stopping_ends_the_run_after_epochs_without_a_lower_loss():
    images = torch.randint(0, 256, (16, 3, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    # A zero learning rate cannot lower the loss: the run stops after `patience` stale epochs
    # that follow the first (which sets the best loss).
    frozen = TrainConfig(batch_size=8, epochs=10, base_lr=0.0, early_stop_patience=2, early_stop_min_delta=10.0)
    result = train(EncoderState.create(TINY, CPU), TensorLoader(images, 8, seed=1), frozen, seed=1)
    assert result.stopped_early and result.epochs == 3 and result.steps == 6
    unlimited = dataclasses.replace(frozen, epochs=4, early_stop_patience=0)
    result = train(EncoderState.create(TINY, CPU), TensorLoader(images, 8, seed=1), unlimited, seed=1)
    assert not result.stopped_early and result.epochs == 4 and result.steps == 8


def test_a_resumed_run_takes_the_same_steps_as_an_uninterrupted_one():
    images = torch.randint(0, 256, (24, 3, 36, 36), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    config = TrainConfig(batch_size=8, epochs=2, base_lr=0.5, checkpoint_every_steps=2, early_stop_patience=0)
    whole = []
    reference = EncoderState.create(TINY, CPU)
    train(reference, TensorLoader(images, 8, seed=3), config, seed=3, run_id="r", on_step=lambda r: whole.append(r.loss))

    saved = []
    state = EncoderState.create(TINY, CPU)

    def checkpoint(progress):
        saved.append(state.to_bytes(run=progress.to_dict()))
        if progress.step == 4:
            raise KeyboardInterrupt  # the process dies right after writing step 4's checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(state, TensorLoader(images, 8, seed=3), config, seed=3, run_id="r", on_checkpoint=checkpoint)
    restored = EncoderState.from_bytes(saved[-1], CPU)
    progress = RunProgress.from_dict(restored.run)
    assert progress.step == 4 and progress.position == Position(epoch=1, batch=1)
    tail = []
    result = train(restored, TensorLoader(images, 8, seed=3), config, seed=3, run_id="r", resume=progress, on_step=lambda r: tail.append(r.loss))
    assert result.resumed_from_step == 4 and result.steps == 6 and restored.global_step == 6
    assert tail == pytest.approx(whole[4:], rel=1e-5, abs=1e-6)
    for a, b in zip(reference.model.state_dict().values(), restored.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not continue"):
        train(restored, TensorLoader(images, 8, seed=3), config, seed=3, run_id="other", resume=progress)


def test_lars_multi_tensor_update_matches_the_reference_per_tensor_update():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.zeros(2, 2))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lars = moco.LARS(params, lr=0.3, weight_decay=0.01, momentum=0.9)
    mu = [torch.zeros_like(p) for p in twins]
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        lars.step()
        # MoCo-v3's reference LARS, one tensor at a time.
        with torch.no_grad():
            for p, g, m in zip(twins, grads, mu):
                if p.ndim > 1:
                    g = g.add(p, alpha=0.01)
                    pn, un = torch.norm(p), torch.norm(g)
                    trust = torch.where(pn > 0, torch.where(un > 0, 0.001 * pn / un, torch.ones_like(pn)), torch.ones_like(pn))
                    g = g.mul(trust)
                m.mul_(0.9).add_(g)
                p.add_(m, alpha=-0.3)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q)


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
    boxes = augment._crop_boxes(moco._Draws(torch.Generator().manual_seed(0), 500, 0, 500), 50, 40)
    left, top, right, bottom = boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    assert bool((left >= 0).all() and (top >= 0).all() and (right <= 40).all() and (bottom <= 50).all())
    area = (right - left) * (bottom - top) / (50 * 40)
    assert float(area.min()) >= 0.15 and float(area.max()) <= 1.0


def test_resized_crop_of_a_same_size_box_is_the_slice():
    augment = moco.TwoViewAugment(8, (0.0,) * 3, (1.0,) * 3)
    x = torch.rand(2, 3, 16, 16)
    boxes = torch.tensor([[0, 4.0, 2.0, 12.0, 10.0], [1, 0.0, 0.0, 8.0, 8.0]])
    out = augment._resized_crop(x, boxes)
    torch.testing.assert_close(out[0], x[0, :, 2:10, 4:12])
    torch.testing.assert_close(out[1], x[1, :, 0:8, 0:8])


def test_each_rank_augments_its_rows_exactly_as_one_process_augments_the_global_batch():
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    augment = moco.TwoViewAugment(32, (0.5,) * 3, (0.25,) * 3)
    whole = augment(images, torch.Generator().manual_seed(1))
    for offset in (0, 4):
        part = augment(images[offset : offset + 4], torch.Generator().manual_seed(1), offset=offset, total=8)
        for view_whole, view_part in zip(whole, part):
            torch.testing.assert_close(view_part, view_whole[offset : offset + 4])


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


def test_linear_probe_separates_linearly_separable_classes_and_not_noise():
    torch.manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    labels = torch.arange(40) % 4
    features = directions[labels] + 0.1 * torch.randn(40, 16)
    assert evaluation.linear_probe_top1(features, labels) == 1.0
    # Labels unrelated to the features: held-out images cannot be predicted (chance is 0.25).
    shuffled = labels[torch.randperm(40, generator=torch.Generator().manual_seed(1))]
    noise = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    assert evaluation.linear_probe_top1(noise, shuffled) < 0.6
    assert evaluation.linear_probe_top1(features, labels) == evaluation.linear_probe_top1(features, labels)  # deterministic
    with pytest.raises(ValueError):
        evaluation.linear_probe_top1(features[:1], labels[:1])


def test_probe_folds_hold_a_share_of_every_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    folds = evaluation.stratified_folds(labels, 5, seed=0)
    for label in (0, 1):
        members = folds[labels == label]
        assert sorted(members.tolist()) == sorted(list(range(5)) * (int((labels == label).sum()) // 5))
    assert len(set(folds[labels == 2].tolist())) == 2  # a small class still spreads over folds
