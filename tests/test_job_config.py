"""The jobs' command lines: `--set` overrides on config files (dotted paths included), checks
made before Ray starts, and what `--help` tells."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest
import ray

from jobs import analyze as analyze_job
from jobs import export as export_job
from jobs import fewshot as fewshot_job
from jobs import import_weights as import_weights_job
from jobs import pipeline as pipeline_job
from jobs import prepare as prepare_job
from jobs import pretrain as pretrain_job
from jobs import query as query_job
from jobs import serve as serve_job
from jobs import tune as tune_job
from jobs.common import checked_checkpoint, load_config
from pipelines.finetune import FinetuneConfig
from pipelines.pipeline import PipelineConfig
from pipelines.pretrain import PretrainConfig
from vit import VisionTransformer, ViTConfig
from vit import checkpoint as vit_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIPELINE = str(CONFIGS / "pipeline_demo.py")


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
    """jobs/pipeline.py gives `add_common_arguments` a default config: with none given it loads
    the demo pipeline, which refuses a field it lacks before Ray starts."""
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


def help_text(job: ModuleType, capsys: pytest.CaptureFixture[str]) -> str:
    """What `python -m jobs.<job> --help` prints."""
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_help(job: ModuleType, option: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The help of one option, its wrapped lines joined."""
    text = help_text(job, capsys)
    match = re.search(rf"^  {re.escape(option)}\b(.*?)(?=^  -|\Z)", text, re.M | re.S)
    assert match, f"{option} is not in the help of {job.__name__}"
    return " ".join(match.group(1).split())


@pytest.mark.parametrize(
    ("job", "config", "expected"),
    [
        (pretrain_job, "pretrain_demo.py", PretrainConfig),
        (pretrain_job, "pretrain_b16_in21k.py", PretrainConfig),
        (tune_job, "finetune_demo.py", FinetuneConfig),
        (pipeline_job, "pipeline_demo.py", PipelineConfig),
    ],
)
@pytest.mark.parametrize("smoke", [False, True])
def test_the_set_examples_in_a_jobs_help_work_for_that_job(
    job: ModuleType,
    config: str,
    expected: type,
    smoke: bool,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--set pretrain.num_workers=2` is the pipeline's; `jobs.pretrain` has no such field."""
    examples = re.findall(r"\b[a-z_.]+=[^\s;,)]+", option_help(job, "--set", capsys))
    assert len(examples) >= 2 and any("." in example for example in examples)
    for example in examples:
        load_config(str(CONFIGS / config), smoke=smoke, overrides=[example], expected=expected)


@pytest.mark.parametrize(
    ("config", "expected", "example"),
    [  # README, "Each stage on its own": the nested example shown for each job
        ("pretrain_demo.py", PretrainConfig, "model.depth=4"),
        ("pipeline_demo.py", PipelineConfig, "pretrain.num_workers=2"),
    ],
)
def test_the_readme_set_examples_work_for_their_job(
    config: str, expected: type, example: str
) -> None:
    readme = (CONFIGS.parent / "README.md").read_text()
    assert f"`--set {example}`" in readme
    load_config(str(CONFIGS / config), smoke=False, overrides=[example], expected=expected)


def tiny_checkpoint(directory: Path) -> Path:
    """A small randomly initialised model saved as a vit checkpoint."""
    config = ViTConfig(image_size=8, patch_size=4, width=16, depth=1, num_heads=1, mlp_dim=16)
    return vit_checkpoint.save(VisionTransformer(config), directory)


def never_start_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make starting Ray a test failure: what is checked up front must not need it."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def init(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", init)


CHECKPOINT_JOBS = {
    "tune": (
        tune_job,
        ["--config", str(CONFIGS / "finetune_demo.py"), "--smoke", "--set", "checkpoint={}"],
    ),
    "fewshot": (fewshot_job, ["--checkpoint", "{}", "--dataset", "digits"]),
    "analyze": (analyze_job, ["--checkpoint", "{}", "--dataset", "digits"]),
    "export": (export_job, ["--checkpoint", "{}", "--onnx", "model.onnx"]),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_JOBS))
@pytest.mark.parametrize(
    ("folder", "reason"),
    [
        ("no-such-run", "{} does not exist"),
        ("empty", "{} is not a vit checkpoint: vit.json is missing"),
    ],
)
def test_checkpoint_jobs_refuse_a_bad_checkpoint_in_one_line_before_ray_starts(
    name: str, folder: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    never_start_ray(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    job, argv = CHECKPOINT_JOBS[name]
    with pytest.raises(SystemExit) as exit_info:
        job.main([arg.format(folder) for arg in argv])
    assert exit_info.value.code == f"[{name}] {reason.format(folder)}"


def test_a_run_folder_stands_for_its_latest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "pretrain-demo"
    for step in ("000001", "000002"):
        tiny_checkpoint(run / f"checkpoint_{step}" / "model")
    latest = run / "checkpoint_000002" / "model"
    assert checked_checkpoint(str(run), "fewshot") == latest
    assert checked_checkpoint(str(latest), "fewshot") == latest
    assert checked_checkpoint(str(latest.parent), "fewshot") == latest


def test_serve_takes_a_run_folder_as_its_latest_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: a CKPT may be a run's folder; serve resolves it as the other jobs do."""
    never_start_ray(monkeypatch)
    run = tmp_path / "pretrain-demo-smoke"
    latest = tiny_checkpoint(run / "checkpoint_000001" / "model")
    assert serve_job.model_reference(str(run)) == str(latest.resolve())
    with pytest.raises(AssertionError, match="Ray was started"):  # every check passed
        serve_job.main(["--model", f"tiny={run}"])
    with pytest.raises(SystemExit, match=r"^\[serve\] cannot serve tiny: s3://b/run: checkpoints"):
        serve_job.main(["--model", "tiny=s3://b/run"])


def test_analyze_names_the_local_files_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The MLflow artifact path (`figures/x.png`) is not where the file is on this machine."""
    checkpoint = tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    result = {"run_id": "r1", "figures": ["figures/rollout.png"], "mean_attention_distance": [1.0]}
    monkeypatch.setattr(analyze_job, "connect", lambda address: True)
    monkeypatch.setattr(analyze_job, "run_analysis", lambda *args, **kwargs: result)
    argv = ["--checkpoint", str(checkpoint), "--dataset", "digits", "--out", str(out)]
    assert analyze_job.main(argv) == 0
    listed = [line.strip() for line in capsys.readouterr().out.splitlines() if line[:2] == "  "]
    assert listed == [str(out / "rollout.png")]


@pytest.mark.parametrize(
    ("job", "option", "expected"),
    [
        (serve_job, "--host", "default: 127.0.0.1"),
        (serve_job, "--port", "default: 8000"),
        (serve_job, "--max-batch-size", "default: 16"),
        (serve_job, "--address", "Ray cluster"),
        (query_job, "--url", "default: http://127.0.0.1:8000"),
        (query_job, "--token", "default: $VITRAY_API_TOKEN"),
        (query_job, "--timeout", "default: 60"),
        (fewshot_job, "--shots", "default: 1 5 10 25"),
        (fewshot_job, "--checkpoint", "pretraining run"),
        (analyze_job, "--checkpoint", "pretraining run"),
        (analyze_job, "--out", "default: runs/analysis"),
        (prepare_job, "--rows-per-shard", "default: 10000"),
        (pipeline_job, "--config", "default: configs/pipeline_demo.py"),
        (import_weights_job, "--alias", "default: imported"),
    ],
)
def test_options_tell_what_they_do_and_their_default(
    job: ModuleType,
    option: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VITRAY_API_TOKEN", "secret-token")
    text = option_help(job, option, capsys)
    assert expected in text
    assert "secret-token" not in text  # a token's value is never printed
