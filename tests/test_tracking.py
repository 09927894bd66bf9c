"""MLflow run status follows how a stage ended."""

from __future__ import annotations

import contextlib
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
