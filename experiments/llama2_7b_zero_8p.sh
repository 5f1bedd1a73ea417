#!/bin/bash
# LLaMA2-7B, 8 devices on one node, ZeRO-1, bf16, full recompute: the seed's recipe with fnllama.
# Paths come from the environment; every fnllama train flag after the script name overrides
# the recipe (e.g. --fp16, --train-iters 10, --save-interval 100). Multi-node: set NNODES,
# NODE_RANK and MASTER_ADDR on every node (the same MASTER_ADDR/MASTER_PORT everywhere).
set -euo pipefail

export HF_DIR=${HF_DIR:-./llama-2-7b-hf}                     # HF LLaMA2-7B (config.json, weights, tokenizer.model)
export DATA_DIR=${DATA_DIR:-./dataset}                       # holds the Alpaca parquet
export DATA_PATH=${DATA_PATH:-$DATA_DIR/alpaca_text_document}
export SAVE_DIR=${SAVE_DIR:-./ckpt/llama2_7b_zero_8p}
export OUTPUT_DIR=${OUTPUT_DIR:-./runs/llama2_7b_zero_8p}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}

# 1. Alpaca parquet -> Megatron indexed dataset with the model's tokenizer (once).
if [ ! -f "$DATA_PATH.bin" ]; then
  fnllama preprocess --input "$DATA_DIR"/*.parquet \
    --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$HF_DIR" \
    --output-prefix "$DATA_DIR/alpaca" --workers 4 --log-interval 1000 --append-eod
fi

# 2. Train: torchrun over the node's devices; the recipe is experiments/llama2_7b_zero_8p.py.
exec torchrun --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m fnllama.cli train --config "$(dirname "$0")/llama2_7b_zero_8p.py" \
  --nproc-per-node "$NPROC_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "$@"
