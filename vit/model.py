"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), pre-norm, in plain PyTorch.

Parameter names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.attn.qkv`,
...), the naming most public weights use, so conversion stays a renaming exercise.

The model takes either images (B, C, H, W) or the patch tokens (B, N, P*P*C) that the data
pipeline produces (`vit.patches.patchify`). uint8 input, images or tokens, is normalised inside
the model with the config's preprocessing statistics, so pixels can travel as bytes all the way to
the accelerator (4x less traffic than float32) and be normalised there.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit.config import ViTConfig
from vit.posemb import resample_pos_embed, sincos_2d


class PatchEmbed(nn.Module):
    """Linear embedding of non-overlapping patches, stored as a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.proj(x).flatten(2).transpose(1, 2)
        # Tokens are flattened (row, column, channel): reorder the kernel to match.
        weight = self.proj.weight.permute(0, 2, 3, 1).flatten(1)
        return F.linear(x, weight, self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention: fused SDPA, or an eager path that also returns the weights.

    The eager path exists for attention maps and rollout; it computes the softmax in float32 so
    bf16 autocast cannot overflow it.
    """

    def __init__(self, width: int, num_heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (width // num_heads) ** -0.5
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(width, width * 3)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False, num_queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from the first `num_queries` tokens (default: all) to every token."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if num_queries is not None:
            q = q[:, :, :num_queries]
        dropout = self.attention_dropout if self.training else 0.0
        weights = None
        if return_weights:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(b, q.shape[2], c)
        return self.proj_drop(self.proj(out)), weights


class Mlp(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep) if keep > 0 else x * mask


class Block(nn.Module):
    """x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig, drop_path: float) -> None:
        super().__init__()
        width, eps = config.width, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, config.num_heads, config.attention_dropout, config.dropout)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, config.mlp_dim, config.dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_weights: bool = False, num_queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With `num_queries`, only the first tokens are updated (and returned)."""
        y, weights = self.attn(self.norm1(x), return_weights, num_queries)
        if num_queries is not None:
            x = x[:, :num_queries]
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights


class VisionTransformer(nn.Module):
    """ViT with the uniform model API: forward_features / forward_head / reset_classifier."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, width)
        self.cls_token = (
            nn.Parameter(torch.zeros(1, 1, width)) if config.pooling == "token" else None
        )
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, self._num_tokens(), width))
        else:
            self.register_buffer("pos_embed", self._sincos_table(), persistent=False)
        self.pos_drop = nn.Dropout(config.dropout)
        # Stochastic depth grows linearly with depth (plain floats: works on the meta device).
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.pre_logits = self._make_pre_logits(config)
        self.head = self._make_head(config)
        self.grad_checkpointing = False
        mean, std = config.preprocessing.channel_stats(config.in_channels)
        # uint8 pixel p is normalised as p * scale + shift == (p / 255 - mean) / std.
        self.register_buffer("pixel_scale", 1.0 / (255.0 * torch.tensor(std)), persistent=False)
        self.register_buffer(
            "pixel_shift", -torch.tensor(mean) / torch.tensor(std), persistent=False
        )
        self._init_weights()

    # ----------------------------------------------------------------- construction helpers
    def _num_tokens(self) -> int:
        return self.config.num_prefix_tokens + self.config.num_patches

    def _sincos_table(self) -> torch.Tensor:
        table = sincos_2d(self.config.grid_size, self.config.width)
        prefix = torch.zeros(self.config.num_prefix_tokens, self.config.width)
        return torch.cat([prefix, table]).unsqueeze(0)

    @staticmethod
    def _make_pre_logits(config: ViTConfig) -> nn.Module:
        if config.representation_size is None:
            return nn.Identity()
        fc = nn.Linear(config.width, config.representation_size)
        return nn.Sequential(OrderedDict(fc=fc, act=nn.Tanh()))

    @staticmethod
    def _make_head(config: ViTConfig) -> nn.Module:
        if config.num_classes == 0:
            return nn.Identity()
        head = nn.Linear(config.representation_size or config.width, config.num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return head

    def _init_weights(self) -> None:
        """The original JAX initialisation: Xavier linears, LeCun patch embedding, zero head.

        The stacked q;k;v projection is three (D, D) projections in the original code, each
        initialised on its own: Xavier over the stacked (3D, D) matrix would be sqrt(2) narrower.
        """
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("head"):
                if name.endswith("attn.qkv"):
                    for projection in module.weight.data.chunk(3):
                        nn.init.xavier_uniform_(projection)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if name.endswith(("fc1", "fc2")):
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(proj.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)

    # ------------------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images or patch tokens, uint8 or float -> (B, prefix + N, D) with positions added."""
        cfg = self.config
        if x.ndim == 4:
            expected = (cfg.in_channels, *cfg.image_size)
            if tuple(x.shape[1:]) != expected:
                raise ValueError(f"expected images of shape (B, {expected}), got {tuple(x.shape)}")
            if x.dtype == torch.uint8:
                x = x * self.pixel_scale.view(-1, 1, 1) + self.pixel_shift.view(-1, 1, 1)
        elif x.ndim == 3:
            expected = (cfg.num_patches, cfg.patch_dim)
            if tuple(x.shape[1:]) != expected:
                raise ValueError(f"expected tokens of shape (B, {expected}), got {tuple(x.shape)}")
            if x.dtype == torch.uint8:
                # Channels are the fastest-varying axis of a flattened patch.
                repeats = cfg.patch_size * cfg.patch_size
                x = x * self.pixel_scale.repeat(repeats) + self.pixel_shift.repeat(repeats)
        else:
            raise ValueError(f"expected images (B, C, H, W) or tokens (B, N, D), got {x.ndim}D")
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def _encode(
        self, x: torch.Tensor, attention_layers: frozenset[int], prefix_only: bool = False
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the blocks; with `prefix_only` the last block updates only the class token.

        A token-pooled classifier reads nothing but the class token after the last block, so
        computing the last block's MLP and projection for every patch is wasted work (about a
        twelfth of a 12-layer model, forward and backward).
        """
        x = self._embed(x)
        maps: dict[int, torch.Tensor] = {}
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            queries = self.config.num_prefix_tokens if prefix_only and index == last else None
            if index in attention_layers:
                x, maps[index] = block(x, True, queries)
            elif self.grad_checkpointing and self.training:
                x, _ = checkpoint(block, x, False, queries, use_reentrant=False)
            else:
                x, _ = block(x, False, queries)
        return self.norm(x), maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm: (B, prefix + N, D)."""
        return self._encode(x, frozenset())[0]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (class token or mean of patch tokens), then the pre-logits layer and the head."""
        if self.config.pooling == "token":
            pooled = features[:, 0]
        else:
            pooled = features[:, self.config.num_prefix_tokens :].mean(dim=1)
        pooled = self.pre_logits(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits; equal to forward_head(forward_features(x)) but skips work the head ignores."""
        features, _ = self._encode(x, frozenset(), prefix_only=self.config.pooling == "token")
        return self.forward_head(features)

    def forward_with_attention(
        self, x: torch.Tensor, layers: Iterable[int] | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits plus the attention weights (B, heads, T, T) of the chosen layers (default: all).

        Only the chosen layers leave the fused kernel; the rest run at full speed.
        """
        chosen = frozenset(range(self.config.depth) if layers is None else layers)
        bad = sorted(i for i in chosen if not 0 <= i < self.config.depth)
        if bad:
            raise ValueError(f"layers {bad} out of range for depth {self.config.depth}")
        features, maps = self._encode(x, chosen)
        return self.forward_head(features), maps

    # ----------------------------------------------------------------- model surgery
    def reset_classifier(self, num_classes: int, keep_pre_logits: bool = False) -> None:
        """Replace the head with a zero-initialised one, as the paper does before fine-tuning.

        The pre-logits layer is a pretraining device and is dropped unless asked to keep it.
        """
        representation = self.config.representation_size if keep_pre_logits else None
        self.config = self.config.replace(
            num_classes=num_classes, representation_size=representation
        )
        if not keep_pre_logits:
            self.pre_logits = nn.Identity()
        weight = self.norm.weight
        self.head = self._make_head(self.config).to(weight.device, weight.dtype)

    def resize_pos_embed(self, image_size: int | tuple[int, int]) -> None:
        """Adapt the model to a new input resolution (same patch size) by 2D resampling.

        The evaluation resize travels with the weights, so it is scaled too (`at_resolution`).
        """
        old_grid = self.config.grid_size
        self.config = self.config.at_resolution(image_size)
        if isinstance(self.pos_embed, nn.Parameter):
            resized = resample_pos_embed(
                self.pos_embed.data,
                old_grid,
                self.config.grid_size,
                self.config.num_prefix_tokens,
                self.config.pos_embed_interpolation,
            )
            # A table frozen for fine-tuning stays frozen.
            self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)
        else:
            self.pos_embed = self._sincos_table().to(self.pos_embed.device, self.pos_embed.dtype)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: embeddings, the class token, norms and biases."""
        return {
            name
            for name, param in self.named_parameters()
            if param.ndim <= 1 or name in ("pos_embed", "cls_token")
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass: memory for compute, for L/H models."""
        self.grad_checkpointing = enable
