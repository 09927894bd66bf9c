"""Checkpoint directories: round trips, and every corruption named in the error."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from vit import VisionTransformer, ViTConfig
from vit.checkpoint import CheckpointError, load, save
from vit.config import Preprocessing


def make_model() -> VisionTransformer:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        width=64,
        depth=2,
        mlp_dim=128,
        num_heads=4,
        num_classes=3,
        pooling="gap",
        pos_embed="sincos2d",
        representation_size=16,
        preprocessing=Preprocessing(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), resize_size=36),
    )
    model = VisionTransformer(config).eval()
    torch.nn.init.normal_(model.head.weight)
    return model


def test_round_trip_restores_outputs_config_and_metadata(tmp_path: Path) -> None:
    model = make_model()
    provenance = {"mlflow_run_id": "abc", "dataset": "digits"}
    save(model, tmp_path / "ckpt", class_names=["a", "b", "c"], provenance=provenance)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors",
        "vit.json",
    ]
    loaded, meta = load(tmp_path / "ckpt")
    assert meta.config == model.config
    assert meta.class_names == ("a", "b", "c") and meta.provenance == provenance
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    """Readable by the group and others under the default umask: serving may run as another user."""
    umask = os.umask(0o022)
    try:
        save(make_model(), tmp_path)
    finally:
        os.umask(umask)
    for name in ("model.safetensors", "vit.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_a_model_saved_at_one_resolution_fine_tunes_at_another(tmp_path: Path) -> None:
    config = ViTConfig(image_size=32, patch_size=8, width=64, depth=1, mlp_dim=64, num_heads=2)
    save(VisionTransformer(config), tmp_path)
    model, _ = load(tmp_path)
    model.resize_pos_embed(64)
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_truncated_weights_are_reported_as_corrupt(tmp_path: Path) -> None:
    save(make_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load(tmp_path)


def test_a_config_that_does_not_match_the_weights_names_the_tensors(tmp_path: Path) -> None:
    save(make_model(), tmp_path)
    meta_file = tmp_path / "vit.json"
    data = json.loads(meta_file.read_text())
    data["config"]["depth"] = 3
    data["config"]["width"] = 32
    meta_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"missing tensors \['blocks.2") as error:
        load(tmp_path)
    assert "shape mismatches" in str(error.value)


def _edit_metadata(directory: Path, **fields: object) -> None:
    data = json.loads((directory / "vit.json").read_text())
    (directory / "vit.json").write_text(json.dumps({**data, **fields}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "vit.json").unlink(), "vit.json is missing"),
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda d: (d / "vit.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "vit.json").write_text("[]"), "must hold a JSON object"),
        (lambda d: (d / "vit.json").write_text('{"format_version": 99}'), "format version 99"),
        (
            lambda d: (d / "vit.json").write_text('{"format_version": 1, "config": {"depht": 1}}'),
            "invalid model config.*depht",
        ),
        (lambda d: _edit_metadata(d, config=[]), "holds no model config"),
        (lambda d: _edit_metadata(d, config={"preprocessing": "none"}), "invalid model config"),
        (lambda d: _edit_metadata(d, provenance=["run"]), "provenance must be a JSON object"),
        (
            lambda d: _edit_metadata(d, class_names=["only one"]),
            "class_names must be 3 strings",
        ),
    ],
)
def test_damaged_directories_fail_with_a_clear_message(tmp_path: Path, damage, message) -> None:
    save(make_model(), tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path)


def test_class_names_must_match_the_head(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="2 class names for a model with 3 classes"):
        save(make_model(), tmp_path, class_names=["a", "b"])
    with pytest.raises(CheckpointError, match="class names must be strings"):
        save(make_model(), tmp_path, class_names=[0, 1, 2])  # load would refuse the checkpoint
    assert not (tmp_path / "vit.json").exists()


def test_metadata_that_cannot_be_written_leaves_the_old_checkpoint_whole(tmp_path: Path) -> None:
    old = make_model()
    save(old, tmp_path, provenance={"run": "first"})
    new = make_model()
    with torch.no_grad():
        new.head.weight.add_(1.0)
    with pytest.raises(TypeError):
        save(new, tmp_path, provenance={"step": object()})
    loaded, meta = load(tmp_path)
    assert meta.provenance == {"run": "first"}
    assert torch.equal(loaded.head.weight, old.head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "vit.json"]
