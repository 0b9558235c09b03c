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
from qkv_lightning.data.hf_tokenizer import CHECKPOINT_ENTRY
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


def rolling_windows(ids: list[int], prefix: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows of ``ids`` as (inputs, targets), the first conditioned on ``prefix``."""
    first = min(CONTEXT, len(ids))
    windows = [([prefix] + ids[: first - 1], ids[:first])]
    predicted = first
    while predicted < len(ids):  # each later window: the CONTEXT tokens before its last target
        n = min(len(ids) - predicted, CONTEXT)
        end = predicted + n
        windows.append((ids[end - CONTEXT - 1 : end - 1], ids[end - n : end]))
        predicted = end
    return windows


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
        expected = 0.0
        for inputs, targets in rolling_windows(ids, prefix=tokenizer.eot_id):
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


def test_an_imported_llama_is_evaluated_with_the_tokenizer_its_checkpoint_stores(tmp_path, plain_argv, capsys):
    """A tiny Llama folder with a tokenizer.json (BOS ``<s>`` added by its post-processor, EOS ``<|endoftext|>``),
    imported: ``evaluate`` needs no ``--bpe_file`` and scores every request as transformers' model does over the ids
    the ``tokenizers`` library gives (context and continuation split as lm-eval splits them); the rolling windows
    start with the BOS (the token that starts our data's streams), and greedy generation, rerun in full by
    transformers, stops at the config's EOS, not at the BOS, and is decoded by the tokenizers library."""
    transformers = pytest.importorskip("transformers")
    from tests.lm_fixtures import train_bpe

    lines = [f"{doc['question']} {' '.join(doc['choices'])} {doc['prompt']}{doc['answer']}\n" for doc in DOCS]
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                      bos_token_id=1, eos_token_id=0, pad_token_id=None)
    reference = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        reference.lm_head.weight[0] *= 4  # the EOS wins now and then, so that generation stops at it
    reference.save_pretrained(str(folder))
    tokenizer = train_bpe(folder / "tokenizer.json", lines, vocab_size=280)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("<|endoftext|>")
    assert (bos, eos) == (1, 0)
    assert main(["import", str(folder), str(tmp_path / "m.ckpt")]) == 0
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "results.json"
    args = ["evaluate", "--ckpt_path", str(tmp_path / "m.ckpt"), "--tasks", "[toy_mc, toy_gen, toy_rolling]",
            "--include_path", str(tasks), "--output", str(out), "--log_samples", "true", "--batch_size", "2",
            "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 0
    report = json.loads(out.read_text())
    samples = report["samples"]
    n_valid = tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def log_probs(ids: list[int]) -> torch.Tensor:  # (T, n_valid): transformers' model, one unpadded sequence
        with torch.no_grad():
            return reference(torch.tensor([ids])).logits[0, :, :n_valid].float().log_softmax(-1)

    for sample in samples["toy_mc"]:
        for (context, continuation), [(value, greedy)] in zip(sample["arguments"], sample["resps"], strict=True):
            context_ids = encode(context)
            target = encode(context + continuation)[len(context_ids):]
            scored = log_probs((context_ids + target)[-(CONTEXT + 1) :][:-1])[-len(target) :]
            expected = scored[torch.arange(len(target)), torch.tensor(target)].sum().item()
            assert value == pytest.approx(expected, abs=1e-4)
            assert greedy == bool((scored.argmax(-1) == torch.tensor(target)).all())
    assert any(len(encode(s["arguments"][0][0])) > CONTEXT for s in samples["toy_mc"])

    for sample in samples["toy_rolling"]:
        ids = encode(sample["arguments"][0][0])
        expected = sum(
            log_probs(inputs)[-len(targets) :][torch.arange(len(targets)), torch.tensor(targets)].sum().item()
            for inputs, targets in rolling_windows(ids, prefix=bos)
        )
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)
    assert any(len(encode(s["arguments"][0][0])) > CONTEXT for s in samples["toy_rolling"])

    stopped = 0
    for sample in samples["toy_gen"]:
        context, kwargs = sample["arguments"][0]
        ids = (encode(context) or [bos])[-(CONTEXT - 1) :]
        new: list[int] = []
        while len(new) < min(kwargs["max_gen_toks"], CONTEXT - len(ids)):
            token = int(log_probs(ids + new)[-1].argmax())
            if token == eos:
                stopped += 1
                break
            new.append(token)
            if any(stop in tokenizer.decode(new, skip_special_tokens=False) for stop in kwargs["until"]):
                break
        text = tokenizer.decode(new, skip_special_tokens=False)
        for stop in kwargs["until"]:
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text
    assert stopped > 0  # the EOS ended a generation

    assert main([*args, "--overwrite", "true", "--bpe_file", str(write_ranks(tmp_path / "toy.tiktoken"))]) == 2
    assert "stores the tokenizer its model was trained with" in capsys.readouterr().err
    # a model trained on a Hugging Face tokenizer whose checkpoint lacks it: refused, naming the tokenizer it needs
    stripped = torch.load(tmp_path / "m.ckpt", weights_only=True)
    del stripped[CHECKPOINT_ENTRY]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    assert main([*args[:2], str(tmp_path / "stripped.ckpt"), *args[3:], "--overwrite", "true"]) == 2
    err = capsys.readouterr().err
    assert "trained with a Hugging Face tokenizer (data_spec.tokenizer=hf:" in err and "Traceback" not in err
