"""Transfer: Ray Tune fine-tunes one pretrained checkpoint on several downstream datasets.

The paper's protocol is the default: SGD with momentum 0.9, no weight decay, clipping at global
norm 1, cosine decay after a short warmup, the head replaced by a zero-initialised linear layer,
optionally a higher resolution with the position embedding resampled, and the learning rate
chosen from {0.001, 0.003, 0.01, 0.03} on the dev split. ASHA stops weak trials early.

Accuracies of different datasets are not comparable, so each dataset gets its own Tuner (its own
ASHA brackets). The best trial per dataset is evaluated once on the test split and registered in
MLflow as a new version of `vit-<dataset>`. It takes the alias `champion` unless the current
champion did better on the same data (then `challenger`): serving follows `@champion`, and a smoke
run or a weaker recipe must not demote the model it serves. With `from_scratch` the same search
runs on a randomly initialised model of the same architecture: the paper's baseline, one flag
away.

Downstream sets are small, so each one is tokenised once with Ray Data and shared with its
trials through the object store instead of being decoded again by every trial.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from pipelines import figures, tracking
from pipelines.datasets import describe, fingerprint, read_dataset, split_sizes
from pipelines.ingest import IngestConfig, check_bad_fraction, start_error_tracker, to_tokens
from pipelines.training import (
    autocast,
    check_grad_clip,
    check_schedule,
    resolve_checkpoint,
    storage_uri,
    warmup_then_decay,
)
from vit import checkpoint as vit_checkpoint
from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.patches import unpatchify

CHAMPION = "champion"
CHALLENGER = "challenger"  # a registered version that did not beat the champion on its data
DEV_ACCURACY_TAG = "vitray_dev_accuracy"  # on a registered version: what promotion compares
DATA_TAG = "vitray_data_fingerprint"  # on a registered version: the data it was chosen on
MODEL_DIR = "model"  # in a trial checkpoint: the model, as registered and served
TRIAL_STATE_FILE = "trial_state.pt"  # beside it: optimizer, schedule and step
SELECTION_SPLITS = ("train", "dev")  # what trials see; the test split is read once, at the end
TEST_SPLIT = "test"


@dataclass(frozen=True)
class FinetuneConfig:
    """A sweep: one checkpoint, several datasets, a learning-rate grid and a step budget."""

    checkpoint: str  # a vit checkpoint directory
    datasets: tuple[str, ...] = ("mnist-5k", "digits", "tuxpaint")
    learning_rates: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)
    steps: int = 500
    batch_size: int = 512
    warmup_steps: int = 50
    grad_clip: float = 1.0
    momentum: float = 0.9
    image_size: int | None = None  # fine-tune at another resolution (pos-embed resampled)
    eval_every: int = 100  # one report per evaluation: ASHA's unit of time
    grace_evaluations: int = 1  # evaluations before ASHA may stop a trial
    reduction_factor: int = 4  # ASHA keeps the best 1/reduction_factor at each rung
    from_scratch: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # a GPU, or a share of one: trials then train on CUDA in bf16
    max_concurrent_trials: int | None = None
    # Restarts of a trial whose process died (a lost node, OOM), from its latest checkpoint. A
    # diverged trial fails again from there, costing the steps since that checkpoint.
    max_failures: int = 1
    storage_path: str = "runs/tune"
    sweep_name: str = "finetune"
    experiment: str = tracking.DEFAULT_EXPERIMENT
    register: bool = True
    ingest: IngestConfig = field(default_factory=IngestConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse settings that cannot work here, not in the trials: there an empty batch
        reads as a diverged learning rate, and no step at all as an interrupted sweep."""
        wrong = [
            name
            for name in ("steps", "batch_size", "eval_every", "grace_evaluations")
            if getattr(self, name) < 1
        ]
        if wrong:
            raise ValueError(f"{', '.join(wrong)} must be at least 1")
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be at least 2, got {self.reduction_factor}")
        if self.max_failures < 0:  # Tune's -1 retries for ever, a diverged trial included
            raise ValueError(f"max_failures must be 0 or more, got {self.max_failures}")
        self._check_recipe()
        self._check_trial_resources()
        repeated = sorted({d for d in self.datasets if self.datasets.count(d) > 1})
        if repeated:  # each would be tuned, tested and registered again
            raise ValueError(f"datasets named more than once: {', '.join(repeated)}")
        if self.register and not self.from_scratch:  # `/a/flowers`, `/b/flowers`: one model
            first_of: dict[str, str] = {}
            for dataset in self.datasets:
                name = tracking.registered_model_name(dataset)
                other = first_of.setdefault(name, dataset)
                if other != dataset:
                    raise ValueError(
                        f"datasets {other!r} and {dataset!r} would both register as {name!r}; "
                        "tune them in separate sweeps"
                    )

    def _check_recipe(self) -> None:
        """Refuse optimiser settings that train silently wrong, every trial alike (see the checks
        called): a momentum above 1 (9 for 0.9) amplifies every past update, and the divergence
        reads as a learning rate too high."""
        if not self.learning_rates:
            raise ValueError("the search needs at least one learning rate")
        if not all(rate > 0 for rate in self.learning_rates):
            raise ValueError(f"learning rates must be positive, got {self.learning_rates}")
        check_grad_clip(self.grad_clip)
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must lie in [0, 1], got {self.momentum}")
        check_schedule(self.warmup_steps, self.steps)

    def _check_trial_resources(self) -> None:
        """Refuse what Tune would take late or silently: a trial asking for no resource at all
        fails with Ray's "empty head and zero worker bundles" only once the data is read (in the
        pipeline: after pretraining), a negative share is no request Ray can place, and Tune
        reads a concurrency below 1 as no limit."""
        if self.cpus_per_trial < 0 or self.gpus_per_trial < 0:
            raise ValueError(
                f"cpus_per_trial and gpus_per_trial must be 0 or more, got "
                f"{self.cpus_per_trial} and {self.gpus_per_trial}"
            )
        if not self.cpus_per_trial and not self.gpus_per_trial:
            raise ValueError("a trial needs CPUs or a GPU: cpus_per_trial and gpus_per_trial are 0")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError(
                f"max_concurrent_trials must be at least 1, got {self.max_concurrent_trials} "
                "(None: as many trials as the resources hold)"
            )


@dataclass(frozen=True)
class DatasetOutcome:
    """The chosen model for one dataset and how the search went."""

    dataset: str
    dev_accuracy: float
    test_accuracy: float
    learning_rate: float
    checkpoint_path: str
    run_id: str
    model_version: str | None
    alias: str | None  # CHAMPION or CHALLENGER, None when nothing was registered
    trials: int
    stopped_early: int
    failed: int
    seconds: float


@dataclass(frozen=True)
class _SweepRun:
    """What an opened sweep hands each dataset: its MLflow run and the pretrained model's
    config and run."""

    run_id: str
    pretrained: ViTConfig
    pretrain_run: str


class Sweep:
    """A sweep's MLflow run, which its datasets' runs hang below, and the tuning of each dataset.

    It opens when the first dataset is tuned: a caller that reuses every dataset's earlier result
    (the pipeline's stage cache) opens no empty sweep run and needs no checkpoint on disk.
    Leaving the `with` block ends the run, FAILED or KILLED when the block raises.
    """

    def __init__(self, config: FinetuneConfig, *, parent_run_id: str | None = None) -> None:
        self.config = config
        self.parent_run_id = parent_run_id
        self.uri = tracking.tracking_uri()
        self._opened: _SweepRun | None = None
        self._ending = contextlib.ExitStack()

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *raised: Any) -> bool | None:
        return self._ending.__exit__(*raised)

    def tune(self, dataset: str) -> DatasetOutcome:
        """Search one dataset's learning rate and register its best model."""
        opened = self._opened or self._open()
        return _tune_dataset(
            self.config, opened.pretrained, dataset, opened.run_id, opened.pretrain_run, self.uri
        )

    def _open(self) -> _SweepRun:
        # Trials run in their own working directories: a relative path would not be found there.
        checkpoint = resolve_checkpoint(self.config.checkpoint).resolve()
        self.config = replace(self.config, checkpoint=str(checkpoint))
        meta = vit_checkpoint.read_metadata(checkpoint)
        pretrain_run = str(meta.provenance.get("mlflow_run_id", ""))
        kind = "scratch" if self.config.from_scratch else "finetune"
        origin = _origin(self.config.from_scratch)
        run_id = tracking.start_run(
            f"{self.config.sweep_name}-{kind}",
            experiment=self.config.experiment,
            parent_run_id=self.parent_run_id,
            tags={
                "vitray_stage": kind,
                f"vitray_{origin}_run": pretrain_run,
                f"vitray_{origin}_checkpoint": self.config.checkpoint,
            },
            uri=self.uri,
        )
        self._ending.enter_context(tracking.ending(run_id, self.uri))
        tracking.log_params(run_id, self.config, self.uri)
        self._opened = _SweepRun(run_id, meta.config, pretrain_run)
        return self._opened


def run(config: FinetuneConfig, *, parent_run_id: str | None = None) -> list[DatasetOutcome]:
    """Run the sweep dataset by dataset; returns one outcome per dataset."""
    with Sweep(config, parent_run_id=parent_run_id) as sweep:
        return [sweep.tune(name) for name in config.datasets]


def format_table(outcomes: list[DatasetOutcome]) -> str:
    rows = [
        "| dataset | dev acc | test acc | lr | trials | stopped early | failed | time s | "
        "registered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        name = tracking.registered_model_name(o.dataset)
        registered = f"{name} v{o.model_version} @{o.alias}" if o.model_version else "-"
        rows.append(
            f"| {o.dataset} | {o.dev_accuracy:.4f} | {o.test_accuracy:.4f} | {o.learning_rate} | "
            f"{o.trials} | {o.stopped_early} | {o.failed} | {o.seconds:.0f} | {registered} |"
        )
    return "\n".join(rows)


def _model_config(pretrained: ViTConfig, config: FinetuneConfig, num_classes: int) -> ViTConfig:
    """The fine-tuning model: a new head, at the resolution asked for (`at_resolution` scales
    the evaluation resize with it, so the centre crop keeps its share of the image)."""
    size = config.image_size or pretrained.image_size
    return pretrained.replace(num_classes=num_classes, representation_size=None).at_resolution(size)


def _tokens(
    dataset: str, split: str, model: ViTConfig, ingest: IngestConfig
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One split as arrays, and the summary of the unreadable images it skipped.

    Each split has a tracker of its own and is judged on its own rows: a clean train split must
    not carry a broken test split past the limit.
    """
    tracker = start_error_tracker()
    rows = to_tokens(read_dataset(dataset, split), model, ingest=ingest, tracker=tracker)
    # In the source's order, not the order decoding tasks finish: trials draw their batches by
    # row index with a seeded generator, so the same sweep then trains the same way every time.
    rows.context.execution_options.preserve_order = True
    batches = list(rows.iter_batches(batch_size=None, batch_format="numpy"))
    check_bad_fraction(tracker, ingest)
    if not any(len(b["label"]) for b in batches):
        raise _no_images(dataset, split)
    arrays = {
        "tokens": np.concatenate([b["tokens"] for b in batches]),
        "label": np.concatenate([b["label"] for b in batches]),
    }
    return arrays, ray.get(tracker.summary.remote())


def _no_images(dataset: str, split: str) -> ValueError:
    return ValueError(
        f"{dataset}: the {split} split has no images; fine-tuning trains on train, chooses the "
        "learning rate on dev and reports test (a small set's held-out splits are a share of "
        "its images: add images or declare the split's folder)"
    )


def _refuse_empty_splits(dataset: str) -> None:
    """Raise before any trial if a split is known to hold no images: the test split is read
    only after the sweep. Known without reading an image (`split_sizes`: a folder's listing,
    a manifest, the catalog); a source that only a read can count is judged by `_tokens`."""
    sizes = split_sizes(dataset)
    for split in (*SELECTION_SPLITS, TEST_SPLIT):
        if sizes and not sizes.get(split):
            raise _no_images(dataset, split)


def _tune_dataset(
    config: FinetuneConfig,
    pretrained: ViTConfig,
    dataset: str,
    sweep_run: str,
    pretrain_run: str,
    uri: str,
) -> DatasetOutcome:
    start = time.perf_counter()
    _refuse_empty_splits(dataset)
    info = describe(dataset)
    model_config = _model_config(pretrained, config, len(info.class_names))
    kind = "scratch" if config.from_scratch else "finetune"
    origin = _origin(config.from_scratch)
    dataset_run = tracking.start_run(
        f"{kind}-{dataset}",
        experiment=config.experiment,
        parent_run_id=sweep_run,
        tags={
            "vitray_stage": kind,
            "vitray_dataset": dataset,
            f"vitray_{origin}_run": pretrain_run,
        },
        uri=uri,
    )
    with tracking.ending(dataset_run, uri):
        read = {
            split: _tokens(dataset, split, model_config, config.ingest)
            for split in SELECTION_SPLITS
        }
        register = config.register and not config.from_scratch
        # tune.with_parameters stores these in the object store once for all the dataset's trials.
        data = {split: arrays for split, (arrays, _) in read.items()}
        provenance = {"dataset": dataset, "stage": kind, f"{origin}_run": pretrain_run}
        if not config.from_scratch:
            provenance["pretrain_checkpoint"] = config.checkpoint
        trainable = tune.with_parameters(
            tune.with_resources(_trial, _trial_resources(config)),
            config=config,
            model_config=model_config,
            initial_weights=_initial_weights(config, model_config),
            train=data["train"],
            dev=data["dev"],
            class_names=list(info.class_names),
            provenance=provenance,
            parent_run=dataset_run,
            uri=uri,
        )
        evaluations = max(1, math.ceil(config.steps / config.eval_every))
        scheduler = _RecordingASHA(
            metric="dev_accuracy",
            mode="max",
            max_t=evaluations,
            grace_period=min(config.grace_evaluations, evaluations),
            reduction_factor=config.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"learning_rate": tune.grid_search(list(config.learning_rates))},
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                max_concurrent_trials=config.max_concurrent_trials,
                # A trial's actor starts the next trial: no new process, imports, data copy.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"{config.sweep_name}-{kind}-{_folder_name(dataset)}",
                storage_path=_storage_path(config.storage_path),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=config.max_failures),
            ),
        )
        mlflow = tracking.client(uri)
        try:
            grid = tuner.fit()
        finally:  # also when the sweep is interrupted: no trial run stays RUNNING
            _close_stopped_trials(mlflow, dataset_run)
        if not all(_ran_its_course(r, config.steps, scheduler.stopped) for r in grid):
            # Tune catches Ctrl-C (and SIGUSR1) itself and returns the trials as they stood;
            # choosing and registering a model from them would pass a cut-short sweep as done.
            raise KeyboardInterrupt(f"the sweep on {dataset} was stopped before its trials ended")
        failed = [r for r in grid if r.error is not None]
        finished = [r for r in grid if r.error is None and r.metrics]
        if not finished:
            raise RuntimeError(
                f"every trial failed on {dataset}: {failed[0].error if failed else ''}"
            )
        best = _best(finished, config.steps)
        stopped = sum(1 for r in finished if r.metrics.get("step", 0) < config.steps)
        with best.checkpoint.as_directory() as directory:
            model_dir = Path(directory) / MODEL_DIR
            model, _ = vit_checkpoint.load(model_dir)
            test, test_errors = _tokens(dataset, TEST_SPLIT, model.config, config.ingest)
            predictions = _predict(model, test)
            test_accuracy = float(np.mean(predictions == test["label"]))
            mlflow.log_artifacts(dataset_run, str(model_dir), "checkpoint")
        _log_test_figures(mlflow, dataset_run, model.config, test, predictions, info.class_names)
        errors = [summary for _, summary in read.values()] + [test_errors]
        samples = [sample for summary in errors for sample in summary["samples"]]
        if samples:
            mlflow.log_dict(dataset_run, {"bad_images": samples}, "data_errors.json")
        learning_rate = float(best.config["learning_rate"])
        dev_accuracy = float(best.metrics["dev_accuracy"])
        for key, value in {
            "dev/accuracy": dev_accuracy,
            "test/accuracy": test_accuracy,
            "trials": len(grid),
            "trials_stopped_early": stopped,
            "trials_failed": len(failed),
            "data/bad_images": sum(summary["bad"] for summary in errors),
        }.items():
            mlflow.log_metric(dataset_run, key, value)
        mlflow.log_param(dataset_run, "best_learning_rate", learning_rate)
        if failed:
            reasons = {str(r.config["learning_rate"]): str(r.error)[-500:] for r in failed}
            mlflow.log_dict(dataset_run, reasons, "failed_trials.json")
            mlflow.set_tag(dataset_run, "vitray_failed_trials", ", ".join(sorted(reasons)))
        version, alias = None, None
        if register:
            data = fingerprint(dataset)
            name = tracking.registered_model_name(dataset)
            alias = registry_alias(mlflow, name, data, dev_accuracy)
            version = tracking.register_model(
                name,
                dataset_run,
                "checkpoint",
                tags={
                    "vitray_dataset": dataset,
                    "vitray_pretrain_run": pretrain_run,
                    DEV_ACCURACY_TAG: str(dev_accuracy),
                    DATA_TAG: data,
                },
                alias=alias,
                uri=uri,
            )
            mlflow.set_tag(dataset_run, "vitray_registered", f"{name} v{version} @{alias}")
    return DatasetOutcome(
        dataset=dataset,
        dev_accuracy=dev_accuracy,
        test_accuracy=test_accuracy,
        learning_rate=learning_rate,
        checkpoint_path=f"{storage_uri(best.checkpoint.path, config.storage_path)}/{MODEL_DIR}",
        run_id=dataset_run,
        model_version=version,
        alias=alias,
        trials=len(grid),
        stopped_early=stopped,
        failed=len(failed),
        seconds=time.perf_counter() - start,
    )


def _origin(from_scratch: bool) -> str:
    """What a sweep takes from its checkpoint: the pretrained weights, or for the from-scratch
    baseline only their architecture (its lineage must not claim pretraining)."""
    return "architecture" if from_scratch else "pretrain"


_NO_CHAMPION = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}


def registry_alias(mlflow: MlflowClient, name: str, data: str, dev_accuracy: float) -> str:
    """CHAMPION for a model at least as good on dev as the current champion, else CHALLENGER.

    Dev accuracy is what chose the model within its sweep, so it decides between sweeps too, but
    only on the same data (its fingerprint): measured on other data the champion's number says
    nothing about this model, and the newer data wins. A champion without these tags (registered
    by hand, or before they existed) is replaced as well.
    """
    try:
        current = mlflow.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:
        # No such model, or no such alias yet. Any other error (the registry unreachable for a
        # moment) says nothing about the champion, so it must not crown this model.
        if error.error_code not in _NO_CHAMPION:
            raise
        return CHAMPION
    if current.tags.get(DATA_TAG) != data or DEV_ACCURACY_TAG not in current.tags:
        return CHAMPION
    return CHAMPION if dev_accuracy >= float(current.tags[DEV_ACCURACY_TAG]) else CHALLENGER


class _RecordingASHA(ASHAScheduler):
    """ASHA that remembers the trials it stopped.

    Tune reports a trial cut short by Ctrl-C as ended without error, like one ASHA stopped or
    one that ran every step; only the scheduler knows which of the first two it was.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stopped: set[str] = set()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            self.stopped.add(trial.trial_id)
        return action


def _ran_its_course(result: Any, steps: int, stopped_by_scheduler: set[str]) -> bool:
    """Failed, ran every step, or stopped by the scheduler: not cut short by an interrupt."""
    if result.error is not None or result.metrics.get("step") == steps:
        return True
    return result.metrics.get("trial_id") in stopped_by_scheduler


def _best(finished: list[tune.Result], steps: int) -> tune.Result:
    """The trial with the best dev accuracy among those that ran every step, if any did.

    ASHA stops a trial at a rung, before its learning rate has decayed: its last dev accuracy
    says how it was doing then, not what it would have ended at, so it is compared with the
    others only when no trial ran to the end.
    """
    completed = [r for r in finished if r.metrics.get("step") == steps]
    return max(completed or finished, key=lambda r: r.metrics["dev_accuracy"])


def _folder_name(dataset: str) -> str:
    """The dataset as one folder name under Tune's storage: a catalog name as it is; a path or
    URI by its last part and a digest of the whole, since `/a/flowers` and `s3://b/flowers` are
    two datasets, and their `/` and `:` would nest folders (`sweep-finetune-s3:/b/flowers`)."""
    if re.fullmatch(r"[\w.-]+", dataset) and dataset not in (".", ".."):
        return dataset
    digest = hashlib.sha256(dataset.encode()).hexdigest()[:8]
    return f"{tracking.registered_model_name(dataset).removeprefix('vit-')}-{digest}"


def _storage_path(path: str) -> str:
    """Tune's storage: a URI as given, a local folder made absolute (trials run elsewhere)."""
    return path if "://" in path else str(Path(path).resolve())


def _close_stopped_trials(mlflow: Any, dataset_run: str) -> None:
    """Close the MLflow runs of the trials the scheduler stopped early, as KILLED.

    Tune ends such a trial inside `tune.report`, so the trial's own code never runs again; the
    trials that finished or failed have closed their runs themselves.
    """
    experiment = mlflow.get_run(dataset_run).info.experiment_id
    still_open = f"tags.mlflow.parentRunId = '{dataset_run}' and attributes.status = 'RUNNING'"
    for run in mlflow.search_runs([experiment], filter_string=still_open):
        mlflow.set_terminated(run.info.run_id, "KILLED")


@torch.inference_mode()
def _predict(model: VisionTransformer, data: dict[str, np.ndarray], batch: int = 512) -> np.ndarray:
    """Predicted class of every row of {"tokens", "label"}, in eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(data["label"]), batch):
        # A copy: the arrays come read-only from the object store, which torch warns about.
        tokens = torch.tensor(data["tokens"][start : start + batch], device=device)
        with autocast(device):
            chunks.append(model(tokens).argmax(-1).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)


def _accuracy(model: VisionTransformer, data: dict[str, np.ndarray]) -> float:
    return float(np.mean(_predict(model, data) == data["label"])) if len(data["label"]) else 0.0


def _log_test_figures(
    mlflow: Any,
    run_id: str,
    model_config: ViTConfig,
    test: dict[str, np.ndarray],
    predictions: np.ndarray,
    class_names: Sequence[str],
    samples: int = 16,
) -> None:
    """The test confusion matrix (figure + counts) and a grid of test images with predictions."""
    figure, counts = figures.confusion_matrix(test["label"], predictions, class_names)
    figures.log_figure(mlflow, run_id, figure, "figures/confusion_matrix.png")
    mlflow.log_dict(run_id, {"classes": list(class_names), "counts": counts.tolist()},
                    "confusion_matrix.json")  # fmt: skip
    shown = slice(0, min(samples, len(predictions)))
    images = unpatchify(
        test["tokens"][shown], model_config.patch_size, model_config.grid_size, channels_last=True
    )
    grid = figures.sample_predictions(images, test["label"][shown], predictions[shown], class_names)
    figures.log_figure(mlflow, run_id, grid, "figures/test_predictions.png")


# ------------------------------------------------------------------------------ trial side
def _trial(
    params: dict[str, Any],
    *,
    config: FinetuneConfig,
    model_config: ViTConfig,
    initial_weights: dict[str, torch.Tensor],
    train: dict[str, np.ndarray],
    dev: dict[str, np.ndarray],
    class_names: list[str],
    provenance: dict[str, str],
    parent_run: str,
    uri: str,
) -> None:
    """One fine-tune: build the model, train `steps` SGD steps, report dev accuracy.

    Each report carries a checkpoint: the model under `model/` (what is registered and served)
    and, beside it, the optimizer state a restarted trial resumes from.
    """
    learning_rate = float(params["learning_rate"])
    torch.manual_seed(config.seed)
    saved = None
    restored = tune.get_checkpoint()
    if restored:
        with restored.as_directory() as directory:
            model, _ = vit_checkpoint.load(Path(directory) / MODEL_DIR)
            saved = torch.load(Path(directory) / TRIAL_STATE_FILE, weights_only=True)
    else:
        model = VisionTransformer(model_config)
        model.load_state_dict(initial_weights)
    gpu = config.gpus_per_trial > 0 and torch.cuda.is_available()  # Tune set the visible one
    device = torch.device("cuda" if gpu else "cpu")
    model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=config.momentum, weight_decay=0.0
    )
    scheduler = warmup_then_decay(optimizer, config.warmup_steps, config.steps, "cosine")
    step = 0
    if saved:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step = saved["step"]
    trial_name = tune.get_context().get_trial_name()
    mlflow = tracking.client(uri)
    run_id = _trial_run(
        mlflow, config.experiment, parent_run, trial_name, provenance["dataset"], uri
    )
    try:
        if saved:  # each restart is on record: the step its checkpoint held
            mlflow.log_metric(run_id, "trial/resumed_at_step", step, step=step)
        else:
            mlflow.log_param(run_id, "learning_rate", learning_rate)
        rng = np.random.default_rng([config.seed, step])
        count = len(train["label"])
        batch = min(config.batch_size, count)
        model.train()
        while step < config.steps:
            index = rng.choice(count, size=batch, replace=False)
            tokens = torch.from_numpy(train["tokens"][index]).to(device)
            labels = torch.from_numpy(train["label"][index]).to(device)
            with autocast(device):
                logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {loss.item()} at step {step} (lr {learning_rate})"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % config.eval_every and step != config.steps:
                continue
            dev_accuracy = _accuracy(model, dev)
            model.train()
            train_loss = loss.item()
            metrics = {"dev_accuracy": dev_accuracy, "train_loss": train_loss, "step": step}
            mlflow.log_metric(run_id, "dev/accuracy", dev_accuracy, step=step)
            mlflow.log_metric(run_id, "train/loss", train_loss, step=step)
            with tempfile.TemporaryDirectory() as directory:
                vit_checkpoint.save(
                    model,
                    Path(directory) / MODEL_DIR,
                    class_names=class_names,
                    provenance={
                        **provenance,
                        "step": step,
                        "trial": trial_name,
                        "mlflow_run_id": run_id,
                    },
                )
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "step": step,
                    },
                    Path(directory) / TRIAL_STATE_FILE,
                )
                if step == config.steps:  # before the last report: Tune may end the trial in it
                    mlflow.set_terminated(run_id)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        mlflow.set_terminated(run_id)  # also a restart from a checkpoint with no step left
    except Exception:
        mlflow.set_terminated(run_id, "FAILED")
        raise


def _trial_run(
    mlflow: Any,
    experiment: str,
    parent_run: str,
    trial_name: str,
    dataset: str,
    uri: str,
) -> str:
    """The trial's MLflow run: the one a restarted trial started before, else a new one.

    Tune restarts a trial whose process died, from its latest checkpoint or, with none yet,
    from the start; either way its steps belong to one run. A trial that raised ended its run
    FAILED, and Tune retries it too (`max_failures`): the run is running again while it trains.
    """
    mine = f"tags.mlflow.parentRunId = '{parent_run}' and tags.mlflow.runName = '{trial_name}'"
    for run in mlflow.search_runs([tracking.experiment_id(experiment, uri)], filter_string=mine):
        if run.info.status != "RUNNING":
            mlflow.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return tracking.start_run(
        trial_name,
        experiment=experiment,
        parent_run_id=parent_run,
        tags={"vitray_stage": "trial", "vitray_dataset": dataset},
        uri=uri,
    )


def _trial_resources(config: FinetuneConfig) -> dict[str, float]:
    resources = {"CPU": config.cpus_per_trial}
    if config.gpus_per_trial:
        resources["GPU"] = config.gpus_per_trial
    return resources


def _initial_weights(config: FinetuneConfig, model_config: ViTConfig) -> dict[str, torch.Tensor]:
    """Every trial's starting weights for `model_config`: the pretrained ones with a new zero
    head (and resampled positions), or a fresh model's (seeded).

    Built once on the driver, they reach the trials through the object store, on whatever node
    they run: the pretrained checkpoint is a file on the driver's node.
    """
    if config.from_scratch:
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            return VisionTransformer(model_config).state_dict()
    model, _ = vit_checkpoint.load(config.checkpoint)
    model.reset_classifier(model_config.num_classes)
    if model.config.image_size != model_config.image_size:
        model.resize_pos_embed(model_config.image_size)
    return model.state_dict()
