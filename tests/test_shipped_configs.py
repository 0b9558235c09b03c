"""Every shipped config runs (issue 26): each fit config under configs/ trains one optimiser step, each overlay
(variants/, strategy/, the synthetic paper protocol, uptrain/, vit/quick/) trains one step on the configs its own
comments or the README layer it on, and each study config runs its first cell, all on CPU through ``main`` with
tiny offline data (small files in each data set's official format, written here; synthetic lists; nothing is
downloaded).

The walk is over ``configs/**/*.yaml``, so a new config is covered without a change here: a file with a top-level
``task`` is a study, one naming a model class and data is a fit config, anything else an overlay. A new data class,
or an overlay folder whose files name no base in a usage line, fails :func:`test_every_shipped_config_is_run_here`
until :data:`DATA` / :data:`FALLBACK_BASE` know it.

What each run gets, besides its configs:

- every run: :data:`EVERY_RUN` (one step on one CPU device, one validation batch), and :class:`RecordRun`, which
  checks that exactly one optimiser step ran with a finite loss;
- its data class: :data:`DATA` (the small files and a batch that they fill);
- a config whose sizes are meant for GPUs: its row of :data:`SHRINK` (the only settings of the model that change);
- a study: ``--max_cells 1 --workers 0`` and the same settings through ``study.overrides``, after its own.

GPU-only combinations are parsed or built, not run, with the reason in :data:`NOT_RUN`. The study runs are marked
slow; timings (``pytest --durations``) are in tests/README.md.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from qkv_lightning.cli import main
from tests.imagedata import tar_tree, write_cifar10, write_cifar100, write_image_tree, write_mnist_gz
from tests.lm_fixtures import GPT2_RANKS, WIKITEXT2, train_bpe, write_wikitext
from tests.run_fixtures import CIFAR_CLASSES, CONFIGS, QUIET

ROOT = CONFIGS.parent
README = ROOT / "README.md"


class RecordRun(L.Callback):
    """Writes ``out`` (JSON) at the end of training: optimiser steps, the last training loss, validations run.

    Args:
        out: the file to write.
    """

    def __init__(self, out: str) -> None:
        self.out, self.validations = Path(out), 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validations += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        record = {"steps": trainer.global_step, "loss": None if loss is None else float(loss),
                  "validations": self.validations}
        self.out.write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------------- the walk
def relative(path: Path) -> str:
    return path.relative_to(CONFIGS).as_posix()


def kind(path: Path) -> str:
    """``study`` (a top-level ``task``), ``fit`` (a model class and data) or ``overlay``."""
    config = yaml.safe_load(path.read_text()) or {}
    if isinstance(config, dict) and "task" in config:
        return "study"
    if isinstance(config, dict) and "class_path" in (config.get("model") or {}) and "data" in config:
        return "fit"
    return "overlay"


ALL = sorted(CONFIGS.rglob("*.yaml"))
KINDS = {relative(path): kind(path) for path in ALL}
FIT = [name for name, k in KINDS.items() if k == "fit"]
OVERLAYS = [name for name, k in KINDS.items() if k == "overlay"]
STUDIES = [name for name, k in KINDS.items() if k == "study"]

FALLBACK_BASE = {
    "variants": "synthetic/sort.yaml",
    "strategy": "synthetic/sort.yaml",
    "synthetic": "synthetic/reverse.yaml",
    "uptrain": "uptrain/wikitext2-tiny.yaml",
    "vit/quick": "vit/cifar10-jpeg.yaml",
}
"""The fit config an overlay folder's files are layered on when neither the file's comments nor the README show
one in a ``--config ... --config <overlay>`` usage line (each file's comment names it in words)."""


def usage_lines(text: str) -> list[str]:
    """The command lines in ``text`` (comments or Markdown): ``#`` and indentation stripped, ``\\`` continuations
    joined."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip().lstrip("#").strip()
        current = f"{current} {line}".strip() if current else line
        if current.endswith("\\"):
            current = current[:-1].strip()
            continue
        if "--config" in current:
            lines.append(current)
        current = ""
    return lines


def chain_of(line: str) -> list[str]:
    """The shipped configs a command line layers, in order (``configs/`` dropped)."""
    return [m.removeprefix("configs/") for m in re.findall(r"--config[ =](configs/\S+?\.yaml)", line)]


def combination(overlay: str) -> list[str]:
    """The configs ``overlay`` is run with: the first usage line that layers it (its own comments first, then the
    README), with a fit config prepended from :data:`FALLBACK_BASE` where that line names none."""
    for text in ((CONFIGS / overlay).read_text(), README.read_text()):
        for line in usage_lines(text):
            chain = chain_of(line)
            if overlay in chain and all(name in KINDS for name in chain):
                break
        else:
            continue
        break
    else:
        chain = [overlay]
    if not any(KINDS[name] == "fit" for name in chain):
        folder = overlay.rpartition("/")[0]
        assert folder in FALLBACK_BASE, f"{overlay}: no usage line layers it on a fit config; add to FALLBACK_BASE"
        chain = [FALLBACK_BASE[folder], *chain]
    return chain


# -------------------------------------------------------------------------------------- what each run gets
EVERY_RUN = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "1",
             "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "1",
             "--trainer.limit_test_batches", "1", *QUIET]
"""One optimiser step on one CPU device; a validation of one batch (the sanity check before training)."""


def tiny_gpt(n_head: int, *extra: str) -> list[str]:
    """A GPT of one layer, width 64, MLP 128, on 16-token windows; ``n_head`` heads (the paper configs' K/V-head
    variants, 4 and 8 K/V heads, need as many)."""
    return ["--model.network.n_layer", "1", "--model.network.d_model", "64", "--model.network.n_head", str(n_head),
            "--model.network.d_mlp", "128", "--model.network.max_seq_len", "16", "--data.seq_len", "16", *extra]


SHRINK: dict[str, list[str]] = {
    # config: the settings that make a GPU-sized config fit a CPU step (the data's sizes are DATA's)
    "lm/gpt2-300m.yaml": tiny_gpt(2, "--trainer.accumulate_grad_batches", "1"),
    "lm/gpt2-1.2b.yaml": tiny_gpt(2, "--trainer.accumulate_grad_batches", "1"),
    "lm/paper-300m.yaml": tiny_gpt(4, "--global_batch_tokens", "32"),
    "lm/paper-1.2b.yaml": tiny_gpt(8, "--global_batch_tokens", "32"),
    "lm/wikitext103.yaml": ["--model.network.n_layer", "1", "--model.network.d_model", "32",
                            "--model.network.max_seq_len", "16", "--data.seq_len", "16",
                            "--model.network.adaptive_cutoffs", "[20, 40]", "--trainer.precision", "32-true"],
    "lm/wikitext2.yaml": ["--model.network.n_layer", "1", "--model.network.d_model", "48",
                          "--model.network.max_seq_len", "16", "--data.seq_len", "16"],
    "lm/streaming.yaml": ["--model.network.n_layer", "1", "--model.network.d_model", "32", "--model.network.n_head",
                          "2", "--model.network.max_seq_len", "8", "--model.network.vocab_size", "320",
                          "--trainer.accumulate_grad_batches", "1"],
    "bench/decode-gpt2-small.yaml": ["--model.network.n_layer", "1", "--model.network.d_model", "48",
                                     "--model.network.n_head", "2", "--model.network.d_mlp", "96",
                                     "--model.network.max_seq_len", "16", "--data.seq_len", "16"],
    "bench/gpt-mid.yaml": ["--model.network.n_layer", "1", "--model.network.d_model", "64",
                           "--model.network.max_seq_len", "16", "--data.seq_len", "16"],
    "uptrain/smollm2-wikitext2.yaml": ["--model.network.n_layer", "1", "--model.network.d_model", "48",
                                       "--model.network.n_head", "6", "--model.network.d_mlp", "64",
                                       "--model.network.vocab_size", "320", "--model.network.max_seq_len", "16",
                                       "--data.seq_len", "16"],
    "vit/imagenet-vit-s16.yaml": ["--data.image_size", "32", "--model.network.n_layer", "1",
                                  "--model.network.d_model", "48"],
    "vit/paper/tinyimagenet-vit-b16.yaml": ["--data.image_size", "32", "--model.network.n_layer", "1",
                                            "--model.network.d_model", "48", "--trainer.precision", "32-true"],
    "vit/cifar10.yaml": ["--model.network.n_layer", "1"],
    "vit/cifar100.yaml": ["--model.network.n_layer", "1"],
    "vit/cifar10-jpeg.yaml": ["--model.network.n_layer", "1"],
}
"""GPU-sized configs: the settings changed so that one step runs on a CPU in seconds. ``--global_batch_tokens N``
sets the config's GlobalBatch callback to N tokens (one micro-batch: 2 windows of 16 tokens), so that it asks for
no accumulation. tinyimagenet-vit-b16 trains in fp16 mixed precision, which Lightning has on GPUs only. wikitext103
trains in bf16-mixed, whose CPU autocast fails in torch's AdaptiveLogSoftmaxWithLoss (index_copy_ of a bfloat16
cluster into a float32 output; CUDA's autocast computes log_softmax in float32)."""

NOT_RUN: dict[str, str] = {
    "strategy/fsdp.yaml": "Lightning's FSDPStrategy needs CUDA and refuses to build a CPU Trainer: parsed only",
    "strategy/multinode.yaml": "several nodes cannot run in one test process: its Trainer is built (num_nodes 2)",
}
"""Overlays whose combination is not run here, and what is done instead: parsed by the CLI's strict parser (class
paths imported, settings checked against their signatures), and where Lightning allows it on CPU, the Trainer
built."""


def wikitext(folder: Path, config: dict) -> list[str]:
    """A config on the offline WikiText-2 copy (``data_dir`` under ../shared/data) reads it (its vocabulary sets
    the adaptive softmax's cutoffs); the others read small files in the official format."""
    init = config["data"].get("init_args") or {}
    if "shared/data" in str(init.get("data_dir")):
        if not WIKITEXT2.is_dir():
            pytest.skip("needs the offline WikiText-2 copy (../shared/data or $QKV_SHARED_DATA)")
        args = ["--data.data_dir", str(WIKITEXT2), "--data.cache_dir", str(folder / "cache")]
    else:
        data = write_wikitext(folder / "wikitext")
        args = ["--data.data_dir", str(data), "--data.cache_dir", str(folder / "cache"), "--data.verify", "false",
                "--data.train_file", "wiki.train.tokens", "--data.val_file", "wiki.valid.tokens",
                "--data.test_file", "wiki.test.tokens", "--data.split_test_for_val", "null"]
    args += ["--data.num_workers", "0", "--data.batch_size", "2"]
    if "eval_batch_size" in init:
        args += ["--data.eval_batch_size", "2"]
    if init.get("tokenizer") == "hf":  # the model's own (SmolLM2's, stored by import): a BPE of 300 tokens stands in
        pytest.importorskip("tokenizers")
        lines = (Path(args[args.index("--data.data_dir") + 1]) / init["train_file"]).read_text().splitlines(True)
        args += ["--data.tokenizer_file", str(folder / "tokenizer.json")]
        train_bpe(folder / "tokenizer.json", lines[:2000])
    if init.get("tokenizer") == "gpt2" or init.get("bpe_file"):
        if not GPT2_RANKS.is_file():
            pytest.skip("needs the offline GPT-2 BPE ranks (../shared/data or $QKV_SHARED_DATA)")
        args += ["--data.bpe_file", str(GPT2_RANKS)]
    return args


def streaming(folder: Path, config: dict) -> list[str]:
    pytest.importorskip("litdata")
    from tests.streaming_support import streaming_data_args, write_corpus

    write_corpus(folder / "stream", 12)
    return streaming_data_args(folder / "stream")


def images(writer: Callable[[Path], list[str]], batch: int = 4) -> Callable[[Path, dict], list[str]]:
    def args(folder: Path, config: dict) -> list[str]:
        return [*writer(folder), "--data.batch_size", str(batch), "--data.num_workers", "0"]

    return args


def cifar(folder: Path, hundred: bool = False) -> list[str]:
    (write_cifar100 if hundred else write_cifar10)(str(folder / "cifar"))
    return ["--data.root", str(folder / "cifar"), "--data.download", "false"]


def mnist(folder: Path) -> list[str]:
    write_mnist_gz(str(folder / "mnist"))
    return ["--data.root", str(folder / "mnist"), "--data.download", "false", "--data.extract_dir",
            str(folder / "extract")]


def jpeg_tree(folder: Path) -> list[str]:
    tree = write_image_tree(str(folder / "cifar10-jpeg"), CIFAR_CLASSES, 2, size=32, splits=("train", "test"))
    return ["--data.root", tar_tree(tree, str(folder / "cifar10-jpeg.tar.gz")), "--data.extract_dir",
            str(folder / "extract")]


def imagenet(folder: Path) -> list[str]:
    return ["--data.root", write_image_tree(str(folder / "imagenet"), ["n01440764", "n01443537"], 4, size=40)]


def tinyimagenet(folder: Path) -> list[str]:
    from tests.test_tinyimagenet import write_tinyimagenet

    tree, _ = write_tinyimagenet(str(folder / "tiny"), per_class=2, n_val=4)
    return ["--data.root", tree, "--data.extract_dir", str(folder / "extract")]


DATA: dict[str, Callable[[Path, dict], list[str]]] = {
    "qkv_lightning.data.synthetic.SyntheticSequenceData": lambda folder, config: [
        "--data.init_args.train_size", "256", "--data.init_args.val_size", "32", "--data.init_args.test_size", "32",
        "--data.init_args.batch_size", "8"],
    "qkv_lightning.data.wikitext.WikiText": wikitext,
    "qkv_lightning.data.streaming.StreamingText": streaming,
    "qkv_lightning.data.images.CIFAR10DataModule": images(cifar),
    "qkv_lightning.data.images.CIFAR100DataModule": images(lambda folder: cifar(folder, hundred=True)),
    "qkv_lightning.data.images.MNISTDataModule": images(mnist),
    "qkv_lightning.data.images.FashionMNISTDataModule": images(mnist),
    "qkv_lightning.data.images.ImageFolderDataModule": images(jpeg_tree),
    "qkv_lightning.data.images.ImageNetDataModule": images(imagenet),
    "qkv_lightning.data.images.TinyImageNetDataModule": images(tinyimagenet),
}
"""Each data class: small files in its data set's official format written under the test's folder (synthetic
lists: fewer of them), a batch they fill, no worker processes."""


def merged(chain: list[str]) -> dict:
    """The chain's YAML files merged (later keys win) as far as the test needs: model and data class paths, trainer
    callbacks."""
    out: dict[str, Any] = {}
    for name in chain:
        config = yaml.safe_load((CONFIGS / name).read_text()) or {}
        for key in ("model", "data", "trainer"):
            section = config.get(key)
            if isinstance(section, dict):
                out.setdefault(key, {})
                for k, v in section.items():
                    if k == "init_args" and isinstance(v, dict):
                        out[key].setdefault("init_args", {}).update(v)
                    else:
                        out[key][k] = v
    return out


def run_settings(chain: list[str], folder: Path) -> list[str]:
    """What a run of ``chain`` gets after its configs: :data:`EVERY_RUN`, the data's and the sizes' settings, and a
    :class:`RecordRun` writing ``folder/record.json``."""
    config = merged(chain)
    data_class = config["data"]["class_path"]
    assert data_class in DATA, f"{chain}: no test data for {data_class}: add it to DATA"
    args = [*EVERY_RUN, *DATA[data_class](folder, config)]
    for name in chain:
        args += SHRINK.get(name, [])
    if "--global_batch_tokens" in args:
        at = args.index("--global_batch_tokens")
        tokens = args[at + 1]
        del args[at : at + 2]
        args += ["--config", str(global_batch_overlay(config, int(tokens), folder))]
    return [*args, "--trainer.callbacks+=tests.test_shipped_configs.RecordRun",
            "--trainer.callbacks.out", str(folder / "record.json")]


def run_args(chain: list[str], folder: Path) -> list[str]:
    """``--config`` for each config of ``chain``, then :func:`run_settings`."""
    return [*(arg for name in chain for arg in ("--config", str(CONFIGS / name))), *run_settings(chain, folder)]


def global_batch_overlay(config: dict, tokens: int, folder: Path) -> Path:
    """A config whose ``trainer.callbacks`` list is the chain's with GlobalBatch's ``tokens`` changed (a list in a
    later config is merged item by item, so every item is written)."""
    callbacks = []
    for item in config["trainer"]["callbacks"]:
        item = {"class_path": item["class_path"], "init_args": dict(item.get("init_args") or {})}
        if item["class_path"].endswith("GlobalBatch"):
            item["init_args"]["tokens"] = tokens
        callbacks.append(item)
    path = folder / "global-batch.yaml"
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def check_record(folder: Path) -> None:
    record = json.loads((folder / "record.json").read_text())
    assert record["steps"] == 1, record
    assert record["loss"] is None or math.isfinite(record["loss"]), record
    assert record["validations"] >= 1, record


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(autouse=True)
def no_process_group_left():
    """A DDP or FSDP2 run in this process leaves torch.distributed's default group initialised; a later test in the
    same worker would then see a world of one process that is 'distributed' (the loaders' sampler, dcp's
    single-process path), so it is destroyed after each test."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_every_shipped_config_is_run_here():
    """The walk classifies every file, knows the data of every fit config and finds a fit config for every overlay;
    each kind is present, so a walk that finds nothing cannot pass."""
    assert set(KINDS) == {relative(p) for p in ALL} and len(ALL) >= 60
    assert {"synthetic/sort.yaml", "lm/paper-300m.yaml", "vit/paper/mnist.yaml"} <= set(FIT)
    assert {"variants/q-k=v.yaml", "strategy/ddp.yaml", "synthetic/paper-protocol.yaml"} <= set(OVERLAYS)
    assert {"study/synthetic.yaml", "study/paper-synthetic-cpu.yaml"} <= set(STUDIES)
    for name in FIT:
        assert merged([name])["data"]["class_path"] in DATA, name
    for name in OVERLAYS:
        chain = combination(name)
        assert name in chain and any(KINDS[c] == "fit" for c in chain), (name, chain)
    assert combination("synthetic/paper-protocol.yaml") == ["synthetic/reverse.yaml", "synthetic/paper-protocol.yaml"]
    assert combination("strategy/multinode.yaml") == ["synthetic/sort.yaml", "strategy/fsdp2.yaml",
                                                      "strategy/multinode.yaml"]
    assert combination("vit/quick/cpu.yaml") == ["vit/cifar10-jpeg.yaml", "vit/quick/cpu.yaml", "variants/q=k=v.yaml"]
    for name in SHRINK:
        assert name in KINDS, f"SHRINK names {name}, which is not a shipped config"


@pytest.mark.usefixtures("one_thread", "plain_argv")
@pytest.mark.parametrize("name", FIT)
def test_every_fit_config_trains_one_step(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *run_args([name], tmp_path)]) == 0
    check_record(tmp_path)


@pytest.mark.usefixtures("one_thread", "plain_argv")
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_overlay_trains_one_step_on_the_configs_it_is_shown_with(name, tmp_path, monkeypatch):
    from qkv_lightning.lightning_cli import QKVLightningCLI

    monkeypatch.chdir(tmp_path)
    chain = combination(name)
    args = run_args(chain, tmp_path)
    strategy = merged(chain)["trainer"].get("strategy") or "auto"
    strategy = strategy["class_path"] if isinstance(strategy, dict) else strategy
    if any(c in NOT_RUN for c in chain):
        parsed = QKVLightningCLI.parse_only(args)
        found = parsed.trainer.strategy
        assert (found.class_path if hasattr(found, "class_path") else found) == strategy
        if "CUDA" in " ".join(NOT_RUN[c] for c in chain if c in NOT_RUN):
            return
        cli = QKVLightningCLI(args=args, run=False)
        assert type(cli.trainer.strategy).__name__ == strategy.rsplit(".", 1)[-1]
        assert cli.trainer.num_nodes == 2
        return
    if strategy.endswith("FSDP2Strategy"):
        from torch.torch_version import TorchVersion

        from qkv_lightning.parallel import CPU_FSDP2_TORCH

        if TorchVersion(torch.__version__) < CPU_FSDP2_TORCH:
            pytest.skip(f"FSDP2 on CPUs needs torch >= {CPU_FSDP2_TORCH}")
    assert main(["fit", *args]) == 0
    check_record(tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "plain_argv")
@pytest.mark.parametrize("name", STUDIES)
def test_every_study_config_runs_its_first_cell(name, tmp_path, monkeypatch, capsys):
    """``--max_cells 1 --workers 0``: the first cell of the grid, in this process, with its task's run settings
    appended to the study's own overrides (:func:`study_args`); the cell's result is ok and took one step."""
    from qkv_lightning.study.config import cells

    monkeypatch.chdir(tmp_path)
    study, argv = study_args(name, tmp_path)
    first = cells(study)[0]
    assert main(["study", *argv]) == 0
    out = capsys.readouterr().out
    assert len(cells(study)) == 1 or f"max_cells=1: running the first 1 of {len(cells(study))}" in out, out[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "study").rglob("result.json")]
    assert len(results) == 1, [r.get("variant") for r in results]
    (result,) = results
    assert result["status"] == "ok", result.get("error")
    assert (result["variant"], result["seed"]) == (first.variant.label, first.seed)
    assert result["steps"] == 1 and all(math.isfinite(v) for v in result["metrics"].values()), result
    check_record(tmp_path)


def study_args(name: str, folder: Path) -> tuple[Any, list[str]]:
    """The parsed study and the ``study`` arguments that run its first cell: ``--max_cells 1 --workers 0``, output
    under ``folder``, and after the study's own overrides its first task's :func:`run_settings`. Where the study needs
    more: ``convert_from`` a checkpoint of one step of its task; metrics recorded at a later step (``val/ppl@400``)
    replaced by the final ones (one step reaches no later step); and where its tasks read different data classes
    (the settings of one would not fit the others), ``task`` narrowed to the first cell's."""
    from qkv_lightning.study import parse_study_args
    from qkv_lightning.study.config import cells

    raw = yaml.safe_load((CONFIGS / name).read_text())
    tasks = raw["task"] if isinstance(raw["task"], list) else [raw["task"]]
    extra = ["--output", str(folder / "study"), "--max_cells", "1", "--workers", "0"]
    if raw.get("convert_from"):  # the trained checkpoint the study converts: one step of its task
        extra += ["--convert_from", str(trained_checkpoint(tasks[0].removeprefix("configs/"), folder / "source"))]
    metrics = raw.get("metrics") or []
    reached = list(dict.fromkeys(m if "@" not in m or m.endswith("@0") else m.split("@")[0] for m in metrics))
    if reached != metrics:
        extra += ["--metrics", json.dumps(reached)]
    study, _ = parse_study_args(["--config", str(CONFIGS / name), *extra])
    task = relative(Path(cells(study)[0].task or study.task_paths[0]).resolve())
    if len({merged([relative(Path(t).resolve())])["data"]["class_path"] for t in study.task_paths}) > 1:
        extra += ["--task", str(CONFIGS / task)]
    chain = [task, *(relative(Path(p).resolve()) for p in override_configs(study.overrides))]
    overrides = [*study.overrides, *pairs(run_settings(chain, folder))]
    argv = ["--config", str(CONFIGS / name), *extra, "--overrides", json.dumps(overrides)]
    study, _ = parse_study_args(argv)
    return study, argv


def override_configs(overrides: list[str]) -> list[str]:
    from qkv_lightning.study.config import override_config_files

    return override_config_files(overrides)


def pairs(args: list[str]) -> list[str]:
    """``--key value`` pairs as the ``--key=value`` items of ``study.overrides`` (``--key+=value`` kept as is)."""
    out, i = [], 0
    while i < len(args):
        if "=" in args[i] or i + 1 == len(args) or args[i + 1].startswith("--"):
            out.append(args[i])
            i += 1
        else:
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
    return out


def trained_checkpoint(task: str, folder: Path) -> Path:
    """``last.ckpt`` of one step of ``task`` with a validation after it (its ModelCheckpoint saves there)."""
    folder.mkdir()
    args = [*run_args([task], folder), "--trainer.val_check_interval", "1", "--trainer.check_val_every_n_epoch",
            "null", "--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir",
            str(folder / "logs")]
    assert main(["fit", *args]) == 0
    (last,) = (folder / "logs").rglob("last.ckpt")
    return last


if __name__ == "__main__":  # list the runs
    for overlay in OVERLAYS:
        print(overlay, "<-", combination(overlay), file=sys.stderr)
