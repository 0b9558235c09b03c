"""One grammar for every command (:mod:`qkv_lightning.command_line`) and one error boundary (:func:`cli.main`),
through the real command line: the list of commands, ``--help`` of each, no abbreviations and "did you mean" in
every command, lists and booleans written one way with a hint for the old form, and what the boundary prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qkv_lightning import cli
from qkv_lightning.cli import EXTRA_COMMANDS, LIGHTNING_COMMANDS, main
from qkv_lightning.command_line import CONFIG_SECTIONS, command_parser, parse_with_overrides, torch_device
from qkv_lightning.errors import ConfigError
from tests.run_fixtures import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
REVERSE = str(ROOT / "configs" / "synthetic" / "reverse.yaml")
COMMANDS = [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]

pytestmark = pytest.mark.usefixtures("plain_argv")


def error_of(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The one ``error: ...`` paragraph of a refused command (exit code 2, no traceback, nothing after it)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-2000:]
    return errors[0]


# ------------------------------------------------------------------------------------------- the command list
def test_bare_invocation_and_help_list_every_command_with_one_line_each(capsys):
    assert main([]) == 2  # a usage error: no command
    bare = capsys.readouterr().out
    assert main(["--help"]) == 0
    assert capsys.readouterr().out == bare
    listed = [line.split()[0] for line in bare.splitlines() if line.startswith("  ")]
    assert listed == COMMANDS and len(COMMANDS) == 16
    for name in COMMANDS:
        (line,) = [line for line in bare.splitlines() if line.startswith(f"  {name} ")]
        assert len(line.split()) > 3  # the name and its summary, on one line


def test_python_dash_m_lists_every_command_in_a_real_process():
    result = subprocess.run([sys.executable, "-m", "qkv_lightning"], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert all(f"\n  {name} " in result.stdout for name in COMMANDS), result.stdout


def test_an_unknown_command_suggests_the_closest(capsys):
    error = error_of(capsys, ["reprot", "--config", REVERSE])
    assert "invalid choice: 'reprot' is not a command; did you mean 'report'?" in error
    assert all(name in error for name in COMMANDS)


@pytest.mark.parametrize("command", list(EXTRA_COMMANDS))
def test_every_command_has_help_written_from_its_docstrings(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cli.py {command} ")
    text = " ".join(out.split())
    assert "(type: " in text or "(required, type: " in text  # jsonargparse's help: each option's type and docs
    assert "Unvalidated" not in text  # every option's type resolved, so values are checked against it


def test_help_text_comes_from_the_option_docstrings(capsys):
    assert main(["report", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--kv_dtype {float32,bfloat16,float16,float8} KV-cache element type" in out
    assert main(["convert", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--keep KEEP the role kept by --method keep: Q, K or V." in out


# ------------------------------------------------------------------ no abbreviations, and "did you mean" everywhere
MISTYPED = {
    "fit": (["fit", "--config", REVERSE, "--trainer.max_step", "1"], "max_steps"),
    "analyze": (["analyze", "--ckpt", "x.ckpt"], "ckpt_path"),
    "bench": (["bench", "--config", REVERSE, "--variant", "[QKV]"], "variants"),
    "bench-attention": (["bench-attention", "--n_hea", "4"], "n_head"),
    "bench-decode": (["bench-decode", "--config", REVERSE, "--context", "[8]"], "contexts"),
    "configs": (["configs", "--pat", "true"], "path"),
    "consolidate": (["consolidate", "a", "b", "--destinatio", "c"], "destination"),
    "convert": (["convert", "a", "b", "--shar", "Q-K=V"], "sharing"),
    "evaluate": (["evaluate", "--ckpt_path", "x", "--tasks", "[a]", "--num_fewsho", "5"], "num_fewshot"),
    "export": (["export", "--ckpt_path", "x", "--out", "y", "--capacit", "8"], "capacity"),
    "import": (["import", "a", "b", "--bpe_fil", "r.tiktoken"], "bpe_file"),
    "report": (["report", "--config", REVERSE, "--variant", "QKV"], "variants"),
    "study": (["study", "--equivalence", "0.02"], "equivalence_margin"),
}


def test_the_table_covers_every_command():
    assert set(MISTYPED) == set(EXTRA_COMMANDS) | {"fit"}


@pytest.mark.parametrize("command", list(MISTYPED))
def test_a_mistyped_or_abbreviated_option_is_refused_with_did_you_mean(command, capsys):
    """Each mistyped name is a prefix of (or one letter off) a real option, which argparse's abbreviations would
    have taken silently."""
    argv, meant = MISTYPED[command]
    error = error_of(capsys, argv)
    assert f"did you mean '{meant}'?" in error, error


def test_study_worker_is_not_taken_for_workers(capsys):
    error = error_of(capsys, ["study", "--worker", "0"])
    assert "unrecognized arguments: --worker 0" in error and "did you mean 'workers'?" in error


def test_a_value_outside_the_choices_gets_did_you_mean(capsys):
    error = error_of(capsys, ["report", "--config", REVERSE, "--format", "jsn"])
    assert "Got value: jsn" in error and "did you mean 'json'?" in error


# ------------------------------------------------------------------------------------- lists and booleans
@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["report", "--config", REVERSE, "--variants", "QKV", "Q-K=V"], "--variants '[QKV, Q-K=V]'"),
        (["report", "--config", REVERSE, "--n_kv_heads", "4", "1"], "--n_kv_heads '[4, 1]'"),
        (["bench-decode", "--config", REVERSE, "--contexts", "256", "1024"], "--contexts '[256, 1024]'"),
        (["evaluate", "--ckpt_path", "x", "--tasks", "hellaswag,piqa"], "--tasks '[hellaswag, piqa]'"),
        (["study", "--seeds", "0", "1", "2"], "--seeds '[0, 1, 2]'"),
    ],
)
def test_a_list_written_the_old_way_gets_a_one_line_hint(argv, hint, capsys):
    error = error_of(capsys, argv)
    assert f"takes one list, written {hint}" in error, error


@pytest.mark.parametrize(
    "argv",
    [["report", "--config", REVERSE, "--count_masked"], ["evaluate", "--ckpt_path", "x", "--overwrite", "--tasks",
                                                          "[a]"], ["configs", "--path"]],
)
def test_a_boolean_without_its_value_gets_a_one_line_hint(argv, capsys):
    flag = next(a for a in argv if a in ("--count_masked", "--overwrite", "--path"))
    assert f"{flag} takes a value: write {flag} true" in error_of(capsys, argv)


def test_lists_and_booleans_written_the_one_way_are_read(capsys):
    assert main(["report", "--config", REVERSE, "--variants", "[QKV, Q=K=V]", "--n_kv_heads", "[2]",
                 "--count_masked", "true", "--format", "json", "--model.network.n_layer", "3"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert [v["name"] for v in data["variants"]] == ["QKV", "Q=K=V", "QKV_kv2"]
    assert data["sizes"]["n_layer"] == 3 and data["config"][-2:] == ["--model.network.n_layer", "3"]
    assert main(["configs", "--path", "true"]) == 0
    assert Path(capsys.readouterr().out.strip()) == ROOT / "configs"


def test_options_of_the_fit_config_go_to_it_in_order_and_the_commands_own_stay():
    parser = command_parser("bench", None, task_config="required")
    parser.add_argument("--data", default="config")
    args, overrides = parse_with_overrides(parser, [
        "--config", "a.yaml", "--data", "random", "--model.network.n_layer", "2", "--data.batch_size=4",
        "--seed_everything", "3", "--trainer.max_steps", "-1", "--config", "b.yaml"])
    assert args.config == ["a.yaml", "b.yaml"] and args.data == "random"
    assert overrides == ["--model.network.n_layer", "2", "--data.batch_size=4", "--seed_everything", "3",
                         "--trainer.max_steps", "-1"]


def test_the_fit_config_sections_are_those_of_lightnings_parser():
    from qkv_lightning.lightning_cli import QKVLightningCLI

    class ParserOnly(QKVLightningCLI):
        def instantiate_classes(self) -> None:
            pass

    cli_object = ParserOnly(args=["--config", REVERSE], run=False)
    sections = {action.dest.split(".")[0] for action in cli_object.parser._actions}
    sections -= {"help", "print_config", "print_shtab"}  # actions that print and exit, not settings
    assert sections == CONFIG_SECTIONS


# ----------------------------------------------------------------------------------------- the error boundary
def test_debug_re_raises_a_commands_error_with_its_traceback():
    with pytest.raises(ConfigError, match="did you mean 'variants'"):
        main(["report", "--config", REVERSE, "--variant", "QKV", "--debug"])


def test_an_os_error_names_its_file_and_a_yaml_error_is_one_paragraph():
    missing = FileNotFoundError(2, "No such file or directory", "/data/nothere.bin")
    assert cli.describe(missing) == "/data/nothere.bin: No such file or directory"
    try:
        yaml.safe_load("a: [unclosed\nb: 1\n")
    except yaml.YAMLError as error:
        text = cli.describe(error)
    assert text.startswith("cannot read a YAML file: ") and "\n" not in text and "line 2" in text
    assert cli.describe(KeyError("a bug")) is None  # not a known error: main shows its traceback


def test_cli_is_the_table_and_the_boundary_only():
    assert len((ROOT / "qkv_lightning" / "cli.py").read_text().splitlines()) < 150


def test_a_device_the_machine_lacks_is_a_config_error(monkeypatch):
    import torch

    assert torch_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert torch_device(None).type == "cpu" and torch_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="--device cuda: this machine has no CUDA GPUs"):
        torch_device("cuda")
    with pytest.raises(ConfigError, match="--device gpu0: not a torch device"):
        torch_device("gpu0")
