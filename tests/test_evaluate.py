"""``evaluate`` through lm-eval-harness, offline: task files in lm-eval's local-dataset format (a task YAML over a
local JSON-lines data set) written by the test, a GPT-2-format BPE ranks file written by the test, and a small
checkpoint of our language-model task. Every log-likelihood is checked against a direct forward pass of the
unbatched, unpadded sequence, and generation against greedy decoding that reruns the whole sequence each step."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from qkv_lightning.cli import main
from qkv_lightning.data.tokenizers import BPETokenizer
from qkv_lightning.interop.common import task_checkpoint, write_checkpoint
from qkv_lightning.tasks.language_model import LanguageModel

pytest.importorskip("lm_eval")

CONTEXT = 24
"""The model's positions: shorter than some requests, so left truncation and rolling windows are exercised."""

MERGES = [b" t", b"th", b"he", b" the", b"in", b"an", b" a"]

DOCS = [
    {"question": "the river flows into the", "choices": ["sea", "hill", "then the band"], "label": 0,
     "prompt": "the band", "answer": " then"},
    {"question": "a long question that certainly runs past the few positions of this model and then", "label": 1,
     "choices": ["in", "thin the hen"], "prompt": "that long prompt has more bytes than the context", "answer": "a"},
    {"question": "he", "choices": ["the", "an"], "label": 1, "prompt": "", "answer": " the"},
]


def write_ranks(path: Path) -> Path:
    """A BPE ranks file in tiktoken's format (base64 token, rank): the 256 bytes and a few merges."""
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    return path


def write_tasks(folder: Path) -> Path:
    """Three lm-eval task files over one local JSON-lines data set: multiple choice, greedy generation with stop
    strings, and a rolling log-likelihood."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'hf-cache'}\n"
        "test_split: test\n"
    )
    (folder / "toy_mc.yaml").write_text(
        "task: toy_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "toy_gen.yaml").write_text(
        "task: toy_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n', 'e']\n  max_gen_toks: 7\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    (folder / "toy_rolling.yaml").write_text(
        "task: toy_rolling\n" + common + "output_type: loglikelihood_rolling\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{question}}'\nmetric_list:\n  - metric: word_perplexity\n"
    )
    return folder


@pytest.fixture
def setup(tmp_path):
    ranks = write_ranks(tmp_path / "toy.tiktoken")
    tokenizer = BPETokenizer.from_ranks_file(ranks)
    torch.manual_seed(0)
    task = LanguageModel(
        network={"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": CONTEXT, "init_std": 0.15},
        attention={"sharing": "Q-K=V"},  # any variant: the KV cache holds one tensor per layer
        data_spec={"vocab_size": tokenizer.vocab_size + 3, "seq_len": CONTEXT, "tokenizer": tokenizer.identity},
    )
    task.configure_model()
    write_checkpoint(task_checkpoint(task, {}), tmp_path / "lm.ckpt")
    return tmp_path, ranks, tokenizer, task.network.eval()


def log_likelihood(model, tokenizer, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Reference: one unbatched forward pass of the last CONTEXT + 1 tokens, log-softmax over the tokenizer's ids."""
    whole = (context + continuation)[-(CONTEXT + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0, -len(continuation) :, : tokenizer.vocab_size]
    log_probs = logits.log_softmax(dim=-1)
    targets = torch.tensor(continuation)
    return log_probs[torch.arange(len(continuation)), targets].sum().item(), bool(
        (log_probs.argmax(-1) == targets).all())


def test_evaluate_scores_like_a_direct_forward_pass_and_generates_like_greedy_decoding(setup, plain_argv, capsys):
    folder, ranks, tokenizer, model = setup
    tasks = write_tasks(folder / "tasks")
    out = folder / "results.json"
    args = ["evaluate", "--ckpt_path", str(folder / "lm.ckpt"), "--tasks", "[toy_mc, toy_gen, toy_rolling]",
            "--include_path", str(tasks), "--bpe_file", str(ranks), "--output", str(out), "--log_samples", "true",
            "--batch_size", "2", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "toy_mc" in printed and "exact_match" in printed and f"wrote {out}" in printed
    report = json.loads(out.read_text())
    assert report["sharing"] == "Q-K=V" and set(report["results"]) == {"toy_mc", "toy_gen", "toy_rolling"}
    encode = tokenizer.encode_prompt

    samples = report["samples"]
    correct = []
    for sample in samples["toy_mc"]:
        scores = []
        for (context, continuation), [(value, greedy)] in zip(sample["arguments"], sample["resps"], strict=True):
            context_ids = encode(context)  # lm-eval's split: the whole text's ids after the context's
            expected = log_likelihood(model, tokenizer, context_ids, encode(context + continuation)[len(context_ids):])
            assert value == pytest.approx(expected[0], abs=1e-4) and greedy == expected[1]
            scores.append(value)
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["label"]))
    assert report["results"]["toy_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert any(len(encode(s["arguments"][0][0])) > CONTEXT for s in samples["toy_mc"])  # truncation was exercised

    for sample in samples["toy_rolling"]:
        ids = encode(sample["arguments"][0][0])
        first = min(CONTEXT, len(ids))
        windows = [([tokenizer.eot_id] + ids[: first - 1], ids[:first])]  # lm-eval's disjoint windows
        predicted = first
        while predicted < len(ids):  # each later window: the CONTEXT tokens before its last target
            n = min(len(ids) - predicted, CONTEXT)
            end = predicted + n
            windows.append((ids[end - CONTEXT - 1 : end - 1], ids[end - n : end]))
            predicted = end
        expected = 0.0
        for inputs, targets in windows:
            with torch.no_grad():
                logits = model(torch.tensor([inputs]))[0, -len(targets) :, : tokenizer.vocab_size]
            expected += logits.log_softmax(-1)[torch.arange(len(targets)), torch.tensor(targets)].sum().item()
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)
    assert any(len(encode(s["arguments"][0][0])) > 2 * CONTEXT for s in samples["toy_rolling"])

    for sample in samples["toy_gen"]:
        context, kwargs = sample["arguments"][0]
        prompt = (encode(context) or [tokenizer.eot_id])[-(CONTEXT - 1) :]
        n_new = min(kwargs["max_gen_toks"], CONTEXT - len(prompt))
        tokens = model.generate(torch.tensor([prompt]), n_new, use_cache=False, n_valid=tokenizer.vocab_size)
        new = tokens[0, len(prompt) :].tolist()
        new = new[: new.index(tokenizer.eot_id)] if tokenizer.eot_id in new else new
        text = tokenizer.decode(new)
        for stop in kwargs["until"]:
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text
    assert main(args) == 2  # the results file is not overwritten


def test_evaluate_refuses_another_tokenizer_and_a_missing_bpe_file(setup, plain_argv, capsys, tmp_path):
    folder, ranks, _, _ = setup
    tasks = write_tasks(folder / "tasks")
    other = tmp_path / "other.tiktoken"
    other.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    base = ["evaluate", "--ckpt_path", str(folder / "lm.ckpt"), "--include_path", str(tasks)]
    assert main([*base, "--tasks", "[toy_mc]", "--bpe_file", str(other)]) == 2
    assert "trained with bpe:" in capsys.readouterr().err
    assert main([*base, "--tasks", "[toy_mc]"]) == 2
    assert "--bpe_file" in capsys.readouterr().err
