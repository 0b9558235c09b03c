"""A model's own Hugging Face tokenizer for the LM data (``data.tokenizer: hf``): tiny tokenizers trained by the
``tokenizers`` library in the test give the ids that library gives, a new vocabulary a new identity and cache, an
imported Llama folder's ``tokenizer.json`` is stored in its checkpoint and scores text as transformers' model does,
and malformed tokenizers are one-paragraph errors naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv_lightning.cli import main
from qkv_lightning.data.hf_tokenizer import CHECKPOINT_ENTRY, HFTokenizer
from qkv_lightning.data.wikitext import WikiText
from qkv_lightning.errors import ConfigError, DataError
from qkv_lightning.files import file_digest
from tests.lm_fixtures import train_bpe, train_words, validate_against, write_wikitext
from tests.run_fixtures import lm_args

tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.usefixtures("one_thread")


def module(tmp_path: Path, **kwargs) -> WikiText:
    defaults = dict(dataset="wikitext-2", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                    verify=False, seq_len=16, batch_size=4, num_workers=0, tokenizer="hf")
    return WikiText(**{**defaults, **kwargs})


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def cache_ids(dm: WikiText, split: str) -> np.ndarray:
    meta = dm.meta[split]
    return np.fromfile(dm.token_dir / f"{split}.bin", dtype=meta["dtype"])


def test_ids_are_those_of_the_tokenizers_library_line_by_line_after_its_bos(tmp_path):
    data = write_wikitext(tmp_path / "data")
    reference = train_bpe(tmp_path / "tokenizer.json", lines_of(data / "wiki.train.tokens"))
    bos = reference.token_to_id("<s>")
    dm = module(tmp_path, tokenizer_file=str(tmp_path / "tokenizer.json"))
    dm.prepare_data()
    dm.setup("fit")
    tokenizer = dm.load_tokenizer()
    assert tokenizer.boundary_id == bos and tokenizer.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert dm.token_dir == tmp_path / "cache" / tokenizer.identity.replace(":", "-")
    assert tokenizer.identity.startswith("hf:") and dm.meta["val"]["tokenizer"] == tokenizer.identity
    for split, name in (("train", "wiki.train.tokens"), ("val", "wiki.valid.tokens")):
        expected = [bos]  # the stream starts with the BOS the post-processor adds; no BOS or EOS per line
        for line in lines_of(data / name):
            expected += reference.encode(line, add_special_tokens=False).ids
        assert cache_ids(dm, split).tolist() == expected
        assert expected.count(bos) == 1
    assert reference.decode(expected[1:], skip_special_tokens=False) == (data / "wiki.valid.tokens").read_text()
    assert tokenizer.encode_prompt(" The song") == reference.encode(" The song", add_special_tokens=False).ids
    # without a BOS in the post-processor, the lowest-id special token (<|endoftext|>, GPT-2's and SmolLM2's) starts
    train_bpe(tmp_path / "plain.json", ["a b c"], bos=False)
    assert HFTokenizer.from_file(tmp_path / "plain.json").boundary_id == 0


def test_a_new_vocabulary_is_a_new_identity_and_cache_and_layout_or_truncation_are_not(tmp_path):
    data = write_wikitext(tmp_path / "data")
    lines = lines_of(data / "wiki.train.tokens")
    small = train_words(tmp_path / "small.json", lines[: len(lines) // 4])
    first = module(tmp_path, tokenizer_file=str(tmp_path / "small.json"))
    first.prepare_data()
    first.setup("validate")
    old = {path.name: file_digest(path) for path in first.token_dir.iterdir()}
    # the same tokenizer written with another layout and with truncation switched on: same identity, lines whole
    text = json.loads((tmp_path / "small.json").read_text())
    text["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "same.json").write_text(json.dumps(text, indent=4))
    same = HFTokenizer.from_file(tmp_path / "same.json")
    assert same.identity == first.load_tokenizer().identity
    line = max(lines_of(data / "wiki.valid.tokens"), key=len)
    assert len(same.encode_lines([line])[0]) == len(line.split()) > 2

    train_words(tmp_path / "large.json", lines)
    second = module(tmp_path, tokenizer_file=str(tmp_path / "large.json"))
    second.prepare_data()
    second.setup("validate")
    assert second.load_tokenizer().identity != first.load_tokenizer().identity
    assert second.token_dir != first.token_dir and second.meta["val"]["tokenizer"] == second.load_tokenizer().identity
    assert not np.array_equal(cache_ids(second, "val"), cache_ids(first, "val"))
    unk = small.token_to_id("[UNK]")
    assert (cache_ids(first, "val") == unk).sum() > (cache_ids(second, "val") == unk).sum()
    assert {path.name: file_digest(path) for path in first.token_dir.iterdir()} == old  # the old cache is kept
    # a cache recorded for another tokenizer is refused with rebuild_cache: false, rebuilt otherwise
    (second.token_dir / "val.json").write_text((first.token_dir / "val.json").read_text())
    with pytest.raises(DataError, match="tokenizer"):
        module(tmp_path, tokenizer_file=str(tmp_path / "large.json"), rebuild_cache=False).prepare_data()
    module(tmp_path, tokenizer_file=str(tmp_path / "large.json")).prepare_data()
    assert json.loads((second.token_dir / "val.json").read_text())["tokenizer"] == second.load_tokenizer().identity


def test_malformed_tokenizers_and_settings_are_one_paragraph_errors_naming_the_file(tmp_path, plain_argv, capsys):
    data = write_wikitext(tmp_path / "data")
    bad = {
        "not-json.json": "{ not json",
        "list.json": "[1, 2]",
        "unknown-model.json": json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}),
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as error:
            module(tmp_path, tokenizer_file=str(tmp_path / name)).prepare_data()
        assert str(tmp_path / name) in str(error.value) and "\n" not in str(error.value)
    train_words(tmp_path / "words.json", ["a b c"])
    good = HFTokenizer.from_file(tmp_path / "words.json").checkpoint_entry()
    assert HFTokenizer.from_checkpoint({CHECKPOINT_ENTRY: good}, "c").special_token_ids == good["special_token_ids"]
    for entry, named in ((None, "stores no tokenizer"), ({"format": "huggingface-tokenizers", "json": 7}, "int"),
                         ("a string", "not a stored tokenizer"),
                         ({**good, "special_token_ids": {"bos_token_id": "<s>"}}, "bos_token_id='<s>'"),
                         ({**good, "special_token_ids": {"eos_token_id": [2, -1]}}, "eos_token_id=[2, -1]"),
                         ({**good, "special_token_ids": [1, 2]}, "not a mapping")):
        torch.save({"state_dict": {}, **({CHECKPOINT_ENTRY: entry} if entry is not None else {})},
                   tmp_path / "m.ckpt")
        with pytest.raises(DataError) as error:
            HFTokenizer.from_file(tmp_path / "m.ckpt")
        assert str(tmp_path / "m.ckpt") in str(error.value) and "\n" not in str(error.value)
        assert named in str(error.value), error.value
    # a stored tokenizer that is not the one the checkpoint's model was trained with: refused, naming both
    torch.save({"state_dict": {}, "hyper_parameters": {"data_spec": {"tokenizer": "hf:0123456789abcdef"}},
                CHECKPOINT_ENTRY: good}, tmp_path / "m.ckpt")
    with pytest.raises(DataError, match="hf:0123456789abcdef") as error:
        HFTokenizer.from_file(tmp_path / "m.ckpt")
    assert HFTokenizer(good["json"], "t").identity in str(error.value)
    with pytest.raises(ConfigError, match="data.tokenizer_file"):
        module(tmp_path)
    with pytest.raises(ConfigError, match="data.tokenizer: hf"):
        module(tmp_path, tokenizer="gpt2", tokenizer_file=str(tmp_path / "list.json"))
    # through the CLI: exit 2, one paragraph, no traceback
    args = lm_args(tmp_path, data) + ["--data.tokenizer", "hf", "--data.tokenizer_file", str(tmp_path / "list.json")]
    capsys.readouterr()
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "list.json") in err and "Traceback" not in err


def test_an_imported_llama_stores_its_tokenizer_and_scores_text_as_transformers(tmp_path, plain_argv, capsys):
    """A tiny Llama saved with a tokenizer.json: import stores it; ``validate`` with the checkpoint as
    ``data.tokenizer_file`` reports transformers' cross-entropy on the same windows; other tokenizers are refused,
    and so is a tokenizer with more tokens than the model's vocabulary."""
    transformers = pytest.importorskip("transformers")
    data = write_wikitext(tmp_path / "data", {"wiki.train.tokens": 2, "wiki.valid.tokens": 2, "wiki.test.tokens": 1})
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(str(tmp_path / "hf"))
    train_bpe(tmp_path / "hf" / "tokenizer.json", lines_of(data / "wiki.valid.tokens"), vocab_size=280)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "m.ckpt")]) == 0
    assert "stored the model's own tokenizer" in capsys.readouterr().out
    stored = torch.load(tmp_path / "m.ckpt", weights_only=True, mmap=True)
    assert stored[CHECKPOINT_ENTRY]["json"] == (tmp_path / "hf" / "tokenizer.json").read_text()
    from_file = HFTokenizer.from_file(tmp_path / "hf" / "tokenizer.json")
    from_checkpoint = module(tmp_path, tokenizer_file=str(tmp_path / "m.ckpt")).load_tokenizer()
    assert from_checkpoint.identity == from_file.identity == stored["hyper_parameters"]["data_spec"]["tokenizer"]
    assert stored["hyper_parameters"]["data_spec"]["vocab_size"] == from_file.vocab_size <= 280

    args = lm_args(tmp_path, data) + ["--data.tokenizer", "hf", "--data.tokenizer_file", str(tmp_path / "m.ckpt"),
                                      "--trainer.limit_val_batches", "1.0", "--ckpt_path", str(tmp_path / "m.ckpt")]
    ours, theirs, count = validate_against(reference, args)
    assert count > 0 and ours == pytest.approx(theirs, rel=1e-5)
    word = lm_args(tmp_path, data, name="word") + ["--ckpt_path", str(tmp_path / "m.ckpt")]
    capsys.readouterr()
    assert main(["validate", *word]) == 2
    assert "tokenizer" in capsys.readouterr().err

    train_bpe(tmp_path / "hf" / "tokenizer.json", lines_of(data / "wiki.train.tokens"), vocab_size=400)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "big.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "more than the model's vocab_size 300" in err and not (tmp_path / "big.ckpt").exists()


def test_a_converted_checkpoint_keeps_the_imported_tokenizer(tmp_path, plain_argv, capsys):
    """``convert`` of an imported Llama (GQA-2 -> Q-K=V with 2 K/V heads) keeps the tokenizer that ``import`` stored,
    byte for byte, so the converted checkpoint alone scores text (``--data.tokenizer_file`` names it too)."""
    transformers = pytest.importorskip("transformers")
    data = write_wikitext(tmp_path / "data", {"wiki.train.tokens": 2, "wiki.valid.tokens": 2, "wiki.test.tokens": 1})
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "hf"))
    train_bpe(tmp_path / "hf" / "tokenizer.json", lines_of(data / "wiki.valid.tokens"), vocab_size=280)
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "m.ckpt")]) == 0
    converted = tmp_path / "q-gqa2.ckpt"
    assert main(["convert", str(tmp_path / "m.ckpt"), str(converted), "--sharing", "Q-K=V", "--n_kv_heads", "2"]) == 0
    stored = torch.load(converted, weights_only=True, mmap=True)
    assert stored[CHECKPOINT_ENTRY] == torch.load(tmp_path / "m.ckpt", weights_only=True, mmap=True)[CHECKPOINT_ENTRY]
    assert stored["hyper_parameters"]["attention"]["sharing"] == "Q-K=V"
    capsys.readouterr()
    args = lm_args(tmp_path, data) + ["--data.tokenizer", "hf", "--data.tokenizer_file", str(converted),
                                      "--ckpt_path", str(converted)]
    assert main(["validate", *args]) == 0
    assert "val/ppl" in capsys.readouterr().out


def test_a_tokenizer_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    """``data.tokenizer_file`` naming a checkpoint whose stored tokenizer entry unpickles into a call (``open(marker,
    'w')``): a plain ``torch.load`` would create the marker; the tokenizer is read weights-only and refused."""
    from qkv_lightning.errors import QKVError

    marker = tmp_path / "marker"

    class CreatesFile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    torch.save({CHECKPOINT_ENTRY: {"format": "huggingface-tokenizers", "json": CreatesFile()}}, evil)
    torch.load(evil, weights_only=False)  # control: the file really runs code when trusted
    assert marker.exists()
    marker.unlink()
    with pytest.raises(QKVError):
        HFTokenizer.from_file(evil)
    assert not marker.exists()


LLAMA_TRUNK = ["--model.network.norm", "rms", "--model.network.mlp", "swiglu", "--model.network.position", "rope",
               "--model.network.bias", "false", "--model.network.output", "linear"]
"""lm_args' tiny GPT with the Llama-style trunk, which export --format hf writes as a Llama folder."""


def test_a_fit_checkpoint_carries_its_tokenizer_to_predict_and_export(tmp_path, plain_argv, capsys):
    """``fit`` (2 steps, a tiny Llama-trunk GPT) with ``data.tokenizer: hf`` from a tokenizer.json stores that
    tokenizer in its checkpoint (weights-only loadable), with its boundary token as BOS and EOS; with the
    tokenizer.json gone, ``predict`` reads it from the checkpoint (``--data.tokenizer_file CKPT``) and its completions
    are the tokenizers library's decoding of the generated ids; ``export --format hf`` names the same BOS and EOS in
    ``config.json`` and ``generation_config.json`` as transformers reads them."""
    transformers = pytest.importorskip("transformers")
    data = write_wikitext(tmp_path / "data", {"wiki.train.tokens": 2, "wiki.valid.tokens": 1, "wiki.test.tokens": 1})
    reference = train_bpe(tmp_path / "tokenizer.json", lines_of(data / "wiki.train.tokens"))
    text, bos = (tmp_path / "tokenizer.json").read_text(), reference.token_to_id("<s>")
    args = lm_args(tmp_path, data) + ["--data.tokenizer", "hf", *LLAMA_TRUNK]
    assert main(["fit", *args, "--data.tokenizer_file", str(tmp_path / "tokenizer.json")]) == 0
    last = tmp_path / "logs" / "lm" / "version_0" / "checkpoints" / "last.ckpt"
    stored = torch.load(last, weights_only=True, mmap=True)
    assert stored[CHECKPOINT_ENTRY] == {"format": "huggingface-tokenizers", "json": text,
                                        "special_token_ids": {"bos_token_id": bos, "eos_token_id": bos,
                                                              "pad_token_id": None}}
    assert stored["hyper_parameters"]["data_spec"]["tokenizer"] == HFTokenizer(text, "t").identity
    (tmp_path / "tokenizer.json").unlink()

    out = tmp_path / "generated.jsonl"
    capsys.readouterr()
    assert main(["predict", *args, "--data.tokenizer_file", str(last), "--ckpt_path", str(last),
                 "--model.generation.output_file", str(out), "--model.generation.max_new_tokens", "6"]) == 0
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(generated) == 2 and all(len(g["ids"]) == 6 for g in generated), generated
    for g in generated:
        assert g["completion"] == reference.decode(g["ids"], skip_special_tokens=False), g
    assert sum(len(g["completion"]) for g in generated) > 0

    assert main(["export", "--ckpt_path", str(last), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert f"special tokens bos {bos}, eos {bos}, pad None" in capsys.readouterr().out
    config = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    for read in (config, generation):
        assert (read.bos_token_id, read.eos_token_id, read.pad_token_id) == (bos, bos, None)
