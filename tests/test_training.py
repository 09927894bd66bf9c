"""The optimisation pieces of `pipelines.training`, without Ray."""

from __future__ import annotations

import pytest
import torch

from pipelines.pretrain import PretrainConfig
from pipelines.training import clip_gradients, warmup_then_decay


def _model_with_gradients(*values: float) -> torch.nn.Module:
    model = torch.nn.Linear(len(values), 1, bias=False)
    model.weight.grad = torch.tensor([values])
    return model


def test_gradients_are_clipped_to_the_global_norm_which_comes_back_unclipped() -> None:
    model = _model_with_gradients(3.0, 4.0)
    assert clip_gradients(model, 1.0, step=1, learning_rate=1e-3) == pytest.approx(5.0)
    assert model.weight.grad.norm() == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_stops_training_naming_the_step(bad: float) -> None:
    """Not clipped into NaN weights that the next checkpoint would keep."""
    model = _model_with_gradients(1.0, bad)
    with pytest.raises(FloatingPointError, match=r"at step 7 \(lr 0\.0005\)"):
        clip_gradients(model, 1.0, step=7, learning_rate=5e-4)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"grad_clip": 0.0}, "grad_clip must be positive"),
        ({"grad_clip": -1.0}, "grad_clip must be positive"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"warmup_steps": -1}, "warmup_steps must be 0 or more"),
        ({"steps": 2000, "warmup_steps": 10_000}, "warmup_steps must be fewer than steps"),
        ({"weight_decay": -0.1}, "weight_decay must be 0 or more"),
        ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
        ({"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\), got \(0.9,\)"),
        ({"decay": "constant"}, "decay must be 'cosine' or 'linear', got 'constant'"),
        ({"label_smoothing": 1.5}, r"label_smoothing must lie in \[0, 1\]"),
    ],
)
def test_pretraining_settings_that_train_wrong_are_refused_up_front(
    setting: dict[str, object], message: str
) -> None:
    """A clip at 0 zeroes the gradients and a negative one ascends them, silently; the others
    fail only in the workers, after Ray has retried them."""
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**setting)


def test_an_unknown_decay_is_refused_not_trained_as_linear() -> None:
    """Refused by the schedule itself, whoever builds it, not only by `PretrainConfig`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="decay must be 'cosine' or 'linear', got 'constant'"):
        warmup_then_decay(optimizer, 0, 10, "constant")


def test_clipping_may_be_turned_off() -> None:
    PretrainConfig(grad_clip=float("inf"))
    model = _model_with_gradients(30.0, 40.0)
    assert clip_gradients(model, float("inf"), step=1, learning_rate=1e-3) == pytest.approx(50.0)
    assert torch.equal(model.weight.grad, torch.tensor([[30.0, 40.0]]))  # left as they were
