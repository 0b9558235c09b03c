"""``import`` and ``export --format hf``: Hugging Face GPT-2 and timm ViT weights as our tasks' checkpoints, exactly.

References are the source libraries themselves: a ``GPT2LMHeadModel`` built from a small ``GPT2Config`` and saved
with ``save_pretrained``, and a timm ``VisionTransformer`` made with ``pretrained=False``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qkv_lightning.cli import main
from qkv_lightning.resume import check_fits, read_checkpoint_info
from qkv_lightning.tasks.language_model import load_gpt
from tests.lm_fixtures import GPT2_RANKS, validate_against, write_wikitext
from tests.run_fixtures import lm_args

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def perturbed_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter (so biases and norms are not at their 0/1 initialisation), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model.eval()


def hf_gpt2(folder: Path, **config) -> torch.nn.Module:
    """A small GPT2LMHeadModel with perturbed weights, saved in the transformers layout into ``folder``."""
    settings = {"vocab_size": 101, "n_positions": 24, "n_embd": 32, "n_layer": 2, "n_head": 4, **config}
    torch.manual_seed(0)
    model = perturbed_(transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)))
    model.save_pretrained(str(folder))
    return model


def task_from(path: Path):
    """The task of a checkpoint, rebuilt from its hyper-parameters as the CLI would, after resume.py's checks."""
    from qkv_lightning.tasks.image_classifier import ImageClassifier
    from qkv_lightning.tasks.language_model import LanguageModel

    checkpoint = torch.load(path, weights_only=True)  # plain types only
    hparams = dict(checkpoint["hyper_parameters"])
    cls = {"qkv_lightning.tasks.language_model.LanguageModel": LanguageModel,
           "qkv_lightning.tasks.image_classifier.ImageClassifier": ImageClassifier}[hparams.pop("_class_path")]
    task = cls(**hparams)
    check_fits(task, read_checkpoint_info(path))  # class, weight names and shapes, the data's tokenizer
    task.configure_model()
    task.load_state_dict(checkpoint["state_dict"], strict=True)
    return task.eval(), checkpoint


def test_hf_gpt2_import_has_the_logits_of_transformers_and_export_round_trips(tmp_path, plain_argv, capsys):
    """Untied head, a non-default MLP width and LayerNorm epsilon: every GPT-2 option we express, through the CLI."""
    reference = hf_gpt2(tmp_path / "hf", tie_word_embeddings=False, n_inner=48, layer_norm_epsilon=1e-4)
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "gpt2.ckpt")]) == 0
    task, checkpoint = task_from(tmp_path / "gpt2.ckpt")
    assert checkpoint["hyper_parameters"]["attention"]["sharing"] == "QKV"
    assert checkpoint["global_step"] == 0 and checkpoint["qkv_import"]["format"] == "hf-gpt2"
    ids = torch.randint(0, 101, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(task.network(ids), expected, rtol=0, atol=1e-5)
    assert "largest |logit difference|" in capsys.readouterr().out

    assert main(["export", "--ckpt_path", str(tmp_path / "gpt2.ckpt"), "--out", str(tmp_path / "back"),
                 "--format", "hf"]) == 0
    original = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    exported = safetensors_torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key  # identical tensors, Conv1D layout restored
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["n_inner"], config["layer_norm_epsilon"], config["tie_word_embeddings"]) == (48, 1e-4, False)
    again = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "back"), local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)
    assert main(["export", "--ckpt_path", str(tmp_path / "gpt2.ckpt"), "--out", str(tmp_path / "back"),
                 "--format", "hf"]) == 2  # nothing is overwritten


@pytest.mark.skipif(not GPT2_RANKS.is_file(), reason="needs the offline GPT-2 BPE ranks")
def test_imported_gpt2_validates_through_the_cli_with_the_loss_of_transformers(tmp_path, plain_argv):
    """A tied GPT-2 over the real BPE vocabulary: the CLI's checks accept it, and ``validate`` reports the
    cross-entropy that transformers' model gives on the same validation windows."""
    reference = hf_gpt2(tmp_path / "hf", vocab_size=50257, n_positions=16, n_layer=1)
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "gpt2.ckpt"), "--bpe_file", str(GPT2_RANKS)]) == 0
    data = write_wikitext(tmp_path / "data", {"wiki.train.tokens": 2, "wiki.valid.tokens": 2, "wiki.test.tokens": 1})
    args = lm_args(tmp_path, data) + ["--data.tokenizer", "gpt2", "--data.bpe_file", str(GPT2_RANKS),
                                      "--trainer.limit_val_batches", "1.0", "--ckpt_path", str(tmp_path / "gpt2.ckpt")]
    ours, theirs, count = validate_against(reference, args)
    assert count > 0 and ours == pytest.approx(theirs, rel=1e-5)
    # a word-level data set has another tokenizer: refused before anything runs
    word = lm_args(tmp_path, data, name="word") + ["--ckpt_path", str(tmp_path / "gpt2.ckpt")]
    assert main(["validate", *word]) == 2


def test_untranslatable_gpt2_settings_and_malformed_folders_are_clear_errors(tmp_path, plain_argv, capsys):
    def error_of(*args: str) -> str:
        capsys.readouterr()
        assert main(["import", *args]) == 2
        return capsys.readouterr().err

    hf_gpt2(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    weights = safetensors_torch.load_file(str(tmp_path / "good" / "model.safetensors"))
    for field, value in (("scale_attn_by_inverse_layer_idx", True), ("activation_function", "relu"),
                         ("scale_attn_weights", False), ("model_type", "llama")):
        folder = tmp_path / field
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        safetensors_torch.save_file(weights, str(folder / "model.safetensors"))
        assert field in error_of(str(folder), str(tmp_path / f"{field}.ckpt"))
        assert not (tmp_path / f"{field}.ckpt").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(config))
    assert "model.safetensors" in error_of(str(broken), str(tmp_path / "b.ckpt"))
    key = "transformer.h.1.mlp.c_fc.weight"
    safetensors_torch.save_file({k: v for k, v in weights.items() if k != key}, str(broken / "model.safetensors"))
    assert key in error_of(str(broken), str(tmp_path / "b.ckpt"))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "safetensors" in error_of(str(broken), str(tmp_path / "b.ckpt"))
    (broken / "config.json").unlink()
    assert "config.json" in error_of(str(broken), str(tmp_path / "b.ckpt"))
    assert "exists already" in error_of(str(tmp_path / "good"), str(tmp_path / "good" / "config.json"))


NAN, INF = float("nan"), float("inf")
BAD_VALUES = [
    ("layer_norm_epsilon", NAN), ("layer_norm_epsilon", INF), ("layer_norm_epsilon", -1e-5),
    ("layer_norm_epsilon", 0.0), ("layer_norm_epsilon", "1e-5"), ("layer_norm_epsilon", True),
    ("resid_pdrop", "abc"), ("resid_pdrop", 1.5), ("resid_pdrop", -0.1), ("resid_pdrop", NAN),
    ("embd_pdrop", 1.0), ("attn_pdrop", -INF), ("initializer_range", -0.02), ("initializer_range", NAN),
    ("tie_word_embeddings", "false"), ("scale_attn_weights", 1), ("n_inner", 0), ("n_inner", 2.5),
    ("n_inner", "64"), ("n_layer", True), ("activation_function", 3),
    ("quantization_config", {"load_in_8bit": True, "quant_method": "bitsandbytes"}),
]
"""config.json values the import must refuse (json.dumps writes NaN / Infinity, as Python's json reads them)."""


def gpt2_variant(tmp_path: Path, name: str, config: dict, weights: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    safetensors_torch.save_file(weights, str(folder / "model.safetensors"))
    return folder


def test_gpt2_config_values_of_the_wrong_type_or_out_of_range_are_errors_naming_the_field(tmp_path, plain_argv,
                                                                                          capsys):
    """Issue 26: ``layer_norm_epsilon: NaN`` was imported (checkpoint written, 'largest |logit difference| ... nan',
    exit 0), ``resid_pdrop: "abc"`` and ``quantization_config`` were tracebacks. Each of 22 values is now one error
    paragraph naming the field, exit code 2, and no checkpoint."""
    hf_gpt2(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    weights = safetensors_torch.load_file(str(tmp_path / "good" / "model.safetensors"))
    for number, (field, value) in enumerate(BAD_VALUES):
        folder = gpt2_variant(tmp_path, f"bad{number}", {**config, field: value}, weights)
        capsys.readouterr()
        assert main(["import", str(folder), str(tmp_path / f"bad{number}.ckpt")]) == 2, (field, value)
        err = capsys.readouterr().err
        assert f"config.json: {field}=" in err and "Traceback" not in err, (field, value, err)
        assert not (tmp_path / f"bad{number}.ckpt").exists()
    assert main(["import", str(tmp_path / "good"), str(tmp_path / "good.ckpt")]) == 0  # the control


def test_gpt2_weights_that_are_not_finite_floats_or_give_non_finite_logits_are_not_imported(tmp_path, plain_argv,
                                                                                          capsys):
    """A NaN or infinite weight, or integer (quantized) weights: an error naming the tensor. Finite weights whose
    logits overflow (an untied head of 3e38s): transformers' and our logits are both infinite, their difference is
    NaN, and the import fails instead of writing the checkpoint and printing 'nan' with exit code 0."""
    hf_gpt2(tmp_path / "good", tie_word_embeddings=False)
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    weights = safetensors_torch.load_file(str(tmp_path / "good" / "model.safetensors"))
    key = "transformer.h.1.mlp.c_fc.weight"
    for name, tensor, said in (("nan", weights[key].clone().fill_(NAN), "NaN or infinite"),
                               ("inf", weights[key].clone().index_fill_(0, torch.tensor([3]), INF), "NaN or infinite"),
                               ("int8", weights[key].to(torch.int8), "torch.int8")):
        folder = gpt2_variant(tmp_path, name, config, {**weights, key: tensor})
        capsys.readouterr()
        assert main(["import", str(folder), str(tmp_path / f"{name}.ckpt")]) == 2
        err = capsys.readouterr().err
        assert key in err and said in err and "Traceback" not in err, err
        assert not (tmp_path / f"{name}.ckpt").exists()
    huge = torch.full_like(weights["lm_head.weight"], 3e38)
    huge[::2] = -3e38
    folder = gpt2_variant(tmp_path, "overflow", config, {**weights, "lm_head.weight": huge})
    capsys.readouterr()
    assert main(["import", str(folder), str(tmp_path / "overflow.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "give logits that differ by nan (not a finite number)" in err and "Traceback" not in err, err
    assert not (tmp_path / "overflow.ckpt").exists()


def test_shared_variants_are_not_exported_to_gpt2(tmp_path, plain_argv, capsys):
    from qkv_lightning.interop.common import task_checkpoint, write_checkpoint
    from qkv_lightning.tasks.language_model import LanguageModel

    task = LanguageModel(network={"n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 8},
                         attention={"sharing": "Q-K=V"}, data_spec={"vocab_size": 50, "seq_len": 8})
    task.configure_model()
    write_checkpoint(task_checkpoint(task, {}), tmp_path / "kv.ckpt")
    assert main(["export", "--ckpt_path", str(tmp_path / "kv.ckpt"), "--out", str(tmp_path / "out"),
                 "--format", "hf"]) == 2
    assert "attention.sharing='Q-K=V'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    load_gpt(tmp_path / "kv.ckpt")  # an ordinary checkpoint otherwise


# ------------------------------------------------------------------------------------------------------- timm
def _timm_importable() -> bool:
    from importlib.util import find_spec

    from qkv_lightning.interop.timm_vit import vit_activation_field

    return find_spec("timm") is not None and vit_activation_field() is not None


timm_needed = pytest.mark.skipif(not _timm_importable(), reason="needs timm and the ViT's exact-GELU setting")


@timm_needed
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_vit_import_has_the_logits_of_timm(tmp_path, plain_argv, suffix):
    import timm

    torch.manual_seed(0)
    reference = perturbed_(timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0
    ))
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    safetensors_torch.save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    assert main(["import", str(path), str(tmp_path / "vit.ckpt"), "--n_head", "3"]) == 0
    task, checkpoint = task_from(tmp_path / "vit.ckpt")
    assert checkpoint["hyper_parameters"]["data_spec"] == {"num_classes": 5, "image_size": 16, "in_channels": 3}
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(task.network(images), reference(images), rtol=0, atol=1e-5)


@timm_needed
def test_timm_model_name_checks_the_architecture_and_unsupported_options_are_named(tmp_path, plain_argv, capsys):
    import timm

    model = perturbed_(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4))
    safetensors_torch.save_file(model.state_dict(), str(tmp_path / "tiny.safetensors"))
    assert main(["import", str(tmp_path / "tiny.safetensors"), str(tmp_path / "tiny.ckpt"),
                 "--timm_model", "vit_tiny_patch16_224"]) == 0
    assert "against timm's vit_tiny_patch16_224" in capsys.readouterr().out
    task, _ = task_from(tmp_path / "tiny.ckpt")
    assert task.network_config.n_head == 3  # from timm's model, not the width / 64 default
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(task.network(images), model(images), rtol=0, atol=1e-5)
    for kwargs, option in (({"init_values": 1e-5}, "init_values"), ({"reg_tokens": 1}, "reg_tokens"),
                           ({"global_pool": "avg", "class_token": False}, "fc_norm")):
        other = timm.models.vision_transformer.VisionTransformer(
            img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=1, num_heads=2, **kwargs)
        path = tmp_path / f"{option}.safetensors"
        safetensors_torch.save_file(other.state_dict(), str(path))
        capsys.readouterr()
        assert main(["import", str(path), str(tmp_path / f"{option}.ckpt")]) == 2
        assert option in capsys.readouterr().err
