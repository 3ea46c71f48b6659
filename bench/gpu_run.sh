#!/usr/bin/env bash
# The GPU figures in the README, in one script sized for a short lease of one H100:
#   1. the seed-67m chain: pretrain, fine-tune on SQuAD with context, evaluate on 1,000 dev questions
#      (greedy decoding, span decoding, and span decoding from the 2 likeliest first words);
#   2. gpt2-124m pretraining throughput: a few hundred steps with bf16 + torch.compile (tokens/s, MFU);
#   3. when NCCL_RUN names a prepared tiny run (tokenizer and shards, like the seed-67m one): a few steps of
#      DDP and of FSDP under torchrun on the GPU, so the NCCL path runs (one process: one GPU is lent).
# The seed-67m run directory must already hold its tokenizer and prepared shards, which a CPU makes:
#   lmforge tokenizer train recipes/seed-67m.toml --run-dir WORK/s67 --data-dir ../shared/data
#   lmforge prepare --run-dir WORK/s67 --data-dir ../shared/data
#   bash bench/gpu_run.sh WORK DATA_DIR OUT
# gpt2-124m reuses those shards with its model's 50,304-row vocabulary (the tokenizer's 12,856 used): the
# throughput does not depend on which tokens flow. Each stage has a time cap; a stage that reaches it stops
# gracefully (SIGTERM: finish the step, save, go on), so the chain still ends with an evaluation.
# Knobs (environment): DECODINGS (which evaluations, default all three), NCCL_RUN, G124_STEPS (0 skips it),
# S67_PRETRAIN_STEPS, S67_FINETUNE_STEPS, S67_PHASE1_TOKENS, QUESTIONS, SUBSET, *_SECONDS caps, FINETUNE_COMPILE
# (true: torch.compile fine-tuning too; off by default: compiling took ~2 of 4.6 minutes on an H100 before the
# recompiles were removed, README), and EXTRA (overrides added to every training stage, e.g. a small batch for
# a CPU dry run).
set -uo pipefail

WORK=${1:?usage: gpu_run.sh WORK DATA_DIR OUT}
DATA=${2:?usage: gpu_run.sh WORK DATA_DIR OUT}
OUT=${3:?usage: gpu_run.sh WORK DATA_DIR OUT}
HERE=$(cd "$(dirname "$0")/.." && pwd)
G124_STEPS=${G124_STEPS:-200}
S67_PRETRAIN_STEPS=${S67_PRETRAIN_STEPS:-2000}
S67_FINETUNE_STEPS=${S67_FINETUNE_STEPS:-2000}
S67_PHASE1_TOKENS=${S67_PHASE1_TOKENS:-16_000_000}
QUESTIONS=${QUESTIONS:-1000}
SUBSET=${SUBSET:-first}  # the README's GPU table scored the first 1,000 dev questions; "spread" for the CPU rows' set
G124_SECONDS=${G124_SECONDS:-110}
PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-170}
FINETUNE_SECONDS=${FINETUNE_SECONDS:-190}
EVAL_SECONDS=${EVAL_SECONDS:-50}
FINETUNE_COMPILE=${FINETUNE_COMPILE:-false}
EXTRA=${EXTRA:-}
DECODINGS=${DECODINGS:-greedy span span-2-starts}
NCCL_RUN=${NCCL_RUN:-}
NCCL_SECONDS=${NCCL_SECONDS:-60}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=${TQDM_MININTERVAL:-15} PYTHONPATH="$HERE/src${PYTHONPATH:+:$PYTHONPATH}"

LMFORGE=(python3 -c 'import sys; from lmforge.cli import main; sys.exit(main())')
capped() {  # capped SECONDS CMD...: SIGTERM at the cap (a graceful stop), SIGKILL 60 s later
  local seconds=$1; shift
  timeout -s TERM -k 60 "$seconds" "$@"
}
stamp() { echo "=== $(date +%T) $*"; }

stamp "device"
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null

# 1. seed-67m: the recipe with its first (FineWeb-Edu) phase shortened to fit the lease.
stamp "seed-67m: pretrain $S67_PRETRAIN_STEPS steps (phase 1: $S67_PHASE1_TOKENS tokens), bf16 + compile"
sed "s/^tokens = 200_000_000/tokens = $S67_PHASE1_TOKENS/" "$HERE/recipes/seed-67m.toml" > "$WORK/seed-67m-lease.toml"
grep -q "^tokens = $S67_PHASE1_TOKENS" "$WORK/seed-67m-lease.toml" || { echo "phase-1 edit failed"; exit 1; }
capped "$PRETRAIN_SECONDS" "${LMFORGE[@]}" pretrain "$WORK/seed-67m-lease.toml" --run-dir "$WORK/s67" \
  --pretrain.max_steps "$S67_PRETRAIN_STEPS" --pretrain.eval_interval 250 --pretrain.eval_batches 20 \
  --pretrain.patience 0 --pretrain.compile true --pretrain.checkpoint_interval 100000 --pretrain.log_interval 20 $EXTRA

stamp "seed-67m: fine-tune (at most $S67_FINETUNE_STEPS steps, compile $FINETUNE_COMPILE)"
capped "$FINETUNE_SECONDS" "${LMFORGE[@]}" finetune --run-dir "$WORK/s67" --data-dir "$DATA" \
  --finetune.max_steps "$S67_FINETUNE_STEPS" --finetune.eval_interval 300 --finetune.checkpoint_interval 100000 \
  --finetune.compile "$FINETUNE_COMPILE" \
  --finetune.log_interval 20 $EXTRA
cp "$WORK/s67/metrics.jsonl" "$OUT/s67-metrics.jsonl"

for decoding in $DECODINGS; do  # the last: span answers from the 2 likeliest first words
  stamp "seed-67m: eval, $decoding decoding, $QUESTIONS questions"
  starts=0; [ "$decoding" = span-2-starts ] && starts=2
  capped "$EVAL_SECONDS" "${LMFORGE[@]}" eval --run-dir "$WORK/s67" --data-dir "$DATA" --eval.squad_questions "$QUESTIONS" \
    --eval.squad_subset "$SUBSET" --eval.decoding "${decoding%%-*}" --eval.span_max_starts "$starts" --eval.long_context best_match
  cp "$WORK/s67/eval/report.json" "$OUT/s67-eval-$decoding.json"
done

# 2. gpt2-124m throughput: its recipe, one micro-batch of 32 x 1024 tokens per step, bf16 + compile.
if [ "$G124_STEPS" -gt 0 ]; then
  stamp "gpt2-124m: $G124_STEPS steps, bf16 + compile"
  rm -rf "$WORK/g124" && mkdir -p "$WORK/g124" && cp -r "$WORK/s67/"{config.toml,tokenizer.json,data,progress.json} "$WORK/g124/"
  capped "$G124_SECONDS" "${LMFORGE[@]}" pretrain "$HERE/recipes/gpt2-124m.toml" --run-dir "$WORK/g124" \
    --model.vocab_size 50304 --pretrain.max_steps "$G124_STEPS" --pretrain.grad_accum 1 --pretrain.warmup_steps 100 \
    --pretrain.compile true --pretrain.eval_interval "$G124_STEPS" --pretrain.eval_batches 5 \
    --pretrain.checkpoint_interval 100000 --pretrain.log_interval 10 $EXTRA
  cp "$WORK/g124/metrics.jsonl" "$OUT/g124-metrics.jsonl"
  rm -rf "$WORK/g124"
fi

# 3. NCCL: DDP, then FSDP, each training a copy of the tiny run for a few steps under torchrun.
if [ -n "$NCCL_RUN" ]; then
  for engine in ddp fsdp; do
    stamp "tiny: $engine under torchrun (NCCL), 20 steps"
    rm -rf "$WORK/nccl-$engine" && cp -r "$NCCL_RUN" "$WORK/nccl-$engine"
    capped "$NCCL_SECONDS" python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m lmforge.cli pretrain \
      --run-dir "$WORK/nccl-$engine" --distributed "$engine" --pretrain.max_steps 20 --pretrain.eval_interval 10 \
      --pretrain.checkpoint_interval 10 --pretrain.log_interval 5
    cp "$WORK/nccl-$engine/metrics.jsonl" "$OUT/nccl-$engine-metrics.jsonl"
  done
fi
stamp "done"
