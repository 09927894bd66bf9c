"""MLflow run status follows how a stage ended."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from pipelines import tracking


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "FINISHED"),
        (ZeroDivisionError(), "FAILED"),
        (SystemExit(15), "KILLED"),  # SIGTERM (`ray job stop`) as a Ray driver receives it
        (KeyboardInterrupt(), "KILLED"),
        (SystemExit(0), "FINISHED"),
        (SystemExit("cannot go on"), "FAILED"),
    ],
)
def test_a_run_ends_with_the_status_of_its_block(
    tmp_path: Path, error: BaseException | None, status: str
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("stage", uri=uri)
    expected = pytest.raises(type(error)) if error else contextlib.nullcontext()
    with expected, tracking.ending(run_id, uri):
        if error is not None:
            raise error
    assert tracking.client(uri).get_run(run_id).info.status == status


def test_a_tracking_server_gone_away_does_not_replace_the_stage_s_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(ZeroDivisionError), tracking.ending("0" * 32, "http://127.0.0.1:9"):
        raise ZeroDivisionError  # what stopped the stage
    assert f"could not mark run {'0' * 32} FAILED" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("dataset", "name"),
    [
        ("digits", "vit-digits"),
        ("/data/flowers", "vit-flowers"),
        ("/data/flowers/", "vit-flowers"),
        ("s3://bucket/shards/flowers", "vit-flowers"),
        ("gs://bucket", "vit-bucket"),
        ("/data/run:3", "vit-run-3"),
    ],
)
def test_registered_model_names_hold_no_slash_or_colon(dataset: str, name: str) -> None:
    assert tracking.registered_model_name(dataset) == name


def test_a_relative_folder_is_named_by_the_folder_it_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking.registered_model_name(".") == f"vit-{tmp_path.name}"
    assert tracking.registered_model_name("./pets/..") == f"vit-{tmp_path.name}"


@pytest.mark.parametrize("name", ["vit-flowers", "vit-bob's pets"])
def test_registering_twice_makes_a_second_version(tmp_path: Path, name: str) -> None:
    """A quote in the name (from a dataset folder or --register) used to break the lookup."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run("stage", uri=uri)
    first = tracking.register_model(name, run_id, "checkpoint", {}, "champion", uri)
    second = tracking.register_model(name, run_id, "checkpoint", {"k": "v"}, "champion", uri)
    assert (str(first), str(second)) == ("1", "2")
    version = tracking.client(uri).get_model_version_by_alias(name, "champion")
    assert str(version.version) == "2" and version.tags == {"k": "v"}


def test_artifacts_go_beside_the_database_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver's working directory may be a temporary copy (`ray job submit`): the experiment
    would keep pointing there after it is deleted, while the database lives on."""
    store, elsewhere = tmp_path / "store", tmp_path / "job-copy"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    experiment = tracking.client(uri).get_experiment(tracking.experiment_id("vitray", uri))
    assert experiment.artifact_location == (store / "mlartifacts" / "vitray").as_uri()


def test_a_databricks_style_experiment_name_stays_in_the_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.client(uri).get_experiment(tracking.experiment_id("/Users/me/vit", uri))
    assert experiment.artifact_location == (tmp_path / "mlartifacts/Users/me/vit").as_uri()


def test_the_default_store_keeps_its_artifacts_under_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment = tracking.client().get_experiment(tracking.experiment_id("vitray"))
    assert experiment.artifact_location == (tmp_path / "runs/mlartifacts/vitray").as_uri()


@pytest.mark.parametrize("query", ["", "?timeout=20"])
def test_a_relative_sqlite_uri_is_handed_out_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    """Ray Train workers and Tune trials run in directories of their own: given the driver's
    `sqlite:///runs/mlflow.db`, each opened another database and failed on the driver's runs
    ("Run with id=... not found")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///runs/mlflow.db{query}")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'runs/mlflow.db'}{query}"


@pytest.mark.parametrize("uri", ["sqlite:////srv/mlflow.db", "http://head:5000", "sqlite://"])
def test_other_uris_are_handed_out_as_given(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.tracking_uri() == uri


def test_the_default_store_is_refused_in_a_submitted_jobs_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ray job submit --working-dir` runs the driver in a temporary copy, on a cluster that may
    add nodes after the job starts (cluster.yaml starts with its head alone)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # What Ray's job supervisor hands the driver it starts.
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    with pytest.raises(RuntimeError, match="ray job submit --working-dir"):
        tracking.tracking_uri()
    assert not (tmp_path / "runs").exists()


def test_a_run_in_a_deleted_experiment_is_refused_by_name(tmp_path: Path) -> None:
    """Deleted in the UI, the experiment keeps its name; MLflow's own error named only its id."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.start_run("first", uri=uri)
    tracking.client(uri).delete_experiment(tracking.experiment_id(uri=uri))
    with pytest.raises(RuntimeError, match=r"'vitray' \(id 1\) is deleted: restore it"):
        tracking.start_run("second", uri=uri)
