"""Cutting images into flattened patches and back.

The patch vector is the unit that crosses process boundaries: the data pipeline patchifies decoded
uint8 images on CPU workers, the model embeds the patches, serving patchifies requests. All of
them call these two functions, so the patch layout is defined exactly once.

Layout: patches are numbered row by row; each patch is flattened as (row, column, channel), i.e.
channels last, which is how a decoded HWC image is already laid out in memory and how the
original Flax code flattens its patch-embedding kernel.

Both functions accept NumPy arrays and torch tensors of any dtype (uint8 stays uint8).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _permute(x: Array, axes: tuple[int, ...]) -> Array:
    return x.permute(axes) if isinstance(x, torch.Tensor) else x.transpose(axes)


def patchify(images: Array, patch_size: int, *, channels_last: bool = False) -> Array:
    """Images (..., C, H, W) or, with `channels_last`, (..., H, W, C) -> patches (..., N, P*P*C).

    H and W must be multiples of the patch size; leading dimensions (a batch, or none) are kept.
    """
    if channels_last:
        *lead, h, w, c = images.shape
    else:
        *lead, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image of {h}x{w} pixels is not divisible into {p}x{p} patches")
    gh, gw = h // p, w // p
    n = len(lead)
    if channels_last:
        x = images.reshape(*lead, gh, p, gw, p, c)
        x = _permute(x, (*range(n), n, n + 2, n + 1, n + 3, n + 4))
    else:
        x = images.reshape(*lead, c, gh, p, gw, p)
        x = _permute(x, (*range(n), n + 1, n + 3, n + 2, n + 4, n))
    return x.reshape(*lead, gh * gw, p * p * c)


def unpatchify(
    patches: Array,
    patch_size: int,
    grid_size: tuple[int, int],
    *,
    channels_last: bool = False,
) -> Array:
    """Inverse of `patchify`: patches (..., N, P*P*C) -> images (..., C, H, W) or (..., H, W, C)."""
    *lead, num, dim = patches.shape
    p = patch_size
    gh, gw = grid_size
    c, remainder = divmod(dim, p * p)
    if remainder or num != gh * gw:
        raise ValueError(
            f"{num} patches of {dim} values do not form a {gh}x{gw} grid of {p}x{p} patches"
        )
    n = len(lead)
    x = patches.reshape(*lead, gh, gw, p, p, c)
    if channels_last:
        x = _permute(x, (*range(n), n, n + 2, n + 1, n + 3, n + 4))
        return x.reshape(*lead, gh * p, gw * p, c)
    x = _permute(x, (*range(n), n + 4, n, n + 2, n + 1, n + 3))
    return x.reshape(*lead, c, gh * p, gw * p)
