#!/usr/bin/env bash
# Container entrypoint.
#
#   train CONFIG [...]       single-node training (launch/single_node.sh options apply)
#   sglang-server [...]      python -m sglang.launch_server with the given arguments
#   router [...]             python -m sglang_router.launch_router with the given arguments
#   gvm-mega [...]           any gvm-mega subcommand (eval, convert, serve, bench, ...)
#   anything else            executed as is (e.g. bash)
set -euo pipefail
HERE=$(dirname "${BASH_SOURCE[0]}")

(($# >= 1)) || set -- gvm-mega --help
cmd=$1
shift
case $cmd in
  train) exec "$HERE/single_node.sh" "$@" ;;
  sglang-server) exec python -m sglang.launch_server "$@" ;;
  router) exec python -m sglang_router.launch_router "$@" ;;
  gvm-mega) exec python -m gvm_mega "$@" ;;
  *) exec "$cmd" "$@" ;;
esac
