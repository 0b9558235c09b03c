"""``bench-decode``'s outputs: the tables (one block per batch size, the memory-budget table, the serving table) and
the plot of decode speed and KV-cache size against the context length."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def baseline_row(rows: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """The row the ratio columns divide by: the first of the variant ``baseline`` (a K=V variant's first
    ``--rope_keys`` scheme), else the first row."""
    return next((row for row in rows if row.get("variant", row["name"]) == baseline), rows[0])


def format_tables(result: dict[str, Any], markdown: bool) -> str:
    """The per-cell table (one block per batch size), the memory-budget table and the serving table."""
    from qkv_lightning.bench.report import render_table

    s = result["setup"]
    load = s["load_average_before"], s["load_average_after"]
    blocks = [
        f"{s['command']}\n{s['network']}: {s['n_layer']} layers, width {s['d_model']}, {s['n_head']} heads, "
        f"position {s['position']}, vocabulary {s['vocab_size']}; {s['dtype']} on {s['device']} ({s['device_name']}), "
        f"torch {s['torch']}, {s['threads']} threads, load average {load[0]} -> {load[1]}; {s['cache']} cache"
        f"{', compiled step' if s['compile'] else ''}; {s['new_tokens']} new tokens (first from the prefill), "
        f"{s['rounds']} interleaved decoding rounds after {s['warmup']} warm-up; prefill timed in the first "
        f"{s['prefill_rounds']}."
    ]
    times = f"x {s.get('baseline', 'QKV')}"  # a result.json from before --baseline compared with QKV
    header = ["variant", "context", "prefill tok/s", times, "decode tok/s", times, "TPOT ms (p90)", "KV MiB", times,
              "peak MiB", "read MB/token", "GB/s"]
    for batch in s["batch_sizes"]:
        table = [header]
        for row in (r for r in result["cells"] if r["batch"] == batch):
            table.append([
                row["name"], str(row["context"]), f"{row['prefill_tokens_per_sec']:,.0f}",
                f"{row['prefill_ratio']:.3f}", f"{row['decode_tokens_per_sec']:,.2f}", f"{row['decode_ratio']:.3f}",
                f"{row['tpot_median_ms']:.1f} ({row['tpot_p90_ms']:.1f})", f"{row['kv_cache_bytes'] / 2**20:,.1f}",
                f"{row['kv_bytes_ratio']:.3f}",
                "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:,.0f}",
                f"{row['bytes_read_per_token'] / 1e6:,.1f}", f"{row['implied_gb_per_sec']:.2f}",
            ])
        blocks.append(f"batch {batch}:\n" + render_table(table, markdown))
    if result.get("memory_budget"):
        budget = result["memory_budget"]
        table = [["variant", "context", "largest batch (computed)", "checked", "cache GiB at it"]]
        for row in budget["rows"]:
            table.append([row["name"], str(row["context"]), str(row["computed"]), str(row["checked"]),
                          f"{row['cache_bytes'] / 2**30:.3f}"])
        blocks.append(f"memory budget {budget['bytes'] / 1e9:g} GB (weights + static cache + one decoding step; "
                      "checked: it fits and one more sequence does not):\n" + render_table(table, markdown))
    if result.get("serving"):
        sv = result["serving"]
        table = [["variant", "tokens/s", times, "requests/s", "latency s median (p90)", "TTFT s median (p90)",
                  "cache MiB"]]
        ref = baseline_row(sv["rows"], s.get("baseline", "QKV"))
        for row in sv["rows"]:
            table.append([row["name"], f"{row['tokens_per_sec']:,.1f}",
                          f"{row['tokens_per_sec'] / ref['tokens_per_sec']:.3f}", f"{row['requests_per_sec']:.3f}",
                          f"{row['latency_median_s']:.2f} ({row['latency_p90_s']:.2f})",
                          f"{row['ttft_median_s']:.2f} ({row['ttft_p90_s']:.2f})",
                          f"{row['cache_bytes'] / 2**20:,.1f}"])
        blocks.append(f"serving: {sv['requests']} requests, prompts {sv['prompt_lens'][0]}..{sv['prompt_lens'][1]} "
                      f"tokens, {sv['new_tokens']} new tokens each, {sv['slots']} slots (continuous batching); median "
                      f"of {sv['rounds']} interleaved rounds:\n" + render_table(table, markdown))
    return "\n\n".join(blocks)


def plot(result: dict[str, Any], path: Path) -> None:
    """Decode tokens/s and KV-cache bytes against the context length, one line per contender (first batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = result["setup"]["batch_sizes"][0]
    rows = [r for r in result["cells"] if r["batch"] == batch]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        contexts = [r["context"] for r in mine]
        speed.plot(contexts, [r["decode_tokens_per_sec"] for r in mine], marker="o", label=name)
        memory.plot(contexts, [r["kv_cache_bytes"] / 2**20 for r in mine], marker="o", label=name)
    for axis, title in ((speed, f"decode tokens/s (batch {batch})"), (memory, "KV cache MiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context tokens")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    memory.set_yscale("log", base=2)
    speed.legend(fontsize=8)
    s = result["setup"]
    fig.suptitle(f"{s['n_layer']} layers, width {s['d_model']}, {s['position']} positions, {s['dtype']}, "
                 f"{s['device_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
