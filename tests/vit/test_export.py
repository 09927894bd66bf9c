"""Export: ONNX (dynamic batch) and torch.export programs compute what the eager model does."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from vit import VisionTransformer, ViTConfig
from vit.export import (
    ExportError,
    check_onnx_parity,
    example_input,
    export_onnx,
    export_program,
)


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, width=32, depth=2, mlp_dim=64, num_heads=2, num_classes=5
    )
    model = VisionTransformer(config).eval()
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would hide any error
    return model


@pytest.fixture(scope="module")
def onnx_path(model: VisionTransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "vit.onnx")


def test_onnx_graph_has_a_dynamic_batch_and_matches_eager(
    model: VisionTransformer, onnx_path: Path
) -> None:
    graph = onnx.load(str(onnx_path)).graph
    (images,) = graph.input
    assert images.name == "images" and [o.name for o in graph.output] == ["logits"]
    assert images.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    for batch in (1, 3):
        assert check_onnx_parity(model, onnx_path, example_input(model, batch)) < 1e-4


def test_parity_check_catches_a_model_that_changed(
    model: VisionTransformer, onnx_path: Path
) -> None:
    changed = VisionTransformer(model.config).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.head.bias.add_(0.01)
    with pytest.raises(ExportError, match="differ"):
        check_onnx_parity(changed, onnx_path, example_input(model, 2))


def test_parity_allows_for_the_size_of_the_outputs(
    model: VisionTransformer, tmp_path: Path
) -> None:
    """Logits in the tens of thousands: float32 sums in another order differ by more than a
    fixed 1e-4 while agreeing to every digit float32 keeps, so the check scales with them."""
    large = VisionTransformer(model.config).eval()
    large.load_state_dict(model.state_dict())
    with torch.no_grad():
        large.head.weight.mul_(1e4)
    path = export_onnx(large, tmp_path / "large.onnx")
    inputs = example_input(model, 3)
    error = check_onnx_parity(large, path, inputs)
    assert 1e-4 < error < 1e-5 * float(large(inputs).abs().max())
    with torch.no_grad():
        large.head.bias.add_(10.0)  # a real change is still caught at this scale
    with pytest.raises(ExportError, match="differ"):
        check_onnx_parity(large, path, inputs)


def test_parity_on_outputs_that_ignore_the_input_is_refused(
    model: VisionTransformer, tmp_path: Path
) -> None:
    """With a zero-initialised head every logit is 0, so a graph of any encoder would match."""
    zero_head = VisionTransformer(model.config).eval()
    assert not zero_head.head.weight.any()
    path = export_onnx(zero_head, tmp_path / "zero-head.onnx")
    torch.manual_seed(1)
    another_encoder = VisionTransformer(model.config).eval()
    for eager in (zero_head, another_encoder):
        with pytest.raises(ExportError, match="zero-initialised"):
            check_onnx_parity(eager, path, example_input(model, 3))


def test_exported_program_matches_eager_and_survives_save_and_load(
    model: VisionTransformer, tmp_path: Path
) -> None:
    torch.export.save(export_program(model), tmp_path / "vit.pt2")
    program = torch.export.load(tmp_path / "vit.pt2").module()
    with torch.no_grad():
        for batch in (1, 5):
            x = example_input(model, batch)
            torch.testing.assert_close(program(x), model(x), atol=1e-6, rtol=1e-6)
