"""Vision Transformer (ViT) encoder on the attention core: patch embedding, bidirectional pre-norm blocks, pooling."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention_config import AttentionConfig
from qkv_lightning.nn.blocks import Trunk, TrunkConfig, init_norms_
from qkv_lightning.nn.cost import Flops, NetworkCost, attention_shapes, trunk_flops, trunk_network_cost
from qkv_lightning.nn.positional import PaperScoreEncoding, sincos_2d


@dataclass
class ViTConfig(TrunkConfig):
    """Sizes and options of the Vision Transformer."""

    n_layer: int = 6
    """Number of transformer blocks."""

    n_head: int = 6
    """Query heads per attention layer."""

    d_model: int = 192
    """Model width (patch embedding size); must be divisible by n_head."""

    norm_eps: float = 1e-6
    """LayerNorm epsilon."""

    patch_size: int = 4
    """Side of the square patches, in pixels (4 for 32-px CIFAR, 16 for 224-px ImageNet)."""

    pool: Literal["cls", "mean"] = "cls"
    """Image representation fed to the head: a learned class token, or the mean of the patch tokens."""

    position: Literal["learned", "sincos", "none"] = "learned"
    """Patch positions: a learned table (the original ViT), fixed 2D sin-cos (MAE / simple ViT), or none."""

    drop_path: float = 0.1
    """Largest stochastic-depth rate (reached by the last block; rates rise linearly from 0)."""

    image_size: int | None = None
    """Side of the (square) input images; None takes the data's image size."""

    in_channels: int | None = None
    """Input channels; None takes the data's (3 for RGB, 1 for MNIST)."""

    num_classes: int | None = None
    """Output classes; None takes the data's."""

    pad_images: bool = False
    """Zero-pad each image at the right and bottom up to a multiple of patch_size, as the paper's ViT does (32-px
    CIFAR with 7-px patches becomes a 5 x 5 grid over 35 px); false requires patch_size to divide the image size."""

    score_grid: bool = False
    """Index the paper's "+" score encoding (attention.score_encoding: paper) by each patch's (row, column) on the
    grid instead of its place in the token sequence (our extension; the authors' released code has no grid
    indexing): each half of P (query, key) splits into row and column sinusoids, and the class token gets no
    position features. No effect on the other encodings; false keeps the paper's sequence indexing (the class token
    at position 0)."""

    init: Literal["vit", "torch"] = "vit"
    """Weight initialisation. vit: truncated N(0, init_std) weights, zero biases and head, a near-zero class token.
    torch: PyTorch's default of every layer (Kaiming-uniform linear and patch layers), a zero class token and
    N(0, 0.02) learned positions, as the paper's ViT code. The paper's score encoding keeps its own either way."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1:
            raise ConfigError(f"network.patch_size={self.patch_size} must be at least 1.")
        if self.position == "sincos" and self.d_model % 4:
            raise ConfigError(
                f"network.position=sincos needs network.d_model divisible by 4, got {self.d_model}; change d_model or "
                "use position: learned."
            )
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"network.drop_path={self.drop_path} must lie in [0, 1).")
        if self.image_size is not None:
            check_patch_grid(self.image_size, self.patch_size, self.pad_images)

    @property
    def grid(self) -> int:
        """Patches per side of the image (of the padded image with ``pad_images``)."""
        if self.image_size is None:
            raise ConfigError("network.image_size is not set: take it from the data or set it in the config.")
        return math.ceil(self.image_size / self.patch_size) if self.pad_images else self.image_size // self.patch_size

    def with_data(self, data_spec: dict) -> ViTConfig:
        """A copy with ``image_size``, ``in_channels`` and ``num_classes`` filled from the data where unset.

        Raises:
            ConfigError: if a size set here disagrees with the data.
        """
        values = {}
        for field in ("image_size", "in_channels", "num_classes"):
            mine, theirs = getattr(self, field), data_spec.get(field)
            if mine is not None and theirs is not None and mine != theirs:
                raise ConfigError(
                    f"network.{field}={mine} disagrees with the data ({field}={theirs}); set network.{field} to null "
                    "to take the data's value, or change the data's setting."
                )
            values[field] = mine if mine is not None else theirs
        return replace(self, **values)

    def cost(
        self, attention: AttentionConfig, seq_len: int | None = None, kv_bytes: int = 2, count_masked: bool = False
    ) -> NetworkCost:
        """Cost of the :class:`ViT` this config builds (``image_size``, ``in_channels``, ``num_classes`` set), per
        image; its tokens are the patches plus the class token (``seq_len`` and ``count_masked`` do not apply)."""
        d, bias = self.d_model, self.bias
        patches = self.grid**2
        t = patches + (1 if self.pool == "cls" else 0)
        shape = attention_shapes(d, self.n_head, attention, bias, self.n_layer, self.qkv_bias)
        patch_in = self.in_channels * self.patch_size**2
        embedding = patch_in * d + (d if bias else 0)
        embedding += d if self.pool == "cls" else 0
        embedding += t * d if self.position == "learned" else 0
        head = d * self.num_classes + self.num_classes  # the ViT's head always has a bias
        flops, fixed = trunk_flops(shape, self.mlp_width, self.n_layer, t, False, False, self.mlp)
        flops += Flops.product(2 * patches * patch_in * d, input_needs_grad=False)  # images need no gradient
        flops += Flops.product(2 * d * self.num_classes)  # one pooled vector per image
        return trunk_network_cost(
            "ViT", self, attention, shape, embedding=embedding, head=head, flops=flops, fixed=fixed,
            tokens_per_sample=t, sample_unit="image", context_tokens=t, kv_bytes=kv_bytes,
            notes=("ViT: FLOPs per sample are per image; per token means per patch token (class token included)",),
        )


def check_patch_grid(image_size: int, patch_size: int, pad: bool = False) -> None:
    """Raise a :class:`ConfigError` naming the settings to change if patches do not tile the image (with ``pad``,
    the image padded up to a multiple of the patch size)."""
    if pad:
        return
    if image_size < patch_size or image_size % patch_size:
        below = image_size // patch_size * patch_size
        options = sorted({s for s in (below, below + patch_size) if s >= patch_size})
        raise ConfigError(
            f"image size {image_size} is not divisible by network.patch_size={patch_size}: set data.image_size to a "
            f"multiple of {patch_size} (e.g. {' or '.join(map(str, options))}) or choose a network.patch_size that "
            f"divides {image_size} (or set network.pad_images: true to zero-pad the images, as the paper's ViT does)."
        )


VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 192, "n_layer": 12, "n_head": 3},
    "small": {"d_model": 384, "n_layer": 12, "n_head": 6},
    "base": {"d_model": 768, "n_layer": 12, "n_head": 12},
    "large": {"d_model": 1024, "n_layer": 24, "n_head": 16},
}
"""The standard ViT widths and depths (Dosovitskiy et al. 2021; Touvron et al. 2021 for tiny and small)."""


def vit_config(size: str, patch_size: int = 16, **overrides) -> ViTConfig:
    """The standard ViT of ``size`` (tiny, small, base, large), e.g. ``vit_config("small", 16)`` is ViT-S/16."""
    if size not in VIT_SIZES:
        raise ConfigError(f"unknown ViT size {size!r}; allowed: {sorted(VIT_SIZES)}.")
    return ViTConfig(**{**VIT_SIZES[size], "patch_size": patch_size, **overrides})


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each to ``d_model`` (a strided convolution)."""

    def __init__(self, patch_size: int, in_channels: int, d_model: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, images: Tensor) -> Tensor:
        """Patch tokens (B, N, C) of images (B, C_in, H, W), in raster order."""
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, C, H/p, W/p) -> (B, N, C)


class ViT(nn.Module):
    """Vision Transformer: patch embedding, optional class token, positions, bidirectional blocks, linear head.

    Args:
        config: sizes and options; ``image_size``, ``in_channels`` and ``num_classes`` must be set (see
            :meth:`ViTConfig.with_data`).
        attention: the attention variant of every block.
    """

    def __init__(self, config: ViTConfig, attention: AttentionConfig) -> None:
        super().__init__()
        for name in ("image_size", "in_channels", "num_classes"):
            if getattr(config, name) is None:
                raise ConfigError(f"network.{name} is not set: take it from the data or set it in the config.")
        check_patch_grid(config.image_size, config.patch_size, config.pad_images)
        self.config = config
        self.n_patches = config.grid**2
        self.n_prefix = 1 if config.pool == "cls" else 0
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, config.d_model, bias=config.bias)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.d_model)) if config.pool == "cls" else None
        self.pos_embed = (
            nn.Parameter(torch.empty(1, self.n_prefix + self.n_patches, config.d_model))
            if config.position == "learned"
            else None
        )
        self.pos_dropout = nn.Dropout(config.dropout)
        self.trunk = Trunk.from_config(config, attention, causal=False, drop_path=config.drop_path)
        self.head = nn.Linear(config.d_model, config.num_classes)
        if config.score_grid:
            for module in self.trunk.modules():
                if isinstance(module, PaperScoreEncoding):
                    module.index_by_grid(config.grid, self.n_prefix)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``network.init``: vit: truncated-normal weights, zero biases, unit norms, a near-zero class token and a zero
        head (so that the initial prediction is uniform over the classes); torch: see :class:`ViTConfig`. Also used
        after materialising a meta-device model."""
        if self.config.init == "torch":
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()  # each layer's PyTorch default (and the paper encoding's own)
            if self.cls_token is not None:
                nn.init.zeros_(self.cls_token)
            if self.pos_embed is not None:
                nn.init.normal_(self.pos_embed, std=0.02)
            return
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        init_norms_(self)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def positions(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """Position embedding (1, prefix + N, C) added to the tokens, or None (``position: none``)."""
        if self.pos_embed is not None:
            return self.pos_embed
        if self.config.position == "sincos":
            grid = sincos_2d(self.config.grid, self.config.grid, self.config.d_model)  # (N, C)
            table = torch.cat([grid.new_zeros(self.n_prefix, self.config.d_model), grid])  # class token at zero
            return table.to(device=device, dtype=dtype)[None]  # (1, prefix + N, C)
        return None

    def embed(self, images: Tensor) -> Tensor:
        """Tokens (B, prefix + N, C) entering the first block: patches, class token, positions."""
        size, channels = self.config.image_size, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != channels or images.shape[-2:] != (size, size):
            raise ConfigError(
                f"the ViT expects images of shape (B, {channels}, {size}, {size}), got {tuple(images.shape)}; "
                "make data.image_size and network.image_size agree."
            )
        if self.config.pad_images:
            padded = self.config.grid * self.config.patch_size
            images = F.pad(images, (0, padded - size, 0, padded - size))  # (B, C_in, G*p, G*p), zeros right/bottom
        x = self.patch_embed(images)  # (B, N, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, C)
        positions = self.positions(x.dtype, x.device)
        if positions is not None:
            x = x + positions
        return self.pos_dropout(x)

    def forward_features(self, images: Tensor) -> Tensor:
        """Final, normalised tokens (B, prefix + N, C) of images (B, C_in, H, W)."""
        return self.trunk(self.embed(images))[0]

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the tokens (B, T, C) to (B, C) (class token or mean of patches) and apply the head: (B, classes)."""
        pooled = features[:, 0] if self.config.pool == "cls" else features[:, self.n_prefix :].mean(dim=1)  # (B, C)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits (B, classes) of images (B, C_in, H, W)."""
        return self.forward_head(self.forward_features(images))

    def attention_maps(self, images: Tensor) -> list[Tensor]:
        """Each block's attention probabilities, (B, H, T, T) per block (computed on the explicit path)."""
        return self.trunk(self.embed(images), need_weights=True)[1]
