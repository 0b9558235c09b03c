"""``evaluate``: downstream tasks of a trained language model through lm-eval-harness (the paper's protocol).

Run: ``python cli.py evaluate --ckpt_path logs/.../last.ckpt --tasks hellaswag,piqa,arc_easy,winogrande
[--num_fewshot 5] [--limit N] [--include_path my_tasks/] [--output results.json]``

The checkpoint's GPT (any attention variant) is wrapped as an lm-eval ``LM`` (:mod:`qkv_lightning.harness`):
log-likelihoods from one forward pass, rolling log-likelihoods in disjoint windows, greedy generation on the KV
cache. Text is tokenized with the GPT-2 BPE the model was trained with: ``--bpe_file``, else the checkpoint's data
setting ``bpe_file``; its identity must be the one recorded in the checkpoint (word-level models cannot be
evaluated). The paper scores its LMs 5-shot on HellaSwag, PIQA, ARC and Winogrande; those tasks download their data
sets from the Hugging Face hub on first use. ``--include_path`` adds task YAML files (lm-eval's format, e.g. a local
JSON data set: ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``); lm-eval's task files may name
Python functions (``!function``), so include only task folders you trust. Results are printed as lm-eval's table and
written as JSON to ``--output`` (default: ``<checkpoint>.lm_eval.json`` beside the checkpoint; never overwritten
without ``--overwrite``). Needs the optional ``lm-eval`` package (``pip install 'qkv-lightning[eval]'``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qkv_lightning.errors import CheckpointError, ConfigError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cli.py evaluate", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt_path", required=True, help="a language model's checkpoint (fit, convert or import)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,piqa,arc_easy")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt (task default: 0)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (for quick checks; <1: fraction)")
    p.add_argument("--include_path", default=None, help="folder of extra lm-eval task YAML files (trusted)")
    p.add_argument("--bpe_file", default=None, help="GPT-2 .tiktoken ranks (default: the checkpoint's data.bpe_file)")
    p.add_argument("--batch_size", type=int, default=16, help="requests per forward pass")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--output", default=None, help="JSON results file (default: <checkpoint>.lm_eval.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--log_samples", action="store_true", help="also write every request and response to the JSON")
    p.add_argument("--seed", type=int, default=1234, help="seed of lm-eval's few-shot sampling")
    p.add_argument("--weights_only", type=lambda s: s.lower() not in ("0", "false", "no"), default=True,
                   help="load the checkpoint with torch's safe loading (default true)")
    return p


def load_tokenizer(hparams: dict[str, Any], datamodule: dict[str, Any], bpe_file: str | None) -> Any:
    """The GPT-2 BPE of a checkpoint: ``bpe_file``, else its data's ``bpe_file``; checked against the identity the
    checkpoint recorded.

    Raises:
        CheckpointError: a word-level model, or a BPE other than the model's.
    """
    from qkv_lightning.data.tokenizers import BPETokenizer

    recorded = (hparams.get("data_spec") or {}).get("tokenizer")
    if isinstance(recorded, str) and not recorded.startswith("bpe:"):
        raise CheckpointError(
            f"the checkpoint's model was trained on {recorded.split(':')[0]}-level tokens (data_spec.tokenizer="
            f"{recorded}); lm-eval's tasks are text, so evaluate needs a model trained with data.tokenizer: gpt2."
        )
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
    args = parser().parse_args(list(argv or []))
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise ConfigError("--tasks is empty; name lm-eval tasks, e.g. --tasks hellaswag,piqa,arc_easy,winogrande.")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num_fewshot={args.num_fewshot} must be >= 0.")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit={args.limit} must be positive.")
    ckpt = Path(args.ckpt_path)
    output = Path(args.output) if args.output else ckpt.with_name(ckpt.name + ".lm_eval.json")
    if output.exists() and not args.overwrite:
        raise ConfigError(f"--output {output} exists already; name another file or pass --overwrite.")
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

    from qkv_lightning.checkpoints import load_checkpoint_file
    from qkv_lightning.harness import HarnessGPT
    from qkv_lightning.tasks.language_model import load_gpt

    model, hparams = load_gpt(ckpt, args.weights_only)
    datamodule = load_checkpoint_file(ckpt, args.weights_only).get("datamodule_hyper_parameters") or {}
    tokenizer = load_tokenizer(hparams, datamodule, args.bpe_file)
    manager = task_manager(names, args.include_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
