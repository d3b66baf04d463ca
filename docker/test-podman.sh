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
# 7. adds site-c as docker/README.md says (register its key, start its service): 3 sites online;
# 8. kills site-b's container (`podman kill`) while it trains round 2 of a 2-round federation with
#    min-sites = 2: the run completes with site-a and site-c, and metrics.json records site-b's
#    failure in round 2, by name, with the reason;
# 9. the same with site-c killed, when only site-a and site-c are left: 1 site is below min-sites,
#    so the run fails, and `fedfreeze run` and metrics.json say why;
# 10. tears everything down (containers, network, volumes; the images too with --remove-images)
#    and prints the wall time of each step, the image sizes and a summary (SUMMARY=FILE.json keeps it).
#
# Each step prints its name and the seconds since the start; a failure says what failed, prints the
# containers' last log lines and exits 1.
#
# Environment: BASE_IMAGE, WHEELS (wheelhouse folder), PODMAN_COMPOSE (command; default: podman-compose
# from PATH, as Debian 12's package gives (1.0.3), else installed from PyPI into
# ~/.cache/fedfreeze/podman-compose), SUMMARY (write the JSON summary there too), KEEP_WORK=1 keeps
# the temporary folder (secrets, data, logs, summary.json).
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

step() {  # print the step; steps.tsv: seconds since the start, name (its duration is up to the next step)
  printf '%s\t%s\n' $(($(date +%s) - START)) "$*" >>"$WORK/steps.tsv"
  printf '\n== %s (%ds)\n' "$*" $(($(date +%s) - START))
}
fail() { echo "$*" >"$WORK/failure.txt"; echo "test-podman: FAILED: $*" >&2; exit 1; }
note() { printf '%s\t%s\n' "$1" "$2" >>"$WORK/notes.tsv"; }  # KEY VALUE for the summary

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
mkdir -p "$WORK/jobs" && cp docker/jobs/*.toml "$WORK/jobs/"
# steps 8 and 9: round 2 fine-tunes layer4 for 8 epochs (tens of seconds at each site: time to kill
# one in the middle of it); round-timeout bounds the wait should a killed site's failure never come
cat >"$WORK/jobs/kill.toml" <<'JOB'
[model]
input-size = 96
[train]
batch-size = 16
[federation]
rounds = 2
probe-rounds = 1
probe-local-epochs = 5
local-epochs = 8
unfreeze = { layer4 = 0.0 }
min-sites = 2
round-timeout = 300
JOB
export FEDFREEZE_JOBS=$WORK/jobs FEDFREEZE_VERSION=$TAG SITE_THREADS=1 COORDINATOR_BIND=127.0.0.1
COORDINATOR_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export COORDINATOR_PORT
compose() { $PODMAN_COMPOSE -p "$PROJECT" -f docker/compose.yaml "$@"; }
versions() {  # what was tried, for the summary and docker/README.md
  note podman "$(podman --version | awk '{print $3}')"
  note podman_compose "$($PODMAN_COMPOSE version 2>/dev/null | sed -n 's/^podman-compose[a-z]* version *//p' | tail -1)"
  note runc "$(runc --version 2>/dev/null | awk 'NR == 1 {print $3}')"
  note debian "$(cat /etc/debian_version 2>/dev/null || echo '?')"
  note kernel "$(uname -r)"
  note commit "$(git rev-parse HEAD 2>/dev/null || echo '?')$([ -n "$(git status --porcelain -- docker fedfreeze server client pyproject.toml 2>/dev/null)" ] && echo ' dirty')"
  note cpu "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) cores"
}
container() {  # the container of a compose service
  podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1" | head -1
}

summary() {  # summary.json: command, versions, outcome, each step's seconds, what the checks measured
  python3 - "$WORK" "$1" "$(($(date +%s) - START))" "$PODMAN_COMPOSE" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    >"$WORK/summary.json" <<'SUMMARY' || return 0
import json, sys
from pathlib import Path
work, code, total, compose, date = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def rows(name):
    f = work / name
    return [line.split("\t", 1) for line in f.read_text().splitlines()] if f.is_file() else []
steps = rows("steps.tsv")
marks = [int(s) for s, _ in steps] + [total]
failure = work / "failure.txt"
print(json.dumps({
    "command": "bash docker/test-podman.sh",
    "podman_compose_command": compose,
    "date": date,
    "outcome": "passed" if code == 0 else "failed",
    "failure": failure.read_text().strip() if failure.is_file() else None,
    **{k: v for k, v in rows("notes.tsv")},
    "seconds_total": total,
    "steps": [{"step": name, "seconds": marks[i + 1] - marks[i]} for i, (_, name) in enumerate(steps)],
}, indent=2))
SUMMARY
  [ -z "${SUMMARY:-}" ] || cp "$WORK/summary.json" "$SUMMARY"
}

teardown() {
  code=$?
  set +e
  printf '%s\tteardown\n' $(($(date +%s) - START)) >>"$WORK/steps.tsv"
  if [ "$code" != 0 ]; then
    echo "test-podman: logs of the containers (last 40 lines each):" >&2
    for id in $(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT"); do
      echo "--- $(podman inspect -f '{{.Name}}' "$id")" >&2
      podman logs --tail 40 "$id" >&2 2>&1
    done
  fi
  compose down -v -t 10 >"$WORK/logs/down.log" 2>&1
  # podman-compose 1.0.3's `down` leaves the project's network (harmless; removed here, not a failure)
  left=$(podman network ls -q --filter "label=io.podman.compose.project=$PROJECT")
  if [ -n "$left" ]; then
    echo "test-podman: podman-compose down left the network $left (1.0.3 does; removed)"
    podman network rm -f $left >/dev/null 2>&1
  fi
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
  summary "$code"
  python3 -c 'import json, sys
s = json.load(open(sys.argv[1]))
print("test-podman: seconds per step:")
for step in s["steps"]:
    print("  %5d  %s" % (step["seconds"], step["step"]))' "$WORK/summary.json" 2>/dev/null
  if [ "${KEEP_WORK:-0}" = 1 ] || [ "$code" != 0 ]; then echo "test-podman: kept $WORK" >&2; else rm -rf "$WORK"; fi
  echo "test-podman: $([ "$code" = 0 ] && echo PASSED || echo FAILED) in $(($(date +%s) - START)) s"
  exit "$code"
}
trap teardown EXIT
trap 'echo interrupted >"$WORK/failure.txt"; exit 130' INT TERM  # interrupted: tear down, and report a failure

# --- versions
step "versions"
versions
sed 's/\t/ /' "$WORK/notes.tsv"

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
note image_versions "$(podman run --rm --network=none --entrypoint python "$SERVER_IMAGE" -c \
  'import flwr, torch, fedfreeze; print(f"fedfreeze {fedfreeze.__version__}, torch {torch.__version__}, flwr {flwr.__version__}")')"

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
UP_START=$(date +%s)
compose up -d coordinator admin site-a site-b >"$WORK/logs/up.log" 2>&1 || { cat "$WORK/logs/up.log"; fail "compose up"; }
once() {  # [OPTIONS] SERVICE [ARGS]: `compose run --rm --no-deps -T` (-T: no terminal, so plain JSON, no
  # colours). Prints the container's stdout and returns its exit status, with any podman-compose:
  # 1.0.3 exits 0 whatever the container did, and prints its podman commands and "exit code: N"
  # on stdout too (dropped here).
  local out code=0 status
  out=$(mktemp -p "$WORK" once.XXXXXX)
  compose run --rm --no-deps -T "$@" >"$out" || code=$?
  status=$(sed -n 's/^exit code: \(-\{0,1\}[0-9]\{1,\}\)$/\1/p' "$out" | tail -1)
  if [ "$code" = 0 ] && [ -n "$status" ]; then code=$status; fi
  [ "$code" -ge 0 ] 2>/dev/null || code=1
  grep -vE "^(\['podman'|podman |using podman version: |exit code: -?[0-9]+$|\*\* excluding: )" "$out" || true
  rm -f "$out"
  return "$code"
}
admin() { once admin "$@"; }
wait_online() {  # N: wait up to 180 s until exactly N sites are online
  local online=0 _
  for _ in $(seq 60); do
    online=$(admin flwr supernode ls coordinator --format json 2>/dev/null \
      | python3 -c 'import json,sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin).get("nodes", [])))' \
      2>/dev/null || echo 0)
    [ "$online" = "$1" ] && break
    sleep 3
  done
  [ "$online" = "$1" ] || fail "$online of $1 sites online after 180 s"
  echo "$1 sites online"
}
wait_online 2
podman logs "$(container admin)" 2>&1 | grep -E "registered" || fail "the admin service registered nothing"
note sites_online_after_up_s $(($(date +%s) - UP_START))
# a site that started before the admin service registered its key is refused and restarted
restarts=0
for s in site-a site-b; do restarts=$((restarts + $(podman inspect -f '{{.RestartCount}}' "$(container "$s")"))); done
note site_restarts_during_up "$restarts"
echo "site-a and site-b restarted $restarts time(s) before their keys were registered"

# --- 4. a federation of 2 rounds
step "run docker/jobs/quick.toml"
admin run --config /app/jobs/quick.toml --out /app/runs/quick 2>&1 | tee "$WORK/logs/run.log" | grep -vE '^\s*$' | tail -12
[ "${PIPESTATUS[0]}" = 0 ] || fail "fedfreeze run did not complete"
admin flwr ls coordinator --format json >"$WORK/logs/ls.json" 2>/dev/null
grep -q '"finished:completed"' "$WORK/logs/ls.json" || fail "flwr ls does not say finished:completed: $(cat "$WORK/logs/ls.json")"
once --entrypoint cat admin /app/runs/quick/metrics.json >"$WORK/metrics.json" 2>/dev/null || fail "no metrics.json for the quick run"
python3 - "$WORK/metrics.json" "$WORK/notes.tsv" <<'CHECK' || fail "metrics.json of the quick run (the assertion above)"
import json, sys
m = json.load(open(sys.argv[1]))
assert m["status"] == "completed", m.get("reason")
assert m["completed_rounds"] == 2, m["completed_rounds"]
assert [r["parts"] for r in m["rounds"]] == [["head"], ["head", "layer4"]], [r["parts"] for r in m["rounds"]]
assert sorted(s["site"] for s in m["final"]["sites"]) == ["site-a", "site-b"], m["final"]["sites"]
pooled = m["final"]["pooled"]["at_threshold_next"]
assert all(0 <= pooled[k] <= 1 for k in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")), pooled
open(sys.argv[2], "a").write(f"quick_pooled_auroc\t{pooled['auroc']:.3f}\nquick_federation_s\t{m['totals']['seconds']:.0f}\n")
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
code=0
once site-c >"$WORK/logs/site-c.log" 2>&1 || code=$?
grep -E "Exit Code|Failed to activate" "$WORK/logs/site-c.log" | sed 's/\x1b\[[0-9;]*m//g'
[ "$code" != 0 ] || fail "site-c exited 0"
grep -q "Failed to activate SuperNode" "$WORK/logs/site-c.log" || fail "site-c was not refused"
echo "site-c refused: exit code $code"

# --- 7. add a site: register its key, start it
step "add site-c: register its key (admin register site-c), start its service"
mv "$WORK/unregistered/site-c.pub" "$WORK/site-keys/"
admin register site-c 2>&1 | tee "$WORK/logs/register-site-c.log" | grep -iE "regist" || true
grep -qi "registered" "$WORK/logs/register-site-c.log" || fail "admin register site-c: $(tail -3 "$WORK/logs/register-site-c.log")"
compose up -d site-c >"$WORK/logs/up-site-c.log" 2>&1 || { cat "$WORK/logs/up-site-c.log"; fail "compose up -d site-c"; }
wait_online 3

# --- 8 and 9: kill a site's container while it trains round 2
metrics_of() {  # OUT: the run's metrics.json, from the runs volume
  once --entrypoint cat admin "/app/runs/$1/metrics.json" 2>/dev/null
}
train_messages() {  # SITE: how many train messages its SuperNode's log shows received, and replied to
  podman logs "$(container "$1")" 2>&1 \
    | awk '/Receiving: train message/ {r++} /Sending: train message/ {s++} END {printf "%d %d\n", r, s}'
}
run_killing() {  # JOB OUT SITE: submit JOB; once SITE has received its round-2 message, kill its container
  local job=$1 out=$2 victim=$3 id received=0 sent=0 before i
  id=$(container "$victim")
  read -r before _ < <(train_messages "$victim")  # from earlier runs
  admin run --config "/app/jobs/$job" --out "/app/runs/$out" >"$WORK/logs/run-$out.log" 2>&1 &
  RUN_PID=$!
  for i in $(seq 600); do  # up to 300 s for round 1 and round 2's message
    read -r received sent < <(train_messages "$victim")
    [ "$received" -ge $((before + 2)) ] && break
    if ! kill -0 "$RUN_PID" 2>/dev/null; then
      sed 's/\x1b\[[0-9;]*m//g' "$WORK/logs/run-$out.log" | grep -vE '^\s*$' | tail -20
      podman logs --tail 20 "$id" 2>&1
      fail "$out: the run ended before $victim received its round-2 message ($((received - before)) train messages)"
    fi
    sleep 0.5
  done
  [ "$received" -ge $((before + 2)) ] || fail "$out: $victim did not receive its round-2 message within 300 s"
  sleep 5  # its ClientApp is started and training
  podman kill "$id" >/dev/null || fail "podman kill $victim"
  KILLED_AT=$(date +%s)
  read -r received sent < <(train_messages "$victim")
  [ "$sent" -lt "$received" ] || fail "$out: $victim replied to round 2 before it was killed (make round 2 longer)"
  echo "killed $victim's container while it trained round 2 ($(($(date +%s) - START)) s)"
  sleep 5
  if [ "$(podman inspect -f '{{.State.Running}}' "$id")" = true ]; then
    RESTARTED=yes
  else
    RESTARTED=no
  fi
  echo "$victim restarted by its restart policy after podman kill: $RESTARTED"
  set +e
  wait "$RUN_PID"
  RUN_CODE=$?
  set -e
  note "${out}_run_ended_after_kill_s" $(($(date +%s) - KILLED_AT))
  echo "fedfreeze run exit status $RUN_CODE, $(($(date +%s) - KILLED_AT)) s after the kill:"
  sed 's/\x1b\[[0-9;]*m//g' "$WORK/logs/run-$out.log" | grep -E '^(federation completed|fedfreeze run: error)' || true
  metrics_of "$out" >"$WORK/metrics-$out.json" || fail "$out: no metrics.json"
}

step "kill site-b's container in round 2 (3 sites, min-sites 2): the run completes with site-a and site-c"
run_killing kill.toml kill-one site-b
note kill_one_site_b_restarted_by_podman "$RESTARTED"
[ "$RUN_CODE" = 0 ] || fail "kill-one: fedfreeze run exited $RUN_CODE; with 2 of 3 sites left (min-sites 2) it should complete"
python3 - "$WORK/metrics-kill-one.json" "$WORK/notes.tsv" <<'CHECK' || fail "metrics.json of kill-one (the assertion above)"
import json, sys
m = json.load(open(sys.argv[1]))
assert m["status"] == "completed", (m["status"], m.get("reason"))
assert m["completed_rounds"] == 2, m["completed_rounds"]
r1, r2 = m["rounds"]
assert sorted(s["site"] for s in r1["sites"]) == ["site-a", "site-b", "site-c"], r1["sites"]
assert r1["failures"] == [], r1["failures"]
assert sorted(s["site"] for s in r2["sites"]) == ["site-a", "site-c"], r2["sites"]
assert len(r2["failures"]) == 1 and r2["failures"][0]["site"] == "site-b", r2["failures"]
failure = r2["failures"][0]
assert failure["reason"], failure
final = sorted(s["site"] for s in m["final"]["sites"])
assert "site-a" in final and "site-c" in final, final
open(sys.argv[2], "a").write(
    f"kill_one_failure_reason\t{failure['reason']}\nkill_one_failure_after_s\t{failure['seconds']}\n"
    f"kill_one_final_sites\t{','.join(final)}\nkill_one_federation_s\t{m['totals']['seconds']:.0f}\n")
print(f"metrics.json: completed, 2 rounds; round 2 from site-a and site-c; site-b's failure, "
      f"{failure['seconds']:.0f} s into the round: {failure['reason']}; final evaluation: {', '.join(final)}")
CHECK

step "kill site-c's container in round 2 (2 sites left, min-sites 2): the run fails, saying why"
if [ "$RESTARTED" = yes ]; then podman stop -t 5 "$(container site-b)" >/dev/null; fi  # 2 sites left
wait_online 2
run_killing kill.toml kill-two site-c
note kill_two_site_c_restarted_by_podman "$RESTARTED"
[ "$RUN_CODE" != 0 ] || fail "kill-two: fedfreeze run exited 0 with 1 site left and min-sites 2"
grep -q "fewer than min-sites" "$WORK/logs/run-kill-two.log" \
  || fail "kill-two: fedfreeze run did not say the round had fewer replies than min-sites"
python3 - "$WORK/metrics-kill-two.json" "$WORK/notes.tsv" <<'CHECK' || fail "metrics.json of kill-two (the assertion above)"
import json, sys
m = json.load(open(sys.argv[1]))
assert m["status"] == "failed", m["status"]
assert "1 valid replies of training sites, fewer than min-sites = 2" in m["reason"], m["reason"]
assert m["completed_rounds"] == 1, m["completed_rounds"]
failed = m["failed_round"]
assert failed["round"] == 2, failed["round"]
assert [f["site"] for f in failed["failures"]] == ["site-c"], failed["failures"]
open(sys.argv[2], "a").write(f"kill_two_reason\t{m['reason']}\nkill_two_failure\t{failed['failures'][0]['reason']}\n")
print(f"metrics.json: failed after 1 round: {m['reason']}")
CHECK

# --- 10. report
step "images"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "fedfreeze-(server|site):$TAG" | tee "$WORK/images.txt"
note images "$(tr '\n' ';' <"$WORK/images.txt")"
note build_s "$BUILD_SECONDS"
echo "build ${BUILD_SECONDS} s (cached layers are reused: the first build takes minutes); the two images share every layer but the last few"
