"""Ray Tune transfer sweep on local Ray with a real MLflow registry (SQLite)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image
from ray.tune import Result
from ray.util.state import list_actors

from pipelines import finetune, tracking
from pipelines.datasets import fingerprint
from pipelines.finetune import FinetuneConfig
from pipelines.ingest import DataQualityError, IngestConfig
from pipelines.pipeline import PipelineConfig, StageCache, cached_sweep
from pipelines.pretrain import PretrainConfig
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
        preprocessing=Preprocessing(resize_size=8),  # resize to 8, "crop" all 8
    )
    path = tmp_path / "pretrained"
    torch.manual_seed(0)  # the same starting weights every run: the sweep test's accuracy floor
    vit_checkpoint.save(VisionTransformer(config), path, provenance={"mlflow_run_id": "pre123"})
    return path


def register_champion(name: str, dataset: str, dev_accuracy: float) -> str:
    """A registered version as a sweep on `dataset` leaves it, with the dev accuracy given."""
    run_id = tracking.start_run(f"earlier-{name}")
    tags = {
        finetune.DEV_ACCURACY_TAG: str(dev_accuracy),
        finetune.DATA_TAG: fingerprint(dataset),
    }
    return tracking.register_model(name, run_id, "checkpoint", tags, alias="champion")


def test_a_champion_chosen_on_other_data_or_untagged_gives_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a champion measured on the same data is compared; any other is replaced."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow, data = tracking.client(), fingerprint("digits")

    def alias(dev_accuracy: float) -> str:
        return finetune.registry_alias(mlflow, "vit-digits", data, dev_accuracy)

    assert alias(0.5) == "champion"  # no model yet
    register_champion("vit-digits", "mnist-5k", 1.0)
    assert alias(0.5) == "champion"  # its 1.0 was on other data
    by_hand = tracking.start_run("by-hand")
    tracking.register_model("vit-digits", by_hand, "checkpoint", {}, alias="champion")
    assert alias(0.5) == "champion"  # no dev accuracy to compare
    register_champion("vit-digits", "digits", 0.5)
    assert alias(0.5) == "champion"  # as good: the newer model
    assert alias(0.49) == "challenger"


def test_an_unreachable_registry_crowns_no_champion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only "no model" or "no alias yet" lets a model through unopposed; an error that says
    nothing about the champion is raised."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    unreachable = tracking.client("http://127.0.0.1:9")
    with pytest.raises(MlflowException, match=r"127\.0\.0\.1:9"):
        finetune.registry_alias(unreachable, "vit-digits", fingerprint("digits"), 0.5)


def small_sweep(pretrained: Path, tmp_path: Path, **settings: Any) -> FinetuneConfig:
    """One learning rate on digits, 64 images a step; `settings` change any of it."""
    return FinetuneConfig(
        **{
            "checkpoint": str(pretrained),
            "datasets": ("digits",),
            "learning_rates": (0.1,),
            "batch_size": 64,
            "warmup_steps": 2,
            "storage_path": str(tmp_path / "tune"),
            **settings,
        }
    )


@pytest.mark.usefixtures("ray_local")
def test_sweep_registers_a_champion_per_dataset_and_survives_a_diverging_trial(
    pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pretrained.parent)  # a relative checkpoint path, as users type it
    config = small_sweep(
        pretrained,
        tmp_path,
        checkpoint=pretrained.name,
        datasets=("digits", "mnist-5k"),
        learning_rates=(0.1, 1e38),  # the second one overflows to inf, then NaN
        steps=40,
        eval_every=20,
        image_size=12,  # fine-tune at a higher resolution than pretraining (8 px)
        sweep_name="test-sweep",
    )
    # Champions from earlier sweeps on the same data: digits' did worse than any model will,
    # mnist-5k's better. Only digits' alias may move.
    seeded = {
        dataset: register_champion(f"vit-{dataset}", dataset, dev_accuracy)
        for dataset, dev_accuracy in (("digits", 0.0), ("mnist-5k", 1.0))
    }
    outcomes = finetune.run(config)
    assert [o.dataset for o in outcomes] == ["digits", "mnist-5k"]
    mlflow = tracking.client()
    assert [o.alias for o in outcomes] == ["champion", "challenger"]
    challenger = mlflow.get_model_version_by_alias("vit-mnist-5k", "challenger")
    assert challenger.version == outcomes[1].model_version
    champion = mlflow.get_model_version_by_alias("vit-mnist-5k", "champion")
    assert champion.version == seeded["mnist-5k"]
    assert f"v{outcomes[1].model_version} @challenger" in finetune.format_table(outcomes)
    for outcome in outcomes:
        assert outcome.failed == 1
        assert outcome.trials == 2
        assert outcome.learning_rate == 0.1
        assert outcome.dev_accuracy > 0.2  # chance is 0.1
        history = mlflow.get_metric_history(outcome.run_id, "test/accuracy")
        assert len(history) == 1  # the test split is touched exactly once
        assert history[0].value == outcome.test_accuracy
        assert mlflow.get_run(outcome.run_id).data.metrics["data/bad_images"] == 0
        registered = mlflow.get_model_version_by_alias(f"vit-{outcome.dataset}", outcome.alias)
        assert registered.version == outcome.model_version
        assert registered.run_id == outcome.run_id
        assert registered.tags["vitray_pretrain_run"] == "pre123"
        assert float(registered.tags["vitray_dev_accuracy"]) == outcome.dev_accuracy
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
    assert meta.config.preprocessing.resize_size == 12  # the crop's share kept at 12 px
    assert meta.config.num_classes == 10
    assert meta.config.representation_size is None
    assert meta.provenance["stage"] == "finetune"
    assert meta.provenance["pretrain_run"] == "pre123"
    assert meta.provenance["pretrain_checkpoint"] == str(pretrained)
    trial_run = mlflow.get_run(meta.provenance["mlflow_run_id"])
    assert trial_run.data.tags["mlflow.parentRunId"] == outcomes[0].run_id
    # What is registered (and served) is the model alone, without the optimizer state.
    version = mlflow.get_model_version("vit-digits", outcomes[0].model_version)
    files = {Path(a.path).name for a in mlflow.list_artifacts(version.run_id, "checkpoint")}
    assert files == {"model.safetensors", "vit.json"}
    print(finetune.format_table(outcomes))


@pytest.mark.usefixtures("ray_local")
def test_a_sweep_whose_trials_all_fail_leaves_no_run_running(
    pretrained: Path, tmp_path: Path
) -> None:
    config = small_sweep(
        pretrained, tmp_path, learning_rates=(1e38,), steps=4, eval_every=2, sweep_name="doomed"
    )
    with pytest.raises(RuntimeError, match="every trial failed on digits"):
        finetune.run(config)
    mlflow = tracking.client()
    runs = mlflow.search_runs([tracking.experiment_id(config.experiment)])
    statuses = {r.data.tags["mlflow.runName"]: r.info.status for r in runs}
    assert statuses.pop("doomed-finetune") == "FAILED"  # the sweep
    assert statuses.pop("finetune-digits") == "FAILED"  # its dataset
    assert set(statuses.values()) == {"FAILED"}  # its one trial


@pytest.mark.usefixtures("ray_local")
def test_a_cached_sweep_keeps_the_datasets_it_finished_when_a_later_one_fails(
    pretrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unreadable = tmp_path / "unreadable"
    for label in ("cat", "dog"):
        (unreadable / label).mkdir(parents=True)
        for i in range(8):
            (unreadable / label / f"{i}.png").write_bytes(b"not a png")
    config = small_sweep(
        pretrained,
        tmp_path,
        datasets=("digits", str(unreadable)),
        steps=4,
        eval_every=2,
        sweep_name="cached",
    )
    cache = StageCache(tmp_path / "state.json", context={}, mlflow=tracking.client())
    data = {d: fingerprint(d) for d in config.datasets}
    with pytest.raises(DataQualityError, match="images unreadable"):
        cached_sweep(cache, "finetune", config, data, parent_run_id=None)
    # The rerun, with the broken dataset left out, tunes nothing: digits is done.
    [kept] = cached_sweep(cache, "finetune", replace(config, datasets=("digits",)), data, None)
    reused = "finetune-digits: inputs unchanged, reusing the finished result"
    assert reused in capsys.readouterr().out
    mlflow = tracking.client()
    runs = mlflow.search_runs([tracking.experiment_id(config.experiment)])
    sweeps = [r for r in runs if r.data.tags["mlflow.runName"] == "cached-finetune"]
    assert [r.info.status for r in sweeps] == ["FAILED"]  # no second, empty sweep run
    digits_run = mlflow.get_run(kept["run_id"])
    assert digits_run.info.status == "FINISHED"
    assert digits_run.data.tags["mlflow.parentRunId"] == sweeps[0].info.run_id
    [version] = mlflow.search_model_versions("name = 'vit-digits'")
    assert version.version == kept["model_version"]
    # Everything reused: the pretrained checkpoint is not even needed on disk.
    shutil.rmtree(pretrained)
    assert cached_sweep(cache, "finetune", replace(config, datasets=("digits",)), data, None) == [
        kept
    ]


@pytest.mark.usefixtures("ray_local")
def test_an_interrupted_sweep_registers_nothing_and_ends_killed(
    pretrained: Path, tmp_path: Path
) -> None:
    """Tune catches the stop signal and returns its trials as they stood; none may be chosen."""
    config = small_sweep(
        pretrained,
        tmp_path,
        datasets=("digits", "mnist-5k"),
        steps=1_000_000,  # still training when the signal comes
        eval_every=100_000,
        sweep_name="interrupted",
    )
    mlflow = tracking.client()

    def interrupt_once_a_trial_trains() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            experiment = mlflow.get_experiment_by_name(config.experiment)
            trials = "tags.vitray_stage = 'trial'"
            if experiment and mlflow.search_runs([experiment.experiment_id], trials):
                os.kill(os.getpid(), signal.SIGUSR1)  # what Tune also treats as Ctrl-C
                return
            time.sleep(0.5)

    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # outside the sweep: harmless
    interrupter = threading.Thread(target=interrupt_once_a_trial_trains, daemon=True)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped before its trials ended"):
            finetune.run(config)
    finally:
        interrupter.join()
        signal.signal(signal.SIGUSR1, previous)
    runs = mlflow.search_runs([tracking.experiment_id(config.experiment)])
    statuses = {r.data.tags["mlflow.runName"]: r.info.status for r in runs}
    assert statuses.pop("interrupted-finetune") == "KILLED"  # the sweep
    assert statuses.pop("finetune-digits") == "KILLED"  # the dataset it was on; no next one
    assert list(statuses.values()) == ["KILLED"]  # its one trial
    assert not mlflow.search_model_versions("name = 'vit-digits'")


@pytest.mark.usefixtures("ray_local")
def test_a_trial_whose_process_dies_resumes_from_its_checkpoint(
    pretrained: Path, tmp_path: Path
) -> None:
    config = small_sweep(
        pretrained, tmp_path, steps=1_500, eval_every=100, sweep_name="crash", register=False
    )
    mlflow = tracking.client()
    killed: list[int] = []

    def kill_the_trial_after_two_checkpoints() -> None:
        deadline = time.monotonic() + 300  # a loaded machine starts the trial slowly
        while time.monotonic() < deadline:
            experiment = mlflow.get_experiment_by_name(config.experiment)
            trials = "tags.vitray_stage = 'trial'" if experiment else None
            runs = mlflow.search_runs([experiment.experiment_id], trials) if trials else []
            if runs and len(mlflow.get_metric_history(runs[0].info.run_id, "dev/accuracy")) >= 2:
                # Every live trial process: a test before this one may leave one shutting down.
                # Tune names the class `ImplicitFunc` or `wrap_function.<locals>.ImplicitFunc`.
                alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
                for actor in (a for a in alive if a.class_name.endswith("ImplicitFunc")):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(actor.pid, signal.SIGKILL)
                        killed.append(actor.pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_the_trial_after_two_checkpoints, daemon=True)
    killer.start()
    [outcome] = finetune.run(config)
    killer.join()
    assert killed, "the trial ended before it could be killed"
    assert outcome.failed == 0 and outcome.trials == 1
    trial_runs = mlflow.search_runs(
        [tracking.experiment_id(config.experiment)],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.run_id}'",
    )
    assert len(trial_runs) == 1  # the restarted trial went on in its own run
    trial_run = trial_runs[0].info
    assert trial_run.status == "FINISHED"
    [resumed] = mlflow.get_metric_history(trial_run.run_id, "trial/resumed_at_step")
    assert resumed.value >= 100 and resumed.value % 100 == 0  # a checkpoint, not step 0
    steps = [m.step for m in mlflow.get_metric_history(trial_run.run_id, "dev/accuracy")]
    assert steps[-1] == config.steps


def test_the_best_trial_is_chosen_among_those_that_ran_every_step() -> None:
    """A trial ASHA stopped early is compared only when none ran to the end."""
    stopped = Result({"dev_accuracy": 0.9, "step": 20}, checkpoint=None, error=None, path="a")
    completed = Result({"dev_accuracy": 0.8, "step": 80}, checkpoint=None, error=None, path="b")
    assert finetune._best([stopped, completed], steps=80) is completed
    assert finetune._best([stopped], steps=80) is stopped


def test_each_dataset_gets_one_folder_of_its_own_under_tune_storage() -> None:
    names = [finetune._folder_name(d) for d in ("digits", "/a/flowers", "s3://b/flowers/", "..")]
    assert names[0] == "digits"
    assert len(set(names)) == 4
    assert all(re.fullmatch(r"[\w.-]+", n) and n not in (".", "..") for n in names), names
    assert names[1].startswith("flowers-") and names[2].startswith("flowers-")


def test_tune_storage_keeps_uris_and_makes_folders_absolute() -> None:
    assert finetune._storage_path("s3://bucket/tune") == "s3://bucket/tune"
    assert finetune._storage_path("runs/tune") == str(Path("runs/tune").resolve())


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


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"eval_every": 0}, "eval_every must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"grace_evaluations": 0}, "grace_evaluations must be at least 1"),
        ({"learning_rates": ()}, "at least one learning rate"),
        ({"learning_rates": (0.01, 0.0)}, "learning rates must be positive"),
        ({"warmup_steps": -1}, "warmup_steps must be 0 or more"),
        ({"reduction_factor": 1}, "reduction_factor must be at least 2"),
        ({"max_failures": -1}, "max_failures must be 0 or more, got -1"),
        ({"learning_rates": (float("nan"),)}, "learning rates must be positive"),
        ({"grad_clip": 0.0}, "grad_clip must be positive"),
        ({"grad_clip": -1.0}, "grad_clip must be positive"),
        ({"momentum": 9.0}, r"momentum must lie in \[0, 1\]"),
        ({"momentum": -0.1}, r"momentum must lie in \[0, 1\]"),
        ({"steps": 40, "warmup_steps": 50}, "warmup_steps must be fewer than steps"),
        ({"steps": 40, "warmup_steps": 40}, "warmup_steps must be fewer than steps"),
        (
            {"datasets": ("/a/flowers", "s3://b/flowers/")},
            "'/a/flowers' and 's3://b/flowers/' would both register as 'vit-flowers'",
        ),
        ({"datasets": ("digits", "digits")}, "datasets named more than once: digits"),
        ({"datasets": ("/a/x", "/a/x"), "register": False}, "named more than once: /a/x"),
        ({"cpus_per_trial": 0}, "a trial needs CPUs or a GPU"),
        ({"cpus_per_trial": -1.0}, "cpus_per_trial and gpus_per_trial must be 0 or more"),
        ({"gpus_per_trial": -0.5}, "cpus_per_trial and gpus_per_trial must be 0 or more"),
        ({"max_concurrent_trials": 0}, "max_concurrent_trials must be at least 1, got 0"),
    ],
)
def test_settings_that_cannot_work_are_refused_when_the_sweep_is_made(
    setting: dict[str, Any], message: str
) -> None:
    """Refused up front: left to the trials they surface as a divergence ("loss became nan"),
    a division by zero after the data is read, or a sweep reported as interrupted; or they
    train silently wrong: a clip at 0 zeroes every gradient (the zero head never moves), and a
    warmup as long as the run never reaches the searched rate nor decays it. A trial with no
    resources fails in Ray only once the data is read; Tune runs a concurrency of 0 unlimited."""
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(checkpoint="-", **setting)


def test_a_trial_may_run_on_a_gpu_share_alone() -> None:
    FinetuneConfig(checkpoint="-", cpus_per_trial=0, gpus_per_trial=0.5)


@pytest.mark.parametrize("setting", [{"register": False}, {"from_scratch": True}])
def test_a_pipeline_whose_fine_tuning_registers_nothing_is_refused_when_made(
    setting: dict[str, Any],
) -> None:
    """The serve stage serves the versions the fine-tuning sweep registered; a sweep that
    registers none (from scratch never does) would fail there, after pretraining and tuning.
    The pipeline runs the from-scratch baseline itself (`scratch_baseline`)."""
    with pytest.raises(ValueError, match="the serve stage serves the registered fine-tuned"):
        PipelineConfig(PretrainConfig(), FinetuneConfig(checkpoint="", **setting))


def test_datasets_sharing_a_model_name_may_be_tuned_when_nothing_is_registered() -> None:
    datasets = ("/a/flowers", "/b/flowers")
    FinetuneConfig(checkpoint="-", datasets=datasets, register=False)
    FinetuneConfig(checkpoint="-", datasets=datasets, from_scratch=True)


@pytest.mark.usefixtures("ray_local")
def test_an_empty_split_is_named_not_left_to_a_numpy_error(tmp_path: Path) -> None:
    """A set that declares its train and test folders holds no dev image at all."""
    folder = tmp_path / "tiny-folder"
    for split in ("train", "test"):
        (folder / split / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / split / "cat" / "0.png")
    model = ViTConfig(image_size=8, patch_size=2, width=32, depth=1, mlp_dim=64, num_heads=2)
    with pytest.raises(ValueError, match="tiny-folder: the dev split has no images"):
        finetune._tokens(str(folder), "dev", model, IngestConfig())


def test_a_trial_that_tune_retries_after_an_error_trains_on_in_a_running_run(
    tmp_path: Path,
) -> None:
    """An error ends the trial's run FAILED; Tune then restarts the trial from its checkpoint
    (`max_failures`) and its steps go on in the same run, which must read as running again:
    left FAILED, a retry that ASHA later stops would stay FAILED, not KILLED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = tracking.client(uri)
    parent = tracking.start_run("finetune-digits", experiment="retry", uri=uri)
    first = finetune._trial_run(mlflow, "retry", parent, "_trial_0", "digits", uri)
    mlflow.set_terminated(first, "FAILED")
    again = finetune._trial_run(mlflow, "retry", parent, "_trial_0", "digits", uri)
    assert again == first
    assert mlflow.get_run(again).info.status == "RUNNING"


@pytest.mark.usefixtures("ray_local")
def test_a_split_without_images_is_refused_before_any_trial(
    pretrained: Path, tmp_path: Path
) -> None:
    """The test split is read once, after the sweep; a folder without one is refused before
    the sweep spends its trials (its listing says so without reading an image)."""
    folder = tmp_path / "no-test"
    for split in ("train", "dev"):
        for label in ("cat", "dog"):
            (folder / split / label).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / split / label / "0.png")
    config = small_sweep(pretrained, tmp_path, datasets=(str(folder),), steps=2, warmup_steps=1)
    with pytest.raises(ValueError, match="no-test: the test split has no images"):
        finetune.run(config)
    experiment = tracking.experiment_id(config.experiment)
    tuned = tracking.client().search_runs([experiment], f"tags.vitray_dataset = '{folder}'")
    assert tuned == []  # no dataset run, so no trial either


@pytest.mark.usefixtures("ray_local")
def test_a_folder_dataset_registers_under_its_folder_name(pretrained: Path, tmp_path: Path) -> None:
    """MLflow refuses '/' and ':' in model names, so `vit-/data/pets` cannot be the name."""
    folder = tmp_path / "pets"
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    config = small_sweep(
        pretrained, tmp_path, datasets=(str(folder),), steps=2, warmup_steps=1, eval_every=1
    )
    [outcome] = finetune.run(config)
    version = tracking.client().get_model_version_by_alias("vit-pets", "champion")
    assert version.version == outcome.model_version
    assert version.tags["vitray_dataset"] == str(folder)  # the whole path, for lineage
    assert f"vit-pets v{outcome.model_version} @champion" in finetune.format_table([outcome])
