"""Few-shot linear evaluation of a checkpoint on a dataset, recorded in MLflow.

The paper's cheap probe of a representation (``vit.evaluate``): frozen pre-logits features of the
train and test splits, ridge regression on k examples per class, test accuracy averaged over
seeds. Images are decoded and patchified on Ray Data with the checkpoint's own evaluation
preprocessing; features are computed on the driver (GPU when there is one), which suits the
small sets few-shot evaluation uses. ``run_fewshot`` is what ``jobs/fewshot.py`` and later
pipeline stages call.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch
from mlflow.entities import Metric

from pipelines import figures, tracking
from pipelines.datasets import describe, read_dataset, split_sizes
from pipelines.ingest import IngestConfig, check_bad_fraction, start_error_tracker, to_tokens
from pipelines.training import resolve_checkpoint
from vit import checkpoint as vit_checkpoint
from vit.config import ViTConfig
from vit.evaluate import (
    DEFAULT_L2_GRID,
    DEFAULT_SHOTS,
    extract_features,
    feasible_shots,
    fewshot_evaluate,
)

STAGE = "fewshot"


def metric_name(shots: int, std: bool = False) -> str:
    return f"fewshot/{shots}shot_accuracy" + ("_std" if std else "")


def shots_and_seeds(
    shots: Sequence[int], seeds: int | Sequence[int]
) -> tuple[list[int], list[int]]:
    """The shot counts and the seeds (a count means 0..n-1), or ValueError for ones no run can
    use. Checked before any image is read (and by the pipeline before pretraining): past
    featurisation they would fail as an empty ridge fit."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    shot_list = [int(k) for k in shots]
    if not seed_list or not shot_list:
        raise ValueError("need at least one seed and one shot count")
    if min(shot_list) < 1:
        raise ValueError(f"shot counts must be at least 1, got {shot_list}")
    if min(seed_list) < 0:  # numpy's generators take no negative seed
        raise ValueError(f"seeds must be 0 or more, got {seed_list}")
    return shot_list, seed_list


def run_fewshot(
    checkpoint_dir: str | os.PathLike[str],
    dataset: str,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: int | Sequence[int] = 3,
    *,
    max_train_rows: int | None = 20_000,
    max_test_rows: int | None = None,
    dev_per_class: int = 10,
    batch_size: int = 256,
    device: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    parent_run_id: str | None = None,
    uri: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint_dir`` few-shot on ``dataset`` and log it as one MLflow run.

    ``seeds``: a count (seeds 0..n-1) or the seeds themselves. ``max_train_rows`` /
    ``max_test_rows`` cap the rows featurised per split by a hash of each row's key (the same
    rows on every run, classes kept in proportion); they apply where the split size is known
    up front (catalog sets, prepared shards, image folders; not Parquet without a manifest),
    and the train cap rises with the number of classes (see ``_train_cap``). The dev set that
    picks the L2 strength is the last ``dev_per_class`` train rows of each class (see
    ``vit.evaluate.fewshot_evaluate``).

    Returns {"run_id", "accuracy": {shots: (mean, std)}, "metrics", "train_rows",
    "test_rows", "num_classes", "bad_images", "skipped_shots", "rarest_class_rows"}: a shot
    count the rarest class cannot fill (with its dev rows) is skipped, not evaluated.
    """
    shot_list, seed_list = shots_and_seeds(shots, seeds)
    if dev_per_class < 0:  # a negative count would slice away every dev row
        raise ValueError(f"dev_per_class must be 0 or more, got {dev_per_class}")
    for name, cap in (("max_train_rows", max_train_rows), ("max_test_rows", max_test_rows)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be at least 1, or None for no cap; got {cap}")
    # Absolute, so the run's lineage tags lead back to it from any directory or node.
    directory = resolve_checkpoint(checkpoint_dir).resolve()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = vit_checkpoint.load(directory, map_location=device)
    info = describe(dataset)
    train_cap = _train_cap(max_train_rows, info.num_classes, shot_list, dev_per_class)
    uri = uri or tracking.tracking_uri()
    tags = {"vitray_stage": STAGE, "vitray_dataset": dataset, "vitray_checkpoint": str(directory)}
    parent = meta.provenance.get("mlflow_run_id")
    if parent:
        tags["vitray_parent_checkpoint_run"] = str(parent)
    run_name = f"fewshot-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = tracking.start_run(
        run_name, experiment=experiment, parent_run_id=parent_run_id, tags=tags, uri=uri
    )
    mlflow = tracking.client(uri)
    with tracking.ending(run_id, uri):
        params = {
            "checkpoint": str(directory),
            "dataset": dataset,
            "shots": shot_list,
            "seeds": seed_list,
            "dev_per_class": dev_per_class,
            "l2_grid": f"2^-10..2^19 ({len(DEFAULT_L2_GRID)} values)",
            "max_train_rows": max_train_rows,
            "train_rows_cap": train_cap,
            "max_test_rows": max_test_rows,
            "model": meta.config.to_dict(),
        }
        tracking.log_params(run_id, params, uri)
        # Image folders too: without their sizes the row caps would silently not apply.
        sizes = info.split_sizes or split_sizes(dataset) or {}
        features, bad = {}, 0
        for split, cap in (("train", train_cap), ("test", max_test_rows)):
            tracker = start_error_tracker()  # one per split: each is judged on its own rows
            tokens = _split_tokens(dataset, split, meta.config, cap, sizes.get(split), tracker)
            batches = tokens.iter_batches(batch_size=batch_size, batch_format="numpy")
            try:
                features[split] = extract_features(model, batches, device)
            except ValueError:  # no rows at all: name the unreadable images if that is why
                check_bad_fraction(tracker, IngestConfig())
                if ray.get(tracker.summary.remote())["rows_read"]:
                    raise
                raise ValueError(
                    f"{dataset}: the {split} split has no images; few-shot evaluation draws "
                    "its shots from train and scores them on test"
                ) from None
            check_bad_fraction(tracker, IngestConfig())
            bad += int(ray.get(tracker.summary.remote())["bad"])
        (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
        # Small sets cannot afford every shot count: drop those the rarest class cannot fill.
        rarest = int(np.bincount(train_y, minlength=info.num_classes).min())
        feasible = feasible_shots(shot_list, dev_per_class, rarest)
        if not feasible:
            raise ValueError(
                f"{dataset}: none of {shot_list} shots fits: the rarest class has {rarest} "
                f"training examples for the shots and {dev_per_class} dev examples"
                + ("; without dev examples each class needs 2 shots" if not dev_per_class else "")
            )
        skipped = sorted(set(shot_list) - set(feasible))
        if skipped:
            mlflow.set_tag(run_id, "vitray_skipped_shots", ",".join(map(str, skipped)))
        accuracy = fewshot_evaluate(
            train_x,
            train_y,
            test_x,
            test_y,
            info.num_classes,
            feasible,
            seed_list,
            dev_per_class=dev_per_class,
        )
        metrics = {"data/bad_images": float(bad)}
        for k, (mean, std) in accuracy.items():
            metrics[metric_name(k)] = mean
            metrics[metric_name(k, std=True)] = std
        now = int(time.time() * 1000)
        mlflow.log_batch(run_id, metrics=[Metric(n, v, now, 0) for n, v in metrics.items()])
        curve = figures.fewshot_curve(accuracy, 1 / info.num_classes, f"{dataset}: few-shot")
        figures.log_figure(mlflow, run_id, curve, "figures/fewshot.png")
    return {
        "run_id": run_id,
        "accuracy": accuracy,
        "metrics": metrics,
        "train_rows": len(train_y),
        "test_rows": len(test_y),
        "num_classes": info.num_classes,
        "bad_images": bad,
        "skipped_shots": skipped,
        "rarest_class_rows": rarest,
    }


def _train_cap(
    cap: int | None, num_classes: int, shots: Sequence[int], dev_per_class: int
) -> int | None:
    """The train rows to featurise: ``cap``, raised so that an average class keeps three times
    the rows its largest shot count and dev set need.

    The cap thins every class alike: 20,000 rows of a 1,000-class set would leave each class
    about 20, too few for the paper's 25 shots plus 10 dev rows.
    """
    if cap is None:
        return None
    return max(cap, 3 * num_classes * (max(shots) + dev_per_class))


def _split_tokens(
    dataset: str,
    split: str,
    config: ViTConfig,
    cap: int | None,
    size: int | None,
    tracker: ray.actor.ActorHandle,
) -> ray.data.Dataset:
    """Evaluation tokens of one split, in a deterministic order (the dev slice and the shot
    sampling depend on it), optionally thinned to about ``cap`` rows by key hash."""
    rows = read_dataset(dataset, split)
    if cap is not None and size and size > cap:
        rows = rows.map_batches(
            _keep_by_key_hash, batch_format="pyarrow", fn_kwargs={"fraction": cap / size}
        )
    tokens = to_tokens(rows, config, ingest=IngestConfig(), tracker=tracker)
    tokens.context.execution_options.preserve_order = True
    return tokens


def _keep_by_key_hash(batch: pa.Table, *, fraction: float) -> pa.Table:
    """Ray Data map: keep a row when the CRC32 of its key falls in the lowest ``fraction``."""
    limit = fraction * 2**32
    keep = [zlib.crc32(str(key).encode()) < limit for key in batch["key"].to_pylist()]
    return batch.filter(pc.cast(pa.array(keep), pa.bool_()))
