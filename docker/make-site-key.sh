#!/usr/bin/env bash
# Make one site's key pair for SuperNode authentication (ECDSA P-384, SSH format, as Flower expects).
#
#   bash docker/make-site-key.sh [--secrets DIR] [--public DIR] [--owner UID] NAME
#
# Writes DIR/NAME.key (private: stays at the site, owned by --owner (default 49999, the
# containers' user), mode 600) and PUBLIC/NAME.pub (public: send it to the coordinator, which
# registers it; default docker/site-keys). Defaults: --secrets docker/secrets. An existing key is
# never overwritten: to rotate a key, see docker/README.md.
set -euo pipefail
SECRETS=docker/secrets
PUBLIC=docker/site-keys
OWNER=49999
while [ $# -gt 1 ]; do
  case "$1" in
    --secrets) SECRETS=$2; shift 2 ;;
    --public) PUBLIC=$2; shift 2 ;;
    --owner) OWNER=$2; shift 2 ;;
    *) echo "make-site-key: unknown option $1" >&2; exit 2 ;;
  esac
done
NAME=${1:?usage: make-site-key.sh [--secrets DIR] [--public DIR] [--owner UID] NAME}
[[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || { echo "make-site-key: bad site name '$NAME'" >&2; exit 2; }
command -v ssh-keygen >/dev/null || { echo "make-site-key: needs ssh-keygen (openssh-client)" >&2; exit 2; }
mkdir -p "$SECRETS" "$PUBLIC"
if [ -e "$SECRETS/$NAME.key" ]; then
  echo "make-site-key: $SECRETS/$NAME.key exists; not overwritten" >&2; exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ssh-keygen -q -t ecdsa -b 384 -N "" -C "$NAME" -f "$tmp/key"
install -m 600 "$tmp/key" "$SECRETS/$NAME.key"
install -m 644 "$tmp/key.pub" "$PUBLIC/$NAME.pub"
if [ "$(id -u)" != "$OWNER" ]; then
  chown "$OWNER:$OWNER" "$SECRETS/$NAME.key" 2>/dev/null || echo "make-site-key: could not chown $NAME.key to" \
    "$OWNER (the containers' user); run: sudo chown $OWNER:$OWNER $SECRETS/$NAME.key" >&2
fi
echo "make-site-key: $SECRETS/$NAME.key (private, stays at $NAME), $PUBLIC/$NAME.pub (send to the coordinator)"
