"""Uptraining: weight surgery between variants (convert), init_from, and distillation."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from qkv_lightning.checkpoints import atomic_save, start_checkpoint
from qkv_lightning.cli import main
from qkv_lightning.errors import CheckpointError, ConfigError
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.encoder import EncoderConfig
from qkv_lightning.nn.gpt import IGNORE_INDEX, GPTConfig
from qkv_lightning.nn.vit import ViTConfig
from qkv_lightning.resume import check_fits, read_checkpoint_info
from qkv_lightning.tasks.base import TaskModule
from qkv_lightning.tasks.distill import distillation_loss
from qkv_lightning.tasks.image_classifier import ImageClassifier
from qkv_lightning.tasks.language_model import LanguageModel
from qkv_lightning.tasks.persist import build_task, load_task
from qkv_lightning.tasks.sequence_tasks import SequenceTask
from qkv_lightning.uptrain.convert import attention_layers, calibration_grams, convert_task
from qkv_lightning.uptrain.surgery import fit_outputs, output_error, role_projections
from qkv_lightning.variants import Variant
from tests.lm_fixtures import write_wikitext
from tests.run_fixtures import lm_args

SPEC = {"vocab_size": 40, "seq_len": 12}


def tiny_lm(sharing: str = "QKV", n_kv_heads: int | None = None, seed: int = 0, **network) -> LanguageModel:
    torch.manual_seed(seed)
    config = {"n_layer": 2, "n_head": 4, "d_model": 32, "d_mlp": 64, "max_seq_len": 12, "dropout": 0.0, **network}
    task = LanguageModel(
        network=GPTConfig(**config), attention=AttentionConfig(sharing=sharing, n_kv_heads=n_kv_heads), data_spec=SPEC
    )
    task.configure_model()
    return task.eval()


def tokens(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SPEC["vocab_size"], (n, SPEC["seq_len"]), generator=torch.Generator().manual_seed(seed))


# The three kinds of task that convert reads, each tiny (width 32, 4 heads: fused rows Q 0:32, K 32:64, V 64:96),
# without dropout, with weights large enough (init_std 0.3; a ViT's default init zeroes its head) that any change to
# the attention shows in the logits.
TASKS = ("gpt", "vit", "sequence")
VIT_SPEC = {"num_classes": 5, "image_size": 8, "in_channels": 3}
SEQ_SPEC = {"vocab_size": 12, "num_classes": 12, "seq_len": 10}


def tiny_task(kind: str, sharing: str = "QKV", seed: int = 0, rope: bool = False) -> object:
    """A built task of ``kind`` in eval mode; ``rope`` gives the sequence models rotary positions (a ViT has none).
    Every parameter is jittered, so that none keeps a constant initial value (zero biases, unit norms) that a
    conversion forgetting to copy it would rebuild by chance."""
    if kind == "gpt":
        task = tiny_lm(sharing, seed=seed, init_std=0.3, **({"position": "rope"} if rope else {}))
    else:
        torch.manual_seed(seed)
        attention = AttentionConfig(sharing=sharing)
        if kind == "vit":
            network = ViTConfig(patch_size=4, n_layer=2, n_head=4, d_model=32, d_mlp=64, drop_path=0.0, init="torch")
            task = ImageClassifier(network=network, attention=attention, data_spec=VIT_SPEC)
        else:
            network = EncoderConfig(n_layer=2, n_head=4, d_model=32, d_mlp=64, max_seq_len=10, init_std=0.3,
                                    position="rope" if rope else "learned")
            task = SequenceTask(attention=attention, network=network, data_spec=SEQ_SPEC)
        task.configure_model()
    with torch.no_grad():
        for parameter in task.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return task.eval()


def task_batch(kind: str, n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch of ``kind``'s data: (inputs, targets)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "gpt":
        return tokens(n, seed), tokens(n, seed + 100)
    if kind == "vit":
        images = torch.randn(n, 3, 8, 8, generator=generator)  # (B, C, S, S)
        return images, torch.randint(0, 5, (n,), generator=generator)  # (B,)
    inputs = torch.randint(0, 12, (n, 10), generator=generator)  # (B, T)
    return inputs, inputs.flip(-1)


def task_outputs(task: object, inputs: torch.Tensor) -> torch.Tensor:
    """The task network's logits for ``inputs``."""
    with torch.no_grad():
        out = task.network(inputs)
    return out[0] if isinstance(out, tuple) else out  # the sequence encoder also returns its attention maps


def tie_k_to_v(task: object) -> None:
    """Make every layer's K weights and biases equal to its V's (fused rows: Q 0:32, K 32:64, V 64:96)."""
    for attn in attention_layers(task).values():
        with torch.no_grad():
            attn.qkv.weight[32:64] = attn.qkv.weight[64:96]
            attn.qkv.bias[32:64] = attn.qkv.bias[64:96]


@pytest.mark.parametrize("kind", TASKS)
@pytest.mark.parametrize("method,keep", [("mean", None), ("keep", "K"), ("fit", None)])
def test_identity_conversion_keeps_logits_bit_identical(kind, method, keep):
    source = tiny_task(kind, "Q-K=V", rope=True)
    batch = task_batch(kind)
    grams = calibration_grams(source, [batch]) if method == "fit" else None
    target = convert_task(source, Variant("Q-K=V"), method, keep, grams)
    assert torch.equal(task_outputs(target, batch[0]), task_outputs(source, batch[0]))
    assert target.state_dict().keys() == source.state_dict().keys()


@pytest.mark.parametrize("kind", TASKS)
def test_mean_of_a_model_whose_k_and_v_weights_are_equal_gives_the_same_outputs(kind):
    source = tiny_task(kind, "QKV")
    tie_k_to_v(source)
    target = convert_task(source, Variant("Q-K=V"), "mean")
    for attn in attention_layers(target).values():
        assert attn.qkv.weight.shape == (64, 32)  # one K=V projection
    inputs = task_batch(kind)[0]
    torch.testing.assert_close(task_outputs(target, inputs), task_outputs(source, inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", TASKS)
def test_convert_cli_on_a_checkpoint_of_each_task_keeps_its_outputs(kind, tmp_path, capsys):
    """``cli.py convert`` on a checkpoint file of each task: QKV -> QKV is bit-identical, and QKV -> Q-K=V by mean of
    a model whose K and V are equal keeps the outputs; the destination loads as the task of the new variant."""
    source = tiny_task(kind, "QKV", seed=2)
    inputs = task_batch(kind, seed=5)[0]
    identity = tmp_path / "qkv.ckpt"
    atomic_save(start_checkpoint(source), tmp_path / "source.ckpt")
    assert main(["convert", str(tmp_path / "source.ckpt"), str(identity), "--sharing", "QKV"]) == 0
    loaded, _ = load_task(identity, expected=TaskModule)
    assert type(loaded) is type(source) and loaded.attention_config.sharing == "QKV"
    assert torch.equal(task_outputs(loaded.eval(), inputs), task_outputs(source, inputs))
    tie_k_to_v(source)
    atomic_save(start_checkpoint(source), tmp_path / "tied.ckpt")
    shared = tmp_path / "q-k=v.ckpt"
    assert main(["convert", str(tmp_path / "tied.ckpt"), str(shared), "--sharing", "Q-K=V", "--method", "mean"]) == 0
    assert "QKV -> Q-K=V by mean" in capsys.readouterr().out
    loaded, checkpoint = load_task(shared, expected=TaskModule)
    assert loaded.attention_config.sharing == "Q-K=V" and checkpoint["converted_from"]["method"] == "mean"
    expected = task_outputs(source, inputs)
    assert (task_outputs(tiny_task(kind, "QKV", seed=2), inputs) - expected).abs().max() > 1e-2  # tying changed it
    torch.testing.assert_close(task_outputs(loaded.eval(), inputs), expected, rtol=0, atol=1e-6)


# the target's groups in the order of its fused projection, written out (not read from the parser)
GROUPS = {"Q-K=V": [("Q",), ("K", "V")], "Q=V-K": [("Q", "V"), ("K",)], "Q=K-V": [("Q", "K"), ("V",)]}


@pytest.mark.parametrize(("sharing", "keep"), [("Q-K=V", "K"), ("Q-K=V", "V"), ("Q=V-K", "V"), ("Q=V-K", "Q"),
                                               ("Q=K-V", "K")])
def test_convert_keep_writes_the_kept_roles_rows(sharing, keep, tmp_path, capsys):
    """``cli.py convert --method keep --keep R``: each merged group of the converted fused projection is the
    source's R rows (weights and biases), a group of one role is that role's rows, and every other weight is the
    source's; the source file is unchanged."""
    source = tiny_task("gpt", "QKV", seed=2)
    src = tmp_path / "source.ckpt"
    atomic_save(start_checkpoint(source), src)
    before = digest(src)
    dst = tmp_path / "kept.ckpt"
    assert main(["convert", str(src), str(dst), "--sharing", sharing, "--method", "keep", "--keep", keep]) == 0
    assert f"QKV -> {sharing} by keep (keep {keep})" in capsys.readouterr().out
    loaded, checkpoint = load_task(dst, expected=TaskModule)
    assert checkpoint["converted_from"]["method"] == "keep" and checkpoint["converted_from"]["keep"] == keep
    rows = {"Q": slice(0, 32), "K": slice(32, 64), "V": slice(64, 96)}  # the source's fused QKV rows
    layers, converted = attention_layers(source), attention_layers(loaded)
    assert len(layers) == 2 and converted.keys() == layers.keys()
    for name, attn in layers.items():
        picks = [rows[keep if len(group) > 1 else group[0]] for group in GROUPS[sharing]]
        assert torch.equal(converted[name].qkv.weight, torch.cat([attn.qkv.weight[r] for r in picks]))
        assert torch.equal(converted[name].qkv.bias, torch.cat([attn.qkv.bias[r] for r in picks]))
    theirs = loaded.state_dict()
    for key, value in source.state_dict().items():
        if ".qkv." not in key:
            assert torch.equal(theirs[key], value), key
    assert digest(src) == before


def test_gqa_head_pooling_equals_a_hand_computed_pooling():
    source = tiny_lm("QKV")
    d = 8  # head size: 4 heads of width 32
    for variant in (Variant("QKV", 2), Variant("Q-K=V", 2), Variant("Q-K=V", 1)):
        target = convert_task(source, variant, "mean")
        n_kv = variant.n_kv_heads
        per = 4 // n_kv
        for name, attn in attention_layers(source).items():
            w = torch.cat([attn.qkv.weight, attn.qkv.bias[:, None]], dim=1)  # (96, 33)
            q, k, v = w[:32], w[32:64], w[64:96]

            def pooled(role, per=per, n_kv=n_kv):  # K/V head j: the mean of source heads j * per ... j * per + per - 1
                heads = [role[h * d : (h + 1) * d] for h in range(4)]
                return torch.cat([sum(heads[j * per + i] for i in range(per)) / per for j in range(n_kv)])

            expected = [q, pooled(k), pooled(v)] if variant.sharing == "QKV" else [q, (pooled(k) + pooled(v)) / 2]
            got = attention_layers(target)[name]
            torch.testing.assert_close(
                torch.cat([got.qkv.weight, got.qkv.bias[:, None]], dim=1), torch.cat(expected), rtol=0, atol=1e-6
            )
            assert torch.equal(got.proj.weight, attn.proj.weight)


def test_fit_is_exact_where_v_is_a_per_head_map_of_k_and_beats_mean_on_the_calibration_error():
    source = tiny_lm("QKV", seed=3)
    torch.manual_seed(4)
    for attn in attention_layers(source).values():  # V_h = M_h K_h (weights and biases), M_h random
        with torch.no_grad():
            k = torch.cat([attn.qkv.weight[32:64], attn.qkv.bias[32:64, None]], dim=1).view(4, 8, 33)
            maps = torch.eye(8) + 0.5 * torch.randn(4, 8, 8)
            v = (maps @ k).reshape(32, 33)
            attn.qkv.weight[64:96], attn.qkv.bias[64:96] = v[:, :32], v[:, 32]
    batches = [(tokens(4, seed), tokens(4, seed)) for seed in range(3)]
    grams = calibration_grams(source, batches)
    fitted = convert_task(source, Variant("Q-K=V"), "fit", grams=grams)
    mean = convert_task(source, Variant("Q-K=V"), "mean")
    idx = tokens(2, seed=9)
    with torch.no_grad():
        reference = source.network(idx)
        torch.testing.assert_close(fitted.network(idx), reference, rtol=1e-4, atol=1e-4)
        assert (mean.network(idx) - reference).abs().max() > 1e-2
    for name, attn in attention_layers(source).items():
        roles = role_projections(attn)
        pair = [roles["K"], roles["V"]]
        shared, maps = fit_outputs(pair, [False, False], grams[name])
        mean_error = output_error(pair, (pair[0] + pair[1]) / 2, None, grams[name])
        fit_error = output_error(pair, shared, maps, grams[name])
        assert fit_error < 1e-6 * mean_error


def test_fit_with_rope_anchors_k_and_is_never_worse_than_mean():
    source = tiny_lm("QKV", seed=5, position="rope")
    grams = calibration_grams(source, [(tokens(4, s), tokens(4, s)) for s in range(2)])
    for name, attn in attention_layers(source).items():
        roles = role_projections(attn)
        pair = [roles["K"], roles["V"]]
        shared, maps = fit_outputs(pair, [True, False], grams[name])  # K's map cannot pass through RoPE
        assert torch.equal(maps[0], torch.eye(8).expand(4, 8, 8))
        mean_error = output_error(pair, (pair[0] + pair[1]) / 2, None, grams[name])
        assert output_error(pair, shared, maps, grams[name]) < 0.9 * mean_error


def test_impossible_targets_are_clear_errors():
    source = tiny_lm("Q-K=V")
    with pytest.raises(ConfigError, match="more distinct projections than the source"):
        convert_task(source, Variant("QKV"), "mean")
    with pytest.raises(ConfigError, match="must divide n_head"):
        convert_task(tiny_lm("QKV"), Variant("Q-K=V", 3), "mean")
    with pytest.raises(ConfigError, match="does not contain Q"):
        convert_task(tiny_lm("QKV"), Variant("Q-K=V"), "keep", "Q")


def test_distillation_loss_equals_a_hand_computed_kl_with_ignored_targets_masked():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, -2.0]])
    teacher = torch.tensor([[0.5, 1.5, 1.0], [9.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    mask = torch.tensor([True, False, True])
    temperature = 2.0

    def softmax(row):
        exps = [math.exp(x / temperature) for x in row]
        return [e / sum(exps) for e in exps]

    kls = []
    for s, t, keep in zip(student.tolist(), teacher.tolist(), mask.tolist(), strict=True):
        if keep:
            p, q = softmax(t), softmax(s)
            kls.append(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True)))
    expected = temperature**2 * sum(kls) / len(kls)
    assert distillation_loss(student, teacher, temperature, mask).item() == pytest.approx(expected, rel=1e-6)
    # the language model's distillation masks its ignored targets the same way
    task = tiny_lm("Q-K=V", seed=1)
    object.__setattr__(task, "teacher", tiny_lm("QKV", seed=2).network)
    task.distill_config.temperature = temperature
    idx, targets = tokens(2, seed=3), tokens(2, seed=4)
    targets[0, :5] = IGNORE_INDEX
    with torch.no_grad():
        loss, logits = task.distilled_training_loss((idx, targets))
        teacher_logits = task.teacher(idx).flatten(0, 1)
        keep = targets.flatten() != IGNORE_INDEX
        hard = torch.nn.functional.cross_entropy(logits[keep], targets.flatten()[keep])
        soft = distillation_loss(logits[keep], teacher_logits[keep], temperature)
    torch.testing.assert_close(loss, 0.5 * hard + 0.5 * soft)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_converted_checkpoints_load_validate_fine_tune_distil_and_resume_through_the_cli(tmp_path, capsys):
    data = write_wikitext(tmp_path / "data")
    assert main(["fit", *lm_args(tmp_path, data, "qkv", steps=2)]) == 0
    (source,) = (tmp_path / "logs" / "qkv").glob("version_0/checkpoints/last.ckpt")
    converted = tmp_path / "q-k=v.ckpt"
    convert = ["convert", str(source), str(converted), "--sharing", "Q-K=V", "--method", "fit",
               "--calibration_batches", "2"]
    assert main(convert) == 0
    before = digest(converted)
    assert main(convert) == 2 and "never overwrites" in capsys.readouterr().err
    assert digest(converted) == before
    info = read_checkpoint_info(converted)  # weights-only, like every checkpoint
    assert info.hparams["attention"]["sharing"] == "Q-K=V"
    check_fits(build_task(info.hparams, str(converted), expected=TaskModule), info)
    # validate --ckpt_path and validate from init_from give the converted model's numbers
    losses = {}
    for name, extra in {
        "ckpt": ["--ckpt_path", str(converted)],
        "init": ["--model.init_args.attention.sharing", "Q-K=V", "--model.init_args.init_from", str(converted)],
    }.items():
        assert main(["validate", *lm_args(tmp_path, data, f"val-{name}"), *extra]) == 0
        out = capsys.readouterr().out
        losses[name] = next(line for line in out.splitlines() if "val/loss" in line)
    assert losses["ckpt"] == losses["init"]
    # fit from the converted weights (a fresh optimiser), distilled from the source; a wrong variant is an error
    assert main(["fit", *lm_args(tmp_path, data, "wrong"), "--model.init_args.init_from", str(converted)]) == 2
    assert "model.init_from" in capsys.readouterr().err
    tune = [*lm_args(tmp_path, data, "tune", steps=2), "--model.init_args.attention.sharing", "Q-K=V",
            "--model.init_args.init_from", str(converted), "--model.init_args.distill.teacher", str(source),
            "--trainer.log_every_n_steps", "1"]
    assert main(["fit", *tune]) == 0
    (tuned,) = (tmp_path / "logs" / "tune").glob("version_0/checkpoints/last.ckpt")
    checkpoint = torch.load(tuned, weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if "teacher" in k]
    n_student = len([k for k in checkpoint["state_dict"] if k.startswith("network.")])
    assert sum(len(g["params"]) for g in checkpoint["optimizer_states"][0]["param_groups"]) == n_student
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = tuned.parent.parent.glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events))
    scalars.Reload()
    assert {"train/distill_loss", "train/hard_loss"} <= set(scalars.Tags()["scalars"])
    # --ckpt_path takes precedence: the resumed run continues its own weights, init_from is not even read
    converted.unlink()
    resume = [arg if arg != "2" else "4" for arg in tune] + ["--ckpt_path", "last"]
    assert main(["fit", *resume]) == 0
    assert torch.load(tuned, weights_only=True)["global_step"] == 4


def test_missing_init_from_is_a_clear_error(tmp_path, capsys):
    data = write_wikitext(tmp_path / "data")
    args = [*lm_args(tmp_path, data, "lm"), "--model.init_args.init_from", str(tmp_path / "nothing.ckpt")]
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert "model.init_from" in err and "does not exist" in err
    with pytest.raises(CheckpointError):
        tiny_lm().read_weights(str(tmp_path / "nothing.ckpt"), "model.init_from")
