"""``analyze``: its measures on constructed weights with known answers, and one real run from a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qkv_lightning.analysis.analyze import analyze
from qkv_lightning.analysis.metrics import (
    attention_entropy,
    effective_rank,
    logit_asymmetry,
    principal_angles,
    token_cosines,
)
from qkv_lightning.cli import main
from qkv_lightning.nn.attention import Attention, AttentionConfig
from qkv_lightning.nn.encoder import EncoderConfig
from qkv_lightning.tasks.sequence_tasks import SequenceTask

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"vocab_size": 12, "num_classes": 12, "seq_len": 10}
pytestmark = pytest.mark.usefixtures("one_thread", "plain_argv")


def tiny_task(sharing: str = "QKV", seed: int = 0, n_kv_heads: int | None = None) -> SequenceTask:
    torch.manual_seed(seed)
    task = SequenceTask(attention=AttentionConfig(sharing=sharing, n_kv_heads=n_kv_heads), data_spec=SPEC,
                        network=EncoderConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=10, init_std=0.3))
    task.configure_model()
    return task


def batches(n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(t, t) for t in (torch.randint(0, 12, (8, 10), generator=generator) for _ in range(n))]


def attentions(task: SequenceTask) -> list[Attention]:
    return [m for m in task.network.modules() if isinstance(m, Attention)]


def role_rows(module: Attention, role: str) -> slice:
    start = sum(module.group_widths[: module.sharing.group_of(role)])
    return slice(start, start + module.group_widths[module.sharing.group_of(role)])


def test_identical_k_and_v_weights_give_cosine_one_and_angle_zero_and_tied_variants_say_so():
    task = tiny_task("QKV")
    with torch.no_grad():
        for module in attentions(task):
            k, v = role_rows(module, "K"), role_rows(module, "V")
            module.qkv.weight[v] = module.qkv.weight[k]
            module.qkv.bias[v] = module.qkv.bias[k]
    result = analyze(task, batches())
    for layer in result["layers"]:
        assert layer["tied_pairs"] == []
        for head in layer["heads"]:
            assert head["cosine"]["K-V"] == pytest.approx(1.0, abs=1e-9)
            assert head["cosine_distribution"]["K-V"]["q05"] == pytest.approx(1.0, abs=1e-9)
            assert head["angle_deg"]["K-V"] == pytest.approx(0.0, abs=1e-3)
            assert head["cosine"]["Q-K"] < 0.9 and head["angle_deg"]["Q-K"] > 10  # Q was left random
    shared = analyze(tiny_task("Q-K=V"), batches())
    for layer in shared["layers"]:
        assert layer["tied_pairs"] == ["K-V"] and not layer["symmetric_logits_by_construction"]
        assert all(h["cosine"]["K-V"] is None and h["angle_deg"]["K-V"] is None for h in layer["heads"])
        assert all(h["cosine"]["Q-K"] is not None for h in layer["heads"])
    assert shared["summary"]["cosine"]["K-V"] is None


@pytest.mark.parametrize(("singular", "expected"), [((3.0, 1.0), 1.7547653506), ((3.0, 1.0, 0.0), 1.7547653506),
                                                   ((4.0, 2.0, 1.0, 1.0), 3.3635856610)])
def test_effective_rank_is_exp_of_the_entropy_of_the_normalised_singular_values(singular, expected):
    """Roy and Vetterli: p = s / sum(s), effective rank exp(-sum p log p) (nats). Singular values (3, 1):
    p = (3/4, 1/4), exp(0.5623) = 1.7548 (not the energy's (9/10, 1/10): 1.384, nor bits: 2.25); (4, 2, 1, 1):
    2^1.75."""
    generator = torch.Generator().manual_seed(3)
    k = len(singular)
    u = torch.linalg.qr(torch.randn(8, k, generator=generator, dtype=torch.float64))[0]  # (8, k), orthonormal
    w = torch.linalg.qr(torch.randn(32, k, generator=generator, dtype=torch.float64))[0]  # (32, k)
    matrix = u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ w.T  # (8, 32)
    p = [s / sum(singular) for s in singular if s > 0]
    assert math.exp(-sum(x * math.log(x) for x in p)) == pytest.approx(expected, abs=1e-9)
    assert effective_rank(matrix) == pytest.approx(expected, abs=1e-9)
    assert effective_rank(matrix.T) == pytest.approx(expected, abs=1e-9)


def test_effective_rank_of_a_rank_r_projection_is_about_r():
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(8, 8, generator=generator, dtype=torch.float64))[0]
    w = torch.linalg.qr(torch.randn(32, 8, generator=generator, dtype=torch.float64))[0]
    for r in (1, 3, 6):
        equal = u[:, :r] @ w[:, :r].T  # (8, 32), r equal singular values
        assert effective_rank(equal) == pytest.approx(r, abs=1e-6)  # exactly r, up to rounding
        gaussian = torch.randn(8, r, generator=generator) @ torch.randn(r, 32, generator=generator)
        assert 0.6 * r <= effective_rank(gaussian) <= r + 1e-4  # unequal singular values: a little below r
    # through the analysis: each head's K rows of rank 2 (equal singular values), no bias
    task = tiny_task("QKV")
    with torch.no_grad():
        for module in attentions(task):
            rows = role_rows(module, "K")
            d, c = module.head_dim, module.qkv.in_features
            for h in range(module.n_head):
                basis = torch.linalg.qr(torch.randn(c, 2, generator=generator))[0].T  # (2, C)
                low = torch.zeros(d, c)
                low[:2] = basis
                module.qkv.weight.data[rows.start + h * d : rows.start + (h + 1) * d] = low
            module.qkv.bias[rows] = 0.0
    result = analyze(task, batches())
    for layer in result["layers"]:
        for head in layer["heads"]:
            assert head["erank_weight"]["K"] == pytest.approx(2.0, abs=1e-4)
            assert 1.0 <= head["erank_output"]["K"] <= 2.0 + 1e-4  # outputs X W^T have rank at most 2
            assert head["erank_weight"]["Q"] > 4  # untouched random rows


def test_symmetric_logits_give_zero_asymmetry():
    a = torch.randn(3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert logit_asymmetry(a + a.transpose(-2, -1)) == (0.0, 0.0)
    assert logit_asymmetry(a)[0] > 0.1
    task = tiny_task("QKV")
    with torch.no_grad():
        for module in attentions(task):  # Q's rows = K's rows: q = k, so q k^T is symmetric
            module.qkv.weight[role_rows(module, "Q")] = module.qkv.weight[role_rows(module, "K")]
            module.qkv.bias[role_rows(module, "Q")] = module.qkv.bias[role_rows(module, "K")]
    measured = analyze(task, batches())
    random = analyze(tiny_task("QKV"), batches())
    for tied, free in zip(measured["layers"], random["layers"], strict=True):
        assert not tied["symmetric_logits_by_construction"]
        for head, other in zip(tied["heads"], free["heads"], strict=True):
            assert head["asymmetry"] == pytest.approx(0.0, abs=1e-6)
            assert other["asymmetry_rel"] > 0.1
    shared = analyze(tiny_task("Q=K-V"), batches())  # symmetric by construction: said, not printed as a finding
    assert all(layer["symmetric_logits_by_construction"] for layer in shared["layers"])
    assert all(h["asymmetry"] is None for layer in shared["layers"] for h in layer["heads"])


def test_principal_angles_of_a_rotated_plane_are_zero_and_the_rotation_angle():
    theta = 0.7
    a = torch.zeros(2, 5, dtype=torch.float64)
    a[0, 0], a[1, 1] = 2.0, -3.0  # span(e1, e2), not orthonormal rows
    b = torch.zeros(2, 5, dtype=torch.float64)
    b[0, 0] = 1.0
    b[1, 1], b[1, 2] = math.cos(theta), math.sin(theta)
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64) @ b  # another basis of the same plane
    assert torch.allclose(principal_angles(a, b), torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-7)
    orthogonal = torch.zeros(2, 5, dtype=torch.float64)
    orthogonal[0, 3], orthogonal[1, 4] = 1.0, 1.0
    assert torch.allclose(principal_angles(a, orthogonal), torch.full((2,), math.pi / 2, dtype=torch.float64))


def test_entropy_and_distance_from_uniform_and_cosines_by_hand():
    allowed = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    uniform = allowed.double() / allowed.sum(-1, keepdim=True)  # (3, 3) uniform over the allowed keys
    entropy, kl = attention_entropy(uniform, allowed)
    assert torch.allclose(entropy, torch.tensor([0.0, math.log(2), math.log(3)], dtype=torch.float64))
    assert torch.allclose(kl, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    one_hot = torch.eye(3, dtype=torch.float64)
    entropy, kl = attention_entropy(one_hot, allowed)
    assert torch.allclose(entropy, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(kl, torch.tensor([0.0, math.log(2), math.log(3)], dtype=torch.float64))
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    y = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    assert torch.allclose(token_cosines(x, y), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64))


def test_captured_entropy_equals_the_networks_own_attention_maps():
    task = tiny_task("Q-K=V", n_kv_heads=2)
    data = batches(1)
    result = analyze(task, data)
    with torch.no_grad():
        maps = task.network(data[0][0], need_weights=True)[1]  # per block (B, H, T, T), bidirectional
    for layer, probs in zip(result["layers"], maps, strict=True):
        entropy = -(probs.double() * probs.double().clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))  # (H,)
        assert [h["entropy"] for h in layer["heads"]] == pytest.approx(entropy.tolist(), rel=1e-6)
        assert layer["n_kv_heads"] == 2


def test_analyze_command_on_a_trained_checkpoint_writes_its_outputs_and_overwrites_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit = ["fit", "--config", str(ROOT / "configs/synthetic/reverse.yaml"), "--trainer.max_steps", "3",
           "--trainer.limit_val_batches", "1", "--data.seq_len", "8", "--data.train_size", "64", "--data.batch_size",
           "8", "--model.network.d_model", "32", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false"]
    assert main(fit) == 0
    ckpt = next((tmp_path / "logs").rglob("last.ckpt"))
    assert main(["analyze", "--ckpt_path", str(ckpt), "--batches", "1", "--device", "cpu"]) == 0
    out = ckpt.parent.parent / "analysis"
    result = json.loads((out / "analysis.json").read_text())
    assert len(result["layers"]) == 2 and len(result["layers"][0]["heads"]) == 4
    assert "| layer | head |" in (out / "analysis.md").read_text()
    assert (out / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["analyze", "--ckpt_path", str(ckpt), "--batches", "1"]) == 2  # refuses: outputs exist
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cross_layer_sharing_reports_the_source_layers_k_and_v_and_depth_factors_are_multiplied_in():
    torch.manual_seed(0)
    task = SequenceTask(attention=AttentionConfig(kv_share_every=2, depth={"Q": 2}), data_spec=SPEC,
                        network=EncoderConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=10, init_std=0.3))
    task.configure_model()
    before = analyze(task, batches())
    source, reuser = before["layers"]
    assert (source["kv_from_layer"], reuser["kv_from_layer"]) == (None, 0)
    for a, b in zip(source["heads"], reuser["heads"], strict=True):  # the same K and V tensors
        assert b["cosine"]["K-V"] == a["cosine"]["K-V"] and b["erank_weight"]["V"] == a["erank_weight"]["V"]
    for module in attentions(task):
        module.fuse()  # Q's factors multiplied into one matrix: the same effective weights and outputs
    after = analyze(task, batches())
    for old, new in zip(before["layers"], after["layers"], strict=True):
        for a, b in zip(old["heads"], new["heads"], strict=True):
            assert b["erank_weight"]["Q"] == pytest.approx(a["erank_weight"]["Q"], rel=1e-4)
            assert b["cosine"]["Q-K"] == pytest.approx(a["cosine"]["Q-K"], abs=1e-5)
