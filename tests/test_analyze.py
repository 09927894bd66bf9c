"""The analysis job end to end: a checkpoint, the digits catalog on Ray, four figures in MLflow."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from jobs import analyze as analyze_job
from pipelines import analyze, figures, tracking
from pipelines.datasets import DIGIT_CLASSES
from vit import VisionTransformer, ViTConfig
from vit import checkpoint as vit_checkpoint

FIGURES = {"attention_rollout", "attention_distance", "position_similarity", "embedding_filters"}
SOURCE_RUN = "fedcba9876543210"


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=2, in_channels=1, num_classes=10, width=32, depth=3,
        mlp_dim=64, num_heads=2,
    )  # fmt: skip
    return vit_checkpoint.save(
        VisionTransformer(config),
        tmp_path / "model",
        class_names=DIGIT_CLASSES,
        provenance={"mlflow_run_id": SOURCE_RUN},
    )


def test_job_writes_and_logs_the_four_figures(
    ray_local: None,
    checkpoint_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "figures"
    argv = ["--checkpoint", str(checkpoint_dir), "--dataset", "digits", "--images", "4"]
    assert analyze_job.main([*argv, "--out", str(out)]) == 0
    assert "mean attention distance per layer" in capsys.readouterr().out
    assert {p.stem for p in out.glob("*.png")} == FIGURES

    mlflow = tracking.client(uri)
    experiment = mlflow.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    (run,) = mlflow.search_runs([experiment.experiment_id], "tags.vitray_stage = 'analyze'")
    assert run.data.tags["vitray_parent_checkpoint_run"] == SOURCE_RUN
    logged = {Path(a.path).stem for a in mlflow.list_artifacts(run.info.run_id, "figures")}
    assert logged == FIGURES
    local = mlflow.download_artifacts(run.info.run_id, "figures/attention_rollout.png", tmp_path)
    with Image.open(local) as image:
        assert image.format == "PNG" and image.width > 100
    history = mlflow.get_metric_history(run.info.run_id, "mean_attention_distance")
    assert [m.step for m in history] == [0, 1, 2]
    # 4x4 patch grid of 2-pixel patches: distances lie between 0 and the grid diagonal.
    assert all(0 < m.value < 2 * 3 * 2**0.5 for m in history)


def test_unknown_dataset_fails_before_logging(
    ray_local: None, checkpoint_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(FileNotFoundError, match="'no-such-dataset' is neither a catalog dataset"):
        analyze_job.main(["--checkpoint", str(checkpoint_dir), "--dataset", "no-such-dataset"])
    assert not tracking.client(uri).search_experiments(filter_string="name = 'vitray'")


def test_rollout_map_covers_exactly_its_image() -> None:
    """The upsampled map spans the image's own extent: no half-pixel shift, no cropped edge."""
    images = np.zeros((2, 8, 12, 1), dtype=np.uint8)
    figure = figures.attention_rollout(images, np.random.default_rng(0).random((2, 4, 6)))
    try:
        for axis in figure.axes:
            extents = [tuple(image.get_extent()) for image in axis.get_images()]
            assert extents and all(extent == extents[0] for extent in extents)
            assert (axis.get_xlim(), axis.get_ylim()) == ((-0.5, 11.5), (7.5, -0.5))
    finally:
        plt.close(figure)


@pytest.mark.parametrize("images", [0, -3])
def test_no_images_to_analyse_is_refused_before_the_split_is_read(
    checkpoint_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: int
) -> None:
    """run_analysis is called by the pipeline and from notebooks, past the job's own check:
    a count below 1 must not decode the whole test split into one giant rollout figure."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def read_dataset(*args: object, **kwargs: object) -> None:
        raise AssertionError("the test split was opened")

    monkeypatch.setattr(analyze, "read_dataset", read_dataset)
    with pytest.raises(ValueError, match=f"at least one image to analyse, got {images}"):
        analyze.run_analysis(checkpoint_dir, "digits", images=images, uri=uri)
    assert not tracking.client(uri).search_experiments(filter_string="name = 'vitray'")
