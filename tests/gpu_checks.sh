#!/usr/bin/env bash
# The GPU checks, one stage after another, each under its own time limit, each log written to $OUT (or ./gpu-logs).
# Run from the repository root on a machine with one GPU:  bash tests/gpu_checks.sh [STAGE ...]  (default: all)
set -uo pipefail
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
ONLY="$*"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name (limit ${limit}s)"; local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -E "^(INFO|LOCAL_RANK|  \| |----|\s*$)" | tail -n 40
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
stage core 60 python3 tests/gpu_core_check.py
stage fsdp 150 python3 tests/gpu_fsdp_check.py
stage bench-300m 150 python3 cli.py bench --config configs/lm/gpt2-300m.yaml --data random --data.batch_size 4 \
  --device cuda --precision bf16-mixed --gemm true --steps 6 --warmup 2 --lightning_overhead true --overhead_steps 6
stage attention-vit-b 40 python3 cli.py bench-attention --d_model 768 --n_head 12 --seq_len 197 --batch_size 64 \
  --device cuda --dtype bfloat16 --repeats 30
stage attention-lm-300m 40 python3 cli.py bench-attention --d_model 1024 --n_head 16 --seq_len 2048 --batch_size 4 \
  --causal true --device cuda --dtype bfloat16 --repeats 20
stage reliability 100 python3 tests/gpu_reliability_check.py
stage fused-decode 120 python3 -m pytest -q -n 0 tests/test_fused_decode.py
stage bench-decode-fused 150 python3 cli.py bench-decode --config configs/bench/decode-gpt2-small.yaml \
  --model.network.n_layer 4 --variants '[QKV, Q-K=V, Q-K=V_rf0.25]' --rope_keys '[on_read, fused]' \
  --contexts '[1024, 4096]' --new_tokens 32 --device cuda --progress false
