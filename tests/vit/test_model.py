"""The model: exact sizes, input forms, attention paths, resolution changes, mixed precision."""

from __future__ import annotations

import pytest
import torch

from vit import VARIANTS, Preprocessing, VisionTransformer, ViTConfig
from vit.patches import patchify

# Parameter counts with 1000 classes at 224 px (../shared/ANCHORS.md, from the reference code).
ANCHORED_COUNTS = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "S/32": 22_878_952,
    "B/16": 86_567_656,
    "B/32": 88_224_232,
    "B/8": 86_576_872,
    "L/16": 304_326_632,
    "L/32": 306_535_400,
    "H/14": 632_045_800,
}


def expected_count(config: ViTConfig) -> int:
    """Independent closed form for a token-pooled, learned-position ViT."""
    d, m, c, p, k = config.width, config.mlp_dim, config.in_channels, config.patch_size, 1000
    block = (3 * d * d + 3 * d) + (d * d + d) + (2 * d * m + m + d) + 4 * d
    return (
        p * p * c * d
        + d  # patch embedding
        + d  # class token
        + (1 + config.num_patches) * d  # position embedding
        + config.depth * block
        + 2 * d  # final LayerNorm
        + d * k
        + k  # head
    )


def count_params(config: ViTConfig) -> int:
    with torch.device("meta"):
        model = VisionTransformer(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_has_its_exact_parameter_count(name: str) -> None:
    image_size = 224 if 224 % int(name.split("/")[1]) == 0 else 210
    config = ViTConfig.from_name(name, num_classes=1000, image_size=image_size)
    assert count_params(config) == expected_count(config)


@pytest.mark.parametrize(("name", "count"), ANCHORED_COUNTS.items())
def test_parameter_counts_match_the_paper_table(name: str, count: int) -> None:
    assert count_params(ViTConfig.from_name(name, num_classes=1000, image_size=224)) == count


def tiny(**overrides: object) -> ViTConfig:
    fields = dict(image_size=32, patch_size=8, width=64, depth=2, mlp_dim=128, num_heads=4)
    fields.update(overrides)
    return ViTConfig(**fields)


@pytest.mark.parametrize("pooling", ["token", "gap"])
@pytest.mark.parametrize("pos_embed", ["learned", "sincos2d"])
def test_patch_tokens_give_the_same_output_as_images(pooling: str, pos_embed: str) -> None:
    torch.manual_seed(0)
    model = VisionTransformer(tiny(num_classes=5, pooling=pooling, pos_embed=pos_embed)).eval()
    torch.nn.init.normal_(model.head.weight)  # a zero head would hide any difference
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        from_images = model(images)
        from_tokens = model(patchify(images, 8))
        hwc_tokens = patchify(images.permute(0, 2, 3, 1).numpy(), 8, channels_last=True)
        from_hwc_tokens = model(torch.from_numpy(hwc_tokens))
        float_images = (images.float() / 255 - 0.5) / 0.5
        from_float = model(patchify(float_images, 8))
    torch.testing.assert_close(from_tokens, from_images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_hwc_tokens, from_tokens, rtol=0, atol=0)
    torch.testing.assert_close(from_float, from_images, rtol=1e-5, atol=1e-5)


def test_uint8_input_is_normalised_with_the_config_statistics() -> None:
    from vit.config import Preprocessing

    pre = Preprocessing(mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3))
    model = VisionTransformer(tiny(num_classes=3, preprocessing=pre)).eval()
    torch.nn.init.normal_(model.head.weight)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(
            model(patchify(images, 8)), model((images / 255 - mean) / std), rtol=1e-5, atol=1e-5
        )


def test_wrong_input_shapes_are_named_in_the_error() -> None:
    model = VisionTransformer(tiny())
    with pytest.raises(ValueError, match="expected images of shape"):
        model(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expected tokens of shape"):
        model(torch.zeros(1, 15, 192))


@pytest.mark.parametrize("pooling", ["token", "gap"])
def test_forward_equals_head_of_features(pooling: str) -> None:
    """forward() skips the last block's patch outputs for token pooling; results must not move."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny(num_classes=4, pooling=pooling)).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_head(model.forward_features(x))
        torch.testing.assert_close(model(x), full, rtol=1e-5, atol=1e-5)


def test_fused_and_eager_attention_agree_and_maps_are_distributions() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(tiny(num_classes=4, depth=3)).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        eager, maps = model.forward_with_attention(x)
        partial, some = model.forward_with_attention(x, layers=[1])
    torch.testing.assert_close(eager, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(partial, fused, rtol=1e-5, atol=1e-5)
    assert sorted(maps) == [0, 1, 2] and sorted(some) == [1]
    assert maps[0].shape == (2, 4, 17, 17)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(2, 4, 17))
    torch.testing.assert_close(some[1], maps[1])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_with_attention(x, layers=[3])


def test_reset_classifier_zero_initialises_a_new_head_and_drops_pre_logits() -> None:
    model = VisionTransformer(tiny(num_classes=10, representation_size=32))
    assert model.head.in_features == 32
    model.reset_classifier(3)
    assert model.config.num_classes == 3 and model.config.representation_size is None
    assert isinstance(model.pre_logits, torch.nn.Identity)
    assert model.head.in_features == 64
    assert torch.count_nonzero(model(torch.randn(2, 3, 32, 32))) == 0


def test_pre_logits_output_is_tanh_bounded() -> None:
    model = VisionTransformer(tiny(num_classes=10, representation_size=32))
    features = model.forward_head(model.forward_features(torch.randn(2, 3, 32, 32)), True)
    assert features.shape == (2, 32) and features.abs().max() <= 1


def test_no_weight_decay_covers_embeddings_norms_and_biases_only() -> None:
    model = VisionTransformer(tiny())
    exempt = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= exempt
    assert "blocks.0.attn.qkv.weight" not in exempt
    assert "patch_embed.proj.weight" not in exempt


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(tiny(num_classes=4))
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(2, 3, 32, 32)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_resize_pos_embed_changes_resolution_and_keeps_the_class_token_row() -> None:
    model = VisionTransformer(tiny(num_classes=2))
    before = model.pos_embed.detach().clone()
    model.resize_pos_embed(48)
    assert model.config.image_size == (48, 48)
    assert model.pos_embed.shape == (1, 1 + 36, 64)
    torch.testing.assert_close(model.pos_embed[:, :1], before[:, :1])
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 2)
    sincos = VisionTransformer(tiny(pos_embed="sincos2d", pooling="gap"))
    sincos.resize_pos_embed((40, 24))
    assert sincos.pos_embed.shape == (1, 15, 64)
    assert sincos(torch.randn(1, 3, 40, 24)).shape == (1, 1000)


def test_resize_pos_embed_keeps_a_frozen_table_frozen() -> None:
    model = VisionTransformer(tiny())
    model.pos_embed.requires_grad_(False)
    model.resize_pos_embed(64)
    assert not model.pos_embed.requires_grad
    trainable = VisionTransformer(tiny())
    trainable.resize_pos_embed(64)
    assert trainable.pos_embed.requires_grad


def test_resize_pos_embed_scales_the_evaluation_resize_with_the_crop() -> None:
    """A 90% centre crop at 32 px stays a 90% crop at 64 px: the resize must not stay at 36."""
    model = VisionTransformer(tiny(preprocessing=Preprocessing(resize_size=36)))
    model.resize_pos_embed(64)
    assert model.config.preprocessing.resize_size == 72
    model.resize_pos_embed((64, 96))  # the shorter side sets the scale, as the resize does
    assert model.config.preprocessing.resize_size == 72
    plain = VisionTransformer(tiny())
    plain.resize_pos_embed(64)
    assert plain.config.preprocessing.resize_size is None  # straight resize: nothing to scale


def test_bf16_autocast_training_stays_finite_for_200_steps() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(tiny(num_classes=4, image_size=16, patch_size=4, depth=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    labels = torch.randint(0, 4, (16,))
    for _ in range(200):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(patchify(images, 4)), labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        assert torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits, maps = model.forward_with_attention(patchify(images, 4))
    assert maps[0].dtype == torch.float32 and torch.isfinite(logits).all()
    assert loss.item() < 1.0  # it memorised the 16 samples: the steps did real work


def test_qkv_projections_get_the_original_per_projection_xavier_init() -> None:
    """The reference initialises q, k and v as separate (D, D) kernels: each has variance 1/D."""
    torch.manual_seed(0)
    model = VisionTransformer(tiny(width=256, depth=1, mlp_dim=256))
    for projection in model.blocks[0].attn.qkv.weight.detach().chunk(3):
        assert abs(projection.std().item() - 256**-0.5) < 0.03 * 256**-0.5
    torch.testing.assert_close(model.blocks[0].attn.qkv.bias, torch.zeros(3 * 256))


def test_a_bf16_model_keeps_its_dtype_through_head_and_resolution_changes() -> None:
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    for pos_embed in ("learned", "sincos2d"):
        model = VisionTransformer(tiny(num_classes=3, pos_embed=pos_embed)).bfloat16().eval()
        model.reset_classifier(5)
        model.resize_pos_embed(48)
        assert model.head.weight.dtype == model.pos_embed.dtype == torch.bfloat16
        with torch.no_grad():
            assert model(images).dtype == torch.bfloat16


def test_full_stochastic_depth_drops_the_branch_without_nans() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(tiny(num_classes=3, depth=2, drop_path=1.0)).train()
    torch.nn.init.normal_(model.head.weight)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert torch.isfinite(logits).all()
    last = model.blocks[-1]  # rates rise linearly over depth to drop_path: 1.0 here
    with torch.no_grad():  # its residual branches are dropped: their weights cannot matter
        for parameter in [*last.attn.parameters(), *last.mlp.parameters()]:
            parameter.add_(1.0)
    assert torch.equal(model(images), logits)
