"""The language-model task end to end through the command line: every config, exact perplexity, checkpoints,
generation from a checkpoint, and clear errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qkv_lightning.cli import main
from qkv_lightning.data.wikitext import WikiText
from qkv_lightning.errors import CheckpointError
from qkv_lightning.lightning_cli import QKVLightningCLI
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.gpt import GPTConfig
from qkv_lightning.tasks.language_model import LanguageModel
from qkv_lightning.tasks.optim import OptimizerConfig
from tests.lm_fixtures import GPT2_RANKS, WIKITEXT2, word_count, write_wikitext
from tests.run_fixtures import CONFIGS, lm_config_args
from tests.streaming_support import streaming_data_args, write_corpus

LM_CONFIGS = sorted(p.stem for p in (CONFIGS / "lm").glob("*.yaml"))
SMALL = ["--model.network.n_layer", "2", "--model.network.n_head", "4", "--model.network.d_model", "32",
         "--model.network.d_mlp", "64", "--model.network.max_seq_len", "16", "--data.seq_len", "16",
         "--model.network.adaptive_cutoffs", "[20, 40]"]  # used with output: adaptive; the small files have ~60 words


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_wikitext(tmp_path_factory.mktemp("wikitext"))


def tiny_model(**network) -> LanguageModel:
    config = GPTConfig(**{**dict(n_layer=2, n_head=4, d_model=32, d_mlp=64, max_seq_len=16, dropout=0.0), **network})
    return LanguageModel(network=config, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2))


def datamodule(tmp_path: Path, data: Path, **kwargs) -> WikiText:
    settings = dict(dataset="wikitext-2", data_dir=str(data), cache_dir=str(tmp_path / "cache"), verify=False,
                    seq_len=16, batch_size=4, num_workers=0)
    return WikiText(**{**settings, **kwargs})


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=str(tmp_path), enable_checkpointing=False)
    return L.Trainer(**{**settings, **kwargs})


# ---------------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("config", LM_CONFIGS)
def test_every_lm_config_runs_fast_dev_run(tmp_path, data, config):
    extra = ["--trainer.fast_dev_run", "1"]
    if config == "wikitext2-offline":  # as it is, on the shared offline files; only the writes go to tmp_path
        if not WIKITEXT2.is_dir():
            pytest.skip("shared offline WikiText-2 files not present")
        args = ["--config", str(CONFIGS / "lm" / f"{config}.yaml"), "--data.cache_dir", str(tmp_path / "cache"),
                "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
                "--trainer.default_root_dir", str(tmp_path), *extra]
        assert main(["fit", *args]) == 0
        return
    extra += SMALL + ["--trainer.accumulate_grad_batches", "1"]
    if config == "streaming":  # LitData on small JSONL files (tests/test_streaming.py tests it in depth)
        pytest.importorskip("litdata")
        write_corpus(tmp_path / "corpus", 8)
        args = ["--config", str(CONFIGS / "lm" / "streaming.yaml"), *streaming_data_args(tmp_path / "corpus", 16),
                "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--trainer.enable_progress_bar",
                "false", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                "--trainer.default_root_dir", str(tmp_path), *extra]
        assert main(["fit", *args]) == 0
        return
    if config.startswith(("gpt2", "paper")):
        if not GPT2_RANKS.is_file():
            pytest.skip("shared GPT-2 ranks file not present")
        extra += ["--data.bpe_file", str(GPT2_RANKS)]
    assert main(["fit", *lm_config_args(tmp_path, data, config, *extra)]) == 0


def test_variant_configs_layer_on_lm_configs(tmp_path, data):
    args = lm_config_args(tmp_path, data, "wikitext2-offline", "--config", str(CONFIGS / "variants" / "q-k=v_mqa.yaml"))
    cli = QKVLightningCLI(args=args, run=False)
    assert isinstance(cli.model, LanguageModel)
    assert (cli.model.attention_config.sharing, cli.model.attention_config.n_kv_heads) == ("Q-K=V", 1)
    assert cli.model.hparams["attention"]["sharing"] == "Q-K=V"
    callbacks = {type(c).__name__: c for c in cli.trainer.callbacks}
    assert "LearningRateMonitor" in callbacks and callbacks["ModelCheckpoint"].save_last


# ------------------------------------------------------------------------------------------------------- perplexity
def test_sliding_perplexity_equals_an_explicit_per_token_reference(tmp_path):
    """With stride 1 every target j is scored once with the context of the (up to) seq_len tokens before it."""
    data = write_wikitext(tmp_path / "small", {"wiki.train.tokens": 2, "wiki.valid.tokens": 1, "wiki.test.tokens": 1})
    torch.manual_seed(0)
    model = tiny_model()
    results = {}
    for batch_size in (1, 16):
        dm = datamodule(tmp_path, data, seq_len=8, eval_stride=1, eval_batch_size=batch_size)
        results[batch_size] = trainer(tmp_path).validate(model, dm, verbose=False)[0]
    assert results[1]["val/loss"] == pytest.approx(results[16]["val/loss"], rel=1e-6)
    stream = torch.from_numpy(dm.datasets["val"].data.astype("int64"))  # boundary token, then the text's ids
    assert results[1]["val/tokens"] == len(stream) - 1 == word_count(data / "wiki.valid.tokens")
    network = model.network.eval()
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(network(stream[max(0, j - 8) : j][None])[0, -1], stream[j])
            for j in range(1, len(stream))
        ]
    reference = torch.stack(losses).mean().item()
    assert results[1]["val/loss"] == pytest.approx(reference, rel=1e-5)
    assert results[1]["val/ppl"] == pytest.approx(math.exp(reference), rel=1e-5)


def test_non_overlapping_evaluation_does_not_depend_on_the_batch_size(tmp_path, data):
    torch.manual_seed(0)
    model = tiny_model()
    losses = [
        trainer(tmp_path).test(model, datamodule(tmp_path, data, eval_batch_size=b), verbose=False)[0]
        for b in (1, 3, 64)
    ]
    assert losses[0]["test/loss"] == pytest.approx(losses[1]["test/loss"], rel=1e-6)
    assert losses[0]["test/loss"] == pytest.approx(losses[2]["test/loss"], rel=1e-6)
    assert losses[0]["test/tokens"] == word_count(data / "wiki.test.tokens")
    assert "test/word_ppl" not in losses[0]  # word-level tokens are words


@pytest.mark.skipif(not GPT2_RANKS.is_file(), reason="shared GPT-2 ranks file not present")
def test_bpe_reports_perplexity_per_word_of_the_original_text(tmp_path, data):
    torch.manual_seed(0)
    dm = datamodule(tmp_path, data, tokenizer="gpt2", bpe_file=str(GPT2_RANKS))
    model = tiny_model(vocab_size=50304)  # padded, as in the GPT-2 configs
    metrics = trainer(tmp_path).validate(model, dm, verbose=False)[0]
    total = metrics["val/loss"] * metrics["val/tokens"]  # summed loss over every BPE token of the split
    words = word_count(data / "wiki.valid.tokens")
    assert metrics["val/tokens"] > words
    assert metrics["val/word_ppl"] == pytest.approx(math.exp(total / words), rel=1e-4)


def test_training_lowers_validation_loss(tmp_path, data):
    torch.manual_seed(0)
    model, dm = tiny_model(), datamodule(tmp_path, data)
    before = trainer(tmp_path).validate(model, dm, verbose=False)[0]["val/loss"]
    trainer(tmp_path, max_steps=60, gradient_clip_val=1.0, num_sanity_val_steps=0).fit(model, dm)
    after = trainer(tmp_path).validate(model, dm, verbose=False)[0]["val/loss"]
    assert before > math.log(model.data_spec["vocab_size"]) - 0.5  # about uniform at the start
    assert after < before - 1.0


def test_weight_decay_applies_to_matrices_only(tmp_path, data):
    model = tiny_model()
    model.data_spec = {"vocab_size": 50, "seq_len": 16}
    model.configure_model()
    network = model.network
    model.configure_model()
    assert model.network is network  # idempotent: FSDP may call it again
    model.trainer = trainer(tmp_path, max_steps=10)
    decay, no_decay = model.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is network.embed.weight for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(network.parameters()))


# ------------------------------------------------------------------------------------------------------ checkpoints
def fit_with_checkpoint(tmp_path: Path, data: Path, max_steps: int, ckpt_path: str | None = None) -> L.Trainer:
    """Fit a tiny Q-K=V model, saving a checkpoint after every step (``step=3.ckpt``, ..., and ``last.ckpt``)."""
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")
    run = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                    callbacks=[checkpoint], num_sanity_val_steps=0, limit_val_batches=2, enable_model_summary=False)
    model = LanguageModel(network=GPTConfig(n_layer=1, n_head=2, d_model=16, max_seq_len=16),
                          attention=AttentionConfig(sharing="Q-K=V"))
    run.fit(model, datamodule(tmp_path, data), ckpt_path=ckpt_path)
    return run


def test_load_from_checkpoint_rebuilds_the_model_and_mid_epoch_resume_equals_the_uninterrupted_run(tmp_path, data):
    full = fit_with_checkpoint(tmp_path / "full", data, 5)
    middle = tmp_path / "full" / "ckpt" / "step=3.ckpt"
    raw = torch.load(middle, weights_only=True)  # plain hyper-parameters only
    assert raw["hyper_parameters"]["attention"]["sharing"] == "Q-K=V" and raw["tokens_seen"] == 3 * 4 * 16
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "full" / "ckpt" / "last.ckpt")
    assert loaded.network is not None and loaded.attention_config.sharing == "Q-K=V"
    final = full.lightning_module.network.state_dict()
    for name, value in loaded.network.state_dict().items():
        assert torch.equal(value, final[name]), name

    resumed = fit_with_checkpoint(tmp_path / "resumed", data, 5, ckpt_path=str(middle))  # steps 4 and 5 again
    for name, value in resumed.lightning_module.network.state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=1e-6, msg=name)  # the same batches, in order
    assert resumed.lightning_module.tokens_seen == 5 * 4 * 16
    assert resumed.callback_metrics["train/tokens"].item() == 5 * 4 * 16


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path, data):
    fit_with_checkpoint(tmp_path, data, 1)
    other = LanguageModel(network=GPTConfig(n_layer=1, n_head=2, d_model=32, max_seq_len=16),
                          attention=AttentionConfig(sharing="Q-K=V"))
    with pytest.raises(CheckpointError, match=r"network\.d_model: checkpoint 16, config 32"):
        trainer(tmp_path, limit_val_batches=1).validate(other, datamodule(tmp_path, data),
                                                        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))


def trained_checkpoint(tmp_path: Path, data: Path) -> Path:
    args = lm_config_args(tmp_path, data, "wikitext2-offline", *SMALL, "--trainer.max_steps", "3",
                    "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "2",
                    "--trainer.log_every_n_steps", "1")
    assert main(["fit", *args]) == 0
    (last,) = (tmp_path / "logs").glob("*/version_0/checkpoints/last.ckpt")
    return last


def test_predict_from_a_checkpoint_writes_text_and_cache_equals_no_cache(tmp_path, data, capsys):
    last = trained_checkpoint(tmp_path, data)
    outputs = {}
    for use_cache in ("true", "false"):
        out = tmp_path / f"generated-{use_cache}.jsonl"
        args = lm_config_args(tmp_path, data, "wikitext2-offline", "--ckpt_path", str(last),
                        "--model.generation.output_file", str(out), "--model.generation.use_cache", use_cache,
                        "--model.generation.max_new_tokens", "8", "--trainer.logger", "false")
        assert main(["predict", *args]) == 0
        outputs[use_cache] = [json.loads(line) for line in out.read_text().splitlines()]
    printed = capsys.readouterr().out
    log_dir = last.parent.parent  # TensorBoard: the metrics and the whole config as hyper-parameters
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/tokens", "val/loss", "val/ppl", "lr-AdamW/decay", "lr-AdamW/no_decay"}
    assert expected <= scalars, scalars
    hparams = (log_dir / "hparams.yaml").read_text()
    for key in ("model.init_args.attention.sharing: QKV", "model.init_args.optimizer.lr: 0.002",
                "data.init_args.seq_len: 16", "trainer.gradient_clip_val: 1.0"):
        assert key in hparams, key
    assert outputs["true"] == outputs["false"]  # greedy: same tokens with and without the KV cache
    assert [o["prompt"] for o in outputs["true"]] == [" = Robert Boulter = \n", " The game was released in"]
    assert all(len(o["ids"]) == 8 and isinstance(o["completion"], str) for o in outputs["true"])
    assert "--- prompt 1: ' The game was released in'" in printed
    assert outputs["true"][1]["completion"] in printed


# --------------------------------------------------------------------------------------------------------- bad input
def run_failing(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def test_seq_len_beyond_the_positions_is_a_clear_error(tmp_path, data, capsys):
    args = lm_config_args(tmp_path, data, "wikitext2-offline", *SMALL, "--data.seq_len", "32",
                          "--trainer.fast_dev_run", "1")
    err = run_failing(capsys, ["fit", *args])
    assert "data.seq_len=32 exceeds model.network.max_seq_len=16" in err


def test_missing_files_without_internet_is_a_clear_error(tmp_path, data, capsys):
    args = lm_config_args(tmp_path, tmp_path / "nowhere", "wikitext2", *SMALL, "--trainer.fast_dev_run", "1")
    err = run_failing(capsys, ["fit", *args])
    assert "wiki.train.tokens" in err and "data.download: true" in err and "data.data_dir" in err


def test_empty_file_is_a_clear_error(tmp_path, data, capsys):
    broken = write_wikitext(tmp_path / "broken")
    (broken / "wiki.valid.tokens").write_text("")
    args = lm_config_args(tmp_path, broken, "wikitext2", *SMALL, "--trainer.fast_dev_run", "1")
    err = run_failing(capsys, ["fit", *args])
    assert "wiki.valid.tokens (data.val_file) is empty" in err


def test_cache_of_another_tokenizer_is_an_error_when_rebuilding_is_off(tmp_path, data, capsys):
    changed = write_wikitext(tmp_path / "changed")
    assert main(["fit", *lm_config_args(tmp_path, changed, "wikitext2", *SMALL, "--trainer.fast_dev_run", "1")]) == 0
    with open(changed / "wiki.train.tokens", "a", encoding="utf-8") as f:  # another vocabulary: another tokenizer
        f.write(" zebra zebra zebra zebra zebra zebra zebra zebra zebra zebra zebra zebra zebra zebra zebra \n" * 30)
    args = lm_config_args(tmp_path, changed, "wikitext2", *SMALL, "--trainer.fast_dev_run", "1",
                    "--data.rebuild_cache", "false")
    err = run_failing(capsys, ["fit", *args])
    assert "data.rebuild_cache" in err and "vocabulary" in err


@pytest.mark.skipif(not GPT2_RANKS.is_file(), reason="shared GPT-2 ranks file not present")
def test_checkpoint_of_another_tokenizer_is_a_clear_error(tmp_path, data, capsys):
    last = trained_checkpoint(tmp_path, data)
    args = lm_config_args(tmp_path, data, "wikitext2-offline", "--ckpt_path", str(last), "--trainer.logger", "false",
                    "--data.tokenizer", "gpt2", "--data.bpe_file", str(GPT2_RANKS))
    err = run_failing(capsys, ["predict", *args])
    assert "tokenizer" in err and "data.tokenizer" in err
