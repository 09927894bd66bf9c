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
