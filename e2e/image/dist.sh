#!/usr/bin/env bash
# make dist: a static `outrider` binary at dist/outrider, checked to be static.
#
# No musl target here (and rustup cannot fetch one), so this is glibc static-pie:
# `-C target-feature=+crt-static` with an explicit --target, which keeps build scripts and
# proc-macros dynamic and puts the output in target/<triple>/release.
# Name resolution in a static glibc binary: see "Name resolution" in e2e/image/build.sh.
#
# usage: e2e/image/dist.sh        (prints the binary's path on stdout)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
triple=${OUTRIDER_DIST_TARGET:-x86_64-unknown-linux-gnu}
cargo=${CARGO:-cargo}
log() { printf '[dist] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v readelf >/dev/null || die "readelf is required to check the binary (apt-get install binutils)"
[ -f "$(gcc -print-file-name=libc.a 2>/dev/null || echo /nonexistent)" ] \
  || die "static glibc (libc.a) is required (apt-get install libc6-dev gcc)"

cd "$repo"
# Run from a test (e2e/tests/image.rs), the environment holds cargo's per-package variables
# (CARGO_PKG_*, CARGO_MANIFEST_DIR, ...); build scripts that watch them (ring does) would see them
# change between a test's build and a shell's and rebuild half the tree each time.
for v in $(compgen -e); do
  case "$v" in
    CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_CRATE_* | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE | \
      CARGO_TARGET_TMPDIR | CARGO_RUSTC_CURRENT_DIR | OUT_DIR) unset "$v" ;;
  esac
done
log "cargo build --release --target $triple (static-pie)"
RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
  "$cargo" build --release --locked --target "$triple" --bin outrider >&2
bin="${CARGO_TARGET_DIR:-target}/$triple/release/outrider"
[ -x "$bin" ] || die "$bin was not built"

# static: no program interpreter and no shared-library dependencies
headers=$(readelf -lW "$bin")
dynamic=$(readelf -dW "$bin")
if grep -q 'INTERP' <<<"$headers"; then
  die "$bin has a program interpreter (dynamically linked):
$(grep -A1 INTERP <<<"$headers")"
fi
if grep -q '(NEEDED)' <<<"$dynamic"; then
  die "$bin needs shared libraries:
$(grep '(NEEDED)' <<<"$dynamic")"
fi
type=$(readelf -hW "$bin" | awk -F: '/^ *Type:/ {sub(/^ +/, "", $2); print $2}')
case "$type" in
  DYN*) kind="static-pie" ;;
  EXEC*) kind="static" ;;
  *) die "$bin: unexpected ELF type $type" ;;
esac

mkdir -p dist
# copy through a temp name so a concurrent reader never sees half a binary
cp "$bin" dist/.outrider.tmp && mv -f dist/.outrider.tmp dist/outrider
log "dist/outrider: $kind, no PT_INTERP, no DT_NEEDED ($(stat -c %s dist/outrider) bytes)"
echo "$repo/dist/outrider"
