"""Patch layout: the one definition shared by ingest, model and serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit.patches import patchify, unpatchify


def test_round_trip_for_both_layouts_and_array_kinds() -> None:
    images = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    tokens = patchify(images, 16)
    assert tokens.shape == (2, 6, 16 * 16 * 3) and tokens.dtype == torch.uint8
    assert torch.equal(unpatchify(tokens, 16, (2, 3)), images)
    hwc = images.permute(0, 2, 3, 1).numpy()
    hwc_tokens = patchify(hwc, 16, channels_last=True)
    assert isinstance(hwc_tokens, np.ndarray)
    assert np.array_equal(hwc_tokens, tokens.numpy())
    assert np.array_equal(unpatchify(hwc_tokens, 16, (2, 3), channels_last=True), hwc)


def test_patch_order_is_row_major_and_channels_last_within_a_patch() -> None:
    image = np.arange(4 * 4 * 2).reshape(4, 4, 2)  # H, W, C
    tokens = patchify(image, 2, channels_last=True)
    # Second patch = top-right 2x2 block, flattened (row, column, channel).
    assert tokens[1].tolist() == image[0:2, 2:4].reshape(-1).tolist()
    assert tokens.shape == (4, 8)


def test_a_224_image_is_196_patches_of_768_values() -> None:
    assert patchify(torch.zeros(224, 224, 3), 16, channels_last=True).shape == (196, 768)


def test_sizes_that_do_not_divide_are_rejected() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 30, 32), 16)
    with pytest.raises(ValueError, match="grid"):
        unpatchify(torch.zeros(1, 5, 768), 16, (2, 3))
