"""`--set` overrides on config files, dotted paths included."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest
import ray

from jobs import pipeline as pipeline_job
from jobs import pretrain as pretrain_job
from jobs import serve as serve_job
from jobs import tune as tune_job
from jobs.common import load_config
from pipelines.pipeline import PipelineConfig

PIPELINE = str(Path(__file__).resolve().parents[1] / "configs" / "pipeline_demo.py")


def test_dotted_keys_reach_nested_fields_and_values_are_literals() -> None:
    config = load_config(
        PIPELINE,
        smoke=True,
        expected=PipelineConfig,
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
        ("pretrain.steps=ten", "pretrain.steps expects int, got 'ten'"),
        ("pretrain.model.grid_size=(2,2)", "no field 'grid_size'"),  # a property, not a field
        ("finetune.datasets=()", "name at least one dataset in finetune.datasets"),
        ("fewshot_shots=(0,5)", r"shot counts must be at least 1, got \[0, 5\]"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        load_config(PIPELINE, smoke=True, overrides=[override], expected=PipelineConfig)


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
    assert message in usage_error(serve_job, argv, capsys, monkeypatch)


def usage_error(
    job: ModuleType,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """What `job` printed when it refused `argv` with argparse's usage exit (2), no cluster."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        job.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_serve_job_makes_paths_absolute_and_keeps_registry_uris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert serve_job.model_reference("runs/ckpt/model") == str(tmp_path / "runs/ckpt/model")
    assert serve_job.model_reference("models:/vit-digits@champion") == "models:/vit-digits@champion"
    assert serve_job.model_reference("models:/vit-digits/3") == "models:/vit-digits/3"


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ('finetune.datasets=("digits")', "datasets", ("digits",)),  # a bare str: a 1-tuple
        ("finetune.datasets=digits", "datasets", ("digits",)),  # a bare word too
        ("finetune.datasets=['digits', 'tuxpaint']", "datasets", ("digits", "tuxpaint")),
        ("finetune.learning_rates=0.01", "learning_rates", (0.01,)),
        ("finetune.learning_rates=(1, 0.5)", "learning_rates", (1, 0.5)),  # int where float
        ("finetune.image_size=None", "image_size", None),  # Optional
        ("finetune.max_concurrent_trials=2", "max_concurrent_trials", 2),  # None now, int | None
        ("finetune.momentum=1", "momentum", 1),
    ],
)
def test_override_values_that_fit_the_field_type(
    override: str, field: str, expected: object
) -> None:
    config = load_config(PIPELINE, smoke=True, overrides=[override], expected=PipelineConfig)
    value = getattr(config.finetune, field)
    assert value == expected and type(value) is type(expected)


def test_literal_and_union_fields_take_their_members() -> None:
    overrides = [
        "pretrain.decay=linear",
        "pretrain.num_workers=(1, 2)",
        "pretrain.betas=[0.9, 0.95]",  # a list for a fixed tuple
        "pretrain.model.image_size=42",  # an int is a square
    ]
    config = load_config(PIPELINE, smoke=True, overrides=overrides, expected=PipelineConfig)
    assert config.pretrain.decay == "linear" and config.pretrain.num_workers == (1, 2)
    assert config.pretrain.betas == (0.9, 0.95) and config.pretrain.model.image_size == (42, 42)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.steps=1e3", "pretrain.steps expects int, got 1000.0 (float)"),
        ("pretrain.steps=True", "pretrain.steps expects int, got True (bool)"),
        ("scratch_baseline=0", "scratch_baseline expects bool, got 0 (int)"),
        ("pretrain.use_gpu='yes'", "pretrain.use_gpu expects bool, got 'yes' (str)"),
        ("pretrain.steps=None", "pretrain.steps expects int, got None"),
        ("pretrain.decay=step", "pretrain.decay expects Literal['cosine', 'linear'], got 'step'"),
        ("pretrain.betas=(0.9,)", "pretrain.betas expects tuple[float, float], got (0.9,)"),
        ("fewshot_shots=(1, 'a')", "fewshot_shots expects tuple[int, ...], got (1, 'a') (tuple)"),
        ("pretrain.steps=abc", "pretrain.steps expects int, got 'abc' (str)"),
        ("pretrain.model.image_size=32", "image size (32, 32) is not divisible by patch size 7"),
        ("pretrain.model=1", "pretrain.model expects ViTConfig, got 1"),
    ],
)
def test_override_values_of_another_type_are_refused(override: str, message: str) -> None:
    with pytest.raises(SystemExit, match=re.escape(message)):
        load_config(PIPELINE, smoke=True, overrides=[override], expected=PipelineConfig)


@pytest.mark.parametrize("job", [tune_job, pretrain_job])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: --config"),
        (["--config", "configs/no_such_config.py"], "no such config file"),
    ],
)
def test_config_jobs_report_usage_errors(
    job: ModuleType,
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert message in usage_error(job, argv, capsys, monkeypatch)


def test_a_config_file_for_another_job_is_refused_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit, match="makes a PipelineConfig; this job takes a FinetuneConfig"):
        tune_job.main(["--config", PIPELINE, "--smoke"])
    assert not ray.is_initialized()


def test_the_pipeline_job_loads_its_default_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs/pipeline.py sets its --config default after `add_common_arguments`: with none
    given it loads the demo pipeline, which refuses a field it lacks before Ray starts."""
    monkeypatch.chdir(Path(PIPELINE).parents[1])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit, match="PipelineConfig has no field 'no_such_field'"):
        pipeline_job.main(["--smoke", "--set", "no_such_field=1"])
    assert not ray.is_initialized()


def test_settings_checked_together_may_be_set_in_any_order() -> None:
    """The smoke demo fine-tunes for 20 steps after 2 of warmup: `steps=2` alone would be
    refused (a warmup as long as the run), so the two overrides are judged together."""
    overrides = ["finetune.steps=2", "finetune.warmup_steps=1"]
    config = load_config(PIPELINE, smoke=True, overrides=overrides, expected=PipelineConfig)
    assert (config.finetune.steps, config.finetune.warmup_steps) == (2, 1)
    refused = ["finetune.steps=2", "finetune.warmup_steps=3", "data_dir=/tmp/data"]
    message = "--set finetune.steps=2 finetune.warmup_steps=3: warmup_steps must be fewer than"
    with pytest.raises(SystemExit, match=re.escape(message)):
        load_config(PIPELINE, smoke=True, overrides=refused, expected=PipelineConfig)
