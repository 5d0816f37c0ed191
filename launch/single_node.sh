#!/usr/bin/env bash
# Train on one machine: torchrun over the local GPUs (or CPU processes), optionally with
# SGLang servers on some of the GPUs.
#
#   launch/single_node.sh [options] CONFIG [section.key=value ...]
#
# Options:
#   --nproc N          trainer processes (default: all GPUs, or 1 without GPUs)
#   --rollout-gpus K   start SGLang servers on the last K GPUs (default 0: embedded engine)
#   --rollout-tp T     tensor-parallel size of each SGLang server (default 1)
#   --model DIR        HF model the servers load (default: the config's model.hf_path)
#   --port-base P      first SGLang server port (default 30000)
#   --run-dir DIR      run directory (default: chosen by gvm-mega train)
#   --dry-run          print the commands and environment instead of running them
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

NPROC="" ROLLOUT_GPUS=0 ROLLOUT_TP=1 MODEL="" PORT_BASE=30000 RUN_DIR=""
while (($#)); do
  case $1 in
    --nproc) NPROC=$2; shift 2 ;;
    --rollout-gpus) ROLLOUT_GPUS=$2; shift 2 ;;
    --rollout-tp) ROLLOUT_TP=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --port-base) PORT_BASE=$2; shift 2 ;;
    --run-dir) RUN_DIR=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
(($# >= 1)) || { usage >&2; die "missing CONFIG"; }
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config file not found: $CONFIG"

GPUS=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || true)}
GPUS=${GPUS:-0}
[[ $ROLLOUT_GPUS =~ ^[0-9]+$ ]] || die "--rollout-gpus must be a whole number, got '$ROLLOUT_GPUS'"
require_positive_int --rollout-tp "$ROLLOUT_TP"
if ((ROLLOUT_GPUS > 0)); then
  ((ROLLOUT_GPUS < GPUS)) || die "--rollout-gpus $ROLLOUT_GPUS leaves no GPU for training ($GPUS GPUs)"
  ((ROLLOUT_GPUS % ROLLOUT_TP == 0)) || die "--rollout-gpus $ROLLOUT_GPUS is not a multiple of --rollout-tp $ROLLOUT_TP"
fi
TRAIN_GPUS=$((GPUS - ROLLOUT_GPUS))
if [[ -z $NPROC ]]; then
  NPROC=$((TRAIN_GPUS > 0 ? TRAIN_GPUS : 1))
fi
require_positive_int --nproc "$NPROC"

OVERRIDES=("$@")
TRAIN_ENV=()
# Validate the config before starting anything (fails with the config's own message).
CONFIG_MODEL=$(python -m gvm_mega config "$CONFIG" "${OVERRIDES[@]}" --get model.hf_path) ||
  die "invalid config (see above)"
show_env GPUS_PER_NODE CUDA_VISIBLE_DEVICES OMP_NUM_THREADS
trap stop_background EXIT

if ((ROLLOUT_GPUS > 0)); then
  MODEL=${MODEL:-$CONFIG_MODEL}
  [[ -n $MODEL ]] || die "SGLang servers need --model DIR or model.hf_path in the config"
  URLS=()
  for ((s = 0; s < ROLLOUT_GPUS / ROLLOUT_TP; s++)); do
    first=$((TRAIN_GPUS + s * ROLLOUT_TP))
    devices=$(seq -s, "$first" $((first + ROLLOUT_TP - 1)))
    port=$((PORT_BASE + s))
    run_bg env CUDA_VISIBLE_DEVICES="$devices" python -m sglang.launch_server \
      --model-path "$MODEL" --tp-size "$ROLLOUT_TP" --host 127.0.0.1 --port "$port"
    URLS+=("http://127.0.0.1:$port")
  done
  for url in "${URLS[@]}"; do
    wait_healthy "$url" 1800
  done
  OVERRIDES+=("rollout.engine=sglang" "rollout.urls=$(IFS=,; echo "${URLS[*]}")")
  TRAIN_ENV=(env "CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((TRAIN_GPUS - 1)))")
fi

TRAIN_ARGS=(train "$CONFIG")
[[ -n $RUN_DIR ]] && TRAIN_ARGS+=(--run-dir "$RUN_DIR")
run "${TRAIN_ENV[@]}" torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" -m gvm_mega \
  "${TRAIN_ARGS[@]}" "${OVERRIDES[@]}"
