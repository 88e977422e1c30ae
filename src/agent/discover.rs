//! Discovery: expands an input's globs (minus its excludes) on an interval, starts a
//! tailer for every new file identity, and tells tailers whose identity is no longer
//! matched to drain and release their file. Filesystem events (`notify`: inotify on
//! Linux) on the directories the globs start from trigger a scan at once; the interval
//! scan stays as the fallback for when events are unavailable or overflow.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::checkpoint::{Entry, write_atomic};
use super::config::InputConfig;
use super::confine::Refusal;
use super::identity::{DevIno, Fingerprint, Saved, resume_offset};
use super::metrics::RefusedLabels;
use super::record::Item;
use super::tail::{self, InputShared, Opened, TailerControl};

/// What one scan of an input's globs found.
#[derive(Debug, Default)]
pub struct Found {
    /// Regular files matching the paths and none of the excludes, sorted by path.
    pub files: Vec<(PathBuf, DevIno)>,
    /// Matches that are symlinks: never followed (the confinement refuses them anyway).
    pub symlinks: Vec<PathBuf>,
    /// The scan stopped at `max` matches.
    pub capped: bool,
}

/// Expands the input's globs, at most `max` matches (files and symlinks) per scan. An
/// exclude matches the file name or the whole path. Globs were checked to start beneath an
/// allowed root, so the walk never starts above one.
pub fn scan(input: &InputConfig, max: usize) -> Found {
    let mut out: BTreeMap<PathBuf, DevIno> = BTreeMap::new();
    let mut symlinks = Vec::new();
    let mut capped = false;
    'patterns: for pattern in &input.paths {
        let Ok(paths) = glob::glob(pattern) else {
            continue;
        };
        for path in paths.flatten() {
            if excluded(input, &path) {
                continue;
            }
            if out.len() + symlinks.len() >= max {
                capped = true;
                break 'patterns;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                symlinks.push(path);
                continue;
            }
            if !meta.is_file() {
                continue;
            }
            use std::os::unix::fs::MetadataExt;
            out.insert(
                path,
                DevIno {
                    dev: meta.dev(),
                    ino: meta.ino(),
                },
            );
        }
    }
    Found {
        files: out.into_iter().collect(),
        symlinks,
        capped,
    }
}

fn excluded(input: &InputConfig, path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    input
        .exclude
        .iter()
        .any(|p| p.matches(&name) || p.matches_path(path))
}

/// The directory each glob starts from (its longest prefix without wildcards), and
/// whether wildcards in directory names need a recursive watch there.
pub fn watch_roots(input: &InputConfig) -> Vec<(PathBuf, bool)> {
    let mut out: Vec<(PathBuf, bool)> = Vec::new();
    for pattern in &input.paths {
        let path = Path::new(pattern);
        let mut root = PathBuf::new();
        let mut comps = path.components().peekable();
        let mut recursive = false;
        while let Some(c) = comps.next() {
            let text = c.as_os_str().to_string_lossy();
            let wild = text.contains(['*', '?', '[']);
            if wild {
                // A wildcard in a directory component (not the file name) needs recursion.
                recursive = comps.peek().is_some();
                break;
            }
            if comps.peek().is_none() {
                break; // a literal file name: watch its directory
            }
            root.push(c);
        }
        if !out.iter().any(|(r, _)| *r == root) {
            out.push((root, recursive));
        }
    }
    out
}

/// Starts a watcher that nudges `wake` on any event under the input's roots. `None` when
/// watching is not possible (polling continues to work).
fn watcher(
    input: &InputConfig,
    wake: tokio::sync::mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        use notify::EventKind;
        use notify::event::ModifyKind;
        // Appends are the tailers' business; only files appearing, vanishing or being
        // renamed matter here (errors, e.g. a queue overflow, trigger a scan too).
        let relevant = match res {
            Ok(ev) => matches!(
                ev.kind,
                EventKind::Create(_)
                    | EventKind::Remove(_)
                    | EventKind::Modify(ModifyKind::Name(_))
            ),
            Err(_) => true,
        };
        if relevant {
            // A full channel already holds a pending wake-up: nothing is lost.
            let _ = wake.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "filesystem events unavailable; polling only"))
    .ok()?;
    for (root, recursive) in watch_roots(input) {
        let mode = if recursive {
            notify::RecursiveMode::Recursive
        } else {
            notify::RecursiveMode::NonRecursive
        };
        if let Err(e) = w.watch(&root, mode) {
            tracing::debug!(root = %root.display(), error = %e, "cannot watch; polling only there");
        }
    }
    Some(w)
}

struct Running {
    ctl: Arc<TailerControl>,
    task: JoinHandle<()>,
}

/// The identity and start offset of every file an input is reading, on disk before any of
/// it is read. A checkpoint names a file only once a batch of it was acknowledged; a file
/// opened just before a kill -9 and renamed out of the glob while the agent was down is still
/// found again through this record. A released file stays in it until its checkpoint entry,
/// at the last offset, is on disk ([`OpenedRecords::drop_released`]): dropped at release, a
/// file read whole but not yet acknowledged would be known to neither after a kill -9.
#[derive(Debug, Default)]
pub struct OpenedFiles {
    path: Option<PathBuf>,
    files: std::sync::Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    /// What is on disk.
    entries: BTreeMap<String, Entry>,
    /// Of those, the files their tailers released (in memory only).
    released: BTreeSet<String>,
}

impl OpenedFiles {
    /// The record kept in `path`, with what it held when the agent last stopped.
    pub fn load(path: PathBuf) -> (Self, BTreeMap<String, Entry>) {
        let before: BTreeMap<String, Entry> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let record = Self {
            path: Some(path),
            files: Default::default(),
        };
        (record, before)
    }

    /// Records a file about to be read (written before this returns).
    pub fn add(&self, key: &str, entry: Entry) {
        self.change(|files| {
            files.released.remove(key);
            files.entries.insert(key.to_owned(), entry);
            true
        });
    }

    /// A tailer released the file: it leaves the record once its last offset is
    /// checkpointed ([`OpenedFiles::drop_released`]), not before.
    pub fn release(&self, key: &str) {
        if let Ok(mut files) = self.files.lock()
            && files.entries.contains_key(key)
        {
            files.released.insert(key.to_owned());
        }
    }

    /// Drops a released file (not one opened again since) from the record.
    pub fn drop_released(&self, key: &str) {
        self.change(|files| files.released.remove(key) && files.entries.remove(key).is_some());
    }

    /// Applies `f` and writes the record when `f` says it changed.
    fn change(&self, f: impl FnOnce(&mut Recorded) -> bool) {
        let Ok(mut files) = self.files.lock() else {
            return;
        };
        if !f(&mut files) {
            return;
        }
        let Some(path) = &self.path else { return };
        let written = serde_json::to_vec(&files.entries)
            .map_err(std::io::Error::other)
            .and_then(|body| write_atomic(path, &body, false));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the files being read");
        }
    }
}

/// The [`OpenedFiles`] of every input of one pipeline, by input name. The checkpoint writer
/// holds them too: it drops a released file from its input's record once the file's
/// checkpoint entry is on disk.
#[derive(Clone, Debug, Default)]
pub struct OpenedRecords(Arc<BTreeMap<String, Arc<OpenedFiles>>>);

/// What each input's record held when the agent last stopped, by input name.
pub type OpenedBefore = BTreeMap<String, BTreeMap<String, Entry>>;

impl OpenedRecords {
    /// The records of the named inputs of pipeline `key` under `<state_dir>/opened/`.
    pub fn load<'a>(
        state_dir: &Path,
        key: &str,
        inputs: impl IntoIterator<Item = &'a str>,
    ) -> (Self, OpenedBefore) {
        let safe = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        let mut records = BTreeMap::new();
        let mut before = BTreeMap::new();
        for input in inputs {
            let path = state_dir
                .join("opened")
                .join(format!("{}_{}.json", safe(key), safe(input)));
            let (record, held) = OpenedFiles::load(path);
            records.insert(input.to_owned(), Arc::new(record));
            before.insert(input.to_owned(), held);
        }
        (Self(Arc::new(records)), before)
    }

    /// One input's record.
    pub fn get(&self, input: &str) -> Option<Arc<OpenedFiles>> {
        self.0.get(input).cloned()
    }

    /// Drops a released file from its input's record (the key is `<input>/<dev>:<ino>`).
    pub fn drop_released(&self, key: &str) {
        let Some((input, _)) = key.split_once('/') else {
            return;
        };
        if let Some(record) = self.0.get(input) {
            record.drop_released(key);
        }
    }
}

fn entry_of(opened: &Opened) -> Entry {
    Entry {
        path: opened.path.clone(),
        saved: Saved {
            offset: opened.offset,
            fingerprint: opened.fingerprint.clone(),
        },
    }
}

/// Runs discovery for one input until `stop`, then waits for its tailers.
/// `saved` holds this input's checkpoint entries at pipeline start, `before` what its
/// record of opened files held ([`OpenedFiles::load`]).
pub async fn run_input(
    shared: Arc<InputShared>,
    mut saved: BTreeMap<String, Entry>,
    before: BTreeMap<String, Entry>,
    scan_interval: Duration,
    stop: CancellationToken,
) {
    // files opened last time but not acknowledged yet: known, from where they started
    for (key, entry) in before {
        saved.entry(key).or_insert(entry);
    }
    let mut tailers: HashMap<DevIno, Running> = HashMap::new();
    let mut deferred: HashMap<DevIno, Instant> = HashMap::new();
    let mut first = true;
    let mut refused: HashSet<PathBuf> = HashSet::new();
    let mut warned_cap = false;
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::channel::<()>(1);
    let _watcher = watcher(&shared.input, wake_tx);
    loop {
        let input = shared.input.clone();
        let max = shared.opts.max_files;
        let scanned = tokio::task::spawn_blocking(move || scan(&input, max))
            .await
            .unwrap_or_default();
        if scanned.capped {
            shared
                .metrics
                .scans_capped
                .get_or_create(&shared.labels)
                .inc();
            if !warned_cap {
                warned_cap = true;
                tracing::warn!(input = %shared.input.name, pipeline = %shared.pipeline, max, "the input's globs match more files than --max-files-per-input; the rest are not read");
            }
        }
        for path in scanned.symlinks {
            let refusal = Refusal::Symlink {
                path: path.display().to_string(),
            };
            refuse(&shared, &mut refused, path, &refusal);
        }
        let found = scanned.files;
        tailers.retain(|_, t| !t.task.is_finished());
        let ids: HashSet<DevIno> = found.iter().map(|(_, id)| *id).collect();
        for (id, t) in &tailers {
            t.ctl.gone.store(!ids.contains(id), Ordering::Release);
        }
        deferred.retain(|id, _| ids.contains(id));
        for (path, id) in &found {
            if tailers.contains_key(id) {
                continue;
            }
            let file = match shared.confine.open(path) {
                Ok(file) => file,
                Err(Refusal::Io { .. }) => continue, // gone since the scan: look again later
                Err(refusal) => {
                    refuse(&shared, &mut refused, path.clone(), &refusal);
                    continue;
                }
            };
            let Some(opened) = open(
                &shared,
                &tailers,
                &mut saved,
                &mut deferred,
                file,
                path,
                *id,
            ) else {
                continue;
            };
            tracing::info!(path = %opened.path, offset = opened.offset, input = %shared.input.name, "tailing file");
            shared.record_opened(&id.key(&shared.input.name), entry_of(&opened));
            // Known before the task first runs, so a copy found in this same scan is compared.
            let ctl = Arc::new(TailerControl {
                fingerprint: std::sync::Mutex::new(opened.fingerprint.clone()),
                ..TailerControl::default()
            });
            let task = tokio::spawn(tail::tail(
                shared.clone(),
                ctl.clone(),
                opened,
                stop.clone(),
            ));
            tailers.insert(*id, Running { ctl, task });
        }
        if first {
            first = false;
            // Entries of files the globs no longer match: drained if they were only renamed
            // in their directory, forgotten if they are gone.
            let input_name = &shared.input.name;
            let stale: Vec<String> = saved
                .keys()
                .filter(|k| !ids.iter().any(|id| &id.key(input_name) == *k))
                .cloned()
                .collect();
            for k in stale {
                // Rotated to a name outside the glob while the agent was down (a restart
                // during logrotate): still beside its old name, its unread tail is drained.
                if let Some(entry) = saved.get(&k)
                    && let Some((path, id, file)) = find_rotated(&shared, &k, entry)
                    && let Some(opened) = open(
                        &shared,
                        &tailers,
                        &mut saved,
                        &mut deferred,
                        file,
                        &path,
                        id,
                    )
                {
                    tracing::info!(path = %opened.path, offset = opened.offset, input = %shared.input.name, "draining a file rotated out of the glob while the agent was down");
                    shared.record_opened(&id.key(&shared.input.name), entry_of(&opened));
                    let ctl = Arc::new(TailerControl {
                        fingerprint: std::sync::Mutex::new(opened.fingerprint.clone()),
                        ..TailerControl::default()
                    });
                    ctl.gone.store(true, Ordering::Release);
                    let task = tokio::spawn(tail::tail(
                        shared.clone(),
                        ctl.clone(),
                        opened,
                        stop.clone(),
                    ));
                    tailers.insert(id, Running { ctl, task });
                    continue;
                }
                saved.remove(&k);
                if shared.tx.send(Item::Forget(Arc::from(k))).await.is_err() {
                    break;
                }
            }
        }
        // A file waiting to settle is looked at again soon, not only at the next scan.
        let next = if deferred.is_empty() {
            scan_interval
        } else {
            scan_interval.min(SETTLE)
        };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            Some(()) = wake_rx.recv() => {}
            _ = stop.cancelled() => break,
        }
    }
    for (_, t) in tailers {
        let _ = t.task.await;
    }
}

/// Longest a new file waits because it looks like a copy of a tailed one.
const MAX_DEFER: Duration = Duration::from_secs(30);

/// How long a short new file must be left alone before it counts as settled.
const SETTLE: Duration = Duration::from_secs(1);

fn recently_modified(file: &File) -> bool {
    file.metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < SETTLE)
}

/// The file a checkpoint entry names, looked for by device+inode in the directory it was
/// read in, when it is no longer at a matched name. Only files this input was already
/// reading are followed this way, and only through the confinement (beneath an allowed
/// root, no symlinks).
fn find_rotated(shared: &InputShared, key: &str, entry: &Entry) -> Option<(PathBuf, DevIno, File)> {
    use std::os::unix::fs::MetadataExt;
    let dir = Path::new(&entry.path).parent()?;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue; // DirEntry::metadata does not follow symlinks
        }
        let id = DevIno {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if id.key(&shared.input.name) != key {
            continue;
        }
        let path = e.path();
        let file = shared.confine.open(&path).ok()?;
        return (DevIno::of_file(&file).ok()? == id).then_some((path, id, file));
    }
    None
}

/// Logs and counts a path the input may not read, once per path.
fn refuse(shared: &InputShared, refused: &mut HashSet<PathBuf>, path: PathBuf, why: &Refusal) {
    if !refused.insert(path) {
        return;
    }
    tracing::warn!(input = %shared.input.name, pipeline = %shared.pipeline, reason = why.reason(), "not reading: {why}");
    shared
        .metrics
        .files_refused
        .get_or_create(&RefusedLabels {
            pipeline: shared.pipeline.to_string(),
            input: shared.input.name.clone(),
            reason: why.reason().into(),
        })
        .inc();
}

/// Decides where to start reading a newly found file (opened beneath its root), or
/// `None` to look again at the next scan.
fn open(
    shared: &InputShared,
    tailers: &HashMap<DevIno, Running>,
    saved: &mut BTreeMap<String, Entry>,
    deferred: &mut HashMap<DevIno, Instant>,
    file: File,
    path: &Path,
    id: DevIno,
) -> Option<Opened> {
    // The path may have been replaced between the scan and the open.
    if DevIno::of_file(&file).ok()? != id {
        return None;
    }
    let size = file.metadata().ok()?.len();
    let fingerprint = Fingerprint::of_file(&file).ok()?;
    let key = id.key(&shared.input.name);
    let offset = if let Some(entry) = saved.remove(&key) {
        let matches = entry.saved.fingerprint.matches(&file).unwrap_or(false);
        resume_offset(Some(&entry.saved), matches, size)
    } else if let Some(off) = shared.truncated.take(&file) {
        // The copy of a file that was truncated: continue where the original stopped.
        off.min(size)
    } else if tailers.values().any(|t| {
        t.ctl
            .fingerprint
            .lock()
            .map(|f| f.len > 0 && f.matches(&file).unwrap_or(false))
            .unwrap_or(false)
    }) {
        // Starts like content a live tailer is reading: a copytruncate copy whose original
        // is not truncated yet (or not noticed yet). Wait, but not forever: an unrelated
        // file may share a short prefix.
        let since = *deferred.entry(id).or_insert_with(Instant::now);
        if since.elapsed() < MAX_DEFER {
            return None;
        }
        tracing::warn!(path = %path.display(), "file still looks like a copy of a tailed file; reading it from 0");
        0
    } else if !fingerprint.is_full() && recently_modified(&file) {
        // Shorter than a fingerprint and still being written: it may be a copy in the
        // making (copytruncate), which cannot be recognised until its first bytes are all
        // there. Wait until it is long enough or has settled; reading it from 0 is safe then.
        let since = *deferred.entry(id).or_insert_with(Instant::now);
        if since.elapsed() < MAX_DEFER {
            return None;
        }
        0
    } else {
        0
    };
    deferred.remove(&id);
    Some(Opened {
        file,
        path: path.to_string_lossy().into_owned(),
        id,
        offset,
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::config::ParserConfig;

    fn input(paths: &[&str], exclude: &[&str]) -> InputConfig {
        InputConfig {
            name: "app".into(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
            exclude: exclude
                .iter()
                .map(|s| glob::Pattern::new(s).unwrap())
                .collect(),
            multiline: None,
            cri: false,
            parser: ParserConfig::None,
            pod_root: "/var/log/pods/".into(),
        }
    }

    #[test]
    fn watch_roots_stop_at_the_first_wildcard() {
        let i = input(
            &[
                "/var/log/app/*.log",
                "/var/log/pods/*/*/*.log",
                "/var/log/syslog",
                "/var/log/app/other-*.log",
            ],
            &[],
        );
        assert_eq!(
            watch_roots(&i),
            [
                (PathBuf::from("/var/log/app"), false),
                (PathBuf::from("/var/log/pods"), true),
                (PathBuf::from("/var/log"), false),
            ]
        );
    }

    #[test]
    fn scan_matches_globs_and_skips_excludes_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["a.log", "b.log", "c.log.gz", "notes.txt"] {
            std::fs::write(d.join(f), "x\n").unwrap();
        }
        std::fs::create_dir(d.join("sub.log")).unwrap();
        let pattern = format!("{}/*.log*", d.display());
        let found = scan(&input(&[&pattern], &["*.gz"]), 100).files;
        let names: Vec<_> = found
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["a.log", "b.log"]);
    }

    #[test]
    fn scan_stops_at_the_cap_and_reports_symlinks_without_following_them() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["a.log", "b.log", "c.log", "d.log"] {
            std::fs::write(d.join(f), "x\n").unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", d.join("e.log")).unwrap();
        let pattern = format!("{}/*.log", d.display());
        let all = scan(&input(&[&pattern], &[]), 100);
        assert_eq!(all.files.len(), 4);
        assert_eq!(all.symlinks, [d.join("e.log")]);
        assert!(!all.capped);
        let some = scan(&input(&[&pattern], &[]), 2);
        assert_eq!(some.files.len(), 2);
        assert!(some.capped);
    }
}
