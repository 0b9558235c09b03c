"""``report``: parameters, training FLOPs and KV-cache bytes of every variant of a task config, in closed form.

Run: ``python cli.py report --config configs/lm/wikitext2.yaml [--variants '[QKV, Q-K=V]'] [--n_kv_heads '[2, 1]']
[--count_masked true] [--format table|markdown|json]``. Nothing is built or trained; see
:mod:`qkv_lightning.accounting`.

FLOP conventions: by default a causal decoder's score matrices count only the query-key pairs the mask allows
(T (T + 1) / 2 per head, what a causal kernel computes); ``--count_masked`` counts the full T x T matrix, the paper's
convention (``analysis_computation_profiler.py`` of the authors' code: seq_len x seq_len x d_model MACs for QK^T and
for PV), under which the forward FLOPs of a sequence are twice the paper's MACs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from qkv_lightning.accounting import NetworkCost
from qkv_lightning.bench.common import LoadedTask, VariantOptions, baseline_of, load_task, variants_of
from qkv_lightning.command_line import command_parser, parse_with_overrides

KVDtype = Literal["float32", "bfloat16", "float16", "float8"]
"""The KV-cache element types ``report`` knows."""
KV_BYTES: dict[str, int] = dict(zip(get_args(KVDtype), (4, 2, 2, 1), strict=True))

RATIO_KEYS = (
    "params_total",
    "params_attention",
    "flops_per_token",
    "train_flops_per_sample",
    "kv_cache_bytes_per_token",
)


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None when either is missing or the reference is zero (the ratios of ``report`` and
    ``bench``)."""
    return None if value is None or not reference else value / reference


def report_data(
    loaded: LoadedTask, variants: list, kv_dtype: str = "bfloat16", count_masked: bool = False
) -> dict[str, Any]:
    """The report as a plain dict: the setting it was computed for, and one entry per variant (JSON form).
    ``count_masked``: FLOPs count the full T x T score matrix of causal attention (the paper's convention)."""
    task, kv_bytes = loaded.task, KV_BYTES[kv_dtype]
    base_attention = task.attention_config
    n_head = task.network_config.n_head

    def cost_of(attention: Any) -> NetworkCost:
        return task.cost(attention, kv_bytes=kv_bytes, count_masked=count_masked)

    reference = cost_of(baseline_of(base_attention, n_head).attention_config(base_attention))
    costs: list[NetworkCost] = [cost_of(v.attention_config(base_attention)) for v in variants]
    entries = []
    for variant, cost in zip(variants, costs, strict=True):
        entry = cost.as_dict()
        entry["name"] = variant.label
        entry["paper_name"] = variant.paper_name
        entry["mask_self"] = variant.attention_config(base_attention).mask_self
        entry["relative_to_QKV"] = {key: ratio(entry[key], getattr(reference, key)) for key in RATIO_KEYS}
        kv_ratio = entry["relative_to_QKV"]["kv_cache_bytes_per_token"]
        entry["kv_cache_cut"] = None if kv_ratio is None else 1.0 - kv_ratio
        entries.append(entry)
    first = costs[0] if costs else reference
    notes = list(dict.fromkeys(note for cost in [reference, *costs] for note in cost.notes))
    causal = task.autoregressive
    if not causal:
        convention = ""
    elif count_masked:
        convention = ", counting the full T x T score matrix as the paper does (--count_masked)"
    else:
        convention = (
            ", counting only the query-key pairs the causal mask allows (--count_masked counts the full T x T "
            "matrix, the paper's convention)"
        )
    notes.insert(
        0,
        "FLOPs: matrix products (2 per multiply-add) of the forward and backward pass, attention scores included"
        + convention
        + "; element-wise work (norms, softmax, activations, optimiser) is not counted",
    )
    return {
        "task": type(task).__name__,
        "network": first.network,
        "sizes": {"n_layer": first.n_layer, "d_model": first.d_model, "n_head": first.n_head},
        "data_spec": {k: v for k, v in loaded.data_spec.items() if isinstance(v, int | float | str | bool)},
        "data_spec_source": loaded.spec_source,
        "tokens_per_sample": first.tokens_per_sample,
        "sample_unit": first.sample_unit,
        "kv_dtype": kv_dtype,
        "kv_bytes_per_element": kv_bytes,
        "context_tokens": first.context_tokens,
        "count_masked": bool(count_masked and causal),
        "notes": notes,
        "variants": entries,
    }


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _si(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _r(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_table(rows: list[list[str]], markdown: bool) -> str:
    """Rows (the first is the header) as a markdown table or as aligned text columns."""
    if markdown:
        align = "|".join("---" if i == 0 else "---:" for i in range(len(rows[0])))
        lines = ["| " + " | ".join(rows[0]) + " |", f"|{align}|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = zip(row, widths, strict=True)
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(cells)))
    return "\n".join(lines)


def format_report(data: dict[str, Any], markdown: bool = False) -> str:
    """The report as text: what it was computed for, then one row per variant with ratios to QKV."""
    unit = data["sample_unit"]
    per_token = "patch token" if data["network"] == "ViT" else "token"
    sizes = data["sizes"]
    spec = ", ".join(f"{k}={v}" for k, v in data["data_spec"].items())
    header = [
        f"{data['task']} / {data['network']}: {sizes['n_layer']} layers, width {sizes['d_model']}, {sizes['n_head']} "
        f"query heads; {data['tokens_per_sample']} tokens per {unit}.",
        f"Data values from {data['data_spec_source']}: {spec or '-'}.",
        f"KV cache: {data['kv_bytes_per_element']} bytes per element ({data['kv_dtype']}), all layers; a full "
        f"context is {data['context_tokens']} tokens.",
        *[f"Note: {note}." for note in data["notes"]],
    ]
    rows = [
        [
            "variant",
            "params",
            "x QKV",
            "attention params",
            "x QKV",
            "embedding params",
            f"fwd FLOPs/{unit}",
            f"train FLOPs/{unit}",
            f"train FLOPs/{per_token}",
            "x QKV",
            "KV bytes/token",
            "KV MiB/context",
            "x QKV",
            "KV cut",
        ]
    ]
    for v in data["variants"]:
        rel = v["relative_to_QKV"]
        name = v["name"] if v.get("paper_name", v["name"]) == v["name"] else f"{v['name']} ({v['paper_name']})"
        cut = v.get("kv_cache_cut")
        rows.append(
            [
                name,
                _count(v["params_total"]),
                _r(rel["params_total"]),
                _count(v["params_attention"]),
                _r(rel["params_attention"]),
                _count(v["params_embedding"]),
                _si(v["forward_flops_per_sample"]),
                _si(v["train_flops_per_sample"]),
                _si(v["flops_per_token"]),
                _r(rel["flops_per_token"]),
                _count(v["kv_cache_bytes_per_token"]),
                f"{v['kv_cache_bytes_context'] / 2**20:.3f}",
                _r(rel["kv_cache_bytes_per_token"]),
                "-" if cut is None else f"{100 * cut:.1f}%",
            ]
        )
    separator = "\n\n" if markdown else "\n"
    return separator.join(["\n".join(header), render_table(rows, markdown)])


@dataclass
class ReportOptions(VariantOptions):
    """The options of ``report``."""

    format: Literal["table", "markdown", "json"] = "table"
    """how the tables are printed"""
    kv_dtype: KVDtype = "bfloat16"
    """KV-cache element type"""
    count_masked: bool = False
    """count the full T x T score matrix of causal attention (the paper's FLOP convention); default: only the
    query-key pairs the causal mask allows"""
    prepare_data: bool = True
    """let the datamodule prepare its data (build a vocabulary, tokenize) if that is the only way to learn its
    values"""


def main(argv: Sequence[str] | None = None) -> int:
    """``report``: print the closed-form accounting of every variant."""
    parser = command_parser(
        "report",
        ReportOptions,
        description="Parameters, training FLOPs per token and KV-cache bytes of every attention variant of a task "
        "config, in closed form (nothing is built). Other options (e.g. --model.network.n_layer 8) change the config.",
        task_config="required",
    )
    args, overrides = parse_with_overrides(parser, argv or [])
    loaded = load_task(args.config, overrides, args.data_spec, args.prepare_data)
    task = loaded.task
    variants = variants_of(task.attention_config, task.network_config.n_head, args.variants, args.n_kv_heads)
    data = report_data(loaded, variants, args.kv_dtype, args.count_masked)
    data["config"] = list(args.config) + list(overrides)
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(format_report(data, markdown=args.format == "markdown"))
    return 0
