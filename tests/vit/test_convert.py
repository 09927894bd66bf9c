"""Converters: our outputs equal the source codebase's on the same inputs, both directions.

Every reference model is built from random weights (nothing downloaded); every parameter is
redrawn, so a tensor left out or misplaced by a converter changes the outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn.functional as F
import torchvision.models.vision_transformer as tv_vit
import transformers
from conftest import DAMAGES, damaged
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from vit import VisionTransformer, ViTConfig
from vit.convert import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConversionError,
    from_hf,
    from_npz,
    from_timm,
    from_torchvision,
    to_hf,
    to_npz,
    to_timm,
    to_torchvision,
)

WIDTH, DEPTH, HEADS, MLP, IMAGE, PATCH, CLASSES = 32, 2, 2, 64, 32, 8, 5


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(std=0.2)
    return module.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def ours(**overrides: object) -> VisionTransformer:
    fields = dict(
        image_size=IMAGE,
        patch_size=PATCH,
        width=WIDTH,
        depth=DEPTH,
        mlp_dim=MLP,
        num_heads=HEADS,
        num_classes=CLASSES,
    )
    fields.update(overrides)
    return randomized(VisionTransformer(ViTConfig(**fields)))  # type: ignore[arg-type]


def timm_model(**overrides: object) -> timm_vit.VisionTransformer:
    fields = dict(
        img_size=IMAGE,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / WIDTH,
        num_classes=CLASSES,
    )
    fields.update(overrides)
    return timm_vit.VisionTransformer(**fields)  # type: ignore[arg-type]


def hf_config(**overrides: object) -> transformers.ViTConfig:
    fields = dict(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        image_size=IMAGE,
        patch_size=PATCH,
        num_labels=CLASSES,
    )
    fields.update(overrides)
    return transformers.ViTConfig(**fields)


@torch.no_grad()
def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = module.eval()(x)
    return out.logits if hasattr(out, "logits") else out


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def timm_resampled(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """timm's resampling of a table with a class-token row, as `vit.posemb` documents ours to be.

    timm's own loaders antialias (another bicubic kernel, other values): ours does not.
    """
    return resample_abs_pos_embed(
        pos_embed.detach(), list(new_grid), list(old_grid), num_prefix_tokens=1, antialias=False
    )


# --------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"class_token": False, "global_pool": "avg", "fc_norm": False},
        {"no_embed_class": True},
    ],
    ids=["token", "gap", "no-embed-class"],
)
def test_timm_round_trip(options: dict[str, object], images: torch.Tensor) -> None:
    theirs = randomized(timm_model(**options))
    # The arguments the state dict does not record are timm's own, passed through unchanged.
    unrecorded = {k: v for k, v in options.items() if k in ("global_pool", "no_embed_class")}
    model = from_timm(theirs.state_dict(), num_heads=HEADS, **unrecorded)  # type: ignore[arg-type]
    assert model.config.pooling == ("gap" if "class_token" in options else "token")
    assert_close(run(model, images), run(theirs, images))
    back = timm_model(**{k: v for k, v in options.items() if k != "no_embed_class"})
    back.load_state_dict(to_timm(model), strict=True)
    assert_close(run(back, images), run(theirs, images))


def test_timm_pool_then_normalise_is_refused() -> None:
    state = timm_model(class_token=False, global_pool="avg").state_dict()
    with pytest.raises(ConversionError, match="fc_norm"):
        from_timm(state, num_heads=HEADS)


def test_timm_pooling_the_weights_do_not_record_is_an_argument() -> None:
    """A class token with mean pooling has the same state dict as class-token pooling."""
    cls_avg = randomized(timm_model(global_pool="avg", fc_norm=False)).state_dict()
    assert cls_avg.keys() == timm_model().state_dict().keys()
    with pytest.raises(ConversionError, match="'avg' with a class token"):
        from_timm(cls_avg, num_heads=HEADS, global_pool="avg")
    gap = timm_model(class_token=False, global_pool="avg", fc_norm=False).state_dict()
    with pytest.raises(ConversionError, match="no class token"):
        from_timm(gap, num_heads=HEADS, global_pool="token")
    with pytest.raises(ConversionError, match="'max' is not supported"):
        from_timm(gap, num_heads=HEADS, global_pool="max")


def test_a_timm_table_without_the_class_row_needs_no_embed_class() -> None:
    """16 rows are not 1 + 15 patch positions: the error names the argument rather than guess."""
    state = timm_model(no_embed_class=True).state_dict()
    with pytest.raises(ConversionError, match="no_embed_class"):
        from_timm(state, num_heads=HEADS)
    with pytest.raises(ConversionError, match="no_embed_class"):  # nor with the true size
        from_timm(state, num_heads=HEADS, image_size=IMAGE)


def test_unknown_and_missing_keys_are_named() -> None:
    state = timm_model().state_dict()
    state["blocks.0.ls1.gamma"] = torch.ones(WIDTH)
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError) as error:
        from_timm(state, num_heads=HEADS)
    assert "blocks.0.ls1.gamma" in str(error.value) and "blocks.1.mlp.fc2.bias" in str(error.value)


def test_a_half_present_optional_part_is_missing_not_skipped() -> None:
    state = timm_model().state_dict()
    del state["head.bias"]
    with pytest.raises(ConversionError, match=r"missing keys \['head.bias'\]"):
        from_timm(state, num_heads=HEADS)


def test_the_head_count_of_a_paper_variant_is_inferred() -> None:
    source = VisionTransformer(ViTConfig.from_name("Ti/16", image_size=32, num_classes=2))
    assert from_timm(to_timm(source)).config.num_heads == 3
    with pytest.raises(ConversionError, match="pass num_heads"):
        from_timm(timm_model().state_dict())


# -------------------------------------------------------------------------------- torchvision
def tv_model(**overrides: object) -> tv_vit.VisionTransformer:
    fields = dict(
        image_size=IMAGE,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=WIDTH,
        mlp_dim=MLP,
        num_classes=CLASSES,
        representation_size=16,
    )
    fields.update(overrides)
    return tv_vit.VisionTransformer(**fields)  # type: ignore[arg-type]


def test_torchvision_round_trip_with_pre_logits(images: torch.Tensor) -> None:
    theirs = randomized(tv_model())
    model = from_torchvision(theirs.state_dict(), num_heads=HEADS)
    assert model.config.representation_size == 16
    assert_close(run(model, images), run(theirs, images))
    back = tv_model()
    back.load_state_dict(to_torchvision(model), strict=True)
    assert_close(run(back, images), run(theirs, images))


def test_torchvision_published_mlp_names_are_read(images: torch.Tensor) -> None:
    """torchvision's weight files name the MLP layers `mlp.linear_1/2` (renamed on load)."""
    theirs = randomized(tv_model())
    legacy = {
        k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
        for k, v in theirs.state_dict().items()
    }
    assert any(".mlp.linear_2.bias" in k for k in legacy)
    tv_model().load_state_dict(legacy, strict=True)  # torchvision takes them as they are
    assert_close(run(from_torchvision(legacy, num_heads=HEADS), images), run(theirs, images))
    both = {**legacy, **theirs.state_dict()}  # old and new names of one layer: which one?
    with pytest.raises(ConversionError, match=r"mlp\.linear_1"):
        from_torchvision(both, num_heads=HEADS)


def test_preprocessing_travels_with_the_weights() -> None:
    theirs = randomized(tv_model())
    model = from_torchvision(theirs.state_dict(), num_heads=HEADS)
    preprocessing = model.config.preprocessing
    assert preprocessing.mean == IMAGENET_MEAN and preprocessing.std == IMAGENET_STD
    assert preprocessing.resize_size == 36  # 32 / 0.875, as 224 / 0.875 = 256
    pixels = torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert_close(run(model, pixels), run(theirs, (pixels / 255 - mean) / std))
    assert from_hf(to_hf(ours(num_classes=0)), num_heads=HEADS).config.preprocessing.mean == (0.5,)


def test_torchvision_cannot_hold_a_gap_model() -> None:
    with pytest.raises(ConversionError, match="cls_token"):
        to_torchvision(ours(pooling="gap"))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("representation_size", [None, 16])
def test_torchvision_has_no_model_without_a_classifier(
    representation_size: int | None, images: torch.Tensor
) -> None:
    """torchvision's ViT always ends in `heads.head`, so its strict load refuses a state dict
    without one; built with num_classes=0 it outputs empty logits, not our features."""
    headless = tv_model(num_classes=0, representation_size=representation_size)
    assert "heads.head.weight" in headless.state_dict()
    assert run(headless, images).shape == (3, 0)
    with pytest.raises(ConversionError, match=r"heads\.head.*reset_classifier"):
        to_torchvision(ours(num_classes=0, representation_size=representation_size))


# ---------------------------------------------------------------------------- Hugging Face
def test_hf_classifier_round_trip_in_memory_and_through_files(
    images: torch.Tensor, tmp_path: Path
) -> None:
    theirs = randomized(transformers.ViTForImageClassification(hf_config()))
    model = from_hf(theirs.state_dict(), num_heads=HEADS)
    assert model.config.layer_norm_eps == 1e-12
    assert_close(run(model, images), run(theirs, images))

    back = transformers.ViTForImageClassification(hf_config())
    back.load_state_dict(to_hf(model, hub_names=False), strict=True)
    assert_close(run(back, images), run(theirs, images))

    hf_config().save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in to_hf(model).items()}, tmp_path / "model.safetensors")
    loaded = transformers.ViTForImageClassification.from_pretrained(tmp_path)
    assert_close(run(loaded, images), run(theirs, images))
    assert_close(
        run(from_hf(tmp_path / "model.safetensors", num_heads=HEADS), images), run(theirs, images)
    )


def test_hf_pooler_becomes_the_pre_logits_layer(images: torch.Tensor) -> None:
    theirs = randomized(transformers.ViTModel(hf_config()))
    model = from_hf(theirs.state_dict(), num_heads=HEADS)
    assert (model.config.num_classes, model.config.representation_size) == (0, WIDTH)
    with torch.no_grad():
        expected = theirs(images)
        assert_close(model.forward_features(images), expected.last_hidden_state)
        assert_close(model(images), expected.pooler_output)
    back = transformers.ViTModel(hf_config())
    back.load_state_dict(to_hf(model, hub_names=False), strict=True)
    with torch.no_grad():
        assert_close(back(images).pooler_output, expected.pooler_output)


def test_hf_model_without_head_or_pre_logits_has_no_pooler(images: torch.Tensor) -> None:
    """As `to_hf` says: such a `ViTModel` state dict loads with `add_pooling_layer=False` only."""
    model = ours(num_classes=0, representation_size=None)
    state = to_hf(model, hub_names=False)
    with pytest.raises(RuntimeError, match="pooler"):
        transformers.ViTModel(hf_config()).load_state_dict(state, strict=True)
    back = transformers.ViTModel(hf_config(layer_norm_eps=1e-6), add_pooling_layer=False)
    back.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert_close(back(images).last_hidden_state[:, 0], model(images))


def test_hf_has_no_class_for_pre_logits_and_a_head() -> None:
    with pytest.raises(ConversionError, match="pre-logits"):
        to_hf(ours(representation_size=16))


# ---------------------------------------------------------------------------- Google .npz
@pytest.mark.parametrize(
    ("layout", "pooling", "timm_options"),
    [
        ("vit_jax", "token", {}),
        ("vit_jax", "gap", {"class_token": False, "global_pool": "avg", "fc_norm": False}),
        ("big_vision", "token", {"no_embed_class": True}),
        ("big_vision_scan", "gap", {"class_token": False, "global_pool": "avg", "fc_norm": False}),
    ],
)
def test_npz_round_trip_checked_by_timm_reader(
    layout: str, pooling: str, timm_options: dict[str, object], images: torch.Tensor, tmp_path: Path
) -> None:
    """timm's own `.npz` reader is the independent check that the archive has Google's layout."""
    model = ours(pooling=pooling, representation_size=None)
    path = tmp_path / "vit.npz"
    to_npz(model, path, layout=layout)  # type: ignore[arg-type]
    keys = set(np.load(path).files)
    assert ("Transformer/encoderblock/LayerNorm_0/scale" in keys) == (layout == "big_vision_scan")
    assert ("pos_embedding" in keys) == layout.startswith("big_vision")
    reference = timm_model(**timm_options)
    with torch.no_grad():
        reference.load_pretrained(str(path))
    assert_close(run(reference, images), run(model, images))
    converted = from_npz(path)  # head count read from the per-head kernels
    assert converted.config.num_heads == HEADS and converted.config.pooling == pooling
    assert_close(run(converted, images), run(model, images))


def test_npz_head_count_must_match_the_kernels(tmp_path: Path) -> None:
    path = tmp_path / "vit.npz"
    to_npz(ours(), path)
    assert from_npz(path, num_heads=HEADS).config.num_heads == HEADS
    with pytest.raises(ConversionError, match=f"hold {HEADS} heads"):
        from_npz(path, num_heads=2 * HEADS)


def test_npz_pre_logits_and_sincos_positions(images: torch.Tensor, tmp_path: Path) -> None:
    model = ours(pos_embed="sincos2d", representation_size=16)
    path = tmp_path / "vit.npz"
    to_npz(model, path, layout="big_vision")
    arrays = dict(np.load(path))
    assert arrays["pre_logits/kernel"].shape == (WIDTH, 16)
    del arrays["pos_embedding"]  # how big_vision stores a fixed sin-cos embedding: not at all
    with pytest.raises(ConversionError, match="image_size"):
        from_npz(arrays)
    converted = from_npz(arrays, image_size=IMAGE)
    assert converted.config.pos_embed == "sincos2d"
    assert_close(run(converted, images), run(model, images))


def test_npz_under_a_prefix_ignores_other_trees_and_refuses_map_heads(tmp_path: Path) -> None:
    path = tmp_path / "vit.npz"
    to_npz(ours(pooling="gap"), path, layout="big_vision")
    arrays = {f"params/img/{k}": v for k, v in np.load(path).items()}
    arrays["params/txt/Embed_0/embedding"] = np.zeros((4, 4), np.float32)
    assert from_npz(arrays).config.pooling == "gap"
    arrays["params/img/MAPHead_0/probe"] = np.zeros((1, 1, WIDTH), np.float32)
    with pytest.raises(ConversionError, match="MAP"):
        from_npz(arrays)


# --------------------------------------------------------------------- adapting the weights
def test_a_new_image_size_resamples_the_position_embedding() -> None:
    source = ours()
    model = from_timm(to_timm(source), num_heads=HEADS, image_size=64)
    assert model.config.image_size == (64, 64)
    assert_close(model.pos_embed.detach(), timm_resampled(source.pos_embed, (4, 4), (8, 8)))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, CLASSES)


NON_SQUARE = (32, 48)  # a 4x6 grid: 1 + 24 rows, as many as a 5x5 grid's 25


@pytest.fixture
def images_4x6() -> torch.Tensor:
    return torch.randn(3, 3, *NON_SQUARE, generator=torch.Generator().manual_seed(2))


def test_non_square_timm_and_hf_models_import_at_their_size(images_4x6: torch.Tensor) -> None:
    theirs = randomized(timm_model(img_size=NON_SQUARE))
    hf = randomized(transformers.ViTForImageClassification(hf_config(image_size=NON_SQUARE)))
    for convert, state in [(from_timm, theirs.state_dict()), (from_hf, hf.state_dict())]:
        with pytest.raises(ConversionError, match="24 patch positions, which is no square grid"):
            convert(state, num_heads=HEADS)
    for size in [{"image_size": NON_SQUARE}, {"grid_size": (4, 6)}]:
        model = from_timm(theirs.state_dict(), num_heads=HEADS, **size)  # type: ignore[arg-type]
        assert model.config.image_size == NON_SQUARE
        assert model.config.preprocessing.resize_size == 35  # timm's 90% of the shorter side
        assert_close(run(model, images_4x6), run(theirs, images_4x6))
        model = from_hf(hf.state_dict(), num_heads=HEADS, **size)  # type: ignore[arg-type]
        assert_close(run(model, images_4x6), run(hf, images_4x6))


@pytest.mark.parametrize("layout", ["timm", "torchvision", "hf", "vit_jax", "big_vision"])
def test_non_square_models_round_trip_through_every_layout(
    layout: str, images_4x6: torch.Tensor, tmp_path: Path
) -> None:
    """The class-token row is each layout's convention (big_vision has none), not guessed."""
    source = ours(image_size=NON_SQUARE, representation_size=None)
    if layout.startswith(("vit_jax", "big_vision")):
        to_npz(source, tmp_path / "vit.npz", layout=layout)  # type: ignore[arg-type]
        state, convert = np.load(tmp_path / "vit.npz"), from_npz
    else:
        writer, convert = {
            "timm": (to_timm, from_timm),
            "torchvision": (to_torchvision, from_torchvision),
            "hf": (to_hf, from_hf),
        }[layout]
        state = writer(source)
    options = {"num_heads": HEADS, "layer_norm_eps": source.config.layer_norm_eps}
    with pytest.raises(ConversionError, match="no square grid"):
        convert(state, **options)
    with pytest.raises(ConversionError, match="not the 5x5 of grid_size"):
        convert(state, **options, grid_size=5)
    model = convert(state, **options, image_size=NON_SQUARE)
    assert model.config.grid_size == (4, 6)
    assert_close(run(model, images_4x6), run(source, images_4x6))
    larger = convert(state, **options, grid_size=(4, 6), image_size=(64, 96))
    expected = timm_resampled(source.pos_embed, (4, 6), (8, 12))
    # The patch rows; big_vision's class token took its position row into itself (to_npz).
    torch.testing.assert_close(larger.pos_embed.detach()[:, 1:], expected[:, 1:])


def test_a_square_table_resamples_to_a_non_square_size() -> None:
    source = ours()
    model = from_timm(to_timm(source), num_heads=HEADS, image_size=(32, 64))
    assert model.config.grid_size == (4, 8)
    assert_close(model.pos_embed.detach(), timm_resampled(source.pos_embed, (4, 4), (4, 8)))


def test_a_new_patch_size_keeps_tokens_of_resized_patches(images: torch.Tensor) -> None:
    """Upsampled patches through the resampled kernel give the same tokens, hence logits."""
    source = ours()
    model = from_timm(to_timm(source), num_heads=HEADS, patch_size=16, image_size=64)
    assert model.config.grid_size == (4, 4)
    patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # B, C, 4, 4, 8, 8
    b, c, gh, gw = patches.shape[:4]
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, PATCH, PATCH)
    big = F.interpolate(flat, size=(16, 16), mode="bicubic", antialias=True)
    upsampled = big.reshape(b, gh, gw, c, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 64, 64)
    torch.testing.assert_close(run(model, upsampled), run(source, images), atol=1e-4, rtol=1e-4)


def test_another_class_count_gets_a_zero_head_and_loses_pre_logits(images: torch.Tensor) -> None:
    state = randomized(tv_model()).state_dict()
    same = from_torchvision(state, num_heads=HEADS, num_classes=CLASSES)
    assert torch.equal(same.head.weight, state["heads.head.weight"])
    model = from_torchvision(state, num_heads=HEADS, num_classes=7)
    assert model.config.num_classes == 7 and model.config.representation_size is None
    assert not model.head.weight.any() and not model.head.bias.any()
    kept = from_torchvision(state, num_heads=HEADS, num_classes=7, keep_pre_logits=True)
    assert kept.config.representation_size == 16
    features = from_torchvision(state, num_heads=HEADS, num_classes=0)
    assert run(features, images).shape == (3, WIDTH)


# ------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_npz_or_safetensors_file_is_a_conversion_error(
    damage: str, tmp_path: Path
) -> None:
    """A cut-off download or a web page saved in its place: never advice to unpickle it."""
    model = ours()
    npz, safetensors = tmp_path / "vit.npz", tmp_path / "model.safetensors"
    to_npz(model, npz)
    save_file({k: v.contiguous() for k, v in to_hf(model).items()}, safetensors)
    for path, reader in ((npz, from_npz), (safetensors, from_hf)):
        path.write_bytes(damaged(path.read_bytes(), damage))
        with pytest.raises(ConversionError, match="corrupt, truncated or another format") as error:
            reader(path, num_heads=HEADS)
        assert "pickle" not in str(error.value)
