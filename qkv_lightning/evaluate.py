"""``evaluate``: downstream tasks of a trained language model through lm-eval-harness (the paper's protocol).

Run: ``python cli.py evaluate --ckpt_path logs/.../last.ckpt --tasks '[hellaswag, piqa, arc_easy, winogrande]'
[--num_fewshot 5] [--limit N] [--include_path my_tasks/] [--output results.json]``

The checkpoint's GPT (any attention variant) is wrapped as an lm-eval ``LM`` (:mod:`qkv_lightning.harness`):
log-likelihoods from one forward pass, rolling log-likelihoods in disjoint windows, greedy generation on the KV
cache. Text is tokenized with the model's own tokenizer: the Hugging Face tokenizer its checkpoint stores (``import``
of a Llama-family folder or GGUF file, ``fit`` with ``data.tokenizer: hf``, ``convert`` of either; read weights-only),
else the GPT-2 BPE it was trained with: ``--bpe_file``, else the checkpoint's data setting ``bpe_file``, whose identity
must be the one recorded in the checkpoint (word-level models cannot be evaluated). The paper scores its LMs 5-shot
on HellaSwag, PIQA, ARC and Winogrande; those tasks download their data sets from the Hugging Face hub on first use.
``--include_path`` adds task YAML files (lm-eval's format, e.g. a local JSON data set: ``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}``); lm-eval's task files may name Python functions (``!function``), so include only
task folders you trust. Results are printed as lm-eval's table and written as JSON to ``--output`` (default:
``<checkpoint>.lm_eval.json`` beside the checkpoint; never overwritten without ``--overwrite``). Needs the optional
``lm-eval`` package (``pip install 'qkv-lightning[eval]'``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonargparse

from qkv_lightning.command_line import command_parser, parse, torch_device
from qkv_lightning.errors import CheckpointError, ConfigError


@dataclass
class EvaluateOptions:
    """The options of ``evaluate``."""

    ckpt_path: str
    """a language model's checkpoint (fit, convert or import)"""
    tasks: list[str]
    """lm-eval task names, e.g. '[hellaswag, piqa, arc_easy]'"""
    num_fewshot: int | None = None
    """few-shot examples per prompt (task default: 0)"""
    limit: float | None = None
    """documents per task (for quick checks; <1: fraction)"""
    include_path: str | None = None
    """folder of extra lm-eval task YAML files (trusted)"""
    bpe_file: str | None = None
    """GPT-2 .tiktoken ranks (default: the checkpoint's data.bpe_file); a stored tokenizer needs none"""
    batch_size: int = 16
    """requests per forward pass"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    output: str | None = None
    """JSON results file (default: <checkpoint>.lm_eval.json)"""
    overwrite: bool = False
    """replace an existing --output file"""
    log_samples: bool = False
    """also write every request and response to the JSON"""
    seed: int = 1234
    """seed of lm-eval's few-shot sampling"""
    weights_only: bool = True
    """load the checkpoint with torch's safe loading"""


def parser() -> jsonargparse.ArgumentParser:
    """The parser of ``evaluate`` (:mod:`qkv_lightning.command_line`)."""
    return command_parser("evaluate", EvaluateOptions, description=__doc__.split("\n\n")[0])


def load_tokenizer(
    checkpoint: dict[str, Any], hparams: dict[str, Any], bpe_file: str | None, where: str
) -> Any:
    """The tokenizer a checkpoint's model was trained with: the one the checkpoint stores (``import`` of a Hugging
    Face folder or GGUF file, ``fit`` with ``data.tokenizer: hf``, ``convert`` of either; read weights-only and
    checked against its ``data_spec``), else the GPT-2 BPE of ``bpe_file`` or of its data's ``bpe_file``, checked
    against the identity the checkpoint recorded.

    Args:
        checkpoint: the checkpoint's contents.
        hparams: its hyper-parameters (with ``data_spec``).
        bpe_file: ``--bpe_file``.
        where: the checkpoint, as errors name it.

    Raises:
        ConfigError: ``--bpe_file`` for a checkpoint that stores its own tokenizer, or no BPE file to read.
        CheckpointError: a word-level model, a Hugging Face tokenizer the checkpoint does not store, or a BPE other
            than the model's.
    """
    from qkv_lightning.data.hf_tokenizer import HFTokenizer
    from qkv_lightning.data.tokenizers import BPETokenizer

    stored = HFTokenizer.from_checkpoint(checkpoint, where)
    if stored is not None:
        if bpe_file:
            raise ConfigError(
                f"--bpe_file {bpe_file}: {where} stores the tokenizer its model was trained with ({stored.identity}), "
                "which evaluate uses; leave --bpe_file out."
            )
        return stored
    recorded = (hparams.get("data_spec") or {}).get("tokenizer")
    if isinstance(recorded, str) and recorded.startswith("hf:"):
        raise CheckpointError(
            f"{where}'s model was trained with a Hugging Face tokenizer (data_spec.tokenizer={recorded}), but the "
            "checkpoint does not store it (it was written before fit stored the tokenizer of its data): use a "
            "checkpoint that fit with data.tokenizer: hf, import or convert wrote."
        )
    if isinstance(recorded, str) and not recorded.startswith("bpe:"):
        raise CheckpointError(
            f"the checkpoint's model was trained on {recorded.split(':')[0]}-level tokens (data_spec.tokenizer="
            f"{recorded}); lm-eval's tasks are text, so evaluate needs a model trained with data.tokenizer: gpt2 or "
            "hf."
        )
    datamodule = checkpoint.get("datamodule_hyper_parameters") or {}
    path = bpe_file or datamodule.get("bpe_file")
    if not path:
        raise ConfigError("the checkpoint names no GPT-2 BPE file; give the model's .tiktoken ranks with --bpe_file.")
    tokenizer = BPETokenizer.from_ranks_file(path)
    if recorded is not None and tokenizer.identity != recorded:
        raise CheckpointError(
            f"--bpe_file {path} is tokenizer {tokenizer.identity}, but the model was trained with {recorded}; give "
            "the BPE file of its training run."
        )
    return tokenizer


def task_manager(names: list[str], include_path: str | None) -> Any:
    """lm-eval's task index: only ``include_path`` when it holds every task asked for (fast, offline), else with
    lm-eval's own tasks too."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include_path {include_path} is not a folder of lm-eval task YAML files.")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--tasks names tasks lm-eval does not know: {', '.join(unknown)} (e.g. hellaswag, piqa, arc_easy, "
            "arc_challenge, winogrande; or add task files with --include_path)."
        )
    return manager


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of the results (and of the groups, if any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """``evaluate``: load, wrap, run lm-eval, print and write the results."""
    args = parse(parser(), argv or [])
    names = [str(name).strip() for name in args.tasks if str(name).strip()]
    if not names:
        raise ConfigError("--tasks is empty; name lm-eval tasks, e.g. --tasks '[hellaswag, piqa, arc_easy]'.")
    device = str(torch_device(args.device))
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num_fewshot={args.num_fewshot} must be >= 0.")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit={args.limit} must be positive.")
    ckpt = Path(args.ckpt_path)
    output = Path(args.output) if args.output else ckpt.with_name(ckpt.name + ".lm_eval.json")
    if output.exists() and not args.overwrite:
        raise ConfigError(f"--output {output} exists already; name another file or pass --overwrite true.")
    if output.resolve() == ckpt.resolve():
        raise ConfigError(f"--output {output} is the checkpoint; name another file.")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            "evaluate needs lm-eval-harness: pip install lm-eval (or pip install 'qkv-lightning[eval]')."
        ) from None
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from qkv_lightning.harness import HarnessGPT
    from qkv_lightning.tasks.language_model import load_gpt_checkpoint

    model, hparams, checkpoint = load_gpt_checkpoint(ckpt, args.weights_only)
    tokenizer = load_tokenizer(checkpoint, hparams, args.bpe_file, f"the checkpoint {ckpt}")
    manager = task_manager(names, args.include_path)
    lm = HarnessGPT(model, tokenizer, batch_size=args.batch_size, device=device)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = simple_evaluate(
        model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=limit, task_manager=manager,
        log_samples=args.log_samples, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed, bootstrap_iters=1000,
    )
    if results is None:
        return 1
    attention = hparams.get("attention") or {}
    report = {
        "checkpoint": str(ckpt),
        "sharing": attention.get("sharing"),
        "n_kv_heads": attention.get("n_kv_heads"),
        "tasks": names,
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "results": results.get("results"),
        "groups": results.get("groups"),
        "n-samples": results.get("n-samples"),
        "versions": results.get("versions"),
        "n-shot": results.get("n-shot"),
        "lm_eval_version": results.get("lm_eval_version") or getattr(lm_eval, "__version__", None),
    }
    if args.log_samples:
        report["samples"] = results.get("samples")
    text = json.dumps(report, indent=2, default=handle_non_serializable)
    from qkv_lightning.files import atomic_open

    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(output, "w", encoding="utf-8") as file:
        file.write(text + "\n")
    print(results_table(results))
    print(f"wrote {output}")
    return 0
