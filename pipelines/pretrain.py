"""Pretraining on Ray Train: DDP or FSDP over streaming patch tokens, checkpoints, resume.

The same `run()` trains on a 2-core laptop (gloo, fp32) and on a GPU cluster (NCCL, bf16). The
global batch size is fixed by the config whatever the number of workers: gradient accumulation
fills the gap, so an elastic run that loses a worker keeps optimising the same objective (at a
worker count that does not divide it, the nearest larger batch that does; see `step_layout`).

Checkpoints hold the `vit` checkpoint directory plus `train_state.pt` (optimizer, scheduler, step,
samples seen), whole and keyed by parameter name under either strategy (see `parallel`). Ray
Train restarts the worker group from the latest one after a failure (`max_failures`), and a rerun
with the same `run_name` and `storage_path` resumes it. A divergence (a non-finite gradient norm)
ends the run at once instead: from the same checkpoint it would diverge again.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from mlflow.entities import RunData
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.data import RandomSeedConfig
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from pipelines import figures, parallel, tracking
from pipelines.datasets import describe, read_dataset
from pipelines.ingest import (
    Augmentation,
    IngestConfig,
    judge_bad_fraction,
    start_error_tracker,
    to_tokens,
)
from pipelines.parallel import Strategy, unwrap
from pipelines.training import (
    Decay,
    autocast,
    check_decay,
    check_grad_clip,
    check_schedule,
    clip_gradients,
    count_correct,
    parameter_groups,
    storage_uri,
    warmup_then_decay,
)
from vit import checkpoint as vit_checkpoint
from vit.config import ViTConfig
from vit.model import VisionTransformer

TRAIN_STATE_FILE = "train_state.pt"
CURVES = ("train/loss", "train/lr", "train/images_per_s", "dev/accuracy")  # drawn after the run


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on; defaults follow the paper's Table 3."""

    dataset: str = "fashion-mnist"
    model: ViTConfig = field(default_factory=lambda: ViTConfig.from_name("B/16"))
    augmentation: Augmentation = field(default_factory=Augmentation)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    steps: int = 10_000
    global_batch_size: int = 4096
    micro_batch_size: int = 64  # per worker and forward pass; accumulation covers the rest
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1_000
    decay: Decay = "cosine"
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int | tuple[int, int] = 1  # a (min, max) range makes the run elastic
    strategy: Strategy = "ddp"  # "fsdp" shards the weights and Adam state: ViT-L/H
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    extra_resources_per_worker: dict[str, float] = field(default_factory=dict)
    storage_path: str = "runs/train"  # local folder or s3:// URI shared by all nodes
    run_name: str = "pretrain"
    max_failures: int = 3
    experiment: str = tracking.DEFAULT_EXPERIMENT
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse counts that cannot work here, not in the workers: they divide by them, and
        Ray would retry each failing worker `max_failures` times before the error showed."""
        positive = (
            "steps",
            "global_batch_size",
            "micro_batch_size",
            "keep_checkpoints",
            "eval_every",
            "checkpoint_every",
            "log_every",
        )
        wrong = [name for name in positive if getattr(self, name) < 1]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} must be at least 1")
        # Each would train silently wrong (a zero rate never moves, see also the checks called)
        # or fail only in the workers, after Ray's retries.
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        check_grad_clip(self.grad_clip)
        check_schedule(self.warmup_steps, self.steps)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be 0 or more, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.label_smoothing <= 1:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {self.label_smoothing}")
        check_decay(self.decay)
        parallel.check_strategy(self.strategy)


# The MLflow tag in which rank 0 records why the run diverged; `run` raises its message.
DIVERGED_TAG = "vitray_diverged"

# What a resumed run may change: where and how wide it runs, not what it learns. (A changed
# limit on unreadable images applies to the reads of every invocation, see `run`.)
RESUMABLE_SETTINGS = frozenset(
    {
        "num_workers",
        "strategy",
        "use_gpu",
        "cpus_per_worker",
        "extra_resources_per_worker",
        "micro_batch_size",
        "max_failures",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "ingest.batch_size",
        "ingest.concurrency",
        "ingest.max_bad_fraction",
        "ingest.min_rows_before_check",
    }
)


@dataclass(frozen=True)
class PretrainResult:
    """What the next stage needs: where the weights are and which MLflow run made them."""

    checkpoint_path: str
    run_id: str
    metrics: dict[str, float]


def run(
    config: PretrainConfig,
    *,
    parent_run_id: str | None = None,
    storage_filesystem: Any = None,
) -> PretrainResult:
    """Pretrain `config.model` on `config.dataset` and return the final checkpoint."""
    info = describe(config.dataset)
    check_train_rows((info.split_sizes or {}).get("train"), config)
    model_config = config.model.replace(num_classes=len(info.class_names))
    tracker = start_error_tracker()
    fs, storage = _storage(config, storage_filesystem)
    dev = to_tokens(
        read_dataset(config.dataset, "dev"), model_config, ingest=config.ingest, tracker=tracker
    )
    uri = tracking.tracking_uri()
    latest = _latest_checkpoint(config.run_name, fs, storage)
    train = _train_rows(config, model_config, tracker, latest)
    run_id = _find_or_start_run(config, uri, parent_run_id, latest, fs, storage)
    loop_config = {
        "config": config,
        "model_config": model_config,
        "class_names": list(info.class_names),
        "run_id": run_id,
        "tracking_uri": uri,
        "tracker": tracker,
    }
    resources = {"CPU": config.cpus_per_worker, **config.extra_resources_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    with tracking.ending(run_id, uri):  # also when Ray refuses a setting below
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=config.num_workers,
                use_gpu=config.use_gpu,
                resources_per_worker=resources,
            ),
            run_config=RunConfig(
                name=config.run_name,
                storage_path=storage,
                storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=config.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            ),
            datasets={"train": train, "dev": dev},
        )
        mlflow = tracking.client(uri)
        try:
            result = trainer.fit()
        except Exception:
            # A failed run (the streaming check on unreadable images, a worker out of retries)
            # records what it read too, never in place of its own error.
            with contextlib.suppress(Exception):
                _log_reads(mlflow, run_id, tracker)
            raise
        record, reads, samples = _log_reads(mlflow, run_id, tracker)
        diverged = record.tags.get(DIVERGED_TAG)
        if diverged is not None:
            raise FloatingPointError(diverged)
        # The streaming check judges a large corpus early; this one judges every row read, so a
        # small dataset with too many unreadable images is not passed on as a model.
        judge_bad_fraction(reads["data/rows_read"], reads["data/bad_reads"], samples, config.ingest)
        if result.checkpoint is None:
            raise RuntimeError(f"pretraining run {config.run_name} produced no checkpoint")
        metrics = {k: float(v) for k, v in (result.metrics or {}).items() if _is_number(v)}
        with result.checkpoint.as_directory() as directory:
            mlflow.log_artifacts(run_id, str(Path(directory) / "model"), "checkpoint")
        history = {
            key: [(m.step, m.value) for m in mlflow.get_metric_history(run_id, key)]
            for key in CURVES
        }
        figures.log_figure(mlflow, run_id, figures.training_curves(history), "figures/curves.png")
    path = storage_uri(result.checkpoint.path, config.storage_path)
    return PretrainResult(path, run_id, metrics)


def _log_reads(
    mlflow: MlflowClient, run_id: str, tracker: ray.actor.ActorHandle
) -> tuple[RunData, dict[str, int], list[tuple[str, str]]]:
    """Log what this invocation read (see `_read_totals`) and examples of unreadable images.

    Returns the run's record as the workers left it, the totals, and the examples.
    """
    errors = ray.get(tracker.summary.remote())
    record = mlflow.get_run(run_id).data
    reads = _read_totals(record.metrics, errors)
    for key, value in reads.items():
        mlflow.log_metric(run_id, key, value)
    if errors["samples"]:
        mlflow.log_dict(run_id, {"bad_images": errors["samples"]}, "data_errors.json")
    return record, reads, errors["samples"]


def _read_totals(earlier: dict[str, float], errors: dict[str, Any]) -> dict[str, int]:
    """This invocation's reads (`DataErrorTracker.summary`) with those that the run's earlier
    invocations logged (`earlier`): a resume reads only what is left, and one that already ran
    every step reads nothing.

    Rows and reads add up. Distinct unreadable images do not (a resume meets the same ones
    again), so the run keeps the most any invocation met: at least that many are unreadable,
    never the zero of a resume that read nothing.
    """
    return {
        "data/rows_read": int(earlier.get("data/rows_read", 0)) + errors["rows_read"],
        "data/bad_reads": int(earlier.get("data/bad_reads", 0)) + errors["bad_reads"],
        "data/bad_images": max(int(earlier.get("data/bad_images", 0)), errors["bad"]),
    }


def _train_rows(
    config: PretrainConfig,
    model_config: ViTConfig,
    tracker: ray.actor.ActorHandle,
    latest: dict | None,
) -> ray.data.Dataset:
    """The training rows, their block order reseeded every epoch (reproducibly).

    The seed includes the step the run resumes from (`latest`: Ray Train's latest checkpoint),
    so a rerun with `--resume` does not train on the first epoch's order again. Ray Train also
    re-splits the rows when it restarts workers within a run, and that split starts again at
    this dataset's first-epoch order. A factory that Ray Train calls at each start would avoid
    that, but in Ray 2.60 a dataset built in the Train controller trained worse in our runs of
    the demo config (dev accuracy 0.693 and 0.708, against 0.736-0.753 built on the driver;
    random crops make runs vary, so this is a hint, not proof), cause unknown.
    """
    step = int(latest["metrics"]["step"]) if latest else 0
    seed = RandomSeedConfig(seed=config.seed + step, reseed_after_execution=True)
    return to_tokens(
        read_dataset(config.dataset, "train").randomize_block_order(seed=seed),
        model_config,
        augmentation=config.augmentation,
        ingest=config.ingest,
        tracker=tracker,
    )


def _storage(config: PretrainConfig, filesystem: Any) -> tuple[pafs.FileSystem, str]:
    """The checkpoint storage as (filesystem, path): local folders are made absolute."""
    if filesystem is not None:
        return filesystem, config.storage_path.split("://", 1)[-1]
    if "://" in config.storage_path:
        return pafs.FileSystem.from_uri(config.storage_path)
    return pafs.LocalFileSystem(), str(Path(config.storage_path).resolve())


def has_checkpoints(config: PretrainConfig, storage_filesystem: Any = None) -> bool:
    """Whether Ray Train holds a checkpoint of this run name: a rerun of it resumes from there."""
    fs, root = _storage(config, storage_filesystem)
    return _latest_checkpoint(config.run_name, fs, root) is not None


def checkpointed_runs(config: PretrainConfig, storage_filesystem: Any = None) -> list[str]:
    """The run names under the config's storage path that hold a checkpoint, sorted."""
    fs, root = _storage(config, storage_filesystem)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    folders = fs.get_file_info(pafs.FileSelector(root))
    return sorted(
        folder.base_name
        for folder in folders
        if folder.type == pafs.FileType.Directory
        and _latest_checkpoint(folder.base_name, fs, root) is not None
    )


def _latest_checkpoint(run_name: str, fs: pafs.FileSystem, root: str) -> dict | None:
    """Ray Train's record of the run's latest checkpoint (folder name, metrics), or None.

    A checkpoint folder alone does not count. Ray registers a checkpoint when its controller takes
    in the report, some moments after the folder is written, and resumes only from registered
    ones: those in the run's snapshot file. Ray rewrites that file in place, so a read that
    catches it half-written reads it again.
    """
    path = f"{root}/{run_name}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
    for _ in range(50):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as stream:
            text = stream.read()
        try:
            return json.loads(text).get("latest_checkpoint_result")
        except json.JSONDecodeError:
            time.sleep(0.1)
    raise RuntimeError(f"{path} stayed unreadable for 5 s")


def _find_or_start_run(
    config: PretrainConfig,
    uri: str,
    parent_run_id: str | None,
    latest: dict | None,
    fs: pafs.FileSystem,
    root: str,
) -> str:
    """The MLflow run of the checkpoint Ray Train resumes from, or a new run.

    Resumed steps then extend the curves of the run that logged the steps before them. A run
    with no checkpoint to resume trains from step 0 again, so it gets a run of its own: reusing
    the old one would drop the new steps as already logged.
    """
    mlflow = tracking.client(uri)
    if latest is not None:
        metadata = f"{root}/{config.run_name}/{latest['checkpoint_dir_name']}/model/vit.json"
        with fs.open_input_stream(metadata) as stream:
            provenance = json.loads(stream.read())["provenance"]
        # Checked against the checkpoint's own record, which holds whether or not its MLflow
        # run was deleted or logged to another server.
        _refuse_another_recipe(config, provenance.get("settings", {}))
        run_id = provenance.get("mlflow_run_id")
        run = None
        with contextlib.suppress(MlflowException):  # logged to another tracking server
            run = mlflow.get_run(run_id) if run_id else None
        if run is not None and run.info.lifecycle_stage == "active":  # not deleted in the UI
            mlflow.update_run(run_id, status="RUNNING")  # it ended FAILED or KILLED
            if DIVERGED_TAG in run.data.tags:  # an earlier invocation's reason, not this one's
                mlflow.delete_tag(run_id, DIVERGED_TAG)
            return run_id
    run_id = tracking.start_run(
        config.run_name,
        experiment=config.experiment,
        parent_run_id=parent_run_id,
        tags={
            "vitray_stage": "pretrain",
            "vitray_run_name": config.run_name,
            "vitray_config_hash": tracking.config_hash(config),
            "vitray_dataset": config.dataset,
        },
        uri=uri,
    )
    tracking.log_params(run_id, config, uri)
    return run_id


def learning_settings(config: PretrainConfig) -> dict[str, str]:
    """The flattened settings that decide what a run learns: all but `RESUMABLE_SETTINGS`."""
    return {
        key: value
        for key, value in tracking.flatten(config).items()
        if key not in RESUMABLE_SETTINGS and key.split(".")[0] not in RESUMABLE_SETTINGS
    }


def _refuse_another_recipe(config: PretrainConfig, trained_with: dict[str, str]) -> None:
    """Raise if resuming would train with other settings than the checkpoint's, `trained_with`
    (`tracking.flatten` of its config, whole, as its provenance records it).

    The checkpoint restores the model, the optimizer's learning rate, weight decay and betas,
    and the schedule's position, so a changed learning rate would be silently ignored and the
    run's logged params would describe another run. Where and how wide it runs may change.
    """
    changed = sorted(
        key
        for key, value in learning_settings(config).items()
        if key in trained_with and _as_value(trained_with[key]) != _as_value(value)
    )
    if changed:
        raise ValueError(
            f"run {config.run_name!r} has checkpoints trained with other {', '.join(changed)}; "
            "resume it with the settings it was started with, or give the new settings a new "
            "run_name"
        )


def _as_value(text: str) -> Any:
    """A logged param as the value it spells, so that equal settings compare equal however they
    were typed: `(0.9, 0.95)` and `[0.9, 0.95]`, `0` and `0.0`. Other text stays text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text

    def canonical(item: Any) -> Any:
        if isinstance(item, list | tuple):
            return [canonical(i) for i in item]
        if isinstance(item, int | float) and not isinstance(item, bool):
            return float(item)
        return item

    return canonical(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------- worker side
def _train_loop(loop_config: dict[str, Any]) -> None:
    config: PretrainConfig = loop_config["config"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    accumulation, micro = step_layout(config.global_batch_size, world, config.micro_batch_size)
    global_batch = world * accumulation * micro
    torch.manual_seed(config.seed)  # the initial weights, alike on every worker

    saved = None
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            model, _ = vit_checkpoint.load(Path(directory) / "model")
            # On the CPU: saved tensors would otherwise go back to the GPU they were saved
            # from, rank 0's, which every worker of a node sees as cuda:0.
            state_file = Path(directory) / TRAIN_STATE_FILE
            saved = torch.load(state_file, map_location="cpu", weights_only=True)
    else:
        model = VisionTransformer(loop_config["model_config"])
    model = parallel.distribute(model, config.strategy, device)
    optimizer = torch.optim.AdamW(
        parameter_groups(unwrap(model), config.weight_decay),
        lr=config.learning_rate,
        betas=config.betas,
    )
    scheduler = warmup_then_decay(optimizer, config.warmup_steps, config.steps, config.decay)
    state = {"step": 0, "samples": 0}
    if saved:
        parallel.load_optimizer_state(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        del saved  # the optimizer holds its own copy now
    # Dropout and stochastic depth: other masks on each rank, and after a restart other masks
    # than the steps before it drew.
    torch.manual_seed(config.seed + 1_000_003 * state["step"] + rank + 1)

    metrics_log = dev_log = None
    if rank == 0:  # one log per group of metrics: each skips the steps it already holds
        run_id, uri = loop_config["run_id"], loop_config["tracking_uri"]
        metrics_log = tracking.MetricLog(run_id, uri, "train/loss")
        dev_log = tracking.MetricLog(run_id, uri, "dev/accuracy")
        if restored:  # each recovery is on record: the step its checkpoint held
            resumed = state["step"]
            metrics_log.client.log_metric(run_id, "train/resumed_at_step", resumed, step=resumed)
        print(
            f"[pretrain] {world} worker(s) on {device} ({config.strategy}), "
            f"global batch {global_batch}"
            f" = {world} workers x {accumulation} accumulation x {micro}, "
            f"starting at step {state['step']} of {config.steps}",
            flush=True,
        )
    shard = ray.train.get_dataset_shard("train")
    batches = _endless_batches(shard, micro, device, loop_config["tracker"])
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    window_start, window_images = time.perf_counter(), 0
    run_start = time.perf_counter()
    start_step = state["step"]
    while state["step"] < config.steps:
        step_start = time.perf_counter()
        total_loss = 0.0
        for index in range(accumulation):
            batch = next(batches)
            sync = index == accumulation - 1
            with parallel.gradient_sync(model, sync), autocast(device):
                loss = loss_fn(model(batch["tokens"]), batch["label"]) / accumulation
                loss.backward()
            total_loss += loss.detach()
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step's update used
        try:
            grad_norm = clip_gradients(
                model, config.grad_clip, step=state["step"] + 1, learning_rate=learning_rate
            )
        except FloatingPointError as error:
            # Raised here, Ray Train would restart the workers from the last checkpoint, which
            # diverges again, `max_failures` times over. Every rank gets here at the same step
            # (the norm is global) and ends; the driver raises the reason once (see `run`).
            if rank == 0:
                tracking.client(loop_config["tracking_uri"]).set_tag(
                    loop_config["run_id"], DIVERGED_TAG, str(error)
                )
            return
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] += 1
        state["samples"] += global_batch
        window_images += global_batch
        step = state["step"]
        logging = step % config.log_every == 0 or step == config.steps
        evaluate = step % config.eval_every == 0 or step == config.steps
        save = step % config.checkpoint_every == 0 or step == config.steps
        if logging or evaluate or save:
            loss_value = _mean_over_workers(total_loss)  # every rank: it is a collective
        if metrics_log is not None and logging:
            elapsed = time.perf_counter() - window_start
            images_per_s = window_images / elapsed
            metrics_log.log(
                step,
                {
                    "train/loss": loss_value,
                    "train/lr": learning_rate,
                    "train/grad_norm": grad_norm,
                    "train/images_per_s": images_per_s,
                    "train/step_time_s": time.perf_counter() - step_start,
                    "train/global_batch": global_batch,
                    "world_size": world,
                },
            )
            done = step - start_step
            eta = (time.perf_counter() - run_start) / done * (config.steps - step)
            print(
                f"[pretrain] step {step}/{config.steps} loss {loss_value:.4f} "
                f"{images_per_s:.0f} img/s ETA {eta:.0f}s",
                flush=True,
            )
            window_start, window_images = time.perf_counter(), 0
        if not (evaluate or save):
            continue
        pause_start = time.perf_counter()
        metrics: dict[str, float] = {"step": step, "train/loss": loss_value, "world_size": world}
        divergence = parallel.replica_divergence(model)
        if divergence is not None:
            metrics["ddp/replica_divergence"] = divergence
        if evaluate:
            metrics["dev/accuracy"] = _dev_accuracy(model, device)
            if dev_log is not None:
                dev_log.log(step, {"dev/accuracy": metrics["dev/accuracy"]})
                print(f"[pretrain] step {step} dev accuracy {metrics['dev/accuracy']:.4f}")
        if save:
            _report_with_checkpoint(metrics, model, optimizer, scheduler, state, loop_config, rank)
        else:
            ray.train.report(metrics)
        window_start += time.perf_counter() - pause_start  # images/s: training time only


def step_layout(global_batch: int, world: int, micro_batch: int) -> tuple[int, int]:
    """(accumulation steps, micro-batch size) that split one step's batch over `world` workers.

    Each worker takes the fewest micro-batches of at most `micro_batch` images that cover its
    share of the global batch, all of one size. The global batch is the configured one when
    that size comes out whole (4,096 on 8 workers of up to 256), else slightly more (4,104 for
    4,096 on 6 workers; 4,136 on 8 workers of up to 48: 11 of 47 each): the fewest micro-batches
    run fastest, and an elastic run goes on at any worker count. The workers cannot take
    different shares instead: their shards of the streaming dataset start each epoch together,
    so a worker that ran ahead would wait there for the others while they wait for it in the
    gradient all-reduce.
    """
    per_worker = -(-global_batch // world)
    accumulation = -(-per_worker // micro_batch)
    return accumulation, -(-per_worker // accumulation)


def check_train_rows(rows: int | None, config: PretrainConfig) -> None:
    """Refuse a train split too small for one micro-batch per worker at every worker count the
    run may have, where its size is known (catalog sets, prepared shards). Found by the workers,
    it would be retried `max_failures` times, reading the data again each time."""
    if rows is None:
        return
    low, high = (
        (config.num_workers,) * 2 if isinstance(config.num_workers, int) else config.num_workers
    )
    needs = {
        world: step_layout(config.global_batch_size, world, config.micro_batch_size)[1]
        for world in range(low, high + 1)
    }
    # A reversed range leaves `needs` empty: Ray's ScalingConfig refuses it, naming both ends.
    if needs and all(rows // world < micro for world, micro in needs.items()):
        raise ValueError(
            f"the train split holds {rows} images, too few for {low} worker(s) to draw a "
            f"micro-batch of {needs[low]} each (global_batch_size "
            f"{config.global_batch_size}, micro_batch_size {config.micro_batch_size})"
        )


def _mean_over_workers(value: torch.Tensor) -> float:
    """The mean of a scalar over the workers, so logs describe the global batch, not rank 0's."""
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _endless_batches(
    shard: Any, micro: int, device: torch.device, tracker: ray.actor.ActorHandle
) -> Any:
    """Cycle over the streaming shard, one pass (epoch) after another."""
    while True:
        yielded = False
        for batch in shard.iter_torch_batches(
            batch_size=micro, drop_last=True, device=device, local_shuffle_buffer_size=4 * micro
        ):
            yielded = True
            yield batch
        if not yielded:
            read = ray.get(tracker.summary.remote())
            raise RuntimeError(
                f"the training shard yielded no full batch of {micro}; the run has read "
                f"{read['rows_read']} rows so far (train and dev, every worker), "
                f"{read['bad_reads']} of them unreadable images"
            )


def _dev_accuracy(model: torch.nn.Module, device: torch.device) -> float:
    """Accuracy on the dev split, each worker scoring its shard. Ray Train splits it into equal
    shards, so every FSDP worker runs as many forward passes (each gathers weights from all)."""
    shard = ray.train.get_dataset_shard("dev")
    correct, seen = count_correct(model, iter(shard.iter_torch_batches(batch_size=256)), device)
    totals = torch.tensor([correct, seen], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    if totals[1] == 0:  # no dev rows (a tiny dataset): no accuracy, rather than a false 0.0
        return float("nan")
    return float(totals[0] / totals[1])


def _report_with_checkpoint(
    metrics: dict[str, float],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, int],
    loop_config: dict[str, Any],
    rank: int,
) -> None:
    """Rank 0 writes the checkpoint; every rank gathers the state and reports, as FSDP and Ray
    Train require."""
    weights, optimizer_state = parallel.full_state(model, optimizer)
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        provenance = {
            "mlflow_run_id": loop_config["run_id"],
            "dataset": loop_config["config"].dataset,
            "step": state["step"],
            "stage": "pretrain",
            "settings": tracking.flatten(loop_config["config"]),  # what a resume must keep
        }
        vit_checkpoint.save_weights(
            unwrap(model).config,
            weights,
            os.path.join(directory, "model"),
            class_names=loop_config["class_names"],
            provenance=provenance,
        )
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "state": dict(state),
            },
            os.path.join(directory, TRAIN_STATE_FILE),
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
