"""WikiText data: tokenizers, token caches (built once, rebuilt on change, checked), exact evaluation windows,
the offline split arrangement, downloads and every kind of bad input."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import pickle
import shutil
import threading
import zipfile
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from qkv_lightning.data import wikitext
from qkv_lightning.data.token_cache import ARTICLE_HEADING, FileInfo, SplitSource, build_token_cache, scan_file
from qkv_lightning.data.token_datasets import DocumentRows, TokenWindows
from qkv_lightning.data.tokenizers import EOS, UNK, BPETokenizer, WordTokenizer
from qkv_lightning.data.wikitext import WikiText
from qkv_lightning.data.wikitext_release import OFFICIAL
from qkv_lightning.errors import ConfigError, DataError
from qkv_lightning.files import temporary_prefix
from qkv_lightning.nn.gpt import IGNORE_INDEX
from tests.lm_fixtures import GPT2_RANKS, WIKITEXT2, word_count, write_wikitext

needs_shared = pytest.mark.skipif(not WIKITEXT2.is_dir(), reason="shared offline WikiText-2 files not present")
needs_ranks = pytest.mark.skipif(not GPT2_RANKS.is_file(), reason="shared GPT-2 ranks file not present")


def module(tmp_path, **kwargs) -> WikiText:
    defaults = dict(
        dataset="wikitext-2", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), verify=False,
        seq_len=16, batch_size=4, num_workers=0,
    )
    return WikiText(**{**defaults, **kwargs})


# ----------------------------------------------------------------------------------------------------- tokenizers
def test_word_vocabulary_is_frequency_sorted_with_eos_and_unk():
    lines = [" the cat <unk> the \n", " \n", " a cat the \n"]
    tokenizer = WordTokenizer.build(lines)
    assert tokenizer.words[:3] == ["the", EOS, "cat"]  # 3, 3 (ties keep first appearance), 2
    assert UNK in tokenizer.index and tokenizer.vocab_size == 5
    ids = tokenizer.encode_lines([" the dog <unk> \n"])[0]
    assert ids == [tokenizer.index["the"], tokenizer.unk_id, tokenizer.unk_id, tokenizer.eos_id]
    assert tokenizer.unknown == 1  # "dog"; the literal <unk> is a word of the vocabulary
    assert tokenizer.decode(tokenizer.encode_lines(lines)[0] + tokenizer.encode_lines(lines)[2]) == (
        "the cat <unk> the\na cat the\n"
    )


def test_word_vocabulary_round_trips_through_a_file(tmp_path):
    tokenizer = WordTokenizer.build([" b a b c \n"])
    tokenizer.save(tmp_path / "vocab.txt")
    loaded = WordTokenizer.load(tmp_path / "vocab.txt")
    assert loaded.words == tokenizer.words and loaded.identity == tokenizer.identity
    assert WordTokenizer.build([" c a b b \n"]).identity != tokenizer.identity  # other order, other ids


@needs_ranks
def test_local_gpt2_ranks_equal_tiktoken_gpt2(tmp_path, monkeypatch):
    """The offline ranks file gives GPT-2's ids; tiktoken's own 'gpt2' (read from its cache here) agrees."""
    local = BPETokenizer.from_ranks_file(GPT2_RANKS)
    assert local.vocab_size == 50257 and local.boundary_id == 50256
    assert local.encode_prompt(" Hello world") == [18435, 995]  # GPT-2's well-known ids
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    gpt2 = GPT2_RANKS.parent
    for name, target in (("encoder.json", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"),
                         ("vocab.bpe", "6d1cbeee0f20b3d9449abfede4726ed8212e3aee")):
        shutil.copy(gpt2 / name, cache / target)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    official = BPETokenizer.from_tiktoken("gpt2")
    text = [" = Valkyria Chronicles III = \n", " Senjō no Valkyria 3 : it 's 1 @,@ 000 km \n", " \n"]
    assert local.encode_lines(text) == official.encode_lines(text)
    assert local.identity == official.identity
    assert local.decode(local.encode_lines(text)[1]) == text[1]


def test_missing_ranks_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="data.bpe_file"):
        BPETokenizer.from_ranks_file(tmp_path / "nope.tiktoken")


# --------------------------------------------------------------------------------------------------------- windows
def arange_file(tmp_path, n: int) -> tuple:
    path = tmp_path / "tokens.bin"
    np.arange(n, dtype=np.uint16).tofile(path)
    return path, n


@pytest.mark.parametrize(("n", "seq_len", "stride", "pad_to"), [(101, 10, 10, 1), (101, 10, 3, 4), (57, 8, 8, 3),
                                                                 (33, 8, 1, 2), (9, 8, 8, 2), (6, 8, 4, 1)])
def test_evaluation_windows_score_every_target_exactly_once(tmp_path, n, seq_len, stride, pad_to):
    path, n = arange_file(tmp_path, n)  # token i has id i, so a target's id is its position
    windows = TokenWindows(path, n, np.uint16, seq_len, stride=stride, pad_to=pad_to)
    assert len(windows) % pad_to == 0
    everything, per_rank = [], []
    for rank in range(pad_to):  # what each process of a DDP run gets from Lightning's DistributedSampler
        sampler = DistributedSampler(windows, num_replicas=pad_to, rank=rank, shuffle=False)
        per_rank.append(len(list(sampler)))
        for i in sampler:
            inputs, targets = windows[i]
            assert torch.equal(inputs, torch.arange(inputs[0], inputs[0] + len(inputs)))  # contiguous tokens
            keep = targets != IGNORE_INDEX
            assert torch.equal(targets[keep], inputs[keep] + 1)  # each target follows its input
            everything += targets[keep].tolist()
    assert len(set(per_rank)) == 1  # every process gets as many windows (no process waits for the others)
    assert sorted(everything) == list(range(1, n))  # every target exactly once; the boundary token never


def test_sliding_windows_give_each_scored_target_at_least_the_stride_of_context(tmp_path):
    path, n = arange_file(tmp_path, 200)
    windows = TokenWindows(path, n, np.uint16, 32, stride=8)
    for i in range(1, windows.n_windows):
        inputs, targets = windows[i]
        scored_positions = (targets != IGNORE_INDEX).nonzero().flatten()
        assert scored_positions.min() >= 32 - 8  # only the last `stride` positions, each with >= 24 tokens before


def test_training_windows_are_contiguous_seq_len_plus_one_tokens(tmp_path):
    path, n = arange_file(tmp_path, 103)
    windows = TokenWindows(path, n, np.uint16, 10)
    assert len(windows) == 10  # (103 - 1) // 10
    for i in range(len(windows)):
        inputs, targets = windows[i]
        assert inputs.tolist() == list(range(10 * i, 10 * i + 10))
        assert targets.tolist() == list(range(10 * i + 1, 10 * i + 11))
    with pytest.raises(DataError, match="data.seq_len"):
        TokenWindows(path, n, np.uint16, 200)


@pytest.mark.parametrize("kind", ["windows", "documents"])
def test_a_pickled_dataset_leaves_its_memory_map_behind_and_maps_the_file_again(tmp_path, kind):
    """What a spawned data-loading worker gets: the dataset without the tokens it has mapped (40 kB here), which
    gives the same items from its own map."""
    path, n = arange_file(tmp_path, 20_000)
    if kind == "windows":
        dataset = TokenWindows(path, n, np.uint16, 16)
    else:
        dataset = DocumentRows(path, n, np.uint16, [1, 7_000, 12_000], 16, boundary_id=0)
    items = [dataset[i] for i in (0, 2)]  # maps the file
    pickled = pickle.dumps(dataset)
    assert len(pickled) < 4_000, len(pickled)
    copy = pickle.loads(pickled)
    for i, item in zip((0, 2), items, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(copy[i], item, strict=True))


# ---------------------------------------------------------------------------------------------------------- caches
def test_tokenization_does_not_depend_on_the_chunk_size(tmp_path):
    data = write_wikitext(tmp_path / "data")
    source = SplitSource(data / "wiki.train.tokens")
    info = scan_file(source.path)
    tokenizer = WordTokenizer.build(open(source.path, encoding="utf-8"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    big = build_token_cache(source, info, tokenizer, tmp_path / "a" / "train")
    small = build_token_cache(source, info, tokenizer, tmp_path / "b" / "train", chunk_lines=3)
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()
    digest = hashlib.sha256((tmp_path / "a" / "train.bin").read_bytes()).hexdigest()
    assert big["array_sha256"] == small["array_sha256"] == digest
    assert big["n_tokens"] == big["n_words"] == word_count(source.path)
    array = np.fromfile(tmp_path / "a" / "train.bin", dtype=np.uint16)
    assert array[0] == tokenizer.eos_id and len(array) == big["n_tokens"] + 1


def count_builds(monkeypatch) -> list:
    built = []
    original = wikitext.build_token_cache

    def counting(source, info, tokenizer, prefix, *args, **kwargs):
        built.append((prefix.parent.name, prefix.name))
        return original(source, info, tokenizer, prefix, *args, **kwargs)

    monkeypatch.setattr(wikitext, "build_token_cache", counting)
    return built


@needs_ranks
def test_caches_are_built_once_reused_and_rebuilt_when_source_or_tokenizer_changes(tmp_path, monkeypatch):
    built = count_builds(monkeypatch)
    data = write_wikitext(tmp_path / "data")
    module(tmp_path).prepare_data()
    assert sorted(built) == [("word", "test"), ("word", "train"), ("word", "val")]
    built.clear()
    dm = module(tmp_path)
    dm.prepare_data()
    assert built == []  # reused
    dm.setup("fit")
    first = dm.datasets["val"][0]

    with open(data / "wiki.valid.tokens", "a", encoding="utf-8") as f:
        f.write(" the song \n")
    module(tmp_path).prepare_data()
    assert built == [("word", "val")]  # only the changed source

    built.clear()
    module(tmp_path, tokenizer="gpt2", bpe_file=str(GPT2_RANKS)).prepare_data()
    assert sorted(built) == [("gpt2", "test"), ("gpt2", "train"), ("gpt2", "val")]

    built.clear()
    with open(data / "wiki.train.tokens", "a", encoding="utf-8") as f:
        f.write(" river river river river river river river river river river \n" * 50)  # reorders the vocabulary
    dm = module(tmp_path)
    dm.prepare_data()
    assert sorted(built) == [("word", "test"), ("word", "train"), ("word", "val")]  # new vocabulary, new ids
    dm.setup("fit")
    assert not torch.equal(dm.datasets["val"][0][0], first[0])


def test_mismatched_cache_with_rebuild_off_and_setup_without_prepare_are_errors(tmp_path):
    data = write_wikitext(tmp_path / "data")
    module(tmp_path).prepare_data()
    with open(data / "wiki.test.tokens", "a", encoding="utf-8") as f:
        f.write(" the song \n")
    with pytest.raises(DataError, match="data.rebuild_cache"):
        module(tmp_path, rebuild_cache=False).prepare_data()
    with pytest.raises(DataError, match="prepare_data"):
        module(tmp_path).setup("test")  # the cache was made from the old file

    module(tmp_path).prepare_data()
    bin_path = tmp_path / "cache" / "word" / "val.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-4])  # damaged
    with pytest.raises(DataError, match="truncated"):
        module(tmp_path).setup("validate")
    dm = module(tmp_path)
    dm.prepare_data()  # notices and rebuilds
    dm.setup("validate")
    assert dm.meta["val"]["n_tokens"] == word_count(data / "wiki.valid.tokens")


def test_split_test_for_val_cuts_the_test_file_at_an_article(tmp_path):
    data = write_wikitext(tmp_path / "data", {"wiki.valid.tokens": 5, "wiki.test.tokens": 9})
    dm = module(tmp_path, train_file="wiki.valid.tokens", val_file=None, split_test_for_val=0.5)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    lines = (data / "wiki.test.tokens").read_text(encoding="utf-8").splitlines()
    cut = dm.meta["val"]["n_lines"]
    assert dm.meta["test"]["range"] == [cut, None] and dm.meta["val"]["range"] == [0, cut]
    assert ARTICLE_HEADING.match(lines[cut]) and cut >= 0.5 * len(lines)
    assert not any(ARTICLE_HEADING.match(line) for line in lines[int(0.5 * len(lines)) : cut])  # the first one after
    assert dm.meta["val"]["n_words"] + dm.meta["test"]["n_words"] == word_count(data / "wiki.test.tokens")
    assert dm.meta["train"]["n_words"] == word_count(data / "wiki.valid.tokens")
    assert dm.spec() == {"vocab_size": dm.tokenizer.vocab_size, "seq_len": 16, "tokenizer": dm.tokenizer.identity}


@needs_shared
@needs_ranks
def test_offline_wikitext2_arrangement_has_the_official_counts(tmp_path):
    kwargs = dict(data_dir=str(WIKITEXT2), train_file="wiki.valid.tokens", val_file=None, split_test_for_val=0.5,
                  verify=True)
    dm = module(tmp_path, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.meta["train"]["n_tokens"] == 217_646 == OFFICIAL["wikitext-2"].tokens["wiki.valid.tokens"]
    assert dm.meta["val"]["n_tokens"] + dm.meta["test"]["n_tokens"] == 245_569
    counts = Counter(w for line in open(WIKITEXT2 / "wiki.valid.tokens", encoding="utf-8") for w in line.split())
    assert dm.tokenizer.vocab_size == len(counts) + 1  # plus <eos>; <unk> is a word of the text
    bpe = module(tmp_path, tokenizer="gpt2", bpe_file=str(GPT2_RANKS), **kwargs)
    bpe.prepare_data()
    bpe.setup("test")
    assert bpe.meta["test"]["n_words"] == dm.meta["test"]["n_words"]
    assert 1.1 < bpe.tokens_per_word("test") < 1.4 and dm.tokens_per_word("test") == 1.0


# ------------------------------------------------------------------------------------------------------ bad input
def test_missing_files_without_download_name_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"wiki\.train\.tokens.*data\.train_file.*data\.download: true"):
        module(tmp_path).prepare_data()


@pytest.mark.parametrize(("content", "match"), [("", "is empty"), (" = A = \n the cut li", "cut short")])
def test_empty_or_cut_files_are_rejected(tmp_path, content, match):
    data = write_wikitext(tmp_path / "data")
    (data / "wiki.valid.tokens").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        module(tmp_path).prepare_data()


@needs_shared
def test_truncated_or_altered_official_files_are_rejected(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(WIKITEXT2 / "wiki.test.tokens", data)
    lines = (WIKITEXT2 / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
    (data / "wiki.valid.tokens").write_text("".join(lines[:1000]), encoding="utf-8")
    offline = dict(verify=True, train_file="wiki.valid.tokens", val_file=None, split_test_for_val=0.5)
    with pytest.raises(DataError, match="has 1000 lines, but the official WikiText-2 wiki.valid.tokens has 3760"):
        module(tmp_path, **offline).prepare_data()
    i = next(i for i, line in enumerate(lines) if " the " in line)
    lines[i] = lines[i].replace(" the ", " ", 1)  # one word less, same number of lines
    (data / "wiki.valid.tokens").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match="217645 word-level tokens, but the official"):
        module(tmp_path, **offline).prepare_data()
    module(tmp_path, **{**offline, "verify": False}).prepare_data()


def test_unwritable_cache_dir_names_the_setting(tmp_path):
    write_wikitext(tmp_path / "data")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DataError, match="data.cache_dir"):
        module(tmp_path, cache_dir=str(tmp_path / "a-file" / "cache")).prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"eval_stride": 17}, "eval_stride"), ({"split_test_for_val": 1.0}, "split_test_for_val"),
     ({"val_file": None}, "val_file"), ({"seq_len": 0}, "seq_len")],
)
def test_bad_settings_are_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        module(tmp_path, **kwargs)


@pytest.fixture
def served(tmp_path):
    """A real HTTP server on localhost serving ``tmp_path/served``; yields its base URL."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def official_archive(tmp_path, monkeypatch, base_url: str, corrupt: bool = False) -> None:
    source = write_wikitext(tmp_path / "source")
    archive = tmp_path / "served" / "wikitext-2-v1.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
            z.write(source / name, f"wikitext-2/{name}")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    release = replace(OFFICIAL["wikitext-2"], urls=("http://127.0.0.1:9/unreachable.zip", f"{base_url}/{archive.name}"),
                      md5="0" * 32 if corrupt else md5)
    monkeypatch.setitem(OFFICIAL, "wikitext-2", release)


def test_download_tries_mirrors_checks_md5_and_extracts(tmp_path, monkeypatch, served):
    official_archive(tmp_path, monkeypatch, served)
    dm = module(tmp_path, download=True)
    dm.prepare_data()
    for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        assert (tmp_path / "data" / name).read_bytes() == (tmp_path / "source" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["wiki.test.tokens", "wiki.train.tokens",
                                                                    "wiki.valid.tokens"]  # no archive or temp files


def test_download_with_a_wrong_checksum_leaves_nothing_behind(tmp_path, monkeypatch, served):
    official_archive(tmp_path, monkeypatch, served, corrupt=True)
    with pytest.raises(DataError, match="MD5"):
        module(tmp_path, download=True).prepare_data()
    assert list((tmp_path / "data").iterdir()) == []


def test_a_download_never_deletes_or_replaces_a_file_the_user_had(tmp_path, monkeypatch, served):
    """The user's files in data_dir (an archive under the official name, a file under the name this process once
    downloaded into, their own training text) stay byte for byte through a failed download (a file:// URL to a
    missing file, then an unreachable server) and a successful one, which extracts only the missing splits and leaves
    no scratch folder behind."""
    data = tmp_path / "data"
    data.mkdir()
    release = OFFICIAL["wikitext-2"]
    mine = {
        "wikitext-2-v1.zip": b"the user's own archive",
        f"{temporary_prefix(data / release.folder)}v1.zip": b"a file under the old scratch name",
        "wiki.train.tokens": b" = My own text = \n",
    }
    for name, content in mine.items():
        (data / name).write_bytes(content)

    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in data.iterdir()}  # a folder left behind fails read_bytes

    nowhere = (tmp_path / "nowhere" / "wikitext-2-v1.zip").as_uri()
    monkeypatch.setitem(OFFICIAL, "wikitext-2", replace(release, urls=(nowhere, "http://127.0.0.1:9/unreachable.zip")))
    with pytest.raises(DataError, match="could not download WikiText-2 .*nowhere"):
        module(tmp_path, download=True).prepare_data()
    assert files() == mine
    official_archive(tmp_path, monkeypatch, served)
    module(tmp_path, download=True).prepare_data()
    source = tmp_path / "source"
    assert files() == {**mine, **{name: (source / name).read_bytes() for name in ("wiki.valid.tokens",
                                                                                "wiki.test.tokens")}}


def test_file_info_detects_a_missing_final_newline(tmp_path):
    (tmp_path / "f").write_bytes(b"a\nb")
    assert scan_file(tmp_path / "f") == FileInfo(hashlib.sha256(b"a\nb").hexdigest(), 3, 1, False)



@pytest.mark.parametrize(
    "text", ["hello world\n", "aGk= notarank\n", '{"hi": 0}\n', "aGk= 0 extra\n"],
    ids=["not base64", "rank", "json", "3 fields"],
)
def test_a_ranks_file_in_another_format_is_a_data_error_naming_bpe_file(tmp_path, text):
    """The ranks file is parsed by qkv_lightning (tiktoken's loader needs blobfile at the floor): a file of another
    format is a one-paragraph DataError that names data.bpe_file, and a well-formed one (the 256 bytes) loads."""
    path = tmp_path / "ranks.tiktoken"
    path.write_text(text)
    with pytest.raises(DataError, match=r"data\.bpe_file=.*is not a \.tiktoken ranks file"):
        BPETokenizer.from_ranks_file(path)
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tokenizer = BPETokenizer.from_ranks_file(path)
    assert tokenizer.decode(tokenizer.encode_prompt("héllo")) == "héllo"
