"""``bench-attention --score_encodings``: the encoding table's ratios follow from the given timings; a tiny run."""

from __future__ import annotations

import pytest

from qkv_lightning.bench.attention import Timing, bench_attention, format_encoding_table


def test_encoding_ratios_pair_each_variant_with_itself_without_an_encoding():
    timings = [
        Timing("QKV", 2.0), Timing("QKV+score", 3.0), Timing("QKV+relative", 5.0),
        Timing("Q=K=V", 1.0), Timing("Q=K=V+score", 1.5), Timing("Q=K=V+relative", 4.0),
        Timing("Q-K=V_kv2", 4.0), Timing("Q-K=V+score_kv2", 2.0),
        Timing("timm Attention", 9.0),
    ]
    lines = format_encoding_table(timings, ["none", "paper", "relative"]).splitlines()
    assert lines[0] == "| variant | none ms | paper ms | paper / none | relative ms | relative / none |"
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert list(rows) == ["QKV", "Q=K=V", "Q-K=V_kv2"]  # one row per variant, timm left out
    assert rows["QKV"] == ["2.000", "3.000", "1.500", "5.000", "2.500"]
    assert rows["Q=K=V"] == ["1.000", "1.500", "1.500", "4.000", "4.000"]
    assert rows["Q-K=V_kv2"] == ["4.000", "2.000", "0.500", "-", "-"]


@pytest.mark.usefixtures("one_thread")
def test_bench_attention_times_each_variant_with_each_encoding():
    timings = bench_attention(d_model=16, n_head=2, seq_len=6, batch_size=2, variants=["QKV", "Q=K=V"],
                              n_kv_heads=1, repeats=1, warmup=0, score_encodings=["none", "paper", "relative"])
    names = [t.name for t in timings]
    assert names[:6] == ["QKV_kv1", "QKV+score_kv1", "QKV+relative_kv1", "Q=K=V", "Q=K=V+score",
                         "Q=K=V+relative"]
    flops = {t.name: t.flops for t in timings}
    assert flops["Q=K=V+score"] - flops["Q=K=V"] == 2 * 2 * (6 * 5 + 6 * 5)  # fwd + bwd of the row/column terms
    assert all(t.median_ms > 0 for t in timings)
