"""Figures people look at rather than read: curves, confusion matrices, attention, few-shot.

Every builder returns a matplotlib `Figure` (headless Agg backend, safe on Ray workers and
servers) and `log_figure` stores it as a PNG artifact of an MLflow run, so the same pictures
appear whichever stage or job made them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
import numpy as np
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient


def log_figure(client: MlflowClient, run_id: str, figure: Figure, artifact_file: str) -> None:
    """Store `figure` as a PNG artifact (e.g. "figures/confusion.png") and free its memory."""
    try:
        client.log_figure(run_id, figure, artifact_file)
    finally:
        plt.close(figure)


def training_curves(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """One panel per metric, value against step."""
    names = sorted(history)
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        steps, values = zip(*sorted(history[name]), strict=True) if history[name] else ((), ())
        axis.plot(steps, values, marker="." if len(steps) < 20 else None)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, class_names: Sequence[str]
) -> tuple[Figure, np.ndarray]:
    """Row-normalised confusion matrix (rows: truth) and the raw counts behind it."""
    classes = len(class_names)
    counts = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = min(12.0, 2.0 + 0.45 * classes)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(classes)
    axis.set_xticks(ticks, class_names, rotation=90, fontsize=7)
    axis.set_yticks(ticks, class_names, fontsize=7)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    if classes <= 15:
        for row, col in np.ndindex(counts.shape):
            if counts[row, col]:
                colour = "white" if rates[row, col] > 0.5 else "black"
                axis.text(col, row, counts[row, col], ha="center", va="center", color=colour)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axis.set_title(f"accuracy {accuracy:.3f} on {counts.sum()} images")
    figure.tight_layout()
    return figure, counts


def sample_predictions(
    images: np.ndarray,
    labels: Sequence[int],
    predictions: Sequence[int],
    class_names: Sequence[str],
) -> Figure:
    """A grid of images (N, H, W, C uint8) titled with the prediction; wrong ones in red, with
    the true class in brackets."""
    columns = min(8, len(images))
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, truth, guess in zip(axes.flat, images, labels, predictions, strict=False):
        axis.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
        title = class_names[guess][:12]
        if guess != truth:
            title += f" ({class_names[truth][:12]})"
        axis.set_title(title, fontsize=7, color="black" if guess == truth else "red")
    figure.tight_layout()
    return figure


def fewshot_curve(accuracy: Mapping[int, tuple[float, float]], chance: float, title: str) -> Figure:
    """Few-shot accuracy (mean and std over seeds) against shots per class, log scale."""
    shots = sorted(accuracy)
    means = np.array([accuracy[k][0] for k in shots])
    stds = np.array([accuracy[k][1] for k in shots])
    figure, axis = plt.subplots(figsize=(4.5, 3.2))
    axis.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label="linear few-shot")
    axis.axhline(chance, color="grey", linestyle="--", label="chance")
    axis.set_xscale("log")
    axis.set_xticks(shots, [str(k) for k in shots])
    axis.set_xlabel("images per class")
    axis.set_ylabel("test accuracy")
    axis.set_ylim(0, 1)
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def attention_rollout(images: np.ndarray, maps: np.ndarray) -> Figure:
    """Each image (N, H, W, C uint8) above its rollout map (N, gh, gw) upsampled over it."""
    count = len(images)
    figure, axes = plt.subplots(2, count, figsize=(1.8 * count, 3.8), squeeze=False)
    for column, (image, heat) in enumerate(zip(images, maps, strict=True)):
        height, width = image.shape[:2]
        picture = image.squeeze()
        cmap = "gray" if image.shape[-1] == 1 else None
        axes[0, column].imshow(picture, cmap=cmap)
        axes[1, column].imshow(picture, cmap=cmap)
        # imshow puts pixel centres on integers, so the image spans -0.5 .. size - 0.5; the map
        # must cover that same span, or it sits half a pixel off and crops the image's edge.
        axes[1, column].imshow(
            heat,
            cmap="inferno",
            alpha=0.6,
            extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            interpolation="bilinear",
        )
        for axis in axes[:, column]:
            axis.axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("attention rollout", fontsize=8, loc="left")
    figure.tight_layout()
    return figure


def attention_distance(distances: np.ndarray) -> Figure:
    """Mean attention distance of every head against depth (the paper's Fig. 7, right)."""
    depth, heads = distances.shape
    figure, axis = plt.subplots(figsize=(4.5, 3.5))
    for head in range(heads):
        axis.scatter(np.arange(depth), distances[:, head], s=12, label=f"head {head}")
    axis.set_xlabel("network depth (layer)")
    axis.set_ylabel("mean attention distance (pixels)")
    axis.set_xticks(np.arange(depth))
    if heads <= 16:
        axis.legend(fontsize=6, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def position_similarity(similarity: np.ndarray) -> Figure:
    """For every patch, its position embedding's cosine similarity map (Fig. 7, centre)."""
    grid_h, grid_w = similarity.shape[:2]
    figure, axes = plt.subplots(
        grid_h, grid_w, figsize=(0.9 * grid_w + 1, 0.9 * grid_h), squeeze=False
    )
    image = None
    for row, col in np.ndindex(grid_h, grid_w):
        image = axes[row, col].imshow(similarity[row, col], cmap="viridis", vmin=-1, vmax=1)
        axes[row, col].set_xticks([])
        axes[row, col].set_yticks([])
    figure.supxlabel("input patch column")
    figure.supylabel("input patch row")
    figure.colorbar(image, ax=axes, shrink=0.6, label="cosine similarity")
    return figure


def embedding_filters(components: np.ndarray) -> Figure:
    """Principal components (K, C, P, P) of the patch-embedding filters (Fig. 7, left)."""
    count = len(components)
    columns = min(7, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.2 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, component in zip(axes.flat, components, strict=False):
        low, high = component.min(), component.max()
        picture = ((component - low) / max(high - low, 1e-12)).transpose(1, 2, 0)
        axis.imshow(picture.squeeze(), cmap="gray" if picture.shape[-1] == 1 else None)
    figure.suptitle("patch-embedding filters: principal components", fontsize=9)
    figure.tight_layout()
    return figure
