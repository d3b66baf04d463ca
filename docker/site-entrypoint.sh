#!/bin/sh
# Entry point of the site image: a Flower SuperNode for one hospital, through `fedfreeze site`
# (which prints the plain flower-supernode command it runs). TLS and SuperNode authentication are
# always on. Settings come from the environment:
#   SITE_NAME   the site's name in the coordinator's reports (required)
#   SUPERLINK   the coordinator's address, host:port (default coordinator:9093)
#   ROOT_CERT   the federation's CA certificate (default /certs/ca.pem)
#   AUTH_KEY    this site's private key (default /keys/site.key; uid 49999, mode 600)
#   DATA        the site's data, mounted read-only (default /data: a folder with manifest.csv)
#   THREADS     CPU threads for training (default: all the container may use)
# Extra arguments go to `fedfreeze site` (see `fedfreeze site --help`).
set -eu
: "${SITE_NAME:?set SITE_NAME to the name of this site}"
for f in "${ROOT_CERT:=/certs/ca.pem}" "${AUTH_KEY:=/keys/site.key}"; do
  [ -r "$f" ] || { echo "site: cannot read $f (mounted? owned by uid $(id -u), mode 600?)" >&2; exit 2; }
done
set -- --data "${DATA:-/data}" --name "$SITE_NAME" --superlink "${SUPERLINK:-coordinator:9093}" \
  --root-cert "$ROOT_CERT" --auth-key "$AUTH_KEY" --state-dir /app/state "$@"
if [ -n "${THREADS:-}" ]; then
  export OMP_NUM_THREADS="$THREADS"
  set -- "$@" --threads "$THREADS"
fi
exec fedfreeze site "$@"
