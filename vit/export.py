"""Deployment formats: ONNX with a dynamic batch dimension, and `torch.export` programs.

Both trace the inference graph (the model is put in eval mode) from one example input, whose
dtype decides the graph's input: float images already normalised, or uint8 pixels normalised
inside the graph with the config's preprocessing statistics. Only the batch dimension is dynamic;
the image size is part of the model (its position embedding), so another size means another
export after `resize_pos_embed`.

ONNX goes through the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, which needs
onnxscript) from the same `torch.export` program, so both formats share one trace. Models whose
weights exceed protobuf's 2 GB limit (ViT-H in float32) keep them in a `.data` file beside the
`.onnx` one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from vit.model import VisionTransformer

_PROTOBUF_LIMIT = 2**31 - 2**26  # 2 GiB less room for the graph itself


class ExportError(RuntimeError):
    """An exported model disagrees with the eager one."""


def example_input(
    model: VisionTransformer, batch: int = 2, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A batch of images of the model's input shape (uint8 dtype: pixels to normalise)."""
    shape = (batch, model.config.in_channels, *model.config.image_size)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype)


def export_program(
    model: VisionTransformer, example: torch.Tensor | None = None
) -> torch.export.ExportedProgram:
    """`torch.export` the logits forward pass with a dynamic batch dimension."""
    model.eval()
    x = example_input(model) if example is None else example
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})


def export_onnx(
    model: VisionTransformer,
    path: str | os.PathLike[str],
    example: torch.Tensor | None = None,
) -> Path:
    """Write an ONNX graph with input `images` (batch dynamic) and output `logits`."""
    program = export_program(model, example)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.onnx.export(
        program,
        f=os.fspath(path),
        input_names=["images"],
        output_names=["logits"],
        external_data=size > _PROTOBUF_LIMIT,
        verbose=False,
    )
    return Path(path)


@torch.no_grad()
def check_onnx_parity(
    model: VisionTransformer,
    path: str | os.PathLike[str],
    inputs: torch.Tensor,
    atol: float = 1e-4,
    rtol: float = 1e-5,
) -> float:
    """Run `inputs` through onnxruntime and the eager model; the largest absolute difference.

    Raises `ExportError` when a difference exceeds `atol + rtol * max|eager outputs|`, when the
    shapes differ, or when the eager outputs do not vary across the inputs by more than `atol`:
    then they would match a graph of any encoder, or of none (see `_input_dependent`). The
    relative part is there because float32 kernels that sum in another order differ in
    proportion to the terms they sum, so every output of a model with large logits differs by
    more than a fixed bound while agreeing to the digits float32 keeps. Pass at least two
    different inputs; one cannot show that the outputs depend on it.
    """
    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: inputs.cpu().numpy()})
    expected = model.eval()(inputs).float().cpu().numpy()
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape}, eager {expected.shape}")
    _input_dependent(expected, atol)
    error = float(np.abs(got - expected).max())
    scale = float(np.abs(expected).max())
    if error > atol + rtol * scale:
        raise ExportError(
            f"ONNX outputs differ from eager by up to {error:.2e} (more than {atol:.0e} + "
            f"{rtol:.0e} x {scale:.2e}, the largest eager output)"
        )
    return error


def _input_dependent(outputs: np.ndarray, atol: float) -> None:
    """Refuse outputs that barely change from one input to the next: parity on them is void.

    A zero-initialised head (an imported checkpoint given a new class count, before fine-tuning)
    makes every logit 0 whatever the encoder computes, so a wrong or stale graph would pass. We
    refuse rather than compare the pre-head features as well: those are no output of the graph
    that ships, and a model whose outputs ignore the image is not one to deploy.
    """
    if len(outputs) < 2:
        return
    spread = float(np.abs(outputs - outputs[:1]).max())
    if spread <= atol:
        raise ExportError(
            f"the eager outputs vary across the inputs by only {spread:.1e} (<= {atol:.0e}), so "
            "matching them shows nothing about the graph: is the head still zero-initialised? "
            "Fine-tune the model first, or drop the head (num_classes=0) to export the features"
        )
