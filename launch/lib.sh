#!/usr/bin/env bash
# Shared helpers for the launch scripts. Sourced, not run.
#
# Every command goes through `run` (foreground) or `run_bg` (background), which in dry-run
# mode print the command, quoted exactly as it would run, instead of running it.

DRY_RUN=${DRY_RUN:-0}

die() {
  echo "error: $*" >&2
  exit 2
}

# Print "+ cmd args..." with shell quoting, so a printed line can be pasted back.
show() {
  local prefix=$1
  shift
  printf '%s' "$prefix"
  printf ' %q' "$@"
  printf '\n'
}

run() {
  show "+" "$@"
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}

# Run in the background and remember the pid in BG_PIDS so that cleanup can stop it.
BG_PIDS=()
run_bg() {
  show "+ (background)" "$@"
  if [[ $DRY_RUN != 1 ]]; then
    "$@" &
    BG_PIDS+=("$!")
  fi
}

stop_background() {
  if ((${#BG_PIDS[@]})); then
    kill "${BG_PIDS[@]}" 2>/dev/null || true
    wait "${BG_PIDS[@]}" 2>/dev/null || true
  fi
}

# Print the environment variables a launch depends on (dry-run documentation).
show_env() {
  local name
  for name in "$@"; do
    printf 'env %s=%q\n' "$name" "${!name-}"
  done
}

# Wait until URL/health answers 200, or fail after TIMEOUT seconds.
wait_healthy() {
  local url=$1 timeout=$2 waited=0
  show "+ wait for" "$url/health"
  [[ $DRY_RUN == 1 ]] && return 0
  until curl -fsS -o /dev/null "$url/health"; do
    sleep 5
    waited=$((waited + 5))
    ((waited < timeout)) || die "no healthy server at $url after ${timeout}s"
  done
}

require_positive_int() {
  local name=$1 value=$2
  [[ $value =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '$value'"
}
