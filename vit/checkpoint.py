"""Checkpoints as directories: `model.safetensors` + `vit.json`.

safetensors holds only tensors, so loading a checkpoint can never execute code (unlike pickle).
`vit.json` carries everything needed to use the weights without the run that made them: the model
config (with its preprocessing), the class names and the provenance (run ids, dataset, parent
checkpoint).
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vit.config import ViTConfig
from vit.model import VisionTransformer

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "vit.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or does not match its own metadata."""


@dataclass(frozen=True)
class CheckpointMetadata:
    config: ViTConfig
    class_names: tuple[str, ...] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "provenance": self.provenance,
        }


def save(
    model: VisionTransformer,
    path: str | os.PathLike[str],
    *,
    class_names: list[str] | tuple[str, ...] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write `model` to the directory `path` (created if needed) and return it.

    Each file is written under a temporary name and renamed into place, so no reader ever sees
    a half-written file. Overwriting a checkpoint swaps its two files one after the other.
    """
    return save_weights(
        model.config, model.state_dict(), path, class_names=class_names, provenance=provenance
    )


def save_weights(
    config: ViTConfig,
    weights: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    class_names: list[str] | tuple[str, ...] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """`save` for weights held apart from a model of `config`: a sharded model's state dict,
    gathered whole, needs no second copy of the model to be written."""
    if class_names is not None and len(class_names) != config.num_classes:
        raise CheckpointError(
            f"{len(class_names)} class names for a model with {config.num_classes} classes"
        )
    if class_names is not None and not all(isinstance(n, str) for n in class_names):
        raise CheckpointError("class names must be strings: `load` refuses any others")
    meta = CheckpointMetadata(config, tuple(class_names) if class_names else None, provenance or {})
    # Serialised first: metadata that cannot be written (a provenance value JSON does not know)
    # must fail the save before new weights replace the old ones beside the old metadata.
    text = json.dumps(meta.to_json(), indent=2, sort_keys=True)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    _atomic_write(directory / METADATA_FILE, lambda tmp: Path(tmp).write_text(text))
    return directory


def read_metadata(path: str | os.PathLike[str]) -> CheckpointMetadata:
    """Read `vit.json` alone: cheap, for listing or validating checkpoints."""
    if not Path(path).exists():  # not "vit.json is missing": that sends one looking inside
        raise CheckpointError(f"{path} does not exist")
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a vit checkpoint: {METADATA_FILE} is missing")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not {type(data).__name__}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{file} has format version {version!r}, expected {FORMAT_VERSION}")
    if not isinstance(data.get("config"), dict):
        raise CheckpointError(f"{file} holds no model config (a JSON object under 'config')")
    try:
        config = ViTConfig.from_dict(data["config"])
    except (AttributeError, TypeError, ValueError) as error:  # AttributeError: preprocessing
        raise CheckpointError(f"{file} holds an invalid model config: {error}") from None
    provenance = data.get("provenance", {})
    if not isinstance(provenance, dict):
        raise CheckpointError(f"{file}: provenance must be a JSON object")
    names = data.get("class_names")
    if names and (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or len(names) != config.num_classes
    ):
        raise CheckpointError(
            f"{file}: class_names must be {config.num_classes} strings, one per output class"
        )
    return CheckpointMetadata(config, tuple(names) if names else None, provenance)


def load(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[VisionTransformer, CheckpointMetadata]:
    """Rebuild the model from a checkpoint directory; every mismatch is named in the error."""
    meta = read_metadata(path)
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a vit checkpoint: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(file, device=str(map_location))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{file} is corrupt: {error}") from None
    model = VisionTransformer(meta.config).to(map_location)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in sorted(set(tensors) & set(expected))
        if tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            f"missing tensors {missing}" if missing else "",
            f"unexpected tensors {unexpected}" if unexpected else "",
            f"shape mismatches {wrong_shape}" if wrong_shape else "",
        ]
        detail = "; ".join(p for p in problems if p)
        raise CheckpointError(f"{file} does not match its config: {detail}")
    model.load_state_dict(tensors)
    return model, meta


def _atomic_write(target: Path, write: Callable[[str], object]) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    # Created like any new file, so its mode is what the umask allows; kept after the write,
    # because safetensors leaves its files owner-only and checkpoints are shared and served.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    try:
        write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
