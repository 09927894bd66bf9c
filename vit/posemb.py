"""Position embeddings: fixed 2D sin-cos tables and resampling learned ones to a new grid.

Fine-tuning at a higher resolution than pretraining (the paper's recipe) keeps the patch size, so
the patch grid grows; the learned embedding is interpolated in 2D to the new grid, with the
class-token row carried over unchanged.

The interpolation is `F.interpolate` with the config's mode (`pos_embed_interpolation`),
`align_corners=False` and no antialiasing: timm's `resample_abs_pos_embed(..., antialias=False)`
exactly. timm's default (antialias=True, what its loaders use) runs another bicubic kernel and
gives other values, so the mode alone does not say how a table was resampled: `resampling` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN_CORNERS = False
ANTIALIAS = False


def sincos_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10_000.0) -> torch.Tensor:
    """Fixed 2D sin-cos embedding (grid_h * grid_w, dim), as in MoCo v3 and big_vision."""
    if dim % 4:
        raise ValueError(f"sincos2d needs a width divisible by 4, got {dim}")
    gh, gw = grid_size
    y, x = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4 - 1 or 1))
    y = y.reshape(-1, 1) * omega
    x = x.reshape(-1, 1) * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def resampling(mode: str) -> dict[str, str | bool]:
    """The `F.interpolate` arguments, besides the size, that resample a table in `mode`.

    What provenance records: with them anyone can redo the resampling, in any library.
    """
    return {"mode": mode, "align_corners": ALIGN_CORNERS, "antialias": ANTIALIAS}


def resample_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Interpolate a learned embedding (1, prefix + old_h*old_w, D) to (1, prefix + new_h*new_w, D).

    Interpolation runs in float32 whatever the parameter's dtype, because bicubic resampling in
    bf16 visibly degrades the embedding.
    """
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != expected:
        raise ValueError(
            f"position embedding has {pos_embed.shape[1]} tokens, expected {expected} "
            f"({num_prefix_tokens} prefix + {old_grid[0]}x{old_grid[1]} grid)"
        )
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, *old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid, size=tuple(new_grid), mode=mode, align_corners=ALIGN_CORNERS, antialias=ANTIALIAS
    )
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)
