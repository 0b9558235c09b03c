"""The variant's one home (qkv_lightning/variants.py), networks that declare their cost, `last` for every subcommand,
and the import layering."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from qkv_lightning import accounting, variants
from qkv_lightning.cli import main as cli_main
from qkv_lightning.errors import ConfigError
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.encoder import EncoderConfig
from qkv_lightning.study import StudyConfig, run_study
from qkv_lightning.tasks.sequence_tasks import SequenceTask
from qkv_lightning.variants import Variant, expand
from tests.run_fixtures import synthetic_args


def test_one_label_format_for_every_variant() -> None:
    assert Variant("shared_kv").label == "Q-K=V"
    assert Variant("Q-K=V", 2).label == "Q-K=V_kv2"
    assert Variant("V=Q-K", None, ("noself", "score")).label == "Q=V-K+score+noself"  # canonical order
    assert Variant("Q=K-V", None, "score+noself") == Variant("Q=K-V", None, ("noself", "score"))
    assert Variant.of(AttentionConfig(sharing="Q-K=V", n_kv_heads=4, score_encoding="paper"), n_head=4).label == (
        "Q-K=V+score"
    )
    # true is the alias of the relative encoding, a breaker of its own
    assert Variant.of(AttentionConfig(sharing="Q-K=V", score_encoding=True)).label == "Q-K=V+relative"
    with pytest.raises(ConfigError, match="unknown symmetry breaker 'scor'"):
        Variant("QKV", None, "scor")


def test_attention_settings_turn_off_the_breakers_a_variant_does_not_have() -> None:
    settings = Variant("Q=K-V", None, ("score",)).attention_settings()
    assert settings == {"sharing": "Q=K-V", "n_kv_heads": None, "score_encoding": "paper", "mask_self": False}
    base = AttentionConfig(mask_self=True, dropout=0.1)
    config = Variant("Q-K=V", 2).attention_config(base)
    assert (config.sharing, config.n_kv_heads, config.mask_self, config.dropout) == ("Q-K=V", 2, False, 0.1)


def test_expansion_applies_the_one_validity_rule_and_checks_divisibility() -> None:
    found, notes = expand(["QKV", "Q=K-V", "Q-K=V"], [None, 2], ["none", "score"])
    assert [v.label for v in found] == [
        "QKV", "QKV+score", "QKV_kv2", "QKV+score_kv2", "Q=K-V", "Q=K-V+score", "Q-K=V", "Q-K=V+score",
        "Q-K=V_kv2", "Q-K=V+score_kv2",
    ]
    assert len(notes) == 2 and all("Q=K-V" in note for note in notes)
    found, _ = expand(["QKV"], [4, None], n_head=4)  # all heads is one variant
    assert [v.label for v in found] == ["QKV"]
    with pytest.raises(ConfigError, match="must divide n_head=4"):
        expand(["QKV"], [3], n_head=4)


def _tiny_task(folder: Path) -> Path:
    config = {
        "model": {
            "class_path": "qkv_lightning.tasks.sequence_tasks.SequenceTask",
            "init_args": {"network": {"n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 8}},
        },
        "data": {
            "class_path": "qkv_lightning.data.synthetic.SyntheticSequenceData",
            "init_args": {"task": "sub", "seq_len": 4, "train_size": 64, "val_size": 16, "test_size": 16,
                          "batch_size": 16},
        },
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1},
    }
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_new_breaker_registered_in_one_place_reaches_study_report_and_accounting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A made-up breaker ("explicit": the explicit softmax path) added to the registry only: the study runs it with
    its own label and column, the summary names it, and accounting labels its cost, with no other edits."""
    monkeypatch.setitem(variants.BREAKERS, "explicit", {"backend": "explicit"})
    monkeypatch.chdir(tmp_path)
    config = StudyConfig(
        task=str(_tiny_task(tmp_path)), sharing=["QKV"], breakers=["none", "explicit"], seeds=[0], workers=0,
        test=False,
    )
    run_study(config, tmp_path / "study", echo=lambda *_: None)
    with open(tmp_path / "study" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["variant"], row["backend"], row["status"]) for row in rows] == [
        ("QKV", "sdpa", "ok"),
        ("QKV+explicit", "explicit", "ok"),
    ]
    cell_config = yaml.safe_load((tmp_path / "study" / "runs" / "QKV+explicit" / "seed0" / "cell.yaml").read_text())
    assert cell_config["model"]["init_args"]["attention"]["backend"] == "explicit"
    assert "QKV+explicit" in (tmp_path / "study" / "summary.md").read_text()
    network = EncoderConfig(n_layer=1, n_head=2, d_model=16, max_seq_len=8, vocab_size=12, num_classes=10)
    cost = accounting.network_cost(network, AttentionConfig(backend="explicit"))
    assert cost.label == "QKV+explicit"


def test_a_network_that_declares_no_cost_fails_when_the_task_is_built() -> None:
    @dataclass
    class Uncounted:  # a new network's config without cost()
        n_head: int = 2

    class NewTask(SequenceTask):
        def __init__(self) -> None:
            super(SequenceTask, self).__init__(Uncounted())

    with pytest.raises(ConfigError, match="declares no closed-form cost: give it a method cost"):
        NewTask()


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_last_without_a_checkpoint_is_an_error_for_evaluation_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture, command: str
) -> None:
    code = cli_main([command, *synthetic_args(tmp_path), "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{command} --ckpt_path last: no last.ckpt was found" in err and "Traceback" not in err


def test_last_is_the_trained_checkpoint_for_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``test --ckpt_path last`` evaluates the newest run's last.ckpt: the same metrics as naming the file, and not
    the untrained model's."""
    assert cli_main(["fit", *synthetic_args(tmp_path, steps=8)]) == 0
    checkpoints = sorted(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 1
    results = {}
    for ckpt in ("last", str(checkpoints[0])):
        capsys.readouterr()
        assert cli_main(["test", *synthetic_args(tmp_path), "--ckpt_path", ckpt]) == 0
        results[ckpt] = capsys.readouterr().out
    untrained = cli_main(["test", *synthetic_args(tmp_path)])
    untrained_out = capsys.readouterr().out
    assert untrained == 0
    assert _metric(results["last"], "test/loss") == _metric(results[str(checkpoints[0])], "test/loss")
    assert _metric(results["last"], "test/loss") != _metric(untrained_out, "test/loss")


def _metric(output: str, name: str) -> float:
    for line in output.splitlines():
        cells = line.replace("│", " ").split()
        if len(cells) >= 2 and cells[0] == name:
            return float(cells[1])
    raise AssertionError(f"{name} not printed in:\n{output}")


def test_a_label_parses_back_to_its_variant_and_settings_toggle_breakers() -> None:
    for variant in expand(["QKV", "Q-K=V", "Q=K=V"], [None, 2], ["none", "score+noself", "relative"])[0]:
        assert Variant.parse(variant.label) == variant
    assert Variant.parse("Q-K=V_kv2").with_settings(score_encoding="paper").label == "Q-K=V+score_kv2"
    assert Variant.parse("Q-K=V+score_kv2").with_settings(score_encoding="none").label == "Q-K=V_kv2"
    with pytest.raises(ConfigError):
        Variant.parse("timm Attention")
