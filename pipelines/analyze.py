"""Look inside a checkpoint: the paper's Fig. 6 and Fig. 7 for any vit checkpoint, into MLflow.

Attention rollout over a few test images, mean attention distance per head and layer, position-
embedding similarity and the principal components of the patch-embedding filters. The images are
decoded with the checkpoint's own evaluation preprocessing (`image_to_tokens`, as in serving), so
the pictures show exactly what the model saw.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines import figures, tracking
from pipelines.datasets import read_dataset
from pipelines.ingest import BadImageError, image_to_tokens
from pipelines.training import resolve_checkpoint
from vit import analysis
from vit import checkpoint as vit_checkpoint
from vit.config import ViTConfig
from vit.patches import unpatchify

STAGE = "analyze"


def sample_tokens(dataset: str, config: ViTConfig, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` readable test images as model tokens (count, N, D) and labels.

    `count` is checked before the split is opened: below 1 the loop would never stop early and
    would decode (and the rollout figure draw) every test image.
    """
    if count < 1:
        raise ValueError(f"need at least one image to analyse, got {count}")
    tokens, labels = [], []
    for row in read_dataset(dataset, "test").iter_rows():
        try:
            tokens.append(image_to_tokens(row["image"], config))
        except BadImageError:
            continue  # the figures need a few readable images, not every one
        labels.append(row["label"])
        if len(tokens) == count:
            break
    if not tokens:
        raise ValueError(f"{dataset} has no readable test images to analyse")
    return np.stack(tokens), np.array(labels)


def tokens_to_images(tokens: np.ndarray, config: ViTConfig) -> np.ndarray:
    """Patch tokens back to displayable (count, H, W, C) uint8 images."""
    return unpatchify(tokens, config.patch_size, config.grid_size, channels_last=True)


def run_analysis(
    checkpoint_dir: str | os.PathLike[str],
    dataset: str,
    *,
    images: int = 8,
    output_dir: str | os.PathLike[str] | None = None,
    parent_run_id: str | None = None,
    experiment: str = tracking.DEFAULT_EXPERIMENT,
    uri: str | None = None,
) -> dict[str, Any]:
    """Compute the four analyses, write them as PNGs (optional) and log them to one MLflow run.

    Returns {"run_id", "figures": [artifact paths], "mean_attention_distance": per-layer means}.
    """
    directory = resolve_checkpoint(checkpoint_dir).resolve()  # absolute: a lineage tag
    model, meta = vit_checkpoint.load(directory)
    model.eval()
    config = meta.config
    tokens, _ = sample_tokens(dataset, config, images)
    maps = analysis.attention_maps(model, torch.from_numpy(tokens))
    results = {
        "attention_rollout": analysis.rollout_map(config, maps).numpy(),
        "attention_distance": analysis.attention_distance(config, maps).numpy(),
        "position_similarity": analysis.position_similarity(model).numpy(),
        "embedding_filters": analysis.embedding_filter_components(model).numpy(),
    }
    drawn = {
        "attention_rollout": figures.attention_rollout(
            tokens_to_images(tokens, config), results["attention_rollout"]
        ),
        "attention_distance": figures.attention_distance(results["attention_distance"]),
        "position_similarity": figures.position_similarity(results["position_similarity"]),
        "embedding_filters": figures.embedding_filters(results["embedding_filters"]),
    }
    uri = uri or tracking.tracking_uri()
    tags = {"vitray_stage": STAGE, "vitray_dataset": dataset, "vitray_checkpoint": str(directory)}
    source_run = meta.provenance.get("mlflow_run_id")
    if source_run:
        tags["vitray_parent_checkpoint_run"] = str(source_run)
    run_id = tracking.start_run(
        f"analyze-{time.strftime('%Y%m%d-%H%M%S')}",
        experiment=experiment,
        parent_run_id=parent_run_id,
        tags=tags,
        uri=uri,
    )
    mlflow = tracking.client(uri)
    paths = []
    with tracking.ending(run_id, uri):
        for name, figure in drawn.items():
            if output_dir is not None:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                figure.savefig(Path(output_dir) / f"{name}.png", dpi=120)
            paths.append(f"figures/{name}.png")
            figures.log_figure(mlflow, run_id, figure, paths[-1])
        distance_by_layer = results["attention_distance"].mean(axis=1)
        for layer, value in enumerate(distance_by_layer):
            mlflow.log_metric(run_id, "mean_attention_distance", float(value), step=layer)
    return {
        "run_id": run_id,
        "figures": paths,
        "mean_attention_distance": [float(v) for v in distance_by_layer],
    }
