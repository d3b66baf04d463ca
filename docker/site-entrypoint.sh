#!/bin/sh
# Entry point of the site image: a Flower SuperNode for one hospital, through `fedfreeze site`
# (which prints the plain flower-supernode command it runs). TLS and SuperNode authentication are
# always on. Settings come from the environment:
#   SITE_NAME   the site's name in the coordinator's reports (required)
#   SUPERLINK   the coordinator's address, host:port (default coordinator:9093)
#   ROOT_CERT   the federation's CA certificate (default /certs/ca.pem)
#   AUTH_KEY    this site's private key (default /keys/site.key; uid 49999, mode 600)
#   DATA        the site's data, mounted read-only (default /data: a folder with manifest.csv)
#   THREADS     CPU threads for training (empty or 0, the default: all the container may use)
#   APPROVED_APPS  the site's list of approved app hashes (default /approved-apps/approved-apps.txt,
#               mounted read-only): when the file is there, the site runs only jobs whose app is on
#               it (`fedfreeze site --approved-apps`); when it is not, any job's app, with a warning
# Extra arguments go to `fedfreeze site` (see `fedfreeze site --help`).
set -eu
: "${SITE_NAME:?set SITE_NAME to the name of this site}"
for f in "${ROOT_CERT:=/certs/ca.pem}" "${AUTH_KEY:=/keys/site.key}"; do
  [ -r "$f" ] || { echo "site: cannot read $f (mounted? owned by uid $(id -u), mode 600?)" >&2; exit 2; }
done
set -- --data "${DATA:-/data}" --name "$SITE_NAME" --superlink "${SUPERLINK:-coordinator:9093}" \
  --root-cert "$ROOT_CERT" --auth-key "$AUTH_KEY" --state-dir /app/state "$@"
if [ -e "${APPROVED_APPS:=/approved-apps/approved-apps.txt}" ]; then
  set -- "$@" --approved-apps "$APPROVED_APPS"
fi
case "${THREADS:-0}" in
  0 | '') ;;  # all
  *[!0-9]*) echo "site: THREADS='$THREADS' is not a number of CPU threads (0 or empty: all)" >&2; exit 2 ;;
  *) export OMP_NUM_THREADS="$THREADS"; set -- "$@" --threads "$THREADS" ;;
esac
exec fedfreeze site "$@"
