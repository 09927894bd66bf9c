"""The import job end to end: a timm file in, a registered vit checkpoint out, ready to export."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn.functional as F
import transformers
from conftest import DAMAGES, damaged

from jobs import export as export_job
from jobs import import_weights
from pipelines import tracking
from vit import checkpoint
from vit.export import check_onnx_parity, example_input


@pytest.fixture
def timm_file(tmp_path: Path) -> tuple[timm_vit.VisionTransformer, Path]:
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=4
    ).eval()
    with torch.no_grad():
        model.head.weight.normal_()
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return model, path


def test_import_keeps_outputs_and_records_provenance(
    timm_file: tuple[timm_vit.VisionTransformer, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    reference, path = timm_file
    out = tmp_path / "ckpt"
    argv = ["--from", "timm", str(path), "--out", str(out), "--num-heads", "2"]
    assert import_weights.main([*argv, "--mean", "0.4", "0.5", "0.6"]) == 0
    model, meta = checkpoint.load(out)
    assert meta.config.preprocessing.mean == (0.4, 0.5, 0.6)
    assert meta.config.preprocessing.resize_size == 35  # timm's 90% centre crop
    assert (
        meta.provenance["source_format"] == "timm" and len(meta.provenance["source_sha256"]) == 64
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "runs").exists()  # nothing tracked without --register


def test_provenance_says_how_to_redo_the_position_resampling(
    timm_file: tuple[timm_vit.VisionTransformer, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The config's mode alone is not enough: timm's loaders resample bicubic *with* antialias."""
    monkeypatch.chdir(tmp_path)
    reference, path = timm_file
    out = tmp_path / "ckpt"
    argv = ["--from", "timm", str(path), "--out", str(out), "--num-heads", "2"]
    assert import_weights.main([*argv, "--image-size", "48"]) == 0
    model, meta = checkpoint.load(out)
    how = meta.provenance["pos_embed_resampling"]
    assert how == {"mode": "bicubic", "align_corners": False, "antialias": False}
    grid = reference.pos_embed.detach()[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    redone = F.interpolate(grid, size=(6, 6), **how).permute(0, 2, 3, 1).reshape(1, 36, -1)
    torch.testing.assert_close(model.pos_embed.detach()[:, 1:], redone, rtol=0, atol=0)


@pytest.fixture
def mlflow_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tracking store of the test's own, run from its folder; artifacts go beside the store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def test_import_registers_in_mlflow_and_exports(
    timm_file: tuple[timm_vit.VisionTransformer, Path], tmp_path: Path, mlflow_here: str
) -> None:
    uri = mlflow_here
    _, path = timm_file
    out = tmp_path / "ckpt"
    argv = ["--from", "timm", str(path), "--out", str(out), "--num-heads", "2"]
    argv += ["--num-classes", "3", "--image-size", "48", "--register", "vit-imported"]
    assert import_weights.main(argv) == 0
    model, meta = checkpoint.load(out)
    assert meta.config.image_size == (48, 48) and meta.config.num_classes == 3
    assert not model.head.weight.any()  # the paper's zero-initialised fine-tuning head

    mlflow = tracking.client(uri)
    version = mlflow.get_model_version_by_alias("vit-imported", "imported")
    assert version.run_id == meta.provenance["mlflow_run_id"]
    assert mlflow.get_run(version.run_id).data.tags["vitray_stage"] == "import"
    downloaded = mlflow.download_artifacts(version.run_id, "checkpoint", str(tmp_path / "dl"))
    registered, _ = checkpoint.load(downloaded)
    assert registered.config == model.config

    # With the zero head every output is 0, whatever the graph computes: the export job refuses
    # to call that parity. With a random head the comparison covers the normalisation and encoder.
    with pytest.raises(SystemExit, match="zero-initialised"):
        export_job.main(["--checkpoint", str(out), "--onnx", str(tmp_path / "zero.onnx")])
    assert not (tmp_path / "zero.onnx").exists()  # an unverified graph is not left to deploy
    torch.nn.init.normal_(model.head.weight)
    random_head = tmp_path / "random-head"
    checkpoint.save(model, random_head, class_names=meta.class_names)
    onnx_path = tmp_path / "vit.onnx"
    argv = ["--checkpoint", str(random_head), "--onnx", str(onnx_path), "--uint8"]
    assert export_job.main(argv) == 0
    pixels = example_input(model, 4, torch.uint8)
    assert model(pixels).std() > 0.01
    assert check_onnx_parity(model, onnx_path, pixels) < 1e-4


def test_timm_pooling_is_an_argument_and_refused_where_unrepresentable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        num_classes=4,
        global_pool="avg",
        fc_norm=False,
    )
    path = tmp_path / "cls-avg.pth"
    torch.save(model.state_dict(), path)
    argv = ["--from", "timm", str(path), "--out", str(tmp_path / "out"), "--num-heads", "2"]
    with pytest.raises(SystemExit, match=r"cannot import .*'avg' with a class token"):
        import_weights.main([*argv, "--global-pool", "avg"])
    with pytest.raises(SystemExit) as usage:  # a timm-only flag on another format
        import_weights.main([*argv[:1], "npz", *argv[2:], "--global-pool", "avg"])
    assert usage.value.code == 2
    assert "--global-pool and --no-embed-class describe timm models only" in capsys.readouterr().err


def hf_directory(directory: Path, image_size: tuple[int, int]) -> transformers.ViTModel:
    """A Hugging Face model directory the old way: config.json and pytorch_model.bin."""
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=8,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return model


def test_a_hf_directory_with_pytorch_model_bin(tmp_path: Path) -> None:
    """Read like any torch file (tensors only); the non-square grid comes from config.json."""
    source = tmp_path / "hf"
    reference = hf_directory(source, (32, 48))
    out = tmp_path / "ckpt"
    assert import_weights.main(["--from", "hf", str(source), "--out", str(out)]) == 0
    model, meta = checkpoint.load(out)
    assert meta.config.image_size == (32, 48)
    assert meta.provenance["source_path"].endswith("pytorch_model.bin")
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x).logits, atol=1e-5, rtol=1e-5)
    (source / "pytorch_model.bin").unlink()
    with pytest.raises(SystemExit, match=r"needs model\.safetensors or pytorch_model\.bin"):
        import_weights.main(["--from", "hf", str(source), "--out", str(out)])


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_code_is_refused(zip_format: bool, tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": {}, "hook": Path("x")}, path, _use_new_zipfile_serialization=zip_format
    )
    with pytest.raises(SystemExit, match="refusing to unpickle") as error:
        import_weights.main(["--from", "timm", str(path), "--out", str(tmp_path / "out")])
    assert "not a readable PyTorch file" not in str(error.value)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_corrupt_or_foreign_file_is_not_called_pickled_code(
    damage: str, timm_file: tuple[timm_vit.VisionTransformer, Path], tmp_path: Path
) -> None:
    """A cut-off download, the web page saved in its place, an empty file: none holds code."""
    _, good = timm_file
    path = tmp_path / "bad.pth"
    path.write_bytes(damaged(good.read_bytes(), damage))
    with pytest.raises(SystemExit, match="not a readable PyTorch file") as error:
        import_weights.main(["--from", "timm", str(path), "--out", str(tmp_path / "out")])
    assert "unpickle" not in str(error.value)


def test_a_failed_import_ends_its_run_failed(
    timm_file: tuple[timm_vit.VisionTransformer, Path], tmp_path: Path, mlflow_here: str
) -> None:
    uri = mlflow_here
    _, path = timm_file
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["--from", "timm", str(path), "--out", str(blocker / "ckpt"), "--num-heads", "2"]
    with pytest.raises(OSError, match="a-file"):  # the checkpoint cannot be written there
        import_weights.main([*argv, "--register", "vit-imported"])
    mlflow = tracking.client(uri)
    [run] = mlflow.search_runs([tracking.experiment_id(tracking.DEFAULT_EXPERIMENT, uri)])
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("alias", ["latest", "v3", "my champion"])
def test_an_alias_the_registry_refuses_is_refused_before_anything_is_registered(
    timm_file: tuple[timm_vit.VisionTransformer, Path],
    tmp_path: Path,
    mlflow_here: str,
    alias: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, path = timm_file
    argv = ["--from", "timm", str(path), "--out", str(tmp_path / "ckpt"), "--num-heads", "2"]
    with pytest.raises(SystemExit) as usage:
        import_weights.main([*argv, "--register", "vit-imported", "--alias", alias])
    assert usage.value.code == 2 and f"alias {alias!r}" in capsys.readouterr().err
    assert not tracking.client(mlflow_here).search_registered_models()  # no version left aliasless


def test_a_directory_is_not_called_missing(tmp_path: Path) -> None:
    """timm's Hub downloads are folders: say to pick the file in it, not that nothing is there."""
    folder = tmp_path / "vit_base_patch16_224"
    folder.mkdir()
    argv = ["--from", "timm", str(folder), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="a directory") as error:
        import_weights.main(argv)
    assert "no such file" not in str(error.value)
    with pytest.raises(SystemExit, match="no such file"):
        import_weights.main(["--from", "timm", str(tmp_path / "gone.pth"), *argv[3:]])


@pytest.mark.parametrize("source_format", ["timm", "npz", "hf"])
def test_a_damaged_safetensors_or_npz_file_is_reported_not_raised(
    source_format: str, tmp_path: Path
) -> None:
    """Half a download: a one-line reason to fetch it again, not a traceback or pickle advice."""
    path = {
        "timm": tmp_path / "timm.safetensors",
        "npz": tmp_path / "vit.npz",
        "hf": tmp_path / "hf-model" / "model.safetensors",
    }[source_format]
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"PK\x03\x04" + bytes(64) if source_format == "npz" else bytes(64))
    where = path.parent if source_format == "hf" else path
    argv = ["--from", source_format, str(where), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="corrupt, truncated or another format") as error:
        import_weights.main([*argv, "--num-heads", "2"])
    assert "pickle" not in str(error.value)
