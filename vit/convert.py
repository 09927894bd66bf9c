"""Import and export weights in the layouts of other ViT codebases.

Layouts: timm (our own names), torchvision, Hugging Face transformers (`ViTModel`,
`ViTForImageClassification`), and Google's Flax `.npz` checkpoints, in the original `vit_jax`
layout and the big_vision one (per-block or "scan"-stacked blocks).

Each layout is written once, as a table of `_Tensor` rows (our name, the source's names, the
transform each way), and both directions read the same table, so import and export cannot drift
apart. Import checks the names both ways: an unknown key is a part of the source model that would
be silently dropped, a missing one a part left at its random initialisation; both raise
`ConversionError` with the names.

The weights fix the architecture (width, depth, MLP width, patch size, class token, pre-logits
layer, head) but not everything a model needs, so the rest are arguments with per-codebase
defaults: the head count (read from `.npz` kernels, otherwise looked up among the paper's
variants), the LayerNorm eps (1e-6 everywhere but Hugging Face, which defaults to 1e-12; a wrong
eps shifts every output a little), and the preprocessing that must travel with the weights.

Nor do they fix the patch grid: a position table is a flat list of rows, so its length gives the
number of positions, not the rows and columns. Whether one row belongs to the class token is a
convention of each layout (torchvision, Hugging Face and vit_jax include it, big_vision never,
timm unless `no_embed_class`), not a guess from the length; the remaining positions are read as a
square grid unless `grid_size` says otherwise, or `image_size` asks for a grid of just that many
positions. A count that is no square, with neither given, raises rather than guessing. timm's
pooling (`global_pool`) is not stored either, and is an argument of `from_timm`.

The same arguments adapt the weights to a new task, as the paper's fine-tuning does: another
`image_size` resamples the position embedding in 2D (`vit.posemb`, the config's interpolation
mode), another `patch_size` resamples the patch-embedding kernel, and another `num_classes`
replaces the head with a zero-initialised one (0 drops it) and drops the pre-logits layer.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from vit.config import VARIANTS, Preprocessing, ViTConfig
from vit.model import VisionTransformer
from vit.posemb import resample_pos_embed

Tensors = dict[str, torch.Tensor]
Size = int | tuple[int, int]
NpzLayout = Literal["vit_jax", "big_vision", "big_vision_scan"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_UNREADABLE = "corrupt, truncated or another format"


class ConversionError(ValueError):
    """Weights that do not describe a model this library can represent, or a bad argument."""


# ------------------------------------------------------------------------------ layout tables
def _same(*tensors: torch.Tensor) -> torch.Tensor:
    return tensors[0]


def _one(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor,)


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat(tensors)


def _split3(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tensor.chunk(3)


def _transpose(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.T


def _transposed(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (tensor.T,)


@dataclass(frozen=True)
class _Tensor:
    """One of our tensors, the source tensors it is made of, and the transforms both ways.

    A `group` marks an optional part (class token, pre-logits layer, head): it may be absent as a
    whole, but a part present in half is an error.
    """

    ours: str
    theirs: tuple[str, ...]
    group: str | None = None
    load: Callable[..., torch.Tensor] = _same
    dump: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = _one


@dataclass(frozen=True)
class _Layout:
    """A codebase's names, and whether its position table has a row for the class token.

    `class_row` is the codebase's convention, not a property of one file: a table's length cannot
    tell a class-token row from a patch position (1 + 4x6 rows are as many as 5x5). `note` says
    how to pick the other convention, where the codebase has one.
    """

    name: str
    top: list[_Tensor]
    block: Callable[[int], list[_Tensor]]
    class_row: bool = True
    note: str = ""

    def tensors(self, depth: int) -> list[_Tensor]:
        return self.top + [t for i in range(depth) for t in self.block(i)]


def _layer(ours: str, theirs: str, group: str | None = None) -> list[_Tensor]:
    """Weight and bias of a PyTorch layer under another name."""
    return [_Tensor(f"{ours}.{s}", (f"{theirs}.{s}",), group) for s in ("weight", "bias")]


def _renamed(ours: str, theirs: str, names: Mapping[str, str]) -> list[_Tensor]:
    return [t for mine, other in names.items() for t in _layer(ours + mine, theirs + other)]


_BLOCK_LAYERS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def _timm_layout(no_embed_class: bool = False) -> _Layout:
    """timm's names are ours; `no_embed_class` tables give the class token no position row."""
    top = [
        _Tensor("cls_token", ("cls_token",), "cls_token"),
        _Tensor("pos_embed", ("pos_embed",)),
        *_layer("patch_embed.proj", "patch_embed.proj"),
        *_layer("norm", "norm"),
        *_layer("pre_logits.fc", "pre_logits.fc", "pre_logits"),
        *_layer("head", "head", "head"),
    ]
    return _Layout(
        "timm",
        top,
        lambda i: _renamed(f"blocks.{i}.", f"blocks.{i}.", {n: n for n in _BLOCK_LAYERS}),
        class_row=not no_embed_class,
        note="" if no_embed_class else " (a timm model built with no_embed_class has none)",
    )


def _torchvision_layout() -> _Layout:
    top = [
        _Tensor("cls_token", ("class_token",)),
        _Tensor("pos_embed", ("encoder.pos_embedding",)),
        *_layer("patch_embed.proj", "conv_proj"),
        *_layer("norm", "encoder.ln"),
        *_layer("pre_logits.fc", "heads.pre_logits", "pre_logits"),
        *_layer("head", "heads.head", "head"),
    ]
    names = {
        "norm1": "ln_1",
        "attn.proj": "self_attention.out_proj",
        "norm2": "ln_2",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.3",
    }

    def block(i: int) -> list[_Tensor]:
        ours, theirs = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
        return [
            _Tensor(f"{ours}attn.qkv.{s}", (f"{theirs}self_attention.in_proj_{s}",))
            for s in ("weight", "bias")
        ] + _renamed(ours, theirs, names)

    return _Layout("torchvision", top, block)


_HF_BLOCKS = {  # hub_names -> (block prefix, query/key/value, the other layers)
    True: (
        "encoder.layer",
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        {
            "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        },
    ),
    False: (
        "layers",
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        {"attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
    ),
}


def _hf_layout(prefix: str, hub_names: bool) -> _Layout:
    """`prefix` is "vit." inside ViTForImageClassification; `hub_names` picks the block naming.

    Files on the Hugging Face Hub (and what `save_pretrained` writes) keep the transformers 4
    names (`encoder.layer.{i}.attention.attention.query`); transformers 5 modules name the same
    tensors `layers.{i}.attention.q_proj` in memory and rename on load and save.
    """
    top = [
        _Tensor("cls_token", (f"{prefix}embeddings.cls_token",)),
        _Tensor("pos_embed", (f"{prefix}embeddings.position_embeddings",)),
        *_layer("patch_embed.proj", f"{prefix}embeddings.patch_embeddings.projection"),
        *_layer("norm", f"{prefix}layernorm"),
        *_layer("pre_logits.fc", f"{prefix}pooler.dense", "pre_logits"),
        *_layer("head", "classifier", "head"),
    ]
    block_prefix, qkv, others = _HF_BLOCKS[hub_names]
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", **others}

    def block(i: int) -> list[_Tensor]:
        ours, theirs = f"blocks.{i}.", f"{prefix}{block_prefix}.{i}."
        split = [
            _Tensor(
                f"{ours}attn.qkv.{s}",
                tuple(f"{theirs}{n}.{s}" for n in qkv),
                load=_cat,
                dump=_split3,
            )
            for s in ("weight", "bias")
        ]
        return split + _renamed(ours, theirs, names)

    return _Layout("Hugging Face", top, block)


def _dense(ours: str, theirs: str, group: str | None = None) -> list[_Tensor]:
    """A Flax Dense layer: kernel (in, out) is the transposed torch weight."""
    return [
        _Tensor(f"{ours}.weight", (f"{theirs}/kernel",), group, _transpose, _transposed),
        _Tensor(f"{ours}.bias", (f"{theirs}/bias",), group),
    ]


def _norm(ours: str, theirs: str) -> list[_Tensor]:
    return [
        _Tensor(f"{ours}.weight", (f"{theirs}/scale",)),
        _Tensor(f"{ours}.bias", (f"{theirs}/bias",)),
    ]


_FLAX_BLOCKS = {  # big_vision -> the numbered sub-modules of an encoder block
    False: ("LayerNorm_0", "LayerNorm_2", "MultiHeadDotProductAttention_1", "MlpBlock_3"),
    True: ("LayerNorm_0", "LayerNorm_1", "MultiHeadDotProductAttention_0", "MlpBlock_0"),
}


def _flax_layout(prefix: str, big_vision: bool, num_heads: int = 0) -> _Layout:
    """Google's Flax parameter tree; `num_heads` is needed only to write per-head kernels."""
    ln1, ln2, mha, mlp = _FLAX_BLOCKS[big_vision]
    pos = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    top = [
        _Tensor(
            "patch_embed.proj.weight",
            (f"{prefix}embedding/kernel",),
            load=lambda k: k.permute(3, 2, 0, 1),  # HWIO -> OIHW
            dump=lambda w: (w.permute(2, 3, 1, 0),),
        ),
        _Tensor("patch_embed.proj.bias", (f"{prefix}embedding/bias",)),
        _Tensor("cls_token", (f"{prefix}cls",), "cls_token"),
        # big_vision models with fixed sin-cos positions store no table at all.
        _Tensor("pos_embed", (f"{prefix}{pos}",), "pos_embed" if big_vision else None),
        *_norm("norm", f"{prefix}Transformer/encoder_norm"),
        *_dense("pre_logits.fc", f"{prefix}pre_logits", "pre_logits"),
        *_dense("head", f"{prefix}head", "head"),
    ]

    def block(i: int) -> list[_Tensor]:
        ours, theirs = f"blocks.{i}.", f"{prefix}Transformer/encoderblock_{i}/"
        attention = [f"{theirs}{mha}/{n}" for n in ("query", "key", "value")]
        return [
            *_norm(f"{ours}norm1", theirs + ln1),
            _Tensor(  # per-head kernels (D, heads, head_dim), stacked into one (3D, D) weight
                f"{ours}attn.qkv.weight",
                tuple(f"{a}/kernel" for a in attention),
                load=lambda *ks: torch.cat([k.flatten(1).T for k in ks]),
                dump=lambda w: tuple(x.T.reshape(w.shape[1], num_heads, -1) for x in w.chunk(3)),
            ),
            _Tensor(
                f"{ours}attn.qkv.bias",
                tuple(f"{a}/bias" for a in attention),
                load=lambda *bs: torch.cat([b.flatten() for b in bs]),
                dump=lambda b: tuple(x.reshape(num_heads, -1) for x in b.chunk(3)),
            ),
            _Tensor(  # (heads, head_dim, D)
                f"{ours}attn.proj.weight",
                (f"{theirs}{mha}/out/kernel",),
                load=lambda k: k.flatten(0, 1).T,
                dump=lambda w: (w.T.reshape(num_heads, -1, w.shape[0]),),
            ),
            _Tensor(f"{ours}attn.proj.bias", (f"{theirs}{mha}/out/bias",)),
            *_norm(f"{ours}norm2", theirs + ln2),
            *_dense(f"{ours}mlp.fc1", f"{theirs}{mlp}/Dense_0"),
            *_dense(f"{ours}mlp.fc2", f"{theirs}{mlp}/Dense_1"),
        ]

    # big_vision adds positions to the patches only, then prepends the class token.
    return _Layout("big_vision" if big_vision else "vit_jax", top, block, class_row=not big_vision)


# --------------------------------------------------------------------------- the two directions
def _listed(names: list[str], limit: int = 20) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _read(layout: _Layout, source: Mapping[str, torch.Tensor]) -> Tensors:
    """Source tensors -> ours, by the layout's table; every unknown or missing key is an error."""
    depth = 0
    while all(name in source for name in layout.block(depth)[0].theirs):
        depth += 1
    rows = layout.tensors(depth)
    present = {r.group for r in rows if r.group and all(n in source for n in r.theirs)}
    state: Tensors = {}
    missing: list[str] = []
    for row in rows:
        if all(name in source for name in row.theirs):
            state[row.ours] = row.load(*(source[name] for name in row.theirs))
        elif row.group is None or row.group in present:
            missing += [name for name in row.theirs if name not in source]
    used = {name for row in rows if row.ours in state for name in row.theirs}
    unknown = sorted(set(source) - used)
    if missing or unknown:
        problems = [
            f"missing keys {_listed(missing)}" if missing else "",
            f"unknown keys {_listed(unknown)}" if unknown else "",
        ]
        raise ConversionError(
            f"not a {layout.name} ViT this library can represent ({depth} blocks found): "
            + "; ".join(p for p in problems if p)
        )
    return state


def _ours(model: VisionTransformer) -> Tensors:
    """The model's tensors; a fixed sin-cos table is written out as a (learned) table."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    state.setdefault("pos_embed", model.pos_embed.detach())
    return state


def _write(layout: _Layout, state: Tensors, depth: int) -> Tensors:
    rows = layout.tensors(depth)
    present = {r.group for r in rows if r.group and r.ours in state}
    missing = [
        r.ours for r in rows if r.ours not in state and (r.group is None or r.group in present)
    ]
    unmapped = sorted(set(state) - {r.ours for r in rows})
    if missing or unmapped:
        problems = [
            f"it needs {missing}" if missing else "",
            f"it has no place for {unmapped}" if unmapped else "",
        ]
        raise ConversionError(
            f"the {layout.name} layout cannot hold this model: "
            + "; ".join(p for p in problems if p)
        )
    out: Tensors = {}
    for row in rows:
        if row.ours in state:
            out.update(zip(row.theirs, row.dump(state[row.ours]), strict=True))
    return out


# ------------------------------------------------------------------------------ model building
def _known_heads(width: int, depth: int, mlp_dim: int) -> int:
    for name in VARIANTS:
        variant = ViTConfig.from_name(name)
        if (variant.width, variant.depth, variant.mlp_dim) == (width, depth, mlp_dim):
            return variant.num_heads
    raise ConversionError(
        f"width {width}, depth {depth}, MLP {mlp_dim} is none of the paper's variants, and the "
        "head count is not stored in these weights: pass num_heads"
    )


def resample_patch_embed(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Resize a patch-embedding kernel (D, C, P, P) to another patch size (FlexiViT's PI-resize).

    The new kernel is the pseudo-inverse solution that keeps each token unchanged when the patch
    itself is resized (bicubic) by the same factor: exact when the patch grows, a least-squares
    fit when it shrinks. Plain interpolation of the kernel would change the token norms.
    """
    old = weight.shape[-1]
    if old == patch_size:
        return weight
    basis = torch.eye(old * old, dtype=torch.float64).reshape(-1, 1, old, old)
    resize = F.interpolate(basis, size=(patch_size, patch_size), mode="bicubic", antialias=True)
    pinv = torch.linalg.pinv(resize.reshape(old * old, -1))  # (new*new, old*old)
    flat = weight.to(torch.float64).reshape(*weight.shape[:2], old * old)
    return (flat @ pinv.T).reshape(*weight.shape[:2], patch_size, patch_size).to(weight.dtype)


def _pair(size: Size) -> tuple[int, int]:
    """An int or (H, W) as (H, W)."""
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def _table_grid(
    positions: int, grid_size: Size | None, image_grid: tuple[int, int] | None, what: str
) -> tuple[int, int]:
    """The rows and columns of a position table of `positions` patch positions.

    Only the length is stored, so the shape comes from the caller: an explicit `grid_size`, else
    the grid of the requested image size when it has just that many positions (the size the
    weights were trained at), else a square, the shape of every published checkpoint. Any other
    count would be a guess (24 positions may be 4x6 or 2x12) and raises; `what` names the table.
    """
    if grid_size is not None:
        grid = _pair(grid_size)
        if grid[0] * grid[1] != positions:
            raise ConversionError(f"{what}, not the {grid[0]}x{grid[1]} of grid_size")
        return grid
    if image_grid is not None and image_grid[0] * image_grid[1] == positions:
        return image_grid
    side = math.isqrt(max(positions, 0))
    if positions < 1 or side * side != positions:
        raise ConversionError(
            f"{what}, which is no square grid: pass grid_size=(rows, columns), or the image_size "
            "the weights were trained at"
        )
    return (side, side)


def _table_description(layout: _Layout, rows: int, class_token: bool) -> str:
    """How a table's rows were counted, for errors: the class-token row is the layout's rule."""
    table = f"the {layout.name} position table has {rows} rows"
    if not class_token:
        return f"{table} of patch positions"
    if layout.class_row:
        return f"{table}: one for the class token{layout.note}, {rows - 1} patch positions"
    return f"{table} of patch positions (the class token has none in {layout.name})"


def _build(
    state: Tensors,
    layout: _Layout,
    *,
    num_heads: int | None,
    layer_norm_eps: float,
    preprocessing: Preprocessing | None,
    default_preprocessing: Callable[[tuple[int, int]], Preprocessing],
    num_classes: int | None,
    image_size: Size | None,
    grid_size: Size | None,
    patch_size: int | None,
    keep_pre_logits: bool,
) -> VisionTransformer:
    """Infer the config from our-named tensors, adapt them to the requested geometry and head.

    `grid_size` is the (rows, columns) the position table was trained at; `image_size` and
    `patch_size` the model wanted, the table and kernel being resampled when they differ.
    """
    width, channels, patch, patch_w = state["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ConversionError(f"non-square patches ({patch}x{patch_w}) are not supported")
    depth = sum(1 for key in state if key.endswith(".norm1.weight"))
    if depth == 0:
        raise ConversionError("the weights hold no transformer blocks")
    mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
    prefix = 1 if "cls_token" in state else 0
    wanted = None if image_size is None else _pair(image_size)
    new_patch = patch_size or patch
    image_grid = None if wanted is None else (wanted[0] // new_patch, wanted[1] // new_patch)
    pos = state.get("pos_embed")
    if pos is not None:
        class_row = prefix if layout.class_row else 0
        what = _table_description(layout, pos.shape[1], bool(prefix))
        grid = _table_grid(pos.shape[1] - class_row, grid_size, image_grid, what)
        if prefix and not class_row:
            # The class token carries no position: a zero row gives the same sum and our layout.
            pos = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
            state["pos_embed"] = pos
        source_size = (grid[0] * patch, grid[1] * patch)
    elif wanted is not None:  # a fixed sin-cos table: computed for whatever grid is asked
        source_size = wanted
    elif grid_size is not None:
        source_size = (_pair(grid_size)[0] * patch, _pair(grid_size)[1] * patch)
    else:
        raise ConversionError("fixed sin-cos position embedding: pass the image_size")
    head = state.get("head.weight")
    pre_logits = state.get("pre_logits.fc.weight")
    target_size = wanted or source_size
    source = ViTConfig(
        image_size=source_size,
        patch_size=patch,
        in_channels=channels,
        num_classes=0 if head is None else head.shape[0],
        width=width,
        depth=depth,
        mlp_dim=mlp_dim,
        num_heads=num_heads or _known_heads(width, depth, mlp_dim),
        pooling="token" if prefix else "gap",
        pos_embed="learned" if pos is not None else "sincos2d",
        representation_size=None if pre_logits is None else pre_logits.shape[0],
        layer_norm_eps=layer_norm_eps,
        preprocessing=preprocessing or default_preprocessing(target_size),
    )
    target = source.replace(image_size=target_size, patch_size=new_patch)
    state["patch_embed.proj.weight"] = resample_patch_embed(
        state["patch_embed.proj.weight"], target.patch_size
    )
    if pos is not None:
        state["pos_embed"] = resample_pos_embed(
            pos, source.grid_size, target.grid_size, prefix, target.pos_embed_interpolation
        )
    model = VisionTransformer(target)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:  # shapes that disagree with each other
        raise ConversionError(f"inconsistent weights: {error}") from None
    if num_classes is not None and num_classes != target.num_classes:
        model.reset_classifier(num_classes, keep_pre_logits=keep_pre_logits)
    return model


def _timm_preprocessing(image_size: tuple[int, int]) -> Preprocessing:
    """timm's default for its ViTs: 0.5 mean/std, bicubic, centre crop of 90% (shorter side)."""
    return Preprocessing(resize_size=math.floor(min(image_size) / 0.9), interpolation="bicubic")


def _google_preprocessing(image_size: tuple[int, int]) -> Preprocessing:
    """Google's and Hugging Face's: 0.5 mean/std, bilinear resize straight to the input size."""
    return Preprocessing()


def _torchvision_preprocessing(image_size: tuple[int, int]) -> Preprocessing:
    """torchvision's ImageNet weights: ImageNet statistics, bilinear, resize 256 crop 224."""
    return Preprocessing(
        mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_size=math.floor(min(image_size) / 0.875)
    )


# ---------------------------------------------------------------------------------- importers
def read_safetensors(path: str | os.PathLike[str]) -> Tensors:
    """A safetensors file's tensors; a damaged one is a `ConversionError` that says so."""
    try:
        return load_file(os.fspath(path))
    except SafetensorError as error:
        raise ConversionError(
            f"{path} is not a readable safetensors file ({_UNREADABLE}): {error}"
        ) from None


def _read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` archive, refusing anything that is not a whole zip archive.

    `np.load` falls back to unpickling what is no archive, so a cut-off download or a web page
    saved in its place would be reported as pickled data to load "if you trust the file".
    The file is opened here, so a missing path keeps its own error.
    """
    with open(path, "rb") as file:
        if not zipfile.is_zipfile(file):
            raise ConversionError(f"{path} is not a readable .npz archive ({_UNREADABLE})")
        file.seek(0)
        try:
            with np.load(file) as archive:
                return {key: archive[key] for key in archive.files}
        except (zipfile.BadZipFile, EOFError) as error:
            raise ConversionError(
                f"{path} is a damaged .npz archive ({_UNREADABLE}): {error}"
            ) from None


_TIMM_POOLS = ("token", "avg")


def _timm_pooling(global_pool: str | None, class_token: bool) -> None:
    """Refuse a timm `global_pool` that our model, with or without its class token, cannot run.

    Ours pools on the class token exactly when it has one. A timm model that keeps the token but
    averages the patch tokens still lets the token take part in attention, so dropping it would
    change every output, and pooling on it would read the wrong token.
    """
    if global_pool is None:
        return
    if global_pool not in _TIMM_POOLS:
        raise ConversionError(
            f"timm global_pool {global_pool!r} is not supported: only 'token' and 'avg'"
        )
    if global_pool == "token" and not class_token:
        raise ConversionError("global_pool 'token', but the weights have no class token")
    if global_pool == "avg" and class_token:
        raise ConversionError(
            "global_pool 'avg' with a class token (mean of the patch tokens, the class token "
            "attending) is not supported: only class-token pooling or a model without the token"
        )


_TORCHVISION_LEGACY_MLP = re.compile(
    r"(encoder\.layers\.encoder_layer_\d+\.mlp\.)linear_([12])\.(weight|bias)"
)


def _torchvision_current_names(state_dict: Mapping[str, torch.Tensor]) -> Tensors:
    """Rename the MLP layers of torchvision's published ViT weights to today's names.

    Those files predate pytorch/vision#6053 and name the layers `mlp.linear_1` / `mlp.linear_2`;
    torchvision renames them on load (`MLPBlock._load_from_state_dict`, version < 2) to
    `mlp.0` / `mlp.3`, and so do we. A legacy name whose new name is present too is left alone,
    to be reported as an unknown key.
    """
    renamed = dict(state_dict)
    for key in state_dict:
        match = _TORCHVISION_LEGACY_MLP.fullmatch(key)
        if match is None:
            continue
        block, index, kind = match.groups()
        new = f"{block}{3 * (int(index) - 1)}.{kind}"
        if new not in renamed:
            renamed[new] = renamed.pop(key)
    return renamed


def from_timm(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
    preprocessing: Preprocessing | None = None,
    num_classes: int | None = None,
    image_size: Size | None = None,
    grid_size: Size | None = None,
    patch_size: int | None = None,
    keep_pre_logits: bool = False,
    global_pool: str | None = None,
    no_embed_class: bool = False,
) -> VisionTransformer:
    """A timm `VisionTransformer` state dict (timm names are ours).

    Class-token or GAP pooling with the final norm before pooling. timm's state dict records
    neither how the model pools nor whether its position table has a class-token row, so pass
    the timm model's own `global_pool` and `no_embed_class` when they are not timm's defaults:
    `global_pool` defaults to "token" with a class token and "avg" without, and a class token
    with "avg" (or any other pooling) raises, as ours cannot represent it. A model built with
    `global_pool="avg"` but the class token kept imports *wrongly* if the argument is left out:
    nothing in the weights tells. timm's `fc_norm` (pool, then normalise), register tokens,
    layer scale and other variants raise. The default preprocessing is timm's for its ViTs;
    weights trained with ImageNet statistics (DeiT) need `preprocessing`.
    """
    if "fc_norm.weight" in state_dict:
        raise ConversionError(
            "this timm model normalises after pooling (fc_norm); only norm-then-pool is supported"
        )
    _timm_pooling(global_pool, "cls_token" in state_dict)
    layout = _timm_layout(no_embed_class)
    return _build(
        _read(layout, state_dict),
        layout,
        num_heads=num_heads,
        layer_norm_eps=layer_norm_eps,
        preprocessing=preprocessing,
        default_preprocessing=_timm_preprocessing,
        num_classes=num_classes,
        image_size=image_size,
        grid_size=grid_size,
        patch_size=patch_size,
        keep_pre_logits=keep_pre_logits,
    )


def from_torchvision(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
    preprocessing: Preprocessing | None = None,
    num_classes: int | None = None,
    image_size: Size | None = None,
    grid_size: Size | None = None,
    patch_size: int | None = None,
    keep_pre_logits: bool = False,
) -> VisionTransformer:
    """A `torchvision.models.VisionTransformer` state dict (`heads.pre_logits` kept as ours).

    The MLP names of torchvision's published weight files (`mlp.linear_1`, `mlp.linear_2`) are
    read as torchvision reads them. The default preprocessing is that of torchvision's ImageNet
    weights.
    """
    layout = _torchvision_layout()
    return _build(
        _read(layout, _torchvision_current_names(state_dict)),
        layout,
        num_heads=num_heads,
        layer_norm_eps=layer_norm_eps,
        preprocessing=preprocessing,
        default_preprocessing=_torchvision_preprocessing,
        num_classes=num_classes,
        image_size=image_size,
        grid_size=grid_size,
        patch_size=patch_size,
        keep_pre_logits=keep_pre_logits,
    )


def from_hf(
    state_dict_or_safetensors_path: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    *,
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-12,
    preprocessing: Preprocessing | None = None,
    num_classes: int | None = None,
    image_size: Size | None = None,
    grid_size: Size | None = None,
    patch_size: int | None = None,
    keep_pre_logits: bool = False,
) -> VisionTransformer:
    """A Hugging Face `ViTModel` or `ViTForImageClassification` state dict or safetensors file.

    Both the Hub file names and the transformers 5 module names are read. `ViTModel`'s pooler
    (dense + tanh on the class token) becomes our pre-logits layer. The LayerNorm eps defaults to
    transformers' 1e-12 (check the model's config.json); the preprocessing to `ViTImageProcessor`'s
    (0.5 mean/std, bilinear resize straight to the input size). A non-square model needs its
    config.json `image_size` as `image_size` (or its grid as `grid_size`).
    """
    source = state_dict_or_safetensors_path
    if not isinstance(source, Mapping):
        source = read_safetensors(source)
    prefix = "vit." if any(key.startswith("vit.") for key in source) else ""
    hub_names = any(".encoder.layer." in f".{key}" for key in source)
    layout = _hf_layout(prefix, hub_names)
    return _build(
        _read(layout, source),
        layout,
        num_heads=num_heads,
        layer_norm_eps=layer_norm_eps,
        preprocessing=preprocessing,
        default_preprocessing=_google_preprocessing,
        num_classes=num_classes,
        image_size=image_size,
        grid_size=grid_size,
        patch_size=patch_size,
        keep_pre_logits=keep_pre_logits,
    )


def from_npz(
    path_or_mapping: str | os.PathLike[str] | Mapping[str, np.ndarray],
    *,
    num_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
    preprocessing: Preprocessing | None = None,
    num_classes: int | None = None,
    image_size: Size | None = None,
    grid_size: Size | None = None,
    patch_size: int | None = None,
    keep_pre_logits: bool = False,
) -> VisionTransformer:
    """A Google Flax checkpoint (`.npz` of '/'-joined parameter paths), vit_jax or big_vision.

    The layout is recognised from the names: vit_jax numbers its sub-modules
    `MultiHeadDotProductAttention_1` / `MlpBlock_3` and stores the position table (with the
    class-token row when there is a class token) under `Transformer/posembed_input`; big_vision
    numbers them `_0`, keeps `pos_embedding` (no class-token row, none at all for sin-cos) at the
    top and may stack all blocks along a leading axis (`Transformer/encoderblock/...`, "scan").
    The parameters may sit under a prefix (`params/`, `params/img/`, `opt/target/`); keys outside
    it (optimiser state, a text tower) are not part of the ViT and are ignored. A MAP
    (attention-pooling) head raises; so would an unknown or missing parameter. The head count is
    read from the per-head attention kernels; a `num_heads` that disagrees with them raises.
    """
    if isinstance(path_or_mapping, Mapping):
        arrays = dict(path_or_mapping)
    else:
        arrays = _read_npz(path_or_mapping)
    roots = [k.removesuffix("embedding/kernel") for k in arrays if k.endswith("embedding/kernel")]
    roots = [r for r in roots if r == "" or r.endswith("/")]
    if len(roots) != 1:
        raise ConversionError(
            f"expected one patch embedding (`embedding/kernel`) in the archive, found {roots}"
        )
    prefix = roots[0]
    source = {
        key: torch.from_numpy(np.asarray(value, dtype=np.float32))
        for key, value in arrays.items()
        if key.startswith(prefix)
    }
    if any(key.startswith(f"{prefix}MAPHead_0/") for key in source):
        raise ConversionError(
            "this checkpoint pools with a MAP (attention-pooling) head, which is not supported"
        )
    scan = f"{prefix}Transformer/encoderblock/"
    for key in [k for k in source if k.startswith(scan)]:
        for i, tensor in enumerate(source.pop(key)):
            source[f"{prefix}Transformer/encoderblock_{i}/{key.removeprefix(scan)}"] = tensor
    big_vision = not any("/MlpBlock_3/" in key for key in source)
    layout = _flax_layout(prefix, big_vision)
    state = _read(layout, source)
    attention = "MultiHeadDotProductAttention_0" if big_vision else "MultiHeadDotProductAttention_1"
    stored = source[f"{prefix}Transformer/encoderblock_0/{attention}/query/kernel"].shape[1]
    if num_heads is not None and num_heads != stored:
        raise ConversionError(
            f"num_heads={num_heads}, but the attention kernels hold {stored} heads"
        )
    return _build(
        state,
        layout,
        num_heads=stored,
        layer_norm_eps=layer_norm_eps,
        preprocessing=preprocessing,
        default_preprocessing=_google_preprocessing,
        num_classes=num_classes,
        image_size=image_size,
        grid_size=grid_size,
        patch_size=patch_size,
        keep_pre_logits=keep_pre_logits,
    )


# ---------------------------------------------------------------------------------- exporters
def to_timm(model: VisionTransformer) -> Tensors:
    """A state dict for timm's `VisionTransformer` built with the same shape arguments.

    For GAP pooling build timm with `class_token=False, global_pool="avg", fc_norm=False`; for a
    pre-logits layer, timm has none (drop it with `reset_classifier`). Build the timm model with
    `norm_layer=partial(nn.LayerNorm, eps=model.config.layer_norm_eps)` when the eps is not 1e-6.
    """
    return _write(_timm_layout(), _ours(model), model.config.depth)


def to_torchvision(model: VisionTransformer) -> Tensors:
    """A state dict for `torchvision.models.VisionTransformer` (class-token pooling only).

    torchvision's ViT always ends in a classifier (`heads.head`, empty logits with num_classes=0),
    so a model without a head has no torchvision counterpart: it raises here, rather than as a
    missing key in torchvision's strict load.
    """
    if not model.config.num_classes:
        raise ConversionError(
            "torchvision's VisionTransformer always has a classifier (heads.head), and this model "
            "has none: give it one first (reset_classifier)"
        )
    return _write(_torchvision_layout(), _ours(model), model.config.depth)


def to_hf(model: VisionTransformer, *, hub_names: bool = True) -> Tensors:
    """A state dict for `ViTForImageClassification` (model with a head) or `ViTModel` (without).

    `hub_names=True` gives the names of Hub files, which `from_pretrained` reads in every
    transformers version; `hub_names=False` the transformers 5 module names, for
    `load_state_dict`. The transformers config must set `layer_norm_eps` to the model's. Our
    pre-logits layer is `ViTModel`'s pooler; a model with neither head nor pre-logits layer has no
    pooler, so build the `ViTModel` with `add_pooling_layer=False` (otherwise a strict load misses
    `pooler.dense`, and `from_pretrained` initialises it at random).
    """
    config = model.config
    if config.num_classes and config.representation_size is not None:
        raise ConversionError(
            "no Hugging Face ViT class has both a pre-logits layer and a classifier: drop one "
            "(reset_classifier)"
        )
    layout = _hf_layout("vit." if config.num_classes else "", hub_names)
    return _write(layout, _ours(model), config.depth)


def to_npz(
    model: VisionTransformer, path: str | os.PathLike[str], layout: NpzLayout = "vit_jax"
) -> None:
    """Write a Flax-layout `.npz` (see `from_npz`) that Google's code and timm can load.

    big_vision gives the class token no position: its position row is folded into the token,
    which leaves the sum, and every output, unchanged.
    """
    big_vision = layout != "vit_jax"
    state = _ours(model)
    if big_vision and "cls_token" in state:
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    tensors = _write(
        _flax_layout("", big_vision, model.config.num_heads), state, model.config.depth
    )
    if layout == "big_vision_scan":
        blocks = [k for k in tensors if k.startswith("Transformer/encoderblock_0/")]
        for key in blocks:
            rest = key.removeprefix("Transformer/encoderblock_0/")
            tensors[f"Transformer/encoderblock/{rest}"] = torch.stack(
                [
                    tensors.pop(f"Transformer/encoderblock_{i}/{rest}")
                    for i in range(model.config.depth)
                ]
            )
    np.savez(os.fspath(path), **{k: v.float().contiguous().numpy() for k, v in tensors.items()})
