"""Few-shot linear evaluation, the ViT paper's cheap probe of a frozen representation.

Frozen features are mapped to {-1, 1}^K targets by L2-regularised least squares, solved in closed
form on whitened features with an unpenalised bias (as in big_vision's ``fewshot_lsr``). One
eigendecomposition per fit serves every L2 strength, so a whole grid costs about one solve. This
module is pure PyTorch + NumPy so that any stage (or a notebook) can run it on a driver.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vit.model import VisionTransformer

#: big_vision's grid: 2^-10 .. 2^19. Whitened features put X^T X on the scale of n, so it spans
#: "almost no regularisation" to "nearly a nearest-class-mean classifier" for any n.
DEFAULT_L2_GRID: tuple[float, ...] = tuple(2.0**i for i in range(-10, 20))
DEFAULT_SHOTS: tuple[int, ...] = (1, 5, 10, 25)
STD_FLOOR = 1e-6  # constant features whiten to 0 instead of NaN or amplified rounding noise


def accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of rows of `logits` (n, K) whose argmax equals the label in `labels` (n,)."""
    scores, truth = _numpy(logits), _numpy(labels)
    if scores.ndim != 2 or truth.ndim != 1 or len(scores) != len(truth):
        raise ValueError(
            f"need logits (n, K) and labels (n,), got {scores.shape} and {truth.shape}"
        )
    return float(np.mean(scores.argmax(axis=1) == truth)) if len(truth) else float("nan")


def _numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):  # any device, dtype (bf16 too) or autograd state
        values = values.detach().cpu()
        return (values.float() if values.is_floating_point() else values).numpy()
    return np.asarray(values)


@torch.no_grad()
def extract_features(
    model: VisionTransformer,
    batches: Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logits features (n, d) float32 and labels (n,) of every batch {"tokens", "label"}.

    The model runs in eval mode (no dropout) and its previous mode is restored, so a training
    loop can call this mid-run.
    """
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for batch in batches:
            tokens = batch["tokens"]
            if not isinstance(tokens, torch.Tensor):  # Ray hands out read-only arrays
                tokens = torch.from_numpy(np.array(tokens))
            tokens = tokens.to(device)
            pooled = model.forward_head(model.forward_features(tokens), pre_logits=True)
            features.append(pooled.float().cpu().numpy())
            labels.append(np.asarray(batch["label"]))
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("extract_features got no batches")
    return np.concatenate(features).astype(np.float32), np.concatenate(labels)


class RidgeSolver:
    """Ridge regression from features to ±1 one-hot targets for any L2 strength.

    Features are whitened with this fitting set's mean and std, then ``W, b`` minimise
    ``||Z W + 1 b - T||^2 + l2 ||W||^2``. The bias is not penalised: it is big_vision's bias
    column in the limit of an infinite constant (it uses 100). Since Z is centred, the bias
    decouples and equals the target mean, leaving ``W = (Z^T Z + l2 I)^-1 Z^T (T - b)``.
    With ``Z^T Z = Q diag(e) Q^T`` that is ``Q diag(1 / (e + l2)) Q^T Z^T (T - b)``; when there
    are fewer rows than features the n x n Gram ``Z Z^T = U diag(e) U^T`` is decomposed instead
    and ``W = Z^T U diag(1 / (e + l2)) U^T (T - b)`` (the push-through identity). Float64 keeps
    the small eigenvalues meaningful.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        x = np.asarray(features, np.float64)
        y = np.asarray(labels)
        if x.ndim != 2 or len(x) == 0 or len(x) != len(y):
            raise ValueError(f"need features (n, d) with n = len(labels) > 0, got {x.shape}")
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
        self.mean = x.mean(axis=0)
        self.std = np.maximum(x.std(axis=0), STD_FLOOR)
        z = self.whiten(x)
        targets = 2.0 * np.eye(num_classes)[y] - 1.0
        self.bias = targets.mean(axis=0)
        centred = targets - self.bias
        if len(z) >= z.shape[1]:
            eigs, q = np.linalg.eigh(z.T @ z)
            self._left, self._right = q, q.T @ (z.T @ centred)
        else:
            eigs, u = np.linalg.eigh(z @ z.T)
            self._left, self._right = z.T @ u, u.T @ centred
        self._eigs = np.clip(eigs, 0.0, None)  # a PSD matrix; negatives are rounding

    def whiten(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.mean) / self.std

    def weights(self, l2: float) -> np.ndarray:
        """(d, K) weights on whitened features; ``self.bias`` is the (K,) intercept."""
        return (self._left / (self._eigs + l2)) @ self._right

    def predict(self, features: np.ndarray, l2: float) -> np.ndarray:
        """Regression scores (n, K); their argmax is the predicted class."""
        return self.whiten(features) @ self.weights(l2) + self.bias


@dataclass(frozen=True)
class FewShotResult:
    accuracy: float  # test accuracy at the chosen L2 strength
    l2: float  # the chosen L2 strength
    num_train: int
    dev_accuracy: dict[float, float] = field(default_factory=dict)  # selection score per L2


def feasible_shots(shots: Sequence[int], dev_per_class: int, rarest: int) -> list[int]:
    """The shot counts whose shots and dev rows the rarest class can fill. Without dev rows the
    L2 strength is chosen on a slice of the shots themselves (`fewshot_ridge`), which takes two
    a class."""
    return [k for k in shots if k + dev_per_class <= rarest and (dev_per_class or k >= 2)]


def fewshot_ridge(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    *,
    dev_x: np.ndarray | None = None,
    dev_y: np.ndarray | None = None,
) -> FewShotResult:
    """Fit on train, choose the L2 strength, report test accuracy.

    The L2 strength is never chosen on the test set. With ``dev_x``/``dev_y`` it is the grid
    value with the best dev accuracy of the fit on all of train (one eigendecomposition).
    Without them, the last fifth (at least one) of each class with two or more examples, in
    the order given, is held out; the grid is scored by a fit on the rest and the chosen value
    is refit on all of train. Ties go to the strongest regularisation. A one-value grid needs
    no selection; otherwise a set with no class of two examples (1-shot) is refused.
    """
    grid = tuple(float(v) for v in l2_grid)
    if not grid:
        raise ValueError("l2_grid is empty")
    train_y = np.asarray(train_y)
    solver = RidgeSolver(train_x, train_y, num_classes)
    scores: dict[float, float] = {}
    if len(grid) > 1:
        if dev_x is None or dev_y is None:
            fit, held = _held_out_slice(train_y)
            if not len(held):
                raise ValueError(
                    "cannot choose the L2 strength: no class has two examples to hold one out; "
                    "pass dev_x/dev_y or a one-value l2_grid"
                )
            selector = RidgeSolver(np.asarray(train_x)[fit], train_y[fit], num_classes)
            dev_x, dev_y = np.asarray(train_x)[held], train_y[held]
        else:
            selector = solver
        z = selector.whiten(dev_x)
        scores = {v: accuracy(z @ selector.weights(v) + selector.bias, dev_y) for v in grid}
    l2 = max(grid, key=lambda v: (scores.get(v, 0.0), v))
    test_accuracy = accuracy(solver.predict(test_x, l2), test_y)
    return FewShotResult(test_accuracy, l2, len(train_y), scores)


def _held_out_slice(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fit, held = [], []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        cut = len(rows) - (max(1, len(rows) // 5) if len(rows) >= 2 else 0)
        fit.append(rows[:cut])
        held.append(rows[cut:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def sample_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
    """Sorted indices of exactly ``shots`` examples of every class, drawn without replacement
    by ``np.random.default_rng(seed)``. A class with fewer examples is an error, not skipped:
    a few-shot score over a silently smaller label set would not be comparable."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        rows = np.flatnonzero(labels == c)
        if len(rows) < shots:
            raise ValueError(f"class {c} has {len(rows)} training examples, fewer than {shots}")
        chosen.append(rng.choice(rows, size=shots, replace=False))
    return np.sort(np.concatenate(chosen))


def fewshot_evaluate(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    num_classes: int,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    dev_per_class: int = 10,
) -> dict[int, tuple[float, float]]:
    """{shots: (mean, std over seeds) of test accuracy} (std with ddof=0).

    The last ``dev_per_class`` examples of each class of the train pool (in the order given:
    the same for every seed and shot count) are the dev set that picks the L2 strength; shots
    are sampled from the rest, so each class needs ``shots + dev_per_class`` examples.
    ``dev_per_class=0`` selects on a slice of the shots themselves (see ``fewshot_ridge``).
    """
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    dev, pool = [], []
    for c in range(num_classes):
        rows = np.flatnonzero(train_y == c)
        if len(rows) < max(shots) + dev_per_class:
            raise ValueError(
                f"class {c} has {len(rows)} training examples; {max(shots)} shots plus "
                f"{dev_per_class} dev examples need {max(shots) + dev_per_class}"
            )
        cut = len(rows) - dev_per_class
        pool.append(rows[:cut])
        dev.append(rows[cut:])
    pool_idx, dev_idx = np.sort(np.concatenate(pool)), np.sort(np.concatenate(dev))
    dev_x = train_x[dev_idx] if dev_per_class else None
    dev_y = train_y[dev_idx] if dev_per_class else None
    results: dict[int, tuple[float, float]] = {}
    for k in shots:
        accuracies = []
        for seed in seeds:
            idx = pool_idx[sample_shots(train_y[pool_idx], num_classes, k, seed)]
            result = fewshot_ridge(
                train_x[idx],
                train_y[idx],
                test_x,
                test_y,
                num_classes,
                l2_grid,
                dev_x=dev_x,
                dev_y=dev_y,
            )
            accuracies.append(result.accuracy)
        results[int(k)] = (float(np.mean(accuracies)), float(np.std(accuracies)))
    return results
