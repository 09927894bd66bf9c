"""Pretraining on a simulated two-node cluster: DDP replicas, a SIGKILLed worker, a lost node.

Each node contributes one `trainer` resource, so the two Ray Train workers land on different
nodes, as on a real cluster. MLflow runs on a real SQLite backend in the test's folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
import pytest
import ray
import torch
from mlflow.entities import Run
from ray.cluster_utils import Cluster
from ray.train import TrainingFailedError

if TYPE_CHECKING:
    from conftest import S3Server

from jobs import pretrain as pretrain_job
from pipelines import pretrain, tracking
from pipelines.ingest import Augmentation, DataQualityError, IngestConfig
from pipelines.pretrain import PretrainConfig
from pipelines.training import warmup_then_decay
from vit import checkpoint as vit_checkpoint
from vit.config import ViTConfig


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, moto_s3: S3Server) -> Iterator[Cluster]:
    """Started after the S3 server so that every node's workers inherit its AWS variables."""
    root = tmp_path_factory.mktemp("pretrain")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 300 * 2**20},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"trainer": 1}, object_store_memory=150 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    del os.environ["MLFLOW_TRACKING_URI"]


def tiny_config(tmp_path: Path, run_name: str, **overrides: object) -> PretrainConfig:
    fields = dict(
        dataset="digits",
        model=ViTConfig(image_size=8, patch_size=2, width=32, depth=2, mlp_dim=64, num_heads=2),
        augmentation=Augmentation(crop_scale=(0.8, 1.0), hflip=False),
        ingest=IngestConfig(batch_size=512),
        steps=40,
        global_batch_size=32,
        micro_batch_size=16,
        learning_rate=1e-2,
        weight_decay=0.01,
        warmup_steps=4,
        eval_every=20,
        checkpoint_every=10,
        log_every=5,
        num_workers=2,
        extra_resources_per_worker={"trainer": 1},
        storage_path=str(tmp_path / "train"),
        run_name=run_name,
        max_failures=2,
    )
    fields.update(overrides)
    return PretrainConfig(**fields)


def schedule_rates(config: PretrainConfig) -> list[float]:
    """The learning rate of every step of an uninterrupted run of `config`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    schedule = warmup_then_decay(optimizer, config.warmup_steps, config.steps, config.decay)
    rates = []
    for _ in range(config.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


def logged_steps(run_id: str, key: str = "train/loss") -> list[int]:
    return [m.step for m in tracking.client().get_metric_history(run_id, key)]


def mlflow_run(config: PretrainConfig) -> Run:
    """The one MLflow run of the config's run name."""
    (run,) = tracking.client().search_runs(
        [tracking.experiment_id(config.experiment)],
        filter_string=f"tags.vitray_run_name = '{config.run_name}'",
    )
    return run


def run_in_background(config: PretrainConfig) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = pretrain.run(config)
        except BaseException as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for_checkpoint(config: PretrainConfig, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not pretrain.has_checkpoints(config):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


def train_worker_pids(cluster: Cluster) -> list[int]:
    """This cluster's training workers: processes titled `ray::RayTrainWorker...` (Ray names
    its actor processes) whose parent is one of the cluster's raylets."""
    raylets = {
        str(info.process.pid)
        for node in cluster.list_all_nodes()
        for info in node.all_processes.get("raylet", [])
    }
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            status = (proc / "status").read_text()
            parent = next(line.split()[1] for line in status.splitlines() if line[:5] == "PPid:")
            if parent in raylets and b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def test_ddp_on_two_nodes_keeps_replicas_identical_and_learns(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Three epochs of digits, each with fresh crops: after two (80 steps) dev accuracy was
    # 0.22-0.25, too close to the bar.
    # 31 does not split over 2 workers: they take 2 micro-batches of 8 each, a global batch of 32.
    config = tiny_config(
        tmp_path,
        "ddp",
        steps=120,
        eval_every=40,
        checkpoint_every=40,
        global_batch_size=31,
        micro_batch_size=8,
    )
    result = pretrain.run(config)
    assert result.metrics["step"] == 120
    assert result.metrics["world_size"] == 2
    assert result.metrics["ddp/replica_divergence"] == 0.0
    assert result.metrics["dev/accuracy"] > 0.25  # ten classes: chance is 0.1
    losses = [m.value for m in tracking.client().get_metric_history(result.run_id, "train/loss")]
    assert sum(losses[-3:]) / 3 < losses[0]  # averaged: one batch's loss is noisy
    assert logged_steps(result.run_id) == list(range(5, 121, 5))
    assert logged_steps(result.run_id, "dev/accuracy") == [40, 80, 120]  # its own step record
    logged = tracking.client().get_run(result.run_id).data.metrics
    assert logged["world_size"] == 2 and logged["train/global_batch"] == 32
    assert Path(result.checkpoint_path, "model", "model.safetensors").is_file()
    (curves,) = tracking.client().list_artifacts(result.run_id, "figures")
    assert curves.path == "figures/curves.png" and curves.file_size > 1000
    # A resume that would learn otherwise is refused on the checkpoint's own record of its
    # settings, even with the run gone from MLflow.
    tracking.client().delete_run(result.run_id)
    with pytest.raises(ValueError, match="other learning_rate; resume"):
        pretrain.run(dataclasses.replace(config, learning_rate=3e-3))


def test_step_layout_splits_the_batch_evenly_at_any_worker_count() -> None:
    assert pretrain.step_layout(4096, 8, 256) == (2, 256)
    assert pretrain.step_layout(4096, 4, 256) == (4, 256)
    assert pretrain.step_layout(128, 1, 128) == (1, 128)
    for world in range(1, 9):
        accumulation, micro = pretrain.step_layout(4096, world, 256)
        assert micro <= 256
        assert 4096 <= world * accumulation * micro < 4096 + world * accumulation


def test_a_train_split_too_small_for_one_step_is_refused_before_training() -> None:
    small = dict(global_batch_size=128, micro_batch_size=64)
    pretrain.check_train_rows(None, PretrainConfig(**small))  # a folder's size is not known
    pretrain.check_train_rows(128, PretrainConfig(**small, num_workers=2))  # 64 each
    pretrain.check_train_rows(100, PretrainConfig(**small, num_workers=(1, 2)))  # on one
    pretrain.check_train_rows(100, PretrainConfig(**small, num_workers=(2, 1)))  # Ray refuses it
    with pytest.raises(
        ValueError,
        match=r"holds 100 images, too few for 2 worker\(s\) to draw a micro-batch of 64 each",
    ):
        pretrain.check_train_rows(100, PretrainConfig(**small, num_workers=2))
    with pytest.raises(ValueError, match="holds 40 images"):
        pretrain.check_train_rows(40, PretrainConfig(**small))


def test_the_learning_rate_warms_up_linearly_then_decays_to_zero() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    for decay, halfway in (("cosine", 0.5), ("linear", 0.5)):
        optimizer = torch.optim.SGD([parameter], lr=2.0)
        schedule = warmup_then_decay(optimizer, warmup_steps=4, total_steps=14, decay=decay)
        rates = []
        for _ in range(16):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert rates[:5] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])  # step 4: the peak
        assert rates[9] == pytest.approx(2.0 * halfway)  # halfway through the decay
        assert rates[14:] == pytest.approx([0.0, 0.0])  # zero at total_steps, and after
    cosine = warmup_then_decay(torch.optim.SGD([parameter], lr=1.0), 0, 10, "cosine")
    linear = warmup_then_decay(torch.optim.SGD([parameter], lr=1.0), 0, 10, "linear")
    assert cosine.lr_lambdas[0](2) > linear.lr_lambdas[0](2)  # cosine stays high for longer


def test_a_failed_run_ends_failed_in_mlflow(
    cluster: Cluster, tmp_path: Path, digits_folder: Path
) -> None:
    # No full micro-batch of 4,096 in the folder's training split: the worker raises. (A
    # folder's size is known only by reading it; a catalog set's is refused up front.)
    config = tiny_config(
        tmp_path,
        "too-small",
        dataset=str(digits_folder),
        num_workers=1,
        global_batch_size=4096,
        micro_batch_size=4096,
        max_failures=0,
    )
    with pytest.raises(TrainingFailedError, match="no full batch of 4096"):
        pretrain.run(config)
    run = mlflow_run(config)
    assert run.info.status == "FAILED"
    assert run.data.metrics["data/rows_read"] > 0  # what it read is recorded all the same


def test_a_diverging_run_fails_once_naming_the_step_and_is_not_retried(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rate of 1e30 sends the weights past float32 at the first update, the gradients to NaN
    at the second; retried from its checkpoint of step 1, it would diverge again."""
    config = tiny_config(
        tmp_path, "diverging", learning_rate=1e30, warmup_steps=0, checkpoint_every=1
    )
    with pytest.raises(FloatingPointError, match=r"gradient norm became nan at step 2 \(lr "):
        pretrain.run(config)
    run = mlflow_run(config)
    assert run.info.status == "FAILED"
    assert run.data.tags[pretrain.DIVERGED_TAG].startswith("the gradient norm became nan")
    assert logged_steps(run.info.run_id, "train/lr") == []  # no attempt reached step 5

    # The job refuses to start the name afresh, and to "resume" a name that has no checkpoint.
    demo = Path(__file__).resolve().parents[1] / "configs" / "pretrain_demo.py"
    job = ["--config", str(demo), "--set", f"storage_path={tmp_path / 'train'}"]
    for argv, message in [
        ([*job, "--set", "run_name=diverging"], "'diverging' already has checkpoints"),
        (
            [*job, "--set", "run_name=divergin", "--resume"],
            "'divergin' has no checkpoint under .* \\(runs with checkpoints there: diverging\\)",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            pretrain_job.main(argv)
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)


def test_a_run_on_too_many_unreadable_images_ends_failed_naming_them(
    cluster: Cluster, tmp_path: Path, digits_folder: Path
) -> None:
    """24 digits and 2 broken files: a small set the streaming check never judges."""
    config = tiny_config(
        tmp_path,
        "broken",
        dataset=str(digits_folder),
        steps=2,
        warmup_steps=1,
        global_batch_size=8,
        micro_batch_size=8,
        num_workers=1,
        eval_every=2,
        checkpoint_every=2,
        log_every=1,
    )
    with pytest.raises(DataQualityError, match=r"\d of \d+ images unreadable \("):
        pretrain.run(config)
    run = mlflow_run(config)
    assert run.info.status == "FAILED"
    assert run.data.metrics["data/bad_images"] >= 1  # of the rows its 2 steps read
    assert pretrain.has_checkpoints(config)  # what it trained is kept
    # A rerun resumes at its last step and reads nothing: the earlier reads still count.
    with pytest.raises(DataQualityError, match=r"\d of \d+ images unreadable \("):
        pretrain.run(config)
    assert mlflow_run(config).data.metrics["data/bad_images"] >= 1  # not reset to 0


def test_a_resume_may_change_where_it_runs_and_how_settings_are_spelled() -> None:
    started = tiny_config(Path("runs"), "spelled", betas=(0.9, 0.95), weight_decay=0.0)
    logged = tracking.flatten(started)
    for same in (
        dataclasses.replace(started, betas=[0.9, 0.95], weight_decay=0),  # as --set may type it
        dataclasses.replace(started, num_workers=(1, 4), micro_batch_size=4),
        dataclasses.replace(started, ingest=IngestConfig(batch_size=64, max_bad_fraction=0.05)),
        dataclasses.replace(started, ingest=IngestConfig(min_rows_before_check=100)),
    ):
        pretrain._refuse_another_recipe(same, logged)
    flipped = dataclasses.replace(started.augmentation, hflip=True)
    changed = dataclasses.replace(started, warmup_steps=8, augmentation=flipped)
    with pytest.raises(ValueError, match=r"other augmentation\.hflip, warmup_steps; resume"):
        pretrain._refuse_another_recipe(changed, logged)


def test_a_setting_ray_refuses_ends_the_run_failed(cluster: Cluster, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "refused", num_workers=(2, 1))
    with pytest.raises(ValueError, match="min_workers=2 must be <= max_workers=1"):
        pretrain.run(config)
    run = mlflow_run(config)
    assert run.info.status == "FAILED"  # not RUNNING for ever


def test_the_default_local_tracking_store_is_refused_on_a_cluster_of_several_nodes(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RuntimeError, match="MLFLOW_TRACKING_URI is not set on a Ray cluster"):
        tracking.tracking_uri()


def test_counts_and_periods_below_one_are_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_every, log_every must be at least 1"):
        tiny_config(tmp_path, "never", eval_every=0, log_every=0)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_killed_worker_resumes_from_its_checkpoint_without_duplicate_steps(
    cluster: Cluster, tmp_path: Path, strategy: str
) -> None:
    config = tiny_config(tmp_path, f"killed-{strategy}", steps=60, strategy=strategy)
    thread, outcome = run_in_background(config)
    wait_for_checkpoint(config)
    victims = train_worker_pids(cluster)
    assert victims, "no training worker process found"
    for pid in victims:  # every one: a worker of an earlier run may still be on its way out
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.metrics["step"] == 60
    steps = logged_steps(result.run_id)
    assert steps == list(range(5, 61, 5)), steps  # one run, continuous, nothing logged twice
    resumed = tracking.client().get_metric_history(result.run_id, "train/resumed_at_step")
    assert len(resumed) == 1 and 0 < resumed[0].value < 60  # it did restart, from a checkpoint
    # The schedule went on where the checkpoint left it, not from a second warmup.
    logged = tracking.client().get_metric_history(result.run_id, "train/lr")
    expected = schedule_rates(config)
    assert [m.value for m in logged] == pytest.approx([expected[m.step - 1] for m in logged])
    # Whole weights either way (FSDP's shards gathered), loadable without the run.
    model, _ = vit_checkpoint.load(Path(result.checkpoint_path, "model"))
    assert model.config == config.model.replace(num_classes=10)
    assert ("ddp/replica_divergence" in result.metrics) == (strategy == "ddp")


def test_an_elastic_run_finishes_on_the_worker_left_when_a_node_goes(
    cluster: Cluster, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path, "elastic", steps=60, num_workers=(1, 2))
    thread, outcome = run_in_background(config)
    wait_for_checkpoint(config)
    doomed = next(node for node in cluster.worker_nodes)
    cluster.remove_node(doomed)
    try:
        thread.join(timeout=600)
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert result.metrics["step"] == 60
        assert result.metrics["world_size"] == 1
        resumed = tracking.client().get_metric_history(result.run_id, "train/resumed_at_step")
        assert len(resumed) == 1 and 0 < resumed[0].value < 60  # went on from its checkpoint
    finally:  # the module's later tests need both nodes
        cluster.add_node(num_cpus=1, resources={"trainer": 1}, object_store_memory=150 * 2**20)


def test_checkpoints_go_to_object_storage_and_a_rerun_without_them_starts_afresh(
    cluster: Cluster, moto_s3: S3Server
) -> None:
    config = tiny_config(
        Path("unused"),
        "s3",
        steps=10,
        num_workers=1,
        eval_every=10,
        storage_path=f"s3://{moto_s3.bucket}/checkpoints",
    )
    result = pretrain.run(config)
    assert result.checkpoint_path.startswith(f"s3://{moto_s3.bucket}/checkpoints/s3/checkpoint_")
    assert pretrain.has_checkpoints(config)
    key = result.checkpoint_path.removeprefix("s3://")
    listing = moto_s3.filesystem.get_file_info(pafs.FileSelector(f"{key}/model", recursive=False))
    assert sorted(info.base_name for info in listing) == ["model.safetensors", "vit.json"]
    # Resuming restores the optimizer's settings: other ones would be silently ignored.
    with pytest.raises(ValueError, match=r"trained with other learning_rate, model\.width; resume"):
        pretrain.run(
            dataclasses.replace(
                config, learning_rate=1e-3, model=config.model.replace(width=64), num_workers=2
            )
        )

    # The checkpoints are gone: the rerun trains from step 0 again, so it gets its own MLflow
    # run rather than having every step dropped as already logged in the old one.
    moto_s3.filesystem.delete_dir(f"{moto_s3.bucket}/checkpoints/s3")
    assert not pretrain.has_checkpoints(config)
    rerun = pretrain.run(config)
    assert rerun.run_id != result.run_id
    assert logged_steps(rerun.run_id) == [5, 10]
