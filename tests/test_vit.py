"""The ViT encoder: exact parameter counts, a timm reference with the same weights, patching, pooling, positions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.blocks import DropPath
from qkv_lightning.nn.positional import sincos_2d
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS
from qkv_lightning.nn.vit import ViT, ViTConfig, vit_config


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**overrides) -> ViTConfig:
    values = dict(patch_size=4, n_layer=2, n_head=4, d_model=32, image_size=16, in_channels=3, num_classes=7)
    return ViTConfig(**{**values, **overrides})


@pytest.mark.parametrize(("size", "expected"), [("small", 22_050_664), ("base", 86_567_656)])
def test_parameter_counts_of_vit_s16_and_b16_match_the_published_figures(size: str, expected: int) -> None:
    with torch.device("meta"):  # no memory is allocated
        model = ViT(vit_config(size, 16, image_size=224, in_channels=3, num_classes=1000), AttentionConfig())
    assert n_params(model) == expected


@pytest.mark.parametrize("variant", CANONICAL_VARIANTS)
def test_sharing_removes_exactly_one_projection_per_shared_role(variant: str) -> None:
    """Each group is one d x d matrix plus bias in every block: QKV has 3, two-group variants 2, Q=K=V 1."""
    groups = {"QKV": 3, "Q=K-V": 2, "Q-K=V": 2, "Q=V-K": 2, "Q=K=V": 1}[variant]
    with torch.device("meta"):
        model = ViT(vit_config("small", 16, image_size=224, in_channels=3, num_classes=1000), AttentionConfig(variant))
    d = 384
    assert n_params(model) == 22_050_664 - 12 * (3 - groups) * (d * d + d)


def test_meta_model_materialises_and_runs() -> None:
    with torch.device("meta"):
        model = ViT(tiny(), AttentionConfig("Q-K=V"))
    model.to_empty(device="cpu")
    model.reset_parameters()
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()


def test_matches_timm_vision_transformer_with_the_same_weights() -> None:
    """Same weights, same images: the pre-norm blocks, class token, positions and head agree with timm's ViT."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0
    ).eval()
    model = ViT(tiny(num_classes=5, d_mlp=64), AttentionConfig()).eval()
    for block in model.blocks:
        block.mlp.act = nn.GELU()  # timm uses the exact GELU, the shared MLP its tanh approximation
    names = {"norm1": "norm_attn", "norm2": "norm_mlp", "fc1": "fc", "fc2": "proj"}
    state = {}
    for key, value in reference.state_dict().items():
        key = f"trunk.{key}" if key.startswith(("blocks.", "norm.")) else key
        for old, new in names.items():
            key = key.replace(f".{old}.", f".{new}.")
        state[key] = value
    model.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_features(images), reference.forward_features(images))


def test_patch_embedding_is_a_linear_map_of_raster_ordered_patches() -> None:
    model = ViT(tiny(), AttentionConfig())
    images = torch.randn(2, 3, 16, 16)
    p, g = 4, 4
    patches = images.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(2, g * g, 3 * p * p)  # raster order
    weight = model.patch_embed.proj.weight.reshape(32, -1)  # (C, C_in * p * p)
    expected = patches @ weight.T + model.patch_embed.proj.bias
    torch.testing.assert_close(model.patch_embed(images), expected, rtol=1e-5, atol=1e-5)


def test_zero_head_starts_from_the_uniform_prediction() -> None:
    model = ViT(tiny(), AttentionConfig())
    logits = model(torch.randn(4, 3, 16, 16))
    assert torch.equal(logits, torch.zeros(4, 7))
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 3, 6, 1]))
    assert loss.item() == pytest.approx(math.log(7))


def test_encoder_is_bidirectional_mean_pool_without_positions_ignores_patch_order() -> None:
    """Without positions, mean pooling of a bidirectional encoder is invariant to permuting the patches; a causal
    mask (or position embeddings) would break this."""
    torch.manual_seed(0)
    model = ViT(tiny(pool="mean", position="none"), AttentionConfig()).eval()
    nn.init.normal_(model.head.weight)
    images = torch.randn(2, 3, 16, 16)
    # swap the top-left and bottom-right 4x4 patches
    swapped = images.clone()
    swapped[..., :4, :4], swapped[..., 12:, 12:] = images[..., 12:, 12:], images[..., :4, :4]
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(swapped), rtol=1e-5, atol=1e-5)
        learned = ViT(tiny(pool="mean"), AttentionConfig()).eval()
        nn.init.normal_(learned.head.weight)
        assert not torch.allclose(learned(images), learned(swapped), atol=1e-4)


def test_pooling_and_head() -> None:
    model = ViT(tiny(pool="mean"), AttentionConfig()).eval()
    nn.init.normal_(model.head.weight)
    images = torch.randn(2, 3, 16, 16)
    features = model.forward_features(images)
    assert features.shape == (2, 16, 32)  # no class token
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.mean(dim=1))
    torch.testing.assert_close(model(images), model.head(features.mean(dim=1)))
    cls_model = ViT(tiny(pool="cls"), AttentionConfig()).eval()
    cls_features = cls_model.forward_features(images)
    assert cls_features.shape == (2, 17, 32)
    torch.testing.assert_close(cls_model.forward_head(cls_features, pre_logits=True), cls_features[:, 0])


def test_sincos_positions_are_fixed_and_cost_no_parameters() -> None:
    learned = ViT(tiny(position="learned"), AttentionConfig())
    fixed = ViT(tiny(position="sincos"), AttentionConfig())
    assert n_params(learned) - n_params(fixed) == 17 * 32
    table = fixed.positions(torch.float32, torch.device("cpu"))[0]  # (1 + N, C)
    torch.testing.assert_close(table[0], torch.zeros(32))
    torch.testing.assert_close(table[1:], sincos_2d(4, 4, 32))


def test_stochastic_depth_rates_rise_to_drop_path_and_only_act_in_training() -> None:
    model = ViT(tiny(n_layer=3, drop_path=0.5), AttentionConfig())
    rates = [getattr(block.drop_path, "p", 0.0) for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.25, 0.5])
    images = torch.randn(8, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model.forward_features(images), model.forward_features(images))
    model.train()
    torch.manual_seed(1)
    first = model.forward_features(images)
    torch.manual_seed(2)
    assert not torch.allclose(first, model.forward_features(images))


def test_drop_path_scales_kept_samples_by_one_over_keep_probability() -> None:
    """Stochastic depth keeps the expected residual branch: a sample's branch is dropped whole with probability p
    and kept samples are scaled by exactly 1 / (1 - p)."""
    p = 0.25
    drop = DropPath(p).train()
    branch = torch.randn(4000, 3, 5)  # (B, T, C)
    torch.manual_seed(0)
    out = drop(branch)
    kept = (out != 0).flatten(1).any(dim=1)  # (B,): a sample is kept or dropped whole
    assert (out[~kept] == 0).all()
    torch.testing.assert_close(out[kept], branch[kept] / (1.0 - p), rtol=1e-6, atol=0)
    assert abs(kept.float().mean().item() - (1.0 - p)) < 0.03  # 4000 draws: standard deviation 0.007
    drop.eval()
    assert torch.equal(drop(branch), branch)


def test_attention_maps_are_probabilities_over_all_tokens() -> None:
    model = ViT(tiny(), AttentionConfig("Q=K=V"))
    maps = model.attention_maps(torch.randn(2, 3, 16, 16))
    assert len(maps) == 2 and maps[0].shape == (2, 4, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 17))
    assert (maps[0][:, :, 0, 1:] > 0).all()  # the class token (first) attends to later tokens: no causal mask


def test_image_size_not_divisible_by_patch_size_names_the_settings() -> None:
    with pytest.raises(ConfigError, match=r"image size 30 is not divisible by network.patch_size=4.*data.image_size"):
        ViTConfig(patch_size=4).with_data({"image_size": 30, "in_channels": 3, "num_classes": 10})
    with pytest.raises(ConfigError, match="28 or 32"):
        ViT(tiny(image_size=30), AttentionConfig())


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ConfigError, match="network.d_model=30 must be divisible by network.n_head=4"):
        ViTConfig(d_model=30, n_head=4)
    with pytest.raises(ConfigError, match="network.num_classes=10 disagrees with the data"):
        ViTConfig(num_classes=10).with_data({"image_size": 32, "in_channels": 3, "num_classes": 100})
    model = ViT(tiny(), AttentionConfig())
    with pytest.raises(ConfigError, match=r"expects images of shape \(B, 3, 16, 16\)"):
        model(torch.randn(1, 3, 32, 32))
