"""What ``report`` and ``bench`` share: a task config loaded without a Trainer, the data's spec, and the variants."""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qkv_lightning.errors import ConfigError, QKVError
from qkv_lightning.nn.attention import CANONICAL_VARIANTS, AttentionConfig
from qkv_lightning.tasks.base import TaskModule
from qkv_lightning.variants import Variant, expand


@dataclass
class LoadedTask:
    """A task config, instantiated without a Trainer."""

    task: TaskModule
    datamodule: Any
    config: Any
    """The parsed config (a jsonargparse Namespace: ``config.trainer.precision`` and so on)."""
    data_spec: dict
    spec_source: str
    """Where ``data_spec`` came from, in words."""


@dataclass
class VariantOptions:
    """The options ``report``, ``bench`` and ``bench-decode`` share, besides ``--config`` and the config's own."""

    variants: list[str] = field(default_factory=lambda: list(CANONICAL_VARIANTS))
    """sharing variants (QKV, Q=K-V, Q-K=V, Q=V-K, Q=K=V or aliases), e.g. '[QKV, Q-K=V]'; default: all five"""
    n_kv_heads: list[int] | None = None
    """K/V head counts (GQA; 1 is MQA) to add for the variants that keep Q separate (QKV, Q-K=V), e.g. '[4, 1]';
    default: the config's attention.n_kv_heads, if set"""
    data_spec: dict | None = None
    """what the data decides, e.g. '{"vocab_size": 33278, "seq_len": 256}', instead of asking the datamodule"""


def load_task(
    configs: Sequence[str], overrides: Sequence[str] = (), data_spec: dict | None = None, prepare: bool = True
) -> LoadedTask:
    """Instantiate the task and datamodule of ``configs`` (plus command-line ``overrides``) and find the data spec.

    The spec is taken, in this order, from ``data_spec``, the config's ``model.data_spec``, the datamodule's
    ``spec()``, the network config's own values (e.g. ``network.vocab_size``), and the datamodule's ``spec()`` after
    ``prepare_data()`` (which may download or tokenize, so only with ``prepare``).
    """
    from qkv_lightning.lightning_cli import QKVLightningCLI

    args = [arg for path in configs for arg in ("--config", path)] + list(overrides)
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # no "Seed set to ..." line in the output
    try:
        with warnings.catch_warnings():  # LightningCLI warns that sys.argv (pytest's, say) is not what it parses
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            task, datamodule, config = QKVLightningCLI.instantiate_without_trainer(args)
    finally:
        seed_log.setLevel(level)
    if not isinstance(task, TaskModule):
        raise ConfigError(f"model.class_path must name one of qkv_lightning's tasks, got {type(task).__name__}.")
    spec, source = resolve_data_spec(task, datamodule, data_spec, prepare)
    task.data_spec = dict(spec)
    return LoadedTask(task, datamodule, config, task.data_spec, source)


def _network_values(task: TaskModule) -> dict:
    """Values the data would decide that the network config sets itself (None where it leaves them to the data)."""
    config = task.network_config
    names = ("vocab_size", "num_classes", "image_size", "in_channels")
    return {name: getattr(config, name) for name in names if getattr(config, name, None) is not None}


def _complete(task: TaskModule, spec: dict) -> bool:
    """Whether the network can be resolved with ``spec``."""
    from qkv_lightning.accounting import network_cost

    try:
        network_cost(task.resolved_network_config(spec), task.attention_config, spec.get("seq_len"))
    except (ConfigError, KeyError, TypeError):
        return False
    return True


def resolve_data_spec(
    task: TaskModule, datamodule: Any, given: dict | None = None, prepare: bool = True
) -> tuple[dict, str]:
    """The data spec and where it came from (see :func:`load_task`).

    Raises:
        ConfigError: if none of the sources gives what the network needs.
    """
    if given:
        return dict(given), "--data_spec"
    if task.data_spec:
        return dict(task.data_spec), "model.data_spec (config)"
    if datamodule is None or not hasattr(datamodule, "spec"):
        raise ConfigError(
            "the config has no qkv_lightning datamodule to ask for the data's values: add data.class_path, or pass "
            '--data_spec \'{"vocab_size": ...}\'.'
        )
    name = type(datamodule).__name__
    failure = ""
    try:
        return dict(datamodule.spec()), f"{name}.spec()"
    except (QKVError, OSError) as error:
        failure = str(error)
    partial = {k: getattr(datamodule, k) for k in ("seq_len",) if isinstance(getattr(datamodule, k, None), int)}
    own = {**partial, **_network_values(task)}
    if _complete(task, own):
        settings = [f"model.network.{k}" for k in _network_values(task)] + [f"data.{k}" for k in partial]
        return own, f"the settings {', '.join(settings)} ({name}.spec() needs the data, which is not prepared)"
    official = published_vocabulary(datamodule)
    if official is not None and _complete(task, {**own, "vocab_size": official[0]}):
        return {**own, "vocab_size": official[0]}, official[1]
    if prepare and hasattr(datamodule, "prepare_data"):
        try:
            datamodule.prepare_data()
            return dict(datamodule.spec()), f"{name}.spec() after prepare_data()"
        except (QKVError, OSError) as error:
            failure = str(error)
    raise ConfigError(
        f"cannot find the values the data decides for {type(task).__name__}: {failure} Make the data available, set "
        'them in the network config (e.g. model.network.vocab_size), or pass --data_spec \'{"vocab_size": ...}\'.'
    )


def published_vocabulary(datamodule: Any) -> tuple[int, str] | None:
    """The official word vocabulary size of a WikiText release trained on its official training file, and where it
    comes from; None for other data."""
    release = getattr(datamodule, "release", None)
    files = getattr(datamodule, "files", {})
    if getattr(datamodule, "tokenizer_kind", None) != "word" or release is None or not isinstance(files, dict):
        return None
    if files.get("train") != "wiki.train.tokens":
        return None
    return release.vocab_size, (
        f"the official {release.title} word vocabulary ({release.vocab_size:,} types, published with the data set; "
        "its files are not prepared here) and data.seq_len"
    )


def variants_of(
    base: AttentionConfig, n_head: int, sharing: Sequence[str], n_kv_heads: Sequence[int] | None = None
) -> list[Variant]:
    """Each sharing variant with all heads, then with each K/V head count for the variants that keep Q separate
    (:func:`qkv_lightning.variants.expand`), all with ``base``'s symmetry breakers; apply one to the config with
    ``variant.attention_config(base)``, which keeps ``base``'s other attention settings.

    The config's own ``n_kv_heads`` is added to ``n_kv_heads`` when it differs from ``n_head``.

    Raises:
        ConfigError: for unknown variant names or K/V head counts that do not divide ``n_head``.
    """
    breakers = Variant.of(base, n_head).breakers
    kv_counts = [k for k in dict.fromkeys([*(n_kv_heads or []), base.n_kv_heads]) if k not in (None, n_head)]
    out: list[Variant] = []
    for kv in [None, *kv_counts]:  # all heads first, then each K/V head count
        found, _ = expand(sharing, [kv], [breakers], n_head=n_head)
        out += [variant for variant in found if variant not in out]
    return out


def baseline_of(base: AttentionConfig, n_head: int) -> Variant:
    """The reference every ratio is taken against: ``QKV`` with all heads and the same breakers as ``base``."""
    return Variant("QKV", None, Variant.of(base, n_head).breakers)


def task_variant(task: TaskModule, attention: AttentionConfig) -> TaskModule:
    """A new task like ``task`` (same hyper-parameters and data spec) with another attention variant."""
    accepted = inspect.signature(type(task).__init__).parameters
    kwargs = {k: v for k, v in task.hparams.items() if k in accepted}
    kwargs["attention"] = attention
    kwargs["data_spec"] = task.data_spec
    return type(task)(**kwargs)
