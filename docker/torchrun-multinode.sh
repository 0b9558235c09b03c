#!/bin/bash
# N nodes x G GPUs with FSDP2 under torchrun (run this on every node; Lightning reads RANK / WORLD_SIZE / MASTER_*).
# A restart with the same arguments resumes from the newest last.ckpt (--ckpt_path last; a first run starts afresh).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ./docker/torchrun-multinode.sh configs/lm/gpt2-300m.yaml   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 ./docker/torchrun-multinode.sh configs/lm/gpt2-300m.yaml   # on node1
# On one machine, two "nodes" of one CPU process each (what tests/test_distributed.py runs):
#   NNODES=2 GPUS_PER_NODE=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 EXTRA="--trainer.accelerator cpu" ./docker/torchrun-multinode.sh ... &
#   NNODES=2 GPUS_PER_NODE=1 NODE_RANK=1 MASTER_ADDR=127.0.0.1 EXTRA="--trainer.accelerator cpu" ./docker/torchrun-multinode.sh ...
set -euo pipefail
CONFIG=${1:-configs/lm/gpt2-300m.yaml}
VARIANT=${2:-configs/variants/qkv.yaml}
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

exec torchrun \
  --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  cli.py fit \
    --config "$CONFIG" --config "$VARIANT" \
    --config configs/strategy/fsdp2.yaml --config configs/strategy/multinode.yaml \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" \
    --ckpt_path last \
    ${EXTRA:-}
