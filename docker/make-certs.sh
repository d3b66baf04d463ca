#!/usr/bin/env bash
# Make the federation's certificate authority (CA) and the coordinator's TLS certificate.
#
#   bash docker/make-certs.sh [--out DIR] [--days N] [--owner UID] [NAME ...]
#
# NAME: every DNS name and IP address that sites and operators use to reach the coordinator
# (they go into the certificate's subject alternative names; a name that is not there is refused
# by every site). Default: coordinator localhost 127.0.0.1 ::1 (the compose network name and the
# host itself); for a real deployment add the coordinator's public name, e.g.
#   bash docker/make-certs.sh coordinator fl.hospital-a.example.org 10.1.2.3
#
# Writes to DIR (default docker/secrets, ignored by git and by the image build):
#   ca.pem      the CA certificate: public, every site gets a copy
#   ca.key      the CA private key: only needed to sign the next server certificate; keep it offline
#   server.pem  the coordinator's certificate, signed by the CA
#   server.key  the coordinator's private key: owned by --owner (default 49999, the containers'
#               user), mode 600, mounted into the coordinator only
# An existing ca.pem/ca.key in DIR is kept, so renewing the server certificate needs no change at the sites.
set -euo pipefail
OUT=docker/secrets
DAYS=825
OWNER=49999
NAMES=()

usage() {
  cat <<'USAGE'
usage: bash docker/make-certs.sh [--out DIR] [--days N] [--owner UID] [NAME ...]

Make the federation's certificate authority (CA) and the coordinator's TLS certificate.

  NAME ...     every DNS name and IP address that sites and operators use to reach the
               coordinator (the certificate's subject alternative names; a site dialling any
               other name is refused). Default: coordinator localhost 127.0.0.1 ::1
  --out DIR    where the files go (default: docker/secrets, ignored by git and the image build)
  --days N     validity of the coordinator's certificate in days (default: 825; the CA: 3650)
  --owner UID  owner of server.key (default: 49999, the containers' user; give your own uid
               when the coordinator runs without containers, e.g. --owner "$(id -u)")
  -h, --help   this message

Writes:
  ca.pem      the CA certificate: public, every site gets a copy
  ca.key      the CA private key: only needed to sign the next server certificate; keep it offline
  server.pem  the coordinator's certificate, signed by the CA
  server.key  the coordinator's private key (mode 600), for the coordinator only
An existing ca.pem + ca.key in DIR is kept, so a new server certificate needs no change at the sites.

Example (a real coordinator): bash docker/make-certs.sh fl.hospital-a.example.org 10.1.2.3
USAGE
}

while [ $# -gt 0 ]; do
  case "$1" in
    --out|--days|--owner)
      [ $# -ge 2 ] || { echo "make-certs: $1 needs a value (see --help)" >&2; exit 2; }
      case "$1" in --out) OUT=$2 ;; --days) DAYS=$2 ;; --owner) OWNER=$2 ;; esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "make-certs: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) NAMES+=("$1"); shift ;;
  esac
done
[ ${#NAMES[@]} -gt 0 ] || NAMES=(coordinator localhost 127.0.0.1 ::1)
command -v openssl >/dev/null || { echo "make-certs: needs openssl" >&2; exit 2; }
mkdir -p "$OUT"
umask 077

if [ -f "$OUT/ca.pem" ] && [ -f "$OUT/ca.key" ]; then
  echo "make-certs: keeping the CA in $OUT/ca.pem"
else
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha384 -days 3650 \
    -keyout "$OUT/ca.key" -out "$OUT/ca.pem" -subj "/CN=fedfreeze federation CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  echo "make-certs: new CA in $OUT/ca.pem"
fi

sans=()
for name in "${NAMES[@]}"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then sans+=("IP:$name"); else sans+=("DNS:$name"); fi
done
san_list=$(IFS=,; echo "${sans[*]}")
ext=$(mktemp)
trap 'rm -f "$ext" "$OUT/server.csr"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
  "$san_list" > "$ext"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$OUT/server.key" \
  -out "$OUT/server.csr" -subj "/CN=${NAMES[0]}" 2>/dev/null
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.pem" -CAkey "$OUT/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
  -days "$DAYS" -sha256 -extfile "$ext" -out "$OUT/server.pem" 2>/dev/null
openssl verify -CAfile "$OUT/ca.pem" "$OUT/server.pem" >/dev/null

chmod 644 "$OUT/ca.pem" "$OUT/server.pem"
chmod 600 "$OUT/ca.key" "$OUT/server.key"
if [ "$(id -u)" != "$OWNER" ]; then
  chown "$OWNER:$OWNER" "$OUT/server.key" 2>/dev/null || echo "make-certs: could not chown server.key to $OWNER" \
    "(the containers' user); run: sudo chown $OWNER:$OWNER $OUT/server.key" >&2
fi
echo "make-certs: $OUT/server.pem for $san_list, valid $DAYS days"
