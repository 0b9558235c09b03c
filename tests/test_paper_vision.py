"""The paper's vision protocol: the "+" score encoding indexed by the patch grid (``network.score_grid``), images
zero-padded up to the patch size (``network.pad_images``), PyTorch's default initialisation (``network.init: torch``),
and the sweep of configs/study/paper-vision.yaml checked against the paper's values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.positional import (
    PaperScoreEncoding,
    paper_grid_pair_tensor,
    paper_pair_tensor,
    sinusoid_channels,
)
from qkv_lightning.nn.vit import ViT, ViTConfig
from qkv_lightning.study import parse_study_args
from qkv_lightning.study.config import cells, expand_grid
from tests.test_paper_score_encoding import explicit_pair, sinusoid

ROOT = Path(__file__).resolve().parents[1]
M = 50  # the paper's ViT channels


def explicit_grid_p(t: int, m: int, grid_w: int, prefix: int) -> torch.Tensor:
    """P (T, T, m) for tokens ``prefix + r * grid_w + c`` on a patch grid (:func:`explicit_pair`): within a half of
    size h the first h // 2 channels are the sinusoid of the token's row and the other h - h // 2 that of its column;
    the prefix (class) tokens have no features (zero)."""

    def feature(token: int, local: int, size: int) -> float:
        if token < prefix:
            return 0.0
        row, col = divmod(token - prefix, grid_w)
        rows = size // 2
        return sinusoid(row, local, rows) if local < rows else sinusoid(col, local - rows, size - rows)

    return explicit_pair(t, m, feature)


def encoding(grid: tuple[int, int] | None = None) -> PaperScoreEncoding:
    enc = PaperScoreEncoding(M).double()
    with torch.no_grad():
        enc.weight.copy_(torch.randn(M, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
        enc.bias.fill_(0.25)
    if grid is not None:
        enc.index_by_grid(*grid)
    return enc


@pytest.mark.parametrize(("grid_w", "grid_h", "prefix"), [(4, 3, 1), (5, 5, 0)])
def test_grid_p_entries_are_the_closed_form_of_row_and_column(grid_w, grid_h, prefix):
    t = prefix + grid_w * grid_h
    positions = torch.arange(t)
    expected = explicit_grid_p(t, M, grid_w, prefix)
    torch.testing.assert_close(paper_grid_pair_tensor(positions, positions, M, grid_w, prefix).double(), expected)
    enc = encoding((grid_w, prefix))
    bias = enc(positions, positions)  # (T, T): P . w + b, never building P
    torch.testing.assert_close(bias, torch.einsum("ijc,c->ij", expected, enc.weight.detach()) + 0.25,
                               rtol=1e-12, atol=1e-12)
    # the key term of a patch depends on its (row, column), not on its place in the sequence
    key_term = (bias[prefix] - bias[prefix, prefix])[prefix:].view(grid_h, grid_w)  # c(r, c) - c(0, 0)
    cols = enc.weight[M // 2 :].detach()
    size = M - M // 2
    rows = size // 2
    for r in range(grid_h):
        for c in range(grid_w):
            term = sum(cols[k] * (sinusoid(r, k, rows) - sinusoid(0, k, rows)) for k in range(rows))
            term += sum(cols[rows + k] * (sinusoid(c, k, size - rows) - sinusoid(0, k, size - rows))
                        for k in range(size - rows))
            assert key_term[r, c].item() == pytest.approx(float(term), abs=1e-10)
    sequence = encoding()(positions, positions)
    assert not torch.allclose(bias, sequence)  # grid indexing differs from sequence indexing


def test_class_token_gets_no_position_features():
    enc = encoding((3, 1))
    positions = torch.arange(10)
    bias = enc(positions, positions)
    half = M // 2
    exact = positions.double()
    row_terms = paper_grid_pair_tensor(exact, exact, M, 3, 1)[:, 0, :half] @ enc.weight[:half].detach()
    torch.testing.assert_close(bias[:, 0], row_terms + 0.25, rtol=1e-12, atol=1e-12)  # key 0: c(cls) = 0
    torch.testing.assert_close(bias[0], bias[0, 0] + bias[1] - bias[1, 0], rtol=1e-12, atol=1e-12)  # r(cls) = 0


def test_default_sequence_indexing_is_unchanged():
    """Without a grid the encoding is the paper's sequence-indexed P, bit for bit the formula it had before."""
    positions = torch.arange(17)
    enc = encoding()
    assert enc.grid is None
    exact = positions.double()
    expected = torch.einsum("ijc,c->ij", paper_pair_tensor(exact, exact, M), enc.weight.detach())
    torch.testing.assert_close(enc(positions, positions), expected + 0.25, rtol=1e-12, atol=1e-12)
    w = enc.weight
    before = (sinusoid_channels(positions, M // 2, 10000.0, w.dtype) @ w[: M // 2, None]
              + (sinusoid_channels(positions, M - M // 2, 10000.0, w.dtype) @ w[M // 2 :, None]).T + enc.bias)
    assert torch.equal(enc(positions, positions), before)  # the forward as it was before score_grid existed
    network = vit(score_grid=False)
    assert all(m.grid is None for m in network.modules() if isinstance(m, PaperScoreEncoding))


def vit(**overrides) -> ViT:
    values = dict(patch_size=4, n_layer=2, n_head=2, d_model=16, image_size=12, in_channels=1, num_classes=3)
    torch.manual_seed(0)
    attention = AttentionConfig(sharing="Q=K=V", score_encoding="paper", score_encoding_channels=M)
    return ViT(ViTConfig(**{**values, **overrides}), attention).double().eval()


def test_vit_score_grid_feeds_the_grid_bias_into_its_attention():
    grid, default = vit(score_grid=True), vit(score_grid=False)
    default.load_state_dict(grid.state_dict())  # same parameters (checkpoints load either way)
    images = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    encodings = [m for m in grid.modules() if isinstance(m, PaperScoreEncoding)]
    assert len(encodings) == 2 and all(m.grid == (3, 1) for m in encodings)
    block = grid.trunk.blocks[0].attn
    tokens = grid.trunk.blocks[0].norm_attn(grid.embed(images))  # (B, 1 + 9, C)
    with torch.no_grad():
        block.score_encoding.weight.normal_(0, 1.0)
        default.trunk.blocks[0].attn.score_encoding.weight.copy_(block.score_encoding.weight)
    q, k, _ = block.project(tokens)
    t = tokens.shape[1]
    enc = block.score_encoding
    expected = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]) * enc.weight.sum() + torch.einsum(
        "ijc,c->ij", explicit_grid_p(t, M, 3, 1), enc.weight) + enc.bias
    torch.testing.assert_close(block.logits(tokens), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(grid.forward_features(images), default.forward_features(images))


def test_padded_images_equal_a_vit_on_the_zero_padded_image():
    padded = vit(patch_size=7, image_size=32, pad_images=True)
    assert padded.n_patches == 25  # ceil(32 / 7) = 5 per side
    exact = vit(patch_size=7, image_size=35)
    exact.load_state_dict(padded.state_dict())
    images = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(padded.forward_features(images), exact.forward_features(F.pad(images, (0, 3, 0, 3))),
                               rtol=1e-12, atol=1e-12)
    cost = padded.config.cost(AttentionConfig(sharing="Q=K=V", score_encoding="paper", score_encoding_channels=M))
    assert cost.params_total == sum(p.numel() for p in padded.parameters())


def test_torch_initialisation_matches_the_papers_vit():
    network = vit(init="torch", d_model=64)
    bound = 1 / math.sqrt(64)
    fc = network.trunk.blocks[0].mlp.fc
    assert fc.weight.abs().max() <= bound and fc.bias.abs().max() > bound / 2  # nn.Linear's default, biases too
    assert network.head.weight.abs().max() > 0  # not the zero head of init: vit
    assert torch.count_nonzero(network.cls_token) == 0  # the authors' class token starts at zero
    assert network.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    enc = network.trunk.blocks[0].attn.score_encoding
    assert enc.bias.item() == 0.0 and enc.weight.std().item() < 0.05


# ----------------------------------------------------------------------------------------- the paper's sweep
PAPER_EPOCHS = {"mnist": 20, "fashion-mnist": 20, "cifar10": 40, "cifar100": 50}
PAPER_DATA = {
    "mnist": "MNISTDataModule",
    "fashion-mnist": "FashionMNISTDataModule",
    "cifar10": "CIFAR10DataModule",
    "cifar100": "CIFAR100DataModule",
}


def test_paper_vision_study_is_the_papers_grid(monkeypatch):
    """configs/study/paper-vision.yaml against the authors' vision_tasks.py (grid 'full') and Section 4.2."""
    monkeypatch.chdir(ROOT)
    study, _ = parse_study_args(["--config", "configs/study/paper-vision.yaml"])
    labels = ["QKV", "Q=K-V", "Q=K-V+score", "Q-K=V", "Q=K=V", "Q=K=V+score"]  # QKV, Q=K!=V, (Q=K!=V)+, ...
    assert [v.label for v in expand_grid(study)[0]] == labels
    assert [Path(t).stem for t in study.task_paths] == list(PAPER_EPOCHS)
    assert study.axes == {
        "model.init_args.network.patch_size": [4, 7],
        "model.init_args.optimizer.lr": [1e-3, 1e-4],
        "model.init_args.network.d_model": [64, 256, 512],
        "model.init_args.network.n_layer": [2, 4],
        "model.init_args.network.n_head": [2, 4],
    }
    assert study.seeds == [0, 1] and study.overrides == [] and study.metrics[0] == "test/acc"
    assert len(cells(study)) == 4 * 6 * 2 * 2 * 3 * 2 * 2 * 2  # 2,304 runs, as the authors count them
    for task in study.task_paths:
        name = Path(task).stem
        config = yaml.safe_load(Path(task).read_text())
        init = config["model"]["init_args"]
        network, optimizer = init["network"], init["optimizer"]
        assert config["trainer"]["max_epochs"] == PAPER_EPOCHS[name]
        epochs = PAPER_EPOCHS[name]
        # the authors' MultiStepLR drops after epochs int(0.5 E) and int(0.75 E); per step that is these fractions
        assert [m * epochs for m in optimizer["step_milestones"]] == [int(0.5 * epochs), int(0.75 * epochs)]
        assert (optimizer["name"], optimizer["schedule"], optimizer["step_gamma"]) == ("Adam", "step", 0.1)
        assert optimizer["weight_decay"] == 0.0 and optimizer["warmup_steps"] == 0 and optimizer["lr"] == 1e-3
        assert optimizer["betas"] == [0.9, 0.999] and optimizer["eps"] == 1e-8  # torch.optim.Adam's defaults
        assert init["attention"]["score_encoding_channels"] == 50  # the authors' pos_dim
        assert network["dropout"] == 0.1 and network["drop_path"] == 0.0 and network["d_mlp"] is None  # MLP 4x
        assert (network["pool"], network["position"], network["init"]) == ("cls", "learned", "torch")
        assert network["pad_images"] is True and network["norm_eps"] == 1e-5 and network["score_grid"] is False
        assert network["gelu"] == "exact"  # nn.GELU()
        assert (network["patch_size"], network["d_model"], network["n_layer"], network["n_head"]) == (4, 64, 2, 2)
        data = config["data"]
        assert data["class_path"].rsplit(".", 1)[1] == PAPER_DATA[name]
        assert data["init_args"]["batch_size"] == 128 and data["init_args"]["val_fraction"] == 0.0  # all images
        augment = data["init_args"]["augment"]
        if name.startswith("cifar"):  # RandomCrop(32, padding=4) + RandomHorizontalFlip
            assert (augment["crop"], augment["padding"], augment["hflip"]) == ("pad_crop", 4, True)
        else:  # none
            assert (augment["crop"], augment["hflip"]) == ("none", False)
