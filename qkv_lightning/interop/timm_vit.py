"""timm ``vit_*`` weights to our ViT (image-classifier task), exactly.

timm's ``VisionTransformer`` with its defaults is our ViT with ``pool: cls``, ``position: learned`` (a table that
includes the class token's position), ``norm_eps: 1e-6``, biases everywhere, the exact (erf) GELU and a final
LayerNorm before the class-token head. Its ``qkv`` Linear yields [q | k | v], each split into heads in order, which
is our fused QKV projection's layout, so the weights are copied as they are (only renamed).

A state dict holds no config: the sizes come from the tensors' shapes (width, depth, MLP width, patch size, channels,
image size from the position table, classes from the head), the number of heads from ``--n_head`` (default
``d_model / 64``: timm's ViTs have 64-wide heads) or, with ``--timm_model NAME`` and timm installed, from the timm
model itself, whose architecture is then checked setting by setting. Weights of timm options our ViT has no
counterpart for are errors naming the option: ``reg_tokens`` (``reg_token``), layer scale (``init_values``:
``ls1.gamma``), ``qk_norm`` (``q_norm``/``k_norm``), ``pre_norm`` (``norm_pre``), average pooling with ``fc_norm``
(``fc_norm``), attention pooling (``global_pool='map'``: ``attn_pool``), ``qkv_bias=False``, ``class_token=False``.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qkv_lightning.errors import CheckpointError, ConfigError
from qkv_lightning.interop.common import read_weights, require

TIMM_OPTIONS = {
    "reg_token": "reg_tokens (register tokens)",
    "ls1.": "init_values (layer scale)",
    "ls2.": "init_values (layer scale)",
    "q_norm.": "qk_norm",
    "k_norm.": "qk_norm",
    "norm_pre.": "pre_norm",
    "fc_norm.": "global_pool='avg' with fc_norm (a norm after pooling)",
    "attn_pool.": "global_pool='map' (attention pooling)",
    "patch_embed.norm.": "embed_norm_layer",
    "head_drop": "head_drop",
}
"""Key fragments of timm options that our ViT cannot express, and the timm setting they come from."""

HEAD_WIDTH = 64
"""Head size of timm's ViTs (tiny 192/3, small 384/6, base 768/12, large 1024/16, ...): the default n_head."""


def vit_activation_field() -> str | None:
    """The ViT config field that chooses exact or tanh GELU, if this version of :mod:`qkv_lightning.nn` has one."""
    from qkv_lightning.nn.vit import ViTConfig

    names = {f.name for f in fields(ViTConfig)}
    return next((name for name in ("gelu", "activation", "mlp_activation") if name in names), None)


def infer_settings(weights: dict[str, Tensor], n_head: int | None, source: str) -> dict[str, Any]:
    """Our ViT's ``network`` settings from timm's tensors (and ``n_head``).

    Raises:
        CheckpointError: naming the timm option or tensor our ViT cannot express.
    """
    for key in weights:
        for fragment, option in TIMM_OPTIONS.items():
            if fragment in key:
                raise CheckpointError(
                    f"{source} holds {key}: timm's {option}, which our ViT has no counterpart for; only ViTs with "
                    "timm's default blocks and class-token pooling can be imported."
                )
    for name in ("patch_embed.proj.weight", "pos_embed", "norm.weight", "blocks.0.mlp.fc1.weight"):
        if name not in weights:
            raise CheckpointError(f"{source} lacks {name}; it is not a timm VisionTransformer state dict.")
    if "cls_token" not in weights:
        raise CheckpointError(
            f"{source} has no cls_token (timm's class_token=False, which pools by averaging): our ViT's pool=mean has "
            "no class token and a norm before pooling, so only class-token ViTs (global_pool='token') are imported."
        )
    if "head.weight" not in weights:
        raise CheckpointError(
            f"{source} has no head.weight (timm's num_classes=0): our image classifier needs its classifier head; "
            "save the model with its head."
        )
    d, channels, patch, patch_w = weights["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise CheckpointError(f"{source}: patch_embed.proj.weight has non-square {patch}x{patch_w} patches.")
    n_tokens = weights["pos_embed"].shape[1]
    grid = math.isqrt(n_tokens - 1)
    if grid * grid != n_tokens - 1:
        raise CheckpointError(
            f"{source}: pos_embed has {n_tokens} positions, not 1 + a square grid of patches (timm's "
            "no_embed_class or a non-square image); our ViT's table holds the class token and a square grid."
        )
    n_layer = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k)))
    if n_head is None:
        if d % HEAD_WIDTH:
            raise ConfigError(f"{source}: width {d} is not a multiple of 64; give the number of heads with --n_head.")
        n_head = d // HEAD_WIDTH
    if d % n_head:
        raise ConfigError(f"--n_head {n_head} must divide the width {d} of {source}.")
    network = {
        "n_layer": n_layer,
        "n_head": n_head,
        "d_model": d,
        "d_mlp": weights["blocks.0.mlp.fc1.weight"].shape[0],
        "bias": True,
        "dropout": 0.0,
        "norm_eps": 1e-6,
        "patch_size": patch,
        "pool": "cls",
        "position": "learned",
        "drop_path": 0.0,
        "image_size": grid * patch,
        "in_channels": channels,
        "num_classes": weights["head.weight"].shape[0],
    }
    field = vit_activation_field()
    if field is None:
        raise ConfigError(
            "timm's ViTs use the exact (erf) GELU, but this version's ViT config has no setting for it; the import "
            "would not be exact."
        )
    network[field] = "exact"
    return network


def to_our_state(weights: dict[str, Tensor], n_layer: int, source: str) -> dict[str, Tensor]:
    """timm names to our ViT's (without the task's ``network.`` prefix); shapes are checked when loaded."""
    renames = {"norm1.": "norm_attn.", "norm2.": "norm_mlp.", "mlp.fc1.": "mlp.fc.", "mlp.fc2.": "mlp.proj."}
    state = {}
    for key, tensor in weights.items():
        if key.startswith(("blocks.", "norm.")):
            mine = "trunk." + key
            for old, new in renames.items():
                mine = mine.replace(f".{old}", f".{new}")
        else:
            mine = key
        state[mine] = tensor
    missing = [f"blocks.{i}.attn.qkv.bias" for i in range(n_layer) if f"blocks.{i}.attn.qkv.bias" not in weights]
    if missing:
        raise CheckpointError(
            f"{source} lacks {missing[0]} (timm's qkv_bias=False): our ViT has biases in every linear layer or none."
        )
    return state


def check_timm_architecture(name: str, network: dict[str, Any], weights: dict[str, Tensor], source: str) -> int:
    """Build timm's ``name`` (no weights, on the meta device) with the file's sizes, check that its architecture is
    the one our ViT expresses and that its tensors are the file's; returns its number of heads.

    Raises:
        ConfigError: naming the timm setting that differs.
    """
    timm = require("timm", "--timm_model")
    kwargs = {
        "num_classes": network["num_classes"], "img_size": network["image_size"], "in_chans": network["in_channels"]
    }
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as error:
        raise ConfigError(f"--timm_model {name}: {error}") from None
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"--timm_model {name} is a {type(model).__name__}, not a timm VisionTransformer.")
    block = model.blocks[0]
    act = block.mlp.act
    checks = {
        "global_pool": (model.global_pool, "token"),
        "class_token": (model.has_class_token, True),
        "num_reg_tokens": (model.num_reg_tokens, 0),
        "no_embed_class": (model.no_embed_class, False),
        "norm_pre": (type(model.norm_pre).__name__, "Identity"),
        "fc_norm": (type(model.fc_norm).__name__, "Identity"),
        "norm_layer": (type(model.norm).__name__, "LayerNorm"),
        "norm eps": (getattr(model.norm, "eps", None), 1e-6),
        "act_layer": (f"{type(act).__name__}({getattr(act, 'approximate', '')})", "GELU(none)"),
        "qk_norm": (type(block.attn.q_norm).__name__, "Identity"),
        "init_values (layer scale)": (type(block.ls1).__name__, "Identity"),
        "block_fn": (type(block).__name__, "Block"),
    }
    for setting, (value, wanted) in checks.items():
        if value != wanted:
            raise ConfigError(
                f"--timm_model {name}: timm's {setting} is {value!r}, ours can only express {wanted!r}; this model "
                "cannot be imported exactly."
            )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != found:
        differ = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise ConfigError(f"{source} does not hold the weights of --timm_model {name} (differing: {differ[:5]}).")
    return block.attn.num_heads


def import_vit(path: Path, n_head: int | None = None, timm_model: str | None = None) -> tuple[Any, dict[str, Any]]:
    """An :class:`~qkv_lightning.tasks.image_classifier.ImageClassifier` holding the timm ViT of ``path``."""
    from qkv_lightning.tasks.image_classifier import ImageClassifier

    source = str(path)
    weights = read_weights(path)
    network = infer_settings(weights, n_head, source)
    if timm_model is not None:
        heads = check_timm_architecture(timm_model, network, weights, source)
        if n_head is not None and n_head != heads:
            raise ConfigError(f"--n_head {n_head} disagrees with --timm_model {timm_model}, which has {heads} heads.")
        network = infer_settings(weights, heads, source)
    state = to_our_state(weights, network["n_layer"], source)
    spec = {k: network[k] for k in ("num_classes", "image_size", "in_channels")}
    task = ImageClassifier(network=network, data_spec=spec)
    task.configure_model()
    try:
        task.network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{source} does not fit a timm ViT of the sizes its tensors imply: {error}") from None
    return task.eval(), {"format": "timm-vit", "network": network, "timm_model": timm_model}


def check_with_timm(timm_model: str | None, weights_path: Path, model: nn.Module, seed: int = 0) -> float | None:
    """Largest |logit difference| between timm's ``timm_model`` holding the file's weights and our ``model`` on random
    images, or None without timm or a model name."""
    if timm_model is None:
        return None
    try:
        import timm
    except ImportError:
        return None
    config = model.config
    reference = timm.create_model(timm_model, pretrained=False, num_classes=config.num_classes,
                                  img_size=config.image_size, in_chans=config.in_channels).eval()
    reference.load_state_dict(read_weights(weights_path), strict=True)
    images = torch.randn(2, config.in_channels, config.image_size, config.image_size,
                         generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (reference(images) - model(images)).abs().max().item()
