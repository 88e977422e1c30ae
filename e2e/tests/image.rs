//! The OCI image (`make image`: e2e/image/build.sh) proven, not assumed. The archive is read as
//! an OCI image layout (every blob checked against its digest, every layer against the config's
//! diff_ids), its layers are applied in order to an empty root filesystem, and the binary runs
//! FROM that root filesystem the way a container runtime runs it: a new mount and pid namespace
//! (`unshare`), the root bind-mounted read-only, a fresh /proc and a minimal /dev, `chroot`, uid
//! and gid 65532 with no capabilities (every set, the bounding set included) and no_new_privs
//! (`capsh`), a clean environment. The network namespace stays the host's: everything the
//! process talks to is on loopback.
//!
//! - the controller, with in-cluster configuration only (KUBERNETES_SERVICE_HOST/PORT, the
//!   chart ServiceAccount's token and the cluster CA at /var/run/secrets/kubernetes.io/
//!   serviceaccount), drives an Inventory to Ready over SSH to hosts named in /etc/hosts and in
//!   DNS (a loopback DNS server named by /etc/resolv.conf, both mounted as the kubelet does):
//!   the static glibc binary resolves names with no libnss_*.so in the image;
//! - the agent (`outrider agent --pipeline`) ships one file, mounted read-only, into a real
//!   VictoriaLogs named in /etc/hosts, keeping its checkpoints in a writable state directory.
//!
//! The tests need root (namespaces, mounts, chroot), like a container runtime.

use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kube::Api;
use outrider::api::Inventory;
use sha2::{Digest, Sha256};

use crate::support::*;

use crate::victorialogs;

/// The image's user and group (distroless `nonroot`).
const NONROOT: u32 = 65532;
/// Where the kubelet mounts a ServiceAccount's token, CA and namespace.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Fails (never skips) unless the tests can do what a container runtime does.
fn require_container_tools() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the image tests run the image like a container runtime (unshare, mount, chroot): \
         run the suite as root, as `make test` does"
    );
    for (cmd, package) in [
        ("unshare", "util-linux"),
        ("mount", "mount"),
        ("capsh", "libcap2-bin"),
        ("tar", "tar"),
        ("env", "coreutils"),
    ] {
        assert!(
            which(cmd).is_some(),
            "`{cmd}` is missing: apt-get install {package} (or `make deps`)"
        );
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// The image archive, built once per test run by `e2e/image/build.sh` (what `make image` runs;
/// cargo makes the static binary's rebuild a no-op when nothing changed, so `make test` builds
/// the image first and this costs a second or two). A failed build fails every image test with
/// the same message, without building again.
fn archive() -> PathBuf {
    static ARCHIVE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = ARCHIVE.get_or_init(|| {
        let started = Instant::now();
        let out = Command::new(repo().join("e2e/image/build.sh"))
            .current_dir(repo())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running e2e/image/build.sh: {e} (is bash installed?)"))?;
        if !out.status.success() {
            return Err(format!(
                "e2e/image/build.sh failed ({}): see its message above (`make image` runs it; \
                 it needs crane: `e2e/tools.sh crane`)",
                out.status
            ));
        }
        let path = PathBuf::from(stdout(&out).trim());
        if !path.is_file() {
            return Err(format!("e2e/image/build.sh printed no archive: {path:?}"));
        }
        eprintln!(
            "[image] {} in {:.1}s",
            path.display(),
            started.elapsed().as_secs_f64()
        );
        Ok(path)
    });
    match built {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// An unpacked image: its layout's documents and the root filesystem its layers make.
struct Image {
    dir: tempfile::TempDir,
    rootfs: PathBuf,
    index: serde_json::Value,
    config: serde_json::Value,
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the archive as an OCI image layout and applies its layers, in order, to a new root.
fn unpack() -> Image {
    let archive = archive();
    let dir = tempfile::Builder::new()
        .prefix("outrider-image-")
        .tempdir()
        .expect("tempdir");
    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).expect("layout dir");
    run(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
        "untar the image archive",
    );
    let read = |name: &str| {
        std::fs::read(layout.join(name)).unwrap_or_else(|e| panic!("{name} in the archive: {e}"))
    };
    let oci_layout: serde_json::Value =
        serde_json::from_slice(&read("oci-layout")).expect("oci-layout is JSON");
    assert_eq!(
        oci_layout["imageLayoutVersion"], "1.0.0",
        "an OCI image layout"
    );
    // a blob, checked against its digest and size
    let blob = |descriptor: &serde_json::Value| -> Vec<u8> {
        let digest = descriptor["digest"].as_str().expect("descriptor digest");
        let hash = digest
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("{digest}: not sha256"));
        let bytes = read(&format!("blobs/sha256/{hash}"));
        assert_eq!(
            hex(&Sha256::digest(&bytes)),
            hash,
            "blob {digest} is corrupt"
        );
        assert_eq!(
            Some(bytes.len() as u64),
            descriptor["size"].as_u64(),
            "size of {digest}"
        );
        bytes
    };
    let index: serde_json::Value =
        serde_json::from_slice(&read("index.json")).expect("index.json is JSON");
    let manifests = index["manifests"].as_array().expect("index manifests");
    assert_eq!(manifests.len(), 1, "one image: {index}");
    assert_eq!(
        manifests[0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(&manifests[0])).expect("manifest is JSON");
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&blob(&manifest["config"])).expect("config is JSON");
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("rootfs.diff_ids")
        .clone();
    let layers = manifest["layers"].as_array().expect("layers").clone();
    assert_eq!(layers.len(), diff_ids.len(), "a diff_id per layer");

    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).expect("rootfs dir");
    // what a runtime gives "/" (the layers do not say)
    std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755)).expect("chmod /");
    for (i, layer) in layers.iter().enumerate() {
        let media_type = layer["mediaType"].as_str().expect("layer mediaType");
        let compressed = blob(layer);
        let tar = match media_type {
            "application/vnd.oci.image.layer.v1.tar+gzip" => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&compressed[..])
                    .read_to_end(&mut out)
                    .expect("gunzip layer");
                out
            }
            "application/vnd.oci.image.layer.v1.tar" => compressed,
            other => panic!("layer {i}: unexpected media type {other}"),
        };
        assert_eq!(
            format!("sha256:{}", hex(&Sha256::digest(&tar))),
            diff_ids[i].as_str().unwrap_or_default(),
            "layer {i} does not match its diff_id"
        );
        let path = dir.path().join(format!("layer-{i}.tar"));
        std::fs::write(&path, &tar).expect("write layer");
        apply_layer(&rootfs, &path);
    }
    Image {
        dir,
        rootfs,
        index,
        config,
    }
}

/// Applies one layer tar: its whiteouts first (`.wh.<name>` deletes, `.wh..wh..opq` empties a
/// directory), then its files with their owners and modes.
fn apply_layer(rootfs: &Path, layer: &Path) {
    let names = run(
        Command::new("tar").arg("-tf").arg(layer),
        "list a layer's entries",
    );
    for name in names.lines() {
        let name = name.trim_start_matches("./");
        let (parent, base) = match name.rsplit_once('/') {
            Some((p, b)) => (rootfs.join(p), b),
            None => (rootfs.to_path_buf(), name),
        };
        if base == ".wh..wh..opq" {
            for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                remove(&entry.path());
            }
        } else if let Some(hidden) = base.strip_prefix(".wh.") {
            remove(&parent.join(hidden));
        }
    }
    run(
        Command::new("tar")
            .args([
                "--same-owner",
                "--same-permissions",
                "--numeric-owner",
                "--exclude=.wh.*",
            ])
            .arg("-xf")
            .arg(layer)
            .arg("-C")
            .arg(rootfs),
        "extract a layer",
    );
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).expect("whiteout a directory"),
        Ok(_) => std::fs::remove_file(path).expect("whiteout a file"),
        Err(_) => {}
    }
}

/// `(kind, mode, uid, gid)` of every entry of the root filesystem, by path.
fn tree(rootfs: &Path) -> HashMap<String, (char, u32, u32, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut HashMap<String, (char, u32, u32, u32)>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let m = std::fs::symlink_metadata(&path).expect("metadata");
            let kind = if m.is_dir() {
                'd'
            } else if m.file_type().is_symlink() {
                'l'
            } else {
                'f'
            };
            let rel = format!(
                "/{}",
                path.strip_prefix(root).expect("under root").display()
            );
            out.insert(rel, (kind, m.mode() & 0o7777, m.uid(), m.gid()));
            if m.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = HashMap::new();
    walk(rootfs, rootfs, &mut out);
    out
}

/// The program headers of an ELF file say: no interpreter, no shared libraries.
fn assert_static(binary: &Path) {
    let headers = run(
        Command::new("readelf").arg("-lW").arg(binary),
        "readelf -l (apt-get install binutils)",
    );
    assert!(
        !headers.contains("INTERP"),
        "{} has a program interpreter:\n{headers}",
        binary.display()
    );
    let dynamic = run(
        Command::new("readelf").arg("-dW").arg(binary),
        "readelf -d (apt-get install binutils)",
    );
    assert!(
        !dynamic.contains("(NEEDED)"),
        "{} needs shared libraries:\n{dynamic}",
        binary.display()
    );
}

#[test]
fn image_is_a_static_scratch_image_for_uid_65532_with_oci_labels() {
    require_container_tools();
    let image = unpack();

    // exactly these entries: no shell, no libc, no libnss, nothing else
    let tree = tree(&image.rootfs);
    let mut expected: HashMap<String, (char, u32, u32, u32)> = [
        ("/outrider", ('f', 0o755, 0, 0)),
        ("/etc", ('d', 0o755, 0, 0)),
        ("/etc/passwd", ('f', 0o644, 0, 0)),
        ("/etc/group", ('f', 0o644, 0, 0)),
        ("/etc/nsswitch.conf", ('f', 0o644, 0, 0)),
        ("/etc/ssl", ('d', 0o755, 0, 0)),
        ("/etc/ssl/certs", ('d', 0o755, 0, 0)),
        ("/etc/ssl/certs/ca-certificates.crt", ('f', 0o644, 0, 0)),
        ("/home", ('d', 0o755, 0, 0)),
        ("/home/nonroot", ('d', 0o700, NONROOT, NONROOT)),
        ("/tmp", ('d', 0o1777, 0, 0)),
    ]
    .into_iter()
    .map(|(p, v)| (p.to_string(), v))
    .collect();
    let mut actual = tree.clone();
    for (path, want) in expected.drain() {
        let got = actual.remove(&path);
        assert_eq!(got, Some(want), "{path}: (kind, mode, uid, gid)");
    }
    assert!(
        actual.is_empty(),
        "unexpected entries in the image: {actual:?}"
    );

    assert_static(&image.rootfs.join("outrider"));
    let passwd = std::fs::read_to_string(image.rootfs.join("etc/passwd")).expect("passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:") && l.contains(":/home/nonroot:")),
        "{passwd}"
    );
    let group = std::fs::read_to_string(image.rootfs.join("etc/group")).expect("group");
    assert!(group.lines().any(|l| l == "nonroot:x:65532:"), "{group}");
    let certs = std::fs::read_to_string(image.rootfs.join("etc/ssl/certs/ca-certificates.crt"))
        .expect("CA bundle");
    assert!(
        certs.matches("BEGIN CERTIFICATE").count() > 50,
        "a CA bundle, not {} certificates",
        certs.matches("BEGIN CERTIFICATE").count()
    );

    // the config: one image for every role, the role is the argument
    let config = &image.config;
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/outrider"])
    );
    assert!(config["config"]["Cmd"].is_null(), "no default role");
    let labels = &config["config"]["Labels"];
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(labels["org.opencontainers.image.version"], version);
    assert_eq!(labels["org.opencontainers.image.title"], "outrider");
    assert_eq!(
        labels["org.opencontainers.image.licenses"],
        env!("CARGO_PKG_LICENSE")
    );
    assert_eq!(
        labels["org.opencontainers.image.source"],
        env!("CARGO_PKG_REPOSITORY"),
        "the project's repository, not the checkout's origin: {labels}"
    );
    let head = run(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(repo()),
        "git rev-parse HEAD",
    );
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .unwrap_or_default();
    assert!(
        revision.starts_with(head.trim()),
        "revision {revision} is not HEAD {}",
        head.trim()
    );
    let annotations = &image.index["manifests"][0]["annotations"];
    assert_eq!(annotations["org.opencontainers.image.ref.name"], version);
    assert_eq!(
        annotations["io.containerd.image.name"],
        format!("ghcr.io/outrider-dev/outrider:{version}")
    );
    assert_eq!(
        archive().file_name().and_then(|n| n.to_str()),
        Some(format!("outrider-{version}.oci.tar").as_str())
    );

    // the binary runs from the image's root and says what it is, as 65532
    let mut shown = Contained::start(
        &image,
        &[],
        &[],
        &["--version".to_string()],
        &image.dir.path().join("version.log"),
    );
    let status = shown.wait(Duration::from_secs(20));
    let out = std::fs::read_to_string(&shown.log).unwrap_or_default();
    assert!(status.success(), "/outrider --version: {status}: {out}");
    assert_eq!(out.trim(), format!("outrider {version}"));
}

/// A bind mount into the container: host path, path in the image's root, read-only or not.
struct Bind {
    host: PathBuf,
    target: &'static str,
    read_only: bool,
}

impl Bind {
    fn ro(host: &Path, target: &'static str) -> Self {
        Self {
            host: host.to_path_buf(),
            target,
            read_only: true,
        }
    }
    fn rw(host: &Path, target: &'static str) -> Self {
        Self {
            host: host.to_path_buf(),
            target,
            read_only: false,
        }
    }
}

/// The new mount namespace: the root bind-mounted onto itself, the volumes on their mount
/// points, a fresh /proc (of the new pid namespace), a tmpfs /dev with the usual character
/// devices, then the root remounted read-only. Arguments: ROOT {ro|rw HOST TARGET}... -- CMD...
const CONTAINER_SETUP: &str = r#"set -eu
r=$1; shift
mount --bind "$r" "$r"
while [ "$1" != -- ]; do
  mount --bind "$2" "$r$3"
  if [ "$1" = ro ]; then mount -o remount,bind,ro,nosuid,nodev "$r$3"; fi
  shift 3
done
shift
mount -t proc -o nosuid,nodev,noexec proc "$r/proc"
mount -t tmpfs -o nosuid,noexec,mode=0755,size=64k tmpfs "$r/dev"
for d in null zero random urandom; do : > "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done
mount -o remount,bind,ro,nosuid,nodev "$r"
exec "$@"
"#;

/// `/outrider <args>` running from an unpacked image as a container: see the module docs.
/// Killed (the whole pid namespace) when dropped.
struct Contained {
    child: Child,
    log: PathBuf,
    rootfs: PathBuf,
}

impl Contained {
    fn start(
        image: &Image,
        binds: &[Bind],
        env: &[(&str, String)],
        args: &[String],
        log: &Path,
    ) -> Self {
        let rootfs = &image.rootfs;
        // mount points, as a runtime creates them
        for dir in ["proc", "dev"] {
            std::fs::create_dir_all(rootfs.join(dir)).expect("mount point");
        }
        for b in binds {
            let target = rootfs.join(b.target.trim_start_matches('/'));
            if b.host.is_dir() {
                std::fs::create_dir_all(&target).expect("mount point");
            } else {
                std::fs::create_dir_all(target.parent().expect("parent")).expect("mount point");
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&target)
                    .expect("mount point");
            }
        }
        let file = std::fs::File::create(log).expect("container log");
        let mut cmd = Command::new(which("unshare").expect("unshare"));
        cmd.args(["--mount", "--pid", "--fork", "--kill-child"])
            .args(["--propagation", "private", "--"])
            .args(["/bin/sh", "-c", CONTAINER_SETUP, "sh"])
            .arg(rootfs);
        for b in binds {
            cmd.arg(if b.read_only { "ro" } else { "rw" })
                .arg(&b.host)
                .arg(b.target);
        }
        cmd.arg("--");
        // a clean environment: only what the pod spec would set
        cmd.args(["/usr/bin/env", "-i"]);
        cmd.arg("HOME=/home/nonroot");
        for (k, v) in env {
            cmd.arg(format!("{k}={v}"));
        }
        // drop every capability from the bounding set, chroot, become 65532:65532 (which clears
        // the remaining sets), no_new_privs, exec the image's entrypoint
        let id = NONROOT.to_string();
        cmd.arg(which("capsh").expect("capsh"))
            .arg("--drop=all")
            .arg(format!("--chroot={}", rootfs.display()))
            .arg(format!("--groups={id}"))
            .arg(format!("--gid={id}"))
            .arg(format!("--uid={id}"))
            .arg("--no-new-privs")
            .arg(format!(
                "--shell={}",
                image.config["config"]["Entrypoint"][0]
                    .as_str()
                    .expect("an entrypoint")
            ))
            .arg("--")
            .args(args)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file);
        let child = cmd.spawn().expect("starting unshare");
        Self {
            child,
            log: log.to_path_buf(),
            rootfs: rootfs.clone(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the container did not exit within {timeout:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The host pid of the entrypoint (pid 1 of the container's pid namespace), once it runs.
    fn entrypoint_pid(&mut self) -> u32 {
        let parent = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the container exited: {status}:\n{}", self.log_text());
            }
            for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // pid (comm) state ppid ...
                let Some((comm, rest)) =
                    stat.split_once(" (").and_then(|(_, r)| r.rsplit_once(") "))
                else {
                    continue;
                };
                let ppid = rest.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
                if ppid == Some(parent) && comm == "outrider" {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the entrypoint did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The entrypoint runs as a container process: uid/gid 65532 everywhere, no capabilities,
    /// no_new_privs, pid 1 of its own pid namespace, its own mount namespace, chrooted into the
    /// image's root, which is read-only.
    fn assert_isolated(&mut self) -> u32 {
        let pid = self.entrypoint_pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |name: &str| -> String {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")))
                .unwrap_or_else(|| panic!("{name} missing from /proc/{pid}/status:\n{status}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let id = format!("{NONROOT} {NONROOT} {NONROOT} {NONROOT}");
        assert_eq!(field("Uid"), id, "real, effective, saved, fs uid");
        assert_eq!(field("Gid"), id, "real, effective, saved, fs gid");
        assert_eq!(field("Groups"), NONROOT.to_string(), "supplementary groups");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(set), "0000000000000000", "{set}: no capabilities");
        }
        assert_eq!(field("NoNewPrivs"), "1");
        let nspid = field("NSpid");
        assert_eq!(
            nspid.split(' ').collect::<Vec<_>>(),
            vec![pid.to_string().as_str(), "1"],
            "pid 1 of a new pid namespace"
        );
        for ns in ["mnt", "pid"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns");
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns");
            assert_ne!(theirs, ours, "a {ns} namespace of its own");
        }
        let root = std::fs::read_link(format!("/proc/{pid}/root")).expect("root");
        assert_eq!(
            root,
            self.rootfs.canonicalize().expect("rootfs"),
            "chrooted into the image's root filesystem"
        );
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mounts");
        let root_mount = mountinfo
            .lines()
            .rfind(|l| l.split(' ').nth(4) == Some("/"))
            .unwrap_or_else(|| panic!("no / in its mountinfo:\n{mountinfo}"));
        let options = root_mount.split(' ').nth(5).unwrap_or_default();
        assert!(
            options.split(',').any(|o| o == "ro"),
            "its / is read-only: {root_mount}"
        );
        eprintln!("[image] host pid {pid}: uid/gid {NONROOT}, no capabilities, / = {root_mount}");
        pid
    }

    /// SIGTERM to the entrypoint and wait for the container to end.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.entrypoint_pid();
        // SAFETY: kill(2) with a pid of a process we started and a valid signal.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        self.wait(Duration::from_secs(30))
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        // --kill-child: unshare's death takes pid 1 of the namespace, and with it everything
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS server on 127.0.53.x:53 (UDP) answering A queries for `names`, NODATA for other types
/// of those names, NXDOMAIN for the rest. Counts the queries per name. Stops when dropped.
struct Dns {
    addr: SocketAddr,
    queries: Arc<Mutex<HashMap<String, u32>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Dns {
    fn start(names: HashMap<String, Ipv4Addr>) -> Self {
        let socket = (1..=50u8)
            .find_map(|i| UdpSocket::bind((Ipv4Addr::new(127, 0, 53, i), 53)).ok())
            .expect("a free 127.0.53.x:53 for the test DNS server");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        let queries = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (queries, stop) = (queries.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some((name, reply)) = dns_answer(&buf[..n], &names) {
                        if let Ok(mut q) = queries.lock() {
                            *q.entry(name).or_insert(0) += 1;
                        }
                        let _ = socket.send_to(&reply, peer);
                    }
                }
            })
        };
        Self {
            addr,
            queries,
            stop,
            thread: Some(thread),
        }
    }

    fn queries(&self, name: &str) -> u32 {
        self.queries
            .lock()
            .map(|q| q.get(name).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The answer to one DNS query (RFC 1035 §4): the question echoed, one A record when known.
fn dns_answer(query: &[u8], names: &HashMap<String, Ipv4Addr>) -> Option<(String, Vec<u8>)> {
    if query.len() < 12 || query[2] & 0x80 != 0 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    query.get(..question_end)?;
    let name = labels.join(".");
    let known = names.get(&name);
    let answer = match (known, qtype) {
        (Some(ip), 1) => Some(*ip),
        _ => None,
    };
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]); // id
    let rd = query[2] & 0x01;
    reply.push(0x84 | rd); // QR, AA, RD as asked
    reply.push(if known.is_some() { 0x80 } else { 0x83 }); // RA; NOERROR or NXDOMAIN
    reply.extend_from_slice(&[0, 1, 0, u8::from(answer.is_some()), 0, 0, 0, 0]);
    reply.extend_from_slice(&query[12..question_end]);
    if let Some(ip) = answer {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some((name, reply))
}

/// A file in `dir`, readable by everyone (the container's user reads it through a bind mount).
fn world_readable(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

fn world_readable_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).expect("mkdir");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path.to_path_buf()
}

/// The test API server's port and CA, from the admin kubeconfig; its serving certificate must
/// be valid for 127.0.0.1, the address in-cluster configuration connects to.
async fn api_server(kubeconfig: &Path) -> (u16, Vec<u8>) {
    let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
    let config: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig yaml");
    let cluster = &config["clusters"][0]["cluster"];
    let server = cluster["server"].as_str().expect("cluster server");
    let port: u16 = server
        .strip_prefix("https://127.0.0.1:")
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("the test API server is not https://127.0.0.1:<port>: {server}"));
    let ca = match (
        cluster["certificate-authority-data"].as_str(),
        cluster["certificate-authority"].as_str(),
    ) {
        (Some(data), _) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .expect("certificate-authority-data is base64")
        }
        (None, Some(path)) => {
            let path = kubeconfig.parent().expect("dir").join(path);
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        }
        (None, None) => panic!("the kubeconfig names no cluster CA"),
    };

    // a TLS handshake that checks the certificate against the CA for the IP 127.0.0.1
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the API server");
    let name = ServerName::IpAddress(std::net::IpAddr::from(Ipv4Addr::LOCALHOST).into());
    tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| {
            panic!("the API server's serving certificate is not valid for 127.0.0.1: {e}")
        });
    (port, ca)
}

/// The chart's RBAC for the controller (ServiceAccount, ClusterRole and binding, leader
/// election Role and binding) as `helm template` renders it for `release` in `ns`. Only the
/// controller's pieces: the agent's are not needed here.
fn chart_controller_rbac(release: &str, ns: &str) -> (String, String) {
    let out = Command::new(repo().join("e2e/bin/helm"))
        .args(["template", release, "charts/outrider", "-n", ns])
        .args(["--kube-version", "1.37.2"])
        .current_dir(repo())
        .output()
        .expect("running e2e/bin/helm (run `make tools`)");
    assert!(out.status.success(), "helm template: {}", stderr(&out));
    let fullname = format!("{release}-outrider");
    let wanted = [
        ("ServiceAccount", fullname.clone()),
        ("ClusterRole", fullname.clone()),
        ("ClusterRoleBinding", fullname.clone()),
        ("Role", format!("{fullname}-leader-election")),
        ("RoleBinding", format!("{fullname}-leader-election")),
    ];
    let mut docs = Vec::new();
    let text = stdout(&out);
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let Ok(value) = <serde_yaml::Value as serde::Deserialize>::deserialize(doc) else {
            continue;
        };
        let kind = value["kind"].as_str().unwrap_or_default();
        let name = value["metadata"]["name"].as_str().unwrap_or_default();
        if wanted.iter().any(|(k, n)| k == &kind && n == name) {
            docs.push(serde_yaml::to_string(&value).expect("yaml"));
        }
    }
    assert_eq!(
        docs.len(),
        wanted.len(),
        "the chart no longer renders {wanted:?} for release {release}"
    );
    (fullname, docs.join("---\n"))
}

/// Deletes the test's cluster-scoped RBAC when dropped.
struct ClusterScoped(String);

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let _ = kubectl(
            &kubeconfig(),
            &[
                "delete",
                "--ignore-not-found",
                &format!("clusterrole/{}", self.0),
                &format!("clusterrolebinding/{}", self.0),
            ],
        );
    }
}

#[tokio::test]
async fn controller_from_the_image_with_in_cluster_config_drives_an_inventory_to_ready() {
    require_container_tools();
    let kc = kubeconfig();
    let (port, ca) = api_server(&kc).await;
    let image = unpack();
    let ns = namespace("img-ctl");
    let release = format!("img{}", std::process::id() % 100_000);

    // the chart's ServiceAccount and RBAC, and a token for it, mounted where the kubelet puts it
    let (sa, rbac) = chart_controller_rbac(&release, &ns);
    let _cleanup = ClusterScoped(sa.clone());
    apply(&kc, &rbac);
    let out = kubectl(&kc, &["create", "token", &sa, "-n", &ns, "--duration=1h"]);
    assert!(out.status.success(), "create token: {}", stderr(&out));
    let sa_dir = world_readable_dir(&image.dir.path().join("serviceaccount"));
    world_readable(&sa_dir, "token", stdout(&out).trim());
    world_readable(&sa_dir, "ca.crt", &String::from_utf8_lossy(&ca));
    world_readable(&sa_dir, "namespace", &ns);

    // two hosts by name: one from /etc/hosts, one only in DNS
    let (by_file, by_dns) = ("img-files.outrider.test", "img-dns.outrider.test");
    let dns = Dns::start(HashMap::from([(
        by_dns.to_string(),
        Ipv4Addr::new(127, 0, 10, 2),
    )]));
    let etc = world_readable_dir(&image.dir.path().join("etc"));
    let hosts_file = world_readable(
        &etc,
        "hosts",
        &format!("127.0.0.1\tlocalhost\n127.0.10.1\t{by_file}\n"),
    );
    let resolv = world_readable(
        &etc,
        "resolv.conf",
        &format!(
            "nameserver {}\noptions timeout:2 attempts:3\n",
            dns.addr.ip()
        ),
    );

    let server = &hosts().server;
    let known_hosts: String = server
        .known_hosts_for(&[by_file, by_dns])
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    let key: String = hosts()
        .private_key
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    apply(
        &kc,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: fleet-ssh, namespace: {ns}}}\ntype: Opaque\nstringData:\n  ssh-privatekey: |\n{key}  known_hosts: |\n{known_hosts}"
        ),
    );
    apply(
        &kc,
        &format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: fleet, namespace: {ns}}}\nspec:\n  ssh:\n    user: {TEST_USER}\n    port: {}\n    connectTimeout: 5s\n    secretRef: {{name: fleet-ssh}}\n  probe: {{interval: 30s}}\n  hosts:\n    - {{name: by-file, address: {by_file}}}\n    - {{name: by-dns, address: {by_dns}}}\n",
            server.port
        ),
    );

    let metrics_port = free_port();
    let mut controller = Contained::start(
        &image,
        &[
            Bind::ro(&sa_dir, SA_DIR),
            Bind::ro(&hosts_file, "/etc/hosts"),
            Bind::ro(&resolv, "/etc/resolv.conf"),
        ],
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_string()),
            ("KUBERNETES_SERVICE_PORT", port.to_string()),
            ("POD_NAME", "img-controller-0".to_string()),
            ("POD_NAMESPACE", ns.clone()),
            ("RUST_LOG", "info,outrider=debug".to_string()),
        ],
        &[
            "controller".to_string(),
            format!("--watch-namespace={ns}"),
            format!("--lease-name={sa}"),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
        ],
        &repo().join(format!("target/e2e-logs/{ns}-image-controller.log")),
    );
    controller.assert_isolated();

    let api: Api<Inventory> = Api::namespaced(client().await, &ns);
    let inv = eventually(
        Duration::from_secs(90),
        "Inventory fleet Ready=True/AllReachable from the image's controller",
        || async {
            let inv = api.get_opt("fleet").await.ok().flatten()?;
            let status = inv.status.as_ref()?;
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.status == "True" && ready.reason == "AllReachable").then_some(inv)
        },
    )
    .await;
    assert_eq!(
        inv.status.as_ref().and_then(|s| s.reachable),
        Some(2),
        "both hosts, by /etc/hosts and by DNS:\n{}",
        controller.log_text()
    );
    assert!(
        dns.queries(by_dns) > 0,
        "{by_dns} was resolved through the DNS server"
    );
    assert_eq!(
        dns.queries(by_file),
        0,
        "{by_file} came from /etc/hosts, not DNS"
    );
    let ready = http_get(&format!("http://127.0.0.1:{metrics_port}/readyz")).await;
    assert!(ready.is_some(), "/readyz from the image's controller");
    // still exactly as isolated after the work, and a clean exit on SIGTERM
    controller.assert_isolated();
    let status = controller.terminate();
    assert!(
        status.success(),
        "the controller exits cleanly on SIGTERM: {status}\n{}",
        controller.log_text()
    );
}

#[tokio::test]
async fn agent_from_the_image_ships_a_file_into_victorialogs() {
    require_container_tools();
    let image = unpack();
    let store = victorialogs::VictoriaLogs::start();
    let work = image.dir.path();

    const LINES: u64 = 200;
    let logs = world_readable_dir(&work.join("logs"));
    let text: String = (0..LINES).map(|n| format!("image line {n}\n")).collect();
    world_readable(&logs, "app.log", &text);
    // the store by name, from /etc/hosts
    let etc = world_readable_dir(&work.join("etc"));
    let hosts_file = world_readable(
        &etc,
        "hosts",
        "127.0.0.1\tlocalhost\n127.0.0.1\tlogs.outrider.test\n",
    );
    let config = world_readable_dir(&work.join("config"));
    world_readable(
        &config,
        "lp.yaml",
        &format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: ClusterLogPipeline\nmetadata: {{name: to-store}}\nspec:\n  inputs: [{{name: app, paths: [\"/var/log/app/*.log\"]}}]\n  outputs: [{{name: loki, loki: {{url: \"http://logs.outrider.test:{}/insert?_msg_field=message&_time_field=timestamp\", labels: {{service: \"{{{{service}}}}\", node: \"{{{{node}}}}\"}}}}}}]\n  fields: {{service: shop}}\n  delivery: {{batch: {{maxEvents: 100, maxWait: 200ms}}}}\n",
            store.port
        ),
    );
    // the state directory is the only writable place, owned by the container's user
    let state = work.join("state");
    std::fs::create_dir(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(NONROOT), Some(NONROOT)).expect("chown state");

    let metrics_port = free_port();
    let mut agent = Contained::start(
        &image,
        &[
            Bind::ro(&logs, "/var/log/app"),
            Bind::ro(&config, "/etc/outrider"),
            Bind::rw(&state, "/var/lib/outrider-agent"),
            Bind::ro(&hosts_file, "/etc/hosts"),
        ],
        &[("RUST_LOG", "info".to_string())],
        &[
            "agent".to_string(),
            "--pipeline=/etc/outrider/lp.yaml".to_string(),
            "--node-name=img-node".to_string(),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            "--scan-interval=200ms".to_string(),
            "--poll-interval=50ms".to_string(),
        ],
        &repo().join(format!(
            "target/e2e-logs/image-agent-{}.log",
            std::process::id()
        )),
    );
    agent.assert_isolated();

    let rows = store
        .wait_for_count("*", LINES, Duration::from_secs(60))
        .await;
    let mut seen: Vec<String> = rows
        .iter()
        .map(|r| r["_msg"].as_str().unwrap_or_default().to_string())
        .collect();
    seen.sort();
    let mut want: Vec<String> = (0..LINES).map(|n| format!("image line {n}")).collect();
    want.sort();
    assert_eq!(seen, want, "every line once:\n{}", agent.log_text());
    for r in &rows {
        assert_eq!(r["file"], "/var/log/app/app.log", "{r}");
        assert_eq!(r["node"], "img-node", "{r}");
        assert_eq!(r["_stream"], r#"{node="img-node",service="shop"}"#, "{r}");
    }
    agent.assert_isolated();
    let status = agent.terminate();
    assert!(
        status.success(),
        "the agent exits cleanly on SIGTERM: {status}\n{}",
        agent.log_text()
    );
    // it checkpointed into the state directory, as 65532
    let mut files = Vec::new();
    let mut dirs = vec![state.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("state").flatten() {
            let m = entry.metadata().expect("metadata");
            if m.is_dir() {
                dirs.push(entry.path());
            } else {
                files.push((entry.path(), m.uid(), m.gid()));
            }
        }
    }
    assert!(!files.is_empty(), "no checkpoint in the state directory");
    for (path, uid, gid) in files {
        assert_eq!(
            (uid, gid),
            (NONROOT, NONROOT),
            "{} written by the container's user",
            path.display()
        );
    }
}
