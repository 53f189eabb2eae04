#!/usr/bin/env bash
# The paper's setup on GPUs (docs/design.md §2), with hub ids instead of the offline assets. Not run by CI: it needs
# the hub, several GPUs and gated models (accept their licences first). Every command is the same one the
# offline demo runs; only the inputs differ. Adjust NPROC and the paths.
set -euo pipefail
MODEL=meta-llama/Meta-Llama-3-8B-Instruct
RUN=runs/llama3
NPROC=${NPROC:-8}

# Danger data: the unsafe pairs of BeaverTails (3,000 as in the paper); safety data: PKU-SafeRLHF's safer answers.
python - <<'PY'
from datasets import load_dataset
unsafe = load_dataset("PKU-Alignment/BeaverTails", split="30k_train").filter(lambda r: not r["is_safe"])
unsafe.shuffle(seed=0).select(range(3000)).to_json("runs/llama3-beavertails-unsafe.jsonl")
PY

# Directions: LoRA r=8, alpha 16, all linear layers, lr 5e-6 (the safety one from an intermediate checkpoint).
torchrun --nproc_per_node "$NPROC" -m sqsd directions build runs/llama3-beavertails-unsafe.jsonl --kind danger \
  --format beavertails --model $MODEL --dtype bfloat16 --device cuda --learning-rate 5e-6 --epochs 1 \
  --output-dir $RUN/danger
torchrun --nproc_per_node "$NPROC" -m sqsd directions build PKU-Alignment/PKU-SafeRLHF --kind safety \
  --format pku-saferlhf --limit 10000 --model $MODEL --dtype bfloat16 --device cuda --learning-rate 5e-6 \
  --epochs 1 --save-at 100 --step 100 --output-dir $RUN/safety
# Benign warm-up anchor on data disjoint from the pool to be scored (here AlpacaEval's outputs).
torchrun --nproc_per_node "$NPROC" -m sqsd train alpaca-eval --model $MODEL --dtype bfloat16 --device cuda \
  --epochs 1 --output-dir $RUN/anchor

# Score Dolly-15k (every rank scores its chunks; rank 0 merges), then cut the paper's five windows of 1,000.
# The safety term is taken at the checkpoint the safety direction was built from (step 100), as in the paper;
# `score` warns when the safety anchor is another adapter.
torchrun --nproc_per_node "$NPROC" -m sqsd score databricks/databricks-dolly-15k --format dolly --model $MODEL \
  --dtype bfloat16 --device cuda --danger $RUN/danger/danger.safetensors \
  --safety $RUN/safety/safety.safetensors --danger-anchor $RUN/anchor --safety-anchor $RUN/safety/checkpoint-100 \
  --output-dir $RUN/scores
sqsd filter $RUN/scores/scores.parquet --windows 5 --window-size 1000 --output-dir $RUN/windows

# Safety of the aligned model with a real judge.
sqsd evaluate --model $MODEL --dtype bfloat16 --device cuda --harmful CategoricalHarmfulQA.csv \
  --max-new-tokens 512 --judge llama-guard --judge-model meta-llama/Llama-Guard-3-8B --output-dir $RUN/eval-base
