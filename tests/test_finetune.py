"""Ray Tune transfer sweep on local Ray with a real MLflow registry (SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import finetune, tracking
from pipelines.finetune import FinetuneConfig
from vit import VisionTransformer, ViTConfig
from vit import checkpoint as vit_checkpoint
from vit.config import Preprocessing


@pytest.fixture
def pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        width=32,
        depth=2,
        mlp_dim=64,
        num_heads=2,
        num_classes=10,
        representation_size=32,
    )
    path = tmp_path / "pretrained"
    vit_checkpoint.save(VisionTransformer(config), path, provenance={"mlflow_run_id": "pre123"})
    return path


@pytest.mark.usefixtures("ray_local")
def test_sweep_registers_a_champion_per_dataset_and_survives_a_diverging_trial(
    pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pretrained.parent)  # a relative checkpoint path, as users type it
    config = FinetuneConfig(
        checkpoint=pretrained.name,
        datasets=("digits", "mnist-5k"),
        learning_rates=(0.1, 1e38),  # the second one overflows to inf, then NaN
        steps=40,
        batch_size=64,
        warmup_steps=2,
        eval_every=20,
        image_size=12,  # fine-tune at a higher resolution than pretraining (8 px)
        storage_path=str(tmp_path / "tune"),
        sweep_name="test-sweep",
    )
    outcomes = finetune.run(config)
    assert [o.dataset for o in outcomes] == ["digits", "mnist-5k"]
    mlflow = tracking.client()
    for outcome in outcomes:
        assert outcome.failed == 1
        assert outcome.trials == 2
        assert outcome.learning_rate == 0.1
        assert outcome.dev_accuracy > 0.2  # chance is 0.1
        history = mlflow.get_metric_history(outcome.run_id, "test/accuracy")
        assert len(history) == 1  # the test split is touched exactly once
        assert history[0].value == outcome.test_accuracy
        assert mlflow.get_run(outcome.run_id).data.metrics["data/bad_images"] == 0
        champion = mlflow.get_model_version_by_alias(f"vit-{outcome.dataset}", "champion")
        assert champion.version == outcome.model_version
        assert champion.run_id == outcome.run_id
        assert champion.tags["vitray_pretrain_run"] == "pre123"
        assert mlflow.get_run(outcome.run_id).data.tags["vitray_failed_trials"] == "1e+38"
        reasons = mlflow.download_artifacts(outcome.run_id, "failed_trials.json", str(tmp_path))
        assert "loss became" in Path(reasons).read_text()
        counts = mlflow.download_artifacts(outcome.run_id, "confusion_matrix.json", str(tmp_path))
        matrix = np.array(json.loads(Path(counts).read_text())["counts"])
        # The logged test confusion matrix agrees with the logged test accuracy.
        assert np.trace(matrix) / matrix.sum() == pytest.approx(outcome.test_accuracy)
        experiment = mlflow.get_run(outcome.run_id).info.experiment_id
        trials = mlflow.search_runs(
            [experiment], filter_string=f"tags.mlflow.parentRunId = '{outcome.run_id}'"
        )
        statuses = {r.data.params["learning_rate"]: r.info.status for r in trials}
        assert statuses == {"0.1": "FINISHED", "1e+38": "FAILED"}  # no run left RUNNING
        logged = {a.path for a in mlflow.list_artifacts(outcome.run_id, "figures")}
        assert logged == {"figures/confusion_matrix.png", "figures/test_predictions.png"}
    meta = vit_checkpoint.read_metadata(Path(outcomes[0].checkpoint_path))
    assert meta.config.image_size == (12, 12)
    assert meta.config.num_classes == 10
    assert meta.config.representation_size is None
    print(finetune.format_table(outcomes))


@pytest.mark.usefixtures("ray_local")
def test_a_sweep_whose_trials_all_fail_leaves_no_run_running(
    pretrained: Path, tmp_path: Path
) -> None:
    config = FinetuneConfig(
        checkpoint=str(pretrained),
        datasets=("digits",),
        learning_rates=(1e38,),
        steps=4,
        batch_size=64,
        warmup_steps=1,
        eval_every=2,
        storage_path=str(tmp_path / "tune"),
        sweep_name="doomed",
    )
    with pytest.raises(RuntimeError, match="every trial failed on digits"):
        finetune.run(config)
    mlflow = tracking.client()
    runs = mlflow.search_runs([tracking.experiment_id(config.experiment)])
    statuses = {r.data.tags["mlflow.runName"]: r.info.status for r in runs}
    assert statuses.pop("doomed-finetune") == "FAILED"  # the sweep
    assert statuses.pop("finetune-digits") == "FAILED"  # its dataset
    assert set(statuses.values()) == {"FAILED"}  # its one trial


def test_a_higher_fine_tuning_resolution_scales_the_evaluation_resize() -> None:
    """224 px models evaluated as resize 256 + centre crop 224 keep the same crop share at 384,
    instead of having every photo squashed into the larger square."""
    pretrained = ViTConfig(preprocessing=Preprocessing(resize_size=256))
    at_384 = finetune._model_config(pretrained, FinetuneConfig(checkpoint="-", image_size=384), 5)
    assert at_384.image_size == (384, 384) and at_384.preprocessing.resize_size == 439
    assert at_384.num_classes == 5 and at_384.representation_size is None
    same = finetune._model_config(pretrained, FinetuneConfig(checkpoint="-"), 5)
    assert same.preprocessing == pretrained.preprocessing
    no_resize = ViTConfig()
    at_384 = finetune._model_config(no_resize, FinetuneConfig(checkpoint="-", image_size=384), 5)
    assert at_384.preprocessing.resize_size is None
