#!/usr/bin/env bash
# `make demo`: every kind of Outrider resource working against real hosts on this machine.
#
# usage: e2e/demo.sh [up]     (root; the local control plane must be up: e2e/cluster.sh up)
#        e2e/demo.sh down
#
# up:
#   1. the demo fleet (e2e/fleet.sh up): web-1, web-2, db-1, network-namespace hosts with real sshd
#      on 198.19.0.11-13, each serving "the shop" on :8080, and Secret `fleet-ssh` for them;
#   2. the CRDs, and the controller as a local process watching namespace outrider-demo (its
#      operator namespace too: the agents' ConfigMap and Pods live there);
#   3. VictoriaLogs on 127.0.0.1:9428 (the log store, fed through its Loki push API);
#   4. namespace outrider-demo: the fleet's Secret and examples/*.yaml, as rendered for this demo
#      into <state>/demo/examples/ (same file names; see render);
#   5. the node agent as a local process for kwok-node-0: a Pod object on that node (kwok keeps it
#      Running) that the agent reports its config hash on, and its agent.yaml kept in sync with the
#      ConfigMap `outrider-agent` the controller renders (a kubelet would mount it);
#   6. waits (OUTRIDER_DEMO_TIMEOUT, default 120 s) until every resource settled: Inventory Ready,
#      plan Succeeded, HealthCheck healthy, SecurityPolicy applied on every host, LogPipeline Ready
#      and lines in the store; prints `kubectl get outrider` and what happened. Exit 1 if not.
#   Idempotent: run again, it keeps the fleet and the objects and restarts the processes.
#   With OUTRIDER_DEMO_APPLY=0, steps 1-5 but for applying the examples (the Secret is applied;
#   the agent waits for the ConfigMap the controller renders once a LogPipeline exists), and no
#   step 6: it prints the directory of the rendered examples (<state>/demo/examples) as the last
#   line on stdout and exits 0, for a caller that brings them in its own way (the Argo CD e2e test
#   commits them to Git) and judges the result itself.
# down: deletes the namespace (while the controller still runs, for the plan's finalizer), stops
#   the agent, the controller and VictoriaLogs, takes the fleet down, removes the demo's state.
#
# Environment:
#   OUTRIDER_CLUSTER_DIR   the control plane's state dir (kubeconfig), as for e2e/cluster.sh
#   OUTRIDER_DEMO_DIR      where the demo keeps its state: <dir>/demo and <dir>/fleet (default:
#                          the cluster dir)
#   OUTRIDER_DEMO_SLOT     0-250 (default 0). Another slot is a second, independent demo: fleet
#                          198.19.S.0/24 (bridge ordemoS, namespaces ordemoS-<host>), Kubernetes
#                          namespace outrider-demo-S, logs /var/log/outrider-demo-S, a free store
#                          port; the examples are applied with those addresses (see render)
#   OUTRIDER_DEMO_TIMEOUT  seconds to wait for everything to settle (default 120)
#   OUTRIDER_DEMO_APPLY    1 (default): apply the examples and wait; 0: neither (see up above)
#   OUTRIDER_BIN           the outrider binary (default target/debug/outrider)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLUSTER=${OUTRIDER_CLUSTER_DIR:-$repo/e2e/.cluster}
case $CLUSTER in /*) ;; *) CLUSTER="$PWD/$CLUSTER" ;; esac
export OUTRIDER_CLUSTER_DIR=$CLUSTER
PARENT=${OUTRIDER_DEMO_DIR:-$CLUSTER}
case $PARENT in /*) ;; *) PARENT="$PWD/$PARENT" ;; esac
export OUTRIDER_DEMO_DIR=$PARENT
SLOT=${OUTRIDER_DEMO_SLOT:-0}
[[ $SLOT =~ ^[0-9]+$ ]] && [ "$SLOT" -le 250 ] || { echo "[demo] OUTRIDER_DEMO_SLOT must be 0-250, not '$SLOT'" >&2; exit 2; }
SLOT=$((10#$SLOT))
export OUTRIDER_DEMO_SLOT=$SLOT
TIMEOUT=${OUTRIDER_DEMO_TIMEOUT:-120}
APPLY=${OUTRIDER_DEMO_APPLY:-1}
[[ $APPLY =~ ^[01]$ ]] || { echo "[demo] OUTRIDER_DEMO_APPLY must be 0 or 1, not '$APPLY'" >&2; exit 2; }
BIN=${OUTRIDER_BIN:-$repo/target/debug/outrider}
KC="$CLUSTER/kubeconfig"
STATE="${PARENT%/}/demo"
FLEET="${PARENT%/}/fleet"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
if [ "$SLOT" = 0 ]; then
  NS=outrider-demo NETNS_PREFIX=ordemo LOGROOT=/var/log/outrider-demo
else
  NS=outrider-demo-$SLOT NETNS_PREFIX=ordemo$SLOT LOGROOT=/var/log/outrider-demo-$SLOT
fi
NET=198.19.$SLOT
# how the summary tells to run e2e/fleet.sh for this demo
FLEETSH=e2e/fleet.sh
if [ "$SLOT" != 0 ]; then FLEETSH="OUTRIDER_DEMO_SLOT=$SLOT $FLEETSH"; fi
if [ "$PARENT" != "$repo/e2e/.cluster" ]; then FLEETSH="OUTRIDER_DEMO_DIR=$PARENT $FLEETSH"; fi
AGENT_NODE=kwok-node-0
AGENT_POD=outrider-agent-$AGENT_NODE

kubectl() { "$repo/e2e/bin/kubectl" --kubeconfig "$KC" "$@"; }
log() { printf '[demo %3ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[demo] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- processes

# The demo's processes (controller, victoria-logs, agent, agent-sync) have pid files in $PIDS; a
# pid counts only while it is alive and its environment has OUTRIDER_DEMO_STATE=<this state dir>
# (start_daemon sets it), so a recycled pid is never taken for one of them.
pid_of() {
  local pid environ
  pid=$(cat "$PIDS/$1.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  environ=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || return 1
  [[ $'\n'$environ$'\n' == *$'\n'"OUTRIDER_DEMO_STATE=$STATE"$'\n'* ]] || return 1
  [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  echo "$pid"
}

# start_daemon NAME ENV=VALUE... -- COMMAND...: in a session of its own, output to $LOGS/NAME.log,
# no inherited descriptor above 2 (a caller's pipe read to EOF must not wait for it)
start_daemon() {
  local name=$1; shift
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [[ $fd =~ ^[0-9]+$ ]] && [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec env "OUTRIDER_DEMO_STATE=$STATE" "${envs[@]}" setsid nohup "$@" </dev/null >>"$LOGS/$name.log" 2>&1
  ) &
  echo $! >"$PIDS/$name.pid"
}

stop_daemon() { # stop_daemon NAME: TERM, then KILL after 10 s
  local pid i
  if pid=$(pid_of "$1"); then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do pid_of "$1" >/dev/null || break; sleep 0.2; done
    if pid_of "$1" >/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    log "$1 stopped"
  fi
  rm -f "$PIDS/$1.pid"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

port_free() { # port_free PORT: nothing listens on 127.0.0.1:PORT
  ! timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# ---------------------------------------------------------------- pieces

# The store's port: 9428 (VictoriaLogs' own default, what the examples say) for slot 0 when free,
# else a free one; kept in $STATE/store.port across runs.
store_port() {
  local port
  if [ -s "$STATE/store.port" ] && pid_of victoria-logs >/dev/null; then cat "$STATE/store.port"; return; fi
  port=9428
  if [ "$SLOT" != 0 ] || ! port_free "$port"; then port=$(free_port); fi
  echo "$port" >"$STATE/store.port"
  echo "$port"
}

# render FILE: the example as this demo applies it: as written for slot 0 (with the store's port),
# with the slot's addresses and log dir otherwise
render() {
  local suffix=""
  if [ "$SLOT" != 0 ]; then suffix="-$SLOT"; fi
  # cluster-scoped ClusterLogPipelines: one name per slot, labelled for the slot's controller
  sed -e "s/198\.19\.0\./$NET./g" \
    -e "s#outrider.dev/demo-slot: \"0\"#outrider.dev/demo-slot: \"$SLOT\"#" \
    -e "s/^  name: shop-logs\$/  name: shop-logs$suffix/" \
    -e "s#/var/log/outrider-demo/#$LOGROOT/#g" \
    -e "s/127\.0\.0\.1:9428/127.0.0.1:$PORT/g" "$1"
}

# Every example, rendered, into $STATE/examples/ under its own name: what this demo applies
render_examples() {
  rm -rf -- "$STATE/examples"
  mkdir -p "$STATE/examples"
  local f
  for f in "$repo"/examples/*.yaml; do render "$f" >"$STATE/examples/${f##*/}"; done
}

start_store() {
  [ -x "$repo/e2e/bin/victoria-logs" ] || die "e2e/bin/victoria-logs is missing: run e2e/tools.sh victorialogs"
  stop_daemon victoria-logs
  port_free "$PORT" || die "127.0.0.1:$PORT is taken: stop what listens there, or remove $STATE/store.port"
  mkdir -p "$STATE/victorialogs"
  start_daemon victoria-logs -- "$repo/e2e/bin/victoria-logs" "-httpListenAddr=127.0.0.1:$PORT" \
    "-storageDataPath=$STATE/victorialogs" -retentionPeriod=7d
  local i
  for i in $(seq 150); do
    [ "$(curl -fsS --max-time 1 "http://127.0.0.1:$PORT/health" 2>/dev/null)" = OK ] && break
    pid_of victoria-logs >/dev/null || { tail -n 20 "$LOGS/victoria-logs.log" >&2; die "victoria-logs exited"; }
    sleep 0.1
  done
  [ "$(curl -fsS --max-time 1 "http://127.0.0.1:$PORT/health" 2>/dev/null)" = OK ] || die "victoria-logs does not answer on 127.0.0.1:$PORT"
  log "VictoriaLogs on http://127.0.0.1:$PORT (log $LOGS/victoria-logs.log)"
}

start_controller() {
  stop_daemon controller
  local port
  port=$(free_port)
  start_daemon controller "KUBECONFIG=$KC" "RUST_LOG=${RUST_LOG:-info}" -- "$BIN" controller \
    --leader-elect=false --watch-namespace "$NS" --lease-namespace "$NS" \
    --identity "outrider-demo-$SLOT" --metrics-addr "127.0.0.1:$port" \
    --cluster-pipeline-selector "outrider.dev/demo-slot=$SLOT"
  echo "$port" >"$STATE/controller.port"
  log "controller running (pid $(cat "$PIDS/controller.pid"), log $LOGS/controller.log, metrics http://127.0.0.1:$port/metrics)"
}

# The agent's Pod: kwok keeps it Running on the node; the local agent process reports on it
# The agent's metrics port, kept in $STATE/agent.port (a Pod's ports cannot change)
agent_port() {
  [ -s "$STATE/agent.port" ] || free_port >"$STATE/agent.port"
  cat "$STATE/agent.port"
}

agent_pod() {
  local port
  port=$(agent_port)
  kubectl apply -n "$NS" -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $AGENT_POD
  labels: {app.kubernetes.io/name: outrider-agent, app.kubernetes.io/part-of: outrider-demo}
  annotations:
    outrider.dev/demo: "stands in for the outrider agent that e2e/demo.sh runs as a local process"
spec:
  nodeName: $AGENT_NODE
  containers: [{name: agent, image: "outrider:demo", ports: [{name: metrics, containerPort: $port}]}]
EOF
}

# The agent Pod's IP (kwok hands out loopback addresses in the test cluster): the agent serves
# /metrics there, where the controller reads which configuration it runs
agent_ip() {
  local i ip
  for i in $(seq 100); do
    ip=$(kubectl get pod "$AGENT_POD" -n "$NS" -o jsonpath='{.status.podIP}' 2>/dev/null)
    [ -n "$ip" ] && { echo "$ip"; return; }
    sleep 0.3
  done
  die "Pod $AGENT_POD got no IP from kwok"
}

# Writes the ConfigMap's agent.yaml to $STATE/agent/agent.yaml when it changed (byte for byte: the
# agent exports the sha256 of what it loaded, the controller compares it with what it rendered).
# Returns 1 while there is no ConfigMap yet.
sync_agent_config() {
  local out="$STATE/agent/agent.yaml"
  kubectl get configmap outrider-agent -n "$NS" -o json 2>/dev/null \
    | jq -j '.data["agent.yaml"] // empty' >"$out.tmp" 2>/dev/null || { rm -f "$out.tmp"; return 1; }
  [ -s "$out.tmp" ] || { rm -f "$out.tmp"; return 1; }
  if cmp -s "$out.tmp" "$out"; then rm -f "$out.tmp"; else mv "$out.tmp" "$out"; fi
}

start_agent() {
  stop_daemon agent-sync
  stop_daemon agent
  mkdir -p "$STATE/agent/state"
  local i
  if [ "$APPLY" = 1 ]; then
    for i in $(seq 100); do sync_agent_config && break; sleep 0.3; done
    [ -s "$STATE/agent/agent.yaml" ] || die "the controller rendered no ConfigMap outrider-agent in $NS (log $LOGS/controller.log)"
  else
    # no LogPipeline yet, so maybe no ConfigMap: the agent waits for its file, agent-sync writes it
    sync_agent_config || true
  fi
  start_daemon agent "RUST_LOG=${RUST_LOG:-info}" -- \
    "$BIN" agent --config "$STATE/agent/agent.yaml" --state-dir "$STATE/agent/state" \
    --node-name "$AGENT_NODE" --metrics-addr "$(agent_ip):$(agent_port)"
  # a kubelet keeps a mounted ConfigMap in sync; here this loop does, every 2 s
  start_daemon agent-sync -- bash "$repo/e2e/demo.sh" sync-loop
  log "agent for node $AGENT_NODE running (pid $(cat "$PIDS/agent.pid"), log $LOGS/agent.log; config $STATE/agent/agent.yaml)"
}

# ---------------------------------------------------------------- settling

# Every object of the demo: the namespace's, and the slot's ClusterLogPipelines
slot_objects() {
  jq -s '{items: (.[0].items + .[1].items)}' \
    <(kubectl get inventories,deploymentplans,healthchecks,securitypolicies,logpipelines -n "$NS" -o json) \
    <(kubectl get clusterlogpipelines -l "outrider.dev/demo-slot=$SLOT" -o json)
}

# One JSON object: each kind's state, from the API
snapshot() {
  slot_objects 2>/dev/null \
    | jq -c '
      def cond($t): ((.status.conditions // []) | map(select(.type == $t)) | .[0]) // {};
      def pick($k): [.items[] | select(.kind == $k)];
      {
        inventory: (pick("Inventory") | map(cond("Ready").status == "True" and (.status.reachable // -1) == .status.hosts) | all),
        plan: (pick("DeploymentPlan") | map(select((.metadata.labels // {})["outrider.dev/remediation-of"] == null))
               | map(.status.phase == "Succeeded") | all),
        health: (pick("HealthCheck") | map(cond("Ready").status == "True" and cond("Degraded").status == "False"
               and .status.summary != null and .status.summary.unhealthy == 0 and .status.summary.unknown == 0) | all),
        policy: (pick("SecurityPolicy") | map(cond("Ready").status == "True" and .status.hosts != null
               and .status.hosts.applied == .status.hosts.total and .status.hosts.total > 0) | all),
        pipeline: ((pick("LogPipeline") + pick("ClusterLogPipeline")) | map(cond("Ready").status == "True") | all)
      }'
}

shipped_lines() { # rows in the store from the demo's pipeline
  curl -fsS --max-time 2 "http://127.0.0.1:$PORT/internal/force_flush" >/dev/null 2>&1 || true
  curl -fsS --max-time 5 "http://127.0.0.1:$PORT/select/logsql/query" \
    --data-urlencode 'query=service:shop | stats count() as n' 2>/dev/null | jq -r '.n // "0"' 2>/dev/null || echo 0
}

wait_settled() {
  local deadline=$((SECONDS + TIMEOUT)) snap last="" lines=0 pending
  while :; do
    snap=$(snapshot || true)
    lines=$(shipped_lines)
    [ -n "$snap" ] || snap='{}'
    pending=$(jq -r --argjson lines "${lines:-0}" \
      '[to_entries[] | select(.value != true) | .key] + (if $lines > 0 then [] else ["shipped lines"] end) | join(", ")' <<<"$snap")
    if [ "$snap" != '{}' ] && [ -z "$pending" ]; then
      log "everything settled"
      return 0
    fi
    if [ "$pending" != "$last" ]; then log "waiting for: $pending"; last=$pending; fi
    if [ $SECONDS -ge $deadline ]; then
      echo
      kubectl get outrider -n "$NS" -o wide || true
      log "not settled after ${TIMEOUT}s: $pending"
      log "look at: kubectl describe ... -n $NS; $LOGS/controller.log; $LOGS/agent.log (everything is left running; e2e/demo.sh down stops it)"
      return 1
    fi
    sleep 2
  done
}

summary() {
  local json lines
  json=$(slot_objects)
  lines=$(shipped_lines)
  echo
  kubectl get outrider -n "$NS"
  echo
  echo "kubectl: export KUBECONFIG=$KC PATH=$repo/e2e/bin:\$PATH"
  jq -r --arg ns "$NS" --arg net "$NET" --arg prefix "$NETNS_PREFIX" --arg port "$PORT" --arg lines "$lines" \
    --arg fleetsh "$FLEETSH" '
    def cond($t): ((.status.conditions // []) | map(select(.type == $t)) | .[0]) // {};
    .items[] |
    if .kind == "Inventory" then
      "Inventory \(.metadata.name): \(.status.reachable)/\(.status.hosts) hosts answer over SSH as \(.spec.ssh.user), host keys checked against the Secret \(.spec.ssh.secretRef.name). Try: kubectl describe inv \(.metadata.name) -n \($ns)"
    elif .kind == "DeploymentPlan" and (.metadata.labels // {})["outrider.dev/remediation-of"] != null then
      "DeploymentPlan \(.metadata.name): a remediation run by HealthCheck \(.metadata.labels["outrider.dev/remediation-of"]): \(.status.phase // "Pending") on \(.status.hosts.total // 0) host(s)"
    elif .kind == "DeploymentPlan" then
      "DeploymentPlan \(.metadata.name): \(.status.phase): \(.status.hosts.succeeded)/\(.status.hosts.total) hosts in \(.status.batch.total) batches (the first one the canary), stages \([.spec.stages[].name] | join(" > ")). Try: curl http://\($net).11:8080/ ; \($fleetsh) exec web-1 ls -l /srv/shop"
    elif .kind == "HealthCheck" then
      "HealthCheck \(.metadata.name): \(.status.summary.healthy) targets healthy (\(.spec.checks | length) checks on each host, \(.spec.endpoints | length) endpoints) every \(.spec.interval). Try: \($fleetsh) exec web-2 sh -c '"'"'kill $(cat /srv/shop/run/http.pid)'"'"'; kubectl get hc,dp -n \($ns) -w  (Unhealthy after 3 failures, then a remediation plan restarts it)"
    elif .kind == "SecurityPolicy" then
      "SecurityPolicy \(.metadata.name): ruleset \(.status.rulesetHash[0:19])… applied on \(.status.hosts.applied)/\(.status.hosts.total) hosts (canary first, confirmed within \(.spec.apply.confirmTimeout)). Try: ip netns exec \($prefix)-db-1 timeout 2 bash -c \"</dev/tcp/\($net).11/22\" || echo dropped ; ip netns exec \($prefix)-web-1 nft list table inet outrider"
    elif .kind == "LogPipeline" or .kind == "ClusterLogPipeline" then
      "\(.kind) \(.metadata.name): \(cond("Ready").reason), \(.status.nodes.updated)/\(.status.nodes.desired) agents run config \(.status.configHash[0:19])…; \($lines) lines in VictoriaLogs so far. Try: curl -s http://127.0.0.1:\($port)/select/logsql/query --data-urlencode '"'"'query=service:shop | sort by (_time) desc | limit 5'"'"'"
    else empty end' <<<"$json"
  echo
  echo "Stop it all: make demo-down (or e2e/demo.sh down, which keeps the control plane)"
}

# ---------------------------------------------------------------- up / down

up() {
  [ "$(id -u)" = 0 ] || die "the demo needs root (its fleet is network namespaces with their own sshd): run it as root"
  [ -f "$KC" ] || die "no control plane at $CLUSTER: run e2e/cluster.sh up (make demo does)"
  [ -x "$BIN" ] || die "$BIN is missing: cargo build --locked (make demo does)"
  command -v jq >/dev/null || die "jq is missing: run e2e/deps.sh"
  kubectl get --raw /readyz >/dev/null 2>&1 || die "the control plane at $CLUSTER does not answer: run e2e/cluster.sh up"
  mkdir -p "$PIDS" "$LOGS" "$STATE/agent"
  chmod 0700 "$STATE"

  "$repo/e2e/fleet.sh" up
  kubectl apply --server-side --force-conflicts --field-manager=outrider-demo -f "$repo/crds/" >/dev/null
  "$repo/e2e/cluster.sh" wait-crds -f "$repo/crds/" || die "the CRDs were not Established"
  PORT=$(store_port)
  start_store
  kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl apply -n "$NS" -f "$FLEET/ssh-secret.yaml" >/dev/null
  agent_pod
  start_controller
  render_examples
  if [ "$APPLY" = 0 ]; then
    start_agent
    log "examples not applied (OUTRIDER_DEMO_APPLY=0): rendered for namespace $NS in $STATE/examples"
    echo "$STATE/examples"
    return 0
  fi
  kubectl apply -n "$NS" -f "$STATE/examples/"
  start_agent
  wait_settled || exit 1
  summary
}

down() {
  if [ -f "$KC" ] && kubectl get --raw /readyz >/dev/null 2>&1; then
    if kubectl get namespace "$NS" >/dev/null 2>&1; then
      log "deleting namespace $NS"
      kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
      kubectl delete clusterlogpipelines -l "outrider.dev/demo-slot=$SLOT" --wait=false >/dev/null 2>&1 || true
      local i
      for i in $(seq 60); do kubectl get namespace "$NS" >/dev/null 2>&1 || break; sleep 1; done
      if kubectl get namespace "$NS" >/dev/null 2>&1; then
        # no controller to run the plans' finalizer (it died?): let them go
        log "namespace $NS still terminating: removing the plans' finalizers"
        for dp in $(kubectl get deploymentplans -n "$NS" -o name 2>/dev/null); do
          kubectl patch -n "$NS" "$dp" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
        done
      fi
    fi
  fi
  stop_daemon agent-sync
  stop_daemon agent
  stop_daemon controller
  stop_daemon victoria-logs
  if [ "$(id -u)" = 0 ]; then "$repo/e2e/fleet.sh" down; else log "not root: the fleet is left up (e2e/fleet.sh down as root)"; fi
  if [ "${KEEP_STATE:-0}" != 1 ]; then rm -rf -- "$STATE"; fi
  log "down"
}

# sync-loop: what start_agent runs in the background
sync_loop() {
  while sleep 2; do sync_agent_config || true; done
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  sync-loop) sync_loop ;;
  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac
