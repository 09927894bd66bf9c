"""`--set` overrides on config files, dotted paths included."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import serve as serve_job
from jobs.common import load_config

PIPELINE = str(Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.py")


def test_dotted_keys_reach_nested_fields_and_values_are_literals() -> None:
    config = load_config(
        PIPELINE,
        smoke=True,
        overrides=[
            "pretrain.num_workers=2",
            "pretrain.extra_resources_per_worker={'trainer': 1}",
            "finetune.learning_rates=(0.1,)",
            "data_dir=/tmp/data",
        ],
    )
    assert config.pretrain.num_workers == 2
    assert config.pretrain.extra_resources_per_worker == {"trainer": 1}
    assert config.finetune.learning_rates == (0.1,)
    assert config.data_dir == "/tmp/data"  # strings stay strings
    assert config.pretrain.model.width == 128  # untouched siblings survive


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.no_such_field=1", "no field 'no_such_field'"),
        ("pretrain.steps.deeper=1", "int has no field 'deeper'"),
        ("pretrain.steps=ten", "not a Python literal"),
        ("pretrain.model.grid_size=(2,2)", "no field 'grid_size'"),  # a property, not a field
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        load_config(PIPELINE, smoke=True, overrides=[override])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "runs/x/model"], "--model takes NAME=REF"),
        (["--model", "name="], "--model takes NAME=REF"),
        (["--datasets", "digits", "--detach"], "--detach needs a cluster"),
    ],
)
def test_serve_job_refuses_options_that_would_fail_later(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        serve_job.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_job_makes_paths_absolute_and_keeps_registry_uris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert serve_job.model_reference("runs/ckpt/model") == str(tmp_path / "runs/ckpt/model")
    assert serve_job.model_reference("models:/vit-digits@champion") == "models:/vit-digits@champion"
    assert serve_job.model_reference("models:/vit-digits/3") == "models:/vit-digits/3"
