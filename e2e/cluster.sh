#!/usr/bin/env bash
# A real Kubernetes control plane on loopback for the e2e tests, run as plain processes:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and kwok playing the
#   kubelet of two fake nodes (kwok-node-0, kwok-node-1), so Job and DaemonSet pods progress.
# Binaries come from e2e/bin/ (built and cached by e2e/tools.sh, called here if links are missing).
#
# usage: e2e/cluster.sh up|down|status|env|wait-crds TARGET...
#   up      start everything and wait until usable; a no-op if this state dir's cluster already runs;
#           a half-dead previous cluster is stopped, wiped and started fresh
#   down    stop exactly the processes `up` started (pid files; TERM, then KILL) and remove the
#           state dir (KEEP_STATE=1 keeps it, e.g. to read the logs)
#   status  which processes run and whether /readyz is ok; exit 0 only if the cluster is up
#   env     prints `export KUBECONFIG=...`:  eval "$(e2e/cluster.sh env)"
#
# environment:
#   OUTRIDER_CLUSTER_DIR  state dir (default: e2e/.cluster in the repo, git-ignored); point it
#                         elsewhere to run a second, independent cluster
#   KEEP_STATE=1          `down` keeps the state dir
#   CLUSTER_TIMEOUT       seconds to wait for each readiness step (default 120)
#
# State dir layout:
#   kubeconfig            admin kubeconfig (O=system:masters), certs embedded
#   ports.env             ETCD_PORT ETCD_PEER_PORT APISERVER_PORT KCM_PORT SCHEDULER_PORT KWOK_PORT
#   pki/                  CA, front-proxy CA, serving/client certs, service-account key pair (EC P-256)
#   nodes.yaml            the Node objects created for kwok
#   kubeconfigs/          per-component kubeconfigs (kcm, scheduler, kwok)
#   etcd/                 etcd data (--unsafe-no-fsync)
#   logs/<name>.log       one per process: etcd kube-apiserver kube-controller-manager kube-scheduler kwok
#   logs/audit.log        kube-apiserver audit log (JSON lines, level Metadata, see audit-policy.yaml);
#                         rotated at 50 MB into audit-<time>.log, at most 4 kept.
#                         Summarize it with e2e/bench/api-requests.sh
#   audit-policy.yaml     what is audited: every request except system components' (kcm and its
#                         controllers' kube-system ServiceAccounts, scheduler, kwok, the apiserver
#                         itself), node/lease heartbeats and health probes
#   pids/<name>.pid
#   kcm/ scheduler/       self-signed serving certs of their secure ports
#
# Scheduling on the kwok nodes: the nodes carry NO taint, so any pod schedules there without a
# toleration or nodeSelector (they are the only nodes). They are labelled kubernetes.io/os=linux,
# kubernetes.io/arch=amd64, type=kwok and annotated kwok.x-k8s.io/node=fake (which is what kwok
# manages). Use `nodeSelector: {type: kwok}` to be explicit. kwok marks pods Running+Ready at once,
# and pods owned by a Job Succeeded; nothing is ever executed, images are never pulled.
# Pod IPs are fake (10.244.0.0/16): nothing listens there, don't connect to them; likewise don't
# point webhooks/APIServices at in-cluster Services (the apiserver would try to reach them).
# The `kubernetes` Service in `default` has no endpoints (1.37 refuses a loopback advertise
# address there): in-cluster clients can't exist anyway, real clients use the kubeconfig.
#
# Everything listens on 127.0.0.1 only, on free ports chosen at `up` and recorded in ports.env.
# `up`/`down` on the same state dir are serialized with flock on /tmp/outrider-cluster-<hash>.lock.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN="$here/bin"
STATE=${OUTRIDER_CLUSTER_DIR:-$here/.cluster}
case $STATE in /*) ;; *) STATE="$PWD/$STATE" ;; esac
STATE=${STATE%/}
PKI="$STATE/pki"
KCFG="$STATE/kubeconfigs"
LOGS="$STATE/logs"
PIDS="$STATE/pids"
KUBECONFIG_ADMIN="$STATE/kubeconfig"
TIMEOUT=${CLUSTER_TIMEOUT:-120}

# start order; `down` goes in reverse
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
NODES=(kwok-node-0 kwok-node-1)
SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1   # first IP of SERVICE_CIDR: the `kubernetes` Service
POD_CIDR=127.244.0.0/16 # fake pod IPs handed out by kwok: on loopback, so the controller may scrape agents that tests run on them

log() { printf '[cluster %3ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- prerequisites

need_cmds() {
  local missing=()
  for c in openssl curl base64 setsid nohup; do command -v "$c" >/dev/null || missing+=("$c"); done
  command -v python3 >/dev/null || command -v ss >/dev/null || missing+=("python3-or-ss(iproute2)")
  [ ${#missing[@]} -eq 0 ] || die "missing commands: ${missing[*]} (Debian: apt-get install openssl curl coreutils util-linux python3 iproute2)"
}

need_bins() {
  local tools=() b
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
    if [ ! -x "$BIN/$b" ]; then
      case $b in
        etcd) tools+=(etcd) ;;
        kwok) tools+=(kwok) ;;
        *) tools+=(kubernetes) ;;
      esac
    fi
  done
  [ ${#tools[@]} -eq 0 ] && return 0
  mapfile -t tools < <(printf '%s\n' "${tools[@]}" | sort -u)
  log "missing in $BIN: building ${tools[*]} with e2e/tools.sh (cached; a cold kubernetes build takes 15-25 min)"
  if [ ! -x "$here/tools.sh" ] || ! "$here/tools.sh" "${tools[@]}" >&2; then
    die "e2e/tools.sh ${tools[*]} failed; fix it and run e2e/tools.sh"
  fi
  for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is still missing: run e2e/tools.sh"
  done
}

# ---------------------------------------------------------------- processes

# A component's pid file is written right after the fork, by start_proc, which then waits until
# the recorded pid has exec'd the component's binary (see start_proc). A pid counts as the
# component only if it is alive (not a zombie), its argv[0] is that binary (e2e/bin/NAME) and its
# command line names our state dir: this guards against a recycled pid, and against taking
# anything else for the component.

# proc_state PID: prints "STATE PPID" from /proc/PID/stat (comm may hold spaces: cut at the last ')')
proc_state() {
  local stat state ppid
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  read -r state ppid _ <<<"${stat##*) }"
  echo "$state $ppid"
}

# is_component NAME PID: PID is a live process running NAME's binary for this state dir
is_component() {
  local name=$1 pid=$2 st argv=()
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  mapfile -d '' -t argv 2>/dev/null < "/proc/$pid/cmdline" || return 1
  [ ${#argv[@]} -gt 0 ] && [ "${argv[0]##*/}" = "$name" ] || return 1
  [[ "${argv[*]}" == *"$STATE/"* ]] || return 1
  st=$(proc_state "$pid") || return 1
  [ "${st%% *}" != Z ]   # a zombie is not running
}

# pid of a component if it is alive AND is the process we started, else nothing (status 1)
pid_of() {
  local f="$PIDS/$1.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  is_component "$1" "$pid" || return 1
  echo "$pid"
}

start_proc() { # start_proc NAME BINARY ARGS...: returns once the component runs (exec'd), else fail_proc
  local name=$1; shift
  local pid st deadline
  # setsid: own session, so the process outlives this script and the caller's terminal/job.
  # This script runs without job control, so the `&` subshell stays in our process group and is
  # never a group leader: setsid then calls setsid(2) and execs in place, nohup execs in place,
  # and $! ends up being the component's own pid.
  # Inherited descriptors above 2 (our lock, a caller's pipes) are closed so the daemon holds
  # neither the lock nor a pipe someone is reading to EOF.
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [[ $fd =~ ^[0-9]+$ ]] && [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid nohup "$@" </dev/null >"$LOGS/$name.log" 2>&1
  ) &
  pid=$!
  # Recorded at once, so a `down` (even after this script is killed right here) finds the process.
  echo "$pid" > "$PIDS/$name.pid"
  # Startup race: until the forked subshell has gone through setsid, nohup and exec'd the
  # component, /proc/$pid shows our own bash (or setsid/nohup), and pid_of would call a healthy
  # start "exited". On a saturated machine that window lasts long enough for the first health
  # check to land in it. So wait here until the exec has happened, telling "not exec'd yet"
  # (the pid is still our live child) from "gone" (it exited, or exec failed: see its log).
  deadline=$((SECONDS + TIMEOUT))
  until is_component "$name" "$pid"; do
    st=$(proc_state "$pid") || st=
    if [ -z "$st" ] || [ "${st%% *}" = Z ] || [ "${st#* }" != "$BASHPID" ]; then
      fail_proc "$name" "$name (pid $pid) exited before or while starting $1"
    fi
    if [ $SECONDS -ge $deadline ]; then
      kill -KILL "$pid" 2>/dev/null || true # still our own child (ppid checked just above)
      fail_proc "$name" "$name (pid $pid) did not exec $1 within ${TIMEOUT}s"
    fi
    sleep 0.05
  done
}

stop_all() { # TERM everything we started (reverse order), KILL what is left after a grace period
  local i name pid pids=() deadline
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
    rm -f "$PIDS/$name.pid"
  done
}

fail_proc() { # fail_proc NAME MESSAGE: show its log tail, stop what we started, exit non-zero
  local name=$1 msg=$2
  {
    printf '[cluster] ERROR: %s\n' "$msg"
    printf '[cluster] ---- last 40 lines of %s ----\n' "$LOGS/$name.log"
    tail -n 40 "$LOGS/$name.log" 2>/dev/null || true
    printf '[cluster] ----\n'
  } >&2
  stop_all
  log "stopped the processes; state (logs) kept in $STATE, next 'up' starts fresh"
  exit 1
}

# wait_for NAME DESCRIPTION COMMAND...: poll COMMAND until it succeeds; fail if NAME dies or on timeout
wait_for() {
  local name=$1 what=$2; shift 2
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    pid_of "$name" >/dev/null || fail_proc "$name" "$name exited while waiting for: $what"
    [ $SECONDS -lt $deadline ] || fail_proc "$name" "timed out after ${TIMEOUT}s waiting for: $what"
    sleep 0.25
  done
}

# ---------------------------------------------------------------- ports

free_ports() { # free_ports N: N distinct free TCP ports on 127.0.0.1
  local n=$1
  if command -v python3 >/dev/null; then
    python3 - "$n" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
  else
    local used out=() p
    used=$(ss -Htan | awk '{print $4}' | sed 's/.*://' | sort -u)
    while [ ${#out[@]} -lt "$n" ]; do
      p=$((20000 + RANDOM % 30000))
      grep -qx "$p" <<<"$used" && continue
      [[ " ${out[*]} " == *" $p "* ]] && continue
      out+=("$p")
    done
    echo "${out[*]}"
  fi
}

load_ports() { [ -f "$STATE/ports.env" ] && . "$STATE/ports.env"; }

# ---------------------------------------------------------------- certs and kubeconfigs

# EC P-256 keys: instant to generate; Kubernetes accepts them everywhere (ES256 for SA tokens).
gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

gen_ca() { # gen_ca NAME CN
  gen_key "$PKI/$1.key"
  openssl req -x509 -new -key "$PKI/$1.key" -subj "/CN=$2" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
    -out "$PKI/$1.crt" 2>/dev/null
}

gen_cert() { # gen_cert NAME SUBJECT EXT_USAGE [SAN [CA]]: $PKI/NAME.{key,crt} signed by CA (default: ca)
  local name=$1 subj=$2 usage=$3 san=${4:-} ca=${5:-ca}
  gen_key "$PKI/$name.key"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } > "$PKI/$name.ext"
  openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
  rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

gen_pki() {
  mkdir -p "$PKI"
  gen_ca ca outrider-e2e-ca
  # front-proxy (requestheader) CA, as kubeadm does: without it kcm/scheduler log errors forever,
  # and aggregated API servers could not authenticate the apiserver
  gen_ca front-proxy-ca outrider-e2e-front-proxy-ca
  gen_cert front-proxy-client "/CN=front-proxy-client" clientAuth "" front-proxy-ca
  gen_cert apiserver "/CN=kube-apiserver" serverAuth \
    "IP:127.0.0.1,IP:$SERVICE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  gen_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  gen_cert admin "/O=system:masters/CN=outrider-admin" clientAuth
  gen_cert kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
  gen_cert kube-scheduler "/CN=system:kube-scheduler" clientAuth
  # kwok updates node/pod status, leases, events: simplest is admin rights
  gen_cert kwok "/O=system:masters/CN=kwok" clientAuth
  gen_cert kwok-serving "/CN=kwok" serverAuth "IP:127.0.0.1,DNS:localhost"
  gen_key "$PKI/sa.key"
  openssl pkey -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 600 "$PKI"/*.key
}

write_kubeconfig() { # write_kubeconfig FILE CERTNAME USER
  local file=$1 cert=$2 user=$3
  cat > "$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: outrider-e2e
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 < "$PKI/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 < "$PKI/$cert.crt")
    client-key-data: $(base64 -w0 < "$PKI/$cert.key")
contexts:
- name: outrider-e2e
  context:
    cluster: outrider-e2e
    user: $user
current-context: outrider-e2e
EOF
  chmod 600 "$file"
}

# ---------------------------------------------------------------- health checks

readyz() { # the apiserver's /readyz, with the admin cert; never through a proxy
  load_ports || return 1
  [ -n "${APISERVER_PORT:-}" ] || return 1
  [ "$(curl -sS --noproxy '*' --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
        "https://127.0.0.1:$APISERVER_PORT/readyz" 2>/dev/null)" = ok ]
}

etcd_healthy() {
  curl -sS --noproxy '*' --max-time 3 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | grep -q '"health":"true"'
}

component_healthy() { # component_healthy PORT: /healthz of kcm or scheduler (self-signed, always-allowed path)
  [ "$(curl -sSk --noproxy '*' --max-time 3 "https://127.0.0.1:$1/healthz" 2>/dev/null)" = ok ]
}

kwok_healthy() {
  [ "$(curl -sSk --noproxy '*' --max-time 3 "https://127.0.0.1:$KWOK_PORT/healthz" 2>/dev/null)" = ok ]
}

kc() { "$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" --request-timeout=5s "$@"; }

default_sa_exists() { kc -n default get serviceaccount default; }

nodes_ready() { # every node Ready and free of the not-ready/unreachable taints the node-lifecycle controller sets
  local n out
  for n in "${NODES[@]}"; do
    out=$(kc get node "$n" -o jsonpath='{range .status.conditions[?(@.type=="Ready")]}{.status}{end} {.spec.taints[*].key}') || return 1
    [[ $out == True* ]] || return 1
    [[ $out == *node.kubernetes.io/* ]] && return 1
  done
  return 0
}

all_running() {
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || return 1; done
}

# ---------------------------------------------------------------- commands

# Audit policy (audit.k8s.io/v1): rules are matched in order, the first match decides the level.
# Metadata = who, what (verb, resource, namespace, name), when, response code; no bodies.
# RequestReceived is omitted (every request would be logged twice for nothing); long-running
# requests (watch) log ResponseStarted when they start and ResponseComplete when they end.
audit_policy() {
  cat <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
# system components: kube-controller-manager (its controllers run as kube-system ServiceAccounts,
# --use-service-account-credentials), kube-scheduler, kwok (the fake kubelets), the apiserver's
# own loopback client
- level: None
  users: [system:kube-controller-manager, system:kube-scheduler, kwok, system:apiserver]
- level: None
  userGroups: [system:serviceaccounts:kube-system]
# node and lease heartbeats, whoever sends them
- level: None
  resources: [{group: coordination.k8s.io, resources: [leases]}]
  namespaces: [kube-node-lease]
- level: None
  verbs: [update, patch]
  resources: [{group: "", resources: [nodes/status]}]
# health probes (e2e/cluster.sh polls /readyz)
- level: None
  nonResourceURLs: [/healthz*, /readyz*, /livez*]
- level: Metadata
EOF
}

node_manifest() {
  local n
  for n in "${NODES[@]}"; do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $n
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/arch: amd64
    kubernetes.io/hostname: $n
    kubernetes.io/os: linux
    kubernetes.io/role: agent
    node-role.kubernetes.io/agent: ""
    type: kwok
status:
  allocatable:
    cpu: "32"
    memory: 256Gi
    pods: "110"
  capacity:
    cpu: "32"
    memory: 256Gi
    pods: "110"
EOF
  done
}

cmd_up() {
  need_cmds
  local t0=$SECONDS
  if [ -d "$STATE" ]; then
    if all_running && readyz; then
      log "already up ($STATE, apiserver https://127.0.0.1:$APISERVER_PORT); nothing to do"
      return 0
    fi
    log "found a stopped or half-dead cluster in $STATE: stopping what is left and starting fresh"
    stop_dependents
    stop_all
    rm -rf "$STATE"
  fi
  need_bins

  mkdir -p "$STATE" "$LOGS" "$PIDS" "$KCFG" "$STATE/etcd" "$STATE/kcm" "$STATE/scheduler"
  chmod 700 "$STATE"
  local ports
  read -r -a ports <<<"$(free_ports 6)"
  [ ${#ports[@]} -eq 6 ] || die "could not pick free ports"
  cat > "$STATE/ports.env" <<EOF
ETCD_PORT=${ports[0]}
ETCD_PEER_PORT=${ports[1]}
APISERVER_PORT=${ports[2]}
KCM_PORT=${ports[3]}
SCHEDULER_PORT=${ports[4]}
KWOK_PORT=${ports[5]}
EOF
  load_ports
  gen_pki
  write_kubeconfig "$KUBECONFIG_ADMIN" admin outrider-admin
  write_kubeconfig "$KCFG/kube-controller-manager.kubeconfig" kube-controller-manager system:kube-controller-manager
  write_kubeconfig "$KCFG/kube-scheduler.kubeconfig" kube-scheduler system:kube-scheduler
  write_kubeconfig "$KCFG/kwok.kubeconfig" kwok kwok
  audit_policy > "$STATE/audit-policy.yaml"

  log "etcd on 127.0.0.1:$ETCD_PORT"
  start_proc etcd "$BIN/etcd" \
    --name=outrider-e2e \
    --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="outrider-e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster-state=new \
    --unsafe-no-fsync
  wait_for etcd "etcd /health" etcd_healthy

  log "kube-apiserver on https://127.0.0.1:$APISERVER_PORT"
  # --endpoint-reconciler-type=none: 1.37 refuses to publish a loopback --advertise-address as the
  # `kubernetes` Service's endpoints ("may not be in the loopback range"), so that Service has none;
  # nothing in this cluster runs for real, so nothing in-cluster could use it anyway.
  # Audit: --audit-log-mode=batch puts events on a queue that one goroutine writes to the file, so
  # a request never waits for the write (blocking mode writes on the request's goroutine). The
  # log backend writes events one by one anyway (batch max size stays 1: batching buys nothing
  # there, upstream's own default). A full queue drops events and kube-apiserver.log says "Error
  # in audit plugin 'buffered'"; e2e/bench/api-requests.sh warns when it sees that line.
  start_proc kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --endpoint-reconciler-type=none \
    --secure-port="$APISERVER_PORT" \
    --cert-dir="$PKI" \
    --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --authorization-mode=Node,RBAC \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --allow-privileged=true \
    --audit-policy-file="$STATE/audit-policy.yaml" \
    --audit-log-path="$LOGS/audit.log" \
    --audit-log-format=json \
    --audit-log-maxsize=50 \
    --audit-log-maxbackup=4 \
    --audit-log-mode=batch \
    --audit-log-batch-buffer-size=20000
  wait_for kube-apiserver "kube-apiserver /readyz" readyz

  log "kube-controller-manager (healthz 127.0.0.1:$KCM_PORT), kube-scheduler (127.0.0.1:$SCHEDULER_PORT), kwok (127.0.0.1:$KWOK_PORT)"
  local kcm="$KCFG/kube-controller-manager.kubeconfig"
  # --controllers=*: kube-controller-manager 1.37 has no cloud controllers left (they live in
  # cloud-controller-manager); node-ipam does nothing without --allocate-node-cidrs.
  start_proc kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$kcm" \
    --authentication-kubeconfig="$kcm" \
    --authorization-kubeconfig="$kcm" \
    --bind-address=127.0.0.1 \
    --secure-port="$KCM_PORT" \
    --cert-dir="$STATE/kcm" \
    --leader-elect=false \
    --controllers='*' \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" \
    --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" \
    --cluster-signing-key-file="$PKI/ca.key" \
    --service-cluster-ip-range="$SERVICE_CIDR"
  local sched="$KCFG/kube-scheduler.kubeconfig"
  start_proc kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$sched" \
    --authentication-kubeconfig="$sched" \
    --authorization-kubeconfig="$sched" \
    --bind-address=127.0.0.1 \
    --secure-port="$SCHEDULER_PORT" \
    --cert-dir="$STATE/scheduler" \
    --leader-elect=false
  # kwok's only listener is --server-address (healthz, and the kubelet API the apiserver uses for
  # logs/exec: nodes advertise 127.0.0.1:$KWOK_PORT via --node-ip/--node-port). Node leases: 40s.
  start_proc kwok "$BIN/kwok" \
    --kubeconfig="$KCFG/kwok.kubeconfig" \
    --config="$here/cluster/kwok.yaml" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --manage-nodes-with-label-selector= \
    --node-ip=127.0.0.1 \
    --node-port="$KWOK_PORT" \
    --server-address="127.0.0.1:$KWOK_PORT" \
    --tls-cert-file="$PKI/kwok-serving.crt" \
    --tls-private-key-file="$PKI/kwok-serving.key" \
    --cidr="$POD_CIDR" \
    --node-lease-duration-seconds=40

  node_manifest > "$STATE/nodes.yaml"
  kc apply -f "$STATE/nodes.yaml" >/dev/null 2>"$LOGS/kubectl-nodes.log" \
    || { cat "$LOGS/kubectl-nodes.log" >&2; fail_proc kube-apiserver "creating the kwok nodes failed"; }

  log "nodes created; waiting for kcm, scheduler, kwok, ServiceAccount default/default, Ready nodes"
  wait_for kube-controller-manager "kube-controller-manager /healthz" component_healthy "$KCM_PORT"
  wait_for kube-scheduler "kube-scheduler /healthz" component_healthy "$SCHEDULER_PORT"
  wait_for kwok "kwok /healthz" kwok_healthy
  wait_for kube-controller-manager "ServiceAccount default/default (kube-controller-manager)" default_sa_exists
  wait_for kwok "nodes ${NODES[*]} Ready and untainted (kwok + node-lifecycle controller)" nodes_ready

  # a process that died after its check passed (e.g. a port race) is a failure too
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || fail_proc "$c" "$c exited during startup"; done
  log "up in $((SECONDS - t0))s: export KUBECONFIG=$KUBECONFIG_ADMIN   (state: $STATE)"
}

# What runs on top of the cluster and keeps its state under $STATE: stopped before the state
# directory goes, or its processes would outlive the files that find them.
stop_dependents() {
  [ -x "$here/argocd.sh" ] && "$here/argocd.sh" down >/dev/null 2>&1 || true
  # a running `make demo` (its controller, agent, VictoriaLogs and fleet)
  if [ -d "$STATE/demo" ] || [ -d "$STATE/fleet" ]; then
    OUTRIDER_DEMO_DIR=$STATE "$here/demo.sh" down >/dev/null 2>&1 || true
  fi
}

cmd_down() {
  if [ ! -d "$STATE" ]; then
    log "nothing to stop ($STATE does not exist)"
    return 0
  fi
  stop_dependents
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
  load_ports || true
  for c in "${COMPONENTS[@]}"; do
    if pid=$(pid_of "$c"); then
      printf '%-24s running (pid %s)\n' "$c" "$pid"
    else
      printf '%-24s NOT running\n' "$c"
      up=1
    fi
  done
  if readyz; then
    echo "/readyz                  ok (https://127.0.0.1:$APISERVER_PORT)"
  else
    echo "/readyz                  NOT ok"
    up=1
  fi
  [ -f "$STATE/ports.env" ] && sed 's/^/  /' "$STATE/ports.env"
  echo "kubeconfig: $KUBECONFIG_ADMIN"
  return $up
}

# `wait-crds TARGET...`: waits until the CRDs (`crd/<name>` or `-f FILE|DIR`, as for
# `kubectl wait`) are Established. Retried: right after creation .status.conditions is null
# and `kubectl wait` fails at once instead of waiting.
cmd_wait_crds() {
  [ $# -gt 0 ] || { echo "usage: $0 wait-crds crd/NAME...|-f FILE" >&2; return 2; }
  local try out
  for try in $(seq 30); do
    out=$("$BIN/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" wait --for=condition=Established --timeout=10s "$@" 2>&1) && return 0
    sleep 1
  done
  echo "the CRDs were not Established within 30 tries ($*): $out" >&2
  return 1
}

cmd_env() {
  [ -f "$KUBECONFIG_ADMIN" ] || log "warning: $KUBECONFIG_ADMIN does not exist yet (run e2e/cluster.sh up)"
  printf 'export KUBECONFIG=%q\n' "$KUBECONFIG_ADMIN"
}

# one `up`/`down` at a time per state dir (the lock lives outside the dir, which `down` removes)
with_lock() {
  local lock="${TMPDIR:-/tmp}/outrider-cluster-$(printf '%s' "$STATE" | md5sum | cut -c1-12).lock"
  exec 9>"$lock"
  if command -v flock >/dev/null; then
    flock -w 600 9 || die "another e2e/cluster.sh holds $lock"
  fi
  "$@"
}

case ${1:-} in
  up) with_lock cmd_up ;;
  down) with_lock cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  wait-crds) shift; cmd_wait_crds "$@" ;;
  *) echo "usage: $0 up|down|status|env|wait-crds" >&2; exit 2 ;;
esac
