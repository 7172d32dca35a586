"""Initial encoders: the shipped EfficientNet-Lite0 ImageNet weights (proved real by classifying
Tux Paint photos) and checkpoints from S3 in the MoCo-v3 reference format, this trainer's format,
or a plain timm state dict, all loaded strictly: anything that does not fit is an error."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from services.trainer import data, evaluation, initialisation, moco, pretrained
from services.trainer.encoder import EncoderState, ModelConfig
from services.trainer.initialisation import InitError

CPU = torch.device("cpu")
TINY = ModelConfig(backbone="test_resnet", image_size=32, seed=3, mlp_dim=64, projection_dim=32)

# Tux Paint photo (Debian tuxpaint-stamps-default) -> ImageNet class that must be in the top 5.
PHOTOS = {
    "food/fruit/strawberry.png": 949,  # strawberry
    "food/fruit/apple_granny_smith.png": 948,  # Granny Smith
    "animals/birds/hen.png": 8,  # hen
    "food/fruit/lemon.png": 951,  # lemon
    "food/fruit/pineapple.png": 953,  # pineapple
    "animals/mammals/equines/zebra.png": 340,  # zebra
    "animals/birds/pink_flamingo.png": 130,  # flamingo
}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def stamps() -> Path:
    from services.common import debpkg

    try:
        root = debpkg.fetch("tuxpaint-stamps-default")
    except debpkg.PackageUnavailable as exc:
        pytest.skip(f"Tux Paint photos unavailable on this machine: {exc}")
    return root / "usr/share/tuxpaint/stamps"


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def reader(objects: dict[tuple[str, str], bytes]):
    return lambda bucket, key: objects.get((bucket, key))


# ---- EfficientNet-Lite0 ------------------------------------------------------------------------
def test_lite0_weights_map_one_to_one_onto_timm():
    mapped = pretrained.lite0_state_dict(classifier=True)
    assert sum(1 for k in mapped if not k.endswith("num_batches_tracked")) == pretrained.LITE0_TENSORS == 247
    source = torch.load(pretrained.lite0_weights_path(), map_location="cpu", weights_only=True)
    # Same tensors in the same order, renamed: the stem and the classifier prove the pairing.
    assert torch.equal(mapped["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.weight"], source["_fc.weight"])
    with pytest.raises(pretrained.PretrainedWeightsError, match="does not fit"):
        shuffled = dict(reversed(list(source.items())))
        import timm

        pretrained.map_by_position(shuffled, timm.create_model(pretrained.LITE0_BACKBONE).state_dict())


def test_lite0_init_classifies_real_tux_paint_photos(stamps):
    """The trainer's own initial encoder (init "efficientnet-lite0") with the shipped ImageNet
    classifier on top puts each photo's class in its top 5: the weights are the real ones, the
    input scaling is (x - 127) / 128, and TF SAME padding is in place."""
    initial = initialisation.resolve("efficientnet-lite0", None, reader({}))
    config = ModelConfig(backbone=initial.backbone, image_size=224, init="efficientnet-lite0", mlp_dim=64, projection_dim=32)
    state = EncoderState.create(config, CPU, initial=initial)
    assert state.config.mean == pytest.approx((127 / 255,) * 3) and state.config.std == pytest.approx((128 / 255,) * 3)
    classifier = {k: v for k, v in pretrained.lite0_state_dict(classifier=True).items() if k.startswith("classifier.")}
    pixels = torch.stack([torch.from_numpy(data.decode_square((stamps / name).read_bytes(), 224).copy()).permute(2, 0, 1) for name in PHOTOS])
    backbone = state.backbone.eval()
    with torch.no_grad():
        x = (pixels.float() - 127.0) / 128.0
        logits = backbone(x) @ classifier["classifier.weight"].t() + classifier["classifier.bias"]
        # The embedding the trainer evaluates and exports is the same normalisation.
        torch.testing.assert_close(evaluation.embed(backbone, pixels, state.config.mean, state.config.std, CPU), torch.nn.functional.normalize(backbone(x), dim=1), atol=1e-4, rtol=0)
    top5 = logits.topk(5, dim=1).indices.tolist()
    misses = [name for (name, wanted), top in zip(PHOTOS.items(), top5) if wanted not in top]
    assert not misses, f"not in the top 5: {misses}"
    top1 = sum(wanted == top[0] for wanted, top in zip(PHOTOS.values(), top5))
    assert top1 >= len(PHOTOS) - 1


def test_lite0_refuses_another_backbone():
    with pytest.raises(InitError) as error:
        initialisation.resolve("efficientnet-lite0", "resnet50", reader({}))
    assert error.value.reason == "init_mismatch"


# ---- checkpoints from S3 -----------------------------------------------------------------------
def moco_v3_reference_checkpoint(model: moco.MoCoV3, arch: str) -> dict:
    """A checkpoint as facebookresearch/moco-v3 writes it: a DDP module whose encoders carry
    the projection MLP in the classifier slot (`fc` for ResNets)."""
    state = {}
    for name, tensor in model.backbone.state_dict().items():
        state[f"module.base_encoder.{name}"] = tensor
    for name, tensor in model.projector.state_dict().items():
        state[f"module.base_encoder.fc.{name}"] = tensor
    for name, tensor in model.momentum_backbone.state_dict().items():
        state[f"module.momentum_encoder.{name}"] = tensor + 1.0 if tensor.is_floating_point() else tensor
    for name, tensor in model.momentum_projector.state_dict().items():
        state[f"module.momentum_encoder.fc.{name}"] = tensor
    for name, tensor in model.predictor.state_dict().items():
        state[f"module.predictor.{name}"] = tensor
    return {"epoch": 300, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def test_a_moco_v3_reference_checkpoint_initialises_every_part():
    source = EncoderState.create(ModelConfig(backbone="test_resnet", image_size=32, seed=9, mlp_dim=48, projection_dim=24), CPU).model
    blob = saved(moco_v3_reference_checkpoint(source, "test_resnet"))
    initial = initialisation.resolve("s3://inits/moco.pth", None, reader({("inits", "moco.pth"): blob}))
    assert initial.backbone == "test_resnet"
    assert initial.head_dims() == {"mlp_dim": 48, "projection_dim": 24, "projector_layers": 2}
    config = ModelConfig(backbone="test_resnet", image_size=32, init="s3://inits/moco.pth", seed=1, **initial.head_dims())
    model = EncoderState.create(config, CPU, initial=initial).model
    for part in ("backbone", "projector", "predictor", "momentum_projector"):
        for (name, a), b in zip(getattr(model, part).state_dict().items(), getattr(source, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{name}"
    # The momentum encoder is the checkpoint's own, not a copy of the base encoder.
    conv = next(iter(model.momentum_backbone.state_dict()))
    assert torch.equal(model.momentum_backbone.state_dict()[conv], source.momentum_backbone.state_dict()[conv] + 1.0)


def test_a_trainer_checkpoint_and_a_plain_state_dict_initialise_the_backbone():
    other = EncoderState.create(TINY, CPU)
    initial = initialisation.resolve("s3://iex/checkpoints/x/v3.pt", None, reader({("iex", "checkpoints/x/v3.pt"): other.to_bytes()}))
    assert initial.backbone == "test_resnet" and set(initial.heads) == {"projector", "predictor", "momentum_backbone", "momentum_projector"}
    state = EncoderState.create(ModelConfig(backbone="test_resnet", image_size=32, init="s3://iex/checkpoints/x/v3.pt", **initial.head_dims()), CPU, initial=initial)
    assert all(torch.equal(a, b) for a, b in zip(state.model.state_dict().values(), other.model.state_dict().values()))

    import timm

    supervised = timm.create_model("test_resnet", num_classes=10)  # with its classifier
    plain = initialisation.resolve("s3://b/plain.pth", "test_resnet", reader({("b", "plain.pth"): saved(supervised.state_dict())}))
    assert not plain.heads and "fc.weight" not in plain.backbone_state
    state = EncoderState.create(dataclasses_replace(TINY, init="s3://b/plain.pth"), CPU, initial=plain)
    for name, tensor in state.backbone.state_dict().items():
        assert torch.equal(tensor, supervised.state_dict()[name])
    # Momentum encoder and projector start as copies of the base ones, as in MoCo.
    assert all(torch.equal(a, b) for a, b in zip(state.model.backbone.state_dict().values(), state.model.momentum_backbone.state_dict().values()))


def dataclasses_replace(config: ModelConfig, **changes) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_problems_with_a_checkpoint_are_errors_never_a_random_start():
    import timm

    good = timm.create_model("test_resnet").state_dict()
    wider = timm.create_model("resnet18").state_dict()
    extra = dict(good, **{"layer9.weight": torch.zeros(1)})
    objects = {("b", "garbage"): b"not a checkpoint", ("b", "wider"): saved(wider), ("b", "extra"): saved(extra), ("b", "list"): saved([1, 2])}
    moco_other_arch = moco_v3_reference_checkpoint(EncoderState.create(TINY, CPU).model, "resnet50")
    objects[("b", "moco50")] = saved(moco_other_arch)
    cases = {
        "s3://b/absent": "init_missing",
        "s3://b/garbage": "init_unreadable",
        "s3://b/list": "init_unreadable",
        "s3://b/wider": "init_mismatch",
        "s3://b/extra": "init_mismatch",
        "s3://b/moco50": "init_mismatch",
    }
    for init, reason in cases.items():
        with pytest.raises(InitError) as error:
            initialisation.resolve(init, "test_resnet", reader(objects))
        assert error.value.reason == reason, init
    with pytest.raises(InitError) as error:
        initialisation.resolve("imagenet", None, reader(objects))
    assert error.value.reason == "unsupported_init"


def test_init_names_are_checked():
    for init in ("random", "efficientnet-lite0", "s3://bucket/path/to/ckpt.pth"):
        assert initialisation.check_init(init) == init
    for init in ("imagenet", "s3://bucket", "s3://bucket/dir/", "", "/local/file.pt"):
        with pytest.raises(ValueError):
            initialisation.check_init(init)
