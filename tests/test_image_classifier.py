"""The image classifier end to end: every configs/vit recipe through the CLI, learning, metrics, logs, bad input."""

from __future__ import annotations

import glob
import math
import os

import lightning as L
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qkv_lightning.cli import main
from qkv_lightning.data.image_base import NO_AUGMENTATION
from qkv_lightning.data.images import CIFAR10DataModule
from qkv_lightning.lightning_cli import QKVLightningCLI
from qkv_lightning.nn.attention import AttentionConfig
from qkv_lightning.nn.sharing import CANONICAL_VARIANTS
from qkv_lightning.nn.vit import ViT, ViTConfig
from qkv_lightning.tasks.image_classifier import ImageClassifier
from qkv_lightning.tasks.optim import OptimizerConfig
from tests import run_fixtures
from tests.imagedata import write_cifar10, write_image_tree
from tests.run_fixtures import image_data_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIT_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "vit", "*.yaml")))
VARIANT_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "variants", "*.yaml")))


pytestmark = pytest.mark.usefixtures("one_thread", "plain_argv")


QUIET = [*run_fixtures.QUIET, "--data.num_workers", "0"]


def test_every_shipped_config_has_test_data() -> None:
    assert {os.path.basename(c) for c in VIT_CONFIGS} == {
        "cifar10.yaml",
        "cifar100.yaml",
        "cifar10-jpeg.yaml",
        "imagenet-vit-s16.yaml",
        "mnist.yaml",
    }


@pytest.mark.parametrize("config", VIT_CONFIGS, ids=os.path.basename)
def test_config_runs_fast_dev_run_on_cpu(config: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # logs/ and .cache/ go here
    args = ["fit", "--config", config, "--trainer.fast_dev_run", "2", "--trainer.accelerator", "cpu"]
    args += ["--data.batch_size", "4", "--model.network.n_layer", "1", *QUIET, *image_data_args(config, tmp_path)]
    assert main(args) == 0


@pytest.mark.parametrize("config", VIT_CONFIGS, ids=os.path.basename)
def test_config_parses_as_shipped(config: str) -> None:
    cli = QKVLightningCLI(args=["--config", config], run=False)
    assert isinstance(cli.model, ImageClassifier)
    assert {"LearningRateMonitor", "ModelCheckpoint"} <= {type(c).__name__ for c in cli.trainer.callbacks}
    checkpoint = next(c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint")
    assert checkpoint.save_last and checkpoint.monitor == "val/acc"
    if os.path.basename(config) == "imagenet-vit-s16.yaml":  # ViT-S/16 as published
        with torch.device("meta"):
            network = cli.model.build_network({"num_classes": 1000, "image_size": 224, "in_channels": 3})
        assert sum(p.numel() for p in network.parameters()) == 22_050_664


@pytest.mark.parametrize("variant", VARIANT_CONFIGS, ids=os.path.basename)
def test_variant_configs_layer_on_the_vit_recipes(variant: str) -> None:
    with open(variant) as file:
        wanted = yaml.safe_load(file)["model"]["init_args"]["attention"]
    for config in ("cifar10.yaml", "imagenet-vit-s16.yaml"):
        recipe = os.path.join(ROOT, "configs", "vit", config)
        with open(recipe) as file:
            n_head = yaml.safe_load(file)["model"]["init_args"]["network"]["n_head"]
        if wanted.get("n_kv_heads") and n_head % wanted["n_kv_heads"]:
            continue  # the paper's LM K/V-head variants (gqa-4, q-gqa-8, ...) need a head count they divide
        cli = QKVLightningCLI(args=["--config", recipe, "--config", variant], run=False)
        attention = cli.model.attention_config
        assert attention.sharing == AttentionConfig(sharing=wanted["sharing"]).sharing
        assert attention.n_kv_heads == wanted["n_kv_heads"]
        with torch.device("meta"):
            network = cli.model.build_network({"num_classes": 10, "image_size": 224 if "imagenet" in config else 32,
                                               "in_channels": 3})
        assert network.blocks[0].attn.sharing.name == attention.sharing


# ----------------------------------------------------------------------------------------------------- learning
def tiny_classifier(variant: str = "QKV", lr: float = 3e-3) -> ImageClassifier:
    network = ViTConfig(patch_size=8, n_layer=2, n_head=4, d_model=32, d_mlp=64, drop_path=0.0)
    optimizer = OptimizerConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0)
    return ImageClassifier(network=network, attention=AttentionConfig(variant), optimizer=optimizer)


def cifar_fixture(tmp_path, per_batch: int = 100) -> CIFAR10DataModule:
    """Official-format CIFAR-10 files of 5 x ``per_batch`` training and 50 test images; validation on the test set."""
    write_cifar10(str(tmp_path / "data"), per_batch=per_batch, n_test=50)
    dm = CIFAR10DataModule(
        root=str(tmp_path / "data"), batch_size=32, num_workers=0, augment=NO_AUGMENTATION, val_fraction=0.0
    )
    with pytest.warns(UserWarning, match="not the official"):
        dm.setup()
    return dm


def trainer(tmp_path, **kwargs) -> L.Trainer:
    values = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(default_root_dir=str(tmp_path), **{**values, **kwargs})


def test_untrained_model_predicts_uniformly(tmp_path) -> None:
    dm = cifar_fixture(tmp_path, per_batch=8)
    metrics = trainer(tmp_path).validate(tiny_classifier(), datamodule=dm, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(math.log(10), abs=1e-5)


@pytest.mark.parametrize("variant", CANONICAL_VARIANTS)
def test_every_variant_learns_the_classes(variant: str, tmp_path) -> None:
    """Class c brightens row band c: each variant must get far above chance (10%) on held-out images (0.7-0.85
    when this test was written)."""
    torch.manual_seed(0)
    dm = cifar_fixture(tmp_path)
    model = tiny_classifier(variant)
    run = trainer(tmp_path, max_epochs=6, enable_checkpointing=False)
    run.fit(model, datamodule=dm)
    accuracy = run.validate(model, datamodule=dm, verbose=False)[0]["val/acc"]
    assert accuracy >= 0.5, f"{variant}: val/acc {accuracy:.2f}"


def test_logged_metrics_match_a_direct_computation_and_checkpoints_reload(tmp_path) -> None:
    torch.manual_seed(0)
    dm = cifar_fixture(tmp_path)
    model = tiny_classifier(lr=1e-3)
    run = trainer(tmp_path, max_steps=6)  # partly trained, so that top-1 < top-5 < 1
    run.fit(model, datamodule=dm)
    logged = run.validate(model, datamodule=dm, verbose=False)[0]
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in dm.val_dataloader()])
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    top5 = logits.topk(5, dim=-1).indices
    assert logged["val/acc"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert logged["val/acc_top5"] == pytest.approx((top5 == labels[:, None]).any(-1).float().mean().item())
    assert logged["val/loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert 0 < logged["val/acc"] < logged["val/acc_top5"] < 1
    path = os.path.join(run.checkpoint_callback.dirpath, os.listdir(run.checkpoint_callback.dirpath)[0])
    restored = ImageClassifier.load_from_checkpoint(path, weights_only=True).eval()
    assert restored.hparams["data_spec"] == {"num_classes": 10, "image_size": 32, "in_channels": 3}
    images = next(iter(dm.val_dataloader()))[0]
    with torch.no_grad():
        torch.testing.assert_close(restored(images), model(images))


def test_mixup_and_cutmix_give_soft_targets_and_train(tmp_path) -> None:
    dm = cifar_fixture(tmp_path, per_batch=8)
    model = ImageClassifier(
        network=ViTConfig(patch_size=8, n_layer=1, n_head=2, d_model=16), mixup_alpha=0.8, cutmix_alpha=1.0,
        label_smoothing=0.1,
    )
    trainer(tmp_path, max_steps=2, limit_val_batches=1).fit(model, datamodule=dm)
    images, labels = next(iter(dm.train_dataloader()))
    mixed, targets = model.mix(images, labels)
    assert targets.shape == (len(labels), 10)
    torch.testing.assert_close(targets.sum(-1), torch.ones(len(labels)))
    assert (targets.max(-1).values < 1).any()  # some mass moved to the partner image's class


# ---------------------------------------------------------------------------------------------------- logging
def test_tensorboard_gets_the_metrics_learning_rate_and_whole_config(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "configs", "vit", "cifar10.yaml")
    args = ["fit", "--config", config, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1"]
    args += ["--trainer.precision", "32-true", "--data.batch_size", "16", "--model.network.n_layer", "1", *QUIET]
    with pytest.warns(UserWarning, match="not the official"):
        assert main(args + image_data_args(config, tmp_path)) == 0
    version = tmp_path / "logs" / "vit-cifar10" / "version_0"
    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/acc", "val/acc_top5"} <= tags
    assert any(tag.startswith("lr-AdamW") for tag in tags)
    with open(version / "hparams.yaml") as file:
        hparams = yaml.safe_load(file)
    assert hparams["model.init_args.attention.sharing"] == "QKV"
    assert hparams["model.init_args.optimizer.lr"] == 5e-4
    assert hparams["model.init_args.network.d_model"] == 256
    assert hparams["data.init_args.augment.randaugment"] is True
    assert (version / "checkpoints" / "last.ckpt").is_file()


# -------------------------------------------------------------------------------------------------- bad input
def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args + QUIET + ["--trainer.fast_dev_run", "1"])
    return code, " ".join(capsys.readouterr().err.split())


def test_cli_missing_data_directory(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "configs", "vit", "cifar10.yaml")
    code, err = run_cli(["fit", "--config", config, "--data.root", str(tmp_path / "none"), "--data.download", "false"],
                        capsys)
    assert code == 2 and "CIFAR-10 not found" in err and "data.download: true" in err and "Traceback" not in err
    config = os.path.join(ROOT, "configs", "vit", "cifar10-jpeg.yaml")
    code, err = run_cli(["fit", "--config", config, "--data.root", str(tmp_path / "none")], capsys)
    assert code == 2 and f"data.root={tmp_path / 'none'} does not exist" in err


def test_cli_empty_class_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    tree = write_image_tree(str(tmp_path / "tree"), ["a", "b"], 2, size=32, splits=("train", "val"))
    os.makedirs(tmp_path / "tree" / "val" / "c")
    os.makedirs(tmp_path / "tree" / "train" / "c")
    config = os.path.join(ROOT, "configs", "vit", "cifar10-jpeg.yaml")
    code, err = run_cli(["fit", "--config", config, "--data.root", tree], capsys)
    assert code == 2 and f"class folder {tmp_path / 'tree' / 'train' / 'c'} holds no images" in err


def test_cli_image_size_not_divisible_by_patch_size(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = os.path.join(ROOT, "configs", "vit", "imagenet-vit-s16.yaml")
    args = ["fit", "--config", config, *image_data_args(config, tmp_path), "--data.image_size", "40"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "image size 40 is not divisible by network.patch_size=16" in err and "data.image_size" in err


def test_cli_unreadable_image_is_skipped_and_reported(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tree = write_image_tree(str(tmp_path / "tree"), ["a", "b"], 3, size=32, splits=("train", "val"))
    (tmp_path / "tree" / "val" / "b" / "0004.jpg").write_bytes(b"\xff\xd8 broken")
    config = os.path.join(ROOT, "configs", "vit", "cifar10-jpeg.yaml")
    args = ["fit", "--config", config, "--data.root", tree, "--data.batch_size", "8", "--model.network.n_layer", "1"]
    with pytest.warns(UserWarning, match=r"skipped unreadable image file .*0004.jpg.*1 unreadable image file"):
        assert main(args + QUIET + ["--trainer.fast_dev_run", "1", "--trainer.precision", "32-true"]) == 0


def test_vit_directly_rejects_mismatched_images() -> None:
    model = ViT(ViTConfig(image_size=32, in_channels=3, num_classes=10, n_layer=1), AttentionConfig())
    with pytest.raises(Exception, match="make data.image_size and network.image_size agree"):
        model(torch.zeros(1, 3, 28, 28))
