"""Import pretrained ViT weights from timm, torchvision, Hugging Face or Google `.npz` files.

    python -m jobs.import_weights --from timm vit_base_patch16_224.pth --out runs/imported/b16
    python -m jobs.import_weights --from npz ViT-B_16.npz --out runs/imported/b16-384 \\
        --image-size 384 --num-classes 10 --register vit-b16-in21k
    python -m jobs.tune --config configs/finetune_demo.py --set checkpoint=runs/imported/b16

Writes a vit checkpoint directory (`vit.checkpoint`) whose provenance names the source file, its
SHA-256, the import arguments and how a position table is resampled (`F.interpolate`'s mode,
align_corners and antialias: timm's loaders antialias, ours do not). PyTorch files are read with
`torch.load(weights_only=True)`, which refuses pickled code; `.safetensors` and `.npz` files hold
only arrays. For Hugging Face, PATH may be a model directory: its config.json supplies the head
count, the LayerNorm eps and the patch grid, and its weights are model.safetensors or else
pytorch_model.bin (read as above).
timm files do not record the model's `global_pool` or `no_embed_class`: give them when the timm
model was not built with the defaults (--global-pool, --no-embed-class). A non-square model needs
the size it was trained at (--image-size H W) or its patch grid (--grid-size ROWS COLS).
With --register, the checkpoint is logged to an MLflow run (stage `import`) and registered as a
new version of NAME under the alias `imported` (see --alias).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipelines import tracking
from vit import VisionTransformer, checkpoint
from vit.config import Preprocessing
from vit.convert import from_hf, from_npz, from_timm, from_torchvision, read_safetensors
from vit.posemb import resampling

CONVERTERS = {"timm": from_timm, "torchvision": from_torchvision, "hf": from_hf, "npz": from_npz}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# What torch.save's pre-1.6 format opens with: its magic number, pickled (protocol 2).
LEGACY_TORCH_HEADER = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def is_torch_file(path: Path) -> bool:
    """Whether the file has one of torch.save's containers: a zip archive or the legacy header.

    torch.load reports a file it cannot parse at all (a web page saved in place of the weights,
    a safetensors file named .pth) as a weights-only refusal too, so the container tells a file
    that holds pickled code from one that holds no torch data.
    """
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as file:
        return file.read(len(LEGACY_TORCH_HEADER)) == LEGACY_TORCH_HEADER


def first_line(error: BaseException) -> str:
    """An error's first line (torch appends paragraphs of advice), or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch file holding a state dict (possibly under "state_dict"
    or "model", as training checkpoints keep it), without unpickling anything but tensors.

    A torch file that holds more (pickled code) is refused; one that torch cannot read (cut off,
    not a torch file) is reported as such, as the remedy differs: trust the file, or fetch it
    again. The file is opened here, so a missing or unreadable path keeps its own error.
    """
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    unreadable = f"{path} is not a readable PyTorch file (corrupt, truncated or another format)"
    with path.open("rb") as file:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if not is_torch_file(path):
                raise SystemExit(f"{unreadable}: neither of torch.save's formats") from None
            raise SystemExit(
                f"{path} holds more than tensors; refusing to unpickle it: {error}"
            ) from None
        except (RuntimeError, EOFError, OSError) as error:
            raise SystemExit(f"{unreadable}: {first_line(error)}") from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise SystemExit(f"{path} does not hold a state dict")
    return data


def hf_weights(directory: Path) -> Path:
    """The weights file of a Hugging Face model directory, safetensors first."""
    for name in HF_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    raise SystemExit(
        f"cannot import {directory}: a Hugging Face model directory needs "
        f"{' or '.join(HF_WEIGHTS)} (sharded checkpoints are not supported)"
    )


def hf_grid(hf_config: dict[str, Any]) -> tuple[int, int] | None:
    """The patch grid config.json describes: the position table's shape, which its length isn't."""
    size, patch = hf_config.get("image_size"), hf_config.get("patch_size")
    if not (size and patch):
        return None
    height, width = (size, size) if isinstance(size, int) else size
    return (height // patch, width // patch)


def size_argument(values: list[int] | None) -> int | tuple[int, int] | None:
    """--image-size / --grid-size: one number for a square, two for (height, width)."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else (values[0], values[1])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(args: argparse.Namespace) -> tuple[VisionTransformer, Path]:
    """The converted model and the weights file it came from."""
    path = Path(args.path)
    options: dict[str, Any] = {
        "num_heads": args.num_heads,
        "num_classes": args.num_classes,
        "image_size": size_argument(args.image_size),
        "grid_size": size_argument(args.grid_size),
        "patch_size": args.patch_size,
        "keep_pre_logits": args.keep_pre_logits,
    }
    if args.source_format == "timm":
        options["global_pool"] = args.global_pool
        options["no_embed_class"] = args.no_embed_class
    if args.source_format == "hf" and path.is_dir():
        config_file = path / "config.json"
        if config_file.is_file():
            hf_config = json.loads(config_file.read_text())
            options["num_heads"] = options["num_heads"] or hf_config.get("num_attention_heads")
            options["layer_norm_eps"] = hf_config.get("layer_norm_eps", 1e-12)
            options["grid_size"] = options["grid_size"] or hf_grid(hf_config)
        path = hf_weights(path)
    if path.is_dir():  # "no such file" would send the user looking for a path that exists
        raise SystemExit(
            f"cannot import {path}: a directory (only --from hf reads a model directory); "
            "give the weights file in it"
        )
    if not path.is_file():
        raise SystemExit(f"cannot import {path}: no such file")
    if args.layer_norm_eps is not None:
        options["layer_norm_eps"] = args.layer_norm_eps
    if args.source_format == "npz" or (
        args.source_format == "hf" and path.suffix == ".safetensors"
    ):
        source: Any = path
    else:
        source = read_tensors(path)
    model = CONVERTERS[args.source_format](source, **options)
    return with_preprocessing(model, args), path


def with_preprocessing(model: VisionTransformer, args: argparse.Namespace) -> VisionTransformer:
    """The model with the preprocessing fields given on the command line replaced."""
    changes = {
        name: value
        for name, value in {
            "mean": tuple(args.mean) if args.mean else None,
            "std": tuple(args.std) if args.std else None,
            "resize_size": args.resize_size,
            "interpolation": args.interpolation,
        }.items()
        if value is not None
    }
    if not changes:
        return model
    preprocessing: Preprocessing = dataclasses.replace(model.config.preprocessing, **changes)
    # The normalisation buffers are computed from the config: rebuild rather than patch it.
    rebuilt = VisionTransformer(model.config.replace(preprocessing=preprocessing))
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source_format", required=True, choices=sorted(CONVERTERS))
    parser.add_argument("path", help="weights file (or a Hugging Face model directory)")
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--num-classes", type=int, help="new zero-initialised head (0: none); default: keep"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        metavar="PX",
        help="input size, H or H W: the position embedding is resampled to it",
    )
    parser.add_argument(
        "--grid-size",
        type=int,
        nargs="+",
        metavar="N",
        help="patch grid (ROWS or ROWS COLS) of the weights' position table; default: square",
    )
    parser.add_argument("--patch-size", type=int, help="resample the patch embedding to it")
    parser.add_argument("--num-heads", type=int, help="default: from the weights or the variant")
    parser.add_argument("--layer-norm-eps", type=float, help="default: the source codebase's")
    parser.add_argument(
        "--keep-pre-logits", action="store_true", help="keep the pre-logits layer on a new head"
    )
    parser.add_argument(
        "--global-pool",
        choices=["token", "avg"],
        help="timm only: the model's global_pool, which its file does not record",
    )
    parser.add_argument(
        "--no-embed-class",
        action="store_true",
        help="timm only: the model was built with no_embed_class (no class-token position)",
    )
    parser.add_argument("--mean", type=float, nargs="+", help="preprocessing mean per channel")
    parser.add_argument("--std", type=float, nargs="+", help="preprocessing std per channel")
    parser.add_argument("--resize-size", type=int, help="shorter side before the centre crop")
    parser.add_argument("--interpolation", choices=["bilinear", "bicubic"])
    parser.add_argument("--register", metavar="NAME", help="register in the MLflow model registry")
    parser.add_argument(
        "--alias", default="imported", help="alias of the registered version (default: %(default)s)"
    )
    parser.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT)
    args = parser.parse_args(argv)
    for name, values in (("--image-size", args.image_size), ("--grid-size", args.grid_size)):
        if values is not None and len(values) > 2:
            parser.error(f"{name} takes one or two numbers")
    if args.source_format != "timm" and (args.global_pool or args.no_embed_class):
        parser.error("--global-pool and --no-embed-class describe timm models only")
    try:
        tracking.check_alias(args.alias)
    except ValueError as error:
        parser.error(str(error))
    try:
        model, weights = convert(args)
    except ValueError as error:  # a ConversionError, or a config the weights cannot have
        raise SystemExit(f"cannot import {args.path}: {error}") from None
    provenance: dict[str, Any] = {
        "stage": "import",
        "source_format": args.source_format,
        "source_path": str(weights.resolve()),
        "source_sha256": sha256(weights),
        "import_arguments": {
            k: v for k, v in vars(args).items() if v is not None and k not in ("path", "out")
        },
        "pos_embed_resampling": resampling(model.config.pos_embed_interpolation),
    }
    if not args.register:
        _save(model, weights, args, provenance)
        return 0
    uri = tracking.tracking_uri()
    run_id = tracking.start_run(
        f"import-{args.register}",
        experiment=args.experiment,
        tags={"vitray_stage": "import", "vitray_source_format": args.source_format},
        uri=uri,
    )
    with tracking.ending(run_id, uri):
        provenance["mlflow_run_id"] = run_id
        tracking.log_params(run_id, {**provenance, "model": model.config.to_dict()}, uri)
        directory = _save(model, weights, args, provenance)
        tracking.client(uri).log_artifacts(run_id, str(directory), "checkpoint")
        version = tracking.register_model(
            args.register,
            run_id,
            "checkpoint",
            tags={"vitray_source_format": args.source_format},
            alias=args.alias,
            uri=uri,
        )
    print(f"[import] registered models:/{args.register}@{args.alias} (version {version})")
    return 0


def _save(
    model: VisionTransformer, weights: Path, args: argparse.Namespace, provenance: dict[str, Any]
) -> Path:
    """Write the vitray checkpoint and say what was imported."""
    directory = checkpoint.save(model, args.out, provenance=provenance)
    config = model.config
    print(
        f"[import] {args.source_format} {weights.name}: {config.depth} blocks, width "
        f"{config.width}, {config.num_heads} heads, patch {config.patch_size}, "
        f"{config.image_size[0]}x{config.image_size[1]} px, {config.pooling} pooling, "
        f"{config.num_classes} classes -> {directory}"
    )
    return directory


if __name__ == "__main__":
    sys.exit(main())
