#!/usr/bin/env bash
# Test of e2e/cluster.sh's process handling: a second, independent cluster (its own state dir in a
# temp dir, never e2e/.cluster) is brought `up`, `status` must report it up, and `down` must leave
# no process of it behind (nothing in /proc whose command line names the temp dir). Two rounds:
#   saturated    `up` while busy loops keep every core busy (BUSY_PER_CORE per core, nice 0)
#   descriptors  `up` called with EXTRA_FDS open descriptors, which cluster.sh closes in each
#                forked child before it execs the component: that stretches the fork->exec window
#
# The race it guards against: cluster.sh recorded the pid of a forked subshell that execs the
# component only later, and its liveness check (the pid's command line must name the state dir)
# ran while that subshell had not exec'd yet (or was in the middle of an exec): `up` then read
# "etcd exited" / "kube-apiserver exited" with an empty log, stopped a healthy start and leaked
# the process that exec'd afterwards. Busy loops alone rarely hit that window on this machine;
# the descriptor round hits it every time with the old start_proc.
#
# usage: e2e/cluster_test.sh
# environment:
#   ROUNDS           which rounds, in order (default "saturated descriptors")
#   BUSY_PER_CORE    busy loops per core in the saturated round (default 3)
#   EXTRA_FDS        descriptors held open for the descriptor round (default 400)
#   CLUSTER_TIMEOUT  passed to cluster.sh (default here 300: a saturated start is slow)
#   CLUSTER_SH       the script under test (default: e2e/cluster.sh next to this file)
#   KEEP_FAILED=1    on failure keep the temp dir with the cluster's logs (default: removed)
# The binaries must exist already (make tools): building them under load is not this test's job.
# Last line of output: "1 passed, 0 failed" or "0 passed, 1 failed"; exit status 0 only on pass.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER_SH=${CLUSTER_SH:-$here/cluster.sh}
ROUNDS=${ROUNDS:-saturated descriptors}
BUSY_PER_CORE=${BUSY_PER_CORE:-3}
EXTRA_FDS=${EXTRA_FDS:-400}
export CLUSTER_TIMEOUT=${CLUSTER_TIMEOUT:-300}

say() { printf '[cluster_test %3ss] %s\n' "$SECONDS" "$*" >&2; }

for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
  if [ ! -x "$here/bin/$b" ]; then
    say "FAIL: $here/bin/$b is missing: run 'make tools' first"
    echo "0 passed, 1 failed"
    exit 1
  fi
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/outrider-cluster-test.XXXXXX")
export OUTRIDER_CLUSTER_DIR="$tmp/cluster"
busy=()
up_pid=
result=fail
failure=

stop_busy() {
  local p
  for p in "${busy[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${busy[@]}"; do wait "$p" 2>/dev/null || true; done
  busy=()
}

# processes whose command line names the temp dir, as "PID ARGV0 ARGV1 ARGV2" (a zombie has an
# empty command line: it is not running)
leftovers() {
  local d p argv
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    argv=()
    mapfile -d '' -t argv 2>/dev/null < "$d/cmdline" || continue
    [ ${#argv[@]} -gt 0 ] || continue
    if [[ "${argv[*]}" == *"$tmp"* ]]; then printf '%s %s\n' "$p" "${argv[*]:0:3}"; fi
  done
  return 0
}

cleanup() {
  local rc=$? left p
  trap - EXIT INT TERM
  stop_busy
  if [ -n "$up_pid" ]; then # interrupted during `up`: stop it (our child), then `down` below
    kill -TERM "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
  # cluster.sh's lock file for this state dir (it lives outside the dir; cluster.sh keeps it)
  rm -f "${TMPDIR:-/tmp}/outrider-cluster-$(printf '%s' "$OUTRIDER_CLUSTER_DIR" | md5sum | cut -c1-12).lock"
  if [ "$result" != pass ]; then
    # whatever the outcome, leave nothing running: cluster.sh down first, then (only) the
    # processes naming our own temp dir, i.e. started for this test, by pid
    if [ -d "$OUTRIDER_CLUSTER_DIR" ]; then KEEP_STATE=1 "$CLUSTER_SH" down >/dev/null 2>&1 || true; fi
    left=$(leftovers)
    if [ -n "$left" ]; then
      say "killing what is left of this test's cluster:"
      printf '%s\n' "$left" >&2
      for p in $(printf '%s\n' "$left" | cut -d' ' -f1); do kill -KILL "$p" 2>/dev/null || true; done
    fi
    if [ "${KEEP_FAILED:-0}" = 1 ]; then
      say "logs kept in $OUTRIDER_CLUSTER_DIR/logs"
    else
      rm -rf "$tmp"
    fi
    say "FAIL: ${failure:-interrupted (exit $rc)}"
    echo "0 passed, 1 failed"
    exit 1
  fi
  rm -rf "$tmp"
  echo "1 passed, 0 failed"
  exit 0
}
trap cleanup EXIT
trap 'failure="interrupted"; exit 130' INT TERM

fail() { failure=$*; exit 1; }

# exec_up_with_fds N: becomes `cluster.sh up` with N more descriptors open (10 upwards; 255 is
# bash's own). It execs: run it in a background subshell only (`exec_up_with_fds N &`).
exec_up_with_fds() {
  local fd=10 i
  for ((i = 0; i < $1; i++)); do
    [ $fd -eq 255 ] && fd=256
    eval "exec $fd</dev/null"
    fd=$((fd + 1))
  done
  exec "$CLUSTER_SH" up
}

round() { # round NAME
  local name=$1 n=0 cores out running left fds=0
  case $name in
    saturated)
      cores=$(nproc 2>/dev/null || echo 2)
      n=$((cores * BUSY_PER_CORE))
      say "[$name] saturating $cores cores with $n busy loops (nice 0), then 'up' with state in $OUTRIDER_CLUSTER_DIR"
      for ((i = 0; i < n; i++)); do
        nice -n 0 sh -c 'while :; do :; done' &
        busy+=("$!")
      done
      sleep 1 # let the load settle onto every core
      ;;
    descriptors)
      fds=$EXTRA_FDS
      say "[$name] 'up' holding $fds extra open descriptors, state in $OUTRIDER_CLUSTER_DIR"
      ;;
    *) fail "unknown round '$name' (ROUNDS: saturated, descriptors)" ;;
  esac

  # in the background, so that an interrupt reaches our trap at once, not after `up` returns
  exec_up_with_fds "$fds" &
  up_pid=$!
  if ! wait "$up_pid"; then
    up_pid=
    sleep 2 # a child forked by `up` may exec its component only now: let it show up
    left=$(leftovers)
    if [ -n "$left" ]; then
      say "[$name] still running after the failed 'up' (it should have stopped them):"
      printf '%s\n' "$left" >&2
    fi
    fail "[$name] 'cluster.sh up' failed ($n busy loops, $fds extra descriptors)"
  fi
  up_pid=
  say "[$name] up succeeded"
  stop_busy

  if ! out=$("$CLUSTER_SH" status 2>&1); then
    printf '%s\n' "$out" >&2
    fail "[$name] 'cluster.sh status' does not report the cluster up"
  fi
  printf '%s\n' "$out" >&2
  grep -q '^/readyz *ok' <<<"$out" || fail "[$name] 'cluster.sh status' exited 0 without '/readyz ok'"
  running=$(grep -c ' running (pid [0-9]*)$' <<<"$out" || true)
  [ "$running" = 5 ] || fail "[$name] 'cluster.sh status' shows $running of 5 components running"

  "$CLUSTER_SH" down || fail "[$name] 'cluster.sh down' failed"
  # down has waited for the processes to go; allow a moment for a KILLed one to be reaped
  for _ in $(seq 1 50); do
    left=$(leftovers)
    [ -z "$left" ] && break
    sleep 0.2
  done
  if [ -n "$left" ]; then
    printf '%s\n' "$left" >&2
    fail "[$name] processes of the test cluster survived 'cluster.sh down' (above: pid, command)"
  fi
  [ ! -e "$OUTRIDER_CLUSTER_DIR" ] || fail "[$name] 'cluster.sh down' left $OUTRIDER_CLUSTER_DIR behind"
  say "[$name] down left no process naming $tmp"
}

for r in $ROUNDS; do round "$r"; done
result=pass
