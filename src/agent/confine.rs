//! Where the agent may read: log files are opened only beneath the admin's allowed roots
//! (`--allowed-root`, the chart's `agent.allowedPaths`), never through a symlink, never in
//! `/proc`, `/sys`, `/dev`, mounted service-account or Secret volumes, the agent's state
//! directory or its secret directory. A pipeline is untrusted input (any namespace may
//! write one): this holds even when the controller is bypassed with `--pipeline`.
//!
//! Two layers: [`Confinement::check_pattern`] refuses a glob whose fixed prefix is not below
//! an allowed root (so globbing and watching never start above one), and
//! [`Confinement::open`] opens each match with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` relative to its root, or, on kernels
//! without `openat2`, walks the path one `O_NOFOLLOW` component at a time. A symlink
//! planted anywhere on the path is refused, not followed (Kubernetes' own
//! `/var/log/containers` links included: read `/var/log/pods`).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::config::{OutputKind, Pipeline};
use rustix::io::Errno;

/// Paths no allowed root can open up, whatever the admin lists.
pub const ALWAYS_DENIED: &[&str] = &["/proc", "/sys", "/dev", "/run/secrets", "/var/run/secrets"];

/// Why a path or a pattern was refused; `reason()` is the metric label and log field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("{path} is not an absolute path")]
    Relative { path: String },
    #[error("{path} has a `..` component")]
    ParentComponent { path: String },
    #[error("{path} is outside the allowed roots ({roots})")]
    OutsideRoots { path: String, roots: String },
    #[error("{path} has a wildcard at or above its allowed root {root}")]
    WildcardAboveRoot { path: String, root: String },
    #[error("{path} is under {denied}, which the agent never reads")]
    Denied { path: String, denied: String },
    #[error("{path}: a symlink on the way, not followed")]
    Symlink { path: String },
    #[error("{path} is not a regular file")]
    NotRegular { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: Errno,
    },
}

impl Refusal {
    /// A short, stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Relative { .. } => "relative_path",
            Refusal::ParentComponent { .. } => "parent_component",
            Refusal::OutsideRoots { .. } => "outside_allowed_roots",
            Refusal::WildcardAboveRoot { .. } => "wildcard_above_root",
            Refusal::Denied { .. } => "denied_path",
            Refusal::Symlink { .. } => "symlink",
            Refusal::NotRegular { .. } => "not_a_regular_file",
            Refusal::Io { .. } => "io_error",
        }
    }
}

/// The roots the agent may read beneath and the paths it never reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confinement {
    roots: Vec<PathBuf>,
    denied: Vec<PathBuf>,
}

impl Default for Confinement {
    /// `/var/log`, the default of the chart's `agent.allowedPaths`.
    fn default() -> Self {
        Self::new(vec![PathBuf::from("/var/log")], Vec::new())
    }
}

impl Confinement {
    /// Roots and extra denied paths (the state and secret directories) must be absolute;
    /// relative ones and ones with `..` are dropped with a warning by the caller's flag
    /// parser ([`Confinement::check_root`]). Symlinks in a root itself are the admin's to
    /// choose; the root is opened as given.
    pub fn new(roots: Vec<PathBuf>, extra_denied: Vec<PathBuf>) -> Self {
        let mut denied: Vec<PathBuf> = ALWAYS_DENIED.iter().map(PathBuf::from).collect();
        for d in extra_denied {
            // the directory as given and where it really is: `/var/run` is often `/run`
            if let Ok(real) = std::fs::canonicalize(&d)
                && real != d
            {
                denied.push(real);
            }
            denied.push(d);
        }
        Self { roots, denied }
    }

    /// A root flag's value: absolute, without `..`.
    pub fn check_root(root: &Path) -> Result<(), Refusal> {
        let path = root.display().to_string();
        if !root.is_absolute() {
            return Err(Refusal::Relative { path });
        }
        if root.components().any(|c| c == Component::ParentDir) {
            return Err(Refusal::ParentComponent { path });
        }
        Ok(())
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Whether an input's glob stays beneath an allowed root: absolute, no `..`, its fixed
    /// prefix (up to the first wildcard) below a root and not under a denied path.
    pub fn check_pattern(&self, pattern: &str) -> Result<(), Refusal> {
        let path = Path::new(pattern);
        let text = || pattern.to_owned();
        if !path.is_absolute() {
            return Err(Refusal::Relative { path: text() });
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(Refusal::ParentComponent { path: text() });
        }
        let mut fixed = PathBuf::new();
        let mut wild = false;
        for c in path.components() {
            if c.as_os_str().to_string_lossy().contains(['*', '?', '[']) {
                wild = true;
                break;
            }
            fixed.push(c);
        }
        self.check_denied(&fixed, pattern)?;
        // a wildcard after the fixed prefix names something strictly below it
        if self.root_of(&fixed).is_some() {
            return Ok(());
        }
        match self.roots.iter().find(|r| r.starts_with(&fixed)) {
            Some(root) if wild => Err(Refusal::WildcardAboveRoot {
                path: text(),
                root: root.display().to_string(),
            }),
            _ => Err(self.outside(pattern)),
        }
    }

    /// Whether a plain path (no glob) lies strictly beneath an allowed root: absolute, no
    /// `..`, not denied. Nothing is opened.
    pub fn check_path(&self, path: &Path) -> Result<(), Refusal> {
        let text = || path.display().to_string();
        if !path.is_absolute() {
            return Err(Refusal::Relative { path: text() });
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(Refusal::ParentComponent { path: text() });
        }
        self.check_denied(path, &text())?;
        match self.root_of(path) {
            Some(root) if root != path => Ok(()),
            Some(_) => Err(Refusal::NotRegular { path: text() }),
            None => Err(self.outside(&text())),
        }
    }

    /// Opens a file for reading beneath its allowed root, refusing symlinks on the way,
    /// denied paths and anything but a regular file (a FIFO never blocks the open).
    pub fn open(&self, path: &Path) -> Result<File, Refusal> {
        let text = || path.display().to_string();
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(Refusal::ParentComponent { path: text() });
        }
        self.check_denied(path, &text())?;
        let Some(root) = self.root_of(path) else {
            return Err(self.outside(&text()));
        };
        let rel = path.strip_prefix(root).unwrap_or(path);
        if rel.as_os_str().is_empty() {
            return Err(Refusal::NotRegular { path: text() });
        }
        let io = |e: Errno| Refusal::Io {
            path: text(),
            source: e,
        };
        let dir = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let fd = match open_beneath(&dir, rel, flags) {
            Err(Errno::NOSYS) | Err(Errno::PERM) => open_walk(dir, rel, flags),
            other => other,
        }
        .map_err(|e| match e {
            // RESOLVE_NO_SYMLINKS and O_NOFOLLOW on the last component say ELOOP; a
            // symlink where a directory must be is ENOTDIR under O_NOFOLLOW|O_DIRECTORY
            Errno::LOOP | Errno::NOTDIR | Errno::XDEV => Refusal::Symlink { path: text() },
            e => io(e),
        })?;
        let stat = rustix::fs::fstat(&fd).map_err(io)?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(Refusal::NotRegular { path: text() });
        }
        Ok(File::from(fd))
    }

    /// The longest allowed root `path` lies beneath (or is).
    fn root_of(&self, path: &Path) -> Option<&Path> {
        self.roots
            .iter()
            .filter(|r| path.starts_with(r))
            .max_by_key(|r| r.components().count())
            .map(PathBuf::as_path)
    }

    fn check_denied(&self, path: &Path, shown: &str) -> Result<(), Refusal> {
        match self.denied.iter().find(|d| path.starts_with(d)) {
            Some(d) => Err(Refusal::Denied {
                path: shown.to_owned(),
                denied: d.display().to_string(),
            }),
            None => Ok(()),
        }
    }

    fn outside(&self, path: &str) -> Refusal {
        Refusal::OutsideRoots {
            path: path.to_owned(),
            roots: self
                .roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// Whether a validated pipeline stays within the agent's paths: every input glob beneath an
/// allowed root, every `file:` output beneath `file_output_dir` (none: `file:` is refused).
/// The error names the field. Run by the agent before it starts a pipeline and by the
/// controller before it renders one.
pub fn check_pipeline(
    p: &Pipeline,
    confine: &Confinement,
    file_output_dir: Option<&Path>,
) -> Result<(), (String, Refusal)> {
    for (i, input) in p.inputs.iter().enumerate() {
        for (j, pattern) in input.paths.iter().enumerate() {
            confine
                .check_pattern(pattern)
                .map_err(|r| (format!("spec.inputs[{i}].paths[{j}]"), r))?;
        }
    }
    for (i, o) in p.outputs.iter().enumerate() {
        if let OutputKind::File { path } = &o.kind {
            let field = format!("spec.outputs[{i}].file.path");
            let Some(dir) = file_output_dir else {
                return Err((
                    field,
                    Refusal::OutsideRoots {
                        path: path.display().to_string(),
                        roots: "none: file outputs need --file-output-dir".into(),
                    },
                ));
            };
            Confinement::new(vec![dir.to_path_buf()], Vec::new())
                .check_path(path)
                .map_err(|r| (field, r))?;
        }
    }
    Ok(())
}

/// `openat2` beneath `dir`, no symlinks at all; retried on the kernel's EAGAIN (a rename
/// raced the lookup).
fn open_beneath(dir: &OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, rel, flags | OFlags::NOFOLLOW, Mode::empty(), resolve) {
            Err(Errno::AGAIN) if tries < 8 => tries += 1,
            other => return other,
        }
    }
}

/// Without `openat2` (Linux < 5.6, or a seccomp filter refusing it): one component at a
/// time, each opened `O_NOFOLLOW` relative to the last, so no symlink is ever followed.
fn open_walk(dir: OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let parts: Vec<&std::ffi::OsStr> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p),
            _ => None,
        })
        .collect();
    let Some((last, dirs)) = parts.split_last() else {
        return Err(Errno::INVAL);
    };
    let mut at = dir;
    for part in dirs {
        at = rustix::fs::openat(
            &at,
            *part,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
    }
    rustix::fs::openat(&at, *last, flags | OFlags::NOFOLLOW, Mode::empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::symlink;

    fn confine(root: &Path) -> Confinement {
        Confinement::new(vec![root.to_path_buf()], Vec::new())
    }

    #[test]
    fn patterns_must_start_below_an_allowed_root() {
        let c = Confinement::new(
            vec![PathBuf::from("/var/log")],
            vec!["/var/log/secret".into()],
        );
        for ok in [
            "/var/log/app/*.log",
            "/var/log/syslog",
            "/var/log/pods/*/*/*.log",
            "/var/log/**/*.log",
        ] {
            assert_eq!(c.check_pattern(ok), Ok(()), "{ok}");
        }
        let reason = |p: &str| c.check_pattern(p).map_err(|e| e.reason());
        assert_eq!(reason("/etc/shadow"), Err("outside_allowed_roots"));
        assert_eq!(reason("/var/log/../../etc/shadow"), Err("parent_component"));
        assert_eq!(reason("/**"), Err("wildcard_above_root"));
        assert_eq!(reason("/var/*/x.log"), Err("wildcard_above_root"));
        assert_eq!(reason("/var/log*"), Err("wildcard_above_root"));
        assert_eq!(reason("/var/logs/x"), Err("outside_allowed_roots"));
        assert_eq!(reason("/proc/self/environ"), Err("denied_path"));
        assert_eq!(reason("/var/log/secret/*"), Err("denied_path"));
        assert_eq!(reason("var/log/x"), Err("relative_path"));
    }

    #[test]
    fn denied_paths_hold_even_under_a_root_of_slash() {
        let c = Confinement::new(vec![PathBuf::from("/")], Vec::new());
        let reason = |p: &str| c.check_pattern(p).map_err(|e| e.reason());
        assert_eq!(reason("/proc/self/environ"), Err("denied_path"));
        assert_eq!(
            reason("/var/run/secrets/kubernetes.io/*/token"),
            Err("denied_path")
        );
        assert_eq!(
            c.open(Path::new("/proc/self/environ"))
                .map(|_| ())
                .map_err(|e| e.reason()),
            Err("denied_path")
        );
    }

    #[test]
    fn a_file_beneath_the_root_opens_and_symlinks_anywhere_on_the_way_do_not() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s3cret\n").unwrap();
        std::fs::create_dir(root.path().join("app")).unwrap();
        std::fs::write(root.path().join("app/a.log"), "line\n").unwrap();
        symlink(
            outside.path().join("secret"),
            root.path().join("app/link.log"),
        )
        .unwrap();
        symlink(outside.path(), root.path().join("dirlink")).unwrap();
        symlink(
            "../../../../../../../../etc/passwd",
            root.path().join("app/rel.log"),
        )
        .unwrap();
        let c = confine(root.path());

        let mut text = String::new();
        c.open(&root.path().join("app/a.log"))
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "line\n");
        for p in ["app/link.log", "dirlink/secret", "app/rel.log"] {
            let got = c
                .open(&root.path().join(p))
                .map(|_| ())
                .map_err(|e| e.reason());
            assert_eq!(got, Err("symlink"), "{p}");
        }
        let got = c
            .open(&outside.path().join("secret"))
            .map(|_| ())
            .map_err(|e| e.reason());
        assert_eq!(got, Err("outside_allowed_roots"));
    }

    #[test]
    fn the_component_walk_refuses_symlinks_like_openat2() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s\n").unwrap();
        std::fs::create_dir(root.path().join("app")).unwrap();
        std::fs::write(root.path().join("app/a.log"), "line\n").unwrap();
        symlink(
            outside.path().join("secret"),
            root.path().join("app/link.log"),
        )
        .unwrap();
        symlink(outside.path(), root.path().join("dirlink")).unwrap();
        let dir = || {
            rustix::fs::open(root.path(), OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap()
        };
        let flags = OFlags::RDONLY | OFlags::NONBLOCK;
        assert!(open_walk(dir(), Path::new("app/a.log"), flags).is_ok());
        assert_eq!(
            open_walk(dir(), Path::new("app/link.log"), flags).err(),
            Some(Errno::LOOP)
        );
        assert_eq!(
            open_walk(dir(), Path::new("dirlink/secret"), flags).err(),
            Some(Errno::NOTDIR)
        );
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("pipe.log");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let got = confine(root.path())
            .open(&fifo)
            .map(|_| ())
            .map_err(|e| e.reason());
        assert_eq!(got, Err("not_a_regular_file"));
    }
}
