"""The Fig. 6/7 analyses against hand-computed values on small models."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from vit import VisionTransformer, ViTConfig
from vit.analysis import (
    attention_maps,
    attention_rollout_map,
    embedding_filter_components,
    mean_attention_distance,
    position_similarity,
    rollout,
)

SMALL = ViTConfig(
    image_size=32, patch_size=8, width=32, depth=3, mlp_dim=64, num_heads=4, num_classes=5
)


@pytest.fixture
def model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(SMALL).eval()


def test_rollout_of_one_layer_is_the_residual_mix_of_head_means():
    weights = torch.rand(2, 4, 5, 5).softmax(dim=-1)
    expected = 0.5 * torch.eye(5) + 0.5 * weights.mean(dim=1)
    torch.testing.assert_close(rollout([weights]), expected)


def test_rollout_multiplies_layers_from_the_input_upwards():
    first, second = (torch.rand(1, 2, 4, 4).softmax(dim=-1) for _ in range(2))
    mix = [0.5 * torch.eye(4) + 0.5 * w.mean(dim=1) for w in (first, second)]
    torch.testing.assert_close(rollout([first, second]), mix[1] @ mix[0])
    assert not torch.allclose(rollout([first, second]), mix[0] @ mix[1])


def test_rollout_map_reads_the_class_token_row(model):
    images = torch.rand(2, 3, 32, 32)
    _, maps = model.forward_with_attention(images)
    joint = rollout([maps[i] for i in range(SMALL.depth)])
    row = joint[:, 0, 1:]
    expected = (row / row.amax(dim=1, keepdim=True)).reshape(2, 4, 4)
    result = attention_rollout_map(model, images)
    assert result.shape == (2, 4, 4)
    torch.testing.assert_close(result, expected)
    assert torch.allclose(result.amax(dim=(1, 2)), torch.ones(2))


def test_rollout_map_of_a_gap_model_averages_patch_rows():
    torch.manual_seed(1)
    gap = VisionTransformer(SMALL.replace(pooling="gap")).eval()
    images = torch.rand(1, 3, 32, 32)
    result = attention_rollout_map(gap, images)
    joint = rollout(attention_maps(gap, images))
    prefix = gap.config.num_prefix_tokens
    expected = joint[:, prefix:, prefix:].mean(dim=1)  # the patch rows' mean, over the patches
    expected = expected / expected.amax(dim=1, keepdim=True)
    torch.testing.assert_close(result, expected.reshape(1, 4, 4))


def test_uniform_attention_has_the_mean_pairwise_distance(model):
    for block in model.blocks:  # q = k = 0: every query attends uniformly
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    centres = torch.tensor([(r * 8.0, c * 8.0) for r in range(4) for c in range(4)])
    expected = torch.cdist(centres, centres).mean()
    distances = mean_attention_distance(model, torch.rand(3, 3, 32, 32))
    assert distances.shape == (SMALL.depth, SMALL.num_heads)
    torch.testing.assert_close(distances, expected.expand(SMALL.depth, SMALL.num_heads))


def test_position_similarity_of_sincos_embedding_decays_with_distance():
    model = VisionTransformer(SMALL.replace(pos_embed="sincos2d"))
    similarity = position_similarity(model)
    assert similarity.shape == (4, 4, 4, 4)
    torch.testing.assert_close(similarity[1, 2, 1, 2], torch.tensor(1.0))
    torch.testing.assert_close(similarity, similarity.permute(2, 3, 0, 1))
    assert similarity[0, 0, 0, 1] > similarity[0, 0, 0, 3]
    assert similarity[0, 0, 1, 0] > similarity[0, 0, 3, 0]


def test_filter_components_match_scikit_learn_pca(model):
    components = embedding_filter_components(model, count=6)
    assert components.shape == (6, 3, 8, 8)
    flat = components.flatten(1).numpy()
    weights = model.patch_embed.proj.weight.detach().flatten(1).numpy()
    reference = PCA(n_components=6, svd_solver="full").fit(weights).components_
    # Components are defined up to sign.
    np.testing.assert_allclose(np.abs(np.sum(flat * reference, axis=1)), 1.0, atol=1e-4)
    assert embedding_filter_components(model, count=1000).shape[0] == SMALL.width
