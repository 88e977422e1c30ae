#!/usr/bin/env bash
# A real Argo CD against the e2e test control plane (e2e/cluster.sh), run as plain processes on
# loopback: redis (its cache), argocd-repo-server and argocd-application-controller
# (--persist-resource-health, so every resource's health lands in the Application's
# .status.resources[].health). No argocd-server, no Dex, no UI: Applications are created with kubectl.
# The argocd binary comes from e2e/bin/ (built and cached by `e2e/tools.sh argocd`, called here if
# the link is missing; a cold build takes 11+ min on 2 cores).
#
# usage: e2e/argocd.sh up|down|status
#   up      (re)apply the cluster objects and start whatever is not running; a no-op for processes
#           that already run against this cluster. If the cluster was restarted (new kubeconfig),
#           the old processes are stopped and everything starts fresh.
#   down    stop exactly the processes `up` started (pid files; TERM, then KILL) and remove the
#           state dir (KEEP_STATE=1 keeps it). The cluster objects stay (they are inert without
#           the controller, and `e2e/cluster.sh down` wipes them with the cluster).
#   status  which processes run; exit 0 only if all do
#
# Cluster objects `up` applies (server-side, field manager e2e-argocd):
#   the Application and AppProject CRDs (manifests/crds/ of the same Argo CD module), namespace
#   argocd, argocd-cm (labelled app.kubernetes.io/part-of=argocd, else Argo CD ignores it) holding
#   the Outrider health checks rendered from the chart (templates/argocd-health.yaml, so the chart
#   is their one source), argocd-secret (server.secretkey) and the `default` AppProject.
#
# environment:
#   OUTRIDER_CLUSTER_DIR  the cluster's state dir (default e2e/.cluster); ours is its argocd/ subdir
#   KEEP_STATE=1          `down` keeps the state dir
#   ARGOCD_TIMEOUT        seconds to wait for each readiness step (default 120)
#
# State dir layout (${OUTRIDER_CLUSTER_DIR:-e2e/.cluster}/argocd/):
#   ports.env             REDIS_PORT REPO_PORT REPO_METRICS_PORT CONTROLLER_METRICS_PORT
#   kubeconfig.sha256     the cluster kubeconfig the processes were started with
#   bin/                  argocd-repo-server, argocd-application-controller: links to the argocd
#                         binary (it picks its role from the name it was run as)
#   redis.conf redis/     redis config and working dir (no persistence)
#   argocd-cm.json        the argocd-cm applied; argocd-secret.key the generated server.secretkey
#   tmp/ home/            TMPDIR and HOME of the Argo CD processes (repo checkouts, git config)
#   logs/<name>.log  pids/<name>.pid
#
# Ports: all on 127.0.0.1, picked free at `up`. One exception Argo CD does not let us change: the
# application controller's metrics/healthz listener binds 0.0.0.0:CONTROLLER_METRICS_PORT (it only
# listens; nothing is sent anywhere but the loopback API server, redis and repo-server).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
BIN="$here/bin"
CLUSTER=${OUTRIDER_CLUSTER_DIR:-$here/.cluster}
case $CLUSTER in /*) ;; *) CLUSTER="$PWD/$CLUSTER" ;; esac
CLUSTER=${CLUSTER%/}
STATE="$CLUSTER/argocd"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
KUBECONFIG_ADMIN="$CLUSTER/kubeconfig"
TIMEOUT=${ARGOCD_TIMEOUT:-120}
NS=argocd
MANAGER=e2e-argocd

# start order; `down` goes in reverse
COMPONENTS=(redis-server argocd-repo-server argocd-application-controller)

log() { printf '[argocd %3ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[argocd] ERROR: %s\n' "$*" >&2; exit 1; }

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" --request-timeout=20s "$@"; }

# ---------------------------------------------------------------- prerequisites

need_tools() {
  local missing=()
  for c in git curl jq openssl setsid nohup sha256sum python3; do command -v "$c" >/dev/null || missing+=("$c"); done
  command -v redis-server >/dev/null || missing+=(redis-server)
  [ ${#missing[@]} -eq 0 ] || die "missing commands: ${missing[*]} (Debian: run e2e/deps.sh as root, or apt-get install git curl jq openssl util-linux coreutils python3 redis-server)"
  [ -x "$BIN/kubectl" ] || die "$BIN/kubectl is missing: run e2e/tools.sh kubernetes (or e2e/cluster.sh up)"
  local tools=()
  [ -x "$BIN/argocd" ] || tools+=(argocd)
  [ -x "$BIN/helm" ] || tools+=(helm)
  if [ ${#tools[@]} -gt 0 ]; then
    log "missing in $BIN: building ${tools[*]} with e2e/tools.sh (cached; a cold argocd build takes 11+ min)"
    "$here/tools.sh" "${tools[@]}" >&2 || die "e2e/tools.sh ${tools[*]} failed; fix it and run e2e/tools.sh ${tools[*]}"
  fi
  ARGOCD_DIR=$(dirname "$(readlink -f "$BIN/argocd")")
  [ -x "$ARGOCD_DIR/hack/git-verify-wrapper.sh" ] && [ -f "$ARGOCD_DIR/crds/application-crd.yaml" ] ||
    die "$ARGOCD_DIR lacks hack/git-verify-wrapper.sh or crds/: rebuild with rm -rf $ARGOCD_DIR && e2e/tools.sh argocd"
}

need_cluster() {
  [ -f "$KUBECONFIG_ADMIN" ] || die "no test cluster at $CLUSTER: run e2e/cluster.sh up first"
  kc get --raw /readyz >/dev/null 2>&1 || die "the test cluster ($KUBECONFIG_ADMIN) does not answer: run e2e/cluster.sh up"
}

# ---------------------------------------------------------------- processes (as e2e/cluster.sh)

proc_state() {
  local stat state ppid
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  read -r state ppid _ <<<"${stat##*) }"
  echo "$state $ppid"
}

# is_component NAME PID: PID is a live process of NAME for this state dir. The Argo CD roles run
# as $STATE/bin/NAME (argv[0]); redis rewrites its argv into one title, "redis-server ADDR CONFIG"
# (proc-title-template in redis.conf), whose config file is in $STATE.
is_component() {
  local name=$1 pid=$2 st argv=() first
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  mapfile -d '' -t argv 2>/dev/null < "/proc/$pid/cmdline" || return 1
  [ ${#argv[@]} -gt 0 ] || return 1
  first=${argv[0]%% *}
  [ "${first##*/}" = "$name" ] || return 1
  [[ "${argv[*]}" == *"$STATE/"* ]] || return 1
  st=$(proc_state "$pid") || return 1
  [ "${st%% *}" != Z ]
}

pid_of() {
  local f="$PIDS/$1.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  is_component "$1" "$pid" || return 1
  echo "$pid"
}

start_proc() { # start_proc NAME [VAR=VALUE...] -- BINARY ARGS...
  local name=$1; shift
  local envs=() pid st deadline
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [[ $fd =~ ^[0-9]+$ ]] && [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec env "${envs[@]}" setsid nohup "$@" </dev/null >"$LOGS/$name.log" 2>&1
  ) &
  pid=$!
  echo "$pid" > "$PIDS/$name.pid"
  deadline=$((SECONDS + TIMEOUT))
  until is_component "$name" "$pid"; do
    st=$(proc_state "$pid") || st=
    if [ -z "$st" ] || [ "${st%% *}" = Z ] || [ "${st#* }" != "$BASHPID" ]; then
      fail_proc "$name" "$name (pid $pid) exited before or while starting $1"
    fi
    if [ $SECONDS -ge $deadline ]; then
      kill -KILL "$pid" 2>/dev/null || true
      fail_proc "$name" "$name (pid $pid) did not exec $1 within ${TIMEOUT}s"
    fi
    sleep 0.05
  done
}

stop_all() {
  local i name pid pids=() deadline entry
  [ -d "$PIDS" ] || return 0
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name=${COMPONENTS[$i]}
    if pid=$(pid_of "$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$name:$pid")
    fi
  done
  deadline=$((SECONDS + 8))
  for entry in "${pids[@]}"; do
    name=${entry%%:*}; pid=${entry#*:}
    while pid_of "$name" >/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if pid_of "$name" >/dev/null; then
      log "$name (pid $pid) ignored TERM, sending KILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for entry in "${pids[@]}"; do
    name=${entry%%:*}
    for _ in $(seq 1 25); do pid_of "$name" >/dev/null || break; sleep 0.2; done
  done
  rm -f "$PIDS"/*.pid
}

# Processes of ours whose pid files are gone (e.g. `e2e/cluster.sh down` or a fresh `cluster.sh up`
# removed the whole cluster dir, ours included, while they ran): found by is_component, which
# matches only our role names run from (or configured in) this very state dir, and stopped by pid.
sweep_orphans() {
  local p name pids=()
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    for name in "${COMPONENTS[@]}"; do
      if is_component "$name" "$p"; then pids+=("$p"); break; fi
    done
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  log "stopping ${#pids[@]} leftover processes of an earlier run in $STATE (pids ${pids[*]})"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 1 40); do
    local alive=()
    for p in "${pids[@]}"; do [ -e "/proc/$p" ] && alive+=("$p"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    sleep 0.2
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

fail_proc() {
  local name=$1 msg=$2
  {
    printf '[argocd] ERROR: %s\n' "$msg"
    printf '[argocd] ---- last 40 lines of %s ----\n' "$LOGS/$name.log"
    tail -n 40 "$LOGS/$name.log" 2>/dev/null || true
    printf '[argocd] ----\n'
  } >&2
  stop_all
  log "stopped the processes; logs kept in $LOGS"
  exit 1
}

wait_for() {
  local name=$1 what=$2; shift 2
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    pid_of "$name" >/dev/null || fail_proc "$name" "$name exited while waiting for: $what"
    [ $SECONDS -lt $deadline ] || fail_proc "$name" "timed out after ${TIMEOUT}s waiting for: $what"
    sleep 0.25
  done
}

free_ports() { # free_ports N: N distinct free TCP ports on 127.0.0.1
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

load_ports() { [ -f "$STATE/ports.env" ] && . "$STATE/ports.env"; }

redis_ok() ( # PING over plain TCP (no redis-cli needed); a subshell, so a failed connect only fails it
  exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || exit 1
  printf 'PING\r\n' >&3
  read -r -t 3 reply <&3 || exit 1
  [[ $reply == +PONG* ]]
)

http_ok() { [ "$(curl -sS --noproxy '*' --max-time 3 "$1" 2>/dev/null)" = ok ]; }

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || return 1; done
}

# ---------------------------------------------------------------- cluster objects

apply_objects() {
  log "applying the Argo CD CRDs, namespace $NS, argocd-cm (Outrider health checks), argocd-secret, AppProject default"
  kc apply --server-side --force-conflicts --field-manager=$MANAGER \
    -f "$ARGOCD_DIR/crds/application-crd.yaml" -f "$ARGOCD_DIR/crds/appproject-crd.yaml" >/dev/null
  "$here/cluster.sh" wait-crds crd/applications.argoproj.io crd/appprojects.argoproj.io ||
    die "the Argo CD CRDs were not Established"
  kc create namespace "$NS" --dry-run=client -o yaml | kc apply --server-side --field-manager=$MANAGER -f - >/dev/null

  # the health checks exactly as the chart renders them for users (argocd.healthChecks=true)
  local health
  health=$("$BIN/helm" template outrider "$repo/charts/outrider" --namespace "$NS" --kube-version 1.37.2 \
    --set argocd.healthChecks=true --show-only templates/argocd-health.yaml |
    kc create --dry-run=client -o json -f -) || die "rendering charts/outrider templates/argocd-health.yaml failed"
  echo "$health" | jq -e '.data | keys | length == 6' >/dev/null ||
    die "the chart's argocd-health ConfigMap does not hold 6 health checks (one per kind)"
  echo "$health" | jq --arg ns "$NS" '{
      apiVersion: "v1", kind: "ConfigMap",
      metadata: {name: "argocd-cm", namespace: $ns,
                 labels: {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"}},
      data: .data
    }' > "$STATE/argocd-cm.json"
  kc apply --server-side --force-conflicts --field-manager=$MANAGER -f "$STATE/argocd-cm.json" >/dev/null

  [ -s "$STATE/argocd-secret.key" ] || (umask 077; openssl rand -base64 32 > "$STATE/argocd-secret.key")
  jq -n --arg ns "$NS" --arg key "$(cat "$STATE/argocd-secret.key")" '{
      apiVersion: "v1", kind: "Secret", type: "Opaque",
      metadata: {name: "argocd-secret", namespace: $ns,
                 labels: {"app.kubernetes.io/name": "argocd-secret", "app.kubernetes.io/part-of": "argocd"}},
      stringData: {"server.secretkey": $key}
    }' | kc apply --server-side --force-conflicts --field-manager=$MANAGER -f - >/dev/null

  kc apply --server-side --force-conflicts --field-manager=$MANAGER -f - >/dev/null <<EOF
apiVersion: argoproj.io/v1alpha1
kind: AppProject
metadata:
  name: default
  namespace: $NS
spec:
  sourceRepos: ['*']
  destinations: [{server: '*', namespace: '*'}]
  clusterResourceWhitelist: [{group: '*', kind: '*'}]
EOF
}

# ---------------------------------------------------------------- commands

cmd_up() {
  need_tools
  need_cluster
  local t0=$SECONDS sum
  sum=$(sha256sum < "$KUBECONFIG_ADMIN" | cut -d' ' -f1)
  if [ -d "$STATE" ]; then
    if [ "$(cat "$STATE/kubeconfig.sha256" 2>/dev/null)" != "$sum" ]; then
      log "found state for another cluster (or an unfinished up) in $STATE: stopping what is left and starting fresh"
      stop_all
      rm -rf "$STATE"
    elif ! all_running; then
      log "some processes are not running: stopping the rest and starting fresh"
      stop_all
    fi
  else
    sweep_orphans
  fi
  mkdir -p "$STATE" "$LOGS" "$PIDS" "$STATE/bin" "$STATE/redis" "$STATE/tmp" "$STATE/home"
  chmod 700 "$STATE"
  apply_objects

  if all_running; then
    load_ports
    log "already running (repo-server 127.0.0.1:$REPO_PORT, redis 127.0.0.1:$REDIS_PORT); objects re-applied"
    return 0
  fi
  local ports
  read -r -a ports <<<"$(free_ports 4)"
  [ ${#ports[@]} -eq 4 ] || die "could not pick free ports"
  cat > "$STATE/ports.env" <<EOF
REDIS_PORT=${ports[0]}
REPO_PORT=${ports[1]}
REPO_METRICS_PORT=${ports[2]}
CONTROLLER_METRICS_PORT=${ports[3]}
EOF
  load_ports
  ln -sfn "$ARGOCD_DIR/argocd" "$STATE/bin/argocd-repo-server"
  ln -sfn "$ARGOCD_DIR/argocd" "$STATE/bin/argocd-application-controller"

  cat > "$STATE/redis.conf" <<EOF
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize no
save ""
appendonly no
dir $STATE/redis
proc-title-template "{title} {listen-addr} {config-file}"
EOF
  log "redis on 127.0.0.1:$REDIS_PORT"
  start_proc redis-server -- "$(command -v redis-server)" "$STATE/redis.conf"
  wait_for redis-server "redis PING" redis_ok

  # git and git-verify-wrapper.sh on PATH: repo-server runs the wrapper even with GPG off
  local path="$ARGOCD_DIR/hack:$PATH"
  local common=(PATH="$path" HOME="$STATE/home" TMPDIR="$STATE/tmp" ARGOCD_GPG_ENABLED=false)
  log "argocd-repo-server on 127.0.0.1:$REPO_PORT (metrics 127.0.0.1:$REPO_METRICS_PORT)"
  start_proc argocd-repo-server "${common[@]}" ARGOCD_ASK_PASS_SOCK="$STATE/askpass.sock" -- \
    "$STATE/bin/argocd-repo-server" \
    --address 127.0.0.1 --port "$REPO_PORT" \
    --metrics-address 127.0.0.1 --metrics-port "$REPO_METRICS_PORT" \
    --disable-tls --client-ca-path "" \
    --redis "127.0.0.1:$REDIS_PORT" \
    --logformat text
  wait_for argocd-repo-server "argocd-repo-server /healthz?full=true" \
    http_ok "http://127.0.0.1:$REPO_METRICS_PORT/healthz?full=true"

  log "argocd-application-controller (metrics/healthz :$CONTROLLER_METRICS_PORT)"
  start_proc argocd-application-controller "${common[@]}" \
    ARGOCD_FAKE_IN_CLUSTER=true KUBECONFIG="$KUBECONFIG_ADMIN" -- \
    "$STATE/bin/argocd-application-controller" \
    --namespace "$NS" \
    --repo-server "127.0.0.1:$REPO_PORT" --repo-server-plaintext \
    --redis "127.0.0.1:$REDIS_PORT" \
    --metrics-port "$CONTROLLER_METRICS_PORT" \
    --persist-resource-health \
    --logformat text
  wait_for argocd-application-controller "argocd-application-controller /healthz" \
    http_ok "http://127.0.0.1:$CONTROLLER_METRICS_PORT/healthz"

  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || fail_proc "$c" "$c exited during startup"; done
  echo "$sum" > "$STATE/kubeconfig.sha256"
  log "up in $((SECONDS - t0))s (state: $STATE)"
}

cmd_down() {
  if [ ! -d "$STATE" ]; then
    sweep_orphans
    log "nothing else to stop ($STATE does not exist)"
    return 0
  fi
  stop_all
  if [ "${KEEP_STATE:-0}" = 1 ]; then
    log "stopped; state kept in $STATE (KEEP_STATE=1)"
  else
    rm -rf "$STATE"
    log "stopped; removed $STATE"
  fi
}

cmd_status() {
  local c pid up=0
  if [ ! -d "$STATE" ]; then
    echo "down: $STATE does not exist"
    return 1
  fi
  for c in "${COMPONENTS[@]}"; do
    if pid=$(pid_of "$c"); then
      printf '%-32s running (pid %s)\n' "$c" "$pid"
    else
      printf '%-32s NOT running\n' "$c"
      up=1
    fi
  done
  [ -f "$STATE/ports.env" ] && sed 's/^/  /' "$STATE/ports.env"
  return $up
}

# one `up`/`down` at a time per state dir (the lock lives outside the dir, which `down` removes)
with_lock() {
  local lock="${TMPDIR:-/tmp}/outrider-argocd-$(printf '%s' "$STATE" | md5sum | cut -c1-12).lock"
  exec 9>"$lock"
  if command -v flock >/dev/null; then
    flock -w 900 9 || die "another e2e/argocd.sh holds $lock"
  fi
  "$@"
}

case ${1:-} in
  up) with_lock cmd_up ;;
  down) with_lock cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
