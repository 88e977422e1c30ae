#!/usr/bin/env bash
# Counts the API requests recorded in the test cluster's kube-apiserver audit log, grouped by verb
# and resource, with a total line. Use it to measure how many requests the controller makes.
#
# usage: e2e/bench/api-requests.sh [--since TIME] [--user-agent SUBSTR] [--user NAME] [AUDIT_LOG...]
#   --since TIME         only requests received at or after TIME: RFC3339 (2026-11-20T18:45:00Z,
#                        2026-11-20T19:45:00.5+01:00), or anything `date -d` reads ("2 min ago")
#   --user-agent SUBSTR  only requests whose User-Agent contains SUBSTR (case-sensitive)
#   --user NAME          only requests authenticated as NAME (e.g. outrider-admin,
#                        system:serviceaccount:NS:SA)
#   AUDIT_LOG...         audit log files (JSON lines). Default: audit.log of the cluster's state dir
#                        ($OUTRIDER_CLUSTER_DIR, else e2e/.cluster) and its rotated audit-*.log
#
# What counts: each request once, by its auditID. A request counts when its ResponseComplete (or
# Panic) event is in the log; long-running requests (watch, and exec/logs/proxy) also log
# ResponseStarted when they begin, so a watch that is still open counts too (the total line says
# how many of the watches were still open). RequestReceived events are ignored (the cluster's
# policy omits them anyway). Resources print like kubectl names them: pods, pods/status,
# jobs.batch, leases.coordination.k8s.io; requests with no resource (discovery, /version,
# /openapi) print their path. The policy (e2e/cluster.sh) leaves out system components
# (kube-controller-manager and its kube-system ServiceAccounts, kube-scheduler, kwok,
# system:apiserver), node/lease heartbeats and health probes.
#
# Output (stdout):
#     COUNT  VERB              RESOURCE
#         7  list              jobs.batch
#        12  total             requests, of which watches: 3 (still open: 2)
# Needs jq (Debian package jq, see e2e/deps.sh), else python3, and awk, sort, date.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
usage() { sed -n '4,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { printf 'api-requests: %s\n' "$*" >&2; exit 1; }

since= user= ua=
files=()
while [ $# -gt 0 ]; do
  case $1 in
    --since) [ $# -ge 2 ] || usage; since=$2; shift 2 ;;
    --since=*) since=${1#*=}; shift ;;
    --user) [ $# -ge 2 ] || usage; user=$2; shift 2 ;;
    --user=*) user=${1#*=}; shift ;;
    --user-agent) [ $# -ge 2 ] || usage; ua=$2; shift 2 ;;
    --user-agent=*) ua=${1#*=}; shift ;;
    -h | --help) usage ;;
    --) shift; files+=("$@"); break ;;
    -*) printf 'api-requests: unknown option %s\n' "$1" >&2; usage ;;
    *) files+=("$1"); shift ;;
  esac
done

if [ ${#files[@]} -eq 0 ]; then
  state=${OUTRIDER_CLUSTER_DIR:-$here/../.cluster}
  logdir=${state%/}/logs
  [ -f "$logdir/audit.log" ] || die "no audit log at $logdir/audit.log (is the cluster up? e2e/cluster.sh up)"
  # rotated backups are audit-<timestamp>.log: name order is time order, oldest first
  shopt -s nullglob
  files=("$logdir"/audit-*.log "$logdir/audit.log")
  shopt -u nullglob
fi
for f in "${files[@]}"; do [ -r "$f" ] || die "cannot read $f"; done

# Audit timestamps are MicroTime: UTC, always 6 fraction digits (2026-11-20T18:45:00.123456Z),
# so once --since is written the same way, comparing strings compares times.
if [ -n "$since" ]; then
  t=$(date -u -d "$since" +%Y-%m-%dT%H:%M:%S.%6NZ 2>/dev/null) || die "--since: cannot read '$since' as a time"
  since=$t
fi

# Dropped events (a full audit queue) are reported by kube-apiserver in its own log.
for f in "${files[@]}"; do
  apilog="$(dirname "$f")/kube-apiserver.log"
  if [ -f "$apilog" ] && grep -q "Error in audit plugin" "$apilog"; then
    echo "api-requests: WARNING: $apilog reports dropped audit events: counts are low" >&2
    break
  fi
done

# 1. one TSV line per relevant event: auditID, stage, verb, resource
extract_jq() {
  jq -R -r --arg since "$since" --arg user "$user" --arg ua "$ua" '
    fromjson?
    | select(.stage == "ResponseComplete" or .stage == "Panic" or .stage == "ResponseStarted")
    | select($since == "" or (.requestReceivedTimestamp // "") >= $since)
    | select($user == "" or .user.username == $user)
    | select($ua == "" or ((.userAgent // "") | contains($ua)))
    | [ .auditID, .stage, (.verb // "?"),
        ( if .objectRef != null and (.objectRef.resource // "") != "" then
            .objectRef.resource
            + (if (.objectRef.subresource // "") != "" then "/" + .objectRef.subresource else "" end)
            + (if (.objectRef.apiGroup // "") != "" then "." + .objectRef.apiGroup else "" end)
          else ((.requestURI // "?") | sub("\\?.*$"; "")) end ) ]
    | @tsv' "$@"
}

extract_py() {
  python3 - "$since" "$user" "$ua" "$@" <<'PY'
import json, sys
since, user, ua, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
stages = {"ResponseComplete", "Panic", "ResponseStarted"}
out = sys.stdout
for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # e.g. a line being written
            if not isinstance(ev, dict) or ev.get("stage") not in stages:
                continue
            if since and (ev.get("requestReceivedTimestamp") or "") < since:
                continue
            if user and (ev.get("user") or {}).get("username") != user:
                continue
            if ua and ua not in (ev.get("userAgent") or ""):
                continue
            ref = ev.get("objectRef") or {}
            if ref.get("resource"):
                res = ref["resource"]
                if ref.get("subresource"):
                    res += "/" + ref["subresource"]
                if ref.get("apiGroup"):
                    res += "." + ref["apiGroup"]
            else:
                res = (ev.get("requestURI") or "?").split("?", 1)[0]
            fields = [ev.get("auditID") or "", ev["stage"], ev.get("verb") or "?", res]
            out.write("\t".join(x.replace("\t", " ").replace("\n", " ") for x in fields) + "\n")
PY
}

if [ "${API_REQUESTS_IMPL:-}" != python ] && command -v jq >/dev/null; then
  extract=extract_jq
elif command -v python3 >/dev/null; then
  extract=extract_py
else
  die "needs jq (apt-get install jq; make deps) or python3"
fi

# 2. each auditID once, then count per verb and resource
$extract "${files[@]}" | awk -F'\t' '
  {
    id = $1
    if (!(id in key)) { key[id] = $3 "\t" $4; verb[id] = $3 }
    if ($2 != "ResponseStarted") done[id] = 1
  }
  END {
    printf "%7s  %-16s  %s\n", "COUNT", "VERB", "RESOURCE"
    fflush()
    cmd = "sort -t \"\t\" -k1,1nr -k2,2 -k3,3"
    for (id in key) {
      count[key[id]]++
      total++
      if (verb[id] == "watch") { watches++; if (!(id in done)) open++ }
    }
    for (k in count) print count[k] "\t" k | cmd
    close(cmd)
    printf "%7d  %-16s  requests, of which watches: %d (still open: %d)\n", total, "total", watches, open
  }' | awk -F'\t' 'NF == 3 { printf "%7d  %-16s  %s\n", $1, $2, $3; next } { print }'
