"""What broke at a dependency floor, checked fast enough for the floors environment of ``.ci/floors.sh``: FSDP2 on
CPUs needs torch 2.7 (tests/test_quiet.py), and jsonargparse 4.48 names a bad Literal value and lets ``convert`` take
``--config``."""

from __future__ import annotations

import pytest

from qkv_lightning.cli import main
from tests.run_fixtures import CONFIGS


def test_a_bad_choice_is_named_in_a_one_paragraph_error(capsys):
    """jsonargparse < 4.43 says "Cannot take a Union of no types" for a string Literal's unknown value."""
    code = main(["fit", "--config", str(CONFIGS / "synthetic" / "sort.yaml"), "--data.init_args.task", "reverso"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Got value: reverso" in errors[0], err[-2000:]
    assert "Union of no types" not in err


def test_convert_takes_its_config_option(capsys):
    """jsonargparse < 4.48 refuses a command function with a parameter named ``config`` (``convert --config``)."""
    from qkv_lightning.uptrain.convert import main as convert

    with pytest.raises(SystemExit) as exit_:
        convert(["--help"])
    assert exit_.value.code == 0
    assert "--config CONFIG" in capsys.readouterr().out
