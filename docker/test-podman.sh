#!/usr/bin/env bash
# Opt-in end-to-end test of the container deployment, with Podman (no Docker engine needed).
# Not part of scripts/test.sh: it builds two images (minutes) and needs root, podman, runc.
#
#   bash docker/test-podman.sh [--remove-images]
#
# 1. builds the server and site images with no network, from the wheelhouse (docker/wheels, made
#    with docker/make-wheelhouse.sh when missing) on BASE_IMAGE (default: a Debian bookworm root
#    file system made with debootstrap and imported as localhost/debian-python:bookworm, because no
#    container registry may be reachable);
# 2. makes a CA, the coordinator's certificate and three site keys with the scripts in docker/,
#    and the sites' data from the shipped Kermany subset (one read-only folder per site);
# 3. brings up docker/compose.yaml's coordinator and sites a and b with podman-compose (TLS and
#    site authentication on, the keys registered by the compose file's admin service);
# 4. runs docker/jobs/quick.toml (2 rounds) through the admin service and checks that it
#    completed: `fedfreeze run` exits 0, `flwr ls` says finished:completed, metrics.json says
#    completed with pooled metrics from site-a and site-b;
# 5. checks the containers: uid 49999, data read-only, health checks pass, restart policy, no
#    certificate or key inside the images;
# 6. starts site-c, whose key was never registered, and checks that it is refused (non-zero exit,
#    "Failed to activate SuperNode");
# 7. tears everything down (containers, network, volumes; the images too with --remove-images)
#    and prints the wall time and the image sizes.
#
# Environment: BASE_IMAGE, WHEELS (wheelhouse folder), PODMAN_COMPOSE (command; default: podman-compose
# from PATH, else installed from PyPI into ~/.cache/fedfreeze/podman-compose), KEEP_WORK=1 keeps
# the temporary folder (secrets, data, logs).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
REMOVE_IMAGES=0
[ "${1:-}" = "--remove-images" ] && REMOVE_IMAGES=1
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
WHEELS=${WHEELS:-docker/wheels}
TAG=${FEDFREEZE_VERSION:-0.1.0}
SERVER_IMAGE=fedfreeze-server:$TAG
SITE_IMAGE=fedfreeze-site:$TAG
PROJECT=fedfreeze-test-$$
WORK=$(mktemp -d /tmp/fedfreeze-podman.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/logs"

step() { printf '\n== %s (%ds)\n' "$*" $(($(date +%s) - START)); }
fail() { echo "test-podman: FAILED: $*" >&2; exit 1; }

# --- engine: Podman with runc and cgroupfs (see ../shared/guides/CONTAINERS.md)
command -v podman >/dev/null || fail "podman is missing: apt-get install -y podman runc debootstrap"
if [ -z "${CONTAINERS_CONF:-}" ]; then
  printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n' \
    > "$WORK/containers.conf"
  export CONTAINERS_CONF=$WORK/containers.conf
fi
if [ -z "${PODMAN_COMPOSE:-}" ]; then
  if command -v podman-compose >/dev/null; then
    PODMAN_COMPOSE=podman-compose
  else
    tools=${XDG_CACHE_HOME:-$HOME/.cache}/fedfreeze/podman-compose
    [ -x "$tools/bin/podman-compose" ] || { python3 -m venv "$tools" && "$tools/bin/pip" install -q podman-compose==1.6.0; }
    PODMAN_COMPOSE=$tools/bin/podman-compose
  fi
fi

# the compose file, with this test's folders and a free loopback port
export FEDFREEZE_SECRETS=$WORK/secrets FEDFREEZE_SITE_KEYS=$WORK/site-keys FEDFREEZE_SITES=$WORK/sites
export FEDFREEZE_JOBS=$PWD/docker/jobs FEDFREEZE_VERSION=$TAG SITE_THREADS=1 COORDINATOR_BIND=127.0.0.1
COORDINATOR_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export COORDINATOR_PORT
compose() { $PODMAN_COMPOSE -p "$PROJECT" -f docker/compose.yaml "$@"; }
container() {  # the container of a compose service
  podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1" | head -1
}

teardown() {
  code=$?
  set +e
  if [ "$code" != 0 ]; then
    echo "test-podman: logs of the containers (last 40 lines each):" >&2
    for id in $(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT"); do
      echo "--- $(podman inspect -f '{{.Name}}' "$id")" >&2
      podman logs --tail 40 "$id" >&2 2>&1
    done
  fi
  compose down -v -t 10 >"$WORK/logs/down.log" 2>&1
  left=$(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT"; \
         podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT"; \
         podman network ls -q --filter "label=io.podman.compose.project=$PROJECT")
  if [ -n "$left" ]; then
    echo "test-podman: left after down (now removed): $left" >&2
    podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f >/dev/null 2>&1
    podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman volume rm -f >/dev/null 2>&1
    podman network ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman network rm -f >/dev/null 2>&1
    code=1
  fi
  [ "$REMOVE_IMAGES" = 1 ] && podman rmi "$SERVER_IMAGE" "$SITE_IMAGE" >/dev/null
  if [ "${KEEP_WORK:-0}" = 1 ] || [ "$code" != 0 ]; then echo "test-podman: kept $WORK" >&2; else rm -rf "$WORK"; fi
  echo "test-podman: $([ "$code" = 0 ] && echo PASSED || echo FAILED) in $(($(date +%s) - START)) s"
  exit "$code"
}
trap teardown EXIT
trap 'exit 130' INT TERM  # interrupted: tear down, and report a failure

# --- 1. images
step "base image $BASE_IMAGE"
if ! podman image exists "$BASE_IMAGE"; then
  [ "$BASE_IMAGE" = localhost/debian-python:bookworm ] || podman pull "$BASE_IMAGE"
  if ! podman image exists "$BASE_IMAGE"; then
    mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm \
      "$WORK/rootfs" "${mirror:-http://deb.debian.org/debian}" >"$WORK/logs/debootstrap.log"
    tar -C "$WORK/rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
    rm -rf "$WORK/rootfs"
  fi
fi
[ -f "$WHEELS/requirements.txt" ] || { step "wheelhouse $WHEELS"; bash docker/make-wheelhouse.sh "$WHEELS"; }
BUILD_START=$(date +%s)
for target in server site; do
  step "build fedfreeze-$target:$TAG (no network)"
  podman build --network=none --format docker -f docker/Dockerfile --target "$target" -t "fedfreeze-$target:$TAG" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-context wheels="$WHEELS" . >"$WORK/logs/build-$target.log" 2>&1 \
    || { tail -30 "$WORK/logs/build-$target.log"; fail "building the $target image"; }
  grep -E '^fedfreeze [0-9]' "$WORK/logs/build-$target.log" | tail -1 || true  # not printed when cached
done
BUILD_SECONDS=$(($(date +%s) - BUILD_START))

# --- 2. certificates, keys, data
step "certificates, site keys, site data"
bash docker/make-certs.sh --out "$WORK/secrets" coordinator localhost 127.0.0.1
for site in site-a site-b site-c; do
  bash docker/make-site-key.sh --secrets "$WORK/secrets" --public "$WORK/site-keys" "$site"
done
mkdir -p "$WORK/unregistered" && mv "$WORK/site-keys/site-c.pub" "$WORK/unregistered/"  # site-c is never registered
[ "$(stat -c '%u %a' "$WORK/secrets/site-a.key")" = "49999 600" ] || fail "site-a.key is not owned by 49999 with mode 600"
python3 docker/make-sample-sites.py "$WORK/sites"

# --- 3. the federation up: coordinator, registration, two sites
step "compose up: coordinator, admin (registers the keys), site-a, site-b"
compose up -d coordinator admin site-a site-b >"$WORK/logs/up.log" 2>&1 || { cat "$WORK/logs/up.log"; fail "compose up"; }
admin() { compose run --rm --no-deps -T admin "$@"; }  # -T: no terminal, so plain JSON (no colours)
online=0
for _ in $(seq 60); do
  online=$(admin flwr supernode ls coordinator --format json 2>/dev/null \
    | python3 -c 'import json,sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin).get("nodes", [])))' \
    2>/dev/null || echo 0)
  [ "$online" = 2 ] && break
  sleep 3
done
[ "$online" = 2 ] || fail "$online of 2 sites online"
podman logs "$(container admin)" 2>&1 | grep -E "registered" || fail "the admin service registered nothing"
echo "2 sites online"

# --- 4. a federation of 2 rounds
step "run docker/jobs/quick.toml"
admin run --config /app/jobs/quick.toml --out /app/runs/quick 2>&1 | tee "$WORK/logs/run.log" | grep -vE '^\s*$' | tail -12
[ "${PIPESTATUS[0]}" = 0 ] || fail "fedfreeze run did not complete"
admin flwr ls coordinator --format json >"$WORK/logs/ls.json" 2>/dev/null
grep -q '"finished:completed"' "$WORK/logs/ls.json" || fail "flwr ls does not say finished:completed: $(cat "$WORK/logs/ls.json")"
compose run --rm --no-deps -T --entrypoint cat admin /app/runs/quick/metrics.json >"$WORK/metrics.json" 2>/dev/null
python3 - "$WORK/metrics.json" <<'CHECK' || fail "metrics.json"
import json, sys
m = json.load(open(sys.argv[1]))
assert m["status"] == "completed", m.get("reason")
assert m["completed_rounds"] == 2, m["completed_rounds"]
assert [r["parts"] for r in m["rounds"]] == [["head"], ["head", "layer4"]], [r["parts"] for r in m["rounds"]]
assert sorted(s["site"] for s in m["final"]["sites"]) == ["site-a", "site-b"], m["final"]["sites"]
pooled = m["final"]["pooled"]["at_threshold_next"]
assert all(0 <= pooled[k] <= 1 for k in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")), pooled
print(f"metrics.json: completed, {m['completed_rounds']} rounds, pooled AUROC {pooled['auroc']:.3f}, "
      f"balanced accuracy {pooled['balanced_accuracy']:.3f} (n={pooled['n']}), "
      f"uplink {m['totals']['bytes_up'] / 1e6:.2f} MB, {m['totals']['seconds']:.0f} s")
CHECK

# --- 5. the containers
step "containers: user, read-only data, health, restart policy, no secrets in the images"
for service in coordinator site-a site-b; do
  id=$(container "$service")
  [ "$(podman exec "$id" id -u)" = 49999 ] || fail "$service does not run as uid 49999"
  [ "$(podman inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$id")" = unless-stopped ] || fail "$service restart policy"
  podman healthcheck run "$id" >/dev/null || fail "$service health check"
done
podman exec "$(container site-a)" sh -c 'touch /data/x' 2>/dev/null && fail "site-a can write its data"
for image in "$SERVER_IMAGE" "$SITE_IMAGE"; do
  found=$(podman run --rm --network=none --entrypoint sh "$image" -c \
    'find / -xdev \( -name "*.key" -o -name "server.pem" -o -name "ca.pem" -o -name "site-keys" \) 2>/dev/null | grep -v ^/proc' || true)
  [ -z "$found" ] || fail "$image holds secrets: $found"
done
echo "uid 49999, data read-only, healthy, restart unless-stopped, no keys or certificates in the images"

# --- 6. a site whose key was never registered
step "site-c (key not registered) is refused"
set +e
compose run --rm --no-deps -T site-c >"$WORK/logs/site-c.log" 2>&1
code=$?
set -e
grep -E "Exit Code|Failed to activate" "$WORK/logs/site-c.log" | sed 's/\x1b\[[0-9;]*m//g'
[ "$code" != 0 ] || fail "site-c exited 0"
grep -q "Failed to activate SuperNode" "$WORK/logs/site-c.log" || fail "site-c was not refused"
echo "site-c refused: exit code $code"

# --- 7. report
step "images"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "fedfreeze-(server|site):$TAG"
echo "build ${BUILD_SECONDS} s (cached layers are reused: the first build takes minutes); the two images share every layer but the last few"
