"""Inside a trained ViT, as the paper looks: attention rollout (Fig. 6) and the panels of Fig. 7.

Each function returns plain tensors so that any front end (a plotting job, the serving endpoint, a
notebook) can draw them. Only the layers being inspected leave the fused attention kernel
(`VisionTransformer.forward_with_attention`); the others run at full speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vit.config import ViTConfig
from vit.model import VisionTransformer


@torch.no_grad()
def attention_maps(model: VisionTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention weights (B, heads, T, T), in eval mode, model mode restored.

    One forward pass serves both `rollout_map` and `attention_distance`.
    """
    was_training = model.training
    model.eval()
    try:
        _, maps = model.forward_with_attention(images)
    finally:
        model.train(was_training)
    return [maps[index] for index in sorted(maps)]


def _patch_to_patch(prefix: int, weights: torch.Tensor) -> torch.Tensor:
    """Attention among patch tokens only, rows renormalised: (B, heads, N, N)."""
    patches = weights[..., prefix:, prefix:]
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def rollout(maps: Sequence[torch.Tensor], residual_weight: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) through layers given in order: (B, T, T).

    Each layer's head-averaged attention is mixed with the identity to account for the residual
    connection, rows are renormalised, and the layers are multiplied from the input upwards, so
    entry (i, j) estimates how much input token j flows into output token i.
    """
    if not maps:
        raise ValueError("rollout needs the attention weights of at least one layer")
    joint = None
    for weights in maps:
        attention = weights.float().mean(dim=1)
        eye = torch.eye(attention.shape[-1], device=attention.device)
        attention = residual_weight * eye + (1.0 - residual_weight) * attention
        attention = attention / attention.sum(dim=-1, keepdim=True)
        joint = attention if joint is None else attention @ joint
    return joint


def rollout_map(config: ViTConfig, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Where the classifier looks: rollout from the pooled output to each patch, (B, gh, gw).

    Token-pooled models read the class-token row; GAP models the mean of the patch rows. Maps
    are scaled to a maximum of 1 per image for display.
    """
    joint = rollout(maps)
    prefix = config.num_prefix_tokens
    source = joint[:, 0] if config.pooling == "token" else joint[:, prefix:].mean(dim=1)
    relevance = source[:, prefix:]
    relevance = relevance / relevance.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return relevance.reshape(-1, *config.grid_size)


def attention_rollout_map(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """`rollout_map` of `images` through `model`."""
    return rollout_map(model.config, attention_maps(model, images))


def _patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Euclidean distance in pixels between every pair of patch centres: (N, N)."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float32),
        torch.arange(grid[1], dtype=torch.float32),
        indexing="ij",
    )
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1) * patch_size
    return torch.cdist(centres, centres)


def attention_distance(config: ViTConfig, maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean attention distance in pixels per layer and head (Fig. 7 right): (depth, heads).

    The "receptive field size" of each head: the attention-weighted distance from a query patch
    to the patches it attends to, averaged over query patches and images. Attention to the class
    token has no position, so each query's patch weights are renormalised to sum to one.
    """
    distances = _patch_distances(config.grid_size, config.patch_size).to(maps[0].device)
    per_layer = []
    for layer in maps:
        weights = _patch_to_patch(config.num_prefix_tokens, layer.float())
        per_query = (weights * distances).sum(dim=-1)  # (B, heads, N)
        per_layer.append(per_query.mean(dim=(0, 2)))
    return torch.stack(per_layer)


def mean_attention_distance(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """`attention_distance` of `images` through `model`."""
    return attention_distance(model.config, attention_maps(model, images))


@torch.no_grad()
def position_similarity(model: VisionTransformer) -> torch.Tensor:
    """Cosine similarity of each patch's position embedding with every other (Fig. 7 centre).

    Returns (gh, gw, gh, gw): entry [r, c] is the similarity map of the patch at row r, column c.
    """
    config = model.config
    table = model.pos_embed[0, config.num_prefix_tokens :].float()
    table = torch.nn.functional.normalize(table, dim=-1)
    return (table @ table.T).reshape(*config.grid_size, *config.grid_size)


@torch.no_grad()
def embedding_filter_components(model: VisionTransformer, count: int = 28) -> torch.Tensor:
    """Principal components of the patch-embedding filters (Fig. 7 left): (count, C, P, P).

    Every output channel of the patch projection is a filter over a P x P x C patch; the leading
    right-singular vectors of the centred filter matrix are the directions the embedding is most
    sensitive to, which the paper shows resemble plausible basis functions.
    """
    weight = model.patch_embed.proj.weight.float()  # (D, C, P, P)
    flat = weight.flatten(1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    count = min(count, vh.shape[0])
    return vh[:count].reshape(count, *weight.shape[1:])
