//! The bodies of the fuzz targets: one `check(data)` per parser. The cargo-fuzz binaries
//! (nightly, libFuzzer) and `tests/fuzz_corpus.rs` (stable: seeds, regressions and random
//! inputs) share them, so `make test` keeps the bodies compiling and the corpora passing.
//!
//! A check returns on any input the code under test handles correctly and panics, naming
//! the property, when it does not.

pub mod agent_parse;
pub mod duration;
pub mod known_hosts;
pub mod quote;
pub mod spool;

/// A fuzz target: its name (the binary in `fuzz/fuzz_targets/` and the folder of its seeds
/// and regressions) and its body.
pub struct Target {
    pub name: &'static str,
    pub check: fn(&[u8]),
}

/// Every target, in the order `make fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "known_hosts",
        check: known_hosts::check,
    },
    Target {
        name: "quote",
        check: quote::check,
    },
    Target {
        name: "duration",
        check: duration::check,
    },
    Target {
        name: "agent_parse",
        check: agent_parse::check,
    },
    Target {
        name: "spool",
        check: spool::check,
    },
];

thread_local! {
    static STRICT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether known open findings (fuzz/findings/) fail too. Off while fuzzing, so a bug that
/// is already reported does not stop every run at its first input; on when the findings
/// are replayed.
#[allow(
    dead_code,
    reason = "a check calls it only while a finding is open; none is now"
)]
pub fn strict() -> bool {
    STRICT.with(|s| s.get())
}

/// Sets [`strict`] for checks run on this thread.
pub fn set_strict(on: bool) {
    STRICT.with(|s| s.set(on));
}

/// Where checks put scratch files: `OUTRIDER_FUZZ_TMPDIR`, else the system temp directory.
pub fn scratch_root() -> std::path::PathBuf {
    std::env::var_os("OUTRIDER_FUZZ_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}
