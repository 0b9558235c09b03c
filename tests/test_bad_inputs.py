"""Bad input of every kind (settings, command lines, data files, checkpoints, study settings) through the real command
line: each gives its documented one-paragraph error, exit code 2 and no traceback, and none changes a file of the
finished runs it points at.

Three small runs (synthetic task, language model, ViT) finish first, each with checkpoints in its log folder. Most bad
commands point at one of them with ``fit --ckpt_path last``, which would resume into, and log into, that very folder;
the whole ``logs`` tree (file names and SHA-256 of their content) must be the same after every bad command. The
errors reference (``qkv_lightning/ERRORS.md``, "Bad inputs and their messages") lists every case with its message.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv_lightning.cli import main
from qkv_lightning.data.hf_tokenizer import CHECKPOINT_ENTRY
from tests.imagedata import write_cifar10, write_image_tree, write_mnist_gz
from tests.lm_fixtures import train_bpe, write_wikitext
from tests.run_fixtures import CONFIGS, image_args, lm_args, snapshot, subprocess_env, synthetic_args
from tests.streaming_support import streaming_data_args, write_corpus

ROOT = Path(__file__).resolve().parent.parent
ERRORS = ROOT / "qkv_lightning" / "ERRORS.md"


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint or data file would hold."""

    def __reduce__(self):
        return (os.system, ("true",))


@dataclass
class Runs:
    """The finished runs and their data, in one folder."""

    folder: Path
    wikitext: Path
    cifar: Path

    def checkpoint(self, run: str) -> Path:
        return self.folder / "logs" / run / "version_0" / "checkpoints" / "last.ckpt"

    def synthetic(self, *extra: str, command: str = "fit") -> list[str]:
        return [command, *synthetic_args(self.folder), "--ckpt_path", "last", *extra]

    def lm(self, data: Path | None = None, *extra: str) -> list[str]:
        return ["fit", *lm_args(self.folder, data or self.wikitext), "--ckpt_path", "last", *extra]

    def vit(self, root: Path | None = None, *extra: str) -> list[str]:
        return ["fit", *image_args(self.folder, root or self.cifar), "--ckpt_path", "last", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    folder = tmp_path_factory.mktemp("runs")
    cwd = os.getcwd()
    os.chdir(folder)  # relative defaults (.cache/data, logs) stay in here
    try:
        made = Runs(folder, write_wikitext(folder / "wikitext"), folder / "cifar")
        write_cifar10(str(made.cifar))
        assert main(["fit", *synthetic_args(folder)]) == 0
        assert main(["fit", *lm_args(folder, made.wikitext)]) == 0
        assert main(["fit", *image_args(folder, made.cifar)]) == 0
    finally:
        os.chdir(cwd)
    for run in ("synthetic", "lm", "vit"):
        assert made.checkpoint(run).is_file()
    return made


@pytest.fixture(autouse=True)
def in_run_folder(runs, monkeypatch) -> None:
    monkeypatch.chdir(runs.folder)
    monkeypatch.setattr("sys.argv", ["cli.py"])


def yaml_file(tmp: Path, text: str) -> str:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return str(path)


def wikitext_copy(runs: Runs, tmp: Path) -> Path:
    copy = tmp / "wikitext"
    shutil.copytree(runs.wikitext, copy)
    return copy


def damaged_wikitext(change: Callable[[Path], None]) -> Callable[[Runs, Path], list[str]]:
    def build(runs: Runs, tmp: Path) -> list[str]:
        data = wikitext_copy(runs, tmp)
        change(data)
        return runs.lm(data, "--data.cache_dir", str(tmp / "cache"))

    return build


def truncated_official(runs: Runs, tmp: Path) -> list[str]:
    data = write_wikitext(tmp / "official", {"wiki.valid.tokens": 80})  # the official file's name, in its format
    lines = (data / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) > 500
    (data / "wiki.valid.tokens").write_text("".join(lines[:500]), encoding="utf-8")  # cut at a line end
    shutil.copy(runs.wikitext / "wiki.test.tokens", data / "wiki.test.tokens")
    return runs.lm(data, "--data.cache_dir", str(tmp / "cache"), "--data.train_file", "wiki.valid.tokens",
                   "--data.val_file", "wiki.test.tokens", "--data.verify", "true")


def modified_cache(runs: Runs, tmp: Path) -> list[str]:
    cache = tmp / "cache"
    shutil.copytree(runs.folder / "cache", cache)
    token_file = cache / "word" / "train.bin"
    data = bytearray(token_file.read_bytes())
    data[10:14] = bytes(reversed(data[10:14])) if data[10:14] != data[10:14][::-1] else b"\x01\x02\x03\x04"
    token_file.write_bytes(bytes(data))  # same size, other content
    return runs.lm(None, "--data.cache_dir", str(cache), "--data.rebuild_cache", "false")


def damaged_cifar(change: Callable[[Path], None]) -> Callable[[Runs, Path], list[str]]:
    def build(runs: Runs, tmp: Path) -> list[str]:
        root = tmp / "cifar"
        shutil.copytree(runs.cifar, root)
        change(root / "cifar-10-batches-py")
        return runs.vit(root)

    return build


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def image_folder_with_empty_class(runs: Runs, tmp: Path) -> list[str]:
    tree = write_image_tree(str(tmp / "tree"), ["a", "b"], 2, size=16, splits=("train", "val"))
    os.makedirs(tmp / "tree" / "train" / "c")
    return ["fit", *image_args(runs.folder, Path(tree), name="folder", config="cifar10-jpeg"),
            "--data.image_size", "16", "--data.extract_dir", str(tmp / "extracted")]


def corrupt_mnist(runs: Runs, tmp: Path) -> list[str]:
    write_mnist_gz(str(tmp / "mnist"))
    truncate(tmp / "mnist" / "train-images-idx3-ubyte.gz", 0.6)
    return ["fit", *image_args(runs.folder, tmp / "mnist", name="mnist", config="mnist", patch=7),
            "--data.extract_dir", str(tmp / "extracted")]


def checkpoint_copy(runs: Runs, tmp: Path, run: str = "synthetic") -> tuple[Path, dict]:
    return tmp / "copy.ckpt", torch.load(runs.checkpoint(run), weights_only=True)


def truncated_checkpoint(runs: Runs, tmp: Path) -> list[str]:
    path = tmp / "cut.ckpt"
    shutil.copy(runs.checkpoint("synthetic"), path)
    truncate(path)
    return runs.synthetic("--ckpt_path", str(path), command="validate")


def unsafe_checkpoint(runs: Runs, tmp: Path) -> list[str]:
    path, checkpoint = checkpoint_copy(runs, tmp)
    checkpoint["extra"] = RunsCode()
    torch.save(checkpoint, path)
    return runs.synthetic("--ckpt_path", str(path), command="validate")


def sharded_folder(tmp: Path, metadata_override: bytes | None = None) -> Path:
    """A real distributed-checkpoint folder (one process), in Lightning's layout."""
    import torch.distributed.checkpoint as dcp

    folder = tmp / "sharded.ckpt"
    state = {"state_dict": {"network.embed.weight": torch.zeros(10, 32)}}
    with pytest.warns(UserWarning, match="single process"):
        dcp.save(state, checkpoint_id=str(folder))
    torch.save({"global_step": 1, "hyper_parameters": {}}, folder / "meta.pt")
    if metadata_override is not None:
        (folder / ".metadata").write_bytes(metadata_override)
    return folder


def incomplete_sharded(runs: Runs, tmp: Path) -> list[str]:
    folder = sharded_folder(tmp)
    (folder / ".metadata").unlink()  # the index is written last: an interrupted save lacks it
    return runs.synthetic("--ckpt_path", str(folder), command="validate")


def study(*extra: str) -> Callable[[Runs, Path], list[str]]:
    def build(runs: Runs, tmp: Path) -> list[str]:
        return ["study", "--config", str(CONFIGS / "study" / "synthetic.yaml"), "--output", str(tmp / "study"),
                "--task", str(CONFIGS / "synthetic" / "reverse.yaml"), "--seeds", "[0]", *extra]

    return build


@dataclass
class Case:
    """One bad input: how to make the command, and the part of its message the errors reference documents."""

    id: str
    build: Callable[[Runs, Path], list[str]]
    message: str


CASES = [
    # ------------------------------------------------------------------------------------ settings and command line
    Case("typo in a nested setting (YAML)",
         lambda r, t: r.synthetic("--config", yaml_file(t, "model:\n init_args:\n  attention:\n   sharin: QKV\n")),
         "'sharin': did you mean 'sharing'?"),
    Case("abbreviated or misspelled option",
         lambda r, t: r.synthetic("--trainer.max_step", "9"), "'max_step': did you mean 'max_steps'?"),
    Case("misspelled section",
         lambda r, t: r.synthetic("--config", yaml_file(t, "modle:\n init_args:\n  network:\n   n_layer: 2\n")),
         "'modle': did you mean 'model'?"),
    Case("misspelled data setting", lambda r, t: r.synthetic("--data.init_args.batchsize", "4"),
         "'batchsize': did you mean 'batch_size'?"),
    Case("unknown variant", lambda r, t: r.synthetic("--model.init_args.attention.sharing", "QKX"),
         "is not a projection-sharing variant"),
    Case("wrong type", lambda r, t: r.synthetic("--trainer.max_steps", "abc"), 'Parser key "trainer.max_steps"'),
    Case("value not among the choices", lambda r, t: r.synthetic("--model.init_args.attention.backend", "fast"),
         'Parser key "attention.backend"'),
    Case("misspelled class path",
         lambda r, t: r.synthetic("--trainer.callbacks+=lightning.pytorch.callbacks.ModelChekpoint"),
         "did you mean 'lightning.pytorch.callbacks.ModelCheckpoint'?"),
    Case("width not divisible by heads", lambda r, t: r.synthetic("--model.init_args.network.n_head", "3"),
         "must be divisible by network.n_head=3"),
    Case("heads not divisible by K/V heads", lambda r, t: r.synthetic("--model.init_args.attention.n_kv_heads", "3"),
         "attention.n_kv_heads=3 must divide n_head=4"),
    Case("Q shared with fewer K/V heads",
         lambda r, t: r.synthetic("--model.init_args.attention.sharing", "Q=K-V",
                                  "--model.init_args.attention.n_kv_heads", "1"),
         "so it needs as many K/V heads as query heads"),
    Case("no K/V heads", lambda r, t: r.synthetic("--model.init_args.attention.n_kv_heads", "0"),
         "attention.n_kv_heads=0 must be at least 1"),
    Case("sequence longer than the positions", lambda r, t: r.synthetic("--data.init_args.seq_len", "32"),
         "data.seq_len=32 exceeds model.network.max_seq_len=16"),
    Case("RoPE with an odd head size",
         lambda r, t: r.synthetic("--model.init_args.network.position", "rope", "--model.init_args.network.n_head",
                                  "32"),
         "network.position=rope needs an even head size"),
    Case("image not divisible by the patch", lambda r, t: r.vit(None, "--data.image_size", "30"),
         "image size 30 is not divisible by network.patch_size=8"),
    Case("non-positive learning rate", lambda r, t: r.synthetic("--model.init_args.optimizer.lr", "-1"),
         "optimizer.lr=-1.0 must be positive"),
    Case("batch size 0", lambda r, t: r.synthetic("--data.init_args.batch_size", "0"),
         "data.batch_size=0 must be at least 1"),
    Case("unknown synthetic task", lambda r, t: r.synthetic("--data.init_args.task", "reverso"), "Got value: reverso"),
    Case("unknown command", lambda r, t: ["fitt", *synthetic_args(r.folder)], "invalid choice: 'fitt'"),
    Case("trainer setting Lightning rejects", lambda r, t: r.synthetic("--trainer.strategy", "ddpp"),
         "Lightning rejects the trainer settings"),
    Case("missing config file", lambda r, t: r.synthetic("--config", str(t / "nothere.yaml")), "File does not exist"),
    Case("malformed YAML", lambda r, t: r.synthetic("--config", yaml_file(t, "model: [unclosed\n")),
         "Problems parsing config"),
    Case("negative skip budget", lambda r, t: r.synthetic("--nonfinite.max_skipped_steps", "-1"),
         "nonfinite.max_skipped_steps=-1 must be >= 0"),
    # ------------------------------------------------------------------------------------------------------- data
    Case("missing WikiText file",
         damaged_wikitext(lambda d: (d / "wiki.valid.tokens").unlink()), "split file(s) not found"),
    Case("empty WikiText file", damaged_wikitext(lambda d: (d / "wiki.valid.tokens").write_text("")), "is empty"),
    Case("WikiText file cut mid-line",
         damaged_wikitext(lambda d: (d / "wiki.train.tokens").write_bytes(
             (d / "wiki.train.tokens").read_bytes().rstrip(b"\n") + b" half")),
         "does not end with a line end"),
    Case("WikiText file not UTF-8",
         damaged_wikitext(lambda d: (d / "wiki.train.tokens").write_bytes(b"\xff\xfe\xfa broken \n")),
         "is not UTF-8 text"),
    Case("truncated official WikiText file", truncated_official, "has 500 lines, but the official WikiText-2"),
    Case("token cache altered, rebuilding off", modified_cache, "SHA-256 differs from the recorded one"),
    Case("split shorter than one sequence",
         damaged_wikitext(lambda d: (d / "wiki.train.tokens").write_text(" = A = \n")), "too few for one window"),
    Case("batch larger than the training split", lambda r, t: r.lm(None, "--data.batch_size", "100000"),
         "fewer than one batch of data.batch_size=100000"),
    Case("truncated CIFAR batch", damaged_cifar(lambda f: truncate(f / "data_batch_1")), "is truncated or corrupted"),
    Case("CIFAR file holding code",
         damaged_cifar(lambda f: (f / "data_batch_2").write_bytes(pickle.dumps(RunsCode(), protocol=2))),
         "refusing to load"),
    Case("missing CIFAR file", damaged_cifar(lambda f: (f / "test_batch").unlink()),
         "is missing; the folder is incomplete"),
    Case("empty class folder", image_folder_with_empty_class, "holds no images"),
    Case("corrupt MNIST file", corrupt_mnist, "truncated or corrupted"),
    # ------------------------------------------------------------------------------------------------ checkpoints
    Case("checkpoint path that does not exist",
         lambda r, t: r.synthetic("--ckpt_path", str(t / "nothere.ckpt"), command="validate"), "does not exist"),
    Case("truncated checkpoint", truncated_checkpoint, "is truncated or not a torch checkpoint"),
    Case("not a checkpoint",
         lambda r, t: (t / "notes.ckpt").write_text("not a checkpoint")
         and r.synthetic("--ckpt_path", str(t / "notes.ckpt"), command="validate"),
         "is truncated or not a torch checkpoint"),
    Case("checkpoint of another size", lambda r, t: r.synthetic("--model.init_args.network.n_layer", "2"),
         "network.n_layer: checkpoint 1, config 2"),
    Case("checkpoint of another variant", lambda r, t: r.synthetic("--model.init_args.attention.sharing", "Q=K=V"),
         "attention.sharing: checkpoint 'QKV', config 'Q=K=V'"),
    Case("checkpoint of another task",
         lambda r, t: r.synthetic("--ckpt_path", str(r.checkpoint("lm")), command="validate"),
         "model.class_path: checkpoint qkv_lightning.tasks.language_model.LanguageModel"),
    Case("checkpoint holding code", unsafe_checkpoint,
         "it holds Python objects other than tensors and plain containers (posix.system)"),
    Case("sharded checkpoint without a sharding strategy",
         lambda r, t: r.synthetic("--ckpt_path", str(sharded_folder(t)), command="validate"),
         "is a sharded (FSDP/FSDP2) checkpoint folder, but trainer.strategy is"),
    Case("incomplete sharded checkpoint", incomplete_sharded, "is not a complete sharded checkpoint folder"),
    Case("sharded checkpoint index holding code",
         lambda r, t: ["consolidate", str(sharded_folder(t, pickle.dumps(RunsCode()))), str(t / "out.ckpt")],
         "refusing to load the sharded checkpoint"),
    Case("consolidating a single file",
         lambda r, t: ["consolidate", str(r.checkpoint("synthetic")), str(t / "out.ckpt")],
         "is a single-file checkpoint, not a sharded"),
    # ------------------------------------------------------------------------------------------------------ study
    Case("misspelled study setting", study("--sedes", "[0]"), "'sedes': did you mean 'seeds'?"),
    Case("unknown study variant", study("--sharing", "[QKV, QKX]"),
         "study.sharing=['QKV', 'QKX']: attention.sharing='QKX' is not a"),
    Case("impossible study cell", study("--n_kv_heads", "[3]", "--baseline", "QKV_kv3"),
         "study cell QKV_kv3 is impossible"),
    Case("study margin that is no margin", study("--equivalence_margin", "lots"),
         "study.equivalence_margin='lots' is not a margin"),
    Case("study task that does not exist",
         lambda r, t: ["study", "--task", str(t / "nothere.yaml"), "--output", str(t / "study")],
         "no such fit config"),
]


# ------------------------------------------------------------------------------------------ issue 13's battery
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
)
"""A billion laughs: 10 nodes, each level ten aliases of the previous one (10^10 nodes once expanded)."""


NAN_BETAS = "model:\n init_args:\n  optimizer:\n   betas: [.nan, 0.95]\n"


def huge_bytes_claim(folder: Path) -> None:
    """A CIFAR batch whose pickle claims a bytes object of 2^62 bytes (BINBYTES8)."""
    (folder / "data_batch_1").write_bytes(b"\x80\x04\x8e" + (1 << 62).to_bytes(8, "little") + b"abc")


def changed_cache(change: Callable[[Path], None]) -> Callable[[Runs, Path], list[str]]:
    def build(runs: Runs, tmp: Path) -> list[str]:
        cache = tmp / "cache"
        shutil.copytree(runs.folder / "cache", cache)
        change(cache / "word")
        return runs.lm(None, "--data.cache_dir", str(cache))

    return build


def folder_for_bin(word: Path) -> None:
    (word / "train.bin").unlink()
    (word / "train.bin").mkdir()


def damaged_shard(kind: str) -> Callable[[Runs, Path], list[str]]:
    def build(runs: Runs, tmp: Path) -> list[str]:
        folder = sharded_folder(tmp)
        shard = next(folder.glob("*.distcp"))
        if kind == "missing":
            shard.unlink()
        else:
            truncate(shard)
        return ["consolidate", str(folder), str(tmp / "out.ckpt")]

    return build


def edited_study_result(runs: Runs, tmp: Path) -> list[str]:
    from qkv_lightning.study.safety import MARKER, task_identity

    output = tmp / "old-study"
    cell = output / "runs" / "QKV" / "seed0"
    cell.mkdir(parents=True)
    task = CONFIGS / "synthetic" / "reverse.yaml"
    (output / MARKER).write_text(f'{{"task": "{task_identity(str(task))}"}}')
    (cell / "result.json").write_text('{"variant": "QKV", "seed": 0, "status": "ok", "metrics": "edited"}')
    return study("--output", str(output))(runs, tmp)


def predict_into_a_folder(runs: Runs, tmp: Path) -> list[str]:
    (tmp / "a-folder").mkdir()
    return ["predict", *lm_args(runs.folder, runs.wikitext), "--ckpt_path", str(runs.checkpoint("lm")),
            "--model.generation.output_file", str(tmp / "a-folder")]


def study_over_a_user_folder(runs: Runs, tmp: Path) -> list[str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "results.csv").write_text("the user's table")
    return study("--output", str(tmp / "mine"))(runs, tmp)


def edited_checkpoint(key: str, value: object) -> Callable[[Runs, Path], list[str]]:
    def build(runs: Runs, tmp: Path) -> list[str]:
        path, checkpoint = checkpoint_copy(runs, tmp)
        checkpoint[key] = value
        torch.save(checkpoint, path)
        return runs.synthetic("--ckpt_path", str(path), command="validate")

    return build


def locked_by_a_folder(runs: Runs, tmp: Path) -> list[str]:
    from qkv_lightning.study.safety import LOCK, MARKER, task_identity

    output = tmp / "old-study"
    (output / LOCK).mkdir(parents=True)  # a folder where the study's lock file goes
    (output / MARKER).write_text(f'{{"task": "{task_identity(str(CONFIGS / "synthetic" / "reverse.yaml"))}"}}')
    return study("--output", str(output))(runs, tmp)


def gpt2_folder(tmp: Path, **changes: object) -> Path:
    """A Hugging Face GPT-2 folder whose config.json has ``changes`` (its weights file is never read: the config is
    refused first)."""
    import json

    folder = tmp / "gpt2"
    folder.mkdir()
    config = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 16, "n_embd": 16, "n_layer": 1, "n_head": 2,
              "resid_pdrop": 0.1, "layer_norm_epsilon": 1e-5, **changes}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"never read")
    return folder


def ranks_with_a_gap(runs: Runs, tmp: Path) -> list[str]:
    import base64

    ranks = tmp / "gap.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b if b < 5 else b + 1}\n" for b in range(256)))
    return ["fit", *lm_args(tmp, runs.wikitext), "--data.tokenizer", "gpt2", "--data.bpe_file", str(ranks)]


def convert_fit_with_a_list_config(runs: Runs, tmp: Path) -> list[str]:
    checkpoints = tmp / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(runs.checkpoint("synthetic"), checkpoints / "last.ckpt")
    (tmp / "run" / "config.yaml").write_text("- model\n- data\n")
    return ["convert", str(checkpoints / "last.ckpt"), str(tmp / "out.ckpt"), "--sharing", "Q-K=V", "--method", "fit"]


CASES += [
    Case("checkpoint whose hyper-parameters are a string", edited_checkpoint("hyper_parameters", "a string"),
         "its hyper_parameters is a str, not a mapping of settings"),
    Case("checkpoint whose state_dict is a list", edited_checkpoint("state_dict", [1, 2]),
         "its state_dict is a list, not a mapping of parameter names to tensors"),
    Case("export into a file",
         lambda r, t: (t / "a-file").write_text("x")
         and ["export", "--ckpt_path", str(r.checkpoint("lm")), "--out", str(t / "a-file")],
         "is a file; name a folder"),
    Case("study lock that is a folder", locked_by_a_folder, "is a folder, not a file this tool wrote"),
    Case("GPT-2 config with a dropout that is no number",
         lambda r, t: ["import", str(gpt2_folder(t, resid_pdrop="abc")), str(t / "gpt2.ckpt")],
         "resid_pdrop='abc' cannot be imported: it must be a finite number"),
    Case("quantized GPT-2 folder",
         lambda r, t: ["import", str(gpt2_folder(t, quantization_config={"load_in_8bit": True})),
                       str(t / "gpt2.ckpt")],
         "quantization_config={'load_in_8bit': True} cannot be imported"),
    Case("BPE ranks file with a gap", ranks_with_a_gap, "but rank 5 is missing or repeated"),
    Case("optimizer argument the optimizer refuses",
         lambda r, t: ["fit", *synthetic_args(t), "--optimizer", "SGD", "--optimizer.momentum", "-1"],
         "SGD refuses these settings (Invalid momentum value: -1.0)"),
    Case("convert --method fit with a run config that is a list", convert_fit_with_a_list_config,
         "holds a YAML list, not the mapping of settings of a fit config"),
    Case("bench on a GPU this machine lacks",
         lambda r, t: ["bench", "--config", str(CONFIGS / "synthetic" / "reverse.yaml"), "--device", "cuda:64"],
         "--device cuda:64: this machine has"),
]

CASES += [
    Case("YAML alias bomb", lambda r, t: r.synthetic("--config", yaml_file(t, ALIAS_BOMB)),
         "expands to more than 100,000 YAML nodes"),
    Case("CIFAR batch claiming a huge bytes object", damaged_cifar(huge_bytes_claim), "is truncated or corrupted"),
    Case("NaN learning rate", lambda r, t: r.synthetic("--model.init_args.optimizer.lr", ".nan"),
         "optimizer.lr=nan must be positive"),
    Case("NaN eps", lambda r, t: r.synthetic("--model.init_args.optimizer.eps", ".nan"),
         "optimizer.eps=nan must be a finite number >= 0"),
    Case("NaN betas",
         lambda r, t: r.synthetic("--config", yaml_file(t, NAN_BETAS)),
         "optimizer.betas=[nan, 0.95] must be two numbers in [0, 1)"),
    Case("NaN generation temperature", lambda r, t: r.lm(None, "--model.generation.temperature", ".nan"),
         "generation.temperature=nan must be a finite number >= 0"),
    Case("no gradient accumulation", lambda r, t: r.synthetic("--trainer.accumulate_grad_batches", "0"),
         "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    Case("validation interval 0", lambda r, t: r.synthetic("--trainer.val_check_interval", "0"),
         "trainer.val_check_interval=0 must be positive"),
    Case("seed beyond 2^32", lambda r, t: r.synthetic("--seed_everything", str(2**32)),
         "seed_everything=4294967296 must lie in [0, 4294967295]"),
    Case("evaluation batch size 0", lambda r, t: r.vit(None, "--data.eval_batch_size", "0"),
         "data.eval_batch_size=0 must be at least 1"),
    Case("study output that is a file",
         lambda r, t: (t / "a-file").write_text("x") and study("--output", str(t / "a-file"))(r, t),
         "is a file, not a folder"),
    Case("study output that is not a study", study_over_a_user_folder, "is not a study folder"),
    Case("edited study result", edited_study_result, "was edited or damaged: its field 'metrics'"),
    Case("predict output that is a folder", predict_into_a_folder, "is a folder; name a file"),
    Case("cache metadata that is not a mapping",
         changed_cache(lambda w: (w / "train.json").write_text("[1, 2, 3]")), "holds a JSON list, not the mapping"),
    Case("token cache that is a folder", changed_cache(folder_for_bin), "is a folder, not a file"),
    Case("sharded checkpoint with a missing shard", damaged_shard("missing"), "is missing its shard"),
    Case("sharded checkpoint with a truncated shard", damaged_shard("truncated"), "is truncated ("),
]



# ------------------------------------------------------------------------- a model's own tokenizer (data.tokenizer: hf)
def bpe_tokenizer(runs: Runs, path: Path, **kwargs: object) -> Path:
    """A real tokenizer.json: a byte-level BPE of 300 tokens trained on the finished language model's text."""
    lines = (runs.wikitext / "wiki.train.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
    train_bpe(path, lines, **kwargs)
    return path


def no_start_token(runs: Runs, path: Path) -> None:
    """A tokenizer.json with neither a BOS added by its post-processor nor any special token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"the": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def hf_tokenizer(name: str, write: Callable[[Runs, Path], object], *extra: str) -> Callable[[Runs, Path], list[str]]:
    """``fit --ckpt_path last`` of the language model with ``data.tokenizer: hf`` and the file ``name`` that ``write``
    makes as its ``data.tokenizer_file``."""

    def build(runs: Runs, tmp: Path) -> list[str]:
        path = tmp / name
        write(runs, path)
        return runs.lm(None, "--data.cache_dir", str(tmp / "cache"), "--data.tokenizer", "hf",
                       "--data.tokenizer_file", str(path), *extra)

    return build


def tokenizer_checkpoint(entry: object) -> Callable[[Runs, Path], None]:
    """A checkpoint (``torch.save``) whose tokenizer entry is ``entry`` (none where it is None)."""

    def write(runs: Runs, path: Path) -> None:
        torch.save({"state_dict": {}, **({CHECKPOINT_ENTRY: entry} if entry is not None else {})}, path)

    return write


def stored_tokenizer(ids: object = None, trained_with: str | None = None) -> Callable[[Runs, Path], None]:
    """A checkpoint storing a real tokenizer (the BPE's tokenizer.json) with special token ids ``ids``, whose model
    was trained with the tokenizer ``trained_with`` (its ``hyper_parameters.data_spec.tokenizer``)."""

    def write(runs: Runs, path: Path) -> None:
        text = bpe_tokenizer(runs, path.with_suffix(".json")).read_text(encoding="utf-8")
        entry = {"format": "huggingface-tokenizers", "json": text, **({"special_token_ids": ids} if ids else {})}
        spec = {"hyper_parameters": {"data_spec": {"tokenizer": trained_with}}} if trained_with else {}
        torch.save({"state_dict": {}, CHECKPOINT_ENTRY: entry, **spec}, path)

    return write


def word_data_for_a_stored_tokenizer(runs: Runs, tmp: Path) -> list[str]:
    """``predict`` with the word-level config of the language model's checkpoint, copied with a stored tokenizer that
    its model is recorded to be trained with (as import, fit with data.tokenizer: hf, and convert write it)."""
    from qkv_lightning.data.hf_tokenizer import HFTokenizer

    tokenizer = HFTokenizer.from_file(bpe_tokenizer(runs, tmp / "tokenizer.json"))
    checkpoint = torch.load(runs.checkpoint("lm"), weights_only=True)
    checkpoint[CHECKPOINT_ENTRY] = tokenizer.checkpoint_entry()
    checkpoint["hyper_parameters"]["data_spec"]["tokenizer"] = tokenizer.identity
    torch.save(checkpoint, tmp / "m.ckpt")
    return ["predict", *lm_args(tmp, runs.wikitext), "--ckpt_path", str(tmp / "m.ckpt"),
            "--model.generation.output_file", str(tmp / "out.jsonl")]


def larger_vocabulary(runs: Runs, tmp: Path) -> list[str]:
    tokenizer = bpe_tokenizer(runs, tmp / "tokenizer.json")
    return ["fit", *lm_args(tmp, runs.wikitext), "--data.tokenizer", "hf", "--data.tokenizer_file", str(tokenizer),
            "--model.network.vocab_size", "100"]


def streaming_tokenizer_missing(runs: Runs, tmp: Path) -> list[str]:
    write_corpus(tmp / "corpus", 4)
    return ["fit", "--config", str(CONFIGS / "lm" / "streaming.yaml"), *streaming_data_args(tmp / "corpus"),
            "--trainer.default_root_dir", str(tmp), "--trainer.logger", "false", "--trainer.accelerator", "cpu",
            "--trainer.precision", "32", "--model.network.n_layer", "1", "--model.network.n_head", "2",
            "--model.network.d_model", "16", "--model.network.d_mlp", "32", "--model.network.max_seq_len", "8",
            "--data.tokenizer", "hf", "--data.tokenizer_file", str(tmp / "nothere.json")]


CASES += [
    Case("missing tokenizer file", hf_tokenizer("nothere.json", lambda r, p: None),
         "is not a file; name a tokenizer.json, or a checkpoint written by import"),
    Case("tokenizer file that is not JSON", hf_tokenizer("t.json", lambda r, p: p.write_text("{ not json")),
         "(data.tokenizer_file) is not JSON ("),
    Case("tokenizer file holding a JSON list", hf_tokenizer("t.json", lambda r, p: p.write_text("[1, 2]")),
         "(data.tokenizer_file) holds a JSON list, not a tokenizer object"),
    Case("tokenizer file the tokenizers library cannot read",
         hf_tokenizer("t.json", lambda r, p: p.write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')),
         "the tokenizers library cannot read the tokenizer"),
    Case("tokenizer file not UTF-8", hf_tokenizer("t.json", lambda r, p: p.write_bytes(b"\xff\xfe\xfa broken")),
         "as UTF-8 text ('utf-8' codec can't decode"),
    Case("tokenizer without a start token", hf_tokenizer("t.json", no_start_token),
         "adds no BOS and has no special token (such as <|endoftext|>)"),
    Case("tokenizer checkpoint storing no tokenizer", hf_tokenizer("m.ckpt", tokenizer_checkpoint(None)),
         "(data.tokenizer_file) stores no tokenizer"),
    Case("tokenizer checkpoint with an edited entry", hf_tokenizer("m.ckpt", tokenizer_checkpoint("a string")),
         "its qkv_tokenizer entry is not a stored tokenizer"),
    Case("tokenizer checkpoint whose tokenizer is no text",
         hf_tokenizer("m.ckpt", tokenizer_checkpoint({"format": "huggingface-tokenizers", "json": 7})),
         "is of type int, not the text of a tokenizer.json"),
    Case("tokenizer checkpoint that is no checkpoint", hf_tokenizer("m.ckpt", lambda r, p: p.write_text("notes")),
         "is read as a checkpoint (its name ends in .ckpt), and cannot be"),
    Case("tokenizer checkpoint holding code",
         hf_tokenizer("m.ckpt", tokenizer_checkpoint({"format": "huggingface-tokenizers", "json": RunsCode()})),
         "(data.tokenizer_file): the checkpoint holds Python objects other than tensors"),
    Case("tokenizer checkpoint whose special ids are no mapping", hf_tokenizer("m.ckpt", stored_tokenizer("bos")),
         "the special token ids of the tokenizer stored in the checkpoint"),
    Case("tokenizer checkpoint with a special id that is no id",
         hf_tokenizer("m.ckpt", stored_tokenizer({"bos_token_id": -1})), "bos_token_id=-1 is not a token id"),
    Case("tokenizer checkpoint whose tokenizer is not its model's",
         hf_tokenizer("m.ckpt", stored_tokenizer(trained_with="hf:0123456789abcdef")),
         "but its model was trained with hf:0123456789abcdef (hyper_parameters.data_spec.tokenizer)"),
    Case("hf tokenizer without a file", lambda r, t: r.lm(None, "--data.tokenizer", "hf"),
         "data.tokenizer: hf needs data.tokenizer_file"),
    Case("tokenizer file with another tokenizer",
         lambda r, t: r.lm(None, "--data.tokenizer", "gpt2", "--data.tokenizer_file", str(t / "tokenizer.json")),
         "is only read with data.tokenizer: hf (it is 'gpt2')"),
    Case("tokenizer larger than the model's vocabulary", larger_vocabulary,
         "model.network.vocab_size=100 is smaller than the data's vocabulary (300 tokens)"),
    Case("checkpoint of another tokenizer", hf_tokenizer("tokenizer.json", bpe_tokenizer),
         "the checkpoint was trained with tokenizer='word:"),
    Case("word data for a checkpoint that stores its tokenizer", word_data_for_a_stored_tokenizer,
         "stores the tokenizer its model was trained with (hf:"),
    Case("missing tokenizer file of streaming data", streaming_tokenizer_missing,
         "is not a file; name a tokenizer.json, or a checkpoint written by import"),
]

@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_its_documented_error_and_changes_no_run(case, runs, tmp_path, capsys):
    before = snapshot(runs.folder / "logs")
    capsys.readouterr()
    argv = case.build(runs, tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]  # one paragraph, last
    assert case.message in errors[0], errors[0]
    assert snapshot(runs.folder / "logs") == before  # no file of any run added, changed or removed
    assert not (tmp_path / "study").exists()


def test_bad_inputs_are_many_and_distinct():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)


def test_the_errors_reference_documents_every_error():
    text = ERRORS.read_text(encoding="utf-8")
    section = text[text.index("## Bad inputs and their messages") :]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    for case in CASES:
        assert any(case.id in row and case.message.replace("|", "\\|") in row for row in rows), case.id


def test_every_task_checkpoint_loads_weights_only(runs):
    """The CLI loads checkpoints with weights_only=True: every task's checkpoint must hold only plain types."""
    for run in ("synthetic", "lm", "vit"):
        checkpoint = torch.load(runs.checkpoint(run), weights_only=True)
        assert checkpoint["global_step"] > 0 and isinstance(checkpoint["hyper_parameters"], dict)


def test_a_save_past_the_file_size_limit_keeps_the_last_checkpoint_and_is_one_paragraph(tmp_path):
    """A checkpoint save that hits ``ulimit -f`` (as a full disk would) in a real process: exit code 2, one paragraph
    naming the checkpoint, no traceback; the previous ``last.ckpt`` is unchanged and no temporary file is left."""
    assert main(["fit", *synthetic_args(tmp_path, name="limited", steps=2)]) == 0
    (last,) = (tmp_path / "logs" / "limited").rglob("last.ckpt")
    before = hashlib.sha256(last.read_bytes()).hexdigest()
    blocks = last.stat().st_size // 2 // 1024  # ulimit -f counts 1024-byte blocks in bash
    command = ["bash", "-c", f'ulimit -f {blocks} && exec "$0" "$@"', sys.executable, str(ROOT / "cli.py"), "fit",
               *synthetic_args(tmp_path, name="limited", steps=4), "--ckpt_path", "last"]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(errors[0]) and "could not write the checkpoint" in errors[0], errors
    assert "file-size limit" in errors[0] and str(last.parent) in errors[0], errors
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert not list(last.parent.glob(".checkpoint-*")), sorted(p.name for p in last.parent.iterdir())


def test_export_into_a_file_is_refused_before_the_checkpoint_is_read(runs, tmp_path, capsys, monkeypatch):
    """``export --out FILE`` (graphs or ``--format hf``) is refused before anything is loaded or exported."""
    import qkv_lightning.export as export
    import qkv_lightning.interop.hf_gpt2 as hf_gpt2

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the export ran")

    monkeypatch.setattr(export, "load_gpt", never)
    monkeypatch.setattr(export, "load_gpt_checkpoint", never)  # the loader of --format hf
    monkeypatch.setattr(hf_gpt2, "main_export", never)
    (tmp_path / "a-file").write_text("mine")
    for extra in ([], ["--format", "hf"]):
        assert main(["export", "--ckpt_path", str(runs.checkpoint("lm")), "--out", str(tmp_path / "a-file"),
                     *extra]) == 2
        assert f"--out {tmp_path / 'a-file'} is a file" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"


def test_debug_shows_the_traceback(runs):
    with pytest.raises(Exception, match="must divide n_head=4"):
        main(runs.synthetic("--model.init_args.attention.n_kv_heads", "3", "--debug"))


def test_a_trusted_checkpoint_holding_objects_loads_with_weights_only_false(runs, tmp_path, monkeypatch):
    """``--weights_only false`` is the documented way to load a trusted checkpoint that holds Python objects."""
    path, checkpoint = checkpoint_copy(runs, tmp_path)
    checkpoint["extra"] = np.dtype("float32")  # harmless, but not a plain type
    torch.save(checkpoint, path)
    args = runs.synthetic("--ckpt_path", str(path), "--trainer.logger", "false", command="validate")
    assert main(args) == 2
    assert main([*args, "--weights_only", "false"]) == 0


def test_model_settings_replaced_by_a_checkpoint_are_reported(runs, tmp_path):
    """``--ckpt_path FILE`` takes the model settings saved in the checkpoint (Lightning's rule): a config that says
    otherwise is not overridden silently."""
    args = runs.synthetic("--ckpt_path", str(runs.checkpoint("synthetic")), "--model.init_args.optimizer.lr", "0.0001",
                          "--trainer.logger", "false", command="validate")
    with pytest.warns(UserWarning, match=r"model\.init_args\.optimizer\.lr: 0\.0001 -> 0\.003"):
        assert main(args) == 0


def test_token_cache_altered_in_place_is_caught_by_its_checksum_and_rebuilt(runs, tmp_path):
    """Same size, one bit flipped: only the recorded SHA-256 can tell; with rebuilding on it is rebuilt, not reused
    (test_wikitext covers changed sources and truncated caches)."""
    cache = tmp_path / "cache"
    base = lm_args(tmp_path, runs.wikitext, name="rebuilt") + ["--data.cache_dir", str(cache)]
    assert main(["fit", *base]) == 0
    token_file = cache / "word" / "val.bin"
    good = token_file.read_bytes()
    token_file.write_bytes(good[:2] + bytes([good[2] ^ 1]) + good[3:])
    assert main(["fit", *base]) == 0
    assert token_file.read_bytes() == good
