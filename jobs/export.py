"""Export a vit checkpoint for deployment: ONNX (dynamic batch) and/or a torch.export program.

    python -m jobs.export --checkpoint runs/imported/b16 --onnx b16.onnx
    python -m jobs.export --checkpoint runs/imported/b16 --onnx b16.onnx --uint8 --program b16.pt2

The ONNX graph is checked against the eager model through onnxruntime before the job succeeds;
a graph that fails the check is deleted, so nothing unverified is left to deploy.
A checkpoint whose logits do not depend on the image (the zero-initialised head that
`jobs.import_weights --num-classes N` gives) fails that check, since equal zeros prove nothing:
fine-tune it first, or import with --num-classes 0 to export the features. With --uint8 the graph
takes raw pixels and normalises them with the checkpoint's preprocessing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from jobs.common import checked_checkpoint
from vit import checkpoint
from vit.export import (
    ExportError,
    check_onnx_parity,
    example_input,
    export_onnx,
    export_program,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="vit checkpoint, or a pretraining run or checkpoint"
    )
    parser.add_argument("--onnx", help="ONNX file to write")
    parser.add_argument("--program", help="torch.export program (.pt2) to write")
    parser.add_argument("--uint8", action="store_true", help="take uint8 pixels, not floats")
    parser.add_argument("--atol", type=float, default=1e-4, help="ONNX parity: absolute part")
    parser.add_argument("--rtol", type=float, default=1e-5, help="ONNX parity: relative part")
    args = parser.parse_args(argv)
    if not (args.onnx or args.program):
        parser.error("name an output with --onnx and/or --program")
    model, _ = checkpoint.load(checked_checkpoint(args.checkpoint, "export"))
    dtype = torch.uint8 if args.uint8 else torch.float32
    if args.onnx:
        path = export_onnx(model, args.onnx, example_input(model, 2, dtype))
        try:
            error = check_onnx_parity(
                model, path, example_input(model, 3, dtype), args.atol, args.rtol
            )
        except ExportError as failure:
            _remove_onnx(path)
            raise SystemExit(
                f"[export] {path} failed its check against eager and was deleted: {failure}"
            ) from None
        print(f"[export] {path}: onnxruntime matches eager to {error:.1e}")
    if args.program:
        torch.export.save(export_program(model, example_input(model, 2, dtype)), args.program)
        print(f"[export] {args.program}: torch.export program")
    return 0


def _remove_onnx(path: Path) -> None:
    """Delete an ONNX file and the weights file the exporter writes beside large models."""
    for file in (path, path.with_name(f"{path.name}.data")):
        file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
