"""The batched MoCo-v3 augmentations against torchvision.transforms.v2's functional ops: for the
same per-image parameters, every operation gives torchvision's pixels (hue excepted: it rotates
the YIQ chroma plane instead of shifting the HSV hue)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from services.trainer import moco


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(4, 3, 24, 20, generator=torch.Generator().manual_seed(0))


FACTORS = torch.tensor([0.6, 0.9, 1.2, 1.4])


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (moco.adjust_brightness, TF.adjust_brightness),
        (moco.adjust_contrast, TF.adjust_contrast),
        (moco.adjust_saturation, TF.adjust_saturation),
    ],
)
def test_colour_adjustments_match_torchvision(images, ours, theirs):
    batched = ours(images, FACTORS)
    for i, factor in enumerate(FACTORS.tolist()):
        # torchvision weighs red 0.2989 where we use 0.299: a 1e-4 difference at most.
        torch.testing.assert_close(batched[i], theirs(images[i], factor), atol=2e-4, rtol=0)


def test_blur_matches_torchvision(images):
    sigmas = torch.tensor([0.3, 0.8, 1.5, 2.0])
    batched = moco.gaussian_blur(images, 5, sigmas)
    for i, sigma in enumerate(sigmas.tolist()):
        torch.testing.assert_close(batched[i], TF.gaussian_blur(images[i], kernel_size=[5, 5], sigma=[sigma, sigma]), atol=1e-5, rtol=0)


def test_grayscale_and_solarize_match_torchvision(images):
    gray = moco._grayscale(images).expand_as(images)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(images, num_output_channels=3), atol=2e-4, rtol=0)
    solarized = torch.where(images >= 0.5, 1.0 - images, images)  # the expression TwoViewAugment uses
    torch.testing.assert_close(solarized, TF.solarize(images, threshold=0.5))


def test_resized_crop_matches_torchvision_inside_the_border(images):
    augment = moco.TwoViewAugment(16, (0.0,) * 3, (1.0,) * 3)
    # (index, left, top, right, bottom): crops of 10x12 and 8x8 pixels upscaled to 16x16.
    boxes = torch.tensor([[0, 3.0, 5.0, 13.0, 17.0], [1, 0.0, 0.0, 8.0, 8.0], [2, 10.0, 14.0, 20.0, 24.0], [3, 2.0, 2.0, 18.0, 18.0]])
    ours = augment._resized_crop(images, boxes)
    for i, (_, left, top, right, bottom) in enumerate(boxes.tolist()):
        theirs = TF.resized_crop(images[i], int(top), int(left), int(bottom - top), int(right - left), [16, 16], antialias=False)
        # At the crop's edge torchvision clamps to the crop, grid sampling may blend one pixel
        # from outside it; everything inside agrees.
        torch.testing.assert_close(ours[i][:, 1:-1, 1:-1], theirs[:, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_hue_rotation_keeps_luma_and_a_zero_shift_is_the_identity(images):
    shifted = moco._rotate_hue(images, torch.tensor([0.1, -0.1, 0.05, 0.0]))
    torch.testing.assert_close(moco._grayscale(shifted), moco._grayscale(images), atol=1e-4, rtol=0)
    torch.testing.assert_close(shifted[3], images[3], atol=1e-5, rtol=0)
    assert not torch.allclose(shifted[0], images[0], atol=1e-3)


def test_view_recipes_are_moco_v3s():
    # BYOL's asymmetric pair: view 1 always blurred, never solarised; view 2 rarely blurred,
    # solarised one time in five.
    assert (moco.FIRST_VIEW.blur_p, moco.FIRST_VIEW.solarize_p) == (1.0, 0.0)
    assert (moco.SECOND_VIEW.blur_p, moco.SECOND_VIEW.solarize_p) == (0.1, 0.2)
    augment = moco.TwoViewAugment(224, (0.5,) * 3, (0.5,) * 3)
    assert augment.blur_kernel == 23 and augment.blur_sigma == pytest.approx((0.1, 2.0))
