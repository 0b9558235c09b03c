"""The LitData streaming data module: rows equal a direct tokenization (text, JSONL, Parquet; packed and padded), a
fixed validation slice, exact resume after ``kill -9`` of a real fit, and 2-process DDP sharding (every row once).

The files are written by the tests; the tokenizer is GPT-2's BPE code on a ranks file of the 256 single bytes, so a
document's ids are its UTF-8 bytes and ``<|endoftext|>`` is 256.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("litdata")

from qkv_lightning.cli import main  # noqa: E402
from qkv_lightning.data.streaming import StreamingText, to_sample  # noqa: E402
from qkv_lightning.errors import DataError  # noqa: E402
from tests.run_fixtures import CONFIGS, run_settings, subprocess_env, write_yaml  # noqa: E402
from tests.streaming_support import (  # noqa: E402
    documents,
    read_batches,
    streaming_data_args,
    write_byte_ranks,
    write_corpus,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parent.parent
EOT = 256


def corpus(folder: Path, seed: int = 0) -> dict[str, list[str]]:
    """A JSONL, a text, a Parquet and a zstd-compressed JSONL file; returns each file's documents."""
    rng = random.Random(seed)
    texts = {"a.jsonl": documents(rng, 9), "b.txt": documents(rng, 7), "c.parquet": documents(rng, 5, 20, 30),
             "d.jsonl.zst": documents(rng, 3)}
    write_jsonl(folder / "a.jsonl", texts["a.jsonl"])
    import zstandard

    plain = write_jsonl(folder / "d.jsonl", texts["d.jsonl.zst"]).read_bytes()
    (folder / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))  # SlimPajama's format
    (folder / "d.jsonl").unlink()
    (folder / "b.txt").write_text("".join(f"{t}\n\n" for t in texts["b.txt"]), encoding="utf-8")  # blank lines skipped
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts["c.parquet"], "n": list(range(5))}), folder / "c.parquet")
    return texts


def direct_rows(texts: list[str], seq_len: int, mode: str) -> list[tuple[list[int], int]]:
    """The rows of ``texts`` built by hand: bytes, then ``<|endoftext|>``; packed windows or one padded row each."""
    docs = [list(t.encode("utf-8")) + [EOT] for t in texts]
    if mode == "padded":
        return [(([EOT] + d + [EOT] * seq_len)[: seq_len + 1], min(len(d), seq_len)) for d in docs]
    stream = [EOT] + [i for d in docs for i in d]
    return [(stream[k * seq_len : k * seq_len + seq_len + 1], seq_len) for k in range((len(stream) - 1) // seq_len)]


def stored_rows(dataset) -> list[tuple[list[int], int]]:
    return [(list(map(int, row)), int(n)) for row, n in (dataset[i] for i in range(len(dataset)))]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_rows_equal_a_direct_tokenization_and_the_validation_slice_is_carved_by_tokens(tmp_path, mode):
    texts = corpus(tmp_path)
    ranks = write_byte_ranks(tmp_path / "bytes.tiktoken")
    seq_len, val_tokens = 16, 100
    dm = StreamingText(
        train_files=[str(tmp_path / "a.jsonl"), str(tmp_path / "*.txt"), str(tmp_path / "c.parquet"),
                     str(tmp_path / "d.jsonl.zst")],
        cache_dir=str(tmp_path / "cache"), bpe_file=str(ranks), seq_len=seq_len, document_mode=mode,
        val_tokens=val_tokens, batch_size=2, num_workers=0,
    )
    dm.prepare_data()
    dm.setup("fit")
    # the validation slice: the first whole documents of a.jsonl holding at least val_tokens tokens
    counted = [min(len(t) + 1, seq_len) if mode == "padded" else len(t) + 1 for t in texts["a.jsonl"]]
    n_val = next(k for k in range(1, 10) if sum(counted[:k]) >= val_tokens)
    assert n_val < len(texts["a.jsonl"]) and dm.meta["val_tokens"] == sum(counted[:n_val])
    val = dm.datasets["val"].dataset
    assert stored_rows(val) == direct_rows(texts["a.jsonl"][:n_val], seq_len, mode)
    # training: the rest of a.jsonl, then b.txt and c.parquet (packed within each file), in any order
    expected = (direct_rows(texts["a.jsonl"][n_val:], seq_len, mode) + direct_rows(texts["b.txt"], seq_len, mode)
                + direct_rows(texts["c.parquet"], seq_len, mode) + direct_rows(texts["d.jsonl.zst"], seq_len, mode))
    train = dm._dataset(dm.folder() / "train", shuffle=False)
    assert sorted(stored_rows(train)) == sorted(expected)
    # samples: (inputs, targets) packed; (inputs, targets, padding) padded, padding after the document's tokens
    row, n = expected[-1] if mode == "packed" else min(expected, key=lambda r: r[1])
    sample = to_sample((row, n), padded=mode == "padded")
    assert sample[0].tolist() == row[:-1] and sample[1].tolist() == row[1:]
    if mode == "padded":
        assert n < seq_len and sample[2].tolist() == [i >= n for i in range(seq_len)]
    else:
        assert len(sample) == 2
    # a second prepare reuses the dataset; a changed source makes a new one
    index = dm.folder() / "train" / "index.json"
    stamp = index.stat().st_mtime_ns
    again = StreamingText(**{**dm.hparams})
    again.prepare_data()
    assert again.folder() == dm.folder() and index.stat().st_mtime_ns == stamp
    write_jsonl(tmp_path / "a.jsonl", texts["a.jsonl"][:-1])
    assert StreamingText(**{**dm.hparams}).folder() != dm.folder()


def test_no_files_is_a_data_error(tmp_path):
    dm = StreamingText(train_files=[str(tmp_path / "*.jsonl")], cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="data.train_files"):
        dm.prepare_data()


# ------------------------------------------------------------------------------------------- real runs (CLI)
def streaming_args(folder: Path, data: Path, name: str, steps: int, *extra: str) -> list[str]:
    """configs/lm/streaming.yaml at tiny sizes on the JSONL files in ``data``; every training batch recorded."""
    run = write_yaml(folder / f"{name}-run.yaml", run_settings(folder, name, every=2))
    return [
        "--config", str(CONFIGS / "lm" / "streaming.yaml"), "--config", str(run), *streaming_data_args(data),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "2", "--trainer.accumulate_grad_batches", "1",
        "--model.network.n_layer", "1", "--model.network.n_head", "2", "--model.network.d_model", "16",
        "--model.network.d_mlp", "32", "--model.network.max_seq_len", "8", "--model.network.vocab_size", "320",
        "--model.optimizer.warmup_steps", "2",
        "--trainer.callbacks+=tests.streaming_support.RecordBatches", "--trainer.callbacks.out", str(folder / name),
        *extra,
    ]


@pytest.mark.slow
def test_resume_after_kill_9_of_a_real_fit_reproduces_the_uninterrupted_batches(tmp_path):
    data = tmp_path / "data"
    write_corpus(data, 30)
    steps = 8
    assert main(["fit", *streaming_args(tmp_path, data, "reference", steps)]) == 0
    reference = read_batches(tmp_path / "reference")
    assert sorted(reference) == list(range(steps))

    # the same command in a subprocess, killed with SIGKILL after its 5th step (last.ckpt: step 4, mid-epoch)
    kill = ("--trainer.callbacks+=tests.distributed_support.KillAt", "--trainer.callbacks.step=5")
    command = [sys.executable, str(ROOT / "cli.py"), "fit", *streaming_args(tmp_path, data, "killed", steps, *kill)]
    with open(tmp_path / "killed.txt", "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    assert code == -signal.SIGKILL, (tmp_path / "killed.txt").read_text()[-3000:]
    killed = read_batches(tmp_path / "killed")
    assert sorted(killed) == list(range(5)) and all(killed[s] == reference[s] for s in killed)
    (last,) = (tmp_path / "logs" / "killed").rglob("last.ckpt")

    import torch

    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4
    state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["num_samples_yielded"] == 4 * 2  # LitData's loader position: 4 batches of 2

    resumed_args = streaming_args(tmp_path, data, "resumed", steps)
    resumed_args[resumed_args.index(str(tmp_path / "resumed-run.yaml"))] = str(tmp_path / "killed-run.yaml")
    assert main(["fit", *resumed_args, "--ckpt_path", "last"]) == 0
    resumed = read_batches(tmp_path / "resumed")
    assert sorted(resumed) == list(range(4, steps))
    assert all(resumed[s] == reference[s] for s in resumed)  # the batches the uninterrupted run saw next


@pytest.mark.slow
def test_two_process_ddp_sees_every_training_row_exactly_once(tmp_path):
    data = tmp_path / "data"
    write_corpus(data, 8)  # padded: one row per document, 16 rows = 2 processes x 4 steps x 2
    extra = ("--config", str(CONFIGS / "strategy" / "ddp.yaml"), "--trainer.accelerator", "cpu",
             "--trainer.devices", "2", "--data.document_mode", "padded", "--trainer.max_epochs", "1")
    args = streaming_args(tmp_path, data, "ddp", -1, *extra)
    args[args.index("--trainer.val_check_interval") + 1] = "4"  # the end of the epoch: 4 steps per process
    command = [sys.executable, str(ROOT / "cli.py"), "fit", *args]
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    seen = [row for rank in (0, 1) for rows in read_batches(tmp_path / "ddp", rank).values() for row in rows]
    dm = StreamingText(train_files=[str(data / "train-*.jsonl")], val_files=[str(data / "val.jsonl")],
                       cache_dir=str(data / "cache"), bpe_file=str(data / "bytes.tiktoken"), seq_len=8,
                       document_mode="padded", val_tokens=20)
    every = [row[:-1] for row, _ in stored_rows(dm._dataset(dm.folder() / "train", shuffle=False))]
    assert len(every) == 16 and len({tuple(r) for r in every}) == 16  # distinct rows
    assert len(seen) == 16 and sorted(seen) == sorted(every)  # each exactly once over both processes
    assert all(len(read_batches(tmp_path / "ddp", rank)) == 4 for rank in (0, 1))
    # validation over both processes scores every document token of the slice once (exact perplexity)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "logs" / "ddp").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    val_rows = stored_rows(dm._dataset(dm.folder() / "val", shuffle=False))
    assert scalars.Scalars("val/tokens")[-1].value == sum(n for _, n in val_rows)
    assert scalars.Scalars("val/tokens_with_padding")[-1].value == 8 * len(val_rows)


def test_a_hugging_face_tokenizer_makes_rows_of_its_ids_in_a_dataset_of_its_own(tmp_path):
    """``data.tokenizer: hf``: documents encoded by the ``tokenizers`` library without special tokens, each followed
    by the tokenizer's boundary (its lowest-id special token here); another tokenizer is another dataset."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    rng = random.Random(0)
    texts, val = documents(rng, 12), documents(rng, 3)
    write_jsonl(tmp_path / "train.jsonl", texts)
    write_jsonl(tmp_path / "val.jsonl", val)
    reference = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    reference.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    reference.train_from_iterator(texts[:1], trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "[UNK]"]))
    reference.save(str(tmp_path / "tokenizer.json"))
    settings = dict(train_files=[str(tmp_path / "train.jsonl")], val_files=[str(tmp_path / "val.jsonl")],
                    cache_dir=str(tmp_path / "cache"), seq_len=8, val_tokens=1000, batch_size=2, num_workers=0)
    dm = StreamingText(**settings, tokenizer="hf", tokenizer_file=str(tmp_path / "tokenizer.json"))
    dm.prepare_data()
    dm.setup("fit")
    stream = [0]
    for text in texts:
        stream += reference.encode(text, add_special_tokens=False).ids + [0]
    expected = [(stream[k * 8 : k * 8 + 9], 8) for k in range((len(stream) - 1) // 8)]
    assert 1 in stream  # [UNK]: words the tokenizer was not trained on
    assert sorted(stored_rows(dm._dataset(dm.folder() / "train", shuffle=False))) == sorted(expected)
    assert dm.meta["tokenizer"] == dm.load_tokenizer().identity
    write_byte_ranks(tmp_path / "bytes.tiktoken")
    assert StreamingText(**settings, bpe_file=str(tmp_path / "bytes.tiktoken")).folder() != dm.folder()
