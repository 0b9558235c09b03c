"""``import`` of the paper authors' own checkpoints: their language models (eight attention layouts), their
synthetic-task encoder and their ViT, each as our task's checkpoint with the same logits.

The files are built here in the authors' key layout, every tensor random, and saved as their scripts save them
(``torch.save`` of their dict). The reference is an explicit forward written from the formulas below (not their
code and not ours): pre-norm blocks, softmax(q k^T / sqrt(hd) (+ the "+" term)) v, exact GELU MLP.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qkv_lightning.cli import main
from qkv_lightning.resume import check_fits, read_checkpoint_info

D, H, L, VOCAB, POSITIONS, INNER = 16, 4, 2, 37, 12, 24
HD = D // H


# ------------------------------------------------------------------------------------------ the reference
def layer_norm(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def linear(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, n * HD) -> (B, H, T, HD), each of the n heads read by H / n consecutive query heads."""
    b, t, _ = x.shape
    return x.view(b, t, n, HD).transpose(1, 2).repeat_interleave(H // n, dim=1)


def attend(q, k, v, causal: bool, extra: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(HD) [* temperature + bias]) v, heads merged: (B, T, D)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(HD)  # (B, H, T, T)
    if extra is not None:
        scores = scores * extra[0] + extra[1]
    if causal:
        t = q.shape[2]
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    out = scores.softmax(-1) @ v  # (B, H, T, HD)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def lm_qkv(layout: str, sd: dict, p: str, x: torch.Tensor, groups: int):
    """q, k, v (B, H, T, HD) of one layer of the authors' LM ``layout`` from the normed input x."""
    if layout == "KQV":
        q, k, v = linear(x, sd, p + "c_attn").split(D, -1)
        return heads(q, H), heads(k, H), heads(v, H)
    if layout == "KV_1":
        k = linear(x, sd, p + "c_k")
        return heads(linear(x, sd, p + "c_q"), H), heads(k, H), heads(k, H)
    if layout == "QK":
        k, v = linear(x, sd, p + "c_kv").split(D, -1)
        return heads(k, H), heads(k, H), heads(v, H)
    if layout == "K":
        k = linear(x, sd, p + "c_k")
        return heads(k, H), heads(k, H), heads(k, H)
    q = heads(linear(x, sd, p + "c_q"), H)
    if layout in ("GQA", "MQA"):
        k, v = linear(x, sd, p + "c_kv").split(groups * HD, -1)
        return q, heads(k, groups), heads(v, groups)
    k = linear(x, sd, p + ("c_k" if layout == "QGQA" else "c_kv"))  # QGQA, QMQA: v = k
    return q, heads(k, groups), heads(k, groups)


def reference_lm(sd: dict, layout: str, groups: int, idx: torch.Tensor) -> torch.Tensor:
    x = sd["wte.weight"][idx] + sd["wpe.weight"][: idx.shape[1]]
    for i in range(L):
        p = f"h.{i}."
        q, k, v = lm_qkv(layout, sd, p + "attn.", layer_norm(x, sd, p + "ln_1"), groups)
        x = x + linear(attend(q, k, v, causal=True), sd, p + "attn.c_proj")
        x = x + linear(gelu(linear(layer_norm(x, sd, p + "ln_2"), sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj")
    return layer_norm(x, sd, "ln_f") @ sd["wte.weight"].T  # tied head


def sincos(n: int, dim: int) -> torch.Tensor:
    """(n, dim): channel 2i sin(p / 10000^(2i/dim)), channel 2i+1 its cosine."""
    pe = torch.zeros(n, dim)
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    pe[:, 0::2] = torch.sin(pos * rate[: pe[:, 0::2].shape[1]])
    pe[:, 1::2] = torch.cos(pos * rate[: pe[:, 1::2].shape[1]])
    return pe


def pair_table(n: int, m: int) -> torch.Tensor:
    """P (n, n, m): the first m//2 channels from the query position, the rest from the key position."""
    half = m // 2
    return torch.cat([sincos(n, half)[:, None].expand(n, n, half), sincos(n, m - half)[None].expand(n, n, m - half)],
                     -1)


ENCODER_PROJECTIONS = {"QKV": ("c_q", "c_k", "c_v"), "Q=K!=V": ("c_qk", "c_v"), "Q!=K=V": ("c_q", "c_kv"),
                       "Q=K=V": ("c_qkv",)}


def encoder_blocks(sd: dict, variant: str, x: torch.Tensor, mlp_out: int, m: int) -> torch.Tensor:
    base = variant.strip("()+")
    for i in range(L):
        p = f"blocks.{i}."
        h = layer_norm(x, sd, p + "ln1")
        a = {name: heads(linear(h, sd, f"{p}attn.{name}"), H) for name in ENCODER_PROJECTIONS[base]}
        q = a.get("c_q", a.get("c_qk", a.get("c_qkv")))
        k = a.get("c_k", a.get("c_qk", a.get("c_kv", a.get("c_qkv"))))
        v = a.get("c_v", a.get("c_kv", a.get("c_qkv")))
        extra = None
        if variant.endswith("+"):
            w, b = sd[p + "attn.pos_w"], sd[p + "attn.pos_b"]
            t = x.shape[1]
            extra = (w.sum(), pair_table(t, m) @ w + b)  # (T, T)
        x = x + linear(attend(q, k, v, causal=False, extra=extra), sd, p + "attn.c_proj")
        x = x + linear(gelu(linear(layer_norm(x, sd, p + "ln2"), sd, p + "mlp.0")), sd, f"{p}mlp.{mlp_out}")
    return layer_norm(x, sd, "ln_f")


# ------------------------------------------------------------------------------------------ their files
LM_LAYOUTS = {  # their script -> (projections and rows, n_kv_groups in model_config or None)
    "KQV": ({"c_attn": 3 * D}, None),
    "KV_1": ({"c_q": D, "c_k": D}, None),
    "QK": ({"c_kv": 2 * D}, None),
    "K": ({"c_k": D}, None),
    "GQA": ({"c_q": D, "c_kv": 2 * 2 * HD}, 2),
    "QGQA": ({"c_q": D, "c_k": 2 * HD}, 2),
    "MQA": ({"c_q": D, "c_kv": 2 * HD}, 1),
    "QMQA": ({"c_q": D, "c_kv": HD}, 1),
}
OURS = {"KQV": ("QKV", None), "KV_1": ("Q-K=V", None), "QK": ("Q=K-V", None), "K": ("Q=K=V", None),
        "GQA": ("QKV", 2), "QGQA": ("Q-K=V", 2), "MQA": ("QKV", 1), "QMQA": ("Q-K=V", 1)}


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.4


def norm(sd: dict, name: str, d: int = D) -> None:
    sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + rand(d), rand(d)


def lin(sd: dict, name: str, n_in: int, n_out: int) -> None:
    sd[f"{name}.weight"], sd[f"{name}.bias"] = rand(n_out, n_in), rand(n_out)


def lm_file(path: Path, layout: str, ddp: bool = True) -> dict:
    """Their LM's final save: {step, epoch, tokens_seen, model_state_dict, val_metrics, model_config, train_config}."""
    torch.manual_seed(0)
    projections, groups = LM_LAYOUTS[layout]
    sd = {"wte.weight": rand(VOCAB, D), "wpe.weight": rand(POSITIONS, D)}
    for i in range(L):
        p = f"h.{i}."
        norm(sd, p + "ln_1")
        norm(sd, p + "ln_2")
        for name, rows in projections.items():
            lin(sd, f"{p}attn.{name}", D, rows)
        lin(sd, p + "attn.c_proj", D, D)
        sd[p + "attn.bias"] = torch.ones(POSITIONS, POSITIONS).tril().view(1, 1, POSITIONS, POSITIONS)
        lin(sd, p + "mlp.c_fc", D, INNER)
        lin(sd, p + "mlp.c_proj", INNER, D)
    norm(sd, "ln_f")
    config = {"vocab_size": VOCAB, "n_positions": POSITIONS, "n_layer": L, "n_embd": D, "n_head": H,
              "n_inner": INNER, "embd_pdrop": 0.0, "resid_pdrop": 0.1, "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5,
              "initializer_range": 0.02, "use_bias": True, "tie_word_embeddings": True, "use_flash_attention": True}
    if groups is not None:
        config["n_kv_groups"] = groups
    saved = {f"module.{k}" if ddp else k: v for k, v in sd.items()}
    torch.save({"step": 7, "epoch": 1, "tokens_seen": 1234, "model_state_dict": saved,
                "val_metrics": {"loss": 3.06, "perplexity": 21.28}, "model_config": config,
                "train_config": {"seed": 42, "learning_rate": 2e-4}}, path)
    return sd


def encoder_state(variant: str, m: int, mlp_out: int) -> dict:
    sd: dict = {}
    for i in range(L):
        p = f"blocks.{i}."
        norm(sd, p + "ln1")
        norm(sd, p + "ln2")
        for name in ENCODER_PROJECTIONS[variant.strip("()+")]:
            lin(sd, f"{p}attn.{name}", D, D)
        lin(sd, p + "attn.c_proj", D, D)
        if variant.endswith("+"):
            sd[p + "attn.pos_w"], sd[p + "attn.pos_b"] = rand(m), rand(1)
        lin(sd, p + "mlp.0", D, 4 * D)
        lin(sd, f"{p}mlp.{mlp_out}", 4 * D, D)
    norm(sd, "ln_f")
    return sd


def synthetic_file(path: Path, variant: str) -> dict:
    """Their export_checkpoints.py dict for the synthetic encoder (max_len 20, pos_dim 10)."""
    torch.manual_seed(1)
    sd = encoder_state(variant, 10, 2)
    lin(sd, "embed", 10, D)
    sd["pos_emb.weight"] = rand(20, D)
    lin(sd, "head", D, 10)
    if variant.endswith("+"):
        for i in range(L):
            sd[f"blocks.{i}.attn.pos2d"] = pair_table(20, 10)
    config = {"n_embd": D, "n_layer": L, "n_head": H, "seq_len": 9, "variant": variant, "pos_dim": 10,
              "n_inner_mult": 4, "max_len": 20}
    torch.save({"task": "synthetic-REVERSE", "variant": variant, "model": "Encoder", "config": config,
                "test_accuracy": 0.8125, "model_state_dict": sd}, path)
    return sd


def vit_file(path: Path, variant: str) -> dict:
    """Their ViT dict: 10-px, 3-channel images, 4-px patches (padded to a 3 x 3 grid), m = 50, 7 classes."""
    torch.manual_seed(2)
    sd = encoder_state(variant, 50, 3)
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = rand(D, 3, 4, 4), rand(D)
    sd["cls"], sd["pos_emb"] = rand(1, 1, D), rand(1, 10, D)
    lin(sd, "head", D, 7)
    if variant.endswith("+"):
        for i in range(L):
            sd[f"blocks.{i}.attn.pos2d"] = pair_table(10, 50)
    config = {"image_size": 10, "channels": 3, "patch": 4, "n_classes": 7, "n_embd": D, "n_layer": L, "n_head": H,
              "variant": variant, "pos_dim": 50, "n_inner_mult": 4, "dropout": 0.1}
    torch.save({"task": "vision-cifar10", "variant": variant, "model": "ViT", "config": config,
                "test_accuracy": 0.5, "model_state_dict": sd}, path)
    return sd


def task_from(path: Path):
    """The task of a written checkpoint, rebuilt from its hyper-parameters as the CLI does, after resume.py's checks."""
    from qkv_lightning.tasks.image_classifier import ImageClassifier
    from qkv_lightning.tasks.language_model import LanguageModel
    from qkv_lightning.tasks.sequence_tasks import SequenceTask

    checkpoint = torch.load(path, weights_only=True)
    hparams = dict(checkpoint["hyper_parameters"])
    cls = {c.__module__ + "." + c.__name__: c for c in (LanguageModel, ImageClassifier, SequenceTask)}
    task = cls[hparams.pop("_class_path")](**hparams)
    check_fits(task, read_checkpoint_info(path))
    task.configure_model()
    task.load_state_dict(checkpoint["state_dict"], strict=True)
    return task.eval(), checkpoint


# ------------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("layout", list(LM_LAYOUTS))
def test_authors_lm_layouts_import_with_the_reference_logits(tmp_path, plain_argv, capsys, layout):
    sd = lm_file(tmp_path / "final_model.pt", layout)
    assert main(["import", str(tmp_path / "final_model.pt"), str(tmp_path / "ours.ckpt")]) == 0
    assert "authors-lm" in capsys.readouterr().out
    task, checkpoint = task_from(tmp_path / "ours.ckpt")
    sharing, n_kv = OURS[layout]
    assert (task.attention_config.sharing, task.attention_config.n_kv_heads) == (sharing, n_kv)
    assert task.network_config.gelu == "exact"
    record = checkpoint["qkv_import"]
    assert record["val_metrics"] == {"loss": 3.06, "perplexity": 21.28} and record["tokens_seen"] == 1234
    assert record["model_config"]["n_head"] == H and "optimizer_state_dict" not in record
    idx = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = task.network(idx)  # (B, T, V)
    assert ours.shape == (3, 9, VOCAB)
    torch.testing.assert_close(ours, reference_lm(sd, layout, LM_LAYOUTS[layout][1] or H, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["QKV", "Q=K!=V", "(Q=K!=V)+", "Q!=K=V", "Q=K=V", "(Q=K=V)+"])
def test_authors_synthetic_encoder_imports_with_the_reference_logits(tmp_path, plain_argv, variant):
    sd = synthetic_file(tmp_path / "synthetic_reverse.pt", variant)
    assert main(["import", str(tmp_path / "synthetic_reverse.pt"), str(tmp_path / "ours.ckpt")]) == 0
    task, checkpoint = task_from(tmp_path / "ours.ckpt")
    assert checkpoint["qkv_import"]["test_accuracy"] == 0.8125
    assert checkpoint["hyper_parameters"]["data_spec"]["task"] == "reverse"
    idx = torch.randint(0, 10, (3, 9), generator=torch.Generator().manual_seed(4))
    x = F.one_hot(idx, 10).float() @ sd["embed.weight"].T + sd["embed.bias"] + sd["pos_emb.weight"][:9]
    expected = linear(encoder_blocks(sd, variant, x, 2, 10), sd, "head")  # (B, T, 10)
    with torch.no_grad():
        ours = task(idx)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["QKV", "Q=K!=V", "(Q=K!=V)+", "Q!=K=V", "Q=K=V", "(Q=K=V)+"])
def test_authors_vit_imports_with_the_reference_logits(tmp_path, plain_argv, variant):
    sd = vit_file(tmp_path / "vision.pt", variant)
    assert main(["import", str(tmp_path / "vision.pt"), str(tmp_path / "ours.ckpt")]) == 0
    task, checkpoint = task_from(tmp_path / "ours.ckpt")
    assert checkpoint["qkv_import"]["variant"] == variant
    assert (task.network_config.dropout, task.network_config.dropout_at) == (0.1, "mlp")  # their placement
    images = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    padded = F.pad(images, (0, 2, 0, 2))  # (2, 3, 12, 12): zeros right and bottom up to the 3 x 3 grid
    patches = F.conv2d(padded, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)  # (2, D, 3, 3)
    x = torch.cat([sd["cls"].expand(2, 1, D), patches.flatten(2).transpose(1, 2)], 1) + sd["pos_emb"]  # (2, 10, D)
    expected = linear(encoder_blocks(sd, variant, x, 3, 50)[:, 0], sd, "head")  # (2, 7)
    with torch.no_grad():
        ours = task(images)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_authors_files_with_a_missing_or_misshapen_key_are_errors_naming_it(tmp_path, plain_argv, capsys):
    def error_of(raw: dict, name: str, *extra: str) -> str:
        torch.save(raw, tmp_path / name)
        capsys.readouterr()
        assert main(["import", str(tmp_path / name), str(tmp_path / f"{name}.ckpt"), *extra]) == 2
        assert not (tmp_path / f"{name}.ckpt").exists()
        return capsys.readouterr().err

    lm_file(tmp_path / "good.pt", "GQA", ddp=False)
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    state = good["model_state_dict"]
    missing = {k: v for k, v in state.items() if k != "h.1.mlp.c_fc.bias"}
    assert "h.1.mlp.c_fc.bias" in error_of({**good, "model_state_dict": missing}, "missing.pt")
    wrong = {**state, "h.0.attn.c_proj.weight": state["h.0.attn.c_proj.weight"].T[:, :5]}
    assert "h.0.attn.c_proj.weight" in error_of({**good, "model_state_dict": wrong}, "shape.pt")
    extra = {**state, "h.0.attn.rotary.inv_freq": torch.ones(2)}
    assert "h.0.attn.rotary.inv_freq" in error_of({**good, "model_state_dict": extra}, "extra.pt")
    no_head = {**good, "model_config": {k: v for k, v in good["model_config"].items() if k != "n_head"}}
    assert "n_head" in error_of(no_head, "nohead.pt")
    assert "use_bias" in error_of({**good, "model_config": {**good["model_config"], "use_bias": False}}, "bias.pt")
    plain = {k.removeprefix("module."): v for k, v in state.items()}  # a bare state dict, not their dict
    assert "model_state_dict" in error_of(plain, "plain.pt", "--format", "authors")
    no_config = {k: v for k, v in good.items() if k != "model_config"}
    assert "model_config" in error_of(no_config, "noconfig.pt", "--format", "authors")
    synthetic_file(tmp_path / "syn.pt", "(Q=K=V)+")
    syn = torch.load(tmp_path / "syn.pt", weights_only=True)
    lied = {**syn, "config": {**syn["config"], "variant": "QKV"}}
    assert "variant" in error_of(lied, "lied.pt")
    table = {**syn["model_state_dict"], "blocks.1.attn.pos2d": syn["model_state_dict"]["blocks.1.attn.pos2d"] * 2}
    assert "blocks.1.attn.pos2d" in error_of({**syn, "model_state_dict": table}, "table.pt")
    for text in capsys.readouterr().err.splitlines():
        assert "Traceback" not in text


def test_imported_synthetic_encoder_is_tested_through_the_cli_with_the_reference_accuracy(tmp_path, plain_argv):
    """``test --ckpt_path`` on the imported file: the CLI's checks accept it, and test/acc is the reference forward's
    token accuracy on the same test lists."""
    from qkv_lightning.lightning_cli import QKVLightningCLI
    from tests.run_fixtures import synthetic_args

    sd = synthetic_file(tmp_path / "synthetic_reverse.pt", "(Q=K=V)+")
    assert main(["import", str(tmp_path / "synthetic_reverse.pt"), str(tmp_path / "ours.ckpt")]) == 0
    args = [*synthetic_args(tmp_path), "--data.init_args.task", "reverse", "--data.init_args.seq_len", "9",
            "--ckpt_path", str(tmp_path / "ours.ckpt")]
    with pytest.warns(UserWarning, match="replace the config's"):
        cli = QKVLightningCLI(args=["test", *args])
    right = total = 0
    for idx, targets in cli.datamodule.test_dataloader():
        x = F.one_hot(idx, 10).float() @ sd["embed.weight"].T + sd["embed.bias"] + sd["pos_emb.weight"][:9]
        predicted = linear(encoder_blocks(sd, "(Q=K=V)+", x, 2, 10), sd, "head").argmax(-1)  # (B, T)
        right += int((predicted == targets).sum())
        total += targets.numel()
    assert total == 16 * 9
    assert cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(right / total, abs=1e-6)
