"""Few-shot linear evaluation: the closed-form solver against references, and its protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vit import VisionTransformer, ViTConfig
from vit.evaluate import (
    DEFAULT_L2_GRID,
    RidgeSolver,
    accuracy,
    extract_features,
    fewshot_evaluate,
    fewshot_ridge,
    sample_shots,
)

# Both branches: more rows than features (d x d covariance) and fewer (n x n Gram).
SHAPES = [(60, 12), (15, 40)]


def problem(n: int, d: int, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d) * 5
    return x.astype(np.float32), np.arange(n) % classes


def gaussian_blobs(
    per_class: int, classes: int, d: int, separation: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * separation
    y = np.repeat(np.arange(classes), per_class)
    return (centres[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


@pytest.mark.parametrize(("n", "d"), SHAPES)
@pytest.mark.parametrize("l2", [1e-3, 1.0, 300.0])
def test_solver_matches_scikit_learn_ridge(n: int, d: int, l2: float) -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = problem(n, d)
    solver = RidgeSolver(x, y, 4)
    z = solver.whiten(x)
    assert np.allclose(z.mean(axis=0), 0, atol=1e-9) and np.allclose(z.std(axis=0), 1)
    targets = 2.0 * np.eye(4)[y] - 1.0
    reference = linear_model.Ridge(alpha=l2, fit_intercept=True).fit(z, targets)
    np.testing.assert_allclose(solver.weights(l2), reference.coef_.T, atol=1e-6)
    np.testing.assert_allclose(solver.bias, reference.intercept_, atol=1e-6)
    test_x, _ = problem(30, d, seed=1)
    expected = reference.predict(solver.whiten(test_x))
    np.testing.assert_allclose(solver.predict(test_x, l2), expected, atol=1e-6)


@pytest.mark.parametrize(("n", "d"), SHAPES)
def test_one_eigendecomposition_equals_a_direct_solve_per_l2(n: int, d: int) -> None:
    x, y = problem(n, d, seed=2)
    solver = RidgeSolver(x, y, 4)
    z = solver.whiten(x)
    centred = 2.0 * np.eye(4)[y] - 1.0 - solver.bias
    for l2 in DEFAULT_L2_GRID[::3]:
        direct = np.linalg.solve(z.T @ z + l2 * np.eye(d), z.T @ centred)
        np.testing.assert_allclose(solver.weights(l2), direct, rtol=1e-6, atol=1e-9)


def test_separable_classes_are_learned_from_few_shots() -> None:
    x, y = gaussian_blobs(60, 5, 16, separation=4.0, seed=0)
    test_x, test_y = gaussian_blobs(40, 5, 16, separation=4.0, seed=0)
    results = fewshot_evaluate(x, y, test_x, test_y, 5, shots=(1, 5), seeds=(0, 1))
    assert set(results) == {1, 5}
    assert results[5][0] >= 0.98 and results[1][0] >= 0.9


def test_random_labels_score_chance() -> None:
    rng = np.random.default_rng(3)
    x, test_x = rng.normal(size=(400, 16)), rng.normal(size=(4000, 16))
    y, test_y = rng.integers(0, 4, 400), rng.integers(0, 4, 4000)
    for mean, std in fewshot_evaluate(x, y, test_x, test_y, 4, shots=(5, 25)).values():
        assert abs(mean - 0.25) < 0.05 and std < 0.05


def test_sampling_is_deterministic_and_exact_per_class() -> None:
    labels = np.random.default_rng(0).integers(0, 3, 90)
    first = sample_shots(labels, 3, 5, seed=7)
    assert np.array_equal(first, sample_shots(labels, 3, 5, seed=7))
    assert not np.array_equal(first, sample_shots(labels, 3, 5, seed=8))
    assert np.bincount(labels[first], minlength=3).tolist() == [5, 5, 5]
    assert len(set(first.tolist())) == 15
    with pytest.raises(ValueError, match="class 1 has"):
        sample_shots(np.array([0, 0, 1, 2, 2]), 3, 2, seed=0)


def test_too_few_examples_for_shots_plus_dev_is_refused() -> None:
    x, y = gaussian_blobs(12, 3, 4, separation=1.0, seed=0)
    with pytest.raises(ValueError, match="shots plus 10 dev"):
        fewshot_evaluate(x, y, x, y, 3, shots=(5,))


def test_l2_is_chosen_on_dev_data_never_on_test() -> None:
    x, y = gaussian_blobs(10, 3, 8, separation=2.0, seed=1)
    dev_x, dev_y = gaussian_blobs(10, 3, 8, separation=2.0, seed=1)
    result = fewshot_ridge(x, y, x[:0], y[:0], 3, dev_x=dev_x, dev_y=dev_y)
    assert set(result.dev_accuracy) == set(DEFAULT_L2_GRID)
    best = max(result.dev_accuracy.values())
    assert result.dev_accuracy[result.l2] == best and np.isnan(result.accuracy)
    one_shot_x, one_shot_y = x[::10], y[::10]
    with pytest.raises(ValueError, match="cannot choose the L2"):
        fewshot_ridge(one_shot_x, one_shot_y, x, y, 3)
    fixed = fewshot_ridge(one_shot_x, one_shot_y, x, y, 3, l2_grid=(1.0,))
    assert fixed.l2 == 1.0 and fixed.dev_accuracy == {}
    held_out = fewshot_ridge(x, y, x, y, 3)  # selects on a slice of train itself
    assert held_out.l2 in DEFAULT_L2_GRID and len(held_out.dev_accuracy) == len(DEFAULT_L2_GRID)


def test_extract_features_are_frozen_pre_logits() -> None:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=2, in_channels=1, num_classes=3, width=16, depth=1,
        mlp_dim=32, num_heads=2, dropout=0.5,
    )  # fmt: skip
    model = VisionTransformer(config).train()
    tokens = torch.randint(0, 256, (5, config.num_patches, config.patch_dim), dtype=torch.uint8)
    batches = [
        {"tokens": tokens[:3].numpy(), "label": np.array([0, 1, 2])},
        {"tokens": tokens[3:], "label": np.array([1, 1])},
    ]
    features, labels = extract_features(model, batches, "cpu")
    assert model.training  # mode restored
    assert features.dtype == np.float32 and features.shape == (5, 16)
    assert labels.tolist() == [0, 1, 2, 1, 1]
    with torch.no_grad():
        expected = model.eval().forward_head(model.forward_features(tokens), pre_logits=True)
    np.testing.assert_allclose(features, expected.numpy(), atol=1e-6)
    assert accuracy(np.eye(3)[[0, 1, 2, 2]], np.array([0, 1, 2, 1])) == 0.75


def test_ridge_on_raw_digit_pixels_is_a_strong_baseline() -> None:
    """Real data: 10 labelled 8x8 digits per class already give ~87% by this protocol."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1300], order[1300:]
    results = fewshot_evaluate(x[train], y[train], x[test], y[test], 10, shots=(1, 10))
    assert results[10][0] > 0.8 and results[10][0] > results[1][0] > 0.4


def test_accuracy_refuses_shapes_that_would_broadcast() -> None:
    """A label column (n, 1) against n predictions would compare all n x n pairs."""
    logits = np.eye(3)[[0, 1, 2]]
    assert accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    for labels in (np.array([[0], [1], [1]]), np.array([0, 0, 0, 0]), np.array([0])):
        with pytest.raises(ValueError, match=r"logits \(n, K\) and labels \(n,\)"):
            accuracy(logits, labels)
    assert np.isnan(accuracy(np.zeros((0, 3)), np.zeros(0, np.int64)))


def test_accuracy_takes_any_torch_tensor() -> None:
    logits = torch.eye(3, dtype=torch.bfloat16, requires_grad=True)
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
