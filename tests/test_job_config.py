"""`--set` overrides on config files, dotted paths included."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        load_config(PIPELINE, smoke=True, overrides=[override])
