"""Configuration: names, validation, serialisation, and the library's import boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vit import VARIANTS, Preprocessing, ViTConfig


def test_named_variants_cover_every_size_and_patch() -> None:
    assert len(VARIANTS) == 20 and "B/16" in VARIANTS and "H/14" in VARIANTS
    config = ViTConfig.from_name("L/32", num_classes=10, image_size=(384, 256))
    assert (config.depth, config.width, config.mlp_dim, config.num_heads) == (24, 1024, 4096, 16)
    assert config.grid_size == (12, 8) and config.patch_dim == 3072


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(image_size=225), "not divisible by patch size"),
        (dict(num_heads=5), "not divisible by 5 heads"),
        (dict(pooling="max"), "pooling"),
        (dict(pos_embed="rope"), "pos_embed"),
        (dict(pos_embed_interpolation="bicubc"), "pos_embed_interpolation must be one of"),
        (dict(preprocessing=Preprocessing(interpolation="nearest")), "interpolation must be"),
        (dict(representation_size=0), "representation_size must be positive"),
        (dict(num_classes=-1), "num_classes must be 0"),
        (dict(num_heads=0), "num_heads must be positive"),
        (dict(patch_size=0), "patch_size must be positive"),
        (dict(image_size=(224, 0)), "image_size must be positive"),
        (dict(drop_path=1.5), "drop_path is a probability"),
        (dict(attention_dropout=-0.1), "attention_dropout is a probability"),
    ],
)
def test_invalid_configs_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ViTConfig.from_name("Ti/16", **kwargs)


def test_unknown_variant_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: Ti/8"):
        ViTConfig.from_name("X/16")


@pytest.mark.parametrize("name", ["B/0", "B/-16"])
def test_a_patch_size_below_one_is_rejected_not_divided_by(name: str) -> None:
    with pytest.raises(ValueError, match="patch_size must be positive"):
        ViTConfig.from_name(name)


def test_dict_round_trip() -> None:
    config = ViTConfig.from_name("S/16", num_classes=7, image_size=(96, 64), pooling="gap")
    assert ViTConfig.from_dict(config.to_dict()) == config


def test_the_library_imports_without_ray_or_mlflow() -> None:
    code = (
        "import sys, vit, vit.analysis, vit.checkpoint, vit.convert, vit.evaluate, vit.export,"
        " vit.patches, vit.posemb;"
        "bad = [m for m in ('ray', 'mlflow', 'pipelines') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
