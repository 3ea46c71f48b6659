#!/usr/bin/env bash
# The quickstart: tokenizer -> pretrain -> finetune -> evaluate -> a sample answer, in minutes on a CPU.
# Extra arguments go to `lmforge run` (e.g. --pretrain.max_steps 100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
data_dir="${LMFORGE_DATA_DIR:-}"
if [ -z "$data_dir" ] && [ -d ../shared/data ]; then data_dir=../shared/data; fi
args=()
[ -n "$data_dir" ] && args+=(--data-dir "$data_dir")
exec .venv/bin/lmforge run recipes/quickstart.toml "${args[@]}" "$@"
