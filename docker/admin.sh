#!/bin/sh
# The coordinator operator's commands (the `admin` service of compose.yaml, server image):
#   register [--wait] [NAME ...]   register the sites' public keys /site-keys/NAME.pub (all when no NAME)
#   run ARGS...                    `fedfreeze run`: submit a federation, exit non-zero unless it completed
#   flwr ARGS...                   any Flower command; the coordinator's connection is named "coordinator"
# Settings: SUPERLINK (default coordinator:9093), ROOT_CERT (default /certs/ca.pem).
set -eu
SUPERLINK=${SUPERLINK:-coordinator:9093}
ROOT_CERT=${ROOT_CERT:-/certs/ca.pem}
export FLWR_HOME="${FLWR_HOME:-/tmp/flwr-admin}"
mkdir -p "$FLWR_HOME"
printf '[superlink.coordinator]\naddress = "%s"\nroot-certificates = "%s"\n' "$SUPERLINK" "$ROOT_CERT" \
  > "$FLWR_HOME/config.toml"

wait_for_coordinator() {  # up to 120 s: the coordinator answers /health over verified TLS
  i=0
  until fedfreeze-healthcheck "https://$SUPERLINK/health" "$ROOT_CERT" 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -le 120 ] || { echo "admin: no answer from https://$SUPERLINK/health" >&2; exit 1; }
    sleep 1
  done
}

command=${1:-help}
[ $# -gt 0 ] && shift
case "$command" in
  register)
    if [ "${1:-}" = "--wait" ]; then shift; wait_for_coordinator; fi
    if [ $# -eq 0 ]; then
      set -- $(for key in /site-keys/*.pub; do [ -e "$key" ] && basename "$key" .pub; done)
      [ $# -gt 0 ] || { echo "admin: no public keys in /site-keys" >&2; exit 1; }
    fi
    for name in "$@"; do
      fedfreeze register --superlink "$SUPERLINK" --root-cert "$ROOT_CERT" --flwr-home /tmp/flwr-register \
        --name "$name" "/site-keys/$name.pub"
    done ;;
  run)
    exec fedfreeze run --superlink "$SUPERLINK" --root-cert "$ROOT_CERT" --flwr-home /tmp/flwr-run \
      --app /app/flower-app "$@" ;;
  flwr)
    exec flwr "$@" ;;
  *)
    sed -n '2,7p' "$0" >&2
    [ "$command" = help ] || exit 2 ;;
esac
