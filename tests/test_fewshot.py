"""Few-shot evaluation end to end: a checkpoint, the digits catalog on a local Ray, real MLflow."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image

from jobs import fewshot as fewshot_job
from pipelines import tracking
from pipelines.datasets import DIGIT_CLASSES, describe, split_sizes
from pipelines.fewshot import _keep_by_key_hash, _train_cap, run_fewshot
from pipelines.ingest import DataQualityError
from pipelines.training import resolve_checkpoint
from vit import VisionTransformer, ViTConfig
from vit import checkpoint as vit_checkpoint
from vit.checkpoint import CheckpointError
from vit.evaluate import feasible_shots

PARENT_RUN = "0123456789abcdef"


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A randomly initialised ViT, saved the way pretraining saves its model."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=2, in_channels=1, num_classes=10, width=32, depth=2,
        mlp_dim=64, num_heads=2,
    )  # fmt: skip
    return vit_checkpoint.save(
        VisionTransformer(config),
        tmp_path / "pretrain" / "model",
        class_names=DIGIT_CLASSES,
        provenance={"mlflow_run_id": PARENT_RUN, "stage": "pretrain"},
    )


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_job_logs_fewshot_accuracy_above_chance(
    ray_local: None, tiny_checkpoint: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--checkpoint", str(tiny_checkpoint.parent), "--dataset", "digits"]
    assert fewshot_job.main([*argv, "--shots", "1", "10", "200", "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "10 classes" in out and "MLflow run" in out
    assert "skipped 200 shots" in out  # no digit has 200 + 10 training images

    mlflow = tracking.client(mlflow_uri)
    experiment = mlflow.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    (run,) = mlflow.search_runs([experiment.experiment_id], "tags.vitray_stage = 'fewshot'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["vitray_parent_checkpoint_run"] == PARENT_RUN
    assert run.data.tags["vitray_dataset"] == "digits"
    metrics = run.data.metrics
    assert set(metrics) >= {
        "fewshot/1shot_accuracy",
        "fewshot/1shot_accuracy_std",
        "fewshot/10shot_accuracy",
        "fewshot/10shot_accuracy_std",
    }
    assert metrics["data/bad_images"] == 0
    train_rows = describe("digits").split_sizes["train"]
    assert f"{train_rows} train" in out and run.data.params["dataset"] == "digits"
    # Chance is 10%. A random 2-block, width-32 ViT (class-token pooling) gives 10-shot
    # accuracies of 0.37-0.43 over init seeds 0-2 on this protocol (ridge on raw pixels: 0.87).
    assert metrics["fewshot/10shot_accuracy"] > 0.25
    assert metrics["fewshot/10shot_accuracy"] > metrics["fewshot/1shot_accuracy"]
    assert run.data.tags["vitray_skipped_shots"] == "200"
    assert "fewshot/200shot_accuracy" not in metrics
    (plot,) = mlflow.list_artifacts(run.info.run_id, "figures")
    assert plot.path == "figures/fewshot.png" and plot.file_size > 1000


def test_row_cap_featurises_a_key_hash_subset(
    ray_local: None, tiny_checkpoint: Path, mlflow_uri: str
) -> None:
    result = run_fewshot(
        tiny_checkpoint, "digits", shots=(5,), seeds=1, max_train_rows=600, max_test_rows=200
    )
    assert 400 < result["train_rows"] < 800 and 100 < result["test_rows"] < 300
    assert set(result["accuracy"]) == {5} and 0.0 < result["accuracy"][5][0] <= 1.0


def test_row_cap_applies_to_an_image_folder(
    ray_local: None, tiny_checkpoint: Path, mlflow_uri: str, tmp_path: Path
) -> None:
    """A folder declares no split sizes; the cap must thin it all the same, not featurise
    every image of an ImageNet-sized folder while the run's params say 100."""
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    for label in range(10):
        (tmp_path / "folder" / str(label)).mkdir(parents=True)
        for i, image in enumerate(digits.images[digits.target == label][:30]):
            pixels = (image * 255 / 16).round().astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "folder" / str(label) / f"{i}.png")
    folder = str(tmp_path / "folder")
    sizes = split_sizes(folder)
    assert sizes is not None and sum(sizes.values()) == 300 and sizes["train"] > 180
    result = run_fewshot(
        tiny_checkpoint, folder, shots=(1,), seeds=1, max_train_rows=100, dev_per_class=2
    )
    assert 60 < result["train_rows"] < 140  # about 100 of the folder's train images
    assert result["test_rows"] == sizes["test"]  # no test cap


def test_checkpoint_resolution_and_key_hash_filter(tmp_path: Path, tiny_checkpoint: Path) -> None:
    assert resolve_checkpoint(tiny_checkpoint.parent) == tiny_checkpoint
    run = tmp_path / "run"  # a Ray Train run folder: its latest checkpoint
    for stamp in ("2026-11-26_22-29-42.821908", "2026-11-26_22-27-18.970936"):
        shutil.copytree(tiny_checkpoint, run / f"checkpoint_{stamp}" / "model")
    assert resolve_checkpoint(run) == run / "checkpoint_2026-11-26_22-29-42.821908" / "model"
    assert resolve_checkpoint(tiny_checkpoint) == tiny_checkpoint
    assert resolve_checkpoint(tmp_path / "absent") == tmp_path / "absent"
    with pytest.raises(CheckpointError, match="s3://bucket/run: checkpoints are read from local"):
        resolve_checkpoint("s3://bucket/run")
    keys = [f"digits/{i:04d}" for i in range(2000)]
    table = pa.table({"key": keys, "label": list(range(2000))})
    kept = _keep_by_key_hash(table, fraction=0.25)
    assert 400 < kept.num_rows < 600
    assert kept.equals(_keep_by_key_hash(table, fraction=0.25))
    assert _keep_by_key_hash(table.slice(0, 0), fraction=0.5).num_rows == 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"dev_per_class": -1}, "dev_per_class must be 0 or more"),
        ({"max_train_rows": 0}, "max_train_rows must be at least 1"),
        ({"max_test_rows": -5}, "max_test_rows must be at least 1"),
    ],
)
def test_impossible_options_are_refused_before_any_work(
    tiny_checkpoint: Path, mlflow_uri: str, option: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_fewshot(tiny_checkpoint, "digits", (1,), 1, **option)
    assert not tracking.client(mlflow_uri).search_experiments(filter_string="name = 'vitray'")


@pytest.mark.parametrize(
    ("shots", "seeds", "message"),
    [
        ((0, 5), 1, r"shot counts must be at least 1, got \[0, 5\]"),
        ((5,), [0, -1], r"seeds must be 0 or more, got \[0, -1\]"),
    ],
)
def test_impossible_shots_and_seeds_are_refused_before_any_work(
    tiny_checkpoint: Path,
    mlflow_uri: str,
    shots: tuple[int, ...],
    seeds: int | list[int],
    message: str,
) -> None:
    """The pipeline passes its config's shots and seeds unchecked: a zero shot count or a
    negative seed must not cost a featurisation and then fail as an empty ridge fit."""
    with pytest.raises(ValueError, match=message):
        run_fewshot(tiny_checkpoint, "digits", shots, seeds)
    assert not tracking.client(mlflow_uri).search_experiments(filter_string="name = 'vitray'")


def test_shot_counts_fit_the_rarest_class_and_the_row_cap_every_class() -> None:
    assert feasible_shots((1, 5, 10, 25), dev_per_class=10, rarest=20) == [1, 5, 10]
    # Without dev rows the L2 strength is chosen on the shots: one a class cannot do it.
    assert feasible_shots((1, 5, 10, 25), dev_per_class=0, rarest=20) == [5, 10]
    assert _train_cap(20_000, 10, (1, 5, 10, 25), 10) == 20_000
    assert _train_cap(20_000, 1000, (1, 5, 10, 25), 10) == 105_000  # ImageNet: 105 a class
    assert _train_cap(None, 1000, (1, 5, 10, 25), 10) is None


def test_a_split_of_unreadable_images_is_refused_with_examples(
    ray_local: None, tiny_checkpoint: Path, mlflow_uri: str, tmp_path: Path
) -> None:
    (tmp_path / "unreadable" / "a").mkdir(parents=True)
    (tmp_path / "unreadable" / "b").mkdir()
    for label in ("a", "b"):
        for i in range(20):
            (tmp_path / "unreadable" / label / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataQualityError, match=r"(\d+) of \1 images unreadable"):
        run_fewshot(tiny_checkpoint, str(tmp_path / "unreadable"), (1,), 1)


def test_a_split_without_images_is_named(
    ray_local: None, tiny_checkpoint: Path, mlflow_uri: str, tmp_path: Path
) -> None:
    """A folder whose declared test split holds no image at all."""
    for label in ("a", "b"):
        (tmp_path / "set" / "train" / label).mkdir(parents=True)
        (tmp_path / "set" / "test" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "set" / "train" / label / f"{i}.png")
    with pytest.raises(ValueError, match="set: the test split has no images"):
        run_fewshot(tiny_checkpoint, str(tmp_path / "set"), (1,), 1, dev_per_class=0)
