#!/usr/bin/env bash
# How many Kubernetes API requests the controller makes during a LogPipeline rollout, counted
# from the kube-apiserver audit log of the test cluster (e2e/cluster.sh; see
# e2e/bench/README-api-load.md for results and how they were taken).
#
# usage: e2e/bench/api-load.sh BINARY [LABEL]
#   BINARY  an `outrider` binary (any version with `controller --leader-elect --lease-namespace
#           --metrics-addr` and `crd`)
#   LABEL   names the run's namespaces and output dir (default: run)
#
# The scenario, in fresh namespaces apiload-op-<id> (the operator's) and apiload-tn-<id> (a tenant):
#   1. BINARY's own CRDs are applied (`BINARY crd | kubectl apply --server-side`).
#   2. $PODS Pods labelled app.kubernetes.io/name=outrider-agent (nodeSelector type=kwok: kwok
#      makes them Running/Ready) are created in the operator namespace; the run waits until Ready.
#   3. `BINARY controller --leader-elect=false --lease-namespace <op ns> --metrics-addr 127.0.0.1:<free>`
#      starts, authenticated as its own ServiceAccount (system:serviceaccount:<op ns>:outrider, bound
#      to cluster-admin), so its requests are told from kubectl's (the admin user) by user name.
#   4. $PIPELINES LogPipelines (an `http` output, no secretRef) are applied in the tenant namespace
#      (one `kubectl apply` of a List).
#   5. Once the ConfigMap outrider-agent (operator namespace) renders all of them, the run plays the
#      agents: one python3 process serves /metrics on every Pod's IP (the test cluster's pod CIDR
#      is on loopback) and port, and the run switches each to outrider_agent_config_info{hash=
#      <the ConfigMap's hash>} one by one, like a DaemonSet rollout; the controller scrapes them.
#   6. It waits until every LogPipeline has Ready=True reason AllNodesShipping, waits $SETTLE s more,
#      scrapes the controller's /metrics, stops it (TERM) and counts the ServiceAccount's requests
#      in the audit log (total and by verb+resource) with e2e/bench/api-requests.sh.
#   7. The namespaces and the ClusterRoleBinding are deleted (KEEP=1 keeps them).
#
# environment:
#   OUTRIDER_CLUSTER_DIR  the cluster's state dir (default e2e/.cluster); its kube-apiserver must
#                         write logs/audit.log (e2e/cluster.sh does). Run this on a cluster where no
#                         other outrider controller watches LogPipelines in all namespaces, and where no
#                         other run of this script is going on (the controller watches every namespace)
#   PODS (50)  PIPELINES (20)  SETTLE (5)  TIMEOUT (300, seconds for each wait)
#   PACE (0)   seconds to sleep after each agent's switch to the new hash (0: at once). The
#              request count of a controller that coalesces reconciles depends on the pace: with
#              PACE=1 every Pod change is seen on its own
#   OUT        output dir (default target/bench/api-load/<label>-<id>): controller.log,
#              controller-metrics.txt, requests.txt, timings.txt
#   KEEP=1     leave the namespaces, ServiceAccount and ClusterRoleBinding in place
#
# Output (stdout): the run's timings, then the request table of e2e/bench/api-requests.sh:
#     COUNT  VERB              RESOURCE
#      1064  patch             logpipelines/status.outrider.dev
#        20  create            events.events.k8s.io
#       ...
#      1104  total             requests, of which watches: 7 (still open: 0)
# Needs: curl, jq, python3 (a free port), the cluster's kubectl (e2e/bin/kubectl).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
die() { printf 'api-load: %s\n' "$*" >&2; exit 1; }
log() { printf '[api-load %4ss] %s\n' "$SECONDS" "$*" >&2; }

[ $# -ge 1 ] && [ $# -le 2 ] || { sed -n '5,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
binary=$(readlink -f "$1")
label=${2:-run}
[ -x "$binary" ] || die "not an executable: $1"
[[ $label =~ ^[a-z0-9-]{1,20}$ ]] || die "LABEL must be 1-20 of [a-z0-9-]"

PODS=${PODS:-50}
PIPELINES=${PIPELINES:-20}
SETTLE=${SETTLE:-5}
PACE=${PACE:-0}
AGENT_PORT=${AGENT_PORT:-9464} # the agents' metrics port on their (loopback) Pod IPs
TIMEOUT=${TIMEOUT:-300}
state=${OUTRIDER_CLUSTER_DIR:-$repo/e2e/.cluster}
state=${state%/}
admin=$state/kubeconfig
kubectl_bin=${KUBECTL:-$repo/e2e/bin/kubectl}
[ -f "$admin" ] || die "no kubeconfig at $admin (e2e/cluster.sh up)"
[ -f "$state/logs/audit.log" ] || die "no audit log at $state/logs/audit.log: this cluster was started without one"
for c in curl jq python3; do command -v "$c" >/dev/null || die "needs $c"; done
k() { "$kubectl_bin" --kubeconfig "$admin" "$@"; }
k get --raw /readyz >/dev/null || die "the cluster at $admin is not ready"

id=$label-$(date +%H%M%S)-$$
id=${id:0:40}
opns=apiload-op-$id
tns=apiload-tn-$id
sa=outrider
user=system:serviceaccount:$opns:$sa
crb=apiload-$id
out=${OUT:-$repo/target/bench/api-load/$id}
mkdir -p "$out"
ctl_pid=
agents_pid=
cleanup() {
  [ -z "$agents_pid" ] || kill "$agents_pid" 2>/dev/null || true
  if [ -n "$ctl_pid" ] && kill -0 "$ctl_pid" 2>/dev/null; then
    kill -TERM "$ctl_pid" 2>/dev/null || true
    sleep 2
    kill -KILL "$ctl_pid" 2>/dev/null || true
  fi
  if [ "${KEEP:-}" != 1 ]; then
    k delete namespace "$tns" "$opns" --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1 || true
    k delete clusterrolebinding "$crb" --ignore-not-found >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# wait_for DESCRIPTION COMMAND...: until COMMAND succeeds, at most $TIMEOUT s
wait_for() {
  local what=$1 deadline=$((SECONDS + TIMEOUT)); shift
  until "$@"; do
    [ $SECONDS -lt $deadline ] || die "timed out after ${TIMEOUT}s waiting for: $what"
    if [ -n "$ctl_pid" ] && ! kill -0 "$ctl_pid" 2>/dev/null; then
      die "the controller exited; see $out/controller.log"
    fi
    sleep 0.5
  done
}

now_ms() { date +%s%3N; }
secs_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

log "binary: $binary ($("$binary" --version 2>/dev/null || echo '?'))"
log "namespaces $opns (operator) and $tns (tenant); controller user $user; output $out"

# 1. the binary's CRDs
"$binary" crd > "$out/crds.yaml"
k apply --server-side --force-conflicts -f "$out/crds.yaml" >/dev/null
k wait --for=condition=Established crd/logpipelines.outrider.dev --timeout=60s >/dev/null

# 2. namespaces, the controller's identity, the agent Pods
k create namespace "$opns" >/dev/null
k create namespace "$tns" >/dev/null
k create serviceaccount "$sa" -n "$opns" >/dev/null
k create clusterrolebinding "$crb" --clusterrole=cluster-admin --serviceaccount="$opns:$sa" >/dev/null
token=$(k create token "$sa" -n "$opns" --duration=1h)
server=$(k config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(k config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
sa_kc=$out/controller.kubeconfig
umask 077
cat > "$sa_kc" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: apiload
  cluster: {server: "$server", certificate-authority-data: "$ca"}
users:
- name: $sa
  user: {token: "$token"}
contexts:
- name: apiload
  context: {cluster: apiload, user: $sa}
current-context: apiload
EOF
umask 022

{
  echo "apiVersion: v1"
  echo "kind: List"
  echo "items:"
  for i in $(seq 0 $((PODS - 1))); do
    cat <<EOF
- apiVersion: v1
  kind: Pod
  metadata: {name: agent-$i, namespace: $opns, labels: {app.kubernetes.io/name: outrider-agent}}
  spec:
    nodeSelector: {type: kwok}
    containers: [{name: agent, image: example.com/outrider-agent:bench, ports: [{name: metrics, containerPort: $AGENT_PORT}]}]
EOF
  done
} > "$out/pods.yaml"
k apply -f "$out/pods.yaml" >/dev/null
pods_ready() {
  local n
  n=$(k get pods -n "$opns" -l app.kubernetes.io/name=outrider-agent -o json \
    | jq '[.items[] | select(.spec.nodeName != null) | select(any(.status.conditions[]?; .type == "Ready" and .status == "True"))] | length')
  [ "$n" = "$PODS" ]
}
wait_for "$PODS agent Pods Ready" pods_ready
log "$PODS agent Pods Ready"
# the agents' /metrics: <ip>:$AGENT_PORT answers with the hash in $out/agents/<ip> (none yet)
mkdir -p "$out/agents"
k get pods -n "$opns" -l app.kubernetes.io/name=outrider-agent -o json \
  | jq -r '.items[] | "\(.metadata.name) \(.status.podIP)"' >"$out/agent-ips.txt"
python3 - "$out/agents" "$AGENT_PORT" $(awk '{print $2}' "$out/agent-ips.txt") <<'PY' &
import http.server, os, socketserver, sys, threading
folder, port, ips = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
class Agent(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = os.path.join(folder, self.server.server_address[0])
        body = b""
        if os.path.exists(path):
            body = ('outrider_agent_config_info{hash="%s"} 1\n' % open(path).read().strip()).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer): daemon_threads = True
for ip in ips:
    threading.Thread(target=Server((ip, port), Agent).serve_forever, daemon=True).start()
threading.Event().wait()
PY
agents_pid=$!

# 3. the controller
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
KUBECONFIG=$sa_kc RUST_LOG=${RUST_LOG:-info} \
  "$binary" controller --leader-elect=false --lease-namespace "$opns" \
  --metrics-addr "127.0.0.1:$port" </dev/null >"$out/controller.log" 2>&1 &
ctl_pid=$!
t_start=$(now_ms)
started_at=$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)
controller_ready() { curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; }
wait_for "the controller's /readyz" controller_ready
t_ready=$(secs_since "$t_start")
log "controller pid $ctl_pid ready after ${t_ready}s (metrics 127.0.0.1:$port)"

# 4. the LogPipelines
{
  echo "apiVersion: v1"
  echo "kind: List"
  echo "items:"
  for i in $(seq 0 $((PIPELINES - 1))); do
    cat <<EOF
- apiVersion: outrider.dev/v1alpha1
  kind: LogPipeline
  metadata: {name: lp-$i, namespace: $tns}
  spec:
    pods: {selector: {matchLabels: {app: svc-$i}}}
    parser: json
    fields: {service: svc-$i}
    outputs:
      - {name: out, http: {url: "http://127.0.0.1:9/ingest/$i"}}
EOF
  done
} > "$out/pipelines.yaml"
t_apply=$(now_ms)
k apply -f "$out/pipelines.yaml" >/dev/null
log "applied $PIPELINES LogPipelines in $tns"

# 5. the agents: once the ConfigMap holds every pipeline, report its hash, Pod by Pod
hash=
config_complete() {
  local cm n
  cm=$(k get configmap outrider-agent -n "$opns" -o json 2>/dev/null) || return 1
  n=$(jq -r '.data["agent.yaml"] // ""' <<<"$cm" | grep -c "namespace: $tns\$" || true)
  [ "$n" = "$PIPELINES" ] || return 1
  hash=$(jq -r '.metadata.annotations["outrider.dev/config-hash"] // ""' <<<"$cm")
  [ -n "$hash" ]
}
wait_for "ConfigMap outrider-agent rendering all $PIPELINES pipelines" config_complete
t_rendered=$(secs_since "$t_apply")
log "ConfigMap rendered all pipelines ${t_rendered}s after the apply: hash $hash"
t_roll=$(now_ms)
while read -r _ ip; do
  echo "$hash" >"$out/agents/$ip"
  [ "$PACE" = 0 ] || sleep "$PACE"
done <"$out/agent-ips.txt"
t_annotated=$(secs_since "$t_roll")
log "switched $PODS agents to the new hash in ${t_annotated}s"

# 6. every pipeline Ready=True AllNodesShipping, then $SETTLE s, then stop and count
all_shipping() {
  local n
  n=$(k get logpipelines -n "$tns" -o json \
    | jq '[.items[] | select(any(.status.conditions[]?; .type == "Ready" and .status == "True" and .reason == "AllNodesShipping"))] | length')
  [ "$n" = "$PIPELINES" ]
}
wait_for "all $PIPELINES LogPipelines Ready=True AllNodesShipping" all_shipping
t_shipping=$(secs_since "$t_roll")
log "all $PIPELINES LogPipelines AllNodesShipping ${t_shipping}s after the first agent switched"
sleep "$SETTLE"
curl -sf "http://127.0.0.1:$port/metrics" > "$out/controller-metrics.txt" || true
rss=$(awk '/^VmHWM/ { print $2 }' "/proc/$ctl_pid/status" 2>/dev/null || echo 0)
kill -TERM "$ctl_pid"
for _ in $(seq 1 100); do kill -0 "$ctl_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$ctl_pid" 2>/dev/null; then
  log "the controller did not exit within 10 s of TERM: KILL"
  kill -KILL "$ctl_pid" 2>/dev/null || true
fi
wait "$ctl_pid" 2>/dev/null || true
ctl_pid=
t_total=$(secs_since "$t_start")
stopped_at=$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)
sleep 3 # the audit log is written asynchronously (--audit-log-mode=batch)

{
  echo "binary:        $binary"
  echo "version:       $("$binary" --version 2>/dev/null || echo '?')"
  echo "controller:    $user, $started_at .. $stopped_at"
  echo "pods:          $PODS, pipelines: $PIPELINES, settle: ${SETTLE}s, pace: ${PACE}s"
  echo "ready after:   ${t_ready}s (controller start to /readyz)"
  echo "rendered:      ${t_rendered}s (apply of the pipelines to a ConfigMap holding all of them)"
  echo "switching:     ${t_annotated}s ($PODS agents, one after the other, then ${PACE}s; the controller scrapes every 5 s)"
  echo "shipping:      ${t_shipping}s (first agent switched to all pipelines AllNodesShipping)"
  echo "controller up: ${t_total}s in all; peak RSS $((rss / 1024)) MiB"
} > "$out/timings.txt"
cat "$out/timings.txt"

audit_files=()
shopt -s nullglob
audit_files=("$state"/logs/audit-*.log "$state/logs/audit.log")
shopt -u nullglob
if [ -x "$here/api-requests.sh" ]; then
  "$here/api-requests.sh" --user "$user" "${audit_files[@]}" > "$out/requests.txt"
else
  # the same count without the summarizer: each auditID once, by verb and resource
  jq -R -r --arg user "$user" '
    fromjson? | select(.user.username == $user)
    | select(.stage == "ResponseComplete" or .stage == "ResponseStarted" or .stage == "Panic")
    | [.auditID, (.verb // "?"),
       (if (.objectRef.resource // "") != "" then .objectRef.resource
          + (if (.objectRef.subresource // "") != "" then "/" + .objectRef.subresource else "" end)
          + (if (.objectRef.apiGroup // "") != "" then "." + .objectRef.apiGroup else "" end)
        else ((.requestURI // "?") | sub("\\?.*$"; "")) end)] | @tsv' "${audit_files[@]}" \
    | sort -u -t $'\t' -k1,1 | cut -f2,3 | sort | uniq -c | sort -k1,1nr \
    | awk '{ t += $1; printf "%7d  %-16s  %s\n", $1, $2, $3 } END { printf "%7d  %-16s  requests\n", t, "total" }' \
    > "$out/requests.txt"
fi
echo
cat "$out/requests.txt"
grep -q "Error in audit plugin" "$state/logs/kube-apiserver.log" 2>/dev/null \
  && log "WARNING: kube-apiserver dropped audit events: the counts are low"
log "done; files in $out"
