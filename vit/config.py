"""Model and preprocessing configuration.

A `ViTConfig` is the single description of a model: it is what a checkpoint stores, what the data
pipeline reads to know how to cut images into patches, and what serving reads to preprocess a
request. Keeping preprocessing inside the config is what stops training and serving from drifting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Pooling = Literal["token", "gap"]
PosEmbedKind = Literal["learned", "sincos2d"]
Interpolation = Literal["bilinear", "bicubic"]

# (layers, width, mlp width, heads): Table 1 of the paper plus the Ti/S sizes from later work.
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
}
_PATCH_SIZES = (8, 14, 16, 32)

#: Every registered variant name, for example "B/16".
VARIANTS: tuple[str, ...] = tuple(f"{s}/{p}" for s in _SIZES for p in _PATCH_SIZES)


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become model input; travels with the weights.

    Evaluation resizes the shorter side to `resize_size` and centre-crops the model's image size.
    The default mean and std of 0.5 map pixels to [-1, 1] as the original ViT code does.
    """

    mean: tuple[float, ...] = (0.5,)  # one value for every channel, or one per channel
    std: tuple[float, ...] = (0.5,)
    resize_size: int | None = None  # None: resize straight to the crop size (no border cropped)
    interpolation: Interpolation = "bilinear"

    def channel_stats(self, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std with one entry per channel."""

        def expand(stat: tuple[float, ...]) -> tuple[float, ...]:
            return stat * channels if len(stat) == 1 else stat

        return expand(self.mean), expand(self.std)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a Vision Transformer (pre-norm, as in the paper)."""

    image_size: int | tuple[int, int] = (224, 224)  # an int is a square; kept as (H, W)
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    pooling: Pooling = "token"
    pos_embed: PosEmbedKind = "learned"
    pos_embed_interpolation: Interpolation = "bicubic"
    representation_size: int | None = None  # tanh pre-logits layer, used in pretraining only
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    preprocessing: Preprocessing = field(default_factory=Preprocessing)

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, int):
            size = (size, size)
        object.__setattr__(self, "image_size", tuple(int(s) for s in size))
        sizes = dict(
            image_size=min(self.image_size),
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            width=self.width,
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
        )
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {self.image_size} is not divisible by patch size {self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
        if self.pooling not in ("token", "gap"):
            raise ValueError(f"pooling must be 'token' or 'gap', got {self.pooling!r}")
        if self.pos_embed not in ("learned", "sincos2d"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos2d', got {self.pos_embed!r}")
        self._check_heads()
        self._check_interpolations()
        for stat in (self.preprocessing.mean, self.preprocessing.std):
            if len(stat) not in (1, self.in_channels):
                raise ValueError(
                    f"preprocessing has {len(stat)} channel statistics "
                    f"for {self.in_channels} input channels"
                )

    def _check_heads(self) -> None:
        """0 classes means no head; a 0-wide pre-logits layer would only fail in forward."""
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be 0 (no head) or more, got {self.num_classes}")
        if self.representation_size is not None and self.representation_size < 1:
            raise ValueError(
                "representation_size must be positive, or None for no pre-logits layer; "
                f"got {self.representation_size}"
            )

    def _check_interpolations(self) -> None:
        """Resampling modes are used only later (fine-tuning, ingest): a typo must fail here."""
        modes = get_args(Interpolation)
        for name, mode in (
            ("pos_embed_interpolation", self.pos_embed_interpolation),
            ("preprocessing interpolation", self.preprocessing.interpolation),
        ):
            if mode not in modes:
                raise ValueError(f"{name} must be one of {modes}, got {mode!r}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ViTConfig:
        """Build a named variant such as "B/16", with any field overridden."""
        try:
            size, patch = name.split("/")
            depth, width, mlp_dim, heads = _SIZES[size]
            patch_size = int(patch)
        except (ValueError, KeyError):
            raise ValueError(
                f"unknown ViT variant {name!r}; known: {', '.join(VARIANTS)}"
            ) from None
        fields = dict(depth=depth, width=width, mlp_dim=mlp_dim, num_heads=heads)
        fields["patch_size"] = patch_size
        fields.update(overrides)
        return cls(**fields)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along height and width."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: P * P * C."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token when pooling on it."""
        return 1 if self.pooling == "token" else 0

    def replace(self, **changes: Any) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def at_resolution(self, image_size: int | tuple[int, int]) -> ViTConfig:
        """This config at another input size, its evaluation resize scaled with the crop.

        The centre crop keeps `image_size / resize_size` of the shorter side; a resize left as
        it was would be smaller than a larger crop, which would then squash the whole image.
        """
        config = self.replace(image_size=image_size)
        resize = self.preprocessing.resize_size
        if resize is None or config.image_size == self.image_size:
            return config
        scale = min(config.image_size) / min(self.image_size)
        preprocessing = dataclasses.replace(self.preprocessing, resize_size=round(resize * scale))
        return config.replace(preprocessing=preprocessing)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        """Inverse of `to_dict`; unknown keys are an error so a typo cannot pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {unknown}")
        values = dict(data)
        pre = values.pop("preprocessing", None) or {}
        preprocessing = Preprocessing(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}
        )
        return cls(**values, preprocessing=preprocessing)
