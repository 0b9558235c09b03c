"""``export --format hf`` of the Llama-style trunk: imported Llama, Mistral and Qwen2 folders come back tensor for
tensor; shared variants are standard Llama folders with transformers' logits equal to ours; what a standard folder
cannot express is one error naming the setting, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qkv_lightning.cli import main
from qkv_lightning.data.hf_tokenizer import CHECKPOINT_ENTRY, HFTokenizer
from qkv_lightning.interop import hf_llama
from qkv_lightning.interop.common import task_checkpoint, write_checkpoint
from qkv_lightning.interop.hf_llama import read_folder_weights
from qkv_lightning.tasks.language_model import LanguageModel, load_gpt
from tests.lm_fixtures import train_words
from tests.test_hf_llama import CASES, SIZES, hf_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")]

LLAMA = dict(n_layer=2, n_head=4, d_model=32, d_mlp=40, max_seq_len=48, norm="rms", mlp="swiglu", position="rope",
             bias=False, rope_base=500.0, norm_eps=1e-5, tie_embeddings=False)
"""Our GPT with the Llama-style trunk at the size of the tiny Hugging Face models."""


def export(ckpt: Path, out: Path) -> int:
    return main(["export", "--ckpt_path", str(ckpt), "--out", str(out), "--format", "hf"])


def our_checkpoint(path: Path, network: dict | None = None, attention: dict | None = None) -> Path:
    """A LanguageModel checkpoint with the Llama-style trunk (``network`` over :data:`LLAMA`), every parameter
    N(0, 0.3) (norm scales and biases included), written as import writes one."""
    task = LanguageModel(network={**LLAMA, **(network or {})}, attention=attention or {},
                         data_spec={"vocab_size": SIZES["vocab_size"], "seq_len": 48})
    task.configure_model()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in task.network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    write_checkpoint(task_checkpoint(task, {}), path)
    return path


def assert_logits_of_transformers(folder: Path, ckpt: Path, cls: type | None = None) -> None:
    """transformers' model of ``folder`` (``cls``, default the Auto class) gives the checkpoint's GPT's logits
    (1e-5), and its cached decoding does too."""
    reference = (cls or transformers.AutoModelForCausalLM).from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32).eval()
    model, _ = load_gpt(ckpt)
    ids = torch.randint(0, SIZES["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids), reference(ids).logits
        assert theirs.abs().max() > 1.0  # not a degenerate model
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        out = reference(ids[:, :30], use_cache=True)
        steps = [out.logits]
        for t in range(30, 40):
            out = reference(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), ours, rtol=0, atol=1e-5)


SPECIAL_IDS = {
    "llama-gqa-untied": dict(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=None),  # several EOS, as Llama 3's
    "llama-mha-tied-sharded": dict(bos_token_id=3, eos_token_id=4, pad_token_id=4),
    "mistral-mqa-untied": dict(bos_token_id=1, eos_token_id=2, pad_token_id=None),
    "qwen2-gqa-tied": dict(bos_token_id=None, eos_token_id=5, pad_token_id=6),
    "qwen2-mha-untied": dict(bos_token_id=8, eos_token_id=8, pad_token_id=9),
}
"""The special token ids of each case's config (its tokenizer.json is a small WordLevel one)."""


def token_ids(config) -> tuple:
    """(bos, eos, pad) of a transformers config or generation config."""
    return config.bos_token_id, config.eos_token_id, config.pad_token_id


@pytest.mark.parametrize("case", list(CASES))
def test_import_then_export_gives_back_the_original_tensors(tmp_path, plain_argv, capsys, case):
    """Llama GQA untied, Llama MHA tied (sharded), Mistral MQA, Qwen2 (q/k/v biases) GQA tied and MHA untied: every
    tensor of the exported folder equals the original's, under the same names, and transformers loads it; the
    folder's config and generation config name the source's BOS, EOS and padding ids (stored with its tokenizer)."""
    kind, config = CASES[case]
    original_model = hf_model(tmp_path / "hf", kind, shard="sharded" in case, **config, **SPECIAL_IDS[case])
    train_words(tmp_path / "hf" / "tokenizer.json", ["the song was a game season album film river city team"])
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "m.ckpt")]) == 0
    stored = HFTokenizer.from_file(tmp_path / "m.ckpt")
    assert stored.checkpoint_entry()["special_token_ids"] == SPECIAL_IDS[case]  # what a fit on it stores again
    older = torch.load(tmp_path / "m.ckpt", weights_only=True, mmap=True)  # as import wrote it before the ids:
    del older[CHECKPOINT_ENTRY]["special_token_ids"]  # they come from the source's config that qkv_import keeps
    assert HFTokenizer.from_checkpoint(older, "older").special_token_ids == SPECIAL_IDS[case]
    capsys.readouterr()
    assert export(tmp_path / "m.ckpt", tmp_path / "back") == 0
    printed = capsys.readouterr().out
    assert "largest |logit difference|" in printed and "note:" not in printed, printed
    source = token_ids(original_model.config)
    assert source == tuple(SPECIAL_IDS[case].values())
    assert token_ids(transformers.AutoConfig.from_pretrained(str(tmp_path / "back"), local_files_only=True)) == source
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "back"), local_files_only=True)
    original_generation = transformers.GenerationConfig.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert token_ids(generation) == token_ids(original_generation) == source
    original, _ = read_folder_weights(tmp_path / "hf")
    exported = safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    architecture = "Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"
    assert written["architectures"] == [architecture] and written["model_type"] == architecture[:-11].lower()
    assert written["num_key_value_heads"] == config["num_key_value_heads"]
    assert written["tie_word_embeddings"] == config["tie_word_embeddings"]
    assert written["rope_parameters"]["rope_theta"] == original_model.config.rope_parameters["rope_theta"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), local_files_only=True)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reference.eval()(ids).logits, original_model(ids).logits)
    before = (tmp_path / "back" / "model.safetensors").read_bytes()
    assert export(tmp_path / "m.ckpt", tmp_path / "back") == 2  # nothing is overwritten
    assert "already holds" in capsys.readouterr().err
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == before


def test_a_converted_k_equals_v_model_is_a_standard_llama_folder_with_our_logits(tmp_path, plain_argv, capsys):
    """An imported Llama GQA-2 converted to Q-K=V at 2 K/V heads (Q-GQA-2) by ``convert``, exported through the CLI:
    K's weights are written as V's as well, LlamaForCausalLM's logits equal ours, and the export says the folder has
    no cache saving."""
    hf_model(tmp_path / "hf", "llama", num_key_value_heads=2, tie_word_embeddings=False)
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "m.ckpt")]) == 0
    assert main(["convert", str(tmp_path / "m.ckpt"), str(tmp_path / "kv.ckpt"), "--sharing", "Q-K=V",
                 "--n_kv_heads", "2"]) == 0
    _, hparams = load_gpt(tmp_path / "kv.ckpt")
    assert (hparams["attention"]["sharing"], hparams["attention"]["n_kv_heads"]) == ("Q-K=V", 2)
    capsys.readouterr()
    assert export(tmp_path / "kv.ckpt", tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "Q-K=V" in printed and "no cache saving" in printed, printed
    assert "its cache holds 4 K/V head tensors per token (K and V in each of 2 layers) where the checkpoint's holds 2" \
        in printed, printed
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["architectures"], written["num_key_value_heads"]) == (["LlamaForCausalLM"], 2)
    original, _ = read_folder_weights(tmp_path / "hf")
    tensors = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(tensors) == set(original)
    for i in range(2):
        attn = f"model.layers.{i}.self_attn."
        assert torch.equal(tensors[f"{attn}k_proj.weight"], tensors[f"{attn}v_proj.weight"])
        assert not torch.equal(tensors[f"{attn}k_proj.weight"], original[f"{attn}k_proj.weight"])  # converted
        assert torch.equal(tensors[f"{attn}q_proj.weight"], original[f"{attn}q_proj.weight"])  # kept
    assert_logits_of_transformers(tmp_path / "out", tmp_path / "kv.ckpt", transformers.LlamaForCausalLM)


SHARED = {
    "Q-MQA": ({}, {"sharing": "Q-K=V", "n_kv_heads": 1}),
    "Q-K=V": ({}, {"sharing": "Q-K=V"}),
    "Q=K-V": ({}, {"sharing": "Q=K-V"}),
    "Q=V-K": ({}, {"sharing": "Q=V-K"}),
    "Q=K=V": ({}, {"sharing": "Q=K=V"}),
    "Q-K=V-qwen2-biases": ({"qkv_bias": True}, {"sharing": "Q-K=V", "n_kv_heads": 2}),
    "QVV(3)-depth": ({}, {"sharing": "Q-K=V", "n_kv_heads": 2, "depth": {"Q": 2}}),
    "schedule": ({"tie_embeddings": True}, {"layers": {"0": "QKV_kv2", "1": "Q-K=V_kv2"}}),
}


@pytest.mark.parametrize("case", list(SHARED))
def test_shared_variants_export_with_the_logits_of_transformers(tmp_path, plain_argv, capsys, case):
    """Each projection sharing within a layer (with MQA, Qwen2's biases, depth factors fused, a per-layer schedule)
    written with each shared projection under every role it serves: transformers' logits equal ours."""
    network, attention = SHARED[case]
    ckpt = our_checkpoint(tmp_path / "m.ckpt", network, attention)
    assert export(ckpt, tmp_path / "out") == 0
    printed = capsys.readouterr().out
    assert "no cache saving" in printed, printed
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == ("qwen2" if network.get("qkv_bias") else "llama")
    assert_logits_of_transformers(tmp_path / "out", ckpt)


REFUSED = {
    "norm": ({"norm": "layer"}, {}, "network.norm='layer'"),
    "mlp": ({"mlp": "gelu"}, {}, "network.mlp='gelu'"),
    "learned positions": ({"position": "learned"}, {}, "network.position='learned'"),
    "no positions": ({"position": "none"}, {}, "network.position='none'"),
    "bias": ({"bias": True}, {}, "network.bias=True"),
    "adaptive": ({"output": "adaptive", "adaptive_cutoffs": [20]}, {}, "network.output='adaptive'"),
    "Q=K-V+score": ({}, {"sharing": "Q=K-V", "score_encoding": "paper"}, "attention.score_encoding='paper'"),
    "noself": ({}, {"sharing": "Q=K=V", "mask_self": True}, "attention.mask_self=True"),
    "partial rotary": ({}, {"sharing": "Q-K=V", "rope_fraction": 0.5}, "attention.rope_fraction=0.5"),
    "decoupled rotary key": ({}, {"sharing": "Q-K=V", "rope_key_dim": 4}, "attention.rope_key_dim=4"),
    "cross-layer": ({}, {"kv_share_every": 2}, "attention.kv_share_every=2"),
    "k_norm": ({}, {"k_norm": "rms"}, "attention.k_norm='rms'"),
    "K/V heads per layer": ({}, {"layers": {"0": "QKV_kv2", "1": "QKV"}}, "attention.layers="),
    "a layer's breaker": ({}, {"layers": {"0": "QKV", "1": "Q=K-V+score"}},
                          "attention.score_encoding='paper' (layer 1, from attention.layers)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_a_standard_llama_folder_cannot_express_is_refused(tmp_path, plain_argv, capsys, case):
    network, attention, named = REFUSED[case]
    ckpt = our_checkpoint(tmp_path / "m.ckpt", network, attention)
    assert export(ckpt, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert named in error and "Llama folder" in error and "Traceback" not in error, error
    assert len(error.strip().splitlines()) == 1, error  # one paragraph
    assert not (tmp_path / "out").exists()


def test_a_folder_whose_logits_differ_from_ours_is_not_written(tmp_path, plain_argv, capsys, monkeypatch):
    """The written folder is loaded by transformers before it is put in place: a misplaced tensor (here K and V
    swapped) is an error, and nothing lies under --out."""
    ckpt = our_checkpoint(tmp_path / "m.ckpt")
    exact = hf_llama.from_our_state

    def swapped(model, config):
        tensors = exact(model, config)
        k, v = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"
        tensors[k], tensors[v] = tensors[v], tensors[k]
        return tensors

    monkeypatch.setattr(hf_llama, "from_our_state", swapped)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    assert export(ckpt, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert "gives logits that differ" in error and "nothing was written" in error, error
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "out"]  # no scratch folder left
