#!/usr/bin/env bash
# make image: the Outrider OCI image, built without a container engine.
#
#   dist/outrider-<version>.oci.tar     an OCI image layout (oci-layout, index.json, blobs/) as a tar
#
# One image for every role: `outrider controller`, `outrider agent` (the entrypoint is /outrider,
# the role is the first argument). Scratch-style, a single layer:
#   /outrider                              static binary from e2e/image/dist.sh (make dist)
#   /etc/passwd, /etc/group                root, nonroot (65532), nobody (65534), as distroless
#   /etc/nsswitch.conf                     hosts: files dns (see "Name resolution" below)
#   /etc/ssl/certs/ca-certificates.crt     the build machine's ca-certificates bundle
#   /home/nonroot (0700, 65532)  /tmp (1777)
# Config: user 65532:65532, entrypoint ["/outrider"], workdir /, linux/amd64, OCI labels
# org.opencontainers.image.{source,version,revision,title,description,licenses}.
#
# Tooling: go-containerregistry's crane (e2e/tools.sh crane), which only writes images to a
# registry; so a throwaway `crane registry serve` on 127.0.0.1 (in memory, nothing leaves the
# machine) receives `crane append` (the layer on an empty OCI base) and `crane mutate` (config),
# and `crane pull --format=oci` writes the layout. index.json is then written here, naming the
# image the way `docker load` / `ctr import` / `kind load image-archive` (io.containerd.image.name)
# and skopeo / the OCI layout spec (org.opencontainers.image.ref.name = the tag) expect.
# The layer tar is reproducible (sorted, numeric owners, mtimes = SOURCE_DATE_EPOCH, default the
# last commit's time); same binary + same inputs = same image digest.
#
# Using the archive (an OCI layout rather than crane's docker-save tarball: the OCI media types,
# the digest and the index annotations survive as they are):
#   mkdir l && tar -xf dist/outrider-0.1.0.oci.tar -C l && crane push l REGISTRY/outrider:0.1.0
#     (tried: same digest in the registry)
#   skopeo copy oci-archive:dist/outrider-0.1.0.oci.tar docker://REGISTRY/outrider:0.1.0
#   docker load -i (Docker 25+), podman load -i, ctr -n k8s.io images import
#     (OCI-layout readers; not tried here, there is no container engine on the build machine)
#
# Name resolution: the binary is glibc static-pie, and every name Outrider resolves (SSH hosts via
# tokio's TcpStream::connect, the kube client's and reqwest's GaiResolver, HealthCheck probes via
# lookup_host) goes through glibc's getaddrinfo. glibc >= 2.34 (Debian 12: 2.36) has the "files"
# and "dns" NSS services built into libc, static libc.a included: under strace a static
# getaddrinfo reads /etc/nsswitch.conf, /etc/hosts and /etc/resolv.conf (which the kubelet mounts)
# and opens no libnss_*.so. Any other service named in nsswitch.conf (myhostname, mdns*, resolve,
# sss, ldap, ...) is looked for as libnss_<name>.so.2 with dlopen, absent here, and skipped; the
# image's nsswitch.conf names only the built-in two, files first (glibc's default without the file
# asks DNS first). Do not add glibc shared libraries to the image: a static binary must not dlopen
# another glibc's NSS modules. e2e/tests/image.rs proves an /etc/hosts name and a DNS-only name
# from the image's root filesystem.
#
# usage: e2e/image/build.sh     (prints the archive's path on stdout)
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
log() { printf '[image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

crane="$repo/e2e/bin/crane"
[ -x "$crane" ] || die "crane is missing: run \`e2e/tools.sh crane\` (builds go-containerregistry's crane from its Go module)"
tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar is required (apt-get install tar)"
cacerts=${OUTRIDER_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$cacerts" ] || die "$cacerts is missing: apt-get install ca-certificates (or set OUTRIDER_CA_BUNDLE)"

version=$(sed -n '/^\[package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
license=$(sed -n '/^\[package\]/,/^\[/ s/^license *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
description=$(sed -n '/^\[package\]/,/^\[/ s/^description *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
[ -n "$version" ] || die "no package version in Cargo.toml"
revision=$(git rev-parse HEAD 2>/dev/null) || die "not a git checkout: the image's revision label comes from git"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  log "warning: the work tree has uncommitted changes; revision label $revision-dirty"
  revision="$revision-dirty"
fi
# the project's public repository (Cargo.toml `repository`), not wherever this checkout was
# cloned from (a CI clone's origin is a local path)
source_url=${OUTRIDER_IMAGE_SOURCE:-$(sed -n '/^\[package\]/,/^\[/ s/^repository *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)}
[ -n "$source_url" ] || die "no package repository in Cargo.toml"
image_name=${OUTRIDER_IMAGE_NAME:-ghcr.io/outrider-dev/outrider}
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}

bin=$(e2e/image/dist.sh)

work=$(mktemp -d "${TMPDIR:-/tmp}/outrider-image.XXXXXX")
registry_pid=""
cleanup() {
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# --- the root filesystem (one layer) ---
root="$work/rootfs"
mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot"
install -m 0755 "$bin" "$root/outrider"
cat > "$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat > "$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
# glibc's own default without this file is "dns [!UNAVAIL=return] files": say files first.
echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
install -m 0644 "$cacerts" "$root/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
chmod 0755 "$root/etc" "$root/etc/ssl" "$root/etc/ssl/certs" "$root/home"
chmod 1777 "$root/tmp"
chmod 0700 "$root/home/nonroot"

layer="$work/layer.tar"
tar_opts=(--format=posix --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime
  --sort=name --numeric-owner --mtime="@$epoch" --no-recursion)
# everything root-owned, then the nonroot home owned by 65532 (tar --append keeps both)
(cd "$root" && find . -mindepth 1 ! -path './home/nonroot' -printf '%P\0' | LC_ALL=C sort -z |
  tar "${tar_opts[@]}" --owner=0 --group=0 --null -T - -cf "$layer")
(cd "$root" && tar "${tar_opts[@]}" --owner=65532 --group=65532 -rf "$layer" home/nonroot)

# --- the image, through a loopback registry ---
"$crane" registry serve --address 127.0.0.1:0 >"$work/registry.log" 2>&1 &
registry_pid=$!
port=""
for _ in $(seq 1 100); do
  port=$(sed -n 's/.*serving on port \([0-9][0-9]*\).*/\1/p' "$work/registry.log" | head -n1)
  [ -n "$port" ] && break
  kill -0 "$registry_pid" 2>/dev/null || die "crane registry serve exited: $(cat "$work/registry.log")"
  sleep 0.1
done
[ -n "$port" ] || die "crane registry serve did not report its port: $(cat "$work/registry.log")"
ref="127.0.0.1:$port/outrider:$version"
# crane logs every blob it pushes: keep that for when something fails
crane_q() {
  "$crane" "$@" 2>>"$work/crane.log" || die "crane $1 failed: $(cat "$work/crane.log")"
}

log "assembling $image_name:$version ($revision)"
crane_q append --insecure --oci-empty-base -f "$layer" -t "$ref" >/dev/null
labels=(
  -l "org.opencontainers.image.source=$source_url"
  -l "org.opencontainers.image.version=$version"
  -l "org.opencontainers.image.revision=$revision"
  -l "org.opencontainers.image.title=outrider"
  -l "org.opencontainers.image.description=$description"
  -l "org.opencontainers.image.licenses=$license"
)
crane_q mutate --insecure "$ref" -t "$ref" --set-platform linux/amd64 \
  --user 65532:65532 --entrypoint /outrider --workdir / "${labels[@]}" >/dev/null

layout="$work/layout"
crane_q pull --insecure --format=oci "$ref" "$layout"
digest=$(crane_q digest --insecure "$ref")
manifest_size=$(crane_q manifest --insecure "$ref" | wc -c)
[ -f "$layout/blobs/sha256/${digest#sha256:}" ] || die "crane pull did not write manifest $digest"
# one manifest, named (crane pull writes it unnamed)
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":%d,"digest":"%s","annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}\n' \
  "$manifest_size" "$digest" "$image_name:$version" "$version" > "$layout/index.json"

find "$layout" -type d -exec chmod 0755 {} + && find "$layout" -type f -exec chmod 0644 {} +
mkdir -p dist
out="dist/outrider-$version.oci.tar"
(cd "$layout" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
  tar "${tar_opts[@]}" --owner=0 --group=0 --null -T - -cf "$repo/$out.tmp")
mv -f "$out.tmp" "$out"
log "$out: $image_name:$version $digest, $(stat -c %s "$out") bytes (binary $(stat -c %s "$bin") bytes)"
echo "$repo/$out"
