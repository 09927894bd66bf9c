"""Position-embedding resampling for fine-tuning at another resolution."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vit.posemb import resample_pos_embed, sincos_2d


def smooth_embedding(grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """A learned-looking embedding that varies slowly over the grid, as trained ones do."""
    torch.manual_seed(0)
    coarse = torch.randn(1, 32, 3, 3)
    table = torch.nn.functional.interpolate(coarse, size=grid, mode="bicubic", align_corners=True)
    table = table.flatten(2).transpose(1, 2)
    return torch.cat([torch.randn(1, prefix, 32), table], dim=1)


# Bilinear down-sampling by 2 after up-sampling by 2 blurs ([1, 6, 1] / 8): a looser bound.
@pytest.mark.parametrize(("mode", "tolerance"), [("bilinear", 0.075), ("bicubic", 0.01)])
def test_upsample_then_downsample_returns_close_to_the_original(
    mode: str, tolerance: float
) -> None:
    original = smooth_embedding((8, 8))
    up = resample_pos_embed(original, (8, 8), (16, 16), 1, mode)
    assert up.shape == (1, 1 + 256, 32)
    back = resample_pos_embed(up, (16, 16), (8, 8), 1, mode)
    torch.testing.assert_close(back[:, 0], original[:, 0], rtol=0, atol=0)
    relative_error = (back - original).abs().max() / original.abs().max()
    assert relative_error < tolerance, relative_error


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    ("old", "new"),
    [((14, 14), (24, 24)), ((14, 14), (7, 7)), ((14, 14), (10, 10)), ((4, 6), (8, 5))],
)
def test_resampling_is_timms_without_antialiasing(
    mode: str, old: tuple[int, int], new: tuple[int, int]
) -> None:
    """Ours equals timm's `resample_abs_pos_embed(..., antialias=False)`, growing and shrinking.

    timm's default, antialias=True (also what its loaders use), gives other values wherever it
    differs (bicubic always, its kernel being another; bilinear when shrinking): the check would
    notice if ours drifted to it.
    """
    original = smooth_embedding(old)
    resized = resample_pos_embed(original, old, new, 1, mode)
    timm = {
        antialias: resample_abs_pos_embed(
            original, list(new), list(old), 1, interpolation=mode, antialias=antialias
        )
        for antialias in (False, True)
    }
    torch.testing.assert_close(resized, timm[False], rtol=0, atol=0)
    if mode == "bicubic" or new[0] < old[0] or new[1] < old[1]:
        assert (resized - timm[True]).abs().max() > 1e-3


def test_same_grid_is_the_identity_and_constant_stays_constant() -> None:
    original = smooth_embedding((4, 6), prefix=0)
    assert resample_pos_embed(original, (4, 6), (4, 6), 0) is original
    constant = torch.full((1, 1 + 16, 8), 0.25)
    resized = resample_pos_embed(constant, (4, 4), (7, 5), 1, "bicubic")
    torch.testing.assert_close(resized, torch.full((1, 1 + 35, 8), 0.25))


def test_bf16_parameters_are_resampled_in_float32_and_keep_their_dtype() -> None:
    original = smooth_embedding((8, 8)).bfloat16()
    resized = resample_pos_embed(original, (8, 8), (12, 12), 1)
    assert resized.dtype == torch.bfloat16
    in_float32 = resample_pos_embed(original.float(), (8, 8), (12, 12), 1)
    assert torch.equal(resized, in_float32.bfloat16())  # rounded once, at the end


def test_a_token_count_that_does_not_match_the_grid_is_rejected() -> None:
    with pytest.raises(ValueError, match="expected 17"):
        resample_pos_embed(torch.zeros(1, 16, 8), (4, 4), (8, 8), 1)


def test_sincos_table_is_fixed_and_distinguishes_positions() -> None:
    table = sincos_2d((4, 5), 64)
    assert table.shape == (20, 64)
    assert torch.equal(table, sincos_2d((4, 5), 64))
    distances = torch.cdist(table, table) + torch.eye(20)
    assert distances.min() > 0.1
