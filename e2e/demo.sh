#!/usr/bin/env bash
# `make demo`: the local control plane (already up), the CRDs, the controller as a local
# process, the examples applied into namespace outrider-demo, then `kubectl get outrider`.
# `e2e/demo.sh down` stops the controller.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
state=${OUTRIDER_CLUSTER_DIR:-$repo/e2e/.cluster}
kc="$state/kubeconfig"
kubectl() { "$repo/e2e/bin/kubectl" --kubeconfig "$kc" "$@"; }
pidfile="$state/pids/outrider-demo.pid"
ns=outrider-demo

stop() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill -TERM "$(cat "$pidfile")"
    for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.2; done
    echo "[demo] controller stopped"
  fi
  rm -f "$pidfile"
}

if [ "${1:-up}" = down ]; then stop; exit 0; fi

[ -f "$kc" ] || { echo "no cluster: run make cluster-up first" >&2; exit 1; }
kubectl apply --server-side --force-conflicts --field-manager=outrider-demo -f "$repo/crds/" >/dev/null
kubectl wait --for=condition=Established --timeout=60s -f "$repo/crds/" >/dev/null

stop
mkdir -p "$state/pids" "$state/logs"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
KUBECONFIG="$kc" setsid nohup "$repo/target/debug/outrider" controller --leader-elect=false \
  --metrics-addr "127.0.0.1:$port" >"$state/logs/outrider.log" 2>&1 < /dev/null &
echo $! > "$pidfile"
echo "[demo] controller running (pid $(cat "$pidfile"), log $state/logs/outrider.log, metrics http://127.0.0.1:$port/metrics)"

kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n "$ns" -f "$repo/examples/"
# give the controller a moment to write status
for _ in $(seq 40); do
  [ -n "$(kubectl get inventory -n "$ns" -o jsonpath='{.items[*].status.conditions[0].reason}')" ] && break
  sleep 0.5
done
echo
kubectl get outrider -n "$ns"
echo
echo "[demo] try: $repo/e2e/bin/kubectl --kubeconfig $kc describe inventory -n $ns"
echo "[demo] stop: make demo-down"
