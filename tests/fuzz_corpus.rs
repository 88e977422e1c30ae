//! The fuzz targets' bodies (fuzz/src/checks) on stable, without cargo-fuzz: every seed and
//! regression input checked in under fuzz/, then inputs mutated from the seeds by a small
//! deterministic fuzzer. `make fuzz` runs the same bodies under libFuzzer (nightly); this
//! keeps them compiling and the corpora passing in `make test`.
//!
//! `OUTRIDER_FUZZ_ITERS=N` changes how many mutated inputs each target gets,
//! `OUTRIDER_FUZZ_SEED=N` which ones. Inputs in fuzz/findings/ (open bugs) are replayed by
//! `cargo test --test fuzz_corpus -- --ignored`.

#[path = "../fuzz/src/checks/mod.rs"]
mod checks;

use std::path::{Path, PathBuf};

use checks::{TARGETS, Target};

/// The files of fuzz/<kind>/<target>/, sorted (none when the folder does not exist).
fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("read fuzz corpus folder").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).expect("read fuzz input");
            (p, data)
        })
        .collect()
}

/// Runs one input, naming it (and how to keep it) when the check fails.
fn run(t: &Target, what: &str, data: &[u8]) {
    if let Err(panic) = std::panic::catch_unwind(|| (t.check)(data)) {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!(
            "fuzz target {}: {what} fails: {msg}\ninput ({} bytes): b\"{}\"\n\
             keep it as a regression: save the bytes under fuzz/regressions/{}/",
            t.name,
            data.len(),
            data.escape_ascii(),
            t.name
        );
    }
}

/// xorshift64*: deterministic, so a failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that mean something to one parser or another.
const INTERESTING: &[u8] = b"\0\n\r\t '\"\\$`*?!,[]{}|#@=%:.-_0123456789msh{}PF";

/// A seed with a few random edits: byte changes, inserts, deletions, repeats and splices.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut d = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(d.len() + 1);
        match rng.below(6) {
            0 if at < d.len() => d[at] = rng.next() as u8,
            1 => d.insert(at, INTERESTING[rng.below(INTERESTING.len())]),
            2 if at < d.len() => {
                let end = (at + 1 + rng.below(16)).min(d.len());
                d.drain(at..end);
            }
            3 if at < d.len() => {
                let end = (at + 1 + rng.below(32)).min(d.len());
                let piece = d[at..end].to_vec();
                d.splice(at..at, piece);
            }
            4 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len() + 1);
                let end = (from + rng.below(64)).min(other.len());
                d.splice(at..at, other[from..end].iter().copied());
            }
            _ if at < d.len() => d[at] ^= 1 << rng.below(8),
            _ => d.push(rng.next() as u8),
        }
    }
    d.truncate(4096);
    d
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Seeds and regressions, then `iters` mutated inputs.
fn fuzz(name: &str, iters: u64) {
    let t = TARGETS
        .iter()
        .find(|t| t.name == name)
        .expect("a target of that name");
    let seeds = inputs("seeds", name);
    assert!(!seeds.is_empty(), "fuzz/seeds/{name}/ has no seeds");
    for (path, data) in seeds.iter().chain(&inputs("regressions", name)) {
        run(t, &path.display().to_string(), data);
    }
    let seeds: Vec<Vec<u8>> = seeds.into_iter().map(|(_, d)| d).collect();
    let seed = env_number("OUTRIDER_FUZZ_SEED").unwrap_or(0x9e37_79b9_7f4a_7c15);
    let iters = env_number("OUTRIDER_FUZZ_ITERS").unwrap_or(iters);
    let mut rng = Rng((seed ^ name.len() as u64) | 1);
    for i in 0..iters {
        let data = mutate(&mut rng, &seeds);
        run(
            t,
            &format!("mutated input {i} (OUTRIDER_FUZZ_SEED={seed})"),
            &data,
        );
    }
}

#[test]
fn every_target_has_a_test_here() {
    let here = include_str!("fuzz_corpus.rs");
    for t in TARGETS {
        assert!(here.contains(&format!("fuzz(\"{}\"", t.name)), "{}", t.name);
        let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/fuzz_targets")
            .join(format!("{}.rs", t.name));
        assert!(bin.exists(), "{} has no cargo-fuzz target", t.name);
    }
}

#[test]
fn known_hosts() {
    fuzz("known_hosts", 1500);
}

#[test]
fn quote() {
    // Each input starts a few shells.
    fuzz("quote", 40);
}

#[test]
fn duration() {
    fuzz("duration", 20_000);
}

#[test]
fn agent_parse() {
    fuzz("agent_parse", 3000);
}

#[test]
fn spool() {
    fuzz("spool", 400);
}

/// Inputs that still fail: open bugs, kept until the code is fixed (then they move to
/// fuzz/regressions/).
#[test]
#[ignore = "open findings: fails until they are fixed"]
fn open_findings() {
    checks::set_strict(true);
    for t in TARGETS {
        for (path, data) in inputs("findings", t.name) {
            run(t, &path.display().to_string(), &data);
        }
    }
}
