"""Language modelling with the GPT decoder: exact perplexity, tokens seen, and KV-cached generation for ``predict``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import Metric

from qkv_lightning.errors import CheckpointError, ConfigError
from qkv_lightning.files import atomic_open
from qkv_lightning.hparams import as_config
from qkv_lightning.nn.gpt import GPT, IGNORE_INDEX, GPTConfig
from qkv_lightning.resume import differing_settings, weight_problems
from qkv_lightning.tasks.base import TaskModule


@dataclass
class GenerationConfig:
    """How ``predict`` continues the data's prompts."""

    max_new_tokens: int = 64
    """Tokens to generate per prompt (fewer if the prompt plus these would exceed network.max_seq_len)."""

    temperature: float = 0.0
    """Sampling temperature; 0 means greedy decoding (always the most likely token)."""

    top_k: int | None = None
    """Sample only among the k most likely tokens (None: all of them)."""

    seed: int = 0
    """Seed of the sampling random numbers (prompt i uses seed + i)."""

    use_cache: bool = True
    """Decode with the KV cache (False recomputes the whole sequence at every step; same tokens, slower)."""

    echo: bool = True
    """Print each prompt and its continuation."""

    output_file: str | None = None
    """Also write the generations as JSON lines to this file (a rank suffix is added with several processes). An
    existing file is an error unless ``overwrite`` is set; the checkpoint being read is never overwritten."""

    overwrite: bool = False
    """Replace an existing ``output_file`` (never the checkpoint being read)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"generation.max_new_tokens={self.max_new_tokens} must be >= 0.")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # also NaN
            raise ConfigError(f"generation.temperature={self.temperature} must be a finite number >= 0 (0 is greedy).")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"generation.top_k={self.top_k} must be at least 1 (or null for no limit).")


class SummedLoss(Metric):
    """Summed token loss and token count, reduced by summing across processes: exact perplexity over a split."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: Tensor, count: Tensor) -> None:
        # out of place: states reset under inference mode (trainer.validate) are inference tensors
        self.total = self.total + loss_sum.detach().to(self.total.dtype)
        self.count = self.count + count.to(self.count.dtype)

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.total, self.count


def check_same_vocabulary(expected: dict, actual: dict, subject: str) -> None:
    """Raise a :class:`CheckpointError` if two data specs differ in tokenizer or vocabulary size (the token ids
    would mean other words)."""
    for key in ("tokenizer", "vocab_size"):
        if key in expected and key in actual and expected[key] != actual[key]:
            raise CheckpointError(
                f"{subject} with {key}={expected[key]!r}, but the data gives {actual[key]!r}: use the data settings "
                "of its training run (data.tokenizer, data.train_file, data.bpe_file, data.tokenizer_file)."
            )


class LanguageModel(TaskModule):
    """Next-token prediction with the GPT decoder on any attention variant.

    Logs ``train/loss``, ``train/tokens`` (tokens seen, all processes together), and per evaluation split
    ``val/loss`` and ``val/ppl`` (exact: summed loss over every scored token divided by their count, across batches
    and processes), plus ``val/word_ppl`` (perplexity per word-level token of the original text) when the tokens are
    not words. With padded documents (batches ``(inputs, targets, padding)``, ``data.document_mode: padded``) the
    padding is scored only if the data's ``score_padding`` says so, and ``val/ppl_with_padding`` and
    ``val/ppl_without_padding`` give both perplexities. ``predict`` continues the datamodule's prompts with the KV
    cache.

    Args:
        network: the decoder's sizes and options; ``vocab_size`` None takes the data's vocabulary.
        generation: decoding settings for ``predict``.
        **kwargs: the settings every task shares (``attention``, ``optimizer``, ``data_spec``, ``compile``,
            ``activation_checkpointing``, ``init_from``, ``distill``), declared once in :class:`TaskModule`.
    """

    network: GPT | None

    def __init__(
        self, network: GPTConfig = GPTConfig(), generation: GenerationConfig = GenerationConfig(), **kwargs: Any
    ) -> None:
        super().__init__(as_config(GPTConfig, network), **kwargs)
        self.generation_config = as_config(GenerationConfig, generation)
        # generation settings are left out of the hyper-parameters, so that `predict --ckpt_path` takes them from the
        # config and command line instead of the checkpoint
        self.save_task_hyperparameters(network=self.network_config)
        self.val_loss_sum = SummedLoss()
        self.test_loss_sum = SummedLoss()
        # padded documents (data.document_mode: padded): loss sums with and without the padding targets
        self.padding_sums = torch.nn.ModuleDict(
            {f"{s}_{k}": SummedLoss() for s in ("val", "test") for k in ("with_padding", "without_padding")}
        )
        self._padded_stages: set[str] = set()
        self.tokens_seen = 0
        self.generated: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------------- building
    autoregressive = True

    def resolved_network_config(self, data_spec: dict) -> GPTConfig:
        """The network config with the data's vocabulary filled in, checked against the data."""
        config = self.network_config
        vocab = data_spec.get("vocab_size")
        if config.vocab_size is None:
            if vocab is None:
                raise ConfigError("model.network.vocab_size is null and the data gives no vocab_size; set one of them.")
            config = replace(config, vocab_size=int(vocab))
        elif vocab is not None and config.vocab_size < vocab:
            raise ConfigError(
                f"model.network.vocab_size={config.vocab_size} is smaller than the data's vocabulary ({vocab} tokens); "
                "set it to null (take the data's) or to at least the data's size."
            )
        seq_len = data_spec.get("seq_len")
        if seq_len is not None and seq_len > config.max_seq_len:
            raise ConfigError(
                f"data.seq_len={seq_len} exceeds model.network.max_seq_len={config.max_seq_len}, the longest sequence "
                "the model has positions for; lower data.seq_len or raise model.network.max_seq_len."
            )
        return config

    def check_data_spec(self, spec: dict, stage: str = "fit") -> None:
        """``data.seq_len`` against ``network.max_seq_len`` (and the vocabulary, if known), before any data is read.
        ``predict`` crops its prompts to the model's positions, so the data's ``seq_len`` does not matter there."""
        if stage == "predict":
            spec = {k: v for k, v in spec.items() if k != "seq_len"}
        config = self.network_config
        if config.vocab_size is None and spec.get("vocab_size") is None:
            spec = {**spec, "vocab_size": 1}  # the vocabulary is only known after tokenizing
        self.resolved_network_config(spec)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "spec"):
            return
        live = datamodule.spec()
        made_for = "the model was made for data (model.data_spec, or the checkpoint's)"
        check_same_vocabulary(self.data_spec, live, made_for)
        if stage == "predict":  # prompts are cropped to the model's positions; the data's seq_len does not matter
            return
        if "seq_len" in live and self.data_spec.get("seq_len") != live["seq_len"]:
            self.data_spec["seq_len"] = live["seq_len"]
            self.hparams["data_spec"] = self.data_spec
        self.resolved_network_config(self.data_spec)  # data.seq_len against network.max_seq_len

    def build_network(self, data_spec: dict) -> GPT:
        return GPT(self.resolved_network_config(data_spec), self.attention_config)

    def example_batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Random token ids and targets, (B, T) each, T the data's ``seq_len`` (or the model's positions)."""
        t = self.cost().tokens_per_sample  # (raises a ConfigError without the data's spec)
        vocab = self.data_spec.get("vocab_size") or self.resolved_network_config(self.data_spec).vocab_size
        inputs = torch.randint(0, vocab, (batch_size, t), generator=generator)  # (B, T)
        return inputs, torch.randint(0, vocab, (batch_size, t), generator=generator)  # (B, T)

    # ------------------------------------------------------------------------------------------------- training
    def training_loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        inputs, targets = batch[0], self.scored_targets(batch)  # (B, T), (B, T)
        return self.network.loss(inputs, targets)

    @property
    def score_padding(self) -> bool:
        """Whether the loss scores padding targets (the data's ``score_padding``; batches without padding: moot)."""
        return bool(getattr(getattr(self._trainer, "datamodule", None), "score_padding", False))

    def scored_targets(self, batch: tuple[Tensor, ...]) -> Tensor:
        """The targets (B, T) the training loss scores: padding (a batch's third element, (B, T) bool, from
        :mod:`qkv_lightning.data.documents`) becomes :data:`IGNORE_INDEX` unless the data scores padding."""
        if len(batch) < 3 or self.score_padding:
            return batch[1]
        return batch[1].masked_fill(batch[2], IGNORE_INDEX)

    def attention_maps(self, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        return self.network.hidden(batch[0][:1], need_weights=True)[1]  # per block (1, H, T, T)

    def distill_outputs(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The token loss, the student's logits (B*T, V) (log-probabilities with an adaptive softmax), the inputs
        and the mask of the targets that count (not ``IGNORE_INDEX``)."""
        inputs, targets = batch  # (B, T), (B, T)
        logits = self.network(inputs).flatten(0, 1).float()  # (B*T, V)
        flat = targets.flatten()  # (B*T,)
        hard = F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX)
        return hard, logits, inputs, flat != IGNORE_INDEX

    def teacher_logits(self, network: torch.nn.Module, inputs: Tensor) -> Tensor:
        return network(inputs).flatten(0, 1)  # (B*T, V)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        targets = batch[1]  # (B, T)
        loss = self.distilled_training_loss(batch)[0] if self.distilling else self.training_loss(batch)
        self.tokens_seen += targets.numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen
        entry = self.data_tokenizer_entry()
        if entry is not None:
            from qkv_lightning.data.hf_tokenizer import CHECKPOINT_ENTRY

            checkpoint[CHECKPOINT_ENTRY] = entry

    def data_tokenizer_entry(self) -> dict[str, Any] | None:
        """The data's own tokenizer (``data.tokenizer: hf``) as a checkpoint stores it
        (:meth:`~qkv_lightning.data.hf_tokenizer.HFTokenizer.checkpoint_entry`), so that ``predict``, ``validate``,
        ``export`` read it from the checkpoint (``--data.tokenizer_file CKPT``) as from an imported one; None without
        a trainer's datamodule, for other tokenizers, or a tokenizer that is not the model's (``data_spec``)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        load = getattr(datamodule, "load_tokenizer", None)
        tokenizer = load() if load is not None else None
        entry = getattr(tokenizer, "checkpoint_entry", None)
        if entry is None or tokenizer.identity != (self.data_spec or {}).get("tokenizer"):
            return None
        return entry()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # fills in tied parameters that sharded checkpoints store once
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        self.check_checkpoint(checkpoint)

    def check_checkpoint_data(self, saved_spec: dict, source: str) -> None:
        """The checkpoint's tokenizer and vocabulary must be the data's (``data_spec``, from the config or the data)."""
        check_same_vocabulary(saved_spec, self.data_spec or {}, f"{source} was trained")

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Explain a checkpoint that does not fit this model or data, instead of a bare state-dict error (for loads
        that do not pass the CLI's checks, e.g. ``load_from_checkpoint`` in a script)."""
        hparams = checkpoint.get("hyper_parameters") or {}
        self.check_checkpoint_data(hparams.get("data_spec") or {}, "the checkpoint")
        trainer = self._trainer
        wrapped = trainer is not None and trainer.strategy.restore_checkpoint_after_setup
        if wrapped or self.network is None or "state_dict" not in checkpoint:
            return  # sharded strategies load their own layout
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
        problems = weight_problems(expected, found)
        if problems:
            differ = [d for d in differing_settings(hparams, dict(self.hparams)) if not d.startswith("network.vocab")]
            raise CheckpointError(
                f"the checkpoint's weights do not fit the configured model ({'; '.join(problems[:5])}"
                f"{' ...' if len(problems) > 5 else ''}). Use the model settings it was trained with"
                f"{': ' + '; '.join(differ) if differ else ''}."
            )

    # ----------------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: tuple[Tensor, ...], metric: SummedLoss, stage: str = "val") -> None:
        inputs, targets = batch[0], batch[1]  # (B, T), (B, T)
        if len(batch) < 3:
            loss_sum = self.network.loss(inputs, targets, reduction="sum")
            metric.update(loss_sum, (targets != IGNORE_INDEX).sum())
            return
        losses = self.network.loss(inputs, targets, reduction="none")  # (B, T), 0 where ignored
        scored = targets != IGNORE_INDEX  # (B, T)
        documents = scored & ~batch[2]  # (B, T): padding left out
        self.padding_sums[f"{stage}_with_padding"].update(losses[scored].sum(), scored.sum())
        self.padding_sums[f"{stage}_without_padding"].update(losses[documents].sum(), documents.sum())
        main = scored if self.score_padding else documents
        metric.update(losses[main].sum(), main.sum())
        self._padded_stages.add(stage)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss_sum, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss_sum, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", self.val_loss_sum)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", self.test_loss_sum)

    def _log_evaluation(self, stage: str, metric: SummedLoss) -> None:
        total, count = metric.compute()  # summed over processes
        metric.reset()
        if int(count) == 0:
            return
        loss = (total / count).float()
        self._log_reduced(f"{stage}/loss", loss, prog_bar=stage == "val")
        self._log_reduced(f"{stage}/ppl", loss.exp())
        self._log_reduced(f"{stage}/tokens", count.float())
        datamodule = getattr(self.trainer, "datamodule", None)
        ratio = datamodule.tokens_per_word(stage) if hasattr(datamodule, "tokens_per_word") else None
        if ratio is not None and ratio != 1.0:  # total loss / words = mean loss * tokens / words
            self._log_reduced(f"{stage}/word_ppl", (loss * ratio).exp())
        if stage in self._padded_stages:  # padded documents: the perplexity with and without the padding scored
            self._padded_stages.discard(stage)
            for kind in ("with_padding", "without_padding"):
                total, count = self.padding_sums[f"{stage}_{kind}"].compute()
                self.padding_sums[f"{stage}_{kind}"].reset()
                if int(count):
                    self._log_reduced(f"{stage}/ppl_{kind}", (total / count).float().exp())
                    self._log_reduced(f"{stage}/tokens_{kind}", count.float())

    def _log_reduced(self, name: str, value: Tensor, **kwargs: Any) -> None:
        """Log an epoch value that every process already holds in full (made from :class:`SummedLoss` sums, which
        are summed across processes). ``sync_dist`` with ``max``, which gives equal values back unchanged, tells
        Lightning that it is synced under DDP / FSDP (no "use sync_dist=True" warning) without reducing it again
        (a mean of the equal values would round on 3 processes; a sum would multiply them)."""
        self.log(name, value, sync_dist=True, reduce_fx="max", **kwargs)

    # ----------------------------------------------------------------------------------------------- generation
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Continue each prompt of the batch (``{"ids": (B, T), "prompt": [text]}``); returns text (or ids)."""
        config = self.generation_config
        limit = self.network.config.max_seq_len
        ids = batch["ids"][:, -max(1, limit - config.max_new_tokens) :]  # (B, T): keep the prompt's end
        n_new = min(config.max_new_tokens, limit - ids.shape[1])
        generator = torch.Generator(device=ids.device).manual_seed(config.seed + batch_idx)
        n_valid = (self.data_spec or {}).get("vocab_size")
        tokens = self.network.generate(
            ids, n_new, config.temperature, config.top_k, config.use_cache, generator, n_valid=n_valid
        )  # (B, T + n_new)
        datamodule = getattr(self.trainer, "datamodule", None)
        results = []
        for i, prompt in enumerate(batch["prompt"]):
            new_ids = tokens[i, ids.shape[1] :].tolist()
            result = {"prompt": prompt, "ids": new_ids}
            if hasattr(datamodule, "decode"):
                result["completion"] = datamodule.decode(new_ids)
            if config.echo:
                completion = str(result.get("completion", new_ids))
                gap = " " if prompt and completion and not (prompt[-1].isspace() or completion[0].isspace()) else ""
                print(f"--- prompt {batch_idx}: {prompt!r}\n{prompt}{gap}{completion}\n", flush=True)
            results.append(result)
        self.generated.extend(results)
        return results

    def output_paths(self, world_size: int) -> list[Path]:
        """The files ``predict`` writes: ``output_file``, or one per rank (``<stem>.rank<k><suffix>``)."""
        path = self.generation_config.output_file
        if not path:
            return []
        path = Path(path).expanduser()
        if world_size <= 1:
            return [path]
        return [path.with_name(f"{path.stem}.rank{rank}{path.suffix}") for rank in range(world_size)]

    def check_output_file(self, ckpt_path: str | None, world_size: int = 1, rank: int | None = None) -> None:
        """Refuse a ``generation.output_file`` that is a folder, the checkpoint being read (or lies in it), or an
        existing file without ``generation.overwrite``; checked before anything is generated.

        Raises:
            ConfigError: naming the file and the setting.
        """
        paths = self.output_paths(world_size)
        if rank is not None and paths:
            paths = [paths[rank if world_size > 1 else 0]]
        checkpoint = Path(ckpt_path).expanduser().resolve() if ckpt_path and "://" not in str(ckpt_path) else None
        for path in paths:
            resolved = path.resolve()
            if checkpoint is not None and (resolved == checkpoint or checkpoint in resolved.parents):
                raise ConfigError(
                    f"model.generation.output_file={path} is the checkpoint being read (ckpt_path={ckpt_path}); "
                    "name another file: the checkpoint is never overwritten, not even with generation.overwrite."
                )
            if path.is_dir():
                raise ConfigError(f"model.generation.output_file={path} is a folder; name a file to write into.")
            if path.exists() and not self.generation_config.overwrite:
                raise ConfigError(
                    f"model.generation.output_file={path} exists already; name another file, or set "
                    "--model.generation.overwrite true to replace it. Nothing was generated."
                )

    def on_predict_start(self) -> None:
        self.check_output_file(self.trainer.ckpt_path, self.trainer.world_size, self.trainer.global_rank)

    def on_predict_epoch_start(self) -> None:
        self.generated = []

    def on_predict_epoch_end(self) -> None:
        paths = self.output_paths(self.trainer.world_size)
        if not paths:
            return
        path = paths[self.trainer.global_rank if len(paths) > 1 else 0]
        with atomic_open(path, "w", replace=self.generation_config.overwrite) as f:
            for result in self.generated:
                f.write(json.dumps(result) + "\n")
        rank_zero_info(f"wrote {len(self.generated)} generations to {path}")



def load_gpt(path: str | Path, weights_only: bool = True) -> tuple[GPT, dict[str, Any]]:
    """The GPT of a ``LanguageModel`` checkpoint (eval mode, on CPU, depth-factorised projections fused) and the
    checkpoint's hyper-parameters (:func:`load_gpt_checkpoint` without the checkpoint)."""
    model, hparams, _ = load_gpt_checkpoint(path, weights_only)
    return model, hparams


def load_gpt_checkpoint(path: str | Path, weights_only: bool = True) -> tuple[GPT, dict[str, Any], dict[str, Any]]:
    """The GPT of a ``LanguageModel`` checkpoint (eval mode, on CPU, depth-factorised projections fused), the
    checkpoint's hyper-parameters and the checkpoint's contents (its stored tokenizer, for ``export``), built by the
    one task builder (:func:`qkv_lightning.tasks.persist.load_task`).

    Raises:
        CheckpointError: the file is unreadable, not a language model's (with its data spec), or its weights do not fit.
    """
    from qkv_lightning.tasks.persist import load_task, stored_settings

    task, checkpoint = load_task(path, expected=LanguageModel, weights_only=weights_only, drop=("compile",))
    _, hparams = stored_settings(checkpoint.get("hyper_parameters"), str(path))
    if not hparams.get("data_spec"):
        raise CheckpointError(
            f"{path} is a language model's checkpoint without its data_spec; export and evaluate take checkpoints "
            "that `fit` saved for qkv_lightning.tasks.language_model.LanguageModel."
        )
    return task.network.eval().fuse(), hparams, checkpoint
